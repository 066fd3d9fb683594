//! The training loop. It reports events to callbacks and leaves logging, progress and stopping to them.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_config::{Config, StepPlan};
use mtl_core::{HostBatch, Mode, TaskId, TaskKind};
use mtl_data::{epoch_batches, Batching, Dataset, Example, LabelMap};

use crate::evaluate::{score, selection_score, task_score, tune_thresholds, Evaluation, Prediction, Scores, TaskInfo};
use crate::groups::{is_frozen, param_group, role_of};
use crate::model::TrainModel;
use crate::optim::{AdamW, AdamWConfig};
use crate::plan::{sampled_epochs, sampling_probabilities, Batch};
use crate::schedule::lr_scale;
use crate::step::{accumulate, batch_grads, split_batch_grads, BatchOutcome, GradientPlan, Grads};
use crate::weighting::StepLosses;
use crate::{resume, surgery, weighting, Result, TrainError};
use mtl_core::ParamRole;

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
    /// Each task's mean loss on this step's batches.
    pub losses: BTreeMap<TaskId, f32>,
    /// Each task's loss weight during the step.
    pub weights: BTreeMap<TaskId, f64>,
    /// The backbone's peak learning rate times the schedule.
    pub lr: f64,
    pub grad_norm: f64,
    /// Steps skipped so far for NaN or infinite losses or gradients.
    pub skipped: usize,
    /// On diagnostic steps, the cosine similarity of each pair of tasks' gradients on the shared parameters.
    pub grad_cosines: Option<Vec<(TaskId, TaskId, f64)>>,
    /// Under the `sampled` plan, each task's probability of being drawn in this epoch.
    pub sampling: Option<BTreeMap<TaskId, f64>>,
}

/// Sent after each epoch's dev evaluation.
#[derive(Clone, Debug)]
pub struct EvalReport<'a> {
    pub epoch: usize,
    /// Optimiser steps done.
    pub step: usize,
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
    /// `resumed` is the number of step and evaluation reports the run had sent before the checkpoint it
    /// resumes from (none for a fresh run): a log can keep exactly those.
    fn on_train_start(&mut self, _total_steps: usize, _steps_per_epoch: usize, _resumed: Option<usize>) {}
    fn on_step(&mut self, _report: &StepReport) {}
    fn on_eval(&mut self, _report: &EvalReport) -> Control {
        Control::Continue
    }
    fn on_train_end(&mut self) {}
}

/// A task's best evaluation.
#[derive(Clone, Debug)]
pub struct TaskBest {
    pub epoch: usize,
    pub step: usize,
    /// The task's own score ([`task_score`]).
    pub score: f64,
    /// Its head's weights then, by parameter name.
    pub head: BTreeMap<String, Tensor>,
    /// The weights then, when per-task models are kept: all but those frozen for the whole run.
    pub model: Option<BTreeMap<String, Tensor>>,
}

/// The result of a run, with the best evaluation's weights loaded into the model.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    /// Optimiser steps done when they were evaluated.
    pub best_step: usize,
    /// Steps done in all, and whether patience ended the run before the last epoch.
    pub steps: usize,
    pub stopped_early: bool,
    /// Steps skipped for NaN or infinite losses or gradients.
    pub skipped_steps: usize,
    /// Each task's best evaluation on dev.
    pub per_task: BTreeMap<TaskId, TaskBest>,
    /// Whether the model was put together from each task's own best evaluation ([`Trainer::keep_per_task_models`]
    /// where no trained parameter is shared); otherwise it holds the best selection score's weights.
    pub composed: bool,
    /// Each task's loss weight at the end of training.
    pub task_weights: BTreeMap<TaskId, f64>,
    pub dev: Option<Evaluation>,
    pub test: Option<Evaluation>,
    /// The label maps to store with the model: the given ones, with multi-label thresholds tuned on dev
    /// where asked.
    pub labels: BTreeMap<TaskId, LabelMap>,
}

/// How many collated batches the worker thread may hold ready.
const PREFETCH_BATCHES: usize = 4;

/// A collated batch, or, when every step needs each task's gradient, one sub-batch per task.
/// Where Auto-λ's meta batches come from.
struct MetaSource<'a> {
    data: &'a Dataset,
    subset: Vec<usize>,
}

/// A model seen by Auto-λ's look-ahead: the step's batch and a meta batch.
struct LookaheadModel<'a> {
    model: &'a dyn TrainModel,
    batch: &'a HostBatch,
    meta: HostBatch,
}

impl weighting::MetaModel for LookaheadModel<'_> {
    fn train_losses(&self, mode: Mode) -> Result<Vec<(TaskId, Tensor)>> {
        Ok(self.model.losses(self.batch, mode)?.into_iter().map(|l| (l.task, l.loss)).collect())
    }
    fn meta_losses(&self) -> Result<Vec<(TaskId, Tensor)>> {
        Ok(self.model.losses(&self.meta, Mode::Train)?.into_iter().map(|l| (l.task, l.loss)).collect())
    }
    fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.model.backward(loss)
    }
}

