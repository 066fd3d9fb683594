//! Parameter-efficient tuning, the `[peft]` table: the pretrained backbone stays frozen, and small added
//! parameters are trained with the heads, shared by every task or one set per task.

use mtl_core::LinearModule;
use serde::{Deserialize, Serialize};

/// How the backbone is tuned.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeftMethod {
    /// Full fine-tuning: every parameter trains (subject to `training.freeze`).
    #[default]
    None,
    /// LoRA (Hu et al. 2021): a low-rank update `(alpha / r) · B A` beside each chosen linear layer.
    Lora,
    /// Bottleneck adapters (Houlsby et al. 2019): `y + W_up relu(W_down y)` on sublayer outputs.
    Adapter,
    /// Prefix tuning (Li & Liang 2021): learned keys and values before every layer's own.
    Prefix,
    /// AdaLoRA (Zhang et al. 2023): LoRA in SVD form, `B (E ⊙ A)` from rank `r`, whose least important
    /// triplets are pruned on a cubic schedule to an average rank of `target_r` (one budget per adapter).
    Adalora,
}

/// Where bottleneck adapters sit in each block.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdapterPlacement {
    /// After the feed-forward block only (Pfeiffer et al. 2020).
    #[default]
    Pfeiffer,
    /// After the attention block and after the feed-forward block (Houlsby et al. 2019).
    Houlsby,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    #[serde(default)]
    pub method: PeftMethod,
    /// Each task its own adapter on the shared frozen backbone (every batch row goes through its own task's),
    /// instead of one adapter that all tasks share.
    #[serde(default)]
    pub per_task: bool,
    /// LoRA's rank r.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA's alpha: updates are scaled by alpha / r.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the LoRA branch's input (PEFT's `lora_dropout`).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// The linear layers of each block that LoRA attaches to (PEFT's `target_modules`).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<LinearModule>,
    /// `adapter`: where the adapters sit.
    #[serde(default)]
    pub placement: AdapterPlacement,
    /// `adapter`: the bottleneck is the hidden size divided by this (AdapterHub's `reduction_factor`).
    #[serde(default = "default_reduction")]
    pub reduction_factor: usize,
    /// `prefix`: how many learned key/value positions each layer gets (PEFT's `num_virtual_tokens`).
    #[serde(default = "default_prefix_length")]
    pub prefix_length: usize,
    /// `adalora`: the schedule; `r` is the initial rank (PEFT's `init_r`). Written out only when set.
    #[serde(default, skip_serializing_if = "AdaloraConfig::is_default")]
    pub adalora: AdaloraConfig,
}

/// AdaLoRA's schedule, PEFT's `AdaLoraConfig` (its `total_step` is the run's number of optimiser steps).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaloraConfig {
    /// The average rank left once the budget has fallen (PEFT's `target_r`); at most `r`.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// Steps at the full budget first (PEFT's `tinit`).
    #[serde(default)]
    pub tinit: usize,
    /// Steps at the final budget last, its pattern fixed (PEFT's `tfinal`).
    #[serde(default)]
    pub tfinal: usize,
    /// Steps between two budget allocations (PEFT's `deltaT`).
    #[serde(default = "default_delta_t")]
    pub delta_t: usize,
    /// The smoothing of the sensitivity (PEFT's `beta1`).
    #[serde(default = "default_ada_beta")]
    pub beta1: f64,
    /// The smoothing of the uncertainty (PEFT's `beta2`).
    #[serde(default = "default_ada_beta")]
    pub beta2: f64,
    /// The weight of the orthogonality regulariser on A and B (PEFT's `orth_reg_weight`).
    #[serde(default = "default_orth")]
    pub orth_reg_weight: f64,
}

fn default_target_r() -> usize {
    4
}
fn default_delta_t() -> usize {
    1
}
fn default_ada_beta() -> f64 {
    0.85
}
fn default_orth() -> f64 {
    0.5
}

impl AdaloraConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for AdaloraConfig {
    fn default() -> Self {
        Self {
            target_r: default_target_r(),
            tinit: 0,
            tfinal: 0,
            delta_t: default_delta_t(),
            beta1: default_ada_beta(),
            beta2: default_ada_beta(),
            orth_reg_weight: default_orth(),
        }
    }
}

fn default_prefix_length() -> usize {
    20
}

