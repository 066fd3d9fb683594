//! Serving: a trained run (or a decoder base model) behind mtl-serve's HTTP API. The engine tokenises inputs as
//! [`crate::Run::predict`] does and answers each task in the same [`TaskPrediction`] schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use mtl_config::{ServeConfig, TagScheme};
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Example, Input, LabelMap, Location};
use mtl_serve::api::Settings;
use mtl_serve::{Engine, EngineError, RequestInput, Router, TaskDescription};
use mtl_train::{predict_examples, TaskInfo};
use serde_json::Value;

use crate::encoder::predict::encoder_record;
use crate::encoder::EncoderRun as Loaded;
use crate::error::{bail, read_text, Error, Result};
use crate::predict::{Entity, TaskPrediction};
use crate::run::{Loaded as Backbone, Operation, Run};

/// The server's settings from a serving config: its limits, the API keys of its key file, and its request log
/// opened.
pub fn settings(config: &ServeConfig) -> Result<Settings> {
    let api_keys = match &config.api_keys {
        Some(path) => match mtl_serve::api::parse_api_keys(&read_text(path)?) {
            Ok(keys) => Some(keys.into_iter().collect()),
            Err(e) => bail!("{}: {e}", path.display()),
        },
        None => None,
    };
    let mut settings = Settings::from_config(config, api_keys);
    if let Some(path) = &config.request_log {
        let log = mtl_serve::request_log::RequestLog::open(path, config.request_log_sample).map_err(Error::io(path))?;
        tracing::info!(
            sample = config.request_log_sample,
            "logging prediction requests to {} (personal data masked)",
            path.display()
        );
        settings.request_log = Some(std::sync::Arc::new(log));
    }
    Ok(settings)
}

/// The router for `model`: an encoder run's tasks (`POST /v1/predict`, `POST /v1/tasks/TASK/predict`), or
/// generation (`POST /v1/generate` and the OpenAI-compatible routes) by a decoder base model or a decoder run,
/// many requests batched into each step by [`crate::BatchEngine`].
pub fn router(model: &Path, settings: Settings) -> Result<Router> {
    if !model.exists() {
        bail!("{}: no such run or model (a directory written by `mtl train`, or a decoder model)", model.display());
    }
    if !crate::manifest::is_run_dir(model) {
        let base = crate::base::BaseModel::open(model)?;
        if !base.architecture().is_decoder() {
            bail!("{}: an encoder base model has no tasks to serve; serve a run trained from it", model.display());
        }
        tracing::info!("serving generation from {}", model.display());
        let engine = crate::decoder::BatchEngine::start(base.decoder()?, settings.generation.clone());
        return Ok(mtl_serve::llm_server::generation_router(engine, settings));
    }
    let run = Run::open(model)?;
    run.require(Operation::ServeTasks)?;
    match run.loaded {
        Backbone::Encoder(encoder) => {
            let mut engine = ModelEngine::new(*encoder);
            engine.reference = crate::files::read_reference(model)?;
            if engine.reference.is_none() {
                tracing::info!(
                    "{}: no {} (a run trained without dev data, or before drift monitoring): answers are counted, not compared",
                    model.display(),
                    mtl_serve::drift::REFERENCE_FILE
                );
            }
            if settings.explain {
                // A second copy, dropout-free and in f32, for the gradients of explanations.
                engine.explainer = Some(Run::open_for_explanations(model)?.into_encoder()?);
                tracing::info!("POST /v1/explain is on");
            }
            tracing::info!(tasks = engine.tasks.len(), "loaded {}", model.display());
            Ok(mtl_serve::api::router(engine, settings))
        }
        // A decoder run: generation through its adapters, shared or one per task (`adapter`, or OpenAI's
        // `model`), and its tasks through the predict routes, each answer one generation in the same batches.
        Backbone::Decoder(decoder) => {
            let tasks = crate::decoder::DecoderTasks::new(&decoder);
            tracing::info!(
                tasks = decoder.config.tasks.len(),
                "serving generation and the tasks of {}",
                model.display()
            );
            let engine = crate::decoder::BatchEngine::start(decoder.into_decoder(), settings.generation.clone());
            Ok(mtl_serve::llm_server::label_task_router(engine, tasks, settings))
        }
    }
}

