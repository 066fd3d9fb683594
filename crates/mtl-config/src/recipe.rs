//! The multi-task parts of the training recipe: loss weighting, gradient surgery, freezing, the learning-rate
//! schedule, and what selects and stops a run.

use std::collections::BTreeMap;

use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

/// How the tasks' losses are weighted into one objective.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightingMethod {
    /// Fixed weights (`weights`, 1 for every task not listed).
    #[default]
    Static,
    /// Learned homoscedastic uncertainty (Kendall, Gal & Cipolla 2018).
    Uncertainty,
    /// Dynamic Weight Average (Liu, Johns & Davison 2019).
    Dwa,
    /// GradNorm (Chen et al. 2018); needs each task's gradient, so a backward pass per task.
    GradNorm,
    /// Random loss weighting (Lin et al. 2022): every step draws new weights, the softmax of standard normal
    /// samples, times the number of tasks.
    Rlw,
    /// FAMO (Liu, Liu, Jin, Stone & Liu 2023): weights learned from how much each task's log-loss fell over
    /// the last step, which costs one more forward pass per step and no per-task backward.
    Famo,
    /// IMTL-L (Liu et al. 2021): a learned scale `s_k` per task, each term `e^s_k · L_k − s_k`; with
    /// `surgery.method = "imtl"` (IMTL-G) it is the paper's and LibMTL's IMTL.
    Imtl,
    /// The logarithm of each loss, as DB-MTL balances the loss scales (`surgery.method = "db_mtl"` balances the
    /// gradients).
    Log,
    /// Auto-λ (Liu, Davison & Johns 2022): weights meta-learned from the gradient of the loss on held-out
    /// batches (`meta_data`) after a look-ahead step, by finite differences; about three more passes per step.
    AutoLambda,
}

/// Where Auto-λ's meta batches come from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetaData {
    /// A seeded subset of the dev split (`meta_examples` examples).
    #[default]
    Dev,
    /// The training split in another order, as the authors' code does.
    Train,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightingConfig {
    #[serde(default)]
    pub method: WeightingMethod,
    /// `static`: a weight per task; tasks not listed weigh 1.
    #[serde(default)]
    pub weights: BTreeMap<TaskId, f64>,
    /// `dwa`: the softmax temperature T (the paper's 2).
    #[serde(default = "default_dwa_temperature")]
    pub temperature: f64,
    /// `dwa`: the optimiser steps over which losses are averaged before weights are recomputed; an epoch
    /// when absent (the paper's choice).
    #[serde(default)]
    pub period: Option<usize>,
    /// `grad_norm`: the asymmetry alpha (the paper's 1.5 for its regression-heavy benchmarks).
    #[serde(default = "default_gradnorm_alpha")]
    pub alpha: f64,
    /// Learning rate of the weighting's own parameters: GradNorm's and FAMO's weights (default 0.025), the
    /// uncertainty log-variances or IMTL-L's scales (default `head_lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// `famo`: the weight decay of its weight logits (the paper's γ).
    #[serde(default = "default_famo_decay")]
    pub decay: f64,
    /// `auto_lambda`: every task's initial weight (the authors' 0.1); its weights train by Adam at `lr`
    /// (default 1e-4, the authors').
    #[serde(default = "default_auto_lambda_init")]
    pub init: f64,
    /// `auto_lambda`: where the meta batches come from.
    #[serde(default)]
    pub meta_data: MetaData,
    /// `auto_lambda`: how many examples of `meta_data` the meta batches cycle through (all when absent).
    #[serde(default = "default_meta_examples")]
    pub meta_examples: Option<usize>,
    /// `auto_lambda`: the weights are meta-updated every this many optimiser steps.
    #[serde(default = "default_meta_every")]
    pub meta_every: usize,
}

fn default_dwa_temperature() -> f64 {
    2.0
}
fn default_gradnorm_alpha() -> f64 {
    1.5
}
fn default_famo_decay() -> f64 {
    1e-3
}
fn default_auto_lambda_init() -> f64 {
    0.1
}
fn default_meta_examples() -> Option<usize> {
    Some(1000)
}
fn default_meta_every() -> usize {
    1
}

impl Default for WeightingConfig {
    fn default() -> Self {
        Self {
            method: WeightingMethod::Static,
            weights: BTreeMap::new(),
            temperature: default_dwa_temperature(),
            period: None,
            alpha: default_gradnorm_alpha(),
            lr: None,
            decay: default_famo_decay(),
            init: default_auto_lambda_init(),
            meta_data: MetaData::default(),
            meta_examples: default_meta_examples(),
            meta_every: default_meta_every(),
        }
    }
}

