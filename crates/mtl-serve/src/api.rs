//! The HTTP API: endpoints, settings and the error table.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /health` | `{"status": "ok"}` |
//! | `GET /v1/tasks` | `{"tasks": [{"name", "kind", "labels"}]}` |
//! | `POST /v1/predict` `{"inputs": [...], "tasks": [...]}` | `{"predictions": [{TASK: ...}]}`, one per input; tasks default to all |
//! | `POST /v1/tasks/{task}/predict` `{"inputs": [...]}` | the same for one task |
//! | `POST /v1/explain` `{"input": ..., "tasks": [...], "steps": 50, "baseline": "pad", "all_words": false}` | the input's predictions and each task's attributions per token and word, as `mtl explain` prints them; only with `explain` on, one at a time (429 while one runs) |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//! | `GET /openapi.json` | the OpenAPI 3.1 description ([`crate::openapi`]) |
//!
//! An input is a string, `{"text", "text_pair"}`, `{"words": [...]}` or `{"question", "context"}`.
//!
//! | error | status |
//! |---|---|
//! | invalid body or input | 422 |
//! | unknown task | 404 |
//! | body larger than the limit | 413 |
//! | a POST body that is not `application/json` | 415 |
//! | queue full (answered before the body is read) | 429, with `Retry-After` |
//! | missing or wrong API key (when keys are set) | 401 |
//! | a `Host` outside `allowed_hosts` (when set) | 403 |
//! | no answer within the request timeout | 503 |
//! | the server's shutdown deadline passed first | 503 (`shutting_down`) |
//!
//! Error bodies are `{"error": {"kind": ..., "message": ...}}`.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::batcher::{Batcher, Job, SubmitError};
use crate::metrics::Metrics;
use crate::{Engine, EngineError, RequestInput};

/// Everything a server is configured with, besides its model.
#[derive(Clone, Debug)]
pub struct Settings {
    pub batch: crate::batcher::BatchSettings,
    /// Characters of one input at most (longer inputs are refused, not truncated silently).
    pub max_input_chars: usize,
    /// Inputs of one request at most.
    pub max_inputs: usize,
    /// Bytes of a request body at most.
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// Accepted API keys (`Authorization: Bearer KEY`); none: no authentication.
    pub api_keys: Option<HashSet<String>>,
    /// How a decoder's engine batches generation.
    pub generation: GenerationSettings,
    /// Host names answered (lower case); empty: any.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call from web pages (CORS); empty: none; `*`: any.
    pub cors_origins: Vec<String>,
    /// How the served answers are compared with the model's reference ([`crate::drift`]).
    pub drift: crate::drift::DriftSettings,
    /// Where a sampled share of the prediction requests is logged ([`crate::request_log`]); none: nowhere.
    pub request_log: Option<Arc<crate::request_log::RequestLog>>,
    /// Answer `POST /v1/explain`.
    pub explain: bool,
}

/// How a decoder's engine batches generation (`ServeConfig`'s decoder keys).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationSettings {
    /// Sequences decoded together in one step at most.
    pub max_sequences: usize,
    /// Prompt tokens run in one step at most.
    pub prefill_chunk: usize,
    /// Bytes of the key/value cache.
    pub kv_cache_bytes: usize,
    /// Positions per key/value block.
    pub kv_block: usize,
    /// Keep finished sequences' blocks for later requests that start with the same tokens.
    pub prefix_cache: bool,
    /// Requests waiting to join the running batch at most (more get 429).
    pub queue_bound: usize,
}

