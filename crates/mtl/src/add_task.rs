//! Adding tasks: new tasks trained onto a finished model, with every parameter it already has frozen.
//!
//! Each new task gets a fresh head; on a model whose tasks each have their own adapter (per-task LoRA or
//! bottleneck adapters) it also gets its own adapter of the same kind. Nothing the old tasks compute with
//! changes, so their predictions stay bit for bit what they were. The result is a checkpoint with all the
//! tasks, old and new, written atomically to `--out`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use mtl_config::Split;
use mtl_core::TaskId;
use mtl_data::{Dataset, LabelMap};
use mtl_nn::{BertConfig, MultiTaskModel};
use mtl_train::heads::head_specs;
use mtl_train::{ProgressCallback, Splits, Trainer};
use serde_json::json;

use crate::encoder::{load_split, log_truncation, model_spec};
use crate::error::{bail, read_text, Error, Result};
use crate::files::{self as checkpoint, CheckpointFiles};
use crate::report::metrics_json;
use crate::run::{Operation, Run};

/// What adding tasks did.
#[derive(Debug)]
pub struct AddTaskReport {
    pub added: Vec<String>,
    /// Parameters trained (the new heads and adapters); everything else stayed frozen.
    pub trained_params: usize,
    /// Tasks of the written model, old and new.
    pub tasks: usize,
    pub dev: Option<mtl_train::Evaluation>,
    pub test: Option<mtl_train::Evaluation>,
    pub seconds: f64,
}

/// Trains the tasks of `config_path` (with `overrides`) onto the run in `model_dir`, everything it has frozen,
/// and writes the run with all its tasks to `out`.
pub fn add_task(model_dir: &Path, config_path: &Path, out: &Path, overrides: &[String]) -> Result<AddTaskReport> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    // Unmerged: a shared LoRA adapter stays beside the weights, as it was trained.
    let run = Run::open_unmerged(model_dir)?;
    run.require(Operation::AddTask)?;
    let old = run.into_encoder()?;
    let text = read_text(config_path)?;
    let (mut combined, names) = old.config.with_new_tasks(&text, config_path, overrides)?;
    // A parameter-efficient model stays on its base model; a fully trained one is its own base.
    if let Some(base) = &old.base {
        combined.model.path = base.clone();
    }
    let mut new_only = combined.clone();
    new_only.retain_tasks(&names, config_path)?;
    crate::encoder::check_tasks(&new_only, config_path)?;

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
    let peft = crate::peft::encoder_spec(&combined, &bert);
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
        stop_after_epoch: None,
        anchor: None,
    };
    let mut progress = ProgressCallback::default();
    let outcome = trainer.train(&splits, &mut [&mut progress])?;
    let seconds = started.elapsed().as_secs_f64();
    for (name, var) in old.model.params().vars() {
        let now = model.params().vars()[name].as_tensor().flatten_all()?.to_vec1::<f32>()?;
        if now != var.as_tensor().flatten_all()?.to_vec1::<f32>()? {
            return Err(Error::Usage(format!(
                "parameter `{name}` of the old model changed while adding tasks; this is a bug"
            )));
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
    // The old tasks answer as before, so their part of the drift reference stays; the new ones' is measured.
    let mut reference = checkpoint::read_reference(model_dir)?;
    if let Some(dev) = &splits.dev {
        let new = crate::encoder::dev_reference(&model, &new_only, &new_labels, dev)?;
        match &mut reference {
            Some(r) => r.tasks.extend(new.tasks),
            None => reference = Some(new),
        }
    }
    let files = CheckpointFiles {
        config: &combined,
        labels: &labels,
        metrics: &metrics,
        heads: &heads,
        reference: reference.as_ref(),
    };
    checkpoint::save(out, &model, &files)?;
    Ok(AddTaskReport {
        added: names,
        trained_params: trained,
        tasks: combined.tasks.len(),
        dev: outcome.dev,
        test: outcome.test,
        seconds,
    })
}
