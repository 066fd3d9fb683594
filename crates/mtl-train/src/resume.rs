//! Training checkpoints for an exact resume: `OUT/checkpoint-STEP/`, each written to a temporary directory,
//! flushed to disk (every file, then the directory), renamed into place and the rename flushed too; only then
//! are older checkpoints removed, so a crash or power loss at any moment leaves at least one complete
//! checkpoint. A resume takes the newest checkpoint that reads back whole; a damaged newer one (cut short by a
//! crash before this was so, or by a full disk) is named in a warning and moved aside to `damaged-checkpoint-STEP/`.
//! A file that cannot be read at all (permissions, an I/O error) is an error, not damage.
//!
//! - `model.safetensors`: every parameter.
//! - `optimizer.safetensors`: AdamW's moments by parameter name (`m.NAME`, `v.NAME`).
//! - `surgery.safetensors`: the gradient surgery's state, when it keeps one (DB-MTL's moving averages).
//! - `adalora.safetensors`: AdaLoRA's importance scores and rank patterns, in an AdaLoRA run.
//! - `best.safetensors`: the weights of the best evaluation so far; `heads.safetensors`: each task's head at
//!   its own best; `per-task/TASK.safetensors`: all weights at each task's best, when kept.
//! - `state.json`: the position in the data (epoch and batch; the data order itself follows from the seed),
//!   the optimiser's step count, the dropout generator's position, the loss weighting's state, the
//!   selection state with the best evaluation's scores and reports, and the resolved config.
//!
//! The task sampler's draws and PCGrad's projection orders are seeded by the run's seed and the epoch or
//! step, so they need no state of their own.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use crate::evaluate::{Evaluation, Scores};
use crate::{Result, TrainError};

pub const PREFIX: &str = "checkpoint-";
const STATE: &str = "state.json";
/// The prefix of a checkpoint moved aside while one of the same step replaces it, then its step.
const REPLACED: &str = ".mtl-replaced-checkpoint-";
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const BEST: &str = "best.safetensors";
const HEADS: &str = "heads.safetensors";
const SURGERY: &str = "surgery.safetensors";
const ADALORA: &str = "adalora.safetensors";
const PER_TASK: &str = "per-task";

/// A task's best evaluation, without its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskBestState {
    pub epoch: usize,
    pub step: usize,
    /// `None` for a score that is not a finite number (JSON has no such numbers).
    pub score: Option<f64>,
}

/// The best evaluation so far, without its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestState {
    pub epoch: usize,
    pub step: usize,
    /// `None` when the evaluation had no finite selection score.
    pub score: Option<f64>,
    /// Scores with NaN (undefined metrics) written as null.
    pub scores: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    pub reports: BTreeMap<String, mtl_metrics::ClassificationReport<String>>,
    pub confusions: BTreeMap<String, (Vec<String>, Vec<Vec<usize>>)>,
}

impl BestState {
    pub fn evaluation(&self) -> Evaluation {
        let scores: Scores = self
            .scores
            .iter()
            .map(|(g, m)| (g.clone(), m.iter().map(|(k, v)| (k.clone(), v.unwrap_or(f64::NAN))).collect()))
            .collect();
        Evaluation { scores, reports: self.reports.clone(), confusions: self.confusions.clone() }
    }

    pub fn scores_of(eval: &Evaluation) -> BTreeMap<String, BTreeMap<String, Option<f64>>> {
        eval.scores
            .iter()
            .map(|(g, m)| (g.clone(), m.iter().map(|(k, v)| (k.clone(), v.is_finite().then_some(*v))).collect()))
            .collect()
    }
}

