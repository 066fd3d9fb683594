//! Generation over HTTP for a decoder model: `POST /v1/generate` answers with the whole text, or, with
//! `"stream": true`, streams each new piece of text as a server-sent event as soon as it is decoded; the
//! OpenAI-compatible routes of [`crate::openai`]; `/health`, `/metrics`, `/openapi.json`; and for a run with
//! label tasks ([`LabelTasks`]), the predict routes of an encoder run in the same shapes (`/v1/tasks`,
//! `/v1/predict`, `/v1/tasks/{task}/predict`), each (input, task) one generation among all the others.
//!
//! A request the generator cannot take now is refused at once (429), one it can never take with 422. Every
//! request, streamed or not, has the server's deadline; a request whose client left, or whose deadline passed,
//! is cancelled, queued or running. Requests go through the same API keys, body limit, request counting and
//! error table as the predict routes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::{ApiError, Settings};
use crate::generation::{
    Finished, GenerateRequest, Generation, Generator, LabelTasks, MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS,
};
use crate::metrics::Metrics;
use crate::streaming::{pieces, submit, wait, Piece};

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
    if r.stop.len() > MAX_STOP_STRINGS || r.stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::Validation(format!(
            "`stop` takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"
        )));
    }
    Ok(r)
}

struct GenState {
    generator: Arc<dyn Generator>,
    tasks: Option<Arc<dyn LabelTasks>>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

/// The router over `generator`: `POST /v1/generate`, the OpenAI-compatible routes, `GET /health`,
/// `GET /metrics`, `GET /openapi.json`.
pub fn generation_router<G: Generator>(generator: G, settings: Settings) -> Router {
    router(Arc::new(generator), None, settings)
}

/// [`generation_router`], with the predict routes answering `tasks` through `generator`.
pub fn label_task_router<G: Generator, T: LabelTasks>(generator: G, tasks: T, settings: Settings) -> Router {
    router(Arc::new(generator), Some(Arc::new(tasks)), settings)
}

fn router(generator: Arc<dyn Generator>, tasks: Option<Arc<dyn LabelTasks>>, settings: Settings) -> Router {
    let limit = settings.body_limit;
    let predicts = tasks.is_some();
    let state =
        Arc::new(GenState { generator, tasks, settings: settings.clone(), metrics: Arc::new(Metrics::default()) });
    let mut router = Router::new();
    if predicts {
        router = router
            .route("/v1/tasks", get(label_tasks))
            .route("/v1/predict", post(predict))
            .route("/v1/tasks/{task}/predict", post(predict_task));
    }
    let router = router
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/generate", post(generate))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    crate::api::web_layers(router, &settings)
}

async fn authenticate(State(state): State<Arc<GenState>>, request: Request, next: Next) -> Response {
    // The route's pattern, not the path sent: the metrics' label values stay few.
    let endpoint =
        request.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    if !crate::api::key_accepted(&state.settings, &request) {
        state.metrics.request(&endpoint, 401);
        state.metrics.error("unauthorized");
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

impl GenState {
    /// A request's body, refused before it is read while the generator's queue is full
    /// ([`crate::api::json_body`]).
    async fn body(&self, request: Request) -> Result<Bytes, ApiError> {
        let full = self.generator.status().queued >= self.settings.generation.queue_bound;
        crate::api::json_body(request, self.settings.body_limit, full).await
    }
}

/// `ok` while the generator serves; 503 with the reason once it cannot.
async fn health(State(state): State<Arc<GenState>>) -> Response {
    match state.generator.status().failure {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unhealthy", "reason": reason}))).into_response()
        }
    }
}

async fn openapi(State(state): State<Arc<GenState>>) -> Json<Value> {
    let tasks = state.tasks.as_ref().map_or(&[][..], |t| t.tasks());
    Json(crate::openapi::generation_document(tasks, state.settings.api_keys.is_some()))
}

async fn metrics_text(State(state): State<Arc<GenState>>) -> Response {
    let status = state.generator.status();
    let mut text = state.metrics.render(status.queued);
    text.push_str(&crate::metrics::generator_gauges(&status));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn finished_json(f: &Finished) -> Value {
    json!({
        "text": f.text,
        "stop_reason": f.stop,
        "prompt_tokens": f.prompt_tokens,
        "cached_tokens": f.cached_tokens,
        "new_tokens": f.new_tokens,
    })
}

async fn generate(State(state): State<Arc<GenState>>, request: Request) -> Response {
    let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
    let response = match state
        .body(request)
        .await
        .and_then(|body| check_generate(&body, &state.settings))
        .and_then(|request| Ok((submit(state.generator.as_ref(), Generation::from(&request))?, request.stream)))
    {
        Err(e) => e.into_response(),
        Ok((updates, true)) => Sse::new(event_stream(updates, deadline, state.metrics.clone())).into_response(),
        Ok((updates, false)) => match wait(updates, deadline, &state.metrics).await {
            Err(e) => e.into_response(),
            Ok(f) => Json(finished_json(&f)).into_response(),
        },
    };
    count(&state.metrics, "/v1/generate", &response);
    response
}

async fn completions(State(state): State<Arc<GenState>>, request: Request) -> Response {
    let response = match state.body(request).await {
        Ok(body) => crate::openai::respond(&state.generator, &state.settings, &state.metrics, &body, false).await,
        Err(e) => e.into_response(),
    };
    count(&state.metrics, "/v1/completions", &response);
    response
}

async fn chat_completions(State(state): State<Arc<GenState>>, request: Request) -> Response {
    let response = match state.body(request).await {
        Ok(body) => crate::openai::respond(&state.generator, &state.settings, &state.metrics, &body, true).await,
        Err(e) => e.into_response(),
    };
    count(&state.metrics, "/v1/chat/completions", &response);
    response
}

async fn models(State(state): State<Arc<GenState>>) -> Json<Value> {
    Json(crate::openai::models_list(&state.generator.models()))
}

/// The label tasks; the route exists only where there are some.
fn tasks_of(state: &GenState) -> Result<Arc<dyn LabelTasks>, ApiError> {
    state.tasks.clone().ok_or_else(|| ApiError::Internal("the model has no label tasks".into()))
}

async fn label_tasks(State(state): State<Arc<GenState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"tasks": tasks_of(&state)?.tasks()})))
}

