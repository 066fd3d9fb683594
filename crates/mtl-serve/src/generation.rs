//! Text generation over HTTP for a decoder model: `POST /v1/generate` answers with the whole text, or, with
//! `"stream": true`, streams each new piece of text as a server-sent event as soon as it is decoded.
//!
//! One generation runs at a time on its own thread; up to `queue_bound` more wait, and a request beyond that
//! is refused with 429 at once. A client that goes away cancels its generation at the next token. Requests
//! go through the same API keys, body limit, request counting and error table as the predict routes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{ApiError, Settings};
use crate::metrics::Metrics;

/// One generation request, as checked by [`check_generate`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Put the prompt in the user's turn of the model's chat template.
    #[serde(default)]
    pub chat: bool,
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
    /// Answer with server-sent events, one per piece of text, then a `done` event.
    #[serde(default)]
    pub stream: bool,
}

fn default_max_new_tokens() -> usize {
    128
}

pub use crate::MAX_NEW_TOKENS;

/// How a generation ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub text: String,
    /// Why it stopped: `stop_token`, `stop_string`, `max_new_tokens`, `length` or `cancelled`.
    pub stop: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

/// A decoder model as the server sees it.
pub trait Generator: Send + Sync + 'static {
    /// Generates for `request`, handing each new piece of text to `on_piece`, which returns false to stop.
    /// An `Err` is a request the model cannot serve (such as a prompt longer than its context), a 422.
    fn generate(
        &self,
        request: &GenerateRequest,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Finished, crate::EngineError>;
}

/// A generation request's body checked against the limits.
pub fn check_generate(body: &[u8], settings: &Settings) -> Result<GenerateRequest, ApiError> {
    let r: GenerateRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::Validation(format!("invalid request body: {e}")))?;
    let invalid = |m: &str| Err(ApiError::Validation(m.to_string()));
    if r.prompt.trim().is_empty() {
        return invalid("`prompt` is empty");
    }
    if r.prompt.chars().count() > settings.max_input_chars {
        return Err(ApiError::Validation(format!("`prompt` is longer than {} characters", settings.max_input_chars)));
    }
    if r.max_new_tokens == 0 || r.max_new_tokens > MAX_NEW_TOKENS {
        return Err(ApiError::Validation(format!("`max_new_tokens` must be in 1..={MAX_NEW_TOKENS}")));
    }
    if !(r.temperature.is_finite() && r.temperature >= 0.0) {
        return invalid("`temperature` must be 0 (greedy) or positive");
    }
    if r.top_k == Some(0) {
        return invalid("`top_k` must be at least 1");
    }
    if r.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return invalid("`top_p` must be in (0, 1]");
    }
    if r.stop.iter().any(String::is_empty) {
        return invalid("`stop` strings must not be empty");
    }
    Ok(r)
}

/// What the model thread sends back for one request.
enum Update {
    Piece(String),
    Done(Result<Finished, crate::EngineError>),
}

struct Job {
    request: GenerateRequest,
    updates: mpsc::UnboundedSender<Update>,
}

