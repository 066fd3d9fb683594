//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "mtl", version, about = "Fine-tune one pretrained transformer on many NLP tasks at once, and use it")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log lines on stderr: -v debug, -vv trace (MTL_LOG, when set, wins: e.g. MTL_LOG=mtl=debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors only, -qq errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
}

impl Cli {
    /// The log filter the flags ask for.
    pub fn log_level(&self) -> &'static str {
        match (self.verbose, self.quiet) {
            (0, 0) => "info",
            (1, _) => "debug",
            (v, _) if v > 1 => "trace",
            (_, 1) => "warn",
            _ => "error",
        }
    }
}

/// Which checkpoints a run keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Select {
    Joint,
    PerTask,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a multi-task model and write its checkpoint and metrics to --out.
    Train {
        /// The run config (TOML).
        config: PathBuf,
        /// Output directory; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// Override a config value, e.g. --set training.lr=3e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Train only these tasks of the config (comma-separated), e.g. a single-task baseline.
        #[arg(long, value_delimiter = ',', value_name = "TASK,...")]
        tasks: Vec<String>,
        /// `joint`: keep the weights of the best weighted score (each task's best head is saved under
        /// heads/ as well). `per-task`: also write a whole checkpoint per task, at that task's best
        /// evaluation, under per-task/TASK/. With per-task adapters on a frozen backbone the saved model
        /// then takes each task's adapter and head from its own best evaluation (early stopping per task).
        #[arg(long, value_enum, default_value = "joint")]
        select: Select,
        /// Continue the run in --out from its newest training checkpoint (`checkpoint-STEP/`), exactly as
        /// if it had never stopped; give the same config and --set overrides.
        #[arg(long)]
        resume: bool,
        /// With --resume: go on even if a data file changed since the run started (its SHA-256 is in
        /// --out/data.json); without it, that is an error naming the files.
        #[arg(long, requires = "resume")]
        accept_changed_data: bool,
        /// Also train each task alone with the same recipe (under --out/baselines/TASK/) and write
        /// baselines.json with the negative-transfer table: per task, joint minus alone.
        #[arg(long)]
        baselines: bool,
        /// Pause after epoch N: its evaluation and checkpoint are written and `mtl train` exits with status
        /// 130, as after Ctrl-C; the learning-rate schedule stays that of `training.epochs`, and `--resume`
        /// goes on from there (`mtl tune` trains its trials in such steps).
        #[arg(long, value_name = "N")]
        stop_after_epoch: Option<usize>,
    },
    /// Train some of a model's tasks further on new or changed data while protecting the others: rehearsal (a
    /// share of their training examples replayed), a pull toward the old weights (L2-SP or EWC), or both, as
    /// the file's `[update]` table says. Prints every task's dev and test score before and after; refuses,
    /// writing nothing, when a protected task falls more than `update.tolerance` points.
    Update {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// `[tasks.NAME]` tables of tasks the model has (their new data), optionally `[training]` (the update's
        /// recipe) and `[update]` (rehearsal, penalty, strength, fisher_examples, tolerance).
        #[arg(long)]
        config: PathBuf,
        /// Output directory; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// Override a value, e.g. --set update.rehearsal=0 or --set training.epochs=2 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Search hyper-parameters over the config keys a space file names (`examples/atis/space.toml`): grid,
    /// random, or ASHA (successive halving that pauses weak trials at each rung and resumes the best); each
    /// trial is a separate `mtl train` under --out/trials/. Writes tune.json (resumable state), trials.jsonl,
    /// report.html and best.toml (the best trial's config).
    Tune {
        /// The run config (TOML) every trial starts from.
        config: PathBuf,
        /// The search space (TOML): `[search]` (method, trials, metric, ASHA's rungs, budget) and `[params]`.
        #[arg(long)]
        space: PathBuf,
        /// Output directory; it must not exist yet (unless --resume).
        #[arg(long)]
        out: PathBuf,
        /// Override a config value for every trial, e.g. --set training.seed=1 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue the search in --out after a kill or Ctrl-C (the trial that was training resumes from its
        /// checkpoint); give the same config and --set overrides.
        #[arg(long)]
        resume: bool,
    },
    /// Write a starter config from data files: their format, fields and task kinds are guessed (and said),
    /// and the config is checked as `mtl check` does.
    Init {
        /// Data files (JSON lines, CSV, TSV, CoNLL, CoNLL-U); `train`, `dev`/`valid` and `test` in a file's
        /// name say its split, and files that differ only by it are one dataset.
        #[arg(required = true)]
        data: Vec<PathBuf>,
        /// Where to write the config.
        #[arg(long, default_value = "config.toml")]
        out: PathBuf,
        /// The base model (a Hugging Face encoder directory); the default encoder otherwise.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Read and check a config's data without training: examples per task and split, the label set and its
    /// distribution, rare labels, dev/test labels outside the training set, inputs cut at model.max_len, and
    /// the time an epoch of training takes here (timed on a few steps of a sample).
    Check {
        /// The run config (TOML).
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Skip the estimate of an epoch's time (it trains a few steps on a sample of the data).
        #[arg(long)]
        no_estimate: bool,
    },
    /// Score a trained model on the dev and test files of a config; prints {"dev": …, "test": …} as JSON.
    Eval {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// The config whose data files to score [default: the run's own, MODEL/mtl.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Also (re)write MODEL/drift-reference.json from the dev files, which `mtl serve` compares its answers
        /// with (for runs trained before drift monitoring).
        #[arg(long)]
        drift_reference: bool,
    },
    /// Predict every task for each input line: JSON objects with "text" (or "words"), or plain text.
    Predict {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// Read inputs from this file instead of standard input.
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Print scores and probabilities unrounded (4 decimals otherwise).
        #[arg(long)]
        full_precision: bool,
    },
    /// Explain every task's prediction for each input line (read as `mtl predict` reads them): integrated
    /// gradients and gradient × input per token and per word, one JSON object a line.
    Explain {
        /// A checkpoint directory written by `mtl train` (an encoder run).
        #[arg(long)]
        model: PathBuf,
        /// Read inputs from this file instead of standard input.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Explain these tasks only (comma-separated; every task by default).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Points on the integrated-gradients path (more: a smaller completeness error, proportionally slower).
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Where the path starts: `pad` (every token but the special ones replaced by padding), `mask`, or
        /// `zero` (all-zero word embeddings).
        #[arg(long, default_value = "pad")]
        baseline: mtl::BaselineKind,
        /// Token tasks: explain every word's tag, not only the words tagged other than O.
        #[arg(long)]
        all_words: bool,
        /// Also write an HTML page that colours the words.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Train new tasks onto a trained model, with everything it has frozen: each new task gets a head (and,
    /// on a model with per-task adapters, its own adapter); the old tasks predict exactly as before.
    AddTask {
        /// A checkpoint directory written by `mtl train` (or `mtl add-task`).
        #[arg(long)]
        model: PathBuf,
        /// The new tasks: `[tasks.NAME]` tables, and optionally a `[training]` recipe (the model's otherwise).
        #[arg(long)]
        config: PathBuf,
        /// Output directory for the model with all its tasks; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// Override a value of the combined config, e.g. --set training.epochs=5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Serve every task of a trained model over HTTP (GET /health, GET /v1/tasks, POST /v1/predict,
    /// POST /v1/tasks/TASK/predict), batching requests of different tasks into shared backbone passes.
    Serve {
        /// A checkpoint directory written by `mtl train`.
        model: PathBuf,
        /// A TOML file whose `[serve]` table holds these settings (same names, with underscores); the flags
        /// below win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: Box<ServeFlags>,
    },
    /// Quantise a trained model's encoder to int8 for inference (one scale per output channel of each linear
    /// layer; on a CPU with AMX-INT8 or AVX2 the activations are quantised per token and the products run
    /// int8 × int8, elsewhere weight-only); prints each task's score change on the test (and dev) sets and writes the model to
    /// --out, which `mtl predict`, `mtl eval` and `mtl serve` load like any other.
    Quantize {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// Output directory; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// Score on this config's data files instead of those the model was trained with.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Drop the top N encoder layers of a trained model (model cutting); prints each task's score change on
    /// the test (and dev) sets and writes the smaller model to --out.
    Prune {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// How many of the top layers to drop.
        #[arg(long)]
        layers: usize,
        /// Output directory; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// Score on this config's data files instead of those the model was trained with.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Generate text with a decoder model (a Llama-architecture GGUF file, or a directory with one), streamed
    /// to standard output.
    Generate {
        /// A .gguf file, or a directory holding one.
        #[arg(long)]
        model: PathBuf,
        /// The prompt (standard input when left out).
        #[arg(long)]
        prompt: Option<String>,
        /// Send the prompt as the user's turn of the model's chat template.
        #[arg(long)]
        chat: bool,
        /// With --chat, a system turn before it.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        /// Seeds sampling: the same seed gives the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop where this text appears (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Describe a trained run: its manifest (architecture, weights, tasks, base model) and what it can do, as
    /// JSON ({"manifest": …, "capabilities": …}; an operation it cannot do carries the reason).
    Info {
        /// A run directory written by `mtl train`.
        model: PathBuf,
    },
    /// Write each task of a trained model as a Hugging Face transformers model directory, OUT/TASK/
    /// in the base model's family (…ForSequenceClassification, …ForTokenClassification or
    /// …ForQuestionAnswering of BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT, MPNet, DeBERTa-v2 or ModernBERT;
    /// LoRA merged).
    Export {
        /// A checkpoint directory written by `mtl train`.
        #[arg(long)]
        model: PathBuf,
        /// Output directory; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a completion script for a shell: `mtl completions bash > ~/.local/share/bash-completion/completions/mtl`
    /// (zsh: into a directory of `$fpath` as `_mtl`; fish: `~/.config/fish/completions/mtl.fish`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `mtl serve`'s settings as flags; each wins over the same key of `--config`'s `[serve]` table, and the
/// defaults are `mtl_config::ServeConfig`'s.
#[derive(Debug, clap::Args)]
pub struct ServeFlags {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// Tokens in one model batch at most [default: 8192].
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// How long the first request of a batch waits for others, in milliseconds [default: 5].
    #[arg(long)]
    pub max_wait_ms: Option<u64>,
    /// Requests waiting for the model at most; more get 429 [default: 256].
    #[arg(long)]
    pub queue_bound: Option<usize>,
    /// Characters of one input at most (longer ones get 422) [default: 10000].
    #[arg(long)]
    pub max_input_chars: Option<usize>,
    /// Inputs of one request at most [default: 256].
    #[arg(long)]
    pub max_inputs: Option<usize>,
    /// Bytes of a request body at most (larger ones get 413) [default: 2097152].
    #[arg(long)]
    pub body_limit: Option<usize>,
    /// Seconds a request may wait for its answer (then 503) [default: 30].
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// A file of API keys, one per line; requests then need `Authorization: Bearer KEY` (401 otherwise).
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// Threads of the HTTP runtime [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Host names the server answers (comma-separated; other `Host` headers get 403) [default: any].
    #[arg(long, value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    /// Origins web pages may call the API from (CORS; comma-separated; `*` for any) [default: none].
    #[arg(long, value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// Seconds a client has to send a request's headers, and a kept-alive connection may idle [default: 10].
    #[arg(long)]
    pub header_timeout_s: Option<u64>,
    /// Connections at once at most; more are answered 503 and closed [default: 1024].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds the requests in flight get to finish after SIGTERM; then 503 [default: 20].
    #[arg(long)]
    pub shutdown_timeout_s: Option<u64>,
    /// Decoder models: sequences decoded together in one step at most [default: 32].
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Decoder models: prompt tokens run in one step at most (longer prompts run in chunks) [default: 512].
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Decoder models: memory for the key/value cache, in MiB [default: 1024].
    #[arg(long)]
    pub kv_cache_mb: Option<usize>,
    /// Decoder models: positions per key/value cache block [default: 16].
    #[arg(long)]
    pub kv_block: Option<usize>,
    /// Decoder models: keep prompts' key/value blocks for later requests that start with the same tokens
    /// [default: true].
    #[arg(long)]
    pub prefix_cache: Option<bool>,
    /// Drift monitoring: answers per task statistic in the window compared with the dev set's [default: 1000].
    #[arg(long)]
    pub drift_window: Option<usize>,
    /// Drift monitoring: the population stability index over which a full window raises the alert
    /// [default: 0.25].
    #[arg(long)]
    pub drift_threshold: Option<f64>,
    /// Log prediction requests to this file, one JSON line each, with e-mail addresses, phone numbers and long
    /// digit runs masked [default: none].
    #[arg(long)]
    pub request_log: Option<PathBuf>,
    /// The share of prediction requests logged, in (0, 1] [default: 1].
    #[arg(long)]
    pub request_log_sample: Option<f64>,
    /// Encoder runs: answer POST /v1/explain (integrated gradients per word, as `mtl explain`) [default: false].
    #[arg(long)]
    pub explain: Option<bool>,
}