/// Everything of a run's state that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    /// The epoch under way (from 1), and how many of its batches are done.
    pub epoch: usize,
    pub next_batch: usize,
    pub skipped: usize,
    pub optimizer_steps: u64,
    /// Each parameter's AdamW update count.
    pub param_steps: BTreeMap<String, u64>,
    /// Whether all weights are kept at each task's best (`--select per-task`); a resume must agree.
    pub keep_per_task_models: bool,
    /// The dropout generator's word position, in decimal (JSON numbers cannot hold a u128).
    pub dropout_position: String,
    pub weighting: serde_json::Value,
    pub best: Option<BestState>,
    pub since_best: usize,
    pub last_eval_step: Option<usize>,
    pub per_task: BTreeMap<TaskId, TaskBestState>,
    /// The resolved config of the run, which a resume must match.
    pub config: String,
    /// Step and evaluation reports sent to the callbacks so far.
    pub reports: usize,
}

/// The tensors of a checkpoint.
#[derive(Default)]
pub struct TrainTensors {
    pub model: BTreeMap<String, Tensor>,
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    pub best: Option<BTreeMap<String, Tensor>>,
    pub heads: BTreeMap<String, Tensor>,
    pub per_task: BTreeMap<TaskId, BTreeMap<String, Tensor>>,
    /// The gradient surgery's state (DB-MTL's moving averages), by name.
    pub surgery: BTreeMap<String, Vec<f32>>,
    /// AdaLoRA's importance scores and rank patterns, by name.
    pub adalora: BTreeMap<String, Vec<f32>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_owned(), source }
}

fn invalid(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Invalid { path: path.to_owned(), message: message.into() }
}

fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    candle_core::safetensors::save(&map, path)?;
    sync(path)
}

/// Flushes a file's or a directory's contents (a directory's: the names in it) to disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(invalid(path, "missing from the checkpoint"));
    }
    // Read first, so that a file that cannot be read is an I/O error, and one that does not parse is damage.
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| invalid(path, e.to_string()))?;
    Ok(tensors.into_iter().collect())
}

/// The directory of the checkpoint after `step` steps.
pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("{PREFIX}{step:08}"))
}

/// The steps of the complete checkpoints in `out`, in increasing order.
pub fn checkpoints(out: &Path) -> Vec<usize> {
    let Ok(entries) = std::fs::read_dir(out) else { return Vec::new() };
    let mut steps: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(PREFIX)?.parse().ok())
        .filter(|step| checkpoint_dir(out, *step).join(STATE).is_file())
        .collect();
    steps.sort_unstable();
    steps
}

/// Which checkpoints to remove so that the newest `keep` remain.
pub fn to_remove(steps: &[usize], keep: usize) -> Vec<usize> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.truncate(sorted.len().saturating_sub(keep));
    sorted
}

