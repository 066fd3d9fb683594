//! Which part of the model a parameter belongs to, and what follows from it: its learning rate and weight
//! decay (heads, layer-wise decay), and whether it is frozen at a given step.

use mtl_config::Config;

/// Where a parameter sits, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Embeddings,
    /// Encoder layer `i`, from 0 at the bottom (with the shared adapter's parameters on it).
    Layer(usize),
    /// A per-task adapter's parameters on encoder layer `i` (LoRA, bottleneck or prefix): one task's own.
    TaskAdapter(usize),
    Head,
    /// Parameters of the loss weighting (uncertainty's log-variances).
    Weighting,
}

impl Part {
    pub fn of(name: &str) -> Self {
        if name.starts_with("heads.") {
            return Self::Head;
        }
        if name.starts_with("weighting.") {
            return Self::Weighting;
        }
        // BERT's `encoder.layer.N.` and Llama's `model.layers.N.`.
        if let Some(rest) = name.strip_prefix("encoder.layer.").or_else(|| name.strip_prefix("model.layers.")) {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse().ok()) {
                return match mtl_nn::param_adapter(name) {
                    Some(adapter) if adapter != mtl_nn::SHARED_ADAPTER => Self::TaskAdapter(i),
                    _ => Self::Layer(i),
                };
            }
        }
        Self::Embeddings
    }

    /// Whether every task shares it.
    pub fn is_shared(self) -> bool {
        matches!(self, Self::Embeddings | Self::Layer(_))
    }
}

/// Learning rate and weight decay: heads at `head_lr`; the backbone (and the adapters) at `lr`, times
/// `layer_lr_decay` per layer below the top (the embeddings one step below the bottom layer); the weighting's
/// parameters at `weighting.lr` or else `head_lr`. Biases, LayerNorm and weighting parameters get no weight
/// decay.
pub fn param_group(name: &str, config: &Config, num_layers: usize) -> crate::ParamGroup {
    let t = &config.training;
    // BERT's `LayerNorm`, Llama's RMSNorms (`input_layernorm`, `model.norm`).
    let no_decay = name.ends_with(".bias")
        || name.contains("LayerNorm")
        || name.contains("layernorm")
        || name.ends_with("norm.weight");
    let depth_below_top = |part: Part| match part {
        Part::Layer(i) | Part::TaskAdapter(i) => num_layers.saturating_sub(i + 1),
        _ => num_layers,
    };
    let part = Part::of(name);
    let lr = match part {
        Part::Head => config.head_lr(),
        Part::Weighting => t.weighting.lr.unwrap_or_else(|| config.head_lr()),
        Part::Embeddings | Part::Layer(_) | Part::TaskAdapter(_) => {
            t.lr * t.layer_lr_decay.powi(depth_below_top(part) as i32)
        }
    };
    let weight_decay = if no_decay || part == Part::Weighting { 0.0 } else { t.weight_decay };
    crate::ParamGroup { lr, weight_decay }
}

