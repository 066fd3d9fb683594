//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! - Byte-level BPE from a vocabulary and a merge list (llama.cpp's `gpt2` model). Text is cut into words
//!   first as the file's `tokenizer.ggml.pre` says ([`WordSplit`]): llama.cpp's `smollm` split (shared by
//!   StarCoder-style vocabularies: every digit apart, then GPT-2's byte-level split), Llama 3's or Qwen2's,
//!   with no space added in front.
//! - SentencePiece BPE as Gemma's files hold it (llama.cpp's `llama` model): spaces become `▁`, unknown
//!   characters fall back to their UTF-8 bytes (`<0xE6>`), and the merges, which the file does not list, follow
//!   from the vocabulary: each token is the merge of every split of it into two tokens, ranked by the token's
//!   place in the file (earlier merges first), as transformers rebuilds them.
//!
//! Control tokens (chat markers) are kept whole and never split.

use std::path::Path;

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::{DataError, Result};

/// A byte-level BPE vocabulary: tokens by id, merges as `"left right"`, the ids of the control tokens, and how
/// text is split before the merges apply.
#[derive(Clone, Debug, Default)]
pub struct ByteLevelVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub special: Vec<u32>,
    pub split: WordSplit,
}

/// How a byte-level vocabulary cuts text into words before its merges apply (llama.cpp's
/// `tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WordSplit {
    /// Every digit apart, then GPT-2's split (`smollm`, `starcoder`, `refact`, `codeshell`).
    #[default]
    Smollm,
    /// Llama 3's: contractions of any case, letters with one leading non-letter, numbers of up to three
    /// digits, punctuation runs with their line breaks (`llama-bpe`, `llama3`, `llama-v3`, `smaug-bpe`,
    /// `dbrx`, `falcon3`).
    Llama3,
    /// Qwen2's: Llama 3's with every digit apart (`qwen2`, `deepseek-r1-qwen`, `megrez`).
    Qwen2,
}

/// Llama 3's split (the regular expression of its `tokenizer.json`, as llama.cpp and transformers apply it).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl WordSplit {
    /// The split of a GGUF file's `tokenizer.ggml.pre`, if this crate has it.
    pub fn of_gguf(pre: &str) -> Option<Self> {
        match pre {
            "smollm" | "starcoder" | "refact" | "codeshell" => Some(Self::Smollm),
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => Some(Self::Llama3),
            "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// Every `tokenizer.ggml.pre` value [`WordSplit::of_gguf`] knows.
    pub const GGUF_NAMES: [&'static str; 13] = [
        "smollm",
        "starcoder",
        "refact",
        "codeshell",
        "llama-bpe",
        "llama3",
        "llama-v3",
        "smaug-bpe",
        "dbrx",
        "falcon3",
        "qwen2",
        "deepseek-r1-qwen",
        "megrez",
    ];
}

/// A SentencePiece BPE vocabulary as Gemma's GGUF files hold it: tokens by id (their order ranks the merges),
/// the control and user-defined tokens, the unknown token, and whether encoding with special tokens starts
/// with the begin-of-sequence token.
#[derive(Clone, Debug, Default)]
pub struct SentencePieceVocab {
    pub tokens: Vec<String>,
    pub special: Vec<u32>,
    pub user_defined: Vec<u32>,
    pub unknown: Option<u32>,
    pub add_bos: bool,
    pub bos: Option<u32>,
}

/// A GGUF file's vocabulary.
#[derive(Clone, Debug)]
pub enum Vocab {
    ByteLevel(ByteLevelVocab),
    SentencePiece(SentencePieceVocab),
}

/// The tokenizer of `vocab`; `source` names where it came from in errors.
pub fn tokenizer(vocab: &Vocab, source: &Path) -> Result<Tokenizer> {
    match vocab {
        Vocab::ByteLevel(v) => byte_level_bpe(v, source),
        Vocab::SentencePiece(v) => sentencepiece_bpe(v, source),
    }
}

/// The merges a SentencePiece vocabulary implies: every split of a token into two tokens, the tokens in file
/// order (earlier first), a token's splits longest left part first.
fn implied_merges(tokens: &[String]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Each token ranked by its last place in the file (a token listed twice counts where the map keeps it).
    let mut order: Vec<(usize, &str)> = ids.iter().map(|(&t, &i)| (i, t)).collect();
    order.sort_unstable();
    let mut merges = Vec::new();
    for (_, token) in order {
        let cuts: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        // Longest left part first (transformers sorts by rank, then by the left part's length, descending).
        for &cut in cuts.iter().rev() {
            let (left, right) = token.split_at(cut);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}

/// The SentencePiece BPE tokenizer of `vocab` (see the module's documentation); `source` names where it came
/// from in errors.
pub fn sentencepiece_bpe(vocab: &SentencePieceVocab, source: &Path) -> Result<Tokenizer> {
    let err = |message: String| DataError::Tokenizer { path: source.to_owned(), message };
    let name = |id: u32| {
        vocab.tokens.get(id as usize).cloned().ok_or_else(|| err(format!("token id {id} is not in the vocabulary")))
    };
    // A whitespace-only token with a space in it is stored with real spaces; the normalised text spells spaces
    // `▁`. transformers respells such a token as that many `▁`, whatever its other whitespace; so does this.
    let respell = |t: &String| t.contains(' ') && t.chars().all(char::is_whitespace);
    let tokens: Vec<String> =
        vocab.tokens.iter().map(|t| if respell(t) { "▁".repeat(t.chars().count()) } else { t.clone() }).collect();
    let ids: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut builder = BPE::builder().vocab_and_merges(ids, implied_merges(&tokens)).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = vocab.unknown {
        builder = builder.unk_token(name(unk)?);
    }
    let bpe = builder.build().map_err(|e| err(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(Replace::new(" ", "▁").map_err(|e| err(e.to_string()))?));
    let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(|e| err(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(split));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(|e| err(e.to_string()))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    if let (true, Some(bos)) = (vocab.add_bos, vocab.bos) {
        let bos = name(bos)?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(|e| err(e.to_string()))?
            .special_tokens(vec![(bos.clone(), vocab.bos.unwrap_or_default())])
            .build()
            .map_err(|e| err(e.to_string()))?;
        tokenizer.with_post_processor(Some(template));
    }
    let special = vocab.special.iter().map(|&i| Ok(AddedToken::from(name(i)?, true))).collect::<Result<Vec<_>>>()?;
    tokenizer.add_special_tokens(&special);
    // User-defined tokens are matched whole, except those of spaces only, which the vocabulary spells with `▁`
    // (as transformers does: their file spelling is not in its vocabulary).
    let added = vocab
        .user_defined
        .iter()
        .map(|&i| Ok((name(i)?, i)))
        .filter(|t| t.as_ref().map_or(true, |(text, i)| tokens.get(*i as usize) == Some(text)))
        .map(|t| t.map(|(text, _)| AddedToken::from(text, false).normalized(false)))
        .collect::<Result<Vec<_>>>()?;
    tokenizer.add_tokens(&added);
    Ok(tokenizer)
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
    let regex = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false);
        Ok(split.map_err(|e| err(e.to_string()))?.into())
    };
    let pre: Vec<PreTokenizerWrapper> = match vocab.split {
        WordSplit::Smollm => vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()],
        WordSplit::Llama3 => vec![regex(LLAMA3_SPLIT)?, ByteLevel::new(false, true, false).into()],
        WordSplit::Qwen2 => vec![regex(QWEN2_SPLIT)?, ByteLevel::new(false, true, false).into()],
    };
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
