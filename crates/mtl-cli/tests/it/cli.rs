//! `mtl train`, `eval` and `predict` end to end on the tiny model, and their errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::repo_root;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAIN: &[(&str, &str, &str)] = &[
    ("show me flights from boston to denver", "flight", "O O O O B-from O B-to"),
    ("i want to fly from dallas to boston", "flight", "O O O O O B-from O B-to"),
    ("what is the cheapest fare from denver", "fare", "O O O O O O B-from"),
    ("show me the fare from new york", "fare", "O O O O O B-from I-from"),
    ("flights from paris to london on monday", "flight", "O O B-from O B-to O B-day"),
    ("what is the fare to boston", "fare", "O O O O O B-to"),
    ("i want a flight to dallas monday morning", "flight", "O O O O O B-to B-day O"),
    ("cheapest fare from london to new york", "fare", "O O O B-from O B-to I-to"),
];

const DEV: &[(&str, &str, &str)] = &[
    ("show me flights from denver to boston", "flight", "O O O O B-from O B-to"),
    ("what is the cheapest fare to paris", "fare", "O O O O O O B-to"),
];

fn jsonl(rows: &[(&str, &str, &str)]) -> String {
    rows.iter()
        .map(|(text, intent, slots)| {
            let words: Vec<&str> = text.split(' ').collect();
            let tags: Vec<&str> = slots.split(' ').collect();
            serde_json::json!({"text": text, "words": words, "intent": intent, "slots": tags}).to_string() + "\n"
        })
        .collect()
}

/// A temporary project: tiny model, data files and a config whose paths are absolute.
pub(crate) struct Project {
    pub(crate) dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("train.jsonl"), jsonl(TRAIN))?;
        std::fs::write(dir.path().join("dev.jsonl"), jsonl(DEV))?;
        std::fs::write(dir.path().join("test.jsonl"), jsonl(DEV))?;
        let p = Self { dir };
        p.write_config("")?;
        Ok(p)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn write_config(&self, extra_training: &str) -> std::io::Result<()> {
        let model = repo_root().join("tests/fixtures/tiny-bert");
        let d = |s: &str| self.path(s).display().to_string();
        let config = format!(
            r#"[model]
path = "{model}"
max_len = 12

[training]
epochs = 3
batch_size = 4
lr = 5e-3
seed = 7
{extra_training}

[tasks.intent]
kind = "classification"
label_field = "intent"
data = {{ train = "{train}", dev = "{dev}", test = "{test}" }}

[tasks.slots]
kind = "token_classification"
label_field = "slots"
data = {{ train = "{train}", dev = "{dev}", test = "{test}" }}

[joint]
frame = ["intent", "slots"]
"#,
            model = model.display(),
            train = d("train.jsonl"),
            dev = d("dev.jsonl"),
            test = d("test.jsonl"),
        );
        std::fs::write(self.path("config.toml"), config)
    }

    pub(crate) fn mtl(&self, args: &[&str]) -> std::io::Result<Output> {
        mtl(self.dir.path(), args, None)
    }
}

pub(crate) fn mtl(cwd: &Path, args: &[&str], stdin: Option<&str>) -> std::io::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mtl"));
    cmd.args(args).current_dir(cwd).env("MTL_LOG", "warn");
    let Some(input) = stdin else { return cmd.output() };
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    child.wait_with_output()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every score is a fraction, except the correlations (MCC) which lie in [-1, 1].
fn assert_fraction_tree(v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v.as_f64()) {
                    ("mcc", Some(x)) => assert!((-1.0..=1.0).contains(&x), "mcc {x}"),
                    _ => assert_fraction_tree(v),
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().expect("number");
            assert!((0.0..=1.0).contains(&x), "{x} is not a fraction");
        }
        other => panic!("unexpected value {other}"),
    }
}

