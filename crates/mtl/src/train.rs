//! Training a run from a config: the entry for every backbone (the architecture is read from the base
//! model), the run's `metrics.json` and `report.html`, and single-task baselines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_config::Config;
use mtl_core::TaskId;
use mtl_train::{resume, tracking, Evaluation, Outcome};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{bail, read_json, write_text, Error, Result};
use crate::files;
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

/// How to train.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    pub select: Select,
    /// Continue the run in `out` from its newest training checkpoint.
    pub resume: bool,
    /// Also train each task alone with the same recipe, under `out/baselines/TASK/`.
    pub baselines: bool,
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

/// One task's main test (or dev) metric trained jointly and alone.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineRow {
    pub metric: String,
    pub joint: Option<f64>,
    pub alone: Option<f64>,
    /// Joint minus alone: negative where the task lost to sharing.
    pub delta: Option<f64>,
}

/// `baselines.json`: per task, the joint run against the task trained alone.
#[derive(Clone, Debug, Serialize)]
pub struct Baselines {
    pub split: String,
    pub tasks: BTreeMap<String, BaselineRow>,
    pub mean: BaselineMean,
}

#[derive(Clone, Debug, Serialize)]
pub struct BaselineMean {
    pub joint: f64,
    pub alone: f64,
    pub delta: f64,
}

/// What `train` did: the run (unless only its interrupted baselines were resumed) and the baselines.
#[derive(Debug)]
pub struct Training {
    pub run: Option<TrainReport>,
    pub baselines: Option<Baselines>,
}

/// Trains `config` into `out`. `source` is where the config came from, for error messages.
pub fn train(config: &Config, source: &Path, out: &Path, options: &TrainOptions) -> Result<Training> {
    let architecture = Architecture::detect(&config.model.path)?;
    if architecture.is_decoder() {
        crate::decoder::check_config(config, source)?;
        if options.select == Select::PerTask {
            bail!("--select per-task keeps per-task models of encoders; a decoder with per-task adapters has them already ([peft] per_task = true)");
        }
    } else {
        crate::encoder::check_tasks(config, source)?;
    }
    let has_final = out.join(files::METRICS).exists();
    // A finished joint run whose baselines were interrupted goes on with the baselines.
    let run = match options.resume && options.baselines && has_final {
        true => None,
        false => Some(train_one(config, architecture, out, options.select, options.resume)?),
    };
    let baselines = match options.baselines {
        true => Some(baselines(config, architecture, source, out)?),
        false => None,
    };
    Ok(Training { run, baselines })
}

/// One training run of `config` into `out`.
fn train_one(
    config: &Config,
    architecture: Architecture,
    out: &Path,
    select: Select,
    resume: bool,
) -> Result<TrainReport> {
    if resume {
        if out.join(files::METRICS).exists() {
            bail!("{}: this run has finished (metrics.json is there); there is nothing to resume", out.display());
        }
        if resume::checkpoints(out).is_empty() {
            bail!(
                "{}: nothing to resume: no training checkpoint (checkpoint-STEP/) there (the run stopped before its first one); remove the directory and train again",
                out.display()
            );
        }
        resume::remove_partial(out)?;
    } else if out.exists() {
        bail!(
            "{}: the output directory already exists; choose another, remove it, or continue it with --resume",
            out.display()
        );
    }
    match architecture {
        Architecture::Bert => crate::encoder::train::train(config, out, select, resume),
        Architecture::Llama => crate::decoder::train::train(config, out, resume),
    }
}

/// Trains each task of `config` alone with the same recipe (static weights and no surgery, which need
/// several tasks) into `out/baselines/TASK/`, and writes `out/baselines.json` with each task's main test
/// metric jointly and alone, and their difference (negative where the task lost to sharing).
fn baselines(config: &Config, architecture: Architecture, source: &Path, out: &Path) -> Result<Baselines> {
    let joint: Value = read_json(&out.join(files::METRICS))?;
    let split = if joint.get("test").is_some() { "test" } else { "dev" };
    let mut rows = BTreeMap::new();
    for (task, task_config) in &config.tasks {
        let dir = out.join("baselines").join(task.as_str());
        if !dir.join(files::METRICS).exists() {
            let resume = !resume::checkpoints(&dir).is_empty();
            if dir.exists() && !resume {
                std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
            }
            let mut alone = config.clone();
            alone.retain_tasks(&[task.to_string()], source)?;
            alone.training.weighting = Default::default();
            alone.training.surgery = Default::default();
            tracing::info!("baseline: {task} alone");
            train_one(&alone, architecture, &dir, Select::Joint, resume)?;
        }
        let single: Value = read_json(&dir.join(files::METRICS))?;
        let metric = mtl_train::main_metric(task_config).to_string();
        let (j, a) = (joint[split][task.as_str()][&metric].as_f64(), single[split][task.as_str()][&metric].as_f64());
        if j.is_none() || a.is_none() {
            tracing::warn!("baseline: task `{task}` has no {split} {metric} in both runs; left out of the table");
        }
        let (joint, alone) = if j.is_some() && a.is_some() { (j, a) } else { (None, None) };
        let delta = joint.zip(alone).map(|(j, a)| j - a);
        rows.insert(task.to_string(), BaselineRow { metric, joint, alone, delta });
    }
    let compared = rows.values().filter(|r| r.delta.is_some()).count().max(1) as f64;
    let mean = |f: fn(&BaselineRow) -> Option<f64>| rows.values().filter_map(f).sum::<f64>() / compared;
    let mean = BaselineMean { joint: mean(|r| r.joint), alone: mean(|r| r.alone), delta: mean(|r| r.delta) };
    let summary = Baselines { split: split.to_string(), tasks: rows, mean };
    let text = serde_json::to_string_pretty(&summary).expect("baselines serialize; this is a bug");
    write_text(&out.join("baselines.json"), &text)?;
    Ok(summary)
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
