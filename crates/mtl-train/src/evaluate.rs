//! Prediction over a dataset and scoring with each task's standard metrics.

use std::collections::BTreeMap;

use mtl_config::{Config, TagScheme, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use mtl_data::prompt::{answer_from_text, label_from_text, labels_from_text, parse_pairs, tag_pairs, values_from_text};
use mtl_data::{collate, Dataset, Example, Label, LabelMap};
use mtl_metrics::{ClassificationReport, Direction};
use mtl_nn::{MultiTaskModel, TaskPrediction};

use crate::Result;

/// Scores by group (a task name, or `joint`) and metric name.
pub type Scores = BTreeMap<String, BTreeMap<String, f64>>;

/// Scores, per-class reports of the tasks that have classes, and confusion matrices of the single-label
/// classification tasks (by task name).
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub scores: Scores,
    pub reports: BTreeMap<String, ClassificationReport<String>>,
    /// Class names and `counts[gold][predicted]`.
    pub confusions: BTreeMap<String, (Vec<String>, Vec<Vec<usize>>)>,
}

/// One task's prediction for one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Prediction {
    Class {
        id: u32,
        score: f32,
    },
    /// The predicted labels of a multi-label task, and every label's probability.
    Labels {
        ids: Vec<u32>,
        probs: Vec<f32>,
    },
    /// Regression outputs, in the units of the data.
    Values(Vec<f64>),
    /// One tag per word; `None` where truncation removed the word.
    Tags(Vec<Option<u32>>),
    /// A decoder's answer, as generated; scored by mapping it to the task's label (or spans).
    Generated(String),
    /// The answer to a question (the same on every window of it): its text and character span in the
    /// context, or no answer.
    Answer {
        text: String,
        span: Option<(usize, usize)>,
        score: f32,
    },
}

/// The start and end logits of one QA window, with the index of its example.
type Window = (usize, Vec<f32>, Vec<f32>);

/// What prediction needs to know of each task besides the model.
pub struct TaskInfo<'a> {
    pub config: &'a Config,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
}

impl TaskInfo<'_> {
    pub fn shapes(&self) -> BTreeMap<TaskId, (TaskKind, usize)> {
        // The tasks with labels here (a server may ask for some of the model's tasks only).
        self.labels
            .iter()
            .filter_map(|(t, m)| self.config.tasks.get(t).map(|c| (t.clone(), (c.kind, m.len()))))
            .collect()
    }

    /// The decision threshold of each label of a multi-label task.
    fn thresholds(&self, task: &TaskId) -> Vec<f64> {
        let map = &self.labels[task];
        map.thresholds.clone().unwrap_or_else(|| vec![self.config.tasks[task].threshold; map.len()])
    }
}

