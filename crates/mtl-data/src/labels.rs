//! Label maps: label string ↔ index, fixed before training and stored with the checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use mtl_config::{Config, TaskConfig};
use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use crate::{DataError, RawExample, RawLabel, Result};

/// The ordered label set of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct LabelMap {
    labels: Vec<String>,
    index: BTreeMap<String, u32>,
}

impl From<Vec<String>> for LabelMap {
    fn from(labels: Vec<String>) -> Self {
        let index = labels.iter().enumerate().map(|(i, l)| (l.clone(), i as u32)).collect();
        Self { labels, index }
    }
}

impl From<LabelMap> for Vec<String> {
    fn from(m: LabelMap) -> Self {
        m.labels
    }
}

impl LabelMap {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn id(&self, label: &str) -> Option<u32> {
        self.index.get(label).copied()
    }

    /// The label of an index produced by this map's head.
    pub fn label(&self, id: u32) -> &str {
        &self.labels[id as usize]
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The label maps of every task: the configured list (`labels` or `labels_file`), or else every label of
    /// the training examples, sorted.
    pub fn for_tasks(config: &Config, train: &[RawExample]) -> Result<BTreeMap<TaskId, LabelMap>> {
        let mut maps = BTreeMap::new();
        for (name, task) in &config.tasks {
            let map = match configured_labels(task)? {
                Some(labels) => LabelMap::from(labels),
                None => {
                    let mut seen = BTreeSet::new();
                    for ex in train {
                        match ex.labels.get(name) {
                            Some(RawLabel::Class(l)) => {
                                seen.insert(l.clone());
                            }
                            Some(RawLabel::Tags(tags)) => seen.extend(tags.iter().cloned()),
                            None => {}
                        }
                    }
                    LabelMap::from(seen.into_iter().collect::<Vec<_>>())
                }
            };
            if map.is_empty() {
                return Err(DataError::Labels(format!(
                    "task `{name}`: no labels: the training file {} has no `{}` field",
                    task.data.train.display(),
                    task.label_field
                )));
            }
            maps.insert(name.clone(), map);
        }
        Ok(maps)
    }
}

fn configured_labels(task: &TaskConfig) -> Result<Option<Vec<String>>> {
    if let Some(labels) = &task.labels {
        return Ok(Some(labels.clone()));
    }
    let Some(path) = &task.labels_file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.clone(), source })?;
    let mut labels = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        if !seen.insert(l) {
            return Err(DataError::Line { path: path.clone(), line: i + 1, message: format!("label {l:?} is listed twice") });
        }
        labels.push(l.to_string());
    }
    if labels.is_empty() {
        return Err(DataError::Empty { path: path.clone() });
    }
    Ok(Some(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_a_list() -> Result<(), serde_json::Error> {
        let m = LabelMap::from(vec!["b".to_string(), "a".to_string()]);
        assert_eq!(m.id("a"), Some(1));
        assert_eq!(m.label(0), "b");
        let json = serde_json::to_string(&m)?;
        assert_eq!(json, r#"["b","a"]"#);
        assert_eq!(serde_json::from_str::<LabelMap>(&json)?, m);
        Ok(())
    }
}
