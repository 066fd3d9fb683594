//! Run tracking: every step and evaluation as a JSON line in `OUT/log.jsonl`, the same scalars as TensorBoard
//! event files under `OUT/tensorboard/`, and, from the log and the final evaluation, a self-contained
//! `OUT/report.html`.
//!
//! On a resume the log is cut back to the records sent before the checkpoint (a killed run may have logged
//! further) and the TensorBoard file is written anew from it, so both read as one uninterrupted run.

mod html;
mod tensorboard;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use html::{write_report, ReportInput};
pub use tensorboard::{crc32c, EventWriter};

use crate::trainer::{Callback, Control, EvalReport, StepReport};

pub const LOG: &str = "log.jsonl";
pub const TENSORBOARD: &str = "tensorboard";

/// A `Callback` that writes `log.jsonl` and TensorBoard events.
pub struct Tracker {
    dir: PathBuf,
    files: Option<(std::io::BufWriter<std::fs::File>, EventWriter)>,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Tracker {
    /// Tracks into `dir`; the files are opened when training starts.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), files: None }
    }

    /// Opens the files; a resumed run keeps the first `resumed` records of the log and rewrites the
    /// TensorBoard events from them.
    fn open(&mut self, resumed: Option<usize>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log_path = self.dir.join(LOG);
        let kept: Vec<Value> = match resumed {
            Some(n) => read_log(&log_path).into_iter().take(n).collect(),
            None => Vec::new(),
        };
        let tb = self.dir.join(TENSORBOARD);
        if tb.exists() {
            std::fs::remove_dir_all(&tb)?;
        }
        let mut events = EventWriter::create(&tb)?;
        let mut log = std::io::BufWriter::new(std::fs::File::create(&log_path)?);
        for r in &kept {
            writeln!(log, "{r}")?;
            let step = r["step"].as_u64().unwrap_or(0) as usize;
            events.scalars(step, r["time"].as_f64().unwrap_or(0.0), &scalars(r))?;
        }
        log.flush()?;
        events.flush()?;
        self.files = Some((log, events));
        Ok(())
    }

    fn write(&mut self, record: Value) {
        let Some((log, events)) = &mut self.files else { return };
        let step = record["step"].as_u64().unwrap_or(0) as usize;
        let time = record["time"].as_f64().unwrap_or(0.0);
        // Tracking must never stop training: a failed write is logged and skipped.
        let result = writeln!(log, "{record}")
            .and_then(|_| log.flush())
            .and_then(|_| events.scalars(step, time, &scalars(&record)))
            .and_then(|_| events.flush());
        if let Err(e) = result {
            tracing::warn!("{}: cannot write the training log: {e}", self.dir.display());
        }
    }
}

/// Every record of a log; a line cut short by a kill is skipped.
pub fn read_log(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The TensorBoard scalars of a log record.
fn scalars(r: &Value) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let mut each = |prefix: &str, v: &Value| {
        if let Some(m) = v.as_object() {
            for (k, x) in m {
                if let Some(x) = x.as_f64() {
                    out.push((format!("{prefix}/{k}"), x as f32));
                }
            }
        }
    };
    match r["type"].as_str() {
        Some("step") => {
            each("loss", &r["losses"]);
            each("weight", &r["weights"]);
            each("sampling", &r["sampling"]);
            if let Some(cos) = r["grad_cosines"].as_array() {
                for c in cos {
                    if let (Some(a), Some(b), Some(v)) = (c[0].as_str(), c[1].as_str(), c[2].as_f64()) {
                        out.push((format!("grad_cosine/{a}-{b}"), v as f32));
                    }
                }
            }
            for key in ["lr", "grad_norm"] {
                if let Some(x) = r[key].as_f64() {
                    out.push((format!("train/{key}"), x as f32));
                }
            }
        }
        Some("eval") => {
            if let Some(groups) = r["scores"].as_object() {
                for (group, metrics) in groups {
                    each(&format!("dev/{group}"), metrics);
                }
            }
            if let Some(x) = r["selection"].as_f64() {
                out.push(("dev/selection_score".into(), x as f32));
            }
        }
        _ => {}
    }
    out
}

impl Callback for Tracker {
    fn on_train_start(&mut self, _total_steps: usize, _steps_per_epoch: usize, resumed: Option<usize>) {
        if let Err(e) = self.open(resumed) {
            tracing::warn!("{}: cannot write the training log: {e}", self.dir.display());
        }
    }

    fn on_step(&mut self, r: &StepReport) {
        let cosines: Option<Vec<Value>> =
            r.grad_cosines.as_ref().map(|c| c.iter().map(|(a, b, v)| json!([a, b, v])).collect());
        let mut record = json!({
            "type": "step",
            "step": r.step,
            "epoch": r.epoch,
            "time": now(),
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "losses": r.losses,
            "weights": r.weights,
            "skipped": r.skipped,
        });
        if let Some(c) = cosines {
            record["grad_cosines"] = json!(c);
        }
        if let Some(p) = &r.sampling {
            record["sampling"] = json!(p);
        }
        self.write(record);
    }

    fn on_eval(&mut self, r: &EvalReport) -> Control {
        self.write(json!({
            "type": "eval",
            "step": r.step,
            "epoch": r.epoch,
            "time": now(),
            "scores": r.scores,
            "selection": r.selection,
            "is_best": r.is_best,
        }));
        Control::Continue
    }
}