/// Predicts every task on every example, in batches of similar length (to pad little), in dataset order.
/// The windows of a question get that question's answer, chosen over all its windows.
pub fn predict_examples(
    model: &MultiTaskModel,
    examples: &[&Example],
    info: &TaskInfo,
    batch_size: usize,
) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
    let shapes = info.shapes();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].encoded.ids.len());
    let mut out: Vec<BTreeMap<TaskId, Prediction>> = vec![BTreeMap::new(); examples.len()];
    // QA logits per window, resolved into answers once every window has been seen.
    let mut windows: BTreeMap<TaskId, Vec<Window>> = BTreeMap::new();
    let mut bar = crate::items::items(examples.len(), "predicting");
    for chunk in order.chunks(batch_size.max(1)) {
        if let Some(bar) = &mut bar {
            bar.inc(chunk.len());
        }
        let batch_examples: Vec<&Example> = chunk.iter().map(|&i| examples[i]).collect();
        let batch = collate(&batch_examples, &shapes);
        // A model can have heads that `info` does not cover (the old tasks of `mtl add-task`).
        for (task, prediction) in model.predict_for(&batch, |t| info.labels.contains_key(t))? {
            match prediction {
                TaskPrediction::Class { ids, scores } => {
                    for ((&i, id), score) in chunk.iter().zip(ids).zip(scores) {
                        out[i].insert(task.clone(), Prediction::Class { id, score });
                    }
                }
                TaskPrediction::Probs(rows) => {
                    let thresholds = info.thresholds(&task);
                    for (&i, probs) in chunk.iter().zip(rows) {
                        let ids = (0..probs.len() as u32)
                            .filter(|&l| f64::from(probs[l as usize]) >= thresholds[l as usize])
                            .collect();
                        out[i].insert(task.clone(), Prediction::Labels { ids, probs });
                    }
                }
                TaskPrediction::Values(rows) => {
                    let map = &info.labels[&task];
                    for (&i, v) in chunk.iter().zip(rows) {
                        let values = match &map.scale {
                            Some(s) => s.invert(&v),
                            None => v.iter().map(|&x| f64::from(x)).collect(),
                        };
                        out[i].insert(task.clone(), Prediction::Values(values));
                    }
                }
                TaskPrediction::Tags(tags) => {
                    for (&i, tags) in chunk.iter().zip(tags) {
                        out[i].insert(task.clone(), Prediction::Tags(tags));
                    }
                }
                TaskPrediction::Spans { start, end } => {
                    let w = windows.entry(task.clone()).or_default();
                    for ((&i, s), e) in chunk.iter().zip(start).zip(end) {
                        if examples[i].qa.is_some() {
                            w.push((i, s, e));
                        }
                    }
                }
            }
        }
    }
    for (task, windows) in windows {
        let t = &info.config.tasks[&task];
        let mut by_question: BTreeMap<usize, Vec<Window>> = BTreeMap::new();
        for w in windows {
            let group = examples[w.0].qa.as_ref().map_or(0, |q| q.question.group);
            by_question.entry(group).or_default().push(w);
        }
        for ws in by_question.into_values() {
            let answer = best_answer(examples, &ws, t);
            for (i, _, _) in &ws {
                out[*i].insert(task.clone(), answer.clone());
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(out)
}

/// The best answer over the windows of one question, as transformers' `postprocess_qa_predictions` picks it:
/// the 20 best start and end tokens of each window, spans inside the context of at most `max_answer_len`
/// tokens, scored by start + end logit; no answer when allowed and the [CLS] score (the lowest over
/// windows) beats the best span.
fn best_answer(examples: &[&Example], windows: &[Window], task: &TaskConfig) -> Prediction {
    const TOP: usize = 20;
    let mut null_score = f32::INFINITY;
    let mut best: Option<(f32, usize, usize)> = None;
    let mut context = "";
    for (i, start, end) in windows {
        let Some(qa) = &examples[*i].qa else { continue };
        context = &qa.question.context;
        null_score = null_score.min(start[0] + end[0]);
        let top = |logits: &[f32]| {
            let mut idx: Vec<usize> =
                (0..logits.len()).filter(|&k| qa.offsets.get(k).is_some_and(Option::is_some)).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(TOP);
            idx
        };
        for &s in &top(start) {
            for &e in &top(end) {
                if e < s || e - s + 1 > task.max_answer_len {
                    continue;
                }
                let score = start[s] + end[e];
                let (Some(cs), Some(ce)) = (qa.offsets[s], qa.offsets[e]) else {
                    continue;
                };
                if best.is_none_or(|b| score > b.0) {
                    best = Some((score, cs.0, ce.1));
                }
            }
        }
    }
    match best {
        Some((score, s, e)) if !(task.allow_unanswerable && null_score > score) => {
            let text: String = context.chars().skip(s).take(e - s).collect();
            Prediction::Answer { text, span: Some((s, e)), score }
        }
        _ => Prediction::Answer { text: String::new(), span: None, score: null_score },
    }
}

/// Scores predictions against the labels of `data`. Each task is scored on the examples that carry its
/// label; `frame` tasks are also scored together, on the examples that carry all their labels.
pub fn score(data: &Dataset, predictions: &[BTreeMap<TaskId, Prediction>], info: &TaskInfo) -> Evaluation {
    let mut eval = Evaluation::default();
    for (task, map) in info.labels {
        let Some(tc) = info.config.tasks.get(task) else {
            continue;
        };
        let mut m = BTreeMap::new();
        let pairs = || {
            data.examples.iter().zip(predictions).filter_map(|(ex, p)| Some((ex, ex.labels.get(task)?, p.get(task)?)))
        };
        match tc.kind {
            TaskKind::Classification => {
                let (gold, pred): (Vec<&str>, Vec<&str>) = pairs()
                    .filter_map(|(_, g, p)| match (g, p) {
                        (Label::Class(g), Prediction::Class { id, .. }) => Some((map.label(*g), map.label(*id))),
                        (Label::Class(g), Prediction::Generated(text)) => {
                            Some((map.label(*g), generated_label(tc, map, text)))
                        }
                        _ => None,
                    })
                    .unzip();
                if gold.is_empty() {
                    continue;
                }
                let report = mtl_metrics::classification_report(&gold, &pred);
                m.insert("accuracy".to_string(), report.accuracy);
                m.insert("macro_f1".to_string(), report.macro_avg.f1);
                m.insert("micro_f1".to_string(), report.micro_avg.f1);
                m.insert("weighted_f1".to_string(), report.weighted_avg.f1);
                m.insert("mcc".to_string(), mtl_metrics::mcc(&gold, &pred));
                eval.reports.insert(task.to_string(), owned(report));
                let (classes, counts) = mtl_metrics::confusion_matrix(&gold, &pred);
                eval.confusions.insert(task.to_string(), (classes.into_iter().map(str::to_string).collect(), counts));
            }
            TaskKind::MultiLabel => {
                let (gold, pred): (Vec<Vec<u32>>, Vec<Vec<u32>>) = pairs()
                    .filter_map(|(_, g, p)| match (g, p) {
                        (Label::Multi(g), Prediction::Labels { ids, .. }) => Some((g.clone(), ids.clone())),
                        (Label::Multi(g), Prediction::Generated(text)) => {
                            Some((g.clone(), labels_from_text(tc, map.labels(), text)))
                        }
                        _ => None,
                    })
                    .unzip();
                if gold.is_empty() {
                    continue;
                }
                let s = mtl_metrics::multilabel_scores(&gold, &pred, map.len());
                m.insert("micro_f1".to_string(), s.micro.f1);
                m.insert("macro_f1".to_string(), s.macro_avg.f1);
                m.insert("weighted_f1".to_string(), s.weighted.f1);
                m.insert("samples_f1".to_string(), s.samples_f1);
                m.insert("subset_accuracy".to_string(), s.subset_accuracy);
                let classes = map.labels().iter().cloned().zip(s.labels.iter().copied()).collect();
                eval.reports.insert(
                    task.to_string(),
                    ClassificationReport {
                        classes,
                        accuracy: s.subset_accuracy,
                        macro_avg: s.macro_avg,
                        micro_avg: s.micro,
                        weighted_avg: s.weighted,
                    },
                );
            }
            TaskKind::Regression => {
                // An answer that gives no number counts as the training mean (a decoder's label maps carry
                // it, `with_fallback_means`; 0 if a map does not).
                let fallback = || map.scale.as_ref().map_or_else(|| vec![0.0; map.len()], |s| s.mean.clone());
                let rows: Vec<(&Vec<f64>, Vec<f64>)> = pairs()
                    .filter_map(|(_, g, p)| match (g, p) {
                        (Label::Real { raw, .. }, Prediction::Values(v)) => Some((raw, v.clone())),
                        (Label::Real { raw, .. }, Prediction::Generated(text)) => {
                            Some((raw, values_from_text(map.labels(), text).unwrap_or_else(fallback)))
                        }
                        _ => None,
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                // Averaged over outputs (one output: the plain scores).
                let outputs = map.len();
                let mut sums = [0.0; 4];
                for j in 0..outputs {
                    let g: Vec<f64> = rows.iter().map(|r| r.0[j]).collect();
                    let p: Vec<f64> = rows.iter().map(|r| r.1[j]).collect();
                    sums[0] += mtl_metrics::pearson(&g, &p);
                    sums[1] += mtl_metrics::spearman(&g, &p);
                    sums[2] += mtl_metrics::mse(&g, &p);
                    sums[3] += mtl_metrics::mae(&g, &p);
                }
                for (name, v) in ["pearson", "spearman", "mse", "mae"].iter().zip(sums) {
                    m.insert(name.to_string(), v / outputs as f64);
                }
            }
            TaskKind::TokenClassification => {
                // A decoder's `type=value` lines, scored as pairs against the gold spans.
                let (gold, pred): (Vec<_>, Vec<_>) = pairs()
                    .filter_map(|(ex, g, p)| match (g, p) {
                        (Label::Tags(g), Prediction::Generated(text)) => {
                            Some((gold_pairs(ex, g, map), parse_pairs(text)))
                        }
                        _ => None,
                    })
                    .unzip();
                if !gold.is_empty() {
                    let s = mtl_metrics::pair_scores(&gold, &pred);
                    m.insert("precision".to_string(), s.precision);
                    m.insert("recall".to_string(), s.recall);
                    m.insert("f1".to_string(), s.f1);
                    eval.scores.insert(task.to_string(), m);
                    continue;
                }
                let (gold, pred): (Vec<Vec<&str>>, Vec<Vec<&str>>) = pairs()
                    .filter_map(|(_, g, p)| match (g, p) {
                        (Label::Tags(g), Prediction::Tags(p)) => {
                            Some((g.iter().map(|&t| map.label(t)).collect(), tags_or_outside(p, map, tc.scheme)))
                        }
                        _ => None,
                    })
                    .unzip();
                if gold.is_empty() {
                    continue;
                }
                m.insert("accuracy".to_string(), mtl_metrics::token_accuracy(&gold, &pred));
                if tc.scheme == TagScheme::None {
                    let flat_gold: Vec<&str> = gold.concat();
                    let flat_pred: Vec<&str> = pred.concat();
                    let report = mtl_metrics::classification_report(&flat_gold, &flat_pred);
                    m.insert("macro_f1".to_string(), report.macro_avg.f1);
                    eval.reports.insert(task.to_string(), owned(report));
                } else {
                    let report = mtl_metrics::entity_report(&gold, &pred);
                    m.insert("precision".to_string(), report.micro_avg.precision);
                    m.insert("recall".to_string(), report.micro_avg.recall);
                    m.insert("f1".to_string(), report.micro_avg.f1);
                    eval.reports.insert(task.to_string(), report);
                }
            }
            TaskKind::Generation => {
                let (gold, pred): (Vec<Vec<String>>, Vec<String>) = pairs()
                    .filter_map(|(_, g, p)| match (g, p) {
                        (Label::Texts(g), Prediction::Generated(text)) => Some((g.clone(), text.clone())),
                        _ => None,
                    })
                    .unzip();
                if gold.is_empty() {
                    continue;
                }
                let (rouge, exact) = mtl_metrics::generation_scores(&gold, &pred);
                m.insert("rouge_l".to_string(), rouge);
                m.insert("exact_match".to_string(), exact);
            }
            TaskKind::QuestionAnswering => {
                let mut seen = std::collections::BTreeSet::new();
                let mut gold: Vec<Vec<String>> = Vec::new();
                let mut pred: Vec<String> = Vec::new();
                for (ex, g, p) in pairs() {
                    match (g, p, &ex.qa) {
                        // A decoder's answer: one example per question, gold answers as its label.
                        (Label::Texts(refs), Prediction::Generated(text), _) => {
                            gold.push(refs.clone());
                            pred.push(answer_from_text(text));
                        }
                        (_, Prediction::Answer { text, .. }, Some(qa)) if seen.insert(qa.question.group) => {
                            gold.push(qa.question.answers.iter().map(|a| a.text.clone()).collect());
                            pred.push(text.clone());
                        }
                        _ => {}
                    }
                }
                if gold.is_empty() {
                    continue;
                }
                let (em, f1) = mtl_metrics::squad_scores(&gold, &pred);
                m.insert("exact_match".to_string(), em);
                m.insert("f1".to_string(), f1);
            }
        }
        eval.scores.insert(task.to_string(), m);
    }
    let frame = &info.config.joint.frame;
    if !frame.is_empty() {
        // By input line: a decoder's examples hold one task each, so a line's tasks are spread over several.
        type Line<'a> = BTreeMap<&'a TaskId, (&'a Example, Option<&'a Prediction>)>;
        let mut lines: BTreeMap<(&std::path::Path, usize), Line> = BTreeMap::new();
        for (ex, pred) in data.examples.iter().zip(predictions) {
            let line = lines.entry((ex.location.path.as_path(), ex.location.line)).or_default();
            for task in frame.iter().filter(|t| ex.labels.contains_key(*t)) {
                line.entry(task).or_insert((ex, pred.get(task)));
            }
        }
        let mut correct: Vec<Vec<bool>> = vec![Vec::new(); frame.len()];
        for line in lines.values().filter(|l| l.len() == frame.len()) {
            for (t, task) in frame.iter().enumerate() {
                let (ex, pred) = line[task];
                correct[t].push(is_correct(ex, task, info, pred));
            }
        }
        if !correct[0].is_empty() {
            eval.scores.insert(
                "joint".into(),
                BTreeMap::from([("frame_accuracy".to_string(), mtl_metrics::frame_accuracy(&correct))]),
            );
        }
    }
    eval
}

fn owned(r: ClassificationReport<&str>) -> ClassificationReport<String> {
    ClassificationReport {
        classes: r.classes.into_iter().map(|(c, p)| (c.to_string(), p)).collect(),
        accuracy: r.accuracy,
        macro_avg: r.macro_avg,
        micro_avg: r.micro_avg,
        weighted_avg: r.weighted_avg,
    }
}

/// Predicted tags as strings; words without a prediction (truncated away) count as `O` (or, for plain
/// tags, as a miss).
fn tags_or_outside<'a>(pred: &[Option<u32>], map: &'a LabelMap, scheme: TagScheme) -> Vec<&'a str> {
    let missing = if scheme == TagScheme::None { "<truncated>" } else { "O" };
    pred.iter().map(|p| p.map_or(missing, |t| map.label(t))).collect()
}

/// The label a decoder's answer names, or [`UNMAPPED`].
fn generated_label<'a>(task: &TaskConfig, map: &'a LabelMap, text: &str) -> &'a str {
    label_from_text(task, map.labels(), text).unwrap_or(UNMAPPED)
}

