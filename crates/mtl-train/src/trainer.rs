//! The training loop. It reports events to callbacks and leaves logging, progress and stopping to them.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_config::{Config, StepPlan};
use mtl_core::Mode;
use mtl_core::{HostBatch, TaskId, TaskKind};
use mtl_data::{collate, epoch_batches, Batching, Dataset, Example, LabelMap};
use mtl_metrics::Direction;
use mtl_nn::MultiTaskModel;

use crate::evaluate::{
    predict_examples, score, selection_score, tune_thresholds, Evaluation, Prediction, Scores, TaskInfo,
};
use crate::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::sampling;
use crate::schedule::linear_warmup_decay;
use crate::Result;

/// The datasets of a run.
#[derive(Debug, Default)]
pub struct Splits {
    pub train: Dataset,
    pub dev: Option<Dataset>,
    pub test: Option<Dataset>,
}

/// Sent after every optimiser step.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub epoch: usize,
    /// Optimiser steps done so far, from 1.
    pub step: usize,
    pub total_steps: usize,
    /// Each task's mean loss on this batch.
    pub losses: BTreeMap<TaskId, f32>,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Sent after each epoch's dev evaluation.
#[derive(Clone, Debug)]
pub struct EvalReport<'a> {
    pub epoch: usize,
    pub scores: &'a Scores,
    /// The selection score of this epoch and whether it is the best so far.
    pub selection: Option<f64>,
    pub is_best: bool,
}

/// Whether training goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Receives training events. Every method has a default that does nothing.
pub trait Callback {
    fn on_train_start(&mut self, _total_steps: usize, _steps_per_epoch: usize) {}
    fn on_step(&mut self, _report: &StepReport) {}
    fn on_eval(&mut self, _report: &EvalReport) -> Control {
        Control::Continue
    }
    fn on_train_end(&mut self) {}
}

/// The result of a run, with the best epoch's weights loaded into the model.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    pub dev: Option<Evaluation>,
    pub test: Option<Evaluation>,
    /// The label maps to store with the model: the given ones, with multi-label thresholds tuned on dev
    /// where asked.
    pub labels: BTreeMap<TaskId, LabelMap>,
}

/// The example indices of one training step, and its task under the `sampled` plan.
type Batch = (Vec<usize>, Option<TaskId>);

/// Every epoch's steps under the `sampled` plan: each task's examples are batched on their own (as in
/// single-task training), and each step trains the task the sampler draws, taking that task's next batch (a
/// task whose batches run out starts a new seeded pass over its examples). An epoch has as many steps as all
/// tasks' batches together, the budget of the `mixed` plan.
fn sampled_epochs(train: &Dataset, lengths: &[usize], batching: &Batching, config: &Config) -> Vec<Vec<Batch>> {
    let t = &config.training;
    let tasks: Vec<&TaskId> = config.tasks.keys().collect();
    let members: Vec<Vec<usize>> = tasks
        .iter()
        .map(|task| (0..train.examples.len()).filter(|&i| train.examples[i].labels.contains_key(*task)).collect())
        .collect();
    let sizes: Vec<usize> = members.iter().map(Vec::len).collect();
    let weights: Vec<f64> = tasks.iter().map(|task| t.sampling.weights.get(*task).copied().unwrap_or(0.0)).collect();
    let sampler = sampling::sampler(&t.sampling, &sizes, weights);
    // One seeded pass over a task's examples, cut into batches.
    let pass = |k: usize, epoch: usize, round: usize| -> Vec<Vec<usize>> {
        let own: Vec<usize> = members[k].iter().map(|&i| lengths[i]).collect();
        let seed = t.seed ^ ((k as u64 + 1) << 40) ^ ((round as u64) << 20);
        epoch_batches(&own, batching, seed, epoch).into_iter().map(|b| b.iter().map(|&j| members[k][j]).collect()).collect()
    };
    let mut step = 0;
    (1..=t.epochs)
        .map(|epoch| {
            let mut queues: Vec<std::collections::VecDeque<Vec<usize>>> =
                (0..tasks.len()).map(|k| pass(k, epoch, 0).into()).collect();
            let mut rounds = vec![0; tasks.len()];
            let steps: usize = queues.iter().map(|q| q.len()).sum();
            let progress = if t.epochs > 1 { (epoch - 1) as f64 / (t.epochs - 1) as f64 } else { 0.0 };
            let seed = t.seed ^ 0x5A3D_0000_0000 ^ epoch as u64;
            let order = sampling::draw_tasks(sampler.as_ref(), progress, step, steps, seed);
            step += steps;
            order
                .into_iter()
                .filter(|&k| sizes[k] > 0)
                .map(|k| {
                    if queues[k].is_empty() {
                        rounds[k] += 1;
                        queues[k] = pass(k, epoch, rounds[k]).into();
                    }
                    (queues[k].pop_front().expect("a pass over a non-empty task has batches"), Some(tasks[k].clone()))
                })
                .collect()
        })
        .collect()
}

