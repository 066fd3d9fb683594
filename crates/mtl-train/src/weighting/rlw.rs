//! Random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus
//! Test for Multi-Task Learning", TMLR 2022).
//!
//! Every optimiser step draws new weights, the softmax of `K` standard normal samples (the paper's and
//! LibMTL's choice), times `K` so that they average 1 as the static weights do. The samples come from a
//! generator seeded by the run's seed and the step, so a resumed run draws exactly what an uninterrupted one
//! does.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_core::TaskId;
use rand::{Rng, SeedableRng};

use super::{field, scaled, LossWeighting, StepLosses};
use crate::Result;

pub struct Rlw {
    tasks: Vec<TaskId>,
    seed: u64,
    step: usize,
    weights: BTreeMap<TaskId, f64>,
}

impl Rlw {
    pub fn new(tasks: Vec<TaskId>, seed: u64) -> Self {
        let mut rlw = Self { tasks, seed, step: 0, weights: BTreeMap::new() };
        rlw.draw();
        rlw
    }

    fn draw(&mut self) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x52_4C57 ^ ((self.step as u64) << 20));
        let samples: Vec<f64> = self.tasks.iter().map(|_| standard_normal(&mut rng)).collect();
        let weights = softmax(&samples);
        let k = self.tasks.len() as f64;
        self.weights = self.tasks.iter().cloned().zip(weights.into_iter().map(|w| w * k)).collect();
    }
}

/// A standard normal sample (Box-Muller).
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u: f64 = 1.0 - rng.gen::<f64>();
    let v: f64 = rng.gen::<f64>();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

pub(crate) fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

impl LossWeighting for Rlw {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        scaled(losses, &self.weights)
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.weights.clone()
    }

    fn observe(&mut self, _step: &StepLosses) {
        self.step += 1;
        self.draw();
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "step": self.step })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.step = field(state, "step")?;
        self.draw();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Fixture {
        tasks: usize,
        draws: usize,
        /// Quantiles 1%, 5%, 10%, …, 90%, 95%, 99% of one task's weight and of the largest weight, times K.
        levels: Vec<f64>,
        weight: Vec<f64>,
        largest: Vec<f64>,
    }

    /// The share of `sorted` at or below `x`.
    fn cdf(sorted: &[f64], x: f64) -> f64 {
        sorted.partition_point(|v| *v <= x) as f64 / sorted.len() as f64
    }

    /// The weights have the distribution of LibMTL's `K · softmax(torch.randn(K))`: at each quantile of 200,000
    /// torch draws (`scripts/make_fixtures.py weighting`) of a task's weight and of the largest weight, the share
    /// of as many of our draws below it is within 0.006 of the quantile's level (a two-sample test: about four
    /// standard deviations of the sampling noise).
    #[test]
    fn weights_are_distributed_as_libmtl_draws_them() {
        let f: Fixture = serde_json::from_str(include_str!("../../../../tests/fixtures/rlw.json")).expect("parses");
        let tasks: Vec<TaskId> = (0..f.tasks).map(|i| TaskId::new(format!("t{i}")).expect("valid")).collect();
        let mut rlw = Rlw::new(tasks.clone(), 7);
        let (mut first, mut largest) = (Vec::new(), Vec::new());
        for _ in 0..f.draws {
            let w = rlw.weights();
            assert!((w.values().sum::<f64>() - f.tasks as f64).abs() < 1e-9);
            first.push(w[&tasks[0]]);
            largest.push(w.values().copied().fold(0.0, f64::max));
            rlw.observe(&StepLosses::default());
        }
        first.sort_by(f64::total_cmp);
        largest.sort_by(f64::total_cmp);
        for (i, level) in f.levels.iter().enumerate() {
            let (a, b) = (cdf(&first, f.weight[i]), cdf(&largest, f.largest[i]));
            assert!((a - level).abs() < 0.006, "a task's weight: {a} of ours below torch's {level} quantile");
            assert!((b - level).abs() < 0.006, "the largest weight: {b} of ours below torch's {level} quantile");
        }
    }

    /// A resumed run draws what an uninterrupted one does.
    #[test]
    fn resumes_the_same_draws() -> Result<()> {
        let tasks: Vec<TaskId> = ["a", "b", "c"].iter().map(|t| TaskId::new(*t).expect("valid")).collect();
        let mut run = Rlw::new(tasks.clone(), 3);
        for _ in 0..5 {
            run.observe(&StepLosses::default());
        }
        let mut resumed = Rlw::new(tasks, 3);
        resumed.load_state(&run.state())?;
        assert_eq!(resumed.weights(), run.weights());
        run.observe(&StepLosses::default());
        resumed.observe(&StepLosses::default());
        assert_eq!(resumed.weights(), run.weights());
        Ok(())
    }
}
