//! IMTL-L (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).
//!
//! Each task has a learnable scale `s_k`, trained by the optimiser with the model (at the heads' learning rate
//! unless `weighting.lr` says otherwise, without weight decay), and its term is `e^s_k · L_k − s_k`, whose
//! minimum over `s_k` is at `e^s_k · L_k = 1`: every scaled loss is driven to the same value. `s_k` starts at
//! 0. With `surgery.method = "imtl"` (IMTL-G) it is the paper's and LibMTL's IMTL.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use mtl_core::TaskId;

use super::{field, invalid_state, LossWeighting};
use crate::Result;

/// The prefix of the scales' parameter names.
pub const PREFIX: &str = "weighting.imtl_scale.";

pub struct ImtlL {
    scales: BTreeMap<TaskId, Var>,
}

impl ImtlL {
    pub fn new(tasks: &[TaskId], device: &Device) -> Result<Self> {
        let scales = tasks.iter().map(|t| Ok((t.clone(), Var::new(0f32, device)?))).collect::<Result<_>>()?;
        Ok(Self { scales })
    }

    fn scale(&self, task: &TaskId) -> Result<&Var> {
        self.scales.get(task).ok_or_else(|| invalid_state(format!("no loss scale for task `{task}`")))
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
        self.scales
            .iter()
            .map(|(t, s)| (t.clone(), f64::from(s.as_tensor().to_scalar::<f32>().unwrap_or(0.0)).exp()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.scales.iter().map(|(t, v)| (format!("{PREFIX}{t}"), v.clone())).collect()
    }

    fn state(&self) -> serde_json::Value {
        let values: BTreeMap<&TaskId, f32> =
            self.scales.iter().map(|(t, v)| (t, v.as_tensor().to_scalar::<f32>().unwrap_or(0.0))).collect();
        serde_json::json!({ "scales": values })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let values: BTreeMap<TaskId, f32> = field(state, "scales")?;
        for (task, var) in &self.scales {
            let v = values.get(task).ok_or_else(|| invalid_state(format!("no loss scale for task `{task}`")))?;
            var.set(&Tensor::new(*v, var.device())?)?;
        }
        Ok(())
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