impl Settings {
    /// The settings of a serving config (`mtl_config::ServeConfig`, the one source of the defaults), with the
    /// API keys read from its key file.
    pub fn from_config(config: &mtl_config::ServeConfig, api_keys: Option<HashSet<String>>) -> Self {
        Self {
            batch: crate::batcher::BatchSettings {
                max_batch_tokens: config.max_batch_tokens,
                max_wait: Duration::from_millis(config.max_wait_ms),
                queue_bound: config.queue_bound,
            },
            max_input_chars: config.max_input_chars,
            max_inputs: config.max_inputs,
            body_limit: config.body_limit,
            request_timeout: Duration::from_secs(config.timeout_s),
            api_keys,
            // As `Host` headers are compared: lower case, an IPv6 address without its brackets.
            allowed_hosts: config
                .allowed_hosts
                .iter()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
                .collect(),
            cors_origins: config.cors_origins.clone(),
            drift: crate::drift::DriftSettings { window: config.drift_window, threshold: config.drift_threshold },
            request_log: None,
            explain: config.explain,
            generation: GenerationSettings {
                max_sequences: config.max_sequences,
                prefill_chunk: config.prefill_chunk,
                kv_cache_bytes: config.kv_cache_mb << 20,
                kv_block: config.kv_block,
                prefix_cache: config.prefix_cache,
                queue_bound: config.queue_bound,
            },
        }
    }
}

impl Default for Settings {
    /// `ServeConfig`'s defaults, without API keys.
    fn default() -> Self {
        Self::from_config(&mtl_config::ServeConfig::default(), None)
    }
}

/// An API error: its status and `kind`, and a message.
#[derive(Debug, PartialEq)]
pub enum ApiError {
    Validation(String),
    UnknownTask(String),
    /// An OpenAI-compatible request's `model` that is neither the base model nor a task adapter.
    UnknownModel(String),
    QueueFull,
    /// A body over the limit (bytes).
    BodyTooLarge(usize),
    /// A POST body that is not declared JSON.
    UnsupportedMediaType,
    Unauthorized,
    /// A `Host` the server does not answer for.
    ForbiddenHost(String),
    Timeout,
    /// The server's shutdown deadline passed before the answer.
    ShuttingDown,
    Internal(String),
}

impl ApiError {
    /// The status the error table gives it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnknownTask(_) | Self::UnknownModel(_) => StatusCode::NOT_FOUND,
            Self::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ForbiddenHost(_) => StatusCode::FORBIDDEN,
            Self::Timeout | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Its `kind` in the error table.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation",
            Self::UnknownTask(_) => "unknown_task",
            Self::UnknownModel(_) => "unknown_model",
            Self::QueueFull => "queue_full",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthorized => "unauthorized",
            Self::ForbiddenHost(_) => "forbidden_host",
            Self::Timeout => "timeout",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            Self::Validation(m) => (StatusCode::UNPROCESSABLE_ENTITY, "validation", m),
            Self::UnknownTask(t) => {
                (StatusCode::NOT_FOUND, "unknown_task", format!("no task `{t}`; GET /v1/tasks lists them"))
            }
            Self::UnknownModel(m) => {
                (StatusCode::NOT_FOUND, "unknown_model", format!("no model `{m}`; GET /v1/models lists them"))
            }
            Self::QueueFull => {
                (StatusCode::TOO_MANY_REQUESTS, "queue_full", "the server is at capacity; retry later".into())
            }
            Self::BodyTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be JSON, sent with Content-Type: application/json".into(),
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is needed: Authorization: Bearer KEY".into(),
            ),
            Self::ForbiddenHost(h) => (
                StatusCode::FORBIDDEN,
                "forbidden_host",
                format!("this server does not answer for host {h:?} (its allowed_hosts)"),
            ),
            Self::Timeout => {
                (StatusCode::SERVICE_UNAVAILABLE, "timeout", "no answer within the request timeout".into())
            }
            Self::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down; retry".into())
            }
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        };
        let mut response = (status, Json(json!({"error": {"kind": kind, "message": message}}))).into_response();
        response.extensions_mut().insert(ErrorKind(kind));
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // OpenAI's clients retry a 503 by default: a request that ran out of time would run again, twice.
        if kind == "timeout" {
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => Self::Validation(m),
            EngineError::Model(m) => Self::Internal(m),
        }
    }
}

/// The error table's kind of an error response, for the metrics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorKind(pub(crate) &'static str);

struct AppState<E: Engine> {
    engine: Arc<E>,
    batcher: Batcher<E::Item>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The answers' distributions and their drift from the engine's reference.
    monitor: crate::drift::Monitor,
    /// One explanation at a time: they are costly and run beside the model thread.
    explaining: Arc<tokio::sync::Semaphore>,
}

