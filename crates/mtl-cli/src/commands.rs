//! The commands. Each one validates and loads everything it needs before it writes anything.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mtl_config::{AdapterPlacement, Config, PeftMethod, Split};
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Dataset, Example, Input, LabelMap, Location, TextEncoder};
use mtl_nn::{BertConfig, HeadSpec, LoraSpec, ModelSpec, MultiTaskModel, PeftKind, PeftSpec, Placement, SHARED_ADAPTER};
use mtl_train::checkpoint::{self, CheckpointFiles};
use mtl_train::{resume, tracking};
use mtl_train::heads::head_specs;
use mtl_train::{predict_examples, Evaluation, Prediction, ProgressCallback, Scores, Splits, TaskInfo, Trainer};
use serde_json::{json, Value};

use crate::args::{Cli, Command, Select};
use crate::report;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, out, overrides, tasks, select, resume, baselines } => train(&TrainArgs {
            config: &config,
            out: &out,
            overrides: &overrides,
            only: &tasks,
            select,
            resume,
            baselines,
        }),
        Command::Eval { model, config, overrides } => eval(&model, &config, &overrides),
        Command::Predict { model, input, batch_size, full_precision } => {
            predict(&model, input.as_deref(), batch_size, full_precision)
        }
        Command::Export { model, out } => crate::export::export(&model, &out),
        Command::Generate { model, prompt, chat, system, max_new_tokens, temperature, top_k, top_p, seed, stop } => {
            if !(temperature >= 0.0 && temperature.is_finite()) {
                bail!("--temperature must be 0 (greedy) or positive, got {temperature}");
            }
            if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                bail!("--top-p must be in (0, 1]");
            }
            crate::generate::run(&crate::generate::GenerateArgs {
                model: &model,
                prompt: prompt.as_deref(),
                chat,
                system: system.as_deref(),
                sampling: mtl_nn::generate::Sampling { temperature, top_k, top_p, seed },
                max_new_tokens,
                stop: &stop,
            })
        }
        Command::Quantize { model, out, config } => crate::deploy::quantize(&model, &out, config.as_deref()),
        Command::Prune { model, layers, out, config } => crate::deploy::prune(&model, layers, &out, config.as_deref()),
        Command::Serve {
            model,
            config,
            addr,
            max_batch_tokens,
            max_wait_ms,
            queue_bound,
            max_input_chars,
            max_inputs,
            body_limit,
            timeout_s,
            api_keys,
            threads,
        } => {
            let mut s = match &config {
                Some(path) => mtl_config::ServeConfig::load(path)?,
                None => mtl_config::ServeConfig::default(),
            };
            // Flags win over the file.
            s.addr = addr.unwrap_or(s.addr);
            s.max_batch_tokens = max_batch_tokens.unwrap_or(s.max_batch_tokens);
            s.max_wait_ms = max_wait_ms.unwrap_or(s.max_wait_ms);
            s.queue_bound = queue_bound.unwrap_or(s.queue_bound);
            s.max_input_chars = max_input_chars.unwrap_or(s.max_input_chars);
            s.max_inputs = max_inputs.unwrap_or(s.max_inputs);
            s.body_limit = body_limit.unwrap_or(s.body_limit);
            s.timeout_s = timeout_s.unwrap_or(s.timeout_s);
            s.api_keys = api_keys.or(s.api_keys);
            s.threads = threads.or(s.threads);
            s.validate(config.as_deref().unwrap_or(Path::new("(flags)")))?;
            let api_keys = match &s.api_keys {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
                    let keys: std::collections::HashSet<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                    if keys.is_empty() {
                        bail!("{}: no API key in the file (one per line)", path.display());
                    }
                    Some(keys)
                }
                None => None,
            };
            let settings = mtl_serve::api::Settings {
                batch: mtl_serve::batcher::BatchSettings {
                    max_batch_tokens: s.max_batch_tokens,
                    max_wait: std::time::Duration::from_millis(s.max_wait_ms),
                    queue_bound: s.queue_bound,
                },
                max_input_chars: s.max_input_chars,
                max_inputs: s.max_inputs,
                body_limit: s.body_limit,
                request_timeout: std::time::Duration::from_secs(s.timeout_s),
                api_keys,
            };
            crate::serve::serve(&model, s.addr, settings, s.threads)
        }
        Command::AddTask { model, config, out, overrides } => crate::add_task::add_task(&model, &config, &out, &overrides),
    }
}

