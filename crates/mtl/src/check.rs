//! `mtl check CONFIG`: reads and checks everything a training run would read, without loading the model's
//! weights or training: per task and split, the examples, the label distribution, rare labels, labels of dev
//! and test outside the training set (and what the config does with them), and for an encoder, how many inputs
//! `model.max_len` cuts; and, unless asked not to, the time an epoch of training takes here, from a few real
//! training steps on a sample of the data.

use std::collections::BTreeMap;
use std::path::Path;

use mtl_config::{Config, Split, StepPlan};
use mtl_core::TaskId;
use mtl_data::{Dataset, LabelMap, RawExample, TextEncoder};
use serde::Serialize;

use crate::error::Result;

/// A label seen fewer times than this in the training file is listed as rare.
const RARE: usize = 3;

/// What `mtl check` found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub tasks: BTreeMap<String, TaskCheck>,
    /// Inputs longer than `model.max_len` by split (for a decoder: prompt and answer together).
    pub truncated: Option<BTreeMap<String, usize>>,
    /// Whether the model is a decoder (its tasks are prompts and answers).
    pub decoder: bool,
    pub max_len: usize,
    /// The time an epoch of training takes on this machine ([`check_with`] with `estimate`).
    pub estimate: Option<EpochEstimate>,
}

/// How long an epoch of training takes here: optimiser steps per epoch times the median time of a step,
/// timed on a few steps of a sample of the training data (dev evaluation and checkpoints aside).
#[derive(Clone, Debug, Serialize)]
pub struct EpochEstimate {
    pub steps_per_epoch: usize,
    pub seconds_per_step: f64,
    pub seconds_per_epoch: f64,
    /// How many steps were timed.
    pub timed_steps: usize,
}

/// Steps timed for the estimate (after one untimed).
const TIMED_STEPS: usize = 6;

/// One task's data.
#[derive(Clone, Debug, Serialize)]
pub struct TaskCheck {
    pub kind: String,
    /// Examples with this task's label, by split.
    pub examples: BTreeMap<String, usize>,
    /// The size of the label set (none for regression, QA and generation).
    pub labels: Option<usize>,
    /// How often each label occurs in the training file (for tagging: each tag).
    pub train_counts: BTreeMap<String, usize>,
    /// Labels seen fewer than 3 times in training.
    pub rare: Vec<String>,
    /// Dev and test labels outside the set, with their counts, by split.
    pub unseen: BTreeMap<String, BTreeMap<String, usize>>,
    /// What training does with those: `error`, `mapped to X`, or `left out`.
    pub unseen_policy: String,
}

/// Reads and checks `config`'s data (`source`: where it came from, for messages).
pub fn check(config: &Config, source: &Path) -> Result<CheckReport> {
    check_with(config, source, false)
}

/// [`check`], and with `estimate` the time of an epoch, from [`TIMED_STEPS`] training steps of the model on a
/// sample of the data (the model is loaded for it: seconds for a small encoder or decoder).
pub fn check_with(config: &Config, source: &Path, estimate: bool) -> Result<CheckReport> {
    let (mut report, batches) = check_data(config, source)?;
    if estimate {
        // An estimate that cannot be made (a sample without a task's labels) leaves the check as it is.
        match estimate_epoch(config, source, batches) {
            Ok(e) => report.estimate = e,
            Err(e) => tracing::warn!("no estimate of an epoch's time: {e}"),
        }
    }
    Ok(report)
}