#[test]
fn train_eval_predict_end_to_end() -> TestResult {
    let p = Project::new()?;
    let out = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["model.safetensors", "config.json", "tokenizer.json", "mtl.toml", "labels.json", "metrics.json"] {
        assert!(p.path("run").join(file).is_file(), "{file} missing");
    }
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/metrics.json"))?)?;
    for split in ["dev", "test"] {
        let s = &metrics[split];
        assert_fraction_tree(s);
        for (task, metric) in
            [("intent", "accuracy"), ("slots", "f1"), ("slots", "precision"), ("joint", "frame_accuracy")]
        {
            assert!(s[task][metric].is_number(), "{split}.{task}.{metric} missing in {s}");
        }
    }
    let report = String::from_utf8(out.stdout)?;
    assert!(report.contains("test   intent  accuracy"), "{report}");

    // eval prints the same shape and the same numbers for the kept epoch.
    let out = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let eval: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(eval["dev"], metrics["dev"]);
    assert_eq!(eval["test"], metrics["test"]);
    // Without --config, the run's own (its mtl.toml); -q leaves only warnings and errors on stderr.
    let out = p.mtl(&["-q", "eval", "--model", "run"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout)?["test"], metrics["test"]);
    assert!(!stderr(&out).contains("INFO"), "{}", stderr(&out));
    let out = p.mtl(&["completions", "bash"])?;
    assert!(out.status.success() && String::from_utf8(out.stdout)?.contains("_mtl()"), "a bash completion script");

    // predict: JSONL and plain lines, every task per input.
    let out = mtl(
        p.dir.path(),
        &["predict", "--model", "run"],
        Some("{\"text\": \"show me flights to boston\"}\nwhat is the fare\n"),
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "show me flights to boston");
    assert!(["flight", "fare"].contains(&lines[0]["predictions"]["intent"]["label"].as_str().ok_or("label")?));
    assert_eq!(lines[1]["predictions"]["slots"]["tags"].as_array().ok_or("tags")?.len(), 4);
    assert_eq!(lines[1]["predictions"]["slots"]["words"][3], "fare");
    Ok(())
}

#[test]
fn same_seed_same_result() -> TestResult {
    let p = Project::new()?;
    for out in ["a", "b"] {
        let o = p.mtl(&["train", "config.toml", "--out", out, "--set", "training.epochs=2"])?;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(p.path("a/model.safetensors"))?, std::fs::read(p.path("b/model.safetensors"))?);
    let c = p.mtl(&["train", "config.toml", "--out", "c", "--set", "training.epochs=2", "--set", "training.seed=8"])?;
    assert!(c.status.success(), "{}", stderr(&c));
    assert_ne!(std::fs::read(p.path("a/model.safetensors"))?, std::fs::read(p.path("c/model.safetensors"))?);
    Ok(())
}

/// Runs `mtl train` expecting failure; checks the message and that no output directory was left.
pub(crate) fn expect_train_error(p: &Project, needles: &[&str]) -> TestResult {
    let out = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!out.status.success(), "training should fail");
    let err = stderr(&out);
    for n in needles {
        assert!(err.contains(n), "{n:?} not in error: {err}");
    }
    assert!(!p.path("run").exists(), "no partial output directory");
    let leftovers: Vec<_> = std::fs::read_dir(p.dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".mtl"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left behind");
    Ok(())
}

#[test]
fn malformed_jsonl_names_file_and_line() -> TestResult {
    let p = Project::new()?;
    let mut text = jsonl(TRAIN);
    text.push_str("{\"text\": \"broken\", \n");
    std::fs::write(p.path("train.jsonl"), text)?;
    expect_train_error(&p, &["train.jsonl:9", "invalid JSON"])
}

#[test]
fn unknown_dev_label_names_file_line_and_task() -> TestResult {
    let p = Project::new()?;
    let mut dev = DEV.to_vec();
    dev.push(("show me the fare", "airline", "O O O O"));
    std::fs::write(p.path("dev.jsonl"), jsonl(&dev))?;
    expect_train_error(&p, &["dev.jsonl:3", "task `intent`", "unknown label \"airline\""])
}

#[test]
fn tag_count_mismatch_is_reported() -> TestResult {
    let p = Project::new()?;
    let mut test = DEV.to_vec();
    test[1] = ("what is the cheapest fare to paris", "fare", "O O O");
    std::fs::write(p.path("test.jsonl"), jsonl(&test))?;
    expect_train_error(&p, &["test.jsonl:2", "3 tags for 7 words"])
}

#[test]
fn empty_data_file_is_reported() -> TestResult {
    let p = Project::new()?;
    std::fs::write(p.path("dev.jsonl"), "\n")?;
    expect_train_error(&p, &["dev.jsonl", "no examples"])
}

#[test]
fn missing_model_file_is_reported() -> TestResult {
    let p = Project::new()?;
    let text = std::fs::read_to_string(p.path("config.toml"))?;
    let model_dir = p.path("model");
    std::fs::create_dir(&model_dir)?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(repo_root().join("tests/fixtures/tiny-bert").join(f), model_dir.join(f))?;
    }
    let original = repo_root().join("tests/fixtures/tiny-bert").display().to_string();
    std::fs::write(p.path("config.toml"), text.replace(&original, &model_dir.display().to_string()))?;
    expect_train_error(&p, &["model.safetensors", "not found"])
}