/// The router over `engine`, with its model thread started.
pub fn router<E: Engine>(engine: E, settings: Settings) -> Router {
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::default());
    let batcher = Batcher::start(engine.clone(), settings.batch, metrics.clone());
    let limit = settings.body_limit;
    let monitor = crate::drift::Monitor::new(engine.tasks(), engine.drift_reference(), settings.drift);
    let explaining = Arc::new(tokio::sync::Semaphore::new(1));
    let state = Arc::new(AppState { engine, batcher, settings: settings.clone(), metrics, monitor, explaining });
    let mut router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text::<E>))
        .route("/openapi.json", get(openapi::<E>))
        .route("/v1/tasks", get(tasks::<E>))
        .route("/v1/predict", post(predict::<E>))
        .route("/v1/tasks/{task}/predict", post(predict_task::<E>));
    if settings.explain {
        router = router.route("/v1/explain", post(explain::<E>));
    }
    let router = router
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate::<E>))
        .route_layer(middleware::from_fn_with_state(state.clone(), count::<E>))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    web_layers(router, &settings)
}

/// The layers every router ends with: CORS for `cors_origins`, and the `allowed_hosts` check (outermost, so
/// that it applies to preflights too).
pub(crate) fn web_layers(router: Router, settings: &Settings) -> Router {
    let mut router = router;
    if !settings.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origins = match settings.cors_origins.iter().any(|o| o == "*") {
            true => AllowOrigin::any(),
            false => AllowOrigin::list(settings.cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok())),
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .max_age(Duration::from_secs(600)),
        );
    }
    if !settings.allowed_hosts.is_empty() {
        let hosts: Arc<HashSet<String>> = Arc::new(settings.allowed_hosts.iter().cloned().collect());
        router = router.layer(middleware::from_fn(move |request: Request, next: Next| {
            let hosts = hosts.clone();
            async move {
                let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
                let name = host_name(host).to_ascii_lowercase();
                if !hosts.contains(&name) {
                    return ApiError::ForbiddenHost(host.to_string()).into_response();
                }
                next.run(request).await
            }
        }));
    }
    router
}

/// A `Host` header's name, without its port (`[::1]:8080` → `::1`).
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    }
}

/// Counts every answered request by endpoint and status, and every error by kind.
async fn count<E: Engine>(State(state): State<Arc<AppState<E>>>, request: Request, next: Next) -> Response {
    let endpoint =
        request.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.request(&endpoint, status.as_u16());
    match response.extensions().get::<ErrorKind>() {
        Some(ErrorKind(kind)) => state.metrics.error(kind),
        None if status == StatusCode::PAYLOAD_TOO_LARGE => state.metrics.error("body_too_large"),
        None if !status.is_success() => state.metrics.error("other"),
        None => {}
    }
    response
}

async fn openapi<E: Engine>(State(state): State<Arc<AppState<E>>>) -> Json<Value> {
    let mut doc = crate::openapi::document(state.engine.tasks(), state.settings.api_keys.is_some());
    if state.settings.explain {
        crate::openapi::add_explain(&mut doc);
    }
    Json(doc)
}

