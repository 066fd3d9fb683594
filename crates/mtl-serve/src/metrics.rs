//! The server's Prometheus metrics, written in the text exposition format (version 0.0.4) by `GET /metrics`:
//!
//! - `mtl_requests_total{endpoint, status}`: requests answered, by endpoint and HTTP status;
//! - `mtl_errors_total{kind}`: errors by the error table's kind;
//! - `mtl_queue_depth`: requests waiting for the model thread;
//! - `mtl_batch_inputs`: a histogram of inputs per model batch;
//! - `mtl_request_duration_seconds{task}`: a histogram of request latency, per task asked for;
//! - generation, per task adapter (`adapter`, empty for none named): `mtl_time_to_first_token_seconds` and
//!   `mtl_inter_token_seconds` (histograms, as the client sees the pieces of text), `mtl_generated_tokens_total`;
//!   and the generator's gauges: running sequences,
//!   key/value blocks in use and in all, decoding steps and the sequences they held (batch occupancy);
//! - the answers' distributions and their drift from the dev set's ([`crate::drift`]): `mtl_predictions_total`,
//!   `mtl_prediction_values`, `mtl_drift_psi`, `mtl_drift_window`, `mtl_drift_alert`, `mtl_drift_threshold`;
//!   with a request log, `mtl_request_log_dropped_total`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Upper bounds of the batch-size buckets, in inputs.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A histogram with fixed buckets.
#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if value <= b {
                *c += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    errors: BTreeMap<String, u64>,
    batches: Histogram,
    latency: BTreeMap<String, Histogram>,
    first_token: BTreeMap<String, Histogram>,
    inter_token: BTreeMap<String, Histogram>,
    generated: BTreeMap<String, u64>,
}

/// Upper bounds of the inter-token buckets, in seconds.
const TOKEN_BUCKETS: [f64; 10] = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56];

/// The counters, shared by the handlers and the model thread.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// A request to `endpoint` answered with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.to_string(), status)).or_default() += 1);
    }

    /// A prediction request for `tasks` answered after `seconds`.
    pub fn latency(&self, tasks: &[String], seconds: f64) {
        self.with(|m| {
            for t in tasks {
                m.latency.entry(t.clone()).or_default().observe(&LATENCY_BUCKETS, seconds);
            }
        });
    }

    /// An error of the error table's `kind`.
    pub fn error(&self, kind: &str) {
        self.with(|m| *m.errors.entry(kind.to_string()).or_default() += 1);
    }

    /// A model batch of `inputs` inputs.
    pub fn batch(&self, inputs: usize) {
        self.with(|m| m.batches.observe(&BATCH_BUCKETS, inputs as f64));
    }

    /// A generation's first piece of text through `adapter`, `seconds` after its request came.
    pub fn first_token(&self, adapter: &str, seconds: f64) {
        self.with(|m| m.first_token.entry(adapter.to_string()).or_default().observe(&LATENCY_BUCKETS, seconds));
    }

    /// A piece of text through `adapter`, `seconds` after the one before it.
    pub fn inter_token(&self, adapter: &str, seconds: f64) {
        self.with(|m| m.inter_token.entry(adapter.to_string()).or_default().observe(&TOKEN_BUCKETS, seconds));
    }

    /// A generation through `adapter` that ended with `tokens` new tokens.
    pub fn generated(&self, adapter: &str, tokens: usize) {
        self.with(|m| *m.generated.entry(adapter.to_string()).or_default() += tokens as u64);
    }

    /// The exposition text, with the current queue depth.
    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP mtl_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE mtl_requests_total counter\n");
            for ((endpoint, status), n) in &m.requests {
                let endpoint = escape(endpoint);
                let _ = writeln!(out, "mtl_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
            }
            out.push_str("# HELP mtl_errors_total Errors, by kind.\n# TYPE mtl_errors_total counter\n");
            for (kind, n) in &m.errors {
                let _ = writeln!(out, "mtl_errors_total{{kind=\"{}\"}} {n}", escape(kind));
            }
            out.push_str("# HELP mtl_queue_depth Requests waiting for the model.\n# TYPE mtl_queue_depth gauge\n");
            let _ = writeln!(out, "mtl_queue_depth {queue_depth}");
            out.push_str("# HELP mtl_batch_inputs Inputs per model batch.\n# TYPE mtl_batch_inputs histogram\n");
            m.batches.write(&mut out, "mtl_batch_inputs", "", &BATCH_BUCKETS);
            out.push_str("# HELP mtl_request_duration_seconds Request latency, per task asked for.\n# TYPE mtl_request_duration_seconds histogram\n");
            for (task, h) in &m.latency {
                h.write(&mut out, "mtl_request_duration_seconds", &format!("task=\"{}\"", escape(task)), &LATENCY_BUCKETS);
            }
            if !m.first_token.is_empty() || !m.generated.is_empty() {
                let label = |adapter: &str| format!("adapter=\"{}\"", escape(adapter));
                out.push_str("# HELP mtl_time_to_first_token_seconds From a generation request to its first text, per adapter.\n# TYPE mtl_time_to_first_token_seconds histogram\n");
                for (adapter, h) in &m.first_token {
                    h.write(&mut out, "mtl_time_to_first_token_seconds", &label(adapter), &LATENCY_BUCKETS);
                }
                out.push_str("# HELP mtl_inter_token_seconds Between consecutive pieces of generated text, per adapter.\n# TYPE mtl_inter_token_seconds histogram\n");
                for (adapter, h) in &m.inter_token {
                    h.write(&mut out, "mtl_inter_token_seconds", &label(adapter), &TOKEN_BUCKETS);
                }
                out.push_str("# HELP mtl_generated_tokens_total Tokens generated by finished requests, per adapter.\n# TYPE mtl_generated_tokens_total counter\n");
                for (adapter, n) in &m.generated {
                    let _ = writeln!(out, "mtl_generated_tokens_total{{{}}} {n}", label(adapter));
                }
            }
        });
        out
    }
}

