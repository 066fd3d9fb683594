//! `mtl serve`: a trained model behind mtl-serve's HTTP API. The engine tokenises inputs as `mtl predict` does
//! and answers each task as `mtl predict` prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use mtl_config::TagScheme;
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Example, Input, LabelMap, Location};
use mtl_serve::api::Settings;
use mtl_serve::{Engine, RequestInput, TaskDescription};
use mtl_train::{predict_examples, TaskInfo};
use serde_json::Value;

use crate::commands::{load_checkpoint, prediction_json, Loaded};

/// A trained model as an [`Engine`].
pub struct ModelEngine {
    loaded: Loaded,
    tasks: Vec<TaskDescription>,
    /// Numbers the questions of QA inputs, whose windows must stay together in a batch.
    questions: AtomicUsize,
}

impl ModelEngine {
    pub fn load(dir: &Path) -> Result<Self> {
        let loaded = load_checkpoint(dir)?;
        let tasks = loaded
            .config
            .tasks
            .iter()
            .map(|(name, t)| TaskDescription {
                name: name.to_string(),
                kind: serde_json::to_value(t.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                labels: loaded.labels.get(name).map(|m| m.labels().to_vec()).unwrap_or_default(),
            })
            .collect();
        Ok(Self { loaded, tasks, questions: AtomicUsize::new(0) })
    }

    fn has_token_task(&self) -> bool {
        self.loaded.config.tasks.values().any(|t| t.kind == TaskKind::TokenClassification)
    }
}

fn nonempty(field: &str, text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("`{field}` is empty"));
    }
    Ok(())
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
fn entities(text: &str, tags: &[Value]) -> Value {
    let tags: Vec<&str> = tags.iter().map(|t| t.as_str().unwrap_or("O")).collect();
    let spans = word_spans(text);
    let chars: Vec<char> = text.chars().collect();
    mtl_metrics::entities(&[tags])
        .into_iter()
        .filter_map(|e| {
            let (start, end) = (spans.get(e.start)?.0, spans.get(e.end)?.1);
            Some(serde_json::json!({
                "type": e.kind,
                "start": start,
                "end": end,
                "text": chars[start..end].iter().collect::<String>(),
                "words": [e.start, e.end],
            }))
        })
        .collect()
}

impl Engine for ModelEngine {
    /// One example, or the windows of one question; and the text its words' offsets refer to.
    type Item = (Vec<Example>, String);

    fn tasks(&self) -> &[TaskDescription] {
        &self.tasks
    }

    fn prepare(&self, input: &RequestInput) -> Result<(Self::Item, usize), String> {
        let location = Location { path: "request".into(), line: 0 };
        let encoder = &self.loaded.encoder;
        let request = input;
        let input = match input {
            RequestInput::Text(t) | RequestInput::Single { text: t } => {
                nonempty("text", t)?;
                // Token tasks tag words: raw text is split on whitespace, as `mtl predict` splits it.
                match self.has_token_task() {
                    true => Input::Words(t.split_whitespace().map(String::from).collect()),
                    false => Input::Text(t.clone()),
                }
            }
            RequestInput::Pair { text, text_pair } => {
                nonempty("text", text)?;
                nonempty("text_pair", text_pair)?;
                Input::Pair(text.clone(), text_pair.clone())
            }
            RequestInput::Words { words } => {
                if words.is_empty() || words.iter().any(|w| w.trim().is_empty() || w.contains(char::is_whitespace)) {
                    return Err("`words` must be a non-empty list of words without whitespace".into());
                }
                Input::Words(words.clone())
            }
            RequestInput::Question { question, context } => {
                nonempty("question", question)?;
                nonempty("context", context)?;
                let task = self
                    .loaded
                    .config
                    .tasks
                    .values()
                    .find(|t| t.kind == TaskKind::QuestionAnswering)
                    .ok_or("the model has no question-answering task")?;
                let windows = encoder.question_windows(question, context, task.max_query_len, task.doc_stride(encoder.max_len()))?;
                let shared = Arc::new(mtl_data::Question {
                    group: self.questions.fetch_add(1, Ordering::Relaxed),
                    context: context.clone(),
                    answers: Vec::new(),
                });
                let input = Input::Question { question: question.clone(), context: context.clone() };
                let examples: Vec<Example> = windows
                    .into_iter()
                    .map(|w| Example {
                        location: location.clone(),
                        input: input.clone(),
                        encoded: w.encoded,
                        labels: BTreeMap::new(),
                        qa: Some(mtl_data::QaFeature { question: shared.clone(), offsets: w.offsets }),
                    })
                    .collect();
                let tokens = examples.iter().map(|e| e.encoded.ids.len()).sum();
                return Ok(((examples, context.clone()), tokens));
            }
        };
        // Entity offsets refer to the text as sent, or to the words joined by single spaces.
        let text = match (&input, request) {
            (_, RequestInput::Text(t) | RequestInput::Single { text: t }) => t.clone(),
            (Input::Words(w), _) => w.join(" "),
            (Input::Pair(a, _), _) | (Input::Text(a), _) => a.clone(),
            (Input::Question { context, .. }, _) => context.clone(),
        };
        let encoded = encoder.encode(&input)?;
        let tokens = encoded.ids.len();
        Ok(((vec![Example { location, input, encoded, labels: BTreeMap::new(), qa: None }], text), tokens))
    }

