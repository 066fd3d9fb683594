//! all-MiniLM-L6-v2 (fetched by scripts/fetch.sh) against transformers: tokenization with word alignment and
//! hidden states, from tests/fixtures/minilm-reference.json (made by scripts/make_fixtures.py); the same for
//! all-mpnet-base-v2 (mpnet-reference.json).

use std::collections::BTreeMap;

use candle_core::Device;
use mtl_core::{HostBatch, Mode};
use mtl_data::{Input, TextEncoder};
use mtl_nn::{BertConfig, ModelSpec, MultiTaskModel};
use serde_json::Value;

use crate::repo_root;

#[test]
fn minilm_matches_transformers() -> Result<(), Box<dyn std::error::Error>> {
    // BertModel without the pooler.
    real_encoder_matches("all-MiniLM-L6-v2", "minilm-reference.json", 22_565_376)
}

/// all-mpnet-base-v2 (MPNet: relative position bias, positions from pad_token_id + 1), from
/// tests/fixtures/mpnet-reference.json; `scripts/fetch.sh` fetches it.
#[test]
fn mpnet_matches_transformers() -> Result<(), Box<dyn std::error::Error>> {
    // MPNetModel without the pooler (transformers counts 108,895,872).
    real_encoder_matches("all-mpnet-base-v2", "mpnet-reference.json", 108_895_872)
}

/// The model `assets/models/MODEL` tokenizes the fixture's words as transformers did (ids, first sub-token of
/// each word), has `params` parameters, and gives transformers' last hidden states at the real tokens.
fn real_encoder_matches(name: &str, fixture: &str, params: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = repo_root().join("assets/models").join(name);
    assert!(dir.join("model.safetensors").is_file(), "{}: missing; run scripts/fetch.sh first", dir.display());
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures").join(fixture))?)?;
    let words: Vec<Vec<String>> = serde_json::from_value(reference["words"].clone())?;
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone())?;
    let want_mask: Vec<Vec<u32>> = serde_json::from_value(reference["attention_mask"].clone())?;
    let word_ids: Vec<Vec<Option<usize>>> = serde_json::from_value(reference["word_ids"].clone())?;

    // Tokenization: a fixed padding of the shipped tokenizer.json is overridden.
    let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"), 128)?;
    let seq = want_ids[0].len();
    let mut batch = HostBatch {
        batch: words.len(),
        seq,
        input_ids: vec![0; words.len() * seq],
        token_type_ids: vec![0; words.len() * seq],
        attention_mask: vec![0; words.len() * seq],
        word_starts: Vec::new(),
        targets: BTreeMap::new(),
    };
    for (b, w) in words.iter().enumerate() {
        let enc = encoder.encode(&Input::Words(w.clone()))?;
        let n = want_mask[b].iter().filter(|&&m| m == 1).count();
        assert_eq!(enc.ids, want_ids[b][..n], "token ids of sentence {b}");
        for (word, start) in enc.word_starts.iter().enumerate() {
            let first = word_ids[b].iter().position(|w| *w == Some(word));
            assert_eq!(*start, first, "first sub-token of word {word} of sentence {b}");
        }
        batch.input_ids[b * seq..b * seq + n].copy_from_slice(&enc.ids);
        batch.attention_mask[b * seq..b * seq + n].fill(1);
    }

    let bert = BertConfig::from_file(&dir.join("config.json"))?;
    let tasks = BTreeMap::new();
    let spec = ModelSpec { bert: &bert, tasks: &tasks, dropout: 0.1, seed: 0, peft: None };
    let model = MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu)?;
    assert_eq!(model.params().num_params(), params, "{name}: parameters");
    let hidden = model.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?;
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(reference["last_hidden_state"].clone())?;
    let mut max_diff = 0f64;
    for (b, sentence) in want.iter().enumerate() {
        for (t, row) in sentence.iter().enumerate() {
            if want_mask[b][t] == 0 {
                continue;
            }
            for (x, y) in hidden[b * seq + t].iter().zip(row) {
                max_diff = max_diff.max((f64::from(*x) - y).abs());
            }
        }
    }
    assert!(max_diff < 1e-4, "{name}: max abs difference to transformers: {max_diff}");
    Ok(())
}

/// QA windows against transformers' preprocessing (`truncation="only_second"`, `return_overflowing_tokens`,
/// `stride`, `return_offsets_mapping`), from tests/fixtures/qa-windows.json.
#[test]
fn qa_windows_match_transformers() -> Result<(), Box<dyn std::error::Error>> {
    let dir = repo_root().join("assets/models/all-MiniLM-L6-v2");
    assert!(dir.join("tokenizer.json").is_file(), "{}: missing; run scripts/fetch.sh first", dir.display());
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/qa-windows.json"))?)?;
    for case in &cases {
        let max_length = case["max_length"].as_u64().ok_or("max_length")? as usize;
        let stride = case["stride"].as_u64().ok_or("stride")? as usize;
        let (question, context) = (case["question"].as_str().ok_or("q")?, case["context"].as_str().ok_or("c")?);
        let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"), max_length)?;
        let windows = encoder.question_windows(question, context, 64, stride)?;
        let want = case["windows"].as_array().ok_or("windows")?;
        assert_eq!(windows.len(), want.len(), "number of windows for {question:?}");
        for (i, (got, want)) in windows.iter().zip(want).enumerate() {
            let ids: Vec<u32> = serde_json::from_value(want["input_ids"].clone())?;
            let types: Vec<u32> = serde_json::from_value(want["token_type_ids"].clone())?;
            let offsets: Vec<Option<(usize, usize)>> = serde_json::from_value(want["offsets"].clone())?;
            assert_eq!(got.encoded.ids, ids, "window {i} ids");
            assert_eq!(got.encoded.type_ids, types, "window {i} token types");
            assert_eq!(got.offsets, offsets, "window {i} character offsets");
        }
    }
    Ok(())
}
