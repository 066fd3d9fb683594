//! Tokenization with word alignment, through the `tokenizers` crate.

use std::path::Path;

use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams};

use crate::{DataError, Input, Result};

/// Token ids of one input and where each word starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Token position of each word's first sub-token; `None` when truncation removed the word (or it
    /// produced no token). Empty for raw-text inputs.
    pub word_starts: Vec<Option<usize>>,
    /// Whether truncation cut tokens off.
    pub truncated: bool,
}

/// One window of a question and its context, `[CLS] question [SEP] context[i..j] [SEP]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QaWindow {
    pub encoded: Encoded,
    /// For each token, its character span in the context; `None` outside the context.
    pub offsets: Vec<Option<(usize, usize)>>,
    /// Each token as explanations show it.
    pub pieces: Vec<Piece>,
}

/// One token of an encoded input, as explanations show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The token as the vocabulary spells it (`##ing`, `Ġthe`, `[CLS]`).
    pub token: String,
    /// A token the tokenizer adds ([CLS], [SEP], `<s>`, …).
    pub special: bool,
    /// Which text it comes from: 0 the text, the words or the question; 1 a pair's second text or the
    /// context. `None` for a special token.
    pub sequence: Option<usize>,
    /// Which word of that text it belongs to (the tokenizer's own split into words: punctuation is a word of
    /// its own; for pre-split words, the word given).
    pub word: Option<u32>,
    /// Its span in that text, in characters (in its word, for pre-split words).
    pub offsets: (usize, usize),
}

fn pieces_of(e: &Encoding) -> Vec<Piece> {
    (0..e.len())
        .map(|i| {
            let special = e.get_special_tokens_mask()[i] == 1;
            Piece {
                token: e.get_tokens()[i].clone(),
                special,
                sequence: if special { None } else { e.get_sequence_ids()[i] },
                word: if special { None } else { e.get_word_ids()[i] },
                offsets: e.get_offsets()[i],
            }
        })
        .collect()
}

