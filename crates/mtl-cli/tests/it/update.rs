//! `mtl update` on the tiny model: one task trained further on new data, the other replayed and pulled toward
//! its old weights (EWC); every task scored before and after; bad update files refused naming the field.

use serde_json::Value;

use crate::cli::{stderr, Project, TestResult};

fn update_file(extra: &str) -> String {
    format!(
        "[tasks.intent]\nkind = \"classification\"\nlabel_field = \"intent\"\ndata = {{ train = \"test.jsonl\", dev = \"dev.jsonl\", test = \"test.jsonl\" }}\n\n[training]\nepochs = 2\nbatch_size = 2\nlr = 1e-3\nseed = 3\n\n[update]\nrehearsal = 0.5\npenalty = \"ewc\"\nstrength = 0.1\ntolerance = 100.0\n{extra}"
    )
}

#[test]
fn update_trains_one_task_and_reports_every_task_before_and_after() -> TestResult {
    let p = Project::new()?;
    let o = p.mtl(&["train", "config.toml", "--out", "run", "--set", "training.epochs=8"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(p.path("update.toml"), update_file(""))?;
    let o = p.mtl(&["update", "--model", "run", "--config", "update.toml", "--out", "run2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8(o.stdout)?;
    assert!(table.contains("intent (updated)\tdev\taccuracy") && table.contains("slots\ttest\tf1"), "{table}");
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run2/metrics.json"))?)?;
    assert_eq!(metrics["updated_tasks"], serde_json::json!(["intent"]));
    assert_eq!(metrics["update"]["penalty"], "ewc");
    assert_eq!(metrics["update_changes"].as_array().map(Vec::len), Some(4), "two tasks, dev and test");
    // The updated model is a model like any other: its config names the new data.
    let config = std::fs::read_to_string(p.path("run2/mtl.toml"))?;
    assert!(config.contains("test.jsonl"), "{config}");
    let o = p.mtl(&["eval", "--model", "run2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    // A protected task that falls past the tolerance (here: ten epochs at a rate that wrecks the shared encoder,
    // nothing replayed): refused, naming the task, nothing written. (Much higher rates make the loss overflow
    // at once, and a step with a non-finite loss is skipped, which leaves the model as it was.)
    let wreck = ["--set", "update.tolerance=0", "--set", "update.rehearsal=0", "--set", "update.penalty=\"none\""];
    let rates = ["--set", "training.lr=0.05", "--set", "training.head_lr=0.05", "--set", "training.epochs=10"];
    let args =
        [["update", "--model", "run", "--config", "update.toml", "--out", "run4"].as_slice(), &wreck, &rates].concat();
    let o = p.mtl(&args)?;
    assert!(
        !o.status.success() && stderr(&o).contains("not written") && stderr(&o).contains("slots"),
        "{}",
        stderr(&o)
    );
    assert!(!p.path("run4").exists(), "nothing written");
    // A task the model does not have, or another kind, is refused naming the field; so is a bad share.
    std::fs::write(p.path("bad.toml"), update_file("").replace("[tasks.intent]", "[tasks.topic]"))?;
    let o = p.mtl(&["update", "--model", "run", "--config", "bad.toml", "--out", "run3"])?;
    assert!(
        !o.status.success() && stderr(&o).contains("field `tasks.topic`: the model has no task `topic`"),
        "{}",
        stderr(&o)
    );
    std::fs::write(p.path("bad.toml"), update_file("").replace("kind = \"classification\"", "kind = \"regression\""))?;
    let o = p.mtl(&["update", "--model", "run", "--config", "bad.toml", "--out", "run3"])?;
    assert!(!o.status.success() && stderr(&o).contains("tasks.intent.kind"), "{}", stderr(&o));
    let o = p.mtl(&[
        "update",
        "--model",
        "run",
        "--config",
        "update.toml",
        "--out",
        "run3",
        "--set",
        "update.rehearsal=2",
    ])?;
    assert!(!o.status.success() && stderr(&o).contains("update.rehearsal"), "{}", stderr(&o));
    assert!(!p.path("run3").exists(), "nothing written");
    Ok(())
}

/// On a run with one LoRA adapter per task, the protected task's adapter and head stay frozen: it answers exactly
/// as before (and nothing of it is replayed), while the updated task changes.
#[test]
fn per_task_adapters_keep_protected_tasks_exactly() -> TestResult {
    let p = Project::new()?;
    let lora = ["--set", "peft.method=\"lora\"", "--set", "peft.per_task=true", "--set", "peft.dropout=0.1"];
    let args = [["train", "config.toml", "--out", "run", "--set", "training.epochs=4"].as_slice(), &lora].concat();
    let o = p.mtl(&args)?;
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(p.path("update.toml"), update_file("").replace("penalty = \"ewc\"", "penalty = \"none\""))?;
    let args = ["update", "--model", "run", "--config", "update.toml", "--out", "run2", "--set", "training.lr=5e-3"];
    // Every epoch takes optimiser steps at a rate above zero (no warm-up), whichever the selection keeps.
    let steps = ["--set", "training.batch_size=1", "--set", "training.warmup_ratio=0"];
    let o = p.mtl(&[args.as_slice(), &steps].concat())?;
    assert!(o.status.success(), "{}", stderr(&o));
    let predict = |run: &str| -> Result<Vec<Value>, Box<dyn std::error::Error>> {
        let input = "show me flights to boston\nfly from denver";
        let o = crate::cli::mtl(p.dir.path(), &["predict", "--model", run, "--full-precision"], Some(input))?;
        assert!(o.status.success(), "{}", stderr(&o));
        Ok(String::from_utf8(o.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
    };
    let (before, after) = (predict("run")?, predict("run2")?);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["predictions"]["slots"], a["predictions"]["slots"], "the protected task answers as before");
    }
    assert_ne!(
        before.iter().map(|b| &b["predictions"]["intent"]["score"]).collect::<Vec<_>>(),
        after.iter().map(|a| &a["predictions"]["intent"]["score"]).collect::<Vec<_>>(),
        "the updated task changed"
    );
    let changes: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run2/metrics.json"))?)?;
    assert_eq!(changes["rehearsed_examples"], 0, "nothing replayed");
    for c in changes["update_changes"].as_array().ok_or("changes")? {
        if c["task"] == "slots" {
            assert_eq!(c["before"], c["after"], "{c}");
        }
    }
    Ok(())
}
