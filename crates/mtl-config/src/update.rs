//! `mtl update`'s file: `[tasks.NAME]` tables of tasks a trained model has (their new data), optionally a
//! `[training]` table (the update's recipe), and an `[update]` table: how the other tasks are protected.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Config, ConfigError, TaskConfig};

/// A pull toward the model's weights before the update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Penalty {
    /// None.
    #[default]
    None,
    /// L2-SP (Li et al. 2018): every weight pulled toward its value before the update, equally.
    L2sp,
    /// EWC (Kirkpatrick et al. 2017): each weight pulled by how much the other tasks' loss depends on it (a
    /// diagonal Fisher estimate on their training examples).
    Ewc,
}

/// How `mtl update` protects the tasks it does not update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateSettings {
    /// The share of the other tasks' training examples replayed beside the updated tasks' data (rehearsal);
    /// 0: none.
    pub rehearsal: f64,
    pub penalty: Penalty,
    /// The penalty's strength λ in λ/2 · Σ w (θ − θ₀)².
    pub strength: f64,
    /// EWC: training examples of the other tasks the Fisher estimate is taken over.
    pub fisher_examples: usize,
    /// The most a protected task's main score may fall, in points (0.01 of a score), before the update is
    /// refused (on test where the task has a test file, dev otherwise).
    pub tolerance: f64,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        Self { rehearsal: 0.3, penalty: Penalty::None, strength: 0.01, fisher_examples: 256, tolerance: 1.0 }
    }
}

impl Config {
    /// The config of this trained model with some of its tasks given new data or settings (`mtl update`):
    /// `text` (the file `path`) holds `[tasks.NAME]` tables of tasks the model has (each replaces that task's
    /// table; its kind must stay), optionally `[training]` (the update's recipe; the model's own otherwise) and
    /// `[update]`. `overrides` apply to the combined config, those under `update.` to the `[update]` table.
    /// Returns the combined config, the updated tasks' names and the update's settings.
    pub fn with_updated_tasks(
        &self,
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<(Config, Vec<String>, UpdateSettings), ConfigError> {
        let invalid =
            |field: &str, message: String| ConfigError::Invalid { path: path.to_owned(), field: field.into(), message };
        let (new, mut combined) = self.task_file(text, path)?;
        let mut names = Vec::new();
        let mut update = toml::Value::Table(toml::Table::new());
        for (key, value) in new {
            match key.as_str() {
                "tasks" => {
                    let tasks = value.as_table().ok_or_else(|| invalid("tasks", "must be a table of tasks".into()))?;
                    for (name, task) in tasks {
                        let field = format!("tasks.{name}");
                        let Some(old) = self.tasks.iter().find(|(t, _)| t.as_str() == name).map(|(_, c)| c) else {
                            return Err(invalid(
                                &field,
                                format!(
                                    "the model has no task `{name}` (add it with `mtl add-task`); its tasks are: {}",
                                    self.task_list()
                                ),
                            ));
                        };
                        let parsed: TaskConfig = task
                            .clone()
                            .try_into()
                            .map_err(|e: toml::de::Error| invalid(&field, e.message().to_string()))?;
                        if parsed.kind != old.kind {
                            return Err(invalid(
                                &format!("{field}.kind"),
                                format!("the model's `{name}` is {}; an update keeps the kind", old.kind.name()),
                            ));
                        }
                        let all = combined.entry("tasks").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        all.as_table_mut().expect("tasks is a table").insert(name.clone(), task.clone());
                        names.push(name.clone());
                    }
                }
                "training" => {
                    combined.insert(key, value);
                }
                "update" => update = value,
                other => {
                    return Err(invalid(other, "comes from the trained model; an update file holds `[tasks.NAME]` tables and optionally `[training]` and `[update]`".into()));
                }
            }
        }
        if names.is_empty() {
            return Err(invalid(
                "tasks",
                "no task to update: add a `[tasks.NAME]` table of a task the model has".into(),
            ));
        }
        let mut rest = Vec::new();
        for set in overrides {
            match set.strip_prefix("update.") {
                Some(inner) => crate::overrides::apply_override(&mut update, inner)?,
                None => rest.push(set.clone()),
            }
        }
        let settings: UpdateSettings =
            update.try_into().map_err(|e: toml::de::Error| invalid("update", e.message().to_string()))?;
        let s = &settings;
        if !(0.0..=1.0).contains(&s.rehearsal) {
            return Err(invalid("update.rehearsal", "must be a share from 0 to 1".into()));
        }
        if !(s.strength.is_finite() && s.strength >= 0.0) {
            return Err(invalid("update.strength", "must be 0 or more".into()));
        }
        if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
            return Err(invalid("update.tolerance", "must be 0 or more (points)".into()));
        }
        if s.fisher_examples == 0 {
            return Err(invalid("update.fisher_examples", "must be at least 1".into()));
        }
        let text = toml::to_string(&combined).expect("a TOML table serializes; this is a bug");
        Ok((Self::parse(&text, path, &rest)?, names, settings))
    }
}
