//! Updating tasks in place (`mtl update --model DIR --config UPDATE.toml --out NEW`): some of a trained
//! model's tasks train further on new or changed data while the others are protected by rehearsal (a share of
//! their training examples replayed), a pull toward the old weights (L2-SP, or EWC with a diagonal Fisher
//! estimate), or both. Every task is scored on dev and test before and after; the update is refused, and
//! nothing written, when a protected task's main score falls by more than the tolerance.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::Tensor;
use mtl_config::{Config, Penalty, Split, UpdateSettings};
use mtl_core::{Mode, ParamRole, TaskId};
use mtl_data::Dataset;

use mtl_train::{Anchor, ProgressCallback, Scores, Splits, TrainModel, Trainer};
use serde::Serialize;
use serde_json::json;

use crate::encoder::{load_split, log_truncation};
use crate::error::{bail, read_text, Error, Result};
use crate::files::{self, CheckpointFiles};
use crate::run::{Operation, Run};

/// One task's main score on one split, before and after.
#[derive(Clone, Debug, Serialize)]
pub struct TaskChange {
    pub task: String,
    pub split: String,
    pub metric: String,
    pub before: f64,
    pub after: f64,
    /// Whether the task was updated (else protected).
    pub updated: bool,
}

impl TaskChange {
    /// The change in points (0.01 of a score; lower-is-better metrics, by the metric's own direction, counted
    /// so that a loss is negative).
    pub fn points(&self) -> f64 {
        let sign = match mtl_metrics::Direction::of(&self.metric) {
            mtl_metrics::Direction::LowerIsBetter => -1.0,
            _ => 1.0,
        };
        sign * (self.after - self.before) * 100.0
    }
}

/// What an update did.
#[derive(Clone, Debug)]
pub struct UpdateReport {
    pub updated: Vec<String>,
    pub changes: Vec<TaskChange>,
    /// Protected tasks' examples replayed (rehearsal).
    pub rehearsed: usize,
    pub train_examples: usize,
    pub settings: UpdateSettings,
    pub seconds: f64,
    pub config: Config,
}

/// Each task's main score (by the metric's own name) in `scores`.
fn main_scores(scores: &Scores, config: &Config) -> BTreeMap<String, (String, f64)> {
    config
        .tasks
        .iter()
        .filter_map(|(t, c)| {
            let metric = mtl_train::main_metric(c);
            let value = *scores.get(t.as_str())?.get(metric)?;
            Some((t.to_string(), (metric.to_string(), value)))
        })
        .collect()
}

/// The diagonal empirical Fisher of the protected tasks' loss: the mean over `examples` (one at a time) of
/// each parameter's squared gradient, scaled so that its mean over all weights is 1 (then `strength` means what
/// it means for L2-SP, the weights redistributed by importance).
fn fisher(
    model: &dyn TrainModel,
    data: &Dataset,
    shapes: &BTreeMap<TaskId, (mtl_core::TaskKind, usize)>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut n = 0usize;
    for ex in &data.examples {
        let batch = mtl_data::collate(&[ex], shapes);
        let losses = model.losses(&batch, Mode::Train)?;
        let mut total: Option<Tensor> = None;
        for l in losses {
            total = Some(match total {
                Some(t) => (t + l.loss)?,
                None => l.loss,
            });
        }
        let Some(total) = total else { continue };
        let store = model.backward(&total)?;
        for (name, g) in mtl_train::named_grads(&store, model.params().vars()) {
            let sq = g.sqr()?;
            let s = match sum.remove(&name) {
                Some(s) => (s + sq)?,
                None => sq,
            };
            sum.insert(name, s);
        }
        n += 1;
    }
    if n == 0 {
        return Ok(sum);
    }
    let (mut total, mut count) = (0.0f64, 0usize);
    for t in sum.values() {
        total += f64::from(t.sum_all()?.to_scalar::<f32>()?);
        count += t.elem_count();
    }
    let mean = (total / n as f64 / count.max(1) as f64).max(f64::MIN_POSITIVE);
    sum.into_iter().map(|(k, t)| Ok((k, (t / (n as f64 * mean))?))).collect()
}

