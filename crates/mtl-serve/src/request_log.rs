//! Opt-in request logging (`serve.request_log`): a sampled share of the answered prediction requests, one JSON
//! line each, with e-mail addresses, phone numbers and long digit runs masked in every text.
//!
//! A line: `{"time": UNIX_SECONDS, "endpoint", "tasks": [...], "inputs": [...], "status": 200,
//! "seconds": LATENCY, "predictions": [...]}` (`"error": KIND` instead of the predictions for a refused or
//! failed request). Lines are written by a thread of their own, so a slow disk never holds up an answer; when
//! it falls more than 1,024 lines behind, new lines are dropped and counted (`mtl_request_log_dropped_total`).

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

/// Lines waiting for the writer at most.
const BACKLOG: usize = 1024;

static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").expect("valid"));
/// A phone number: an optional `+`, then at least 7 digits with spaces, dots, dashes or brackets between.
static PHONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\+?\(?\d(?:[\s.()-]{0,2}\d){6,}").expect("valid"));
/// Five digits or more in a row (account, card and ID numbers).
static DIGITS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\d{5,}").expect("valid"));

/// `text` with e-mail addresses as `[EMAIL]`, runs of five digits or more as `[NUMBER]`, and phone numbers
/// written with separators as `[PHONE]`.
pub fn mask(text: &str) -> Cow<'_, str> {
    let masked = EMAIL.replace_all(text, "[EMAIL]");
    let masked = match DIGITS.replace_all(&masked, "[NUMBER]") {
        Cow::Borrowed(_) => masked,
        Cow::Owned(s) => Cow::Owned(s),
    };
    match PHONE.replace_all(&masked, "[PHONE]") {
        Cow::Borrowed(_) => masked,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

/// Masks every string in `value`, keys of objects excepted (they are the API's own names).
pub fn mask_value(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(m) = mask(s) {
                *s = m;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_value),
        Value::Object(map) => map.values_mut().for_each(mask_value),
        _ => {}
    }
}

/// The log: its writer thread's queue, and which requests it samples.
pub struct RequestLog {
    path: PathBuf,
    sender: SyncSender<String>,
    sample: f64,
    seen: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog").field("path", &self.path).field("sample", &self.sample).finish()
    }
}

impl RequestLog {
    /// Opens `path` for appending (creating it) and starts the writer; `sample` is the share of requests
    /// logged, in (0, 1].
    pub fn open(path: &Path, sample: f64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let (sender, receiver) = sync_channel::<String>(BACKLOG);
        let shown = path.display().to_string();
        std::thread::Builder::new().name("mtl-request-log".into()).spawn(move || {
            let mut out = std::io::LineWriter::new(file);
            for line in receiver {
                if let Err(e) = writeln!(out, "{line}") {
                    tracing::error!("request log {shown}: {e}; logging stops");
                    return;
                }
            }
        })?;
        Ok(Self { path: path.to_owned(), sender, sample, seen: AtomicU64::new(0), dropped: AtomicU64::new(0) })
    }

    /// Whether to log the next request: a share `sample` of them, spread evenly at random (a hash of the
    /// request's number).
    pub fn sampled(&self) -> bool {
        if self.sample >= 1.0 {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        // splitmix64's finaliser: the request numbers' hashes are spread evenly over the 64-bit range.
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.sample
    }

    /// Writes `record` with its texts masked (dropped, and counted, when the writer is too far behind).
    pub fn write(&self, mut record: Value) {
        mask_value(&mut record);
        match self.sender.try_send(record.to_string()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn personal_data_is_masked() {
        let cases = [
            ("write to jane.doe+ml@mail.example.co.uk today", "write to [EMAIL] today"),
            ("call +1 (555) 123-4567 or 555.123.4567", "call [PHONE] or [PHONE]"),
            ("call 020 7946 0958 now", "call [PHONE] now"),
            ("card 4111111111111111, order 12345", "card [NUMBER], order [NUMBER]"),
            (
                "flights from boston to denver at 8 pm on may 12 1994",
                "flights from boston to denver at 8 pm on may 12 1994",
            ),
            ("flight 1234 on the 3rd", "flight 1234 on the 3rd"),
        ];
        for (text, want) in cases {
            assert_eq!(mask(text), want, "{text}");
        }
        let mut v = json!({"inputs": [{"text": "mail a@b.io"}], "n": 12345678, "tasks": ["intent"]});
        mask_value(&mut v);
        assert_eq!(v, json!({"inputs": [{"text": "mail [EMAIL]"}], "n": 12345678, "tasks": ["intent"]}));
    }

    #[test]
    fn sampling_keeps_about_the_share_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RequestLog::open(&dir.path().join("log.jsonl"), 0.1).expect("opens");
        let kept = (0..10_000).filter(|_| log.sampled()).count();
        assert!((900..1100).contains(&kept), "{kept}");
        let all = RequestLog::open(&dir.path().join("all.jsonl"), 1.0).expect("opens");
        assert!((0..100).all(|_| all.sampled()));
    }
}