pub(crate) fn model_spec<'a>(
    config: &Config,
    bert: &'a BertConfig,
    tasks: &'a BTreeMap<TaskId, HeadSpec>,
    peft: Option<&'a PeftSpec>,
) -> ModelSpec<'a> {
    ModelSpec { bert, tasks, dropout: config.training.dropout as f32, seed: config.training.seed, peft }
}

/// The parameter-efficient method `[peft]` asks for, with one adapter shared by every task or one per task.
pub(crate) fn peft_spec(config: &Config, bert: &BertConfig) -> Option<PeftSpec> {
    let p = &config.peft;
    let kind = match p.method {
        PeftMethod::None => return None,
        PeftMethod::Lora => PeftKind::Lora(LoraSpec {
            r: p.r,
            alpha: p.alpha,
            dropout: p.dropout as f32,
            targets: p.target_modules.clone(),
        }),
        PeftMethod::Prefix => PeftKind::Prefix { length: p.prefix_length },
        PeftMethod::Adapter => PeftKind::Bottleneck {
            size: (bert.hidden_size / p.reduction_factor).max(1),
            placement: match p.placement {
                AdapterPlacement::Pfeiffer => Placement::Pfeiffer,
                AdapterPlacement::Houlsby => Placement::Houlsby,
            },
        },
    };
    let adapters = match p.per_task {
        true => config.tasks.keys().map(|t| t.to_string()).collect(),
        false => vec![SHARED_ADAPTER.to_string()],
    };
    Some(PeftSpec { kind, adapters })
}

fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{}: {what} not found (run scripts/fetch.sh for the default model and data)", path.display());
    }
    Ok(())
}

pub(crate) fn load_split(
    config: &Config,
    split: Split,
    encoder: &TextEncoder,
    labels: &BTreeMap<TaskId, LabelMap>,
) -> Result<Option<Dataset>> {
    if config.tasks.values().all(|t| t.data.get(split).is_none()) {
        return Ok(None);
    }
    let raw = mtl_data::read_split(config, split)?;
    let data = Dataset::encode(raw, encoder, labels, config)?;
    log_truncation(split, &data, encoder);
    Ok(Some(data))
}

pub(crate) fn log_truncation(split: Split, data: &Dataset, encoder: &TextEncoder) {
    if data.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} inputs were longer than {} tokens and were truncated (raise model.max_len to keep more)",
            split.name(),
            data.truncated,
            data.len(),
            encoder.max_len()
        );
    }
}

pub struct TrainArgs<'a> {
    pub config: &'a Path,
    pub out: &'a Path,
    pub overrides: &'a [String],
    pub only: &'a [String],
    pub select: Select,
    pub resume: bool,
    pub baselines: bool,
}

fn train(args: &TrainArgs) -> Result<()> {
    let mut config = Config::load(args.config, args.overrides)?;
    if !args.only.is_empty() {
        config.retain_tasks(args.only, args.config)?;
    }
    if crate::generate::is_decoder(&config.model.path) {
        crate::text_tasks::check_config(&config, args.config)?;
        if args.select == Select::PerTask {
            bail!("--select per-task keeps per-task models of encoders; a decoder with per-task adapters has them already ([peft] per_task = true)");
        }
    } else {
        check_encoder_tasks(&config, args.config)?;
    }
    let has_final = args.out.join(checkpoint::METRICS).exists();
    // A finished joint run whose baselines were interrupted goes on with the baselines.
    if !(args.resume && args.baselines && has_final) {
        train_one(&config, args.out, args.select, args.resume)?;
    }
    if args.baselines {
        baselines(&config, args.config, args.out)?;
    }
    Ok(())
}