/// How many collated batches the worker thread may hold ready.
const PREFETCH_BATCHES: usize = 4;

/// Parameters of the heads get `head_lr`; biases and LayerNorm parameters get no weight decay.
fn param_group(name: &str, config: &Config) -> ParamGroup {
    let no_decay = name.ends_with(".bias") || name.contains("LayerNorm");
    let lr = if name.starts_with("heads.") { config.head_lr() } else { config.training.lr };
    ParamGroup { lr, weight_decay: if no_decay { 0.0 } else { config.training.weight_decay } }
}

pub struct Trainer<'a> {
    pub config: &'a Config,
    pub model: &'a MultiTaskModel,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
}

impl Trainer<'_> {
    fn info<'b>(&'b self, labels: &'b BTreeMap<TaskId, LabelMap>) -> TaskInfo<'b> {
        TaskInfo { config: self.config, labels }
    }

    fn predict(
        &self,
        data: &Dataset,
        labels: &BTreeMap<TaskId, LabelMap>,
    ) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
        let examples: Vec<&Example> = data.examples.iter().collect();
        predict_examples(self.model, &examples, &self.info(labels), self.config.training.eval_batch_size)
    }

    /// Evaluates the model on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation> {
        self.evaluate_with(data, self.labels)
    }

    fn evaluate_with(&self, data: &Dataset, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Evaluation> {
        let predictions = self.predict(data, labels)?;
        Ok(score(data, &predictions, &self.info(labels)))
    }

    /// Trains for the configured epochs, keeps the weights of the best dev epoch, and scores dev and test.
    pub fn train(&self, splits: &Splits, callbacks: &mut [&mut dyn Callback]) -> Result<Outcome> {
        let t = &self.config.training;
        let kinds: BTreeMap<TaskId, (TaskKind, usize)> = self.info(self.labels).shapes();
        let lengths: Vec<usize> = splits.train.examples.iter().map(|e| e.encoded.ids.len()).collect();
        let batching =
            Batching { batch_size: t.batch_size, group_by_length: t.group_by_length, max_tokens: t.max_tokens };
        // Every epoch's batches, up front: with a token budget their number varies a little between epochs,
        // and the learning-rate schedule needs the exact total.
        let epochs: Vec<Vec<Batch>> = match t.sampling.plan {
            StepPlan::Mixed => (1..=t.epochs)
                .map(|e| epoch_batches(&lengths, &batching, t.seed, e).into_iter().map(|b| (b, None)).collect())
                .collect(),
            StepPlan::Sampled => sampled_epochs(&splits.train, &lengths, &batching, self.config),
        };
        let total_steps: usize = epochs.iter().map(Vec::len).sum();
        let steps_per_epoch = epochs.first().map_or(0, Vec::len);
        let warmup = (t.warmup_ratio * total_steps as f64).ceil() as usize;
        let params = self
            .model
            .params()
            .vars()
            .iter()
            .map(|(name, var)| (name.clone(), var.clone(), param_group(name, self.config)));
        let mut optimizer = AdamW::new(params, AdamWConfig::default());
        for cb in callbacks.iter_mut() {
            cb.on_train_start(total_steps, steps_per_epoch);
        }

        let direction = Direction::HigherIsBetter;
        let mut best: Option<(usize, f64, Evaluation, BTreeMap<String, Tensor>)> = None;
        let mut step = 0;
        'epochs: for (epoch, batches) in (1..=t.epochs).zip(epochs) {
            // Collation runs on a worker thread, a few batches ahead of the model.
            std::thread::scope(|scope| -> Result<()> {
                let (sender, receiver) = std::sync::mpsc::sync_channel::<HostBatch>(PREFETCH_BATCHES);
                let (train, kinds) = (&splits.train, &kinds);
                scope.spawn(move || {
                    for (chunk, task) in batches {
                        let examples: Vec<&Example> = chunk.iter().map(|&i| &train.examples[i]).collect();
                        // A sampled step trains its task only, even on examples that carry other labels.
                        let batch = match &task {
                            Some(task) => {
                                let only: BTreeMap<TaskId, (TaskKind, usize)> =
                                    kinds.get_key_value(task).map(|(k, v)| (k.clone(), *v)).into_iter().collect();
                                collate(&examples, &only)
                            }
                            None => collate(&examples, kinds),
                        };
                        if sender.send(batch).is_err() {
                            break; // the training loop stopped early
                        }
                    }
                });
                for batch in receiver {
                    let losses = self.model.losses(&batch, Mode::Train)?;
                    let Some(total) = losses
                        .iter()
                        .map(|l| l.loss.clone())
                        .reduce(|a, b| (a + b).expect("scalar losses add; this is a bug"))
                    else {
                        continue;
                    };
                    let grads = self.model.backward(&total)?;
                    let lr_scale = linear_warmup_decay(step, warmup, total_steps);
                    let info = optimizer.step(&grads, lr_scale, t.grad_clip)?;
                    step += 1;
                    let report = StepReport {
                        epoch,
                        step,
                        total_steps,
                        losses: losses
                            .iter()
                            .map(|l| Ok((l.task.clone(), l.loss.to_scalar::<f32>()?)))
                            .collect::<Result<_>>()?,
                        lr: t.lr * lr_scale,
                        grad_norm: info.grad_norm,
                    };
                    for cb in callbacks.iter_mut() {
                        cb.on_step(&report);
                    }
                }
                Ok(())
            })?;
            let Some(dev) = &splits.dev else { continue };
            let eval = self.evaluate(dev)?;
            let scores: &Scores = &eval.scores;
            let selection = selection_score(scores, t.select_metric.as_deref(), self.config);
            let is_best = match (&best, selection) {
                (None, _) => true,
                (Some((_, b, _, _)), Some(s)) => direction.improves(s, *b),
                (Some(_), None) => false,
            };
            let mut stop = false;
            for cb in callbacks.iter_mut() {
                stop |= cb.on_eval(&EvalReport { epoch, scores, selection, is_best }) == Control::Stop;
            }
            if is_best {
                best = Some((epoch, selection.unwrap_or(f64::NEG_INFINITY), eval, self.snapshot()?));
            }
            if stop {
                break 'epochs;
            }
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_end();
        }
        let (best_epoch, mut dev) = match best {
            Some((epoch, _, eval, weights)) => {
                self.restore(&weights)?;
                (epoch, Some(eval))
            }
            None => (t.epochs, None),
        };
        let mut labels = self.labels.clone();
        let tuned: Vec<&TaskId> = self
            .config
            .tasks
            .iter()
            .filter(|(_, c)| c.kind == TaskKind::MultiLabel && c.tune_thresholds)
            .map(|(t, _)| t)
            .collect();
        if let (Some(data), false) = (&splits.dev, tuned.is_empty()) {
            let predictions = self.predict(data, &labels)?;
            for task in tuned {
                let n = labels[task].len();
                let thresholds = tune_thresholds(data, &predictions, task, n);
                tracing::info!(task = %task, ?thresholds, "multi-label thresholds tuned on dev");
                labels.get_mut(task).expect("every task has labels").thresholds = Some(thresholds);
            }
            dev = Some(self.evaluate_with(data, &labels)?);
        }
        let test = splits.test.as_ref().map(|d| self.evaluate_with(d, &labels)).transpose()?;
        Ok(Outcome { best_epoch, dev, test, labels })
    }

    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.model.params().vars().iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
    }

    fn restore(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.model.params().vars() {
            var.set(&weights[name])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mtl_data::{Encoded, Input, Label, Location};

    use super::*;

    fn example(i: usize, tasks: &[&str]) -> Example {
        Example {
            location: Location { path: "x".into(), line: i + 1 },
            input: Input::Text(String::new()),
            encoded: Encoded { ids: vec![1; 3 + i % 7], type_ids: vec![0; 3 + i % 7], word_starts: Vec::new(), truncated: false },
            labels: tasks.iter().map(|t| (TaskId::new(*t).expect("valid"), Label::Class(0))).collect(),
            qa: None,
        }
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
        let config = Config::parse(text, Path::new("t.toml"), &[])?;
        // 40 examples of a, 8 of b, 4 of both.
        let mut examples: Vec<Example> = (0..40).map(|i| example(i, &["a"])).collect();
        examples.extend((40..48).map(|i| example(i, &["b"])));
        examples.extend((48..52).map(|i| example(i, &["a", "b"])));
        let train = Dataset { examples, truncated: 0 };
        let lengths: Vec<usize> = train.examples.iter().map(|e| e.encoded.ids.len()).collect();
        let batching = Batching { batch_size: 4, group_by_length: true, max_tokens: None };
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
}