enum Work {
    Whole(HostBatch),
    PerTask(Vec<HostBatch>),
}

/// The gradients of the batches of the step under way.
#[derive(Default)]
struct Pending {
    grads: Grads,
    batches: usize,
    losses: BTreeMap<TaskId, (f64, usize)>,
    norms: Option<BTreeMap<TaskId, (f64, usize)>>,
    cosines: Option<Vec<(TaskId, TaskId, f64)>>,
}

/// A step's averaged gradients, mean losses, mean gradient norms and cosines.
type Finished = (Grads, BTreeMap<TaskId, f64>, Option<BTreeMap<TaskId, f64>>, Option<Vec<(TaskId, TaskId, f64)>>);

impl Pending {
    fn add(&mut self, g: crate::step::BatchGrads) -> Result<()> {
        accumulate(&mut self.grads, g.grads)?;
        self.batches += 1;
        for (task, loss) in g.losses {
            let e = self.losses.entry(task).or_default();
            e.0 += loss;
            e.1 += 1;
        }
        if let Some(norms) = g.top_layer_norms {
            let sums = self.norms.get_or_insert_with(BTreeMap::new);
            for (task, n) in norms {
                let e = sums.entry(task).or_default();
                e.0 += n;
                e.1 += 1;
            }
        }
        if self.cosines.is_none() {
            self.cosines = g.cosines;
        }
        Ok(())
    }

    /// The averages, or `None` when no batch gave gradients.
    fn finish(self) -> Result<Option<Finished>> {
        if self.batches == 0 {
            return Ok(None);
        }
        let mut grads = self.grads;
        if self.batches > 1 {
            let scale = 1.0 / self.batches as f64;
            for g in grads.values_mut() {
                *g = g.affine(scale, 0.0)?;
            }
        }
        let mean = |m: BTreeMap<TaskId, (f64, usize)>| m.into_iter().map(|(t, (s, n))| (t, s / n as f64)).collect();
        Ok(Some((grads, mean(self.losses), self.norms.map(mean), self.cosines)))
    }
}

/// Fails once more steps than allowed were skipped.
fn check_skipped(skipped: usize, limit: usize, step: usize) -> Result<()> {
    if skipped > limit {
        return Err(TrainError::NonFinite { skipped, step });
    }
    Ok(())
}

pub struct Trainer<'a> {
    pub config: &'a Config,
    pub model: &'a dyn TrainModel,
    pub labels: &'a BTreeMap<TaskId, LabelMap>,
    /// Keep all weights at each task's best evaluation (`--select per-task`), not only its head's. Where every
    /// trained parameter is one task's own (per-task adapters and heads on a frozen backbone), the final model
    /// then takes each task's parameters from that task's best evaluation: early stopping per task.
    pub keep_per_task_models: bool,
    /// Where training checkpoints go (`checkpoint-STEP/` directories); none are written without it.
    pub checkpoints: Option<&'a std::path::Path>,
    /// Continue from the newest checkpoint there.
    pub resume: bool,
    /// Parameters that never train, whatever the recipe says (a model's existing tasks under `mtl add-task`).
    pub frozen: Option<&'a std::collections::BTreeSet<String>>,
    /// Pause after this epoch's evaluation and checkpoint, as an interrupt does ([`TrainError::Interrupted`]):
    /// the schedule stays that of `training.epochs`, and a resume goes on from there (`mtl tune`'s rungs).
    pub stop_after_epoch: Option<usize>,
    /// A pull toward earlier weights (`mtl update`'s L2-SP or EWC): its gradient is added to every step's.
    pub anchor: Option<&'a Anchor>,
}

/// A quadratic penalty toward reference weights θ₀: `strength / 2 · Σ wᵢ (θᵢ − θ₀ᵢ)²` over the parameters
/// it names, wᵢ = 1 (L2-SP, Li et al. 2018) or a diagonal Fisher estimate (EWC, Kirkpatrick et al. 2017). Its
/// gradient, `strength · wᵢ (θᵢ − θ₀ᵢ)`, is added to each step's before clipping.
#[derive(Clone, Debug)]
pub struct Anchor {
    pub reference: BTreeMap<String, Tensor>,
    /// Per-parameter weights (the Fisher diagonal); none: all 1.
    pub weights: Option<BTreeMap<String, Tensor>>,
    pub strength: f64,
}

impl Anchor {
    /// Adds the penalty's gradient at the model's current weights to `grads` (a parameter that has no
    /// gradient this step but drifted gets one).
    pub fn add_to(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        vars: &BTreeMap<String, candle_core::Var>,
    ) -> Result<()> {
        for (name, theta0) in &self.reference {
            let Some(var) = vars.get(name) else { continue };
            let mut pull = ((var.as_tensor() - theta0)? * self.strength)?;
            if let Some(w) = self.weights.as_ref().and_then(|w| w.get(name)) {
                pull = (pull * w)?;
            }
            let g = match grads.remove(name) {
                Some(g) => (g + pull)?,
                None => pull,
            };
            grads.insert(name.clone(), g);
        }
        Ok(())
    }
}

