//! Llama and Gemma 3 GGUF files (llama.cpp's format) read into the decoder's weights, its config and its
//! vocabulary (byte-level BPE, or Gemma's SentencePiece BPE).
//!
//! Quantised matrices (Q4_1, Q8_0, K-quants, …) are kept in their block format ([`QuantMatrix`]: a frozen base
//! for LoRA or for inference) or dequantised to f32 by candle (full fine-tuning): either way the quantisation
//! error stays in the weights, so a model trained from them starts from the quantised model. llama.cpp's
//! converter permutes the rows of the query and key projections for its interleaved rotary layout; they are
//! permuted back here, so the weights are transformers' and the decoder's `rotate_half` rotation applies.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use mtl_data::bpe::{ByteLevelVocab, SentencePieceVocab, Vocab, WordSplit};

use crate::cpu::quant::QuantMatrix;
use crate::llama::{Activation, Family, LlamaConfig, LlamaWeights, SlidingWindow};
use crate::{NnError, Result};

/// What a GGUF file holds for the decoder.
#[derive(Debug)]
pub struct GgufLlama {
    pub config: LlamaConfig,
    /// The weights under transformers' state-dict names (`LlamaForCausalLM`'s, `Gemma3ForCausalLM`'s).
    pub weights: LlamaWeights,
    pub vocab: Vocab,
    /// The Jinja chat template, when the file has one.
    pub chat_template: Option<String>,
    /// How many tensors of each ggml type the file stores (e.g. `Q4_1: 210`), for the record.
    pub tensor_types: Vec<(String, usize)>,
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => f64::from(*x),
        Value::I8(x) => f64::from(*x),
        Value::U16(x) => f64::from(*x),
        Value::I16(x) => f64::from(*x),
        Value::U32(x) => f64::from(*x),
        Value::I32(x) => f64::from(*x),
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => f64::from(*x),
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// The header of a GGUF file: metadata and tensor directory. A model file is not trusted: where candle's
/// reader panics on a malformed header (a `general.alignment` of 0 divides by zero), that is an error too.
fn read_content(path: &Path) -> Result<(std::fs::File, Content)> {
    let bad = |message: String| NnError::File { path: path.to_owned(), message };
    let mut file = std::fs::File::open(path).map_err(|source| NnError::Io { path: path.to_owned(), source })?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file))) {
        Ok(Ok(content)) => Ok((file, content)),
        Ok(Err(e)) => Err(bad(format!("not a GGUF file: {e}"))),
        Err(_) => Err(bad("not a valid GGUF file: its header is malformed (is general.alignment 0?)".into())),
    }
}

/// The `general.architecture` of a GGUF file (read from its header only).
pub fn architecture(path: &Path) -> Result<String> {
    let bad = |message: String| NnError::File { path: path.to_owned(), message };
    let (_, content) = read_content(path)?;
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("no general.architecture".into()))
}

