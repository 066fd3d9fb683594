//! Readers of the general formats. Each split is read once per file, whatever the number of tasks that
//! read it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_config::{Config, DataFormat, Split, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use serde_json::Value;

use crate::{DataError, Result};

/// Where an example comes from: its file and its first line (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

/// The model input of one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Raw text, tokenized by the model's tokenizer.
    Text(String),
    /// Pre-split words; token tasks predict one tag per word.
    Words(Vec<String>),
}

impl Input {
    /// The words of this input: the given ones, or the text split on whitespace.
    pub fn words(&self) -> Vec<String> {
        match self {
            Input::Text(t) => t.split_whitespace().map(String::from).collect(),
            Input::Words(w) => w.clone(),
        }
    }
}

/// A label as written in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum RawLabel {
    Class(String),
    Tags(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RawExample {
    pub location: Location,
    pub input: Input,
    pub labels: BTreeMap<TaskId, RawLabel>,
}

/// Reads every example of `split` for all tasks. Tasks that name the same file share its examples; tasks
/// without a file for this split are skipped. The result is in file order, files in task-name order.
pub fn read_split(config: &Config, split: Split) -> Result<Vec<RawExample>> {
    let mut by_file: BTreeMap<&Path, Vec<(&TaskId, &TaskConfig)>> = BTreeMap::new();
    let mut order: Vec<&Path> = Vec::new();
    for (name, task) in &config.tasks {
        if let Some(path) = task.data.get(split) {
            if !by_file.contains_key(path) {
                order.push(path);
            }
            by_file.entry(path).or_default().push((name, task));
        }
    }
    let mut examples = Vec::new();
    for path in order {
        let tasks = &by_file[path];
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
        let before = examples.len();
        match tasks[0].1.format {
            DataFormat::Jsonl => read_jsonl(&text, path, tasks, &mut examples)?,
            DataFormat::Conll => read_conll(&text, path, tasks, &mut examples)?,
        }
        if examples.len() == before {
            return Err(DataError::Empty { path: path.to_owned() });
        }
    }
    Ok(examples)
}

fn read_jsonl(text: &str, path: &Path, tasks: &[(&TaskId, &TaskConfig)], out: &mut Vec<RawExample>) -> Result<()> {
    let first = tasks[0].1;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = Location { path: path.to_owned(), line: i + 1 };
        let value: Value =
            serde_json::from_str(line).map_err(|e| DataError::at(&location, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(DataError::at(&location, "expected a JSON object"));
        };
        let input = match (obj.get(&first.words_field), obj.get(&first.text_field)) {
            (Some(words), _) => Input::Words(string_list(words).ok_or_else(|| {
                DataError::at(&location, format!("field `{}` must be a list of strings", first.words_field))
            })?),
            (None, Some(Value::String(t))) => Input::Text(t.clone()),
            (None, Some(_)) => {
                return Err(DataError::at(&location, format!("field `{}` must be a string", first.text_field)))
            }
            (None, None) => {
                return Err(DataError::at(
                    &location,
                    format!("missing input: neither `{}` nor `{}` is present", first.words_field, first.text_field),
                ))
            }
        };
        let mut labels = BTreeMap::new();
        for &(name, task) in tasks {
            let field = &task.label_field;
            let label = match (task.kind, obj.get(field)) {
                (_, None | Some(Value::Null)) => continue,
                (TaskKind::Classification, Some(Value::String(s))) => RawLabel::Class(s.clone()),
                (TaskKind::Classification, Some(v @ (Value::Number(_) | Value::Bool(_)))) => {
                    RawLabel::Class(v.to_string())
                }
                (TaskKind::Classification, Some(_)) => {
                    return Err(DataError::at(
                        &location,
                        format!("task `{name}`: field `{field}` must be a string label"),
                    ))
                }
                (TaskKind::TokenClassification, Some(v)) => {
                    let tags = string_list(v).ok_or_else(|| {
                        DataError::at(&location, format!("task `{name}`: field `{field}` must be a list of tag strings"))
                    })?;
                    let Input::Words(words) = &input else {
                        return Err(DataError::at(
                            &location,
                            format!("task `{name}`: a token task needs pre-split words in field `{}`", task.words_field),
                        ));
                    };
                    if tags.len() != words.len() {
                        return Err(DataError::at(
                            &location,
                            format!(
                                "task `{name}`: field `{field}` has {} tags for {} words",
                                tags.len(),
                                words.len()
                            ),
                        ));
                    }
                    RawLabel::Tags(tags)
                }
            };
            labels.insert(name.clone(), label);
        }
        out.push(RawExample { location, input, labels });
    }
    Ok(())
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?.iter().map(|x| x.as_str().map(String::from)).collect()
}

fn read_conll(text: &str, path: &Path, tasks: &[(&TaskId, &TaskConfig)], out: &mut Vec<RawExample>) -> Result<()> {
    let mut words = Vec::new();
    let mut tags = Vec::new();
    let mut start = 0;
    let mut flush = |words: &mut Vec<String>, tags: &mut Vec<String>, start: usize| {
        if words.is_empty() {
            return;
        }
        let labels = tasks.iter().map(|(name, _)| ((*name).clone(), RawLabel::Tags(tags.clone()))).collect();
        out.push(RawExample {
            location: Location { path: path.to_owned(), line: start },
            input: Input::Words(std::mem::take(words)),
            labels,
        });
        tags.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("-DOCSTART-") {
            flush(&mut words, &mut tags, start);
            continue;
        }
        if line.starts_with("# ") || line == "#" {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 2 {
            let location = Location { path: path.to_owned(), line: i + 1 };
            return Err(DataError::at(&location, "expected a word and a tag separated by whitespace"));
        }
        if words.is_empty() {
            start = i + 1;
        }
        words.push(cols[0].to_string());
        tags.push(cols[cols.len() - 1].to_string());
    }
    flush(&mut words, &mut tags, start);
    Ok(())
}
