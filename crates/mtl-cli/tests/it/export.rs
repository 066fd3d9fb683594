//! `mtl export` on the tiny model: one transformers directory per task, with the architecture, labels and
//! tensor names transformers expects (tests/python/check_export.py compares predictions with transformers
//! itself, in scripts/test.sh).

use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::cli::{stderr, Project, TestResult};
use crate::repo_root;

fn json(path: &std::path::Path) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn export_writes_a_transformers_directory_per_task() -> TestResult {
    let p = Project::new()?;
    for (run, sets) in
        [("full", vec![]), ("lora", vec!["--set", "peft.method=\"lora\"", "--set", "peft.per_task=true"])]
    {
        let mut args = vec!["train", "config.toml", "--out", run, "--set", "training.epochs=1"];
        args.extend(sets);
        let o = p.mtl(&args)?;
        assert!(o.status.success(), "{}", stderr(&o));
        let out = format!("{run}-hf");
        let o = p.mtl(&["export", "--model", run, "--out", &out])?;
        assert!(o.status.success(), "{}", stderr(&o));
        let base: HashMap<String, Tensor> = candle_core::safetensors::load(
            repo_root().join("tests/fixtures/tiny-bert/model.safetensors"),
            &Device::Cpu,
        )?;
        let labels = json(&p.path(run).join("labels.json"))?;
        for (task, arch, extra) in [
            (
                "intent",
                "BertForSequenceClassification",
                &["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"][..],
            ),
            ("slots", "BertForTokenClassification", &["classifier.weight", "classifier.bias"][..]),
        ] {
            let dir = p.path(&out).join(task);
            let config = json(&dir.join("config.json"))?;
            assert_eq!(config["architectures"][0], arch);
            assert_eq!(config["hidden_size"], 32, "the base config is kept");
            let names: Vec<&str> = labels[task]
                .as_array()
                .or(labels[task]["labels"].as_array())
                .ok_or("labels")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(config["id2label"].as_object().ok_or("id2label")?.len(), names.len());
            for (i, l) in names.iter().enumerate() {
                assert_eq!(config["id2label"][i.to_string()], *l);
                assert_eq!(config["label2id"][*l], i);
            }
            let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
            let got: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
            let want: BTreeSet<String> =
                base.keys().map(|k| format!("bert.{k}")).chain(extra.iter().map(|s| s.to_string())).collect();
            assert_eq!(got, want.iter().map(String::as_str).collect(), "{task}");
            assert!(dir.join("tokenizer.json").exists() && dir.join("tokenizer_config.json").exists());
            let tokenizer = json(&dir.join("tokenizer.json"))?;
            assert!(tokenizer["padding"].is_null() && tokenizer["truncation"].is_null(), "fixed padding is removed");
            // Per-task LoRA: each task's backbone carries its own merged update.
            if run == "lora" {
                let q = "bert.encoder.layer.0.attention.self.query.weight";
                let diff = (&tensors[q] - &base["encoder.layer.0.attention.self.query.weight"])?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                assert!(diff > 0.0, "{task}: LoRA is merged into the query weights");
                // And PEFT's format: the task's adapter under PEFT's names, with the head to save.
                let adapter = candle_core::safetensors::load(dir.join("peft/adapter_model.safetensors"), &Device::Cpu)?;
                let lora: Vec<&String> = adapter.keys().filter(|k| k.contains(".lora_")).collect();
                assert_eq!(lora.len(), 2 * 2 * 2, "{:?}", adapter.keys());
                assert!(
                    adapter.contains_key("base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight")
                );
                assert!(adapter.contains_key("base_model.model.classifier.weight"));
                let config = json(&dir.join("peft/adapter_config.json"))?;
                assert_eq!(config["peft_type"], "LORA");
                assert_eq!(config["r"], 8);
            } else {
                assert!(!dir.join("peft").exists(), "PEFT's format is for LoRA runs");
            }
        }
        let q = "bert.encoder.layer.0.attention.self.query.weight";
        let a = candle_core::safetensors::load(p.path(&out).join("intent/model.safetensors"), &Device::Cpu)?;
        let b = candle_core::safetensors::load(p.path(&out).join("slots/model.safetensors"), &Device::Cpu)?;
        let same = (&a[q] - &b[q])?.abs()?.sum_all()?.to_scalar::<f32>()? == 0.0;
        assert_eq!(same, run == "full", "{run}: one shared backbone, or one per task's adapter");
        let o = p.mtl(&["export", "--model", run, "--out", &out])?;
        assert!(!o.status.success() && stderr(&o).contains("already exists"), "{}", stderr(&o));
    }
    Ok(())
}