/// Writes a checkpoint of `state` and `tensors` under `out` (created if needed), then removes all but the
/// newest `keep`.
pub fn save(out: &Path, state: &TrainState, tensors: &TrainTensors, keep: usize) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tmp = tempfile::Builder::new().prefix(".mtl-checkpoint-").tempdir_in(out).map_err(io_err(out))?;
    let dir = tmp.path();
    save_tensors(&dir.join(MODEL), &tensors.model)?;
    let mut moments = BTreeMap::new();
    for (name, (m, v)) in &tensors.moments {
        moments.insert(format!("m.{name}"), Tensor::from_slice(m, m.len(), &Device::Cpu)?);
        moments.insert(format!("v.{name}"), Tensor::from_slice(v, v.len(), &Device::Cpu)?);
    }
    save_tensors(&dir.join(OPTIMIZER), &moments)?;
    if let Some(best) = &tensors.best {
        save_tensors(&dir.join(BEST), best)?;
    }
    save_tensors(&dir.join(HEADS), &tensors.heads)?;
    for (file, named) in [(SURGERY, &tensors.surgery), (ADALORA, &tensors.adalora)] {
        if !named.is_empty() {
            let map: BTreeMap<String, Tensor> = named
                .iter()
                .map(|(name, v)| Ok((name.clone(), Tensor::from_slice(v, v.len(), &Device::Cpu)?)))
                .collect::<Result<_>>()?;
            save_tensors(&dir.join(file), &map)?;
        }
    }
    if !tensors.per_task.is_empty() {
        std::fs::create_dir(dir.join(PER_TASK)).map_err(io_err(dir))?;
        for (task, weights) in &tensors.per_task {
            save_tensors(&dir.join(PER_TASK).join(format!("{task}.safetensors")), weights)?;
        }
    }
    let text = serde_json::to_string_pretty(state).expect("the training state serializes; this is a bug");
    std::fs::write(dir.join(STATE), text).map_err(io_err(&dir.join(STATE)))?;
    sync(&dir.join(STATE))?;
    if !tensors.per_task.is_empty() {
        sync(&dir.join(PER_TASK))?;
    }
    sync(dir)?;
    let target = checkpoint_dir(out, state.step);
    // A checkpoint of the same step (one written when a run was interrupted at an epoch's end, rewritten after
    // the resumed run's evaluation) stays until the new one is in place: moved aside, not removed first.
    let aside = out.join(format!("{REPLACED}{}", state.step));
    if target.exists() {
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
        }
        std::fs::rename(&target, &aside).map_err(io_err(&target))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &target).map_err(|source| {
        let _ = std::fs::remove_dir_all(&kept);
        TrainError::Io { path: target.clone(), source }
    })?;
    // The rename is durable before any older checkpoint goes.
    sync(out)?;
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
    }
    for step in to_remove(&checkpoints(out), keep) {
        let old = checkpoint_dir(out, step);
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Reads the newest checkpoint in `out` that reads back whole. Newer ones that do not (a file cut short,
/// JSON that does not parse) are named in a warning and moved aside to `damaged-checkpoint-STEP/`; an error
/// lists every checkpoint tried when none reads. A file that cannot be read at all stops the resume: it may
/// be whole, and a retry may read it.
pub fn load_latest(out: &Path) -> Result<(TrainState, TrainTensors)> {
    let steps = checkpoints(out);
    if steps.is_empty() {
        return Err(invalid(out, format!("nothing to resume: no complete {PREFIX}* directory")));
    }
    let mut damaged: Vec<(PathBuf, String)> = Vec::new();
    for &step in steps.iter().rev() {
        let dir = checkpoint_dir(out, step);
        match load(&dir) {
            Ok(loaded) => {
                for (bad, why) in &damaged {
                    tracing::warn!("{} is damaged ({why}); resuming from {} instead", bad.display(), dir.display());
                    let name = bad.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let aside = out.join(format!("damaged-{name}"));
                    if aside.exists() {
                        std::fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
                    }
                    std::fs::rename(bad, &aside).map_err(io_err(bad))?;
                }
                return Ok(loaded);
            }
            Err(e @ TrainError::Io { .. }) => return Err(e),
            Err(e) => damaged.push((dir, e.to_string())),
        }
    }
    let tried: Vec<String> = damaged.iter().map(|(dir, why)| format!("{}: {why}", dir.display())).collect();
    Err(invalid(out, format!("no checkpoint reads back whole: {}", tried.join("; "))))
}

/// Reads one checkpoint directory.
fn load(dir: &Path) -> Result<(TrainState, TrainTensors)> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| invalid(&state_path, e.to_string()))?;
    let mut tensors = TrainTensors { model: load_tensors(&dir.join(MODEL))?, ..TrainTensors::default() };
    let mut moments = load_tensors(&dir.join(OPTIMIZER))?;
    let names: Vec<String> = moments.keys().filter_map(|k| k.strip_prefix("m.").map(str::to_string)).collect();
    for name in names {
        let m = moments.remove(&format!("m.{name}")).expect("listed above");
        let v = moments
            .remove(&format!("v.{name}"))
            .ok_or_else(|| invalid(&dir.join(OPTIMIZER), format!("no v.{name}")))?;
        tensors.moments.insert(name, (m.to_vec1::<f32>()?, v.to_vec1::<f32>()?));
    }
    if dir.join(BEST).is_file() {
        tensors.best = Some(load_tensors(&dir.join(BEST))?);
    }
    tensors.heads = load_tensors(&dir.join(HEADS))?;
    for (file, named) in [(SURGERY, &mut tensors.surgery), (ADALORA, &mut tensors.adalora)] {
        if dir.join(file).is_file() {
            for (name, t) in load_tensors(&dir.join(file))? {
                named.insert(name, t.to_vec1::<f32>()?);
            }
        }
    }
    if dir.join(PER_TASK).is_dir() {
        for task in state.per_task.keys() {
            tensors
                .per_task
                .insert(task.clone(), load_tensors(&dir.join(PER_TASK).join(format!("{task}.safetensors")))?);
        }
    }
    Ok((state, tensors))
}

