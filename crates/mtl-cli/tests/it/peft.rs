//! LoRA end to end on the tiny model: only adapters and heads train and are saved, alone, in a small file that
//! loads onto the base model; per-task adapters train each on its own task; a changed base model is refused.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::cli::{mtl, stderr, Project, TestResult};
use crate::repo_root;

fn weights(path: &std::path::Path) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn train(p: &Project, out: &str, sets: &[&str]) -> TestResult {
    let mut args = vec!["train", "config.toml", "--out", out];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = p.mtl(&args)?;
    assert!(o.status.success(), "{sets:?}: {}", stderr(&o));
    Ok(())
}

fn metrics(p: &Project, run: &str) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(p.path(run).join("metrics.json"))?)?)
}

/// `mtl eval` on the run's saved model scores the test file as training's final evaluation did.
fn eval_matches_training(p: &Project, run: &str) -> TestResult {
    let o = p.mtl(&["eval", "--model", run, "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: Value = serde_json::from_slice(&o.stdout)?;
    let m = metrics(p, run)?;
    assert_eq!(eval["test"]["intent"]["accuracy"], m["test"]["intent"]["accuracy"], "{eval}");
    assert_eq!(eval["test"]["slots"]["f1"], m["test"]["slots"]["f1"], "{eval}");
    Ok(())
}

#[test]
fn lora_trains_and_saves_only_adapters_and_heads() -> TestResult {
    let p = Project::new()?;
    train(&p, "run", &["peft.method=\"lora\"", "peft.r=4"])?;
    let out = p.path("run");
    assert!(!out.join("model.safetensors").exists(), "the frozen backbone is not copied");
    let saved = weights(&out.join("adapters.safetensors"))?;
    let base = weights(&repo_root().join("tests/fixtures/tiny-bert/model.safetensors"))?;
    let lora: Vec<&String> = saved.keys().filter(|n| n.contains(".lora_")).collect();
    // A and B on query and value (the default targets) of both blocks.
    assert_eq!(lora.len(), 2 * 2 * 2, "{:?}", saved.keys());
    assert!(saved.keys().all(|n| n.contains(".lora_") || n.starts_with("heads.")), "{:?}", saved.keys());
    for name in &lora {
        assert!(name.contains(".lora_A.default.") || name.contains(".lora_B.default."), "{name}");
        let t = &saved[*name];
        if name.contains("lora_B") {
            // B starts at zero; training moved it.
            assert!(t.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name} did not train");
            assert_eq!(t.dims(), &[32, 4]);
        }
    }
    assert!(base.keys().all(|n| !saved.contains_key(n)));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(out.join("base_model.json"))?)?;
    assert_eq!(meta["path"].as_str(), Some(repo_root().join("tests/fixtures/tiny-bert").to_str().ok_or("path")?));
    eval_matches_training(&p, "run")?;
    let o = mtl(p.path("").as_path(), &["predict", "--model", "run"], Some("{\"text\": \"flights to boston\"}\n"))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let line: Value = serde_json::from_slice(&o.stdout)?;
    let predictions = &line["predictions"];
    assert!(predictions["intent"]["label"].is_string() && predictions["slots"]["tags"].is_array(), "{line}");
    Ok(())
}

#[test]
fn per_task_lora_gives_each_task_its_own_adapter() -> TestResult {
    let p = Project::new()?;
    let targets = "peft.target_modules=[\"query\", \"key\", \"value\", \"attention_output\", \"intermediate\", \"output\"]";
    train(&p, "run", &["peft.method=\"lora\"", "peft.per_task=true", targets])?;
    let saved = weights(&p.path("run/adapters.safetensors"))?;
    for task in ["intent", "slots"] {
        let b: Vec<&String> = saved.keys().filter(|n| n.contains(&format!(".lora_B.{task}."))).collect();
        assert_eq!(b.len(), 2 * 6, "{task}: {:?}", saved.keys());
        for name in b {
            assert!(saved[name].abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name} did not train");
        }
    }
    assert!(!saved.keys().any(|n| n.contains(".default.")), "no shared adapter");
    eval_matches_training(&p, "run")
}

#[test]
fn adapters_refuse_a_changed_base_model() -> TestResult {
    let p = Project::new()?;
    // A private copy of the base model, changed after training.
    let base = p.path("base");
    std::fs::create_dir(&base)?;
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(repo_root().join("tests/fixtures/tiny-bert").join(name), base.join(name))?;
    }
    train(&p, "run", &["peft.method=\"lora\"", &format!("model.path=\"{}\"", base.display())])?;
    let mut w = weights(&base.join("model.safetensors"))?;
    let name = "encoder.layer.0.output.dense.bias";
    let changed = (&w[name] + 0.5)?;
    w.insert(name.to_string(), changed);
    candle_core::safetensors::save(&w, base.join("model.safetensors"))?;
    let o = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("base_model.json") && e.contains("have changed since the adapters were trained"), "{e}");
    Ok(())
}

#[test]
fn bottleneck_adapters_train_per_task_and_save_alone() -> TestResult {
    let p = Project::new()?;
    train(&p, "run", &["peft.method=\"adapter\"", "peft.placement=\"houlsby\"", "peft.reduction_factor=8", "peft.per_task=true"])?;
    let saved = weights(&p.path("run/adapters.safetensors"))?;
    assert!(saved.keys().all(|n| n.contains(".adapters.") || n.starts_with("heads.")), "{:?}", saved.keys());
    for task in ["intent", "slots"] {
        // Two sites of two blocks; down and up, weight and bias; 32 / 8 = 4 units.
        let own: Vec<&String> = saved.keys().filter(|n| n.contains(&format!(".adapters.{task}."))).collect();
        assert_eq!(own.len(), 2 * 2 * 4, "{task}: {own:?}");
        let up = &saved[&format!("encoder.layer.1.output.adapters.{task}.up.weight")];
        assert_eq!(up.dims(), &[32, 4]);
        assert!(up.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{task}: up starts at zero and trains");
    }
    eval_matches_training(&p, "run")?;
    let o = p.mtl(&["export", "--model", "run", "--out", "hf"])?;
    assert!(!o.status.success() && stderr(&o).contains("bottleneck adapters change the network"), "{}", stderr(&o));
    Ok(())
}
