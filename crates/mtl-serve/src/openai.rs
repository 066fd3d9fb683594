//! OpenAI-compatible routes over a [`Generator`], so that OpenAI's clients and the tools built on them talk to
//! mtl unchanged: `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as OpenAI streams
//! them (`data: CHUNK` events, then `data: [DONE]`), with `usage`; and `GET /v1/models`, the base model and each
//! task adapter. `model` picks the adapter, as LoRAX does: a task's name generates through that task's adapter,
//! the base model's name (or none) through the model's only adapter.
//!
//! Parameters mtl does not implement (`n` above 1, `logprobs`, penalties, `logit_bias`, tools, response
//! formats, `echo`, `suffix`) are refused with 422 rather than ignored; unknown fields too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{ApiError, Settings};
use crate::generation::{Finished, Generation, Generator, Message, Models, Prompt, MAX_STOP_CHARS, MAX_STOP_STRINGS};
use crate::metrics::Metrics;
use crate::MAX_NEW_TOKENS;

/// `max_tokens` when a completion request leaves it out (OpenAI's default).
pub const COMPLETION_MAX_TOKENS: usize = 16;
/// `max_tokens` when a chat request leaves it out (OpenAI's is the rest of the context; the engine reserves
/// cache blocks for the whole budget, so a bounded one).
pub const CHAT_MAX_TOKENS: usize = 512;

/// A string, or a list of them (`prompt`, `stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// A chat message's content: a string, or a list of parts of which only text parts are read.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// Accepted and unused: a participant's name.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    /// What OpenAI's client writes back into an assistant turn it received (`message.model_dump()`): accepted
    /// when empty.
    #[serde(default)]
    refusal: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: Option<Value>,
}

impl ChatMessage {
    /// Whether it carries something mtl does not take: tool calls, audio, a refusal.
    fn beyond_text(&self) -> bool {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && v != &json!([]));
        set(&self.refusal) || set(&self.tool_calls) || set(&self.function_call) || set(&self.audio)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both routes share, and those mtl refuses unless left at their defaults.
#[derive(Clone, Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// vLLM's and llama-server's extension: generate past the end tokens, up to `max_tokens`.
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<BTreeMap<String, f32>>,
    /// Accepted and unused: the client's id of its end user.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    best_of: Option<usize>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Validation(message.into())
}

/// The adapter `model` names: a task adapter by its name; the base model's name (or none) means the model's
/// only adapter, or the base model without adapters.
pub(crate) fn adapter_of(model: Option<&str>, models: &Models) -> Result<Option<String>, ApiError> {
    match model {
        None => Ok(None),
        Some(m) if m == models.base => Ok(None),
        Some(m) if models.adapters.iter().any(|a| a == m) => Ok(Some(m.to_string())),
        Some(m) => Err(ApiError::UnknownModel(m.to_string())),
    }
}

/// The common fields as a [`Generation`] of `prompt`, checked.
fn generation(
    c: &Common,
    prompt: Prompt,
    max_tokens: Option<usize>,
    default_max: usize,
    models: &Models,
) -> Result<Generation, ApiError> {
    let max_new_tokens = max_tokens.or(c.max_tokens).unwrap_or(default_max);
    if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS {
        return Err(invalid(format!("`max_tokens` must be in 1..={MAX_NEW_TOKENS}")));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(invalid("`temperature` must be in [0, 2]"));
    }
    if c.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(invalid("`top_p` must be in (0, 1]"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(invalid("`n` must be 1: one choice per request"));
    }
    if c.presence_penalty.is_some_and(|p| p != 0.0) || c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(invalid("presence and frequency penalties are not supported"));
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(invalid("`logit_bias` is not supported"));
    }
    let stop = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(invalid("`stop` strings must not be empty"));
    }
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(invalid(format!(
            "`stop` takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"
        )));
    }
    Ok(Generation {
        prompt,
        adapter: adapter_of(c.model.as_deref(), models)?,
        max_new_tokens,
        temperature,
        top_k: None,
        top_p: c.top_p.filter(|&p| p < 1.0),
        // Without a seed each request draws afresh, as OpenAI's do.
        seed: c.seed.unwrap_or_else(fresh_seed),
        stop,
        ignore_eos: c.ignore_eos,
    })
}

