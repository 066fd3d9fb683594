//! The Llama-family backbone: every task as text (a prompt, a target), trained as multi-task supervised
//! fine-tuning through the same loop as the encoder, with LoRA shared by the tasks or one adapter per task,
//! and scores of the generated answers mapped back to labels. [`train`] trains; [`DecoderRun`] is a trained
//! run loaded for use; [`files`] reads the base model.
//!
//! A decoder run directory holds `adapters.safetensors` (the LoRA matrices under PEFT's names, one adapter per
//! task or `default`; or every weight after full fine-tuning), `run.json` (the base model and each task's
//! answer budget), `mtl.toml`, `labels.json` and `metrics.json`.

pub(crate) mod engine;
pub(crate) mod files;
pub(crate) mod tasks;
pub(crate) mod train;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use mtl_config::{Config, Split, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use mtl_data::prompt::{self, check_decoder_tasks, ChatTemplate, PromptFormat};
use mtl_data::{Dataset, Input, LabelMap, Location};
use mtl_nn::DecoderModel;
use mtl_train::{TextTasks, Trainer};

pub use engine::BatchEngine;
pub use files::{check_sampling, Decoder, DecoderFiles, GenerateRequest, Generated};
pub(crate) use tasks::{request_input, DecoderTasks};

use crate::error::{bail, Error, Result};
use crate::files as run_files;
use crate::manifest::RunManifest;
use crate::predict::{PredictionRecord, Span, TaskPrediction};
use crate::Architecture;

/// Checks the tasks of a config for a decoder model; the error names the config file and the field.
pub(crate) fn check_config(config: &Config, path: &Path) -> Result<()> {
    if let Err((field, message)) = check_decoder_tasks(config) {
        bail!("invalid config {}: field `{field}`: {message}", path.display());
    }
    if let Some((field, message)) = crate::peft::unsupported(config, Architecture::Llama) {
        bail!("invalid config {}: field `{field}`: {message}", path.display());
    }
    Ok(())
}

/// The examples of `split` as prompts and targets; `budgets`: each task's answer budget (evaluation data), or
/// `None` for training data.
pub(crate) fn split(
    config: &Config,
    split: Split,
    format: &PromptFormat,
    labels: &BTreeMap<TaskId, LabelMap>,
    budgets: Option<&BTreeMap<TaskId, usize>>,
) -> Result<Option<Dataset>> {
    if config.tasks.values().all(|t| t.data.get(split).is_none()) {
        return Ok(None);
    }
    let mut raw = mtl_data::read_split(config, split)?;
    if split != Split::Train {
        raw = mtl_data::leave_out_unseen(raw, labels, config, split.name());
    }
    prepared(config, split, format, raw, labels, budgets).map(Some)
}

/// [`split`] of examples already read, with warnings about what did not fit.
pub(crate) fn prepared(
    config: &Config,
    split: Split,
    format: &PromptFormat,
    raw: Vec<mtl_data::RawExample>,
    labels: &BTreeMap<TaskId, LabelMap>,
    budgets: Option<&BTreeMap<TaskId, usize>>,
) -> Result<Dataset> {
    let (data, dropped) = format.dataset(raw, labels, config, budgets)?;
    if dropped > 0 {
        tracing::warn!(
            "{}: {dropped} questions were left out: their context had to be cut to fit model.max_len ({}), and every gold answer with it",
            split.name(),
            format.max_len
        );
    }
    if data.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} prompts and answers were longer than {} tokens and were cut (raise model.max_len to keep more)",
            split.name(),
            data.truncated,
            data.len(),
            format.max_len
        );
    }
    Ok(data)
}

/// The chat template of a decoder, and its end-of-sequence token.
pub(crate) fn prompt_parts(files: &DecoderFiles) -> Result<(Option<ChatTemplate>, u32)> {
    let chat = files.chat()?;
    let eos = *files.config.eos_token_ids.first().ok_or_else(|| Error::Invalid {
        path: files.source.clone(),
        message: "the model names no end-of-sequence token".into(),
    })?;
    Ok((chat, eos))
}

/// A trained decoder run: its config and labels, the base model with its adapters, and the base's files.
pub(crate) struct DecoderRun {
    pub(crate) config: Config,
    pub(crate) labels: BTreeMap<TaskId, LabelMap>,
    pub(crate) text: TextTasks,
    chat: Option<ChatTemplate>,
    eos: u32,
    max_len: usize,
}

