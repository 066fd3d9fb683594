//! TOML run configuration → typed, validated settings.
//!
//! A config file fully describes a run: the model, every task with its data files, and the training
//! recipe. Unknown keys are rejected (with the list of valid ones), and `--set a.b=c` overrides are applied
//! before validation so that an override is checked exactly like the file. Depends only on `mtl-core`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_core::{TaskId, TaskKind};
use serde::{Deserialize, Serialize};

mod peft;
mod recipe;
mod serve;

pub use peft::{AdapterPlacement, PeftConfig, PeftMethod};
pub use serve::ServeConfig;
pub use recipe::{
    FreezeConfig, ReportOnly, Schedule, ScoreWeight, ScoreWeights, SurgeryConfig, SurgeryMethod, WeightingConfig,
    WeightingMethod,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid override `{set}`: {message}")]
    Override { set: String, message: String },
    #[error("invalid config {path}: field `{field}`: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub training: TrainingConfig,
    pub tasks: BTreeMap<TaskId, TaskConfig>,
    /// Groups of tasks whose predictions are scored together on shared examples.
    #[serde(default)]
    pub joint: JointConfig,
    /// Parameter-efficient tuning (LoRA), off by default.
    #[serde(default)]
    pub peft: PeftConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory: `config.json`, `model.safetensors`, `tokenizer.json`.
    pub path: PathBuf,
    /// Sequences are truncated to this many tokens, special tokens included.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn default_max_len() -> usize {
    128
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub epochs: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// Peak learning rate of the backbone.
    pub lr: f64,
    /// Peak learning rate of the task heads; `lr` when absent.
    #[serde(default)]
    pub head_lr: Option<f64>,
    /// Decoupled weight decay (AdamW); never applied to biases and LayerNorm parameters.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Fraction of all steps spent warming the learning rate up linearly from 0; `schedule` follows.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Batches whose gradients are averaged into one optimiser step.
    #[serde(default = "default_one")]
    pub grad_accumulation: usize,
    /// Steps whose loss or gradient is NaN or infinite are skipped; past this many the run stops.
    #[serde(default = "default_max_skipped_steps")]
    pub max_skipped_steps: usize,
    /// Layer-wise learning-rate decay: the top encoder layer trains at `lr`, each layer below at `decay`
    /// times the one above, and the embeddings at `decay` times the bottom layer. 1 turns it off.
    #[serde(default = "default_one_f64")]
    pub layer_lr_decay: f64,
    #[serde(default)]
    pub freeze: FreezeConfig,
    #[serde(default)]
    pub weighting: WeightingConfig,
    #[serde(default)]
    pub surgery: SurgeryConfig,
    /// Stop after this many evaluations in a row without a better selection score.
    #[serde(default)]
    pub patience: Option<usize>,
    /// Every this many optimiser steps, the cosine similarity of the tasks' gradients on the shared
    /// parameters is computed (a backward pass per task on that step) and reported.
    #[serde(default)]
    pub diagnostics_every: Option<usize>,
    /// Write a resumable training checkpoint (`OUT/checkpoint-STEP/`) every this many optimiser steps, as well
    /// as at the end of every epoch.
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// How many training checkpoints to keep, the newest; all are removed once the final model is written.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Evaluate on dev every this many optimiser steps as well as at the end of every epoch.
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// The selection score as a weighted mean of dev metrics, per task and metric (lower-is-better metrics
    /// count negated). A metric left out, or weighted `"null"`, is reported only.
    #[serde(default)]
    pub score_weights: Option<ScoreWeights>,
    /// Dropout probability of the backbone and the heads in training.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Global gradient-norm clipping; none when absent.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Batch examples of similar length together (shuffled pools of 50 batches, sorted by length), so that
    /// dynamic padding pads little; the batch order is still shuffled every epoch.
    #[serde(default = "default_true")]
    pub group_by_length: bool,
    /// A token budget per training batch: a batch closes before its padded size (examples × longest
    /// sequence) would exceed it, so batches of short inputs hold more examples (never more than
    /// `batch_size`). None by default.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The dev metric that picks the best epoch, as `TASK.METRIC` or `joint.frame_accuracy`. When absent,
    /// the mean of every task's main metric (accuracy, or entity F1 for tagging) is used.
    #[serde(default)]
    pub select_metric: Option<String>,
    /// How steps draw on the tasks.
    #[serde(default)]
    pub sampling: SamplingConfig,
}

/// What one optimiser step trains on.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StepPlan {
    /// Batches drawn from all training examples together: every task with an example in the batch.
    #[default]
    Mixed,
    /// One task per step, chosen by the sampler (as MT-DNN); its batch holds that task's examples only.
    Sampled,
}

