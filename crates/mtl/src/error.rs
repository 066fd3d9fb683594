//! The library's error type: every failure of a facade call, with the file, line or field it concerns.

use std::path::{Path, PathBuf};

/// What went wrong in a library call. The lower crates' errors pass through unchanged; the facade's own are
/// one variant per kind of problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] mtl_config::ConfigError),
    #[error(transparent)]
    Data(#[from] mtl_data::DataError),
    #[error(transparent)]
    Nn(#[from] mtl_nn::NnError),
    #[error(transparent)]
    Train(#[from] mtl_train::TrainError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A file or directory that cannot be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file whose content is wrong (not JSON, a field missing, a checksum that does not match).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A file a model or run needs is not there.
    #[error("{path}: {what} not found (run scripts/fetch.sh for the default model and data)")]
    Missing { path: PathBuf, what: &'static str },
    /// A model whose architecture no backbone implements.
    #[error("{path}: unsupported model_type \"{model_type}\"; supported: {supported}")]
    UnsupportedArchitecture { path: PathBuf, model_type: String, supported: String },
    /// Something this run cannot do ([`crate::Run::capabilities`] says what it can).
    #[error("{run}: {message}")]
    Unsupported { run: PathBuf, message: String },
    /// A request that cannot be carried out as asked (arguments, configs that do not fit the run, an output
    /// directory that exists).
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error of `path`, for `map_err`.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.to_owned(), source }
    }

    /// A file whose content is wrong, for `map_err`.
    pub(crate) fn invalid<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> Error + '_ {
        move |e| Error::Invalid { path: path.to_owned(), message: e.to_string() }
    }
}

/// Returns early with [`Error::Usage`] and a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Usage(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// Reads a whole file as text; the error names the file.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(Error::io(path))
}

/// Reads a JSON file into `T`; the error names the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_str(&read_text(path)?).map_err(Error::invalid(path))
}

/// Writes `text` to `path`; the error names the file.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(Error::io(path))
}
