//! `mtl train` on a decoder: the tiny random Llama of tests/fixtures/tiny-llama with a word-level tokenizer,
//! trained on the intent and slot tasks of the tiny project as text, with one LoRA adapter per task.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::cli::{stderr, Project, TestResult};
use crate::repo_root;

/// A Hugging Face decoder directory: the tiny Llama and a word-level tokenizer over the project's words
/// (ids below its vocabulary of 64), with the newline its own token so that answers keep their lines.
fn decoder_dir(p: &Project) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let dir = p.path("decoder");
    std::fs::create_dir_all(&dir)?;
    let fixture = repo_root().join("tests/fixtures/tiny-llama");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), dir.join(name))?;
    }
    let words = "<pad> <s> </s> [UNK] = \n intent slots of none flight fare from to day show me flights boston denver i want fly \
                 dallas what is the cheapest new york paris london on monday a morning";
    let mut vocab: Vec<String> = words.split(' ').map(String::from).collect();
    vocab[5] = "\n".into();
    let vocab: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    assert!(vocab.len() < 64);
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 5, "content": "\n", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    Ok(dir)
}

fn text_config(p: &Project, peft: &str, slots_kind: &str) -> TestResult {
    let decoder = decoder_dir(p)?;
    let config = std::fs::read_to_string(p.path("config.toml"))?;
    let tiny_bert = repo_root().join("tests/fixtures/tiny-bert");
    let config = config
        .replace(&tiny_bert.display().to_string(), &decoder.display().to_string())
        .replace("max_len = 12", "max_len = 40")
        .replace("epochs = 3", "epochs = 40")
        .replace("lr = 5e-3", "lr = 2e-2")
        .replace("kind = \"classification\"", "kind = \"classification\"\nprompt = \"intent of {text}\"")
        .replace(
            "kind = \"token_classification\"",
            &format!("kind = \"{slots_kind}\"\nprompt = \"slots of {{text}}\""),
        );
    std::fs::write(p.path("config.toml"), format!("{config}\n{peft}\n"))?;
    Ok(())
}

#[test]
fn a_decoder_trains_its_tasks_as_text_with_an_adapter_each() -> TestResult {
    let p = Project::new()?;
    text_config(&p, "[peft]\nmethod = \"lora\"\nr = 4\nper_task = true", "token_classification")?;
    let o = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = p.path("run");
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json"))?)?;
    for (task, metric) in [("intent", "accuracy"), ("slots", "f1"), ("joint", "frame_accuracy")] {
        let v = metrics["test"][task][metric].as_f64().ok_or(format!("test {task}.{metric} in {metrics}"))?;
        assert!((0.0..=1.0).contains(&v), "{task}.{metric} = {v}");
    }
    // 40 epochs of 8 examples teach even the tiny random model the two intents' words and some slots.
    assert!(
        metrics["test"]["intent"]["accuracy"].as_f64() > Some(0.0)
            && metrics["test"]["slots"]["f1"].as_f64() > Some(0.0),
        "{metrics}"
    );
    // Only the adapters are saved: A and B of seven projections in two layers, for each task.
    let saved: HashMap<String, Tensor> =
        candle_core::safetensors::load(out.join("adapters.safetensors"), &Device::Cpu)?;
    assert_eq!(saved.len(), 2 * 7 * 2 * 2, "{:?}", saved.keys());
    for task in ["intent", "slots"] {
        let own: Vec<&String> = saved.keys().filter(|n| n.contains(&format!(".lora_B.{task}."))).collect();
        assert_eq!(own.len(), 14);
        for name in own {
            assert!(saved[name].abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name} did not train");
        }
    }
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json"))?)?;
    assert_eq!(meta["architecture"], json!("llama"));
    assert!(meta["max_new_tokens"].is_object(), "{meta}");
    assert!(!out.join("model.safetensors").exists(), "the frozen decoder is not copied");
    // The saved adapters on the base model answer as at the end of training.
    let o = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(eval["test"], metrics["test"], "{eval}");
    // The same run as format 0 wrote it (before run.json: base_model.json with the base's absolute path, its
    // CRC-32, a decoder flag and the answer budgets) opens and scores the same.
    let decoder = p.path("decoder").canonicalize()?;
    let legacy = json!({
        "path": decoder,
        "decoder": true,
        "weights_crc32": crc32fast::hash(&std::fs::read(decoder.join("model.safetensors"))?),
        "max_new_tokens": meta["max_new_tokens"],
    });
    std::fs::remove_file(out.join("run.json"))?;
    std::fs::write(out.join("base_model.json"), legacy.to_string())?;
    let o = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let legacy_eval: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(legacy_eval, eval);
    // `mtl predict` answers every task of each input line.
    let o = crate::cli::mtl(
        &p.path(""),
        &["predict", "--model", "run"],
        Some("show me flights from boston to denver\n{\"text\": \"what is the fare to paris\"}\n"),
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert!(
            line["predictions"]["intent"]["generated"].is_string() && line["predictions"]["slots"]["spans"].is_array(),
            "{line}"
        );
    }
    assert_eq!(lines[1]["text"], "what is the fare to paris");
    // `mtl serve` answers the same through `/v1/predict`: each (input, task) one generation through the task's
    // adapter, batched with the others.
    let (_server, addr) = crate::serve::start_server(p.dir.path(), &["serve", "run", "--addr", "127.0.0.1:0"])?;
    let inputs = json!({"inputs": ["show me flights from boston to denver", {"text": "what is the fare to paris"}]});
    let (status, answer) = crate::serve::http(&addr, "POST", "/v1/predict", Some(&inputs))?;
    assert_eq!(status, 200, "{answer}");
    let served = answer["predictions"].as_array().ok_or("predictions")?;
    assert_eq!(served.len(), 2);
    for (got, want) in served.iter().zip(&lines) {
        assert_eq!(got, &want["predictions"], "the server answers as mtl predict");
    }
    let (status, one) = crate::serve::http(
        &addr,
        "POST",
        "/v1/tasks/slots/predict",
        Some(&json!({"inputs": [{"words": ["fly", "to", "paris"]}]})),
    )?;
    assert_eq!(status, 200, "{one}");
    assert!(one["predictions"][0]["slots"]["spans"].is_array(), "{one}");
    let (status, tasks) = crate::serve::http(&addr, "GET", "/v1/tasks", None)?;
    assert_eq!((status, tasks["tasks"][1]["name"].clone()), (200, json!("slots")));
    Ok(())
}

