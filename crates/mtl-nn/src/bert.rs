//! A BERT encoder for training and inference, mirroring Hugging Face `transformers`' `BertModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/bert/modeling_bert.py>)
//! with absolute position embeddings and post-LayerNorm blocks. Tensor names match `BertModel`'s state
//! dict, so a Hugging Face `model.safetensors` loads as is. The pooler is not part of the model: the
//! heads read the [CLS] state directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use mtl_core::{LinearModule, Mode};
use serde::{Deserialize, Serialize};

use crate::deberta::{self, Disentangled};
use crate::modernbert::{self, Modern};

use crate::attention::{self, AttentionSpec};
use crate::cpu::encoder::{
    Dims, FusedEncoder, FusedLora, GradSink, LayerDropout, LayerParams, PositionBias, Proj, SiteDropout,
};
use crate::cpu::fused::{embed_norm, Words};
use crate::cpu::int8::{Int8Encoder, Int8Layer, Int8Matrix};
pub use crate::layers::Activation;
use crate::layers::{DropoutRng, LayerNorm, Linear};
use crate::params::{Init, ParamBuilder};
use crate::peft::{
    self, BottleneckLayer, LoraLayer, LoraSpec, PeftKind, PeftPass, PeftSpec, Placement, PrefixLayer, Route, Site,
};
use crate::{NnError, Result};

/// The encoder families that are BERT with small differences, by `model_type`: RoBERTa and XLM-RoBERTa
/// (positions offset by `pad_token_id + 1`, one token type, BPE or SentencePiece tokenizers), ELECTRA's
/// discriminator (BERT's blocks; its embeddings as wide as the blocks), DistilBERT (BERT's blocks under other
/// names, no token types).
/// MPNet adds a relative position bias (T5's buckets) to every layer's attention scores, which the fused
/// encoder adds as well (and trains).
/// DeBERTa-v2/v3 (`deberta-v2`) replaces absolute positions by disentangled attention ([`crate::deberta`]), on the
/// composed path.
/// ModernBERT (`modernbert`) has pre-norm blocks with rotary positions, sliding-window layers and a GeGLU MLP
/// ([`crate::modernbert`]), on the composed path.
pub const ENCODER_FAMILIES: [&str; 9] =
    ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet", "deberta-v2", "modernbert"];

/// The parameter of MPNet's relative position bias.
pub(crate) const RELATIVE_BIAS: &str = "encoder.relative_attention_bias.weight";

/// The parameters every layer reads besides its own (MPNet's bias; DeBERTa's relative embeddings and their
/// LayerNorm): they train at the top layer's rate and stay when top layers are pruned.
/// ModernBERT's final LayerNorm is one of them too: the top layer's output goes through it.
pub(crate) const SHARED_RELATIVE: [&str; 6] = [
    RELATIVE_BIAS,
    "encoder.rel_embeddings.weight",
    "encoder.LayerNorm.weight",
    "encoder.LayerNorm.bias",
    "model.final_norm.weight",
    "model.final_norm.bias",
];

/// The fields of a Hugging Face BERT `config.json` that the encoder uses (a family of
/// [`ENCODER_FAMILIES`]); other keys are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// The family (`bert` where absent).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// RoBERTa's padding id, from which its positions count (`pad_token_id + 1` is the first).
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// ELECTRA: the width of the embeddings, projected to `hidden_size` before the first block
    /// (`embeddings_project`; electra-small's 128 for 256); `hidden_size` when absent.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    /// MPNet: the buckets of its relative position bias (none for the other families).
    #[serde(default)]
    pub relative_attention_num_buckets: Option<usize>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// DeBERTa-v2's disentangled attention (None for the other families).
    #[serde(skip)]
    pub disentangled: Option<Disentangled>,
    /// ModernBERT's blocks (None for the other families).
    #[serde(skip)]
    pub modern: Option<Modern>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io { path: path.to_owned(), source })?;
        let invalid = |message: String| NnError::File { path: path.to_owned(), message };
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not a JSON config: {e}")))?;
        let model_type = value["model_type"].as_str().unwrap_or("bert").to_string();
        if !ENCODER_FAMILIES.contains(&model_type.as_str()) {
            return Err(invalid(format!(
                "model_type {model_type:?} is not an encoder this backbone loads; supported: {}",
                ENCODER_FAMILIES.join(", ")
            )));
        }
        if model_type == "distilbert" {
            value = distilbert_as_bert(value).map_err(invalid)?;
        }
        if model_type == "mpnet" {
            // No token types; the bias's buckets are always there (32 unless the config says).
            let o = value.as_object_mut().ok_or_else(|| invalid("a config is a JSON object".into()))?;
            o.insert("type_vocab_size".into(), 0.into());
            o.entry("relative_attention_num_buckets").or_insert(32.into());
        } else if let Some(o) = value.as_object_mut() {
            o.remove("relative_attention_num_buckets");
        }
        let disentangled = match model_type.as_str() {
            "deberta-v2" => {
                let settings = Disentangled::from_config(&value).map_err(invalid)?;
                let o = value.as_object_mut().ok_or_else(|| invalid("a config is a JSON object".into()))?;
                // DebertaV2Config's defaults where BERT's differ.
                o.entry("type_vocab_size").or_insert(0.into());
                o.entry("layer_norm_eps").or_insert(1e-7.into());
                o.entry("max_position_embeddings").or_insert(512.into());
                Some(settings)
            }
            _ => None,
        };
        let modern = match model_type.as_str() {
            "modernbert" => Some(Modern::from_config(&mut value).map_err(invalid)?),
            _ => None,
        };
        if model_type != "electra" {
            // Only ELECTRA's embeddings may be narrower than its blocks (DeBERTa's refuses it above).
            if let Some(o) = value.as_object_mut() {
                o.remove("embedding_size");
            }
        }
        let mut config: Self =
            serde_json::from_value(value).map_err(|e| invalid(format!("not a {model_type} config: {e}")))?;
        config.disentangled = disentangled;
        config.modern = modern;
        if let Some(kind) = &config.position_embedding_type {
            if kind != "absolute" {
                return Err(NnError::File {
                    path: path.to_owned(),
                    message: format!("position_embedding_type {kind:?} is not supported; only \"absolute\" is"),
                });
            }
        }
        if config.max_position_embeddings <= config.position_offset() {
            return Err(invalid("max_position_embeddings leaves no position after the padding offset".into()));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(NnError::File {
                path: path.to_owned(),
                message: "hidden_size must be a multiple of num_attention_heads".into(),
            });
        }
        Ok(config)
    }

    /// The first position's row in the position table: RoBERTa's families count from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.model_type.as_str() {
            "roberta" | "xlm-roberta" | "camembert" | "mpnet" => self.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        }
    }

    /// The width of the embeddings (ELECTRA's may be narrower than the blocks).
    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// The longest input, in tokens.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }
}

/// MPNet's relative position bias for `s` positions, `[heads, s, s]`: each (query, key) pair's bucket
/// ([`relative_buckets`]) looks up its row of `bias` (`[buckets, heads]`).
fn relative_position_bias(bias: &Tensor, s: usize) -> Result<Tensor> {
    let (buckets, heads) = bias.dims2()?;
    let ids = Tensor::from_vec(relative_buckets(buckets, s), s * s, bias.device())?;
    Ok(bias.index_select(&ids, 0)?.reshape((s, s, heads))?.permute((2, 0, 1))?.contiguous()?)
}