/// Gradient surgery on the shared parameters; each needs a backward pass per task.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SurgeryMethod {
    #[default]
    None,
    /// Projecting conflicting gradients (Yu et al. 2020).
    Pcgrad,
    /// Conflict-averse gradient descent (Liu et al. 2021).
    Cagrad,
    /// The multiple-gradient descent algorithm (Sener & Koltun 2018): the minimum-norm point of the convex
    /// hull of the task gradients, after `normalization`.
    Mgda,
    /// IMTL-G (Liu et al. 2021): the combination whose projections on every task's unit gradient are equal.
    Imtl,
    /// Aligned-MTL (Senushkin et al. 2023): the task gradients' matrix made orthogonal and scaled to its
    /// smallest singular value.
    AlignedMtl,
    /// Nash-MTL (Navon et al. 2022): the Nash bargaining solution, weights `α` with `α_k (Gα)_k = 1` on the
    /// normalised Gram matrix.
    NashMtl,
    /// DB-MTL (Lin et al. 2023): each task's gradient averaged over steps (`beta`, `beta_sigma`), then scaled
    /// to the largest one's norm; pair it with `weighting.method = "log"`.
    DbMtl,
}

/// How MGDA normalises the task gradients before finding the minimum-norm point (LibMTL's `mgda_gn`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MgdaNormalization {
    /// None (LibMTL's default).
    #[default]
    None,
    /// By the gradient's L2 norm.
    L2,
    /// By the task's loss.
    Loss,
    /// By the loss times the gradient's L2 norm (the paper's choice).
    LossPlus,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SurgeryConfig {
    #[serde(default)]
    pub method: SurgeryMethod,
    /// `cagrad`: the radius c of the ball around the average gradient (the paper's 0.4).
    #[serde(default = "default_cagrad_c")]
    pub c: f64,
    /// `mgda`: how the task gradients are normalised first.
    #[serde(default)]
    pub normalization: MgdaNormalization,
    /// Combine the gradients of the shared representation (the encoder's output) instead of the shared
    /// parameters': with `mgda` this is MGDA-UB (Sener & Koltun's upper bound), and for any method but
    /// `db_mtl` it is LibMTL's `rep_grad`. The per-task backward passes then run through the heads only, and
    /// the encoder takes one backward pass with the combined gradient.
    #[serde(default)]
    pub representation: bool,
    /// `db_mtl`: the moving average's rate β (LibMTL's `DB_beta`).
    #[serde(default = "default_db_beta")]
    pub beta: f64,
    /// `db_mtl`: the rate decays as `β / step^beta_sigma` (LibMTL's `DB_beta_sigma`; 0 keeps it constant).
    #[serde(default = "default_db_beta_sigma")]
    pub beta_sigma: f64,
}

fn default_cagrad_c() -> f64 {
    0.4
}
fn default_db_beta() -> f64 {
    0.9
}
fn default_db_beta_sigma() -> f64 {
    0.0
}

impl Default for SurgeryConfig {
    fn default() -> Self {
        Self {
            method: SurgeryMethod::None,
            c: default_cagrad_c(),
            normalization: MgdaNormalization::default(),
            representation: false,
            beta: default_db_beta(),
            beta_sigma: default_db_beta_sigma(),
        }
    }
}

/// Which backbone parameters stay fixed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// The embedding tables and their LayerNorm.
    #[serde(default)]
    pub embeddings: bool,
    /// The bottom N encoder layers.
    #[serde(default)]
    pub layers: usize,
    /// The whole backbone: only the heads train.
    #[serde(default)]
    pub backbone: bool,
    /// Gradual unfreezing (Howard & Ruder 2018): training starts with the backbone frozen, and every this many
    /// optimiser steps the next layer from the top is unfrozen, the embeddings last. The other freeze
    /// settings still hold.
    #[serde(default)]
    pub unfreeze_every: Option<usize>,
}

/// The learning rate after warmup.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
    /// Constant at the peak.
    Constant,
}

/// A metric's weight in the selection score; TOML has no null, so "report only" is written `"null"`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ScoreWeight {
    Weight(f64),
    ReportOnly(ReportOnly),
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum ReportOnly {
    #[serde(rename = "null")]
    Null,
}

impl ScoreWeight {
    /// The weight, `None` for a metric that is reported only.
    pub fn weight(self) -> Option<f64> {
        match self {
            Self::Weight(w) => Some(w),
            Self::ReportOnly(_) => None,
        }
    }
}

/// Per task, per metric weights of the selection score.
pub type ScoreWeights = BTreeMap<TaskId, BTreeMap<String, ScoreWeight>>;

