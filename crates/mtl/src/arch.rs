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
    /// BERT-style encoders (our own trainable encoder with fused CPU kernels), HF safetensors directories: BERT,
    /// RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT and MPNet.
    Bert,
    /// Decoders of the Llama family (Llama, and Gemma 3's variations on it), GGUF files or HF safetensors
    /// directories.
    Llama,
}

impl Architecture {
    /// The names `model_type` takes for each variant, as `config.json` and GGUF metadata spell them.
    pub const NAMES: [&'static str; 12] = [
        "bert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "electra",
        "distilbert",
        "mpnet",
        "deberta-v2",
        "modernbert",
        "llama",
        "gemma3",
        "gemma3_text",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Llama => "llama",
        }
    }

    /// The variant for a `model_type` (or GGUF `general.architecture`) read from `path`.
    pub fn from_model_type(model_type: &str, path: &Path) -> Result<Self> {
        match model_type {
            // The encoder families our BERT backbone loads (mtl_nn::ENCODER_FAMILIES).
            "bert" | "roberta" | "xlm-roberta" | "camembert" | "electra" | "distilbert" | "mpnet" | "deberta-v2"
            | "modernbert" => Ok(Architecture::Bert),
            // GGUF files name Gemma 3 `gemma3`, its text-only config.json `gemma3_text`.
            "llama" | "gemma3" | "gemma3_text" => Ok(Architecture::Llama),
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

/// The GGUF file at `path` (a file that starts with GGUF's magic bytes, whatever its name: the Hugging Face
/// cache keeps them as extensionless blobs; or the one `.gguf` file of a directory); `None` where `path` is a
/// directory without one. A directory with several is an error: which one is meant?
pub fn gguf_file(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
        let is_gguf = file.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
        return match is_gguf {
            true => Ok(Some(path.to_owned())),
            false => Err(Error::Invalid {
                path: path.to_owned(),
                message: "not a GGUF file; a model is a GGUF file or a model directory".into(),
            }),
        };
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
        assert_eq!(
            e.to_string(),
            "m/config.json: unsupported model_type \"gpt2\"; supported: bert, roberta, xlm-roberta, camembert, electra, distilbert, mpnet, deberta-v2, modernbert, llama, gemma3, gemma3_text"
        );
    }

    #[test]
    fn detects_bert_and_llama_directories() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        assert_eq!(Architecture::detect(&root.join("tiny-bert"))?, Architecture::Bert);
        assert_eq!(Architecture::detect(&root.join("tiny-llama"))?, Architecture::Llama);
        Ok(())
    }

    #[test]
    fn a_gguf_file_is_known_by_its_magic_bytes_not_its_name() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        // The Hugging Face cache keeps files as extensionless blobs.
        let blob = dir.path().join("0a1b2c");
        std::fs::write(&blob, b"GGUF\x03\x00\x00\x00").map_err(Error::io(&blob))?;
        assert_eq!(gguf_file(&blob)?, Some(blob.clone()));
        let other = dir.path().join("model.gguf.txt");
        std::fs::write(&other, b"not a model").map_err(Error::io(&other))?;
        let e = gguf_file(&other).expect_err("no magic bytes");
        assert!(e.to_string().contains("not a GGUF file"), "{e}");
        Ok(())
    }
}
