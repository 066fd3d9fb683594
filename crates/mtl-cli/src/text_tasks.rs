//! `mtl train` on a decoder model: every task as text (a prompt, a target), multi-task supervised
//! fine-tuning through the same training loop as the encoder (samplers, loss weighting, gradient surgery,
//! checkpoints, early stopping), LoRA shared by the tasks or one adapter per task, and scores of the
//! generated answers mapped back to labels.
//!
//! The run directory gets `adapters.safetensors` (the LoRA matrices under PEFT's names, one adapter per task
//! or `default`), `base_model.json` (the base model and its CRC-32), `mtl.toml`, `labels.json` and
//! `metrics.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mtl_config::{Config, PeftConfig, PeftMethod, Split};
use mtl_core::{TaskId, TaskKind};
use mtl_data::prompt::{self, check_decoder_tasks, ChatTemplate, PromptFormat};
use mtl_data::{Dataset, LabelMap};
use mtl_nn::llama::{DecoderLora, DecoderModule};
use mtl_nn::{DecoderModel, LoraSpec, SHARED_ADAPTER};
use mtl_train::checkpoint::{self, publish_into};
use mtl_train::{resume, tracking, ProgressCallback, Splits, TextTasks, Trainer};
use serde_json::json;

use crate::generate::DecoderFiles;

/// Checks the tasks of a config for a decoder model; the error names the config file and the field.
pub fn check_config(config: &Config, path: &Path) -> Result<()> {
    if let Err((field, message)) = check_decoder_tasks(config) {
        bail!("invalid config {}: field `{field}`: {message}", path.display());
    }
    let p = &config.peft;
    if p.enabled() && p.method != PeftMethod::Lora {
        bail!("invalid config {}: field `peft.method`: decoder models train with LoRA (or fully, without [peft]); bottleneck adapters and prefixes are not supported on them yet", path.display());
    }
    if p.enabled() && p.target_modules != PeftConfig::default().target_modules {
        bail!("invalid config {}: field `peft.target_modules`: names BERT layers; on a decoder LoRA adapts all seven projections (q, k, v, o, gate, up, down)", path.display());
    }
    Ok(())
}

/// LoRA on a decoder, as `[peft]` asks.
fn decoder_lora(config: &Config) -> Option<DecoderLora> {
    let p = &config.peft;
    if !p.enabled() {
        return None;
    }
    let adapters = if p.per_task { config.tasks.keys().map(|t| t.to_string()).collect() } else { vec![SHARED_ADAPTER.to_string()] };
    Some(DecoderLora {
        spec: LoraSpec { r: p.r, alpha: p.alpha, dropout: p.dropout as f32, targets: Vec::new() },
        modules: DecoderModule::ALL.to_vec(),
        adapters,
    })
}

/// The examples of `split` as prompts and targets; `budgets`: each task's answer budget (evaluation data), or
/// `None` for training data.
fn split(
    config: &Config,
    split: Split,
    format: &PromptFormat,
    labels: &BTreeMap<TaskId, LabelMap>,
    budgets: Option<&BTreeMap<TaskId, usize>>,
) -> Result<Option<Dataset>> {
    if config.tasks.values().all(|t| t.data.get(split).is_none()) {
        return Ok(None);
    }
    prepared(config, split, format, mtl_data::read_split(config, split)?, labels, budgets).map(Some)
}