/// The bucket of each (query, key) pair of `s` positions, row by row: that of `key - query` among `buckets`
/// (T5's bidirectional buckets: exact below a quarter of the buckets, logarithmic up to 128 positions).
fn relative_buckets(buckets: usize, s: usize) -> Vec<u32> {
    let half = buckets / 2;
    let exact = half / 2;
    let max_distance = 128f64;
    let bucket = |relative: i64| -> u32 {
        let n = -relative;
        let mut ret = if n < 0 { half } else { 0 };
        let n = n.unsigned_abs() as usize;
        ret += if n < exact {
            n
        } else {
            let large = exact as f64
                + ((n as f64 / exact as f64).ln() / (max_distance / exact as f64).ln() * (half - exact) as f64) as i64
                    as f64;
            (large as usize).min(half - 1)
        };
        ret as u32
    };
    (0..s).flat_map(|q| (0..s).map(move |k| bucket(k as i64 - q as i64))).collect()
}

/// A DistilBERT `config.json` in BERT's fields: `dim`, `n_layers`, `n_heads`, `hidden_dim`, `activation`;
/// no token types.
fn distilbert_as_bert(mut v: serde_json::Value) -> std::result::Result<serde_json::Value, String> {
    if v["sinusoidal_pos_embds"].as_bool() == Some(true) {
        return Err("DistilBERT with sinusoidal position embeddings is not supported (learned ones are)".into());
    }
    let o = v.as_object_mut().ok_or("a config is a JSON object")?;
    for (from, to) in [
        ("dim", "hidden_size"),
        ("n_layers", "num_hidden_layers"),
        ("n_heads", "num_attention_heads"),
        ("hidden_dim", "intermediate_size"),
        ("activation", "hidden_act"),
    ] {
        let value = o.remove(from).ok_or(format!("DistilBERT config without `{from}`"))?;
        // A run's config.json holds its own depth beside DistilBERT's (`mtl prune` writes it).
        o.entry(to).or_insert(value);
    }
    o.insert("type_vocab_size".into(), 0.into());
    o.entry("layer_norm_eps").or_insert(1e-12.into());
    Ok(v)
}

#[derive(Clone, Debug)]
struct Embeddings {
    word: Tensor,
    /// None for DeBERTa-v3 (relative positions only).
    position: Option<Tensor>,
    /// None for a family without token types (DistilBERT).
    token_type: Option<Tensor>,
    norm: LayerNorm,
    /// ELECTRA's projection of narrower embeddings to the blocks' width.
    project: Option<Linear>,
}

#[derive(Clone, Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    /// LoRA beside some of the linear layers.
    lora: BTreeMap<LinearModule, LoraLayer>,
    /// Bottleneck adapters on the sublayers' outputs.
    bottleneck: BTreeMap<Site, BottleneckLayer>,
    /// Prefix tuning's keys and values.
    prefix: Option<PrefixLayer>,
}

impl Layer {
    /// The same layer with every parameter, adapters' too, a constant for autograd: an evaluation pass records
    /// no graph, so each activation is freed once the next is computed.
    fn for_eval(&self) -> Self {
        Self {
            lora: self.lora.iter().map(|(m, l)| (*m, l.detached())).collect(),
            bottleneck: self.bottleneck.iter().map(|(s, b)| (*s, b.detached())).collect(),
            prefix: self.prefix.as_ref().map(PrefixLayer::detached),
            ..self.detached()
        }
    }

    /// The same layer whose pretrained parameters are constants for autograd (a frozen base).
    fn detached(&self) -> Self {
        let lin = |l: &Linear| Linear { weight: l.weight.detach(), bias: l.bias.detach() };
        let norm = |n: &LayerNorm| LayerNorm { weight: n.weight.detach(), bias: n.bias.detach(), eps: n.eps };
        Self {
            query: lin(&self.query),
            key: lin(&self.key),
            value: lin(&self.value),
            attn_out: lin(&self.attn_out),
            attn_norm: norm(&self.attn_norm),
            intermediate: lin(&self.intermediate),
            output: lin(&self.output),
            out_norm: norm(&self.out_norm),
            lora: self.lora.clone(),
            bottleneck: self.bottleneck.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

/// A linear layer whose weight may be int8: then the int8 matrix goes to `int8` and the layer keeps only its
/// bias, with a 0-element weight (every f32 path that would read it refuses int8 models first).
fn linear_or_int8(pb: &ParamBuilder, inp: usize, out: usize, int8: &mut Vec<Int8Matrix>) -> Result<Linear> {
    match pb.take_int8("weight", out, inp)? {
        Some(m) => {
            int8.push(m);
            Ok(Linear {
                weight: Tensor::zeros(0, candle_core::DType::F32, &pb.device())?,
                bias: pb.get(out, "bias", Init::Zeros)?,
            })
        }
        None => Linear::new(pb, inp, out),
    }
}

/// The int8 layer of `l` with projections `q` (query, key, value, attention output, intermediate, output).
fn int8_layer(l: &Layer, q: Vec<Int8Matrix>) -> Result<Int8Layer> {
    let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let [qw, kw, vw, ow, iw, fw]: [Int8Matrix; 6] =
        q.try_into().map_err(|_| NnError::Input("an int8 layer has six projections".into()))?;
    let qkv_bias = [v(&l.query.bias)?, v(&l.key.bias)?, v(&l.value.bias)?].concat();
    let layer = Int8Layer::new(
        [Int8Matrix::stack(&[&qw, &kw, &vw]), ow, iw, fw],
        [qkv_bias, v(&l.attn_out.bias)?, v(&l.intermediate.bias)?, v(&l.output.bias)?],
        [v(&l.attn_norm.weight)?, v(&l.attn_norm.bias)?, v(&l.out_norm.weight)?, v(&l.out_norm.bias)?],
    );
    layer.map_err(|e| NnError::File { path: "int8 weights".into(), message: e })
}

/// Linear layers of the same input side by side; under parameter-efficient tuning the backbone's own weights
/// are frozen, and backward skips their gradients.
fn base_linear(peft: Option<&PeftPass>, layers: &[&Linear], x: &Tensor) -> Result<Tensor> {
    match peft {
        Some(_) => crate::layers::frozen_linear(x, layers),
        None if layers.len() == 1 => layers[0].forward(x),
        None => Linear::stacked(layers)?.forward(x),
    }
}

/// `y` plus the LoRA update of layer `l`'s `module` on its input `x`, when it has one.
fn with_lora(l: &Layer, peft: Option<&PeftPass>, module: LinearModule, x: &Tensor, y: Tensor) -> Result<Tensor> {
    match (peft, l.lora.get(&module)) {
        (Some(pass), Some(adapter)) => Ok((y + adapter.delta(x, pass)?)?),
        _ => Ok(y),
    }
}

/// ModernBERT's module of a linear layer, under a block (the query, key and value are one packed `Wqkv`).
fn modern_module(module: LinearModule) -> &'static str {
    match module {
        LinearModule::Query | LinearModule::Key | LinearModule::Value => "attn.Wqkv",
        LinearModule::AttentionOutput => "attn.Wo",
        LinearModule::Intermediate => "mlp.Wi",
        LinearModule::Output => "mlp.Wo",
    }
}

/// Which implementation runs the transformer layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// On the CPU, the whole layer stack as one fused op with a hand-written backward pass
    /// ([`crate::cpu::encoder`]); elsewhere, as [`Kernels::Composed`].
    #[default]
    Fused,
    /// One candle op per step, differentiated by candle's autograd (per-op fused kernels on the CPU,
    /// composed candle ops elsewhere): the reference the fused encoder is tested against.
    Composed,
}

/// The number format of the fused encoder's projections (the four matrix products of every layer, forward and
/// backward). Parameters, optimizer state, attention, norms and activations stay f32 in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// Operands rounded to bf16, products summed in f32, on Intel AMX; where the CPU (or the OS) has no AMX,
    /// the products stay f32 ([`Precision::effective`]).
    Bf16,
}