async fn metrics_text<E: Engine>(State(state): State<Arc<AppState<E>>>) -> Response {
    let mut text = state.metrics.render(state.batcher.queue_depth());
    text.push_str(&state.monitor.render());
    if let Some(log) = &state.settings.request_log {
        text.push_str(&format!(
            "# HELP mtl_request_log_dropped_total Request log lines dropped because the writer fell behind.\n# TYPE mtl_request_log_dropped_total counter\nmtl_request_log_dropped_total {}\n",
            log.dropped()
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn authenticate<E: Engine>(State(state): State<Arc<AppState<E>>>, request: Request, next: Next) -> Response {
    if !key_accepted(&state.settings, &request) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// Whether a request may pass: no keys are configured, it asks for `/health`, or it carries a known key
/// (`Authorization: Bearer KEY`).
/// The scheme is matched in any case (RFC 9110), and the key compared with every accepted one in constant
/// time, so the time of an answer says nothing about how much of a key was right.
pub(crate) fn key_accepted(settings: &Settings, request: &Request) -> bool {
    let Some(keys) = &settings.api_keys else { return true };
    if request.uri().path() == "/health" {
        return true;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, key) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    let Some(given) = given else { return false };
    let found = keys.iter().fold(subtle::Choice::from(0), |found, k| found | k.as_bytes().ct_eq(given.as_bytes()));
    bool::from(found)
}

/// The API keys of a key file's text: one per line; blank lines and lines starting with `#` are skipped, a
/// byte order mark is ignored, and a key must be visible ASCII without spaces (what an `Authorization` header
/// can carry). The keys come in file order, each once. Errors name the line.
pub fn parse_api_keys(text: &str) -> Result<Vec<String>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut keys: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("line {}: a key must be visible ASCII characters without spaces", n + 1));
        }
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    if keys.is_empty() {
        return Err("no API key in the file (one per line; `#` starts a comment)".into());
    }
    Ok(keys)
}

async fn tasks<E: Engine>(State(state): State<Arc<AppState<E>>>) -> Json<Value> {
    Json(json!({"tasks": state.engine.tasks()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    inputs: Vec<RequestInput>,
    #[serde(default)]
    tasks: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    inputs: Vec<RequestInput>,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde's message for an input of no known shape names our enum; say what the shapes are instead.
        let message = e.to_string();
        let message = match message.strip_prefix("data did not match any variant of untagged enum RequestInput") {
            Some(at) => format!(
                "an input is a string, {{\"text\", \"text_pair\"}}, {{\"words\": [...]}}, {{\"question\", \"context\"}} or {{\"text\"}}{at}"
            ),
            None => message,
        };
        ApiError::Validation(format!("invalid request body: {message}"))
    })
}

/// A predict request's body checked against the model's tasks and the limits: its inputs and the tasks to
/// run on them. `path_task` is the task of `/v1/tasks/{task}/predict`; `None` for `/v1/predict`. Everything
/// a client sends passes through here before any model work, so it is what the fuzz target drives.
pub fn check_request(
    body: &[u8],
    path_task: Option<&str>,
    tasks: &[crate::TaskDescription],
    settings: &Settings,
) -> Result<(Vec<RequestInput>, Vec<String>), ApiError> {
    let known = |t: &str| tasks.iter().any(|d| d.name == t);
    let (inputs, wanted) = match path_task {
        Some(task) => {
            if !known(task) {
                return Err(ApiError::UnknownTask(task.to_string()));
            }
            let body: TaskBody = parse(body)?;
            (body.inputs, vec![task.to_string()])
        }
        None => {
            let body: PredictBody = parse(body)?;
            (body.inputs, asked_tasks(body.tasks, tasks)?)
        }
    };
    check_inputs(inputs, wanted, tasks, settings)
}

/// The tasks a request names (every task when it names none); an empty list is refused.
fn asked_tasks(asked: Option<Vec<String>>, tasks: &[crate::TaskDescription]) -> Result<Vec<String>, ApiError> {
    match asked {
        Some(t) if t.is_empty() => Err(ApiError::Validation("`tasks` is empty; leave it out for every task".into())),
        Some(t) => Ok(t),
        None => Ok(tasks.iter().map(|t| t.name.clone()).collect()),
    }
}

/// Parsed inputs and tasks checked against the model's tasks and the limits: known tasks, each once, and
/// inputs within the count and size limits.
fn check_inputs(
    inputs: Vec<RequestInput>,
    wanted: Vec<String>,
    tasks: &[crate::TaskDescription],
    settings: &Settings,
) -> Result<(Vec<RequestInput>, Vec<String>), ApiError> {
    let known = |t: &str| tasks.iter().any(|d| d.name == t);
    if let Some(t) = wanted.iter().find(|t| !known(t)) {
        return Err(ApiError::UnknownTask(t.clone()));
    }
    // A task named twice is answered once (and observed once in the metrics).
    let mut seen = HashSet::new();
    let wanted: Vec<String> = wanted.into_iter().filter(|t| seen.insert(t.clone())).collect();
    if inputs.is_empty() {
        return Err(ApiError::Validation("`inputs` is empty".into()));
    }
    if inputs.len() > settings.max_inputs {
        return Err(ApiError::Validation(format!(
            "{} inputs; at most {} per request",
            inputs.len(),
            settings.max_inputs
        )));
    }
    let max = settings.max_input_chars;
    for (i, input) in inputs.iter().enumerate() {
        let chars = match input {
            RequestInput::Text(t) | RequestInput::Single { text: t } => t.chars().count(),
            RequestInput::Pair { text, text_pair } => text.chars().count() + text_pair.chars().count(),
            RequestInput::Words { words } => words.iter().map(|w| w.chars().count() + 1).sum(),
            RequestInput::Question { question, context } => question.chars().count() + context.chars().count(),
        };
        if chars > max {
            return Err(ApiError::Validation(format!("input {i}: {chars} characters; at most {max}")));
        }
    }
    Ok((inputs, wanted))
}

/// A checked `POST /v1/explain` request.
#[derive(Clone, Debug, PartialEq)]
pub struct ExplainRequest {
    pub input: RequestInput,
    /// The tasks to explain (every task when the request names none).
    pub tasks: Vec<String>,
    /// Points on the integrated-gradients path, 1 to [`crate::MAX_EXPLAIN_STEPS`].
    pub steps: usize,
    /// `pad`, `mask` or `zero`.
    pub baseline: String,
    /// Token tasks: every word's tag, not only the words tagged other than `O`.
    pub all_words: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainBody {
    input: RequestInput,
    #[serde(default)]
    tasks: Option<Vec<String>>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    baseline: Option<String>,
    #[serde(default)]
    all_words: bool,
}

/// An explain request's body checked against the model's tasks and the limits, as [`check_request`] checks a
/// predict request's.
pub fn check_explain(
    body: &[u8],
    tasks: &[crate::TaskDescription],
    settings: &Settings,
) -> Result<ExplainRequest, ApiError> {
    let body: ExplainBody = parse(body)?;
    let steps = body.steps.unwrap_or(50);
    if !(1..=crate::MAX_EXPLAIN_STEPS).contains(&steps) {
        return Err(ApiError::Validation(format!("`steps` must be 1 to {}, got {steps}", crate::MAX_EXPLAIN_STEPS)));
    }
    let baseline = body.baseline.unwrap_or_else(|| "pad".into());
    if !["pad", "mask", "zero"].contains(&baseline.as_str()) {
        return Err(ApiError::Validation(format!("`baseline` must be pad, mask or zero, got {baseline:?}")));
    }
    // The predict checks: known tasks, each once, the input's size.
    let wanted = asked_tasks(body.tasks, tasks)?;
    let (mut inputs, tasks) = check_inputs(vec![body.input], wanted, tasks, settings)?;
    Ok(ExplainRequest { input: inputs.remove(0), tasks, steps, baseline, all_words: body.all_words })
}

async fn explain<E: Engine>(State(state): State<Arc<AppState<E>>>, request: Request) -> Result<Json<Value>, ApiError> {
    let Ok(permit) = state.explaining.clone().try_acquire_owned() else { return Err(ApiError::QueueFull) };
    let body = json_body(request, state.settings.body_limit, false).await?;
    let checked = check_explain(&body, state.engine.tasks(), &state.settings)?;
    let engine = state.engine.clone();
    // The permit goes with the work: a request that times out still holds it until its explanation ends.
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        engine.explain(&checked)
    });
    match tokio::time::timeout(state.settings.request_timeout, work).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(e)) => Err(ApiError::Internal(format!("the explanation failed: {e}"))),
        Ok(Ok(answer)) => Ok(Json(answer?)),
    }
}

