//! Which backbone a base model needs, read from the model's own files: `model_type` of a Hugging Face
//! `config.json`, or `general.architecture` of a GGUF file. A closed enum: every architecture the library
//! implements is one variant, and anything else is refused with the list of those that are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};

/// A backbone architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT-style encoders (our own trainable encoder with fused CPU kernels), HF safetensors directories.
    Bert,
    /// Llama-style decoders, GGUF files or HF safetensors directories.
    Llama,
}

impl Architecture {
    /// The names `model_type` takes for each variant, as `config.json` and GGUF metadata spell them.
    pub const NAMES: [&'static str; 2] = ["bert", "llama"];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Llama => "llama",
        }
    }

    /// The variant for a `model_type` (or GGUF `general.architecture`) read from `path`.
    pub fn from_model_type(model_type: &str, path: &Path) -> Result<Self> {
        match model_type {
            "bert" => Ok(Architecture::Bert),
            "llama" => Ok(Architecture::Llama),
            other => Err(Error::UnsupportedArchitecture {
                path: path.to_owned(),
                model_type: other.to_string(),
                supported: Self::NAMES.join(", "),
            }),
        }
    }

    /// A decoder generates text: its tasks are trained and answered as text.
    pub fn is_decoder(self) -> bool {
        matches!(self, Architecture::Llama)
    }

    /// The architecture of the base model at `path`: a GGUF file, a directory holding one GGUF file, or a
    /// Hugging Face model directory with `config.json`.
    pub fn detect(path: &Path) -> Result<Self> {
        if let Some(file) = gguf_file(path)? {
            return Self::from_model_type(&mtl_nn::gguf::architecture(&file)?, &file);
        }
        let config = path.join("config.json");
        if !config.is_file() {
            return Err(Error::Missing { path: config, what: "model config" });
        }
        let value: serde_json::Value = read_json(&config)?;
        let model_type = value["model_type"]
            .as_str()
            .ok_or_else(|| Error::Invalid { path: config.clone(), message: "field `model_type`: missing".into() })?;
        Self::from_model_type(model_type, &config)
    }
}

/// The GGUF file at `path` (a `.gguf` file, or the one `.gguf` file of a directory); `None` where `path` is
/// a directory without one. A directory with several is an error: which one is meant?
pub fn gguf_file(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(path.extension().is_some_and(|e| e == "gguf").then(|| path.to_owned()));
    }
    if !path.is_dir() {
        return Err(Error::Missing { path: path.to_owned(), what: "model" });
    }
    let entries = std::fs::read_dir(path).map_err(Error::io(path))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    files.sort();
    match files.len() {
        0 => Ok(None),
        1 => Ok(files.pop()),
        _ => Err(Error::Usage(format!("{}: several .gguf files; name one", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_model_type_names_the_supported_ones() {
        let e = Architecture::from_model_type("gpt2", Path::new("m/config.json")).expect_err("gpt2 is not implemented");
        assert_eq!(e.to_string(), "m/config.json: unsupported model_type \"gpt2\"; supported: bert, llama");
    }

    #[test]
    fn detects_bert_and_llama_directories() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        assert_eq!(Architecture::detect(&root.join("tiny-bert"))?, Architecture::Bert);
        assert_eq!(Architecture::detect(&root.join("tiny-llama"))?, Architecture::Llama);
        Ok(())
    }
}