#[test]
fn config_errors_name_the_line_and_choices() -> TestResult {
    let p = Project::new()?;
    p.write_config("warmup = 0.2")?;
    expect_train_error(&p, &["config.toml", "line 10", "unknown field `warmup`", "warmup_ratio"])?;
    p.write_config("")?;
    let out = p.mtl(&["train", "config.toml", "--out", "run", "--set", "training.select_metric=slots.f2"])?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("valid choices"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn existing_output_directory_is_not_overwritten() -> TestResult {
    let p = Project::new()?;
    std::fs::create_dir(p.path("run"))?;
    std::fs::write(p.path("run/keep.txt"), "mine")?;
    let out = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(p.path("run/keep.txt"))?, "mine");
    Ok(())
}

#[test]
fn conll_files_train_a_token_task() -> TestResult {
    let p = Project::new()?;
    let conll: String = TRAIN
        .iter()
        .map(|(text, _, slots)| {
            text.split(' ').zip(slots.split(' ')).map(|(w, t)| format!("{w}\t{t}\n")).collect::<String>() + "\n"
        })
        .collect();
    std::fs::write(p.path("train.conll"), format!("-DOCSTART- O\n\n{conll}"))?;
    let model = repo_root().join("tests/fixtures/tiny-bert");
    std::fs::write(
        p.path("conll.toml"),
        format!(
            "[model]\npath = \"{}\"\n[training]\nepochs = 1\nbatch_size = 4\nlr = 1e-3\n[tasks.ner]\nkind = \"token_classification\"\nformat = \"conll\"\ndata = {{ train = \"{}\", dev = \"{}\" }}\n",
            model.display(),
            p.path("train.conll").display(),
            p.path("train.conll").display()
        ),
    )?;
    let out = p.mtl(&["train", "conll.toml", "--out", "run"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/metrics.json"))?)?;
    assert!(metrics["dev"]["ner"]["f1"].is_number(), "{metrics}");
    let labels: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/labels.json"))?)?;
    assert_eq!(labels["ner"], serde_json::json!(["B-day", "B-from", "B-to", "I-from", "I-to", "O"]));
    Ok(())
}

#[test]
fn sampled_steps_train_one_task_each_reproducibly() -> TestResult {
    let p = Project::new()?;
    let sets = [
        "--set",
        "training.sampling.plan=\"sampled\"",
        "--set",
        "training.sampling.sampler=\"temperature\"",
        "--set",
        "training.epochs=2",
    ];
    for out in ["a", "b"] {
        let mut args = vec!["train", "config.toml", "--out", out];
        args.extend(sets);
        let o = p.mtl(&args)?;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(p.path("a/model.safetensors"))?, std::fs::read(p.path("b/model.safetensors"))?, "seeded");
    let mixed = p.mtl(&["train", "config.toml", "--out", "m", "--set", "training.epochs=2"])?;
    assert!(mixed.status.success(), "{}", stderr(&mixed));
    assert_ne!(std::fs::read(p.path("a/model.safetensors"))?, std::fs::read(p.path("m/model.safetensors"))?);
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("a/metrics.json"))?)?;
    assert!(metrics["test"]["slots"]["f1"].is_number() && metrics["test"]["intent"]["accuracy"].is_number());
    let bad = p.mtl(&["train", "config.toml", "--out", "x", "--set", "training.sampling.sampler=\"fixed\""])?;
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("the fixed sampler needs a weight for task `intent`"), "{}", stderr(&bad));
    let bad = p.mtl(&["train", "config.toml", "--out", "x", "--set", "training.sampling.sampler=\"softmax\""])?;
    assert!(
        stderr(&bad).contains("annealed") && stderr(&bad).contains("round_robin"),
        "choices listed: {}",
        stderr(&bad)
    );
    Ok(())
}

