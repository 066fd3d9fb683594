//! The training loop. It reports events to callbacks and leaves logging, progress and stopping to them.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_config::Config;
use mtl_core::Mode;
use mtl_core::{HostBatch, TaskId, TaskKind};
use mtl_data::{collate, epoch_batches, Batching, Dataset, Example, LabelMap};
use mtl_metrics::Direction;
use mtl_nn::MultiTaskModel;

use crate::evaluate::{
    predict_examples, score, selection_score, tune_thresholds, Evaluation, Prediction, Scores, TaskInfo,
};
use crate::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::schedule::linear_warmup_decay;
use crate::Result;

/// The datasets of a run.
#[derive(Debug, Default)]
pub struct Splits {
    pub train: Dataset,
    pub dev: Option<Dataset>,
    pub test: Option<Dataset>,
}

/// Sent after every optimiser step.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub epoch: usize,
    /// Optimiser steps done so far, from 1.
    pub step: usize,
    pub total_steps: usize,
    /// Each task's mean loss on this batch.
    pub losses: BTreeMap<TaskId, f32>,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Sent after each epoch's dev evaluation.
#[derive(Clone, Debug)]
pub struct EvalReport<'a> {
    pub epoch: usize,
    pub scores: &'a Scores,
    /// The selection score of this epoch and whether it is the best so far.
    pub selection: Option<f64>,
    pub is_best: bool,
}

/// Whether training goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Receives training events. Every method has a default that does nothing.
pub trait Callback {
    fn on_train_start(&mut self, _total_steps: usize, _steps_per_epoch: usize) {}
    fn on_step(&mut self, _report: &StepReport) {}
    fn on_eval(&mut self, _report: &EvalReport) -> Control {
        Control::Continue
    }
    fn on_train_end(&mut self) {}
}

/// The result of a run, with the best epoch's weights loaded into the model.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    pub dev: Option<Evaluation>,
    pub test: Option<Evaluation>,
    /// The label maps to store with the model: the given ones, with multi-label thresholds tuned on dev
    /// where asked.
    pub labels: BTreeMap<TaskId, LabelMap>,
}

/// How many collated batches the worker thread may hold ready.
const PREFETCH_BATCHES: usize = 4;

/// Parameters of the heads get `head_lr`; biases and LayerNorm parameters get no weight decay.
fn param_group(name: &str, config: &Config) -> ParamGroup {
    let no_decay = name.ends_with(".bias") || name.contains("LayerNorm");
    let lr = if name.starts_with("heads.") { config.head_lr() } else { config.training.lr };
    ParamGroup { lr, weight_decay: if no_decay { 0.0 } else { config.training.weight_decay } }
}

pub struct Trainer<'a> {
    pub config: &'a Config,
    pub model: &'a MultiTaskModel,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
}