/// Refuses tasks that only a decoder can learn; the error names the config file and the field.
pub fn check_encoder_tasks(config: &Config, path: &Path) -> Result<()> {
    if let Some((name, _)) = config.tasks.iter().find(|(_, t)| t.kind == TaskKind::Generation) {
        bail!(
            "invalid config {}: field `tasks.{name}.kind`: generation tasks need a decoder model (`model.path` a GGUF file or a Llama directory); {} is an encoder",
            path.display(),
            config.model.path.display()
        );
    }
    Ok(())
}

/// Trains each task of `config` alone with the same recipe (static weights and no surgery, which need
/// several tasks) into `out/baselines/TASK/`, and writes `out/baselines.json` with each task's main test
/// metric jointly and alone, and their difference (negative where the task lost to sharing).
fn baselines(config: &Config, config_path: &Path, out: &Path) -> Result<()> {
    let joint: Value = serde_json::from_str(&std::fs::read_to_string(out.join(checkpoint::METRICS))?)?;
    let split = if joint.get("test").is_some() { "test" } else { "dev" };
    let mut rows = serde_json::Map::new();
    for (task, task_config) in &config.tasks {
        let dir = out.join("baselines").join(task.as_str());
        if !dir.join(checkpoint::METRICS).exists() {
            let resume = !resume::checkpoints(&dir).is_empty();
            if dir.exists() && !resume {
                std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
            }
            let mut alone = config.clone();
            alone.retain_tasks(&[task.to_string()], config_path)?;
            alone.training.weighting = Default::default();
            alone.training.surgery = Default::default();
            tracing::info!("baseline: {task} alone");
            train_one(&alone, &dir, Select::Joint, resume)?;
        }
        let single: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(checkpoint::METRICS))?)?;
        let metric = mtl_train::main_metric(task_config);
        let (Some(j), Some(a)) = (joint[split][task.as_str()][metric].as_f64(), single[split][task.as_str()][metric].as_f64()) else {
            tracing::warn!("baseline: task `{task}` has no {split} {metric} in both runs; left out of the table");
            rows.insert(task.to_string(), json!({"metric": metric, "joint": null, "alone": null, "delta": null}));
            continue;
        };
        rows.insert(task.to_string(), json!({"metric": metric, "joint": j, "alone": a, "delta": j - a}));
    }
    let compared = rows.values().filter(|r| r["delta"].is_number()).count().max(1) as f64;
    let mean = |key: &str| rows.values().filter_map(|r| r[key].as_f64()).sum::<f64>() / compared;
    let summary = json!({"split": split, "tasks": rows, "mean": {"joint": mean("joint"), "alone": mean("alone"), "delta": mean("delta")}});
    std::fs::write(out.join("baselines.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("negative transfer ({split}; joint − alone, per task's main metric):");
    println!("{:<16} {:<12} {:>8} {:>8} {:>8}", "task", "metric", "joint", "alone", "Δ");
    for (task, r) in summary["tasks"].as_object().expect("built above") {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!("{task:<16} {:<12} {:>8.4} {:>8.4} {:>+8.4}", r["metric"].as_str().unwrap_or(""), f("joint"), f("alone"), f("delta"));
    }
    let m = &summary["mean"];
    println!("{:<16} {:<12} {:>8.4} {:>8.4} {:>+8.4}", "mean", "", m["joint"].as_f64().unwrap_or(f64::NAN), m["alone"].as_f64().unwrap_or(f64::NAN), m["delta"].as_f64().unwrap_or(f64::NAN));
    Ok(())
}

/// One training run of `config` into `out`.
fn train_one(config: &Config, out: &Path, select: Select, resume: bool) -> Result<()> {
    let config = config.clone();
    if resume {
        if out.join(checkpoint::METRICS).exists() {
            bail!("{}: this run has finished (metrics.json is there); there is nothing to resume", out.display());
        }
        if resume::checkpoints(out).is_empty() {
            bail!(
                "{}: nothing to resume: no training checkpoint (checkpoint-STEP/) there (the run stopped before its first one); remove the directory and train again",
                out.display()
            );
        }
        resume::remove_partial(out)?;
    } else if out.exists() {
        bail!("{}: the output directory already exists; choose another, remove it, or continue it with --resume", out.display());
    }
    let base = &config.model.path;
    if crate::generate::is_decoder(base) {
        return crate::text_tasks::train(&config, out, resume);
    }
    for (name, what) in
        [("config.json", "model config"), ("model.safetensors", "model weights"), ("tokenizer.json", "tokenizer")]
    {
        require_file(&base.join(name), what)?;
    }
    let bert = BertConfig::from_file(&base.join("config.json"))?;
    let encoder =
        TextEncoder::from_file(&base.join("tokenizer.json"), config.model.max_len.min(bert.max_position_embeddings))?;

    // Read and check all data before training, so that bad input fails fast and writes nothing.
    let raw_train = mtl_data::read_split(&config, Split::Train)?;
    let labels = LabelMap::for_tasks(&config, &raw_train)?;
    let train = Dataset::encode(raw_train, &encoder, &labels, &config)?;
    log_truncation(Split::Train, &train, &encoder);
    let splits = Splits {
        train,
        dev: load_split(&config, Split::Dev, &encoder, &labels)?,
        test: load_split(&config, Split::Test, &encoder, &labels)?,
    };
    let sizes = head_specs(&config, &labels);
    let peft = peft_spec(&config, &bert);
    let model = MultiTaskModel::load(
        &model_spec(&config, &bert, &sizes, peft.as_ref()),
        &base.join("model.safetensors"),
        false,
        &Device::Cpu,
    )?;
    let trained: usize = model
        .params()
        .vars()
        .iter()
        .filter(|(n, _)| !mtl_train::groups::is_frozen(n, &config, bert.num_hidden_layers, usize::MAX))
        .map(|(_, v)| v.elem_count())
        .sum();
    tracing::info!(
        params = model.params().num_params(),
        trained,
        train = splits.train.len(),
        dev = splits.dev.as_ref().map_or(0, Dataset::len),
        test = splits.test.as_ref().map_or(0, Dataset::len),
        "training {} task(s): {}",
        config.tasks.len(),
        config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
    );

    let started = std::time::Instant::now();
    let trainer = Trainer {
        config: &config,
        model: &model,
        labels: &labels,
        keep_per_task_models: select == Select::PerTask,
        checkpoints: Some(out),
        resume,
        frozen: None,
    };
    let mut progress = ProgressCallback::default();
    let mut tracker = tracking::Tracker::new(out);
    let outcome = trainer.train(&splits, &mut [&mut progress, &mut tracker])?;
    let seconds = started.elapsed().as_secs_f64();

    let mut with_run = run_metrics(&outcome, seconds);
    with_run["per_task_best"] = outcome
        .per_task
        .iter()
        .map(|(task, b)| (task.to_string(), json!({"epoch": b.epoch, "step": b.step, "score": b.score})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let heads: BTreeMap<String, BTreeMap<String, candle_core::Tensor>> =
        outcome.per_task.iter().map(|(task, b)| (task.to_string(), b.head.clone())).collect();
    if select == Select::PerTask {
        // Each task's checkpoint holds the weights of its own best evaluation; the run's metrics.json records
        // which one that was. They are written before the run's own model, whose metrics.json marks the end.
        let kept: BTreeMap<String, candle_core::Tensor> =
            model.params().vars().iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        for (task, best) in &outcome.per_task {
            let Some(weights) = best.model.as_ref() else {
                bail!("{}: no weights were kept at task `{task}`'s best evaluation; this is a bug", out.display());
            };
            // The weights that trained; the frozen ones never changed.
            model.params().set_named(weights)?;
            let none = BTreeMap::new();
            let files = CheckpointFiles { config: &config, labels: &outcome.labels, metrics: &with_run, heads: &none };
            let dir = out.join("per-task").join(task.as_str());
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot replace", dir.display()))?;
            }
            checkpoint::save(&dir, &model, &files)?;
        }
        model.params().set_named(&kept)?;
    }
    let files = CheckpointFiles { config: &config, labels: &outcome.labels, metrics: &with_run, heads: &heads };
    checkpoint::save_into(out, &model, &files)?;
    resume::remove_all(out)?;
    write_report(out, &config, &outcome, seconds)?;

    let mut shown: Vec<(&str, &Scores)> = Vec::new();
    if let Some(d) = &outcome.dev {
        shown.push(("dev", &d.scores));
    }
    if let Some(t) = &outcome.test {
        shown.push(("test", &t.scores));
        for (task, r) in &t.reports {
            println!("test: {task}\n{}", mtl_metrics::format_report(r));
        }
    }
    print!("{}", report::table(&shown));
    let best = if outcome.composed {
        let steps: Vec<String> = outcome.per_task.iter().map(|(t, b)| format!("{t} {}", b.step)).collect();
        format!("each task's adapter and head from its own best evaluation (step {}", steps.join(", "))
    } else {
        format!("best epoch {} of {} (step {}", outcome.best_epoch, config.training.epochs, outcome.best_step)
    };
    println!(
        "{best} of {}{}); trained in {:.0} s; checkpoint and metrics.json in {}",
        outcome.steps,
        if outcome.stopped_early { ", stopped early" } else { "" },
        seconds,
        out.display()
    );
    if outcome.skipped_steps > 0 {
        tracing::warn!("{} steps were skipped for NaN or infinite losses or gradients", outcome.skipped_steps);
    }
    Ok(())
}

/// `report.html` from the run's log and its final evaluation.
fn write_report(out: &Path, config: &Config, outcome: &mtl_train::Outcome, seconds: f64) -> Result<()> {
    let log = tracking::read_log(&out.join(tracking::LOG));
    let main_metrics = config.tasks.iter().map(|(t, c)| (t.to_string(), mtl_train::main_metric(c).to_string())).collect();
    let final_eval = match (&outcome.test, &outcome.dev) {
        (Some(t), _) => Some(("test", t)),
        (None, Some(d)) => Some(("dev", d)),
        _ => None,
    };
    let t = &config.training;
    let summary = vec![
        ("tasks".to_string(), config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")),
        ("step plan / sampler".to_string(), format!("{:?} / {:?}", t.sampling.plan, t.sampling.sampler).to_lowercase()),
        ("loss weighting / surgery".to_string(), format!("{:?} / {:?}", t.weighting.method, t.surgery.method).to_lowercase()),
        ("steps".to_string(), format!("{}{}", outcome.steps, if outcome.stopped_early { " (stopped early)" } else { "" })),
        ("best".to_string(), format!("epoch {}, step {}", outcome.best_epoch, outcome.best_step)),
        ("skipped steps".to_string(), outcome.skipped_steps.to_string()),
        ("training wall time".to_string(), format!("{seconds:.0} s")),
    ];
    let title = format!("mtl training report: {}", out.display());
    let input = tracking::ReportInput { title: &title, summary, log: &log, main_metrics, final_eval };
    let path = out.join("report.html");
    tracking::write_report(&path, &input).with_context(|| format!("{}: cannot write the report", path.display()))
}

/// A finished run's `metrics.json`: the scores, and how training went.
pub(crate) fn run_metrics(outcome: &mtl_train::Outcome, seconds: f64) -> Value {
    let mut m = metrics_json(outcome.dev.as_ref(), outcome.test.as_ref());
    m["best_epoch"] = json!(outcome.best_epoch);
    m["best_step"] = json!(outcome.best_step);
    // What the saved model holds: the best selection score's weights, or each task's own best (per_task_best).
    m["selection"] = json!(if outcome.composed { "per_task" } else { "joint" });
    m["steps"] = json!(outcome.steps);
    m["stopped_early"] = json!(outcome.stopped_early);
    m["skipped_steps"] = json!(outcome.skipped_steps);
    m["task_weights"] = json!(outcome.task_weights);
    m["train_seconds"] = json!((seconds * 10.0).round() / 10.0);
    if let Some(test) = &outcome.test {
        m["test_reports"] = json!(test.reports);
    }
    m
}

pub(crate) fn metrics_json(dev: Option<&Evaluation>, test: Option<&Evaluation>) -> Value {
    let mut v = json!({});
    if let Some(d) = dev {
        v["dev"] = json!(d.scores);
    }
    if let Some(t) = test {
        v["test"] = json!(t.scores);
    }
    v
}

/// A trained model with everything needed to use it.
pub(crate) struct Loaded {
    pub(crate) config: Config,
    pub(crate) labels: BTreeMap<TaskId, LabelMap>,
    pub(crate) encoder: TextEncoder,
    pub(crate) model: MultiTaskModel,
    /// A parameter-efficient model's base weights (checked against their checksum); `None` for a model that
    /// holds all its weights.
    pub(crate) base: Option<std::path::PathBuf>,
}

pub(crate) fn load_checkpoint(dir: &Path) -> Result<Loaded> {
    load_checkpoint_with(dir, true)
}

/// A trained model; with `merge`, one shared LoRA adapter is merged into the weights (for speed).
pub(crate) fn load_checkpoint_with(dir: &Path, merge: bool) -> Result<Loaded> {
    if crate::text_tasks::is_decoder_run(dir) {
        bail!("{}: a decoder run; `mtl eval` and `mtl predict` take it, the other commands take encoder models so far", dir.display());
    }
    let (config, labels) = checkpoint::read_meta(dir)?;
    let base = checkpoint::base_weights(dir)?;
    let weights = if base.is_some() { checkpoint::ADAPTERS } else { checkpoint::WEIGHTS };
    for name in [checkpoint::MODEL_CONFIG, weights, checkpoint::TOKENIZER] {
        require_file(&dir.join(name), "checkpoint file")?;
    }
    let bert = BertConfig::from_file(&dir.join(checkpoint::MODEL_CONFIG))?;
    let encoder = TextEncoder::from_file(
        &dir.join(checkpoint::TOKENIZER),
        config.model.max_len.min(bert.max_position_embeddings),
    )?;
    let sizes = head_specs(&config, &labels);
    let peft = peft_spec(&config, &bert);
    let spec = model_spec(&config, &bert, &sizes, peft.as_ref());
    let model = match &base {
        Some(base) => {
            let mut model = MultiTaskModel::load_with_adapters(&spec, base, &dir.join(checkpoint::ADAPTERS), &Device::Cpu)?;
            // One shared LoRA adapter merges into the weights: the plain encoder's speed.
            if merge && peft.as_ref().is_some_and(|p| p.lora().is_some() && !p.per_task()) {
                model.merge_lora(0)?;
            }
            model
        }
        None if dir.join(checkpoint::INT8).exists() => {
            MultiTaskModel::load_int8(&spec, &dir.join(checkpoint::WEIGHTS), &dir.join(checkpoint::INT8), &Device::Cpu)?
        }
        None => MultiTaskModel::load(&spec, &dir.join(checkpoint::WEIGHTS), true, &Device::Cpu)?,
    };
    Ok(Loaded { config, labels, encoder, model, base })
}

fn eval(model_dir: &Path, config_path: &Path, overrides: &[String]) -> Result<()> {
    if crate::text_tasks::is_decoder_run(model_dir) {
        return crate::text_tasks::eval(model_dir, config_path, overrides);
    }
    let loaded = load_checkpoint(model_dir)?;
    let mut config = Config::load(config_path, overrides)?;
    for (task, t) in &config.tasks {
        match loaded.config.tasks.get(task) {
            Some(trained) if trained.kind == t.kind => {}
            Some(trained) => bail!(
                "{}: task `{task}` is {} here but the model was trained for {}",
                config_path.display(),
                t.kind.name(),
                trained.kind.name()
            ),
            None => bail!(
                "{}: task `{task}` has no head in {}; its tasks are: {}",
                config_path.display(),
                model_dir.display(),
                loaded.config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    config.model = loaded.config.model.clone();
    let trainer = Trainer::evaluator(&config, &loaded.model, &loaded.labels);
    let mut scores: BTreeMap<&str, Scores> = BTreeMap::new();
    for split in [Split::Dev, Split::Test] {
        if let Some(data) = load_split(&config, split, &loaded.encoder, &loaded.labels)? {
            scores.insert(split.name(), trainer.evaluate(&data)?.scores);
        }
    }
    if scores.is_empty() {
        bail!("{}: no task has a dev or test file to score", config_path.display());
    }
    println!("{}", serde_json::to_string_pretty(&scores)?);
    Ok(())
}

pub(crate) fn parse_input(line: &str, location: &Location, config: &Config) -> Result<Input> {
    let trimmed = line.trim_start();
    if !trimmed.starts_with('{') {
        return Ok(Input::Text(line.to_string()));
    }
    let at = || format!("{}:{}", location.path.display(), location.line);
    let value: Value = serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
    let string = |field: &str| -> Result<Option<String>> {
        match value.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) if t.trim().is_empty() => {
                bail!("{}: field `{field}` is empty", at())
            }
            Some(Value::String(t)) => Ok(Some(t.clone())),
            Some(_) => bail!("{}: field `{field}` must be a string", at()),
        }
    };
    if let Some(qa) = config.tasks.values().find(|t| t.kind == TaskKind::QuestionAnswering) {
        if let (Some(question), Some(context)) = (string(&qa.question_field)?, string(&qa.context_field)?) {
            return Ok(Input::Question { question, context });
        }
    }
    if let Some(words) = value.get("words") {
        let words = words
            .as_array()
            .and_then(|a| a.iter().map(|w| w.as_str().map(String::from)).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{}: field `words` must be a list of strings", at()))?;
        return Ok(Input::Words(words));
    }
    let pair_field = config.tasks.values().find_map(|t| t.pair_field.clone());
    match (string("text")?, pair_field.map(|f| string(&f)).transpose()?.flatten()) {
        (Some(a), Some(b)) => Ok(Input::Pair(a, b)),
        (Some(t), None) => Ok(Input::Text(t)),
        (None, _) => bail!("{}: expected a `text` or `words` field", at()),
    }
}

fn predict(model_dir: &Path, input: Option<&Path>, batch_size: usize, full_precision: bool) -> Result<()> {
    if crate::text_tasks::is_decoder_run(model_dir) {
        return crate::text_tasks::predict(model_dir, input, batch_size);
    }
    let loaded = load_checkpoint(model_dir)?;
    let info = TaskInfo { config: &loaded.config, labels: &loaded.labels };
    let has_token_task = loaded.config.tasks.values().any(|t| t.kind == TaskKind::TokenClassification);
    let qa = loaded.config.tasks.values().find(|t| t.kind == TaskKind::QuestionAnswering);
    let reader: Box<dyn BufRead> = match input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let source = input.map_or_else(|| "<stdin>".into(), Path::to_path_buf);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut pending: Vec<Example> = Vec::new();
    let mut group = 0;
    let flush = |pending: &mut Vec<Example>, out: &mut dyn Write| -> Result<()> {
        let refs: Vec<&Example> = pending.iter().collect();
        let predictions = predict_examples(&loaded.model, &refs, &info, batch_size)?;
        let mut last_group = None;
        for (ex, preds) in pending.iter().zip(predictions) {
            // The windows of one question share their answer: print it once.
            let g = ex.qa.as_ref().map(|q| q.question.group);
            if g.is_some() && g == last_group {
                continue;
            }
            last_group = g;
            writeln!(out, "{}", prediction_json(ex, &preds, &loaded.labels, full_precision))?;
        }
        pending.clear();
        Ok(())
    };
    for (i, line) in reader.lines().enumerate() {
        let location = Location { path: source.clone(), line: i + 1 };
        let line = line.with_context(|| format!("{}: cannot read", source.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut input = parse_input(&line, &location, &loaded.config)?;
        // Token tasks tag words: raw text is split on whitespace, as the training files split it.
        if has_token_task {
            if let Input::Text(t) = &input {
                input = Input::Words(t.split_whitespace().map(String::from).collect());
            }
        }
        let at = |m: String| anyhow::anyhow!("{}:{}: {m}", source.display(), location.line);
        match (&input, qa) {
            (Input::Question { question, context }, Some(task)) => {
                let windows = loaded
                    .encoder
                    .question_windows(question, context, task.max_query_len, task.doc_stride(loaded.encoder.max_len()))
                    .map_err(at)?;
                let shared =
                    std::sync::Arc::new(mtl_data::Question { group, context: context.clone(), answers: Vec::new() });
                group += 1;
                for w in windows {
                    let qa = Some(mtl_data::QaFeature { question: shared.clone(), offsets: w.offsets });
                    pending.push(Example {
                        location: location.clone(),
                        input: input.clone(),
                        encoded: w.encoded,
                        labels: BTreeMap::new(),
                        qa,
                    });
                }
            }
            _ => {
                let encoded = loaded.encoder.encode(&input).map_err(at)?;
                pending.push(Example { location, input, encoded, labels: BTreeMap::new(), qa: None });
            }
        }
        if pending.len() >= batch_size.max(1) * 4 {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    out.flush()?;
    Ok(())
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

pub(crate) fn prediction_json(ex: &Example, preds: &BTreeMap<TaskId, Prediction>, labels: &BTreeMap<TaskId, LabelMap>, full: bool) -> Value {
    let round4 = |x: f64| if full { x } else { round4(x) };
    let words = ex.input.words();
    let mut tasks = serde_json::Map::new();
    for (task, p) in preds {
        let map = &labels[task];
        let v = match p {
            Prediction::Class { id, score } => {
                json!({"label": map.label(*id), "score": round4(f64::from(*score))})
            }
            Prediction::Labels { ids, probs } => {
                let scores: serde_json::Map<String, Value> =
                    map.labels().iter().zip(probs).map(|(l, p)| (l.clone(), json!(round4(f64::from(*p))))).collect();
                json!({"labels": ids.iter().map(|&i| map.label(i)).collect::<Vec<_>>(), "scores": scores})
            }
            Prediction::Values(v) => {
                if v.len() == 1 {
                    json!({"value": v[0]})
                } else {
                    json!({"values": map.labels().iter().cloned().zip(v.iter().copied()).collect::<BTreeMap<String, f64>>()})
                }
            }
            Prediction::Tags(tags) => {
                let tags: Vec<&str> = tags.iter().map(|t| t.map_or("O", |t| map.label(t))).collect();
                json!({"words": words, "tags": tags})
            }
            Prediction::Answer { text, span, score } => {
                json!({"answer": text, "start": span.map(|s| s.0), "end": span.map(|s| s.1), "score": round4(f64::from(*score))})
            }
            Prediction::Generated(text) => json!({"generated": text}),
        };
        tasks.insert(task.to_string(), v);
    }
    let mut out = json!({"predictions": tasks});
    match &ex.input {
        Input::Text(t) => out["text"] = json!(t),
        Input::Words(w) => out["text"] = json!(w.join(" ")),
        Input::Pair(a, b) => {
            out["text"] = json!(a);
            out["text_pair"] = json!(b);
        }
        Input::Question { question, .. } => out["question"] = json!(question),
    }
    out
}
