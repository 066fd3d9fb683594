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
    /// Resume even if a data file changed since the run started (it then goes on with another batch order
    /// and schedule than the run had); otherwise that is an error naming the files.
    pub accept_changed_data: bool,
    /// Also train each task alone with the same recipe, under `out/baselines/TASK/`.
    pub baselines: bool,
    /// Pause after this epoch (checkpoint written, [`crate::TrainError::Interrupted`] returned); the schedule
    /// stays that of `training.epochs` and `resume` goes on.
    pub stop_after_epoch: Option<usize>,
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
            let report = train_one(config, architecture, out, options)?;
            on_run(&report);
            Some(report)
        }
    };
    let baselines = match options.baselines {
        true => Some(baselines(config, architecture, source, out, options.accept_changed_data, on_run)?),
        false => None,
    };
    Ok(Training { run, baselines })
}

/// One training run of `config` into `out`. A fresh run records its data files' SHA-256 in `data.json`; a
/// resume checks them first.
fn train_one(config: &Config, architecture: Architecture, out: &Path, options: &TrainOptions) -> Result<TrainReport> {
    let (select, resume) = (options.select, options.resume);
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
        check_data(config, out, options.accept_changed_data)?;
        resume::remove_partial(out)?;
    } else if out.exists() {
        bail!(
            "{}: the output directory already exists; choose another, remove it, or continue it with --resume",
            out.display()
        );
    } else {
        let prints = serde_json::to_string_pretty(&data_fingerprints(config)?).expect("JSON values serialize");
        std::fs::create_dir_all(out).map_err(Error::io(out))?;
        files::write_durably(&out.join(files::DATA), &prints)?;
    }
    let trained = match architecture {
        Architecture::Bert => crate::encoder::train::train(config, out, select, resume, options.stop_after_epoch),
        Architecture::Llama => crate::decoder::train::train(config, out, resume, options.stop_after_epoch),
    };
    if trained.is_err() && !resume {
        // A run that failed before it wrote anything else leaves nothing behind; one with checkpoints keeps
        // its data.json for the resume.
        let only_data = std::fs::read_dir(out)
            .map(|entries| entries.filter_map(|e| e.ok()).all(|e| e.file_name() == files::DATA))
            .unwrap_or(false);
        if only_data {
            let _ = std::fs::remove_file(out.join(files::DATA));
            let _ = std::fs::remove_dir(out);
        }
    }
    trained
}

/// The SHA-256 of each data file of `config`, by task and split: `{"TASK.SPLIT": {"path", "sha256"}}`.
fn data_fingerprints(config: &Config) -> Result<BTreeMap<String, Value>> {
    let mut prints = BTreeMap::new();
    for (task, t) in &config.tasks {
        let files = [
            ("train", Some(&t.data.train)),
            ("dev", t.data.dev.as_ref()),
            ("test", t.data.test.as_ref()),
            ("labels_file", t.labels_file.as_ref()),
        ];
        for (split, path) in files {
            if let Some(path) = path {
                let sha256 = crate::manifest::sha256(path)?;
                prints.insert(format!("{task}.{split}"), serde_json::json!({"path": path, "sha256": sha256}));
            }
        }
    }
    Ok(prints)
}

/// Refuses to resume on data files that differ from those the run started on (`data.json`), unless `accept`:
/// the same seed over other data is another batch order and schedule, not the run that stopped.
fn check_data(config: &Config, out: &Path, accept: bool) -> Result<()> {
    let path = out.join(files::DATA);
    if !path.exists() {
        tracing::info!(
            "{}: no data.json (the run started before runs recorded one); data files not checked",
            out.display()
        );
        return Ok(());
    }
    let recorded: BTreeMap<String, Value> = match read_json(&path) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{e}; data files not checked");
            return Ok(());
        }
    };
    let now = data_fingerprints(config)?;
    let keys: std::collections::BTreeSet<&String> = recorded.keys().chain(now.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| recorded.get(*k).map(|v| &v["sha256"]) != now.get(*k).map(|v| &v["sha256"]))
        .map(|k| {
            let file = now.get(k).or_else(|| recorded.get(k)).and_then(|v| v["path"].as_str()).unwrap_or("?");
            format!("{k} ({file})")
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    if accept {
        tracing::warn!("resuming on changed data files, as asked: {}", changed.join(", "));
        return Ok(());
    }
    bail!(
        "{}: data files changed since the run started: {}; resuming would go on with another batch order and \
         schedule than the run had. Restore them, train afresh, or pass --accept-changed-data to go on anyway",
        out.display(),
        changed.join(", ")
    )
}

/// Trains each task of `config` alone with the same recipe (static weights and no surgery, which need
/// several tasks) into `out/baselines/TASK/`, and writes `out/baselines.json` with each task's main test
/// metric jointly and alone, and their difference (negative where the task lost to sharing).
fn baselines(
    config: &Config,
    architecture: Architecture,
    source: &Path,
    out: &Path,
    accept: bool,
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
            let options = TrainOptions {
                select: Select::Joint,
                resume,
                accept_changed_data: accept,
                baselines: false,
                stop_after_epoch: None,
            };
            on_run(&train_one(&alone, architecture, &dir, &options)?);
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
