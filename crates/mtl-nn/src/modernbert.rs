//! ModernBERT (`model_type = "modernbert"`): pre-norm blocks (LayerNorm before attention and before the MLP,
//! none before the first layer's attention, one after the last layer), without biases unless the config asks,
//! a packed `Wqkv` projection, rotary position embeddings (`rotate_half` layout) with one base for global
//! layers and another for sliding-window layers (keys at most `local_attention / 2` from the query; every
//! `global_attn_every_n_layers`-th layer is global), and a GeGLU MLP: `Wo(act(x Wiᵀ[:I]) · x Wiᵀ[I:])`.
//! Token embeddings only (no positions, no token types), then a LayerNorm. The encoder holds its tensors under
//! the names ModernBERT's task models give them (`model.layers.{i}.attn.Wqkv.weight`, …).
//! The composed path computes it, with the fused CPU attention masking the keys outside a window.

use candle_core::{Device, Tensor, D};
use serde_json::Value;

use crate::layers::Activation;
use crate::Result;

/// ModernBERT's prediction head (transformers' `ModernBertPredictionHead`), which its task models put before
/// the classifier: `norm(act(dense(x)))`, the dense layer with a bias when `bias` (`classifier_bias`), the
/// LayerNorm with one when `norm_bias`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictionHead {
    pub bias: bool,
    pub act: Activation,
    pub eps: f64,
    pub norm_bias: bool,
}

/// The settings of a ModernBERT `config.json` that BERT's fields do not hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Modern {
    /// Per layer: global attention (true) or a sliding window (false).
    pub global: Vec<bool>,
    /// A sliding-window layer's query sees the keys at most this many positions away (`local_attention / 2`).
    pub window: usize,
    /// The rotary base of global layers (`rope_parameters.full_attention.rope_theta`, or `global_rope_theta`).
    pub global_theta: f64,
    /// The rotary base of sliding-window layers.
    pub local_theta: f64,
    /// LayerNorms with a bias (`norm_bias`); the attention's (`attention_bias`) and the MLP's (`mlp_bias`)
    /// projections with biases.
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// The task models' prediction head: a bias on its dense layer (`classifier_bias`), its activation
    /// (`classifier_activation`).
    pub classifier_bias: bool,
    pub classifier_act: Activation,
    /// Sequence tasks read the mean of the real tokens' states (`classifier_pooling = "mean"`, as
    /// ModernBERT-base and -large ship) rather than the first token's (`"cls"`).
    pub mean_pooling: bool,
}

impl Modern {
    /// The prediction head every task head puts before its classifier, as ModernBERT's task models do.
    pub fn prediction_head(&self, eps: f64) -> PredictionHead {
        PredictionHead { bias: self.classifier_bias, act: self.classifier_act, eps, norm_bias: self.norm_bias }
    }
}

