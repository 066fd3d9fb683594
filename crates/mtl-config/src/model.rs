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
}

pub(crate) fn default_max_len() -> usize {
    128
}
