//! The run manifest, `run.json`: what a run directory holds and what it needs, in one versioned serde type
//! with one writer ([`RunManifest::write`]) and one reader ([`RunManifest::read`]).
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "architecture": "bert",
//!   "weights": "adapters",
//!   "tasks": ["intent", "slots"],
//!   "base": {"path": "../../assets/models/all-MiniLM-L6-v2", "name": "all-MiniLM-L6-v2", "sha256": "…"}
//! }
//! ```
//!
//! A run whose adapters go onto a frozen base names that base by a path relative to the run directory (so a
//! repository with its runs and assets can move), its file or directory name, and the SHA-256 of its weights,
//! which is checked when the run is opened. Runs written before the manifest (format 0: `base_model.json` with
//! an absolute path and a CRC-32) still open.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use crate::error::{read_json, write_text, Error, Result};
use crate::Architecture;

/// The manifest's file name in a run directory.
pub const MANIFEST: &str = "run.json";
// The other files of a run directory.
pub const WEIGHTS: &str = "model.safetensors";
pub const MODEL_CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const RUN_CONFIG: &str = "mtl.toml";
pub const LABELS: &str = "labels.json";
pub const METRICS: &str = "metrics.json";
/// The SHA-256 of each data file a run started on, by task and split (`TASK.train`, …: `{"path", "sha256"}`).
pub const DATA: &str = "data.json";
pub const HEADS: &str = "heads";
/// A parameter-efficient run's trained tensors (adapters and heads), which go onto its base model's weights.
pub const ADAPTERS: &str = "adapters.safetensors";
/// An int8 model's encoder projections (`mtl quantize`); its other tensors stay in `model.safetensors`.
pub const INT8: &str = "int8.safetensors";

/// The format this build writes; it reads this one and every older one.
pub const FORMAT_VERSION: u32 = 1;
/// Format 0's record of the base model (runs written before the manifest).
const LEGACY_BASE: &str = "base_model.json";

/// How a run stores its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// Every weight in the run's `model.safetensors`.
    Full,
    /// The trained tensors (adapters, heads) in `adapters.safetensors`, onto the frozen base of `base`.
    Adapters,
    /// An encoder quantised to int8 (`mtl quantize`): `int8.safetensors` beside `model.safetensors`.
    Int8,
}

/// The frozen base model a run's adapters go onto.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    /// The base (a model directory or a GGUF file), relative to the run directory where the two share a root.
    pub path: PathBuf,
    /// Its file or directory name, to recognise it elsewhere.
    pub name: String,
    /// SHA-256 of its weights (`model.safetensors` of a directory, or the GGUF file), lowercase hex.
    pub sha256: String,
    /// Format 0's checksum, read from `base_model.json`; never written.
    #[serde(skip)]
    legacy_crc32: Option<u32>,
}

/// What a run directory holds and needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunManifest {
    pub format_version: u32,
    pub architecture: Architecture,
    pub weights: WeightLayout,
    pub tasks: Vec<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    /// A decoder's answer budget per task, in tokens.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max_new_tokens: BTreeMap<TaskId, usize>,
}

/// Whether `dir` holds a run (of this format or format 0), rather than a base model.
pub fn is_run_dir(dir: &Path) -> bool {
    dir.join(MANIFEST).exists() || dir.join(RUN_CONFIG).exists()
}

/// The index of a Hugging Face model whose weights are sharded (`model-0000X-of-0000Y.safetensors`).
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The file to load a base encoder's weights from: `model.safetensors`, else the shard index
/// `model.safetensors.index.json`, else PyTorch's `pytorch_model.bin` (as transformers looks for them);
/// `model.safetensors` where none is there, for the error that names it.
pub fn encoder_weights(base: &Path) -> PathBuf {
    [WEIGHTS, SHARD_INDEX, PYTORCH_WEIGHTS]
        .iter()
        .map(|name| base.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| base.join(WEIGHTS))
}

/// PyTorch's weights file, read where a model has no safetensors.
pub const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";