/// The report, and the batches of one training epoch.
fn check_data(config: &Config, source: &Path) -> Result<(CheckReport, usize)> {
    let architecture = crate::base::BaseModel::open(&config.model.path)?.architecture();
    if architecture.is_decoder() {
        crate::decoder::check_config(config, source)?;
    } else {
        crate::encoder::check_tasks(config, source)?;
    }
    let mut raw: BTreeMap<Split, Vec<RawExample>> = BTreeMap::new();
    for split in [Split::Train, Split::Dev, Split::Test] {
        if config.tasks.values().any(|t| t.data.get(split).is_some()) {
            raw.insert(split, mtl_data::read_split(config, split)?);
        }
    }
    let train = raw.get(&Split::Train).map_or(&[][..], Vec::as_slice);
    let labels = LabelMap::for_tasks(config, train)?;
    let mut tasks = BTreeMap::new();
    for (name, task) in &config.tasks {
        let map = labels.get(name);
        let mut check = TaskCheck {
            kind: task.kind.name().to_string(),
            examples: BTreeMap::new(),
            labels: map.filter(|m| m.scale.is_none()).map(LabelMap::len),
            train_counts: BTreeMap::new(),
            rare: Vec::new(),
            unseen: BTreeMap::new(),
            unseen_policy: match (&task.unknown_label, task.skip_unseen_labels) {
                (Some(l), _) => format!("mapped to {l:?}"),
                (None, true) => "left out".into(),
                (None, false) => "error".into(),
            },
        };
        for (split, examples) in &raw {
            let mut n = 0;
            for ex in examples {
                let Some(label) = ex.labels.get(name) else { continue };
                n += 1;
                for l in label.names() {
                    match split {
                        Split::Train => *check.train_counts.entry(l.to_string()).or_default() += 1,
                        _ if map.is_some_and(|m| m.id(l).is_none()) => {
                            *check
                                .unseen
                                .entry(split.name().to_string())
                                .or_default()
                                .entry(l.to_string())
                                .or_default() += 1
                        }
                        _ => {}
                    }
                }
            }
            check.examples.insert(split.name().to_string(), n);
        }
        check.rare = check.train_counts.iter().filter(|(_, &c)| c < RARE).map(|(l, _)| l.clone()).collect();
        tasks.insert(name.to_string(), check);
    }
    let max_len = config.model.max_len;
    let (cut, lengths) = match architecture.is_decoder() {
        true => decoder_truncation(config, &raw, &labels)?,
        false => truncation(config, &raw, &labels)?,
    };
    let (truncated, lengths) = (Some(cut), Some(lengths));
    let batches = epoch_batches(config, &tasks, train.len(), lengths.as_deref());
    let decoder = architecture.is_decoder();
    Ok((CheckReport { tasks, truncated, max_len, decoder, estimate: None }, batches))
}

/// The batches of one epoch: the training rows cut as training cuts them (`lengths`: their token counts,
/// where known, for `max_tokens` and length grouping) in mixed steps; each task's examples, times its share of
/// passes (`sampling.epochs`), in sampled steps.
fn epoch_batches(
    config: &Config,
    tasks: &BTreeMap<String, TaskCheck>,
    rows: usize,
    lengths: Option<&[usize]>,
) -> usize {
    let t = &config.training;
    match t.sampling.plan {
        StepPlan::Mixed => match lengths {
            Some(lengths) => {
                let batching = mtl_data::Batching {
                    batch_size: t.batch_size,
                    group_by_length: t.group_by_length,
                    max_tokens: t.max_tokens,
                };
                mtl_data::epoch_batches(lengths, &batching, t.seed, 1).len()
            }
            None => rows.div_ceil(t.batch_size),
        },
        StepPlan::Sampled => tasks
            .iter()
            .map(|(name, c)| {
                let batches = c.examples.get("train").copied().unwrap_or(0).div_ceil(t.batch_size) as f64;
                let passes = t
                    .sampling
                    .epochs
                    .iter()
                    .find(|(k, _)| k.as_str() == name)
                    .map_or(1.0, |(_, p)| p / t.epochs as f64);
                (batches * passes).ceil() as usize
            })
            .sum(),
    }
}