/// Which task a `sampled` step trains.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Every task equally often.
    Uniform,
    /// In proportion to the task's number of training examples.
    #[default]
    Proportional,
    /// In proportion to `min(n, cap) ^ (1 / temperature)`.
    Temperature,
    /// In proportion to `n ^ alpha`, alpha going from 1 (proportional) to 0.2 over the epochs (Stickland &
    /// Murray 2019, "BERT and PALs").
    Annealed,
    /// Tasks in turn.
    RoundRobin,
    /// In proportion to the configured `weights`.
    Fixed,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    #[serde(default)]
    pub plan: StepPlan,
    #[serde(default)]
    pub sampler: SamplerKind,
    /// `temperature` sampler: T (1 is proportional, large T tends to uniform).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// `temperature` sampler: a task counts at most this many examples.
    #[serde(default)]
    pub cap: Option<usize>,
    /// `fixed` sampler: a weight per task.
    #[serde(default)]
    pub weights: BTreeMap<TaskId, f64>,
}

fn default_temperature() -> f64 {
    2.0
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            plan: StepPlan::Mixed,
            sampler: SamplerKind::Proportional,
            temperature: default_temperature(),
            cap: None,
            weights: BTreeMap::new(),
        }
    }
}

fn default_batch_size() -> usize {
    32
}
fn default_eval_batch_size() -> usize {
    64
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_warmup_ratio() -> f64 {
    0.1
}
fn default_dropout() -> f64 {
    0.1
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_one() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_max_skipped_steps() -> usize {
    10
}
fn default_true() -> bool {
    true
}
fn default_seed() -> u64 {
    42
}

/// How a data file is laid out.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    fn is_tabular(self) -> bool {
        matches!(self, DataFormat::Csv | DataFormat::Tsv)
    }

    fn is_conll(self) -> bool {
        matches!(self, DataFormat::Conll | DataFormat::Conllu)
    }
}

/// How the tags of a token task mark entities.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RegressionLoss {
    Mse,
    /// Smooth L1 with `huber_delta` (PyTorch's `HuberLoss`).
    Huber,
}

/// How regression targets are scaled for training (predictions are scaled back).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TargetScaling {
    None,
    /// Subtract the training mean and divide by the training standard deviation, per output.
    Standardize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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
    #[serde(default = "default_context_field")]
    pub context_field: String,
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
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
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