/// A label value as the exposition format writes it: backslash, double quote and newline escaped.
pub(crate) fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A generator's gauges and counters in the exposition format.
pub fn generator_gauges(s: &crate::generation::GeneratorStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric("mtl_running_sequences", "gauge", "Sequences in the running batch.", s.running.to_string());
    metric("mtl_kv_blocks_used", "gauge", "Key/value cache blocks in use.", s.kv_blocks_used.to_string());
    metric("mtl_kv_blocks_total", "gauge", "Key/value cache blocks in all.", s.kv_blocks_total.to_string());
    metric(
        "mtl_kv_blocks_cached",
        "gauge",
        "Key/value cache blocks kept for prefixes that no sequence holds (free for new ones).",
        s.kv_blocks_cached.to_string(),
    );
    metric(
        "mtl_prompt_tokens_total",
        "counter",
        "Prompt tokens of the admitted requests.",
        s.prompt_tokens.to_string(),
    );
    metric(
        "mtl_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens found in the prefix cache (not computed).",
        s.cached_prompt_tokens.to_string(),
    );
    metric("mtl_decode_steps_total", "counter", "Batched model steps run.", s.steps.to_string());
    metric(
        "mtl_step_sequences_total",
        "counter",
        "Sequences over all steps (divided by the steps: batch occupancy).",
        s.step_sequences.to_string(),
    );
    metric(
        "mtl_generator_healthy",
        "gauge",
        "1 while the generator serves.",
        u8::from(s.failure.is_none()).to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label values are escaped as the exposition format requires, whatever a caller names.
    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.generated("a\"b\\c\nd", 3);
        m.request("/v1/x\"", 200);
        let text = m.render(0);
        assert!(text.contains(r#"mtl_generated_tokens_total{adapter="a\"b\\c\nd"} 3"#), "{text}");
        assert!(text.contains(r#"mtl_requests_total{endpoint="/v1/x\"",status="200"} 1"#), "{text}");
    }
}