/// The files that hold a base model's weights: the (GGUF) file itself; or of a directory, `model.safetensors`,
/// else the shards its `model.safetensors.index.json` names (each once, in name order). A file that is named
/// but not there is returned all the same, for the caller to report.
pub fn weight_files(base: &Path) -> Result<Vec<PathBuf>> {
    if !base.is_dir() {
        return Ok(vec![base.to_owned()]);
    }
    let single = base.join(WEIGHTS);
    let index = base.join(SHARD_INDEX);
    let pytorch = base.join(PYTORCH_WEIGHTS);
    if !single.exists() && !index.exists() && pytorch.exists() {
        return Ok(vec![pytorch]);
    }
    if single.exists() || !index.exists() {
        return Ok(vec![single]);
    }
    let value: serde_json::Value = read_json(&index)?;
    let map = value["weight_map"]
        .as_object()
        .ok_or_else(|| Error::Invalid { path: index.clone(), message: "field `weight_map`: missing".into() })?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() || shards.iter().any(|s| s.contains('/') || s.contains('\\')) {
        return Err(Error::Invalid {
            path: index,
            message: "field `weight_map`: names no shard files beside it".into(),
        });
    }
    Ok(shards.iter().map(|s| base.join(s)).collect())
}

impl BaseRef {
    /// The base model at `base`, as a run that will live in `run_dir` refers to it.
    pub fn new(base: &Path, run_dir: &Path) -> Result<Self> {
        let absolute = absolute(base)?;
        let path = relative_to(&absolute, run_dir).unwrap_or_else(|| absolute.clone());
        let name = absolute.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { path, name, sha256: sha256_files(&weight_files(&absolute)?)?, legacy_crc32: None })
    }

    /// The base model of the run in `run_dir`, checked to be the one the run was trained on.
    pub fn resolve(&self, run_dir: &Path) -> Result<PathBuf> {
        let manifest = run_dir.join(if self.legacy_crc32.is_some() { LEGACY_BASE } else { MANIFEST });
        let path = if self.path.is_absolute() { self.path.clone() } else { run_dir.join(&self.path) };
        let files = weight_files(&path)?;
        if let Some(weights) = files.iter().find(|f| !f.exists()) {
            let message = match self.legacy_crc32 {
                Some(_) => format!("field `path`: the base model's weights {} are not there", weights.display()),
                None => format!(
                    "field `base.path`: the base model's weights {} are not there (base `{}`, sha256 {}); put the base model there",
                    weights.display(),
                    self.name,
                    self.sha256
                ),
            };
            return Err(Error::Invalid { path: manifest, message });
        }
        let (got, want) = match self.legacy_crc32 {
            Some(want) => (format!("{:08x}", crc32(&files[0])?), format!("{want:08x}")),
            None => (sha256_files(&files)?, self.sha256.clone()),
        };
        let kind = if self.legacy_crc32.is_some() { "CRC-32" } else { "sha256" };
        if got != want {
            return Err(Error::Invalid {
                path: manifest,
                message: format!(
                    "the base model's weights {} have changed since the adapters were trained ({kind} {got}, expected {want})",
                    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        absolute(&path)
    }
}

/// `path` absolute, its directories resolved; a file keeps its own name (a GGUF file linked from the Hugging
/// Face cache stays the link, not the extensionless blob it points to).
fn absolute(path: &Path) -> Result<PathBuf> {
    match (path.is_file(), path.parent(), path.file_name()) {
        (true, Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            Ok(std::fs::canonicalize(parent).map_err(Error::io(parent))?.join(name))
        }
        _ => std::fs::canonicalize(path).map_err(Error::io(path)),
    }
}

impl RunManifest {
    /// Writes the manifest into `dir` (a run directory, or the temporary directory it is being written in).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the manifest serializes; this is a bug");
        write_text(&dir.join(MANIFEST), &text)
    }

    /// The manifest of the run in `dir`: `run.json`, or what a run of format 0 says of itself.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Self::read_legacy(dir);
        }
        let value: serde_json::Value = read_json(&path)?;
        let version = value["format_version"].as_u64().unwrap_or(0);
        if version > u64::from(FORMAT_VERSION) {
            return Err(Error::Invalid {
                path,
                message: format!(
                    "run format version {version} was written by a newer mtl; this build reads versions up to {FORMAT_VERSION}"
                ),
            });
        }
        serde_json::from_value(value).map_err(Error::invalid(&path))
    }

    /// Format 0: `base_model.json` (absolute path, CRC-32, a `decoder` flag and the decoder's answer budgets)
    /// where the run has a base, `int8.safetensors` for a quantised encoder; the tasks from `labels.json`.
    fn read_legacy(dir: &Path) -> Result<Self> {
        if !dir.join(RUN_CONFIG).exists() {
            return Err(mtl_train::TrainError::NotACheckpoint(dir.to_owned()).into());
        }
        let labels: BTreeMap<TaskId, serde_json::Value> = read_json(&dir.join(LABELS))?;
        let mut manifest = Self {
            format_version: 0,
            architecture: Architecture::Bert,
            weights: if dir.join(INT8).exists() { WeightLayout::Int8 } else { WeightLayout::Full },
            tasks: labels.into_keys().collect(),
            base: None,
            max_new_tokens: BTreeMap::new(),
        };
        let meta_path = dir.join(LEGACY_BASE);
        if meta_path.exists() {
            let meta: serde_json::Value = read_json(&meta_path)?;
            let missing =
                |field: &str| Error::Invalid { path: meta_path.clone(), message: format!("field `{field}`: missing") };
            let path = PathBuf::from(meta["path"].as_str().ok_or_else(|| missing("path"))?);
            let crc = meta["weights_crc32"].as_u64().ok_or_else(|| missing("weights_crc32"))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            manifest.weights = WeightLayout::Adapters;
            manifest.base = Some(BaseRef { path, name, sha256: String::new(), legacy_crc32: Some(crc as u32) });
            if meta["decoder"] == serde_json::json!(true) {
                manifest.architecture = Architecture::Llama;
                manifest.max_new_tokens = serde_json::from_value(meta["max_new_tokens"].clone()).map_err(|e| {
                    Error::Invalid { path: meta_path.clone(), message: format!("field `max_new_tokens`: {e}") }
                })?;
            }
        }
        Ok(manifest)
    }
}