fn default_format() -> DataFormat {
    DataFormat::Jsonl
}
fn default_text_field() -> String {
    "text".into()
}
fn default_words_field() -> String {
    "words".into()
}
fn default_label_field() -> String {
    "label".into()
}
fn default_label_separator() -> String {
    ",".into()
}
fn default_threshold() -> f64 {
    0.5
}
fn default_regression_loss() -> RegressionLoss {
    RegressionLoss::Mse
}
fn default_huber_delta() -> f64 {
    1.0
}
fn default_scaling() -> TargetScaling {
    TargetScaling::None
}
fn default_scheme() -> TagScheme {
    TagScheme::Bio
}
fn default_conllu_column() -> ConlluColumn {
    ConlluColumn::Upos
}
fn default_question_field() -> String {
    "question".into()
}
fn default_context_field() -> String {
    "context".into()
}
fn default_answers_field() -> String {
    "answers".into()
}
fn default_max_query_len() -> usize {
    64
}
fn default_max_answer_len() -> usize {
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataFiles {
    pub train: PathBuf,
    #[serde(default)]
    pub dev: Option<PathBuf>,
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

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JointConfig {
    /// Tasks scored together: an example's frame is right when every listed task is right on it
    /// (a label equal, or every tag of the sentence equal). Reported as `joint.frame_accuracy`.
    #[serde(default)]
    pub frame: Vec<TaskId>,
}

impl Config {
    /// Reads `path`, applies `overrides` (`a.b=value`, the value parsed as TOML or else taken as a string),
    /// and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        };
        // Parse the file as written first, so that its errors carry line and column.
        let mut config: Config = toml::from_str(text).map_err(parse_err)?;
        if !overrides.is_empty() {
            let mut value: toml::Value = toml::from_str(text).map_err(parse_err)?;
            for set in overrides {
                apply_override(&mut value, set)?;
            }
            config = value.try_into().map_err(|e: toml::de::Error| ConfigError::Override {
                set: overrides.join(" "),
                message: e.message().to_string(),
            })?;
        }
        config.validate(path)?;
        Ok(config)
    }

    /// The config as TOML, as it will be resolved and stored next to a checkpoint.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a validated config always serializes; this is a bug")
    }

    /// The config of this trained model with new tasks (`mtl add-task`): `text` (the file `path`) holds
    /// `[tasks.NAME]` tables of tasks the model does not have, and may hold a `[training]` table for the new
    /// tasks' recipe (the model's own otherwise); the model and `[peft]` stay the trained model's. Returns the
    /// combined config and the new tasks' names.
    pub fn with_new_tasks(&self, text: &str, path: &Path, overrides: &[String]) -> Result<(Config, Vec<String>), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid { path: path.to_owned(), field: field.into(), message };
        let new: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_string() })?;
        let mut combined = toml::Table::try_from(self).expect("a validated config always serializes; this is a bug");
        let mut names = Vec::new();
        for (key, value) in new {
            match key.as_str() {
                "tasks" => {
                    let tasks = value.as_table().ok_or_else(|| invalid("tasks", "must be a table of tasks".into()))?;
                    for (name, task) in tasks {
                        let field = format!("tasks.{name}");
                        if self.tasks.keys().any(|t| t.as_str() == name) {
                            return Err(invalid(&field, format!("the model has a task `{name}` already; its tasks are: {}", self.task_list())));
                        }
                        // Checked on its own first, so that an error names the task, not a line of the merged text.
                        let _: TaskConfig = task.clone().try_into().map_err(|e: toml::de::Error| invalid(&field, e.message().to_string()))?;
                        let all = combined.entry("tasks").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        all.as_table_mut().expect("tasks is a table").insert(name.clone(), task.clone());
                        names.push(name.clone());
                    }
                }
                "training" => {
                    combined.insert(key, value);
                }
                other => {
                    return Err(invalid(other, "comes from the trained model; a new-task file holds `[tasks.NAME]` tables and optionally `[training]`".into()));
                }
            }
        }
        if names.is_empty() {
            return Err(invalid("tasks", "no new task: add a `[tasks.NAME]` table".into()));
        }
        let text = toml::to_string(&combined).expect("a TOML table serializes; this is a bug");
        Ok((Self::parse(&text, path, overrides)?, names))
    }

    /// Keeps only the named tasks (for single-task baselines): the joint frame loses the others, and a
    /// selection metric of a removed task falls back to the default (the mean of the main metrics).
    pub fn retain_tasks(&mut self, names: &[String], path: &Path) -> Result<(), ConfigError> {
        for name in names {
            if !self.tasks.keys().any(|t| t.as_str() == name) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    field: "tasks".into(),
                    message: format!("unknown task `{name}`; tasks are: {}", self.task_list()),
                });
            }
        }
        self.tasks.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        self.joint.frame.retain(|t| self.tasks.contains_key(t));
        self.training.sampling.weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        self.training.weighting.weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        if let Some(weights) = &mut self.training.score_weights {
            weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
            let positive = weights.values().flat_map(|m| m.values()).any(|w| w.weight().is_some_and(|w| w > 0.0));
            if !positive {
                self.training.score_weights = None;
            }
        }
        if self.joint.frame.len() < 2 {
            self.joint.frame.clear();
        }
        if self.training.select_metric.as_ref().is_some_and(|m| !self.metric_names().contains(m)) {
            self.training.select_metric = None;
        }
        Ok(())
    }

    /// The learning rate of the heads.
    pub fn head_lr(&self) -> f64 {
        self.training.head_lr.unwrap_or(self.training.lr)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_string(),
            message,
        };
        let t = &self.training;
        if self.tasks.is_empty() {
            return Err(invalid("tasks", "at least one task is needed".into()));
        }
        if self.model.max_len < 3 {
            return Err(invalid("model.max_len", "must be at least 3".into()));
        }
        if t.epochs == 0 {
            return Err(invalid("training.epochs", "must be at least 1".into()));
        }
        if t.batch_size == 0 || t.eval_batch_size == 0 {
            return Err(invalid("training.batch_size", "batch sizes must be at least 1".into()));
        }
        let s = &t.sampling;
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            return Err(invalid("training.sampling.temperature", "must be a positive number".into()));
        }
        if s.cap == Some(0) {
            return Err(invalid("training.sampling.cap", "must be at least 1".into()));
        }
        if s.sampler == SamplerKind::Fixed {
            for name in self.tasks.keys() {
                match s.weights.get(name) {
                    Some(w) if w.is_finite() && *w >= 0.0 => {}
                    Some(w) => return Err(invalid("training.sampling.weights", format!("task `{name}`: weight {w} must be >= 0"))),
                    None => return Err(invalid("training.sampling.weights", format!("the fixed sampler needs a weight for task `{name}`"))),
                }
            }
            if s.weights.values().sum::<f64>() <= 0.0 {
                return Err(invalid("training.sampling.weights", "at least one weight must be positive".into()));
            }
        }
        if let Some(name) = s.weights.keys().find(|n| !self.tasks.contains_key(*n)) {
            return Err(invalid("training.sampling.weights", format!("unknown task `{name}`; tasks are: {}", self.task_list())));
        }
        if t.max_tokens == Some(0) {
            return Err(invalid("training.max_tokens", "must be at least 1".into()));
        }
        for (field, lr) in [("training.lr", Some(t.lr)), ("training.head_lr", t.head_lr)] {
            if let Some(lr) = lr {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(invalid(field, format!("must be a positive number, got {lr}")));
                }
            }
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(invalid("training.weight_decay", "must be >= 0".into()));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(invalid("training.warmup_ratio", "must be in [0, 1]".into()));
        }
        if !(0.0..1.0).contains(&t.dropout) {
            return Err(invalid("training.dropout", "must be in [0, 1)".into()));
        }
        if let Some(c) = t.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid("training.grad_clip", "must be a positive number".into()));
            }
        }
        for (name, task) in &self.tasks {
            let field = |f: &str| format!("tasks.{name}.{f}");
            if task.format.is_conll() && task.kind != TaskKind::TokenClassification {
                return Err(invalid(
                    &field("format"),
                    "the conll and conllu formats hold tags, so they only suit token_classification tasks".into(),
                ));
            }
            if task.kind == TaskKind::TokenClassification && task.format.is_tabular() {
                return Err(invalid(&field("format"), "token tasks read jsonl, conll or conllu files".into()));
            }
            if task.kind == TaskKind::QuestionAnswering && task.format != DataFormat::Jsonl {
                return Err(invalid(
                    &field("format"),
                    "question answering reads jsonl files (SQuAD-style lines)".into(),
                ));
            }
            if task.pair_field.is_some() && !task.kind.is_sequence_level() {
                return Err(invalid(
                    &field("pair_field"),
                    "sentence pairs suit classification, multi_label and regression tasks".into(),
                ));
            }
            if task.train_limit == Some(0) || task.max_new_tokens == Some(0) {
                let what = if task.train_limit == Some(0) { "train_limit" } else { "max_new_tokens" };
                return Err(invalid(&field(what), "must be at least 1".into()));
            }
            if let Some(p) = &task.prompt {
                if !p.contains("{text}") {
                    return Err(invalid(&field("prompt"), "must contain `{text}`, where the input goes".into()));
                }
            }
            if !task.verbalizer.is_empty() && task.kind != TaskKind::Classification {
                return Err(invalid(&field("verbalizer"), "label words are for classification tasks".into()));
            }
            if task.crf && task.kind != TaskKind::TokenClassification {
                return Err(invalid(&field("crf"), "a CRF is a layer of token_classification tasks".into()));
            }
            if task.label_fields.is_some() && task.kind != TaskKind::Regression {
                return Err(invalid(
                    &field("label_fields"),
                    "several label fields are for regression with several outputs".into(),
                ));
            }
            if let Some(fields) = &task.label_fields {
                if fields.is_empty() {
                    return Err(invalid(&field("label_fields"), "must not be empty".into()));
                }
            }
            if matches!(task.kind, TaskKind::Regression | TaskKind::QuestionAnswering | TaskKind::Generation) {
                for (what, set) in [
                    ("labels", task.labels.is_some()),
                    ("labels_file", task.labels_file.is_some()),
                    ("unknown_label", task.unknown_label.is_some()),
                ] {
                    if set {
                        return Err(invalid(&field(what), format!("{} tasks have no label set", task.kind.name())));
                    }
                }
            }
            if !(task.threshold > 0.0 && task.threshold < 1.0) {
                return Err(invalid(&field("threshold"), "must be in (0, 1)".into()));
            }
            if !(task.huber_delta.is_finite() && task.huber_delta > 0.0) {
                return Err(invalid(&field("huber_delta"), "must be a positive number".into()));
            }
            if task.label_separator.is_empty() {
                return Err(invalid(&field("label_separator"), "must not be empty".into()));
            }
            if task.kind == TaskKind::QuestionAnswering {
                if task.max_query_len + 4 >= self.model.max_len {
                    return Err(invalid(
                        &field("max_query_len"),
                        format!("must leave room for the context within model.max_len = {}", self.model.max_len),
                    ));
                }
                if task.doc_stride(self.model.max_len) >= self.model.max_len - task.max_query_len - 3 {
                    return Err(invalid(
                        &field("doc_stride"),
                        "must be smaller than the context window (model.max_len - max_query_len - 3)".into(),
                    ));
                }
                if task.max_answer_len == 0 {
                    return Err(invalid(&field("max_answer_len"), "must be at least 1".into()));
                }
            }
            if let (Some(fallback), Some(labels)) = (&task.unknown_label, &task.labels) {
                if !labels.contains(fallback) {
                    return Err(invalid(&field("unknown_label"), format!("{fallback:?} is not in `labels`")));
                }
            }
            if task.labels.is_some() && task.labels_file.is_some() {
                return Err(invalid(
                    &format!("tasks.{name}.labels_file"),
                    "give `labels` or `labels_file`, not both".into(),
                ));
            }
            if let Some(labels) = &task.labels {
                let mut seen = std::collections::BTreeSet::new();
                if let Some(dup) = labels.iter().find(|l| !seen.insert(*l)) {
                    return Err(invalid(&format!("tasks.{name}.labels"), format!("label {dup:?} is listed twice")));
                }
                if labels.is_empty() {
                    return Err(invalid(&format!("tasks.{name}.labels"), "must not be empty".into()));
                }
            }
        }
        // Tasks that read the same file share its examples, so they must read the input the same way.
        for (a_name, a) in &self.tasks {
            for (b_name, b) in self.tasks.range(a_name..).skip(1) {
                let shares_file = [Split::Train, Split::Dev, Split::Test]
                    .iter()
                    .any(|&s| a.data.get(s).is_some() && a.data.get(s) == b.data.get(s));
                if !shares_file {
                    continue;
                }
                if a.kind == TaskKind::QuestionAnswering || b.kind == TaskKind::QuestionAnswering {
                    return Err(invalid(
                        &format!("tasks.{b_name}"),
                        format!("it reads the same file as task `{a_name}`; a question answering task needs files of its own"),
                    ));
                }
                let same_input = a.format == b.format
                    && a.text_field == b.text_field
                    && a.pair_field == b.pair_field
                    && a.words_field == b.words_field
                    && a.word_column == b.word_column;
                if !same_input {
                    return Err(invalid(
                        &format!("tasks.{b_name}"),
                        format!("it reads the same file as task `{a_name}`, so format, text_field, pair_field, words_field and word_column must match"),
                    ));
                }
            }
        }
        for name in &self.joint.frame {
            if !self.tasks.contains_key(name) {
                return Err(invalid("joint.frame", format!("unknown task `{name}`; tasks are: {}", self.task_list())));
            }
        }
        recipe::validate(self, path)?;
        peft::validate(self, path)?;
        if let Some(metric) = &t.select_metric {
            let valid = self.metric_names();
            if !valid.contains(metric) {
                return Err(invalid(
                    "training.select_metric",
                    format!("unknown metric `{metric}`; valid choices: {}", valid.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn task_list(&self) -> String {
        self.tasks.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Every metric name this config reports on dev and test, as `TASK.METRIC`.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, task) in &self.tasks {
            let metrics: &[&str] = match (task.kind, task.scheme) {
                (TaskKind::Classification, _) => &["accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc"],
                (TaskKind::MultiLabel, _) => &["micro_f1", "macro_f1", "weighted_f1", "samples_f1", "subset_accuracy"],
                (TaskKind::Regression, _) => &["pearson", "spearman", "mse", "mae"],
                (TaskKind::TokenClassification, TagScheme::None) => &["accuracy", "macro_f1"],
                (TaskKind::TokenClassification, _) => &["precision", "recall", "f1", "accuracy"],
                (TaskKind::QuestionAnswering, _) => &["exact_match", "f1"],
                (TaskKind::Generation, _) => &["rouge_l", "exact_match"],
            };
            names.extend(metrics.iter().map(|m| format!("{name}.{m}")));
        }
        if !self.joint.frame.is_empty() {
            names.push("joint.frame_accuracy".into());
        }
        names
    }
}

fn apply_override(root: &mut toml::Value, set: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override { set: set.to_string(), message: message.to_string() };
    let (key, raw) = set.split_once('=').ok_or_else(|| err("expected KEY=VALUE, e.g. training.lr=3e-5"))?;
    let keys: Vec<&str> = key.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("the key has an empty part"));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = keys.split_last().expect("split yields at least one part; this is a bug");
    let mut table = root;
    for part in parents {
        let t = table.as_table_mut().ok_or_else(|| err("the key goes through a value that is not a table"))?;
        table = t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    table
        .as_table_mut()
        .ok_or_else(|| err("the key goes through a value that is not a table"))?
        .insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "assets/model"

[training]
epochs = 3
lr = 1e-4

[tasks.intent]
kind = "classification"
label_field = "intent"
data = { train = "train.jsonl", dev = "dev.jsonl" }

[tasks.slots]
kind = "token_classification"
label_field = "slots"
data = { train = "train.jsonl", dev = "dev.jsonl" }

[joint]
frame = ["intent", "slots"]
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(text, Path::new("run.toml"), &overrides)
    }

    #[test]
    fn defaults_are_filled_in() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &[])?;
        assert_eq!(c.model.max_len, 128);
        assert_eq!(c.training.batch_size, 32);
        assert_eq!(c.training.grad_clip, Some(1.0));
        assert_eq!(c.tasks.len(), 2);
        assert_eq!(c.head_lr(), 1e-4);
        Ok(())
    }

    #[test]
    fn overrides_are_typed_and_validated() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &["training.lr=3e-5", "model.path=other dir", "training.select_metric=slots.f1"])?;
        assert_eq!(c.training.lr, 3e-5);
        assert_eq!(c.model.path, PathBuf::from("other dir"));
        let e = parse(MINIMAL, &["training.lr=abc"]).expect_err("a string lr must fail");
        assert!(e.to_string().contains("training.lr=abc"), "{e}");
        let e = parse(MINIMAL, &["training.nope=1"]).expect_err("unknown key must fail");
        assert!(e.to_string().contains("unknown field `nope`"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_keys_name_line_and_choices() {
        let text = MINIMAL.replace("epochs = 3", "epochs = 3\nepoch = 4");
        let e = parse(&text, &[]).expect_err("unknown key must fail").to_string();
        assert!(e.contains("run.toml"), "{e}");
        assert!(e.contains("line 7"), "{e}");
        assert!(e.contains("unknown field `epoch`"), "{e}");
        assert!(e.contains("epochs"), "the valid choices are listed: {e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = parse(MINIMAL, &["training.select_metric=slots.f2"]).expect_err("bad metric").to_string();
        assert!(e.contains("training.select_metric") && e.contains("slots.f1"), "{e}");
        let e = parse(MINIMAL, &["training.dropout=1.5"]).expect_err("bad dropout").to_string();
        assert!(e.contains("training.dropout"), "{e}");
        let e = parse(MINIMAL, &["joint.frame=[\"intent\", \"nope\"]"]).expect_err("bad joint").to_string();
        assert!(e.contains("unknown task `nope`"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.text_field=sentence"]).expect_err("shared file").to_string();
        assert!(e.contains("tasks.slots") && e.contains("intent"), "{e}");
    }

    #[test]
    fn task_options_are_checked_against_the_kind() {
        let e = parse(MINIMAL, &["tasks.intent.crf=true"]).expect_err("crf on a classifier").to_string();
        assert!(e.contains("tasks.intent.crf"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.format=\"csv\""]).expect_err("token task from CSV").to_string();
        assert!(e.contains("tasks.slots.format"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.format=\"conllu\""]).expect_err("tags for a classifier").to_string();
        assert!(e.contains("tasks.intent.format"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.kind=\"question_answering\""]).expect_err("QA shares a file").to_string();
        assert!(e.contains("question answering task needs files of its own"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.unknown_label=\"x\"", "tasks.intent.labels=[\"a\", \"b\"]"])
            .expect_err("fallback outside the set")
            .to_string();
        assert!(e.contains("tasks.intent.unknown_label"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.kind=\"regression\"", "tasks.intent.labels=[\"a\"]"])
            .expect_err("labels for regression")
            .to_string();
        assert!(e.contains("regression tasks have no label set"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.kind=\"generation\"", "tasks.intent.labels_file=\"l.txt\""])
            .expect_err("labels for generation")
            .to_string();
        assert!(e.contains("tasks.intent.labels_file") && e.contains("generation tasks have no label set"), "{e}");
        let c = parse(MINIMAL, &["tasks.intent.kind=\"generation\"", "training.select_metric=\"intent.rouge_l\""]).expect("generation");
        assert!(c.metric_names().contains(&"intent.exact_match".to_string()));
        let e = parse(MINIMAL, &["tasks.intent.threshold=1.5"]).expect_err("threshold").to_string();
        assert!(e.contains("tasks.intent.threshold"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.scheme=\"iob1\""]).expect_err("unknown scheme").to_string();
        assert!(e.contains("unknown variant `iob1`"), "{e}");
    }

    /// The whole message of each recipe error, as a user sees it.
    #[test]
    fn recipe_errors_snapshot() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["training.weighting.method=\"gradnorm\""],
                "invalid override `training.weighting.method=\"gradnorm\"`: unknown variant `gradnorm`, expected one of `static`, `uncertainty`, `dwa`, `grad_norm`",
            ),
            (
                &["training.surgery.method=\"mgda\""],
                "invalid override `training.surgery.method=\"mgda\"`: unknown variant `mgda`, expected one of `none`, `pcgrad`, `cagrad`",
            ),
            (
                &["training.schedule=\"step\""],
                "invalid override `training.schedule=\"step\"`: unknown variant `step`, expected one of `linear`, `cosine`, `constant`",
            ),
            (
                &["training.weighting.method=\"grad_norm\"", "training.sampling.plan=\"sampled\""],
                "invalid config run.toml: field `training.weighting.method`: compares the tasks' gradients within a step, so it needs `sampling.plan = \"mixed\"` (a sampled step trains one task)",
            ),
            (
                &["training.surgery.method=\"pcgrad\"", "training.freeze.backbone=true"],
                "invalid config run.toml: field `training.surgery.method`: works on the shared parameters, and the backbone is frozen",
            ),
            (
                &["training.score_weights.slots.f2=1.0"],
                "invalid config run.toml: field `training.score_weights`: task `slots` has no metric `f2`; valid choices: precision, recall, f1, accuracy",
            ),
            (
                &["training.score_weights.nope.f1=1.0"],
                "invalid config run.toml: field `training.score_weights`: unknown task `nope`; tasks are: intent, slots",
            ),
            (
                &["training.score_weights.slots.f1=\"null\""],
                "invalid config run.toml: field `training.score_weights`: at least one metric needs a positive weight",
            ),
            (
                &["training.score_weights.slots.f1=1.0", "training.select_metric=slots.f1"],
                "invalid config run.toml: field `training.score_weights`: give `select_metric` or `score_weights`, not both",
            ),
            (
                &["training.weighting.weights.intent=2.0", "training.weighting.method=\"dwa\""],
                "invalid config run.toml: field `training.weighting.weights`: fixed weights belong to the `static` method",
            ),
            (&["training.layer_lr_decay=1.5"], "invalid config run.toml: field `training.layer_lr_decay`: must be in (0, 1], got 1.5"),
            (&["training.grad_accumulation=0"], "invalid config run.toml: field `training.grad_accumulation`: must be at least 1"),
            (&["training.patience=0"], "invalid config run.toml: field `training.patience`: must be at least 1"),
            (&["training.freeze.unfreeze_every=0"], "invalid config run.toml: field `training.freeze.unfreeze_every`: must be at least 1"),
            (
                &["training.weighting.alpha=-1"],
                "invalid config run.toml: field `training.weighting.alpha`: must be a positive number, got -1",
            ),
        ];
        for (overrides, want) in cases {
            let got = parse(MINIMAL, overrides).expect_err("invalid").to_string();
            assert_eq!(&got, want, "for {overrides:?}");
        }
        let c = parse(MINIMAL, &["training.score_weights.slots.f1=2.0", "training.score_weights.slots.precision=\"null\""])
            .expect("null marks a metric as reported only");
        let w = &c.training.score_weights.as_ref().expect("set")[&TaskId::new("slots").expect("valid")];
        assert_eq!(w["f1"].weight(), Some(2.0));
        assert_eq!(w["precision"].weight(), None);
    }

    #[test]
    fn peft_errors_snapshot() {
        let lora = "peft.method=\"lora\"";
        let cases: &[(&[&str], &str)] = &[
            (
                &["peft.method=\"ia3\""],
                "invalid override `peft.method=\"ia3\"`: unknown variant `ia3`, expected one of `none`, `lora`, `adapter`, `prefix`",
            ),
            (
                &[lora, "peft.target_modules=[\"query\", \"dense\"]"],
                "invalid override `peft.method=\"lora\" peft.target_modules=[\"query\", \"dense\"]`: unknown variant `dense`, expected one of `query`, `key`, `value`, `attention_output`, `intermediate`, `output`",
            ),
            (&["peft.per_task=true"], "invalid config run.toml: field `peft.per_task`: needs a method (`peft.method = \"lora\"`, `\"adapter\"` or `\"prefix\"`)"),
            (&[lora, "peft.r=0"], "invalid config run.toml: field `peft.r`: must be at least 1"),
            (
                &["peft.method=\"adapter\"", "peft.placement=\"parallel\""],
                "invalid override `peft.method=\"adapter\" peft.placement=\"parallel\"`: unknown variant `parallel`, expected `pfeiffer` or `houlsby`",
            ),
            (&[lora, "peft.dropout=1.0"], "invalid config run.toml: field `peft.dropout`: must be in [0, 1), got 1"),
            (&[lora, "peft.target_modules=[]"], "invalid config run.toml: field `peft.target_modules`: name at least one of query, key, value, attention_output, intermediate, output"),
            (&[lora, "peft.target_modules=[\"key\", \"key\"]"], "invalid config run.toml: field `peft.target_modules`: lists a module twice"),
            (
                &[lora, "training.freeze.layers=2"],
                "invalid config run.toml: field `training.freeze`: with `[peft]` the pretrained backbone is frozen already; remove `training.freeze`",
            ),
            (
                &[lora, "peft.per_task=true", "training.surgery.method=\"pcgrad\""],
                "invalid config run.toml: field `training.surgery.method`: compares the tasks' gradients on shared parameters, and with per-task adapters no trained parameter is shared",
            ),
        ];
        for (overrides, want) in cases {
            let got = parse(MINIMAL, overrides).expect_err("invalid").to_string();
            assert_eq!(&got, want, "for {overrides:?}");
        }
        let c = parse(MINIMAL, &[lora, "peft.per_task=true", "peft.target_modules=[\"query\", \"output\"]"]).expect("valid");
        assert!(c.peft.enabled() && c.peft.per_task);
        assert_eq!(c.peft.target_modules, vec![mtl_core::LinearModule::Query, mtl_core::LinearModule::Output]);
        assert_eq!((c.peft.r, c.peft.alpha, c.peft.dropout), (8, 16.0, 0.1), "PEFT-like defaults");
    }

    #[test]
    fn retain_tasks_keeps_a_consistent_config() -> Result<(), ConfigError> {
        let mut c = parse(MINIMAL, &["training.select_metric=joint.frame_accuracy"])?;
        c.retain_tasks(&["slots".to_string()], Path::new("run.toml"))?;
        assert_eq!(c.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>(), vec!["slots"]);
        assert!(c.joint.frame.is_empty(), "a frame of one task is no frame");
        assert_eq!(c.training.select_metric, None);
        let e = c.retain_tasks(&["nope".to_string()], Path::new("run.toml")).expect_err("unknown task").to_string();
        assert!(e.contains("unknown task `nope`"), "{e}");
        Ok(())
    }

    #[test]
    fn resolved_config_round_trips() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &["training.head_lr=1e-3"])?;
        let back = parse(&c.to_toml(), &[])?;
        assert_eq!(back, c);
        Ok(())
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The rows (lines with a `|`) of the `NAME='...'` block of a comparison script.
    fn script_rows(script: &str, name: &str) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(root().join(script))?;
        let block = text.split(&format!("{name}='")).nth(1).and_then(|s| s.split('\'').next()).ok_or(format!("{script}: no {name} block"))?;
        Ok(block.lines().filter(|l| l.contains('|')).map(String::from).collect())
    }

    /// Every example's config is valid, and so is each row of the strategies comparison on the five-task one
    /// (the overrides of scripts/strategies-bench.sh, read from the script).
    #[test]
    fn example_configs_and_the_strategy_overrides_are_valid() -> Result<(), Box<dyn std::error::Error>> {
        let mut checked = 0;
        for entry in std::fs::read_dir(root().join("examples"))? {
            let path = entry?.path().join("config.toml");
            if path.exists() {
                Config::load(&path, &[])?;
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} example configs");
        let five = root().join("examples/five-task/config.toml");
        let config = Config::load(&five, &[])?;
        assert_eq!(config.training.weighting.weights.get(&TaskId::new("intensity")?), Some(&2.0));
        let mut rows = 0;
        for line in script_rows("scripts/strategies-bench.sh", "STRATEGIES")? {
            let (name, sets) = line.split_once('|').ok_or("row")?;
            let sets: Vec<String> = sets.split_whitespace().map(String::from).collect();
            let c = Config::load(&five, &sets).map_err(|e| format!("{name}: {e}"))?;
            let weights = &c.training.weighting.weights;
            assert_eq!(weights.is_empty(), name != "intensity-x2", "{name}: {weights:?}");
            rows += 1;
        }
        assert_eq!(rows, 11);
        Ok(())
    }

    /// Each variant of the parameter-efficient comparison (scripts/peft-bench.sh, read from the script) is a
    /// valid config, and the per-task LoRA example trains one task per step with every task equally often.
    #[test]
    fn peft_comparison_variants_are_valid() -> Result<(), Box<dyn std::error::Error>> {
        let lora = Config::load(&root().join("examples/five-task/config-lora.toml"), &[])?;
        assert!(lora.peft.method == PeftMethod::Lora && lora.peft.per_task, "{:?}", lora.peft);
        assert_eq!((lora.training.sampling.plan, lora.training.sampling.sampler), (StepPlan::Sampled, SamplerKind::Uniform));
        let mut names = Vec::new();
        for line in script_rows("scripts/peft-bench.sh", "VARIANTS")? {
            let mut fields = line.splitn(4, '|');
            let (name, path) = (fields.next().ok_or("name")?, fields.next().ok_or("config")?);
            let (select, sets) = (fields.next().ok_or("select")?, fields.next().unwrap_or(""));
            assert!(["joint", "per-task"].contains(&select), "{name}: --select {select}");
            let sets: Vec<String> = sets.split_whitespace().map(String::from).collect();
            let c = Config::load(&root().join(path), &sets).map_err(|e| format!("{name}: {e}"))?;
            assert_eq!(c.peft.enabled(), name != "full", "{name}");
            names.push(name.to_string());
        }
        assert_eq!(names, ["full", "lora-shared", "lora-per-task", "lora-per-task-joint", "adapter-per-task", "prefix-per-task"]);
        Ok(())
    }
}
