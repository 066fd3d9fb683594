//! Serving settings: the `[serve]` table of a serving config (`mtl serve MODEL --config serve.toml`). Every
//! key is also a flag of `mtl serve` (`max_batch_tokens` is `--max-batch-tokens`), and a flag wins over the
//! file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Tokens in one model batch at most.
    pub max_batch_tokens: usize,
    /// How long the first request of a batch waits for others, in milliseconds.
    pub max_wait_ms: u64,
    /// Requests waiting for the model at most; more get 429 with Retry-After.
    pub queue_bound: usize,
    /// Characters of one input at most (longer ones get 422).
    pub max_input_chars: usize,
    /// Inputs of one request at most.
    pub max_inputs: usize,
    /// Bytes of a request body at most (larger ones get 413).
    pub body_limit: usize,
    /// Seconds a request may wait for its answer (then 503).
    pub timeout_s: u64,
    /// A file of API keys, one per line (relative to the config file); requests then need
    /// `Authorization: Bearer KEY`.
    pub api_keys: Option<PathBuf>,
    /// Threads of the HTTP runtime (default: one per core).
    pub threads: Option<usize>,
    /// Host names (the `Host` header without its port) the server answers; other hosts get 403. Empty: any.
    /// Set it to the names the server is reached by, against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Origins web pages may call the API from (CORS), as `https://app.example.com`; `*` for any. Empty: none
    /// (browsers then refuse cross-site calls that need asking first).
    pub cors_origins: Vec<String>,
    /// Seconds a client has to send a request's headers, and that a kept-alive connection may stay idle
    /// between requests (then it is closed).
    pub header_timeout_s: u64,
    /// Connections at once at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Seconds the requests in flight get to finish after SIGTERM; those still running then get 503.
    pub shutdown_timeout_s: u64,
    /// Decoder models: sequences decoded together in one step at most.
    pub max_sequences: usize,
    /// Decoder models: prompt tokens run in one step at most; a longer prompt is run in chunks between
    /// decoding steps, so running streams do not stall behind it.
    pub prefill_chunk: usize,
    /// Decoder models: memory for the key/value cache, in MiB (f32); a request is admitted when its prompt and
    /// `max_new_tokens` fit in the free part.
    pub kv_cache_mb: usize,
    /// Decoder models: positions per key/value cache block.
    pub kv_block: usize,
    /// Decoder models: keep the key/value blocks of prompts (and answers) after their request ends, so a
    /// request that starts with the same tokens under the same adapter computes only the rest (prefix
    /// caching); kept blocks give way to new requests when the cache is full.
    pub prefix_cache: bool,
    /// Drift monitoring: answers per task statistic (class, tag, score, value, …) in the window that is
    /// compared with the dev set's answers saved at training time (`drift-reference.json`), by the population
    /// stability index (`mtl_drift_psi` in `/metrics`).
    pub drift_window: usize,
    /// Drift monitoring: the PSI over which a full window raises `mtl_drift_alert` and logs a warning (0.1 to
    /// 0.25 is read as a moderate shift, over 0.25 as a significant one).
    pub drift_threshold: f64,
    /// A file (relative to the config file) to log prediction requests to, one JSON line each: endpoint,
    /// tasks, inputs, answers or error, status and latency, with e-mail addresses, phone numbers and runs of
    /// five digits or more masked. Unset: nothing is logged.
    pub request_log: Option<PathBuf>,
    /// The share of prediction requests logged to `request_log`, in (0, 1].
    pub request_log_sample: f64,
    /// Encoder runs: answer `POST /v1/explain` (integrated gradients and gradient × input of each task's
    /// answer, as `mtl explain` gives them). Off by default: an explanation costs a forward and a backward
    /// pass per path step, and a second, dropout-free copy of the model is loaded for it. One explanation
    /// runs at a time; another request meanwhile is answered 429.
    pub explain: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch_tokens: 8192,
            max_wait_ms: 5,
            queue_bound: 256,
            max_input_chars: 10_000,
            max_inputs: 256,
            body_limit: 2 << 20,
            timeout_s: 30,
            api_keys: None,
            threads: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            header_timeout_s: 10,
            max_connections: 1024,
            shutdown_timeout_s: 20,
            max_sequences: 32,
            prefill_chunk: 512,
            kv_cache_mb: 1024,
            kv_block: 16,
            prefix_cache: true,
            drift_window: 1000,
            drift_threshold: 0.25,
            request_log: None,
            request_log_sample: 1.0,
            explain: false,
        }
    }
}