/// Removes what a killed run left half-written in `out`: temporary checkpoint and final-model directories.
pub fn remove_partial(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".mtl-checkpoint-") || name.starts_with(".mtl-final-") {
            std::fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        } else if let Some(step) = name.strip_prefix(REPLACED).and_then(|s| s.parse::<usize>().ok()) {
            // Stopped between moving a checkpoint aside and putting its replacement in place: it is the one.
            let target = checkpoint_dir(out, step);
            if target.exists() {
                std::fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
            } else {
                std::fs::rename(entry.path(), &target).map_err(io_err(&target))?;
            }
        }
    }
    Ok(())
}

/// Removes every training checkpoint in `out` (once the final model is written).
pub fn remove_all(out: &Path) -> Result<()> {
    for step in checkpoints(out) {
        let dir = checkpoint_dir(out, step);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainState {
        TrainState {
            step,
            epoch: 1,
            next_batch: step,
            skipped: 0,
            optimizer_steps: step as u64,
            param_steps: BTreeMap::new(),
            keep_per_task_models: false,
            dropout_position: "0".into(),
            weighting: serde_json::Value::Null,
            best: None,
            since_best: 0,
            last_eval_step: None,
            per_task: BTreeMap::new(),
            config: "config".into(),
            reports: 0,
        }
    }

    fn tensors(value: f32) -> TrainTensors {
        let t = Tensor::from_slice(&[value; 64], 64, &Device::Cpu).expect("a tensor");
        TrainTensors {
            model: BTreeMap::from([("w".to_string(), t.clone())]),
            moments: BTreeMap::from([("w".to_string(), (vec![value; 64], vec![value; 64]))]),
            heads: BTreeMap::from([("h".to_string(), t)]),
            ..TrainTensors::default()
        }
    }

    /// A newest checkpoint cut short (as a crash mid-write left one before checkpoints were flushed) is
    /// passed over and removed: the resume takes the one before; with none whole, the error names each.
    #[test]
    fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() -> Result<()> {
        let out = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        save(out.path(), &state(1), &tensors(1.0), 3)?;
        save(out.path(), &state(2), &tensors(2.0), 3)?;
        let newest = checkpoint_dir(out.path(), 2).join(MODEL);
        let bytes = std::fs::read(&newest).map_err(io_err(&newest))?;
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).map_err(io_err(&newest))?;
        let (state, tensors) = load_latest(out.path())?;
        assert_eq!(state.step, 1);
        assert_eq!(tensors.moments["w"].0[0], 1.0);
        assert_eq!(checkpoints(out.path()), vec![1], "the damaged one is set aside");
        assert!(out.path().join("damaged-checkpoint-00000002").is_dir());
        let only = checkpoint_dir(out.path(), 1).join(STATE);
        std::fs::write(&only, "{").map_err(io_err(&only))?;
        let err = load_latest(out.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no checkpoint reads back whole") && err.contains("checkpoint-00000001"), "{err}");
        Ok(())
    }

    #[test]
    fn keeps_the_newest() {
        assert_eq!(to_remove(&[30, 10, 20], 2), vec![10]);
        assert_eq!(to_remove(&[10], 2), Vec::<usize>::new());
        assert_eq!(to_remove(&[5, 1, 9, 3], 1), vec![1, 3, 5]);
    }
}