/// Trains the tasks of `config_path` further (their data and recipe there) in the run `model_dir`, the other
/// tasks protected as its `[update]` table says, and writes the result to `out`.
pub fn update(model_dir: &Path, config_path: &Path, out: &Path, overrides: &[String]) -> Result<UpdateReport> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    let run = Run::open_unmerged(model_dir)?;
    run.require(Operation::Update)?;
    let old = run.into_encoder()?;
    let text = read_text(config_path)?;
    let (mut config, names, settings) = old.config.with_updated_tasks(&text, config_path, overrides)?;
    if let Some(base) = &old.base {
        config.model.path = base.clone();
    }
    let updated: BTreeSet<TaskId> =
        config.tasks.keys().filter(|t| names.iter().any(|n| n == t.as_str())).cloned().collect();
    // One adapter per task: the protected tasks' adapters and heads are frozen, so they answer exactly as
    // before and nothing of theirs needs replaying.
    let isolated = old.model.bert().peft().is_some_and(|p| p.per_task());
    let frozen: Option<BTreeSet<String>> = isolated.then(|| {
        old.model
            .params()
            .with_roles()
            .filter(|(_, _, role)| match role {
                ParamRole::Head(t) => !updated.contains(t),
                ParamRole::Adapter { adapter, .. } => !updated.iter().any(|u| u.as_str() == adapter),
                _ => true,
            })
            .map(|(n, _, _)| n.clone())
            .collect()
    });
    if isolated {
        tracing::info!("per-task adapters: the protected tasks' adapters and heads stay frozen (no rehearsal needed)");
    }

    // The training data: the updated tasks' examples, and a share of the others' (rehearsal). A protected
    // task's label is kept on an example only when the draw picks it.
    let raw = mtl_data::leave_out_unseen(mtl_data::read_split(&config, Split::Train)?, &old.labels, &config, "train");
    // Seeded: the rehearsal's draws depend on the seed alone.
    let mut draw = crate::tune::SplitMix64(config.training.seed);
    let mut fisher_raw = Vec::new();
    let mut rehearsed = 0;
    let mut kept = Vec::new();
    for mut ex in raw {
        let protected = ex.labels.keys().any(|t| !updated.contains(t));
        if protected && fisher_raw.len() < settings.fisher_examples && settings.penalty == Penalty::Ewc {
            let mut f = ex.clone();
            f.labels.retain(|t, _| !updated.contains(t));
            fisher_raw.push(f);
        }
        if protected {
            if !isolated && draw.unit() < settings.rehearsal {
                rehearsed += 1;
            } else {
                ex.labels.retain(|t, _| updated.contains(t));
            }
        }
        if !ex.labels.is_empty() {
            kept.push(ex);
        }
    }
    let train = Dataset::encode(kept, &old.encoder, &old.labels, &config)?;
    log_truncation(Split::Train, &train, &old.encoder);
    let dev = load_split(&config, Split::Dev, &old.encoder, &old.labels)?;
    let test = load_split(&config, Split::Test, &old.encoder, &old.labels)?;
    let train_examples = train.len();

    // Every task scored before.
    let evaluator = Trainer::evaluator(&config, &old.model, &old.labels);
    let before: BTreeMap<&str, Scores> = [("dev", &dev), ("test", &test)]
        .into_iter()
        .filter_map(|(s, d)| Some((s, d.as_ref()?)))
        .map(|(s, d)| Ok((s, evaluator.evaluate(d)?.scores)))
        .collect::<Result<_>>()?;

    // The pull toward the old weights: every parameter but the updated tasks' heads.
    let anchor = match settings.penalty {
        Penalty::None => None,
        penalty => {
            let reference: BTreeMap<String, Tensor> = old
                .model
                .params()
                .with_roles()
                .filter(|(_, _, role)| !matches!(role, ParamRole::Head(t) if updated.contains(t)))
                .map(|(n, v, _)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?;
            let weights = match penalty {
                Penalty::Ewc => {
                    let data = Dataset::encode(fisher_raw, &old.encoder, &old.labels, &config)?;
                    let started = std::time::Instant::now();
                    let info = mtl_train::TaskInfo { config: &config, labels: &old.labels };
                    let f = fisher(&old.model, &data, &info.shapes())?;
                    tracing::info!(
                        examples = data.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "EWC: Fisher estimate"
                    );
                    Some(f)
                }
                _ => None,
            };
            Some(Anchor { reference, weights, strength: settings.strength })
        }
    };
    tracing::info!(
        updated = names.join(", "),
        train = train_examples,
        rehearsed,
        penalty = ?settings.penalty,
        "updating {} of {} task(s)",
        names.len(),
        config.tasks.len()
    );

    let started = std::time::Instant::now();
    let trainer = Trainer {
        config: &config,
        model: &old.model,
        labels: &old.labels,
        keep_per_task_models: false,
        checkpoints: None,
        resume: false,
        frozen: frozen.as_ref(),
        stop_after_epoch: None,
        anchor: anchor.as_ref(),
    };
    let splits = Splits { train, dev: dev.clone(), test: test.clone() };
    let outcome = trainer.train(&splits, &mut [&mut ProgressCallback::default()])?;
    let seconds = started.elapsed().as_secs_f64();

    let mut changes = Vec::new();
    for (split, eval) in [("dev", outcome.dev.as_ref()), ("test", outcome.test.as_ref())] {
        let (Some(eval), Some(was)) = (eval, before.get(split)) else { continue };
        let was = main_scores(was, &config);
        for (task, (metric, after)) in main_scores(&eval.scores, &config) {
            let Some((_, before)) = was.get(&task) else { continue };
            let updated = updated.iter().any(|u| u.as_str() == task);
            changes.push(TaskChange { task, split: split.into(), metric, before: *before, after, updated });
        }
    }
    let report = UpdateReport {
        updated: names.clone(),
        changes,
        rehearsed,
        train_examples,
        settings: settings.clone(),
        seconds,
        config: config.clone(),
    };
    // A protected task that fell too far, on test where it has a test file.
    let fell: Vec<&TaskChange> = report
        .changes
        .iter()
        .filter(|c| !c.updated)
        .filter(|c| c.split == "test" || !report.changes.iter().any(|o| o.task == c.task && o.split == "test"))
        .filter(|c| -c.points() > settings.tolerance)
        .collect();
    if !fell.is_empty() {
        let list: Vec<String> = fell
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} {:.4} -> {:.4} ({:+.2} points)",
                    c.task,
                    c.split,
                    c.metric,
                    c.before,
                    c.after,
                    c.points()
                )
            })
            .collect();
        return Err(Error::Usage(format!(
            "not written: the update cost protected tasks more than update.tolerance ({} points): {}. Raise update.rehearsal, set a penalty (update.penalty = \"l2sp\" or \"ewc\"), or raise the tolerance",
            settings.tolerance,
            list.join("; ")
        )));
    }

    let mut metrics = crate::report::metrics_json(outcome.dev.as_ref(), outcome.test.as_ref());
    metrics["updated_tasks"] = json!(names);
    metrics["updated_from"] = json!(model_dir);
    metrics["update"] = json!(settings);
    metrics["update_changes"] = json!(report.changes);
    metrics["rehearsed_examples"] = json!(rehearsed);
    metrics["best_epoch"] = json!(outcome.best_epoch);
    metrics["train_seconds"] = json!((seconds * 10.0).round() / 10.0);
    let heads: BTreeMap<String, BTreeMap<String, Tensor>> =
        outcome.per_task.iter().map(|(task, b)| (task.to_string(), b.head.clone())).collect();
    let reference = match &dev {
        Some(d) => Some(crate::encoder::dev_reference(&old.model, &config, &outcome.labels, d)?),
        None => None,
    };
    let files = CheckpointFiles {
        config: &config,
        labels: &outcome.labels,
        metrics: &metrics,
        heads: &heads,
        reference: reference.as_ref(),
    };
    files::save(out, &old.model, &files)?;
    Ok(report)
}
