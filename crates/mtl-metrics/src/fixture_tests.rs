//! Every metric against its reference implementation, on fixtures made by `scripts/make_fixtures.py`
//! (scikit-learn 1.9.1, scipy 1.17.1, seqeval 1.2.2, the SQuAD 2.0 functions of transformers 4.46.3, rouge-score
//! 0.1.2).
//! Equal to 1e-9.

use serde_json::Value;

use crate::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn load(name: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("fixture value {v} is not a number"))
}

fn close(got: f64, want: &Value, what: &str) {
    let want = num(want);
    assert!((got - want).abs() < 1e-9, "{what}: {got} vs reference {want}");
}

#[test]
fn classification_matches_sklearn() -> TestResult {
    let cases = load("classification.json")?;
    assert!(cases.len() >= 40);
    for (i, c) in cases.iter().enumerate() {
        let gold: Vec<String> = serde_json::from_value(c["gold"].clone())?;
        let pred: Vec<String> = serde_json::from_value(c["pred"].clone())?;
        let r = classification_report(&gold, &pred);
        let labels: Vec<String> = serde_json::from_value(c["labels"].clone())?;
        assert_eq!(r.classes.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(), labels, "case {i} classes");
        for ((label, got), want) in r.classes.iter().zip(c["per_class"].as_array().ok_or("list")?) {
            close(got.precision, &want["precision"], &format!("case {i} {label} precision"));
            close(got.recall, &want["recall"], &format!("case {i} {label} recall"));
            close(got.f1, &want["f1"], &format!("case {i} {label} f1"));
            assert_eq!(got.support as u64, want["support"].as_u64().ok_or("support")?);
        }
        for (name, got) in [("macro", r.macro_avg), ("micro", r.micro_avg), ("weighted", r.weighted_avg)] {
            close(got.precision, &c[name]["precision"], &format!("case {i} {name} precision"));
            close(got.recall, &c[name]["recall"], &format!("case {i} {name} recall"));
            close(got.f1, &c[name]["f1"], &format!("case {i} {name} f1"));
        }
        close(r.accuracy, &c["accuracy"], &format!("case {i} accuracy"));
        close(macro_f1(&gold, &pred), &c["macro"]["f1"], &format!("case {i} macro_f1"));
        close(mcc(&gold, &pred), &c["mcc"], &format!("case {i} mcc"));
    }
    Ok(())
}

#[test]
fn multilabel_matches_sklearn() -> TestResult {
    for (i, c) in load("multilabel.json")?.iter().enumerate() {
        let gold: Vec<Vec<u32>> = serde_json::from_value(c["gold"].clone())?;
        let pred: Vec<Vec<u32>> = serde_json::from_value(c["pred"].clone())?;
        let s = multilabel_scores(&gold, &pred, c["num_labels"].as_u64().ok_or("num_labels")? as usize);
        for (name, got) in [("micro", s.micro), ("macro", s.macro_avg), ("weighted", s.weighted)] {
            close(got.precision, &c[name]["precision"], &format!("case {i} {name} precision"));
            close(got.recall, &c[name]["recall"], &format!("case {i} {name} recall"));
            close(got.f1, &c[name]["f1"], &format!("case {i} {name} f1"));
        }
        close(s.samples_f1, &c["samples"]["f1"], &format!("case {i} samples f1"));
        close(s.subset_accuracy, &c["subset_accuracy"], &format!("case {i} subset accuracy"));
        for (l, (got, want)) in s.labels.iter().zip(c["per_label_f1"].as_array().ok_or("list")?).enumerate() {
            close(got.f1, want, &format!("case {i} label {l} f1"));
        }
    }
    Ok(())
}

#[test]
fn regression_matches_scipy_and_sklearn() -> TestResult {
    for (i, c) in load("regression.json")?.iter().enumerate() {
        let gold: Vec<f64> = serde_json::from_value(c["gold"].clone())?;
        let pred: Vec<f64> = serde_json::from_value(c["pred"].clone())?;
        close(pearson(&gold, &pred), &c["pearson"], &format!("case {i} pearson"));
        close(spearman(&gold, &pred), &c["spearman"], &format!("case {i} spearman"));
        close(mse(&gold, &pred), &c["mse"], &format!("case {i} mse"));
        close(mae(&gold, &pred), &c["mae"], &format!("case {i} mae"));
    }
    Ok(())
}