/// A seed of its own for a request that gives none.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// An OpenAI-compatible request's body (`/v1/chat/completions` when `chat_route`, else `/v1/completions`)
/// checked against the limits and `models`, as every such POST is before any model work: the generation it
/// asks for, and whether it streams. The generation fuzz target drives it.
pub fn check_openai(
    body: &[u8],
    settings: &Settings,
    models: &Models,
    chat_route: bool,
) -> Result<(Generation, bool), ApiError> {
    let (g, stream) = if chat_route { chat(body, settings, models)? } else { completion(body, settings, models)? };
    Ok((g, stream.stream))
}

/// A completion request's body, checked: the generation, the model's name as answered, and the stream
/// settings.
fn completion(body: &[u8], settings: &Settings, models: &Models) -> Result<(Generation, Stream), ApiError> {
    let r: CompletionRequest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request body: {e}")))?;
    let prompts = r.prompt.into_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(invalid("`prompt` must be one string (one completion per request)"));
    };
    if prompt.trim().is_empty() {
        return Err(invalid("`prompt` is empty"));
    }
    if prompt.chars().count() > settings.max_input_chars {
        return Err(invalid(format!("`prompt` is longer than {} characters", settings.max_input_chars)));
    }
    if r.logprobs.as_ref().is_some_and(|l| !l.is_null()) || r.echo == Some(true) || r.best_of.is_some_and(|b| b != 1) {
        return Err(invalid("`logprobs`, `echo` and `best_of` are not supported"));
    }
    if r.suffix.is_some() {
        return Err(invalid("`suffix` is not supported"));
    }
    let g = generation(&r.common, Prompt::Text(prompt.clone()), None, COMPLETION_MAX_TOKENS, models)?;
    Ok((g, Stream::of(&r.common, models, Kind::Completion)))
}

