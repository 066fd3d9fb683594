//! The `mtl` binary: `train`, `eval`, `predict`, `add-task`, `export`, `serve`, `quantize`, `prune` and `generate`. `main` only parses arguments and turns the outcome of
//! `run` into an exit status; every command lives in its own module.

mod add_task;
mod args;
mod commands;
mod deploy;
mod export;
mod generate;
mod report;
mod serve;
mod text_tasks;

// Large tensors are allocated and freed at every op; mimalloc keeps the pages instead of returning them to
// the kernel and faulting them in again (measured: a large share of a training step with glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    mtl_train::alloc::keep_freed_pages();
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