async fn predict(State(state): State<Arc<GenState>>, request: Request) -> Response {
    let response = match state.body(request).await {
        Ok(body) => predictions(&state, &body, None).await.into_response(),
        Err(e) => e.into_response(),
    };
    count(&state.metrics, "/v1/predict", &response);
    response
}

async fn predict_task(State(state): State<Arc<GenState>>, Path(task): Path<String>, request: Request) -> Response {
    let response = match state.body(request).await {
        Ok(body) => predictions(&state, &body, Some(&task)).await.into_response(),
        Err(e) => e.into_response(),
    };
    count(&state.metrics, "/v1/tasks/{task}/predict", &response);
    response
}

/// A predict request answered by generation: every (input, task) is submitted at once, so they share the
/// generator's steps with each other and with every other request; the answers come back in the encoder
/// routes' shape, `{"predictions": [{TASK: ANSWER}]}`. If one is refused or fails, the others are cancelled.
async fn predictions(state: &GenState, body: &[u8], path_task: Option<&str>) -> Result<Json<Value>, ApiError> {
    let tasks = tasks_of(state)?;
    let (inputs, wanted) = crate::api::check_request(body, path_task, tasks.tasks(), &state.settings)?;
    // Each (input, task) is one generation waiting in the generator's queue: a request that could never fit
    // it is refused as such, not with a 429 that no retry can pass.
    let generations = inputs.len() * wanted.len();
    let bound = state.settings.generation.queue_bound;
    if generations > bound || wanted.is_empty() {
        return Err(ApiError::Validation(format!(
            "{} inputs × {} tasks = {generations} generations; at most {bound} per request (the queue bound)",
            inputs.len(),
            wanted.len()
        )));
    }
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
    // Prompts are tokenised on the blocking pool, off the async workers.
    let (t, w) = (tasks.clone(), wanted.clone());
    let generations = tokio::task::spawn_blocking(move || {
        let mut all = Vec::with_capacity(inputs.len() * w.len());
        for (i, input) in inputs.iter().enumerate() {
            for task in &w {
                all.push(t.generation(task, input).map_err(|e| match e {
                    crate::EngineError::Invalid(m) => ApiError::Validation(format!("input {i}: {m}")),
                    crate::EngineError::Model(m) => ApiError::Internal(format!("input {i}: {m}")),
                })?);
            }
        }
        Ok::<_, ApiError>(all)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("preparing the prompts failed: {e}")))??;
    let mut pending = Vec::with_capacity(generations.len());
    for g in generations {
        // A refusal drops the channels already opened, which cancels those generations.
        pending.push(submit(state.generator.as_ref(), g)?);
    }
    let finished =
        futures_util::future::try_join_all(pending.into_iter().map(|u| wait(u, deadline, &state.metrics))).await?;
    let per_input: Vec<Value> = finished
        .chunks(wanted.len())
        .map(|answers| {
            let answers =
                wanted.iter().zip(answers).map(|(task, f)| (task.clone(), tasks.answer(task, f.text.clone())));
            Value::Object(answers.collect())
        })
        .collect();
    state.metrics.latency(&wanted, started.elapsed().as_secs_f64());
    Ok(Json(json!({"predictions": per_input})))
}

