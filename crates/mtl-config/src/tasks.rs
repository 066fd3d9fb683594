//! `[tasks.NAME]`: each task's kind, data files and format, field mapping and the kind's options; `[joint]`,
//! tasks scored together; the data splits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_core::{TaskId, TaskKind};
use serde::{Deserialize, Serialize};

use crate::training::default_true;

/// How a data file is laid out.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
    /// Tab-separated values with a header row (double quotes quote a field).
    Tsv,
    /// One token per line, whitespace-separated columns (word first, tag last by default), a blank line
    /// between sentences; `-DOCSTART-` lines and `# ` comments are skipped.
    Conll,
    /// CoNLL-U (Universal Dependencies): ten tab-separated columns; multiword-token and empty-node lines are
    /// skipped; the tag comes from `conllu_column`.
    Conllu,
}

impl DataFormat {
    pub(crate) fn is_tabular(self) -> bool {
        matches!(self, DataFormat::Csv | DataFormat::Tsv)
    }

    pub(crate) fn is_conll(self) -> bool {
        matches!(self, DataFormat::Conll | DataFormat::Conllu)
    }
}

/// How the tags of a token task mark entities.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TagScheme {
    /// `B-X` begins an entity, `I-X` continues it, `O` is outside (also called IOB2).
    #[serde(alias = "iob2")]
    Bio,
    /// BIO plus `E-X` (last token) and `S-X` (a one-token entity); `L-`/`U-` (BILOU) are read as `E-`/`S-`.
    #[serde(alias = "bilou")]
    Bioes,
    /// Plain tags (part of speech, ...): no entities; scored by token accuracy and a per-tag report.
    None,
}

/// The loss of a regression head.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegressionLoss {
    Mse,
    /// Smooth L1 with `huber_delta` (PyTorch's `HuberLoss`).
    Huber,
}

/// How regression targets are scaled for training (predictions are scaled back).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetScaling {
    None,
    /// Subtract the training mean and divide by the training standard deviation, per output.
    Standardize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub kind: TaskKind,
    pub data: DataFiles,
    #[serde(default = "default_format")]
    pub format: DataFormat,
    /// Field (JSONL key, CSV/TSV column) with the raw text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Field with the second text of a sentence pair (entailment, paraphrase, similarity); the two texts
    /// are encoded together as `[CLS] a [SEP] b [SEP]` with token types 0 and 1.
    #[serde(default)]
    pub pair_field: Option<String>,
    /// JSONL field with the pre-split words; when present in a line it is used instead of `text_field`.
    #[serde(default = "default_words_field")]
    pub words_field: String,
    /// Field with the label: a string (classification), a list of strings or a separated string
    /// (multi-label), a number or a list of numbers (regression), a list of tags (token tasks, JSONL).
    #[serde(default = "default_label_field")]
    pub label_field: String,
    /// Regression with several outputs read from several fields (CSV columns); `label_field` otherwise.
    #[serde(default)]
    pub label_fields: Option<Vec<String>>,
    /// The label set, in order. When absent it is collected from the training file (sorted).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// A file with the label set, one label per line; an alternative to `labels`.
    #[serde(default)]
    pub labels_file: Option<PathBuf>,
    /// A label of the set that stands in for labels outside it in dev and test files (which are errors
    /// otherwise), e.g. `"O"` for unseen tags.
    #[serde(default)]
    pub unknown_label: Option<String>,
    /// Dev and test examples whose label (or any tag) is outside the label set are left out of this task's
    /// scores, with a warning that counts them, instead of being an error (`unknown_label` maps them instead).
    #[serde(default)]
    pub skip_unseen_labels: bool,
    /// Multi-label in CSV/TSV: the separator between the labels of one cell.
    #[serde(default = "default_label_separator")]
    pub label_separator: String,
    /// Multi-label: a label is predicted when its probability reaches this threshold.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Multi-label: after training, choose each label's threshold to maximise its F1 on dev (stored with
    /// the model and used for test and predictions).
    #[serde(default)]
    pub tune_thresholds: bool,
    /// Regression loss.
    #[serde(default = "default_regression_loss")]
    pub loss: RegressionLoss,
    /// `huber` loss: the distance from the target where the loss turns from squared to linear (PyTorch's
    /// `delta`).
    #[serde(default = "default_huber_delta")]
    pub huber_delta: f64,
    #[serde(default = "default_scaling")]
    pub scale_targets: TargetScaling,
    /// Token tasks: the tag scheme.
    #[serde(default = "default_scheme")]
    pub scheme: TagScheme,
    /// Token tasks: a linear-chain CRF over the tags (trained by likelihood, decoded by Viterbi with the
    /// scheme's forbidden transitions, such as `O` → `I-X`, removed).
    #[serde(default)]
    pub crf: bool,
    /// CoNLL: the 0-based column of the word.
    #[serde(default)]
    pub word_column: usize,
    /// CoNLL: the 0-based column of the tag; the last column when absent.
    #[serde(default)]
    pub tag_column: Option<usize>,
    /// CoNLL-U: the column that holds the tag, by its CoNLL-U name.
    #[serde(default = "default_conllu_column")]
    pub conllu_column: ConlluColumn,
    /// Question answering: the fields of the question, the context, and the answers (SQuAD layout:
    /// `{"text": [...], "answer_start": [...]}`, character offsets; empty lists for unanswerable questions).
    #[serde(default = "default_question_field")]
    pub question_field: String,
    /// Question answering: the field of the context the answer is a span of.
    #[serde(default = "default_context_field")]
    pub context_field: String,
    /// Question answering: the field of the answers (SQuAD layout).
    #[serde(default = "default_answers_field")]
    pub answers_field: String,
    /// Question answering: tokens shared by consecutive windows of a long context; a third of the context
    /// window (`model.max_len - max_query_len - 3`) when absent (transformers' 128 of 384).
    #[serde(default)]
    pub doc_stride: Option<usize>,
    /// Question answering: questions are truncated to this many tokens.
    #[serde(default = "default_max_query_len")]
    pub max_query_len: usize,
    /// Question answering: the longest answer, in tokens.
    #[serde(default = "default_max_answer_len")]
    pub max_answer_len: usize,
    /// Question answering: the model may answer "no answer" (SQuAD 2.0).
    #[serde(default = "default_true")]
    pub allow_unanswerable: bool,
    /// Decoder models: the instruction that asks for this task's answer, with `{text}` where the input goes
    /// (the words joined by spaces for word-level data); it becomes the user's turn of the model's chat
    /// template when the model has one. Required for every task of a decoder model.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Decoder models, classification: the word the model answers for each label (the label itself when
    /// absent), e.g. `{ pos = "positive", neg = "negative" }`.
    #[serde(default)]
    pub verbalizer: BTreeMap<String, String>,
    /// Decoder models: the longest answer generated at evaluation, in tokens; the longest training answer
    /// plus 8 when absent.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Train on this many examples of the training file at most (a seeded sample); all when absent. Tasks
    /// that read the same file share one sample, of the smallest limit among them. Without `labels` or
    /// `labels_file` the label set comes from the sample, so a dev label outside it is an error: give the
    /// label set with a limit.
    #[serde(default)]
    pub train_limit: Option<usize>,
}

