//! Hyper-parameter search (`mtl tune CONFIG --space SPACE.toml --out DIR`): grid search, random search, and
//! asynchronous successive halving (ASHA, Li et al. 2020) that stops weak trials early on their dev score.
//!
//! The space names config keys, as `--set` does, with their values or ranges:
//!
//! ```toml
//! [search]
//! method = "asha"          # "grid", "random" or "asha"
//! trials = 9               # random and ASHA: configurations drawn (grid: every combination)
//! seed = 0
//! metric = "joint.frame_accuracy"   # TASK.METRIC of the dev scores; default: the run's selection score
//! mode = "max"             # or "min"
//! min_epochs = 2           # ASHA: the first rung, in epochs
//! reduction = 3            # ASHA: one trial in `reduction` goes on to the next rung, `reduction` times longer
//! budget_epochs = 45       # at most this many epochs trained over all trials (default: no limit)
//!
//! [params]
//! "training.lr" = { min = 5e-5, max = 5e-4, scale = "log" }
//! "training.head_lr" = { values = [3e-4, 1e-3, 3e-3] }
//! "training.weighting.weights.slots" = { min = 1.0, max = 3.0 }
//! "training.epochs" = { values = [10, 15] }
//! ```
//!
//! Every trial is a separate `mtl train` process (a [`TrialRunner`]), in `DIR/trials/NNN/` with its log in
//! `DIR/trials/NNN.log`. Under ASHA a trial is trained with its own full schedule (`training.epochs`) but
//! paused at each rung (`--stop-after-epoch`); when it is among the best `1/reduction` of the trials that
//! reached its rung it is resumed to the next (`--resume`), exactly as if it had not stopped; a trial that
//! reaches its last epoch finishes and writes its model. The search runs one trial at a time and records its
//! state in `DIR/tune.json` after every step, so `--resume` after a kill goes on where it stopped (the trial
//! that was training resumes from its last checkpoint). Results: `DIR/trials.jsonl` (a line per trial),
//! `DIR/report.html` (the table) and `DIR/best.toml` (the best trial's config).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{bail, read_text, Error, Result};

/// How configurations are chosen and trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every combination of the values, each trained fully.
    Grid,
    /// `trials` configurations drawn at random, each trained fully.
    Random,
    /// `trials` configurations drawn at random, trained rung by rung, the weak ones stopped early.
    Asha,
}

/// Whether higher or lower scores are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Max,
    Min,
}

/// The `[search]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Search {
    pub method: Method,
    /// Configurations drawn (random and ASHA).
    #[serde(default = "default_trials")]
    pub trials: usize,
    #[serde(default)]
    pub seed: u64,
    /// `TASK.METRIC` of the dev scores; none: the run's selection score.
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// ASHA's first rung, in epochs.
    #[serde(default = "one")]
    pub min_epochs: usize,
    /// ASHA's reduction factor.
    #[serde(default = "three")]
    pub reduction: usize,
    /// The most epochs trained over all trials.
    #[serde(default)]
    pub budget_epochs: Option<usize>,
}

fn default_trials() -> usize {
    9
}
fn default_mode() -> Mode {
    Mode::Max
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}

/// How a parameter's values are spread between `min` and `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    Linear,
    Log,
}

/// One searched config key: its values, or a range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Param {
    Values {
        values: Vec<Value>,
    },
    Range {
        min: f64,
        max: f64,
        #[serde(default = "linear")]
        scale: Scale,
        /// Whole numbers only.
        #[serde(default)]
        integer: bool,
        /// Grid search: this many points from `min` to `max`.
        #[serde(default)]
        steps: Option<usize>,
    },
}

fn linear() -> Scale {
    Scale::Linear
}

/// A search space file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Space {
    pub search: Search,
    pub params: BTreeMap<String, Param>,
}