/// Settings given another way (command-line flags): each one that is set wins over the config's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServeOverrides {
    pub addr: Option<SocketAddr>,
    pub max_batch_tokens: Option<usize>,
    pub max_wait_ms: Option<u64>,
    pub queue_bound: Option<usize>,
    pub max_input_chars: Option<usize>,
    pub max_inputs: Option<usize>,
    pub body_limit: Option<usize>,
    pub timeout_s: Option<u64>,
    pub api_keys: Option<PathBuf>,
    pub threads: Option<usize>,
    pub allowed_hosts: Option<Vec<String>>,
    pub cors_origins: Option<Vec<String>>,
    pub header_timeout_s: Option<u64>,
    pub max_connections: Option<usize>,
    pub shutdown_timeout_s: Option<u64>,
    pub max_sequences: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub kv_cache_mb: Option<usize>,
    pub kv_block: Option<usize>,
    pub prefix_cache: Option<bool>,
    pub drift_window: Option<usize>,
    pub drift_threshold: Option<f64>,
    pub request_log: Option<PathBuf>,
    pub request_log_sample: Option<f64>,
    pub explain: Option<bool>,
}

/// A serve config file: its one table, `[serve]`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeFile {
    /// The server's settings; a command-line flag replaces the key it names.
    #[serde(default)]
    serve: ServeConfig,
}

impl ServeConfig {
    /// The one place where other settings merge over the config: each override that is set replaces its key.
    pub fn merge(&mut self, o: ServeOverrides) {
        self.addr = o.addr.unwrap_or(self.addr);
        self.max_batch_tokens = o.max_batch_tokens.unwrap_or(self.max_batch_tokens);
        self.max_wait_ms = o.max_wait_ms.unwrap_or(self.max_wait_ms);
        self.queue_bound = o.queue_bound.unwrap_or(self.queue_bound);
        self.max_input_chars = o.max_input_chars.unwrap_or(self.max_input_chars);
        self.max_inputs = o.max_inputs.unwrap_or(self.max_inputs);
        self.body_limit = o.body_limit.unwrap_or(self.body_limit);
        self.timeout_s = o.timeout_s.unwrap_or(self.timeout_s);
        self.api_keys = o.api_keys.or(self.api_keys.take());
        self.threads = o.threads.or(self.threads);
        self.allowed_hosts = o.allowed_hosts.unwrap_or(std::mem::take(&mut self.allowed_hosts));
        self.cors_origins = o.cors_origins.unwrap_or(std::mem::take(&mut self.cors_origins));
        self.header_timeout_s = o.header_timeout_s.unwrap_or(self.header_timeout_s);
        self.max_connections = o.max_connections.unwrap_or(self.max_connections);
        self.shutdown_timeout_s = o.shutdown_timeout_s.unwrap_or(self.shutdown_timeout_s);
        self.max_sequences = o.max_sequences.unwrap_or(self.max_sequences);
        self.prefill_chunk = o.prefill_chunk.unwrap_or(self.prefill_chunk);
        self.kv_cache_mb = o.kv_cache_mb.unwrap_or(self.kv_cache_mb);
        self.kv_block = o.kv_block.unwrap_or(self.kv_block);
        self.prefix_cache = o.prefix_cache.unwrap_or(self.prefix_cache);
        self.drift_window = o.drift_window.unwrap_or(self.drift_window);
        self.drift_threshold = o.drift_threshold.unwrap_or(self.drift_threshold);
        self.request_log = o.request_log.or(self.request_log.take());
        self.request_log_sample = o.request_log_sample.unwrap_or(self.request_log_sample);
        self.explain = o.explain.unwrap_or(self.explain);
    }

