//! The integration tests: one binary. `cli` drives the `mtl` binary on the tiny random model of
//! tests/fixtures/tiny-bert (no download); `real_model` checks all-MiniLM-L6-v2 against transformers and
//! needs `scripts/fetch.sh` first (the README's test command runs it).

mod cli;
mod deploy;
mod drift;
mod engine;
mod export;
mod gemma;
mod llm;
mod peft;
mod real_model;
mod serve;
mod tasks;
mod text_tasks;
mod tune;
mod update;

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root exists")
}
