//! The `mtl` binary: `train`, `eval` and `predict`. `main` only parses arguments and turns the outcome of
//! `run` into an exit status; every command lives in its own module.

mod args;
mod commands;
mod report;

// Large tensors are allocated and freed at every op; mimalloc keeps the pages instead of returning them to
// the kernel and faulting them in again (measured: a large share of a training step with glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to return freed pages to the kernel. By default it does so after a delay, and a training
/// step frees and reallocates hundreds of megabytes: each time the kernel zeroed the pages again on the next
/// fault (measured: 48,000 page faults and about 10% of a step at 16 × 128; 800 with this).
#[allow(unsafe_code)]
fn keep_freed_pages() {
    // `mi_option_purge_delay` comes right before `mi_option_use_numa_nodes` in mimalloc.h; the bindings lack it.
    let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: sets an integer option; mimalloc reads options atomically and allows changing them at any time.
    unsafe { libmimalloc_sys::mi_option_set(purge_delay, -1) };
}

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_pages();
    let args = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTL_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
