//! A pretrained base model opened before any training: where it is, and the backbone its own files ask for.

use std::path::{Path, PathBuf};

use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::Architecture;

/// A pretrained base model, before any training: where it is and which backbone it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseModel {
    path: PathBuf,
    architecture: Architecture,
}

impl BaseModel {
    /// The base model at `path` (a Hugging Face directory, a GGUF file or a directory holding one), its
    /// architecture read from its own files.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_owned(), architecture: Architecture::detect(path)? })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// The base as a decoder for free generation; an encoder has no language-model head.
    pub fn decoder(&self) -> Result<Decoder> {
        if !self.architecture.is_decoder() {
            return Err(Error::Unsupported {
                run: self.path.clone(),
                message: "an encoder has no language-model head; generation takes a decoder model".into(),
            });
        }
        Decoder::load(&self.path)
    }
}
