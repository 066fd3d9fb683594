//! Serving every task of one multi-task model over HTTP (axum + tokio).
//!
//! - [`Engine`]: what is served, the tasks and a batched predict; the model's engine lives in the `mtl`
//!   library, tests use a fake one.
//! - [`batcher`]: one model thread that takes the queued requests of any tasks, up to a token budget, and runs
//!   them as one batch; a bounded queue gives backpressure.
//! - [`api`]: the router, its endpoints and the error table.
//! - [`metrics`]: what `GET /metrics` reports, in Prometheus' text format; [`openapi`]: `GET /openapi.json`.
//! - [`drift`]: each task's answers as distributions, and their drift from the dev set's (in `/metrics`);
//!   [`request_log`]: opt-in, sampled, masked logging of prediction requests.
//!
//! Depends on `mtl-config` alone of ours (its `ServeConfig` is the one source of the serving defaults): the
//! engine brings the model.

pub mod api;
pub mod batcher;
pub mod drift;
pub mod generation;
pub mod listen;
pub mod llm_server;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod request_log;
pub mod streaming;

/// The most new tokens one generation request may ask for.
pub const MAX_NEW_TOKENS: usize = 4096;

/// The router that [`api::router`] and [`llm_server::generation_router`] build, for callers that serve it.
pub use axum::Router;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A task as `GET /v1/tasks` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskDescription {
    pub name: String,
    /// `classification`, `multi_label`, `regression`, `token_classification` or `question_answering`.
    pub kind: String,
    pub labels: Vec<String>,
}

/// One input of a request: a text, a text pair, pre-split words, or a question with its context.
/// Unknown fields are refused, so a misspelt one (`txt_pair`) is an error, not a silently different input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum RequestInput {
    Text(String),
    Pair { text: String, text_pair: String },
    Words { words: Vec<String> },
    Question { question: String, context: String },
    Single { text: String },
}

/// Why an engine or a generator could not answer; the kind decides the HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The input cannot be answered as sent (empty, the wrong shape, too long for the model): 422.
    #[error("{0}")]
    Invalid(String),
    /// The model failed: 500.
    #[error("{0}")]
    Model(String),
}

/// What the server serves. Shared by the request handlers (which prepare inputs on worker threads) and the
/// model thread (which predicts), so it is `Sync`.
/// Points on the integrated-gradients path one explanation (`POST /v1/explain`) may ask for at most.
pub const MAX_EXPLAIN_STEPS: usize = 200;

pub trait Engine: Send + Sync + 'static {
    /// An input ready for the model (tokenised).
    type Item: Send + 'static;

    fn tasks(&self) -> &[TaskDescription];

    /// Checks and tokenises one input; returns it with its cost in tokens, or why it is invalid.
    fn prepare(&self, input: &RequestInput) -> Result<(Self::Item, usize), EngineError>;

    /// Predictions for a batch: for each item, the tasks asked of it, answered as JSON per task. One call
    /// may mix items of different requests and different tasks.
    fn predict(
        &self,
        items: &[&Self::Item],
        tasks: &[&BTreeSet<String>],
    ) -> Result<Vec<BTreeMap<String, serde_json::Value>>, EngineError>;

    /// The distributions of the model's answers on its dev set, which the served answers are compared with
    /// ([`drift`]); none: the answers are counted, not compared.
    fn drift_reference(&self) -> Option<&drift::Reference> {
        None
    }

    /// Why the model answers a checked request's input as it does (`POST /v1/explain`, served when
    /// `explain` is on): the explanation as JSON. Runs on the blocking pool, one at a time.
    fn explain(&self, _request: &api::ExplainRequest) -> Result<serde_json::Value, EngineError> {
        Err(EngineError::Invalid("this model does not explain its answers".into()))
    }
}

#[cfg(test)]
mod tests;
