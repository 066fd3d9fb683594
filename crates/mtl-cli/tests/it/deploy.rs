//! `mtl quantize` and `mtl prune` on the tiny model: the models they write load everywhere a model does,
//! score what their metrics.json says, and the transforms refuse what they cannot do.

use serde_json::Value;

use crate::cli::{mtl, stderr, Project, TestResult};

fn json(path: &std::path::Path) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// `mtl predict --full-precision` on two lines, parsed.
fn predict(p: &Project, model: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let o = mtl(
        p.dir.path(),
        &["predict", "--model", model, "--full-precision"],
        Some("show me flights to boston\nwhat is the fare\n"),
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    Ok(String::from_utf8(o.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
}

#[test]
fn quantized_and_pruned_models_are_models_and_report_their_score_change() -> TestResult {
    let p = Project::new()?;
    let o = p.mtl(&["train", "config.toml", "--out", "run", "--set", "training.epochs=2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let source = json(&p.path("run/metrics.json"))?;

    let o = p.mtl(&["quantize", "--model", "run", "--out", "int8"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(p.path("int8/int8.safetensors").exists());
    let m = json(&p.path("int8/metrics.json"))?;
    let change = &m["changes"]["test"]["intent"]["accuracy"];
    assert_eq!(change["before"], source["test"]["intent"]["accuracy"], "scored against the model it came from");
    assert_eq!(change["after"], m["test"]["intent"]["accuracy"]);
    assert!(m["changes"]["dev"]["slots"]["f1"]["change"].is_number());
    // The int8 file holds the projections only: the f32 file lost them (2 layers × (4·32² + 2·32·64)).
    assert_eq!(
        m["f32_params_before"].as_u64().ok_or("count")? - m["f32_params"].as_u64().ok_or("count")?,
        2 * (4 * 32 * 32 + 2 * 32 * 64)
    );
    // It evaluates to what its metrics say, and predicts close to the f32 model.
    let o = p.mtl(&["eval", "--model", "int8", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let scores: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(scores["test"], m["test"]);
    let (f32_out, int8_out) = (predict(&p, "run")?, predict(&p, "int8")?);
    for (a, b) in f32_out.iter().zip(&int8_out) {
        let (a, b) = (&a["predictions"]["intent"], &b["predictions"]["intent"]);
        let (pa, pb) = (a["score"].as_f64().ok_or("score")?, b["score"].as_f64().ok_or("score")?);
        if a["label"] == b["label"] {
            assert!((pa - pb).abs() < 0.02, "f32 {a} vs int8 {b}");
        } else {
            assert!(pa < 0.52 && pb < 0.52, "labels differ off a tie: f32 {a} vs int8 {b}");
        }
    }
    // `mtl info` says so before anything is tried: what the int8 run holds and what it can do.
    let o = p.mtl(&["info", "int8"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let info: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(info["manifest"]["weights"], "int8", "{info}");
    let ops = &info["capabilities"]["operations"];
    assert!(ops["predict"].is_null() && ops["serve_tasks"].is_null(), "{info}");
    for refused in ["export", "quantize", "add_task", "generate"] {
        assert!(ops[refused].is_string(), "{refused}: {info}");
    }
    // Quantised twice, exported or given new tasks: refused.
    let o = p.mtl(&["export", "--model", "int8", "--out", "int8-hf"])?;
    assert!(!o.status.success() && stderr(&o).contains("int8"), "{}", stderr(&o));
    let o = p.mtl(&["add-task", "--model", "int8", "--config", "config.toml", "--out", "int8-more"])?;
    assert!(!o.status.success() && stderr(&o).contains("int8"), "{}", stderr(&o));
    let o = p.mtl(&["quantize", "--model", "int8", "--out", "int8-again"])?;
    assert!(!o.status.success() && stderr(&o).contains("int8 already"), "{}", stderr(&o));
    let o = p.mtl(&["quantize", "--model", "run", "--out", "int8"])?;
    assert!(!o.status.success() && stderr(&o).contains("already exists"), "{}", stderr(&o));

    let o = p.mtl(&["prune", "--model", "run", "--layers", "1", "--out", "pruned"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&p.path("pruned/config.json"))?["num_hidden_layers"], 1);
    let m = json(&p.path("pruned/metrics.json"))?;
    assert_eq!(m["transform"]["dropped_top_layers"], 1);
    let o = p.mtl(&["eval", "--model", "pruned", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout)?["test"], m["test"]);
    // A pruned model is a base to fine-tune from (model cutting, then training to recover): its heads and
    // its shallower encoder load as the starting point.
    let pruned_path = format!("model.path=\"{}\"", p.path("pruned").display());
    let o =
        p.mtl(&["train", "config.toml", "--out", "pruned-tuned", "--set", &pruned_path, "--set", "training.epochs=1"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&p.path("pruned-tuned/config.json"))?["num_hidden_layers"], 1);
    // Pruned then quantised: both apply.
    let o = p.mtl(&["quantize", "--model", "pruned", "--out", "pruned-int8"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(predict(&p, "pruned-int8")?.len(), 2);
    let o = p.mtl(&["prune", "--model", "run", "--layers", "2", "--out", "empty"])?;
    assert!(!o.status.success() && stderr(&o).contains("at least one must stay"), "{}", stderr(&o));
    assert!(!p.path("empty").exists(), "nothing is written on failure");
    Ok(())
}

#[test]
fn lora_models_quantize_when_their_adapter_merges() -> TestResult {
    let p = Project::new()?;
    for (run, per_task) in [("shared", "false"), ("per-task", "true")] {
        let per_task_set = format!("peft.per_task={per_task}");
        let args = [
            "train",
            "config.toml",
            "--out",
            run,
            "--set",
            "training.epochs=1",
            "--set",
            "peft.method=\"lora\"",
            "--set",
            &per_task_set,
        ];
        let o = p.mtl(&args)?;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // A shared adapter merges: the int8 model stands alone (no base in its manifest, no adapters).
    let o = p.mtl(&["quantize", "--model", "shared", "--out", "shared-int8"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(p.path("shared-int8/run.json"))?)?;
    assert!(manifest["base"].is_null() && manifest["weights"] == "int8", "{manifest}");
    assert!(!p.path("shared-int8/adapters.safetensors").exists());
    let toml = std::fs::read_to_string(p.path("shared-int8/mtl.toml"))?;
    assert!(!toml.contains("lora"), "{toml}");
    let m = json(&p.path("shared-int8/metrics.json"))?;
    let change = m["changes"]["test"]["intent"]["accuracy"]["change"].as_f64().ok_or("change")?;
    assert!(change.abs() <= 0.5, "{change}");
    assert_eq!(predict(&p, "shared-int8")?.len(), 2);
    // Per-task adapters do not: a clear refusal.
    let o = p.mtl(&["quantize", "--model", "per-task", "--out", "per-task-int8"])?;
    assert!(!o.status.success() && stderr(&o).contains("per-task adapters"), "{}", stderr(&o));
    Ok(())
}
