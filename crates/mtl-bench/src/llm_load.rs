//! `mtl-llm-load`: a load generator for LLM servers that speak OpenAI's `/v1/completions` with streaming (mtl
//! serve, llama.cpp's llama-server, vLLM), so that one client measures them all the same way. Each request
//! streams (`"stream": true`, with `stream_options.include_usage`); the client records the time to the first
//! piece of text, the time between pieces, the whole request's latency and the completion tokens the server
//! counts in `usage`.
//!
//! Closed loop by default: `--concurrency` streams, each sending its next request when the last ends. With
//! `--rate`, open loop: requests start on a fixed schedule (Poisson arrivals would hide less but repeat worse)
//! and latencies count from the scheduled start. Prompts come from a JSONL file (`{"prompt": ..., "model":
//! ...}`, `model` optional: a task adapter for mtl, a LoRA name for llama-server), round-robin. Prints one JSON
//! report; `--label` names it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// JSONL prompts: `{"prompt": TEXT, "model": NAME}` per line (`model` optional).
    #[arg(long)]
    prompts: PathBuf,
    /// Streams at once (closed loop), or the most requests in flight (open loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests per second (open loop); 0: closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    count: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Extra JSON fields for every request body, e.g. '{"ignore_eos": true}' for llama-server.
    #[arg(long)]
    extra: Option<String>,
    /// A name for the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Leave each request (close its connection) after this many pieces of text: clients that disconnect
    /// mid-stream, whose generations the server must cancel.
    #[arg(long)]
    drop_after: Option<usize>,
    /// Stop starting requests after this many seconds (closed loop), even before `--count`.
    #[arg(long)]
    duration_s: Option<f64>,
}

/// What one request measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    status: u16,
    ok: bool,
    first_ms: Option<f64>,
    gaps_ms: Vec<f64>,
    total_ms: f64,
    tokens: usize,
}

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    Some(values[rank.min(values.len() - 1)])
}

/// Sends one streamed completion and reads its events to the end, or leaves after `drop_after` pieces.
async fn one(
    client: &reqwest::Client,
    url: &str,
    body: Value,
    scheduled: Instant,
    drop_after: Option<usize>,
) -> Sample {
    let mut sample = Sample::default();
    let response = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(_) => return sample,
    };
    sample.status = response.status().as_u16();
    if !response.status().is_success() {
        let _ = response.bytes().await;
        sample.total_ms = scheduled.elapsed().as_secs_f64() * 1e3;
        return sample;
    }
    let mut last: Option<Instant> = None;
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    sample.tokens = n as usize;
                }
                let text = v["choices"][0]["text"].as_str().unwrap_or_default();
                if !text.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => sample.first_ms = Some((now - scheduled).as_secs_f64() * 1e3),
                        Some(l) => sample.gaps_ms.push((now - l).as_secs_f64() * 1e3),
                    }
                    last = Some(now);
                    if drop_after.is_some_and(|n| sample.gaps_ms.len() + 1 >= n) {
                        // Leaving: dropping the stream closes the connection.
                        sample.total_ms = scheduled.elapsed().as_secs_f64() * 1e3;
                        sample.ok = true;
                        return sample;
                    }
                }
            }
        }
    }
    sample.total_ms = scheduled.elapsed().as_secs_f64() * 1e3;
    sample.ok = done;
    sample
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.prompts).with_context(|| format!("{}", args.prompts.display()))?;
    let prompts: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", args.prompts.display(), i + 1)))
        .collect::<Result<_>>()?;
    if prompts.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    let extra: Value = match &args.extra {
        Some(e) => serde_json::from_str(e).context("--extra is not JSON")?,
        None => json!({}),
    };
    let body = |i: usize| -> Value {
        let p = &prompts[i % prompts.len()];
        let mut b = json!({
            "prompt": p["prompt"], "max_tokens": args.max_tokens, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(m) = p.get("model") {
            b["model"] = m.clone();
        }
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    // A fresh connection per request: servers differ in how long they keep one alive (llama-server's HTTP
    // library closes it after a few requests), and a request sent on a connection the server is closing fails.
    // On loopback a connection costs far less than a millisecond.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let drop_after = args.drop_after;
    let until = args.duration_s.map(|d| started + Duration::from_secs_f64(d));
    let mut tasks = Vec::new();
    if args.rate > 0.0 {
        let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        for i in 0..args.count {
            let at = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(at.into()).await;
            let (client, url, samples, gate, b) = (client.clone(), url.clone(), samples.clone(), gate.clone(), body(i));
            tasks.push(tokio::spawn(async move {
                let Ok(_permit) = gate.acquire_owned().await else { return };
                let s = one(&client, &url, b, at, drop_after).await;
                samples.lock().expect("samples").push(s);
            }));
        }
    } else {
        // One body per prompt, shared: request i sends prompt i modulo their number.
        let bodies: Arc<Vec<Value>> = Arc::new((0..prompts.len()).map(body).collect());
        for _ in 0..args.concurrency.max(1) {
            let (client, url, samples, next) = (client.clone(), url.clone(), samples.clone(), next.clone());
            let bodies = bodies.clone();
            let count = args.count;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        break;
                    }
                    if until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                    let s = one(&client, &url, bodies[i % bodies.len()].clone(), Instant::now(), drop_after).await;
                    samples.lock().expect("samples").push(s);
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let samples = samples.lock().expect("samples").clone();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut first: Vec<f64> = ok.iter().filter_map(|s| s.first_ms).collect();
    let mut gaps: Vec<f64> = ok.iter().flat_map(|s| s.gaps_ms.iter().copied()).collect();
    let mut total: Vec<f64> = ok.iter().map(|s| s.total_ms).collect();
    let mut statuses = std::collections::BTreeMap::new();
    for s in &samples {
        *statuses.entry(s.status.to_string()).or_insert(0usize) += 1;
    }
    let report = json!({
        "label": args.label,
        "requests": samples.len(),
        "ok": ok.len(),
        "statuses": statuses,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "max_tokens": args.max_tokens,
        "dropped_after": args.drop_after,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens as f64 / wall,
        "ttft_ms": {"p50": percentile(&mut first, 50.0), "p99": percentile(&mut first, 99.0)},
        "itl_ms": {"p50": percentile(&mut gaps, 50.0), "p99": percentile(&mut gaps, 99.0)},
        "latency_ms": {"p50": percentile(&mut total, 50.0), "p99": percentile(&mut total, 99.0)},
    });
    println!("{report}");
    Ok(())
}
