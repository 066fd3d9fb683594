//! The `mtl` binary: `train`, `eval`, `predict`, `info`, `add-task`, `export`, `serve`, `quantize`, `prune`
//! and `generate`. Arguments are parsed here ([`args`]), each command is one call of the `mtl` library
//! ([`commands`]), and the outcome becomes the exit status.

mod args;
mod commands;
mod report;

// Large tensors are allocated and freed at every op; mimalloc keeps the pages instead of returning them to
// the kernel and faulting them in again (measured: a large share of a training step with glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    mtl::process::setup();
    let args = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(args.log_level())),
        )
        .with_target(false)
        .init();
    // The server keeps its own threads (tokio's and the batcher's) and hands work to the pool from them.
    let outcome = if matches!(args.command, args::Command::Serve { .. }) {
        commands::run(args)
    } else {
        mtl::process::on_pool(|| commands::run(args))
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
