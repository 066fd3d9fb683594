//! An encoder's predictions: inputs encoded (a question's context as windows), every head run in batches,
//! and the results in the typed schema of [`crate::predict`].

use std::collections::BTreeMap;
use std::sync::Arc;

use mtl_config::Config;
use mtl_core::{TaskId, TaskKind};
use mtl_data::{Dataset, Example, Input, LabelMap, Location};
use mtl_nn::MultiTaskModel;
use mtl_serve::drift::Reference;
use mtl_train::{predict_examples, Prediction, TaskInfo};

use super::EncoderRun;
use crate::error::{Error, Result};
use crate::predict::{task_prediction, PredictOptions, PredictionRecord};

/// The record of an encoder's predictions for one example.
pub(crate) fn encoder_record(
    ex: &Example,
    preds: &BTreeMap<TaskId, Prediction>,
    labels: &BTreeMap<TaskId, LabelMap>,
    full: bool,
) -> PredictionRecord {
    let words = ex.input.words();
    let mut record = PredictionRecord::of(&ex.input);
    for (task, p) in preds {
        record.predictions.insert(task.to_string(), task_prediction(p, &words, &labels[task], full));
    }
    record
}

/// The distributions of the model's answers to the dev set, which `mtl serve` compares its answers with
/// ([`mtl_serve::drift`]): each task over its own dev examples (the windows of a question once), its answers
/// as the server gives them.
pub(crate) fn dev_reference(
    model: &MultiTaskModel,
    config: &Config,
    labels: &BTreeMap<TaskId, LabelMap>,
    dev: &Dataset,
) -> Result<Reference> {
    let started = std::time::Instant::now();
    let info = TaskInfo { config, labels };
    let mut examples: Vec<&Example> = Vec::new();
    let mut last_group = None;
    for ex in &dev.examples {
        let group = ex.qa.as_ref().map(|q| q.question.group);
        if group.is_some() && group == last_group {
            continue;
        }
        last_group = group;
        examples.push(ex);
    }
    let predictions = predict_examples(model, &examples, &info, config.training.eval_batch_size)?;
    let answers: Vec<BTreeMap<String, serde_json::Value>> = examples
        .iter()
        .zip(&predictions)
        .map(|(ex, preds)| {
            let own: BTreeMap<TaskId, Prediction> =
                preds.iter().filter(|(t, _)| ex.labels.contains_key(*t)).map(|(t, p)| (t.clone(), p.clone())).collect();
            encoder_record(ex, &own, labels, false)
                .predictions
                .into_iter()
                .map(|(t, p)| (t, serde_json::to_value(p).expect("predictions serialize; this is a bug")))
                .collect()
        })
        .collect();
    let tasks: Vec<mtl_serve::TaskDescription> =
        config.tasks.iter().map(|(name, t)| crate::predict::task_description(name, t, labels.get(name))).collect();
    let reference = Reference::build("dev", &tasks, &answers);
    tracing::info!(
        inputs = examples.len(),
        seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "drift reference: the dev set's answers"
    );
    Ok(reference)
}

/// The examples of one input for an encoder: one, or the windows of a question's context. `group` numbers
/// the questions, whose windows share an answer. The error is the encoder's message.
pub(crate) fn encoder_examples(
    run: &EncoderRun,
    location: &Location,
    input: &Input,
    group: usize,
) -> std::result::Result<Vec<Example>, String> {
    let qa = run.config.tasks.values().find(|t| t.kind == TaskKind::QuestionAnswering);
    if let (Input::Question { question, context }, Some(task)) = (input, qa) {
        let encoder = &run.encoder;
        let windows =
            encoder.question_windows(question, context, task.max_query_len, task.doc_stride(encoder.max_len()))?;
        let shared = Arc::new(mtl_data::Question { group, context: context.clone(), answers: Vec::new() });
        return Ok(windows
            .into_iter()
            .map(|w| Example {
                location: location.clone(),
                input: input.clone(),
                encoded: w.encoded,
                labels: BTreeMap::new(),
                qa: Some(mtl_data::QaFeature { question: shared.clone(), offsets: w.offsets }),
            })
            .collect());
    }
    // Token tasks tag words: raw text is split on whitespace, as the training files split it.
    let input = match input {
        Input::Text(t) if run.config.tasks.values().any(|t| t.kind == TaskKind::TokenClassification) => {
            Input::Words(t.split_whitespace().map(String::from).collect())
        }
        other => other.clone(),
    };
    let encoded = run.encoder.encode(&input)?;
    Ok(vec![Example { location: location.clone(), input, encoded, labels: BTreeMap::new(), qa: None }])
}

/// An encoder's records for `inputs`.
pub(crate) fn records(
    run: &EncoderRun,
    inputs: &[(Location, Input)],
    options: &PredictOptions,
) -> Result<Vec<PredictionRecord>> {
    let info = TaskInfo { config: &run.config, labels: &run.labels };
    let mut examples = Vec::new();
    let mut owner = Vec::new();
    for (n, (location, input)) in inputs.iter().enumerate() {
        let at = |m: String| Error::Usage(format!("{}:{}: {m}", location.path.display(), location.line));
        for ex in encoder_examples(run, location, input, n).map_err(at)? {
            examples.push(ex);
            owner.push(n);
        }
    }
    let refs: Vec<&Example> = examples.iter().collect();
    let predictions = predict_examples(&run.model, &refs, &info, options.batch_size)?;
    let mut records = Vec::with_capacity(inputs.len());
    let mut last = None;
    for ((ex, preds), n) in examples.iter().zip(predictions).zip(owner) {
        // The windows of one question share their answer: one record.
        if last == Some(n) {
            continue;
        }
        last = Some(n);
        records.push(encoder_record(ex, &preds, &run.labels, options.full_precision));
    }
    Ok(records)
}