/// [`split`] of examples already read, with warnings about what did not fit.
fn prepared(
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
fn prompt_parts(files: &DecoderFiles) -> Result<(Option<ChatTemplate>, u32)> {
    let chat = files.chat()?;
    let eos = *files.config.eos_token_ids.first().context("the model names no end-of-sequence token")?;
    Ok((chat, eos))
}

/// One training run of a decoder model into `out` (checked and prepared by the caller).
pub fn train(config: &Config, out: &Path, resume_run: bool) -> Result<()> {
    mtl_train::alloc::return_freed_pages();
    let files = DecoderFiles::load(&config.model.path)?;
    let (chat, eos) = prompt_parts(&files)?;
    let format = PromptFormat {
        tokenizer: &files.tokenizer,
        chat: chat.as_ref(),
        eos,
        max_len: config.model.max_len.min(files.config.max_position_embeddings),
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
    let lora = decoder_lora(config);
    let source = files.source.clone();
    let model = DecoderModel::new(&files.config, files.weights, lora.as_ref(), &tasks, config.training.seed, &Device::Cpu)?;
    let text = TextTasks { model, tokenizer: files.tokenizer.clone(), stop: files.config.eos_token_ids.clone(), max_new_tokens };
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
    };
    let mut progress = ProgressCallback::default();
    let mut tracker = tracking::Tracker::new(out);
    let outcome = trainer.train(&splits, &mut [&mut progress, &mut tracker])?;
    let seconds = started.elapsed().as_secs_f64();

    let metrics = crate::commands::run_metrics(&outcome, seconds);
    let params = text.model.params();
    publish_into(out, |dir| {
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(|source| mtl_train::TrainError::Io { path: dir.join(name), source });
        params.save(&dir.join(checkpoint::ADAPTERS))?;
        let path = std::fs::canonicalize(&source).map_err(|source_err| mtl_train::TrainError::Io { path: source.clone(), source: source_err })?;
        let weights = if source.is_dir() { source.join(checkpoint::WEIGHTS) } else { source.clone() };
        let meta = json!({
            "path": path,
            "decoder": true,
            "weights_crc32": checkpoint::crc32(&weights)?,
            "max_new_tokens": text.max_new_tokens,
        });
        write(checkpoint::BASE_MODEL, serde_json::to_string_pretty(&meta).expect("json; this is a bug"))?;
        write(checkpoint::RUN_CONFIG, config.to_toml())?;
        write(checkpoint::LABELS, serde_json::to_string_pretty(&outcome.labels).expect("label maps serialize; this is a bug"))?;
        write(checkpoint::METRICS, serde_json::to_string_pretty(&metrics).expect("metrics serialize; this is a bug"))
    })?;
    resume::remove_all(out)?;
    let mut shown = Vec::new();
    if let Some(d) = &outcome.dev {
        shown.push(("dev", &d.scores));
    }
    if let Some(t) = &outcome.test {
        shown.push(("test", &t.scores));
    }
    print!("{}", crate::report::table(&shown));
    println!(
        "best epoch {} of {} (step {} of {}{}); trained in {seconds:.0} s; adapters and metrics.json in {}",
        outcome.best_epoch,
        config.training.epochs,
        outcome.best_step,
        outcome.steps,
        if outcome.stopped_early { ", stopped early" } else { "" },
        out.display()
    );
    Ok(())
}

/// Whether `dir` holds a decoder run (its `base_model.json` says so).
pub fn is_decoder_run(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(checkpoint::BASE_MODEL))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|m| m["decoder"] == json!(true))
}

/// A trained decoder run: its config and labels, the base model with its adapters, and the base's files.
pub struct LoadedRun {
    pub config: Config,
    pub labels: BTreeMap<TaskId, LabelMap>,
    pub text: TextTasks,
    chat: Option<ChatTemplate>,
    eos: u32,
    max_len: usize,
}

impl LoadedRun {
    pub fn load(dir: &Path) -> Result<Self> {
        let (config, labels) = checkpoint::read_meta(dir)?;
        let meta_path = dir.join(checkpoint::BASE_MODEL);
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path)?)
            .with_context(|| format!("{}: invalid JSON", meta_path.display()))?;
        let base = meta["path"].as_str().with_context(|| format!("{}: field `path`: missing", meta_path.display()))?;
        let base = Path::new(base);
        let weights = if base.is_dir() { base.join(checkpoint::WEIGHTS) } else { base.to_owned() };
        if !weights.exists() {
            bail!("{}: field `path`: the base model {} is not there", meta_path.display(), weights.display());
        }
        let (want, got) = (meta["weights_crc32"].as_u64(), u64::from(checkpoint::crc32(&weights)?));
        if want != Some(got) {
            bail!("{}: the base model {} has changed since the adapters were trained (CRC-32 {got:08x})", meta_path.display(), weights.display());
        }
        let max_new_tokens: BTreeMap<TaskId, usize> = serde_json::from_value(meta["max_new_tokens"].clone())
            .with_context(|| format!("{}: field `max_new_tokens`", meta_path.display()))?;
        let mut files = DecoderFiles::load(base)?;
        let adapters = candle_core::safetensors::load(dir.join(checkpoint::ADAPTERS), &Device::Cpu)
            .with_context(|| format!("{}: cannot read the adapters", dir.join(checkpoint::ADAPTERS).display()))?;
        let names: Vec<String> = adapters.keys().cloned().collect();
        files.weights.extend(adapters);
        let (chat, eos) = prompt_parts(&files)?;
        let tasks: Vec<TaskId> = config.tasks.keys().cloned().collect();
        let lora = decoder_lora(&config);
        let max_len = config.model.max_len.min(files.config.max_position_embeddings);
        let model = DecoderModel::new(&files.config, files.weights, lora.as_ref(), &tasks, config.training.seed, &Device::Cpu)?;
        let missing: Vec<&String> = model.params().vars().keys().filter(|n| !names.contains(n)).collect();
        if !missing.is_empty() {
            bail!("{}: adapters missing: {}", dir.join(checkpoint::ADAPTERS).display(), missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
        }
        let text = TextTasks { model, tokenizer: files.tokenizer, stop: files.config.eos_token_ids, max_new_tokens };
        Ok(Self { config, labels, text, chat, eos, max_len })
    }

    /// The run as a plain decoder for free generation: its shared adapter on the base model.
    pub fn into_decoder(self) -> Result<crate::generate::Decoder> {
        if self.config.peft.enabled() && self.config.peft.per_task {
            bail!("a decoder run with one adapter per task cannot serve free generation yet (which adapter?); train with a shared adapter");
        }
        Ok(crate::generate::Decoder { model: self.text.model.into_llama(), tokenizer: self.text.tokenizer, chat: self.chat, eos: self.text.stop })
    }

    pub fn format(&self) -> PromptFormat<'_> {
        PromptFormat { tokenizer: &self.text.tokenizer, chat: self.chat.as_ref(), eos: self.eos, max_len: self.max_len }
    }
}

