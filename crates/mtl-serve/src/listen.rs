//! The connection loop under every router: HTTP/1 with the limits a server facing broken or hostile clients
//! needs (nginx's and TEI's defaults are the anchors).
//!
//! - A client has `header_timeout` to send a request's headers, and a kept-alive connection may stay idle
//!   that long between requests: a connection that sends nothing, or half a request (slowloris), is closed.
//! - A request's whole handling, reading its body included, is bounded by the request timeout (plus a second,
//!   so that the routes' own deadlines answer first): a body that trickles in gets 503 `timeout`.
//! - A response the client stops reading (a zero receive window, a vanished peer) ends the connection once
//!   its data has waited unacknowledged for the request timeout (`TCP_USER_TIMEOUT` on Linux), so such
//!   clients cannot hold connection slots for ever.
//! - At most `max_connections` connections at once; one more is answered 503 and closed at once (a warning is
//!   logged at most every 10 s).
//! - On SIGTERM or Ctrl-C the server stops accepting and lets the requests in flight finish for
//!   `shutdown_timeout`; then those still running are answered 503 `shutting_down` (a stream ends with an
//!   `error` event), and the server returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::api::ApiError;

/// The connection limits of a server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The limits of a serving config (`mtl_config::ServeConfig`, the one source of the defaults).
    pub fn from_config(config: &mtl_config::ServeConfig) -> Self {
        Self {
            header_timeout: Duration::from_secs(config.header_timeout_s),
            request_timeout: Duration::from_secs(config.timeout_s),
            max_connections: config.max_connections,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_s),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Stopped accepting; the requests in flight finish.
    Draining,
    /// The shutdown deadline has passed: the requests still running are answered 503.
    Expired,
}

/// The event that ends a stream still running at the shutdown deadline (`kind` as `/v1/generate`'s error
/// events, `type` as OpenAI's).
const SHUTDOWN_EVENT: &str = "event: error\ndata: {\"error\":{\"kind\":\"shutting_down\",\"type\":\"shutting_down\",\
                              \"message\":\"the server is shutting down\"}}\n\n";

/// Serves `router` on `addr` until SIGTERM or Ctrl-C, within `limits` (see the module's documentation).
pub async fn serve(router: Router, addr: SocketAddr, limits: Limits) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!("serving on http://{}", listener.local_addr()?);
    serve_on(listener, router, limits, signalled()).await;
    Ok(())
}

/// Serves `router` on `listener` until `stop` completes, then shuts down within `limits.shutdown_timeout`.
pub async fn serve_on(listener: TcpListener, router: Router, limits: Limits, stop: impl Future<Output = ()>) {
    let (phase_tx, phase) = watch::channel(Phase::Serving);
    let bound = limits.request_timeout + Duration::from_secs(1);
    let router = router
        .layer(middleware::from_fn(move |request: Request, next: Next| guard(phase.clone(), bound, request, next)));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let (mut refused, mut warned): (u64, Option<Instant>) = (0, None);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file handles, or a connection reset before it was taken: wait, then go on.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            // Best effort, without waiting: a status rather than a reset.
            let _ = stream.try_write(&connection_refusal());
            if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(refused, max_connections = limits.max_connections, "at the connection limit");
                warned = Some(Instant::now());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(limits.request_timeout));
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("a connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "shutting down: answering the requests already accepted");
    let _ = phase_tx.send(Phase::Draining);
    let closed = graceful.shutdown();
    tokio::pin!(closed);
    if tokio::time::timeout(limits.shutdown_timeout, &mut closed).await.is_ok() {
        return;
    }
    tracing::warn!("the shutdown deadline has passed: the requests still running are answered 503");
    let _ = phase_tx.send(Phase::Expired);
    if tokio::time::timeout(Duration::from_secs(5), closed).await.is_err() {
        tracing::warn!("connections still open 5 s after the shutdown deadline; leaving them");
    }
}

