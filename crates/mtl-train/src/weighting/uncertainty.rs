//! Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
//! Scene Geometry and Semantics", CVPR 2018).
//!
//! Each task has a learnable log-variance `s_k = log σ_k²`, trained by the optimiser with the model (at
//! the heads' learning rate unless `weighting.lr` says otherwise, without weight decay). A task's term is
//! `L_k / (2σ_k²) + log σ_k = 0.5 · exp(-s_k) · L_k + 0.5 · s_k`: the paper's regression form, used for
//! every task as LibMTL does. `s_k` starts at 0, so every task starts at weight 0.5.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use mtl_core::TaskId;

use super::{LossWeighting, TaskScalars};
use crate::Result;

/// The prefix of the log-variances' parameter names.
pub const PREFIX: &str = "weighting.log_var.";

pub struct Uncertainty {
    log_vars: TaskScalars,
}

impl Uncertainty {
    pub fn new(tasks: &[TaskId], device: &Device) -> Result<Self> {
        Ok(Self { log_vars: TaskScalars::new(tasks, device, "log-variance")? })
    }

    fn log_var(&self, task: &TaskId) -> Result<&Var> {
        self.log_vars.get(task)
    }
}

impl LossWeighting for Uncertainty {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        losses
            .iter()
            .map(|(task, loss)| {
                let s = self.log_var(task)?.as_tensor();
                let precision = s.neg()?.exp()?;
                Ok(((precision * loss)?.affine(0.5, 0.0)? + s.affine(0.5, 0.0)?)?)
            })
            .collect()
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.log_vars.map(|s| 0.5 * (-s).exp())
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.log_vars.vars(PREFIX)
    }

    fn state(&self) -> serde_json::Value {
        self.log_vars.state("log_vars")
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.log_vars.load_state(state, "log_vars")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The term and its gradients, by hand: with s = 0.4 and L = 2.5, the term is
    /// 0.5·e^-0.4·2.5 + 0.2 = 1.0378 (to 4 places); d/ds = 0.5 - 0.5·e^-0.4·2.5 = -0.3379; d/dL = 0.5·e^-0.4.
    #[test]
    fn term_and_gradients_match_hand_values() -> Result<()> {
        let task = TaskId::new("a").expect("valid");
        let w = Uncertainty::new(std::slice::from_ref(&task), &Device::Cpu)?;
        w.log_var(&task)?.set(&Tensor::new(0.4f32, &Device::Cpu)?)?;
        let loss = Var::new(2.5f32, &Device::Cpu)?;
        let term = &w.terms(&[(task.clone(), loss.as_tensor().clone())])?[0];
        let e = (-0.4f64).exp();
        assert!((f64::from(term.to_scalar::<f32>()?) - (0.5 * e * 2.5 + 0.2)).abs() < 1e-6);
        let grads = term.backward()?;
        let ds = grads.get(w.log_var(&task)?.as_tensor()).expect("s has a gradient").to_scalar::<f32>()?;
        let dl = grads.get(loss.as_tensor()).expect("L has a gradient").to_scalar::<f32>()?;
        assert!((f64::from(ds) - (0.5 - 0.5 * e * 2.5)).abs() < 1e-6, "{ds}");
        assert!((f64::from(dl) - 0.5 * e).abs() < 1e-6, "{dl}");
        assert!((w.weights()[&task] - 0.5 * e).abs() < 1e-6);
        let state = w.state();
        let mut fresh = Uncertainty::new(std::slice::from_ref(&task), &Device::Cpu)?;
        fresh.load_state(&state)?;
        assert_eq!(fresh.state(), state);
        Ok(())
    }
}