/// A POST body, read only once the cheap checks pass. While the queue is `full`, the request is refused before
/// a byte of its body is read, parsed or tokenised, so a flood of refused requests costs the server little. The
/// body must be declared JSON (415 otherwise: a web page cannot send that to another site without asking the
/// server first) and hold at most `limit` bytes (413, before reading when `Content-Length` says so).
pub(crate) async fn json_body(request: Request, limit: usize, full: bool) -> Result<Bytes, ApiError> {
    if full {
        return Err(ApiError::QueueFull);
    }
    let headers = request.headers();
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(request.into_body(), limit)).await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::BodyTooLarge(limit)),
        Err(e) => Err(ApiError::Validation(format!("cannot read the request body: {e}"))),
    }
}

impl<E: Engine> AppState<E> {
    async fn body(&self, request: Request) -> Result<Bytes, ApiError> {
        let full = self.batcher.queue_depth() >= self.settings.batch.queue_bound;
        json_body(request, self.settings.body_limit, full).await
    }
}

async fn predict<E: Engine>(State(state): State<Arc<AppState<E>>>, request: Request) -> Result<Json<Value>, ApiError> {
    let body = state.body(request).await?;
    let (inputs, tasks) = check_request(&body, None, state.engine.tasks(), &state.settings)?;
    run(&state, "/v1/predict", inputs, tasks).await
}

