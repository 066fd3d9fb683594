//! `mtl._native`: the library's calls for the Python package `mtl` (python/mtl/, which wraps them with
//! docstrings and types). Every call runs on a worker thread with the GIL released; the calling thread hands
//! the worker's progress and log records to Python meanwhile and watches for Ctrl-C: training then stops after
//! its step and writes a checkpoint before `KeyboardInterrupt` is raised, other calls raise it at once.
//! Errors arrive as `mtl.MtlError` (or a subclass) with the library's message: file, line and field.

// The library allocates and frees large tensors at every op; as in the binary, mimalloc keeps the pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod events;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

pyo3::create_exception!(
    mtl,
    MtlError,
    PyException,
    "An error of the mtl library; the message names the file, line and field."
);
pyo3::create_exception!(mtl, ConfigError, MtlError, "A config that cannot be read or is invalid.");
pyo3::create_exception!(mtl, DataError, MtlError, "A data file that cannot be read or is invalid.");
pyo3::create_exception!(
    mtl,
    UnsupportedError,
    MtlError,
    "Something the run cannot do (`Run.capabilities()` says what it can)."
);

/// The Python exception of a library error.
fn to_py(e: mtl::Error) -> PyErr {
    let message = e.to_string();
    match e {
        mtl::Error::Config(_) => ConfigError::new_err(message),
        mtl::Error::Data(_) => DataError::new_err(message),
        mtl::Error::Unsupported { .. } | mtl::Error::UnsupportedArchitecture { .. } => {
            UnsupportedError::new_err(message)
        }
        _ => MtlError::new_err(message),
    }
}

/// A config from a file (`path`) or from TOML text made of a Python dict (`json`: the dict as JSON).
fn load_config(
    path: Option<PathBuf>,
    json: Option<String>,
    overrides: &[String],
) -> mtl::Result<(mtl::Config, PathBuf)> {
    match (path, json) {
        (Some(path), None) => Ok((mtl::Config::load(&path, overrides)?, path)),
        (None, Some(json)) => {
            let source = PathBuf::from("<config dict>");
            let value: toml::Value = serde_json::from_str(&json).map_err(|e| {
                mtl::Error::Usage(format!("{}: {e} (TOML has no null: leave the key out)", source.display()))
            })?;
            let text = toml::to_string(&value).map_err(|e| mtl::Error::Usage(format!("{}: {e}", source.display())))?;
            // Its relative paths are read from the current directory, and held absolute as a file's are.
            Ok((mtl::Config::parse_relative_to(&text, &source, overrides, Path::new(""))?, source))
        }
        _ => Err(mtl::Error::Usage("give a config file or a config dict".into())),
    }
}

/// Trains a run into `out` (see `mtl.train`).
#[pyfunction]
#[pyo3(signature = (config_path, config_json, out, overrides, tasks, resume, accept_changed_data, baselines, per_task, on_event))]
#[allow(clippy::too_many_arguments)]
fn train(
    py: Python<'_>,
    config_path: Option<PathBuf>,
    config_json: Option<String>,
    out: PathBuf,
    overrides: Vec<String>,
    tasks: Vec<String>,
    resume: bool,
    accept_changed_data: bool,
    baselines: bool,
    per_task: bool,
    on_event: Option<Py<PyAny>>,
) -> PyResult<()> {
    events::blocking(py, on_event.as_ref(), events::OnInterrupt::FinishStep, move || {
        let (mut config, source) = load_config(config_path, config_json, &overrides)?;
        if !tasks.is_empty() {
            config.retain_tasks(&tasks, &source)?;
        }
        let select = if per_task { mtl::Select::PerTask } else { mtl::Select::Joint };
        let options = mtl::TrainOptions { select, resume, accept_changed_data, baselines, stop_after_epoch: None };
        mtl::train(&config, &source, &out, &options).map(drop)
    })
}

/// The data of a config as training reads it, without training (see `mtl.check`); JSON.
#[pyfunction]
#[pyo3(signature = (config_path, config_json, overrides, estimate, on_event))]
fn check(
    py: Python<'_>,
    config_path: Option<PathBuf>,
    config_json: Option<String>,
    overrides: Vec<String>,
    estimate: bool,
    on_event: Option<Py<PyAny>>,
) -> PyResult<String> {
    events::blocking(py, on_event.as_ref(), events::OnInterrupt::Abandon, move || {
        let (config, source) = load_config(config_path, config_json, &overrides)?;
        let report = mtl::check_with(&config, &source, estimate)?;
        Ok(serde_json::to_string(&report).expect("a check report serializes"))
    })
}

/// A starter config from data files (see `mtl.init`): its text, the guesses, the task names.
#[pyfunction]
#[pyo3(signature = (files, out, model))]
fn init(
    py: Python<'_>,
    files: Vec<PathBuf>,
    out: PathBuf,
    model: Option<PathBuf>,
) -> PyResult<(String, Vec<String>, Vec<String>)> {
    events::blocking(py, None, events::OnInterrupt::Abandon, move || {
        let report = mtl::init(&files, &out, model.as_deref())?;
        Ok((report.text, report.guesses, report.tasks))
    })
}

/// The `mtl` command line in this process; returns its exit status.
#[pyfunction]
fn cli(py: Python<'_>, args: Vec<String>) -> u8 {
    py.detach(move || mtl_cli::run(args.into_iter().map(Into::into)))
}

