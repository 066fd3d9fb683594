//! Wall time spent in each phase of the fused encoder, for `mtl-bench` and `bench/vs-pytorch`: where a step's
//! time goes on the machine at hand. Off unless [`enable`]d; then each phase costs two clock reads. Phases are
//! timed on the thread that runs the layer (their inner work runs on the rayon pool), so they add up to the
//! encoder's wall time, never to more.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a span of the encoder's time was spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The four projections of a layer (forward, the input gradients and the weight gradients); the bias where
    /// the product adds it (q|k|v, and all four in bf16), else in the Norms or Activation pass that reads it.
    Projections,
    /// Scores, softmax, masking, dropout and the weighted sum, per example and head, and their backward.
    Attention,
    /// Residual adds with LayerNorm, and LayerNorm's backward.
    Norms,
    /// GELU and its derivative.
    Activation,
    /// Drawing the dropout seeds of every layer (before the encoder op runs); the multipliers themselves are
    /// drawn where they are applied, in the phases that apply them.
    Masks,
    /// Bias sums, dropout on gradients, weight stacking, buffers and copies.
    Other,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::Projections, Phase::Attention, Phase::Norms, Phase::Activation, Phase::Masks, Phase::Other];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Projections => "projections",
            Phase::Attention => "attention",
            Phase::Norms => "norms",
            Phase::Activation => "activation",
            Phase::Masks => "masks",
            Phase::Other => "other",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Starts (or stops) timing phases.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `phase` when timing is on.
#[inline]
pub fn time<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    NANOS[phase as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// A span of `phase` that ends at [`Timer::stop`] (for spans a closure cannot wrap).
pub struct Timer(Option<(Phase, Instant)>);

/// Starts timing `phase` (a no-op while timing is off).
pub fn start(phase: Phase) -> Timer {
    Timer(ENABLED.load(Ordering::Relaxed).then(|| (phase, Instant::now())))
}

impl Timer {
    pub fn stop(self) {
        if let Some((phase, start)) = self.0 {
            NANOS[phase as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// Milliseconds spent in each phase since the last call, and resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    Phase::ALL.iter().map(|&p| (p.name(), NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 / 1e6)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_only_while_enabled() {
        // The only test touching the counters, so nothing else runs beside it.
        enable(false);
        time(Phase::Norms, || std::thread::sleep(std::time::Duration::from_millis(2)));
        assert!(take().iter().all(|(_, ms)| *ms == 0.0));
        enable(true);
        time(Phase::Norms, || std::thread::sleep(std::time::Duration::from_millis(2)));
        enable(false);
        let phases = take();
        assert!(phases.iter().any(|&(n, ms)| n == "norms" && ms >= 2.0), "{phases:?}");
        assert!(phases.iter().filter(|(n, _)| *n != "norms").all(|(_, ms)| *ms == 0.0));
        assert!(take().iter().all(|(_, ms)| *ms == 0.0), "take resets");
    }
}
