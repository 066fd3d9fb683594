//! Data: readers for the general file formats (JSONL, CSV/TSV, CoNLL, CoNLL-U), label maps, tokenization with word
//! alignment, and collation into [`mtl_core::HostBatch`].
//!
//! Tasks that read the same file share its examples, so one example can carry labels for several heads;
//! a head without a label on an example gets [`mtl_core::IGNORE_INDEX`]. Every error names the file and the
//! line. Depends on `mtl-core` and `mtl-config`.

pub mod bpe;
mod collate;
mod dataset;
mod encode;
mod labels;
pub mod prompt;
mod read;

use std::path::PathBuf;

pub use collate::{collate, collate_lm, epoch_batches, epoch_order, Batching};
pub use dataset::{leave_out_unseen, Dataset, Example, Label, QaFeature, Question};
pub use encode::{Encoded, Piece, QaWindow, TextEncoder};
pub use labels::{LabelMap, Scale};
pub use read::{read_split, Answer, Input, Location, RawExample, RawLabel};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: no examples in this file")]
    Empty { path: PathBuf },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Labels(String),
}

impl DataError {
    pub(crate) fn at(loc: &Location, message: impl Into<String>) -> Self {
        DataError::Line { path: loc.path.clone(), line: loc.line, message: message.into() }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
