//! The `mtl` command line: `train`, `check`, `eval`, `predict`, `info`, `add-task`, `export`, `serve`,
//! `quantize`, `prune`, `generate` and `completions`. Arguments are parsed here ([`args`]), each command is
//! one call of the `mtl` library ([`commands`]), and the outcome becomes the exit status. The binary
//! (`main.rs`) and the Python package's `mtl` command both run [`main`].

mod args;
mod commands;
mod report;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// The exit status of a training stopped by Ctrl-C (as a shell reports a process ended by SIGINT).
const INTERRUPTED: u8 = 130;

/// Runs the command line `args` (the program name first) and returns its exit status. Call
/// [`mtl::process::setup`] first, while the process has one thread.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    ExitCode::from(run(args))
}

/// [`main`], its exit status as a number (for hosts that exit with it themselves).
pub fn run(args: impl IntoIterator<Item = OsString>) -> u8 {
    let args = match args::Cli::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // A subscriber may be set already where a host runs the command line (the Python package).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(args.log_level())),
        )
        .with_target(false)
        .try_init();
    if matches!(args.command, args::Command::Train { .. } | args::Command::Tune { .. }) {
        stop_training_on_ctrl_c();
    }
    // The server keeps its own threads (tokio's and the batcher's) and hands work to the pool from them.
    let outcome = if matches!(args.command, args::Command::Serve { .. }) {
        commands::run(args)
    } else {
        mtl::process::on_pool(|| commands::run(args))
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            let interrupted =
                matches!(e.downcast_ref::<mtl::Error>(), Some(mtl::Error::Train(mtl::TrainError::Interrupted { .. })));
            if interrupted {
                INTERRUPTED
            } else {
                1
            }
        }
    }
}

/// The first Ctrl-C lets training finish its step and write a checkpoint (the run then ends with
/// [`INTERRUPTED`]); a second one ends the process at once.
fn stop_training_on_ctrl_c() {
    let handler = || {
        if mtl::interrupt::stop_requested() {
            std::process::exit(i32::from(INTERRUPTED));
        }
        eprintln!("\nstopping after this step and writing a checkpoint (Ctrl-C again to stop at once)");
        mtl::interrupt::request_stop();
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        tracing::warn!("Ctrl-C will end training without a checkpoint: {e}");
    }
}