/// A dev label outside the training set is an error naming file and line, unless the task leaves such examples
/// out of its scores (`skip_unseen_labels`): then the run trains and scores the rest, and says how many.
#[test]
fn unseen_dev_labels_are_errors_or_left_out_when_asked() -> TestResult {
    let p = Project::new()?;
    let extra = jsonl(&[("show me hotels in denver", "hotel", "O O B-thing O B-to")]);
    let mut dev = std::fs::read_to_string(p.path("dev.jsonl"))?;
    dev.push_str(&extra);
    std::fs::write(p.path("dev.jsonl"), dev)?;
    let o = p.mtl(&["train", "config.toml", "--out", "strict", "--set", "training.epochs=1"])?;
    assert!(
        !o.status.success() && stderr(&o).contains("dev.jsonl:3") && stderr(&o).contains("\"hotel\""),
        "{}",
        stderr(&o)
    );
    // `mtl check` reports the same without training: the counts, and the unseen label with the policy.
    let o = p.mtl(&["check", "config.toml", "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout)?;
    let counts = serde_json::json!({"train": TRAIN.len(), "dev": DEV.len() + 1, "test": DEV.len()});
    assert_eq!(report["tasks"]["intent"]["examples"], counts);
    assert_eq!(report["tasks"]["intent"]["unseen"], serde_json::json!({"dev": {"hotel": 1}}));
    assert_eq!(report["tasks"]["intent"]["unseen_policy"], "error");
    assert_eq!(report["tasks"]["slots"]["unseen"]["dev"]["B-thing"], 1);
    // The epoch estimate: 8 training rows in batches of 4 are 2 steps, timed on the sample's steps.
    let estimate = &report["estimate"];
    assert_eq!(estimate["steps_per_epoch"], 2, "{estimate}");
    let (per_step, per_epoch) = (estimate["seconds_per_step"].as_f64(), estimate["seconds_per_epoch"].as_f64());
    assert!(per_step.is_some_and(|s| s > 0.0) && per_epoch == per_step.map(|s| 2.0 * s), "{estimate}");
    let o = p.mtl(&["check", "config.toml"])?;
    let printed = String::from_utf8(o.stdout)?;
    assert!(printed.contains("dev: 1 (hotel 1) → error"), "the table names it");
    assert!(printed.contains("an epoch of training here: about"), "{printed}");
    let o = p.mtl(&["check", "config.toml", "--json", "--no-estimate"])?;
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout)?["estimate"], Value::Null);
    let sets = [
        "--set",
        "training.epochs=1",
        "--set",
        "tasks.intent.skip_unseen_labels=true",
        "--set",
        "tasks.slots.skip_unseen_labels=true",
    ];
    let o = p.mtl(&[&["train", "config.toml", "--out", "lenient"][..], &sets[..]].concat())?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("dev: 1 examples of task `intent` have labels outside its set"), "{}", stderr(&o));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("lenient/metrics.json"))?)?;
    assert!(metrics["dev"]["intent"]["accuracy"].is_number(), "{metrics}");
    Ok(())
}

