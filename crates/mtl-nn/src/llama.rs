//! A Llama-architecture decoder for training and generation, mirroring Hugging Face `transformers`'
//! `LlamaForCausalLM` (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py>):
//! RMSNorm before each sublayer, rotary position embeddings (the `rotate_half` layout), grouped-query
//! attention, a SwiGLU feed-forward block, a causal mask, and a key/value cache for generation. Tensor names
//! match `LlamaForCausalLM`'s state dict, so a Hugging Face `model.safetensors` loads as is; with tied
//! embeddings (`tie_word_embeddings`) the LM head is the embedding matrix.
//!
//! Every step is a differentiable candle op: candle-nn's `rms_norm`, `rope` and `softmax_last_dim` have no
//! backward pass, so none of them is used; a test checks the loss and every parameter's gradient against
//! PyTorch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use mtl_core::Mode;
use serde::{Deserialize, Serialize};

use crate::bert::Kernels;
use crate::cpu::decoder::{CausalAttention, DecodeCache, RopeTables};
use crate::cpu::lora::{BaseWeight, LoraProjection, LoraRows};
use crate::cpu::paged::Span;
pub use crate::cpu::paged::{BlockTable, PagedKv};
use crate::cpu::quant::QuantMatrix;
use crate::layers::{log_softmax_last, softmax_last, DropoutRng};
use crate::params::{Init, ParamBuilder};
use crate::peft::{check_routes, LoraLayer, LoraSpec, PeftPass, Route};
use crate::{NnError, Result};

/// A linear layer of a decoder block, by its name in transformers (and in PEFT's `target_modules`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl DecoderModule {
    pub const ALL: [Self; 7] =
        [Self::QProj, Self::KProj, Self::VProj, Self::OProj, Self::GateProj, Self::UpProj, Self::DownProj];

    /// Its path inside a layer (`model.layers.N.` + this).
    pub fn path(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::GateProj => "mlp.gate_proj",
            Self::UpProj => "mlp.up_proj",
            Self::DownProj => "mlp.down_proj",
        }
    }
}

/// LoRA on the decoder: rank, scale and dropout (`spec`; its BERT targets are unused), the projections it
/// adapts, and its adapters (one shared, or one per task).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLora {
    pub spec: LoraSpec,
    pub modules: Vec<DecoderModule>,
    pub adapters: Vec<String>,
}

/// How a forward pass runs LoRA: which adapter each example goes through, and dropout.
pub struct LoraRun<'a> {
    pub routes: &'a [Route],
    pub dropout: &'a DropoutRng,
    pub mode: Mode,
    /// Use the adapters' values without recording the pass for backward (generation): every activation is
    /// freed as soon as the next layer has read it, instead of living until the output is dropped.
    pub frozen: bool,
}

/// A decoder's pretrained weights under `LlamaForCausalLM`'s names: f32 tensors, and matrices kept in their
/// GGUF block format. [`Llama`] runs the quantised ones as they are (they never train); a model meant for full
/// fine-tuning is loaded with every weight dequantised.
#[derive(Debug, Default)]
pub struct LlamaWeights {
    pub dense: HashMap<String, Tensor>,
    pub quantized: HashMap<String, QuantMatrix>,
}

impl From<HashMap<String, Tensor>> for LlamaWeights {
    fn from(dense: HashMap<String, Tensor>) -> Self {
        Self { dense, quantized: HashMap::new() }
    }
}

impl LlamaWeights {
    /// A builder over these weights (`seed` initialises what they lack).
    pub fn into_builder(self, seed: u64, device: &Device) -> Result<ParamBuilder> {
        let pb = ParamBuilder::new(self.dense, seed, device);
        pb.add_quantized(self.quantized)?;
        Ok(pb)
    }

    /// Bytes of the quantised matrices.
    pub fn quantized_bytes(&self) -> usize {
        self.quantized.values().map(QuantMatrix::size_in_bytes).sum()
    }
}

/// The fields of a Hugging Face Llama `config.json` that the decoder uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every token that ends generation (transformers' `eos_token_id` may be a list; a GGUF file adds its
    /// end-of-turn and end-of-message tokens).
    pub eos_token_ids: Vec<u32>,
    /// Llama, or Gemma 3's variations on it.
    pub family: Family,
    /// The feed-forward block's gate activation.
    pub hidden_act: Activation,
    /// Attention scores are scaled by `1/√query_pre_attn_scalar` (`None`: `1/√head_dim`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Layers that attend within a sliding window, when the model has any.
    pub sliding: Option<SlidingWindow>,
    /// Llama 3's rotary scaling: each frequency of the (global) rotation divided by its factor, one per
    /// frequency (`head_dim / 2`), from a config's `"rope_type": "llama3"` or a GGUF file's `rope_freqs`
    /// tensor (llama.cpp's frequency factors). `None`: the default rotation.
    pub rope_freq_factors: Option<Vec<f64>>,
}

/// Llama 3's rotary frequency factors (transformers' `rope_type = "llama3"`, Llama 3.1 and 3.2): over
/// wavelengths `2π / f` longer than `original_max_position_embeddings / low_freq_factor` a frequency is
/// divided by `factor`; under `… / high_freq_factor` it is kept; in between the divisor moves smoothly from
/// `factor` to 1.
pub fn llama3_rope_factors(params: &serde_json::Value, theta: f64, head_dim: usize) -> Result<Vec<f64>, String> {
    let get = |key: &str| {
        params.get(key).and_then(serde_json::Value::as_f64).ok_or_else(|| format!("llama3 rope scaling needs {key}"))
    };
    let (factor, low, high, original) =
        (get("factor")?, get("low_freq_factor")?, get("high_freq_factor")?, get("original_max_position_embeddings")?);
    if !(factor > 0.0 && low > 0.0 && high > low && original > 0.0) {
        return Err(format!(
            "llama3 rope scaling: factor {factor}, low_freq_factor {low}, high_freq_factor {high} and \
             original_max_position_embeddings {original} must be positive, high above low"
        ));
    }
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect())
}