struct GenState {
    jobs: std::sync::mpsc::SyncSender<Job>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

/// The router over `generator`, with its model thread started: `POST /v1/generate`, `GET /health`,
/// `GET /metrics`, `GET /openapi.json`.
pub fn generation_router<G: Generator>(generator: G, settings: Settings) -> Router {
    let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(settings.batch.queue_bound);
    std::thread::Builder::new()
        .name("mtl-generate".into())
        .spawn(move || {
            for job in receiver {
                let updates = job.updates;
                let result = generator
                    .generate(&job.request, &mut |piece| updates.send(Update::Piece(piece.to_string())).is_ok());
                let _ = updates.send(Update::Done(result));
            }
        })
        .expect("the OS can start a thread");
    let limit = settings.body_limit;
    let state = Arc::new(GenState { jobs, settings, metrics: Arc::new(Metrics::default()) });
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/generate", post(generate))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn authenticate(State(state): State<Arc<GenState>>, request: Request, next: Next) -> Response {
    if !crate::api::key_accepted(&state.settings, &request) {
        state.metrics.request("/v1/generate", 401);
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

async fn openapi(State(state): State<Arc<GenState>>) -> Json<Value> {
    Json(crate::openapi::generation_document(state.settings.api_keys.is_some()))
}

async fn metrics_text(State(state): State<Arc<GenState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(0)).into_response()
}

fn finished_json(f: &Finished) -> Value {
    json!({"text": f.text, "stop_reason": f.stop, "prompt_tokens": f.prompt_tokens, "new_tokens": f.new_tokens})
}

async fn generate(State(state): State<Arc<GenState>>, body: Bytes) -> Response {
    let response = match start(&state, &body) {
        Err(e) => e.into_response(),
        Ok((request, updates)) if request.stream => {
            let stream = async_stream(updates);
            Sse::new(stream).into_response()
        }
        Ok((_, mut updates)) => {
            let timeout = state.settings.request_timeout;
            let wait = async {
                while let Some(update) = updates.recv().await {
                    if let Update::Done(result) = update {
                        return Some(result);
                    }
                }
                None
            };
            match tokio::time::timeout(timeout, wait).await {
                Err(_) => ApiError::Timeout.into_response(),
                Ok(None) => ApiError::Internal("the model thread stopped".into()).into_response(),
                Ok(Some(Err(e))) => ApiError::from(e).into_response(),
                Ok(Some(Ok(f))) => Json(finished_json(&f)).into_response(),
            }
        }
    };
    state.metrics.request("/v1/generate", response.status().as_u16());
    response
}

/// Checks the request and queues it.
fn start(state: &GenState, body: &[u8]) -> Result<(GenerateRequest, mpsc::UnboundedReceiver<Update>), ApiError> {
    let request = check_generate(body, &state.settings)?;
    let (sender, receiver) = mpsc::unbounded_channel();
    match state.jobs.try_send(Job { request: request.clone(), updates: sender }) {
        Ok(()) => Ok((request, receiver)),
        Err(std::sync::mpsc::TrySendError::Full(_)) => Err(ApiError::QueueFull),
        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
            Err(ApiError::Internal("the model thread stopped".into()))
        }
    }
}

/// The updates of one generation as server-sent events: `data: {"text": PIECE}` per piece, then an event
/// `done` with the whole answer (or `error`). Dropping the stream (the client left) cancels the generation.
fn async_stream(
    updates: mpsc::UnboundedReceiver<Update>,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(Some(updates), |state| async move {
        let mut updates = state?;
        let event = match updates.recv().await {
            Some(Update::Piece(p)) => Event::default().data(json!({"text": p}).to_string()),
            Some(Update::Done(Ok(f))) => {
                return Some((Ok(Event::default().event("done").data(finished_json(&f).to_string())), None));
            }
            Some(Update::Done(Err(e))) => {
                let kind = match e {
                    crate::EngineError::Invalid(_) => "validation",
                    crate::EngineError::Model(_) => "internal",
                };
                let body = json!({"error": {"kind": kind, "message": e.to_string()}});
                return Some((Ok(Event::default().event("error").data(body.to_string())), None));
            }
            None => {
                let body = json!({"error": {"kind": "internal", "message": "the model thread stopped"}});
                return Some((Ok(Event::default().event("error").data(body.to_string())), None));
            }
        };
        Some((Ok(event), Some(updates)))
    })
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// Answers with the prompt's words, one piece per word, at most `max_new_tokens` of them.
    struct Echo;

    impl Generator for Echo {
        fn generate(
            &self,
            r: &GenerateRequest,
            on_piece: &mut dyn FnMut(&str) -> bool,
        ) -> Result<Finished, crate::EngineError> {
            if r.prompt.starts_with("too long") {
                return Err(crate::EngineError::Invalid("the prompt is longer than the model's context".into()));
            }
            let mut text = String::new();
            let mut n = 0;
            for w in r.prompt.split_whitespace().take(r.max_new_tokens) {
                let piece = format!("{w} ");
                text.push_str(&piece);
                n += 1;
                if !on_piece(&piece) {
                    return Ok(Finished { text, stop: "cancelled".into(), prompt_tokens: 0, new_tokens: n });
                }
            }
            Ok(Finished { text, stop: "max_new_tokens".into(), prompt_tokens: 0, new_tokens: n })
        }
    }

    async fn post(app: &Router, body: Value, key: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::post("/v1/generate").header("content-type", "application/json");
        if let Some(k) = key {
            request = request.header("authorization", format!("Bearer {k}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(axum::body::Body::from(body.to_string())).expect("request"))
            .await
            .expect("answer");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn answers_whole_or_streamed_and_refuses_bad_requests() {
        let app = generation_router(Echo, Settings::default());
        let (status, body) = post(&app, json!({"prompt": "one two three", "max_new_tokens": 2}), None).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!((v["text"].as_str(), v["new_tokens"].as_u64()), (Some("one two "), Some(2)));

        let (status, body) = post(&app, json!({"prompt": "one two three", "stream": true}), None).await;
        assert_eq!(status, StatusCode::OK);
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data[..3], [r#"{"text":"one "}"#, r#"{"text":"two "}"#, r#"{"text":"three "}"#]);
        assert!(body.contains("event: done") && data[3].contains("\"stop_reason\":\"max_new_tokens\""), "{body}");

        for bad in [
            json!({"prompt": " "}),
            json!({"prompt": "x", "max_new_tokens": 0}),
            json!({"prompt": "x", "top_p": 1.5}),
            json!({"prompt": "x", "temperature": -1.0}),
            json!({"prompt": "x", "bogus": 1}),
            json!({"prompt": "x", "stop": [""]}),
        ] {
            let (status, body) = post(&app, bad.clone(), None).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
            assert!(body.contains("\"kind\":\"validation\""), "{body}");
        }
        let (status, _) = post(&app, json!({"prompt": "too long prompt"}), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (_, body) = post(&app, json!({"prompt": "too long prompt", "stream": true}), None).await;
        assert!(body.contains("event: error"), "{body}");
    }

    #[tokio::test]
    async fn the_openapi_document_describes_the_generate_route() {
        let app = generation_router(Echo, Settings::default());
        let request = Request::get("/openapi.json").body(axum::body::Body::empty()).expect("request");
        let response = app.oneshot(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let doc: Value =
            serde_json::from_slice(&response.into_body().collect().await.expect("body").to_bytes()).expect("json");
        assert_eq!(doc["openapi"], "3.1.0");
        let fields = doc["components"]["schemas"]["GenerateRequest"]["properties"].as_object().expect("properties");
        // Every field the route accepts is described, and no other (the route denies unknown fields).
        let described: Vec<&str> = fields.keys().map(String::as_str).collect();
        let accepted = GenerateRequest {
            prompt: "p".into(),
            chat: false,
            max_new_tokens: 1,
            temperature: 0.0,
            top_k: Some(1),
            top_p: Some(1.0),
            seed: 0,
            stop: vec!["s".into()],
            stream: false,
        };
        let sent = serde_json::to_value(&accepted).expect("json");
        let mut sent: Vec<&str> = sent.as_object().expect("object").keys().map(String::as_str).collect();
        sent.sort_unstable();
        let mut described = described;
        described.sort_unstable();
        assert_eq!(described, sent);
        assert!(doc["paths"]["/v1/generate"]["post"]["responses"]["429"].is_object());
        assert!(doc.get("security").is_none(), "no keys, no security");
    }

    #[tokio::test]
    async fn keys_are_checked() {
        let settings = Settings { api_keys: Some(["k1".to_string()].into()), ..Settings::default() };
        let app = generation_router(Echo, settings);
        assert_eq!(post(&app, json!({"prompt": "a"}), None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&app, json!({"prompt": "a"}), Some("k2")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&app, json!({"prompt": "a"}), Some("k1")).await.0, StatusCode::OK);
    }
}
