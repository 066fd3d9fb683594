//! The API in process (tower's `oneshot` on the router) over a fake engine: every endpoint, every error of the
//! table, and batching across tasks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::api::{router, Settings};
use crate::{Engine, EngineError, RequestInput, TaskDescription};

/// Every batch the fake engine ran: each input with the tasks asked of it.
type Batches = Arc<Mutex<Vec<Vec<(String, Vec<String>)>>>>;

/// Labels `pos` when the text says "good", for task `sentiment`; always `a` for task `topic`. Records every
/// batch it runs, can hold the model thread at a gate, and can be slow.
struct Fake {
    tasks: Vec<TaskDescription>,
    batches: Batches,
    gate: Arc<(Mutex<bool>, Condvar)>,
    delay: Duration,
}

impl Fake {
    fn new() -> Self {
        let task = |name: &str, labels: &[&str]| TaskDescription {
            name: name.into(),
            kind: "classification".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        };
        Self {
            tasks: vec![task("sentiment", &["neg", "pos"]), task("topic", &["a", "b"])],
            batches: Arc::default(),
            gate: Arc::new((Mutex::new(true), Condvar::new())),
            delay: Duration::ZERO,
        }
    }
}

impl Engine for Fake {
    type Item = String;

    fn tasks(&self) -> &[TaskDescription] {
        &self.tasks
    }

    fn prepare(&self, input: &RequestInput) -> Result<(String, usize), EngineError> {
        let text = match input {
            RequestInput::Text(t) | RequestInput::Single { text: t } => t.clone(),
            RequestInput::Pair { text, text_pair } => format!("{text} | {text_pair}"),
            RequestInput::Words { words } => words.join(" "),
            RequestInput::Question { .. } => {
                return Err(EngineError::Invalid("this model answers no questions".into()))
            }
        };
        let tokens = text.split_whitespace().count();
        Ok((text, tokens))
    }

    fn predict(
        &self,
        items: &[&String],
        tasks: &[&BTreeSet<String>],
    ) -> Result<Vec<BTreeMap<String, Value>>, EngineError> {
        let bug = |e: String| EngineError::Model(e);
        let (open, turn) = &*self.gate;
        let mut open = open.lock().map_err(|e| bug(e.to_string()))?;
        while !*open {
            open = turn.wait(open).map_err(|e| bug(e.to_string()))?;
        }
        drop(open);
        assert!(!items.iter().any(|i| i.as_str() == "panic"), "a bug in the model");
        std::thread::sleep(self.delay);
        let batch = items.iter().zip(tasks).map(|(i, t)| (i.to_string(), t.iter().cloned().collect())).collect();
        self.batches.lock().map_err(|e| bug(e.to_string()))?.push(batch);
        Ok(items
            .iter()
            .zip(tasks)
            .map(|(text, tasks)| {
                tasks
                    .iter()
                    .map(|t| {
                        let label = match t.as_str() {
                            "sentiment" if text.contains("good") => "pos",
                            "sentiment" => "neg",
                            _ => "a",
                        };
                        (t.clone(), json!({"label": label}))
                    })
                    .collect()
            })
            .collect())
    }
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    if let Some(k) = key {
        request = request.header("authorization", format!("Bearer {k}"));
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = app.clone().oneshot(request.body(body).expect("a request")).await.expect("a response");
    let status = response.status();
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
    let bytes = response.into_body().collect().await.expect("a body").to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value, retry)
}

/// A predict request whose body is not JSON.
fn not_json() -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/predict")
        .header("content-type", "application/json")
        .body(Body::from("{oops"))
        .expect("request")
}