impl Precision {
    /// What this machine runs when `self` is asked for.
    pub fn effective(self) -> Precision {
        match self {
            Precision::Bf16 if crate::cpu::amx::available() => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// The encoder: embeddings and `num_hidden_layers` transformer blocks.
#[derive(Clone, Debug)]
pub struct Bert {
    config: BertConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    kernels: Kernels,
    precision: Precision,
    /// Layer-parameter gradients from the fused encoder's backward passes, not yet collected.
    grads: GradSink,
    /// Whether forward passes from now on keep what backward needs through several backward passes.
    retain_graph: Arc<std::sync::atomic::AtomicBool>,
    /// The parameter-efficient method, when the model has one; its pretrained parameters are then frozen.
    peft: Option<PeftSpec>,
    /// The adapter whose update is merged into the base weights, if one is.
    merged: Option<usize>,
    /// An int8 model's layers (inference only); its `Linear`s then hold no f32 projection weights (0-element
    /// tensors), and `forward`, export and quantisation check this field before any f32 path.
    int8: Option<Arc<Vec<Int8Layer>>>,
    /// MPNet's relative position bias, `[buckets, heads]`, shared by every layer.
    relative_bias: Option<Tensor>,
    /// DeBERTa's relative position embeddings, `[2 · span, hidden]`, and their LayerNorm.
    relative_table: Option<(Tensor, Option<LayerNorm>)>,
    /// ModernBERT's LayerNorm after the last layer.
    final_norm: Option<LayerNorm>,
}

/// DeBERTa's relative positions for one forward pass: the rows of the table the batch's pairs use (normalised)
/// and each pair's row.
struct RelativePass<'a> {
    settings: &'a Disentangled,
    index: Vec<u32>,
    table: Tensor,
}

/// A batch: token ids and token types as `[batch, seq]` tensors; the attention mask (1 real, 0 padding) stays
/// on the host, row-major `batch × seq`, since the attention kernel reads it there.
#[derive(Clone, Debug)]
pub struct BertInput {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Arc<Vec<u32>>,
    /// Which adapter each example goes through; `None`: all through the only one.
    pub routes: Option<Vec<Route>>,
}

impl Bert {
    /// The encoder under `pb`, with a parameter-efficient method when `peft` is given (and then its pretrained
    /// parameters frozen).
    pub fn new(pb: &ParamBuilder, config: &BertConfig, peft: Option<&PeftSpec>) -> Result<Self> {
        if let Some(modern) = &config.modern {
            return Self::new_modern(pb, config, modern, peft);
        }
        let h = config.hidden_size;
        if pb.has_int8() && peft.is_some() {
            return Err(NnError::File {
                path: "int8 weights".into(),
                message: "an int8 model cannot carry adapters".into(),
            });
        }
        if pb.has_int8() && config.hidden_act != Activation::Gelu {
            return Err(NnError::File {
                path: "int8 weights".into(),
                message: "the int8 encoder implements the erf GELU only".into(),
            });
        }
        let mut int8: Vec<Vec<Int8Matrix>> = Vec::new();
        let eps = config.layer_norm_eps;
        let e = pb.pp("embeddings");
        let width = config.embedding_width();
        let embeddings = Embeddings {
            word: e.pp("word_embeddings").get((config.vocab_size, width), "weight", Init::Normal { std: 0.02 })?,
            position: match config.disentangled.as_ref().is_none_or(|d| d.absolute_positions) {
                true => Some(e.pp("position_embeddings").get(
                    (config.max_position_embeddings, width),
                    "weight",
                    Init::Normal { std: 0.02 },
                )?),
                false => None,
            },
            token_type: match config.type_vocab_size {
                0 => None,
                n => Some(e.pp("token_type_embeddings").get((n, width), "weight", Init::Normal { std: 0.02 })?),
            },
            norm: LayerNorm::new(&e.pp("LayerNorm"), width, eps)?,
            project: match width == h {
                true => None,
                false => Some(Linear::new(&pb.pp("embeddings_project"), width, h)?),
            },
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = pb.pp(&format!("encoder.layer.{i}")).with_role(mtl_core::ParamRole::Layer(i));
                let a = l.pp("attention");
                let mut adapted = BTreeMap::new();
                let mut bottleneck = BTreeMap::new();
                let mut prefix = None;
                match peft.map(|p| (&p.kind, &p.adapters)) {
                    Some((PeftKind::Lora(spec), adapters)) => {
                        for &m in &spec.targets {
                            let (inp, out) = match m {
                                LinearModule::Intermediate => (h, config.intermediate_size),
                                LinearModule::Output => (config.intermediate_size, h),
                                _ => (h, h),
                            };
                            adapted.insert(m, LoraLayer::new(&l.pp(m.bert_path()), spec, adapters, inp, out)?);
                        }
                    }
                    Some((PeftKind::Bottleneck { size, placement }, adapters)) => {
                        let sites: &[Site] = match placement {
                            Placement::Houlsby => &[Site::Attention, Site::FeedForward],
                            Placement::Pfeiffer => &[Site::FeedForward],
                        };
                        for &site in sites {
                            bottleneck.insert(site, BottleneckLayer::new(&l.pp(site.path()), adapters, h, *size)?);
                        }
                    }
                    Some((PeftKind::Prefix { length }, adapters)) => {
                        prefix = Some(PrefixLayer::new(&a.pp("self"), adapters, *length, h)?);
                    }
                    None => {}
                }
                let mut q = Vec::new();
                let layer = Layer {
                    query: linear_or_int8(&a.pp("self.query"), h, h, &mut q)?,
                    key: linear_or_int8(&a.pp("self.key"), h, h, &mut q)?,
                    value: linear_or_int8(&a.pp("self.value"), h, h, &mut q)?,
                    attn_out: linear_or_int8(&a.pp("output.dense"), h, h, &mut q)?,
                    attn_norm: LayerNorm::new(&a.pp("output.LayerNorm"), h, eps)?,
                    intermediate: linear_or_int8(&l.pp("intermediate.dense"), h, config.intermediate_size, &mut q)?,
                    output: linear_or_int8(&l.pp("output.dense"), config.intermediate_size, h, &mut q)?,
                    out_norm: LayerNorm::new(&l.pp("output.LayerNorm"), h, eps)?,
                    lora: adapted,
                    bottleneck,
                    prefix,
                };
                int8.push(q);
                Ok(layer)
            })
            .collect::<Result<Vec<Layer>>>()?;
        let int8 = match int8.iter().map(Vec::len).max() {
            Some(6) if int8.iter().all(|q| q.len() == 6) => {
                Some(Arc::new(layers.iter().zip(int8).map(|(l, q)| int8_layer(l, q)).collect::<Result<Vec<_>>>()?))
            }
            None | Some(0) => None,
            Some(_) => {
                let message = "int8 weights for some projections and f32 ones for others: an int8 model has all six of every layer in int8";
                return Err(NnError::File { path: "int8 weights".into(), message: message.into() });
            }
        };
        let unused = pb.unused_int8();
        if !unused.is_empty() {
            return Err(NnError::File {
                path: "int8 weights".into(),
                message: format!("int8 tensors the model has no place for: {}", unused.join(", ")),
            });
        }
        let (embeddings, layers) = match peft {
            // As in PEFT: with any of the methods, only its parameters (and the heads) train.
            Some(_) => {
                let e = &embeddings;
                let norm = LayerNorm { weight: e.norm.weight.detach(), bias: e.norm.bias.detach(), eps: e.norm.eps };
                let frozen = Embeddings {
                    word: e.word.detach(),
                    position: e.position.as_ref().map(Tensor::detach),
                    token_type: e.token_type.as_ref().map(Tensor::detach),
                    norm,
                    project: e.project.as_ref().map(|l| Linear { weight: l.weight.detach(), bias: l.bias.detach() }),
                };
                (frozen, layers.iter().map(Layer::detached).collect())
            }
            None => (embeddings, layers),
        };
        let relative_bias = match config.relative_attention_num_buckets {
            Some(buckets) => {
                // Every layer reads it: it learns at the top layer's rate and thaws with the first layer.
                let top = mtl_core::ParamRole::Layer(config.num_hidden_layers.saturating_sub(1));
                let bias = pb.pp("encoder").pp("relative_attention_bias").with_role(top).get(
                    (buckets, config.num_attention_heads),
                    "weight",
                    Init::Normal { std: 0.02 },
                )?;
                Some(if peft.is_some() { bias.detach() } else { bias })
            }
            None => None,
        };
        let relative_table = match &config.disentangled {
            Some(d) => {
                let top = mtl_core::ParamRole::Layer(config.num_hidden_layers.saturating_sub(1));
                let enc = pb.pp("encoder").with_role(top);
                let table = enc.pp("rel_embeddings").get((2 * d.span, h), "weight", Init::Normal { std: 0.02 })?;
                let norm = match d.norm {
                    true => Some(LayerNorm::new(&enc.pp("LayerNorm"), h, eps)?),
                    false => None,
                };
                Some(match peft {
                    Some(_) => (
                        table.detach(),
                        norm.map(|n| LayerNorm { weight: n.weight.detach(), bias: n.bias.detach(), eps: n.eps }),
                    ),
                    None => (table, norm),
                })
            }
            None => None,
        };
        if relative_table.is_some() && peft.is_some_and(|p| matches!(p.kind, PeftKind::Prefix { .. })) {
            return Err(NnError::Unsupported(
                "prefix tuning on DeBERTa (its disentangled attention) is not supported; LoRA and adapters are".into(),
            ));
        }
        if relative_table.is_some() && int8.is_some() {
            return Err(NnError::Unsupported("an int8 encoder has no disentangled attention (DeBERTa)".into()));
        }
        if relative_bias.is_some() && peft.is_some_and(|p| matches!(p.kind, PeftKind::Prefix { .. })) {
            return Err(NnError::Unsupported(
                "prefix tuning on MPNet (its relative position bias) is not supported; LoRA and adapters are".into(),
            ));
        }
        Ok(Self { int8, relative_bias, relative_table, ..Self::assemble(config, embeddings, layers, peft) })
    }

    /// An encoder of these parts, unmerged, on the default kernels, without int8 layers, relative positions or a
    /// final norm.
    fn assemble(config: &BertConfig, embeddings: Embeddings, layers: Vec<Layer>, peft: Option<&PeftSpec>) -> Self {
        Self {
            config: config.clone(),
            embeddings,
            layers,
            kernels: Kernels::default(),
            precision: Precision::default(),
            grads: Arc::new(Mutex::new(Vec::new())),
            retain_graph: Arc::new(false.into()),
            peft: peft.cloned(),
            merged: None,
            int8: None,
            relative_bias: None,
            relative_table: None,
            final_norm: None,
        }
    }

    /// A ModernBERT encoder ([`crate::modernbert`]) under `pb`, in BERT's structures: `query`, `key` and `value`
    /// are the rows of the packed `attn.Wqkv`, `attn_norm` and `out_norm` the norms before the attention and
    /// the MLP (the first layer's `attn_norm` unused), `intermediate` the GeGLU's `mlp.Wi` (both halves),
    /// `output` its `mlp.Wo`. Biases the config leaves out are constant zeros, not parameters.
    fn new_modern(pb: &ParamBuilder, config: &BertConfig, m: &Modern, peft: Option<&PeftSpec>) -> Result<Self> {
        // Under its task models' names (`model.layers.0.attn.Wqkv.weight`).
        let pb = &pb.pp("model");
        let lora = match peft.map(|p| (&p.kind, &p.adapters)) {
            None => None,
            Some((PeftKind::Lora(spec), adapters)) => Some((spec, adapters)),
            Some(_) => {
                return Err(NnError::Unsupported(
                    "bottleneck adapters and prefix tuning of ModernBERT are not supported yet; LoRA is".into(),
                ))
            }
        };
        let (h, inter, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        let device = pb.device();
        let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &device);
        let norm = |pb: &ParamBuilder| -> Result<LayerNorm> {
            let weight = pb.get(h, "weight", Init::Ones)?;
            let bias = if m.norm_bias { pb.get(h, "bias", Init::Zeros)? } else { zeros(h)? };
            Ok(LayerNorm { weight, bias, eps })
        };
        let linear = |pb: &ParamBuilder, inp: usize, out: usize, bias: bool| -> Result<Linear> {
            let weight = pb.get((out, inp), "weight", Init::Normal { std: 0.02 })?;
            let bias = if bias { pb.get(out, "bias", Init::Zeros)? } else { zeros(out)? };
            Ok(Linear { weight, bias })
        };
        let e = pb.pp("embeddings");
        let embeddings = Embeddings {
            word: e.pp("tok_embeddings").get((config.vocab_size, h), "weight", Init::Normal { std: 0.02 })?,
            position: None,
            token_type: None,
            norm: norm(&e.pp("norm"))?,
            project: None,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = pb.pp(&format!("layers.{i}")).with_role(mtl_core::ParamRole::Layer(i));
                let qkv = linear(&l.pp("attn.Wqkv"), h, 3 * h, m.attention_bias)?;
                let mut adapted = BTreeMap::new();
                if let Some((spec, adapters)) = lora {
                    for &target in &spec.targets {
                        // The query, key and value are one packed `Wqkv`: naming any of them adapts it (PEFT's
                        // default for ModernBERT); its LoRA sits under the query's key.
                        let (target, inp, out) = match target {
                            LinearModule::Query | LinearModule::Key | LinearModule::Value => {
                                if adapted.contains_key(&LinearModule::Query) {
                                    continue;
                                }
                                (LinearModule::Query, h, 3 * h)
                            }
                            LinearModule::AttentionOutput => (target, h, h),
                            LinearModule::Intermediate => (target, h, 2 * inter),
                            LinearModule::Output => (target, inter, h),
                        };
                        let module = l.pp(modern_module(target));
                        adapted.insert(target, LoraLayer::new(&module, spec, adapters, inp, out)?);
                    }
                }
                let rows = |k: usize| -> Result<Linear> {
                    Ok(Linear { weight: qkv.weight.narrow(0, k * h, h)?, bias: qkv.bias.narrow(0, k * h, h)? })
                };
                Ok(Layer {
                    query: rows(0)?,
                    key: rows(1)?,
                    value: rows(2)?,
                    attn_out: linear(&l.pp("attn.Wo"), h, h, m.attention_bias)?,
                    attn_norm: match i {
                        0 => LayerNorm {
                            weight: Tensor::ones(h, candle_core::DType::F32, &device)?,
                            bias: zeros(h)?,
                            eps,
                        },
                        _ => norm(&l.pp("attn_norm"))?,
                    },
                    intermediate: linear(&l.pp("mlp.Wi"), h, 2 * inter, m.mlp_bias)?,
                    output: linear(&l.pp("mlp.Wo"), inter, h, m.mlp_bias)?,
                    out_norm: norm(&l.pp("mlp_norm"))?,
                    lora: adapted,
                    bottleneck: BTreeMap::new(),
                    prefix: None,
                })
            })
            .collect::<Result<Vec<Layer>>>()?;
        let top = mtl_core::ParamRole::Layer(config.num_hidden_layers.saturating_sub(1));
        let final_norm = norm(&pb.pp("final_norm").with_role(top))?;
        let frozen_norm = |n: &LayerNorm| LayerNorm { weight: n.weight.detach(), bias: n.bias.detach(), eps: n.eps };
        let (embeddings, layers, final_norm) = match lora {
            // As in PEFT: only the adapters (and the heads) train.
            Some(_) => (
                Embeddings { word: embeddings.word.detach(), norm: frozen_norm(&embeddings.norm), ..embeddings },
                layers.iter().map(Layer::detached).collect(),
                frozen_norm(&final_norm),
            ),
            None => (embeddings, layers, final_norm),
        };
        Ok(Self { final_norm: Some(final_norm), ..Self::assemble(config, embeddings, layers, peft) })
    }

