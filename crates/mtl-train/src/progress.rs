//! A progress bar with per-task losses and ETA, and a one-line log of every evaluation; sent to the host's
//! progress sink instead where one is set.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mtl_core::TaskId;

use crate::sink::{Progress, Sink};
use crate::trainer::{Callback, Control, EvalReport, StepReport};

/// Draws a progress bar on stderr (when it is a terminal) and logs each dev evaluation with `tracing`, or
/// sends both to the progress sink ([`crate::set_progress_sink`]).
#[derive(Default)]
pub struct ProgressCallback {
    bar: Option<ProgressBar>,
    sink: Option<Sink>,
    /// Exponential moving average of each task's loss.
    smoothed: BTreeMap<TaskId, f32>,
}

impl Drop for ProgressCallback {
    /// A training that ends in an error sends no `on_train_end`: its bar ends here.
    fn drop(&mut self) {
        self.on_train_end();
    }
}

impl Callback for ProgressCallback {
    fn on_train_start(&mut self, total_steps: usize, _steps_per_epoch: usize, _resumed: Option<usize>) {
        if let Some(sink) = crate::sink::sink() {
            sink(Progress::Start { what: "train".into(), total: total_steps as u64, unit: "steps" });
            crate::sink::set_training(true);
            self.sink = Some(sink);
            return;
        }
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} epoch {prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                .expect("the progress template is valid; this is a bug")
                .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }

    fn on_step(&mut self, r: &StepReport) {
        for (task, &loss) in &r.losses {
            let s = self.smoothed.entry(task.clone()).or_insert(loss);
            *s = 0.9 * *s + 0.1 * loss;
        }
        let losses = || {
            let losses: Vec<String> = self.smoothed.iter().map(|(t, l)| format!("{t} {l:.4}")).collect();
            format!("loss: {}", losses.join(", "))
        };
        if let Some(bar) = &self.bar {
            bar.set_prefix(r.epoch.to_string());
            bar.set_message(losses());
            bar.set_position(r.step as u64);
        }
        if let Some(sink) = &self.sink {
            sink(Progress::Position { position: r.step as u64, message: format!("epoch {}, {}", r.epoch, losses()) });
        }
        if r.step.is_multiple_of(50) || r.step == r.total_steps {
            tracing::debug!(step = r.step, lr = r.lr, grad_norm = r.grad_norm, losses = ?r.losses, "step");
        }
    }

    fn on_eval(&mut self, r: &EvalReport) -> Control {
        let parts: Vec<String> =
            r.scores.iter().flat_map(|(group, m)| m.iter().map(move |(k, v)| format!("{group}.{k}={v:.4}"))).collect();
        let line =
            format!("epoch {} dev: {}{}", r.epoch, parts.join(" "), if r.is_best { " (best so far)" } else { "" });
        match (&self.bar, &self.sink) {
            (_, Some(sink)) => sink(Progress::Line(line)),
            (Some(bar), _) if !bar.is_hidden() => bar.println(line),
            _ => tracing::info!("{line}"),
        }
        Control::Continue
    }

    fn on_train_end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(sink) = self.sink.take() {
            crate::sink::set_training(false);
            sink(Progress::Finish);
        }
    }
}