/// The predicted class of an answer that names no label.
pub const UNMAPPED: &str = "<unmapped>";

/// The gold spans of a tagged example as (type, words).
fn gold_pairs(ex: &Example, tags: &[u32], map: &LabelMap) -> Vec<(String, String)> {
    let tags: Vec<&str> = tags.iter().map(|&t| map.label(t)).collect();
    tag_pairs(&ex.input.words(), &tags)
}

fn is_correct(ex: &Example, task: &TaskId, info: &TaskInfo, pred: Option<&Prediction>) -> bool {
    let gold = &ex.labels[task];
    if let (Some(Prediction::Generated(text)), Some(map), Some(tc)) =
        (pred, info.labels.get(task), info.config.tasks.get(task))
    {
        return match gold {
            Label::Class(g) => generated_label(tc, map, text) == map.label(*g),
            Label::Tags(g) => {
                let (mut want, mut got) = (gold_pairs(ex, g, map), parse_pairs(text));
                want.sort();
                got.sort();
                want == got
            }
            Label::Texts(refs) if tc.kind == TaskKind::QuestionAnswering => {
                mtl_metrics::squad_scores(std::slice::from_ref(refs), &[answer_from_text(text)]).0 == 1.0
            }
            Label::Texts(refs) => refs.iter().any(|r| mtl_metrics::exact_text_match(r, text)),
            Label::Multi(g) => labels_from_text(tc, map.labels(), text) == *g,
            _ => false,
        };
    }
    match (gold, pred) {
        (Label::Class(g), Some(Prediction::Class { id, .. })) => g == id,
        (Label::Multi(g), Some(Prediction::Labels { ids, .. })) => g == ids,
        (Label::Tags(g), Some(Prediction::Tags(p))) => {
            g.len() == p.len() && g.iter().zip(p).all(|(g, p)| Some(*g) == *p)
        }
        _ => false,
    }
}

