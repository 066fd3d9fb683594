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
