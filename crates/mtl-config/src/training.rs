//! `[training]`: the recipe (epochs, batches, learning rates, regularisation) and `[training.sampling]`, how
//! steps draw on the tasks. The multi-task parts of the recipe are in `recipe`.

use std::collections::BTreeMap;

use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use crate::{FreezeConfig, Schedule, ScoreWeights, SurgeryConfig, WeightingConfig};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Passes over the training data (an epoch's batches mix the tasks, or sample them: `[training.sampling]`).
    pub epochs: usize,
    /// Examples per batch (per optimiser step, times `grad_accumulation`).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Examples per batch when evaluating and predicting.
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
    /// Clip the global gradient norm to this (transformers' `max_grad_norm`); a large value leaves the
    /// gradients as they are.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    /// Seeds the heads' initialisation, dropout, the batch order and the task sampler: a run is reproducible
    /// from its config.
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
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepPlan {
    /// Batches drawn from all training examples together: every task with an example in the batch.
    #[default]
    Mixed,
    /// One task per step, chosen by the sampler (as MT-DNN); its batch holds that task's examples only.
    Sampled,
}

/// Which task a `sampled` step trains.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
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
    /// `sampled` plan: passes over a task's training examples in the whole run, spread over its epochs
    /// (`training.epochs` for a task left out; fractions allowed). The steps of an epoch are the tasks'
    /// batches times their passes over the run's epochs, and the proportional, temperature and annealed
    /// samplers count a task as its examples times that share, e.g. `epochs = { polarity = 1 }` in a run
    /// of 3 epochs sees each review once and the other tasks' examples three times.
    #[serde(default)]
    pub epochs: BTreeMap<TaskId, f64>,
}

pub(crate) fn default_temperature() -> f64 {
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
            epochs: BTreeMap::new(),
        }
    }
}

pub(crate) fn default_batch_size() -> usize {
    32
}
pub(crate) fn default_eval_batch_size() -> usize {
    64
}
pub(crate) fn default_weight_decay() -> f64 {
    0.01
}
pub(crate) fn default_warmup_ratio() -> f64 {
    0.1
}
pub(crate) fn default_dropout() -> f64 {
    0.1
}
pub(crate) fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
pub(crate) fn default_one() -> usize {
    1
}
pub(crate) fn default_one_f64() -> f64 {
    1.0
}
pub(crate) fn default_keep_checkpoints() -> usize {
    2
}
pub(crate) fn default_max_skipped_steps() -> usize {
    10
}
pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_seed() -> u64 {
    42
}