/// The decoder of a GGUF file (architecture `llama` or `gemma3`): its quantised matrices kept as they are
/// when `keep_quantized` (f32 ones and the norms are f32 either way), or all dequantised to f32.
pub fn read_llama(path: &Path, device: &Device, keep_quantized: bool) -> Result<GgufLlama> {
    let bad = |message: String| NnError::File { path: path.to_owned(), message };
    let (mut file, content) = read_content(path)?;
    let md = &content.metadata;
    let text = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
    let arch = text("general.architecture").ok_or_else(|| bad("no general.architecture".into()))?;
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "gemma3" => Family::Gemma3,
        _ => return Err(bad(format!("architecture {arch:?} is not supported (llama, gemma3)"))),
    };
    let num = |key: &str| md.get(&format!("{arch}.{key}")).and_then(number);
    let need = |key: &str| num(key).map(|v| v as usize).ok_or_else(|| bad(format!("metadata {arch}.{key} is missing")));
    if let Some(kind) = text(&format!("{arch}.rope.scaling.type")).filter(|k| k != "none") {
        return Err(bad(format!("rope scaling {kind:?} is not supported")));
    }

    // The vocabulary.
    let model = text("tokenizer.ggml.model").unwrap_or_default();
    let pre = text("tokenizer.ggml.pre").unwrap_or_default();
    let split = WordSplit::of_gguf(&pre);
    let byte_level = model == "gpt2" && split.is_some();
    // SentencePiece BPE as Gemma stores it (no merges; they follow from the vocabulary's order).
    let sentencepiece = model == "llama" && family == Family::Gemma3;
    if !byte_level && !sentencepiece {
        return Err(bad(format!(
            "tokenizer {model:?} with pre-tokenizer {pre:?} is not supported; byte-level BPE (\"gpt2\") with one of {}, \
             or Gemma's SentencePiece (\"llama\") is",
            WordSplit::GGUF_NAMES.join(", ")
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let values =
            md.get(key).and_then(|v| v.to_vec().ok()).ok_or_else(|| bad(format!("metadata {key} is missing")))?;
        values
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| bad(format!("{key}: not a list of strings"))))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let token_count = tokens.len();
    // Gemma ends a chat turn with `<end_of_turn>`, which its files do not mark as an end token.
    let end_of_turn = match family {
        Family::Gemma3 => tokens.iter().position(|t| t == "<end_of_turn>").map(|i| i as u32),
        Family::Llama => None,
    };
    // Token type 3 is CONTROL in llama.cpp (chat markers and the like), 4 USER_DEFINED.
    let of_type = |kind: f64| -> Vec<u32> {
        match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(types) => {
                types.iter().enumerate().filter(|(_, t)| number(t) == Some(kind)).map(|(i, _)| i as u32).collect()
            }
            None => Vec::new(),
        }
    };
    let token_id = |key: &str| md.get(key).and_then(number).map(|v| v as u32);
    let vocab = match byte_level {
        true => Vocab::ByteLevel(ByteLevelVocab {
            tokens,
            merges: strings("tokenizer.ggml.merges")?,
            special: of_type(3.0),
            split: split.unwrap_or_default(),
        }),
        false => Vocab::SentencePiece(SentencePieceVocab {
            tokens,
            special: of_type(3.0),
            user_defined: of_type(4.0),
            unknown: token_id("tokenizer.ggml.unknown_token_id"),
            add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(true),
            bos: token_id("tokenizer.ggml.bos_token_id"),
        }),
    };

    // The weights, under transformers' names.
    let (heads, kv_heads) = (
        need("attention.head_count")?,
        num("attention.head_count_kv").map_or(need("attention.head_count")?, |v| v as usize),
    );
    let hidden = need("embedding_length")?;
    // llama.cpp's head size is attention.key_length (embedding length / heads when absent).
    let head_dim = num("attention.key_length").map_or(hidden / heads.max(1), |v| v as usize);
    let layers = need("block_count")?;
    let mut weights = LlamaWeights::default();
    let mut types: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut rope_freq_factors = None;
    for name in names {
        // Llama 3's rotary scaling, as llama.cpp's converter writes it: a divisor per frequency.
        if name == "rope_freqs.weight" && family == Family::Llama {
            let q = content.tensor(&mut file, name, device).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let f = q.dequantize(device).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
            rope_freq_factors =
                Some(f.map_err(|e| bad(format!("tensor {name}: {e}")))?.into_iter().map(f64::from).collect::<Vec<_>>());
            continue;
        }
        let target =
            hf_name(name, family).ok_or_else(|| bad(format!("tensor {name:?} has no place in a {arch} model")))?;
        let q = content.tensor(&mut file, name, device).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        *types.entry(format!("{:?}", q.dtype())).or_default() += 1;
        // Only llama.cpp's llama converter permutes the query and key rows.
        let permuted = match family {
            Family::Llama if name.ends_with("attn_q.weight") => Some(heads),
            Family::Llama if name.ends_with("attn_k.weight") => Some(kv_heads),
            _ => None,
        };
        if keep_quantized && q.rank() == 2 && q.dtype() != GgmlDType::F32 && device.is_cpu() {
            let q = match permuted {
                Some(n) => unpermute_blocks(&q, n, head_dim).map_err(|e| bad(format!("tensor {name}: {e}")))?,
                None => q,
            };
            weights.quantized.insert(target, QuantMatrix::new(q)?);
            continue;
        }
        let mut w = q.dequantize(device).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        if let Some(n) = permuted {
            w = unpermute(&w, n, head_dim)?;
        }
        // llama.cpp stores Gemma's norm weights as `1 + w`; transformers' (and this crate's) are the offsets.
        if family == Family::Gemma3 && name.ends_with("norm.weight") {
            w = w.affine(1.0, -1.0)?;
        }
        weights.dense.insert(target, w);
    }
    let tied = !weights.dense.contains_key("lm_head.weight") && !weights.quantized.contains_key("lm_head.weight");
    let gemma = family == Family::Gemma3;
    // What llama.cpp assumes for Gemma 3, as transformers' reading of such a file does: every sixth layer
    // attends globally, the others within the window with a rotary base of 10,000; scores are scaled by the
    // head size (the 27B model, 62 layers, by hidden size / heads).
    let sliding = match (gemma, num("attention.sliding_window")) {
        (true, Some(window)) => Some(SlidingWindow {
            window: window as usize,
            layers: (0..layers).map(|n| (n + 1) % 6 != 0).collect(),
            rope_theta: 10_000.0,
        }),
        _ => None,
    };
    let query_pre_attn_scalar =
        gemma.then(|| if layers == 62 { (hidden / heads.max(1)) as f64 } else { head_dim as f64 });
    let config = LlamaConfig {
        vocab_size: num("vocab_size").map_or(token_count, |v| v as usize),
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: num("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: num("rope.freq_base").unwrap_or(10_000.0),
        max_position_embeddings: need("context_length")?,
        tie_word_embeddings: tied,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        // Every end-of-generation token llama.cpp stops on: end of sequence, of turn, of message.
        eos_token_ids: ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| token_id(k))
            .chain(end_of_turn)
            .fold(Vec::new(), |mut v, t| {
                if !v.contains(&t) {
                    v.push(t);
                }
                v
            }),
        family,
        hidden_act: if gemma { Activation::GeluTanh } else { Activation::Silu },
        query_pre_attn_scalar,
        sliding,
        rope_freq_factors,
    };
    config.validate().map_err(bad)?;
    Ok(GgufLlama {
        config,
        weights,
        vocab,
        chat_template: text("tokenizer.chat_template").or_else(|| gemma.then(|| GEMMA_CHAT_TEMPLATE.to_string())),
        tensor_types: types.into_iter().collect(),
    })
}