impl Space {
    /// The space in `path`, checked; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let space: Space = toml::from_str(&text)
            .map_err(|e| Error::Invalid { path: path.to_owned(), message: e.to_string().trim_end().to_string() })?;
        let invalid = |field: &str, message: String| Error::Invalid {
            path: path.to_owned(),
            message: format!("field `{field}`: {message}"),
        };
        let s = &space.search;
        if space.params.is_empty() {
            return Err(invalid("params", "no parameter to search".into()));
        }
        if s.trials == 0 {
            return Err(invalid("search.trials", "must be at least 1".into()));
        }
        if s.min_epochs == 0 {
            return Err(invalid("search.min_epochs", "must be at least 1".into()));
        }
        if s.reduction < 2 {
            return Err(invalid("search.reduction", "must be at least 2".into()));
        }
        if let Some(m) = &s.metric {
            if m.split_once('.').is_none_or(|(t, k)| t.is_empty() || k.is_empty()) {
                return Err(invalid("search.metric", format!("{m:?} is not TASK.METRIC (e.g. joint.frame_accuracy)")));
            }
        }
        for (key, p) in &space.params {
            let field = format!("params.\"{key}\"");
            match p {
                Param::Values { values } if values.is_empty() => return Err(invalid(&field, "no values".into())),
                Param::Values { values } => {
                    if let Some(v) = values.iter().find(|v| !(v.is_number() || v.is_string() || v.is_boolean())) {
                        return Err(invalid(&field, format!("{v} is not a number, string or boolean")));
                    }
                }
                Param::Range { min, max, scale, steps, .. } => {
                    if !(min.is_finite() && max.is_finite() && min <= max) {
                        return Err(invalid(&field, "needs finite min <= max".into()));
                    }
                    if *scale == Scale::Log && *min <= 0.0 {
                        return Err(invalid(&field, "a log scale needs min > 0".into()));
                    }
                    if s.method == Method::Grid && steps.is_none_or(|n| n < 2) {
                        return Err(invalid(&field, "grid search needs `steps` (2 or more) for a range".into()));
                    }
                }
            }
        }
        Ok(space)
    }

    /// The configurations to try: every combination (grid), or `trials` draws.
    pub fn configurations(&self) -> Vec<BTreeMap<String, Value>> {
        match self.search.method {
            Method::Grid => {
                let mut out = vec![BTreeMap::new()];
                for (key, p) in &self.params {
                    let values = grid_values(p);
                    out = out
                        .into_iter()
                        .flat_map(|c| {
                            values.iter().map(move |v| {
                                let mut c = c.clone();
                                c.insert(key.clone(), v.clone());
                                c
                            })
                        })
                        .collect();
                }
                out
            }
            Method::Random | Method::Asha => {
                let mut rng = SplitMix64(self.search.seed);
                (0..self.search.trials)
                    .map(|_| self.params.iter().map(|(k, p)| (k.clone(), draw(p, &mut rng))).collect())
                    .collect()
            }
        }
    }
}

/// A small seeded generator (SplitMix64): the draws depend on the seed alone.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn number(x: f64, integer: bool) -> Value {
    match integer {
        true => Value::from(x.round() as i64),
        // Four significant digits: the config reads cleanly and nothing that matters is lost.
        false => Value::from(format!("{x:.3e}").parse::<f64>().unwrap_or(x)),
    }
}

fn draw(p: &Param, rng: &mut SplitMix64) -> Value {
    match p {
        Param::Values { values } => values[(rng.unit() * values.len() as f64) as usize % values.len()].clone(),
        Param::Range { min, max, scale, integer, .. } => {
            let u = rng.unit();
            let x = match scale {
                Scale::Linear => min + u * (max - min),
                Scale::Log => (min.ln() + u * (max.ln() - min.ln())).exp(),
            };
            number(x, *integer)
        }
    }
}

fn grid_values(p: &Param) -> Vec<Value> {
    match p {
        Param::Values { values } => values.clone(),
        Param::Range { min, max, scale, integer, steps } => {
            let n = steps.unwrap_or(2).max(2);
            let mut out: Vec<Value> = (0..n)
                .map(|i| {
                    let t = i as f64 / (n - 1) as f64;
                    let x = match scale {
                        Scale::Linear => min + t * (max - min),
                        Scale::Log => (min.ln() + t * (max.ln() - min.ln())).exp(),
                    };
                    number(x, *integer)
                })
                .collect();
            out.dedup();
            out
        }
    }
}

/// A value as `--set KEY=VALUE` writes it (TOML).
pub fn toml_value(v: &Value) -> String {
    match v {
        Value::String(s) => toml::Value::String(s.clone()).to_string(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(0.0);
            let s = format!("{x:?}");
            if s.contains(['.', 'e', 'E']) || !x.is_finite() {
                s
            } else {
                format!("{s}.0")
            }
        }
        other => other.to_string(),
    }
}