/// Trains a copy of `config` for one short epoch on a seeded sample of its training data (no dev, no test,
/// into a temporary directory) and times its steps from the run's log; `batches`: those of a real epoch.
/// `None` where the sample makes fewer than two steps to time.
fn estimate_epoch(config: &Config, source: &Path, batches: usize) -> Result<Option<EpochEstimate>> {
    let t = &config.training;
    let per_step = t.batch_size * t.grad_accumulation;
    let files: std::collections::BTreeSet<&Path> = config.tasks.values().map(|t| t.data.train.as_path()).collect();
    let mut mini = config.clone();
    mini.training.epochs = 1;
    mini.training.patience = None;
    mini.training.eval_every = None;
    mini.training.checkpoint_every = None;
    mini.training.diagnostics_every = None;
    mini.training.warmup_ratio = 0.0;
    // Steps with the backbone frozen would be faster than the run's.
    mini.training.freeze.unfreeze_every = None;
    // The sample has no dev split; Auto-λ's meta batches cost the same from the training data.
    mini.training.weighting.meta_data = mtl_config::MetaData::Train;
    let sample = (per_step * (TIMED_STEPS + 1)).div_ceil(files.len().max(1));
    for task in mini.tasks.values_mut() {
        task.data.dev = None;
        task.data.test = None;
        task.train_limit = Some(task.train_limit.map_or(sample, |l| l.min(sample)));
    }
    let tmp = tempfile::tempdir().map_err(crate::Error::io(Path::new("a temporary directory")))?;
    let out = tmp.path().join("run");
    tracing::info!("timing training steps on a sample of the data for the epoch estimate (--no-estimate skips it)");
    crate::train(&mini, source, &out, &crate::TrainOptions::default())?;
    let log = std::fs::read_to_string(out.join("log.jsonl")).map_err(crate::Error::io(&out.join("log.jsonl")))?;
    let times: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "step")
        .filter_map(|v| v["time"].as_f64())
        .collect();
    let mut steps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    if steps.is_empty() {
        return Ok(None);
    }
    steps.sort_by(f64::total_cmp);
    let seconds_per_step = steps[steps.len() / 2];
    let steps_per_epoch = batches.div_ceil(t.grad_accumulation);
    Ok(Some(EpochEstimate {
        steps_per_epoch,
        seconds_per_step,
        seconds_per_epoch: seconds_per_step * steps_per_epoch as f64,
        timed_steps: steps.len(),
    }))
}

/// Inputs the encoder's tokenizer cuts at `model.max_len`, by split (labels outside the sets left out, so
/// that they do not stop the count), and the token counts of the training inputs.
fn truncation(
    config: &Config,
    raw: &BTreeMap<Split, Vec<RawExample>>,
    labels: &BTreeMap<TaskId, LabelMap>,
) -> Result<(BTreeMap<String, usize>, Vec<usize>)> {
    let base = &config.model.path;
    let bert = mtl_nn::BertConfig::from_file(&base.join("config.json"))?;
    let (tokenizer, source) = crate::vocab::base_tokenizer(base)?;
    let encoder = TextEncoder::from_tokenizer(tokenizer, &source, config.model.max_len.min(bert.max_tokens()))?;
    let lenient = lenient(config);
    let mut out = BTreeMap::new();
    let mut lengths = Vec::new();
    for (split, examples) in raw {
        let kept = mtl_data::leave_out_unseen(examples.clone(), labels, &lenient, split.name());
        let data = Dataset::encode(kept, &encoder, labels, config)?;
        if *split == Split::Train {
            lengths = data.examples.iter().map(|e| e.encoded.ids.len()).collect();
        }
        out.insert(split.name().to_string(), data.truncated);
    }
    Ok((out, lengths))
}

/// `config` with dev and test labels outside the sets left out (where no `unknown_label` maps them), so that
/// counting what `model.max_len` cuts does not stop at them.
fn lenient(config: &Config) -> Config {
    let mut lenient = config.clone();
    for t in lenient.tasks.values_mut() {
        if t.unknown_label.is_none() {
            t.skip_unseen_labels = true;
        }
    }
    lenient
}

