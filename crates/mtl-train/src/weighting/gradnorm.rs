//! GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
//! Balancing in Deep Multitask Networks", ICML 2018).
//!
//! Each task has a weight `w_k` (all 1 at first). After every step, with `G_k` the norm of the gradient of
//! `w_k · L_k` on the last shared layer (the paper's `W`; here the top encoder layer), `Ḡ` their mean, and
//! `r_k = L̃_k / mean(L̃)` the relative inverse training rate with `L̃_k = L_k / L_k(0)`, the weights take an
//! Adam step (`weighting.lr`, 0.025 by default) on `Σ_k |G_k − Ḡ · r_k^α|`, the target held constant. They
//! are then clamped to at least 0.001 and renormalised to sum to the number of tasks. `L_k(0)` is the task's
//! loss at the first step that trains it. A step updates the weights of the tasks it trained only, and only
//! when it trained two or more.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use super::{field, scaled, LossWeighting, StepLosses};
use crate::Result;

/// One weight with its Adam moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Slot {
    weight: f64,
    initial_loss: Option<f64>,
    m: f64,
    v: f64,
    steps: i32,
}

pub struct GradNorm {
    alpha: f64,
    lr: f64,
    slots: BTreeMap<TaskId, Slot>,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const MIN_WEIGHT: f64 = 1e-3;

impl GradNorm {
    pub fn new(tasks: Vec<TaskId>, alpha: f64, lr: f64) -> Self {
        let slots = tasks
            .into_iter()
            .map(|t| (t, Slot { weight: 1.0, initial_loss: None, m: 0.0, v: 0.0, steps: 0 }))
            .collect();
        Self { alpha, lr, slots }
    }
}

impl LossWeighting for GradNorm {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        scaled(losses, &self.weights())
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.slots.iter().map(|(t, s)| (t.clone(), s.weight)).collect()
    }

    fn needs_grad_norms(&self) -> bool {
        true
    }

    fn observe(&mut self, step: &StepLosses) {
        let Some(norms) = &step.grad_norms else { return };
        let tasks: Vec<&TaskId> =
            step.losses.keys().filter(|t| norms.contains_key(*t) && self.slots.contains_key(*t)).collect();
        if tasks.is_empty() {
            return;
        }
        for task in &tasks {
            let slot = self.slots.get_mut(*task).expect("filtered on the slots");
            slot.initial_loss.get_or_insert(step.losses[*task]);
        }
        if tasks.len() < 2 {
            return; // one task has nothing to be balanced against
        }
        let inverse_rates: Vec<f64> = tasks
            .iter()
            .map(|t| {
                let initial = self.slots[*t].initial_loss.expect("set above");
                if initial > 0.0 {
                    step.losses[*t] / initial
                } else {
                    1.0
                }
            })
            .collect();
        let mean_rate = inverse_rates.iter().sum::<f64>() / tasks.len() as f64;
        let mean_norm = tasks.iter().map(|t| norms[*t]).sum::<f64>() / tasks.len() as f64;
        for (task, rate) in tasks.iter().zip(inverse_rates) {
            let target = mean_norm * (rate / mean_rate).powf(self.alpha);
            let slot = self.slots.get_mut(*task).expect("filtered on the slots");
            let g = norms[*task];
            // d|G_k − target| / dw_k, with G_k = w_k · ‖∇L_k‖.
            let diff = g - target;
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            let grad = sign * if slot.weight > 0.0 { g / slot.weight } else { 0.0 };
            slot.steps += 1;
            slot.m = BETA1 * slot.m + (1.0 - BETA1) * grad;
            slot.v = BETA2 * slot.v + (1.0 - BETA2) * grad * grad;
            let m_hat = slot.m / (1.0 - BETA1.powi(slot.steps));
            let v_hat = slot.v / (1.0 - BETA2.powi(slot.steps));
            slot.weight = (slot.weight - self.lr * m_hat / (v_hat.sqrt() + EPS)).max(MIN_WEIGHT);
        }
        let total: f64 = self.slots.values().map(|s| s.weight).sum();
        let k = self.slots.len() as f64;
        for slot in self.slots.values_mut() {
            slot.weight *= k / total;
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "slots": self.slots })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.slots = field(state, "slots")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Step {
        losses: Vec<f64>,
        weighted_norms: Vec<f64>,
        weights_after: Vec<f64>,
    }

    /// Three steps of the paper's update computed by PyTorch with autograd on a toy shared layer
    /// (`scripts/make_fixtures.py weighting`).
    #[test]
    fn matches_pytorch_gradnorm() {
        let text = include_str!("../../../../tests/fixtures/gradnorm.json");
        let fixture: serde_json::Value = serde_json::from_str(text).expect("fixture parses");
        let alpha = fixture["alpha"].as_f64().expect("alpha");
        let lr = fixture["lr"].as_f64().expect("lr");
        let steps: Vec<Step> = serde_json::from_value(fixture["steps"].clone()).expect("steps");
        let tasks: Vec<TaskId> =
            (0..steps[0].losses.len()).map(|k| TaskId::new(format!("t{k}")).expect("valid")).collect();
        let mut gn = GradNorm::new(tasks.clone(), alpha, lr);
        for step in steps {
            gn.observe(&StepLosses {
                losses: tasks.iter().cloned().zip(step.losses).collect(),
                grad_norms: Some(tasks.iter().cloned().zip(step.weighted_norms).collect()),
                after: None,
            });
            let got: Vec<f64> = gn.weights().into_values().collect();
            for (g, w) in got.iter().zip(&step.weights_after) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs torch {:?}", step.weights_after);
            }
        }
    }
}