impl Trainer<'_> {
    fn info<'b>(&'b self, labels: &'b BTreeMap<TaskId, LabelMap>) -> TaskInfo<'b> {
        TaskInfo { config: self.config, labels }
    }

    fn predict(
        &self,
        data: &Dataset,
        labels: &BTreeMap<TaskId, LabelMap>,
    ) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
        let examples: Vec<&Example> = data.examples.iter().collect();
        predict_examples(self.model, &examples, &self.info(labels), self.config.training.eval_batch_size)
    }

    /// Evaluates the model on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation> {
        self.evaluate_with(data, self.labels)
    }

    fn evaluate_with(&self, data: &Dataset, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Evaluation> {
        let predictions = self.predict(data, labels)?;
        Ok(score(data, &predictions, &self.info(labels)))
    }

    /// Trains for the configured epochs, keeps the weights of the best dev epoch, and scores dev and test.
    pub fn train(&self, splits: &Splits, callbacks: &mut [&mut dyn Callback]) -> Result<Outcome> {
        let t = &self.config.training;
        let kinds: BTreeMap<TaskId, (TaskKind, usize)> = self.info(self.labels).shapes();
        let lengths: Vec<usize> = splits.train.examples.iter().map(|e| e.encoded.ids.len()).collect();
        let batching =
            Batching { batch_size: t.batch_size, group_by_length: t.group_by_length, max_tokens: t.max_tokens };
        // Every epoch's batches, up front: with a token budget their number varies a little between epochs,
        // and the learning-rate schedule needs the exact total.
        let epochs: Vec<Vec<Vec<usize>>> =
            (1..=t.epochs).map(|e| epoch_batches(&lengths, &batching, t.seed, e)).collect();
        let total_steps: usize = epochs.iter().map(Vec::len).sum();
        let steps_per_epoch = epochs.first().map_or(0, Vec::len);
        let warmup = (t.warmup_ratio * total_steps as f64).ceil() as usize;
        let params = self
            .model
            .params()
            .vars()
            .iter()
            .map(|(name, var)| (name.clone(), var.clone(), param_group(name, self.config)));
        let mut optimizer = AdamW::new(params, AdamWConfig::default());
        for cb in callbacks.iter_mut() {
            cb.on_train_start(total_steps, steps_per_epoch);
        }

        let direction = Direction::HigherIsBetter;
        let mut best: Option<(usize, f64, Evaluation, BTreeMap<String, Tensor>)> = None;
        let mut step = 0;
        'epochs: for (epoch, batches) in (1..=t.epochs).zip(epochs) {
            // Collation runs on a worker thread, a few batches ahead of the model.
            std::thread::scope(|scope| -> Result<()> {
                let (sender, receiver) = std::sync::mpsc::sync_channel::<HostBatch>(PREFETCH_BATCHES);
                let (train, kinds) = (&splits.train, &kinds);
                scope.spawn(move || {
                    for chunk in batches {
                        let examples: Vec<&Example> = chunk.iter().map(|&i| &train.examples[i]).collect();
                        if sender.send(collate(&examples, kinds)).is_err() {
                            break; // the training loop stopped early
                        }
                    }
                });
                for batch in receiver {
                    let losses = self.model.losses(&batch, Mode::Train)?;
                    let Some(total) = losses
                        .iter()
                        .map(|l| l.loss.clone())
                        .reduce(|a, b| (a + b).expect("scalar losses add; this is a bug"))
                    else {
                        continue;
                    };
                    let grads = self.model.backward(&total)?;
                    let lr_scale = linear_warmup_decay(step, warmup, total_steps);
                    let info = optimizer.step(&grads, lr_scale, t.grad_clip)?;
                    step += 1;
                    let report = StepReport {
                        epoch,
                        step,
                        total_steps,
                        losses: losses
                            .iter()
                            .map(|l| Ok((l.task.clone(), l.loss.to_scalar::<f32>()?)))
                            .collect::<Result<_>>()?,
                        lr: t.lr * lr_scale,
                        grad_norm: info.grad_norm,
                    };
                    for cb in callbacks.iter_mut() {
                        cb.on_step(&report);
                    }
                }
                Ok(())
            })?;
            let Some(dev) = &splits.dev else { continue };
            let eval = self.evaluate(dev)?;
            let scores: &Scores = &eval.scores;
            let selection = selection_score(scores, t.select_metric.as_deref(), self.config);
            let is_best = match (&best, selection) {
                (None, _) => true,
                (Some((_, b, _, _)), Some(s)) => direction.improves(s, *b),
                (Some(_), None) => false,
            };
            let mut stop = false;
            for cb in callbacks.iter_mut() {
                stop |= cb.on_eval(&EvalReport { epoch, scores, selection, is_best }) == Control::Stop;
            }
            if is_best {
                best = Some((epoch, selection.unwrap_or(f64::NEG_INFINITY), eval, self.snapshot()?));
            }
            if stop {
                break 'epochs;
            }
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_end();
        }
        let (best_epoch, mut dev) = match best {
            Some((epoch, _, eval, weights)) => {
                self.restore(&weights)?;
                (epoch, Some(eval))
            }
            None => (t.epochs, None),
        };
        let mut labels = self.labels.clone();
        let tuned: Vec<&TaskId> = self
            .config
            .tasks
            .iter()
            .filter(|(_, c)| c.kind == TaskKind::MultiLabel && c.tune_thresholds)
            .map(|(t, _)| t)
            .collect();
        if let (Some(data), false) = (&splits.dev, tuned.is_empty()) {
            let predictions = self.predict(data, &labels)?;
            for task in tuned {
                let n = labels[task].len();
                let thresholds = tune_thresholds(data, &predictions, task, n);
                tracing::info!(task = %task, ?thresholds, "multi-label thresholds tuned on dev");
                labels.get_mut(task).expect("every task has labels").thresholds = Some(thresholds);
            }
            dev = Some(self.evaluate_with(data, &labels)?);
        }
        let test = splits.test.as_ref().map(|d| self.evaluate_with(d, &labels)).transpose()?;
        Ok(Outcome { best_epoch, dev, test, labels })
    }

    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.model.params().vars().iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
    }

    fn restore(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.model.params().vars() {
            var.set(&weights[name])?;
        }
        Ok(())
    }
}
