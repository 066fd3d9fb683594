//! One training run of an encoder: read and check every split, build the model with its heads (and
//! adapters), train, and write the run.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use mtl_config::{Config, Split};
use mtl_core::TaskId;
use mtl_data::{Dataset, LabelMap, TextEncoder};
use mtl_nn::{BertConfig, MultiTaskModel};
use mtl_train::heads::head_specs;
use mtl_train::{resume, tracking, ProgressCallback, Splits, Trainer};
use serde_json::json;

use super::{load_split, log_truncation, model_spec, require_file};
use crate::error::{Error, Result};
use crate::files::{self, CheckpointFiles};
use crate::report::{run_metrics, write_report, Select, TrainReport};
use crate::Architecture;

/// Trains `config` (an encoder's) into `out`, which the caller has prepared (fresh, or resumable).
pub(crate) fn train(
    config: &Config,
    out: &Path,
    select: Select,
    resume: bool,
    stop_after_epoch: Option<usize>,
) -> Result<TrainReport> {
    let base = &config.model.path;
    let weights = crate::manifest::encoder_weights(base);
    require_file(&base.join("config.json"), "model config")?;
    require_file(&weights, "model weights (model.safetensors, its shards' index, or pytorch_model.bin)")?;
    let bert = BertConfig::from_file(&base.join("config.json"))?;
    let (tokenizer, source) = crate::vocab::base_tokenizer(base)?;
    let encoder = TextEncoder::from_tokenizer(tokenizer, &source, config.model.max_len.min(bert.max_tokens()))?;

    // Read and check all data before training, so that bad input fails fast and writes nothing.
    let raw_train = mtl_data::read_split(config, Split::Train)?;
    let labels = LabelMap::for_tasks(config, &raw_train)?;
    let train = Dataset::encode(raw_train, &encoder, &labels, config)?;
    log_truncation(Split::Train, &train, &encoder);
    let splits = Splits {
        train,
        dev: load_split(config, Split::Dev, &encoder, &labels)?,
        test: load_split(config, Split::Test, &encoder, &labels)?,
    };
    let sizes = head_specs(config, &labels);
    let peft = crate::peft::encoder_spec(config, &bert);
    let mut model =
        MultiTaskModel::load(&model_spec(config, &bert, &sizes, peft.as_ref()), &weights, false, &Device::Cpu)?;
    super::set_precision(&mut model, config);
    let trained: usize = model
        .params()
        .with_roles()
        .filter(|(_, _, role)| !mtl_train::groups::is_frozen(role, config, bert.num_hidden_layers, usize::MAX))
        .map(|(_, v, _)| v.elem_count())
        .sum();
    tracing::info!(
        params = model.params().num_params(),
        trained,
        train = splits.train.len(),
        dev = splits.dev.as_ref().map_or(0, Dataset::len),
        test = splits.test.as_ref().map_or(0, Dataset::len),
        "training {} task(s): {}",
        config.tasks.len(),
        config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
    );

    let started = std::time::Instant::now();
    let trainer = Trainer {
        config,
        model: &model,
        labels: &labels,
        keep_per_task_models: select == Select::PerTask,
        checkpoints: Some(out),
        resume,
        frozen: None,
        stop_after_epoch,
        anchor: None,
    };
    let mut progress = ProgressCallback::default();
    let mut tracker = tracking::Tracker::new(out);
    let outcome = trainer.train(&splits, &mut [&mut progress, &mut tracker])?;
    let seconds = started.elapsed().as_secs_f64();

    let mut with_run = run_metrics(&outcome, seconds);
    with_run["per_task_best"] = outcome
        .per_task
        .iter()
        .map(|(task, b)| (task.to_string(), json!({"epoch": b.epoch, "step": b.step, "score": b.score})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let heads: BTreeMap<String, BTreeMap<String, Tensor>> =
        outcome.per_task.iter().map(|(task, b)| (task.to_string(), b.head.clone())).collect();
    if select == Select::PerTask {
        // Each task's checkpoint holds the weights of its own best evaluation; the run's metrics.json records
        // which one that was. They are written before the run's own model, whose metrics.json marks the end.
        let kept: BTreeMap<String, Tensor> =
            model.params().vars().iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        for (task, best) in &outcome.per_task {
            let Some(weights) = best.model.as_ref() else {
                return Err(Error::Usage(format!(
                    "{}: no weights were kept at task `{task}`'s best evaluation; this is a bug",
                    out.display()
                )));
            };
            // The weights that trained; the frozen ones never changed.
            model.params().set_named(weights)?;
            let none = BTreeMap::new();
            let files =
                CheckpointFiles { config, labels: &outcome.labels, metrics: &with_run, heads: &none, reference: None };
            let dir = out.join("per-task").join(task.as_str());
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
            }
            files::save(&dir, &model, &files)?;
        }
        model.params().set_named(&kept)?;
    }
    let reference = match &splits.dev {
        Some(dev) => Some(super::predict::dev_reference(&model, config, &outcome.labels, dev)?),
        None => None,
    };
    let files = CheckpointFiles {
        config,
        labels: &outcome.labels,
        metrics: &with_run,
        heads: &heads,
        reference: reference.as_ref(),
    };
    files::save_into(out, &model, &files)?;
    resume::remove_all(out)?;
    write_report(out, config, &outcome, seconds)?;
    Ok(TrainReport::new(out, Architecture::Bert, config, outcome, seconds))
}