/// The main metric of a task: accuracy for classification and plain tags, micro F1 for multi-label, Pearson's r
/// for regression, entity F1 for BIO/BIOES tags, F1 for QA, ROUGE-L for generated text.
pub fn main_metric(task: &TaskConfig) -> &'static str {
    match (task.kind, task.scheme) {
        (TaskKind::Classification, _) | (TaskKind::TokenClassification, TagScheme::None) => "accuracy",
        (TaskKind::MultiLabel, _) => "micro_f1",
        (TaskKind::Regression, _) => "pearson",
        (TaskKind::TokenClassification, _) | (TaskKind::QuestionAnswering, _) => "f1",
        (TaskKind::Generation, _) => "rouge_l",
    }
}

/// The score that selects the best evaluation (higher is better): with `score_weights`, the weighted mean of
/// the weighted metrics; else `TASK.METRIC` when given; else the mean of each task's main metric. Metrics
/// where lower is better (MSE, MAE) count negated.
pub fn selection_score(scores: &Scores, select: Option<&str>, config: &Config) -> Option<f64> {
    let signed = |metric: &str, v: f64| if Direction::of(metric) == Direction::LowerIsBetter { -v } else { v };
    if let Some(weights) = &config.training.score_weights {
        let (mut sum, mut total) = (0.0, 0.0);
        for (task, metrics) in weights {
            for (metric, weight) in metrics {
                let (Some(w), Some(v)) = (weight.weight(), scores.get(task.as_str()).and_then(|m| m.get(metric)))
                else {
                    continue;
                };
                if !v.is_finite() {
                    continue;
                }
                sum += w * signed(metric, *v);
                total += w;
            }
        }
        return (total > 0.0).then(|| sum / total);
    }
    match select {
        Some(name) => {
            let (group, metric) = name.split_once('.')?;
            let v = scores.get(group)?.get(metric).copied()?;
            Some(signed(metric, v))
        }
        None => {
            // A metric that is undefined (NaN, as Pearson's r of constant predictions) is left out.
            let values: Vec<f64> = config
                .tasks
                .iter()
                .filter_map(|(t, c)| scores.get(t.as_str())?.get(main_metric(c)).copied())
                .filter(|v| v.is_finite())
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        }
    }
}