#[tokio::test]
async fn endpoints_answer() {
    let app = router(Fake::new(), Settings::default());
    assert_eq!(call(&app, "GET", "/health", None, None).await.1, json!({"status": "ok"}));
    let (status, tasks, _) = call(&app, "GET", "/v1/tasks", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        tasks,
        json!({"tasks": [
            {"name": "sentiment", "kind": "classification", "labels": ["neg", "pos"]},
            {"name": "topic", "kind": "classification", "labels": ["a", "b"]}
        ]})
    );
    let inputs =
        json!(["a good film", {"text": "dull", "text_pair": "very"}, {"words": ["so", "good"]}, {"text": "bad"}]);
    let (status, body, _) = call(&app, "POST", "/v1/predict", Some(json!({"inputs": inputs})), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"predictions": [
            {"sentiment": {"label": "pos"}, "topic": {"label": "a"}},
            {"sentiment": {"label": "neg"}, "topic": {"label": "a"}},
            {"sentiment": {"label": "pos"}, "topic": {"label": "a"}},
            {"sentiment": {"label": "neg"}, "topic": {"label": "a"}}
        ]})
    );
    let (_, body, _) =
        call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["good"], "tasks": ["topic"]})), None).await;
    assert_eq!(body, json!({"predictions": [{"topic": {"label": "a"}}]}));
    let (_, body, _) = call(&app, "POST", "/v1/tasks/sentiment/predict", Some(json!({"inputs": ["good"]})), None).await;
    assert_eq!(body, json!({"predictions": [{"sentiment": {"label": "pos"}}]}));
}

