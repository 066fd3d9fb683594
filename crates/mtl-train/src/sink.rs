//! Where progress goes when a host draws it itself (the Python bindings: a notebook has no terminal for
//! indicatif's bars). Without a sink, training, evaluation and prediction draw on stderr as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// One piece of progress, in the order the work makes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A bar starts: `what` (`train`, `predicting`, a task's name) over `total` units (`steps`, `inputs`).
    Start { what: String, total: u64, unit: &'static str },
    /// The bar now stands at `position`; `message` says more (the epoch and smoothed losses while training).
    Position { position: u64, message: String },
    /// A line to show above the bar (a dev evaluation).
    Line(String),
    /// The bar is done.
    Finish,
}

/// A host's receiver of progress; it must return quickly (it runs on the thread doing the work).
pub type Sink = Arc<dyn Fn(Progress) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Sends all progress to `sink` from now on instead of drawing it (`None`: draw it again).
pub fn set_progress_sink(sink: Option<Sink>) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// The sink, where a host set one.
pub(crate) fn sink() -> Option<Sink> {
    SINK.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Set while training sends its bar: the bars of its own evaluations are not sent (a host shows one bar).
static TRAINING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_training(on: bool) {
    TRAINING.store(on, Ordering::Relaxed);
}

pub(crate) fn training() -> bool {
    TRAINING.load(Ordering::Relaxed)
}