/// Whether the parameter `name` is frozen at optimiser step `step` (from 0).
pub fn is_frozen(name: &str, config: &Config, num_layers: usize, step: usize) -> bool {
    let f = &config.training.freeze;
    let part = Part::of(name);
    if !part.is_shared() {
        return false;
    }
    // With `[peft]` only the adapters train.
    if config.peft.enabled() {
        return !mtl_nn::is_peft_param(name);
    }
    let fixed = f.backbone
        || match part {
            Part::Embeddings => f.embeddings,
            Part::Layer(i) => i < f.layers,
            _ => false,
        };
    if fixed {
        return true;
    }
    match f.unfreeze_every {
        // Units unfreeze from the top: layer L-1 after the first period, …, layer 0, then the embeddings.
        Some(every) => {
            let unfrozen = step / every;
            let rank = match part {
                Part::Layer(i) => num_layers - 1 - i.min(num_layers - 1),
                _ => num_layers,
            };
            rank >= unfrozen
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(training: &str) -> Config {
        let text = format!(
            "[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\nhead_lr = 1e-3\n{training}\n[tasks.a]\nkind = \"classification\"\ndata = {{ train = \"a.jsonl\" }}\n"
        );
        Config::parse(&text, Path::new("t.toml"), &[]).expect("valid config")
    }

    #[test]
    fn layer_wise_decay_counts_down_from_the_top() {
        let c = config("layer_lr_decay = 0.5");
        let lr = |name: &str| param_group(name, &c, 3).lr;
        assert_eq!(lr("encoder.layer.2.output.dense.weight"), 1e-4);
        assert_eq!(lr("encoder.layer.1.output.dense.weight"), 0.5e-4);
        assert_eq!(lr("encoder.layer.0.attention.self.query.weight"), 0.25e-4);
        assert_eq!(lr("embeddings.word_embeddings.weight"), 0.125e-4);
        assert_eq!(lr("heads.a.weight"), 1e-3);
        assert_eq!(param_group("embeddings.LayerNorm.weight", &c, 3).weight_decay, 0.0);
        assert_eq!(param_group("weighting.log_var.a", &c, 3), crate::ParamGroup { lr: 1e-3, weight_decay: 0.0 });
    }

    #[test]
    fn freezing_by_part_and_gradually() {
        let c = config("freeze = { embeddings = true, layers = 1 }");
        assert!(is_frozen("embeddings.word_embeddings.weight", &c, 3, 0));
        assert!(is_frozen("encoder.layer.0.output.dense.bias", &c, 3, 0));
        assert!(!is_frozen("encoder.layer.1.output.dense.bias", &c, 3, 0));
        assert!(!is_frozen("heads.a.weight", &c, 3, 0));
        let c = config("freeze = { backbone = true }");
        assert!(is_frozen("encoder.layer.2.output.dense.bias", &c, 3, 1000));
        assert!(!is_frozen("heads.a.weight", &c, 3, 0));
        // Every 10 steps one more unit from the top: layer 2 at step 10, layer 1 at 20, layer 0 at 30,
        // the embeddings at 40.
        let c = config("freeze = { unfreeze_every = 10 }");
        let thawed = |name: &str| (0..60).find(|&s| !is_frozen(name, &c, 3, s));
        assert_eq!(thawed("encoder.layer.2.attention.self.key.weight"), Some(10));
        assert_eq!(thawed("encoder.layer.1.attention.self.key.weight"), Some(20));
        assert_eq!(thawed("encoder.layer.0.attention.self.key.weight"), Some(30));
        assert_eq!(thawed("embeddings.position_embeddings.weight"), Some(40));
        assert_eq!(thawed("heads.a.weight"), Some(0));
    }

    #[test]
    fn with_lora_only_adapters_and_heads_train() {
        let c = config("[peft]\nmethod = \"lora\"");
        assert!(is_frozen("encoder.layer.2.attention.self.query.weight", &c, 3, 0));
        assert!(is_frozen("embeddings.word_embeddings.weight", &c, 3, 0));
        assert!(!is_frozen("encoder.layer.2.attention.self.query.lora_A.default.weight", &c, 3, 0));
        assert!(!is_frozen("heads.a.weight", &c, 3, 0));
        assert_eq!(Part::of("encoder.layer.1.output.dense.lora_B.default.weight"), Part::Layer(1));
        assert!(Part::of("encoder.layer.1.output.dense.lora_B.default.weight").is_shared());
        assert_eq!(Part::of("encoder.layer.1.output.dense.lora_B.a.weight"), Part::TaskAdapter(1));
        assert!(!Part::of("encoder.layer.1.output.dense.lora_B.a.weight").is_shared());
        assert_eq!(param_group("encoder.layer.0.attention.self.value.lora_A.a.weight", &c, 3).lr, 1e-4);
        // A decoder's layers and adapters.
        assert_eq!(Part::of("model.layers.2.self_attn.q_proj.lora_A.default.weight"), Part::Layer(2));
        assert_eq!(Part::of("model.layers.0.mlp.down_proj.lora_B.a.weight"), Part::TaskAdapter(0));
        assert!(!is_frozen("model.layers.2.mlp.up_proj.lora_B.default.weight", &c, 3, 0));
        assert!(is_frozen("model.layers.2.mlp.up_proj.weight", &c, 3, 0));
        assert_eq!(param_group("model.layers.1.post_attention_layernorm.weight", &c, 3).weight_decay, 0.0);
    }
}