#[tokio::test]
async fn every_error_has_its_status_and_kind() {
    let settings = Settings { max_input_chars: 20, body_limit: 400, ..Settings::default() };
    let app = router(Fake::new(), settings);
    // The whole error body of each (a snapshot of the messages clients see).
    let cases: Vec<(&str, Value, StatusCode, &str, &str)> = vec![
        ("/v1/predict", json!({"inputs": ["x"], "tasks": ["nope"]}), StatusCode::NOT_FOUND, "unknown_task", "no task `nope`; GET /v1/tasks lists them"),
        ("/v1/tasks/nope/predict", json!({"inputs": ["x"]}), StatusCode::NOT_FOUND, "unknown_task", "no task `nope`; GET /v1/tasks lists them"),
        ("/v1/predict", json!({"inputs": []}), StatusCode::UNPROCESSABLE_ENTITY, "validation", "`inputs` is empty"),
        ("/v1/predict", json!({"inputs": ["x"], "tasks": []}), StatusCode::UNPROCESSABLE_ENTITY, "validation", "`tasks` is empty; leave it out for every task"),
        (
            "/v1/predict",
            json!({"input": ["x"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "invalid request body: unknown field `input`, expected `inputs` or `tasks` at line 1 column 8",
        ),
        (
            "/v1/predict",
            json!({"inputs": [42]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "invalid request body: an input is a string, {\"text\", \"text_pair\"}, {\"words\": [...]}, {\"question\", \"context\"} or {\"text\"} at line 1 column 14",
        ),
        ("/v1/predict", json!({"inputs": ["x".repeat(21)]}), StatusCode::UNPROCESSABLE_ENTITY, "validation", "input 0: 21 characters; at most 20"),
        (
            "/v1/predict",
            json!({"inputs": [{"question": "q", "context": "c"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "input 0: this model answers no questions",
        ),
        ("/v1/predict", json!({"inputs": vec!["x"; 200]}), StatusCode::PAYLOAD_TOO_LARGE, "", ""),
    ];
    for (uri, body, status, kind, message) in cases {
        let (got, answer, _) = call(&app, "POST", uri, Some(body.clone()), None).await;
        assert_eq!(got, status, "{uri} {body}: {answer}");
        if !kind.is_empty() {
            assert_eq!(answer, json!({"error": {"kind": kind, "message": message}}), "{uri} {body}");
        }
    }
    // Not JSON at all.
    let request = not_json();
    let response = app.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, answer, _) =
        call(&app, "POST", "/v1/predict", Some(json!({"inputs": [{"question": "q", "context": "c"}]})), None).await;
    assert_eq!(answer["error"]["message"], "input 0: this model answers no questions");
}

/// A body that is not declared JSON gets 415, one over the limit 413 (with or without `Content-Length`), both
/// in the error shape of every other error.
#[tokio::test]
async fn bodies_not_json_or_too_large_are_refused_as_errors() {
    let app = router(Fake::new(), Settings { body_limit: 1024, ..Settings::default() });
    let send = |content_type: &'static str, body: String, length: bool| {
        let app = app.clone();
        async move {
            let mut request = Request::builder().method("POST").uri("/v1/predict").header("content-type", content_type);
            if length {
                request = request.header("content-length", body.len());
            }
            let response = app.oneshot(request.body(Body::from(body)).expect("request")).await.expect("response");
            let status = response.status();
            let bytes = response.into_body().collect().await.expect("a body").to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)["error"]["kind"].clone())
        }
    };
    let small = json!({"inputs": ["x"]}).to_string();
    let large = json!({"inputs": ["x".repeat(2000)]}).to_string();
    assert_eq!(
        send("text/plain", small.clone(), true).await,
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!("unsupported_media_type"))
    );
    assert_eq!(send("application/json; charset=utf-8", small, true).await.0, StatusCode::OK);
    for length in [true, false] {
        assert_eq!(
            send("application/json", large.clone(), length).await,
            (StatusCode::PAYLOAD_TOO_LARGE, json!("body_too_large"))
        );
    }
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let settings = Settings { api_keys: Some(HashSet::from(["s3cret".to_string()])), ..Settings::default() };
    let app = router(Fake::new(), settings);
    assert_eq!(call(&app, "GET", "/health", None, None).await.0, StatusCode::OK);
    let (status, body, _) = call(&app, "GET", "/v1/tasks", None, None).await;
    assert_eq!((status, body["error"]["kind"].clone()), (StatusCode::UNAUTHORIZED, json!("unauthorized")));
    assert_eq!(call(&app, "GET", "/v1/tasks", None, Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["x"]})), Some("wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(call(&app, "GET", "/v1/tasks", None, Some("s3cret")).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_of_different_tasks_share_a_batch_and_a_full_queue_refuses() {
    let fake = Fake::new();
    let (gate, batches) = (fake.gate.clone(), fake.batches.clone());
    *gate.0.lock().expect("gate") = false;
    let mut settings = Settings::default();
    settings.batch.queue_bound = 2;
    settings.batch.max_wait = Duration::from_millis(50);
    let app = router(fake, settings);
    let post = |body: Value| {
        let app = app.clone();
        tokio::spawn(async move { call(&app, "POST", "/v1/predict", Some(body), None).await })
    };
    // The first request holds the model thread at the gate; two more, of different tasks, queue behind it.
    let first = post(json!({"inputs": ["first"], "tasks": ["topic"]}));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = post(json!({"inputs": ["a good one"], "tasks": ["sentiment"]}));
    let b = post(json!({"inputs": ["plain", "two"], "tasks": ["topic"]}));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The queue holds two: a fourth request is refused at once, with Retry-After.
    let (status, body, retry) = call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["late"]})), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["kind"], "queue_full");
    assert_eq!(retry.as_deref(), Some("1"));
    // Refused before its body is read: an invalid one gets 429 too, not 422.
    let request = not_json();
    assert_eq!(app.clone().oneshot(request).await.expect("response").status(), StatusCode::TOO_MANY_REQUESTS);
    {
        let (open, turn) = &*gate;
        *open.lock().expect("gate") = true;
        turn.notify_all();
    }
    let (first, a, b) = (first.await.expect("first"), a.await.expect("a"), b.await.expect("b"));
    assert_eq!(first.1, json!({"predictions": [{"topic": {"label": "a"}}]}));
    assert_eq!(a.1, json!({"predictions": [{"sentiment": {"label": "pos"}}]}));
    assert_eq!(b.1, json!({"predictions": [{"topic": {"label": "a"}}, {"topic": {"label": "a"}}]}));
    let batches = batches.lock().expect("batches").clone();
    assert_eq!(batches.len(), 2, "{batches:?}");
    // a and b in one batch, each input with its own request's task.
    let mut second = batches[1].clone();
    second.sort();
    assert_eq!(
        second,
        vec![
            ("a good one".to_string(), vec!["sentiment".to_string()]),
            ("plain".to_string(), vec!["topic".to_string()]),
            ("two".to_string(), vec!["topic".to_string()]),
        ]
    );
}

