//! Training a run from a config: the entry for every backbone (the architecture is read from the base
//! model), and single-task baselines.

use std::collections::BTreeMap;
use std::path::Path;

use mtl_config::Config;
use mtl_train::resume;
use serde::Serialize;
use serde_json::Value;

use crate::error::{bail, read_json, write_text, Error, Result};
use crate::files;
pub use crate::report::{Select, TrainReport};
use crate::Architecture;

/// How to train.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    pub select: Select,
    /// Continue the run in `out` from its newest training checkpoint.
    pub resume: bool,
    /// Also train each task alone with the same recipe, under `out/baselines/TASK/`.
    pub baselines: bool,
}

/// One task's main test (or dev) metric trained jointly and alone.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineRow {
    // Fields in alphabetical order: baselines.json's keys as before.
    pub alone: Option<f64>,
    /// Joint minus alone: negative where the task lost to sharing.
    pub delta: Option<f64>,
    pub joint: Option<f64>,
    pub metric: String,
}

/// `baselines.json`: per task, the joint run against the task trained alone.
#[derive(Clone, Debug, Serialize)]
pub struct Baselines {
    pub mean: BaselineMean,
    pub split: String,
    pub tasks: BTreeMap<String, BaselineRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BaselineMean {
    pub alone: f64,
    pub delta: f64,
    pub joint: f64,
}

/// What `train` did: the run (unless only its interrupted baselines were resumed) and the baselines.
#[derive(Debug)]
pub struct Training {
    pub run: Option<TrainReport>,
    pub baselines: Option<Baselines>,
}

/// Trains `config` into `out`. `source` is where the config came from, for error messages.
pub fn train(config: &Config, source: &Path, out: &Path, options: &TrainOptions) -> Result<Training> {
    train_with(config, source, out, options, &mut |_| {})
}

/// [`train`], handing each finished run (the joint one, then each baseline) to `on_run` as soon as it ends.
pub fn train_with(
    config: &Config,
    source: &Path,
    out: &Path,
    options: &TrainOptions,
    on_run: &mut dyn FnMut(&TrainReport),
) -> Result<Training> {
    let architecture = crate::base::BaseModel::open(&config.model.path)?.architecture();
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
        false => {
            let report = train_one(config, architecture, out, options.select, options.resume)?;
            on_run(&report);
            Some(report)
        }
    };
    let baselines = match options.baselines {
        true => Some(baselines(config, architecture, source, out, on_run)?),
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
fn baselines(
    config: &Config,
    architecture: Architecture,
    source: &Path,
    out: &Path,
    on_run: &mut dyn FnMut(&TrainReport),
) -> Result<Baselines> {
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
            on_run(&train_one(&alone, architecture, &dir, Select::Joint, resume)?);
        }
        let single: Value = read_json(&dir.join(files::METRICS))?;
        let metric = mtl_train::main_metric(task_config).to_string();
        let (j, a) = (joint[split][task.as_str()][&metric].as_f64(), single[split][task.as_str()][&metric].as_f64());
        if j.is_none() || a.is_none() {
            tracing::warn!("baseline: task `{task}` has no {split} {metric} in both runs; left out of the table");
        }
        let (joint, alone) = if j.is_some() && a.is_some() { (j, a) } else { (None, None) };
        let delta = joint.zip(alone).map(|(j, a)| j - a);
        rows.insert(task.to_string(), BaselineRow { alone, delta, joint, metric });
    }
    let compared = rows.values().filter(|r| r.delta.is_some()).count().max(1) as f64;
    let mean = |f: fn(&BaselineRow) -> Option<f64>| rows.values().filter_map(f).sum::<f64>() / compared;
    let mean = BaselineMean { alone: mean(|r| r.alone), delta: mean(|r| r.delta), joint: mean(|r| r.joint) };
    let summary = Baselines { mean, split: split.to_string(), tasks: rows };
    let text = serde_json::to_string_pretty(&summary).expect("baselines serialize; this is a bug");
    write_text(&out.join("baselines.json"), &text)?;
    Ok(summary)
}