impl DecoderRun {
    pub(crate) fn load(dir: &Path, manifest: &RunManifest) -> Result<Self> {
        let (config, labels) = run_files::read_meta(dir)?;
        let Some(base) = &manifest.base else {
            return Err(Error::Invalid {
                path: dir.join(crate::manifest::MANIFEST),
                message: "field `base`: a decoder run names its base model".into(),
            });
        };
        let base = base.resolve(dir)?;
        let lora = crate::peft::decoder_lora(&config);
        // Under LoRA the base stays quantised; a fully fine-tuned run's weights replace it as f32.
        let mut files = DecoderFiles::load(&base, lora.is_some())?;
        let adapters_path = dir.join(run_files::ADAPTERS);
        let adapters = candle_core::safetensors::load(&adapters_path, &Device::Cpu).map_err(|e| Error::Invalid {
            path: adapters_path.clone(),
            message: format!("cannot read the adapters: {e}"),
        })?;
        let names: Vec<String> = adapters.keys().cloned().collect();
        files.weights.dense.extend(adapters);
        let (chat, eos) = prompt_parts(&files)?;
        let tasks: Vec<TaskId> = config.tasks.keys().cloned().collect();
        let max_len = config.model.max_len.min(files.config.max_position_embeddings);
        let model =
            DecoderModel::new(&files.config, files.weights, lora.as_ref(), &tasks, config.training.seed, &Device::Cpu)?;
        let missing: Vec<&str> =
            model.params().vars().keys().filter(|n| !names.contains(n)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(Error::Invalid {
                path: adapters_path,
                message: format!("adapters missing: {}", missing.join(", ")),
            });
        }
        let max_new_tokens = manifest.max_new_tokens.clone();
        let text = TextTasks { model, tokenizer: files.tokenizer, stop: files.config.eos_token_ids, max_new_tokens };
        Ok(Self { config, labels, text, chat, eos, max_len })
    }

    /// The run as a plain decoder for free generation: its adapters (shared, or one per task) on the base model.
    pub(crate) fn into_decoder(self) -> Decoder {
        Decoder {
            name: files::model_name(&self.config.model.path),
            model: self.text.model.into_llama(),
            tokenizer: self.text.tokenizer,
            chat: self.chat,
            eos: self.text.stop,
        }
    }

    pub(crate) fn format(&self) -> PromptFormat<'_> {
        PromptFormat {
            tokenizer: &self.text.tokenizer,
            chat: self.chat.as_ref(),
            eos: self.eos,
            max_len: self.max_len,
            system: self.config.model.system_prompt.as_deref(),
        }
    }

    /// Scores on `split` of `config` (checked against the run); `None` where no task has a file for it.
    pub(crate) fn evaluate(&self, config: &Config, s: Split) -> Result<Option<mtl_train::Scores>> {
        let Some(data) = split(config, s, &self.format(), &self.labels, Some(&self.text.max_new_tokens))? else {
            return Ok(None);
        };
        Ok(Some(Trainer::evaluator(config, &self.text, &self.labels).evaluate(&data)?.scores))
    }

    /// Each input's answer to every task's prompt, with what it maps to (the label, labels, values, answer or
    /// (type, value) pairs; generation tasks: the text alone).
    pub(crate) fn predict(&self, inputs: &[(Location, Input)], batch_size: usize) -> Result<Vec<PredictionRecord>> {
        let format = self.format();
        let mut answers: BTreeMap<&TaskId, Vec<String>> = BTreeMap::new();
        for (task, tc) in &self.config.tasks {
            // Inputs too long for the model lose words from their end, as in training.
            let budget = format.answer_room(self.text.max_new_tokens.get(task).copied().unwrap_or(0));
            let prompts: Vec<Vec<u32>> = inputs
                .iter()
                .map(|(at, i)| {
                    format
                        .prompt_ids(tc, i, budget)
                        .map(|(ids, _)| ids)
                        .map_err(|m| Error::Usage(format!("{}:{}: {m}", at.path.display(), at.line)))
                })
                .collect::<Result<_>>()?;
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            answers.insert(task, self.text.answer(task, &refs, batch_size)?);
        }
        let mut records = Vec::with_capacity(inputs.len());
        for (n, (_, input)) in inputs.iter().enumerate() {
            // A decoder's record names its input as the prompt saw it.
            let mut record = PredictionRecord {
                predictions: BTreeMap::new(),
                question: None,
                text: Some(prompt::input_text(input)),
                text_pair: None,
            };
            for (task, tc) in &self.config.tasks {
                let p = task_prediction(tc, self.labels[task].labels(), answers[task][n].clone());
                record.predictions.insert(task.to_string(), p);
            }
            records.push(record);
        }
        Ok(records)
    }
}

/// What a decoder's answer to `task`'s prompt maps to, as [`DecoderRun::predict`] and the scores read it: the
/// label, labels, values, answer or (type, value) pairs it names (generation tasks: the text alone).
pub(crate) fn task_prediction(tc: &TaskConfig, labels: &[String], generated: String) -> TaskPrediction {
    match tc.kind {
        TaskKind::Classification => {
            let label = prompt::label_from_text(tc, labels, &generated).map(String::from);
            TaskPrediction::GeneratedLabel { generated, label }
        }
        TaskKind::MultiLabel => {
            let ids = prompt::labels_from_text(tc, labels, &generated);
            TaskPrediction::GeneratedLabels {
                labels: ids.into_iter().map(|i| labels[i as usize].clone()).collect(),
                generated,
            }
        }
        TaskKind::Regression => {
            let values = prompt::values_from_text(labels, &generated);
            TaskPrediction::GeneratedValues { generated, values }
        }
        TaskKind::QuestionAnswering => {
            TaskPrediction::GeneratedAnswer { answer: prompt::answer_from_text(&generated), generated }
        }
        TaskKind::Generation => TaskPrediction::Generated { generated },
        TaskKind::TokenClassification => {
            let spans = prompt::parse_pairs(&generated).into_iter().map(|(kind, value)| Span { kind, value }).collect();
            TaskPrediction::GeneratedSpans { generated, spans }
        }
    }
}
