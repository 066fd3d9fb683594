//! The facade end to end on the tiny random model: a run trained through the library, reopened, asked what
//! it can do, and a run of format 0 (before the manifest) still opening.

use std::path::{Path, PathBuf};

use crate::{Config, Error, Input, Operation, PredictOptions, Result, Run, TrainOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(Error::io(Path::new("tmp")))
}

/// The tiny two-task config with paths from the repository root, and `sets` applied.
fn tiny_config(sets: &[&str]) -> Result<(Config, PathBuf)> {
    let source = root().join("tests/python/tiny-run.toml");
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.push("training.epochs=1".into());
    let mut config = Config::load(&source, &sets)?;
    config.model.path = root().join(&config.model.path);
    for task in config.tasks.values_mut() {
        task.data.train = root().join(&task.data.train);
        task.data.dev = task.data.dev.as_ref().map(|d| root().join(d));
    }
    Ok((config, source))
}

#[test]
fn a_run_trained_through_the_library_reopens_and_predicts() -> Result<()> {
    let dir = tmp()?;
    let out = dir.path().join("run");
    let (config, source) = tiny_config(&[])?;
    let training = crate::train(&config, &source, &out, &TrainOptions::default())?;
    let report = training.run.ok_or(Error::Usage("no run".into()))?;
    let run = Run::open(&out)?;
    let caps = run.capabilities();
    assert!(caps.can(Operation::Export) && caps.can(Operation::ServeTasks) && !caps.can(Operation::Generate));
    let e = run.require(Operation::Generate).expect_err("an encoder does not generate");
    assert!(e.to_string().contains("no language-model head"), "{e}");
    // Evaluating the reopened run gives the scores training reported.
    let scores = run.evaluate(&config, &source)?;
    assert_eq!(Some(&scores["dev"]), report.dev.as_ref().map(|d| &d.scores));
    let records = run.predict(&[Input::Text("flights to boston".into())], &PredictOptions::default())?;
    assert_eq!(records.len(), 1);
    let json = serde_json::to_value(&records[0]).map_err(|e| Error::Usage(e.to_string()))?;
    assert!(
        json["predictions"]["intent"]["label"].is_string() && json["predictions"]["slots"]["tags"].is_array(),
        "{json}"
    );
    Ok(())
}

/// Rewrites a run of this format as format 0 wrote it: no `run.json`; a LoRA run's `base_model.json` with the
/// base's absolute path and the CRC-32 of its weights.
fn to_format_0(run: &Path, base: &Path) -> Result<()> {
    std::fs::remove_file(run.join(crate::manifest::MANIFEST)).map_err(Error::io(run))?;
    let weights = base.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(Error::io(&weights))?;
    let meta = serde_json::json!({"path": base.canonicalize().map_err(Error::io(base))?, "weights_crc32": crc32fast::hash(&bytes)});
    crate::error::write_text(&run.join("base_model.json"), &meta.to_string())
}

#[test]
fn runs_of_format_0_still_open() -> Result<()> {
    let dir = tmp()?;
    let out = dir.path().join("run");
    let (config, source) = tiny_config(&["peft.method=\"lora\""])?;
    crate::train(&config, &source, &out, &TrainOptions::default())?;
    let opts = PredictOptions::default();
    let inputs = [Input::Text("flights to boston".into())];
    let before = Run::open(&out)?.predict(&inputs, &opts)?;
    to_format_0(&out, &config.model.path)?;
    let run = Run::open(&out)?;
    assert_eq!(run.manifest().format_version, 0);
    assert_eq!(run.manifest().weights, crate::WeightLayout::Adapters);
    assert_eq!(run.predict(&inputs, &opts)?, before);
    // The CRC-32 is checked as before.
    let meta = out.join("base_model.json");
    let text = crate::error::read_text(&meta)?.replace("\"weights_crc32\":", "\"weights_crc32\":1");
    crate::error::write_text(&meta, &text)?;
    let e = Run::open(&out).expect_err("the checksum no longer matches");
    assert!(e.to_string().contains("base_model.json") && e.to_string().contains("have changed"), "{e}");
    Ok(())
}

