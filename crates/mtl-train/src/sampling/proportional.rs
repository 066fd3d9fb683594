//! Tasks in proportion to their number of training examples: in expectation, every example is seen as often
//! as in single-task training.

use super::{normalise, TaskSampler};

#[derive(Clone, Debug)]
pub struct Proportional {
    pub sizes: Vec<usize>,
}

impl TaskSampler for Proportional {
    fn probabilities(&self, _progress: f64) -> Vec<f64> {
        normalise(self.sizes.iter().map(|&n| n as f64).collect())
    }
}
