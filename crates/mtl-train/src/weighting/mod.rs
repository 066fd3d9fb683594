//! Loss weighting: how the losses of a step's tasks become one objective, one file per method.
//!
//! A weighting turns each task's loss into a term of the objective (the objective is their sum), reports
//! each task's current weight, and learns from every step: from the losses (DWA), from the tasks' gradient
//! norms (GradNorm), or through parameters of its own that the optimiser trains with the model
//! (uncertainty). Its state is exported for an exact resume.

mod auto_lambda;
mod dwa;
mod famo;
mod gradnorm;
mod imtl;
mod log;
mod rlw;
mod static_weights;
mod uncertainty;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use mtl_config::{Config, WeightingMethod};
use mtl_core::TaskId;

pub use auto_lambda::{hypergradient, meta_batch, meta_subset, AutoLambda, LookaheadVar, MetaModel};
pub use dwa::Dwa;
pub use famo::Famo;
pub use gradnorm::GradNorm;
pub use imtl::ImtlL;
pub use log::LogLosses;
pub use rlw::Rlw;
pub use static_weights::StaticWeights;
pub use uncertainty::Uncertainty;

use crate::Result;

/// What a step tells the weighting once its gradients are known.
#[derive(Clone, Debug, Default)]
pub struct StepLosses {
    /// Each trained task's loss on the step's batch.
    pub losses: BTreeMap<TaskId, f64>,
    /// Each task's gradient norm (of its weighted term) on the last shared layer, when the step computed
    /// the tasks' gradients separately.
    pub grad_norms: Option<BTreeMap<TaskId, f64>>,
    /// Each task's loss on the same batches after the optimiser step, when the weighting asks for them.
    pub after: Option<BTreeMap<TaskId, f64>>,
}

pub trait LossWeighting: Send {
    /// Each task's term of the objective, in the order of `losses` (scalar tensors carrying the graph).
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>>;

    /// Each task's current weight, for the logs.
    fn weights(&self) -> BTreeMap<TaskId, f64>;

    /// Parameters of the weighting that the optimiser trains with the model, by name.
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// Whether it needs each task's gradient norm (a backward pass per task).
    fn needs_grad_norms(&self) -> bool {
        false
    }

    /// Whether it needs the step's losses again after the optimiser step (one more forward pass).
    fn needs_losses_after_step(&self) -> bool {
        false
    }

    /// Auto-λ, whose weights the trainer meta-learns from look-ahead steps; `None` for every other method.
    fn as_auto_lambda(&mut self) -> Option<&mut AutoLambda> {
        None
    }

    /// Called after every optimiser step.
    fn observe(&mut self, _step: &StepLosses) {}

    /// The state to store in a checkpoint.
    fn state(&self) -> serde_json::Value;

    /// Restores a state from [`LossWeighting::state`].
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()>;
}

/// The weighting a config asks for, over its tasks; `steps_per_epoch` is DWA's default period.
pub fn weighting(config: &Config, steps_per_epoch: usize, device: &Device) -> Result<Box<dyn LossWeighting>> {
    let w = &config.training.weighting;
    let tasks: Vec<TaskId> = config.tasks.keys().cloned().collect();
    Ok(match w.method {
        WeightingMethod::Static => Box::new(StaticWeights::new(
            tasks.iter().map(|t| (t.clone(), w.weights.get(t).copied().unwrap_or(1.0))).collect(),
        )),
        WeightingMethod::Uncertainty => Box::new(Uncertainty::new(&tasks, device)?),
        WeightingMethod::Dwa => Box::new(Dwa::new(tasks, w.temperature, w.period.unwrap_or(steps_per_epoch).max(1))),
        WeightingMethod::GradNorm => Box::new(GradNorm::new(tasks, w.alpha, w.lr.unwrap_or(0.025))),
        WeightingMethod::Rlw => Box::new(Rlw::new(tasks, config.training.seed)),
        WeightingMethod::Famo => Box::new(Famo::new(tasks, w.lr.unwrap_or(0.025), w.decay)),
        WeightingMethod::Imtl => Box::new(ImtlL::new(&tasks, device)?),
        WeightingMethod::Log => Box::new(LogLosses::default()),
        WeightingMethod::AutoLambda => Box::new(AutoLambda::new(&tasks, w.init, w.lr.unwrap_or(1e-4))),
    })
}

/// `weight · loss` for each loss, looked up by task.
pub(crate) fn scaled(losses: &[(TaskId, Tensor)], weights: &BTreeMap<TaskId, f64>) -> Result<Vec<Tensor>> {
    losses.iter().map(|(task, loss)| Ok(loss.affine(weights.get(task).copied().unwrap_or(1.0), 0.0)?)).collect()
}

pub(crate) fn invalid_state(message: impl Into<String>) -> crate::TrainError {
    crate::TrainError::Invalid { path: "weighting state".into(), message: message.into() }
}

/// Reads `state[key]` as `T`.
pub(crate) fn field<T: serde::de::DeserializeOwned>(state: &serde_json::Value, key: &str) -> Result<T> {
    let value = state.get(key).ok_or_else(|| invalid_state(format!("missing `{key}`")))?;
    serde_json::from_value(value.clone()).map_err(|e| invalid_state(format!("`{key}`: {e}")))
}

/// One learned scalar per task (uncertainty's log-variances, IMTL-L's scales), each a parameter the optimiser
/// trains, starting at 0 and saved in the weighting's state under one key; `what` names a scalar in errors.
pub(crate) struct TaskScalars {
    vars: BTreeMap<TaskId, Var>,
    what: &'static str,
}

impl TaskScalars {
    pub(crate) fn new(tasks: &[TaskId], device: &Device, what: &'static str) -> Result<Self> {
        let vars = tasks.iter().map(|t| Ok((t.clone(), Var::new(0f32, device)?))).collect::<Result<_>>()?;
        Ok(Self { vars, what })
    }

    pub(crate) fn get(&self, task: &TaskId) -> Result<&Var> {
        self.vars.get(task).ok_or_else(|| invalid_state(format!("no {} for task `{task}`", self.what)))
    }

    /// Each task's value through `f`.
    pub(crate) fn map(&self, f: impl Fn(f64) -> f64) -> BTreeMap<TaskId, f64> {
        self.vars
            .iter()
            .map(|(t, s)| (t.clone(), f(f64::from(s.as_tensor().to_scalar::<f32>().unwrap_or(0.0)))))
            .collect()
    }

    /// The parameters, named `PREFIX` + task.
    pub(crate) fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        self.vars.iter().map(|(t, v)| (format!("{prefix}{t}"), v.clone())).collect()
    }

    /// `{key: {task: value}}`.
    pub(crate) fn state(&self, key: &str) -> serde_json::Value {
        let values: BTreeMap<&TaskId, f32> =
            self.vars.iter().map(|(t, v)| (t, v.as_tensor().to_scalar::<f32>().unwrap_or(0.0))).collect();
        serde_json::json!({ key: values })
    }

    /// Restores [`TaskScalars::state`].
    pub(crate) fn load_state(&self, state: &serde_json::Value, key: &str) -> Result<()> {
        let values: BTreeMap<TaskId, f32> = field(state, key)?;
        for (task, var) in &self.vars {
            let v = values.get(task).ok_or_else(|| invalid_state(format!("no {} for task `{task}`", self.what)))?;
            var.set(&Tensor::new(*v, var.device())?)?;
        }
        Ok(())
    }
}