/// Where a trial stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not started.
    Pending,
    /// Being trained (a kill leaves it so: `--resume` resumes it).
    Running,
    /// Paused at a rung, resumable.
    Paused,
    /// Trained to its last epoch (or stopped by its own patience); its model is written.
    Done,
    /// Stopped early by the search: it was not among the best at its rung when the search ended.
    Stopped,
    Failed,
}

/// One configuration and how far it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: usize,
    pub params: BTreeMap<String, Value>,
    /// Its schedule's length (`training.epochs` with its parameters).
    pub epochs: usize,
    /// Epochs trained so far.
    pub trained: usize,
    /// The dev score at each epoch's last evaluation, by epoch.
    pub scores: BTreeMap<usize, f64>,
    pub status: Status,
    /// Seconds of training (all its processes).
    pub seconds: f64,
    /// Why it failed: the last lines of its log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Trial {
    /// The best score up to `epoch` (inclusive).
    pub fn best_until(&self, epoch: usize, mode: Mode) -> Option<f64> {
        let scores = self.scores.range(..=epoch).map(|(_, &s)| s);
        match mode {
            Mode::Max => scores.reduce(f64::max),
            Mode::Min => scores.reduce(f64::min),
        }
    }

    /// Its best score so far.
    pub fn best(&self, mode: Mode) -> Option<f64> {
        self.best_until(usize::MAX, mode)
    }

    fn dir(&self, out: &Path) -> PathBuf {
        out.join("trials").join(format!("{:03}", self.id))
    }
}

/// The search's state, `DIR/tune.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneState {
    pub config: PathBuf,
    /// The `--set` overrides every trial gets before its own.
    pub overrides: Vec<String>,
    pub space: Space,
    pub trials: Vec<Trial>,
}

impl TuneState {
    /// Epochs trained over all trials.
    pub fn spent_epochs(&self) -> usize {
        self.trials.iter().map(|t| t.trained).sum()
    }

    /// A trial's `--set` overrides: the search's, then its parameters.
    pub fn overrides_of(&self, trial: &Trial) -> Vec<String> {
        let mut out = self.overrides.clone();
        out.extend(trial.params.iter().map(|(k, v)| format!("{k}={}", toml_value(v))));
        out
    }

    /// The best trial so far: the best score, ties to the trial trained longer.
    pub fn best(&self) -> Option<&Trial> {
        let mode = self.space.search.mode;
        let key = |t: &Trial| {
            let s = t.best(mode)?;
            Some((if mode == Mode::Max { s } else { -s }, t.trained))
        };
        self.trials
            .iter()
            .filter_map(|t| Some((key(t)?, t)))
            .max_by(|(a, _), (b, _)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, t)| t)
    }

    /// ASHA's rungs for a trial of `epochs` epochs: `min_epochs · reduction^k` below `epochs`, then `epochs`.
    pub fn rungs(&self, epochs: usize) -> Vec<usize> {
        let s = &self.space.search;
        let mut out = Vec::new();
        let mut r = s.min_epochs;
        while r < epochs {
            out.push(r);
            r = r.saturating_mul(s.reduction);
        }
        out.push(epochs);
        out
    }

    /// The next piece of work: a trial and the epoch to train it to; none when the search is over.
    pub fn next_job(&self) -> Option<(usize, usize)> {
        let s = &self.space.search;
        let budget_left = s.budget_epochs.map_or(usize::MAX, |b| b.saturating_sub(self.spent_epochs()));
        // A trial killed while training goes on first.
        if let Some(t) = self.trials.iter().find(|t| t.status == Status::Running) {
            return Some((t.id, self.target_of(t)?));
        }
        if s.method != Method::Asha {
            let t = self.trials.iter().find(|t| t.status == Status::Pending)?;
            return (t.epochs <= budget_left).then_some((t.id, t.epochs));
        }
        // ASHA: a promotion from the highest rung that has one, else a new trial at the first rung.
        let top = self.trials.iter().map(|t| self.rungs(t.epochs).len()).max().unwrap_or(0);
        for k in (0..top).rev() {
            let at_rung: Vec<(&Trial, f64)> = self
                .trials
                .iter()
                .filter_map(|t| {
                    let r = *self.rungs(t.epochs).get(k)?;
                    (t.trained >= r).then(|| Some((t, t.best_until(r, s.mode)?)))?
                })
                .collect();
            let mut ranked = at_rung.clone();
            ranked.sort_by(|a, b| match s.mode {
                Mode::Max => b.1.total_cmp(&a.1),
                Mode::Min => a.1.total_cmp(&b.1),
            });
            let promotable = ranked.len() / s.reduction;
            for (t, _) in ranked.into_iter().take(promotable) {
                let rungs = self.rungs(t.epochs);
                if t.status == Status::Paused && t.trained == rungs[k] {
                    let target = rungs[k + 1];
                    if target - t.trained <= budget_left {
                        return Some((t.id, target));
                    }
                }
            }
        }
        let t = self.trials.iter().find(|t| t.status == Status::Pending)?;
        let target = self.rungs(t.epochs)[0];
        (target <= budget_left).then_some((t.id, target))
    }

    fn target_of(&self, t: &Trial) -> Option<usize> {
        match self.space.search.method {
            Method::Asha => self.rungs(t.epochs).into_iter().find(|&r| r > t.trained),
            _ => Some(t.epochs),
        }
    }
}