/// Serves `model` with `config` until SIGTERM or Ctrl-C.
pub fn serve(model: &Path, config: &ServeConfig) -> Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime =
        runtime.enable_all().build().map_err(|e| Error::Usage(format!("cannot start the async runtime: {e}")))?;
    if !config.addr.ip().is_loopback() && config.api_keys.is_none() {
        tracing::warn!(
            "serving on {} without API keys: anyone who can reach it can use it (set api_keys, or bind 127.0.0.1 \
             behind a reverse proxy that authenticates)",
            config.addr
        );
    }
    let router = router(model, settings(config)?)?;
    runtime
        .block_on(mtl_serve::listen::serve(router, config.addr, mtl_serve::listen::Limits::from_config(config)))
        .map_err(|e| Error::Usage(format!("cannot serve on {}: {e}", config.addr)))
}

/// An encoder run as an [`Engine`].
struct ModelEngine {
    loaded: Loaded,
    tasks: Vec<TaskDescription>,
    /// Numbers the questions of QA inputs, whose windows must stay together in a batch.
    questions: AtomicUsize,
    /// The dev set's answers, which the served ones are compared with.
    reference: Option<mtl_serve::drift::Reference>,
    /// The run loaded for explanations (`explain` on).
    explainer: Option<Loaded>,
}

impl ModelEngine {
    fn new(loaded: Loaded) -> Self {
        let tasks = loaded
            .config
            .tasks
            .iter()
            .map(|(name, t)| crate::predict::task_description(name, t, loaded.labels.get(name)))
            .collect();
        Self { loaded, tasks, questions: AtomicUsize::new(0), reference: None, explainer: None }
    }
}

/// Each word's character span (start, end exclusive) in `text`, the words being `text` split on whitespace.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.chars().chain(std::iter::once(' ')).enumerate() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    spans
}

/// The entities of a tagged word sequence (seqeval's chunking), with character offsets into `text`, whose
/// whitespace-separated words the tags belong to.
fn entities(text: &str, tags: &[String]) -> Vec<Entity> {
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    let spans = word_spans(text);
    let chars: Vec<char> = text.chars().collect();
    mtl_metrics::entities(&[tags])
        .into_iter()
        .filter_map(|e| {
            let (start, end) = (spans.get(e.start)?.0, spans.get(e.end)?.1);
            Some(Entity {
                end,
                start,
                text: chars[start..end].iter().collect(),
                kind: e.kind.to_string(),
                words: [e.start, e.end],
            })
        })
        .collect()
}

impl Engine for ModelEngine {
    /// One example, or the windows of one question; and the text its words' offsets refer to.
    type Item = (Vec<Example>, String);

    fn tasks(&self) -> &[TaskDescription] {
        &self.tasks
    }

    fn drift_reference(&self) -> Option<&mtl_serve::drift::Reference> {
        self.reference.as_ref()
    }

    fn explain(&self, request: &mtl_serve::api::ExplainRequest) -> Result<Value, EngineError> {
        let Some(run) = &self.explainer else {
            return Err(EngineError::Invalid("explanations are off (serve with explain = true)".into()));
        };
        let (input, _) = crate::decoder::request_input(&request.input)?;
        let options = crate::ExplainOptions {
            steps: request.steps,
            baseline: request.baseline.parse().map_err(EngineError::Invalid)?,
            tasks: request.tasks.clone(),
            all_words: request.all_words,
        };
        let location = Location { path: "request".into(), line: 1 };
        let mut explained = crate::explain::explain(run, &[(location, input)], &options).map_err(|e| match e {
            Error::Usage(m) => EngineError::Invalid(m),
            other => EngineError::Model(other.to_string()),
        })?;
        let first = explained.pop().ok_or_else(|| EngineError::Model("no explanation; this is a bug".into()))?;
        serde_json::to_value(first).map_err(|e| EngineError::Model(e.to_string()))
    }

