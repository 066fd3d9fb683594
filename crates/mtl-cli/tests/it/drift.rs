//! Drift monitoring on a real model and real corpora: TREC's question classifier on all-MiniLM-L6-v2 (fetched by
//! scripts/fetch.sh), trained for one epoch, saves its dev answers as the reference. Served TREC's test
//! questions (the same distribution) keep the PSI under the threshold; movie-review sentences (the polarity
//! task's test set: another corpus) push it over and raise the alert. The request log masks what it must.

use serde_json::{json, Value};

use crate::cli::{mtl, stderr, TestResult};
use crate::serve::{http, http_text, start_server};

/// The column `column` of a TSV or CSV file's lines after the header (CSV: the text before the last comma,
/// quotes removed).
fn texts(path: &std::path::Path, tsv_column: Option<usize>) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| match tsv_column {
            Some(c) => line.split('\t').nth(c).map(str::to_string),
            None => line.rsplit_once(',').map(|(t, _)| t.trim_matches('"').to_string()),
        })
        .filter(|t| !t.trim().is_empty())
        .collect())
}

/// A gauge's value in the exposition text, by its whole name with labels.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn post_all(addr: &str, texts: &[String]) -> TestResult {
    for chunk in texts.chunks(64) {
        let (status, answer) = http(addr, "POST", "/v1/tasks/trec/predict", Some(&json!({ "inputs": chunk })))?;
        assert_eq!(status, 200, "{answer}");
    }
    Ok(())
}

#[test]
fn drift_crosses_the_threshold_on_another_corpus_only() -> TestResult {
    let root = crate::repo_root();
    let data = root.join("assets/data/five-task");
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let run_arg = run.to_str().ok_or("path")?;
    let o = mtl(
        &root,
        &["train", "examples/five-task/config.toml", "--tasks", "trec", "--out", run_arg, "--set", "training.epochs=1"],
        None,
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(run.join("drift-reference.json"))?)?;
    let dev_labels: u64 = reference["tasks"]["trec"]["label"]["categories"]
        .as_object()
        .ok_or("label counts")?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(dev_labels, texts(&data.join("trec/dev.tsv"), Some(2))?.len() as u64, "one answer per dev question");

    let log = dir.path().join("requests.jsonl");
    let log_arg = log.to_str().ok_or("path")?;
    let (_server, addr) = start_server(
        &root,
        &["serve", run_arg, "--addr", "127.0.0.1:0", "--drift-window", "300", "--request-log", log_arg],
    )?;
    let psi = r#"mtl_drift_psi{task="trec",statistic="label"}"#;
    let alert = r#"mtl_drift_alert{task="trec",statistic="label"}"#;

    // The same distribution: TREC's test questions.
    post_all(&addr, &texts(&data.join("trec/test.tsv"), Some(2))?)?;
    let (_, metrics) = http_text(&addr, "GET", "/metrics", None)?;
    let same = gauge(&metrics, psi).ok_or("no PSI")?;
    assert!(same < 0.1, "TREC test vs dev: PSI {same}\n{metrics}");
    assert_eq!(gauge(&metrics, alert), Some(0.0), "{metrics}");
    assert_eq!(gauge(&metrics, r#"mtl_drift_window{task="trec",statistic="label"}"#), Some(300.0));

    // Another corpus: movie reviews are no questions.
    let reviews = texts(&data.join("polarity/test.csv"), None)?;
    assert!(reviews.len() > 300);
    post_all(&addr, &reviews)?;
    let (_, metrics) = http_text(&addr, "GET", "/metrics", None)?;
    let shifted = gauge(&metrics, psi).ok_or("no PSI")?;
    assert!(shifted > 0.25, "movie reviews vs TREC dev: PSI {shifted}\n{metrics}");
    assert_eq!(gauge(&metrics, alert), Some(1.0), "{metrics}");
    eprintln!("drift: PSI of the class distribution, TREC test {same:.4}, movie reviews {shifted:.4}");

    // The request log: every request (sample 1), personal data masked.
    let (status, _) = http(
        &addr,
        "POST",
        "/v1/tasks/trec/predict",
        Some(&json!({"inputs": ["Who answers mail sent to jane.doe@example.com or calls +1 555 123 4567 ?"]})),
    )?;
    assert_eq!(status, 200);
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log)?.lines().map(String::from).collect();
        if lines.iter().any(|l| l.contains("[EMAIL]")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let requests = (texts(&data.join("trec/test.tsv"), Some(2))?.len().div_ceil(64) + reviews.len().div_ceil(64)) + 1;
    assert_eq!(lines.len(), requests, "one line per request");
    let last: Value = serde_json::from_str(lines.last().ok_or("no line")?)?;
    assert_eq!(last["inputs"][0], json!("Who answers mail sent to [EMAIL] or calls [PHONE] ?"));
    assert_eq!((last["status"].as_u64(), last["endpoint"].as_str()), (Some(200), Some("/v1/tasks/{task}/predict")));
    assert!(last["predictions"][0]["trec"]["label"].is_string(), "{last}");
    Ok(())
}
