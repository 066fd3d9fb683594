//! Tasks in proportion to configured weights (`training.sampling.weights`).

use super::{normalise, TaskSampler};

#[derive(Clone, Debug)]
pub struct Fixed {
    pub weights: Vec<f64>,
}

impl TaskSampler for Fixed {
    fn probabilities(&self, _progress: f64) -> Vec<f64> {
        normalise(self.weights.clone())
    }
}
