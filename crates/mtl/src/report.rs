//! What a finished training run reports: the [`TrainReport`] returned to the caller, and the run's own
//! `metrics.json` and `report.html`, for every backbone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_config::Config;
use mtl_core::TaskId;
use mtl_train::{tracking, Evaluation, Outcome};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::Architecture;

/// What a run keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Select {
    /// The weights of the best weighted score (each task's best head is saved under `heads/` as well).
    #[default]
    Joint,
    /// Also a whole checkpoint per task at that task's best evaluation, under `per-task/TASK/`; with per-task
    /// adapters on a frozen backbone the saved model takes each task's adapter and head from its own best.
    PerTask,
}

/// A finished training run.
#[derive(Debug)]
pub struct TrainReport {
    pub out: PathBuf,
    pub architecture: Architecture,
    /// The configured epochs.
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_step: usize,
    pub steps: usize,
    pub stopped_early: bool,
    pub skipped_steps: usize,
    /// Where the saved model takes each task's parameters from its own best evaluation: that step per task.
    pub composed: Option<BTreeMap<TaskId, usize>>,
    pub dev: Option<Evaluation>,
    pub test: Option<Evaluation>,
    pub seconds: f64,
}

impl TrainReport {
    pub(crate) fn new(out: &Path, architecture: Architecture, config: &Config, outcome: Outcome, seconds: f64) -> Self {
        let composed = outcome.composed.then(|| outcome.per_task.iter().map(|(t, b)| (t.clone(), b.step)).collect());
        Self {
            out: out.to_owned(),
            architecture,
            epochs: config.training.epochs,
            best_epoch: outcome.best_epoch,
            best_step: outcome.best_step,
            steps: outcome.steps,
            stopped_early: outcome.stopped_early,
            skipped_steps: outcome.skipped_steps,
            composed,
            dev: outcome.dev,
            test: outcome.test,
            seconds,
        }
    }
}

/// `report.html` from the run's log and its final evaluation.
pub(crate) fn write_report(out: &Path, config: &Config, outcome: &Outcome, seconds: f64) -> Result<()> {
    let log = tracking::read_log(&out.join(tracking::LOG));
    let main_metrics =
        config.tasks.iter().map(|(t, c)| (t.to_string(), mtl_train::main_metric(c).to_string())).collect();
    let final_eval = match (&outcome.test, &outcome.dev) {
        (Some(t), _) => Some(("test", t)),
        (None, Some(d)) => Some(("dev", d)),
        _ => None,
    };
    let t = &config.training;
    let summary = vec![
        ("tasks".to_string(), config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")),
        ("step plan / sampler".to_string(), format!("{:?} / {:?}", t.sampling.plan, t.sampling.sampler).to_lowercase()),
        (
            "loss weighting / surgery".to_string(),
            format!("{:?} / {:?}", t.weighting.method, t.surgery.method).to_lowercase(),
        ),
        (
            "steps".to_string(),
            format!("{}{}", outcome.steps, if outcome.stopped_early { " (stopped early)" } else { "" }),
        ),
        ("best".to_string(), format!("epoch {}, step {}", outcome.best_epoch, outcome.best_step)),
        ("skipped steps".to_string(), outcome.skipped_steps.to_string()),
        ("training wall time".to_string(), format!("{seconds:.0} s")),
    ];
    let title = format!("mtl training report: {}", out.display());
    let input = tracking::ReportInput { title: &title, summary, log: &log, main_metrics, final_eval };
    let path = out.join("report.html");
    tracking::write_report(&path, &input).map_err(Error::io(&path))
}

/// A finished run's `metrics.json`: the scores, and how training went.
pub(crate) fn run_metrics(outcome: &Outcome, seconds: f64) -> Value {
    let mut m = metrics_json(outcome.dev.as_ref(), outcome.test.as_ref());
    m["best_epoch"] = json!(outcome.best_epoch);
    m["best_step"] = json!(outcome.best_step);
    // What the saved model holds: the best selection score's weights, or each task's own best (per_task_best).
    m["selection"] = json!(if outcome.composed { "per_task" } else { "joint" });
    m["steps"] = json!(outcome.steps);
    m["stopped_early"] = json!(outcome.stopped_early);
    m["skipped_steps"] = json!(outcome.skipped_steps);
    m["task_weights"] = json!(outcome.task_weights);
    m["train_seconds"] = json!((seconds * 10.0).round() / 10.0);
    if let Some(test) = &outcome.test {
        m["test_reports"] = json!(test.reports);
    }
    m
}

/// The `dev` and `test` scores of a `metrics.json`.
pub(crate) fn metrics_json(dev: Option<&Evaluation>, test: Option<&Evaluation>) -> Value {
    let mut v = json!({});
    if let Some(d) = dev {
        v["dev"] = json!(d.scores);
    }
    if let Some(t) = test {
        v["test"] = json!(t.scores);
    }
    v
}
