//! Encoded, labelled examples of one split.

use std::collections::BTreeMap;
use std::sync::Arc;

use mtl_config::Config;
use mtl_core::{TaskId, TaskKind};
use rayon::prelude::*;

use crate::read::Answer;
use crate::{DataError, Encoded, Input, LabelMap, Location, RawExample, RawLabel, Result, TextEncoder};

/// A label as the heads see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    Class(u32),
    /// The indices of every label of a multi-label example.
    Multi(Vec<u32>),
    /// Regression targets as written, and scaled for training.
    Real {
        raw: Vec<f64>,
        scaled: Vec<f32>,
    },
    Tags(Vec<u32>),
    /// The answer's first and last token in this window; both 0 ([CLS]) when it is not in the window.
    Span {
        start: usize,
        end: usize,
    },
    /// The reference texts of a generation task.
    Texts(Vec<String>),
}

/// A question with its context and gold answers, shared by all windows of the context.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// The index of the question in its split: the windows of one question share it.
    pub group: usize,
    pub context: String,
    /// The gold answers; empty for an unanswerable question or one without a label.
    pub answers: Vec<Answer>,
}

/// One window of a QA example.
#[derive(Clone, Debug, PartialEq)]
pub struct QaFeature {
    pub question: Arc<Question>,
    /// Each token's character span in the context (`None` outside it).
    pub offsets: Vec<Option<(usize, usize)>>,
}

#[derive(Clone, Debug)]
pub struct Example {
    pub location: Location,
    pub input: Input,
    pub encoded: Encoded,
    pub labels: BTreeMap<TaskId, Label>,
    /// For span-extraction QA: which question this window belongs to and where its tokens are.
    pub qa: Option<QaFeature>,
}

/// The examples of one split, tokenized and with labels mapped to indices.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// How many inputs were truncated to the model's maximum length (QA contexts are windowed instead).
    pub truncated: usize,
}

