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

/// Runs `f` on a thread of a new rayon pool (as many threads as the global pool would have) rather than on
/// the calling one; every rayon call inside `f` uses that pool. Each parallel op of a step then splits its work
/// between the thread that runs the step and the pool's other threads, instead of the calling thread handing
/// each op to the pool and sleeping until it is done: on a small machine that is one thread more than there
/// are cores, two thread hand-offs more per op, and the pool's idle threads spinning while the caller's
/// serial work waits for a core. The threads get a main thread's 8 MiB of stack (candle walks and drops long
/// autograd graphs recursively). Falls back to the calling thread if the pool cannot start.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("mtl-{i}")).stack_size(8 << 20).build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
