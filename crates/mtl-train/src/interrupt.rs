//! A request to stop training cleanly, made from outside the loop (Ctrl-C in the CLI, `KeyboardInterrupt`
//! in Python): the loop finishes its step, writes a checkpoint where the run keeps them, and returns
//! [`crate::TrainError::Interrupted`]; `--resume` continues from that checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the running training (if any) to stop after its current step. Safe to call from a signal handler's
/// thread.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Withdraws a request (before starting new work).
pub fn clear_stop() {
    STOP.store(false, Ordering::SeqCst);
}

/// Whether a stop has been asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
