//! Tokenization with word alignment, through the `tokenizers` crate.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::{DataError, Input, Result};

/// Token ids of one input and where each word starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Token position of each word's first sub-token; `None` when truncation removed the word (or it
    /// produced no token). Empty for raw-text inputs.
    pub word_starts: Vec<Option<usize>>,
}

/// The model's tokenizer, with its fixed padding removed (batches are padded to their longest sequence)
/// and truncation set to `max_len` tokens, special tokens included.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let err = |message: String| DataError::Tokenizer { path: path.to_owned(), message };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { tokenizer })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes one input with the special tokens ([CLS] … [SEP] for BERT).
    pub fn encode(&self, input: &Input) -> Result<Encoded, String> {
        let encoding = match input {
            Input::Text(t) => self.tokenizer.encode(t.as_str(), true),
            Input::Words(w) => {
                let words: Vec<&str> = w.iter().map(String::as_str).collect();
                self.tokenizer.encode(words.as_slice(), true)
            }
        }
        .map_err(|e| format!("cannot tokenize: {e}"))?;
        let word_starts = match input {
            Input::Text(_) => Vec::new(),
            Input::Words(w) => {
                let mut starts = vec![None; w.len()];
                for (pos, word) in encoding.get_word_ids().iter().enumerate() {
                    if let Some(word) = word {
                        let slot = &mut starts[*word as usize];
                        if slot.is_none() {
                            *slot = Some(pos);
                        }
                    }
                }
                starts
            }
        };
        Ok(Encoded { ids: encoding.get_ids().to_vec(), type_ids: encoding.get_type_ids().to_vec(), word_starts })
    }
}