async fn predict_task<E: Engine>(
    State(state): State<Arc<AppState<E>>>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let body = state.body(request).await?;
    let (inputs, tasks) = check_request(&body, Some(&task), state.engine.tasks(), &state.settings)?;
    run(&state, "/v1/tasks/{task}/predict", inputs, tasks).await
}

/// Tokenises checked inputs, queues them for the model thread and waits for the answer; the answer is counted
/// by the drift monitor and, when sampled, logged.
async fn run<E: Engine>(
    state: &Arc<AppState<E>>,
    endpoint: &str,
    inputs: Vec<RequestInput>,
    tasks: Vec<String>,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let logged = match &state.settings.request_log {
        Some(log) if log.sampled() => Some((log.clone(), serde_json::to_value(&inputs).unwrap_or_default())),
        _ => None,
    };
    let answer = answer(state, inputs, &tasks).await;
    let seconds = started.elapsed().as_secs_f64();
    if let Ok(predictions) = &answer {
        state.metrics.latency(&tasks, seconds);
        state.monitor.observe(predictions);
    }
    if let Some((log, inputs)) = logged {
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut record =
            json!({"time": time, "endpoint": endpoint, "tasks": tasks, "inputs": inputs, "seconds": seconds});
        match &answer {
            Ok(predictions) => {
                record["status"] = json!(200);
                record["predictions"] = json!(predictions);
            }
            Err(e) => {
                record["status"] = json!(e.status().as_u16());
                record["error"] = json!(e.kind());
            }
        }
        log.write(record);
    }
    answer.map(|predictions| Json(json!({"predictions": predictions})))
}

/// The model's answers to checked inputs: tokenised on the blocking pool, queued for the model thread.
async fn answer<E: Engine>(
    state: &Arc<AppState<E>>,
    inputs: Vec<RequestInput>,
    tasks: &[String],
) -> Result<Vec<std::collections::BTreeMap<String, Value>>, ApiError> {
    // Tokenisation on the blocking pool, off the async workers.
    let engine = state.engine.clone();
    let items = tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                engine.prepare(input).map_err(|e| match e {
                    EngineError::Invalid(m) => ApiError::Validation(format!("input {i}: {m}")),
                    EngineError::Model(m) => ApiError::Internal(format!("input {i}: {m}")),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenisation failed: {e}")))??;
    let (reply, answer) = oneshot::channel();
    let job = Job { items, tasks: tasks.iter().cloned().collect::<BTreeSet<_>>(), reply };
    state.batcher.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::QueueFull,
        SubmitError::Stopped => ApiError::Internal("the model thread has stopped".into()),
    })?;
    match tokio::time::timeout(state.settings.request_timeout, answer).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(_)) => Err(ApiError::Internal("the model thread dropped the request".into())),
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Ok(Ok(predictions))) => Ok(predictions),
    }
}