/// What a connection over the limit reads before it is closed.
fn connection_refusal() -> Vec<u8> {
    let body = r#"{"error":{"kind":"queue_full","message":"the server is at its connection limit; retry later"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Bounds a request's handling by `bound`, and answers it 503 `shutting_down` if the shutdown deadline passes
/// first; a stream then ends with an `error` event.
async fn guard(mut phase: watch::Receiver<Phase>, bound: Duration, request: Request, next: Next) -> Response {
    if *phase.borrow() == Phase::Expired {
        return ApiError::ShuttingDown.into_response();
    }
    let response = tokio::select! {
        answered = tokio::time::timeout(bound, next.run(request)) => match answered {
            Ok(response) => response,
            Err(_) => ApiError::Timeout.into_response(),
        },
        () = expired(&mut phase) => return ApiError::ShuttingDown.into_response(),
    };
    let streamed =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streamed {
        end_at_expiry(response, phase)
    } else {
        response
    }
}

/// Completes when the shutdown deadline has passed (never, if the server is gone).
async fn expired(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Expired).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A streamed response that, at the shutdown deadline, sends [`SHUTDOWN_EVENT`] and ends.
fn end_at_expiry(response: Response, phase: watch::Receiver<Phase>) -> Response {
    let (parts, body) = response.into_parts();
    let events = futures_util::stream::unfold(
        (body.into_data_stream(), phase, false),
        |(mut data, mut phase, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                chunk = data.next() => chunk.map(|c| (c, (data, phase, false))),
                () = expired(&mut phase) => Some((Ok(Bytes::from_static(SHUTDOWN_EVENT.as_bytes())), (data, phase, true))),
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(events))
}

/// Completes on SIGTERM or Ctrl-C.
async fn signalled() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            max_connections: 3,
            shutdown_timeout: Duration::from_millis(300),
        }
    }

    fn app() -> Router {
        let never = || futures_util::stream::pending::<Result<axum::response::sse::Event, std::convert::Infallible>>();
        Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/echo", post(|body: Bytes| async move { body }))
            .route(
                "/soon",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    "done"
                }),
            )
            .route("/never", get(|| async { std::future::pending::<&'static str>().await }))
            .route("/stream", get(move || async move { axum::response::sse::Sse::new(never()) }))
    }

    /// A server on a free loopback port; the sender stops it, and the handle ends when it has shut down.
    async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, app(), limits, async move {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    }

    /// Everything the server sends until it closes the connection, or what came within `wait`.
    async fn read_all(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            }
        }
    }

    async fn fetch(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.expect("write");
        read_all(&mut s, Duration::from_secs(5)).await.0
    }

    #[tokio::test]
    async fn half_sent_and_idle_connections_are_closed_while_others_are_answered() {
        let (addr, _stop, _server) = start(limits()).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        assert!(fetch(addr, "/ok").await.starts_with("HTTP/1.1 200"), "a normal client is answered meanwhile");
        let started = Instant::now();
        let (_, closed) = read_all(&mut slow, Duration::from_secs(3)).await;
        assert!(closed && started.elapsed() < Duration::from_secs(2), "half a request is closed after the timeout");
        // A kept-alive connection idle after its answer is closed too.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let (answer, closed) = read_all(&mut idle, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 200") && closed, "{answer}");
    }

    #[tokio::test]
    async fn a_trickling_body_gets_503_and_connections_over_the_limit_are_refused() {
        let (addr, _stop, _server) = start(limits()).await;
        let mut trickle = TcpStream::connect(addr).await.expect("connect");
        trickle
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .expect("write");
        let (answer, _) = read_all(&mut trickle, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("\"timeout\""), "{answer}");
        drop(trickle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Three connections (the limit) holding half a request; a fourth is refused with a status.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /ok HTTP/1.1\r\n").await.expect("write");
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = fetch(addr, "/ok").await;
        assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("connection limit"), "{refused}");
        // Once they time out, there is room again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(fetch(addr, "/ok").await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn at_the_shutdown_deadline_running_requests_get_503_and_the_server_returns() {
        let (addr, stop, server) = start(limits()).await;
        let open = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
            s
        };
        let (mut soon, mut never, mut stream) = (open("/soon").await, open("/never").await, open("/stream").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).expect("the server listens");
        let started = Instant::now();
        let (answer, _) = read_all(&mut soon, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "in flight, finished: {answer}");
        let (answer, _) = read_all(&mut never, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("shutting_down"), "{answer}");
        let (answer, _) = read_all(&mut stream, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("event: error"), "{answer}");
        tokio::time::timeout(Duration::from_secs(3), server).await.expect("the server returns").expect("no panic");
        assert!(started.elapsed() < Duration::from_secs(2), "within the deadline and a little more");
        assert!(TcpStream::connect(addr).await.is_err(), "no longer listening");
    }
}
