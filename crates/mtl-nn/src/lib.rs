//! Neural-network code: our own trainable BERT encoder, task heads, the multi-task model, and weight I/O.
//!
//! Everything here is built from differentiable candle ops: we do not train through candle-transformers'
//! BERT, whose LayerNorm fast path has no backward and whose Dropout does nothing. A test asserts that every
//! parameter receives a non-zero gradient. Depends on `mtl-core` and `mtl-data`.

pub mod attention;
mod bert;
pub mod cpu;
mod crf;
pub mod deberta;
pub mod decoder;
pub mod explain;
pub mod generate;
pub mod gguf;
mod heads;
mod layers;
pub mod llama;
mod model;
pub mod modernbert;
mod params;
pub mod peft;

pub use bert::BertInput;
pub use bert::{Activation, Bert, BertConfig, Kernels, Precision, ENCODER_FAMILIES};
pub use crf::{viterbi, ChainScores, Crf, Transitions};
pub use decoder::DecoderModel;
pub use heads::{binary_cross_entropy_with_logits, Head, HeadOutput, HeadSpec, RegressionLoss};
pub use layers::{DropoutRng, LayerNorm, Linear};
pub use model::{ModelSpec, MultiTaskModel, TaskLoss, TaskPrediction};
pub use modernbert::PredictionHead;
pub use params::{canonical_name, family_name, family_prefix, ParamBuilder, ParamStore};
pub use peft::{LoraSpec, PeftKind, PeftSpec, Placement, Route, SHARED_ADAPTER};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: missing tensors: {names}")]
    MissingTensors { path: PathBuf, names: String },
    /// An adapter a task or a call names that the model does not have.
    #[error("{0}")]
    UnknownAdapter(String),
    /// What the model cannot do as it is (merged already, int8 already, a head it has no backbone for).
    #[error("{0}")]
    Unsupported(String),
    /// Inputs that do not fit the model: shapes, lengths, labels outside the vocabulary, routes.
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

#[cfg(test)]
mod decoder_tests;
#[cfg(test)]
mod int8_tests;
#[cfg(test)]
mod llama_tests;
#[cfg(test)]
mod peft_tests;
#[cfg(test)]
mod tests;
