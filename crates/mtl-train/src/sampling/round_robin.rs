//! Tasks in turn: step s trains task s mod K.

use super::TaskSampler;

#[derive(Clone, Debug)]
pub struct RoundRobin {
    pub tasks: usize,
}

impl TaskSampler for RoundRobin {
    fn probabilities(&self, _progress: f64) -> Vec<f64> {
        vec![1.0 / self.tasks.max(1) as f64; self.tasks]
    }

    fn fixed_choice(&self, step: usize) -> Option<usize> {
        Some(step % self.tasks.max(1))
    }
}
