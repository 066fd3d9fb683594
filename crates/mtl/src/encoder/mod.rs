//! The BERT-family backbone: its model spec from a run config, its data, and a trained encoder run loaded for
//! use. Training lives in [`train`].

pub(crate) mod predict;
pub(crate) mod train;

pub(crate) use predict::dev_reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use mtl_config::{Config, Split};
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Dataset, LabelMap, TextEncoder};
use mtl_nn::{BertConfig, HeadSpec, ModelSpec, MultiTaskModel, PeftSpec};
use mtl_train::heads::head_specs;

use crate::error::{bail, Error, Result};
use crate::files;
use crate::manifest::{RunManifest, WeightLayout};

pub(crate) fn model_spec<'a>(
    config: &Config,
    bert: &'a BertConfig,
    tasks: &'a BTreeMap<TaskId, HeadSpec>,
    peft: Option<&'a PeftSpec>,
) -> ModelSpec<'a> {
    ModelSpec { bert, tasks, dropout: config.training.dropout as f32, seed: config.training.seed, peft }
}

/// `model.precision` on a loaded model, with a warning where this machine cannot run bf16 (no AMX) or the
/// encoder family does not use the fused projections.
pub(crate) fn set_precision(model: &mut MultiTaskModel, config: &Config) {
    if config.model.precision != mtl_config::Precision::Bf16 {
        return;
    }
    model.set_precision(mtl_nn::Precision::Bf16);
    if model.bert().precision() != mtl_nn::Precision::Bf16 {
        tracing::warn!("model.precision = \"bf16\" needs Intel AMX (and Linux 5.16 or later); running in f32");
    } else if !model.bert().runs_fused() {
        tracing::warn!("model.precision = \"bf16\" applies to BERT-style encoders; this model runs in f32");
    }
}

pub(crate) fn require_file(path: &Path, what: &'static str) -> Result<()> {
    if !path.is_file() {
        return Err(Error::Missing { path: path.to_owned(), what });
    }
    Ok(())
}

/// Refuses tasks that only a decoder can learn; the error names the config file and the field.
pub(crate) fn check_tasks(config: &Config, path: &Path) -> Result<()> {
    if let Some((name, _)) = config.tasks.iter().find(|(_, t)| t.kind == TaskKind::Generation) {
        bail!(
            "invalid config {}: field `tasks.{name}.kind`: generation tasks need a decoder model (`model.path` a GGUF file or a Llama directory); {} is an encoder",
            path.display(),
            config.model.path.display()
        );
    }
    Ok(())
}

/// The examples of `split`, encoded; `None` where no task has a file for it.
pub(crate) fn load_split(
    config: &Config,
    split: Split,
    encoder: &TextEncoder,
    labels: &BTreeMap<TaskId, LabelMap>,
) -> Result<Option<Dataset>> {
    if config.tasks.values().all(|t| t.data.get(split).is_none()) {
        return Ok(None);
    }
    let raw = mtl_data::leave_out_unseen(mtl_data::read_split(config, split)?, labels, config, split.name());
    let data = Dataset::encode(raw, encoder, labels, config)?;
    log_truncation(split, &data, encoder);
    Ok(Some(data))
}

pub(crate) fn log_truncation(split: Split, data: &Dataset, encoder: &TextEncoder) {
    if data.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} inputs were longer than {} tokens and were truncated (raise model.max_len to keep more)",
            split.name(),
            data.truncated,
            data.len(),
            encoder.max_len()
        );
    }
}

/// A trained encoder run with everything needed to use it.
pub(crate) struct EncoderRun {
    pub(crate) config: Config,
    pub(crate) labels: BTreeMap<TaskId, LabelMap>,
    pub(crate) encoder: TextEncoder,
    pub(crate) model: MultiTaskModel,
    /// A parameter-efficient run's base model directory (checked against its checksum); `None` for a run that
    /// holds all its weights.
    pub(crate) base: Option<PathBuf>,
    /// Loaded for gradients without randomness ([`EncoderRun::load`]).
    pub(crate) gradients: bool,
}

impl EncoderRun {
    /// The run in `dir`; with `merge`, one shared LoRA adapter is merged into the weights (for speed); with
    /// `gradients`, for passes that need gradients without randomness (explanations): dropout off (LoRA's
    /// too) and the projections in f32.
    pub(crate) fn load(dir: &Path, manifest: &RunManifest, merge: bool, gradients: bool) -> Result<Self> {
        let (mut config, labels) = files::read_meta(dir)?;
        if gradients {
            config.training.dropout = 0.0;
            config.peft.dropout = 0.0;
        }
        let base = match &manifest.base {
            Some(b) => Some(b.resolve(dir)?),
            None => None,
        };
        let weights = if base.is_some() { files::ADAPTERS } else { files::WEIGHTS };
        for (name, what) in
            [(files::MODEL_CONFIG, "model config"), (weights, "model weights"), (files::TOKENIZER, "tokenizer")]
        {
            require_file(&dir.join(name), what)?;
        }
        let bert = BertConfig::from_file(&dir.join(files::MODEL_CONFIG))?;
        let encoder = TextEncoder::from_file(&dir.join(files::TOKENIZER), config.model.max_len.min(bert.max_tokens()))?;
        let sizes = head_specs(&config, &labels);
        let peft = crate::peft::encoder_spec(&config, &bert);
        let spec = model_spec(&config, &bert, &sizes, peft.as_ref());
        let model = match (&base, manifest.weights) {
            (Some(base), _) => {
                let mut model = MultiTaskModel::load_with_adapters(
                    &spec,
                    &crate::manifest::encoder_weights(base),
                    &dir.join(files::ADAPTERS),
                    &Device::Cpu,
                )?;
                // One shared LoRA adapter merges into the weights: the plain encoder's speed.
                if merge && peft.as_ref().is_some_and(|p| p.lora().is_some() && !p.per_task()) {
                    model.merge_lora(0)?;
                }
                model
            }
            (None, WeightLayout::Int8) => {
                MultiTaskModel::load_int8(&spec, &dir.join(files::WEIGHTS), &dir.join(files::INT8), &Device::Cpu)?
            }
            (None, _) => MultiTaskModel::load(&spec, &dir.join(files::WEIGHTS), true, &Device::Cpu)?,
        };
        let mut model = model;
        if !gradients {
            set_precision(&mut model, &config);
        }
        Ok(Self { config, labels, encoder, model, base, gradients })
    }
}