/// The decoder families this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    /// Gemma 3 (text): RMSNorm weights are offsets from 1 (`x̂ · (1 + w)`), embeddings are scaled by
    /// `√hidden_size`, queries and keys are RMS-normalised per head before the rotation, and each sublayer's
    /// output is normalised before it joins the residual stream.
    Gemma3,
}

pub use crate::cpu::decoder::Activation;

/// Sliding-window attention: in the layers marked, a query sees itself and the `window − 1` tokens before
/// it, and the rotation uses its own base.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    /// One flag per layer.
    pub layers: Vec<bool>,
    pub rope_theta: f64,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    /// transformers < 5.
    rope_theta: Option<f64>,
    /// transformers 5: `{"rope_theta": …, "rope_type": "default"}`.
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    /// Llama's default: untied; Gemma's: tied.
    tie_word_embeddings: Option<bool>,
    model_type: Option<String>,
    #[serde(default = "default_act")]
    hidden_act: String,
    /// Gemma's name for `hidden_act`.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    /// `"sliding_attention"` or `"full_attention"` per layer.
    layer_types: Option<Vec<String>>,
    /// transformers < 5: the rotary base of sliding-window layers.
    rope_local_base_freq: Option<f64>,
    /// Gemma configs without `layer_types`: every n-th layer attends globally, the others in the window.
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    sliding_window_pattern_private: Option<usize>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    use_bidirectional_attention: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// The token ids of a config value that may be a number or a list of numbers.
fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        Some(other) => other.as_u64().map(|x| x as u32).into_iter().collect(),
        None => Vec::new(),
    }
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io { path: path.to_owned(), source })?;
        Self::from_json(&text).map_err(|message| NnError::File { path: path.to_owned(), message })
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("not a Llama config: {e}"))?;
        let family = match raw.model_type.as_deref() {
            None | Some("llama") => Family::Llama,
            Some("gemma3_text") => Family::Gemma3,
            Some(other) => {
                return Err(format!("model_type {other:?} is not a decoder this crate runs (llama, gemma3_text)"))
            }
        };
        let act = match (raw.hidden_activation.as_deref(), family) {
            (Some(a), _) => a,
            (None, Family::Gemma3) => "gelu_pytorch_tanh",
            (None, Family::Llama) => &raw.hidden_act,
        };
        let hidden_act = match act {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return Err(format!("activation {other:?} is not supported (silu, gelu_pytorch_tanh)")),
        };
        if raw.attention_bias || raw.mlp_bias {
            return Err("attention_bias and mlp_bias are not supported".into());
        }
        if raw.final_logit_softcapping.is_some() || raw.attn_logit_softcapping.is_some() {
            return Err("logit soft-capping is not supported".into());
        }
        if raw.use_bidirectional_attention {
            return Err("bidirectional attention is not supported".into());
        }
        // transformers 5 keeps the rotary settings in `rope_parameters`: one set, or one per layer type;
        // older configs a `rope_scaling` beside `rope_theta`.
        let rope_params = |kind: Option<&str>| -> Option<&serde_json::Value> {
            let p = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()).filter(|p| !p.is_null())?;
            Some(match kind {
                Some(k) if p.get(k).is_some() => &p[k],
                _ => p,
            })
        };
        let rope_type = |p: &serde_json::Value| {
            p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default").to_string()
        };
        let rope = |kind: Option<&str>| -> Result<Option<f64>, String> {
            let Some(p) = rope_params(kind) else { return Ok(None) };
            match rope_type(p).as_str() {
                "default" => {}
                "llama3" if family == Family::Llama && kind == Some("full_attention") => {}
                other => {
                    return Err(format!(
                        "rope scaling ({other}) is not supported; the default rotary embedding and Llama 3's are"
                    ))
                }
            }
            Ok(p.get("rope_theta").and_then(serde_json::Value::as_f64))
        };
        let gemma = family == Family::Gemma3;
        // Gemma3TextConfig's defaults where a config leaves a field out (older hub configs do).
        let (default_theta, default_local_theta) = if gemma { (1e6, 10_000.0) } else { (10_000.0, 10_000.0) };
        let rope_theta = rope(Some("full_attention"))?.or(raw.rope_theta).unwrap_or(default_theta);
        let pattern = raw.sliding_window_pattern.or(raw.sliding_window_pattern_private).unwrap_or(6).max(1);
        let layer_types = match (&raw.layer_types, gemma) {
            (Some(types), _) => Some(types.clone()),
            (None, true) => Some(
                (0..raw.num_hidden_layers)
                    .map(|n| if (n + 1) % pattern != 0 { "sliding_attention" } else { "full_attention" }.to_string())
                    .collect(),
            ),
            (None, false) => None,
        };
        let window = raw.sliding_window.or(gemma.then_some(4096));
        let sliding = match (&layer_types, window) {
            (Some(types), Some(window)) if types.iter().any(|t| t == "sliding_attention") => {
                if types.len() != raw.num_hidden_layers {
                    return Err(format!("{} layer_types for {} layers", types.len(), raw.num_hidden_layers));
                }
                if let Some(bad) = types.iter().find(|t| *t != "sliding_attention" && *t != "full_attention") {
                    return Err(format!("layer type {bad:?} is not supported"));
                }
                Some(SlidingWindow {
                    window,
                    layers: types.iter().map(|t| t == "sliding_attention").collect(),
                    rope_theta: rope(Some("sliding_attention"))?.or(raw.rope_local_base_freq).unwrap_or(if gemma {
                        default_local_theta
                    } else {
                        rope_theta
                    }),
                })
            }
            (Some(types), None) if types.iter().any(|t| t == "sliding_attention") => {
                return Err("sliding-window layers without a sliding_window".into())
            }
            _ => None,
        };
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads.max(1));
        let rope_freq_factors = match rope_params(Some("full_attention")) {
            Some(p) if rope_type(p) == "llama3" => Some(llama3_rope_factors(p, rope_theta, head_dim)?),
            _ => None,
        };
        let config = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            family,
            hidden_act,
            query_pre_attn_scalar: raw.query_pre_attn_scalar.or(gemma.then_some(256.0)),
            sliding,
            rope_freq_factors,
        };
        config.validate()?;
        Ok(config)
    }

    /// The attention scores' scale.
    pub fn attention_scale(&self) -> f32 {
        (1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()) as f32
    }

    /// The sliding window of layer `n`, if it has one.
    pub fn window(&self, n: usize) -> Option<usize> {
        self.sliding.as_ref().filter(|s| s.layers.get(n).copied().unwrap_or(false)).map(|s| s.window)
    }

    /// Checks the sizes fit together (a config read from a GGUF file's metadata goes through here too).
    pub fn validate(&self) -> Result<(), String> {
        let (heads, kv, d) = (self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!("num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"));
        }
        if d == 0 || !d.is_multiple_of(2) {
            return Err(format!("head_dim {d} must be even"));
        }
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return Err("hidden_size, num_hidden_layers, vocab_size and intermediate_size must be positive".into());
        }
        if self.max_position_embeddings < 2 {
            return Err(format!(
                "max_position_embeddings (a GGUF file's context_length) is {}; a model reads at least 2 positions",
                self.max_position_embeddings
            ));
        }
        if let Some(s) = &self.sliding {
            if s.window == 0 || s.layers.len() != self.num_hidden_layers {
                return Err(format!(
                    "a sliding window of {} over {} of {} layers",
                    s.window,
                    s.layers.len(),
                    self.num_hidden_layers
                ));
            }
        }
        if self.query_pre_attn_scalar.is_some_and(|q| q.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
            return Err("query_pre_attn_scalar must be positive".into());
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != d / 2 || !f.iter().all(|x| x.is_finite() && *x > 0.0) {
                return Err(format!("{} rotary frequency factors for head_dim {d}, all positive", f.len()));
            }
        }
        Ok(())
    }
}

