//! Every task equally often, whatever its size.

use super::TaskSampler;

#[derive(Clone, Debug)]
pub struct Uniform {
    pub tasks: usize,
}

impl TaskSampler for Uniform {
    fn probabilities(&self, _progress: f64) -> Vec<f64> {
        vec![1.0 / self.tasks.max(1) as f64; self.tasks]
    }
}
