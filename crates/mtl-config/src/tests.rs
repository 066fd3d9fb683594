//! Config parsing and validation against hand-written files, and every example config of the repository.

#![allow(unused_imports)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_core::{TaskId, TaskKind};

use crate::overrides::apply_override;
use crate::*;

#[cfg(test)]
mod parsing {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "assets/model"

[training]
epochs = 3
lr = 1e-4

[tasks.intent]
kind = "classification"
label_field = "intent"
data = { train = "train.jsonl", dev = "dev.jsonl" }

[tasks.slots]
kind = "token_classification"
label_field = "slots"
data = { train = "train.jsonl", dev = "dev.jsonl" }

[joint]
frame = ["intent", "slots"]
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(text, Path::new("run.toml"), &overrides)
    }

    #[test]
    fn defaults_are_filled_in() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &[])?;
        assert_eq!(c.model.max_len, 128);
        assert_eq!(c.training.batch_size, 32);
        assert_eq!(c.training.grad_clip, Some(1.0));
        assert_eq!(c.tasks.len(), 2);
        assert_eq!(c.head_lr(), 1e-4);
        Ok(())
    }

    #[test]
    fn overrides_are_typed_and_validated() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &["training.lr=3e-5", "model.path=other dir", "training.select_metric=slots.f1"])?;
        assert_eq!(c.training.lr, 3e-5);
        assert_eq!(c.model.path, PathBuf::from("other dir"));
        let e = parse(MINIMAL, &["training.lr=abc"]).expect_err("a string lr must fail");
        assert!(e.to_string().contains("training.lr=abc"), "{e}");
        let e = parse(MINIMAL, &["training.nope=1"]).expect_err("unknown key must fail");
        assert!(e.to_string().contains("unknown field `nope`"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_keys_name_line_and_choices() {
        let text = MINIMAL.replace("epochs = 3", "epochs = 3\nepoch = 4");
        let e = parse(&text, &[]).expect_err("unknown key must fail").to_string();
        assert!(e.contains("run.toml"), "{e}");
        assert!(e.contains("line 7"), "{e}");
        assert!(e.contains("unknown field `epoch`"), "{e}");
        assert!(e.contains("epochs"), "the valid choices are listed: {e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = parse(MINIMAL, &["training.select_metric=slots.f2"]).expect_err("bad metric").to_string();
        assert!(e.contains("training.select_metric") && e.contains("slots.f1"), "{e}");
        let e = parse(MINIMAL, &["training.dropout=1.5"]).expect_err("bad dropout").to_string();
        assert!(e.contains("training.dropout"), "{e}");
        let e = parse(MINIMAL, &["joint.frame=[\"intent\", \"nope\"]"]).expect_err("bad joint").to_string();
        assert!(e.contains("unknown task `nope`"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.text_field=sentence"]).expect_err("shared file").to_string();
        assert!(e.contains("tasks.slots") && e.contains("intent"), "{e}");
    }

    #[test]
    fn task_options_are_checked_against_the_kind() {
        let e = parse(MINIMAL, &["tasks.intent.crf=true"]).expect_err("crf on a classifier").to_string();
        assert!(e.contains("tasks.intent.crf"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.format=\"csv\""]).expect_err("token task from CSV").to_string();
        assert!(e.contains("tasks.slots.format"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.format=\"conllu\""]).expect_err("tags for a classifier").to_string();
        assert!(e.contains("tasks.intent.format"), "{e}");
        let e = parse(MINIMAL, &["tasks.slots.kind=\"question_answering\""]).expect_err("QA shares a file").to_string();
        assert!(e.contains("question answering task needs files of its own"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.unknown_label=\"x\"", "tasks.intent.labels=[\"a\", \"b\"]"])
            .expect_err("fallback outside the set")
            .to_string();
        assert!(e.contains("tasks.intent.unknown_label"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.kind=\"regression\"", "tasks.intent.labels=[\"a\"]"])
            .expect_err("labels for regression")
            .to_string();
        assert!(e.contains("regression tasks have no label set"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.kind=\"generation\"", "tasks.intent.labels_file=\"l.txt\""])
            .expect_err("labels for generation")
            .to_string();
        assert!(e.contains("tasks.intent.labels_file") && e.contains("generation tasks have no label set"), "{e}");
        let c = parse(MINIMAL, &["tasks.intent.kind=\"generation\"", "training.select_metric=\"intent.rouge_l\""])
            .expect("generation");
        assert!(c.metric_names().contains(&"intent.exact_match".to_string()));
        let e = parse(MINIMAL, &["tasks.intent.threshold=1.5"]).expect_err("threshold").to_string();
        assert!(e.contains("tasks.intent.threshold"), "{e}");
        let e = parse(MINIMAL, &["tasks.intent.scheme=\"iob1\""]).expect_err("unknown scheme").to_string();
        assert!(e.contains("unknown variant `iob1`"), "{e}");
    }

    /// The whole message of each recipe error, as a user sees it.
    #[test]
    fn recipe_errors_snapshot() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["training.weighting.method=\"gradnorm\""],
                "invalid override `training.weighting.method=\"gradnorm\"`: unknown variant `gradnorm`, expected one of `static`, `uncertainty`, `dwa`, `grad_norm`, `rlw`, `famo`, `imtl`, `log`, `auto_lambda`",
            ),
            (
                &["training.surgery.method=\"mgda_ub\""],
                "invalid override `training.surgery.method=\"mgda_ub\"`: unknown variant `mgda_ub`, expected one of `none`, `pcgrad`, `cagrad`, `mgda`, `imtl`, `aligned_mtl`, `nash_mtl`, `db_mtl`",
            ),
            (
                &["training.weighting.method=\"auto_lambda\"", "training.surgery.method=\"pcgrad\""],
                "invalid config run.toml: field `training.surgery.method`: Auto-λ learns the tasks' weights from the step's whole gradient; use it without gradient surgery",
            ),
            (
                &["training.schedule=\"step\""],
                "invalid override `training.schedule=\"step\"`: unknown variant `step`, expected one of `linear`, `cosine`, `constant`",
            ),
            (
                &["training.weighting.method=\"grad_norm\"", "training.sampling.plan=\"sampled\""],
                "invalid config run.toml: field `training.weighting.method`: compares the tasks' gradients within a step, so it needs `sampling.plan = \"mixed\"` (a sampled step trains one task)",
            ),
            (
                &["training.surgery.method=\"pcgrad\"", "training.freeze.backbone=true"],
                "invalid config run.toml: field `training.surgery.method`: works on the shared parameters, and the backbone is frozen",
            ),
            (
                &["training.score_weights.slots.f2=1.0"],
                "invalid config run.toml: field `training.score_weights`: task `slots` has no metric `f2`; valid choices: precision, recall, f1, accuracy",
            ),
            (
                &["training.score_weights.nope.f1=1.0"],
                "invalid config run.toml: field `training.score_weights`: unknown task `nope`; tasks are: intent, slots",
            ),
            (
                &["training.score_weights.slots.f1=\"null\""],
                "invalid config run.toml: field `training.score_weights`: at least one metric needs a positive weight",
            ),
            (
                &["training.score_weights.slots.f1=1.0", "training.select_metric=slots.f1"],
                "invalid config run.toml: field `training.score_weights`: give `select_metric` or `score_weights`, not both",
            ),
            (
                &["training.weighting.weights.intent=2.0", "training.weighting.method=\"dwa\""],
                "invalid config run.toml: field `training.weighting.weights`: fixed weights belong to the `static` method",
            ),
            (&["training.layer_lr_decay=1.5"], "invalid config run.toml: field `training.layer_lr_decay`: must be in (0, 1], got 1.5"),
            (&["training.grad_accumulation=0"], "invalid config run.toml: field `training.grad_accumulation`: must be at least 1"),
            (&["training.patience=0"], "invalid config run.toml: field `training.patience`: must be at least 1"),
            (
                &["training.sampling.epochs.intent=1"],
                "invalid config run.toml: field `training.sampling.epochs`: a task's own number of passes needs `plan = \"sampled\"` (the mixed plan batches all tasks' examples together)",
            ),
            (
                &["training.sampling.plan=\"sampled\"", "training.sampling.epochs.intent=0"],
                "invalid config run.toml: field `training.sampling.epochs`: task `intent`: 0 passes; must be a positive number",
            ),
            (
                &["training.sampling.plan=\"sampled\"", "training.sampling.epochs.ner=1"],
                "invalid config run.toml: field `training.sampling.epochs`: unknown task `ner`; tasks are: intent, slots",
            ),
            (&["training.freeze.unfreeze_every=0"], "invalid config run.toml: field `training.freeze.unfreeze_every`: must be at least 1"),
            (
                &["training.weighting.alpha=-1"],
                "invalid config run.toml: field `training.weighting.alpha`: must be a positive number, got -1",
            ),
        ];
        for (overrides, want) in cases {
            let got = parse(MINIMAL, overrides).expect_err("invalid").to_string();
            assert_eq!(&got, want, "for {overrides:?}");
        }
        let c =
            parse(MINIMAL, &["training.score_weights.slots.f1=2.0", "training.score_weights.slots.precision=\"null\""])
                .expect("null marks a metric as reported only");
        let w = &c.training.score_weights.as_ref().expect("set")[&TaskId::new("slots").expect("valid")];
        assert_eq!(w["f1"].weight(), Some(2.0));
        assert_eq!(w["precision"].weight(), None);
    }

    #[test]
    fn peft_errors_snapshot() {
        let lora = "peft.method=\"lora\"";
        let cases: &[(&[&str], &str)] = &[
            (
                &["peft.method=\"ia3\""],
                "invalid override `peft.method=\"ia3\"`: unknown variant `ia3`, expected one of `none`, `lora`, `adapter`, `prefix`, `adalora`",
            ),
            (
                &[lora, "peft.target_modules=[\"query\", \"dense\"]"],
                "invalid override `peft.method=\"lora\" peft.target_modules=[\"query\", \"dense\"]`: unknown variant `dense`, expected one of `query`, `key`, `value`, `attention_output`, `intermediate`, `output`",
            ),
            (&["peft.per_task=true"], "invalid config run.toml: field `peft.per_task`: needs a method (`peft.method = \"lora\"`, `\"adapter\"` or `\"prefix\"`)"),
            (&[lora, "peft.r=0"], "invalid config run.toml: field `peft.r`: must be at least 1"),
            (
                &["peft.method=\"adapter\"", "peft.placement=\"parallel\""],
                "invalid override `peft.method=\"adapter\" peft.placement=\"parallel\"`: unknown variant `parallel`, expected `pfeiffer` or `houlsby`",
            ),
            (&[lora, "peft.dropout=1.0"], "invalid config run.toml: field `peft.dropout`: must be in [0, 1), got 1"),
            (&[lora, "peft.target_modules=[]"], "invalid config run.toml: field `peft.target_modules`: name at least one of query, key, value, attention_output, intermediate, output"),
            (&[lora, "peft.target_modules=[\"key\", \"key\"]"], "invalid config run.toml: field `peft.target_modules`: lists a module twice"),
            (
                &[lora, "training.freeze.layers=2"],
                "invalid config run.toml: field `training.freeze`: with `[peft]` the pretrained backbone is frozen already; remove `training.freeze`",
            ),
            (
                &[lora, "peft.per_task=true", "training.surgery.method=\"pcgrad\""],
                "invalid config run.toml: field `training.surgery.method`: compares the tasks' gradients on shared parameters, and with per-task adapters no trained parameter is shared",
            ),
        ];
        for (overrides, want) in cases {
            let got = parse(MINIMAL, overrides).expect_err("invalid").to_string();
            assert_eq!(&got, want, "for {overrides:?}");
        }
        let c = parse(MINIMAL, &[lora, "peft.per_task=true", "peft.target_modules=[\"query\", \"output\"]"])
            .expect("valid");
        assert!(c.peft.enabled() && c.peft.per_task);
        assert_eq!(c.peft.target_modules, vec![mtl_core::LinearModule::Query, mtl_core::LinearModule::Output]);
        assert_eq!((c.peft.r, c.peft.alpha, c.peft.dropout), (8, 16.0, 0.1), "PEFT-like defaults");
    }

    #[test]
    fn retain_tasks_keeps_a_consistent_config() -> Result<(), ConfigError> {
        let mut c = parse(MINIMAL, &["training.select_metric=joint.frame_accuracy"])?;
        c.retain_tasks(&["slots".to_string()], Path::new("run.toml"))?;
        assert_eq!(c.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>(), vec!["slots"]);
        assert!(c.joint.frame.is_empty(), "a frame of one task is no frame");
        assert_eq!(c.training.select_metric, None);
        let e = c.retain_tasks(&["nope".to_string()], Path::new("run.toml")).expect_err("unknown task").to_string();
        assert!(e.contains("unknown task `nope`"), "{e}");
        Ok(())
    }

    #[test]
    fn resolved_config_round_trips() -> Result<(), ConfigError> {
        let c = parse(MINIMAL, &["training.head_lr=1e-3"])?;
        let back = parse(&c.to_toml(), &[])?;
        assert_eq!(back, c);
        Ok(())
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The rows (lines with a `|`) of the `NAME='...'` block of a comparison script.
    fn script_rows(script: &str, name: &str) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(root().join(script))?;
        let block = text
            .split(&format!("{name}='"))
            .nth(1)
            .and_then(|s| s.split('\'').next())
            .ok_or(format!("{script}: no {name} block"))?;
        Ok(block.lines().filter(|l| l.contains('|')).map(String::from).collect())
    }

    /// Every example's config is valid, and so is each row of the strategies comparison on the five-task one
    /// (the overrides of scripts/strategies-bench.sh, read from the script).
    #[test]
    fn example_configs_and_the_strategy_overrides_are_valid() -> Result<(), Box<dyn std::error::Error>> {
        let mut checked = 0;
        for entry in std::fs::read_dir(root().join("examples"))? {
            let path = entry?.path().join("config.toml");
            if path.exists() {
                Config::load(&path, &[])?;
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} example configs");
        let five = root().join("examples/five-task/config.toml");
        let config = Config::load(&five, &[])?;
        assert_eq!(config.training.weighting.weights.get(&TaskId::new("intensity")?), Some(&2.0));
        let mut rows = 0;
        for line in script_rows("scripts/strategies-bench.sh", "STRATEGIES")? {
            let (name, sets) = line.split_once('|').ok_or("row")?;
            let sets: Vec<String> = sets.split_whitespace().map(String::from).collect();
            let c = Config::load(&five, &sets).map_err(|e| format!("{name}: {e}"))?;
            let weights = &c.training.weighting.weights;
            assert_eq!(weights.is_empty(), name != "intensity-x2", "{name}: {weights:?}");
            rows += 1;
        }
        assert_eq!(rows, 20);
        Ok(())
    }

    /// Each variant of the parameter-efficient comparison (scripts/peft-bench.sh, read from the script) is a
    /// valid config, and the per-task LoRA example trains one task per step with every task equally often.
    #[test]
    fn peft_comparison_variants_are_valid() -> Result<(), Box<dyn std::error::Error>> {
        let lora = Config::load(&root().join("examples/five-task/config-lora.toml"), &[])?;
        assert!(lora.peft.method == PeftMethod::Lora && lora.peft.per_task, "{:?}", lora.peft);
        assert_eq!(
            (lora.training.sampling.plan, lora.training.sampling.sampler),
            (StepPlan::Sampled, SamplerKind::Uniform)
        );
        let mut names = Vec::new();
        for line in script_rows("scripts/peft-bench.sh", "VARIANTS")? {
            let mut fields = line.splitn(4, '|');
            let (name, path) = (fields.next().ok_or("name")?, fields.next().ok_or("config")?);
            let (select, sets) = (fields.next().ok_or("select")?, fields.next().unwrap_or(""));
            assert!(["joint", "per-task"].contains(&select), "{name}: --select {select}");
            let sets: Vec<String> = sets.split_whitespace().map(String::from).collect();
            let c = Config::load(&root().join(path), &sets).map_err(|e| format!("{name}: {e}"))?;
            assert_eq!(c.peft.enabled(), name != "full", "{name}");
            names.push(name.to_string());
        }
        assert_eq!(
            names,
            [
                "full",
                "lora-shared",
                "lora-per-task",
                "lora-per-task-joint",
                "adapter-per-task",
                "prefix-per-task",
                "adalora-per-task",
                "adalora-per-task-lr3e-3",
                "adalora-per-task-r7"
            ]
        );
        Ok(())
    }
}