/// `x · Wᵀ` over the last dimension of a `[n, in]` input, `W` being `[out, in]` (no bias in Llama).
fn project(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// RMSNorm over the last dimension, from differentiable ops: `x / sqrt(mean(x²) + eps) · (offset + w)`.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    if offset == 0.0 {
        return Ok(normed.broadcast_mul(weight)?);
    }
    Ok(normed.broadcast_mul(&weight.affine(1.0, f64::from(offset))?)?)
}

#[derive(Clone, Debug)]
struct Layer {
    lora: BTreeMap<DecoderModule, LoraLayer>,
    input_norm: Tensor,
    q: BaseWeight,
    k: BaseWeight,
    v: BaseWeight,
    o: BaseWeight,
    /// Gemma 3: the RMSNorm of each head's query and key (`[head_dim]`).
    qk_norms: Option<(Tensor, Tensor)>,
    /// Gemma 3: the RMSNorm of the attention's output, before the residual.
    attn_out_norm: Option<Tensor>,
    /// The feed-forward block's input norm (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    ff_norm: Tensor,
    /// Gemma 3: the RMSNorm of the feed-forward output, before the residual.
    ff_out_norm: Option<Tensor>,
    gate: BaseWeight,
    up: BaseWeight,
    down: BaseWeight,
    /// The sliding window of its attention, if any.
    window: Option<usize>,
    /// Its rotary tables (an index into [`Llama`]'s).
    rope: usize,
}

/// One set of rotary tables: on the host for the fused kernels, and as tensors for the composed ops, made
/// when they first run (Gemma's tables of 32,768 positions take 67 MB a copy).
#[derive(Clone, Debug)]
struct Rope {
    host: Arc<RopeTables>,
    device: Device,
    tensors: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl Rope {
    /// cos and sin, `[positions, head_dim]` each.
    fn tensors(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(t) = self.tensors.get() {
            return Ok(t);
        }
        let shape = (self.host.cos.len() / self.host.head_dim.max(1), self.host.head_dim);
        let cos = Tensor::from_slice(&self.host.cos, shape, &self.device)?;
        let sin = Tensor::from_slice(&self.host.sin, shape, &self.device)?;
        Ok(self.tensors.get_or_init(|| (cos, sin)))
    }
}

/// The keys and values of every layer for the positions seen so far (generation).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Each row's cached positions: 1 for a real token, 0 for padding (a left-padded prompt).
    real: Vec<Vec<u32>>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The decoder with its LM head.
#[derive(Clone, Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed: BaseWeight,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<BaseWeight>,
    /// cos and sin of every position's rotation angles, `[max_position_embeddings, head_dim]`: the global
    /// layers' first, then the sliding-window layers' when their base differs.
    ropes: Vec<Rope>,
    /// LoRA, when the model has it; its pretrained parameters are then frozen.
    lora: Option<DecoderLora>,
    kernels: Kernels,
}

impl Llama {
    /// The decoder under `pb` (names as in `LlamaForCausalLM`'s state dict).
    pub fn new(pb: &ParamBuilder, config: &LlamaConfig) -> Result<Self> {
        Self::with_lora(pb, config, None)
    }