    fn predict(&self, items: &[&Self::Item], tasks: &[&BTreeSet<String>]) -> Result<Vec<BTreeMap<String, Value>>, String> {
        // Only the heads some input asks for run.
        let wanted: BTreeSet<&String> = tasks.iter().flat_map(|t| t.iter()).collect();
        let labels: BTreeMap<TaskId, LabelMap> =
            self.loaded.labels.iter().filter(|(t, _)| wanted.contains(&t.to_string())).map(|(t, m)| (t.clone(), m.clone())).collect();
        let info = TaskInfo { config: &self.loaded.config, labels: &labels };
        let examples: Vec<&Example> = items.iter().flat_map(|i| i.0.iter()).collect();
        let batch_size = self.loaded.config.training.eval_batch_size;
        let predictions = predict_examples(&self.loaded.model, &examples, &info, batch_size).map_err(|e| e.to_string())?;
        let mut at = 0;
        let mut out = Vec::with_capacity(items.len());
        for (item, asked) in items.iter().zip(tasks) {
            // The windows of a question share its answer: the first one's stands for all.
            let (example, preds) = (&item.0[0], &predictions[at]);
            at += item.0.len();
            let mine = preds.iter().filter(|(t, _)| asked.contains(t.as_str())).map(|(t, p)| (t.clone(), p.clone())).collect();
            let json = prediction_json(example, &mine, &self.loaded.labels, false);
            let mut answers: BTreeMap<String, Value> = json["predictions"].as_object().cloned().unwrap_or_default().into_iter().collect();
            // Token tasks with entity tags also answer with the entities and their character offsets.
            for (task, answer) in answers.iter_mut() {
                let scheme = self.loaded.config.tasks.iter().find(|(t, _)| t.as_str() == task).map(|(_, c)| c.scheme);
                if let (Some(tags), Some(TagScheme::Bio | TagScheme::Bioes)) = (answer.get("tags").and_then(Value::as_array), scheme) {
                    answer["entities"] = entities(&item.1, tags);
                }
            }
            out.push(answers);
        }
        Ok(out)
    }
}

/// `mtl serve`: loads the model, then serves until SIGTERM or Ctrl-C.
pub fn serve(model_dir: &Path, addr: std::net::SocketAddr, settings: Settings, threads: Option<usize>) -> Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
    // A decoder (a base model, or a run's adapters on one) serves POST /v1/generate.
    let router = if crate::generate::is_decoder(model_dir) || crate::text_tasks::is_decoder_run(model_dir) {
        let decoder = if crate::text_tasks::is_decoder_run(model_dir) {
            crate::text_tasks::LoadedRun::load(model_dir)?.into_decoder()?
        } else {
            crate::generate::Decoder::load(model_dir)?
        };
        tracing::info!("serving generation from {}", model_dir.display());
        mtl_serve::generation::generation_router(decoder, settings)
    } else {
        let engine = ModelEngine::load(model_dir)?;
        tracing::info!(tasks = engine.tasks.len(), "loaded {}", model_dir.display());
        mtl_serve::api::router(engine, settings)
    };
    runtime.block_on(mtl_serve::api::serve(router, addr)).with_context(|| format!("cannot serve on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_carry_character_offsets_of_the_text() {
        let text = "  fly from  New York to Zürich";
        assert_eq!(word_spans(text), vec![(2, 5), (6, 10), (12, 15), (16, 20), (21, 23), (24, 30)]);
        let tags: Vec<Value> = ["O", "O", "B-city", "I-city", "O", "B-city"].iter().map(|t| Value::from(*t)).collect();
        assert_eq!(
            entities(text, &tags),
            serde_json::json!([
                {"type": "city", "start": 12, "end": 20, "text": "New York", "words": [2, 3]},
                {"type": "city", "start": 24, "end": 30, "text": "Zürich", "words": [5, 5]},
            ])
        );
    }
}
