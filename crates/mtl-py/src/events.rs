//! The worker that runs each call, and what it reports on the way: the library's progress (its sink) and its
//! `tracing` records are queued here by whichever thread makes them, and handed to Python by the thread that
//! waits for the call (Python code runs only there, with the GIL).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What a call reports while it runs.
enum Event {
    Progress(mtl::Progress),
    /// A `tracing` record: Python's `logging` level number, and the message with its fields.
    Log {
        level: u32,
        message: String,
    },
    /// The call's work is done (its result is in the channel).
    Done,
}

/// Events beyond this many (none delivered for a long while) replace the oldest.
const MAX_QUEUED: usize = 100_000;
/// How often the waiting thread looks for Ctrl-C when nothing is reported.
const POLL: Duration = Duration::from_millis(100);

/// The events of the calls, each with the number of the call that made it.
static QUEUE: Mutex<VecDeque<(u64, Event)>> = Mutex::new(VecDeque::new());
static READY: Condvar = Condvar::new();
/// One call's work at a time: calls from several Python threads wait for each other, and a call waits for
/// the work of one abandoned before it (Ctrl-C) to end. Events are the running call's.
static WORK: Mutex<()> = Mutex::new(());
/// The number of the call whose work runs (0: none).
static RUNNING: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

fn push(event: Event) {
    push_as(RUNNING.load(Ordering::SeqCst), event);
}

fn push_as(call: u64, event: Event) {
    let mut queue = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    if queue.len() >= MAX_QUEUED {
        queue.pop_front();
    }
    queue.push_back((call, event));
    READY.notify_all();
}

/// The events of call `call` queued, waiting up to `timeout` for one; other calls' events are dropped.
fn wait(call: u64, timeout: Duration) -> Vec<Event> {
    let mut queue = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    if queue.is_empty() {
        queue = READY.wait_timeout(queue, timeout).unwrap_or_else(|e| e.into_inner()).0;
    }
    queue.drain(..).filter(|(c, _)| *c == call).map(|(_, e)| e).collect()
}

/// Routes the library's progress and logs here (at the first call, not at import: the `mtl` command of the
/// package imports this module too, and draws and logs on the terminal as the binary does): progress bars of evaluation and prediction are
/// on (the caller chooses whether to show them), and the log level is `MTL_LOG` (`info` if unset), after
/// which Python's `logging` (logger `mtl`) filters as configured.
fn install() {
    mtl::set_progress_sink(Some(Arc::new(|p| push(Event::Progress(p)))));
    mtl::show_item_progress(true);
    let filter = tracing_subscriber::EnvFilter::try_from_env("MTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry().with(filter).with(QueueLogs).try_init();
}

/// A `tracing` layer that queues each record for Python's `logging`.
struct QueueLogs;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QueueLogs {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => 40,
            tracing::Level::WARN => 30,
            tracing::Level::INFO => 20,
            tracing::Level::DEBUG => 10,
            tracing::Level::TRACE => 5,
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        push(Event::Log { level, message: fields.message + &fields.rest });
    }
}

/// A record's message, then its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            name => self.rest += &format!(" {name}={value:?}"),
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            name => self.rest += &format!(" {name}={value}"),
        }
    }
}

