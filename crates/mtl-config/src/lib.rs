//! TOML run configuration → typed, validated settings.
//!
//! A config file fully describes a run: the model, every task with its data files, and the training
//! recipe. Unknown keys are rejected (with the list of valid ones), and `--set a.b=c` overrides are applied
//! before validation so that an override is checked exactly like the file. Depends only on `mtl-core`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

mod model;
mod overrides;
use overrides::apply_override;
mod paths;
pub use paths::normalize as normalize_path;
mod peft;
mod recipe;
pub mod reference;
mod serve;
mod tasks;
mod training;
mod update;
pub use update::{Penalty, UpdateSettings};
mod validate;

pub use model::{ModelConfig, Precision};
pub use tasks::{
    ConlluColumn, DataFiles, DataFormat, JointConfig, RegressionLoss, Split, TagScheme, TargetScaling, TaskConfig,
};
pub use training::{SamplerKind, SamplingConfig, StepPlan, TrainingConfig};

pub use peft::{AdaloraConfig, AdapterPlacement, PeftConfig, PeftMethod};
pub use recipe::{
    FreezeConfig, MetaData, MgdaNormalization, ReportOnly, Schedule, ScoreWeight, ScoreWeights, SurgeryConfig,
    SurgeryMethod, WeightingConfig, WeightingMethod,
};
pub use serve::{ServeConfig, ServeOverrides};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid override `{set}`: {message}")]
    Override { set: String, message: String },
    #[error("invalid config {path}: field `{field}`: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub training: TrainingConfig,
    /// The tasks, by name: one `[tasks.NAME]` table each.
    pub tasks: BTreeMap<TaskId, TaskConfig>,
    /// Groups of tasks whose predictions are scored together on shared examples.
    #[serde(default)]
    pub joint: JointConfig,
    /// Parameter-efficient tuning (LoRA), off by default.
    #[serde(default)]
    pub peft: PeftConfig,
}