    fn prepare(&self, input: &RequestInput) -> Result<(Self::Item, usize), EngineError> {
        let location = Location { path: "request".into(), line: 0 };
        let (input, text) = crate::decoder::request_input(input)?;
        if matches!(input, Input::Question { .. })
            && !self.loaded.config.tasks.values().any(|t| t.kind == TaskKind::QuestionAnswering)
        {
            return Err(EngineError::Invalid("the model has no question-answering task".into()));
        }
        let group = self.questions.fetch_add(1, Ordering::Relaxed);
        let examples = crate::encoder::predict::encoder_examples(&self.loaded, &location, &input, group)
            .map_err(EngineError::Invalid)?;
        let tokens = examples.iter().map(|e| e.encoded.ids.len()).sum();
        Ok(((examples, text), tokens))
    }

    fn predict(
        &self,
        items: &[&Self::Item],
        tasks: &[&BTreeSet<String>],
    ) -> Result<Vec<BTreeMap<String, Value>>, EngineError> {
        // Only the heads some input asks for run.
        let wanted: BTreeSet<&String> = tasks.iter().flat_map(|t| t.iter()).collect();
        let labels: BTreeMap<TaskId, LabelMap> = self
            .loaded
            .labels
            .iter()
            .filter(|(t, _)| wanted.contains(&t.to_string()))
            .map(|(t, m)| (t.clone(), m.clone()))
            .collect();
        let info = TaskInfo { config: &self.loaded.config, labels: &labels };
        let examples: Vec<&Example> = items.iter().flat_map(|i| i.0.iter()).collect();
        let batch_size = self.loaded.config.training.eval_batch_size;
        let predictions = predict_examples(&self.loaded.model, &examples, &info, batch_size)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let mut at = 0;
        let mut out = Vec::with_capacity(items.len());
        for (item, asked) in items.iter().zip(tasks) {
            // The windows of a question share its answer: the first one's stands for all.
            let (example, preds) = (&item.0[0], &predictions[at]);
            at += item.0.len();
            let mine =
                preds.iter().filter(|(t, _)| asked.contains(t.as_str())).map(|(t, p)| (t.clone(), p.clone())).collect();
            let mut record = encoder_record(example, &mine, &self.loaded.labels, false);
            // Token tasks with entity tags also answer with the entities and their character offsets.
            for (task, answer) in record.predictions.iter_mut() {
                let scheme = self.loaded.config.tasks.iter().find(|(t, _)| t.as_str() == task).map(|(_, c)| c.scheme);
                if let (TaskPrediction::Tags { entities: found, tags, .. }, Some(TagScheme::Bio | TagScheme::Bioes)) =
                    (answer, scheme)
                {
                    *found = Some(entities(&item.1, tags));
                }
            }
            let answers = record
                .predictions
                .into_iter()
                .map(|(task, p)| (task, serde_json::to_value(p).expect("predictions serialize; this is a bug")))
                .collect();
            out.push(answers);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_carry_character_offsets_of_the_text() {
        let text = "  fly from  New York to Zürich";
        assert_eq!(word_spans(text), vec![(2, 5), (6, 10), (12, 15), (16, 20), (21, 23), (24, 30)]);
        let tags: Vec<String> = ["O", "O", "B-city", "I-city", "O", "B-city"].iter().map(|t| t.to_string()).collect();
        assert_eq!(
            serde_json::to_value(entities(text, &tags)).expect("serializes"),
            serde_json::json!([
                {"type": "city", "start": 12, "end": 20, "text": "New York", "words": [2, 3]},
                {"type": "city", "start": 24, "end": 30, "text": "Zürich", "words": [5, 5]},
            ])
        );
    }
}
