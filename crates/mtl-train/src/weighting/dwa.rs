//! Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).
//!
//! Losses are averaged over periods (an epoch in the paper, `weighting.period` steps here). After two periods
//! each task's weight is `w_k = K · exp(r_k / T) / Σ_i exp(r_i / T)`, where `r_k = L_k(t-1) / L_k(t-2)` is
//! the ratio of its two latest period means: a task whose loss falls slowly gains weight. Until then every
//! weight is 1. A task absent from a period (possible under the `sampled` plan) keeps its last mean.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_core::TaskId;
use serde::{Deserialize, Serialize};

use super::{field, scaled, LossWeighting, StepLosses};
use crate::Result;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct History {
    /// Sum and count of each task's losses in the current period.
    window: BTreeMap<TaskId, (f64, usize)>,
    steps: usize,
    /// The mean loss of each task in the last period and the one before.
    last: BTreeMap<TaskId, f64>,
    before: BTreeMap<TaskId, f64>,
    periods: usize,
    weights: BTreeMap<TaskId, f64>,
}

pub struct Dwa {
    tasks: Vec<TaskId>,
    temperature: f64,
    period: usize,
    history: History,
}

impl Dwa {
    pub fn new(tasks: Vec<TaskId>, temperature: f64, period: usize) -> Self {
        let weights = tasks.iter().map(|t| (t.clone(), 1.0)).collect();
        Self { tasks, temperature, period, history: History { weights, ..History::default() } }
    }

    /// The weights from the two latest period means.
    fn recompute(&mut self) {
        let h = &mut self.history;
        let ratios: Vec<f64> = self
            .tasks
            .iter()
            .map(|t| match (h.last.get(t), h.before.get(t)) {
                (Some(l), Some(b)) if *b > 0.0 => l / b,
                _ => 1.0,
            })
            .collect();
        // Softmax with the maximum subtracted, for stability.
        let max = ratios.iter().map(|r| r / self.temperature).fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = ratios.iter().map(|r| (r / self.temperature - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        let k = self.tasks.len() as f64;
        h.weights = self.tasks.iter().zip(exps).map(|(t, e)| (t.clone(), k * e / total)).collect();
    }
}

impl LossWeighting for Dwa {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        scaled(losses, &self.history.weights)
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.history.weights.clone()
    }

    fn observe(&mut self, step: &StepLosses) {
        let h = &mut self.history;
        for (task, loss) in &step.losses {
            let entry = h.window.entry(task.clone()).or_insert((0.0, 0));
            entry.0 += loss;
            entry.1 += 1;
        }
        h.steps += 1;
        if h.steps < self.period {
            return;
        }
        let means: BTreeMap<TaskId, f64> =
            std::mem::take(&mut h.window).into_iter().map(|(t, (sum, n))| (t, sum / n as f64)).collect();
        h.steps = 0;
        h.periods += 1;
        let last = std::mem::take(&mut h.last);
        h.before.extend(last.iter().map(|(t, v)| (t.clone(), *v)));
        h.last = last;
        h.last.extend(means);
        if h.periods >= 2 {
            self.recompute();
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "history": self.history })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.history = field(state, "history")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(values: &[(&str, f64)]) -> StepLosses {
        StepLosses {
            losses: values.iter().map(|(t, v)| (TaskId::new(*t).expect("valid"), *v)).collect(),
            grad_norms: None,
            after: None,
        }
    }

    /// Period 2, T = 2. Period means: a 1.0 then 0.5, b 2.0 then 1.8; ratios 0.5 and 0.9, so the weights
    /// are 2·e^0.25 / (e^0.25 + e^0.45) = 0.900332 and 2·e^0.45 / (…) = 1.099668 (numpy).
    #[test]
    fn weights_follow_the_loss_ratios() {
        let tasks = vec![TaskId::new("a").expect("valid"), TaskId::new("b").expect("valid")];
        let mut dwa = Dwa::new(tasks.clone(), 2.0, 2);
        for step in [[1.2, 2.1], [0.8, 1.9], [0.6, 1.7]] {
            dwa.observe(&losses(&[("a", step[0]), ("b", step[1])]));
            assert_eq!(dwa.weights().values().copied().collect::<Vec<_>>(), vec![1.0, 1.0], "two periods first");
        }
        let saved = dwa.state();
        dwa.observe(&losses(&[("a", 0.4), ("b", 1.9)]));
        let w = dwa.weights();
        assert!((w[&tasks[0]] - 0.900_332).abs() < 1e-6 && (w[&tasks[1]] - 1.099_668).abs() < 1e-6, "{w:?}");
        let mut resumed = Dwa::new(tasks, 2.0, 2);
        resumed.load_state(&saved).expect("own state loads");
        resumed.observe(&losses(&[("a", 0.4), ("b", 1.9)]));
        assert_eq!(resumed.weights(), w, "a restored state continues exactly");
    }
}
