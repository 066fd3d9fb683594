//! `[model]`: the base model and the input length.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory: `config.json`, `model.safetensors`, `tokenizer.json`.
    pub path: PathBuf,
    /// Sequences are truncated to this many tokens, special tokens included.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

pub(crate) fn default_max_len() -> usize {
    128
}