/// `mtl eval` of a decoder run: scores on the dev and test files of `config_path`.
pub fn eval(model_dir: &Path, config_path: &Path, overrides: &[String]) -> Result<()> {
    let run = LoadedRun::load(model_dir)?;
    let mut config = Config::load(config_path, overrides)?;
    for task in config.tasks.keys() {
        if !run.config.tasks.contains_key(task) {
            bail!("{}: task `{task}` was not trained in {}", config_path.display(), model_dir.display());
        }
    }
    config.model = run.config.model.clone();
    // The adapters answer the prompts they were trained on, in the words they learnt.
    for (task, t) in config.tasks.iter_mut() {
        let trained = &run.config.tasks[task];
        if t.prompt != trained.prompt || t.verbalizer != trained.verbalizer {
            tracing::warn!("task `{task}`: {} gives another prompt or other label words than training did; the trained ones are used", config_path.display());
        }
        t.prompt.clone_from(&trained.prompt);
        t.verbalizer.clone_from(&trained.verbalizer);
    }
    check_config(&config, config_path)?;
    let trainer = Trainer::evaluator(&config, &run.text, &run.labels);
    let mut scores = BTreeMap::new();
    for s in [Split::Dev, Split::Test] {
        if let Some(data) = split(&config, s, &run.format(), &run.labels, Some(&run.text.max_new_tokens))? {
            scores.insert(s.name(), trainer.evaluate(&data)?.scores);
        }
    }
    if scores.is_empty() {
        bail!("{}: no task has a dev or test file to score", config_path.display());
    }
    println!("{}", serde_json::to_string_pretty(&scores)?);
    Ok(())
}

/// `mtl predict` of a decoder run: each input line's answer to every task's prompt, with what it maps to
/// (the label, labels, values, answer or (type, value) pairs; generation tasks: the text alone), as one JSON
/// line per input.
pub fn predict(model_dir: &Path, input: Option<&Path>, batch_size: usize) -> Result<()> {
    use std::io::{BufRead, Write};
    let run = LoadedRun::load(model_dir)?;
    let format = run.format();
    let reader: Box<dyn BufRead> = match input {
        Some(p) => Box::new(std::io::BufReader::new(std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let source = input.map_or_else(|| "<stdin>".into(), Path::to_path_buf);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut pending: Vec<mtl_data::Input> = Vec::new();
    let flush = |pending: &mut Vec<mtl_data::Input>, out: &mut dyn Write| -> Result<()> {
        let mut answers: BTreeMap<&TaskId, Vec<String>> = BTreeMap::new();
        for (task, tc) in &run.config.tasks {
            // Inputs too long for the model lose words from their end, as in training.
            let budget = format.answer_room(run.text.max_new_tokens.get(task).copied().unwrap_or(0));
            let prompts: Vec<Vec<u32>> = pending
                .iter()
                .map(|i| format.prompt_ids(tc, i, budget).map(|(ids, _)| ids).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?;
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            answers.insert(task, run.text.answer(task, &refs, batch_size)?);
        }
        for (n, input) in pending.iter().enumerate() {
            let mut predictions = serde_json::Map::new();
            for (task, tc) in &run.config.tasks {
                let text = &answers[task][n];
                let labels = run.labels[task].labels();
                let v = match tc.kind {
                    TaskKind::Classification => json!({"generated": text, "label": prompt::label_from_text(tc, labels, text)}),
                    TaskKind::MultiLabel => {
                        let named: Vec<&str> = prompt::labels_from_text(tc, labels, text).into_iter().map(|i| labels[i as usize].as_str()).collect();
                        json!({"generated": text, "labels": named})
                    }
                    TaskKind::Regression => json!({"generated": text, "values": prompt::values_from_text(labels, text)}),
                    TaskKind::QuestionAnswering => json!({"generated": text, "answer": prompt::answer_from_text(text)}),
                    TaskKind::Generation => json!({"generated": text}),
                    TaskKind::TokenClassification => {
                        let pairs: Vec<serde_json::Value> =
                            prompt::parse_pairs(text).into_iter().map(|(k, v)| json!({"type": k, "value": v})).collect();
                        json!({"generated": text, "spans": pairs})
                    }
                };
                predictions.insert(task.to_string(), v);
            }
            writeln!(out, "{}", json!({"text": prompt::input_text(input), "predictions": predictions}))?;
        }
        pending.clear();
        Ok(())
    };
    for (i, line) in reader.lines().enumerate() {
        let location = mtl_data::Location { path: source.clone(), line: i + 1 };
        let line = line.with_context(|| format!("{}: cannot read", source.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        pending.push(crate::commands::parse_input(&line, &location, &run.config)?);
        if pending.len() >= batch_size.max(1) * 4 {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    out.flush()?;
    Ok(())
}