impl<'a> Trainer<'a> {
    /// A trainer that only evaluates and predicts (no checkpoints, nothing frozen, nothing resumed).
    pub fn evaluator(config: &'a Config, model: &'a dyn TrainModel, labels: &'a BTreeMap<TaskId, LabelMap>) -> Self {
        Self {
            config,
            model,
            labels,
            keep_per_task_models: false,
            checkpoints: None,
            resume: false,
            frozen: None,
            stop_after_epoch: None,
            anchor: None,
        }
    }
}

/// The best evaluation so far: epoch, step, selection score, scores and weights.
struct Best {
    epoch: usize,
    step: usize,
    score: f64,
    eval: Evaluation,
    weights: BTreeMap<String, Tensor>,
}

impl Selection {
    /// The selection state of a checkpoint.
    fn restore(
        state: &resume::TrainState,
        mut tensors: resume::TrainTensors,
        params: &mtl_nn::ParamStore,
    ) -> Result<Self> {
        let best = match &state.best {
            Some(b) => Some(Best {
                epoch: b.epoch,
                step: b.step,
                score: b.score.unwrap_or(f64::NEG_INFINITY),
                eval: b.evaluation(),
                weights: tensors.best.take().ok_or_else(|| TrainError::Invalid {
                    path: "checkpoint".into(),
                    message: "best.safetensors is missing".into(),
                })?,
            }),
            None => None,
        };
        let per_task = state
            .per_task
            .iter()
            .map(|(task, b)| {
                let head = tensors
                    .heads
                    .iter()
                    .filter(|(n, _)| matches!(role_of(params, n), ParamRole::Head(t) if t == task))
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect();
                let model = tensors.per_task.remove(task);
                let score = b.score.unwrap_or(f64::NEG_INFINITY);
                (task.clone(), TaskBest { epoch: b.epoch, step: b.step, score, head, model })
            })
            .collect();
        Ok(Self { best, since_best: state.since_best, per_task, last_step: state.last_eval_step })
    }
}

