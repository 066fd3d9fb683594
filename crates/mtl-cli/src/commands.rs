//! The commands. Each one validates and loads everything it needs before it writes anything.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mtl_config::{Config, Split};
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Dataset, Example, Input, LabelMap, Location, TextEncoder};
use mtl_nn::{BertConfig, ModelSpec, MultiTaskModel};
use mtl_train::checkpoint::{self, CheckpointFiles};
use mtl_train::{predict_examples, Prediction, ProgressCallback, Scores, Splits, Trainer};
use serde_json::{json, Value};

use crate::args::{Cli, Command};
use crate::report;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, out, overrides } => train(&config, &out, &overrides),
        Command::Eval { model, config, overrides } => eval(&model, &config, &overrides),
        Command::Predict { model, input, batch_size } => predict(&model, input.as_deref(), batch_size),
    }
}

fn task_kinds(config: &Config) -> BTreeMap<TaskId, TaskKind> {
    config.tasks.iter().map(|(t, c)| (t.clone(), c.kind)).collect()
}

fn model_spec<'a>(config: &Config, bert: &'a BertConfig, tasks: &'a BTreeMap<TaskId, (TaskKind, usize)>) -> ModelSpec<'a> {
    ModelSpec { bert, tasks, dropout: config.training.dropout as f32, seed: config.training.seed }
}

fn head_sizes(config: &Config, labels: &BTreeMap<TaskId, LabelMap>) -> BTreeMap<TaskId, (TaskKind, usize)> {
    config.tasks.iter().map(|(t, c)| (t.clone(), (c.kind, labels[t].len()))).collect()
}

fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{}: {what} not found (run scripts/fetch.sh for the default model and data)", path.display());
    }
    Ok(())
}

