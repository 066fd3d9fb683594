//! Temperature sampling: `p_i ∝ min(n_i, cap) ^ (1 / T)`. T = 1 is proportional, T → ∞ uniform; the cap
//! keeps a very large task from dominating (as in T5, Raffel et al. 2020, "examples-proportional mixing"
//! with a limit, and multilingual BERT / XLM's temperature sampling).

use super::{normalise, TaskSampler};

#[derive(Clone, Debug)]
pub struct Temperature {
    pub sizes: Vec<usize>,
    pub temperature: f64,
    pub cap: Option<usize>,
}

impl TaskSampler for Temperature {
    fn probabilities(&self, _progress: f64) -> Vec<f64> {
        let cap = self.cap.unwrap_or(usize::MAX);
        normalise(self.sizes.iter().map(|&n| (n.min(cap) as f64).powf(1.0 / self.temperature)).collect())
    }
}
