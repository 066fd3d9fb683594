//! Every task kind and data format end to end on the tiny model: one run trains a sentence-pair classifier
//! (CSV), a multi-label classifier with thresholds tuned on dev (JSONL), a two-output regression (TSV), a
//! BIO tagger with a CRF (CoNLL, tag in a middle column), a POS tagger (CoNLL-U) and a QA head over windowed
//! contexts (SQuAD JSONL); then `predict` answers every kind. Bad input is reported per reader.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cli::{mtl, stderr};
use crate::repo_root;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WORDS: &[&str] =
    &["the", "flight", "to", "boston", "from", "denver", "is", "cheapest", "on", "monday", "good", "bad", "movie"];

fn sentence(i: usize, n: usize) -> Vec<&'static str> {
    (0..n).map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()]).collect()
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.path(name), text)
    }
}

fn pair_csv(n: usize, offset: usize) -> String {
    let mut s = String::from("premise,hypothesis,label\n");
    for i in offset..offset + n {
        let (a, b) = (sentence(i, 4).join(" "), sentence(i + 1, 3).join(" "));
        s.push_str(&format!("\"{a}, really\",{b},{}\n", ["entailment", "neutral"][i % 2]));
    }
    s
}

fn multi_jsonl(n: usize, offset: usize) -> String {
    (offset..offset + n)
        .map(|i| {
            let labels: Vec<&str> = ["travel", "price", "film"]
                .iter()
                .enumerate()
                .filter(|(k, _)| (i >> k) & 1 == 1)
                .map(|(_, l)| *l)
                .collect();
            json!({"text": sentence(i, 5).join(" "), "topics": labels}).to_string() + "\n"
        })
        .collect()
}

fn regression_tsv(n: usize, offset: usize) -> String {
    let mut s = String::from("text\tvalence\tarousal\n");
    for i in offset..offset + n {
        s.push_str(&format!("{}\t{}\t{}\n", sentence(i, 4).join(" "), (i % 5) as f64 - 2.0, (i % 3) as f64 * 0.5));
    }
    s
}

fn conll(n: usize, offset: usize) -> String {
    let mut s = String::from("-DOCSTART- -X- O\n\n");
    for i in offset..offset + n {
        for (k, w) in sentence(i, 5).iter().enumerate() {
            let tag = match (*w, k) {
                ("boston" | "denver", _) => "B-LOC",
                ("monday", _) => "B-DAY",
                _ => "O",
            };
            s.push_str(&format!("{w} X {tag}\n"));
        }
        s.push('\n');
    }
    s
}

fn conllu(n: usize, offset: usize) -> String {
    let mut s = String::new();
    for i in offset..offset + n {
        let words = sentence(i, 4);
        s.push_str(&format!("# text = {}\n", words.join(" ")));
        for (k, w) in words.iter().enumerate() {
            let tag = if ["the"].contains(w) {
                "DT"
            } else if ["to", "from", "on"].contains(w) {
                "IN"
            } else {
                "NN"
            };
            s.push_str(&format!("{}\t{w}\t_\t_\t{tag}\t_\t_\t_\t_\t_\n", k + 1));
        }
        s.push('\n');
    }
    s
}

fn squad(n: usize, offset: usize) -> String {
    (offset..offset + n)
        .map(|i| {
            // Long contexts: several windows each at max_len = 24.
            let context = sentence(i, 30).join(" ");
            let answerable = i % 3 != 0;
            let answers = if answerable {
                let word = sentence(i, 30)[20];
                let start = context.split(' ').take(20).map(|w| w.len() + 1).sum::<usize>();
                json!({"text": [word], "answer_start": [start]})
            } else {
                json!({"text": [], "answer_start": []})
            };
            json!({"question": format!("where is {}", sentence(i, 1)[0]), "context": context, "answers": answers})
                .to_string()
                + "\n"
        })
        .collect()
}