#[test]
fn a_run_moved_with_its_base_still_opens() -> Result<()> {
    // A private copy of the base beside the run: both move together, the relative path still holds.
    let dir = tmp()?;
    let base = dir.path().join("assets/base");
    std::fs::create_dir_all(&base).map_err(Error::io(&base))?;
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let from = root().join("tests/fixtures/tiny-bert").join(name);
        std::fs::copy(&from, base.join(name)).map_err(Error::io(&from))?;
    }
    let (mut config, source) = tiny_config(&["peft.method=\"lora\""])?;
    config.model.path = base;
    let runs = dir.path().join("runs");
    std::fs::create_dir(&runs).map_err(Error::io(&runs))?;
    crate::train(&config, &source, &runs.join("a"), &TrainOptions::default())?;
    let moved = tmp()?;
    for sub in ["assets", "runs"] {
        std::fs::rename(dir.path().join(sub), moved.path().join(sub)).map_err(Error::io(moved.path()))?;
    }
    let run = Run::open(&moved.path().join("runs/a"))?;
    assert_eq!(run.manifest().base.as_ref().map(|b| b.path.as_path()), Some(Path::new("../../assets/base")));
    Ok(())
}

/// A copy of the tiny Llama as transformers saves a large model: its weights in two shards with
/// `model.safetensors.index.json`, stored as bf16, and a `chat_template.jinja`; with a word-level tokenizer.
fn sharded_decoder(dir: &Path) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let fixture = root().join("tests/fixtures/tiny-llama");
    std::fs::copy(fixture.join("config.json"), dir.join("config.json")).map_err(Error::io(dir))?;
    let weights = candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert(name.to_string(), weights[*name].to_dtype(DType::BF16)?);
        map.insert(name.to_string(), format!("model-0000{}-of-00002.safetensors", shard + 1).into());
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(shard, dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)))?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    crate::error::write_text(&dir.join(crate::manifest::SHARD_INDEX), &index.to_string())?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        ["<s>", "</s>", "[UNK]", "hello", "world", "user:", "assistant:"]
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    crate::error::write_text(&dir.join("tokenizer.json"), &tokenizer.to_string())?;
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}assistant:";
    crate::error::write_text(&dir.join("chat_template.jinja"), template)
}

#[test]
fn a_sharded_bf16_decoder_with_a_jinja_chat_template_loads_as_the_single_file() -> Result<()> {
    let dir = tmp()?;
    let sharded = dir.path().join("sharded");
    sharded_decoder(&sharded)?;
    let files = crate::decoder::DecoderFiles::load(&sharded, true)?;
    let want = candle_core::safetensors::load(
        root().join("tests/fixtures/tiny-llama/model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(files.weights.dense.len(), want.len());
    for (name, w) in &want {
        let got = &files.weights.dense[name];
        assert_eq!(got.dtype(), candle_core::DType::F32, "{name}");
        // bf16 keeps 8 bits of mantissa: within 2^-8 of each value.
        let diff = (got - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= scale / 256.0, "{name}: {diff} of {scale}");
    }
    let decoder = crate::Decoder::load(&sharded)?;
    assert_eq!(decoder.chat_prompt("hello world", None)?, "user: hello world assistant:");
    // A run's manifest checks every shard: one changed shard is a changed base.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).map_err(Error::io(&run))?;
    let base = crate::manifest::BaseRef::new(&sharded, &run)?;
    base.resolve(&run)?;
    let shard = sharded.join("model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).map_err(Error::io(&shard))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).map_err(Error::io(&shard))?;
    let e = base.resolve(&run).expect_err("a shard changed");
    assert!(e.to_string().contains("have changed since the adapters were trained"), "{e}");
    Ok(())
}
