//! The multi-task engine end to end on the tiny model: every loss weighting and gradient surgery trains,
//! freezing keeps weights fixed, patience stops a run, per-task best heads and checkpoints are written, and a
//! diverging run stops with a clear message.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::cli::{stderr, Project, TestResult};
use crate::repo_root;

fn weights(path: &std::path::Path) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn same(a: &Tensor, b: &Tensor) -> Result<bool, Box<dyn std::error::Error>> {
    Ok(a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
}

fn metrics(p: &Project, run: &str) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(p.path(run).join("metrics.json"))?)?)
}

fn train(p: &Project, out: &str, sets: &[&str]) -> TestResult {
    let mut args = vec!["train", "config.toml", "--out", out, "--set", "training.epochs=2"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = p.mtl(&args)?;
    assert!(o.status.success(), "{sets:?}: {}", stderr(&o));
    Ok(())
}

#[test]
fn every_weighting_and_surgery_trains() -> TestResult {
    let p = Project::new()?;
    let runs: &[(&str, &[&str])] = &[
        ("static", &[]),
        ("uncertainty", &["training.weighting.method=\"uncertainty\""]),
        ("dwa", &["training.weighting.method=\"dwa\"", "training.weighting.period=1"]),
        ("gradnorm", &["training.weighting.method=\"grad_norm\""]),
        ("pcgrad", &["training.surgery.method=\"pcgrad\""]),
        ("cagrad", &["training.surgery.method=\"cagrad\""]),
        ("rlw", &["training.weighting.method=\"rlw\""]),
        ("famo", &["training.weighting.method=\"famo\""]),
        ("imtl", &["training.weighting.method=\"imtl\"", "training.surgery.method=\"imtl\""]),
        ("mgda", &["training.surgery.method=\"mgda\"", "training.surgery.normalization=\"loss_plus\""]),
        ("mgda-ub", &["training.surgery.method=\"mgda\"", "training.surgery.representation=true"]),
        ("aligned-mtl", &["training.surgery.method=\"aligned_mtl\""]),
        ("nash-mtl", &["training.surgery.method=\"nash_mtl\""]),
        ("db-mtl", &["training.weighting.method=\"log\"", "training.surgery.method=\"db_mtl\""]),
        ("auto-lambda", &["training.weighting.method=\"auto_lambda\"", "training.weighting.lr=0.01"]),
        (
            "recipe",
            &[
                "training.diagnostics_every=1",
                "training.grad_accumulation=2",
                "training.schedule=\"cosine\"",
                "training.layer_lr_decay=0.8",
                "training.weighting.weights.intent=2.0",
            ],
        ),
    ];
    for (name, sets) in runs {
        train(&p, name, sets)?;
        let m = metrics(&p, name)?;
        for (task, metric) in [("intent", "accuracy"), ("slots", "f1")] {
            let v = m["test"][task][metric].as_f64().ok_or_else(|| format!("{name}: no {task}.{metric} in {m}"))?;
            assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{name}: {task}.{metric} = {v}");
        }
        assert_eq!(m["skipped_steps"], 0, "{name}");
    }
    // Each method changes the training: its task weights move, or its weights differ from plain equal
    // weighting's (DWA only moves from the third step, after the best epoch here).
    for name in ["uncertainty", "dwa", "gradnorm", "rlw", "famo", "imtl", "db-mtl", "auto-lambda"] {
        let w = &metrics(&p, name)?["task_weights"];
        assert!(w["intent"] != w["slots"], "{name}: the task weights never moved: {w}");
    }
    assert_eq!(metrics(&p, "recipe")?["task_weights"]["intent"], 2.0);
    let base = weights(&p.path("static/model.safetensors"))?;
    for name in [
        "uncertainty",
        "gradnorm",
        "pcgrad",
        "cagrad",
        "rlw",
        "famo",
        "imtl",
        "mgda",
        "mgda-ub",
        "aligned-mtl",
        "nash-mtl",
        "db-mtl",
        "auto-lambda",
        "recipe",
    ] {
        let other = weights(&p.path(name).join("model.safetensors"))?;
        let name_of = "encoder.layer.0.attention.self.query.weight";
        assert!(!same(&base[name_of], &other[name_of])?, "{name} trained exactly like static weighting");
    }
    // 2 epochs of 2 batches, accumulated in pairs: one optimiser step per epoch.
    assert_eq!(metrics(&p, "recipe")?["steps"], 2);
    assert_eq!(metrics(&p, "static")?["steps"], 4);
    Ok(())
}

#[test]
fn frozen_parameters_keep_their_weights() -> TestResult {
    let p = Project::new()?;
    let base = weights(&repo_root().join("tests/fixtures/tiny-bert/model.safetensors"))?;
    train(&p, "heads-only", &["training.freeze.backbone=true"])?;
    train(&p, "bottom", &["training.freeze.embeddings=true", "training.freeze.layers=1"])?;
    let heads_only = weights(&p.path("heads-only/model.safetensors"))?;
    let bottom = weights(&p.path("bottom/model.safetensors"))?;
    let mut layers = 0;
    for (name, w) in &base {
        assert!(same(w, &heads_only[name])?, "{name} changed with the backbone frozen");
        let below = name.starts_with("embeddings.") || name.starts_with("encoder.layer.0.");
        assert_eq!(same(w, &bottom[name])?, below, "{name}: frozen iff embeddings or layer 0");
        layers += usize::from(name.starts_with("encoder.layer.1."));
    }
    assert!(layers > 0, "the tiny model has a second layer");
    let head = "heads.intent.weight";
    assert!(
        heads_only.contains_key(head),
        "{:?}",
        heads_only.keys().filter(|k| k.starts_with("heads.")).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn patience_stops_and_per_task_bests_are_kept() -> TestResult {
    let p = Project::new()?;
    // A learning rate too small to change any prediction: the second evaluation is no better.
    let sets = [
        "--set",
        "training.lr=1e-12",
        "--set",
        "training.head_lr=1e-12",
        "--set",
        "training.eval_every=1",
        "--set",
        "training.patience=1",
    ];
    let mut args = vec!["train", "config.toml", "--out", "run", "--select", "per-task"];
    args.extend(sets);
    let o = p.mtl(&args)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let m = metrics(&p, "run")?;
    assert_eq!(m["stopped_early"], true, "{m}");
    assert_eq!(m["steps"], 2);
    assert_eq!(m["best_step"], 1);
    for task in ["intent", "slots"] {
        assert_eq!(m["per_task_best"][task]["step"], 1, "{m}");
        assert!(p.path("run/heads").join(format!("{task}.safetensors")).is_file());
        let per_task = p.path("run/per-task").join(task);
        assert!(per_task.join("model.safetensors").is_file() && per_task.join("mtl.toml").is_file());
        let o = p.mtl(&["eval", "--model", &per_task.display().to_string(), "--config", "config.toml"])?;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    Ok(())
}

#[test]
fn score_weights_select_the_best_evaluation() -> TestResult {
    let p = Project::new()?;
    train(
        &p,
        "run",
        &[
            "training.score_weights.slots.f1=1.0",
            "training.score_weights.intent.accuracy=\"null\"",
            "training.eval_every=1",
        ],
    )?;
    let m = metrics(&p, "run")?;
    let best = m["best_step"].as_u64().ok_or("best_step")?;
    assert_eq!(m["per_task_best"]["slots"]["step"].as_u64(), Some(best), "the selection follows slots.f1 alone: {m}");
    Ok(())
}

#[test]
fn diverging_training_stops_with_a_clear_message() -> TestResult {
    let p = Project::new()?;
    p.write_config("lr = 1e30\nhead_lr = 1e30\nmax_skipped_steps = 0\ngrad_clip = 1.0")?;
    let text = std::fs::read_to_string(p.path("config.toml"))?.replacen("lr = 5e-3\n", "", 1);
    std::fs::write(p.path("config.toml"), text)?;
    let out = p.mtl(&["train", "config.toml", "--out", "run"])?;
    assert!(!out.status.success(), "training should fail");
    let err = stderr(&out);
    assert!(err.contains("NaN or infinite") && err.contains("training.max_skipped_steps"), "{err}");
    // Only the training checkpoints of completed epochs may be there, no model.
    assert!(!p.path("run/metrics.json").exists() && !p.path("run/model.safetensors").exists());
    Ok(())
}

/// metrics.json without its wall time, the one field that may differ between runs.
fn metrics_without_time(p: &Project, run: &str) -> Result<Value, Box<dyn std::error::Error>> {
    let mut m = metrics(p, run)?;
    m.as_object_mut().ok_or("metrics.json holds an object")?.remove("train_seconds");
    Ok(m)
}

/// log.jsonl without wall-clock times.
fn log_without_time(p: &Project, run: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(p.path(run).join("log.jsonl"))?;
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l)?;
            v.as_object_mut().ok_or("a log record is an object")?.remove("time");
            Ok(v)
        })
        .collect()
}

/// Trains `name` straight, then again killed with SIGKILL at a random moment after its first checkpoint and
/// continued with `--resume`: both must end with the same metrics, weights and log.
fn kill_and_resume(p: &Project, name: &str, sets: &[&str]) -> TestResult {
    let args = |out: &str| -> Vec<String> {
        let mut a: Vec<String> = ["train", "config.toml", "--out", out].iter().map(|s| s.to_string()).collect();
        for s in sets {
            a.extend(["--set".to_string(), s.to_string()]);
        }
        a
    };
    let run = |out: &str, extra: &[&str]| -> Result<std::process::Output, Box<dyn std::error::Error>> {
        let mut a = args(out);
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Ok(p.mtl(&a)?)
    };
    let straight = format!("{name}-straight");
    let o = run(&straight, &[])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!p.path(&straight).join("checkpoint-00000001").exists(), "training checkpoints are removed at the end");

    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    for attempt in 0..20u32 {
        let out = format!("{name}-killed{attempt}");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mtl"));
        cmd.args(args(&out)).current_dir(p.dir.path()).env("MTL_LOG", "warn");
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let mut child = cmd.spawn()?;
        let first = p.path(&out).join("checkpoint-00000001/state.json");
        while !first.exists() {
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let delay = u64::from((nanos / 7 + attempt * 1_337) % 4_000);
        std::thread::sleep(std::time::Duration::from_micros(delay));
        child.kill()?; // SIGKILL
        child.wait()?;
        if p.path(&out).join("metrics.json").exists() {
            continue; // it finished before the kill; try again with another delay
        }
        let o = run(&out, &["--resume"])?;
        assert!(o.status.success(), "{name}: resume after {delay} µs: {}", stderr(&o));
        let context = format!("{name}: killed {delay} µs after the first checkpoint");
        assert_eq!(metrics_without_time(p, &out)?, metrics_without_time(p, &straight)?, "{context}");
        // A LoRA run saves its adapters and heads alone.
        let file =
            if sets.iter().any(|s| s.starts_with("peft.")) { "adapters.safetensors" } else { "model.safetensors" };
        assert_eq!(std::fs::read(p.path(&out).join(file))?, std::fs::read(p.path(&straight).join(file))?, "{context}");
        assert_eq!(log_without_time(p, &out)?, log_without_time(p, &straight)?, "{context}: the log reads as one run");
        return Ok(());
    }
    panic!("{name}: every run finished before it could be killed");
}

/// Killed runs resume exactly, whatever state their weighting, surgery or sampler keeps.
#[test]
fn killed_runs_resume_exactly() -> TestResult {
    let p = Project::new()?;
    let common = ["training.epochs=12", "training.checkpoint_every=1", "training.eval_every=3"];
    let runs: &[(&str, &[&str])] = &[
        ("uncertainty", &["training.weighting.method=\"uncertainty\""]),
        (
            "dwa-pcgrad",
            &["training.weighting.method=\"dwa\"", "training.weighting.period=2", "training.surgery.method=\"pcgrad\""],
        ),
        (
            "gradnorm-accumulated",
            &[
                "training.weighting.method=\"grad_norm\"",
                "training.grad_accumulation=2",
                "training.diagnostics_every=1",
            ],
        ),
        (
            "sampled",
            &[
                "training.sampling.plan=\"sampled\"",
                "training.sampling.sampler=\"annealed\"",
                "training.freeze.unfreeze_every=3",
            ],
        ),
        ("per-task-lora", &["peft.method=\"lora\"", "peft.per_task=true", "peft.dropout=0.2"]),
        ("famo", &["training.weighting.method=\"famo\""]),
        (
            "auto-lambda",
            &[
                "training.weighting.method=\"auto_lambda\"",
                "training.weighting.meta_data=\"train\"",
                "training.weighting.meta_every=2",
            ],
        ),
        ("rlw-nash-mtl", &["training.weighting.method=\"rlw\"", "training.surgery.method=\"nash_mtl\""]),
        ("adalora", &["peft.method=\"adalora\"", "peft.r=4", "peft.adalora.target_r=2", "peft.adalora.delta_t=3"]),
        (
            "db-mtl",
            &[
                "training.weighting.method=\"log\"",
                "training.surgery.method=\"db_mtl\"",
                "training.surgery.beta_sigma=0.5",
            ],
        ),
    ];
    for (name, sets) in runs {
        let all: Vec<&str> = common.iter().chain(sets.iter()).copied().collect();
        kill_and_resume(&p, name, &all)?;
    }
    // Resuming needs a checkpoint, a finished run cannot be resumed, and --select must not change.
    let o = p.mtl(&["train", "config.toml", "--out", "uncertainty-straight", "--resume"])?;
    assert!(!o.status.success() && stderr(&o).contains("this run has finished"), "{}", stderr(&o));
    let o = p.mtl(&["train", "config.toml", "--out", "nothing", "--resume"])?;
    assert!(!o.status.success() && stderr(&o).contains("nothing to resume"), "{}", stderr(&o));
    Ok(())
}

/// Ctrl-C (SIGINT) lets training finish its step and write a checkpoint; the run ends with status 130 and
/// `--resume` continues it to exactly the straight run's end.
#[test]
fn ctrl_c_stops_at_a_checkpoint_that_resumes_exactly() -> TestResult {
    let p = Project::new()?;
    let args = |out: &str| -> Vec<String> {
        ["train", "config.toml", "--out", out, "--set", "training.epochs=300"].iter().map(|s| s.to_string()).collect()
    };
    let o = p.mtl(&args("straight").iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(o.status.success(), "{}", stderr(&o));
    for attempt in 0..10 {
        let out = format!("interrupted{attempt}");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mtl"))
            .args(args(&out))
            .current_dir(p.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        while !p.path(&out).join("log.jsonl").exists() && child.try_wait()?.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // At once, or (where the first attempts came too late) a little into the run.
        std::thread::sleep(std::time::Duration::from_millis([0, 5, 20][attempt % 3]));
        std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
        let o = child.wait_with_output()?;
        if o.status.success() {
            continue; // it finished before the signal; try again sooner
        }
        assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("training interrupted at step") && stderr(&o).contains("--resume"),
            "{}",
            stderr(&o)
        );
        assert!(!p.path(&out).join("metrics.json").exists());
        let o = p.mtl(&[&args(&out).iter().map(String::as_str).collect::<Vec<_>>()[..], &["--resume"]].concat())?;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(metrics_without_time(&p, &out)?, metrics_without_time(&p, "straight")?);
        assert_eq!(
            std::fs::read(p.path(&out).join("model.safetensors"))?,
            std::fs::read(p.path("straight").join("model.safetensors"))?
        );
        return Ok(());
    }
    panic!("every run finished before the signal");
}

/// A run records its data files' SHA-256; resuming after one changed is refused, naming it, unless
/// `--accept-changed-data` says to go on.
#[test]
fn resuming_on_changed_data_is_refused_unless_accepted() -> TestResult {
    let p = Project::new()?;
    let args =
        ["train", "config.toml", "--out", "run", "--set", "training.epochs=40", "--set", "training.checkpoint_every=1"];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mtl"))
        .args(args)
        .current_dir(p.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    while !p.path("run/checkpoint-00000001/state.json").exists() {
        assert!(child.try_wait()?.is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill()?;
    child.wait()?;
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/data.json"))?)?;
    assert_eq!(recorded["intent.train"]["sha256"].as_str().map(str::len), Some(64), "{recorded}");
    let mut train = std::fs::read_to_string(p.path("train.jsonl"))?;
    let first = train.lines().next().unwrap_or_default().to_string();
    train.push_str(&first);
    train.push('\n');
    std::fs::write(p.path("train.jsonl"), train)?;
    let o = p.mtl(&[&args[..], &["--resume"]].concat())?;
    assert!(
        !o.status.success() && stderr(&o).contains("data files changed") && stderr(&o).contains("intent.train"),
        "{}",
        stderr(&o)
    );
    let o = p.mtl(&[&args[..], &["--resume", "--accept-changed-data"]].concat())?;
    assert!(o.status.success() && p.path("run/metrics.json").exists(), "{}", stderr(&o));
    Ok(())
}

#[test]
fn baselines_give_the_negative_transfer_table() -> TestResult {
    let p = Project::new()?;
    let o = p.mtl(&["train", "config.toml", "--out", "run", "--baselines", "--set", "training.epochs=2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let b: Value = serde_json::from_str(&std::fs::read_to_string(p.path("run/baselines.json"))?)?;
    assert_eq!(b["split"], "test");
    for (task, metric) in [("intent", "accuracy"), ("slots", "f1")] {
        let row = &b["tasks"][task];
        assert_eq!(row["metric"], metric);
        let alone: Value =
            serde_json::from_str(&std::fs::read_to_string(p.path("run/baselines").join(task).join("metrics.json"))?)?;
        assert_eq!(row["alone"], alone["test"][task][metric], "{b}");
        assert_eq!(row["joint"], metrics(&p, "run")?["test"][task][metric]);
        let delta = row["delta"].as_f64().ok_or("delta")?;
        assert!(
            (delta - (row["joint"].as_f64().ok_or("joint")? - row["alone"].as_f64().ok_or("alone")?)).abs() < 1e-12
        );
        let tasks: Value =
            serde_json::from_str(&std::fs::read_to_string(p.path("run/baselines").join(task).join("labels.json"))?)?;
        assert_eq!(tasks.as_object().ok_or("labels")?.len(), 1, "a baseline trains its task alone");
    }
    let stdout = String::from_utf8(o.stdout)?;
    assert!(stdout.contains("negative transfer") && stdout.contains("mean"), "{stdout}");
    Ok(())
}