/// One piece of work for a [`TrialRunner`].
#[derive(Clone, Debug)]
pub struct Job<'a> {
    pub config: &'a Path,
    pub overrides: &'a [String],
    /// The trial's run directory.
    pub dir: &'a Path,
    /// Where its output goes.
    pub log: &'a Path,
    /// Continue the run in `dir` (else it starts there afresh).
    pub resume: bool,
    /// Pause after this epoch; none: train to the end.
    pub stop_after_epoch: Option<usize>,
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEnd {
    /// Paused at the epoch asked for.
    Paused,
    /// Trained to the end (or its own early stopping): the model is written.
    Finished,
    Failed(String),
}

/// Runs `mtl train` for a job: the trial runner, which a test (or a cluster) can replace.
pub trait TrialRunner {
    fn run(&mut self, job: &Job) -> Result<JobEnd>;
}

/// Each job as a separate `mtl train` process of the binary `exe`; its output to the job's log file.
#[derive(Clone, Debug)]
pub struct ProcessRunner {
    pub exe: PathBuf,
}

/// The exit status of an interrupted (or paused) `mtl train`.
const PAUSED_STATUS: i32 = 130;

impl TrialRunner for ProcessRunner {
    fn run(&mut self, job: &Job) -> Result<JobEnd> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(job.log).map_err(Error::io(job.log))?;
        let log_err = log.try_clone().map_err(Error::io(job.log))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("train").arg(job.config).arg("--out").arg(job.dir);
        for set in job.overrides {
            cmd.arg("--set").arg(set);
        }
        if job.resume {
            cmd.arg("--resume");
        }
        if let Some(e) = job.stop_after_epoch {
            cmd.arg("--stop-after-epoch").arg(e.to_string());
        }
        let status = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .status()
            .map_err(|e| Error::Usage(format!("cannot run {}: {e}", self.exe.display())))?;
        Ok(match status.code() {
            Some(0) => JobEnd::Finished,
            Some(PAUSED_STATUS) if job.stop_after_epoch.is_some() => JobEnd::Paused,
            code => {
                let text = last_bytes(job.log, 4096);
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                JobEnd::Failed(format!(
                    "mtl train exited with {} (log {}): {}",
                    code.map_or("a signal".to_string(), |c| format!("status {c}")),
                    job.log.display(),
                    tail.join(" | ")
                ))
            }
        })
    }
}

