//! A run directory's files, written to a temporary directory and renamed into place, so that a failed run
//! leaves nothing half-written.
//!
//! Layout: `run.json` (the [`RunManifest`]), `model.safetensors` (an encoder's backbone under `BertModel` names,
//! heads under `heads.TASK.*`), `config.json` and `tokenizer.json` (copied from the base model), `mtl.toml`
//! (the resolved run config), `labels.json` (each task's label list), `metrics.json`, and
//! `heads/TASK.safetensors` (each task's head at its own best evaluation), and `drift-reference.json` (the
//! distributions of the model's answers to the dev set, which `mtl serve` watches for drift). A parameter-efficient run writes
//! `adapters.safetensors` (its adapters and heads) instead of `model.safetensors`, and its manifest names the
//! frozen base model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use mtl_config::Config;
use mtl_core::TaskId;
use mtl_data::LabelMap;
use mtl_nn::MultiTaskModel;

use crate::error::{Error, Result};
use crate::manifest::{BaseRef, RunManifest, WeightLayout, FORMAT_VERSION};
use crate::Architecture;

pub use crate::manifest::{ADAPTERS, DATA, HEADS, INT8, LABELS, METRICS, MODEL_CONFIG, RUN_CONFIG, TOKENIZER, WEIGHTS};

/// Everything a checkpoint holds besides the weights.
pub struct CheckpointFiles<'a> {
    pub config: &'a Config,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
    pub metrics: &'a serde_json::Value,
    /// Extra weight files written as `heads/NAME.safetensors` (each task's head at its best evaluation).
    pub heads: &'a BTreeMap<String, BTreeMap<String, Tensor>>,
    /// The distributions of the model's answers to the dev set, written as `drift-reference.json`.
    pub reference: Option<&'a mtl_serve::drift::Reference>,
}

/// The drift reference saved with the run in `dir`, if it has one.
pub(crate) fn read_reference(dir: &Path) -> Result<Option<mtl_serve::drift::Reference>> {
    let path = dir.join(mtl_serve::drift::REFERENCE_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map(Some).map_err(Error::invalid(&path))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    Error::io(path)
}

/// Writes the checkpoint to `dir`, which must not exist yet.
pub fn save(dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    write_new_dir(dir, |tmp| write_files(tmp, dir, model, files))
}

/// Runs `write` on a temporary directory beside `dir` (which must not exist yet) and renames it to `dir`:
/// either the whole directory is there, or nothing is.
pub(crate) fn write_new_dir<T>(dir: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dir.exists() {
        return Err(mtl_train::TrainError::OutputExists(dir.to_owned()).into());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = tempfile::Builder::new().prefix(".mtl-new-").tempdir_in(&parent).map_err(io_err(&parent))?;
    let value = write(tmp.path())?;
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dir).map_err(|source| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::Io { path: dir.to_owned(), source }
    })?;
    Ok(value)
}

/// Writes the checkpoint into `dir`, which exists already (it held the run's training checkpoints): the
/// files are written to a temporary directory inside it and renamed into place one by one, `metrics.json`
/// last, so a `metrics.json` there means the whole model is.
pub fn save_into(dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    publish_into(dir, |tmp| write_files(tmp, dir, model, files))
}

/// Runs `write` on a temporary directory inside `dir` and renames what it wrote into `dir` one by one,
/// `metrics.json` last (see [`save_into`]).
pub fn publish_into(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.join(METRICS).exists() {
        return Err(mtl_train::TrainError::OutputExists(dir.to_owned()).into());
    }
    let tmp = tempfile::Builder::new().prefix(".mtl-final-").tempdir_in(dir).map_err(io_err(dir))?;
    write(tmp.path())?;
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(tmp.path())
        .map_err(io_err(tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n != METRICS)
        .collect();
    names.sort();
    names.push(METRICS.into());
    for name in names {
        let target = dir.join(&name);
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(io_err(&target))?;
        }
        std::fs::rename(tmp.path().join(&name), &target).map_err(io_err(&target))?;
    }
    Ok(())
}

