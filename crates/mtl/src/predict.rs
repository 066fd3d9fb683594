//! The typed prediction schema: one [`PredictionRecord`] per input, with a [`TaskPrediction`] per task, as
//! `mtl predict` prints it (one JSON object a line) and the server answers it. Fields serialize in
//! alphabetical order, so the JSON is the same whichever way it was built.

use std::collections::BTreeMap;

use mtl_config::Config;
use mtl_core::TaskKind;
use mtl_data::{Input, LabelMap, Location};
use mtl_train::Prediction;
use serde::Serialize;
use serde_json::Value;

use crate::error::{bail, Error, Result};

/// A task as `GET /v1/tasks` describes it, for encoder and decoder runs alike.
pub(crate) fn task_description(
    name: &mtl_core::TaskId,
    config: &mtl_config::TaskConfig,
    labels: Option<&LabelMap>,
) -> mtl_serve::TaskDescription {
    mtl_serve::TaskDescription {
        name: name.to_string(),
        kind: serde_json::to_value(config.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        labels: labels.map(|m| m.labels().to_vec()).unwrap_or_default(),
    }
}

/// How to predict.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    pub batch_size: usize,
    /// Scores and probabilities unrounded (4 decimals otherwise).
    pub full_precision: bool,
}

impl Default for PredictOptions {
    fn default() -> Self {
        Self { batch_size: 64, full_precision: false }
    }
}

/// One input's predictions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PredictionRecord {
    /// Per task.
    pub predictions: BTreeMap<String, TaskPrediction>,
    /// A question-answering input's question.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// The input text (words joined by single spaces).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The second text of a sentence pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
}

/// One task's prediction for one input.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TaskPrediction {
    /// A class and its probability.
    Class { label: String, score: f64 },
    /// The labels over their thresholds, and every label's probability.
    Labels { labels: Vec<String>, scores: BTreeMap<String, f64> },
    /// One regression output, in the data's units.
    Value { value: f64 },
    /// Several regression outputs, by name.
    Values { values: BTreeMap<String, f64> },
    /// A tag per word; the server adds the entities of BIO/BIOES tags with character offsets.
    Tags {
        #[serde(skip_serializing_if = "Option::is_none")]
        entities: Option<Vec<Entity>>,
        tags: Vec<String>,
        words: Vec<String>,
    },
    /// An extracted answer with its character span in the context (`""` and no span for no answer).
    Answer { answer: String, end: Option<usize>, score: f64, start: Option<usize> },
    /// A decoder's answer for a classification task, and the label it names (`None` for none).
    GeneratedLabel { generated: String, label: Option<String> },
    /// A decoder's answer for a multi-label task, and the labels it names.
    GeneratedLabels { generated: String, labels: Vec<String> },
    /// A decoder's answer for a regression task, and the values read from it.
    GeneratedValues { generated: String, values: Option<Vec<f64>> },
    /// A decoder's answer for a question, and the answer read from it.
    GeneratedAnswer { answer: String, generated: String },
    /// A decoder's answer for a tagging task, and the (type, value) pairs read from it.
    GeneratedSpans { generated: String, spans: Vec<Span> },
    /// Generated text.
    Generated { generated: String },
}

/// An entity found by a tagging task: its type, its character span in the text and its first and last word.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entity {
    pub end: usize,
    pub start: usize,
    pub text: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub words: [usize; 2],
}

/// A (type, value) pair of a decoder's tagging answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Span {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl PredictionRecord {
    /// A record of `input` with no predictions yet.
    pub(crate) fn of(input: &Input) -> Self {
        let mut r = Self { predictions: BTreeMap::new(), question: None, text: None, text_pair: None };
        match input {
            Input::Text(t) => r.text = Some(t.clone()),
            Input::Words(w) => r.text = Some(w.join(" ")),
            Input::Pair(a, b) => {
                r.text = Some(a.clone());
                r.text_pair = Some(b.clone());
            }
            Input::Question { question, .. } => r.question = Some(question.clone()),
        }
        r
    }
}