/// AdaLoRA per task on the decoder: each task's singular values pruned to its budget (half the initial rank over
/// its fourteen projections), A, B and E saved, and the saved run answering as training scored it.
#[test]
fn a_decoder_prunes_per_task_adalora_to_its_budget() -> TestResult {
    let p = Project::new()?;
    let peft = "[peft]\nmethod = \"adalora\"\nr = 4\nper_task = true\n[peft.adalora]\ntarget_r = 2\ntfinal = 4";
    text_config(&p, peft, "token_classification")?;
    let o = p.mtl(&["train", "config.toml", "--out", "run", "--set", "training.epochs=12"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = p.path("run");
    let saved: HashMap<String, Tensor> =
        candle_core::safetensors::load(out.join("adapters.safetensors"), &Device::Cpu)?;
    assert_eq!(saved.len(), 3 * 7 * 2 * 2, "A, B and E: {:?}", saved.keys());
    for task in ["intent", "slots"] {
        let mut kept = 0;
        for (name, e) in saved.iter().filter(|(n, _)| n.contains(&format!(".lora_E.{task}."))) {
            let values = e.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(values.len(), 4, "{name}");
            kept += values.iter().filter(|v| **v != 0.0).count();
        }
        assert_eq!(kept, 2 * 14, "{task}: target_r = 2 per projection on average");
    }
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json"))?)?;
    let o = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(eval["test"], metrics["test"], "{eval}");
    Ok(())
}

#[test]
fn decoder_configs_are_checked_before_anything_runs() -> TestResult {
    let p = Project::new()?;
    // Plain tags (no spans to name) cannot be answered as `type=value` lines.
    text_config(&p, "", "token_classification\"\nscheme = \"none")?;
    let o = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("config.toml") && err.contains("tasks.slots.scheme") && err.contains("decoder"), "{err}");
    assert!(!p.path("run").exists());

    let p = Project::new()?;
    text_config(&p, "[peft]\nmethod = \"prefix\"", "token_classification")?;
    let o = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("peft.method"), "{}", stderr(&o));
    Ok(())
}