/// A chat request's body, checked.
fn chat(body: &[u8], settings: &Settings, models: &Models) -> Result<(Generation, Stream), ApiError> {
    let r: ChatRequest = serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request body: {e}")))?;
    if r.messages.is_empty() {
        return Err(invalid("`messages` is empty"));
    }
    if r.logprobs == Some(true) || r.top_logprobs.is_some() {
        return Err(invalid("`logprobs` is not supported"));
    }
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) || r.tool_choice.is_some() || r.parallel_tool_calls.is_some() {
        return Err(invalid("tools are not supported"));
    }
    if r.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
        return Err(invalid("`response_format` other than text is not supported"));
    }
    let mut turns = Vec::with_capacity(r.messages.len());
    let mut chars = 0;
    for (i, m) in r.messages.iter().enumerate() {
        if m.beyond_text() {
            return Err(invalid(format!("messages[{i}]: tool calls, audio and refusals are not supported")));
        }
        if !["system", "developer", "user", "assistant"].contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}]: role {:?} is not supported (system, user, assistant)",
                m.role
            )));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(invalid(format!("messages[{i}]: only text parts are supported"))),
                    }
                }
                text
            }
        };
        chars += content.chars().count();
        // OpenAI's `developer` role is the system turn of newer models.
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        turns.push(Message { role, content });
    }
    if turns.iter().all(|t| t.content.trim().is_empty()) {
        return Err(invalid("every message is empty"));
    }
    if chars > settings.max_input_chars {
        return Err(invalid(format!("`messages` hold more than {} characters", settings.max_input_chars)));
    }
    let g = generation(&r.common, Prompt::Chat(turns), r.max_completion_tokens, CHAT_MAX_TOKENS, models)?;
    Ok((g, Stream::of(&r.common, models, Kind::Chat)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// How the answer is written: which route, the model's name, the id and time, and whether it streams.
#[derive(Clone, Debug)]
struct Stream {
    kind: Kind,
    model: String,
    id: String,
    created: u64,
    stream: bool,
    include_usage: bool,
}

impl Stream {
    fn of(c: &Common, models: &Models, kind: Kind) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let (created, nanos) = (now.as_secs(), now.subsec_nanos());
        let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
        Self {
            kind,
            model: c.model.clone().unwrap_or_else(|| models.base.clone()),
            id: format!("{prefix}-{created:x}{nanos:08x}"),
            created,
            stream: c.stream,
            include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>, chunk: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text.unwrap_or("")}, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        }
    }

    fn body(&self, choices: Vec<Value>, usage: Option<Value>, chunk: bool) -> Value {
        let mut v = json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.new_tokens,
        "total_tokens": f.prompt_tokens + f.new_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

/// OpenAI's finish reason: `stop` (an end token or a stop string) or `length` (the budget or the context).
fn finish_reason(f: &Finished) -> &'static str {
    match f.stop.as_str() {
        "max_new_tokens" | "length" => "length",
        _ => "stop",
    }
}

/// `POST /v1/completions` or `/v1/chat/completions`: checks the body, submits, and answers.
pub(crate) async fn respond(
    generator: &Arc<dyn Generator>,
    settings: &Settings,
    metrics: &Arc<Metrics>,
    body: &[u8],
    chat_route: bool,
) -> Response {
    let deadline = tokio::time::Instant::now() + settings.request_timeout;
    let models = generator.models();
    let parsed = if chat_route { chat(body, settings, &models) } else { completion(body, settings, &models) };
    let (g, stream) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let updates = match crate::streaming::submit(generator.as_ref(), g) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    if stream.stream {
        return Sse::new(events(updates, stream, deadline, metrics.clone())).into_response();
    }
    match crate::streaming::wait(updates, deadline, metrics).await {
        Err(e) => e.into_response(),
        Ok(f) => {
            let choice = stream.choice(Some(&f.text), Some(finish_reason(&f)), false);
            Json(stream.body(vec![choice], Some(usage(&f)), false)).into_response()
        }
    }
}

/// The chunks of a streamed answer, as OpenAI sends them: the chat's first chunk opens the assistant's role,
/// one chunk per piece of text, a last chunk with the finish reason (and one with `usage` when asked), then
/// `[DONE]`. An error ends the stream with an `error` object, as OpenAI's streams do.
fn events(
    updates: crate::streaming::Pending,
    s: Stream,
    deadline: tokio::time::Instant,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    let first = (s.kind == Kind::Chat).then(|| {
        let mut choice = s.choice(None, None, true);
        choice["delta"] = json!({"role": "assistant", "content": ""});
        Event::default().data(s.body(vec![choice], None, true).to_string())
    });
    let pieces = crate::streaming::pieces(updates, deadline, metrics);
    let s2 = s.clone();
    let body = futures_util::StreamExt::flat_map(pieces, move |item| {
        let s = &s2;
        let events: Vec<Event> = match item {
            crate::streaming::Piece::Text(t) => {
                vec![Event::default().data(s.body(vec![s.choice(Some(&t), None, true)], None, true).to_string())]
            }
            crate::streaming::Piece::Done(f) => {
                let mut out = vec![Event::default()
                    .data(s.body(vec![s.choice(None, Some(finish_reason(&f)), true)], None, true).to_string())];
                if s.include_usage {
                    out.push(Event::default().data(s.body(Vec::new(), Some(usage(&f)), true).to_string()));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            crate::streaming::Piece::Error { kind, message } => {
                vec![Event::default().data(json!({"error": {"message": message, "type": kind}}).to_string())]
            }
        };
        futures_util::stream::iter(events.into_iter().map(Ok))
    });
    futures_util::StreamExt::chain(futures_util::stream::iter(first.into_iter().map(Ok)), body)
}

/// `GET /v1/models`: the base model (where it can be asked for alone) and each task adapter.
pub(crate) fn models_list(models: &Models) -> Value {
    let entry = |id: &str, parent: Option<&str>| json!({"id": id, "object": "model", "created": 0, "owned_by": "mtl", "parent": parent});
    // With an adapter per task the base name alone picks none, so only the adapters are listed.
    let mut data: Vec<Value> = models.base_serves.then(|| entry(&models.base, None)).into_iter().collect();
    data.extend(models.adapters.iter().map(|a| entry(a, Some(&models.base))));
    json!({"object": "list", "data": data})
}