/// Gemma 3's chat format, for files that carry no template (the base models'): the text transformers'
/// template for Gemma 3 writes for plain-text turns (a system turn's text opens the first user turn).
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{%- set prefix = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' -%}\
{%- for m in messages if m['role'] != 'system' -%}\
{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}\
{{- (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif -%}";

/// transformers' name of a llama.cpp tensor of a `family` model.
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gemma = family == Family::Gemma3;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" if gemma => "self_attn.q_norm.weight",
        "attn_k_norm.weight" if gemma => "self_attn.k_norm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// Undoes llama.cpp's row permutation of a query or key projection (`n` heads of `head_dim` rows): its row
/// `h·d + 2j + s` is transformers' row `h·d + s·d/2 + j`.
fn unpermute(w: &Tensor, n: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows != n * head_dim {
        return Err(NnError::Input(format!("a projection of {rows} rows is not {n} heads of {head_dim}")));
    }
    Ok(w.reshape((n, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// [`unpermute`] on the rows of a quantised matrix: each row is a whole number of blocks, so rows move as bytes.
fn unpermute_blocks(q: &QTensor, n: usize, head_dim: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if rows != n * head_dim || !head_dim.is_multiple_of(2) {
        return Err(NnError::Input(format!("a projection of {rows} rows is not {n} heads of {head_dim}")));
    }
    let data = q.data()?;
    let row_bytes = data.len() / rows.max(1);
    let mut out = vec![0u8; data.len()];
    let half = head_dim / 2;
    for h in 0..n {
        for s in 0..2 {
            for j in 0..half {
                let (to, from) = (h * head_dim + s * half + j, h * head_dim + 2 * j + s);
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model file is not trusted: a header that makes candle's reader panic (alignment 0), and a context
    /// length of 0, are errors that name the file.
    #[test]
    fn malformed_headers_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("bad.gguf");
        let mut file = std::fs::File::create(&path).expect("a file");
        let (arch, zero) = (Value::String("llama".into()), Value::U32(0));
        candle_core::quantized::gguf_file::write(
            &mut file,
            &[("general.architecture", &arch), ("general.alignment", &zero)],
            &[],
        )
        .expect("written");
        drop(file);
        let err = architecture(&path).expect_err("a malformed header").to_string();
        assert!(err.contains("bad.gguf") && err.contains("malformed"), "{err}");
        let config = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-llama/config.json"
        ))
        .expect("the tiny config");
        let mut value: serde_json::Value = serde_json::from_str(&config).expect("JSON");
        value["max_position_embeddings"] = 0.into();
        let err = crate::llama::LlamaConfig::from_json(&value.to_string()).expect_err("no positions");
        assert!(err.contains("max_position_embeddings"), "{err}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() -> Result<()> {
        // llama.cpp: reshape(n, 2, d/2, cols).swapaxes(1, 2): HF row h·d + s·d/2 + j goes to row h·d + 2j + s.
        let (n, d, cols) = (3, 8, 2);
        let hf: Vec<f32> = (0..n * d * cols).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (n * d, cols), &Device::Cpu)?;
        let gguf = hf.reshape((n, 2, d / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((n * d, cols))?;
        assert_eq!(unpermute(&gguf, n, d)?.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        // The same on the rows of a quantised matrix (Q8_0 blocks of 32 columns).
        let wide = Tensor::randn(0f32, 1.0, (n * d, 64), &Device::Cpu)?;
        let permuted = wide.reshape((n, 2, d / 2, 64))?.transpose(1, 2)?.contiguous()?.reshape((n * d, 64))?;
        let q = QTensor::quantize(&permuted, GgmlDType::Q8_0)?;
        let want = unpermute(&q.dequantize(&Device::Cpu)?, n, d)?.to_vec2::<f32>()?;
        assert_eq!(unpermute_blocks(&q, n, d)?.dequantize(&Device::Cpu)?.to_vec2::<f32>()?, want);
        let name = |n: &str, f: Family| hf_name(n, f);
        assert_eq!(
            name("blk.12.ffn_down.weight", Family::Llama).as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(name("blk.x.ffn_down.weight", Family::Llama), None);
        assert_eq!(name("blk.1.post_ffw_norm.weight", Family::Llama), None);
        let ffn_norm = name("blk.1.ffn_norm.weight", Family::Gemma3);
        assert_eq!(ffn_norm.as_deref(), Some("model.layers.1.pre_feedforward_layernorm.weight"));
        Ok(())
    }
}
