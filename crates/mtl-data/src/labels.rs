//! Label maps: label string ↔ index, fixed before training and stored with the checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use mtl_config::{Config, TargetScaling, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use serde::{Deserialize, Serialize};

use crate::{DataError, RawExample, RawLabel, Result};

/// The ordered label set of one task (for regression: the names of its outputs), with what else a head
/// needs to turn its outputs into answers: the scaling of regression targets, the fallback for unknown
/// labels, and tuned multi-label thresholds. Stored with the checkpoint in `labels.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredLabels", into = "StoredLabels")]
pub struct LabelMap {
    labels: Vec<String>,
    index: BTreeMap<String, u32>,
    /// A label that stands in for labels outside the set.
    unknown: Option<u32>,
    /// Regression: each output's training mean and standard deviation, when targets are standardised.
    pub scale: Option<Scale>,
    /// Multi-label: each label's decision threshold, when tuned on dev.
    pub thresholds: Option<Vec<f64>>,
}

/// Per-output mean and standard deviation of regression targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Scale {
    pub fn apply(&self, values: &[f64]) -> Vec<f32> {
        values.iter().zip(self.mean.iter().zip(&self.std)).map(|(v, (m, s))| ((v - m) / s) as f32).collect()
    }

    pub fn invert(&self, values: &[f32]) -> Vec<f64> {
        values.iter().zip(self.mean.iter().zip(&self.std)).map(|(&v, (m, s))| f64::from(v) * s + m).collect()
    }
}

/// The stored form: a plain list when there is nothing else to store.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredLabels {
    List(Vec<String>),
    Full {
        labels: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unknown_label: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scale: Option<Scale>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thresholds: Option<Vec<f64>>,
    },
}

impl From<StoredLabels> for LabelMap {
    fn from(s: StoredLabels) -> Self {
        match s {
            StoredLabels::List(labels) => LabelMap::from(labels),
            StoredLabels::Full { labels, unknown_label, scale, thresholds } => {
                let mut m = LabelMap::from(labels);
                m.unknown = unknown_label.and_then(|l| m.id(&l));
                m.scale = scale;
                m.thresholds = thresholds;
                m
            }
        }
    }
}

impl From<LabelMap> for StoredLabels {
    fn from(m: LabelMap) -> Self {
        if m.unknown.is_none() && m.scale.is_none() && m.thresholds.is_none() {
            return StoredLabels::List(m.labels);
        }
        let unknown_label = m.unknown.map(|i| m.labels[i as usize].clone());
        StoredLabels::Full { labels: m.labels, unknown_label, scale: m.scale, thresholds: m.thresholds }
    }
}