    /// The `[serve]` table of `path`, checked; relative `api_keys` and `request_log` paths are taken relative
    /// to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `path` names the file in errors and anchors a relative `api_keys`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: ServeFile = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_string() })?;
        let mut config = file.serve;
        if let Some(dir) = path.parent() {
            for file in [&mut config.api_keys, &mut config.request_log].into_iter().flatten() {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the values (after flags are applied too); errors name the field.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field: format!("serve.{field}"),
            message: message.into(),
        };
        let at_least_one = [
            ("max_batch_tokens", self.max_batch_tokens as u64),
            ("queue_bound", self.queue_bound as u64),
            ("max_input_chars", self.max_input_chars as u64),
            ("max_inputs", self.max_inputs as u64),
            ("timeout_s", self.timeout_s),
            ("threads", self.threads.map_or(1, |t| t as u64)),
            ("header_timeout_s", self.header_timeout_s),
            ("max_connections", self.max_connections as u64),
            ("shutdown_timeout_s", self.shutdown_timeout_s),
            ("max_sequences", self.max_sequences as u64),
            ("prefill_chunk", self.prefill_chunk as u64),
            ("kv_cache_mb", self.kv_cache_mb as u64),
            ("kv_block", self.kv_block as u64),
            ("drift_window", self.drift_window as u64),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        let host = |h: &str| {
            let v6 = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
            !h.is_empty() && !h.contains(['/', ' ']) && (!h.contains(':') || v6.parse::<std::net::Ipv6Addr>().is_ok())
        };
        if let Some(h) = self.allowed_hosts.iter().find(|h| !host(h)) {
            return Err(invalid("allowed_hosts", &format!("{h:?} is not a host name or address (no port, no scheme)")));
        }
        let origin = |o: &str| {
            o == "*"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o.ends_with('/')
                    && o.bytes().all(|b| b.is_ascii_graphic()))
        };
        if let Some(o) = self.cors_origins.iter().find(|o| !origin(o)) {
            return Err(invalid("cors_origins", &format!("{o:?} is not an origin (`https://host[:port]`, or `*`)")));
        }
        if self.body_limit < 1024 {
            return Err(invalid("body_limit", "must be at least 1024 bytes"));
        }
        if !(self.drift_threshold.is_finite() && self.drift_threshold > 0.0) {
            return Err(invalid("drift_threshold", "must be a number above 0"));
        }
        if !(self.request_log_sample > 0.0 && self.request_log_sample <= 1.0) {
            return Err(invalid("request_log_sample", "must be in (0, 1]: the share of requests logged"));
        }
        if self.max_wait_ms > 60_000 {
            return Err(invalid("max_wait_ms", "must be at most 60000 (a minute)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::parse(text, Path::new("conf/serve.toml"))
    }

    #[test]
    fn defaults_and_relative_key_files() -> Result<(), ConfigError> {
        assert_eq!(parse("")?, ServeConfig::default());
        let c = parse("[serve]\naddr = \"0.0.0.0:9000\"\nqueue_bound = 8\napi_keys = \"keys.txt\"\n")?;
        assert_eq!(c.addr.port(), 9000);
        assert_eq!(c.queue_bound, 8);
        assert_eq!(c.api_keys, Some(PathBuf::from("conf/keys.txt")));
        assert_eq!(c.max_batch_tokens, 8192, "unset keys keep their defaults");
        let c = parse("[serve]\nallowed_hosts = [\"localhost\", \"[::1]\", \"::1\", \"10.0.0.2\"]\n")?;
        assert_eq!(c.allowed_hosts.len(), 4, "IPv6 addresses, bracketed or not");
        let c = parse("[serve]\nrequest_log = \"logs/requests.jsonl\"\nrequest_log_sample = 0.1\n")?;
        assert_eq!(c.request_log, Some(PathBuf::from("conf/logs/requests.jsonl")));
        Ok(())
    }

    /// The example serving config spells out every default.
    #[test]
    fn the_example_config_is_the_defaults() -> Result<(), ConfigError> {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/serve/serve.toml");
        assert_eq!(ServeConfig::load(&example)?, ServeConfig::default());
        Ok(())
    }

    #[test]
    fn serve_errors_snapshot() {
        let cases = [
            (
                "[serve]\nqueue_bound = 4\nqueue_size = 8\n",
                "invalid config conf/serve.toml: TOML parse error at line 3, column 1\n  |\n3 | queue_size = 8\n  | ^^^^^^^^^^\nunknown field `queue_size`, expected one of `addr`, `max_batch_tokens`, `max_wait_ms`, `queue_bound`, `max_input_chars`, `max_inputs`, `body_limit`, `timeout_s`, `api_keys`, `threads`, `allowed_hosts`, `cors_origins`, `header_timeout_s`, `max_connections`, `shutdown_timeout_s`, `max_sequences`, `prefill_chunk`, `kv_cache_mb`, `kv_block`, `prefix_cache`, `drift_window`, `drift_threshold`, `request_log`, `request_log_sample`, `explain`",
            ),
            ("[serve]\nqueue_bound = 0\n", "invalid config conf/serve.toml: field `serve.queue_bound`: must be at least 1"),
            ("[serve]\nbody_limit = 10\n", "invalid config conf/serve.toml: field `serve.body_limit`: must be at least 1024 bytes"),
            ("[serve]\nthreads = 0\n", "invalid config conf/serve.toml: field `serve.threads`: must be at least 1"),
            (
                "[serve]\nrequest_log_sample = 0.0\n",
                "invalid config conf/serve.toml: field `serve.request_log_sample`: must be in (0, 1]: the share of requests logged",
            ),
            ("[serve]\ndrift_threshold = -1.0\n", "invalid config conf/serve.toml: field `serve.drift_threshold`: must be a number above 0"),
            (
                "[serve]\nallowed_hosts = [\"localhost:8080\"]\n",
                "invalid config conf/serve.toml: field `serve.allowed_hosts`: \"localhost:8080\" is not a host name or address (no port, no scheme)",
            ),
            (
                "[serve]\ncors_origins = [\"app.example.com\"]\n",
                "invalid config conf/serve.toml: field `serve.cors_origins`: \"app.example.com\" is not an origin (`https://host[:port]`, or `*`)",
            ),
            ("[serve]\nshutdown_timeout_s = 0\n", "invalid config conf/serve.toml: field `serve.shutdown_timeout_s`: must be at least 1"),
            (
                "[serve]\naddr = \"localhost\"\n",
                "invalid config conf/serve.toml: TOML parse error at line 2, column 8\n  |\n2 | addr = \"localhost\"\n  |        ^^^^^^^^^^^\ninvalid socket address syntax",
            ),
            (
                "[server]\n",
                "invalid config conf/serve.toml: TOML parse error at line 1, column 2\n  |\n1 | [server]\n  |  ^^^^^^\nunknown field `server`, expected `serve`",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).expect_err("invalid").to_string();
            assert_eq!(got, want, "for {text:?}");
        }
    }
}