/// The best evaluation so far, each task's, and the count of evaluations since the best.
#[derive(Default)]
struct Selection {
    best: Option<Best>,
    since_best: usize,
    per_task: BTreeMap<TaskId, TaskBest>,
    /// The step of the latest evaluation.
    last_step: Option<usize>,
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
        self.model.predict(&examples, &self.info(labels), self.config.training.eval_batch_size)
    }

    /// The role of the trained variable `name`.
    fn role_of(&self, name: &str) -> &ParamRole {
        role_of(self.model.params(), name)
    }

    /// Whether the parameter `name` is frozen at optimiser step `step`: by the recipe, or for good.
    /// Auto-λ's meta update before optimiser step `step` (from 0) on `batch`, with the step's schedule `scale`.
    #[allow(clippy::too_many_arguments)]
    fn auto_lambda_step(
        &self,
        weighting: &mut dyn weighting::LossWeighting,
        batch: &HostBatch,
        meta: &MetaSource,
        kinds: &BTreeMap<TaskId, (TaskKind, usize)>,
        scale: f64,
        step: usize,
        num_layers: usize,
    ) -> Result<()> {
        let t = &self.config.training;
        let Some(auto) = weighting.as_auto_lambda() else { return Ok(()) };
        let chosen = weighting::meta_batch(&meta.subset, t.batch_size, auto.meta_batches(), t.seed);
        let examples: Vec<&Example> = chosen.iter().map(|&i| &meta.data.examples[i]).collect();
        let model = LookaheadModel { model: self.model, batch, meta: self.model.collation().collate(&examples, kinds) };
        let vars: Vec<weighting::LookaheadVar> = self
            .model
            .params()
            .vars()
            .iter()
            .filter(|(n, _)| !self.is_frozen(n, num_layers, step))
            .map(|(name, var)| {
                let group = param_group(name, self.role_of(name), self.config, num_layers);
                weighting::LookaheadVar { var, lr: group.lr * scale, weight_decay: group.weight_decay }
            })
            .collect();
        let lambda = weighting::LossWeighting::weights(&*auto);
        let gradient = weighting::hypergradient(&model, &vars, &lambda, t.lr * scale)?;
        auto.meta_step(&gradient);
        Ok(())
    }

    /// Each task's mean loss over the batches of `work`, in training mode, without a backward pass (FAMO's
    /// losses after the step).
    fn losses_of(&self, work: &[Work]) -> Result<BTreeMap<TaskId, f64>> {
        let mut sums: BTreeMap<TaskId, (f64, usize)> = BTreeMap::new();
        for w in work {
            let batches = match w {
                Work::Whole(batch) => std::slice::from_ref(batch),
                Work::PerTask(batches) => batches.as_slice(),
            };
            for batch in batches {
                for loss in self.model.losses(batch, Mode::Train)? {
                    let e = sums.entry(loss.task).or_default();
                    e.0 += f64::from(loss.loss.to_scalar::<f32>()?);
                    e.1 += 1;
                }
            }
        }
        Ok(sums.into_iter().map(|(t, (s, n))| (t, s / n as f64)).collect())
    }

    fn is_frozen(&self, name: &str, num_layers: usize, step: usize) -> bool {
        is_frozen(self.role_of(name), self.config, num_layers, step) || self.frozen.is_some_and(|f| f.contains(name))
    }

    /// Evaluates the model on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation> {
        self.evaluate_with(data, self.labels)
    }

    fn evaluate_with(&self, data: &Dataset, labels: &BTreeMap<TaskId, LabelMap>) -> Result<Evaluation> {
        let predictions = self.predict(data, labels)?;
        Ok(score(data, &predictions, &self.info(labels)))
    }

    /// Trains for the configured epochs (or until patience runs out), keeps the weights of the best dev
    /// evaluation, and scores dev and test.
    pub fn train(&self, splits: &Splits, callbacks: &mut [&mut dyn Callback]) -> Result<Outcome> {
        let t = &self.config.training;
        let kinds: BTreeMap<TaskId, (TaskKind, usize)> = self.info(self.labels).shapes();
        let lengths: Vec<usize> = splits.train.examples.iter().map(|e| e.encoded.ids.len()).collect();
        let batching =
            Batching { batch_size: t.batch_size, group_by_length: t.group_by_length, max_tokens: t.max_tokens };
        // Every epoch's batches, up front: with a token budget their number varies a little between epochs,
        // and the learning-rate schedule needs the exact total.
        let epochs: Vec<Vec<Batch>> = match t.sampling.plan {
            StepPlan::Mixed => (1..=t.epochs)
                .map(|e| epoch_batches(&lengths, &batching, t.seed, e).into_iter().map(|b| (b, None)).collect())
                .collect(),
            StepPlan::Sampled => sampled_epochs(&splits.train, &lengths, &batching, self.config),
        };
        let probabilities = sampling_probabilities(&splits.train, self.config);
        let accumulation = t.grad_accumulation;
        let total_steps: usize = epochs.iter().map(|e| e.len().div_ceil(accumulation)).sum();
        let steps_per_epoch = epochs.first().map_or(0, |e| e.len().div_ceil(accumulation));
        let warmup = (t.warmup_ratio * total_steps as f64).ceil() as usize;
        let num_layers = self.model.num_layers();
        let mut weighting = weighting::weighting(self.config, steps_per_epoch, self.model.device())?;
        let surgery = surgery::surgery(&t.surgery, t.seed);
        // Surgery on the shared representation keeps the batch whole: one encoder pass for every task.
        let split_by_task = weighting.needs_grad_norms() || (surgery.is_some() && !t.surgery.representation);
        // Every trained variable: the model's and the weighting's own (uncertainty's log-variances).
        let all_vars: BTreeMap<String, candle_core::Var> =
            self.model.params().vars().iter().map(|(n, v)| (n.clone(), v.clone())).chain(weighting.vars()).collect();
        let vars = &all_vars;
        // The optimiser holds moments only for what can train: a frozen backbone gets none (nor a place in
        // checkpoints).
        let trained = all_vars
            .iter()
            .filter(|(n, _)| !self.is_frozen(n, num_layers, usize::MAX))
            .map(|(n, v)| (n.clone(), v.clone()));
        let mut optimizer = AdamW::new(
            trained.map(|(name, var)| {
                let group = param_group(&name, self.role_of(&name), self.config, num_layers);
                (name, var, group)
            }),
            AdamWConfig::default(),
        );
        // An AdaLoRA model can be selected only once its budget is final: after the step that fixes the pattern
        // (`total − tfinal`, from 0), or at the run's end.
        let adalora_final = (self.config.peft.method == mtl_config::PeftMethod::Adalora)
            .then(|| total_steps.saturating_sub(self.config.peft.adalora.tfinal));
        let selectable = |done: usize| adalora_final.is_none_or(|last| done > last || done == total_steps);
        // AdaLoRA's allocators (shared with the checkpoint writer).
        let adalora = std::cell::RefCell::new(crate::adalora::AdaLoraRun::new(
            self.config,
            self.model.params().vars(),
            total_steps,
        )?);
        // Auto-λ's meta data: a seeded subset of the dev or training examples.
        let meta_source = match weighting.as_auto_lambda().is_some() {
            false => None,
            true => {
                let w = &t.weighting;
                let data = match w.meta_data {
                    mtl_config::MetaData::Train => &splits.train,
                    mtl_config::MetaData::Dev => splits.dev.as_ref().ok_or_else(|| TrainError::Invalid {
                        path: "training.weighting.meta_data".into(),
                        message: "Auto-λ's meta batches come from the dev split, and no task has one; give the tasks dev data or set meta_data = \"train\"".into(),
                    })?,
                };
                let subset = weighting::meta_subset(data.examples.len(), w.meta_examples, t.seed);
                Some(MetaSource { data, subset })
            }
        };
        let mut selection = Selection::default();
        let mut step = 0;
        let mut skipped = 0;
        let mut stopped_early = false;
        let (mut start_epoch, mut resume_batch) = (1, 0);
        // Step and evaluation reports sent so far (kept in checkpoints, so that logs resume exactly).
        let mut reports = 0;
        let mut resumed = None;
        if let (true, Some(out)) = (self.resume, self.checkpoints) {
            let (state, mut tensors) = resume::load_latest(out)?;
            if state.config != self.config.to_toml() {
                return Err(TrainError::Invalid {
                    path: out.to_owned(),
                    message: "the config differs from the one its checkpoints were trained with; resume with the same config and --set overrides".into(),
                });
            }
            self.restore(&tensors.model)?;
            if state.keep_per_task_models != self.keep_per_task_models {
                return Err(TrainError::Invalid {
                    path: out.to_owned(),
                    message: "the run was started with a different --select; resume with the same one".into(),
                });
            }
            optimizer.load_state(crate::AdamWState {
                step: state.optimizer_steps,
                moments: std::mem::take(&mut tensors.moments),
                param_steps: state.param_steps.clone(),
            })?;
            weighting.load_state(&state.weighting)?;
            if let Some(surgery) = &surgery {
                surgery
                    .load_tensors(std::mem::take(&mut tensors.surgery))
                    .map_err(|message| TrainError::Invalid { path: out.join("surgery.safetensors"), message })?;
            }
            if let Some(a) = adalora.borrow_mut().as_mut() {
                a.load_tensors(&tensors.adalora)
                    .map_err(|message| TrainError::Invalid { path: out.join("adalora.safetensors"), message })?;
            }
            let position = state
                .dropout_position
                .parse::<u128>()
                .map_err(|e| TrainError::Invalid { path: out.to_owned(), message: format!("dropout_position: {e}") })?;
            self.model.dropout().set_position(position);
            selection = Selection::restore(&state, tensors, self.model.params())?;
            (step, skipped, start_epoch, resume_batch) = (state.step, state.skipped, state.epoch, state.next_batch);
            reports = state.reports;
            resumed = Some(reports);
            tracing::info!(step, epoch = start_epoch, batch = resume_batch, "resuming from {}", out.display());
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_start(total_steps, steps_per_epoch, resumed);
        }
        let save = |step: usize,
                    epoch: usize,
                    next_batch: usize,
                    skipped: usize,
                    reports: usize,
                    optimizer: &AdamW,
                    weighting: &dyn weighting::LossWeighting,
                    selection: &Selection|
         -> Result<()> {
            let Some(out) = self.checkpoints else { return Ok(()) };
            let moments = optimizer.state();
            let state = resume::TrainState {
                step,
                epoch,
                next_batch,
                skipped,
                optimizer_steps: moments.step,
                param_steps: moments.param_steps,
                keep_per_task_models: self.keep_per_task_models,
                dropout_position: self.model.dropout().position().to_string(),
                weighting: weighting.state(),
                best: selection.best.as_ref().map(|b| resume::BestState {
                    epoch: b.epoch,
                    step: b.step,
                    score: b.score.is_finite().then_some(b.score),
                    scores: resume::BestState::scores_of(&b.eval),
                    reports: b.eval.reports.clone(),
                    confusions: b.eval.confusions.clone(),
                }),
                since_best: selection.since_best,
                last_eval_step: selection.last_step,
                per_task: selection
                    .per_task
                    .iter()
                    .map(|(t, b)| {
                        (
                            t.clone(),
                            resume::TaskBestState {
                                epoch: b.epoch,
                                step: b.step,
                                score: b.score.is_finite().then_some(b.score),
                            },
                        )
                    })
                    .collect(),
                config: self.config.to_toml(),
                reports,
            };
            let tensors = resume::TrainTensors {
                model: self.snapshot()?,
                moments: moments.moments,
                best: selection.best.as_ref().map(|b| b.weights.clone()),
                heads: selection.per_task.values().flat_map(|b| b.head.clone()).collect(),
                per_task: selection.per_task.iter().filter_map(|(t, b)| Some((t.clone(), b.model.clone()?))).collect(),
                surgery: surgery.as_ref().map(|s| s.tensors()).unwrap_or_default(),
                adalora: adalora.borrow().as_ref().map(|a| a.tensors()).unwrap_or_default(),
            };
            resume::save(out, &state, &tensors, t.keep_checkpoints)
        };
        for (epoch, batches) in (1..=t.epochs).zip(epochs) {
            if epoch < start_epoch {
                continue;
            }
            let batches_in_epoch = batches.len();
            // A resumed run picks up the epoch where its checkpoint left it.
            let done = if epoch == start_epoch { resume_batch } else { 0 };
            // Collation runs on a worker thread, a few batches ahead of the model.
            let stop = std::thread::scope(|scope| -> Result<bool> {
                let (sender, receiver) = std::sync::mpsc::sync_channel::<Work>(PREFETCH_BATCHES);
                let (train, kinds, collation) = (&splits.train, &kinds, self.model.collation());
                scope.spawn(move || {
                    let only = |task: &TaskId| -> BTreeMap<TaskId, (TaskKind, usize)> {
                        kinds.get_key_value(task).map(|(k, v)| (k.clone(), *v)).into_iter().collect()
                    };
                    for (chunk, task) in batches.into_iter().skip(done) {
                        let examples: Vec<&Example> = chunk.iter().map(|&i| &train.examples[i]).collect();
                        let work = match &task {
                            // A sampled step trains its task only, even on examples that carry other labels.
                            Some(task) => Work::Whole(collation.collate(&examples, &only(task))),
                            None if split_by_task => Work::PerTask(
                                kinds
                                    .keys()
                                    .filter_map(|task| {
                                        let own: Vec<&Example> =
                                            examples.iter().copied().filter(|e| e.labels.contains_key(task)).collect();
                                        (!own.is_empty()).then(|| collation.collate(&own, &only(task)))
                                    })
                                    .collect(),
                            ),
                            None => Work::Whole(collation.collate(&examples, kinds)),
                        };
                        if sender.send(work).is_err() {
                            break; // the training loop stopped early
                        }
                    }
                });
                let mut pending = Pending::default();
                // The step's batches, kept when the weighting needs their losses after the step (FAMO).
                let mut step_work: Vec<Work> = Vec::new();
                for (i, work) in (done..).zip(receiver) {
                    if let (Some(meta), Work::Whole(batch)) = (&meta_source, &work) {
                        if pending.batches == 0 && step % t.weighting.meta_every == 0 {
                            let scale = lr_scale(t.schedule, step, warmup, total_steps);
                            self.auto_lambda_step(weighting.as_mut(), batch, meta, kinds, scale, step, num_layers)?;
                        }
                    }
                    let shared: Vec<String> = vars
                        .keys()
                        .filter(|n| self.role_of(n).is_shared() && !self.is_frozen(n, num_layers, step))
                        .cloned()
                        .collect();
                    let diagnose = pending.batches == 0 && t.diagnostics_every.is_some_and(|e| (step + 1) % e == 0);
                    let plan = GradientPlan {
                        vars,
                        weighting: weighting.as_ref(),
                        surgery: surgery.as_deref(),
                        shared: &shared,
                        num_layers,
                        diagnose,
                        step,
                        representation: t.surgery.representation,
                    };
                    let outcome = match &work {
                        Work::Whole(batch) => batch_grads(self.model, batch, &plan)?,
                        Work::PerTask(batches) => split_batch_grads(self.model, batches, &plan)?,
                    };
                    if weighting.needs_losses_after_step() {
                        step_work.push(work);
                    }
                    match outcome {
                        BatchOutcome::Empty => {}
                        BatchOutcome::NonFinite => {
                            skipped += 1;
                            check_skipped(skipped, t.max_skipped_steps, step)?;
                        }
                        BatchOutcome::Grads(g) => pending.add(g)?,
                    }
                    if (i + 1) % accumulation != 0 && i + 1 != batches_in_epoch {
                        continue;
                    }
                    let weights = weighting.weights();
                    let taken = std::mem::take(&mut pending);
                    let stepped_work = std::mem::take(&mut step_work);
                    step += 1;
                    let scale = lr_scale(t.schedule, step - 1, warmup, total_steps);
                    // A step whose batches all had no label or a non-finite loss updates nothing, but is still
                    // reported, evaluated and checkpointed like any other.
                    let (losses, grad_norm, cosines) = match taken.finish()? {
                        Some((mut grads, losses, norms, cosines)) => {
                            if let Some(anchor) = self.anchor {
                                anchor.add_to(&mut grads, self.model.params().vars())?;
                            }
                            grads.retain(|name, _| !self.is_frozen(name, num_layers, step - 1));
                            if let Some(a) = adalora.borrow().as_ref() {
                                a.add_regularizer(&mut grads, self.model.params().vars())?;
                            }
                            let info = optimizer.step(&grads, scale, t.grad_clip)?;
                            if info.applied {
                                if let Some(a) = adalora.borrow_mut().as_mut() {
                                    a.after_step(&grads, self.model.params().vars(), step - 1)?;
                                }
                            }
                            if !info.applied {
                                skipped += 1;
                                check_skipped(skipped, t.max_skipped_steps, step)?;
                            } else {
                                let after = match weighting.needs_losses_after_step() {
                                    true => Some(self.losses_of(&stepped_work)?),
                                    false => None,
                                };
                                weighting.observe(&StepLosses { losses: losses.clone(), grad_norms: norms, after });
                            }
                            (losses, info.grad_norm, cosines)
                        }
                        None => (BTreeMap::new(), 0.0, None),
                    };
                    let report = StepReport {
                        epoch,
                        step,
                        total_steps,
                        losses: losses.iter().map(|(k, v)| (k.clone(), *v as f32)).collect(),
                        weights,
                        lr: t.lr * scale,
                        grad_norm,
                        skipped,
                        grad_cosines: cosines,
                        sampling: probabilities[epoch - 1].clone(),
                    };
                    for cb in callbacks.iter_mut() {
                        cb.on_step(&report);
                    }
                    reports += 1;
                    if let (Some(every), Some(dev)) = (t.eval_every, &splits.dev) {
                        if step % every == 0
                            && self.record(
                                dev,
                                epoch,
                                step,
                                selectable(step),
                                &mut selection,
                                &mut reports,
                                callbacks,
                            )?
                        {
                            return Ok(true);
                        }
                    }
                    // At an epoch's last batch the end-of-epoch checkpoint follows, after its evaluation.
                    let last = i + 1 == batches_in_epoch && epoch < t.epochs;
                    let saved = !last && t.checkpoint_every.is_some_and(|every| step % every == 0);
                    if saved {
                        save(step, epoch, i + 1, skipped, reports, &optimizer, weighting.as_ref(), &selection)?;
                    }
                    if crate::interrupt::stop_requested() {
                        // Stopped here, the run resumes exactly as if it had not been (at an epoch's last batch
                        // the resume evaluates and checkpoints the epoch's end first).
                        if !saved {
                            save(step, epoch, i + 1, skipped, reports, &optimizer, weighting.as_ref(), &selection)?;
                        }
                        let checkpoint = self.checkpoints.map(|out| resume::checkpoint_dir(out, step));
                        tracing::warn!(step, "training interrupted");
                        return Err(TrainError::Interrupted { step, checkpoint });
                    }
                }
                Ok(false)
            })?;
            if stop {
                stopped_early = true;
                break;
            }
            if let Some(dev) = &splits.dev {
                if selection.last_step != Some(step)
                    && self.record(dev, epoch, step, selectable(step), &mut selection, &mut reports, callbacks)?
                {
                    stopped_early = epoch < t.epochs;
                    break;
                }
            }
            if epoch < t.epochs {
                save(step, epoch + 1, 0, skipped, reports, &optimizer, weighting.as_ref(), &selection)?;
                if self.stop_after_epoch == Some(epoch) && self.checkpoints.is_some() {
                    let checkpoint = self.checkpoints.map(|out| resume::checkpoint_dir(out, step));
                    tracing::info!(epoch, step, "paused after the epoch, as asked");
                    return Err(TrainError::Interrupted { step, checkpoint });
                }
            }
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_end();
        }
        if let Some(a) = adalora.borrow().as_ref() {
            for (adapter, ranks) in a.ranks() {
                let kept: usize = ranks.values().sum();
                tracing::info!(adapter, kept, layers = ranks.len(), "AdaLoRA's kept ranks: {ranks:?}");
            }
        }
        let (best_epoch, best_step, mut dev) = match selection.best {
            Some(Best { epoch, step: best_step, eval, weights, .. }) => {
                self.restore(&weights)?;
                (epoch, best_step, Some(eval))
            }
            None => (t.epochs, step, None),
        };
        let composed = self.keep_per_task_models && self.compose(&selection.per_task, num_layers)?;
        if let (true, Some(data)) = (composed, &splits.dev) {
            dev = Some(self.evaluate(data)?);
        }
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
        Ok(Outcome {
            best_epoch,
            best_step,
            steps: step,
            stopped_early,
            skipped_steps: skipped,
            per_task: selection.per_task,
            composed,
            task_weights: weighting.weights(),
            dev,
            test,
            labels,
        })
    }

    /// Evaluates on dev, tells the callbacks, and updates the selection; true when training should stop.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        dev: &Dataset,
        epoch: usize,
        step: usize,
        selectable: bool,
        selection: &mut Selection,
        reports: &mut usize,
        callbacks: &mut [&mut dyn Callback],
    ) -> Result<bool> {
        let t = &self.config.training;
        let eval = self.evaluate(dev)?;
        selection.last_step = Some(step);
        let scores: &Scores = &eval.scores;
        let score = selection_score(scores, t.select_metric.as_deref(), self.config).filter(|s| s.is_finite());
        let is_best = selectable
            && match (&selection.best, score) {
                (None, _) => true,
                (Some(best), Some(s)) => s > best.score,
                (Some(_), None) => false,
            };
        let mut stop = false;
        for cb in callbacks.iter_mut() {
            stop |= cb.on_eval(&EvalReport { epoch, step, scores, selection: score, is_best }) == Control::Stop;
        }
        *reports += 1;
        for task in self.config.tasks.keys().filter(|_| selectable) {
            let Some(s) = task_score(scores, task, self.config).filter(|s| s.is_finite()) else { continue };
            if selection.per_task.get(task).is_some_and(|b| s <= b.score) {
                continue;
            }
            let head = self
                .model
                .params()
                .with_roles()
                .filter(|(_, _, role)| matches!(role, ParamRole::Head(t) if t == task))
                .map(|(n, v, _)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?;
            let model = if self.keep_per_task_models { Some(self.snapshot()?) } else { None };
            selection.per_task.insert(task.clone(), TaskBest { epoch, step, score: s, head, model });
        }
        if is_best {
            selection.since_best = 0;
            let score = score.unwrap_or(f64::NEG_INFINITY);
            selection.best = Some(Best { epoch, step, score, eval, weights: self.snapshot()? });
        } else {
            selection.since_best += 1;
        }
        if t.patience.is_some_and(|p| selection.since_best >= p) {
            tracing::info!(
                evaluations = selection.since_best,
                "stopping early: no better selection score for `training.patience` evaluations"
            );
            stop = true;
        }
        Ok(stop)
    }

    /// Loads each task's own parameters (its head, its adapter) from that task's best evaluation, when every
    /// parameter not frozen for the whole run is one task's own: then each task's predictions depend on its own
    /// parameters and the frozen rest alone, and the result predicts as each task's best model does. A trained
    /// shared parameter (full fine-tuning, one shared adapter) makes the tasks' bests incompatible: nothing
    /// changes and this returns false.
    fn compose(&self, per_task: &BTreeMap<TaskId, TaskBest>, num_layers: usize) -> Result<bool> {
        let owner = |name: &str| -> Option<String> { self.role_of(name).task().map(str::to_owned) };
        let vars = self.model.params().vars();
        if vars.keys().any(|n| owner(n).is_none() && !self.is_frozen(n, num_layers, usize::MAX)) {
            return Ok(false);
        }
        for (name, var) in vars {
            let best = owner(name).and_then(|task| per_task.iter().find(|(t, _)| t.as_str() == task));
            if let Some(w) = best.and_then(|(_, b)| b.model.as_ref()?.get(name)) {
                var.set(w)?;
            }
        }
        tracing::info!(
            "each task's adapter and head come from its own best evaluation: {}",
            per_task.iter().map(|(t, b)| format!("{t} at step {}", b.step)).collect::<Vec<_>>().join(", ")
        );
        Ok(true)
    }

    /// A copy of the weights that training can change: every parameter but those frozen for the whole run (the
    /// backbone under `[peft]`, a model's existing tasks under `mtl add-task`), which keep their loaded values.
    /// The frozen MiniLM is 90 MB, and per-task selection keeps a copy per task.
    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        let num_layers = self.model.num_layers();
        self.model
            .params()
            .vars()
            .iter()
            .filter(|(k, _)| !self.is_frozen(k, num_layers, usize::MAX))
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Loads a [`Trainer::snapshot`] (or a checkpoint's weights) into the model.
    fn restore(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        Ok(self.model.params().set_named(weights)?)
    }
}

#[cfg(test)]
mod anchor_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().expect("a vector")
    }

    /// The pull is the gradient of λ/2 · Σ w (θ − θ₀)²: λ · w · (θ − θ₀), added to the step's gradient.
    #[test]
    fn the_anchor_adds_its_pull_to_the_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let vars = BTreeMap::from([("w".to_string(), Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &dev)?)?)]);
        let reference = BTreeMap::from([("w".to_string(), Tensor::new(&[0.0f32, 2.0, 5.0], &dev)?)]);
        let l2sp = Anchor { reference, weights: None, strength: 0.1 };
        let mut grads = BTreeMap::from([("w".to_string(), Tensor::new(&[0.5f32, 0.5, 0.5], &dev)?)]);
        l2sp.add_to(&mut grads, &vars)?;
        let got = values(&grads["w"]);
        for (g, want) in got.iter().zip([0.6f32, 0.5, 0.3]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        // EWC's weights scale the pull; a parameter without a gradient this step gets the pull alone.
        let weights = BTreeMap::from([("w".to_string(), Tensor::new(&[2.0f32, 1.0, 0.0], &dev)?)]);
        let ewc = Anchor { weights: Some(weights), ..l2sp };
        let mut grads = BTreeMap::new();
        ewc.add_to(&mut grads, &vars)?;
        let got = values(&grads["w"]);
        for (g, want) in got.iter().zip([0.2f32, 0.0, 0.0]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        Ok(())
    }
}