impl From<Vec<String>> for LabelMap {
    fn from(labels: Vec<String>) -> Self {
        let index = labels.iter().enumerate().map(|(i, l)| (l.clone(), i as u32)).collect();
        Self { labels, index, unknown: None, scale: None, thresholds: None }
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

    /// The index of `label`, or of the configured fallback for labels outside the set.
    pub fn id_or_fallback(&self, label: &str) -> Option<u32> {
        self.id(label).or(self.unknown)
    }

    /// The fallback label, if one is configured.
    pub fn unknown_label(&self) -> Option<&str> {
        self.unknown.map(|i| self.labels[i as usize].as_str())
    }

    /// The label of an index produced by this map's head.
    pub fn label(&self, id: u32) -> &str {
        &self.labels[id as usize]
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The label maps of every task: the configured list (`labels` or `labels_file`), or else every label of
    /// the training examples, sorted. Regression tasks get their output names, and their training targets'
    /// mean and standard deviation when they are standardised.
    pub fn for_tasks(config: &Config, train: &[RawExample]) -> Result<BTreeMap<TaskId, LabelMap>> {
        let mut maps = BTreeMap::new();
        for (name, task) in &config.tasks {
            let mut map = match (task.kind, configured_labels(task)?) {
                (TaskKind::Regression, _) => regression_map(name, task, train)?,
                (TaskKind::QuestionAnswering, _) => LabelMap::from(vec!["answer".to_string()]),
                (TaskKind::Generation, _) => LabelMap::from(vec!["text".to_string()]),
                (_, Some(labels)) => LabelMap::from(labels),
                (_, None) => {
                    let mut seen = BTreeSet::new();
                    for label in train.iter().filter_map(|ex| ex.labels.get(name)) {
                        seen.extend(label.names().iter().cloned());
                    }
                    if let Some(fallback) = &task.unknown_label {
                        seen.insert(fallback.clone());
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
            if let Some(fallback) = &task.unknown_label {
                map.unknown = Some(map.id(fallback).ok_or_else(|| {
                    DataError::Labels(format!("task `{name}`: unknown_label {fallback:?} is not in the label set"))
                })?);
            }
            maps.insert(name.clone(), map);
        }
        Ok(maps)
    }
}

fn regression_map(name: &TaskId, task: &TaskConfig, train: &[RawExample]) -> Result<LabelMap> {
    let rows: Vec<&Vec<f64>> = train
        .iter()
        .filter_map(|ex| match ex.labels.get(name) {
            Some(RawLabel::Real(v)) => Some(v),
            _ => None,
        })
        .collect();
    let Some(first) = rows.first() else {
        return Err(DataError::Labels(format!(
            "task `{name}`: no targets in the training file {}",
            task.data.train.display()
        )));
    };
    let width = first.len();
    if let Some((ex, row)) = train
        .iter()
        .filter_map(|ex| match ex.labels.get(name) {
            Some(RawLabel::Real(v)) => Some((ex, v)),
            _ => None,
        })
        .find(|(_, v)| v.len() != width)
    {
        return Err(DataError::Line {
            path: ex.location.path.clone(),
            line: ex.location.line,
            message: format!("task `{name}`: {} targets where the first example has {width}", row.len()),
        });
    }
    let names = match &task.label_fields {
        Some(fields) => fields.clone(),
        None if width == 1 => vec![task.label_field.clone()],
        None => (0..width).map(|i| format!("{}[{i}]", task.label_field)).collect(),
    };
    let mut map = LabelMap::from(names);
    if task.scale_targets == TargetScaling::Standardize {
        let n = rows.len() as f64;
        let mean: Vec<f64> = (0..width).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n).collect();
        let std: Vec<f64> = (0..width)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if var > 0.0 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        map.scale = Some(Scale { mean, std });
    }
    Ok(map)
}

fn configured_labels(task: &TaskConfig) -> Result<Option<Vec<String>>> {
    if let Some(labels) = &task.labels {
        return Ok(Some(labels.clone()));
    }
    let Some(path) = &task.labels_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.clone(), source })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut labels = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        if !seen.insert(l) {
            return Err(DataError::Line {
                path: path.clone(),
                line: i + 1,
                message: format!("label {l:?} is listed twice"),
            });
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

    #[test]
    fn extras_round_trip_as_an_object() -> Result<(), serde_json::Error> {
        let mut m = LabelMap::from(vec!["O".to_string(), "B-X".to_string()]);
        m.unknown = Some(0);
        m.thresholds = Some(vec![0.25, 0.5]);
        let json = serde_json::to_string(&m)?;
        assert!(json.contains("\"unknown_label\":\"O\""), "{json}");
        let back: LabelMap = serde_json::from_str(&json)?;
        assert_eq!(back, m);
        assert_eq!(back.id_or_fallback("I-Y"), Some(0));
        let scale = Scale { mean: vec![1.0, -2.0], std: vec![2.0, 0.5] };
        let v = scale.apply(&[3.0, -1.0]);
        assert_eq!(v, vec![1.0, 2.0]);
        assert_eq!(scale.invert(&v), vec![3.0, -1.0]);
        Ok(())
    }
}