/// The model's tokenizer, with its fixed padding removed (batches are padded to their longest sequence)
/// and truncation set to `max_len` tokens, special tokens included.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, for inputs cut into windows.
    whole: Tokenizer,
    /// The tokenizer of pre-split words: a byte-level BPE's (RoBERTa's) with a prefix space, so that every word
    /// is tokenized as it is after a space in running text (transformers requires `add_prefix_space=True` for
    /// `is_split_into_words`); the same tokenizer otherwise.
    words: Tokenizer,
    max_len: usize,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { path: path.to_owned(), message: e.to_string() })?;
        Self::from_tokenizer(tokenizer, path, max_len)
    }

    /// An encoder over a tokenizer already built (`path`: where it came from, for messages).
    pub fn from_tokenizer(mut tokenizer: Tokenizer, path: &Path, max_len: usize) -> Result<Self> {
        let err = |message: String| DataError::Tokenizer { path: path.to_owned(), message };
        tokenizer.with_padding(None);
        let mut whole = tokenizer.clone();
        whole.with_truncation(None).map_err(|e| err(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| err(e.to_string()))?;
        let mut words = tokenizer.clone();
        if let Some(tokenizers::PreTokenizerWrapper::ByteLevel(level)) = tokenizer.get_pre_tokenizer() {
            if !level.add_prefix_space {
                let mut level = *level;
                level.add_prefix_space = true;
                words.with_pre_tokenizer(Some(level));
            }
        }
        Ok(Self { tokenizer, whole, words, max_len })
    }

    /// BERT's WordPiece tokenizer from a `vocab.txt` (one token per line, `[CLS]`, `[SEP]`, `[UNK]` among
    /// them), as transformers' `BertTokenizerFast` builds it: BERT's normaliser (lower-casing where
    /// `lowercase`), its pre-tokenizer, `##` continuations, `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` with token
    /// types 0 and 1.
    pub fn wordpiece(vocab_path: &Path, lowercase: bool) -> Result<Tokenizer> {
        let err = |message: String| DataError::Tokenizer { path: vocab_path.to_owned(), message };
        let text = std::fs::read_to_string(vocab_path).map_err(|e| err(e.to_string()))?;
        let mut vocab = serde_json::Map::new();
        for (id, token) in text.lines().map(|l| l.trim_end_matches('\r')).enumerate() {
            vocab.entry(token.to_string()).or_insert(id.into());
        }
        let id = |t: &str| vocab.get(t).and_then(serde_json::Value::as_u64).ok_or_else(|| err(format!("no {t} token")));
        let (cls, sep, unk) = (id("[CLS]")?, id("[SEP]")?, id("[UNK]")?);
        let special = |t: &str, id: u64| {
            serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        };
        let mut added = vec![special("[CLS]", cls), special("[SEP]", sep), special("[UNK]", unk)];
        for t in ["[PAD]", "[MASK]"] {
            if let Ok(i) = id(t) {
                added.push(special(t, i));
            }
        }
        let piece = |t: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let seq = |s: &str, type_id: u32| serde_json::json!({"Sequence": {"id": s, "type_id": type_id}});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [piece("[CLS]", 0), seq("A", 0), piece("[SEP]", 0)],
                "pair": [piece("[CLS]", 0), seq("A", 0), piece("[SEP]", 0), seq("B", 1), piece("[SEP]", 1)],
                "special_tokens": {
                    "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}
                }},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        });
        json.to_string().parse::<Tokenizer>().map_err(|e| err(e.to_string()))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Encodes one input with the special tokens ([CLS] … [SEP] for BERT). A question is encoded as one
    /// truncated pair; use [`TextEncoder::question_windows`] to cover a long context.
    pub fn encode(&self, input: &Input) -> Result<Encoded, String> {
        let encoding = match input {
            Input::Text(t) => self.tokenizer.encode(t.as_str(), true),
            Input::Pair(a, b) => self.tokenizer.encode((a.as_str(), b.as_str()), true),
            Input::Question { question, context } => self.tokenizer.encode((question.as_str(), context.as_str()), true),
            Input::Words(w) => {
                let words: Vec<&str> = w.iter().map(String::as_str).collect();
                self.words.encode(words.as_slice(), true)
            }
        }
        .map_err(|e| format!("cannot tokenize: {e}"))?;
        let word_starts = match input {
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
            _ => Vec::new(),
        };
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
            word_starts,
            truncated: !encoding.get_overflowing().is_empty(),
        })
    }

    /// The tokens of `input` as [`TextEncoder::encode`] gives their ids, each with its text and word.
    pub fn pieces(&self, input: &Input) -> Result<Vec<Piece>, String> {
        let encoding = match input {
            Input::Text(t) => self.tokenizer.encode_char_offsets(t.as_str(), true),
            Input::Pair(a, b) => self.tokenizer.encode_char_offsets((a.as_str(), b.as_str()), true),
            Input::Question { question, context } => {
                self.tokenizer.encode_char_offsets((question.as_str(), context.as_str()), true)
            }
            Input::Words(w) => {
                let words: Vec<&str> = w.iter().map(String::as_str).collect();
                self.words.encode_char_offsets(words.as_slice(), true)
            }
        }
        .map_err(|e| format!("cannot tokenize: {e}"))?;
        Ok(pieces_of(&encoding))
    }

    /// Cuts a question and a long context into windows of at most `max_len` tokens: the question (cut to
    /// `max_query_len` tokens) with consecutive pieces of the context that share `stride` tokens, as
    /// transformers' QA preprocessing (`return_overflowing_tokens`, `stride`) does. Offsets are in characters.
    pub fn question_windows(
        &self,
        question: &str,
        context: &str,
        max_query_len: usize,
        stride: usize,
    ) -> Result<Vec<QaWindow>, String> {
        let err = |e: tokenizers::Error| format!("cannot tokenize: {e}");
        let mut q = self.whole.encode_char_offsets(question, false).map_err(err)?;
        if q.len() > max_query_len {
            q.truncate(max_query_len, 0, TruncationDirection::Right);
        }
        let q_plain = plain(&q);
        let specials = self.whole.get_post_processor().map_or(0, |p| p.added_tokens(true));
        let budget = self.max_len.checked_sub(q_plain.len() + specials).filter(|b| *b > stride).ok_or_else(|| {
            format!("the question leaves no room for the context in {} tokens (stride {stride})", self.max_len)
        })?;
        let mut c = self.whole.encode_char_offsets(context, false).map_err(err)?;
        if c.is_empty() {
            return Err("the context has no tokens".into());
        }
        c.truncate(budget, stride, TruncationDirection::Right);
        let mut pieces = vec![plain(&c)];
        pieces.extend(c.get_overflowing().iter().map(plain));
        pieces
            .into_iter()
            .map(|piece| {
                let full = self.whole.post_process(q_plain.clone(), Some(piece), true).map_err(err)?;
                let offsets = full
                    .get_sequence_ids()
                    .iter()
                    .zip(full.get_offsets())
                    .map(|(seq, &o)| (*seq == Some(1)).then_some(o))
                    .collect();
                let encoded = Encoded {
                    ids: full.get_ids().to_vec(),
                    type_ids: full.get_type_ids().to_vec(),
                    word_starts: Vec::new(),
                    truncated: false,
                };
                Ok(QaWindow { encoded, offsets, pieces: pieces_of(&full) })
            })
            .collect()
    }
}

