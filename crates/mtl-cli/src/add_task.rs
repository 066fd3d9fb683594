//! `mtl add-task`: new tasks trained onto a finished model, with every parameter it already has frozen.
//!
//! Each new task gets a fresh head; on a model whose tasks each have their own adapter (per-task LoRA or
//! bottleneck adapters) it also gets its own adapter of the same kind. Nothing the old tasks compute with
//! changes, so their predictions stay bit for bit what they were. The result is a checkpoint with all the
//! tasks, old and new, written atomically to `--out`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use mtl_config::Split;
use mtl_core::TaskId;
use mtl_data::{Dataset, LabelMap};
use mtl_nn::{BertConfig, MultiTaskModel};
use mtl_train::checkpoint::{self, CheckpointFiles};
use mtl_train::heads::head_specs;
use mtl_train::{ProgressCallback, Splits, Trainer};
use serde_json::json;

use crate::commands::{load_checkpoint_with, load_split, log_truncation, metrics_json, model_spec, peft_spec};

pub fn add_task(model_dir: &Path, config_path: &Path, out: &Path, overrides: &[String]) -> Result<()> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    // Unmerged: a shared LoRA adapter stays beside the weights, as it was trained.
    let old = load_checkpoint_with(model_dir, false)?;
    if old.model.bert().int8_layers().is_some() {
        bail!("{}: an int8 model (mtl quantize) is for inference; add tasks to the model it was quantised from", model_dir.display());
    }
    let text = std::fs::read_to_string(config_path).with_context(|| format!("{}: cannot read", config_path.display()))?;
    let (mut combined, names) = old.config.with_new_tasks(&text, config_path, overrides)?;
    // A parameter-efficient model stays on its base model; a fully trained one is its own base.
    if let Some(weights) = &old.base {
        combined.model.path = weights.parent().context("base weights have a directory")?.to_owned();
    }
    let mut new_only = combined.clone();
    new_only.retain_tasks(&names, config_path)?;
    crate::commands::check_encoder_tasks(&new_only, config_path)?;

    // Read and check the new tasks' data before training.
    let raw_train = mtl_data::read_split(&new_only, Split::Train)?;
    let new_labels = LabelMap::for_tasks(&new_only, &raw_train)?;
    let train = Dataset::encode(raw_train, &old.encoder, &new_labels, &new_only)?;
    log_truncation(Split::Train, &train, &old.encoder);
    let splits = Splits {
        train,
        dev: load_split(&new_only, Split::Dev, &old.encoder, &new_labels)?,
        test: load_split(&new_only, Split::Test, &old.encoder, &new_labels)?,
    };
    let mut labels = old.labels.clone();
    labels.extend(new_labels.clone());

    // The model with every task: the old parameters as trained, the new ones initialised.
    let bert = BertConfig::from_file(&model_dir.join(checkpoint::MODEL_CONFIG))?;
    let sizes = head_specs(&combined, &labels);
    let peft = peft_spec(&combined, &bert);
    let weights: HashMap<String, Tensor> =
        old.model.params().vars().iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
    let frozen: BTreeSet<String> = weights.keys().cloned().collect();
    let model = MultiTaskModel::build(&model_spec(&combined, &bert, &sizes, peft.as_ref()), weights, &Device::Cpu)?;
    let fresh: Vec<&String> = model.params().vars().keys().filter(|n| !frozen.contains(*n)).collect();
    let trained: usize = fresh.iter().map(|n| model.params().vars()[*n].elem_count()).sum();
    tracing::info!(
        trained,
        frozen = model.params().num_params() - trained,
        train = splits.train.len(),
        "adding {} to a model of {}",
        names.join(", "),
        old.config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
    );

    let started = std::time::Instant::now();
    let trainer = Trainer {
        config: &new_only,
        model: &model,
        labels: &new_labels,
        keep_per_task_models: false,
        checkpoints: None,
        resume: false,
        frozen: Some(&frozen),
    };
    let mut progress = ProgressCallback::default();
    let outcome = trainer.train(&splits, &mut [&mut progress])?;
    let seconds = started.elapsed().as_secs_f64();
    for (name, var) in old.model.params().vars() {
        let now = model.params().vars()[name].as_tensor().flatten_all()?.to_vec1::<f32>()?;
        if now != var.as_tensor().flatten_all()?.to_vec1::<f32>()? {
            bail!("parameter `{name}` of the old model changed while adding tasks; this is a bug");
        }
    }

    let mut metrics = metrics_json(outcome.dev.as_ref(), outcome.test.as_ref());
    metrics["added_tasks"] = json!(names);
    metrics["added_to"] = json!(model_dir);
    metrics["best_epoch"] = json!(outcome.best_epoch);
    metrics["trained_params"] = json!(trained);
    metrics["train_seconds"] = json!((seconds * 10.0).round() / 10.0);
    let heads: BTreeMap<String, BTreeMap<String, Tensor>> =
        outcome.per_task.iter().map(|(task, b)| (task.to_string(), b.head.clone())).collect();
    let files = CheckpointFiles { config: &combined, labels: &labels, metrics: &metrics, heads: &heads };
    checkpoint::save(out, &model, &files)?;
    for (split, eval) in [("dev", &outcome.dev), ("test", &outcome.test)] {
        if let Some(e) = eval {
            for (task, scores) in &e.scores {
                println!("{split} {task}: {}", serde_json::to_string(scores)?);
            }
        }
    }
    println!(
        "added {} ({} trained parameters, everything else frozen) in {:.0} s; model with all {} tasks in {}",
        names.join(", "),
        trained,
        seconds,
        combined.tasks.len(),
        out.display()
    );
    Ok(())
}
