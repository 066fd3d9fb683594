//! Byte-level BPE tokenizers built from a vocabulary and a merge list, as a GGUF file's `tokenizer.ggml.*`
//! metadata holds them (llama.cpp's `gpt2` model). The pre-tokenizer is llama.cpp's `smollm` one (shared by
//! StarCoder-style vocabularies): every digit apart, then GPT-2's byte-level split, with no space added in
//! front; control tokens (chat markers) are kept whole and never split.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::{DataError, Result};

/// A byte-level BPE vocabulary: tokens by id, merges as `"left right"`, and the ids of the control tokens.
#[derive(Clone, Debug, Default)]
pub struct ByteLevelVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub special: Vec<u32>,
}

/// The tokenizer of `vocab`; `source` names where it came from in errors.
pub fn byte_level_bpe(vocab: &ByteLevelVocab, source: &Path) -> Result<Tokenizer> {
    let err = |message: String| DataError::Tokenizer { path: source.to_owned(), message };
    let ids: tokenizers::models::bpe::Vocab =
        vocab.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = vocab
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder().vocab_and_merges(ids, merges).build().map_err(|e| err(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre: Vec<PreTokenizerWrapper> = vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()];
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = vocab
        .special
        .iter()
        .map(|&i| {
            vocab
                .tokens
                .get(i as usize)
                .map(|t| AddedToken::from(t.clone(), true))
                .ok_or_else(|| err(format!("special token id {i} is not in the vocabulary")))
        })
        .collect::<Result<_>>()?;
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}