/// `mtl init` on JSON lines (intent + slots) and a CoNLL file writes a config that `mtl train` trains as
/// written, with the guesses said; an existing file is kept unless --force.
#[test]
fn init_writes_a_config_that_trains() -> TestResult {
    let p = Project::new()?;
    let conll: String = TRAIN
        .iter()
        .map(|(text, _, slots)| {
            text.split(' ').zip(slots.split(' ')).map(|(w, t)| format!("{w}\t{t}\n")).collect::<String>() + "\n"
        })
        .collect();
    std::fs::create_dir(p.path("ner"))?;
    std::fs::write(p.path("ner/ner_train.conll"), &conll)?;
    std::fs::write(p.path("ner/ner_dev.conll"), &conll)?;
    let model = repo_root().join("tests/fixtures/tiny-bert");
    let model = model.display().to_string();
    let args = ["init", "train.jsonl", "dev.jsonl", "test.jsonl", "ner/ner_train.conll", "ner/ner_dev.conll"];
    let o = p.mtl(&[&args[..], &["--out", "configs/init.toml", "--model", &model]].concat())?;
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("3 task(s): intent, slots, ner"), "{said}");
    let text = std::fs::read_to_string(p.path("configs/init.toml"))?;
    for line in [
        "[tasks.intent]\nkind = \"classification\"",
        "[tasks.slots]\nkind = \"token_classification\"",
        "[tasks.ner]\nkind = \"token_classification\"\nformat = \"conll\"",
        "data = { train = \"../train.jsonl\", dev = \"../dev.jsonl\", test = \"../test.jsonl\" }",
        "frame = [\"intent\", \"slots\"]",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    let o = p.mtl(&["train", "configs/init.toml", "--out", "run", "--set", "training.epochs=1"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/metrics.json"))?)?;
    assert!(metrics["dev"]["ner"]["f1"].is_number() && metrics["test"]["intent"]["accuracy"].is_number(), "{metrics}");
    let o = p.mtl(&[&args[..], &["--out", "configs/init.toml", "--model", &model]].concat())?;
    assert!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    Ok(())
}

/// RoBERTa-, ELECTRA-, DistilBERT-, MPNet- and DeBERTa-family encoders (the tiny random ones of tests/fixtures, each with
/// a tokenizer of its family's kind) train, predict, evaluate, export, prune and quantise like BERT (int8 predicts
/// too; DeBERTa and ModernBERT refuse int8 with a clear error).
#[test]
fn other_encoder_families_train_and_predict() -> TestResult {
    let p = Project::new()?;
    let bert = repo_root().join("tests/fixtures/tiny-bert");
    let config = std::fs::read_to_string(p.path("config.toml"))?;
    for family in ["roberta", "xlm-roberta", "electra", "electra-small", "distilbert", "mpnet", "deberta", "modernbert"]
    {
        let model = repo_root().join(format!("tests/fixtures/tiny-{family}"));
        let file = format!("{family}.toml");
        std::fs::write(p.path(&file), config.replace(&bert.display().to_string(), &model.display().to_string()))?;
        let out = format!("run-{family}");
        let o = p.mtl(&["train", &file, "--out", &out, "--set", "training.epochs=2"])?;
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let o = mtl(p.dir.path(), &["predict", "--model", &out], Some("show me flights to boston\n"))?;
        let record: Value = serde_json::from_slice(&o.stdout)?;
        assert!(record["predictions"]["intent"]["label"].is_string(), "{family}: {record}");
        let o = p.mtl(&["eval", "--model", &out])?;
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let o = p.mtl(&["export", "--model", &out, "--out", &format!("hf-{family}")])?;
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        // Pruned, the run loads and predicts (DistilBERT's config keeps the new depth); int8 where it can.
        let pruned = format!("pruned-{family}");
        let o = p.mtl(&["prune", "--model", &out, "--layers", "1", "--out", &pruned])?;
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let o = mtl(p.dir.path(), &["predict", "--model", &pruned], Some("show me flights to boston\n"))?;
        assert!(o.status.success(), "{family} pruned: {}", stderr(&o));
        let o = p.mtl(&["quantize", "--model", &out, "--out", &format!("int8-{family}")])?;
        match family {
            "deberta" => {
                assert!(!o.status.success() && stderr(&o).contains("disentangled attention"), "{}", stderr(&o))
            }
            "modernbert" => assert!(!o.status.success() && stderr(&o).contains("ModernBERT"), "{}", stderr(&o)),
            _ => {
                assert!(o.status.success(), "{family}: {}", stderr(&o));
                let o =
                    mtl(p.dir.path(), &["predict", "--model", &format!("int8-{family}")], Some("show me flights\n"))?;
                let record: Value = serde_json::from_slice(&o.stdout)?;
                assert!(record["predictions"]["intent"]["label"].is_string(), "{family} int8: {record}");
            }
        }
    }
    Ok(())
}

/// A base model saved as PyTorch's pytorch_model.bin with a WordPiece vocab.txt and no tokenizer.json
/// (tests/fixtures/tiny-bert-bin) trains, fully and with LoRA on it; the run carries the tokenizer built from
/// the vocabulary and predicts like the same weights from safetensors.
#[test]
fn pytorch_weights_and_a_vocab_txt_train() -> TestResult {
    let p = Project::new()?;
    let bert = repo_root().join("tests/fixtures/tiny-bert");
    let bin = repo_root().join("tests/fixtures/tiny-bert-bin");
    let config = std::fs::read_to_string(p.path("config.toml"))?;
    std::fs::write(p.path("bin.toml"), config.replace(&bert.display().to_string(), &bin.display().to_string()))?;
    let mut outputs = Vec::new();
    for (file, out) in [("config.toml", "safetensors"), ("bin.toml", "bin")] {
        let o = p.mtl(&["train", file, "--out", out, "--set", "training.epochs=2"])?;
        assert!(o.status.success(), "{out}: {}", stderr(&o));
        let o = mtl(p.dir.path(), &["predict", "--model", out], Some("show me flights to boston\n"))?;
        outputs.push(String::from_utf8(o.stdout)?);
    }
    assert!(p.path("bin/tokenizer.json").is_file(), "the run carries the tokenizer built from vocab.txt");
    // The same weights and WordPiece vocabulary: the same predictions as from tiny-bert's own files.
    assert_eq!(outputs[0], outputs[1]);
    let o =
        p.mtl(&["train", "bin.toml", "--out", "lora", "--set", "training.epochs=1", "--set", "peft.method=\"lora\""])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mtl(p.dir.path(), &["predict", "--model", "lora"], Some("show me flights to boston\n"))?;
    assert!(o.status.success(), "{}", stderr(&o));
    Ok(())
}