/// The last `n` bytes of a file as text (a failed trial's log can be long; its end says why).
fn last_bytes(path: &Path, n: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    if file.seek(SeekFrom::Start(len.saturating_sub(n))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The dev score of each epoch's last evaluation in a run's `log.jsonl`: the selection score, or `metric`
/// (`TASK.METRIC`).
pub fn epoch_scores(run: &Path, metric: Option<&str>) -> Result<BTreeMap<usize, f64>> {
    let path = run.join("log.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(Error::Io { path, source: e }),
    };
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["type"] != "eval" {
            continue;
        }
        let Some(epoch) = v["epoch"].as_u64() else { continue };
        let score = match metric.and_then(|m| m.split_once('.')) {
            Some((task, name)) => v["scores"][task][name].as_f64(),
            None => v["selection"].as_f64(),
        };
        if let Some(s) = score {
            out.insert(epoch as usize, s);
        }
    }
    Ok(out)
}

/// What a search did.
#[derive(Clone, Debug)]
pub struct TuneReport {
    pub state: TuneState,
    /// The best trial's config, written to `DIR/best.toml`.
    pub best: Option<PathBuf>,
}

/// Runs the search of `space` over `config` (with `overrides`) into `out`; with `resume`, goes on from
/// `out/tune.json`. `on_job` hears of each job as it ends.
pub fn tune(
    config: &Path,
    space_path: &Path,
    out: &Path,
    overrides: &[String],
    resume: bool,
    runner: &mut dyn TrialRunner,
    on_job: &mut dyn FnMut(&TuneState, &Trial),
) -> Result<TuneReport> {
    let state_path = out.join("tune.json");
    let mut state = if resume {
        let text = read_text(&state_path)?;
        let state: TuneState = serde_json::from_str(&text).map_err(Error::invalid(&state_path))?;
        if state.config != config || state.overrides != overrides {
            bail!(
                "{}: the search was started with {} and --set {:?}; resume it with the same",
                state_path.display(),
                state.config.display(),
                state.overrides
            );
        }
        state
    } else {
        if out.exists() {
            bail!(
                "{}: the output directory already exists; choose another, or continue it with --resume",
                out.display()
            );
        }
        let space = Space::load(space_path)?;
        let mut trials = Vec::new();
        for (id, params) in space.configurations().into_iter().enumerate() {
            // Each configuration is checked as its run will load it, before anything trains.
            let mut sets = overrides.to_vec();
            sets.extend(params.iter().map(|(k, v)| format!("{k}={}", toml_value(v))));
            let c = crate::Config::load(config, &sets)?;
            trials.push(Trial {
                id,
                params,
                epochs: c.training.epochs,
                trained: 0,
                scores: BTreeMap::new(),
                status: Status::Pending,
                seconds: 0.0,
                error: None,
            });
        }
        std::fs::create_dir_all(out.join("trials")).map_err(Error::io(out))?;
        TuneState { config: config.to_owned(), overrides: overrides.to_vec(), space, trials }
    };
    save(out, &state)?;
    let metric = state.space.search.metric.clone();
    while let Some((id, target)) = state.next_job() {
        let (dir, log, resume_run, trial_overrides, epochs) = {
            let t = &state.trials[id];
            let dir = t.dir(out);
            let resumable = dir.exists() && !mtl_train::resume::checkpoints(&dir).is_empty();
            if dir.exists() && !resumable {
                // Killed before its first checkpoint: it starts again.
                std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
            }
            (dir, out.join("trials").join(format!("{:03}.log", t.id)), resumable, state.overrides_of(t), t.epochs)
        };
        state.trials[id].status = Status::Running;
        save(out, &state)?;
        let started = std::time::Instant::now();
        let job = Job {
            config,
            overrides: &trial_overrides,
            dir: &dir,
            log: &log,
            resume: resume_run,
            stop_after_epoch: (target < epochs).then_some(target),
        };
        tracing::info!(trial = id, from = state.trials[id].trained, to = target, "training");
        let end = runner.run(&job)?;
        if crate::interrupt::stop_requested() {
            // Ctrl-C reached the trial too: it wrote a checkpoint, and `--resume` goes on with it.
            let t = &mut state.trials[id];
            t.seconds += started.elapsed().as_secs_f64();
            t.scores = epoch_scores(&dir, metric.as_deref())?;
            save(out, &state)?;
            return Err(crate::TrainError::Interrupted { step: 0, checkpoint: Some(dir) }.into());
        }
        let t = &mut state.trials[id];
        t.seconds += started.elapsed().as_secs_f64();
        t.scores = epoch_scores(&dir, metric.as_deref())?;
        match end {
            JobEnd::Paused => {
                t.trained = target;
                t.status = Status::Paused;
            }
            JobEnd::Finished => {
                // Its own patience may have ended it before its last epoch.
                t.trained = t.scores.keys().max().copied().unwrap_or(target).max(t.trained);
                t.status = Status::Done;
            }
            JobEnd::Failed(message) => {
                tracing::warn!(trial = id, "{message}");
                t.trained = t.scores.keys().max().copied().unwrap_or(t.trained);
                t.status = Status::Failed;
                t.error = Some(message);
            }
        }
        save(out, &state)?;
        on_job(&state, &state.trials[id]);
    }
    for t in &mut state.trials {
        if t.status == Status::Paused {
            t.status = Status::Stopped;
        }
    }
    save(out, &state)?;
    let best = match state.best() {
        Some(t) => {
            let c = crate::Config::load(config, &state.overrides_of(t))?;
            let path = out.join("best.toml");
            let text = format!(
                "# The best trial of `mtl tune` ({}): trial {} ({}), {} {:.4} after {} of {} epochs.\n{}",
                out.display(),
                t.id,
                t.params.iter().map(|(k, v)| format!("{k} = {}", toml_value(v))).collect::<Vec<_>>().join(", "),
                metric.as_deref().unwrap_or("selection score"),
                t.best(state.space.search.mode).unwrap_or(f64::NAN),
                t.trained,
                t.epochs,
                c.to_toml()
            );
            crate::files::write_durably(&path, &text)?;
            Some(path)
        }
        None => None,
    };
    Ok(TuneReport { state, best })
}

/// Writes the state, the trials table and the report, each atomically.
fn save(out: &Path, state: &TuneState) -> Result<()> {
    let json = serde_json::to_string_pretty(state).expect("the state serializes; this is a bug");
    crate::files::write_durably(&out.join("tune.json"), &json)?;
    let mode = state.space.search.mode;
    let lines: String = state
        .trials
        .iter()
        .map(|t| {
            let mut v = serde_json::to_value(t).expect("trials serialize; this is a bug");
            v["best"] = t.best(mode).map_or(Value::Null, Value::from);
            v.to_string() + "\n"
        })
        .collect();
    crate::files::write_durably(&out.join("trials.jsonl"), &lines)?;
    crate::files::write_durably(&out.join("report.html"), &report_html(state))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The trials as an HTML table, best first.
pub fn report_html(state: &TuneState) -> String {
    let s = &state.space.search;
    let mode = s.mode;
    let metric = s.metric.as_deref().unwrap_or("selection score");
    let mut trials: Vec<&Trial> = state.trials.iter().collect();
    trials.sort_by(|a, b| {
        let (x, y) = (a.best(mode), b.best(mode));
        match (x, y) {
            (Some(x), Some(y)) if mode == Mode::Max => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.id.cmp(&b.id),
        }
    });
    let keys: Vec<&String> = state.space.params.keys().collect();
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>mtl tune</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}tr.best td{font-weight:bold}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>mtl tune</h1><p>{} over {} ({:?}, {} trials, {} epochs trained{}); the dev {} by epoch, best first.</p><table><tr><th>trial</th>",
        escape(&state.config.display().to_string()),
        keys.iter().map(|k| escape(k)).collect::<Vec<_>>().join(", "),
        s.method,
        state.trials.len(),
        state.spent_epochs(),
        s.budget_epochs.map_or(String::new(), |b| format!(" of a budget of {b}")),
        escape(metric),
    );
    for k in &keys {
        let _ = write!(html, "<th>{}</th>", escape(k));
    }
    html.push_str("<th>epochs</th><th>status</th><th>best</th><th>by epoch</th><th>seconds</th></tr>");
    let best_id = state.best().map(|t| t.id);
    for t in trials {
        let class = if Some(t.id) == best_id { " class=\"best\"" } else { "" };
        let _ = write!(html, "<tr{class}><td>{}</td>", t.id);
        for k in &keys {
            let _ = write!(html, "<td>{}</td>", t.params.get(*k).map_or(String::new(), |v| escape(&toml_value(v))));
        }
        let by_epoch: Vec<String> = t.scores.iter().map(|(e, s)| format!("{e}: {s:.4}")).collect();
        let _ = write!(
            html,
            "<td>{} / {}</td><td>{:?}</td><td>{}</td><td style=\"text-align:left\">{}</td><td>{:.0}</td></tr>",
            t.trained,
            t.epochs,
            t.status,
            t.best(mode).map_or("-".into(), |b| format!("{b:.4}")),
            escape(&by_epoch.join(", ")),
            t.seconds
        );
    }
    html.push_str("</table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(text: &str) -> Result<Space> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new(".")))?;
        let path = dir.path().join("space.toml");
        std::fs::write(&path, text).map_err(Error::io(&path))?;
        Space::load(&path)
    }

    fn state(method: &str, trials: usize, epochs: usize) -> TuneState {
        let text = format!(
            "[search]\nmethod = \"{method}\"\ntrials = {trials}\nmin_epochs = 1\nreduction = 3\n[params]\n\"training.lr\" = {{ min = 1e-5, max = 1e-3, scale = \"log\" }}\n"
        );
        let space = space(&text).expect("valid");
        let trials = space
            .configurations()
            .into_iter()
            .enumerate()
            .map(|(id, params)| Trial {
                id,
                params,
                epochs,
                trained: 0,
                scores: BTreeMap::new(),
                status: Status::Pending,
                seconds: 0.0,
                error: None,
            })
            .collect();
        TuneState { config: "c.toml".into(), overrides: Vec::new(), space, trials }
    }

    #[test]
    fn spaces_are_checked_and_drawn_reproducibly() -> Result<()> {
        let s = space("[search]\nmethod = \"grid\"\n[params]\n\"training.lr\" = { min = 1e-5, max = 1e-3, scale = \"log\", steps = 3 }\n\"training.epochs\" = { values = [2, 3] }\n")?;
        let grid = s.configurations();
        assert_eq!(grid.len(), 6);
        assert_eq!(grid[0]["training.lr"], Value::from(1e-5));
        assert_eq!(grid[1]["training.lr"], Value::from(1e-4));
        assert_eq!(grid[2]["training.lr"], Value::from(1e-3));
        assert_eq!(
            (grid[2]["training.epochs"].clone(), grid[3]["training.epochs"].clone()),
            (Value::from(2), Value::from(3))
        );
        let r = state("random", 5, 3);
        assert_eq!(r.space.configurations(), r.space.configurations(), "the same seed draws the same");
        assert!(r
            .space
            .configurations()
            .iter()
            .all(|c| (1e-5..=1e-3).contains(&c["training.lr"].as_f64().unwrap_or(0.0))));
        let err = |text: &str| space(text).expect_err("invalid").to_string();
        assert!(err("[search]\nmethod = \"grid\"\n[params]\n\"training.lr\" = { min = 1e-5, max = 1e-3 }\n")
            .contains("field `params.\"training.lr\"`: grid search needs `steps`"));
        assert!(err("[search]\nmethod = \"asha\"\nreduction = 1\n[params]\n\"a\" = { values = [1] }\n")
            .contains("field `search.reduction`"));
        assert!(err("[search]\nmethod = \"asha\"\nmetric = \"frame\"\n[params]\n\"a\" = { values = [1] }\n")
            .contains("is not TASK.METRIC"));
        assert_eq!(toml_value(&Value::from(2.0)), "2.0");
        assert_eq!(toml_value(&Value::from(1e-5)), "1e-5");
        assert_eq!(toml_value(&Value::from("cosine")), "\"cosine\"");
        Ok(())
    }

    /// ASHA run by hand: nine trials of nine epochs, rungs 1, 3, 9; a trial's score is its number at every
    /// epoch, so trials 8, 7 and 6 are the best three.
    #[test]
    fn asha_promotes_the_best_third_of_each_rung() {
        let mut s = state("asha", 9, 9);
        assert_eq!(s.rungs(9), vec![1, 3, 9]);
        assert_eq!(s.rungs(10), vec![1, 3, 9, 10]);
        let mut order = Vec::new();
        while let Some((id, target)) = s.next_job() {
            order.push((id, target));
            let t = &mut s.trials[id];
            for e in t.trained + 1..=target {
                t.scores.insert(e, id as f64);
            }
            t.trained = target;
            t.status = if target == t.epochs { Status::Done } else { Status::Paused };
        }
        // Trials start at rung 1 until three have reached it; the best of them (2) goes on to epoch 3 at once.
        assert_eq!(&order[..4], &[(0, 1), (1, 1), (2, 1), (2, 3)]);
        // Every trial got its first epoch; the top three went to 3 epochs and the best of those to 9.
        assert!(s.trials.iter().all(|t| t.trained >= 1));
        assert_eq!(s.trials[8].trained, 9);
        assert!(s.trials[6].trained >= 3 && s.trials[7].trained >= 3);
        assert_eq!(s.best().map(|t| t.id), Some(8));
        assert_eq!(s.spent_epochs(), s.trials.iter().map(|t| t.trained).sum::<usize>());
        // A budget stops the search before the work that would pass it.
        let mut b = state("asha", 9, 9);
        b.space.search.budget_epochs = Some(4);
        let mut spent = 0;
        while let Some((id, target)) = b.next_job() {
            spent += target - b.trials[id].trained;
            b.trials[id].trained = target;
            b.trials[id].status = Status::Paused;
        }
        assert!(spent <= 4, "{spent}");
    }
}
