//! `mtl-load`: a small HTTP/1.1 load generator for `mtl serve`, run as a separate process on loopback.
//!
//! Each worker thread holds one keep-alive connection and sends requests from a JSONL file
//! (`{"path": "/v1/predict", "body": {...}, "expect": [...]}` per line, `expect` optional: the
//! `predictions` the answer must hold). Closed loop by default (each worker sends its next request when the
//! last is answered); with `--rate`, open loop: requests are sent on a fixed schedule and latency counts from
//! the scheduled time, so a slow server is not hidden by the client waiting for it. With `--watch-pid` it also
//! samples that process's resident memory every second (the soak test). Prints one JSON report.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The server, e.g. 127.0.0.1:8080.
    #[arg(long)]
    addr: String,
    /// JSONL requests, sent round-robin.
    #[arg(long)]
    requests: PathBuf,
    /// Connections (one worker thread each).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests per second over all workers (open loop); 0: closed loop, as fast as answers come.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Stop after this many seconds...
    #[arg(long)]
    duration_s: Option<f64>,
    /// ...or after this many requests (default 1000 when no duration is given).
    #[arg(long)]
    count: Option<usize>,
    /// Send `Authorization: Bearer KEY` with the first key of this file (the server's key file format; a
    /// key given as a flag would show in the process list). `MTL_API_KEY` in the environment works too.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Sample this process's resident memory every second.
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Numbers in answers may differ from `expect` by this much (batches of different shapes can round the
    /// 4th decimal differently); labels, tags and texts must be equal.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

struct Request {
    /// The server, when not `--addr` (a request for one of several servers).
    addr: Option<String>,
    path: String,
    body: String,
    expect: Option<Value>,
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    statuses: std::collections::BTreeMap<u16, usize>,
    transport_errors: usize,
    exact: usize,
    within_tolerance: usize,
    mismatches: Vec<Value>,
}

/// One keep-alive connection.
struct Connection {
    addr: String,
    reader: Option<BufReader<TcpStream>>,
}

/// A failed exchange: whether the request may be sent again (the connection was found closed before any byte
/// of an answer, as a keep-alive connection the server closed is), and why.
struct Failure {
    retry: bool,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self { retry: false, error: e.into() }
    }
}

