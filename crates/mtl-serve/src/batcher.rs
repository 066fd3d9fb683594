//! The model thread: requests of any tasks queue up in a bounded channel; the thread takes the first, then
//! more as they come (up to a token budget, waiting at most `max_wait` for them), drops those whose client went
//! away, and runs the rest as one batch, each input asking only for its request's tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::Engine;

/// Each input's predictions, by task.
pub type Answers = Vec<BTreeMap<String, serde_json::Value>>;

/// One request: its prepared inputs with their token costs, the tasks it asks for, and where to answer.
pub struct Job<I> {
    pub items: Vec<(I, usize)>,
    pub tasks: BTreeSet<String>,
    pub reply: oneshot::Sender<Result<Answers, crate::EngineError>>,
}

/// How batches are formed.
#[derive(Clone, Copy, Debug)]
pub struct BatchSettings {
    /// Tokens in one batch at most (a single larger request still runs, alone).
    pub max_batch_tokens: usize,
    /// How long the first request of a batch waits for others.
    pub max_wait: Duration,
    /// Requests waiting at most; more are refused (HTTP 429).
    pub queue_bound: usize,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

/// The handle requests are submitted through.
pub struct Batcher<I> {
    sender: SyncSender<Job<I>>,
    depth: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
}

impl<I> Clone for Batcher<I> {
    fn clone(&self) -> Self {
        Self { sender: self.sender.clone(), depth: self.depth.clone(), batches: self.batches.clone() }
    }
}

impl<I: Send + 'static> Batcher<I> {
    /// Starts the model thread over `engine`. It stops when every handle is dropped, after answering what
    /// was queued.
    pub fn start<E: Engine<Item = I>>(engine: Arc<E>, settings: BatchSettings, metrics: Arc<Metrics>) -> Self {
        let (sender, receiver) = sync_channel(settings.queue_bound.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let batches = Arc::new(AtomicUsize::new(0));
        let (d, b) = (depth.clone(), batches.clone());
        std::thread::Builder::new()
            .name("mtl-model".into())
            .spawn(move || run(engine.as_ref(), &receiver, settings, &d, &b, &metrics))
            .expect("the model thread starts");
        Self { sender, depth, batches }
    }

    /// Queues a request, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job<I>) -> Result<(), SubmitError> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        self.sender.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }

    /// Requests queued and not yet taken into a batch.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Batches run so far.
    pub fn batches_run(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }
}

fn run<E: Engine>(
    engine: &E,
    receiver: &Receiver<Job<E::Item>>,
    settings: BatchSettings,
    depth: &AtomicUsize,
    batches: &AtomicUsize,
    metrics: &Metrics,
) {
    while let Ok(first) = receiver.recv() {
        depth.fetch_sub(1, Ordering::SeqCst);
        let started = Instant::now();
        let mut tokens: usize = first.items.iter().map(|i| i.1).sum();
        let mut jobs = vec![first];
        while tokens < settings.max_batch_tokens {
            let Some(left) = settings.max_wait.checked_sub(started.elapsed()) else { break };
            match receiver.recv_timeout(left) {
                Ok(job) => {
                    depth.fetch_sub(1, Ordering::SeqCst);
                    tokens += job.items.iter().map(|i| i.1).sum::<usize>();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // A client that went away (closed its connection, timed out) needs no answer.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let items: Vec<&E::Item> = jobs.iter().flat_map(|j| j.items.iter().map(|i| &i.0)).collect();
        let tasks: Vec<&BTreeSet<String>> =
            jobs.iter().flat_map(|j| std::iter::repeat_n(&j.tasks, j.items.len())).collect();
        batches.fetch_add(1, Ordering::SeqCst);
        metrics.batch(items.len());
        // A panic in the model answers this batch with an error; the thread serves on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.predict(&items, &tasks)))
            .unwrap_or_else(|_| {
                Err(crate::EngineError::Model("the model failed on this batch (a bug; see the server log)".into()))
            });
        match outcome {
            Ok(mut answers) => {
                for job in jobs {
                    let rest = answers.split_off(job.items.len().min(answers.len()));
                    let _ = job.reply.send(Ok(std::mem::replace(&mut answers, rest)));
                }
            }
            Err(e) => {
                tracing::error!("prediction failed: {e}");
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
