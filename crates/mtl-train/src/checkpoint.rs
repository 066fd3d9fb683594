//! Checkpoints: a directory in Hugging Face layout plus the run's own files, written to a temporary
//! directory beside the target and renamed into place, so that a failed run leaves nothing half-written.
//!
//! Layout: `model.safetensors` (backbone under `BertModel` names, heads under `heads.TASK.*`), `config.json`
//! and `tokenizer.json` (copied from the base model), `mtl.toml` (the resolved run config), `labels.json`
//! (each task's label list), `metrics.json`, and `heads/TASK.safetensors` (each task's head at its own best
//! evaluation). A parameter-efficient run writes `adapters.safetensors` (its adapters and heads) and `base_model.json`
//! (where its frozen base model is) instead of `model.safetensors`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use mtl_config::Config;
use mtl_core::TaskId;
use mtl_data::LabelMap;
use mtl_nn::MultiTaskModel;

use crate::{Result, TrainError};

pub const WEIGHTS: &str = "model.safetensors";
pub const MODEL_CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const RUN_CONFIG: &str = "mtl.toml";
pub const LABELS: &str = "labels.json";
pub const METRICS: &str = "metrics.json";
pub const HEADS: &str = "heads";
/// A parameter-efficient run's trained tensors (adapters and heads), which go onto its base model's weights.
pub const ADAPTERS: &str = "adapters.safetensors";
/// Where that base model is, and a checksum of its weights.
pub const BASE_MODEL: &str = "base_model.json";
/// An int8 model's encoder projections (`mtl quantize`); its other tensors stay in `model.safetensors`.
pub const INT8: &str = "int8.safetensors";

/// Everything a checkpoint holds besides the weights.
pub struct CheckpointFiles<'a> {
    pub config: &'a Config,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
    pub metrics: &'a serde_json::Value,
    /// Extra weight files written as `heads/NAME.safetensors` (each task's head at its best evaluation).
    pub heads: &'a BTreeMap<String, BTreeMap<String, Tensor>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_owned(), source }
}

/// Writes the checkpoint to `dir`, which must not exist yet.
pub fn save(dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    if dir.exists() {
        return Err(TrainError::OutputExists(dir.to_owned()));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = tempfile::Builder::new().prefix(".mtl-checkpoint-").tempdir_in(&parent).map_err(io_err(&parent))?;
    write_files(tmp.path(), model, files)?;
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dir).map_err(|source| {
        let _ = std::fs::remove_dir_all(&tmp);
        TrainError::Io { path: dir.to_owned(), source }
    })?;
    Ok(())
}

/// Writes the checkpoint into `dir`, which exists already (it held the run's training checkpoints): the
/// files are written to a temporary directory inside it and renamed into place one by one, `metrics.json`
/// last, so a `metrics.json` there means the whole model is.
pub fn save_into(dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    publish_into(dir, |tmp| write_files(tmp, model, files))
}

/// Runs `write` on a temporary directory inside `dir` and renames what it wrote into `dir` one by one,
/// `metrics.json` last (see [`save_into`]).
pub fn publish_into(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.join(METRICS).exists() {
        return Err(TrainError::OutputExists(dir.to_owned()));
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

fn write_files(dir: &Path, model: &MultiTaskModel, files: &CheckpointFiles) -> Result<()> {
    let base = &files.config.model.path;
    if files.config.peft.enabled() {
        // The frozen backbone stays in the base model; only what trained is written.
        model.params().save_where(&dir.join(ADAPTERS), |n| n.starts_with("heads.") || mtl_nn::is_peft_param(n))?;
        let weights = base.join(WEIGHTS);
        let path = std::fs::canonicalize(base).map_err(io_err(base))?;
        let meta = serde_json::json!({"path": path, "weights_crc32": crc32(&weights)?});
        std::fs::write(dir.join(BASE_MODEL), serde_json::to_string_pretty(&meta).expect("json; this is a bug"))
            .map_err(io_err(&dir.join(BASE_MODEL)))?;
    } else {
        model.params().save(&dir.join(WEIGHTS))?;
        if model.bert().int8_layers().is_some() {
            model.save_int8(&dir.join(INT8))?;
        }
    }
    std::fs::copy(base.join(TOKENIZER), dir.join(TOKENIZER)).map_err(io_err(&base.join(TOKENIZER)))?;
    // The base model's config.json, with the model's own depth (`mtl prune` drops layers).
    let config_path = base.join(MODEL_CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut bert: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Invalid { path: config_path.clone(), message: e.to_string() })?;
    bert["num_hidden_layers"] = model.bert().config().num_hidden_layers.into();
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
    if !files.heads.is_empty() {
        let heads = dir.join(HEADS);
        std::fs::create_dir(&heads).map_err(io_err(&heads))?;
        for (name, tensors) in files.heads {
            let tensors: std::collections::HashMap<&str, Tensor> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            candle_core::safetensors::save(&tensors, heads.join(format!("{name}.safetensors")))?;
        }
    }
    Ok(())
}

/// The CRC-32 of a file's bytes.
pub fn crc32(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_err(path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buffer[..n]);
    }
}

/// For a parameter-efficient checkpoint, the weights of its base model (checked to be the ones it was trained
/// on); `None` for a checkpoint that holds all its weights.
pub fn base_weights(dir: &Path) -> Result<Option<PathBuf>> {
    let meta_path = dir.join(BASE_MODEL);
    if !meta_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
    let invalid = |message: String| TrainError::Invalid { path: meta_path.clone(), message };
    let meta: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let base = meta["path"].as_str().ok_or_else(|| invalid("field `path`: missing".into()))?;
    let want = meta["weights_crc32"].as_u64().ok_or_else(|| invalid("field `weights_crc32`: missing".into()))?;
    let weights = Path::new(base).join(WEIGHTS);
    if !weights.exists() {
        return Err(invalid(format!("field `path`: the base model's weights {} are not there", weights.display())));
    }
    let got = crc32(&weights)?;
    if u64::from(got) != want {
        return Err(invalid(format!(
            "the base model's weights {} have changed since the adapters were trained (CRC-32 {got:08x}, expected {want:08x})",
            weights.display()
        )));
    }
    Ok(Some(weights))
}

/// The run config and label maps stored in a checkpoint. The config's model path is set to `dir`.
pub fn read_meta(dir: &Path) -> Result<(Config, BTreeMap<TaskId, LabelMap>)> {
    let config_path = dir.join(RUN_CONFIG);
    if !config_path.exists() {
        return Err(TrainError::NotACheckpoint(dir.to_owned()));
    }
    let mut config = Config::load(&config_path, &[])?;
    config.model.path = dir.to_owned();
    let labels_path = dir.join(LABELS);
    let text = std::fs::read_to_string(&labels_path).map_err(io_err(&labels_path))?;
    let labels: BTreeMap<TaskId, LabelMap> = serde_json::from_str(&text)
        .map_err(|e| TrainError::Invalid { path: labels_path.clone(), message: e.to_string() })?;
    for task in config.tasks.keys() {
        if !labels.contains_key(task) {
            return Err(TrainError::Invalid { path: labels_path, message: format!("no labels for task `{task}`") });
        }
    }
    Ok((config, labels))
}
