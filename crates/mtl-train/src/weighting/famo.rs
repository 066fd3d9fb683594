//! FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023).
//!
//! Weights `z = softmax(w)` over learned logits `w`. A step minimises `Σ_k z_k log L_k / c` with
//! `c = Σ_k z_k / L_k` (no gradient through `c`), which gives task `k` the gradient weight `z_k / (c L_k)`;
//! the weights sum to 1, and are multiplied here by the number of tasks in the batch so that they average 1 as
//! the static weights do. After the step the batch's losses are computed again (one more forward pass, no
//! backward), and the logits move along `Jᵀ δ`, `J` the softmax's Jacobian and `δ_k = log L_k(before) −
//! log L_k(after)` (how much each task's log-loss fell), by Adam at `weighting.lr` (0.025) with weight decay
//! `weighting.decay` (10⁻³), as LibMTL's `FAMO` does. The losses' lower bounds are 0 and every logarithm
//! adds 10⁻⁸, as there. Memory and time per step do not grow with the number of tasks beyond that forward.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::Tensor;
use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use super::rlw::softmax;
use super::{field, LossWeighting, StepLosses};
use crate::Result;

const EPS: f64 = 1e-8;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct AdamState {
    logits: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    steps: u32,
}

pub struct Famo {
    tasks: Vec<TaskId>,
    lr: f64,
    decay: f64,
    state: AdamState,
    /// The gradient weights of the last terms.
    last: Mutex<BTreeMap<TaskId, f64>>,
}

impl Famo {
    pub fn new(tasks: Vec<TaskId>, lr: f64, decay: f64) -> Self {
        let k = tasks.len();
        let state = AdamState { logits: vec![0.0; k], m: vec![0.0; k], v: vec![0.0; k], steps: 0 };
        let last = Mutex::new(tasks.iter().map(|t| (t.clone(), 1.0)).collect());
        Self { tasks, lr, decay, state, last }
    }

    /// Each task's gradient weight, for the tasks with a loss in `losses`.
    fn gradient_weights(&self, losses: &BTreeMap<TaskId, f64>) -> BTreeMap<TaskId, f64> {
        let z = softmax(&self.state.logits);
        let present: Vec<(usize, f64)> =
            self.tasks.iter().enumerate().filter_map(|(i, t)| losses.get(t).map(|l| (i, l + EPS))).collect();
        let c: f64 = present.iter().map(|&(i, d)| z[i] / d).sum();
        let n = present.len() as f64;
        present.into_iter().map(|(i, d)| (self.tasks[i].clone(), n * z[i] / (c * d))).collect()
    }

    /// One Adam step on the logits from the losses before and after an optimiser step.
    fn update(&mut self, before: &BTreeMap<TaskId, f64>, after: &BTreeMap<TaskId, f64>) {
        let delta: Vec<f64> = self
            .tasks
            .iter()
            .map(|t| match (before.get(t), after.get(t)) {
                (Some(b), Some(a)) => (b + EPS).ln() - (a + EPS).ln(),
                _ => 0.0,
            })
            .collect();
        let z = softmax(&self.state.logits);
        let mean: f64 = z.iter().zip(&delta).map(|(z, d)| z * d).sum();
        let s = &mut self.state;
        s.steps += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        let (c1, c2) = (1.0 - b1.powi(s.steps as i32), 1.0 - b2.powi(s.steps as i32));
        for i in 0..z.len() {
            let g = z[i] * (delta[i] - mean) + self.decay * s.logits[i];
            s.m[i] = b1 * s.m[i] + (1.0 - b1) * g;
            s.v[i] = b2 * s.v[i] + (1.0 - b2) * g * g;
            s.logits[i] -= self.lr / c1 * s.m[i] / ((s.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

impl LossWeighting for Famo {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        let values: BTreeMap<TaskId, f64> =
            losses.iter().map(|(t, l)| Ok((t.clone(), f64::from(l.to_scalar::<f32>()?)))).collect::<Result<_>>()?;
        let weights = self.gradient_weights(&values);
        let terms = super::scaled(losses, &weights)?;
        self.last.lock().unwrap_or_else(|e| e.into_inner()).extend(weights);
        Ok(terms)
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn needs_losses_after_step(&self) -> bool {
        true
    }

    fn observe(&mut self, step: &StepLosses) {
        if let Some(after) = &step.after {
            self.update(&step.losses, after);
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "adam": self.state, "last": *self.last.lock().unwrap_or_else(|e| e.into_inner()) })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let adam: AdamState = field(state, "adam")?;
        if adam.logits.len() != self.tasks.len() {
            return Err(super::invalid_state(format!(
                "{} FAMO logits for {} tasks",
                adam.logits.len(),
                self.tasks.len()
            )));
        }
        self.state = adam;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = field(state, "last")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Step {
        losses: Vec<f64>,
        after: Vec<f64>,
        /// The gradient of LibMTL's objective with respect to each loss (its weights, summing to 1).
        weights: Vec<f64>,
        logits_after: Vec<f64>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        lr: f64,
        decay: f64,
        steps: Vec<Step>,
    }

    /// Against LibMTL's `FAMO` (its `backward` and `update_w`, `scripts/make_fixtures.py weighting`) over 6 steps
    /// of given losses: the gradient weights (times the number of tasks) and the logits after each update.
    #[test]
    fn matches_libmtl() -> Result<()> {
        let f: Fixture = serde_json::from_str(include_str!("../../../../tests/fixtures/famo.json")).expect("parses");
        let k = f.steps[0].losses.len();
        let tasks: Vec<TaskId> = (0..k).map(|i| TaskId::new(format!("t{i}")).expect("valid")).collect();
        let mut famo = Famo::new(tasks.clone(), f.lr, f.decay);
        let named = |v: &[f64]| -> BTreeMap<TaskId, f64> { tasks.iter().cloned().zip(v.iter().copied()).collect() };
        for (n, step) in f.steps.iter().enumerate() {
            let losses: Vec<(TaskId, Tensor)> = tasks
                .iter()
                .zip(&step.losses)
                .map(|(t, l)| Ok((t.clone(), Tensor::new(*l as f32, &candle_core::Device::Cpu)?)))
                .collect::<Result<_>>()?;
            famo.terms(&losses)?;
            let weights = famo.weights();
            for (t, w) in tasks.iter().zip(&step.weights) {
                assert!((weights[t] - w * k as f64).abs() < 1e-5 * k as f64, "step {n} {t}: {} vs {w}", weights[t]);
            }
            famo.observe(&StepLosses {
                losses: named(&step.losses),
                grad_norms: None,
                after: Some(named(&step.after)),
            });
            for (a, b) in famo.state.logits.iter().zip(&step.logits_after) {
                assert!((a - b).abs() < 1e-6, "step {n}: logits {:?} vs {:?}", famo.state.logits, step.logits_after);
            }
        }
        let mut resumed = Famo::new(tasks, f.lr, f.decay);
        resumed.load_state(&famo.state())?;
        assert_eq!(resumed.state(), famo.state());
        Ok(())
    }
}
