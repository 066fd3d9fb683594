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
