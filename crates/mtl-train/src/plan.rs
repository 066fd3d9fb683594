//! Which examples each optimiser step trains on: the batches of every epoch under the `mixed` plan (all tasks'
//! examples together) or the `sampled` plan (one task per step, drawn by the task sampler), and the sampling
//! probabilities the log reports.

use std::collections::BTreeMap;

use mtl_config::{Config, StepPlan};
use mtl_core::TaskId;
use mtl_data::{epoch_batches, Batching, Dataset};

use crate::sampling;

/// The example indices of one training step, and its task under the `sampled` plan.
pub(crate) type Batch = (Vec<usize>, Option<TaskId>);

/// The progress of training at `epoch` (from 1) as the samplers see it: 0 at the first epoch, 1 at the last.
pub(crate) fn progress(epoch: usize, epochs: usize) -> f64 {
    if epochs > 1 {
        (epoch - 1) as f64 / (epochs - 1) as f64
    } else {
        0.0
    }
}

/// Each task's passes over its training examples in the whole run (tasks in name order): its own
/// `sampling.epochs`, or the run's epochs.
fn task_passes(config: &Config) -> Vec<f64> {
    let t = &config.training;
    config.tasks.keys().map(|task| t.sampling.epochs.get(task).copied().unwrap_or(t.epochs as f64)).collect()
}

/// The task sampler of a config over the training examples of each task, each task counted as its examples
/// times its share of the run's epochs (its examples when it takes them all).
pub(crate) fn task_sampler(train: &Dataset, config: &Config) -> Box<dyn sampling::TaskSampler> {
    let t = &config.training;
    let sizes: Vec<usize> = config
        .tasks
        .keys()
        .zip(task_passes(config))
        .map(|(task, passes)| {
            let n = train.examples.iter().filter(|e| e.labels.contains_key(task)).count();
            let counted = (n as f64 * passes / t.epochs as f64).round() as usize;
            if n > 0 {
                counted.max(1)
            } else {
                0
            }
        })
        .collect();
    let weights: Vec<f64> =
        config.tasks.keys().map(|task| t.sampling.weights.get(task).copied().unwrap_or(0.0)).collect();
    sampling::sampler(&t.sampling, &sizes, weights)
}

/// Each epoch's sampling probabilities under the `sampled` plan (none under `mixed`), for the logs.
pub(crate) fn sampling_probabilities(train: &Dataset, config: &Config) -> Vec<Option<BTreeMap<TaskId, f64>>> {
    let t = &config.training;
    if t.sampling.plan != StepPlan::Sampled {
        return vec![None; t.epochs];
    }
    let sampler = task_sampler(train, config);
    (1..=t.epochs)
        .map(|epoch| Some(config.tasks.keys().cloned().zip(sampler.probabilities(progress(epoch, t.epochs))).collect()))
        .collect()
}