    /// The decoder with LoRA on some projections (adapters under `….q_proj.lora_A.ADAPTER.weight`, as PEFT
    /// names them); the pretrained parameters are then frozen (constants for autograd). Matrices the builder
    /// holds quantised ([`ParamBuilder::add_quantized`]) stay so, with or without LoRA; they never train.
    pub fn with_lora(pb: &ParamBuilder, config: &LlamaConfig, lora: Option<&DecoderLora>) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (q_out, kv_out) =
            (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
        let m = pb.pp("model");
        let init = Init::Normal { std: 0.02 };
        // A pretrained matrix, in its GGUF block format when the builder holds it so.
        let base = |pb: &ParamBuilder, rows: usize, cols: usize| -> Result<BaseWeight> {
            match pb.take_quantized("weight", rows, cols)? {
                Some(q) => Ok(BaseWeight::Quantized(q)),
                None => Ok(BaseWeight::Dense(pb.get((rows, cols), "weight", init)?)),
            }
        };
        let embed = base(&m.pp("embed_tokens"), config.vocab_size, h)?;
        // Gemma's norm weights are offsets from 1: a new one starts at 0.
        let norm_init = match config.family {
            Family::Llama => Init::Ones,
            Family::Gemma3 => Init::Zeros,
        };
        let local_rope = config.sliding.as_ref().is_some_and(|s| s.rope_theta != config.rope_theta);
        let layers = (0..config.num_hidden_layers)
            .map(|n| {
                let l = m.pp(&format!("layers.{n}")).with_role(mtl_core::ParamRole::Layer(n));
                let (a, f) = (l.pp("self_attn"), l.pp("mlp"));
                let mut adapted = BTreeMap::new();
                if let Some(lora) = lora {
                    for &module in &lora.modules {
                        let (inp, out) = match module {
                            DecoderModule::QProj => (h, q_out),
                            DecoderModule::KProj | DecoderModule::VProj => (h, kv_out),
                            DecoderModule::OProj => (q_out, h),
                            DecoderModule::GateProj | DecoderModule::UpProj => (h, i),
                            DecoderModule::DownProj => (i, h),
                        };
                        adapted.insert(
                            module,
                            LoraLayer::new(&l.pp(module.path()), &lora.spec, &lora.adapters, inp, out)?,
                        );
                    }
                }
                let d = config.head_dim;
                let gemma = config.family == Family::Gemma3;
                let window = config.window(n);
                Ok(Layer {
                    lora: adapted,
                    input_norm: l.pp("input_layernorm").get(h, "weight", norm_init)?,
                    q: base(&a.pp("q_proj"), q_out, h)?,
                    k: base(&a.pp("k_proj"), kv_out, h)?,
                    v: base(&a.pp("v_proj"), kv_out, h)?,
                    o: base(&a.pp("o_proj"), h, q_out)?,
                    qk_norms: match gemma {
                        true => Some((
                            a.pp("q_norm").get(d, "weight", norm_init)?,
                            a.pp("k_norm").get(d, "weight", norm_init)?,
                        )),
                        false => None,
                    },
                    attn_out_norm: match gemma {
                        true => Some(l.pp("post_attention_layernorm").get(h, "weight", norm_init)?),
                        false => None,
                    },
                    ff_norm: match gemma {
                        true => l.pp("pre_feedforward_layernorm").get(h, "weight", norm_init)?,
                        false => l.pp("post_attention_layernorm").get(h, "weight", norm_init)?,
                    },
                    ff_out_norm: match gemma {
                        true => Some(l.pp("post_feedforward_layernorm").get(h, "weight", norm_init)?),
                        false => None,
                    },
                    gate: base(&f.pp("gate_proj"), i, h)?,
                    up: base(&f.pp("up_proj"), i, h)?,
                    down: base(&f.pp("down_proj"), h, i)?,
                    window,
                    rope: usize::from(window.is_some() && local_rope),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = m.pp("norm").get(h, "weight", norm_init)?;
        let lm_head =
            if config.tie_word_embeddings { None } else { Some(base(&pb.pp("lm_head"), config.vocab_size, h)?) };
        let rope = |theta: f64, factors: Option<&[f64]>| Rope {
            host: Arc::new(rotary_tables(config, theta, factors)),
            device: pb.device(),
            tensors: std::sync::OnceLock::new(),
        };
        let mut ropes = vec![rope(config.rope_theta, config.rope_freq_factors.as_deref())];
        if let Some(s) = config.sliding.as_ref().filter(|_| local_rope) {
            ropes.push(rope(s.rope_theta, None));
        }
        let mut model = Self {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            lora: lora.cloned(),
            kernels: Kernels::default(),
        };
        if lora.is_some() {
            // As in PEFT: only the adapters train.
            let freeze = |w: &mut BaseWeight| {
                if let BaseWeight::Dense(t) = w {
                    *t = t.detach();
                }
            };
            freeze(&mut model.embed);
            model.lm_head.iter_mut().for_each(freeze);
            model.norm = model.norm.detach();
            for l in &mut model.layers {
                l.input_norm = l.input_norm.detach();
                l.ff_norm = l.ff_norm.detach();
                for norm in [l.attn_out_norm.as_mut(), l.ff_out_norm.as_mut()].into_iter().flatten() {
                    *norm = norm.detach();
                }
                if let Some((q, k)) = l.qk_norms.as_mut() {
                    (*q, *k) = (q.detach(), k.detach());
                }
                [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down]
                    .into_iter()
                    .for_each(freeze);
            }
        }
        Ok(model)
    }

    pub fn lora(&self) -> Option<&DecoderLora> {
        self.lora.as_ref()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Fused CPU kernels (the default) or composed candle ops (the reference they are tested against).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether this pass runs the fused CPU kernels.
    fn fused(&self, x: &Tensor) -> bool {
        self.kernels == Kernels::Fused && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// RMSNorm of the final hidden states or a sublayer's input or output.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        // Gemma's weights are offsets from 1.
        let offset = match self.config.family {
            Family::Llama => 0.0,
            Family::Gemma3 => 1.0,
        };
        if self.fused(x) {
            crate::cpu::decoder::rms_norm(x, weight, self.config.rms_norm_eps, offset)
        } else {
            rms_norm(x, weight, self.config.rms_norm_eps, offset)
        }
    }

    /// The final hidden states (after the last RMSNorm), `[batch * seq, hidden]`, of `ids` (`[batch, seq]`;
    /// `mask` row-major `batch × seq`, 1 for real tokens, or `None` for all real). Each token's rotary
    /// position counts the real tokens before it in its row, so padding may sit on either side: on the right
    /// for training, on the left for batched generation. With a cache, `ids` continue the cached positions
    /// (every row the same number of new tokens) and the cache is extended.
    pub fn forward(&self, ids: &Tensor, mask: Option<&[u32]>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        match &self.lora {
            Some(lora) if lora.adapters.len() > 1 => Err(NnError::Input(
                "a decoder with per-task adapters needs each example's adapter (forward_with)".into(),
            )),
            Some(_) => {
                let b = ids.dim(0)?;
                let routes = [Route { adapter: 0, examples: 0..b }];
                let off = DropoutRng::new(0.0, 0);
                let frozen = cache.is_some();
                self.forward_with(
                    ids,
                    mask,
                    cache,
                    Some(&LoraRun { routes: &routes, dropout: &off, mode: Mode::Eval, frozen }),
                )
            }
            None => self.forward_with(ids, mask, cache, None),
        }
    }

    /// [`Llama::forward`] with each example routed through its LoRA adapter, and LoRA's dropout in training.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        mask: Option<&[u32]>,
        mut cache: Option<&mut KvCache>,
        run: Option<&LoraRun>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let pass = self.peft_pass(run, b, s)?;
        let c = &self.config;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if let Some(m) = mask {
            if m.len() != b * s {
                return Err(NnError::Input("the attention mask does not match the ids".into()));
            }
        }
        if let Some(cache) = cache.as_mut() {
            if cache.layers.is_empty() {
                cache.layers = vec![None; self.layers.len()];
                cache.real = vec![Vec::new(); b];
            }
            if cache.real.len() != b {
                return Err(NnError::Input(format!("{b} rows continue a cache of {}", cache.real.len())));
            }
        }
        let device = ids.device();
        let past_real = cache.as_ref().map(|c| c.real.as_slice());
        // Each token's rotary position: the count of real tokens before it in its row.
        let mut positions = Vec::with_capacity(b * s);
        for r in 0..b {
            let mut next = past_real.map_or(past as u32, |p| p[r].iter().sum::<u32>());
            for i in 0..s {
                let real = mask.is_none_or(|m| m[r * s + i] != 0);
                positions.push(if real { next } else { 0 });
                next += u32::from(real);
            }
            // Padding has no position: a batch padded past the limit is fine if its real tokens fit.
            if next as usize > c.max_position_embeddings {
                return Err(NnError::Input(format!(
                    "{next} positions exceed max_position_embeddings {}",
                    c.max_position_embeddings
                )));
            }
        }
        let mut x = self.embed_ids(&ids.flatten_all()?)?; // [b*s, h]
        let attention = if cache.is_none() && self.fused(&x) {
            // Training and scoring passes: the fused causal attention with its own backward.
            Attention::Fused(CausalAttention {
                batch: b,
                seq: s,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                positions: Arc::new(positions),
                mask: Arc::new(mask.map_or_else(|| vec![1; b * s], <[u32]>::to_vec)),
                rope: self.ropes[0].host.clone(),
                scale: c.attention_scale(),
                window: None,
            })
        } else {
            let positions = Tensor::from_vec(positions, b * s, device)?;
            let d = c.head_dim;
            let tables = self
                .ropes
                .iter()
                .map(|r| {
                    let (cos, sin) = r.tensors()?;
                    let cos = cos.index_select(&positions, 0)?.reshape((b, 1, s, d))?;
                    Ok((cos, sin.index_select(&positions, 0)?.reshape((b, 1, s, d))?))
                })
                .collect::<Result<Vec<_>>>()?;
            // [b, 1, s, past + s] for full attention, and for the sliding window when the model has one.
            let full = attention_bias(b, s, past, mask, past_real, None, device)?;
            let window = c.sliding.as_ref().map(|w| w.window);
            let windowed = window.map(|w| attention_bias(b, s, past, mask, past_real, Some(w), device)).transpose()?;
            Attention::Composed { b, s, tables, full, windowed }
        };
        for (n, layer) in self.layers.iter().enumerate() {
            let slot = match cache.as_mut() {
                Some(c) => LayerCache::Tensors(&mut c.layers[n]),
                None => LayerCache::None,
            };
            x = self.layer_forward(layer, &x, &attention, slot, pass.as_ref())?;
        }
        if let Some(cache) = cache {
            cache.len += s;
            for (r, row) in cache.real.iter_mut().enumerate() {
                row.extend((0..s).map(|i| mask.map_or(1, |m| u32::from(m[r * s + i] != 0))));
            }
        }
        self.rms_norm(&x, &self.norm)
    }

    /// LoRA's settings for a pass over `rows` examples of `seq` tokens; `None` without LoRA.
    fn peft_pass<'a>(&self, run: Option<&LoraRun<'a>>, rows: usize, seq: usize) -> Result<Option<PeftPass<'a>>> {
        match (&self.lora, run) {
            (Some(lora), Some(run)) => {
                check_routes(run.routes, rows, lora.adapters.len())?;
                Ok(Some(PeftPass {
                    routes: run.routes,
                    seq,
                    scale: lora.spec.scale(),
                    dropout_p: lora.spec.dropout,
                    dropout: run.dropout,
                    mode: run.mode,
                    frozen: run.frozen,
                }))
            }
            (Some(_), None) => Err(NnError::Input("a decoder with LoRA needs its routes".into())),
            (None, _) => Ok(None),
        }
    }

    /// The input embeddings of the token ids `ids` (`[n]` → `[n, hidden]`; Gemma's scaled by `√hidden`).
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let x = match &self.embed {
            BaseWeight::Dense(e) => e.index_select(ids, 0)?,
            BaseWeight::Quantized(q) => {
                let rows = q.embedding(&ids.to_vec1::<u32>()?)?;
                Tensor::from_vec(rows, (ids.elem_count(), self.config.hidden_size), ids.device())?
            }
        };
        match self.config.family {
            Family::Llama => Ok(x),
            // transformers multiplies by √hidden rounded to the weights' type (f32 here).
            Family::Gemma3 => Ok(x.affine(f64::from((self.config.hidden_size as f32).sqrt()), 0.0)?),
        }
    }

    /// A cache for [`Llama::decode`]: `rows` rows of at most `capacity` positions.
    pub fn decode_cache(&self, rows: usize, capacity: usize) -> DecodeCache {
        let c = &self.config;
        DecodeCache::new(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, rows, capacity)
    }

    /// Batched decoding on the CPU that records nothing for backward: `ids` (`rows × s`, row-major; `mask` 1
    /// for real tokens) continue `cache`, and the final hidden state of each row's last new position comes
    /// back, `[rows, hidden]`. The same numbers as [`Llama::forward_with`] with a [`KvCache`], without its
    /// per-token copies of the cache; `run` routes rows through their LoRA adapters (used frozen).
    pub fn decode(
        &self,
        ids: &[u32],
        mask: &[u32],
        s: usize,
        cache: &mut DecodeCache,
        run: Option<&LoraRun>,
    ) -> Result<Tensor> {
        let rows = cache.rows();
        let c = &self.config;
        self.check_geometry("decode cache", cache.geometry())?;
        if s == 0 || ids.len() != rows * s || mask.len() != rows * s {
            return Err(NnError::Input(format!(
                "{} ids and {} mask values for {rows} rows of {s}",
                ids.len(),
                mask.len()
            )));
        }
        if cache.len() + s > cache.capacity().min(c.max_position_embeddings) {
            return Err(NnError::Input(format!(
                "{} positions exceed the cache's capacity {} or max_position_embeddings {}",
                cache.len() + s,
                cache.capacity(),
                c.max_position_embeddings
            )));
        }
        let device = Device::Cpu;
        // Decoding: the adapters' values only, no dropout.
        let frozen = run.map(|r| LoraRun { routes: r.routes, dropout: r.dropout, mode: Mode::Eval, frozen: true });
        let pass = self.peft_pass(frozen.as_ref(), rows, s)?;
        let positions = cache.positions(mask, s);
        let mut x = self.embed_ids(&Tensor::from_vec(ids.to_vec(), rows * s, &device)?)?;
        let attention = Attention::Host { rows, s, positions, mask: mask.to_vec() };
        for (n, layer) in self.layers.iter().enumerate() {
            // Detached: with trainable weights (full fine-tuning) a layer's ops would otherwise be recorded and
            // keep every layer's activations alive until the output is dropped.
            x = self
                .layer_forward(layer, &x, &attention, LayerCache::Host { cache, layer: n }, pass.as_ref())?
                .detach();
        }
        cache.advance(mask, s);
        let last: Vec<u32> = (0..rows).map(|r| (r * s + s - 1) as u32).collect();
        let x = x.index_select(&Tensor::from_vec(last, rows, &device)?, 0)?;
        self.rms_norm(&x, &self.norm)
    }

    /// That a cache made for (layers, heads, key/value heads, head size) `geometry` fits this model.
    fn check_geometry(&self, what: &str, geometry: (usize, usize, usize, usize)) -> Result<()> {
        let c = &self.config;
        let mine = (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if geometry != mine {
            return Err(NnError::Input(format!("a {what} of {geometry:?} for a model of {mine:?}")));
        }
        Ok(())
    }

    /// A pool of key/value blocks for [`Llama::step`]: `blocks` blocks of `block_size` positions.
    pub fn paged_cache(&self, block_size: usize, blocks: usize) -> PagedKv {
        let c = &self.config;
        PagedKv::new(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, block_size, blocks)
    }

    /// One step of iteration-level batching: each sequence of `seqs` brings `new` tokens (a prompt, a chunk of
    /// one, or one generated token), all in `tokens` one sequence after the other, at the positions after those
    /// its block table holds. Every sequence's table must already have room for them ([`PagedKv::reserve`]);
    /// the step caches their keys and values and advances each table. With LoRA, `adapters` names each
    /// sequence's adapter, so sequences of different tasks share the step. Returns the final-normed hidden
    /// state of each sequence's last new token, `[sequences, hidden]` (for [`Llama::logits`]). Records nothing
    /// for backward.
    pub fn step(
        &self,
        tokens: &[u32],
        seqs: &mut [(&mut BlockTable, usize)],
        kv: &mut PagedKv,
        adapters: Option<&[usize]>,
    ) -> Result<Tensor> {
        let c = &self.config;
        self.check_geometry("paged cache", kv.geometry())?;
        let total: usize = seqs.iter().map(|(_, new)| new).sum();
        if seqs.is_empty() || tokens.len() != total || seqs.iter().any(|(_, new)| *new == 0) {
            return Err(NnError::Input(format!(
                "{} tokens for {} sequences of {total} new tokens (each at least one)",
                tokens.len(),
                seqs.len()
            )));
        }
        for (table, new) in seqs.iter() {
            let end = table.len + new;
            if end > table.blocks.len() * kv.block_size() || end > c.max_position_embeddings {
                return Err(NnError::Input(format!(
                    "{end} positions exceed a sequence's {} blocks of {} or max_position_embeddings {}",
                    table.blocks.len(),
                    kv.block_size(),
                    c.max_position_embeddings
                )));
            }
        }
        // LoRA routes over the step's tokens: one per run of sequences with the same adapter.
        let mut routes: Vec<Route> = Vec::new();
        if let (Some(adapters), true) = (adapters, self.lora.is_some()) {
            if adapters.len() != seqs.len() {
                return Err(NnError::Input(format!("{} adapters for {} sequences", adapters.len(), seqs.len())));
            }
            let mut at = 0;
            for ((_, new), &adapter) in seqs.iter().zip(adapters) {
                match routes.last_mut() {
                    Some(r) if r.adapter == adapter => r.examples.end += new,
                    _ => routes.push(Route { adapter, examples: at..at + new }),
                }
                at += new;
            }
        }
        let off = DropoutRng::new(0.0, 0);
        let run = LoraRun { routes: &routes, dropout: &off, mode: Mode::Eval, frozen: true };
        let pass = self.peft_pass(adapters.map(|_| &run), total, 1)?;
        let device = Device::Cpu;
        let mut x = self.embed_ids(&Tensor::from_vec(tokens.to_vec(), total, &device)?)?;
        let spans: Vec<(Vec<u32>, usize, usize)> =
            seqs.iter().map(|(t, new)| (t.blocks.clone(), t.len, *new)).collect();
        let attention = Attention::Paged { spans };
        for (n, layer) in self.layers.iter().enumerate() {
            x = self
                .layer_forward(layer, &x, &attention, LayerCache::Paged { kv: &mut *kv, layer: n }, pass.as_ref())?
                .detach();
        }
        let mut last = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for (table, new) in seqs.iter_mut() {
            table.len += *new;
            at += *new;
            last.push((at - 1) as u32);
        }
        let x = x.index_select(&Tensor::from_vec(last, seqs.len(), &device)?, 0)?;
        self.rms_norm(&x, &self.norm)
    }

    /// Vocabulary logits of hidden states from [`Llama::forward`] (`[n, hidden]` → `[n, vocab]`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.project(hidden, self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// Each row's LM loss (`[n]`) for hidden states `[n, hidden]` and one target token per row: the
    /// negative log-probability of the target under the LM head. On the CPU the head and the loss are one op
    /// that never holds more than a block of rows' logits ([`crate::cpu::lm_loss`]).
    pub fn token_losses(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if self.fused(hidden) {
            return crate::cpu::lm_loss::token_losses(hidden, head, targets, self.lora.is_none());
        }
        let logp = log_softmax_last(&self.logits(hidden)?)?;
        let gold = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), hidden.device())?;
        Ok(logp.gather(&gold, 1)?.squeeze(1)?.neg()?)
    }