/// A generation task beside a label task: free text written for each input, trained by the LM loss on the
/// target and scored by ROUGE-L and exact match; several references per input are allowed.
#[test]
fn a_decoder_learns_a_generation_task_scored_by_rouge_l() -> TestResult {
    let p = Project::new()?;
    text_config(&p, "[peft]\nmethod = \"lora\"\nr = 4", "token_classification")?;
    // The route of each request, written out: the places it names, in order.
    let rows = |file: &str| -> Result<String, Box<dyn std::error::Error>> {
        let mut out = String::new();
        for line in std::fs::read_to_string(p.path(file))?.lines() {
            let v: Value = serde_json::from_str(line)?;
            let words: Vec<&str> = v["words"].as_array().ok_or("words")?.iter().filter_map(Value::as_str).collect();
            let tags: Vec<&str> = v["slots"].as_array().ok_or("slots")?.iter().filter_map(Value::as_str).collect();
            let places: Vec<&str> = words
                .iter()
                .zip(&tags)
                .filter(|(_, t)| t.ends_with("from") || t.ends_with("to"))
                .map(|(w, _)| *w)
                .collect();
            let route = if places.is_empty() { "none".to_string() } else { places.join(" ") };
            out += &format!("{}\n", json!({"text": v["text"], "route": [route, "none"]}));
        }
        Ok(out)
    };
    for split in ["train", "dev", "test"] {
        std::fs::write(p.path(&format!("route-{split}.jsonl")), rows(&format!("{split}.jsonl"))?)?;
    }
    let d = |s: &str| p.path(s).display().to_string();
    // Intent and route only: the slots task and the frame go.
    let config = std::fs::read_to_string(p.path("config.toml"))?.replace("frame = [\"intent\", \"slots\"]", "");
    let start = config.find("[tasks.slots]").ok_or("a slots task")?;
    let end = start + config[start + 1..].find("\n[").ok_or("a section after slots")? + 2;
    let config = format!("{}{}", &config[..start], &config[end..]);
    let config = format!(
        "{config}\n[tasks.route]\nkind = \"generation\"\nlabel_field = \"route\"\nprompt = \"route of {{text}}\"\n\
         data = {{ train = \"{}\", dev = \"{}\", test = \"{}\" }}\n",
        d("route-train.jsonl"),
        d("route-dev.jsonl"),
        d("route-test.jsonl")
    );
    std::fs::write(p.path("config.toml"), config)?;
    let o = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/metrics.json"))?)?;
    let rouge = metrics["test"]["route"]["rouge_l"].as_f64().ok_or(format!("route.rouge_l in {metrics}"))?;
    let exact = metrics["test"]["route"]["exact_match"].as_f64().ok_or("route.exact_match")?;
    assert!(rouge > 0.0 && rouge <= 1.0 && (0.0..=1.0).contains(&exact), "{metrics}");
    let o = p.mtl(&["eval", "--model", "run", "--config", "config.toml"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(eval["test"]["route"], metrics["test"]["route"], "{eval}");
    let o =
        crate::cli::mtl(&p.path(""), &["predict", "--model", "run"], Some("show me flights from boston to denver\n"))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let line: Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').next().ok_or("a line")?)?;
    assert!(line["predictions"]["route"]["generated"].is_string(), "{line}");
    Ok(())
}

#[test]
fn an_encoder_refuses_generation_tasks() -> TestResult {
    let p = Project::new()?;
    let config =
        std::fs::read_to_string(p.path("config.toml"))?.replace("kind = \"classification\"", "kind = \"generation\"");
    std::fs::write(p.path("config.toml"), config)?;
    let o = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("config.toml") && err.contains("tasks.intent.kind") && err.contains("decoder"), "{err}");
    assert!(!p.path("run").exists());
    Ok(())
}

/// `mtl check` on a decoder: its prompts with their answers counted against `model.max_len`, as training
/// counts them, and the epoch estimate from the decoder's own steps.
#[test]
fn check_counts_a_decoders_cut_prompts() -> TestResult {
    let p = Project::new()?;
    text_config(&p, "[peft]\nmethod = \"lora\"\nr = 4\nper_task = true", "token_classification")?;
    let o = p.mtl(&["check", "config.toml", "--json", "--set", "model.max_len=12"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(report["decoder"], true);
    let cut = report["truncated"]["train"].as_u64().ok_or("a count")?;
    assert!(cut > 0, "sequences of the prompt's words, the chat turns and the answer pass 12 tokens: {report}");
    assert!(report["estimate"]["steps_per_epoch"].as_u64() > Some(0), "{report}");
    // Training says the same.
    let o =
        p.mtl(&["train", "config.toml", "--out", "run", "--set", "model.max_len=12", "--set", "training.epochs=1"])?;
    let said = format!("train: {cut} of ");
    assert!(
        stderr(&o).contains(&said) && stderr(&o).contains("prompts and answers were longer than 12"),
        "{}",
        stderr(&o)
    );
    Ok(())
}
