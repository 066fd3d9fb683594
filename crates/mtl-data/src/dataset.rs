//! Encoded, labelled examples of one split.

use std::collections::BTreeMap;

use mtl_core::TaskId;
use rayon::prelude::*;

use crate::{DataError, Encoded, Input, LabelMap, Location, RawExample, RawLabel, Result, TextEncoder};

/// A label as indices of its task's [`LabelMap`].
#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    Class(u32),
    Tags(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct Example {
    pub location: Location,
    pub input: Input,
    pub encoded: Encoded,
    pub labels: BTreeMap<TaskId, Label>,
}

/// The examples of one split, tokenized and with labels mapped to indices.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Encodes raw examples, in parallel over examples. A label missing from its task's map is an error naming
    /// file and line (the first such line, whatever the thread scheduling).
    pub fn encode(raw: Vec<RawExample>, encoder: &TextEncoder, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Self> {
        let encoded: Vec<Result<Example>> = raw.into_par_iter().map(|ex| encode_one(ex, encoder, labels)).collect();
        Ok(Self { examples: encoded.into_iter().collect::<Result<_>>()? })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

fn encode_one(ex: RawExample, encoder: &TextEncoder, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Example> {
    let encoded = encoder.encode(&ex.input).map_err(|m| DataError::at(&ex.location, m))?;
    let mut mapped = BTreeMap::new();
    for (task, label) in &ex.labels {
        let map = &labels[task];
        let lookup = |l: &str| {
            map.id(l).ok_or_else(|| {
                DataError::at(
                    &ex.location,
                    format!(
                        "task `{task}`: unknown label {l:?}; it is not in the training data or the configured label list \
                         ({} labels: {})",
                        map.len(),
                        preview(map.labels())
                    ),
                )
            })
        };
        let label = match label {
            RawLabel::Class(l) => Label::Class(lookup(l)?),
            RawLabel::Tags(tags) => Label::Tags(tags.iter().map(|t| lookup(t)).collect::<Result<_>>()?),
        };
        mapped.insert(task.clone(), label);
    }
    Ok(Example { location: ex.location, input: ex.input, encoded, labels: mapped })
}

fn preview(labels: &[String]) -> String {
    let shown: Vec<&str> = labels.iter().take(8).map(String::as_str).collect();
    if labels.len() > shown.len() {
        format!("{}, …", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