/// An encoder head's prediction in the schema; scores rounded to 4 decimals unless `full`.
pub(crate) fn task_prediction(p: &Prediction, words: &[String], map: &LabelMap, full: bool) -> TaskPrediction {
    let round = |x: f32| if full { f64::from(x) } else { (f64::from(x) * 1e4).round() / 1e4 };
    match p {
        Prediction::Class { id, score } => {
            TaskPrediction::Class { label: map.label(*id).to_string(), score: round(*score) }
        }
        Prediction::Labels { ids, probs } => TaskPrediction::Labels {
            labels: ids.iter().map(|&i| map.label(i).to_string()).collect(),
            scores: map.labels().iter().zip(probs).map(|(l, p)| (l.clone(), round(*p))).collect(),
        },
        Prediction::Values(v) if v.len() == 1 => TaskPrediction::Value { value: v[0] },
        Prediction::Values(v) => {
            TaskPrediction::Values { values: map.labels().iter().cloned().zip(v.iter().copied()).collect() }
        }
        Prediction::Tags(tags) => TaskPrediction::Tags {
            entities: None,
            tags: tags.iter().map(|t| t.map_or("O", |t| map.label(t)).to_string()).collect(),
            words: words.to_vec(),
        },
        Prediction::Answer { text, span, score } => TaskPrediction::Answer {
            answer: text.clone(),
            end: span.map(|s| s.1),
            score: round(*score),
            start: span.map(|s| s.0),
        },
        Prediction::Generated(text) => TaskPrediction::Generated { generated: text.clone() },
    }
}

/// Parses one line of prediction input (see [`crate::Run::parse_input`]).
pub(crate) fn parse_input(line: &str, location: &Location, config: &Config) -> Result<Input> {
    let trimmed = line.trim_start();
    if !trimmed.starts_with('{') {
        return Ok(Input::Text(line.to_string()));
    }
    let at = format!("{}:{}", location.path.display(), location.line);
    let value: Value = serde_json::from_str(line).map_err(|e| Error::Usage(format!("{at}: invalid JSON: {e}")))?;
    let string = |field: &str| -> Result<Option<String>> {
        match value.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) if t.trim().is_empty() => bail!("{at}: field `{field}` is empty"),
            Some(Value::String(t)) => Ok(Some(t.clone())),
            Some(_) => bail!("{at}: field `{field}` must be a string"),
        }
    };
    if let Some(qa) = config.tasks.values().find(|t| t.kind == TaskKind::QuestionAnswering) {
        if let (Some(question), Some(context)) = (string(&qa.question_field)?, string(&qa.context_field)?) {
            return Ok(Input::Question { question, context });
        }
    }
    if let Some(words) = value.get("words") {
        let Some(words) =
            words.as_array().and_then(|a| a.iter().map(|w| w.as_str().map(String::from)).collect::<Option<Vec<_>>>())
        else {
            bail!("{at}: field `words` must be a list of strings");
        };
        return Ok(Input::Words(words));
    }
    let pair_field = config.tasks.values().find_map(|t| t.pair_field.clone());
    match (string("text")?, pair_field.map(|f| string(&f)).transpose()?.flatten()) {
        (Some(a), Some(b)) => Ok(Input::Pair(a, b)),
        (Some(t), None) => Ok(Input::Text(t)),
        (None, _) => bail!("{at}: expected a `text` or `words` field"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialize_as_mtl_predict_printed_them() {
        let mut r = PredictionRecord::of(&Input::Pair("a".into(), "b".into()));
        r.predictions.insert("nli".into(), TaskPrediction::Class { label: "yes".into(), score: 0.5 });
        r.predictions.insert(
            "qa".into(),
            TaskPrediction::Answer { answer: "x".into(), end: Some(3), score: 0.25, start: Some(2) },
        );
        r.predictions.insert("gen".into(), TaskPrediction::GeneratedLabel { generated: "yes".into(), label: None });
        assert_eq!(
            serde_json::to_string(&r).expect("serializes"),
            r#"{"predictions":{"gen":{"generated":"yes","label":null},"nli":{"label":"yes","score":0.5},"qa":{"answer":"x","end":3,"score":0.25,"start":2}},"text":"a","text_pair":"b"}"#
        );
    }
}
