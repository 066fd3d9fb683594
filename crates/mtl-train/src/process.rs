//! Process-wide settings for the binaries, made once at start-up before any tensor op.

/// candle's barrier pool (the threads of its parallel element-wise ops) busy-waits 25,000 spins after each op
/// before it parks. Between two such ops a training step runs matrix products on rayon's threads, and on a
/// small machine the spinning thread takes a core from them: measured on 2 cores, a SmolLM2 LoRA step
/// (`bench/llm-lora`) took 822 ms with the default and 697 ms with 100 spins (0 spins: 742 ms).
const CANDLE_SPIN_LIMIT: &str = "100";

/// Makes the settings the binaries run with: mimalloc keeps freed pages ([`crate::alloc::keep_freed_pages`]),
/// and candle's worker threads spin briefly before sleeping (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set).
/// Call it first in `main`, while the process has one thread: it sets an environment variable, which is only
/// sound before other threads read the environment.
pub fn setup() {
    crate::alloc::keep_freed_pages();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}
