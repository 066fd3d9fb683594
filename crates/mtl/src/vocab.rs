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
    let settings = base.join("tokenizer_config.json");
    let lowercase = match settings.is_file() {
        true => read_json::<serde_json::Value>(&settings)?["do_lower_case"].as_bool().unwrap_or(true),
        false => true,
    };
    Ok((mtl_data::TextEncoder::wordpiece(&vocab, lowercase)?, vocab))
}