/// An encoding without its overflowing windows.
fn plain(e: &Encoding) -> Encoding {
    let mut e = e.clone();
    e.set_overflowing(Vec::new());
    e
}

#[cfg(test)]
mod wordpiece_tests {
    use super::*;

    /// BERT's WordPiece built from a vocab.txt gives transformers' BertTokenizerFast ids and token types
    /// (tests/fixtures/tiny-bert-bin/wordpiece.json).
    #[test]
    fn wordpiece_from_vocab_matches_transformers() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert-bin");
        let tokenizer = TextEncoder::wordpiece(&dir.join("vocab.txt"), true)?;
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("wordpiece.json"))?)?;
        for t in want["texts"].as_array().ok_or("texts")? {
            let got = tokenizer.encode(t["text"].as_str().ok_or("text")?, true).map_err(|e| e.to_string())?;
            assert_eq!(serde_json::to_value(got.get_ids())?, t["ids"], "{}", t["text"]);
        }
        for p in want["pairs"].as_array().ok_or("pairs")? {
            let (a, b) = (p["a"].as_str().ok_or("a")?, p["b"].as_str().ok_or("b")?);
            let got = tokenizer.encode((a, b), true).map_err(|e| e.to_string())?;
            assert_eq!(serde_json::to_value(got.get_ids())?, p["ids"], "{a} / {b}");
            assert_eq!(serde_json::to_value(got.get_type_ids())?, p["type_ids"], "{a} / {b}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod byte_level_tests {
    use super::*;

    /// A byte-level BPE without a prefix space (RoBERTa's tokenizer.json): running text tokenizes its first
    /// word bare and the others with their space (`Ġ`); pre-split words each take the spaced form, as
    /// transformers tokenizes them with `add_prefix_space=True` (which it requires for split words).
    #[test]
    fn split_words_take_the_spaced_form_under_byte_level_bpe() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let vocab = serde_json::json!({"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "\u{120}hello": 4, "\u{120}world": 5,
                                       "h": 6, "e": 7, "l": 8, "o": 9, "w": 10, "r": 11, "d": 12, "\u{120}": 13});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 0],
                               "trim_offsets": true, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                      "vocab": vocab, "merges": []}
        });
        let tokenizer: Tokenizer = json.to_string().parse().map_err(|e| format!("{e}"))?;
        let encoder = TextEncoder::from_tokenizer(tokenizer, Path::new("t.json"), 16)?;
        let text = encoder.encode(&Input::Text("hello world".into()))?;
        assert_eq!(text.ids, [0, 2, 5, 1]);
        let words = encoder.encode(&Input::Words(vec!["hello".into(), "world".into()]))?;
        assert_eq!(words.ids, [0, 4, 5, 1]);
        assert_eq!(words.word_starts, [Some(1), Some(2)]);
        Ok(())
    }
}