/// A CoNLL-U column that can hold a tag.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConlluColumn {
    Lemma,
    Upos,
    Xpos,
    Feats,
    Deprel,
    Misc,
}

impl ConlluColumn {
    /// The 0-based column index in a CoNLL-U line.
    pub fn index(self) -> usize {
        match self {
            ConlluColumn::Lemma => 2,
            ConlluColumn::Upos => 3,
            ConlluColumn::Xpos => 4,
            ConlluColumn::Feats => 5,
            ConlluColumn::Deprel => 7,
            ConlluColumn::Misc => 9,
        }
    }
}

pub(crate) fn default_format() -> DataFormat {
    DataFormat::Jsonl
}
pub(crate) fn default_text_field() -> String {
    "text".into()
}
pub(crate) fn default_words_field() -> String {
    "words".into()
}
pub(crate) fn default_label_field() -> String {
    "label".into()
}
pub(crate) fn default_label_separator() -> String {
    ",".into()
}
pub(crate) fn default_threshold() -> f64 {
    0.5
}
pub(crate) fn default_regression_loss() -> RegressionLoss {
    RegressionLoss::Mse
}
pub(crate) fn default_huber_delta() -> f64 {
    1.0
}
pub(crate) fn default_scaling() -> TargetScaling {
    TargetScaling::None
}
pub(crate) fn default_scheme() -> TagScheme {
    TagScheme::Bio
}
pub(crate) fn default_conllu_column() -> ConlluColumn {
    ConlluColumn::Upos
}
pub(crate) fn default_question_field() -> String {
    "question".into()
}
pub(crate) fn default_context_field() -> String {
    "context".into()
}
pub(crate) fn default_answers_field() -> String {
    "answers".into()
}
pub(crate) fn default_max_query_len() -> usize {
    64
}
pub(crate) fn default_max_answer_len() -> usize {
    30
}

impl TaskConfig {
    /// The QA window stride for a model that reads `max_len` tokens.
    pub fn doc_stride(&self, max_len: usize) -> usize {
        self.doc_stride.unwrap_or_else(|| max_len.saturating_sub(self.max_query_len + 3) / 3)
    }

    /// The output names of a regression head (its "labels").
    pub fn regression_outputs(&self) -> Vec<String> {
        self.label_fields.clone().unwrap_or_else(|| vec![self.label_field.clone()])
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataFiles {
    /// The training file (relative to the config file's folder, like every path of a config file).
    pub train: PathBuf,
    /// The dev file: evaluated during training, it picks the checkpoint kept and stops training early.
    #[serde(default)]
    pub dev: Option<PathBuf>,
    /// The test file: scored once, at the end, with the checkpoint kept.
    #[serde(default)]
    pub test: Option<PathBuf>,
}

impl DataFiles {
    pub fn get(&self, split: Split) -> Option<&Path> {
        match split {
            Split::Train => Some(&self.train),
            Split::Dev => self.dev.as_deref(),
            Split::Test => self.test.as_deref(),
        }
    }
}

/// A data split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JointConfig {
    /// Tasks scored together: an example's frame is right when every listed task is right on it
    /// (a label equal, or every tag of the sentence equal). Reported as `joint.frame_accuracy`.
    #[serde(default)]
    pub frame: Vec<TaskId>,
}
