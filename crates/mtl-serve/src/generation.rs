//! What generation is to the server: the requests of `POST /v1/generate` and the [`Generation`] every route
//! hands to a [`Generator`], which sends back each request's text on its own channel (the model's engine, in
//! the `mtl` library, batches all running requests into each decoding step). The routes are in
//! [`crate::llm_server`].

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{EngineError, RequestInput, TaskDescription};

/// The most stop strings one request may give, and the longest one, in characters.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;

/// One generation request, as checked by [`crate::llm_server::check_generate`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Put the prompt in the user's turn of the model's chat template.
    #[serde(default)]
    pub chat: bool,
    /// The task adapter to generate through, for a run with one adapter per task (as LoRAX's `adapter_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: u64,
    /// Texts that end the answer (not included).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Generate past the model's end tokens, up to `max_new_tokens` (as vLLM's and llama-server's
    /// `ignore_eos`: answers of a fixed length, for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Answer with server-sent events, one per piece of text, then a `done` event.
    #[serde(default)]
    pub stream: bool,
}

fn default_max_new_tokens() -> usize {
    128
}

pub use crate::MAX_NEW_TOKENS;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a generation continues: a plain prompt, a conversation written by the model's chat template with
/// the assistant's turn opened, or token ids as they are (a label task's trained prompt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
    Tokens(Vec<u32>),
}

/// One generation as a [`Generator`] takes it, from any route (`/v1/generate`, the OpenAI-compatible ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt: Prompt,
    /// The task adapter to generate through (none: the model's only adapter, or the base model).
    pub adapter: Option<String>,
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Generate past the model's end tokens (their text included), up to `max_new_tokens`.
    pub ignore_eos: bool,
}

impl Generation {
    /// Greedy decoding of `prompt` through `adapter`, up to `max_new_tokens` or an end token, no stop strings.
    pub fn greedy(prompt: Prompt, adapter: Option<String>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            adapter,
            max_new_tokens,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl From<&GenerateRequest> for Generation {
    fn from(r: &GenerateRequest) -> Self {
        let prompt = match r.chat {
            true => Prompt::Chat(vec![Message { role: "user".into(), content: r.prompt.clone() }]),
            false => Prompt::Text(r.prompt.clone()),
        };
        Self {
            prompt,
            adapter: r.adapter.clone(),
            max_new_tokens: r.max_new_tokens,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            seed: r.seed,
            stop: r.stop.clone(),
            ignore_eos: r.ignore_eos,
        }
    }
}

/// The models a generator serves, as `/v1/models` lists them: the base model, and each task adapter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Models {
    pub base: String,
    /// Whether the base name alone can be asked for (a model without adapters, or with one shared adapter).
    pub base_serves: bool,
    pub adapters: Vec<String>,
}

/// How a generation ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub text: String,
    /// Why it stopped: `stop_token`, `stop_string`, `max_new_tokens`, `length` or `cancelled`.
    pub stop: String,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    pub new_tokens: usize,
}

/// What a generator sends back for one request: pieces of text as they are decoded, then the end.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Piece(String),
    Done(Result<Finished, crate::EngineError>),
}

/// Why a generator did not take a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It never can (a prompt longer than the context, an unknown adapter): 422.
    #[error("{0}")]
    Invalid(String),
    /// Not now: its queue is full (429).
    #[error("the server is at capacity")]
    Full,
    /// Its engine has stopped (500).
    #[error("{0}")]
    Stopped(String),
}

/// What a generator reports for `/health` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GeneratorStatus {
    /// Requests waiting to join the running batch.
    pub queued: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Key/value cache blocks in use, and in all.
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Blocks kept by the prefix cache that no sequence holds (free for new sequences).
    pub kv_blocks_cached: usize,
    /// Prompt tokens of the requests admitted, and those of them found in the prefix cache.
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// Decoding steps run, and the sequences they held together (occupancy = sequences / steps).
    pub steps: u64,
    pub step_sequences: u64,
    /// Why the generator cannot serve any more, if it cannot.
    pub failure: Option<String>,
}

/// A decoder model as the server sees it.
pub trait Generator: Send + Sync + 'static {
    /// Takes a checked request. Its text comes on the returned channel as pieces, then one [`Update::Done`];
    /// dropping the receiver cancels the request, queued or running.
    fn submit(&self, generation: Generation) -> Result<mpsc::UnboundedReceiver<Update>, Refused>;

    fn status(&self) -> GeneratorStatus;

    fn models(&self) -> Models;
}

/// The label tasks of a decoder run, answered by generation: each (input, task) of `POST /v1/predict` is one
/// greedy generation through the task's trained prompt and adapter, batched with every other request into the
/// generator's steps, and its text maps to the task's answer (a label, labels, values, (type, value) spans) as
/// `mtl predict` and `mtl eval` map it.
pub trait LabelTasks: Send + Sync + 'static {
    fn tasks(&self) -> &[TaskDescription];

    /// The generation that answers `task` (a known one) for `input`, or why the input cannot be answered.
    fn generation(&self, task: &str, input: &RequestInput) -> Result<Generation, EngineError>;

    /// The text of that generation as `task`'s answer, in the JSON of `mtl predict`'s records.
    fn answer(&self, task: &str, generated: String) -> serde_json::Value;
}
