//! Which part of the model a parameter belongs to, and what follows from it: its learning rate and weight
//! decay (heads, layer-wise decay), and whether it is frozen at a given step.

use mtl_config::Config;
use mtl_core::ParamRole;
use mtl_nn::ParamStore;

/// The role of the trained variable `name`: as the model built it, and a variable the model does not hold is
/// the loss weighting's own (uncertainty's log-variances).
pub fn role_of<'a>(params: &'a ParamStore, name: &str) -> &'a ParamRole {
    const WEIGHTING: &ParamRole = &ParamRole::Weighting;
    params.role(name).unwrap_or(WEIGHTING)
}

/// Learning rate and weight decay: heads at `head_lr`; the backbone (and the adapters) at `lr`, times
/// `layer_lr_decay` per layer below the top (the embeddings one step below the bottom layer); the weighting's
/// parameters at `weighting.lr` or else `head_lr`. Biases, LayerNorm and weighting parameters get no weight
/// decay.
pub fn param_group(name: &str, role: &ParamRole, config: &Config, num_layers: usize) -> crate::ParamGroup {
    let t = &config.training;
    // BERT's `LayerNorm`, Llama's RMSNorms (`input_layernorm`, `model.norm`).
    let no_decay = name.ends_with(".bias")
        || name.contains("LayerNorm")
        || name.contains("layernorm")
        || name.ends_with("norm.weight")
        // MPNet's relative position bias (Trainer leaves every name with "bias" undecayed).
        || name.contains("relative_attention_bias");
    let depth_below_top = role.layer().map_or(num_layers, |i| num_layers.saturating_sub(i + 1));
    let lr = match role {
        ParamRole::Head(_) => config.head_lr(),
        ParamRole::Weighting => t.weighting.lr.unwrap_or_else(|| config.head_lr()),
        ParamRole::Embeddings | ParamRole::Layer(_) | ParamRole::Adapter { .. } => {
            t.lr * t.layer_lr_decay.powi(depth_below_top as i32)
        }
    };
    let weight_decay = if no_decay || *role == ParamRole::Weighting { 0.0 } else { t.weight_decay };
    crate::ParamGroup { lr, weight_decay }
}

/// Whether a parameter of `role` is frozen at optimiser step `step` (from 0).
pub fn is_frozen(role: &ParamRole, config: &Config, num_layers: usize, step: usize) -> bool {
    let f = &config.training.freeze;
    if !role.is_shared() {
        return false;
    }
    // With `[peft]` only the adapters train.
    if config.peft.enabled() {
        return !role.is_adapter();
    }
    let fixed = f.backbone
        || match role {
            ParamRole::Embeddings => f.embeddings,
            ParamRole::Layer(i) | ParamRole::Adapter { layer: i, .. } => *i < f.layers,
            _ => false,
        };
    if fixed {
        return true;
    }
    match f.unfreeze_every {
        // Units unfreeze from the top: layer L-1 after the first period, …, layer 0, then the embeddings.
        Some(every) => {
            let unfrozen = step / every;
            let rank = match role.layer() {
                Some(i) => num_layers - 1 - i.min(num_layers - 1),
                None => num_layers,
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

    fn head() -> ParamRole {
        ParamRole::Head(mtl_core::TaskId::new("a").expect("valid"))
    }

    fn adapter(name: &str, layer: usize) -> ParamRole {
        ParamRole::Adapter { adapter: name.into(), layer, shared: name == mtl_nn::SHARED_ADAPTER }
    }

    #[test]
    fn layer_wise_decay_counts_down_from_the_top() {
        let c = config("layer_lr_decay = 0.5");
        let lr = |role: ParamRole| param_group("x.weight", &role, &c, 3).lr;
        assert_eq!(lr(ParamRole::Layer(2)), 1e-4);
        assert_eq!(lr(ParamRole::Layer(1)), 0.5e-4);
        assert_eq!(lr(ParamRole::Layer(0)), 0.25e-4);
        assert_eq!(lr(ParamRole::Embeddings), 0.125e-4);
        assert_eq!(lr(head()), 1e-3);
        assert_eq!(lr(adapter("a", 1)), 0.5e-4);
        assert_eq!(param_group("embeddings.LayerNorm.weight", &ParamRole::Embeddings, &c, 3).weight_decay, 0.0);
        let weighting = param_group("weighting.log_var.a", &ParamRole::Weighting, &c, 3);
        assert_eq!(weighting, crate::ParamGroup { lr: 1e-3, weight_decay: 0.0 });
    }

    #[test]
    fn freezing_by_part_and_gradually() {
        let c = config("freeze = { embeddings = true, layers = 1 }");
        assert!(is_frozen(&ParamRole::Embeddings, &c, 3, 0));
        assert!(is_frozen(&ParamRole::Layer(0), &c, 3, 0));
        assert!(is_frozen(&adapter(mtl_nn::SHARED_ADAPTER, 0), &c, 3, 0));
        assert!(!is_frozen(&ParamRole::Layer(1), &c, 3, 0));
        assert!(!is_frozen(&head(), &c, 3, 0));
        let c = config("freeze = { backbone = true }");
        assert!(is_frozen(&ParamRole::Layer(2), &c, 3, 1000));
        assert!(!is_frozen(&head(), &c, 3, 0));
        // Every 10 steps one more unit from the top: layer 2 at step 10, layer 1 at 20, layer 0 at 30,
        // the embeddings at 40.
        let c = config("freeze = { unfreeze_every = 10 }");
        let thawed = |role: ParamRole| (0..60).find(|&s| !is_frozen(&role, &c, 3, s));
        assert_eq!(thawed(ParamRole::Layer(2)), Some(10));
        assert_eq!(thawed(ParamRole::Layer(1)), Some(20));
        assert_eq!(thawed(ParamRole::Layer(0)), Some(30));
        assert_eq!(thawed(ParamRole::Embeddings), Some(40));
        assert_eq!(thawed(head()), Some(0));
    }

    #[test]
    fn with_lora_only_adapters_and_heads_train() {
        let c = config("[peft]\nmethod = \"lora\"");
        assert!(is_frozen(&ParamRole::Layer(2), &c, 3, 0));
        assert!(is_frozen(&ParamRole::Embeddings, &c, 3, 0));
        assert!(!is_frozen(&adapter(mtl_nn::SHARED_ADAPTER, 2), &c, 3, 0));
        assert!(!is_frozen(&adapter("a", 2), &c, 3, 0));
        assert!(!is_frozen(&head(), &c, 3, 0));
        assert!(adapter(mtl_nn::SHARED_ADAPTER, 1).is_shared());
        assert!(!adapter("a", 1).is_shared());
        assert_eq!(adapter("a", 1).task(), Some("a"));
        assert_eq!(
            param_group("model.layers.1.post_attention_layernorm.weight", &ParamRole::Layer(1), &c, 3).weight_decay,
            0.0
        );
    }
}