#[tokio::test]
async fn a_slow_model_times_out() {
    let mut fake = Fake::new();
    fake.delay = Duration::from_millis(400);
    let settings = Settings { request_timeout: Duration::from_millis(50), ..Settings::default() };
    let app = router(fake, settings);
    let (status, body, _) = call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["x"]})), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["kind"], "timeout");
}

#[tokio::test]
async fn a_panicking_model_fails_its_batch_and_serves_on() {
    let app = router(Fake::new(), Settings::default());
    let (status, body, _) = call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["panic"]})), None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["kind"], "internal");
    let (status, body, _) =
        call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["good"], "tasks": ["sentiment"]})), None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"predictions": [{"sentiment": {"label": "pos"}}]})));
}

#[tokio::test]
async fn metrics_count_requests_errors_batches_and_latency() {
    let app = router(Fake::new(), Settings::default());
    call(&app, "POST", "/v1/predict", Some(json!({"inputs": ["good", "bad"]})), None).await;
    call(&app, "POST", "/v1/tasks/topic/predict", Some(json!({"inputs": ["x"]})), None).await;
    call(&app, "POST", "/v1/predict", Some(json!({"inputs": []})), None).await;
    let request = Request::builder().uri("/metrics").body(Body::empty()).expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/plain; version=0.0.4");
    let text =
        String::from_utf8(response.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    for line in [
        "mtl_requests_total{endpoint=\"/v1/predict\",status=\"200\"} 1",
        "mtl_requests_total{endpoint=\"/v1/predict\",status=\"422\"} 1",
        "mtl_requests_total{endpoint=\"/v1/tasks/{task}/predict\",status=\"200\"} 1",
        "mtl_errors_total{kind=\"validation\"} 1",
        "mtl_queue_depth 0",
        "mtl_batch_inputs_count 2",
        "mtl_batch_inputs_sum 3",
        "mtl_batch_inputs_bucket{le=\"1\"} 1",
        "mtl_batch_inputs_bucket{le=\"2\"} 2",
        "mtl_request_duration_seconds_count{task=\"sentiment\"} 1",
        "mtl_request_duration_seconds_count{task=\"topic\"} 2",
        "# TYPE mtl_request_duration_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let settings = Settings { api_keys: Some(HashSet::from(["k".to_string()])), ..Settings::default() };
    let app = router(Fake::new(), settings);
    let (status, doc, _) = call(&app, "GET", "/openapi.json", None, Some("k")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    for path in ["/health", "/metrics", "/openapi.json", "/v1/tasks", "/v1/predict", "/v1/tasks/{task}/predict"] {
        assert!(paths.iter().any(|p| p.as_str() == path), "{path} is not described: {paths:?}");
        // And the router has it.
        let method = if path.contains("predict") { "POST" } else { "GET" };
        let concrete = path.replace("{task}", "topic");
        let body = (method == "POST").then(|| json!({"inputs": ["x"]}));
        assert_ne!(call(&app, method, &concrete, body, Some("k")).await.0, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(
        doc["paths"]["/v1/tasks/{task}/predict"]["post"]["parameters"][0]["schema"]["enum"],
        json!(["sentiment", "topic"])
    );
    assert_eq!(
        doc["paths"]["/v1/predict"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Error"
    );
    assert_eq!(doc["security"], json!([{"apiKey": []}]));
    // Every `$ref` points at a schema the document has.
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().expect("a name");
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
    }
}

/// A misspelt input field is an error, not another input; a task named many times is answered and observed
/// once.
#[tokio::test]
async fn misspelt_fields_are_refused_and_repeated_tasks_count_once() {
    let app = router(Fake::new(), Settings::default());
    let (status, body, _) =
        call(&app, "POST", "/v1/predict", Some(json!({"inputs": [{"text": "a", "txt_pair": "b"}]})), None).await;
    assert_eq!((status, body["error"]["kind"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("validation")));
    let many = json!({"inputs": ["x"], "tasks": vec!["topic"; 1000]});
    let (status, body, _) = call(&app, "POST", "/v1/predict", Some(many), None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"predictions": [{"topic": {"label": "a"}}]})));
    let request = Request::builder().uri("/metrics").body(Body::empty()).expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    let text =
        String::from_utf8(response.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    assert!(text.lines().any(|l| l == "mtl_request_duration_seconds_count{task=\"topic\"} 1"), "{text}");
}

/// Key files: a byte order mark, comments and blank lines are not keys, a key with a space is an error naming
/// its line; the `Bearer` scheme is matched in any case.
#[tokio::test]
async fn key_files_and_the_bearer_scheme_are_read_as_people_write_them() {
    let keys = crate::api::parse_api_keys("\u{feff}k1\n# a comment\n\n  k2  \r\nk1\n").expect("keys");
    assert_eq!(keys, vec!["k1".to_string(), "k2".to_string()], "in file order, each once");
    assert_eq!(
        crate::api::parse_api_keys("k1\nk 2\n"),
        Err("line 2: a key must be visible ASCII characters without spaces".into())
    );
    assert!(crate::api::parse_api_keys("# only a comment\n").is_err());
    let app = router(Fake::new(), Settings { api_keys: Some(keys.into_iter().collect()), ..Settings::default() });
    for (header, status) in [
        ("bearer k1", StatusCode::OK),
        ("BEARER  k2 ", StatusCode::OK),
        ("Bearer k3", StatusCode::UNAUTHORIZED),
        ("k1", StatusCode::UNAUTHORIZED),
        ("Basic k1", StatusCode::UNAUTHORIZED),
    ] {
        let request =
            Request::builder().uri("/v1/tasks").header("authorization", header).body(Body::empty()).expect("request");
        assert_eq!(app.clone().oneshot(request).await.expect("response").status(), status, "{header}");
    }
}

/// With `allowed_hosts`, another `Host` (a rebound DNS name) gets 403, ports and case aside; with
/// `cors_origins`, a listed origin's preflight is answered and its requests carry the CORS header, another
/// origin's do not.
#[tokio::test]
async fn hosts_outside_the_list_are_refused_and_cors_answers_listed_origins() {
    let settings = Settings {
        allowed_hosts: vec!["localhost".into(), "::1".into()],
        cors_origins: vec!["https://app.example.com".into()],
        ..Settings::default()
    };
    let app = router(Fake::new(), settings);
    let ask = |method: &'static str, host: &'static str, origin: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut request = Request::builder().method(method).uri("/v1/tasks").header("host", host);
            if let Some(o) = origin {
                request = request.header("origin", o).header("access-control-request-method", "GET");
            }
            let response = app.oneshot(request.body(Body::empty()).expect("request")).await.expect("response");
            let allowed =
                response.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap_or("").to_string());
            (response.status(), allowed)
        }
    };
    assert_eq!(ask("GET", "evil.example:8080", None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(ask("GET", "LOCALHOST:8080", None).await.0, StatusCode::OK);
    assert_eq!(ask("GET", "[::1]:8080", None).await.0, StatusCode::OK);
    let (status, allowed) = ask("OPTIONS", "localhost", Some("https://app.example.com")).await;
    assert_eq!((status, allowed.as_deref()), (StatusCode::OK, Some("https://app.example.com")));
    assert_eq!(
        ask("GET", "localhost", Some("https://app.example.com")).await.1.as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(ask("GET", "localhost", Some("https://evil.example")).await.1, None);
    // Without a list, no CORS header at all: browsers keep other sites' pages from reading the answers.
    let plain = router(Fake::new(), Settings::default());
    let request = Request::builder()
        .uri("/v1/tasks")
        .header("origin", "https://app.example.com")
        .body(Body::empty())
        .expect("request");
    let response = plain.oneshot(request).await.expect("response");
    assert!(response.headers().get("access-control-allow-origin").is_none());
}