#[test]
fn squad_matches_the_official_functions() -> TestResult {
    let cases = load("squad.json")?;
    assert!(cases.len() >= 50);
    for (i, c) in cases.iter().enumerate() {
        let gold: Vec<String> = serde_json::from_value(c["gold"].clone())?;
        let pred = c["pred"].as_str().ok_or("pred")?.to_string();
        let (em, f1) = squad_scores(std::slice::from_ref(&gold), std::slice::from_ref(&pred));
        close(em, &c["exact"], &format!("case {i} exact {gold:?} / {pred:?}"));
        close(f1, &c["f1"], &format!("case {i} f1 {gold:?} / {pred:?}"));
    }
    Ok(())
}

#[test]
fn entity_report_matches_seqeval() -> TestResult {
    for (i, c) in load("seqeval-report.json")?.iter().enumerate() {
        let gold: Vec<Vec<String>> = serde_json::from_value(c["gold"].clone())?;
        let pred: Vec<Vec<String>> = serde_json::from_value(c["pred"].clone())?;
        let r = entity_report(&gold, &pred);
        let want = c["report"].as_object().ok_or("report")?;
        let kinds: Vec<&String> = want.keys().filter(|k| !k.ends_with(" avg")).collect();
        assert_eq!(r.classes.len(), kinds.len(), "case {i}: types {kinds:?}");
        for (kind, got) in &r.classes {
            let w = &want[kind];
            close(got.precision, &w["precision"], &format!("case {i} {kind} precision"));
            close(got.recall, &w["recall"], &format!("case {i} {kind} recall"));
            close(got.f1, &w["f1-score"], &format!("case {i} {kind} f1"));
            close(got.support as f64, &w["support"], &format!("case {i} {kind} support"));
        }
        for (name, got) in [("micro avg", r.micro_avg), ("macro avg", r.macro_avg), ("weighted avg", r.weighted_avg)] {
            close(got.precision, &want[name]["precision"], &format!("case {i} {name} precision"));
            close(got.recall, &want[name]["recall"], &format!("case {i} {name} recall"));
            close(got.f1, &want[name]["f1-score"], &format!("case {i} {name} f1"));
        }
    }
    Ok(())
}

#[test]
fn rouge_l_matches_rouge_score() -> TestResult {
    let cases = load("rouge.json")?;
    assert!(cases.len() >= 50);
    for (i, c) in cases.iter().enumerate() {
        let (target, prediction) =
            (c["target"].as_str().ok_or("target")?, c["prediction"].as_str().ok_or("prediction")?);
        let r = rouge_l(target, prediction);
        close(r.precision, &c["precision"], &format!("case {i} precision ({target:?} / {prediction:?})"));
        close(r.recall, &c["recall"], &format!("case {i} recall"));
        close(r.f, &c["f"], &format!("case {i} f"));
    }
    let targets = vec![vec!["Paris"], vec!["a c", " a b "]];
    let (rouge, exact) = generation_scores(&targets, &["Paris".to_string(), "a b".to_string()]);
    assert_eq!((rouge, exact), (1.0, 1.0));
    let (rouge, exact) = generation_scores(&targets, &["Paris".to_string(), "a".to_string()]);
    assert_eq!(exact, 0.5);
    close(rouge, &serde_json::json!((1.0 + 2.0 / 3.0) / 2.0), "mean of the best references");
    Ok(())
}

#[test]
fn rouge_l_of_several_references_matches_score_multi() -> TestResult {
    let cases = load("rouge-multi.json")?;
    assert!(cases.len() >= 20);
    for (i, c) in cases.iter().enumerate() {
        let targets: Vec<&str> = c["targets"].as_array().ok_or("targets")?.iter().filter_map(|t| t.as_str()).collect();
        let prediction = c["prediction"].as_str().ok_or("prediction")?;
        let r = rouge_l_multi(&targets, prediction);
        close(r.precision, &c["precision"], &format!("case {i} precision ({targets:?} / {prediction:?})"));
        close(r.recall, &c["recall"], &format!("case {i} recall"));
        close(r.f, &c["f"], &format!("case {i} f"));
    }
    Ok(())
}