fn setup() -> Result<Files, Box<dyn std::error::Error>> {
    let f = Files { dir: tempfile::tempdir()? };
    for (split, n, offset) in [("train", 16, 0), ("dev", 6, 100)] {
        f.write(&format!("pair-{split}.csv"), &pair_csv(n, offset))?;
        f.write(&format!("multi-{split}.jsonl"), &multi_jsonl(n, offset))?;
        f.write(&format!("reg-{split}.tsv"), &regression_tsv(n, offset))?;
        f.write(&format!("ner-{split}.conll"), &conll(n, offset))?;
        f.write(&format!("pos-{split}.conllu"), &conllu(n, offset))?;
        f.write(&format!("qa-{split}.jsonl"), &squad(n, offset))?;
    }
    let d = |s: &str| f.path(s).display().to_string();
    let files = |name: &str, ext: &str| {
        format!(
            "{{ train = \"{}\", dev = \"{}\", test = \"{}\" }}",
            d(&format!("{name}-train.{ext}")),
            d(&format!("{name}-dev.{ext}")),
            d(&format!("{name}-dev.{ext}"))
        )
    };
    let config = format!(
        r#"[model]
path = "{model}"
max_len = 24

[training]
epochs = 2
batch_size = 8
lr = 5e-3
seed = 3

[tasks.nli]
kind = "classification"
format = "csv"
text_field = "premise"
pair_field = "hypothesis"
data = {pair}

[tasks.topics]
kind = "multi_label"
label_field = "topics"
tune_thresholds = true
data = {multi}

[tasks.affect]
kind = "regression"
format = "tsv"
label_fields = ["valence", "arousal"]
scale_targets = "standardize"
loss = "huber"
data = {reg}

[tasks.ner]
kind = "token_classification"
format = "conll"
tag_column = 2
crf = true
data = {ner}

[tasks.pos]
kind = "token_classification"
format = "conllu"
conllu_column = "xpos"
scheme = "none"
data = {pos}

[tasks.qa]
kind = "question_answering"
max_query_len = 6
doc_stride = 4
data = {qa}
"#,
        model = repo_root().join("tests/fixtures/tiny-bert").display(),
        pair = files("pair", "csv"),
        multi = files("multi", "jsonl"),
        reg = files("reg", "tsv"),
        ner = files("ner", "conll"),
        pos = files("pos", "conllu"),
        qa = files("qa", "jsonl"),
    );
    f.write("config.toml", &config)?;
    Ok(f)
}

fn run(dir: &Path, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    Ok(mtl(dir, args, stdin)?)
}