/// A run on another family is exported in that family's names: its task models' classes, its prefix and
/// block names, and its sequence head (DistilBERT's `pre_classifier` and `classifier`; MPNet's
/// `classifier.dense` and `classifier.out_proj`), with DistilBERT's own name for the depth.
#[test]
fn export_writes_each_family_under_its_own_names() -> TestResult {
    let p = Project::new()?;
    for (family, class, prefix, head) in [
        ("tiny-distilbert", "DistilBert", "distilbert.", ["pre_classifier", "classifier"]),
        ("tiny-mpnet", "MPNet", "mpnet.", ["classifier.dense", "classifier.out_proj"]),
        // ModernBERT's prediction head is in every task model, token ones too; biases where the config has them.
        ("tiny-modernbert", "ModernBert", "model.", ["head.dense", "classifier"]),
        ("tiny-modernbert-bias", "ModernBert", "model.", ["head.dense", "classifier"]),
    ] {
        let model = repo_root().join("tests/fixtures").join(family);
        let path = format!("model.path={:?}", model.display().to_string());
        let o = p.mtl(&["train", "config.toml", "--out", family, "--set", "training.epochs=1", "--set", &path])?;
        assert!(o.status.success(), "{}", stderr(&o));
        let out = format!("{family}-hf");
        let o = p.mtl(&["export", "--model", family, "--out", &out])?;
        assert!(o.status.success(), "{}", stderr(&o));
        let base = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)?;
        for (task, arch) in [("intent", "ForSequenceClassification"), ("slots", "ForTokenClassification")] {
            let dir = p.path(&out).join(task);
            let config = json(&dir.join("config.json"))?;
            assert_eq!(config["architectures"][0], format!("{class}{arch}"));
            if family == "tiny-distilbert" {
                assert_eq!(config["n_layers"], 2, "DistilBERT's depth");
                assert!(config.get("num_hidden_layers").is_none(), "no second depth for transformers to choose from");
            }
            let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
            let got: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
            let modern = class == "ModernBert";
            let extra: Vec<&str> = if task == "intent" || modern { head.to_vec() } else { vec!["classifier"] };
            let biased = family != "tiny-modernbert";
            let want: BTreeSet<String> = base
                .keys()
                .map(|k| if k.starts_with(prefix) { k.clone() } else { format!("{prefix}{k}") })
                .chain(extra.iter().flat_map(|m| {
                    let bias = biased || *m == "classifier";
                    std::iter::once(format!("{m}.weight")).chain(bias.then(|| format!("{m}.bias")))
                }))
                .chain(modern.then(|| "head.norm.weight".to_string()))
                .chain((modern && biased).then(|| "head.norm.bias".to_string()))
                .collect();
            if modern {
                // As trained: tiny-modernbert-bias's config pools by the mean, tiny-modernbert's reads [CLS].
                assert_eq!(config["classifier_pooling"], if biased { "mean" } else { "cls" });
            }
            assert_eq!(got, want.iter().map(String::as_str).collect(), "{family} {task}");
        }
    }
    Ok(())
}

/// A per-task LoRA adapter named like a module (`output`) keeps its tensors' module names in PEFT's format.
#[test]
fn peft_export_of_a_task_named_like_a_module() -> TestResult {
    let p = Project::new()?;
    let config = std::fs::read_to_string(p.path("config.toml"))?;
    assert!(config.contains("[tasks.intent]"), "the project's config names the intent task");
    let renamed =
        config.replace("[tasks.intent]", "[tasks.output]").replace("frame = [\"intent\"", "frame = [\"output\"");
    std::fs::write(p.path("renamed.toml"), renamed)?;
    let lora = [
        "--set",
        "peft.method=\"lora\"",
        "--set",
        "peft.per_task=true",
        "--set",
        "peft.target_modules=[\"query\", \"output\"]",
        "--set",
        "training.epochs=1",
    ];
    let o = p.mtl(&[&["train", "renamed.toml", "--out", "run"][..], &lora[..]].concat())?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = p.mtl(&["export", "--model", "run", "--out", "hf"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = candle_core::safetensors::load(p.path("hf/output/peft/adapter_model.safetensors"), &Device::Cpu)?;
    let lora: Vec<&String> = adapter.keys().filter(|k| k.contains(".lora_")).collect();
    assert!(lora.iter().any(|k| k.contains(".output.dense.lora_A.")), "{:?}", adapter.keys());
    for name in lora {
        assert!(
            name.starts_with("base_model.model.bert.encoder.layer.")
                && name.ends_with(".weight")
                && !name.contains("output.weight"),
            "{name}"
        );
    }
    Ok(())
}
