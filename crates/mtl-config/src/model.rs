//! `[model]`: the base model and the input length.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory: `config.json` (an encoder of `bert`, `roberta`, `xlm-roberta`,
    /// `camembert`, `electra`, `distilbert`, `mpnet`, `deberta-v2` or `modernbert`, or a decoder), the weights
    /// (`model.safetensors`, its shards with their index, or `pytorch_model.bin`) and `tokenizer.json` (or
    /// BERT's `vocab.txt`); for a decoder, a directory with a GGUF file, or the file.
    pub path: PathBuf,
    /// Sequences are truncated to this many tokens, special tokens included.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// A decoder's system turn in every prompt (chat models). Absent: the chat template's default, which for
    /// SmolLM2 is a 20-token introduction of the assistant in every training and evaluation sequence; `""`
    /// leaves the system turn empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// The number format of an encoder's matrix products (the four projections of every layer, in training and
    /// inference): `"f32"` (the default), or `"bf16"`: operands rounded to bf16 and summed in f32 on Intel AMX (Sapphire
    /// Rapids and later Xeons): there about 1.8× faster inference and a 1.3× faster training step on
    /// all-MiniLM-L6-v2 (BENCHMARKS.md). Weights, optimizer state, attention, norms and activations stay f32. Where the CPU or the OS has no AMX, `"bf16"` runs in f32 with a warning. Applies to
    /// BERT-style encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT) on the fused CPU path.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// See [`ModelConfig::precision`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

pub(crate) fn default_max_len() -> usize {
    128
}
