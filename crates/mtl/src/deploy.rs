//! Quantisation and pruning: smaller encoder runs for deployment, each scored against the run it came from on
//! the test sets (the dev sets where a task has no test file) before it is written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mtl_config::{Config, PeftConfig, Split};
use mtl_train::{Scores, Trainer};
use serde_json::{json, Value};

use crate::encoder::EncoderRun;
use crate::error::{bail, Result};
use crate::files::{self, CheckpointFiles};
use crate::run::{Operation, Run};

/// What a deployment transform did to each score: per split, task and metric, `{before, after, change}`.
#[derive(Clone, Debug)]
pub struct TransformReport {
    pub changes: Value,
    /// Whether some task was scored (a model without dev or test files is written unscored).
    pub scored: bool,
}

/// Per split: the scores and the seconds they took.
type Scored = BTreeMap<&'static str, (Scores, f64)>;

fn score(run: &EncoderRun, config: &Config) -> Result<Scored> {
    let trainer = Trainer::evaluator(config, &run.model, &run.labels);
    let mut out = BTreeMap::new();
    for split in [Split::Dev, Split::Test] {
        if let Some(data) = crate::encoder::load_split(config, split, &run.encoder, &run.labels)? {
            let started = Instant::now();
            let scores = trainer.evaluate(&data)?.scores;
            out.insert(split.name(), (scores, started.elapsed().as_secs_f64()));
        }
    }
    Ok(out)
}

fn change_table(before: &Scored, after: &Scored) -> Value {
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

/// Opens `model_dir`, applies `transform`, scores both on the run's own dev/test files (or `config`'s), and
/// writes the result to `out`.
fn transform(
    model_dir: &Path,
    out: &Path,
    config: Option<&Path>,
    op: Operation,
    what: Value,
    transform: impl FnOnce(&mut EncoderRun) -> Result<()>,
) -> Result<TransformReport> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    let run = Run::open(model_dir)?;
    run.require(op)?;
    let mut loaded = run.into_encoder()?;
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
    // The transformed model's own answers to the dev set, for drift monitoring.
    let reference = match crate::encoder::load_split(&data_config, Split::Dev, &loaded.encoder, &loaded.labels)? {
        Some(dev) => Some(crate::encoder::dev_reference(&loaded.model, &data_config, &loaded.labels, &dev)?),
        None => None,
    };
    let files = CheckpointFiles {
        config: &loaded.config,
        labels: &loaded.labels,
        metrics: &metrics,
        heads: &heads,
        reference: reference.as_ref(),
    };
    files::save(out, &loaded.model, &files)?;
    if after.is_empty() {
        tracing::warn!("no task has a dev or test file: the model was written unscored");
    }
    Ok(TransformReport { changes, scored: !after.is_empty() })
}

/// A model whose weights are all its own: a shared LoRA adapter stays merged and the base is not needed.
fn standalone(loaded: &mut EncoderRun) {
    loaded.config.peft = PeftConfig::default();
    loaded.base = None;
}

/// Quantises the encoder of the run in `model_dir` to int8 (one scale per output channel of each linear layer;
/// on a CPU with AMX-INT8 or AVX2 the activations are quantised per token when it runs) into `out`, scored on its
/// own dev/test files or those of `config`.
pub fn quantize(model_dir: &Path, out: &Path, config: Option<&Path>) -> Result<TransformReport> {
    let compute = match (mtl_nn::cpu::amx::int8_available(), mtl_nn::cpu::int8::dynamic_available()) {
        (true, _) => "activations quantised per token, int8 x int8 products on AMX",
        (false, true) => "activations quantised per token, int8 x int8 products with AVX2",
        (false, false) => "weight-only: activations in f32",
    };
    let what = json!({"kind": "int8", "scheme": "int8 weights of the encoder's linear layers, symmetric, one scale per output channel", "scored_with": compute});
    transform(model_dir, out, config, Operation::Quantize, what, |loaded| {
        loaded.model.quantize_int8()?;
        standalone(loaded);
        Ok(())
    })
}

/// Drops the top `layers` encoder layers of the run in `model_dir` (model cutting) into `out`.
pub fn prune(model_dir: &Path, layers: usize, out: &Path, config: Option<&Path>) -> Result<TransformReport> {
    let what = json!({"kind": "prune", "dropped_top_layers": layers});
    transform(model_dir, out, config, Operation::Prune, what, |loaded| {
        loaded.model.prune_top_layers(layers)?;
        if loaded.config.peft.enabled() {
            // The merged shared LoRA adapter: the model is written whole, adapters folded in.
            loaded.model.drop_adapters()?;
            standalone(loaded);
        }
        Ok(())
    })
}