fn default_reduction() -> usize {
    16
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.1
}
fn default_targets() -> Vec<LinearModule> {
    vec![LinearModule::Query, LinearModule::Value]
}

impl Default for PeftConfig {
    fn default() -> Self {
        Self {
            method: PeftMethod::None,
            per_task: false,
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_targets(),
            placement: AdapterPlacement::default(),
            reduction_factor: default_reduction(),
            prefix_length: default_prefix_length(),
            adalora: AdaloraConfig::default(),
        }
    }
}

impl PeftConfig {
    pub fn enabled(&self) -> bool {
        self.method != PeftMethod::None
    }
}

/// Checks `[peft]` against itself and the rest of the config.
pub(crate) fn validate(config: &crate::Config, path: &std::path::Path) -> Result<(), crate::ConfigError> {
    let invalid = |field: &str, message: String| crate::ConfigError::Invalid {
        path: path.to_owned(),
        field: field.to_string(),
        message,
    };
    let p = &config.peft;
    if !p.enabled() {
        if p.per_task {
            return Err(invalid(
                "peft.per_task",
                "needs a method (`peft.method = \"lora\"`, `\"adapter\"` or `\"prefix\"`)".into(),
            ));
        }
        return Ok(());
    }
    if p.prefix_length == 0 {
        return Err(invalid("peft.prefix_length", "must be at least 1".into()));
    }
    if p.reduction_factor == 0 {
        return Err(invalid("peft.reduction_factor", "must be at least 1".into()));
    }
    if p.r == 0 {
        return Err(invalid("peft.r", "must be at least 1".into()));
    }
    if !(p.alpha.is_finite() && p.alpha > 0.0) {
        return Err(invalid("peft.alpha", format!("must be a positive number, got {}", p.alpha)));
    }
    if !(0.0..1.0).contains(&p.dropout) {
        return Err(invalid("peft.dropout", format!("must be in [0, 1), got {}", p.dropout)));
    }
    if p.target_modules.is_empty() {
        return Err(invalid(
            "peft.target_modules",
            "name at least one of query, key, value, attention_output, intermediate, output".into(),
        ));
    }
    if p.method == PeftMethod::Adalora {
        let a = &p.adalora;
        if a.target_r == 0 || a.target_r > p.r {
            return Err(invalid(
                "peft.adalora.target_r",
                format!("must be between 1 and the initial rank peft.r ({}), got {}", p.r, a.target_r),
            ));
        }
        if a.delta_t == 0 {
            return Err(invalid("peft.adalora.delta_t", "must be at least 1".into()));
        }
        for (field, beta) in [("beta1", a.beta1), ("beta2", a.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(invalid(&format!("peft.adalora.{field}"), format!("must be in (0, 1), got {beta}")));
            }
        }
        if !(a.orth_reg_weight.is_finite() && a.orth_reg_weight >= 0.0) {
            return Err(invalid("peft.adalora.orth_reg_weight", "must be a number >= 0".into()));
        }
    }
    let mut seen = p.target_modules.clone();
    seen.sort();
    seen.dedup();
    if seen.len() != p.target_modules.len() {
        return Err(invalid("peft.target_modules", "lists a module twice".into()));
    }
    let t = &config.training;
    let f = &t.freeze;
    if f.embeddings || f.layers > 0 || f.backbone || f.unfreeze_every.is_some() {
        return Err(invalid(
            "training.freeze",
            "with `[peft]` the pretrained backbone is frozen already; remove `training.freeze`".into(),
        ));
    }
    if p.per_task {
        if let Some(task) = config.tasks.keys().find(|t| t.as_str() == "default") {
            return Err(invalid(
                &format!("tasks.{task}"),
                "`default` names the shared adapter; rename the task to use per-task adapters".into(),
            ));
        }
        if t.diagnostics_every.is_some() {
            return Err(invalid("training.diagnostics_every", "compares the tasks' gradients on shared parameters, and with per-task adapters no trained parameter is shared".into()));
        }
        let gradnorm = t.weighting.method == crate::WeightingMethod::GradNorm;
        if gradnorm || t.surgery.method != crate::SurgeryMethod::None {
            let field = if gradnorm { "training.weighting.method" } else { "training.surgery.method" };
            return Err(invalid(field, "compares the tasks' gradients on shared parameters, and with per-task adapters no trained parameter is shared".into()));
        }
    }
    Ok(())
}
