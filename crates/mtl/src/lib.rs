//! The mtl library: fine-tune one pretrained model on many tasks at once, then use every task from that one
//! model. This crate is the project's API; the `mtl` binary only parses arguments, calls it and prints.
//!
//! - [`train()`]: a run from a config ([`TrainOptions`]: per-task selection, resume, baselines), for any backbone;
//!   returns a [`TrainReport`].
//! - [`Run`]: a trained run opened from its directory; [`Run::capabilities`] says what it can do,
//!   [`Run::evaluate`] scores it, [`Run::predict`] answers every task in the typed [`PredictionRecord`] schema.
//! - [`export()`], [`quantize`], [`prune`], [`add_task()`]: new runs and exports made from a run.
//! - [`Decoder`] (free generation), [`serve`] (every task over HTTP).
//! - [`BaseModel`] and [`Architecture`]: a pretrained model and the backbone it needs, read from its own files;
//!   [`RunManifest`]: the one versioned record of what a run directory holds.
//!
//! ```no_run
//! # fn main() -> mtl::Result<()> {
//! let config = mtl::Config::load("examples/atis/config.toml".as_ref(), &[])?;
//! mtl::train(&config, "examples/atis/config.toml".as_ref(), "runs/atis".as_ref(), &mtl::TrainOptions::default())?;
//! let run = mtl::Run::open("runs/atis".as_ref())?;
//! let answers = run.predict(&[mtl::Input::Text("show me flights to boston".into())], &Default::default())?;
//! println!("{}", serde_json::to_string(&answers[0]).expect("serializes"));
//! # Ok(())
//! # }
//! ```
//!
//! Depends on every other crate of the workspace (config → data → nn → train → serve); nothing depends on it
//! but the binary and the bindings.

mod add_task;
pub mod arch;
mod base;
mod check;
mod decoder;
mod deploy;
mod encoder;
mod error;
mod explain;
mod export;
mod files;
mod init;
pub mod manifest;
mod peft;
mod predict;
mod report;
mod run;
pub mod serve;
mod train;
pub mod tune;
mod update;
mod vocab;

use std::path::Path;

pub use add_task::{add_task, AddTaskReport};
pub use arch::Architecture;
pub use base::BaseModel;
pub use check::{check, check_with, CheckReport, EpochEstimate, TaskCheck};
pub use decoder::{check_sampling, BatchEngine, Decoder, GenerateRequest, Generated};
pub use deploy::{prune, quantize, TransformReport};
pub use error::{Error, Result};
pub use explain::{
    html as explanation_html, Attributions, BaselineKind, ExplainOptions, Explanation, Target, TaskExplanation, Token,
    Word,
};
pub use export::export;
pub use init::{init, InitReport, DEFAULT_MODEL};
pub use manifest::{RunManifest, WeightLayout, RUN_CONFIG};
pub use predict::{Entity, PredictOptions, PredictionRecord, Span, TaskPrediction};
pub use run::{Capabilities, Operation, Run};
pub use train::{train, train_with, BaselineRow, Baselines, Select, TrainOptions, TrainReport, Training};
pub use update::{update, TaskChange, UpdateReport};

pub use mtl_config::{Config, ServeConfig, ServeOverrides};
pub use mtl_data::{Input, Location};
pub use mtl_metrics::format_report;
pub use mtl_nn::generate::Sampling;
/// How the allocator keeps or returns freed pages (binaries set it at start-up).
pub use mtl_train::alloc;
/// Process-wide settings the binaries make first in `main` (allocator, candle's worker threads).
pub use mtl_train::process;
pub use mtl_train::{interrupt, set_progress_sink, show_item_progress, Evaluation, Progress, Scores, Sink, TrainError};

/// A decoder for free generation: a base model (a GGUF file, a directory with one, or a Llama directory), or a
/// decoder run with a shared adapter (its adapter on its base).
pub fn open_decoder(path: &Path) -> Result<Decoder> {
    if manifest::is_run_dir(path) {
        let run = Run::open(path)?;
        run.require(Operation::Generate)?;
        return match run.loaded {
            run::Loaded::Decoder(d) => Ok(d.into_decoder()),
            run::Loaded::Encoder(_) => {
                Err(Error::Unsupported { run: path.to_owned(), message: "not a decoder".into() })
            }
        };
    }
    BaseModel::open(path)?.decoder()
}

#[cfg(test)]
mod tests;
