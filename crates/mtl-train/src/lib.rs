//! Training: the AdamW optimiser and schedules, the training loop with its callbacks, evaluation with each
//! task's standard metrics, and checkpoints. Depends on `mtl-core`, `mtl-config`, `mtl-metrics`,
//! `mtl-data` and `mtl-nn`.

pub mod adalora;
pub mod alloc;
mod evaluate;
pub mod groups;
pub mod heads;
pub mod interrupt;
pub mod items;
pub mod model;
mod optim;
mod plan;
pub mod process;
mod progress;
pub mod resume;
pub mod sampling;
mod schedule;
mod sink;
mod step;
pub mod surgery;
pub mod tracking;
mod trainer;
pub mod weighting;

use std::path::PathBuf;

pub use evaluate::{
    main_metric, predict_examples, score, selection_score, task_score, tune_thresholds, Evaluation, Prediction, Scores,
    TaskInfo,
};
pub use items::show_item_progress;
pub use model::{Collation, TextTasks, TrainModel, DEFAULT_ANSWER_TOKENS};
pub use optim::{AdamW, AdamWConfig, AdamWState, ParamGroup, StepInfo};
pub use progress::ProgressCallback;
pub use schedule::{linear_warmup_decay, lr_scale};
pub use sink::{set_progress_sink, Progress, Sink};
pub use step::{named as named_grads, Grads};
pub use trainer::{Anchor, Callback, Control, EvalReport, Outcome, Splits, StepReport, TaskBest, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Nn(#[from] mtl_nn::NnError),
    #[error(transparent)]
    Config(#[from] mtl_config::ConfigError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: the output directory already exists; choose another or remove it")]
    OutputExists(PathBuf),
    #[error("{0}: not a checkpoint (no mtl.toml); train one with `mtl train CONFIG --out DIR`")]
    NotACheckpoint(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A stop asked for from outside ([`interrupt::request_stop`]); `checkpoint` is the one written then.
    #[error("training interrupted at step {step}{}", match checkpoint {
        Some(dir) => format!("; checkpoint {} written: the same command with --resume (resume=True in Python) continues it", dir.display()),
        None => " (this training keeps no checkpoints)".into(),
    })]
    Interrupted { step: usize, checkpoint: Option<PathBuf> },
    #[error("training stopped at step {step}: {skipped} steps had NaN or infinite losses or gradients, more than training.max_skipped_steps allows; lower the learning rate or check the data")]
    NonFinite { skipped: usize, step: usize },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