/// One task's own score, which picks its best evaluation (higher is better): the weighted mean of its
/// weighted metrics in `score_weights` when it has any, else its main metric.
pub fn task_score(scores: &Scores, task: &TaskId, config: &Config) -> Option<f64> {
    let own = scores.get(task.as_str())?;
    let signed = |metric: &str, v: f64| if Direction::of(metric) == Direction::LowerIsBetter { -v } else { v };
    if let Some(metrics) = config.training.score_weights.as_ref().and_then(|w| w.get(task)) {
        let weighted: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|(m, w)| Some((w.weight().filter(|w| *w > 0.0)?, signed(m, *own.get(m)?))))
            .collect();
        let total: f64 = weighted.iter().map(|(w, _)| w).sum();
        if total > 0.0 {
            return Some(weighted.iter().map(|(w, v)| w * v).sum::<f64>() / total);
        }
    }
    let metric = main_metric(config.tasks.get(task)?);
    own.get(metric).map(|v| signed(metric, *v))
}

/// Each label's threshold that maximises its F1 on `data` (candidates 0.05, 0.10, …, 0.95; ties go to the
/// threshold closest to 0.5).
pub fn tune_thresholds(
    data: &Dataset,
    predictions: &[BTreeMap<TaskId, Prediction>],
    task: &TaskId,
    num_labels: usize,
) -> Vec<f64> {
    let rows: Vec<(&Vec<u32>, &Vec<f32>)> = data
        .examples
        .iter()
        .zip(predictions)
        .filter_map(|(ex, p)| match (ex.labels.get(task), p.get(task)) {
            (Some(Label::Multi(g)), Some(Prediction::Labels { probs, .. })) => Some((g, probs)),
            _ => None,
        })
        .collect();
    let mut candidates: Vec<f64> = (1..20).map(|k| f64::from(k) * 0.05).collect();
    candidates.sort_by(|a, b| (a - 0.5).abs().total_cmp(&(b - 0.5).abs()));
    (0..num_labels as u32)
        .map(|l| {
            let mut best = (f64::NEG_INFINITY, 0.5);
            for &th in &candidates {
                let (mut tp, mut np, mut ng) = (0, 0, 0);
                for (g, p) in &rows {
                    let predicted = f64::from(p[l as usize]) >= th;
                    let gold = g.contains(&l);
                    tp += usize::from(predicted && gold);
                    np += usize::from(predicted);
                    ng += usize::from(gold);
                }
                let f1 = if np + ng == 0 { 0.0 } else { 2.0 * tp as f64 / (np + ng) as f64 };
                if f1 > best.0 + 1e-12 {
                    best = (f1, th);
                }
            }
            best.1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtl_data::{Encoded, Input, Location};

    fn example(task: &str, label: Label, line: usize) -> Example {
        Example {
            location: Location { path: "data.jsonl".into(), line },
            input: Input::Text("x".into()),
            encoded: Encoded { ids: Vec::new(), type_ids: Vec::new(), word_starts: Vec::new(), truncated: false },
            labels: BTreeMap::from([(TaskId::new(task).expect("valid"), label)]),
            qa: None,
        }
    }

    /// A decoder's answers of every kind, mapped back and scored with the standard metrics (whose values
    /// are checked against their references in mtl-metrics); the expected numbers are worked out by hand.
    #[test]
    fn generated_answers_are_scored_by_each_kind_s_metric() {
        let mut text = String::from("[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\n");
        for (name, kind) in
            [("g", "generation"), ("m", "multi_label"), ("r", "regression"), ("q", "question_answering")]
        {
            text.push_str(&format!(
                "[tasks.{name}]\nkind = \"{kind}\"\nprompt = \"{{text}}\"\ndata = {{ train = \"{name}.jsonl\" }}\n"
            ));
        }
        let config = Config::parse(&text, std::path::Path::new("t.toml"), &[]).expect("valid");
        let id = |t: &str| TaskId::new(t).expect("valid");
        let labels = BTreeMap::from([
            (id("g"), LabelMap::from(vec!["text".to_string()])),
            (id("m"), LabelMap::from(vec!["politics".to_string(), "sport".to_string()])),
            (id("r"), LabelMap::from(vec!["label".to_string()])),
            (id("q"), LabelMap::from(vec!["answer".to_string()])),
        ]);
        let texts = |t: &[&str]| Label::Texts(t.iter().map(|s| s.to_string()).collect());
        let rows: Vec<(&str, Label, &str)> = vec![
            ("g", texts(&["the cat sat"]), "The cat sat"),
            ("g", texts(&["a dog", "dog"]), "dog runs"),
            ("m", Label::Multi(vec![1]), "sport"),
            ("m", Label::Multi(vec![0, 1]), "politics, weather"),
            ("r", Label::Real { raw: vec![1.0], scaled: vec![1.0] }, "1"),
            ("r", Label::Real { raw: vec![2.0], scaled: vec![2.0] }, "about 2.5."),
            ("r", Label::Real { raw: vec![3.0], scaled: vec![3.0] }, "high"),
            ("q", texts(&["Ada", "Ada Lovelace"]), "Ada Lovelace"),
            ("q", texts(&[""]), "Unanswerable"),
            ("q", texts(&["1815"]), "in 1815\nbecause"),
        ];
        let examples: Vec<Example> =
            rows.iter().enumerate().map(|(i, (t, l, _))| example(t, l.clone(), i + 1)).collect();
        let predictions: Vec<BTreeMap<TaskId, Prediction>> =
            rows.iter().map(|(t, _, p)| BTreeMap::from([(id(t), Prediction::Generated(p.to_string()))])).collect();
        let data = Dataset { examples, truncated: 0 };
        let s = score(&data, &predictions, &TaskInfo { config: &config, labels: &labels }).scores;
        let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() < 1e-9, "{what}: {got} vs {want}");
        // ROUGE-L: 1 for the first; the second's best reference is "dog" (P 1/2, R 1, F 2/3).
        close(s["g"]["rouge_l"], (1.0 + 2.0 / 3.0) / 2.0, "rouge_l");
        close(s["g"]["exact_match"], 0.0, "exact match is case-sensitive");
        // {sport} right, {politics} of {politics, sport}: 2 of 2 predicted right, 2 of 3 gold found.
        close(s["m"]["subset_accuracy"], 0.5, "subset accuracy");
        close(s["m"]["micro_f1"], 0.8, "micro F1");
        // 1, 2.5, and no number: 0 (targets not standardised); scipy: pearsonr = -0.3973597071195131.
        close(s["r"]["pearson"], -0.3973597071195131, "pearson");
        close(s["r"]["spearman"], -0.5, "spearman");
        // EM 1, 1 (no answer), 0; F1 1, 1, 2/3 ("in 1815" against "1815").
        close(s["q"]["exact_match"], 2.0 / 3.0, "exact match");
        close(s["q"]["f1"], (2.0 + 2.0 / 3.0) / 3.0, "f1");
    }
}