    /// `x · Wᵀ` of a pretrained weight: with LoRA the weights are frozen, and backward computes the input's
    /// gradient only (see [`crate::cpu::fused::frozen_project`]).
    fn project(&self, x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
        match (w, &self.lora) {
            (BaseWeight::Quantized(q), _) => crate::cpu::quant::quant_project(x, q),
            (BaseWeight::Dense(w), Some(_)) => crate::cpu::fused::frozen_project(x, w),
            (BaseWeight::Dense(w), None) => project(x, w),
        }
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        attention: &Attention,
        cache: LayerCache,
        pass: Option<&PeftPass>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // `x Wᵀ`, plus the LoRA update of `module` when it has one.
        let linear = |module: DecoderModule, x: &Tensor, w: &BaseWeight| -> Result<Tensor> {
            match (pass, l.lora.get(&module)) {
                (Some(pass), Some(lora)) if self.fused(x) => {
                    let (a, b, rank) = lora.stacked(pass.frozen)?;
                    let train = pass.mode == Mode::Train && pass.dropout_p > 0.0;
                    let routes = pass
                        .routes
                        .iter()
                        .map(|r| LoraRows {
                            rows: r.examples.start * pass.seq..r.examples.end * pass.seq,
                            adapter: r.adapter,
                            dropout_seed: train.then(|| pass.dropout.next_seed()),
                        })
                        .collect();
                    let op = LoraProjection {
                        weight: w.clone(),
                        routes,
                        rank,
                        scale: pass.scale as f32,
                        dropout: pass.dropout_p,
                    };
                    op.forward(x, &a, &b)
                }
                (Some(pass), Some(lora)) => Ok((self.project(x, w)? + lora.delta(x, pass)?)?),
                _ => self.project(x, w),
            }
        };
        let h = self.rms_norm(x, &l.input_norm)?;
        let mut q = linear(DecoderModule::QProj, &h, &l.q)?;
        let mut k = linear(DecoderModule::KProj, &h, &l.k)?;
        let v = linear(DecoderModule::VProj, &h, &l.v)?;
        if let Some((qn, kn)) = &l.qk_norms {
            // Each head's query and key, normalised over its `head_dim` values.
            let per_head = |t: &Tensor, w: &Tensor| -> Result<Tensor> {
                let (n, width) = t.dims2()?;
                self.rms_norm(&t.reshape((n * width / d, d))?, w)?.reshape((n, width)).map_err(Into::into)
            };
            (q, k) = (per_head(&q, qn)?, per_head(&k, kn)?);
        }
        let rope = &self.ropes[l.rope];
        let ctx = match attention {
            Attention::Fused(attention) => {
                let layer = CausalAttention { rope: rope.host.clone(), window: l.window, ..attention.clone() };
                layer.forward(&q, &k, &v)?
            }
            Attention::Host { rows, s, positions, mask } => {
                let LayerCache::Host { cache, layer } = cache else {
                    return Err(NnError::Input("host attention without its cache".into()));
                };
                let host = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
                let (q, k, v) = (host(q)?, host(k)?, host(v)?);
                let scale = c.attention_scale();
                let ctx = cache.attend(layer, &q, &k, &v, *s, positions, mask, &rope.host, scale, l.window);
                Tensor::from_vec(ctx, (rows * s, nh * d), x.device())?
            }
            Attention::Paged { spans } => {
                let LayerCache::Paged { kv, layer } = cache else {
                    return Err(NnError::Input("paged attention without its cache".into()));
                };
                let host = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
                let (q, k, v) = (host(q)?, host(k)?, host(v)?);
                let spans: Vec<Span> =
                    spans.iter().map(|(blocks, past, new)| Span { blocks, past: *past, new: *new }).collect();
                let ctx = kv.attend(layer, &q, &k, &v, &spans, &rope.host, c.attention_scale(), l.window);
                let tokens = spans.iter().map(|s| s.new).sum::<usize>();
                Tensor::from_vec(ctx, (tokens, nh * d), x.device())?
            }
            Attention::Composed { b, s, tables, full, windowed } => {
                let (b, s) = (*b, *s);
                let (cos, sin) = &tables[l.rope];
                // [b*s, n*d] → [b, n, s, d]
                let heads = |t: Tensor, n: usize| -> Result<Tensor> {
                    Ok(t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()?)
                };
                let q = rotate(&heads(q, nh)?, cos, sin)?;
                let mut k = rotate(&heads(k, kvh)?, cos, sin)?;
                let mut v = heads(v, kvh)?;
                if let LayerCache::Tensors(slot) = cache {
                    if let Some((pk, pv)) = slot.as_ref() {
                        k = Tensor::cat(&[pk, &k], 2)?;
                        v = Tensor::cat(&[pv, &v], 2)?;
                    }
                    // Detached: a cached key keeps no autograd history, or every decoding step's activations
                    // would stay alive through the cache (the weights are variables), growing memory with each
                    // token.
                    *slot = Some((k.detach(), v.detach()));
                }
                let t = k.dim(2)?;
                // Grouped-query attention: each key/value head serves nh / kvh query heads.
                let (k, v) = (repeat_kv(&k, nh / kvh, b, kvh, t, d)?, repeat_kv(&v, nh / kvh, b, kvh, t, d)?);
                let bias = match (l.window, windowed) {
                    (Some(_), Some(w)) => w,
                    _ => full,
                };
                let scores = (q.matmul(&k.t()?)? * f64::from(c.attention_scale()))?.broadcast_add(bias)?;
                let probs = softmax_last(&scores)?;
                probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * s, nh * d))?
            }
        };
        let mut attended = linear(DecoderModule::OProj, &ctx, &l.o)?;
        if let Some(norm) = &l.attn_out_norm {
            attended = self.rms_norm(&attended, norm)?;
        }
        let x = (x + attended)?;
        let h = self.rms_norm(&x, &l.ff_norm)?;
        let (gate, up) = (linear(DecoderModule::GateProj, &h, &l.gate)?, linear(DecoderModule::UpProj, &h, &l.up)?);
        let ff = match (self.fused(&gate), c.hidden_act) {
            (true, act) => crate::cpu::decoder::gated(&gate, &up, act)?,
            (false, Activation::Silu) => (gate.silu()? * up)?,
            (false, Activation::GeluTanh) => (gate.gelu()? * up)?,
        };
        let mut out = linear(DecoderModule::DownProj, &ff, &l.down)?;
        if let Some(norm) = &l.ff_out_norm {
            out = self.rms_norm(&out, norm)?;
        }
        Ok((x + out)?)
    }
}