/// A trained run, opened (see `mtl.Run`).
#[pyclass(frozen, module = "mtl._native", name = "NativeRun")]
struct NativeRun {
    run: Arc<mtl::Run>,
}

#[pymethods]
impl NativeRun {
    #[staticmethod]
    #[pyo3(signature = (dir, on_event))]
    fn open(py: Python<'_>, dir: PathBuf, on_event: Option<Py<PyAny>>) -> PyResult<Self> {
        let run = events::blocking(py, on_event.as_ref(), events::OnInterrupt::Abandon, move || mtl::Run::open(&dir))?;
        Ok(Self { run: Arc::new(run) })
    }

    fn dir(&self) -> PathBuf {
        self.run.dir().to_owned()
    }

    /// The manifest and capabilities, as `mtl info` prints them (JSON).
    fn info(&self) -> String {
        let info = serde_json::json!({"manifest": self.run.manifest(), "capabilities": self.run.capabilities()});
        info.to_string()
    }

    /// The run's resolved config (JSON).
    fn config_json(&self) -> String {
        serde_json::to_string(self.run.config()).expect("a config serializes")
    }

    /// Every task's answer for each input (JSON list of `mtl predict`'s records).
    #[pyo3(signature = (inputs, batch_size, full_precision, on_event))]
    fn predict(
        &self,
        py: Python<'_>,
        inputs: &Bound<'_, PyList>,
        batch_size: usize,
        full_precision: bool,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let inputs = read_inputs(py, &self.run, inputs)?;
        let run = self.run.clone();
        let options = mtl::PredictOptions { batch_size, full_precision };
        events::blocking(py, on_event.as_ref(), events::OnInterrupt::Abandon, move || {
            let records = run.predict_located(&inputs, &options)?;
            Ok(serde_json::to_string(&records).expect("prediction records serialize"))
        })
    }

    /// Each task's explanations for each input (JSON list of `mtl explain`'s objects); the run is opened again
    /// for gradients (dropout off, f32) for the call.
    #[pyo3(signature = (inputs, tasks, steps, baseline, all_words, on_event))]
    #[allow(clippy::too_many_arguments)]
    fn explain(
        &self,
        py: Python<'_>,
        inputs: &Bound<'_, PyList>,
        tasks: Vec<String>,
        steps: usize,
        baseline: String,
        all_words: bool,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let inputs = read_inputs(py, &self.run, inputs)?;
        let dir = self.run.dir().to_owned();
        events::blocking(py, on_event.as_ref(), events::OnInterrupt::Abandon, move || {
            let baseline = baseline.parse().map_err(mtl::Error::Usage)?;
            let run = mtl::Run::open_for_explanations(&dir)?;
            let options = mtl::ExplainOptions { steps, baseline, tasks, all_words };
            Ok(serde_json::to_string(&run.explain(&inputs, &options)?).expect("explanations serialize"))
        })
    }

    /// Scores on the dev and test files of a config (the run's own unless given); JSON by split.
    #[pyo3(signature = (config_path, config_json, overrides, on_event))]
    fn evaluate(
        &self,
        py: Python<'_>,
        config_path: Option<PathBuf>,
        config_json: Option<String>,
        overrides: Vec<String>,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let run = self.run.clone();
        events::blocking(py, on_event.as_ref(), events::OnInterrupt::Abandon, move || {
            let path = match (&config_path, &config_json) {
                (None, None) => Some(run.dir().join(mtl::RUN_CONFIG)),
                _ => config_path,
            };
            let (config, source) = load_config(path, config_json, &overrides)?;
            let scores = run.evaluate(&config, &source)?;
            Ok(serde_json::to_string(&scores).expect("scores serialize"))
        })
    }
}

/// Python inputs as the library's: a string is a text; a dict is one line of `mtl predict` input (`text`,
/// a pair's second field, `words`, `question` and `context`); a list of strings is a sentence's words.
fn read_inputs(
    py: Python<'_>,
    run: &mtl::Run,
    inputs: &Bound<'_, PyList>,
) -> PyResult<Vec<(mtl::Location, mtl::Input)>> {
    let dumps = py.import("json")?.getattr("dumps")?;
    let mut out = Vec::with_capacity(inputs.len());
    for (i, item) in inputs.iter().enumerate() {
        let location = mtl::Location { path: Path::new("inputs").to_owned(), line: i + 1 };
        let input = if let Ok(text) = item.cast::<PyString>() {
            mtl::Input::Text(text.to_cow()?.into_owned())
        } else if item.is_instance_of::<PyList>() || item.is_instance_of::<PyTuple>() {
            mtl::Input::Words(item.extract::<Vec<String>>().map_err(|_| {
                MtlError::new_err(format!("{}:{}: a list input must be a sentence's words (strings)", "inputs", i + 1))
            })?)
        } else {
            let line: String = dumps.call1((&item,))?.extract()?;
            if !line.starts_with('{') {
                return Err(MtlError::new_err(format!(
                    "inputs:{}: an input is a string, a list of words or a dict (`text`, `words`, `question` and `context`)",
                    i + 1
                )));
            }
            run.parse_input(&line, &location).map_err(to_py)?
        };
        out.push((location, input));
    }
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // What `mtl::process::setup` does for the binary, but the environment: setting it here, with other threads
    // of the interpreter running, would be unsound; `mtl/__init__.py` sets candle's spin limit before import.
    mtl::alloc::keep_freed_pages();
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add_class::<NativeRun>()?;
    let py = m.py();
    m.add("MtlError", py.get_type::<MtlError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
