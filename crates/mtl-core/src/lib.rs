//! Names and plain host data shared by every other crate: task names, task kinds, and the train/eval mode.
//!
//! This crate depends on nothing of ours. It holds no tensors: everything here is plain host data.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors raised when validating core names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error(
        "invalid task name {0:?}: use 1-64 characters of ASCII letters, digits, '_' or '-', starting with a letter"
    )]
    InvalidTaskName(String),
}

/// A validated task name (`intent`, `slots`, ...). It is used as a map key, a tensor-name prefix and a
/// JSON key, so it is restricted to characters that are safe in all three.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    pub fn new(name: impl Into<String>) -> Result<Self, CoreError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(Self(name))
        } else {
            Err(CoreError::InvalidTaskName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl schemars::JsonSchema for TaskId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TaskId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A task name: letters, digits, `_` and `-`, starting with a letter, at most 64 characters.",
            "pattern": "^[A-Za-z][A-Za-z0-9_-]{0,63}$"
        })
    }
}

impl TryFrom<String> for TaskId {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<TaskId> for String {
    fn from(value: TaskId) -> Self {
        value.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of task a head solves. The kind decides the head, loss, decoding and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// One label per example (or sentence pair), predicted from the [CLS] state; softmax and cross-entropy.
    Classification,
    /// Any number of labels per example from the [CLS] state; a sigmoid per label and binary cross-entropy.
    MultiLabel,
    /// One or more real values per example from the [CLS] state; MSE or Huber loss.
    Regression,
    /// One BIO / BIOES (or plain) tag per word, predicted from each word's first sub-token.
    TokenClassification,
    /// Span-extraction question answering: start and end logits over the context's tokens.
    QuestionAnswering,
    /// Free text written for each input (a summary, a translation, an answer): decoder models only, trained
    /// by the language-model loss on the target and scored by ROUGE-L and exact match.
    Generation,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::MultiLabel => "multi_label",
            TaskKind::Regression => "regression",
            TaskKind::TokenClassification => "token_classification",
            TaskKind::QuestionAnswering => "question_answering",
            TaskKind::Generation => "generation",
        }
    }

    /// Whether the head reads the [CLS] state only.
    pub fn is_sequence_level(self) -> bool {
        matches!(self, TaskKind::Classification | TaskKind::MultiLabel | TaskKind::Regression)
    }
}

/// The linear layers of a transformer block that parameter-efficient methods attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinearModule {
    Query,
    Key,
    Value,
    /// The attention block's output projection.
    AttentionOutput,
    /// The feed-forward block's first layer (hidden → intermediate).
    Intermediate,
    /// The feed-forward block's second layer (intermediate → hidden).
    Output,
}

impl LinearModule {
    pub const ALL: [Self; 6] =
        [Self::Query, Self::Key, Self::Value, Self::AttentionOutput, Self::Intermediate, Self::Output];

    /// Its path inside a BERT layer, as in `transformers`' state dict (`encoder.layer.N.` + this).
    pub fn bert_path(self) -> &'static str {
        match self {
            Self::Query => "attention.self.query",
            Self::Key => "attention.self.key",
            Self::Value => "attention.self.value",
            Self::AttentionOutput => "attention.output.dense",
            Self::Intermediate => "intermediate.dense",
            Self::Output => "output.dense",
        }
    }
}

/// Whether a forward pass trains (dropout active) or evaluates (dropout off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// The label index that contributes no loss: padding, non-first sub-tokens, and examples without a label for
/// a task (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One batch as plain host vectors, padded to its longest sequence. Row-major `batch × seq` everywhere, so
/// queues, collators and servers never see a tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// For each example, the token position of each word's first sub-token (`None`: truncated away).
    pub word_starts: Vec<Vec<Option<usize>>>,
    /// Training or evaluation targets of every task that has labels in this batch.
    pub targets: BTreeMap<TaskId, Targets>,
}

/// Gold targets of one task for one batch, [`IGNORE_INDEX`] (or `present == false`) where there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// One class index per example.
    Class(Vec<i64>),
    /// One per token, `batch × seq`, set at each word's first sub-token.
    Tokens(Vec<i64>),
    /// A row of `width` values per example (`batch × width`): 0/1 per label for multi-label tasks, the
    /// (scaled) targets for regression. `present[b]` says whether example `b` has a target.
    Dense { width: usize, values: Vec<f32>, present: Vec<bool> },
    /// The start and end token of the answer span of each example (both 0, the [CLS] token, when the answer
    /// is not in this window or there is none).
    Span { start: Vec<i64>, end: Vec<i64> },
}

/// The name of the adapter shared by every task (PEFT's default adapter name).
pub const SHARED_ADAPTER: &str = "default";

/// What a parameter is to training, decided where the parameter is built: freezing, learning-rate groups,
/// per-task snapshots and export ask this, never the parameter's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// The backbone outside its layers: embeddings (and a decoder's final norm and LM head).
    Embeddings,
    /// Backbone layer `i`, from 0 at the bottom.
    Layer(usize),
    /// A parameter-efficient adapter (LoRA, bottleneck, prefix) on backbone layer `layer`: one task's own, or
    /// the adapter every task shares (`adapter` is then [`SHARED_ADAPTER`]).
    Adapter { adapter: String, layer: usize, shared: bool },
    /// The head of a task.
    Head(TaskId),
    /// The loss weighting's own parameters (uncertainty's log-variances).
    Weighting,
}

impl ParamRole {
    /// Whether every task uses it: the backbone, and a shared adapter.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Embeddings | Self::Layer(_) | Self::Adapter { shared: true, .. })
    }

    /// Whether it belongs to the backbone as pretrained (not added for fine-tuning).
    pub fn is_backbone(&self) -> bool {
        matches!(self, Self::Embeddings | Self::Layer(_))
    }

    /// Whether it is an adapter's.
    pub fn is_adapter(&self) -> bool {
        matches!(self, Self::Adapter { .. })
    }

    /// The backbone layer it sits on, if any.
    pub fn layer(&self) -> Option<usize> {
        match self {
            Self::Layer(i) | Self::Adapter { layer: i, .. } => Some(*i),
            _ => None,
        }
    }

    /// The task that alone uses it: a head's task, or the task of a per-task adapter.
    pub fn task(&self) -> Option<&str> {
        match self {
            Self::Head(t) => Some(t.as_str()),
            Self::Adapter { adapter, shared: false, .. } => Some(adapter),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_are_validated() {
        assert!(TaskId::new("intent").is_ok());
        assert!(TaskId::new("ner-wnut_16").is_ok());
        for bad in ["", "1abc", "a b", "a.b", "ü", &"x".repeat(65)] {
            assert!(TaskId::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn task_id_round_trips_through_serde() -> Result<(), serde_json::Error> {
        let id = TaskId::new("slots").expect("valid");
        let json = serde_json::to_string(&id)?;
        assert_eq!(json, "\"slots\"");
        let back: TaskId = serde_json::from_str(&json)?;
        assert_eq!(back, id);
        assert!(serde_json::from_str::<TaskId>("\"bad name\"").is_err());
        Ok(())
    }
}
