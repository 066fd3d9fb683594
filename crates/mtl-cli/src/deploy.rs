//! `mtl quantize` and `mtl prune`: smaller models for deployment, each scored against the model it came from
//! on the test sets (the dev sets where a task has no test file) before it is written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use mtl_config::{Config, PeftConfig, Split};
use mtl_train::checkpoint::{self, CheckpointFiles};
use mtl_train::{Scores, Trainer};
use serde_json::{json, Value};

use crate::commands::{load_checkpoint, load_split, Loaded};

/// What a deployment transform did to each score: per split, task and metric, before, after and the change.
fn score(loaded: &Loaded, config: &Config) -> Result<BTreeMap<&'static str, (Scores, f64)>> {
    let trainer = Trainer::evaluator(config, &loaded.model, &loaded.labels);
    let mut out = BTreeMap::new();
    for split in [Split::Dev, Split::Test] {
        if let Some(data) = load_split(config, split, &loaded.encoder, &loaded.labels)? {
            let started = Instant::now();
            let scores = trainer.evaluate(&data)?.scores;
            out.insert(split.name(), (scores, started.elapsed().as_secs_f64()));
        }
    }
    Ok(out)
}

fn change_table(before: &BTreeMap<&'static str, (Scores, f64)>, after: &BTreeMap<&'static str, (Scores, f64)>) -> Value {
    let mut table = json!({});
    for (split, (scores, _)) in after {
        let Some((old, _)) = before.get(split) else { continue };
        for (task, metrics) in scores {
            for (metric, &now) in metrics {
                if let Some(&was) = old.get(task).and_then(|m| m.get(metric)) {
                    table[*split][task][metric] = json!({"before": was, "after": now, "change": now - was});
                }
            }
        }
    }
    table
}

/// Loads `model_dir`, applies `transform`, scores both on the model's own dev/test files (or `config`'s), prints
/// the change per task and writes the result to `out`.
fn transform(model_dir: &Path, out: &Path, config: Option<&Path>, what: Value, transform: impl FnOnce(&mut Loaded) -> Result<()>) -> Result<()> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    let mut loaded = load_checkpoint(model_dir)?;
    let mut data_config = loaded.config.clone();
    if let Some(path) = config {
        let other = Config::load(path, &[])?;
        for (name, task) in &mut data_config.tasks {
            if let Some(t) = other.tasks.get(name) {
                task.data = t.data.clone();
            }
        }
    }
    let before = score(&loaded, &data_config)?;
    let params_before = loaded.model.params().num_params();
    transform(&mut loaded)?;
    let after = score(&loaded, &data_config)?;
    let changes = change_table(&before, &after);
    let mut metrics = json!({"source": model_dir, "transform": what, "changes": changes});
    for (split, (scores, seconds)) in &after {
        metrics[*split] = json!(scores);
        metrics[format!("{split}_seconds")] = json!((seconds * 10.0).round() / 10.0);
        metrics[format!("{split}_seconds_before")] = json!((before[split].1 * 10.0).round() / 10.0);
    }
    metrics["f32_params_before"] = json!(params_before);
    metrics["f32_params"] = json!(loaded.model.params().num_params());
    let heads = BTreeMap::new();
    let files = CheckpointFiles { config: &loaded.config, labels: &loaded.labels, metrics: &metrics, heads: &heads };
    checkpoint::save(out, &loaded.model, &files)?;
    if after.is_empty() {
        tracing::warn!("no task has a dev or test file: the model was written unscored");
    }
    println!("{}", serde_json::to_string_pretty(&changes)?);
    println!("written to {}", out.display());
    Ok(())
}

/// A model whose weights are all its own: a shared LoRA adapter stays merged and the base is not needed.
fn standalone(loaded: &mut Loaded) {
    loaded.config.peft = PeftConfig::default();
    loaded.base = None;
}

pub fn quantize(model_dir: &Path, out: &Path, config: Option<&Path>) -> Result<()> {
    let what = json!({"kind": "int8", "scheme": "weight-only int8 of the encoder's linear layers, symmetric, one scale per output channel"});
    transform(model_dir, out, config, what, |loaded| {
        if loaded.config.peft.enabled() && loaded.model.bert().merged().is_none() {
            bail!(
                "{}: int8 quantisation needs one set of encoder weights; this model has per-task adapters or adapters that do not merge (only a shared LoRA adapter merges)",
                model_dir.display()
            );
        }
        loaded.model.quantize_int8()?;
        standalone(loaded);
        Ok(())
    })
}

pub fn prune(model_dir: &Path, layers: usize, out: &Path, config: Option<&Path>) -> Result<()> {
    let what = json!({"kind": "prune", "dropped_top_layers": layers});
    transform(model_dir, out, config, what, |loaded| {
        if loaded.config.peft.enabled() && loaded.model.bert().merged().is_none() {
            bail!("{}: pruning a model with per-task or non-LoRA adapters is not supported; prune the base model before training the adapters", model_dir.display());
        }
        loaded.model.prune_top_layers(layers)?;
        if loaded.config.peft.enabled() {
            // The merged shared LoRA adapter: the model is written whole, adapters folded in.
            loaded.model.drop_adapters()?;
            standalone(loaded);
        }
        Ok(())
    })
}