/// Hands `events` to Python: progress to `on_event` (a tuple: `("start", what, total, unit)`,
/// `("position", position, message)`, `("line", text)`, `("finish",)`), logs to the logger `mtl`. An
/// exception in the callback is reported as unraisable rather than ending the call, except `KeyboardInterrupt`
/// (Ctrl-C while Python code ran), which is returned. Also says whether the work is done.
fn deliver(py: Python<'_>, on_event: Option<&Py<PyAny>>, events: Vec<Event>) -> (bool, Option<PyErr>) {
    let (mut done, mut interrupt) = (false, None);
    for event in events {
        let delivered = match event {
            Event::Progress(progress) => match on_event {
                None => Ok(()),
                Some(callback) => progress_tuple(py, progress).and_then(|t| callback.call1(py, (t,)).map(drop)),
            },
            Event::Log { level, message } => py
                .import("logging")
                .and_then(|logging| logging.call_method1("getLogger", ("mtl",)))
                .and_then(|logger| logger.call_method1("log", (level, message)).map(drop)),
            Event::Done => {
                done = true;
                Ok(())
            }
        };
        match delivered {
            Err(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => interrupt = interrupt.or(Some(e)),
            Err(e) => e.write_unraisable(py, None),
            Ok(()) => {}
        }
    }
    (done, interrupt)
}

fn progress_tuple(py: Python<'_>, progress: mtl::Progress) -> PyResult<Bound<'_, PyTuple>> {
    match progress {
        mtl::Progress::Start { what, total, unit } => PyTuple::new(
            py,
            [
                "start".into_pyobject(py)?.into_any(),
                what.into_pyobject(py)?.into_any(),
                total.into_pyobject(py)?.into_any(),
                unit.into_pyobject(py)?.into_any(),
            ],
        ),
        mtl::Progress::Position { position, message } => PyTuple::new(
            py,
            [
                "position".into_pyobject(py)?.into_any(),
                position.into_pyobject(py)?.into_any(),
                message.into_pyobject(py)?.into_any(),
            ],
        ),
        mtl::Progress::Line(text) => PyTuple::new(py, ["line".to_owned(), text]),
        mtl::Progress::Finish => PyTuple::new(py, ["finish"]),
    }
}

/// What Ctrl-C does to a call.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum OnInterrupt {
    /// Training: the step ends and a checkpoint is written, then `KeyboardInterrupt` is raised; a second
    /// Ctrl-C raises it at once (the training still stops at the end of its step).
    FinishStep,
    /// `KeyboardInterrupt` at once; the work ends on its worker thread, its result dropped.
    Abandon,
}

/// Runs `work` on a worker thread (in the library's thread pool) with the GIL released, handing its progress
/// and logs to Python and watching for Ctrl-C until it ends.
pub(crate) fn blocking<R: Send + 'static>(
    py: Python<'_>,
    on_event: Option<&Py<PyAny>>,
    on_interrupt: OnInterrupt,
    work: impl FnOnce() -> mtl::Result<R> + Send + 'static,
) -> PyResult<R> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(install);
    let call = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("mtl-call".into())
        .spawn(move || {
            let _work = WORK.lock().unwrap_or_else(|e| e.into_inner());
            RUNNING.store(call, Ordering::SeqCst);
            if on_interrupt == OnInterrupt::FinishStep {
                // A stop asked of an earlier training (that ended) is not this one's.
                mtl::interrupt::clear_stop();
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| mtl::process::on_pool(work)));
            let _ = sender.send(result);
            RUNNING.store(0, Ordering::SeqCst);
            push_as(call, Event::Done);
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a worker thread: {e}")))?;
    let mut interrupted: Option<PyErr> = None;
    loop {
        let events = py.detach(|| wait(call, POLL));
        let (done, interrupt) = deliver(py, on_event, events);
        if done {
            let result = receiver
                .recv()
                .map_err(|_| PyRuntimeError::new_err("the worker thread ended without an answer; this is a bug"))?;
            return finish(result, interrupted);
        }
        let interrupt = interrupt.or_else(|| py.check_signals().err());
        if let Some(e) = interrupt {
            if on_interrupt == OnInterrupt::Abandon || interrupted.is_some() {
                return Err(e);
            }
            mtl::interrupt::request_stop();
            interrupted = Some(e);
        }
    }
}

type Outcome<R> = std::thread::Result<mtl::Result<R>>;

fn finish<R>(result: Outcome<R>, interrupted: Option<PyErr>) -> PyResult<R> {
    match (result, interrupted) {
        // The message says where the checkpoint is and how to go on.
        (Ok(Err(e @ mtl::Error::Train(mtl::TrainError::Interrupted { .. }))), _) => {
            Err(PyKeyboardInterrupt::new_err(e.to_string()))
        }
        (Ok(Err(e)), _) => Err(crate::to_py(e)),
        // Ctrl-C came after the last step: the work is whole, and the interrupt still stops the script.
        (Ok(Ok(_)), Some(_)) => Err(PyKeyboardInterrupt::new_err(
            "interrupted after training's last step: the run finished and is complete",
        )),
        (Ok(Ok(value)), None) => Ok(value),
        (Err(panic), _) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!("mtl panicked: {what}; this is a bug")))
        }
    }
}
