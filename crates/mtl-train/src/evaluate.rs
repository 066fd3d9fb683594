//! Prediction over a dataset and scoring with each task's standard metrics.

use std::collections::BTreeMap;

use mtl_core::{TaskId, TaskKind};
use mtl_data::{collate, Dataset, Example, Label, LabelMap};
use mtl_nn::{MultiTaskModel, TaskPrediction};

use crate::Result;

/// Scores by group (a task name, or `joint`) and metric name; every value is a fraction in [0, 1].
pub type Scores = BTreeMap<String, BTreeMap<String, f64>>;

/// One task's prediction for one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Prediction {
    Class { id: u32, score: f32 },
    /// One tag per word; `None` where truncation removed the word.
    Tags(Vec<Option<u32>>),
}

/// Predicts every task on every example, in batches of similar length (to pad little), in dataset order.
pub fn predict_examples(
    model: &MultiTaskModel,
    examples: &[&Example],
    tasks: &BTreeMap<TaskId, TaskKind>,
    batch_size: usize,
) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].encoded.ids.len());
    let mut out: Vec<BTreeMap<TaskId, Prediction>> = vec![BTreeMap::new(); examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch_examples: Vec<&Example> = chunk.iter().map(|&i| examples[i]).collect();
        let batch = collate(&batch_examples, tasks);
        for (task, prediction) in model.predict(&batch)? {
            match prediction {
                TaskPrediction::Class { ids, scores } => {
                    for ((&i, id), score) in chunk.iter().zip(ids).zip(scores) {
                        out[i].insert(task.clone(), Prediction::Class { id, score });
                    }
                }
                TaskPrediction::Tags(tags) => {
                    for (&i, tags) in chunk.iter().zip(tags) {
                        out[i].insert(task.clone(), Prediction::Tags(tags));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Scores predictions against the labels of `data`. Each task is scored on the examples that carry its
/// label; `frame` tasks are also scored together, on the examples that carry all their labels.
pub fn score(
    data: &Dataset,
    predictions: &[BTreeMap<TaskId, Prediction>],
    labels: &BTreeMap<TaskId, LabelMap>,
    frame: &[TaskId],
) -> Scores {
    let mut scores = Scores::new();
    for (task, map) in labels {
        let mut gold_ids = Vec::new();
        let mut pred_ids = Vec::new();
        let mut gold_tags: Vec<Vec<&str>> = Vec::new();
        let mut pred_tags: Vec<Vec<&str>> = Vec::new();
        for (ex, pred) in data.examples.iter().zip(predictions) {
            match (ex.labels.get(task), pred.get(task)) {
                (Some(Label::Class(g)), Some(Prediction::Class { id, .. })) => {
                    gold_ids.push(*g);
                    pred_ids.push(*id);
                }
                (Some(Label::Tags(g)), Some(Prediction::Tags(p))) => {
                    gold_tags.push(g.iter().map(|&t| map.label(t)).collect());
                    pred_tags.push(tags_or_outside(p, map));
                }
                _ => {}
            }
        }
        let mut m = BTreeMap::new();
        if !gold_ids.is_empty() {
            m.insert("accuracy".to_string(), mtl_metrics::accuracy(&gold_ids, &pred_ids));
            m.insert("macro_f1".to_string(), mtl_metrics::macro_f1(&gold_ids, &pred_ids));
        }
        if !gold_tags.is_empty() {
            let e = mtl_metrics::entity_scores(&gold_tags, &pred_tags);
            m.insert("precision".to_string(), e.precision);
            m.insert("recall".to_string(), e.recall);
            m.insert("f1".to_string(), e.f1);
            m.insert("accuracy".to_string(), mtl_metrics::token_accuracy(&gold_tags, &pred_tags));
        }
        if !m.is_empty() {
            scores.insert(task.to_string(), m);
        }
    }
    if !frame.is_empty() {
        let mut correct: Vec<Vec<bool>> = vec![Vec::new(); frame.len()];
        for (ex, pred) in data.examples.iter().zip(predictions) {
            if !frame.iter().all(|t| ex.labels.contains_key(t)) {
                continue;
            }
            for (t, task) in frame.iter().enumerate() {
                correct[t].push(is_correct(&ex.labels[task], pred.get(task)));
            }
        }
        if correct[0].is_empty() {
            return scores;
        }
        scores.insert("joint".into(), BTreeMap::from([("frame_accuracy".to_string(), mtl_metrics::frame_accuracy(&correct))]));
    }
    scores
}

/// Predicted tags as strings; words without a prediction (truncated away) count as `O`.
fn tags_or_outside<'a>(pred: &[Option<u32>], map: &'a LabelMap) -> Vec<&'a str> {
    pred.iter().map(|p| p.map_or("O", |t| map.label(t))).collect()
}

fn is_correct(gold: &Label, pred: Option<&Prediction>) -> bool {
    match (gold, pred) {
        (Label::Class(g), Some(Prediction::Class { id, .. })) => g == id,
        (Label::Tags(g), Some(Prediction::Tags(p))) => g.len() == p.len() && g.iter().zip(p).all(|(g, p)| Some(*g) == *p),
        _ => false,
    }
}

/// The main metric of a task kind: accuracy for classification, entity F1 for tagging.
pub fn main_metric(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Classification => "accuracy",
        TaskKind::TokenClassification => "f1",
    }
}

/// The score that selects the best epoch: `TASK.METRIC` when given, else the mean of each task's main metric.
pub fn selection_score(scores: &Scores, select: Option<&str>, tasks: &BTreeMap<TaskId, TaskKind>) -> Option<f64> {
    match select {
        Some(name) => {
            let (group, metric) = name.split_once('.')?;
            scores.get(group)?.get(metric).copied()
        }
        None => {
            let values: Vec<f64> =
                tasks.iter().filter_map(|(t, k)| scores.get(t.as_str())?.get(main_metric(*k)).copied()).collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        }
    }
}