fn load_split(config: &Config, split: Split, encoder: &TextEncoder, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Option<Dataset>> {
    if config.tasks.values().all(|t| t.data.get(split).is_none()) {
        return Ok(None);
    }
    let raw = mtl_data::read_split(config, split)?;
    Ok(Some(Dataset::encode(raw, encoder, labels)?))
}

fn train(config_path: &Path, out: &Path, overrides: &[String]) -> Result<()> {
    let config = Config::load(config_path, overrides)?;
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    let base = &config.model.path;
    for (name, what) in [("config.json", "model config"), ("model.safetensors", "model weights"), ("tokenizer.json", "tokenizer")] {
        require_file(&base.join(name), what)?;
    }
    let bert = BertConfig::from_file(&base.join("config.json"))?;
    let encoder = TextEncoder::from_file(&base.join("tokenizer.json"), config.model.max_len.min(bert.max_position_embeddings))?;

    // Read and check all data before training, so that bad input fails fast and writes nothing.
    let raw_train = mtl_data::read_split(&config, Split::Train)?;
    let labels = LabelMap::for_tasks(&config, &raw_train)?;
    let splits = Splits {
        train: Dataset::encode(raw_train, &encoder, &labels)?,
        dev: load_split(&config, Split::Dev, &encoder, &labels)?,
        test: load_split(&config, Split::Test, &encoder, &labels)?,
    };
    let sizes = head_sizes(&config, &labels);
    let model = MultiTaskModel::load(&model_spec(&config, &bert, &sizes), &base.join("model.safetensors"), false, &Device::Cpu)?;
    tracing::info!(
        params = model.params().num_params(),
        train = splits.train.len(),
        dev = splits.dev.as_ref().map_or(0, Dataset::len),
        test = splits.test.as_ref().map_or(0, Dataset::len),
        "training {} task(s): {}",
        config.tasks.len(),
        config.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
    );

    let started = std::time::Instant::now();
    let trainer = Trainer { config: &config, model: &model, labels: &labels };
    let mut progress = ProgressCallback::default();
    let outcome = trainer.train(&splits, &mut [&mut progress])?;
    let seconds = started.elapsed().as_secs_f64();

    let metrics = metrics_json(outcome.dev.as_ref(), outcome.test.as_ref());
    let mut with_run = metrics.clone();
    with_run["best_epoch"] = json!(outcome.best_epoch);
    with_run["train_seconds"] = json!((seconds * 10.0).round() / 10.0);
    checkpoint::save(out, &model, &CheckpointFiles { config: &config, labels: &labels, metrics: &with_run })?;

    let mut shown: Vec<(&str, &Scores)> = Vec::new();
    if let Some(d) = &outcome.dev {
        shown.push(("dev", d));
    }
    if let Some(t) = &outcome.test {
        shown.push(("test", t));
    }
    print!("{}", report::table(&shown));
    println!("best epoch {} of {}; trained in {:.0} s; checkpoint and metrics.json in {}", outcome.best_epoch, config.training.epochs, seconds, out.display());
    Ok(())
}

fn metrics_json(dev: Option<&Scores>, test: Option<&Scores>) -> Value {
    let mut v = json!({});
    if let Some(d) = dev {
        v["dev"] = json!(d);
    }
    if let Some(t) = test {
        v["test"] = json!(t);
    }
    v
}

/// A trained model with everything needed to use it.
struct Loaded {
    config: Config,
    labels: BTreeMap<TaskId, LabelMap>,
    encoder: TextEncoder,
    model: MultiTaskModel,
}

fn load_checkpoint(dir: &Path) -> Result<Loaded> {
    let (config, labels) = checkpoint::read_meta(dir)?;
    for name in [checkpoint::MODEL_CONFIG, checkpoint::WEIGHTS, checkpoint::TOKENIZER] {
        require_file(&dir.join(name), "checkpoint file")?;
    }
    let bert = BertConfig::from_file(&dir.join(checkpoint::MODEL_CONFIG))?;
    let encoder = TextEncoder::from_file(&dir.join(checkpoint::TOKENIZER), config.model.max_len.min(bert.max_position_embeddings))?;
    let sizes = head_sizes(&config, &labels);
    let model = MultiTaskModel::load(&model_spec(&config, &bert, &sizes), &dir.join(checkpoint::WEIGHTS), true, &Device::Cpu)?;
    Ok(Loaded { config, labels, encoder, model })
}

fn eval(model_dir: &Path, config_path: &Path, overrides: &[String]) -> Result<()> {
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
    let trainer = Trainer { config: &config, model: &loaded.model, labels: &loaded.labels };
    let mut scores: BTreeMap<&str, Scores> = BTreeMap::new();
    for split in [Split::Dev, Split::Test] {
        if let Some(data) = load_split(&config, split, &loaded.encoder, &loaded.labels)? {
            scores.insert(split.name(), trainer.evaluate(&data)?);
        }
    }
    if scores.is_empty() {
        bail!("{}: no task has a dev or test file to score", config_path.display());
    }
    println!("{}", serde_json::to_string_pretty(&scores)?);
    Ok(())
}

fn parse_input(line: &str, location: &Location) -> Result<Input> {
    let trimmed = line.trim_start();
    if !trimmed.starts_with('{') {
        return Ok(Input::Text(line.to_string()));
    }
    let at = || format!("{}:{}", location.path.display(), location.line);
    let value: Value = serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
    if let Some(words) = value.get("words") {
        let words = words
            .as_array()
            .and_then(|a| a.iter().map(|w| w.as_str().map(String::from)).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{}: field `words` must be a list of strings", at()))?;
        return Ok(Input::Words(words));
    }
    match value.get("text") {
        Some(Value::String(t)) => Ok(Input::Text(t.clone())),
        Some(_) => bail!("{}: field `text` must be a string", at()),
        None => bail!("{}: expected a `text` or `words` field", at()),
    }
}

fn predict(model_dir: &Path, input: Option<&Path>, batch_size: usize) -> Result<()> {
    let loaded = load_checkpoint(model_dir)?;
    let kinds = task_kinds(&loaded.config);
    let has_token_task = kinds.values().any(|k| *k == TaskKind::TokenClassification);
    let reader: Box<dyn BufRead> = match input {
        Some(p) => Box::new(std::io::BufReader::new(std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let source = input.map_or_else(|| "<stdin>".into(), Path::to_path_buf);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut pending: Vec<Example> = Vec::new();
    let flush = |pending: &mut Vec<Example>, out: &mut dyn Write| -> Result<()> {
        let refs: Vec<&Example> = pending.iter().collect();
        let predictions = predict_examples(&loaded.model, &refs, &kinds, batch_size)?;
        for (ex, preds) in pending.iter().zip(predictions) {
            writeln!(out, "{}", prediction_json(ex, &preds, &loaded.labels))?;
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
        let mut input = parse_input(&line, &location)?;
        // Token tasks tag words: raw text is split on whitespace, as the training files split it.
        if has_token_task {
            if let Input::Text(t) = &input {
                input = Input::Words(t.split_whitespace().map(String::from).collect());
            }
        }
        let encoded = loaded
            .encoder
            .encode(&input)
            .map_err(|m| anyhow::anyhow!("{}:{}: {m}", source.display(), location.line))?;
        pending.push(Example { location, input, encoded, labels: BTreeMap::new() });
        if pending.len() >= batch_size.max(1) * 4 {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    out.flush()?;
    Ok(())
}

fn prediction_json(ex: &Example, preds: &BTreeMap<TaskId, Prediction>, labels: &BTreeMap<TaskId, LabelMap>) -> Value {
    let words = ex.input.words();
    let mut tasks = serde_json::Map::new();
    for (task, p) in preds {
        let map = &labels[task];
        let v = match p {
            Prediction::Class { id, score } => json!({"label": map.label(*id), "score": (f64::from(*score) * 1e4).round() / 1e4}),
            Prediction::Tags(tags) => {
                let tags: Vec<&str> = tags.iter().map(|t| t.map_or("O", |t| map.label(t))).collect();
                json!({"words": words, "tags": tags})
            }
        };
        tasks.insert(task.to_string(), v);
    }
    let text = match &ex.input {
        Input::Text(t) => t.clone(),
        Input::Words(w) => w.join(" "),
    };
    json!({"text": text, "predictions": tasks})
}