impl Dataset {
    /// Encodes raw examples, in parallel over examples. A question over a long context becomes several
    /// windows. A label missing from its task's map (with no fallback) is an error naming file and line (the
    /// first such line, whatever the thread scheduling).
    pub fn encode(
        raw: Vec<RawExample>,
        encoder: &TextEncoder,
        labels: &BTreeMap<TaskId, LabelMap>,
        config: &Config,
    ) -> Result<Self> {
        let encoded: Vec<Result<Vec<Example>>> =
            raw.into_par_iter().enumerate().map(|(i, ex)| encode_one(i, ex, encoder, labels, config)).collect();
        let mut examples = Vec::new();
        for e in encoded {
            examples.extend(e?);
        }
        let truncated = examples.iter().filter(|e| e.encoded.truncated).count();
        Ok(Self { examples, truncated })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

fn encode_one(
    index: usize,
    ex: RawExample,
    encoder: &TextEncoder,
    labels: &BTreeMap<TaskId, LabelMap>,
    config: &Config,
) -> Result<Vec<Example>> {
    let (mapped, answers) = map_labels(&ex, labels)?;
    if let Input::Question { question, context } = &ex.input {
        let task = answers
            .as_ref()
            .and_then(|(name, _)| config.tasks.get_key_value(name))
            .or_else(|| config.tasks.iter().find(|(_, t)| t.kind == TaskKind::QuestionAnswering));
        let Some((name, t)) = task else { unreachable!("questions are only read for QA tasks") };
        let windows = encoder
            .question_windows(question, context, t.max_query_len, t.doc_stride(encoder.max_len()))
            .map_err(|m| DataError::at(&ex.location, m))?;
        let gold = answers.map(|(_, a)| a);
        let shared =
            Arc::new(Question { group: index, context: context.clone(), answers: gold.clone().unwrap_or_default() });
        return Ok(windows
            .into_iter()
            .map(|w| {
                let mut labels = mapped.clone();
                if let Some(gold) = &gold {
                    let (start, end) = gold.first().map_or((0, 0), |a| span_in_window(a, &w.offsets));
                    labels.insert(name.clone(), Label::Span { start, end });
                }
                Example {
                    location: ex.location.clone(),
                    input: ex.input.clone(),
                    encoded: w.encoded,
                    labels,
                    qa: Some(QaFeature { question: shared.clone(), offsets: w.offsets }),
                }
            })
            .collect());
    }
    let encoded = encoder.encode(&ex.input).map_err(|m| DataError::at(&ex.location, m))?;
    Ok(vec![Example { location: ex.location, input: ex.input, encoded, labels: mapped, qa: None }])
}

/// Dev or test examples with the labels of tasks that set `skip_unseen_labels` left out where a label (or any
/// tag) is outside the task's set: the example stays for its other tasks, and goes when it has none left. A
/// warning counts what each task left out.
pub fn leave_out_unseen(
    raw: Vec<RawExample>,
    labels: &BTreeMap<TaskId, LabelMap>,
    config: &Config,
    split: &str,
) -> Vec<RawExample> {
    let skipping: Vec<&TaskId> = config.tasks.iter().filter(|(_, t)| t.skip_unseen_labels).map(|(n, _)| n).collect();
    if skipping.is_empty() {
        return raw;
    }
    let mut left_out: BTreeMap<&TaskId, usize> = BTreeMap::new();
    let kept = raw
        .into_iter()
        .filter_map(|mut ex| {
            for &task in &skipping {
                let Some(map) = labels.get(task) else { continue };
                let unseen = ex.labels.get(task).is_some_and(|l| l.names().iter().any(|n| map.id(n).is_none()));
                if unseen {
                    ex.labels.remove(task);
                    *left_out.entry(task).or_default() += 1;
                }
            }
            (!ex.labels.is_empty()).then_some(ex)
        })
        .collect();
    for (task, n) in left_out {
        tracing::warn!(
            "{split}: {n} examples of task `{task}` have labels outside its set and are left out of its scores"
        );
    }
    kept
}

/// Each task's label of a raw example as indices into its label map, and the gold answers of a QA task
/// (which become per-window spans). A label missing from its map (with no fallback) is an error naming file
/// and line.
#[allow(clippy::type_complexity)]
pub(crate) fn map_labels(
    ex: &RawExample,
    labels: &BTreeMap<TaskId, LabelMap>,
) -> Result<(BTreeMap<TaskId, Label>, Option<(TaskId, Vec<Answer>)>)> {
    let mut mapped = BTreeMap::new();
    let mut answers = None;
    for (task, label) in &ex.labels {
        let map = &labels[task];
        let lookup = |l: &str| {
            map.id_or_fallback(l).ok_or_else(|| {
                DataError::at(
                    &ex.location,
                    format!(
                        "task `{task}`: unknown label {l:?}; it is not in the training data or the configured label list \
                         ({} labels: {}); set `unknown_label` to map such labels to one of the set",
                        map.len(),
                        preview(map.labels())
                    ),
                )
            })
        };
        let label = match label {
            RawLabel::Class(l) => Label::Class(lookup(l)?),
            RawLabel::Multi(ls) => {
                let mut ids = ls.iter().map(|l| lookup(l)).collect::<Result<Vec<_>>>()?;
                ids.sort_unstable();
                ids.dedup();
                Label::Multi(ids)
            }
            RawLabel::Tags(tags) => Label::Tags(tags.iter().map(|t| lookup(t)).collect::<Result<_>>()?),
            RawLabel::Real(values) => {
                if values.len() != map.len() {
                    return Err(DataError::at(
                        &ex.location,
                        format!("task `{task}`: {} targets for {} outputs", values.len(), map.len()),
                    ));
                }
                let scaled = match &map.scale {
                    Some(s) => s.apply(values),
                    None => values.iter().map(|&v| v as f32).collect(),
                };
                Label::Real { raw: values.clone(), scaled }
            }
            RawLabel::Answers(a) => {
                answers = Some((task.clone(), a.clone()));
                continue;
            }
            RawLabel::Texts(t) => Label::Texts(t.clone()),
        };
        mapped.insert(task.clone(), label);
    }
    Ok((mapped, answers))
}

/// The first and last token of an answer in a window, or (0, 0) when the window does not hold all of it.
fn span_in_window(answer: &Answer, offsets: &[Option<(usize, usize)>]) -> (usize, usize) {
    let (s, e) = (answer.start, answer.start + answer.text.chars().count());
    let context: Vec<(usize, (usize, usize))> =
        offsets.iter().enumerate().filter_map(|(i, o)| o.map(|o| (i, o))).collect();
    let (Some(first), Some(last)) = (context.first(), context.last()) else {
        return (0, 0);
    };
    if first.1 .0 > s || last.1 .1 < e {
        return (0, 0);
    }
    let start = context.iter().rev().find(|(_, o)| o.0 <= s).map_or(first.0, |(i, _)| *i);
    let end = context.iter().find(|(_, o)| o.1 >= e).map_or(last.0, |(i, _)| *i);
    (start, end.max(start))
}

fn preview(labels: &[String]) -> String {
    let shown: Vec<&str> = labels.iter().take(8).map(String::as_str).collect();
    if labels.len() > shown.len() {
        format!("{}, …", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_spans_map_to_window_tokens() {
        // Context "the cat sat": tokens the(0,3) cat(4,7) sat(8,11) at window positions 3, 4, 5.
        let offsets = vec![None, None, None, Some((0, 3)), Some((4, 7)), Some((8, 11)), None];
        let a = |text: &str, start| Answer { text: text.into(), start };
        assert_eq!(span_in_window(&a("cat", 4), &offsets), (4, 4));
        assert_eq!(span_in_window(&a("cat sat", 4), &offsets), (4, 5));
        assert_eq!(span_in_window(&a("at", 5), &offsets), (4, 4), "inside a token");
        // A window that starts after the answer does not hold it.
        let later = vec![None, Some((4, 7)), Some((8, 11)), None];
        assert_eq!(span_in_window(&a("the", 0), &later), (0, 0));
    }
}