/// Counts an answer of `endpoint`, and its error kind.
fn count(metrics: &Metrics, endpoint: &str, response: &Response) {
    let status = response.status().as_u16();
    metrics.request(endpoint, status);
    if status >= 400 {
        let kind = response.extensions().get::<crate::api::ErrorKind>().map_or_else(|| error_kind(status), |k| k.0);
        metrics.error(kind);
    }
}

/// The error table's kind of a status these routes answer with.
fn error_kind(status: u16) -> &'static str {
    match status {
        404 => "unknown_model",
        422 => "validation",
        429 => "queue_full",
        503 => "timeout",
        _ => "internal",
    }
}

/// `/v1/generate`'s server-sent events: `data: {"text": PIECE}` per piece, then an event `done` with the whole
/// answer, or `error` (the generator's error, or `timeout` at the deadline).
fn event_stream(
    updates: crate::streaming::Pending,
    deadline: tokio::time::Instant,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::StreamExt::map(pieces(updates, deadline, metrics), |piece| {
        Ok(match piece {
            Piece::Text(p) => Event::default().data(json!({"text": p}).to_string()),
            Piece::Done(f) => Event::default().event("done").data(finished_json(&f).to_string()),
            Piece::Error { kind, message } => {
                Event::default().event("error").data(json!({"error": {"kind": kind, "message": message}}).to_string())
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use tokio::sync::mpsc;

    use super::*;
    use crate::generation::{GeneratorStatus, Message, Models, Prompt, Refused, Update};

    /// Answers with the prompt's words, one piece per word, at most `max_new_tokens` of them, on a thread of
    /// its own per request; a prompt starting "slow" waits 50 ms before each word, and `cancelled` counts the
    /// requests whose receiver went away before they ended.
    #[derive(Clone, Default)]
    struct Echo {
        cancelled: Arc<std::sync::atomic::AtomicUsize>,
        full: bool,
        /// The last generation submitted.
        last: Arc<std::sync::Mutex<Option<Generation>>>,
    }

    impl Generator for Echo {
        fn submit(&self, g: Generation) -> Result<mpsc::UnboundedReceiver<Update>, Refused> {
            if self.full {
                return Err(Refused::Full);
            }
            *self.last.lock().expect("lock") = Some(g.clone());
            let prompt = match g.prompt {
                Prompt::Text(t) => t,
                Prompt::Chat(turns) => turns.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join(" "),
                Prompt::Tokens(ids) => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
            };
            let r = Generation { prompt: Prompt::Text(prompt.clone()), ..g };
            if prompt.starts_with("too long") {
                return Err(Refused::Invalid("the prompt is longer than the model's context".into()));
            }
            let (sender, receiver) = mpsc::unbounded_channel();
            let cancelled = self.cancelled.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                let mut n = 0;
                for w in prompt.split_whitespace().take(r.max_new_tokens) {
                    if prompt.starts_with("slow") {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    let piece = format!("{w} ");
                    text.push_str(&piece);
                    n += 1;
                    if sender.send(Update::Piece(piece)).is_err() {
                        cancelled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
                let done =
                    Finished { text, stop: "max_new_tokens".into(), prompt_tokens: 0, cached_tokens: 0, new_tokens: n };
                let _ = sender.send(Update::Done(Ok(done)));
            });
            Ok(receiver)
        }

        fn status(&self) -> GeneratorStatus {
            // A full generator's queue is full too: requests are refused before their body is read.
            GeneratorStatus {
                kv_blocks_total: 8,
                queued: if self.full { 1 << 20 } else { 0 },
                ..GeneratorStatus::default()
            }
        }

        fn models(&self) -> Models {
            Models { base: "echo".into(), base_serves: true, adapters: vec!["intent".into(), "slots".into()] }
        }
    }

    /// POSTs `body` to `path`, with an API key when given; the status and the body as text.
    async fn send(app: &Router, path: &str, body: Value, key: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::post(path).header("content-type", "application/json");
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

    async fn post(app: &Router, body: Value, key: Option<&str>) -> (StatusCode, String) {
        send(app, "/v1/generate", body, key).await
    }

    #[tokio::test]
    async fn answers_whole_or_streamed_and_refuses_bad_requests() {
        let app = generation_router(Echo::default(), Settings::default());
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
            json!({"prompt": "x", "stop": vec!["s"; MAX_STOP_STRINGS + 1]}),
            json!({"prompt": "x", "stop": ["s".repeat(MAX_STOP_CHARS + 1)]}),
        ] {
            let (status, body) = post(&app, bad.clone(), None).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
            assert!(body.contains("\"kind\":\"validation\""), "{body}");
        }
        let (status, _) = post(&app, json!({"prompt": "too long prompt"}), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // Refused before any event is sent: a stream gets the same 422.
        let (status, body) = post(&app, json!({"prompt": "too long prompt", "stream": true}), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }

    #[tokio::test]
    async fn the_openapi_document_describes_the_generate_route() {
        let app = generation_router(Echo::default(), Settings::default());
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
            adapter: Some("intent".into()),
            max_new_tokens: 1,
            temperature: 0.0,
            top_k: Some(1),
            top_p: Some(1.0),
            seed: 0,
            stop: vec!["s".into()],
            ignore_eos: false,
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
        let app = generation_router(Echo::default(), settings);
        assert_eq!(post(&app, json!({"prompt": "a"}), None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&app, json!({"prompt": "a"}), Some("k2")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&app, json!({"prompt": "a"}), Some("k1")).await.0, StatusCode::OK);
    }

    /// Deadlines hold for streams too, and a client that leaves or times out cancels its generation; a
    /// generator that is full answers 429, before reading the body (an invalid one too); `/metrics` counts the
    /// answers, the errors and the generator's gauges.
    #[tokio::test]
    async fn deadlines_cancel_streams_and_refusals_are_counted() {
        let echo = Echo::default();
        let settings = Settings { request_timeout: std::time::Duration::from_millis(120), ..Settings::default() };
        let app = generation_router(echo.clone(), settings);
        let slow = "slow a b c d e f g h i j";
        let (status, body) = post(&app, json!({"prompt": slow, "stream": true}), None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("event: error") && body.contains("\"kind\":\"timeout\""), "{body}");
        let (status, _) = post(&app, json!({"prompt": slow}), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        // Both generations notice their receiver is gone at their next word.
        for _ in 0..100 {
            if echo.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(echo.cancelled.load(std::sync::atomic::Ordering::SeqCst), 2);

        let full = generation_router(Echo { full: true, ..Echo::default() }, Settings::default());
        assert_eq!(post(&full, json!({"prompt": "a"}), None).await.0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(post(&full, json!({"prompt": " "}), None).await.0, StatusCode::TOO_MANY_REQUESTS);
        let request = Request::get("/metrics").body(axum::body::Body::empty()).expect("request");
        let response = full.oneshot(request).await.expect("answer");
        let text =
            String::from_utf8(response.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
        for line in [
            "mtl_requests_total{endpoint=\"/v1/generate\",status=\"429\"} 2",
            "mtl_errors_total{kind=\"queue_full\"} 2",
            "mtl_kv_blocks_total 8",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    async fn call(app: &Router, path: &str, body: Value) -> (StatusCode, String) {
        send(app, path, body, None).await
    }

    /// The `data:` payloads of a stream, parsed (`[DONE]` kept as a string).
    fn chunks(body: &str) -> Vec<Value> {
        body.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_string())))
            .collect()
    }

    /// The OpenAI-compatible routes in OpenAI's shapes: models, completions and chat completions, whole and
    /// streamed, `model` choosing the adapter, OpenAI's defaults, and refusals of what is not supported.
    #[tokio::test]
    async fn openai_routes_answer_in_openai_shapes() {
        let echo = Echo::default();
        let app = generation_router(echo.clone(), Settings::default());
        let request = Request::get("/v1/models").body(axum::body::Body::empty()).expect("request");
        let response = app.clone().oneshot(request).await.expect("answer");
        let models: Value =
            serde_json::from_slice(&response.into_body().collect().await.expect("body").to_bytes()).expect("json");
        let ids: Vec<&str> = models["data"].as_array().expect("list").iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!((models["object"].as_str(), ids), (Some("list"), vec!["echo", "intent", "slots"]));

        let (status, body) =
            call(&app, "/v1/completions", json!({"model": "slots", "prompt": "a b c", "max_tokens": 2})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            (v["choices"][0]["text"].as_str(), v["choices"][0]["finish_reason"].as_str()),
            (Some("a b "), Some("length"))
        );
        assert_eq!(v["usage"]["completion_tokens"], 2);
        let last = echo.last.lock().expect("lock").clone().expect("submitted");
        assert_eq!((last.adapter.as_deref(), last.temperature, last.max_new_tokens), (Some("slots"), 1.0, 2));
        // Without `max_tokens`, OpenAI's 16; the base model's name means no adapter.
        let many = (0..20).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let (_, body) = call(&app, "/v1/completions", json!({"model": "echo", "prompt": many, "temperature": 0})).await;
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 16);
        let last = echo.last.lock().expect("lock").clone().expect("submitted");
        assert_eq!((last.adapter, last.temperature), (None, 0.0));

        let (_, body) = call(
            &app,
            "/v1/completions",
            json!({"prompt": "a b", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        let c = chunks(&body);
        assert_eq!(c.len(), 5, "{body}");
        assert_eq!(
            (c[0]["choices"][0]["text"].as_str(), c[1]["choices"][0]["text"].as_str()),
            (Some("a "), Some("b "))
        );
        assert_eq!(c[2]["choices"][0]["finish_reason"], "length");
        assert_eq!((c[3]["usage"]["total_tokens"].as_u64(), &c[4]), (Some(2), &Value::String("[DONE]".into())));

        let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "x y"}]}]);
        let (status, body) = call(
            &app,
            "/v1/chat/completions",
            json!({"model": "intent", "messages": messages, "max_completion_tokens": 9}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": "be brief x y "}));
        let last = echo.last.lock().expect("lock").clone().expect("submitted");
        let turns = vec![
            Message { role: "system".into(), content: "be brief".into() },
            Message { role: "user".into(), content: "x y".into() },
        ];
        assert_eq!((last.prompt, last.max_new_tokens), (Prompt::Chat(turns), 9));
        let (_, body) = call(
            &app,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "p q"}], "stream": true}),
        )
        .await;
        let c = chunks(&body);
        assert_eq!(c[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}), "{body}");
        assert_eq!(
            (c[1]["object"].as_str(), c[1]["choices"][0]["delta"]["content"].as_str()),
            (Some("chat.completion.chunk"), Some("p "))
        );
        assert_eq!(c.last(), Some(&Value::String("[DONE]".into())));

        for (path, bad, status) in [
            ("/v1/completions", json!({"prompt": "a", "n": 2}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/v1/completions", json!({"prompt": ["a", "b"]}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/v1/completions", json!({"prompt": "a", "logprobs": 2}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/v1/completions", json!({"prompt": "a", "bogus": 1}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/v1/completions", json!({"prompt": "a", "model": "nope"}), StatusCode::NOT_FOUND),
            ("/v1/chat/completions", json!({"messages": []}), StatusCode::UNPROCESSABLE_ENTITY),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "tool", "content": "a"}]}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "a"}], "tools": [{}]}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "a"}], "temperature": 3}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let (got, body) = call(&app, path, bad.clone()).await;
            assert_eq!(got, status, "{path} {bad}: {body}");
        }
    }

    /// Two label tasks answered by [`Echo`]: the prompt is the task's name, then the input's text; the answer
    /// is the generated text's first word after the task name.
    struct Labels(Vec<crate::TaskDescription>);

    impl Labels {
        fn new() -> Self {
            let task = |name: &str, kind: &str| crate::TaskDescription {
                name: name.into(),
                kind: kind.into(),
                labels: vec!["a".into(), "b".into()],
            };
            Self(vec![task("intent", "classification"), task("slots", "token_classification")])
        }
    }

    impl LabelTasks for Labels {
        fn tasks(&self) -> &[crate::TaskDescription] {
            &self.0
        }

        fn generation(&self, task: &str, input: &crate::RequestInput) -> Result<Generation, crate::EngineError> {
            let text = match input {
                crate::RequestInput::Text(t) => t.clone(),
                crate::RequestInput::Words { words } => words.join(" "),
                _ => return Err(crate::EngineError::Invalid("a text or words".into())),
            };
            Ok(Generation::greedy(Prompt::Text(format!("{task} {text}")), Some(task.to_string()), 3))
        }

        fn answer(&self, _task: &str, generated: String) -> Value {
            json!({"generated": generated, "label": generated.split_whitespace().nth(1)})
        }
    }

    /// A run's label tasks answer through the predict routes, one generation per (input, task) through the
    /// task's adapter, in the encoder routes' shape; refusals and unknown tasks get the error table's answers.
    #[tokio::test]
    async fn label_tasks_answer_through_the_predict_routes() {
        let echo = Echo::default();
        let app = label_task_router(echo.clone(), Labels::new(), Settings::default());
        let (status, body) = call(&app, "/v1/predict", json!({"inputs": ["a b c", {"words": ["b", "a"]}]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            v["predictions"],
            json!([
                {"intent": {"generated": "intent a b ", "label": "a"}, "slots": {"generated": "slots a b ", "label": "a"}},
                {"intent": {"generated": "intent b a ", "label": "b"}, "slots": {"generated": "slots b a ", "label": "b"}},
            ])
        );
        let (status, body) = call(&app, "/v1/tasks/slots/predict", json!({"inputs": ["z y"]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json")["predictions"],
            json!([{"slots": {"generated": "slots z y ", "label": "z"}}])
        );
        let last = echo.last.lock().expect("lock").clone().expect("submitted");
        assert_eq!((last.adapter.as_deref(), last.max_new_tokens), (Some("slots"), 3));

        for (path, bad, status) in [
            ("/v1/predict", json!({"inputs": ["a"], "tasks": ["nope"]}), StatusCode::NOT_FOUND),
            ("/v1/tasks/nope/predict", json!({"inputs": ["a"]}), StatusCode::NOT_FOUND),
            ("/v1/predict", json!({"inputs": []}), StatusCode::UNPROCESSABLE_ENTITY),
            (
                "/v1/predict",
                json!({"inputs": ["a", {"question": "q", "context": "c"}]}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let (got, body) = call(&app, path, bad.clone()).await;
            assert_eq!(got, status, "{path} {bad}: {body}");
        }
        let (_, body) = call(&app, "/v1/predict", json!({"inputs": ["a", {"question": "q", "context": "c"}]})).await;
        assert!(body.contains("input 1: a text or words"), "{body}");

        // More generations than the queue can ever hold: 422, not a 429 that no retry passes.
        let small = Settings {
            generation: crate::api::GenerationSettings { queue_bound: 3, ..Settings::default().generation },
            ..Settings::default()
        };
        let bounded = label_task_router(Echo::default(), Labels::new(), small);
        let (status, body) = call(&bounded, "/v1/predict", json!({"inputs": ["a", "b"]})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains("4 generations; at most 3"), "{body}");
        let full = label_task_router(Echo { full: true, ..Echo::default() }, Labels::new(), Settings::default());
        assert_eq!(call(&full, "/v1/predict", json!({"inputs": ["a"]})).await.0, StatusCode::TOO_MANY_REQUESTS);
        let get = |path: &str| Request::get(path).body(axum::body::Body::empty()).expect("request");
        let text = |r: Response| async {
            String::from_utf8(r.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8")
        };
        let tasks = text(app.clone().oneshot(get("/v1/tasks")).await.expect("answer")).await;
        assert!(tasks.contains("\"name\":\"intent\"") && tasks.contains("\"name\":\"slots\""), "{tasks}");
        let doc: Value =
            serde_json::from_str(&text(app.clone().oneshot(get("/openapi.json")).await.expect("answer")).await)
                .expect("json");
        assert_eq!(
            doc["paths"]["/v1/tasks/{task}/predict"]["post"]["parameters"][0]["schema"]["enum"],
            json!(["intent", "slots"])
        );
        assert!(doc["paths"]["/v1/generate"].is_object());
        let metrics = text(app.clone().oneshot(get("/metrics")).await.expect("answer")).await;
        for line in [
            "mtl_requests_total{endpoint=\"/v1/predict\",status=\"200\"} 1",
            "mtl_requests_total{endpoint=\"/v1/tasks/{task}/predict\",status=\"404\"} 1",
            "mtl_errors_total{kind=\"unknown_task\"} 2",
            // Generation is counted per adapter.
            "mtl_generated_tokens_total{adapter=\"intent\"} 6",
            "mtl_generated_tokens_total{adapter=\"slots\"} 9",
            "mtl_time_to_first_token_seconds_count{adapter=\"slots\"} 3",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
        // Without label tasks, no predict routes.
        let plain = generation_router(Echo::default(), Settings::default());
        assert_eq!(call(&plain, "/v1/predict", json!({"inputs": ["a"]})).await.0, StatusCode::NOT_FOUND);
    }
}
