//! The tokenizer of a base encoder, as the ecosystem saves it: a `tokenizer.json`, or BERT's `vocab.txt`.

use std::path::{Path, PathBuf};

use crate::error::{read_json, Error, Result};
use crate::manifest::TOKENIZER;

/// The tokenizer of a base encoder, and the file it came from: its `tokenizer.json`, else BERT's WordPiece
/// built from `vocab.txt` (lower-cased unless `tokenizer_config.json` says `"do_lower_case": false`).
pub(crate) fn base_tokenizer(base: &Path) -> Result<(tokenizers::Tokenizer, PathBuf)> {
    let json = base.join(TOKENIZER);
    let vocab = base.join("vocab.txt");
    if json.is_file() || !vocab.is_file() {
        if !json.is_file() {
            return Err(Error::Missing { path: json, what: "tokenizer (tokenizer.json, or a WordPiece vocab.txt)" });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&json)
            .map_err(|e| Error::Invalid { path: json.clone(), message: e.to_string() })?;
        return Ok((tokenizer, json));
    }
    // Only BERT's families tokenize with BERT's WordPiece ([CLS] … [SEP]); others name their own tokens.
    let config = base.join("config.json");
    let model_type = match config.is_file() {
        true => read_json::<serde_json::Value>(&config)?["model_type"].as_str().unwrap_or("bert").to_string(),
        false => "bert".into(),
    };
    if !["bert", "electra", "distilbert"].contains(&model_type.as_str()) {
        return Err(Error::Missing {
            path: json,
            what: "tokenizer (a vocab.txt is read only for BERT, ELECTRA and DistilBERT)",
        });
    }
    let settings = base.join("tokenizer_config.json");
    let lowercase = match settings.is_file() {
        true => read_json::<serde_json::Value>(&settings)?["do_lower_case"].as_bool().unwrap_or(true),
        false => true,
    };
    Ok((mtl_data::TextEncoder::wordpiece(&vocab, lowercase)?, vocab))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vocab_txt_is_read_for_bert_families_only() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).map_err(Error::io(dir.path()));
        write("vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")?;
        write("config.json", r#"{"model_type": "bert"}"#)?;
        let (tokenizer, source) = base_tokenizer(dir.path())?;
        assert!(source.ends_with("vocab.txt"));
        assert_eq!(tokenizer.encode("Hello", true).map_err(|e| Error::Usage(e.to_string()))?.get_ids(), [2, 4, 3]);
        // MPNet's vocab.txt holds <s> and [CLS] both: its own tokenizer.json is needed.
        write("config.json", r#"{"model_type": "mpnet"}"#)?;
        let e = base_tokenizer(dir.path()).expect_err("not BERT's tokenizer");
        assert!(e.to_string().contains("read only for BERT"), "{e}");
        Ok(())
    }
}
