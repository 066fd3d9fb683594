//! `mtl serve` as a separate process on loopback, over the tiny model: it answers as `mtl predict` does, and
//! stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::cli::{stderr, Project, TestResult};

/// One HTTP/1.1 request; the status and the JSON body.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let (status, body) = http_text(addr, method, path, body)?;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// One HTTP/1.1 request; the status and the body as text.
pub(crate) fn http_text(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = TcpStream::connect(addr)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    Ok((status, body.to_string()))
}

/// A server process that does not outlive its test, however the test ends.
pub(crate) struct Server(pub(crate) std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mtl ARGS` (a serve command) started in `cwd`, and the address it listens on once it says so.
pub(crate) fn start_server(
    cwd: &std::path::Path,
    args: &[&str],
) -> Result<(Server, String), Box<dyn std::error::Error>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mtl"))
        .args(args)
        .current_dir(cwd)
        .env("MTL_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr_pipe = child.stderr.take().ok_or("stderr")?;
    let server = Server(child);
    let mut lines = BufReader::new(stderr_pipe).lines();
    let addr = loop {
        let line = lines.next().ok_or("the server exited before it listened")??;
        if let Some(rest) = line.split("serving on http://").nth(1) {
            break rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect::<String>();
        }
    };
    // Keep reading its log, so that the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((server, addr))
}

#[test]
fn serve_answers_as_predict_does_and_stops_on_sigterm() -> TestResult {
    let p = Project::new()?;
    let o = p.mtl(&["train", "config.toml", "--out", "run", "--set", "training.epochs=2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    // A bad `[serve]` table is refused before the model loads, naming the file and field.
    std::fs::write(p.path("bad.toml"), "[serve]\nqueue_bound = 0\n")?;
    let o = p.mtl(&["serve", "run", "--config", "bad.toml"])?;
    assert!(
        !o.status.success() && stderr(&o).contains("bad.toml: field `serve.queue_bound`: must be at least 1"),
        "{}",
        stderr(&o)
    );
    let o = p.mtl(&["serve", "run", "--max-inputs", "0"])?;
    assert!(!o.status.success() && stderr(&o).contains("field `serve.max_inputs`"), "{}", stderr(&o));
    // Settings from the file, one flag over them (the file's address is taken, so the flag's must win).
    std::fs::write(p.path("serve.toml"), "[serve]\naddr = \"127.0.0.1:1\"\nmax_wait_ms = 20\n")?;
    let (mut server, addr) =
        start_server(p.dir.path(), &["serve", "run", "--config", "serve.toml", "--addr", "127.0.0.1:0"])?;
    let result = (|| -> TestResult {
        assert_eq!(http(&addr, "GET", "/health", None)?, (200, json!({"status": "ok"})));
        let (status, tasks) = http(&addr, "GET", "/v1/tasks", None)?;
        assert_eq!(status, 200);
        assert_eq!(tasks["tasks"][0]["name"], "intent");
        assert_eq!(tasks["tasks"][1]["kind"], "token_classification");
        let texts = ["show me flights from boston to denver", "what is the fare to paris"];
        let (status, answer) = http(&addr, "POST", "/v1/predict", Some(&json!({"inputs": texts})))?;
        assert_eq!(status, 200, "{answer}");
        let input: String = texts.iter().map(|t| json!({"text": t}).to_string() + "\n").collect();
        let o = crate::cli::mtl(p.dir.path(), &["predict", "--model", "run"], Some(&input))?;
        assert!(o.status.success(), "{}", stderr(&o));
        let expected: Vec<Value> =
            String::from_utf8(o.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        for (got, want) in answer["predictions"].as_array().ok_or("predictions")?.iter().zip(&expected) {
            // The tagger's answer also lists its entities, with character offsets into the text.
            let mut got = got.clone();
            let entities = got["slots"].as_object_mut().and_then(|s| s.remove("entities"));
            assert!(entities.is_some_and(|e| e.is_array()), "{got}");
            assert_eq!(got, want["predictions"], "the server answers as mtl predict");
        }
        let (status, one) = http(&addr, "POST", "/v1/tasks/intent/predict", Some(&json!({"inputs": [texts[0]]})))?;
        assert_eq!(status, 200);
        assert_eq!(one["predictions"][0], json!({"intent": expected[0]["predictions"]["intent"]}));
        let (status, error) = http(&addr, "POST", "/v1/predict", Some(&json!({"inputs": ["  "]})))?;
        assert_eq!((status, error["error"]["kind"].clone()), (422, json!("validation")));
        Ok(())
    })();
    // SIGTERM: the server stops accepting and exits cleanly.
    let term = Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status()?;
    assert!(term.success());
    let status = server.0.wait()?;
    result?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

/// `mtl serve --help` quotes each flag's default; they are `ServeConfig`'s, the one source of the defaults.
#[test]
fn serve_help_quotes_the_serving_config_defaults() -> TestResult {
    let o = crate::cli::mtl(std::path::Path::new("."), &["serve", "--help"], None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8(o.stdout)?;
    let d = mtl_config::ServeConfig::default();
    let want = [
        ("--addr", d.addr.to_string()),
        ("--max-batch-tokens", d.max_batch_tokens.to_string()),
        ("--max-wait-ms", d.max_wait_ms.to_string()),
        ("--queue-bound", d.queue_bound.to_string()),
        ("--max-input-chars", d.max_input_chars.to_string()),
        ("--max-inputs", d.max_inputs.to_string()),
        ("--body-limit", d.body_limit.to_string()),
        ("--timeout-s", d.timeout_s.to_string()),
        ("--header-timeout-s", d.header_timeout_s.to_string()),
        ("--max-connections", d.max_connections.to_string()),
        ("--shutdown-timeout-s", d.shutdown_timeout_s.to_string()),
        ("--max-sequences", d.max_sequences.to_string()),
        ("--prefill-chunk", d.prefill_chunk.to_string()),
        ("--kv-cache-mb", d.kv_cache_mb.to_string()),
        ("--kv-block", d.kv_block.to_string()),
        ("--prefix-cache", d.prefix_cache.to_string()),
    ];
    for (flag, value) in want {
        // The flag's paragraph: from its line to the next flag.
        let at = help.find(&format!("{flag} <")).ok_or(format!("{flag} is not in the help"))?;
        let paragraph = help[at..].split("\n  -").next().unwrap_or_default();
        assert!(paragraph.contains(&format!("[default: {value}]")), "{flag}: {paragraph}");
    }
    Ok(())
}
