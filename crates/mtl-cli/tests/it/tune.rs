//! `mtl tune` end to end on the tiny model: ASHA's trials as separate `mtl train` processes, paused at the
//! first rung and the best resumed to the end; the state, the table, the report and the best config.

use serde_json::Value;

use crate::cli::{stderr, Project, TestResult};

const SPACE: &str = r#"[search]
method = "asha"
trials = 3
min_epochs = 1
reduction = 3
metric = "joint.frame_accuracy"

[params]
"training.lr" = { min = 1e-3, max = 1e-2, scale = "log" }
"training.head_lr" = { values = [1e-3, 1e-2] }
"#;

#[test]
fn tune_pauses_trials_at_rungs_and_resumes_the_best() -> TestResult {
    let p = Project::new()?;
    std::fs::write(p.path("space.toml"), SPACE)?;
    let o = p.mtl(&["tune", "config.toml", "--space", "space.toml", "--out", "tune"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let state: Value = serde_json::from_str(&std::fs::read_to_string(p.path("tune/tune.json"))?)?;
    let trials = state["trials"].as_array().ok_or("trials")?;
    assert_eq!(trials.len(), 3);
    // Rungs 1 and 3 (the config's epochs): three trials paused after one epoch, the best of them resumed.
    let trained: Vec<u64> = trials.iter().filter_map(|t| t["trained"].as_u64()).collect();
    let mut sorted = trained.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 1, 3], "{state}");
    for t in trials {
        let dir = p.path(&format!("tune/trials/{:03}", t["id"].as_u64().ok_or("id")?));
        let scores = t["scores"].as_object().ok_or("scores")?;
        assert_eq!(scores.len() as u64, t["trained"].as_u64().ok_or("trained")?, "a score per epoch: {t}");
        match t["status"].as_str() {
            // The finished trial wrote its model; the stopped ones keep the checkpoint they paused at.
            Some("done") => assert!(dir.join("metrics.json").is_file()),
            Some("stopped") => assert!(std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))),
            other => panic!("status {other:?}: {t}"),
        }
    }
    // The resumed trial's log has one eval line per epoch: the pause and resume left no gap and no repeat.
    let done = trials.iter().find(|t| t["status"] == "done").ok_or("a finished trial")?;
    let id = done["id"].as_u64().ok_or("id")?;
    let log = std::fs::read_to_string(p.path(&format!("tune/trials/{id:03}/log.jsonl")))?;
    let epochs: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "eval")
        .filter_map(|v| v["epoch"].as_u64())
        .collect();
    assert_eq!(epochs, vec![1, 2, 3]);
    assert_eq!(std::fs::read_to_string(p.path("tune/trials.jsonl"))?.lines().count(), 3);
    assert!(std::fs::read_to_string(p.path("tune/report.html"))?.contains("<table>"));
    // best.toml is a config of its own, with the best trial's values.
    let best = std::fs::read_to_string(p.path("tune/best.toml"))?;
    let o = p.mtl(&["check", "tune/best.toml", "--no-estimate"])?;
    assert!(o.status.success(), "{}\n{best}", stderr(&o));
    // A finished search resumes to the same end; a new one will not write over it.
    let o = p.mtl(&["tune", "config.toml", "--space", "space.toml", "--out", "tune", "--resume"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let again: Value = serde_json::from_str(&std::fs::read_to_string(p.path("tune/tune.json"))?)?;
    assert_eq!(again["trials"], state["trials"]);
    let o = p.mtl(&["tune", "config.toml", "--space", "space.toml", "--out", "tune"])?;
    assert!(!o.status.success() && stderr(&o).contains("already exists"), "{}", stderr(&o));
    // A bad space names the file and the field.
    std::fs::write(p.path("bad.toml"), SPACE.replace("reduction = 3", "reduction = 1"))?;
    let o = p.mtl(&["tune", "config.toml", "--space", "bad.toml", "--out", "tune2"])?;
    assert!(!o.status.success() && stderr(&o).contains("bad.toml") && stderr(&o).contains("search.reduction"));
    Ok(())
}