/// On ModernBERT every task kind trains too, and exports to its `ModernBertFor…` models, each with the family's
/// prediction head; its question answering's output layer is `classifier`, as transformers names it.
#[test]
fn every_task_kind_trains_and_exports_on_modernbert() -> TestResult {
    let f = setup()?;
    let tiny = repo_root().join("tests/fixtures/tiny-modernbert");
    let path = format!("model.path={:?}", tiny.display().to_string());
    let out = run(
        f.dir.path(),
        &["train", "config.toml", "--out", "run", "--set", &path, "--set", "training.epochs=1"],
        None,
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(f.dir.path(), &["export", "--model", "run", "--out", "hf"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    for (task, class, output) in [
        ("nli", "ModernBertForSequenceClassification", "classifier"),
        ("pos", "ModernBertForTokenClassification", "classifier"),
        ("qa", "ModernBertForQuestionAnswering", "classifier"),
    ] {
        let dir = f.path(&format!("hf/{task}"));
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        assert_eq!(config["architectures"][0], class, "{task}");
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)?;
        for name in [format!("{output}.weight"), "head.dense.weight".into(), "head.norm.weight".into()] {
            assert!(tensors.contains_key(&name), "{task}: no {name}");
        }
        assert!(!tensors.contains_key("qa_outputs.weight"), "{task}: BERT's QA layer name");
    }
    Ok(())
}

#[test]
fn every_task_kind_and_format_trains_and_predicts() -> TestResult {
    let f = setup()?;
    let out = run(f.dir.path(), &["train", "config.toml", "--out", "run"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(f.path("run/metrics.json"))?)?;
    let test = &metrics["test"];
    for (task, names) in [
        ("nli", &["accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc"][..]),
        ("topics", &["micro_f1", "macro_f1", "weighted_f1", "samples_f1", "subset_accuracy"][..]),
        ("affect", &["pearson", "spearman", "mse", "mae"][..]),
        ("ner", &["precision", "recall", "f1", "accuracy"][..]),
        ("pos", &["accuracy", "macro_f1"][..]),
        ("qa", &["exact_match", "f1"][..]),
    ] {
        for name in names {
            assert!(test[task][name].is_number(), "test.{task}.{name} missing: {test}");
        }
    }
    assert!(metrics["test_reports"]["nli"].is_object(), "classification report stored");
    let report = String::from_utf8(out.stdout)?;
    assert!(report.contains("weighted avg") && report.contains("precision"), "{report}");

    let labels: Value = serde_json::from_str(&std::fs::read_to_string(f.path("run/labels.json"))?)?;
    assert_eq!(labels["affect"]["labels"], json!(["valence", "arousal"]));
    assert_eq!(labels["affect"]["scale"]["mean"].as_array().map(Vec::len), Some(2));
    assert_eq!(labels["topics"]["thresholds"].as_array().map(Vec::len), Some(3), "tuned thresholds stored: {labels}");
    assert_eq!(labels["ner"], json!(["B-DAY", "B-LOC", "O"]));

    // eval reproduces the stored dev scores.
    let out = run(f.dir.path(), &["eval", "--model", "run", "--config", "config.toml"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let eval: Value = serde_json::from_slice(&out.stdout)?;
    assert_close(&eval["dev"], &metrics["dev"]);

    let input = [
        json!({"text": "the flight to boston", "hypothesis": "is cheapest"}).to_string(),
        json!({"question": "where is the", "context": sentence(5, 30).join(" ")}).to_string(),
        "the flight to boston".to_string(),
    ]
    .join("\n");
    let out = run(f.dir.path(), &["predict", "--model", "run"], Some(&input))?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "one line per input, whatever the number of windows");
    let p = &lines[0]["predictions"];
    assert_eq!(lines[0]["text_pair"], "is cheapest");
    assert!(["entailment", "neutral"].contains(&p["nli"]["label"].as_str().ok_or("label")?));
    assert!(p["topics"]["labels"].is_array() && p["topics"]["scores"]["film"].is_number(), "{p}");
    assert!(p["affect"]["values"]["valence"].is_number(), "{p}");
    assert_eq!(lines[2]["predictions"]["ner"]["tags"].as_array().map(Vec::len), Some(4), "{}", lines[2]);
    assert_eq!(lines[2]["predictions"]["pos"]["words"].as_array().map(Vec::len), Some(4));
    assert!(lines[1]["predictions"]["qa"]["answer"].is_string(), "{}", lines[1]);
    Ok(())
}

/// Equal trees of numbers, to 1e-9: a freshly loaded model computes the same predictions up to the last bits of
/// f32 sums (the GEMM kernels may take other paths for other buffer alignments), which correlations show.
fn assert_close(a: &Value, b: &Value) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            for (k, v) in x {
                assert_close(v, &y[k]);
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
        _ => assert_eq!(a, b),
    }
}

/// Writes `content` to `file`, trains, and expects an error with every needle (and no output directory).
fn expect_error(f: &Files, file: &str, content: &str, needles: &[&str]) -> TestResult {
    let keep = std::fs::read_to_string(f.path(file))?;
    f.write(file, content)?;
    let out = run(f.dir.path(), &["train", "config.toml", "--out", "bad"], None)?;
    f.write(file, &keep)?;
    assert!(!out.status.success(), "training on a bad {file} should fail");
    let err = stderr(&out);
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    assert!(!f.path("bad").exists());
    Ok(())
}

#[test]
fn bad_input_is_reported_per_reader() -> TestResult {
    let f = setup()?;
    expect_error(&f, "pair-dev.csv", "premise,label\na,b\n", &["pair-dev.csv:1", "no column `hypothesis`"])?;
    expect_error(
        &f,
        "pair-dev.csv",
        "premise,hypothesis,label\na,b,neutral\n\"unclosed,b,neutral\n",
        &["pair-dev.csv:3", "invalid row"],
    )?;
    expect_error(
        &f,
        "pair-dev.csv",
        "premise,hypothesis,label\na,b,maybe\n",
        &["pair-dev.csv:2", "task `nli`", "unknown label \"maybe\""],
    )?;
    expect_error(
        &f,
        "reg-train.tsv",
        "text\tvalence\tarousal\ngood\t1\thigh\n",
        &["reg-train.tsv:2", "field `arousal` must be a number"],
    )?;
    expect_error(
        &f,
        "multi-dev.jsonl",
        "{\"text\": \"x\", \"topics\": [\"travel\", \"sport\"]}\n",
        &["multi-dev.jsonl:1", "unknown label \"sport\""],
    )?;
    expect_error(&f, "ner-dev.conll", "boston X B-LOC\nto\n", &["ner-dev.conll:2", "column"])?;
    expect_error(
        &f,
        "ner-dev.conll",
        "boston X B-CITY\n",
        &["ner-dev.conll:1", "task `ner`", "unknown label \"B-CITY\""],
    )?;
    expect_error(&f, "pos-dev.conllu", "1\tthe\t_\t_\tDT\t_\n", &["pos-dev.conllu:1", "10 tab-separated"])?;
    expect_error(&f, "qa-dev.jsonl", "{\"question\": \"q\", \"context\": \"the flight\", \"answers\": {\"text\": [\"plane\"], \"answer_start\": [4]}}\n", &["qa-dev.jsonl:1", "field `answers`", "not at character 4"])?;
    Ok(())
}

#[test]
fn unknown_labels_map_to_a_configured_fallback() -> TestResult {
    let f = setup()?;
    f.write("ner-dev.conll", "boston X B-CITY\nmonday X B-DAY\n")?;
    let config =
        std::fs::read_to_string(f.path("config.toml"))?.replace("crf = true", "crf = true\nunknown_label = \"O\"");
    f.write("config.toml", &config)?;
    let out = run(f.dir.path(), &["train", "config.toml", "--out", "run", "--set", "training.epochs=1"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let labels: Value = serde_json::from_str(&std::fs::read_to_string(f.path("run/labels.json"))?)?;
    assert_eq!(labels["ner"]["unknown_label"], "O", "{labels}");
    Ok(())
}

#[test]
fn predict_reports_bad_lines_with_their_number() -> TestResult {
    let f = setup()?;
    let out = run(
        f.dir.path(),
        &["train", "config.toml", "--out", "run", "--tasks", "nli,topics", "--set", "training.epochs=1"],
        None,
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    for (input, needles) in [
        ("a fine line\n{\"text\": \"broken\"\n", &["<stdin>:2", "invalid JSON"][..]),
        ("{\"text\": 3}\n", &["<stdin>:1", "field `text` must be a string"][..]),
        ("{\"text\": \"  \"}\n", &["<stdin>:1", "field `text` is empty"][..]),
        ("{\"sentence\": \"x\"}\n", &["<stdin>:1", "expected a `text` or `words` field"][..]),
    ] {
        let out = run(f.dir.path(), &["predict", "--model", "run"], Some(input))?;
        assert!(!out.status.success(), "{input:?} should fail");
        let err = stderr(&out);
        for n in needles {
            assert!(err.contains(n), "{n:?} not in: {err}");
        }
    }
    Ok(())
}

/// `mtl explain` explains every task kind of one run: a class, labels, two regression outputs, each tagged word
/// (CRF and plain), an answer's start and end in the window that holds it. The attributions add up (to a small
/// error) to the change of each score from the baseline, each word's to its tokens'; the HTML page names every
/// task. `mtl serve --explain true` answers `POST /v1/explain` the same way, and refuses a bad request.
#[test]
fn every_task_kind_is_explained() -> TestResult {
    let f = setup()?;
    let out = run(f.dir.path(), &["train", "config.toml", "--out", "run", "--set", "training.epochs=1"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let input = [
        json!({"text": "the flight to boston", "hypothesis": "is cheapest"}).to_string(),
        json!({"question": "where is the", "context": sentence(5, 30).join(" ")}).to_string(),
        "the flight to boston on monday".to_string(),
    ]
    .join("\n");
    let out = run(
        f.dir.path(),
        &["explain", "--model", "run", "--steps", "64", "--all-words", "--html", "page.html"],
        Some(&input),
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    let mut kinds = std::collections::BTreeSet::new();
    for line in &lines {
        let explanations = line["explanations"].as_object().ok_or("explanations")?;
        for (task, list) in explanations {
            for x in list.as_array().ok_or("list")? {
                let what = format!("{task}: {x}");
                let score = x["score"].as_f64().ok_or("score")?;
                let base = x["baseline_score"].as_f64().ok_or("baseline_score")?;
                let ig = &x["integrated_gradients"];
                let tokens: Vec<f64> = serde_json::from_value(ig["tokens"].clone())?;
                let words: Vec<f64> = serde_json::from_value(ig["words"].clone())?;
                let sum: f64 = tokens.iter().sum();
                let error = x["completeness_error"].as_f64().ok_or("error")?;
                assert!((sum - (score - base) - error).abs() < 1e-4, "{what}: the error is the sum's");
                assert!(error.abs() <= 0.02 * (score - base).abs() + 1e-4, "{what}: completeness");
                assert!((words.iter().sum::<f64>() - sum).abs() < 1e-4, "{what}: words add up their tokens");
                assert_eq!(x["tokens"].as_array().map(Vec::len), Some(tokens.len()), "{what}");
                assert_eq!(x["words"].as_array().map(Vec::len), Some(words.len()), "{what}");
                let t = &x["target"];
                kinds.insert(match (task.as_str(), t["answer"].as_str()) {
                    ("qa", Some(side)) => format!("qa {side}"),
                    ("ner" | "pos", _) if t["word"].is_u64() => format!("{task} word"),
                    ("affect", _) => format!("affect {}", t["output"].as_str().unwrap_or("")),
                    (other, _) if t["label"].is_string() => other.to_string(),
                    (other, _) => format!("{other}?"),
                });
            }
        }
    }
    let want = ["affect arousal", "affect valence", "ner word", "nli", "pos word", "qa end", "qa start", "topics"];
    assert_eq!(kinds.iter().map(String::as_str).collect::<Vec<_>>(), want);
    // The question's words are the question's and the window's.
    let qa = &lines[1]["explanations"]["qa"][0]["words"];
    let parts: std::collections::BTreeSet<&str> =
        qa.as_array().ok_or("words")?.iter().filter_map(|w| w["part"].as_str()).collect();
    assert_eq!(parts.into_iter().collect::<Vec<_>>(), ["context", "question"]);
    let page = std::fs::read_to_string(f.path("page.html"))?;
    for needle in ["<!DOCTYPE html>", "nli", "topics", "affect", "ner", "pos", "qa", "answer start"] {
        assert!(page.contains(needle), "{needle} not in the page");
    }

    let (_server, addr) =
        crate::serve::start_server(f.dir.path(), &["serve", "run", "--addr", "127.0.0.1:0", "--explain", "true"])?;
    let body = json!({"input": "the flight to boston on monday", "tasks": ["ner"], "steps": 64, "all_words": true});
    let (status, answer) = crate::serve::http(&addr, "POST", "/v1/explain", Some(&body))?;
    assert_eq!(status, 200, "{answer}");
    let cli = lines[2]["explanations"]["ner"].as_array().ok_or("ner")?;
    let served = answer["explanations"]["ner"].as_array().ok_or("served ner")?;
    assert_eq!(served.len(), cli.len(), "{answer}");
    for x in served {
        let same = cli.iter().find(|c| c["target"] == x["target"]).ok_or("the same target")?;
        let a: Vec<f64> = serde_json::from_value(x["integrated_gradients"]["tokens"].clone())?;
        let b: Vec<f64> = serde_json::from_value(same["integrated_gradients"]["tokens"].clone())?;
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5), "served {a:?} vs {b:?}");
    }
    let (status, answer) = crate::serve::http(&addr, "POST", "/v1/explain", Some(&json!({"input": "x", "steps": 0})))?;
    assert_eq!(status, 422, "{answer}");
    let (status, _) =
        crate::serve::http(&addr, "POST", "/v1/explain", Some(&json!({"input": "x", "tasks": ["nope"]})))?;
    assert_eq!(status, 404);

    // A run without a drift reference (trained before drift monitoring) gets one from `mtl eval`.
    let reference = f.path("run/drift-reference.json");
    let trained: Value = serde_json::from_str(&std::fs::read_to_string(&reference)?)?;
    std::fs::remove_file(&reference)?;
    let out = run(f.dir.path(), &["eval", "--model", "run", "--drift-reference"], None)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&reference)?)?;
    let keys = |v: &Value| v["tasks"].as_object().map(|t| t.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&written), keys(&trained), "the same tasks: {written}");
    Ok(())
}