/// `path` relative to the directory `dir` (which need not exist yet, but its parent must), where the two
/// share a root (on Unix, always); `None` otherwise.
fn relative_to(path: &Path, dir: &Path) -> Option<PathBuf> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A run directory that exists (perhaps a link) is resolved itself: `..` is read from where it really is.
    let dir = match std::fs::canonicalize(dir) {
        Ok(d) => d,
        Err(_) => std::fs::canonicalize(parent).ok()?.join(dir.file_name()?),
    };
    let (from, to): (Vec<Component>, Vec<Component>) = (dir.components().collect(), path.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c.as_os_str());
    }
    Some(rel)
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256(path: &Path) -> Result<String> {
    sha256_files(&[path.to_owned()])
}

/// SHA-256 of the files' bytes one after the other (of one file: that file's SHA-256), lowercase hex.
pub fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
        std::io::copy(&mut file, &mut hasher).map_err(Error::io(path))?;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// CRC-32 of a file (format 0's checksum).
fn crc32(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(Error::io(path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_root() -> Result<()> {
        let root = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let base = root.path().join("assets/models/m");
        std::fs::create_dir_all(&base).map_err(Error::io(&base))?;
        std::fs::create_dir_all(root.path().join("runs")).map_err(Error::io(root.path()))?;
        let base = std::fs::canonicalize(&base).map_err(Error::io(&base))?;
        assert_eq!(relative_to(&base, &root.path().join("runs/a")), Some(PathBuf::from("../../assets/models/m")));
        Ok(())
    }

    #[test]
    fn a_newer_format_is_refused_with_its_version() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let text = r#"{"format_version": 9, "architecture": "bert", "weights": "full", "tasks": []}"#;
        write_text(&dir.path().join(MANIFEST), text)?;
        let e = RunManifest::read(dir.path()).expect_err("version 9 is newer");
        assert!(e.to_string().contains("run format version 9 was written by a newer mtl"), "{e}");
        Ok(())
    }

    #[test]
    fn the_manifest_round_trips() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let m = RunManifest {
            format_version: FORMAT_VERSION,
            architecture: Architecture::Llama,
            weights: WeightLayout::Adapters,
            tasks: vec![TaskId::new("intent").expect("valid")],
            base: Some(BaseRef {
                path: "../m.gguf".into(),
                name: "m.gguf".into(),
                sha256: "ab".into(),
                legacy_crc32: None,
            }),
            max_new_tokens: [(TaskId::new("intent").expect("valid"), 12)].into(),
        };
        m.write(dir.path())?;
        assert_eq!(RunManifest::read(dir.path())?, m);
        Ok(())
    }
}