impl Config {
    /// Reads `path`, applies `overrides` (`a.b=value`, the value parsed as TOML or else taken as a string),
    /// and validates the result. Relative paths in the file are read from its folder (and held absolute);
    /// those of overrides from the current directory.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse_in(&text, path, overrides, Some(path.parent().unwrap_or(Path::new(""))))
    }

    /// Parses TOML text; `path` is only used in error messages, and relative paths are kept as written (read
    /// from the current directory).
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::parse_in(text, path, overrides, None)
    }

    /// [`Config::parse`] of text whose relative paths are read from `base` (a config made elsewhere than in
    /// a file: `""` for the current directory), held absolute as [`Config::load`] holds them.
    pub fn parse_relative_to(text: &str, path: &Path, overrides: &[String], base: &Path) -> Result<Self, ConfigError> {
        Self::parse_in(text, path, overrides, Some(base))
    }

    /// [`Config::parse`], relative paths of `text` resolved against `base` where given.
    fn parse_in(text: &str, path: &Path, overrides: &[String], base: Option<&Path>) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        };
        // Parse the file as written first, so that its errors carry line and column.
        let mut config: Config = toml::from_str(text).map_err(parse_err)?;
        if !overrides.is_empty() || base.is_some() {
            let mut root: toml::Table = toml::from_str(text).map_err(parse_err)?;
            if let Some(base) = base {
                paths::resolve(&mut root, base, path);
            }
            let mut value = toml::Value::Table(root);
            for set in overrides {
                apply_override(&mut value, set)?;
            }
            if let (Some(_), toml::Value::Table(root)) = (base, &mut value) {
                // The overrides' paths, from the current directory: absolute too, like the file's.
                paths::resolve(root, Path::new(""), path);
            }
            config = value.try_into().map_err(|e: toml::de::Error| ConfigError::Override {
                set: overrides.join(" "),
                message: e.message().to_string(),
            })?;
        }
        config.validate(path)?;
        Ok(config)
    }

    /// The config as TOML, as it will be resolved and stored next to a checkpoint.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a validated config always serializes; this is a bug")
    }

    /// The config of this trained model with new tasks (`mtl add-task`): `text` (the file `path`) holds
    /// `[tasks.NAME]` tables of tasks the model does not have, and may hold a `[training]` table for the new
    /// tasks' recipe (the model's own otherwise); the model and `[peft]` stay the trained model's. Returns the
    /// combined config and the new tasks' names.
    pub fn with_new_tasks(
        &self,
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let invalid =
            |field: &str, message: String| ConfigError::Invalid { path: path.to_owned(), field: field.into(), message };
        let (new, mut combined) = self.task_file(text, path)?;
        let mut names = Vec::new();
        for (key, value) in new {
            match key.as_str() {
                "tasks" => {
                    let tasks = value.as_table().ok_or_else(|| invalid("tasks", "must be a table of tasks".into()))?;
                    for (name, task) in tasks {
                        let field = format!("tasks.{name}");
                        if self.tasks.keys().any(|t| t.as_str() == name) {
                            return Err(invalid(
                                &field,
                                format!("the model has a task `{name}` already; its tasks are: {}", self.task_list()),
                            ));
                        }
                        // Checked on its own first, so that an error names the task, not a line of the merged text.
                        let _: TaskConfig = task
                            .clone()
                            .try_into()
                            .map_err(|e: toml::de::Error| invalid(&field, e.message().to_string()))?;
                        let all = combined.entry("tasks").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        all.as_table_mut().expect("tasks is a table").insert(name.clone(), task.clone());
                        names.push(name.clone());
                    }
                }
                "training" => {
                    combined.insert(key, value);
                }
                other => {
                    return Err(invalid(other, "comes from the trained model; a new-task file holds `[tasks.NAME]` tables and optionally `[training]`".into()));
                }
            }
        }
        if names.is_empty() {
            return Err(invalid("tasks", "no new task: add a `[tasks.NAME]` table".into()));
        }
        let text = toml::to_string(&combined).expect("a TOML table serializes; this is a bug");
        Ok((Self::parse(&text, path, overrides)?, names))
    }

    /// A file of task tables for this trained model (`mtl add-task`, `mtl update`), its data paths resolved
    /// against its own folder (the model's config holds its own), and this config as a table to merge it into.
    pub(crate) fn task_file(&self, text: &str, path: &Path) -> Result<(toml::Table, toml::Table), ConfigError> {
        let mut new: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_string() })?;
        paths::resolve(&mut new, path.parent().unwrap_or(Path::new("")), path);
        let combined = toml::Table::try_from(self).expect("a validated config always serializes; this is a bug");
        Ok((new, combined))
    }

    /// Keeps only the named tasks (for single-task baselines): the joint frame loses the others, and a
    /// selection metric of a removed task falls back to the default (the mean of the main metrics).
    pub fn retain_tasks(&mut self, names: &[String], path: &Path) -> Result<(), ConfigError> {
        for name in names {
            if !self.tasks.keys().any(|t| t.as_str() == name) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    field: "tasks".into(),
                    message: format!("unknown task `{name}`; tasks are: {}", self.task_list()),
                });
            }
        }
        self.tasks.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        self.joint.frame.retain(|t| self.tasks.contains_key(t));
        self.training.sampling.weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        self.training.weighting.weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
        if let Some(weights) = &mut self.training.score_weights {
            weights.retain(|t, _| names.iter().any(|n| n == t.as_str()));
            let positive = weights.values().flat_map(|m| m.values()).any(|w| w.weight().is_some_and(|w| w > 0.0));
            if !positive {
                self.training.score_weights = None;
            }
        }
        if self.joint.frame.len() < 2 {
            self.joint.frame.clear();
        }
        if self.training.select_metric.as_ref().is_some_and(|m| !self.metric_names().contains(m)) {
            self.training.select_metric = None;
        }
        Ok(())
    }

    /// The learning rate of the heads.
    pub fn head_lr(&self) -> f64 {
        self.training.head_lr.unwrap_or(self.training.lr)
    }
}

#[cfg(test)]
mod tests;
