//! One training run of a decoder: every task as prompts and targets, LoRA (or full fine-tuning) through the
//! shared training loop, and the run written with its manifest.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use mtl_config::{Config, Split};
use mtl_core::TaskId;
use mtl_data::prompt::{self, PromptFormat};
use mtl_data::{Dataset, LabelMap};
use mtl_nn::DecoderModel;
use mtl_train::{resume, tracking, ProgressCallback, Splits, TextTasks, Trainer};

use super::{prepared, prompt_parts, split, DecoderFiles};
use crate::error::{write_text, Result};
use crate::files::{self, publish_into};
use crate::manifest::{BaseRef, RunManifest, WeightLayout, FORMAT_VERSION};
use crate::report::{run_metrics, write_report, TrainReport};
use crate::Architecture;

/// One training run of a decoder model into `out` (checked and prepared by the caller).
pub(crate) fn train(
    config: &Config,
    out: &Path,
    resume_run: bool,
    stop_after_epoch: Option<usize>,
) -> Result<TrainReport> {
    let lora = crate::peft::decoder_lora(config);
    // A frozen base (LoRA) stays quantised; full fine-tuning trains f32 weights.
    let files = DecoderFiles::load(&config.model.path, lora.is_some())?;
    let (chat, eos) = prompt_parts(&files)?;
    let format = PromptFormat {
        tokenizer: &files.tokenizer,
        chat: chat.as_ref(),
        eos,
        max_len: config.model.max_len.min(files.config.max_position_embeddings),
        system: config.model.system_prompt.as_deref(),
    };
    let raw_train = mtl_data::read_split(config, Split::Train)?;
    let labels = prompt::with_fallback_means(LabelMap::for_tasks(config, &raw_train)?, config, &raw_train);
    let train = prepared(config, Split::Train, &format, raw_train, &labels, None)?;
    // Each task's answer budget: as configured, or its longest training answer and some room.
    let mut max_new_tokens = BTreeMap::new();
    for (task, tc) in &config.tasks {
        let longest = train
            .examples
            .iter()
            .filter(|e| e.labels.contains_key(task))
            .map(|e| e.encoded.type_ids.iter().filter(|&&t| t == 1).count())
            .max()
            .unwrap_or(0);
        max_new_tokens.insert(task.clone(), tc.max_new_tokens.unwrap_or(longest + 8));
    }
    let splits = Splits {
        train,
        dev: split(config, Split::Dev, &format, &labels, Some(&max_new_tokens))?,
        test: split(config, Split::Test, &format, &labels, Some(&max_new_tokens))?,
    };
    let tasks: Vec<TaskId> = config.tasks.keys().cloned().collect();
    let source = files.source.clone();
    let model =
        DecoderModel::new(&files.config, files.weights, lora.as_ref(), &tasks, config.training.seed, &Device::Cpu)?;
    let text = TextTasks {
        model,
        tokenizer: files.tokenizer.clone(),
        stop: files.config.eos_token_ids.clone(),
        max_new_tokens,
    };
    tracing::info!(
        trained = text.model.params().num_params(),
        train = splits.train.len(),
        dev = splits.dev.as_ref().map_or(0, Dataset::len),
        test = splits.test.as_ref().map_or(0, Dataset::len),
        chat_template = chat.is_some(),
        "training {} task(s) as text on {}: {}",
        config.tasks.len(),
        source.display(),
        tasks.iter().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
    );
    let started = std::time::Instant::now();
    let trainer = Trainer {
        config,
        model: &text,
        labels: &labels,
        keep_per_task_models: false,
        checkpoints: Some(out),
        resume: resume_run,
        frozen: None,
        stop_after_epoch,
        anchor: None,
    };
    let mut progress = ProgressCallback::default();
    let mut tracker = tracking::Tracker::new(out);
    let outcome = trainer.train(&splits, &mut [&mut progress, &mut tracker])?;
    let seconds = started.elapsed().as_secs_f64();

    let metrics = run_metrics(&outcome, seconds);
    let params = text.model.params();
    let base = BaseRef::new(&source, out)?;
    publish_into(out, |dir| {
        params.save(&dir.join(files::ADAPTERS))?;
        let manifest = RunManifest {
            format_version: FORMAT_VERSION,
            architecture: Architecture::Llama,
            weights: WeightLayout::Adapters,
            tasks: config.tasks.keys().cloned().collect(),
            base: Some(base),
            max_new_tokens: text.max_new_tokens.clone(),
        };
        manifest.write(dir)?;
        write_text(&dir.join(files::RUN_CONFIG), &config.to_toml())?;
        let labels = serde_json::to_string_pretty(&outcome.labels).expect("label maps serialize; this is a bug");
        write_text(&dir.join(files::LABELS), &labels)?;
        write_text(
            &dir.join(files::METRICS),
            &serde_json::to_string_pretty(&metrics).expect("metrics serialize; this is a bug"),
        )
    })?;
    resume::remove_all(out)?;
    write_report(out, config, &outcome, seconds)?;
    Ok(TrainReport::new(out, Architecture::Llama, config, outcome, seconds))
}
