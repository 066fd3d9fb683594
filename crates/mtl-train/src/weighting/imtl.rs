//! IMTL-L (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).
//!
//! Each task has a learnable scale `s_k`, trained by the optimiser with the model (at the heads' learning rate
//! unless `weighting.lr` says otherwise, without weight decay), and its term is `e^s_k · L_k − s_k`, whose
//! minimum over `s_k` is at `e^s_k · L_k = 1`: every scaled loss is driven to the same value. `s_k` starts at
//! 0. With `surgery.method = "imtl"` (IMTL-G) it is the paper's and LibMTL's IMTL.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use mtl_core::TaskId;

use super::{LossWeighting, TaskScalars};
use crate::Result;

/// The prefix of the scales' parameter names.
pub const PREFIX: &str = "weighting.imtl_scale.";

pub struct ImtlL {
    scales: TaskScalars,
}

impl ImtlL {
    pub fn new(tasks: &[TaskId], device: &Device) -> Result<Self> {
        Ok(Self { scales: TaskScalars::new(tasks, device, "loss scale")? })
    }

    fn scale(&self, task: &TaskId) -> Result<&Var> {
        self.scales.get(task)
    }
}

impl LossWeighting for ImtlL {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        losses
            .iter()
            .map(|(task, loss)| {
                let s = self.scale(task)?.as_tensor();
                Ok(((s.exp()? * loss)? - s)?)
            })
            .collect()
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.scales.map(f64::exp)
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.scales.vars(PREFIX)
    }

    fn state(&self) -> serde_json::Value {
        self.scales.state("scales")
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.scales.load_state(state, "scales")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The term and its gradients by hand: with s = 0.3 and L = 2, the term is e^0.3·2 − 0.3, d/ds = e^0.3·2 − 1
    /// and d/dL = e^0.3.
    #[test]
    fn term_and_gradients_match_hand_values() -> Result<()> {
        let task = TaskId::new("a").expect("valid");
        let w = ImtlL::new(std::slice::from_ref(&task), &Device::Cpu)?;
        w.scale(&task)?.set(&Tensor::new(0.3f32, &Device::Cpu)?)?;
        let loss = Var::new(2f32, &Device::Cpu)?;
        let term = &w.terms(&[(task.clone(), loss.as_tensor().clone())])?[0];
        let e = 0.3f64.exp();
        assert!((f64::from(term.to_scalar::<f32>()?) - (e * 2.0 - 0.3)).abs() < 1e-5);
        let grads = term.backward()?;
        let ds = grads.get(w.scale(&task)?.as_tensor()).expect("s has a gradient").to_scalar::<f32>()?;
        let dl = grads.get(loss.as_tensor()).expect("L has a gradient").to_scalar::<f32>()?;
        assert!((f64::from(ds) - (e * 2.0 - 1.0)).abs() < 1e-5, "{ds}");
        assert!((f64::from(dl) - e).abs() < 1e-5, "{dl}");
        let mut fresh = ImtlL::new(std::slice::from_ref(&task), &Device::Cpu)?;
        fresh.load_state(&w.state())?;
        assert_eq!(fresh.state(), w.state());
        Ok(())
    }
}