impl Modern {
    /// The settings of a ModernBERT `config.json` (a JSON object), whose fields it renames to BERT's where
    /// they mean the same (`norm_eps`, `hidden_activation`) and completes with `ModernBertConfig`'s defaults;
    /// or why the config is not supported.
    pub(crate) fn from_config(v: &mut Value) -> std::result::Result<Self, String> {
        let o = v.as_object_mut().ok_or("a config is a JSON object")?;
        for (key, default) in [
            ("vocab_size", Value::from(50368)),
            ("hidden_size", 768.into()),
            ("intermediate_size", 1152.into()),
            ("num_hidden_layers", 22.into()),
            ("num_attention_heads", 12.into()),
            ("max_position_embeddings", 8192.into()),
        ] {
            o.entry(key).or_insert(default);
        }
        let eps = o.remove("norm_eps").unwrap_or(1e-5.into());
        o.insert("layer_norm_eps".into(), eps);
        let act = o.remove("hidden_activation").unwrap_or("gelu".into());
        o.insert("hidden_act".into(), act);
        o.insert("type_vocab_size".into(), 0.into());
        o.remove("position_embedding_type");
        let flag = |key: &str| o.get(key).and_then(Value::as_bool).unwrap_or(false);
        let (norm_bias, attention_bias, mlp_bias) = (flag("norm_bias"), flag("attention_bias"), flag("mlp_bias"));
        let classifier_bias = flag("classifier_bias");
        let act = o.get("classifier_activation").cloned().unwrap_or("gelu".into());
        let classifier_act: Activation = serde_json::from_value(act.clone())
            .map_err(|_| format!("classifier_activation {act} is not supported (gelu, gelu_new, relu are)"))?;
        let layers = o["num_hidden_layers"].as_u64().ok_or("num_hidden_layers is not a number")? as usize;
        let global = match o.get("layer_types").filter(|t| !t.is_null()) {
            Some(types) => {
                let types = types.as_array().ok_or("layer_types is not a list")?;
                if types.len() != layers {
                    return Err(format!("layer_types names {} layers, the model has {layers}", types.len()));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(true),
                        Some("sliding_attention") => Ok(false),
                        _ => Err(format!("layer type {t} is neither \"full_attention\" nor \"sliding_attention\"")),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?
            }
            None => {
                let every = o.get("global_attn_every_n_layers").and_then(Value::as_u64).unwrap_or(3).max(1);
                (0..layers).map(|i| (i as u64).is_multiple_of(every)).collect()
            }
        };
        let local = o.get("local_attention").and_then(Value::as_u64).unwrap_or(128) as usize;
        if o.get("rope_scaling").is_some_and(|s| !s.is_null()) {
            return Err("ModernBERT with `rope_scaling` is not supported (the default rotary embedding is)".into());
        }
        let theta = |kind: &str, old: &str, default: f64| -> std::result::Result<f64, String> {
            let legacy = o.get(old).and_then(Value::as_f64);
            match o.get("rope_parameters").and_then(|p| p.get(kind)).filter(|p| !p.is_null()) {
                Some(p) => {
                    let rope_type = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                    if rope_type != "default" {
                        return Err(format!(
                            "rotary type {rope_type:?} of {kind} layers is not supported (\"default\" is)"
                        ));
                    }
                    Ok(p.get("rope_theta").and_then(Value::as_f64).or(legacy).unwrap_or(default))
                }
                None => Ok(legacy.unwrap_or(default)),
            }
        };
        let mean_pooling = match o.get("classifier_pooling").and_then(Value::as_str).unwrap_or("cls") {
            "cls" => false,
            "mean" => true,
            other => return Err(format!("classifier_pooling {other:?} is neither \"cls\" nor \"mean\"")),
        };
        let global_theta = theta("full_attention", "global_rope_theta", 160_000.0)?;
        // transformers 4's `local_rope_theta: null` gave sliding-window layers the global base.
        let local_default = match o.get("local_rope_theta").is_some_and(Value::is_null) {
            true => global_theta,
            false => 10_000.0,
        };
        let local_theta = theta("sliding_attention", "local_rope_theta", local_default)?;
        Ok(Self {
            global,
            window: local / 2,
            global_theta,
            local_theta,
            norm_bias,
            attention_bias,
            mlp_bias,
            classifier_bias,
            classifier_act,
            mean_pooling,
        })
    }
}

/// cos and sin of the rotation angles of positions `p < s` with base `theta`, `[s, d]` each
/// ([`crate::layers::rotary_angles`]).
pub(crate) fn rotary_tables(theta: f64, s: usize, d: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = crate::layers::rotary_angles(theta, s, d, None);
    Ok((Tensor::from_vec(cos, (s, d), device)?, Tensor::from_vec(sin, (s, d), device)?))
}

/// The packed `[q | k | v]` projections (`[b · s, 3 · heads · d]`) with the queries and keys rotated:
/// `x · cos + rotate_half(x) · sin` per head, tables `[s, d]`.
pub(crate) fn rotate_qk(qkv: &Tensor, (cos, sin): &(Tensor, Tensor), b: usize, heads: usize) -> Result<Tensor> {
    let (s, d) = cos.dims2()?;
    let h = heads * d;
    let (cos, sin) = (cos.reshape((1, s, 1, d))?, sin.reshape((1, s, 1, d))?);
    let rotate = |part: usize| -> Result<Tensor> {
        let x = qkv.narrow(1, part * h, h)?.reshape((b, s, heads, d))?;
        let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
        let half = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + half.broadcast_mul(&sin)?)?.reshape((b * s, h))?)
    };
    Ok(Tensor::cat(&[&rotate(0)?, &rotate(1)?, &qkv.narrow(1, 2 * h, h)?], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Hub's configs (ModernBERT-base as released: `global_rope_theta`, `global_attn_every_n_layers`) and
    /// transformers 5's (`layer_types`, `rope_parameters`) give the same settings.
    #[test]
    fn both_config_formats_read_alike() {
        let mut hub = serde_json::json!({
            "model_type": "modernbert", "num_hidden_layers": 4, "global_attn_every_n_layers": 3,
            "local_attention": 128, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
            "norm_eps": 1e-5, "hidden_activation": "gelu"
        });
        let mut new = serde_json::json!({
            "model_type": "modernbert", "num_hidden_layers": 4,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
                                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
        });
        let a = Modern::from_config(&mut hub).expect("the Hub's format");
        let b = Modern::from_config(&mut new).expect("transformers 5's format");
        assert_eq!(a, b);
        assert_eq!(a.global, [true, false, false, true]);
        assert_eq!(a.window, 64);
        assert_eq!(hub["layer_norm_eps"], 1e-5);
        assert_eq!(hub["hidden_act"], "gelu");
        let mut scaled =
            serde_json::json!({"num_hidden_layers": 1, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}});
        assert!(Modern::from_config(&mut scaled).expect_err("refused").contains("yarn"));
    }
}