impl Connection {
    fn send(&mut self, method: &str, path: &str, body: &str, key: Option<&str>) -> Result<(u16, String)> {
        for attempt in 0..2 {
            if self.reader.is_none() {
                let stream = TcpStream::connect(&self.addr)?;
                stream.set_nodelay(true)?;
                // A stalled server fails the request instead of blocking the worker past the run.
                stream.set_read_timeout(Some(Duration::from_secs(120)))?;
                stream.set_write_timeout(Some(Duration::from_secs(120)))?;
                self.reader = Some(BufReader::new(stream));
            }
            match self.try_send(method, path, body, key) {
                Ok(r) => return Ok(r),
                Err(f) => {
                    // Whatever is left on this connection cannot be trusted.
                    self.reader = None;
                    if !(f.retry && attempt == 0) {
                        return Err(f.error);
                    }
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn try_send(&mut self, method: &str, path: &str, body: &str, key: Option<&str>) -> Result<(u16, String), Failure> {
        let reader = self.reader.as_mut().context("connected")?;
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n",
            self.addr,
            body.len()
        );
        let stream = reader.get_mut();
        let sent = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
        let mut status_line = String::new();
        let read = sent.and_then(|()| reader.read_line(&mut status_line));
        match read {
            // Closed (or reset) before any byte of an answer: the server did not take the request.
            Ok(0) => return Err(Failure { retry: true, error: anyhow::anyhow!("connection closed") }),
            Err(e)
                if status_line.is_empty()
                    && matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) =>
            {
                return Err(Failure { retry: true, error: e.into() })
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let status: u16 = status_line.split_whitespace().nth(1).context("no status")?.parse()?;
        let (mut length, mut close) = (None, false);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(anyhow::anyhow!("connection closed inside the headers").into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = Some(v.trim().parse::<usize>()?);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                return Err(anyhow::anyhow!("chunked answers are not supported by this client").into());
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let length = length.context("an answer without Content-Length")?;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if close {
            self.reader = None;
        }
        Ok((status, String::from_utf8(body)?))
    }
}

/// Whether `got` holds `want`, numbers within `tol`; `exact` is cleared when a number differs at all.
fn agrees(got: &Value, want: &Value, tol: f64, exact: &mut bool) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            if a != b {
                *exact = false;
            }
            (a - b).abs() <= tol
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| agrees(x, y, tol, exact))
        }
        // Every field `mtl predict` prints must be there and agree; the server may add fields (a tagger's
        // `entities`).
        (Value::Object(a), Value::Object(b)) => {
            b.iter().all(|(k, y)| a.get(k).is_some_and(|x| agrees(x, y, tol, exact)))
        }
        _ => got == want,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let api_key = match &args.api_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let keys = mtl_serve::api::parse_api_keys(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            keys.into_iter().next()
        }
        None => std::env::var("MTL_API_KEY").ok().filter(|k| !k.is_empty()),
    };
    let text =
        std::fs::read_to_string(&args.requests).with_context(|| format!("{}: cannot read", args.requests.display()))?;
    let requests: Vec<Request> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: invalid JSON", args.requests.display(), i + 1))?;
            let path = v["path"]
                .as_str()
                .with_context(|| format!("{}:{}: field `path` missing", args.requests.display(), i + 1))?;
            let addr = v["addr"].as_str().map(String::from);
            Ok(Request { addr, path: path.to_string(), body: v["body"].to_string(), expect: v.get("expect").cloned() })
        })
        .collect::<Result<_>>()?;
    if requests.is_empty() || args.concurrency == 0 {
        bail!("need at least one request and one connection");
    }
    let requests = Arc::new(requests);
    let limit = match (args.count, args.duration_s) {
        (Some(n), _) => n,
        (None, Some(_)) => usize::MAX,
        (None, None) => 1000,
    };
    let deadline = args.duration_s.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let rss = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let watcher = args.watch_pid.map(|pid| {
        let (rss, stop) = (rss.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    rss.lock().expect("rss lock").push((start.elapsed().as_secs_f64(), kib));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    });
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (requests, next, tally, stop) = (requests.clone(), next.clone(), tally.clone(), stop.clone());
            let (addr, key, rate, tol) = (args.addr.clone(), api_key.clone(), args.rate, args.tolerance);
            std::thread::spawn(move || {
                // One keep-alive connection per server.
                let mut conns: std::collections::HashMap<String, Connection> = std::collections::HashMap::new();
                let mut local = Tally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit || stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    // Open loop: request i is due at i / rate seconds; latency counts from then.
                    let due =
                        if rate > 0.0 { start + Duration::from_secs_f64(i as f64 / rate) } else { Instant::now() };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let r = &requests[i % requests.len()];
                    let target = r.addr.clone().unwrap_or_else(|| addr.clone());
                    let conn = conns.entry(target.clone()).or_insert_with(|| Connection { addr: target, reader: None });
                    match conn.send("POST", &r.path, &r.body, key.as_deref()) {
                        Ok((status, body)) => {
                            local.latencies_ms.push(due.elapsed().as_secs_f64() * 1e3);
                            *local.statuses.entry(status).or_default() += 1;
                            if let (200, Some(want)) = (status, &r.expect) {
                                let got: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                                let mut exact = true;
                                if agrees(&got["predictions"], want, tol, &mut exact) {
                                    local.within_tolerance += 1;
                                    local.exact += usize::from(exact);
                                } else if local.mismatches.len() < 5 {
                                    local
                                        .mismatches
                                        .push(json!({"request": i % requests.len(), "got": got, "want": want}));
                                }
                            }
                        }
                        Err(_) => local.transport_errors += 1,
                    }
                }
                let mut t = tally.lock().expect("tally lock");
                t.latencies_ms.extend(local.latencies_ms);
                for (s, n) in local.statuses {
                    *t.statuses.entry(s).or_default() += n;
                }
                t.transport_errors += local.transport_errors;
                t.exact += local.exact;
                t.within_tolerance += local.within_tolerance;
                t.mismatches.extend(local.mismatches);
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    let mut t = std::mem::take(&mut *tally.lock().expect("tally lock"));
    t.latencies_ms.sort_by(f64::total_cmp);
    let answered: usize = t.statuses.values().sum();
    let ok = t.statuses.get(&200).copied().unwrap_or(0);
    let server_errors: usize = t.statuses.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum();
    let with_expect = requests.iter().filter(|r| r.expect.is_some()).count() > 0;
    let rss = rss.lock().expect("rss lock").clone();
    let report = json!({
        "concurrency": args.concurrency,
        "offered_rate": args.rate,
        "seconds": elapsed,
        "sent": answered + t.transport_errors,
        "answered": answered,
        "transport_errors": t.transport_errors,
        "statuses": t.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "server_errors": server_errors,
        "ok_per_second": ok as f64 / elapsed,
        "latency_ms": {"p50": percentile(&t.latencies_ms, 0.5), "p90": percentile(&t.latencies_ms, 0.9),
                       "p99": percentile(&t.latencies_ms, 0.99), "max": t.latencies_ms.last().copied().unwrap_or(f64::NAN)},
        "checked": if with_expect { json!({"ok_answers": ok, "agree": t.within_tolerance, "exact": t.exact, "mismatches": t.mismatches}) } else { Value::Null },
        "rss_kib": rss.iter().map(|(s, k)| json!([(s * 10.0).round() / 10.0, k])).collect::<Vec<_>>(),
    });
    println!("{report}");
    Ok(())
}