/// Writes an encoder run's files into `dir`, the temporary directory of the run that will be `run_dir`.
fn write_files(dir: &Path, run_dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    let base = &files.config.model.path;
    let mut manifest = RunManifest {
        format_version: FORMAT_VERSION,
        architecture: Architecture::Bert,
        weights: WeightLayout::Full,
        tasks: files.config.tasks.keys().cloned().collect(),
        base: None,
        max_new_tokens: BTreeMap::new(),
    };
    if files.config.peft.enabled() {
        // The frozen backbone stays in the base model; only what trained is written.
        model.params().save_where(&dir.join(ADAPTERS), |role| !role.is_backbone())?;
        manifest.weights = WeightLayout::Adapters;
        manifest.base = Some(BaseRef::new(base, run_dir)?);
    } else {
        model.params().save(&dir.join(WEIGHTS))?;
        if model.bert().int8_layers().is_some() {
            model.save_int8(&dir.join(INT8))?;
            manifest.weights = WeightLayout::Int8;
        }
    }
    manifest.write(dir)?;
    // The base's tokenizer.json, or the one built from its vocab.txt.
    match base.join(TOKENIZER).is_file() {
        true => {
            std::fs::copy(base.join(TOKENIZER), dir.join(TOKENIZER)).map(drop).map_err(io_err(&base.join(TOKENIZER)))?
        }
        false => {
            let (tokenizer, source) = crate::vocab::base_tokenizer(base)?;
            tokenizer.save(dir.join(TOKENIZER), false).map_err(|e| Error::Invalid {
                path: source,
                message: format!("cannot write its tokenizer.json: {e}"),
            })?;
        }
    }
    // The base model's config.json, with the model's own depth (`mtl prune` drops layers).
    let config_path = base.join(MODEL_CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut bert: serde_json::Value = serde_json::from_str(&text).map_err(Error::invalid(&config_path))?;
    let depth = model.bert().config().num_hidden_layers;
    bert["num_hidden_layers"] = depth.into();
    // Per-layer settings (ModernBERT's `layer_types`) of the layers that stay.
    if let Some(types) = bert.get_mut("layer_types").and_then(serde_json::Value::as_array_mut) {
        types.truncate(depth);
    }
    std::fs::write(dir.join(MODEL_CONFIG), serde_json::to_string_pretty(&bert).expect("json; this is a bug"))
        .map_err(io_err(&dir.join(MODEL_CONFIG)))?;
    // The rest of a Hugging Face tokenizer, where the base model has it (an export passes it on).
    for name in ["vocab.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        if base.join(name).is_file() {
            std::fs::copy(base.join(name), dir.join(name)).map_err(io_err(&base.join(name)))?;
        }
    }
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(io_err(&dir.join(name)));
    write(RUN_CONFIG, files.config.to_toml())?;
    write(LABELS, serde_json::to_string_pretty(files.labels).expect("label maps serialize; this is a bug"))?;
    write(METRICS, serde_json::to_string_pretty(files.metrics).expect("metrics serialize; this is a bug"))?;
    if let Some(reference) = files.reference {
        let text = serde_json::to_string_pretty(reference).expect("references serialize; this is a bug");
        write(mtl_serve::drift::REFERENCE_FILE, text)?;
    }
    if !files.heads.is_empty() {
        let heads = dir.join(HEADS);
        std::fs::create_dir(&heads).map_err(io_err(&heads))?;
        for (name, tensors) in files.heads {
            let tensors: std::collections::HashMap<&str, Tensor> =
                tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            candle_core::safetensors::save(&tensors, heads.join(format!("{name}.safetensors")))?;
        }
    }
    Ok(())
}

/// Writes `text` to `path` through a flushed temporary file renamed into place, the directory flushed after.
pub(crate) fn write_durably(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir))?;
    tmp.write_all(text.as_bytes()).and_then(|()| tmp.as_file().sync_all()).map_err(Error::io(path))?;
    tmp.persist(path).map_err(|e| Error::Io { path: path.to_owned(), source: e.error })?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io(dir))
}

/// The run config and label maps stored in a checkpoint. The config's model path is set to `dir`.
pub fn read_meta(dir: &Path) -> Result<(Config, BTreeMap<TaskId, LabelMap>)> {
    let config_path = dir.join(RUN_CONFIG);
    if !config_path.exists() {
        return Err(mtl_train::TrainError::NotACheckpoint(dir.to_owned()).into());
    }
    // Its paths as training resolved them (absolute, or from the directory it trained in for older runs).
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut config = Config::parse(&text, &config_path, &[])?;
    config.model.path = dir.to_owned();
    let labels_path = dir.join(LABELS);
    let text = std::fs::read_to_string(&labels_path).map_err(io_err(&labels_path))?;
    let labels: BTreeMap<TaskId, LabelMap> = serde_json::from_str(&text).map_err(Error::invalid(&labels_path))?;
    for task in config.tasks.keys() {
        if !labels.contains_key(task) {
            return Err(Error::Invalid { path: labels_path, message: format!("no labels for task `{task}`") });
        }
    }
    Ok((config, labels))
}