/// How a pass attends: the fused CPU kernel, or composed ops over `b` rows of `s` new tokens with the rotation
/// tables of each token (`[b, 1, s, d]`) and the additive mask (`[b, 1, s, past + s]`), which generation's
/// cache needs.
enum Attention {
    Fused(CausalAttention),
    /// Batched decoding through a [`DecodeCache`]: `rows` rows of `s` new tokens at `positions`, `mask` 1 for
    /// the real ones.
    Host {
        rows: usize,
        s: usize,
        positions: Vec<u32>,
        mask: Vec<u32>,
    },
    /// A ragged step through a [`PagedKv`]: each sequence's blocks, cached positions and new tokens.
    Paged {
        spans: Vec<(Vec<u32>, usize, usize)>,
    },
    Composed {
        b: usize,
        s: usize,
        /// cos and sin of each token, per rotary table.
        tables: Vec<(Tensor, Tensor)>,
        /// The bias of full attention, and of the sliding window when the model has one.
        full: Tensor,
        windowed: Option<Tensor>,
    },
}

/// Where a layer keeps its keys and values: nowhere (training, scoring), tensors (generation through
/// [`KvCache`]) or a [`DecodeCache`] on the host.
enum LayerCache<'a> {
    None,
    Tensors(&'a mut Option<(Tensor, Tensor)>),
    Host { cache: &'a mut DecodeCache, layer: usize },
    Paged { kv: &'a mut PagedKv, layer: usize },
}

/// The rotation tables of transformers' rotary embedding over the model's positions ([`crate::layers::rotary_angles`]).
fn rotary_tables(c: &LlamaConfig, theta: f64, factors: Option<&[f64]>) -> RopeTables {
    let (cos, sin) = crate::layers::rotary_angles(theta, c.max_position_embeddings, c.head_dim, factors);
    RopeTables { cos, sin, head_dim: c.head_dim }
}

/// `x · cos + rotate_half(x) · sin` for `x` of `[b, n, s, d]`, tables `[s, d]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// `[b, kvh, t, d]` → `[b, kvh · groups, t, d]`, each key/value head repeated for its query heads.
fn repeat_kv(x: &Tensor, groups: usize, b: usize, kvh: usize, t: usize, d: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    Ok(x.unsqueeze(2)?.broadcast_as((b, kvh, groups, t, d))?.contiguous()?.reshape((b, kvh * groups, t, d))?)
}

/// The additive attention bias `[b, 1, s, past + s]`: 0 where query `i` (at index `past + i`) may see key
/// `j` (causal, a real token, and within `window` when there is one), a large negative number elsewhere.
fn attention_bias(
    b: usize,
    s: usize,
    past: usize,
    mask: Option<&[u32]>,
    past_real: Option<&[Vec<u32>]>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    const MASKED: f32 = -1e30;
    let t = past + s;
    let mut bias = vec![0f32; b * s * t];
    for r in 0..b {
        for i in 0..s {
            for j in 0..t {
                let causal = j <= past + i && window.is_none_or(|w| past + i - j < w);
                // The mask covers the new positions, the cache the earlier ones.
                let real = if j < past {
                    past_real.is_none_or(|p| p[r][j] != 0)
                } else {
                    mask.is_none_or(|m| m[r * s + (j - past)] != 0)
                };
                if !(causal && real) {
                    bias[(r * s + i) * t + j] = MASKED;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, s, t), device)?)
}

/// The positions that predict a labelled next token, and those tokens: for each `(out, r)` of `rows`, the
/// positions `out * s + j` where label `r * s + j + 1` is not `ignore` (labels row-major, `s` per row).
pub(crate) fn next_token_targets(
    labels: &[i64],
    rows: impl Iterator<Item = (usize, usize)>,
    s: usize,
    ignore: i64,
) -> (Vec<u32>, Vec<u32>) {
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (out, r) in rows {
        for j in 0..s.saturating_sub(1) {
            let next = labels[r * s + j + 1];
            if next != ignore {
                positions.push((out * s + j) as u32);
                targets.push(next as u32);
            }
        }
    }
    (positions, targets)
}

/// The causal LM loss: mean cross-entropy of predicting token `j + 1` from position `j`, over the positions
/// whose next label is not `ignore` (transformers' shift). `logits` is `[b * s, vocab]`, `labels` `b × s`.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64], b: usize, s: usize, ignore: i64) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if labels.len() != b * s || n != b * s {
        return Err(NnError::Input(format!("{} labels and {n} logit rows for a batch of {b} × {s}", labels.len())));
    }
    if let Some(bad) = labels.iter().find(|&&l| l != ignore && !(0..vocab as i64).contains(&l)) {
        return Err(NnError::Input(format!("label {bad} is outside the vocabulary of {vocab}")));
    }
    let (rows, targets) = next_token_targets(labels, (0..b).map(|r| (r, r)), s, ignore);
    if rows.is_empty() {
        return Err(NnError::Input("no labelled position to compute the LM loss on".into()));
    }
    let device = logits.device();
    let n = rows.len();
    let picked = logits.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let logp = log_softmax_last(&picked)?;
    let t = Tensor::from_vec(targets, (n, 1), device)?;
    Ok(logp.gather(&t, 1)?.mean_all()?.neg()?.to_dtype(DType::F32)?)
}
