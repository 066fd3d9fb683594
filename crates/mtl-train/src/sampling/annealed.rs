//! Annealed sampling (Stickland & Murray 2019, "BERT and PALs", section 4): `p_i ∝ n_i ^ alpha` with
//! `alpha = 1 - 0.8 (e - 1) / (E - 1)` at epoch e of E: proportional at first, closer to uniform at the end.
//! Here `progress` is `(e - 1) / (E - 1)`.

use super::{normalise, TaskSampler};

#[derive(Clone, Debug)]
pub struct Annealed {
    pub sizes: Vec<usize>,
}

impl TaskSampler for Annealed {
    fn probabilities(&self, progress: f64) -> Vec<f64> {
        let alpha = 1.0 - 0.8 * progress.clamp(0.0, 1.0);
        normalise(self.sizes.iter().map(|&n| (n as f64).powf(alpha)).collect())
    }
}