/// Checks the recipe's settings against each other and the tasks.
pub(crate) fn validate(config: &crate::Config, path: &std::path::Path) -> Result<(), crate::ConfigError> {
    let invalid = |field: &str, message: String| crate::ConfigError::Invalid {
        path: path.to_owned(),
        field: field.to_string(),
        message,
    };
    let t = &config.training;
    let unknown_task = |field: &str, name: &TaskId| {
        let tasks: Vec<&str> = config.tasks.keys().map(TaskId::as_str).collect();
        invalid(field, format!("unknown task `{name}`; tasks are: {}", tasks.join(", ")))
    };
    let positive = |field: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(invalid(field, format!("must be a positive number, got {v}")))
        }
    };
    if t.grad_accumulation == 0 {
        return Err(invalid("training.grad_accumulation", "must be at least 1".into()));
    }
    if !(t.layer_lr_decay > 0.0 && t.layer_lr_decay <= 1.0) {
        return Err(invalid("training.layer_lr_decay", format!("must be in (0, 1], got {}", t.layer_lr_decay)));
    }
    if t.patience == Some(0) {
        return Err(invalid("training.patience", "must be at least 1".into()));
    }
    if t.checkpoint_every == Some(0) {
        return Err(invalid("training.checkpoint_every", "must be at least 1".into()));
    }
    if t.keep_checkpoints == 0 {
        return Err(invalid(
            "training.keep_checkpoints",
            "must be at least 1 (the newest is the one to resume from)".into(),
        ));
    }
    if t.diagnostics_every == Some(0) {
        return Err(invalid("training.diagnostics_every", "must be at least 1".into()));
    }
    if t.eval_every == Some(0) {
        return Err(invalid("training.eval_every", "must be at least 1".into()));
    }
    if t.freeze.unfreeze_every == Some(0) {
        return Err(invalid("training.freeze.unfreeze_every", "must be at least 1".into()));
    }
    let w = &t.weighting;
    for (name, weight) in &w.weights {
        if !config.tasks.contains_key(name) {
            return Err(unknown_task("training.weighting.weights", name));
        }
        if !(weight.is_finite() && *weight >= 0.0) {
            return Err(invalid("training.weighting.weights", format!("task `{name}`: weight {weight} must be >= 0")));
        }
    }
    if !w.weights.is_empty() && w.method != WeightingMethod::Static {
        return Err(invalid("training.weighting.weights", "fixed weights belong to the `static` method".into()));
    }
    positive("training.weighting.temperature", w.temperature)?;
    positive("training.weighting.alpha", w.alpha)?;
    if let Some(lr) = w.lr {
        positive("training.weighting.lr", lr)?;
    }
    if w.period == Some(0) {
        return Err(invalid("training.weighting.period", "must be at least 1".into()));
    }
    positive("training.surgery.c", t.surgery.c)?;
    let per_task_gradients = w.method == WeightingMethod::GradNorm || t.surgery.method != SurgeryMethod::None;
    if per_task_gradients && t.sampling.plan == crate::StepPlan::Sampled {
        let field =
            if w.method == WeightingMethod::GradNorm { "training.weighting.method" } else { "training.surgery.method" };
        return Err(invalid(field, "compares the tasks' gradients within a step, so it needs `sampling.plan = \"mixed\"` (a sampled step trains one task)".into()));
    }
    if t.surgery.method != SurgeryMethod::None && t.freeze.backbone && t.freeze.unfreeze_every.is_none() {
        return Err(invalid(
            "training.surgery.method",
            "works on the shared parameters, and the backbone is frozen".into(),
        ));
    }
    if let Some(weights) = &t.score_weights {
        if t.select_metric.is_some() {
            return Err(invalid("training.score_weights", "give `select_metric` or `score_weights`, not both".into()));
        }
        let valid = config.metric_names();
        let mut total = 0.0;
        for (task, metrics) in weights {
            if !config.tasks.contains_key(task) {
                return Err(unknown_task("training.score_weights", task));
            }
            for (metric, weight) in metrics {
                let name = format!("{task}.{metric}");
                if !valid.contains(&name) {
                    let own: Vec<&str> = valid.iter().filter_map(|v| v.strip_prefix(&format!("{task}."))).collect();
                    return Err(invalid(
                        "training.score_weights",
                        format!("task `{task}` has no metric `{metric}`; valid choices: {}", own.join(", ")),
                    ));
                }
                if let Some(w) = weight.weight() {
                    if !(w.is_finite() && w >= 0.0) {
                        return Err(invalid(
                            "training.score_weights",
                            format!("`{name}`: weight {w} must be >= 0 (or \"null\")"),
                        ));
                    }
                    total += w;
                }
            }
        }
        if total <= 0.0 {
            return Err(invalid("training.score_weights", "at least one metric needs a positive weight".into()));
        }
    }
    Ok(())
}