/// Every epoch's steps under the `sampled` plan: each task's examples are batched on their own (as in
/// single-task training), and each step trains the task the sampler draws, taking that task's next batch. A
/// task's batches come from one stream over the run: seeded passes over its examples, one after the other,
/// so a task that runs out starts its next pass and a pass left unfinished at an epoch's end goes on in the
/// next. An epoch has as many steps as all tasks' batches together (the budget of the `mixed` plan), each
/// task's counted for its passes (`sampling.epochs`) spread evenly over the run's epochs.
pub(crate) fn sampled_epochs(
    train: &Dataset,
    lengths: &[usize],
    batching: &Batching,
    config: &Config,
) -> Vec<Vec<Batch>> {
    let t = &config.training;
    let tasks: Vec<&TaskId> = config.tasks.keys().collect();
    let members: Vec<Vec<usize>> = tasks
        .iter()
        .map(|task| (0..train.examples.len()).filter(|&i| train.examples[i].labels.contains_key(*task)).collect())
        .collect();
    let sampler = task_sampler(train, config);
    // Pass `p` over a task's examples, seeded, cut into batches.
    let pass = |k: usize, p: usize| -> Vec<Vec<usize>> {
        let own: Vec<usize> = members[k].iter().map(|&i| lengths[i]).collect();
        let seed = t.seed ^ ((k as u64 + 1) << 40) ^ ((p as u64) << 20);
        epoch_batches(&own, batching, seed, p + 1)
            .into_iter()
            .map(|b| b.iter().map(|&j| members[k][j]).collect())
            .collect()
    };
    let mut streams: Vec<(std::collections::VecDeque<Vec<usize>>, usize)> =
        (0..tasks.len()).map(|k| (pass(k, 0).into(), 0)).collect();
    // Each task's batches over the whole run, and the first `e` epochs' share of them.
    let budgets: Vec<f64> =
        streams.iter().zip(task_passes(config)).map(|((q, _), passes)| q.len() as f64 * passes).collect();
    let share = |k: usize, epoch: usize| (budgets[k] * epoch as f64 / t.epochs as f64).round() as usize;
    let mut step = 0;
    (1..=t.epochs)
        .map(|epoch| {
            let steps: usize = (0..tasks.len()).map(|k| share(k, epoch) - share(k, epoch - 1)).sum();
            let seed = t.seed ^ 0x5A3D_0000_0000 ^ epoch as u64;
            let order = sampling::draw_tasks(sampler.as_ref(), progress(epoch, t.epochs), step, steps, seed);
            step += steps;
            order
                .into_iter()
                .filter(|&k| !members[k].is_empty())
                .map(|k| {
                    let (queue, p) = &mut streams[k];
                    if queue.is_empty() {
                        *p += 1;
                        *queue = pass(k, *p).into();
                    }
                    (queue.pop_front().expect("a pass over a non-empty task has batches"), Some(tasks[k].clone()))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mtl_data::{Encoded, Example, Input, Label, Location};

    use crate::Result;

    use super::*;

    fn example(i: usize, tasks: &[&str]) -> Example {
        Example {
            location: Location { path: "x".into(), line: i + 1 },
            input: Input::Text(String::new()),
            encoded: Encoded {
                ids: vec![1; 3 + i % 7],
                type_ids: vec![0; 3 + i % 7],
                word_starts: Vec::new(),
                truncated: false,
            },
            labels: tasks.iter().map(|t| (TaskId::new(*t).expect("valid"), Label::Class(0))).collect(),
            qa: None,
        }
    }

    /// A config's text, and a training set of `groups` (so many examples, labelled for these tasks, numbered
    /// on), with its lengths and batches of 4 grouped by length.
    fn setup(text: &str, groups: &[(usize, &[&str])]) -> Result<(Config, Dataset, Vec<usize>, Batching)> {
        let config = Config::parse(text, Path::new("t.toml"), &[])?;
        let mut examples: Vec<Example> = Vec::new();
        for (n, tasks) in groups {
            let first = examples.len();
            examples.extend((first..first + n).map(|i| example(i, tasks)));
        }
        let train = Dataset { examples, truncated: 0 };
        let lengths: Vec<usize> = train.examples.iter().map(|e| e.encoded.ids.len()).collect();
        Ok((config, train, lengths, Batching { batch_size: 4, group_by_length: true, max_tokens: None }))
    }

    #[test]
    fn sampled_steps_hold_their_task_only_and_keep_the_budget() -> Result<()> {
        let text = r#"
[model]
path = "m"
[training]
epochs = 3
batch_size = 4
lr = 1e-3
sampling = { plan = "sampled", sampler = "annealed" }
[tasks.a]
kind = "classification"
data = { train = "a.jsonl" }
[tasks.b]
kind = "classification"
data = { train = "b.jsonl" }
"#;
        // 40 examples of a, 8 of b, 4 of both.
        let (config, train, lengths, batching) = setup(text, &[(40, &["a"]), (8, &["b"]), (4, &["a", "b"])])?;
        let epochs = sampled_epochs(&train, &lengths, &batching, &config);
        assert_eq!(epochs.len(), 3);
        for steps in &epochs {
            assert_eq!(steps.len(), 11 + 3, "a: 44 examples in 11 batches, b: 12 in 3");
            for (batch, task) in steps {
                let task = task.as_ref().expect("sampled steps name their task");
                assert!(batch.iter().all(|&i| train.examples[i].labels.contains_key(task)));
            }
        }
        assert_eq!(epochs, sampled_epochs(&train, &lengths, &batching, &config), "seeded");
        Ok(())
    }

    /// A task's own passes (`sampling.epochs`): its share of every epoch's steps, each of its examples once
    /// before any twice (one stream of passes over the run, not a new pass every epoch), and the sampler
    /// counting it at that share.
    #[test]
    fn a_task_with_fewer_passes_is_spread_over_the_run() -> Result<()> {
        let text = r#"
[model]
path = "m"
[training]
epochs = 4
batch_size = 4
lr = 1e-3
sampling = { plan = "sampled", sampler = "proportional", epochs = { b = 1 } }
[tasks.a]
kind = "classification"
data = { train = "a.jsonl" }
[tasks.b]
kind = "classification"
data = { train = "b.jsonl" }
"#;
        // 400 examples each: 100 batches a pass.
        let (config, train, lengths, batching) = setup(text, &[(400, &["a"]), (400, &["b"])])?;
        let probabilities = sampling_probabilities(&train, &config);
        let b = TaskId::new("b").expect("valid");
        assert!((probabilities[0].as_ref().expect("sampled")[&b] - 0.2).abs() < 1e-12, "b counts 100 of 500");
        let epochs = sampled_epochs(&train, &lengths, &batching, &config);
        assert!(epochs.iter().all(|e| e.len() == 100 + 25), "a: 100 batches an epoch, b: 100 over 4 epochs");
        let b_batches: Vec<&Vec<usize>> =
            epochs.iter().flatten().filter(|(_, task)| task.as_ref() == Some(&b)).map(|(batch, _)| batch).collect();
        // 500 draws at p = 0.2: 100 expected, sd 8.9.
        assert!(b_batches.len().abs_diff(100) <= 36, "{} batches of b", b_batches.len());
        let mut first_pass: Vec<usize> = b_batches.iter().take(100).flat_map(|batch| batch.iter().copied()).collect();
        first_pass.sort_unstable();
        if b_batches.len() >= 100 {
            assert_eq!(first_pass, (400..800).collect::<Vec<_>>(), "b's first 100 batches are one pass");
        } else {
            first_pass.dedup();
            assert_eq!(first_pass.len(), b_batches.len() * 4, "no example of b twice");
        }
        Ok(())
    }
}