    /// The int8 layers, when the model is an int8 one.
    pub fn int8_layers(&self) -> Option<&[Int8Layer]> {
        self.int8.as_deref().map(Vec::as_slice)
    }

    /// Quantises every encoder projection to int8 (one scale per output channel), for inference; how the
    /// products then run: [`crate::cpu::int8::Int8Compute`].
    /// A merged LoRA adapter stays in the weights and the adapters go. Returns the names of the f32 weights
    /// the model no longer uses.
    pub(crate) fn quantize_int8(&mut self) -> Result<Vec<String>> {
        if self.int8.is_some() {
            return Err(NnError::Unsupported("the model is int8 already".into()));
        }
        if self.peft.as_ref().is_some_and(|p| p.per_task()) || (self.peft.is_some() && self.merged.is_none()) {
            return Err(NnError::Unsupported("int8 needs one set of encoder weights: merge the LoRA adapter first (adapters, prefixes and per-task LoRA cannot be quantised)".into()));
        }
        if self.relative_table.is_some() {
            return Err(NnError::Unsupported("the int8 encoder has no disentangled attention (DeBERTa)".into()));
        }
        if self.config.modern.is_some() {
            return Err(NnError::Unsupported("the int8 encoder has no ModernBERT blocks".into()));
        }
        if self.config.hidden_act != Activation::Gelu {
            return Err(NnError::Unsupported(format!(
                "the int8 encoder implements the erf GELU only, not {:?}",
                self.config.hidden_act
            )));
        }
        let mut dropped = Vec::new();
        let mut int8 = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let mut q = Vec::new();
            for (module, linear) in [
                (LinearModule::Query, &mut layer.query),
                (LinearModule::Key, &mut layer.key),
                (LinearModule::Value, &mut layer.value),
                (LinearModule::AttentionOutput, &mut layer.attn_out),
                (LinearModule::Intermediate, &mut layer.intermediate),
                (LinearModule::Output, &mut layer.output),
            ] {
                let (rows, cols) = linear.weight.dims2()?;
                q.push(Int8Matrix::quantize(&linear.weight.flatten_all()?.to_vec1::<f32>()?, rows, cols));
                linear.weight = Tensor::zeros(0, candle_core::DType::F32, linear.weight.device())?;
                dropped.push(format!("encoder.layer.{i}.{}.weight", module.bert_path()));
            }
            layer.lora.clear();
            int8.push(int8_layer(layer, q)?);
        }
        self.int8 = Some(Arc::new(int8));
        self.peft = None;
        self.merged = None;
        Ok(dropped)
    }

    /// Makes a merged shared LoRA adapter part of the model: the adapters go, the merged weights stay.
    pub(crate) fn fold_merged(&mut self) -> Result<()> {
        if self.peft.as_ref().is_some_and(|p| p.per_task()) || (self.peft.is_some() && self.merged.is_none()) {
            return Err(NnError::Unsupported("only a merged shared LoRA adapter folds into the weights".into()));
        }
        for layer in &mut self.layers {
            layer.lora.clear();
        }
        self.peft = None;
        self.merged = None;
        Ok(())
    }

    /// The int8 weights under their checkpoint names (q, k and v apart), for saving.
    pub fn int8_weights(&self) -> Vec<(String, Int8Matrix)> {
        let Some(layers) = &self.int8 else { return Vec::new() };
        let h = self.config.hidden_size;
        let mut out = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let qkv = l.projection(Proj::Qkv);
            let parts = [
                (LinearModule::Query, qkv.slice_rows(0, h)),
                (LinearModule::Key, qkv.slice_rows(h, 2 * h)),
                (LinearModule::Value, qkv.slice_rows(2 * h, 3 * h)),
                (LinearModule::AttentionOutput, l.projection(Proj::AttentionOutput).clone()),
                (LinearModule::Intermediate, l.projection(Proj::Intermediate).clone()),
                (LinearModule::Output, l.projection(Proj::Output).clone()),
            ];
            out.extend(parts.into_iter().map(|(m, q)| (format!("encoder.layer.{i}.{}.weight", m.bert_path()), q)));
        }
        out
    }

    /// Drops the top `n` layers (model cutting: the heads then read layer `L - n`); their parameters are those
    /// whose role's layer is `L - n` or above.
    pub(crate) fn drop_top_layers(&mut self, n: usize) -> Result<()> {
        let total = self.layers.len();
        if n >= total {
            return Err(NnError::Unsupported(format!(
                "cannot drop {n} of the model's {total} layers: at least one must stay"
            )));
        }
        self.layers.truncate(total - n);
        if let Some(int8) = &mut self.int8 {
            Arc::make_mut(int8).truncate(total - n);
        }
        self.config.num_hidden_layers = total - n;
        Ok(())
    }

    pub fn peft(&self) -> Option<&PeftSpec> {
        self.peft.as_ref()
    }

    /// The adapter merged into the base weights, if one is.
    pub fn merged(&self) -> Option<usize> {
        self.merged
    }

    /// For each adapted linear layer: the name of its base weight and `scale · B A` of `adapter`.
    pub(crate) fn lora_deltas(&self, adapter: usize) -> Result<Vec<(String, Tensor)>> {
        let Some(spec) = self.peft.as_ref().and_then(PeftSpec::lora) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (m, lora) in &layer.lora {
                out.push((self.weight_name(i, *m), lora.merged_delta(adapter, spec.scale())?));
            }
        }
        Ok(out)
    }

    /// The checkpoint name of layer `layer`'s weight of `module` (ModernBERT's query, key and value are rows of
    /// one `Wqkv`).
    pub fn weight_name(&self, layer: usize, module: LinearModule) -> String {
        match self.config.modern {
            Some(_) => format!("model.layers.{layer}.{}.weight", modern_module(module)),
            None => format!("encoder.layer.{layer}.{}.weight", module.bert_path()),
        }
    }

    pub(crate) fn set_merged(&mut self, adapter: Option<usize>) {
        self.merged = adapter;
    }

    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether the layers run as the fused CPU encoder (BERT-style layers with the erf GELU, MPNet's relative
    /// position bias included, on the fused kernels), before any adapter is considered.
    fn layers_fuse(&self) -> bool {
        self.kernels == Kernels::Fused
            && self.config.hidden_act == Activation::Gelu
            && self.relative_table.is_none()
            && self.config.modern.is_none()
    }

    /// Whether a CPU forward pass runs the fused encoder (whose projections [`Bert::set_precision`] sets).
    pub fn runs_fused(&self) -> bool {
        self.int8.is_none() && self.peft.as_ref().is_none_or(|p| p.lora().is_some()) && self.layers_fuse()
    }

    /// How an int8 model's projections multiply (no effect on other models).
    pub fn set_int8_compute(&mut self, compute: crate::cpu::int8::Int8Compute) {
        if let Some(layers) = &mut self.int8 {
            Arc::make_mut(layers).iter_mut().for_each(|l| l.set_compute(compute));
        }
    }

    /// The fused encoder's projections in bf16 or f32 (where the CPU has no AMX, bf16 runs as f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The precision the fused encoder's projections run in on this machine.
    pub fn precision(&self) -> Precision {
        self.precision.effective()
    }

    /// Makes the next forward passes support several backward passes (one per task's loss), at the cost of
    /// copying the fused encoder's saved activations for each.
    pub fn set_retain_graph(&self, retain: bool) {
        self.retain_graph.store(retain, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the (parameter, gradient) pairs that fused backward passes produced since the last call.
    pub(crate) fn take_grads(&self) -> Vec<(Tensor, Tensor)> {
        match self.grads.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The hidden states of the last layer, flattened to `[batch * seq, hidden]`.
    pub fn forward(&self, input: &BertInput, dropout: &DropoutRng, mode: Mode) -> Result<Tensor> {
        self.forward_from(input, None, dropout, mode)
    }

    /// The rows of the word-embedding table for `ids` (`[batch, seq]`): `[batch, seq, width]`.
    pub fn word_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let width = self.config.embedding_width();
        Ok(self.embeddings.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, width))?)
    }

    /// [`Bert::forward`] from word embeddings `words` (`[batch, seq, width]`) in place of the table's rows for
    /// `input.input_ids` (whose position and token-type embeddings are still added): the layer that
    /// integrated gradients interpolate ([`crate::explain`]).
    pub fn forward_words(&self, input: &BertInput, words: &Tensor, dropout: &DropoutRng, mode: Mode) -> Result<Tensor> {
        self.forward_from(input, Some(words), dropout, mode)
    }

    /// [`Bert::forward_words`], or [`Bert::forward`] where `words` is absent.
    fn forward_from(
        &self,
        input: &BertInput,
        words: Option<&Tensor>,
        dropout: &DropoutRng,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s) = input.input_ids.dims2()?;
        let h = self.config.hidden_size;
        if s > self.config.max_tokens() {
            let max = self.config.max_tokens();
            return Err(NnError::Input(format!("sequence of {s} tokens exceeds the model's {max} positions")));
        }
        // RoBERTa's positions start after its padding id's (the padding's own rows are masked out, so counting
        // every position from there gives the real tokens transformers' positions).
        let offset = self.config.position_offset() as u32;
        let width = self.config.embedding_width();
        if let Some(words) = words {
            if words.dims() != [b, s, width] {
                return Err(NnError::Input(format!(
                    "word embeddings of shape {:?}, expected [{b}, {s}, {width}]",
                    words.dims()
                )));
            }
        }
        let e = &self.embeddings;
        // One token type (RoBERTa's families): every token has it, whatever types the tokenizer gave a pair.
        let one_type = e.token_type.as_ref().map(|t| t.dim(0)).transpose()? == Some(1);
        let mut x = if mode == Mode::Eval && e.word.device().is_cpu() && e.word.dtype() == candle_core::DType::F32 {
            // Evaluation records no graph: the sum and the norm in one pass, the word rows read from the table.
            let ids = input.input_ids.flatten_all()?.to_vec1::<u32>()?;
            let types = match one_type {
                false if e.token_type.is_some() => Some(input.token_type_ids.flatten_all()?.to_vec1::<u32>()?),
                _ => None,
            };
            let rows;
            let words = match words {
                Some(w) => {
                    rows = w.reshape((b * s, width))?.contiguous()?;
                    Words::Rows(&rows)
                }
                None => Words::Table(&e.word, &ids),
            };
            let positions = e.position.as_ref().map(|p| p.narrow(0, offset as usize, s)).transpose()?;
            let (norm, token_types) = (&e.norm, e.token_type.as_ref());
            let types = types.as_deref();
            embed_norm(words, positions.as_ref(), token_types, types, &norm.weight, &norm.bias, norm.eps, s)?
        } else {
            let mut x = match words {
                Some(w) => w.clone(),
                None => self.word_embeddings(&input.input_ids)?,
            };
            if let Some(position) = &e.position {
                let positions = Tensor::arange(offset, offset + s as u32, x.device())?;
                x = x.broadcast_add(&position.index_select(&positions, 0)?)?; // [s, width]
            }
            match &e.token_type {
                Some(token_type) if one_type => x = x.broadcast_add(token_type)?,
                Some(token_type) => {
                    let types = input.token_type_ids.flatten_all()?;
                    x = (x + token_type.index_select(&types, 0)?.reshape((b, s, width))?)?;
                }
                None => {}
            }
            let x = e.norm.forward(&x.reshape((b * s, width))?)?;
            dropout.apply(&x, mode)?
        };
        if let Some(project) = &self.embeddings.project {
            // ELECTRA's narrower embeddings, to the blocks' width (frozen under parameter-efficient tuning).
            x = match self.peft {
                Some(_) => crate::layers::frozen_linear(&x, &[project])?,
                None => project.forward(&x)?,
            };
        }
        if let Some(layers) = &self.int8 {
            if mode == Mode::Train || !x.device().is_cpu() {
                return Err(NnError::Unsupported("an int8 model runs inference on the CPU only".into()));
            }
            let c = &self.config;
            let dims = Dims {
                batch: b,
                seq: s,
                hidden: h,
                heads: c.num_attention_heads,
                intermediate: c.intermediate_size,
                eps: c.layer_norm_eps as f32,
                bf16: false,
            };
            let position_bias = self.position_bias(s)?.map(|(values, _)| values);
            let op =
                Int8Encoder { dims, layers: layers.clone(), key_mask: input.attention_mask.clone(), position_bias };
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        // Adapters, unless LoRA merged into the weights, run through the composed path.
        let peft = match (&self.peft, self.merged) {
            (Some(spec), None) => {
                let routes = match &input.routes {
                    Some(r) => r.clone(),
                    None if spec.adapters.len() == 1 => vec![Route { adapter: 0, examples: 0..b }],
                    None => {
                        return Err(NnError::Input(
                            "a model with per-task adapters needs each example's task (routes)".into(),
                        ))
                    }
                };
                peft::check_routes(&routes, b, spec.adapters.len())?;
                Some((spec, routes))
            }
            _ => None,
        };
        // The fused encoder implements the erf GELU (BERT's) and LoRA; other activations and methods take the
        // composed path.
        let fusable = peft.as_ref().is_none_or(|(spec, _)| spec.lora().is_some()) && self.layers_fuse();
        if fusable && x.device().is_cpu() {
            let lora = peft.as_ref().and_then(|(spec, routes)| spec.lora().map(|l| (l, &routes[..])));
            return self.fused_layers(&x, input, b, s, dropout, mode, lora);
        }
        // Evaluation records no graph (every parameter a constant): otherwise each layer's activations would
        // stay alive, through the graph, until the output is dropped.
        let eval = mode == Mode::Eval;
        let constant = |t: &Tensor| if eval { t.detach() } else { t.clone() };
        if eval {
            x = x.detach();
        }
        let position_bias = match &self.relative_bias {
            Some(bias) => Some(relative_position_bias(&constant(bias), s)?),
            None => None,
        };
        let relative = match (&self.relative_table, &self.config.disentangled) {
            (Some((table, norm)), Some(settings)) => {
                let (rows, index) = settings.rows(s);
                let table = constant(table).narrow(0, rows.start, rows.len())?;
                let table = match norm {
                    Some(n) => LayerNorm { weight: constant(&n.weight), bias: constant(&n.bias), eps: n.eps }
                        .forward(&table)?,
                    None => table,
                };
                Some(RelativePass { settings, index, table })
            }
            _ => None,
        };
        let pass = peft.as_ref().map(|(spec, routes)| PeftPass {
            routes,
            seq: s,
            scale: spec.lora().map_or(1.0, |l| l.scale()),
            dropout_p: spec.lora().map_or(0.0, |l| l.dropout),
            dropout,
            mode,
            frozen: eval,
        });
        let evaluated: Vec<Layer>;
        let layers = match eval {
            true => {
                evaluated = self.layers.iter().map(Layer::for_eval).collect();
                &evaluated
            }
            false => &self.layers,
        };
        if let (Some(m), Some(final_norm)) = (&self.config.modern, &self.final_norm) {
            let d = h / self.config.num_attention_heads;
            let global = modernbert::rotary_tables(m.global_theta, s, d, x.device())?;
            let local = modernbert::rotary_tables(m.local_theta, s, d, x.device())?;
            for (i, layer) in layers.iter().enumerate() {
                let (rope, window) = match m.global.get(i).copied().unwrap_or(true) {
                    true => (&global, None),
                    // Every key is near enough in a sequence no longer than the window.
                    false => (&local, Some(m.window).filter(|&w| s > w + 1)),
                };
                let shape = (b, s);
                x = self.modern_layer(
                    i,
                    layer,
                    &x,
                    &input.attention_mask,
                    shape,
                    dropout,
                    mode,
                    pass.as_ref(),
                    rope,
                    window,
                )?;
            }
            let norm = LayerNorm {
                weight: constant(&final_norm.weight),
                bias: constant(&final_norm.bias),
                eps: final_norm.eps,
            };
            return norm.forward(&x);
        }
        for layer in layers {
            x = self.layer_forward(
                layer,
                &x,
                &input.attention_mask,
                (b, s),
                dropout,
                mode,
                pass.as_ref(),
                position_bias.as_ref(),
                relative.as_ref(),
            )?;
        }
        Ok(x)
    }

    /// MPNet's relative position bias for `s` positions as the fused kernels take it: the bias of every (head,
    /// query, key), `heads × s × s`, from its bucket's row, and each pair's bucket.
    fn position_bias(&self, s: usize) -> Result<Option<(Vec<f32>, Vec<u32>)>> {
        let Some(bias) = &self.relative_bias else { return Ok(None) };
        let (buckets, heads) = bias.dims2()?;
        let ids = relative_buckets(buckets, s);
        let rows = bias.flatten_all()?.to_vec1::<f32>()?;
        let rows = &rows;
        let values = (0..heads).flat_map(|h| ids.iter().map(move |&i| rows[i as usize * heads + h])).collect();
        Ok(Some((values, ids)))
    }

    /// All layers as one [`FusedEncoder`] op, with LoRA when `lora` has its settings and the batch's routes.
    /// Dropout masks (LoRA's too) are drawn in the same order as the composed path draws them, so both give
    /// the same result from the same seed.
    #[allow(clippy::too_many_arguments)]
    fn fused_layers(
        &self,
        x: &Tensor,
        input: &BertInput,
        b: usize,
        s: usize,
        dropout: &DropoutRng,
        mode: Mode,
        lora: Option<(&LoraSpec, &[Route])>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let dims = Dims {
            batch: b,
            seq: s,
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            intermediate: c.intermediate_size,
            eps: c.layer_norm_eps as f32,
            bf16: self.precision() == Precision::Bf16,
        };
        let layers: Vec<LayerParams> = self
            .layers
            .iter()
            .map(|l| {
                [
                    l.query.weight.clone(),
                    l.query.bias.clone(),
                    l.key.weight.clone(),
                    l.key.bias.clone(),
                    l.value.weight.clone(),
                    l.value.bias.clone(),
                    l.attn_out.weight.clone(),
                    l.attn_out.bias.clone(),
                    l.attn_norm.weight.clone(),
                    l.attn_norm.bias.clone(),
                    l.intermediate.weight.clone(),
                    l.intermediate.bias.clone(),
                    l.output.weight.clone(),
                    l.output.bias.clone(),
                    l.out_norm.weight.clone(),
                    l.out_norm.bias.clone(),
                ]
            })
            .collect();
        let train = mode == Mode::Train;
        // The sublayer outputs' dropout as seeds, drawn where the mask would have been (the same generator
        // draws as the composed path's masks).
        let main = || (train && dropout.p() > 0.0).then(|| dropout.next_seed());
        // LoRA's input dropout on `site` of layer `l`: a seed per route, drawn from the generator in the order
        // the composed path draws its masks; the op draws the multipliers where it applies them (42 M values a
        // step at W3's shapes, no longer kept from the forward pass to the backward).
        let lora_dropout = |l: &Layer, site: LinearModule| -> Option<SiteDropout> {
            let (spec, routes) = lora?;
            if !train || !l.lora.contains_key(&site) || spec.dropout == 0.0 {
                return None;
            }
            Some(SiteDropout { p: spec.dropout, seeds: routes.iter().map(|_| dropout.next_seed()).collect() })
        };
        let mask_timer = crate::cpu::profile::start(crate::cpu::profile::Phase::Masks);
        let (mut masks, mut lora_dropouts) = (Vec::new(), Vec::new());
        for l in &self.layers {
            let [q, k, v] = [LinearModule::Query, LinearModule::Key, LinearModule::Value].map(|m| lora_dropout(l, m));
            // The attention probabilities' mask as its seed, drawn by the kernels where they read it.
            let attention = main();
            let attention_out = lora_dropout(l, LinearModule::AttentionOutput);
            let attention_output = main();
            let intermediate = lora_dropout(l, LinearModule::Intermediate);
            let out = lora_dropout(l, LinearModule::Output);
            let output = main();
            if train && dropout.p() > 0.0 {
                masks.push(LayerDropout {
                    attention: attention.unwrap_or_default(),
                    p: dropout.p(),
                    attention_output: attention_output.unwrap_or_default(),
                    output: output.unwrap_or_default(),
                });
            }
            lora_dropouts.push([q, k, v, attention_out, intermediate, out]);
        }
        let masks = (!masks.is_empty()).then_some(masks);
        mask_timer.stop();
        let mut op = FusedEncoder::new(dims, layers, input.attention_mask.clone(), masks, train, self.grads.clone());
        op.retain = self.retain_graph.load(std::sync::atomic::Ordering::Relaxed);
        if let (Some(bias), Some((values, buckets))) = (&self.relative_bias, self.position_bias(s)?) {
            // The parameter trains with the backbone (not under LoRA, which freezes it).
            let param = (train && lora.is_none()).then(|| bias.clone());
            op.position_bias = Some(PositionBias { values, buckets, param });
        }
        let Some((spec, routes)) = lora else { return Ok(x.contiguous()?.apply_op1(op)?) };
        // The adapters of the batch's routes, each once, in order of appearance; their matrices packed.
        let mut used: Vec<usize> = Vec::new();
        for r in routes {
            if !used.contains(&r.adapter) {
                used.push(r.adapter);
            }
        }
        // The fused encoder's sites are `LinearModule::ALL`, in its order.
        const SITES: [LinearModule; 6] = LinearModule::ALL;
        let mut parts = Vec::new();
        for l in &self.layers {
            for site in &SITES {
                if let Some(lora) = l.lora.get(site) {
                    for &u in &used {
                        let pair = lora.pair(u)?;
                        parts.push(pair.a()?.flatten_all()?);
                        parts.push(pair.b.flatten_all()?);
                    }
                }
            }
        }
        let packed = Tensor::cat(&parts, 0)?;
        let any_dropout = lora_dropouts.iter().any(|l| l.iter().any(Option::is_some));
        op.lora = Some(FusedLora {
            scale: spec.scale() as f32,
            r: spec.r,
            sites: self.layers.iter().map(|l| SITES.map(|m| l.lora.contains_key(&m))).collect(),
            routes: routes
                .iter()
                .map(|r| {
                    (r.examples.start * s..r.examples.end * s, used.iter().position(|&u| u == r.adapter).unwrap_or(0))
                })
                .collect(),
            adapters: used.len(),
            dropout: any_dropout.then_some(lora_dropouts),
        });
        Ok(x.contiguous()?.apply_op2(&packed, op)?)
    }

    /// The attention of `b` examples of `s` queries over `keys` keys, with a dropout mask in training.
    fn attention_spec(
        &self,
        (b, s): (usize, usize),
        keys: usize,
        key_mask: &Arc<Vec<u32>>,
        dropout: &DropoutRng,
        mode: Mode,
    ) -> AttentionSpec {
        let nh = self.config.num_attention_heads;
        AttentionSpec {
            batch: b,
            seq: s,
            heads: nh,
            head_dim: self.config.hidden_size / nh,
            key_mask: key_mask.clone(),
            dropout: match mode {
                Mode::Train => dropout.mask(b * nh * s * keys).map(Arc::new),
                Mode::Eval => None,
            },
            window: None,
        }
    }

    /// One ModernBERT block ([`Bert::new_modern`] says where its parts are): `x + attn(norm(x))` with the
    /// queries and keys rotated by `rope` and, in a sliding-window layer, keys beyond `window` masked, then
    /// `x + Wo(act(a) · g)` where `[a | g]` is `Wi(norm(x))`. Dropout where transformers has it: on the
    /// attention probabilities, the attention output and the gated activations.
    #[allow(clippy::too_many_arguments)]
    fn modern_layer(
        &self,
        index: usize,
        l: &Layer,
        x: &Tensor,
        key_mask: &Arc<Vec<u32>>,
        (b, s): (usize, usize),
        dropout: &DropoutRng,
        mode: Mode,
        peft: Option<&PeftPass>,
        rope: &(Tensor, Tensor),
        window: Option<usize>,
    ) -> Result<Tensor> {
        let nh = self.config.num_attention_heads;
        let linear = |layers: &[&Linear], x: &Tensor| base_linear(peft, layers, x);
        let adapt = |module: LinearModule, x: &Tensor, y: Tensor| with_lora(l, peft, module, x, y);
        let normed = match index {
            0 => x.clone(),
            _ => l.attn_norm.forward(x)?,
        };
        let qkv = adapt(LinearModule::Query, &normed, linear(&[&l.query, &l.key, &l.value], &normed)?)?;
        let qkv = modernbert::rotate_qk(&qkv, rope, b, nh)?;
        let spec = AttentionSpec { window, ..self.attention_spec((b, s), s, key_mask, dropout, mode) };
        let ctx = match x.device().is_cpu() {
            true => attention::fused(&qkv, spec)?,
            false => attention::composed(&qkv, &spec, None)?,
        };
        let attn = adapt(LinearModule::AttentionOutput, &ctx, linear(&[&l.attn_out], &ctx)?)?;
        let x = (x + dropout.apply(&attn, mode)?)?;
        let inter = self.config.intermediate_size;
        let normed = l.out_norm.forward(&x)?;
        let both = adapt(LinearModule::Intermediate, &normed, linear(&[&l.intermediate], &normed)?)?;
        let (a, gate) = (both.narrow(1, 0, inter)?, both.narrow(1, inter, inter)?);
        let a = match self.config.hidden_act {
            Activation::Gelu if a.device().is_cpu() => crate::cpu::fused::gelu_erf(&a.contiguous()?)?,
            Activation::Gelu => a.gelu_erf()?,
            Activation::GeluNew => a.gelu()?,
            Activation::Relu => a.relu()?,
        };
        let gated = dropout.apply(&(a * gate)?, mode)?;
        Ok((x + adapt(LinearModule::Output, &gated, linear(&[&l.output], &gated)?)?)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        key_mask: &Arc<Vec<u32>>,
        (b, s): (usize, usize),
        dropout: &DropoutRng,
        mode: Mode,
        peft: Option<&PeftPass>,
        position_bias: Option<&Tensor>,
        relative: Option<&RelativePass>,
    ) -> Result<Tensor> {
        let nh = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / nh;
        // `y` plus the LoRA update of `module` on its input `x`, when it has one.
        let adapt = |module: LinearModule, x: &Tensor, y: Tensor| with_lora(l, peft, module, x, y);
        // A sublayer's output plus its bottleneck adapter's update, when it has one.
        let bottleneck = |site: Site, y: Tensor| -> Result<Tensor> {
            match (peft, l.bottleneck.get(&site)) {
                (Some(pass), Some(adapter)) => adapter.forward(&y, pass),
                _ => Ok(y),
            }
        };
        let linear = |layers: &[&Linear], x: &Tensor| base_linear(peft, layers, x);
        let mut qkv = linear(&[&l.query, &l.key, &l.value], x)?;
        let qkv_modules = [LinearModule::Query, LinearModule::Key, LinearModule::Value];
        if let Some(pass) = peft.filter(|_| qkv_modules.iter().any(|m| l.lora.contains_key(m))) {
            let parts = qkv_modules
                .iter()
                .map(|m| match l.lora.get(m) {
                    Some(adapter) => adapter.delta(x, pass),
                    None => Ok(Tensor::zeros((b * s, self.config.hidden_size), x.dtype(), x.device())?),
                })
                .collect::<Result<Vec<_>>>()?;
            qkv = (qkv + Tensor::cat(&parts, 1)?)?;
        }
        let prefix = peft.zip(l.prefix.as_ref());
        let keys = s + prefix.map_or(0, |(_, p)| p.length());
        let spec = self.attention_spec((b, s), keys, key_mask, dropout, mode);
        let ctx = match prefix {
            Some(_) if relative.is_some() => {
                return Err(NnError::Unsupported(
                    "prefix tuning on DeBERTa (its disentangled attention) is not supported; LoRA and adapters are"
                        .into(),
                ))
            }
            None if relative.is_some() => {
                let rel = relative.expect("checked");
                // The table through this layer's query and key projections (and their LoRA updates: each
                // adapter's examples get their own), with the hidden dropout transformers applies to it.
                let table = dropout.apply(&rel.table, mode)?;
                let rows = table.dim(0)?;
                let project = |module: LinearModule, lin: &Linear, adapter: Option<usize>| -> Result<Tensor> {
                    let mut y = linear(&[lin], &table)?;
                    if let (Some(pass), Some(a), Some(lora)) = (peft, adapter, l.lora.get(&module)) {
                        y = (y + lora.delta_for(&table, a, pass)?)?;
                    }
                    Ok(y.reshape((rows, nh, head_dim))?.transpose(0, 1)?.contiguous()?)
                };
                let adapted = l.lora.contains_key(&LinearModule::Query) || l.lora.contains_key(&LinearModule::Key);
                let groups = match peft {
                    Some(pass) if adapted => pass
                        .routes
                        .iter()
                        .map(|r| {
                            Ok(deberta::PositionGroup {
                                examples: r.examples.clone(),
                                pos_query: project(LinearModule::Query, &l.query, Some(r.adapter))?,
                                pos_key: project(LinearModule::Key, &l.key, Some(r.adapter))?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                    _ => vec![deberta::PositionGroup {
                        examples: 0..b,
                        pos_query: project(LinearModule::Query, &l.query, None)?,
                        pos_key: project(LinearModule::Key, &l.key, None)?,
                    }],
                };
                deberta::attention(&qkv, &spec, rel.settings, &rel.index, &groups)?
            }
            Some(_) if position_bias.is_some() => {
                return Err(NnError::Unsupported(
                    "prefix tuning on MPNet (its relative position bias) is not supported; LoRA and adapters are"
                        .into(),
                ))
            }
            Some((pass, p)) => {
                let (k, v) = p.per_example(pass)?;
                attention::with_prefix(&qkv, &k, &v, &spec)?
            }
            None => match position_bias {
                Some(bias) if x.device().is_cpu() => attention::fused_with_bias(&qkv, bias, spec)?,
                Some(bias) => attention::composed(&qkv, &spec, Some(bias))?,
                None if x.device().is_cpu() => attention::fused(&qkv, spec)?,
                None => attention::composed(&qkv, &spec, None)?,
            },
        };
        let attn = adapt(LinearModule::AttentionOutput, &ctx, linear(&[&l.attn_out], &ctx)?)?;
        let attn = dropout.apply(&attn, mode)?;
        let attn = bottleneck(Site::Attention, attn)?;
        let x = l.attn_norm.forward(&(attn + x)?)?;
        let inter = adapt(LinearModule::Intermediate, &x, linear(&[&l.intermediate], &x)?)?;
        let inter = match self.config.hidden_act {
            Activation::Gelu if inter.device().is_cpu() => crate::cpu::fused::gelu_erf(&inter)?,
            Activation::Gelu => inter.gelu_erf()?,
            Activation::GeluNew => inter.gelu()?,
            Activation::Relu => inter.relu()?,
        };
        let out = adapt(LinearModule::Output, &inter, linear(&[&l.output], &inter)?)?;
        let out = dropout.apply(&out, mode)?;
        let out = bottleneck(Site::FeedForward, out)?;
        l.out_norm.forward(&(out + x)?)
    }
}