/// A decoder's training sequences (prompt and answer, in the chat template) cut at `model.max_len`, by split,
/// and the token counts of the training sequences.
fn decoder_truncation(
    config: &Config,
    raw: &BTreeMap<Split, Vec<RawExample>>,
    labels: &BTreeMap<TaskId, LabelMap>,
) -> Result<(BTreeMap<String, usize>, Vec<usize>)> {
    let files = crate::decoder::files::DecoderFiles::load(&config.model.path, true)?;
    let (chat, eos) = crate::decoder::prompt_parts(&files)?;
    let format = mtl_data::prompt::PromptFormat {
        tokenizer: &files.tokenizer,
        chat: chat.as_ref(),
        eos,
        max_len: config.model.max_len.min(files.config.max_position_embeddings),
        system: config.model.system_prompt.as_deref(),
    };
    let train = raw.get(&Split::Train).map_or(&[][..], Vec::as_slice);
    let labels = mtl_data::prompt::with_fallback_means(labels.clone(), config, train);
    let lenient = lenient(config);
    let mut out = BTreeMap::new();
    let mut lengths = Vec::new();
    for (split, examples) in raw {
        let kept = mtl_data::leave_out_unseen(examples.clone(), &labels, &lenient, split.name());
        let (data, _) = format.dataset(kept, &labels, config, None)?;
        if *split == Split::Train {
            lengths = data.examples.iter().map(|e| e.encoded.ids.len()).collect();
        }
        out.insert(split.name().to_string(), data.truncated);
    }
    Ok((out, lengths))
}

impl std::fmt::Display for CheckReport {
    /// The report as `mtl check` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<16} {:<22} {:>8} {:>8} {:>8} {:>7}  unseen dev/test labels",
            "task", "kind", "train", "dev", "test", "labels"
        )?;
        for (name, t) in &self.tasks {
            let n = |s: &str| t.examples.get(s).map_or("-".to_string(), |n| n.to_string());
            let unseen: Vec<String> = t
                .unseen
                .iter()
                .map(|(split, ls)| {
                    let total: usize = ls.values().sum();
                    let top: Vec<String> = ls.iter().take(5).map(|(l, c)| format!("{l} {c}")).collect();
                    format!("{split}: {total} ({}{})", top.join(", "), if ls.len() > 5 { ", …" } else { "" })
                })
                .collect();
            let unseen = match unseen.is_empty() {
                true => "none".to_string(),
                false => format!("{} → {}", unseen.join("; "), t.unseen_policy),
            };
            let labels = t.labels.map_or("-".to_string(), |n| n.to_string());
            writeln!(
                f,
                "{name:<16} {:<22} {:>8} {:>8} {:>8} {labels:>7}  {unseen}",
                t.kind,
                n("train"),
                n("dev"),
                n("test")
            )?;
        }
        for (name, t) in &self.tasks {
            if t.train_counts.is_empty() {
                continue;
            }
            let mut counts: Vec<(&String, &usize)> = t.train_counts.iter().collect();
            counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = counts.iter().take(8).map(|(l, c)| format!("{l} {c}")).collect();
            writeln!(
                f,
                "{name}: most frequent in train: {}{}",
                top.join(", "),
                if counts.len() > 8 { ", …" } else { "" }
            )?;
            if !t.rare.is_empty() {
                let rare: Vec<&str> = t.rare.iter().take(10).map(String::as_str).collect();
                writeln!(
                    f,
                    "{name}: {} labels seen fewer than {RARE} times in train: {}{}",
                    t.rare.len(),
                    rare.join(", "),
                    if t.rare.len() > 10 { ", …" } else { "" }
                )?;
            }
        }
        if let Some(t) = &self.truncated {
            let parts: Vec<String> = t.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let what = if self.decoder { "prompts with their answers" } else { "inputs" };
            writeln!(f, "{what} cut at model.max_len = {}: {}", self.max_len, parts.join(", "))?;
        }
        if let Some(e) = &self.estimate {
            writeln!(
                f,
                "an epoch of training here: about {} ({} steps at {:.2} s, the median of {} timed on a sample; dev evaluation aside)",
                duration(e.seconds_per_epoch),
                e.steps_per_epoch,
                e.seconds_per_step,
                e.timed_steps
            )?;
        }
        Ok(())
    }
}

/// Seconds as `45 s`, `12 min`, `3.4 h`.
fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}
