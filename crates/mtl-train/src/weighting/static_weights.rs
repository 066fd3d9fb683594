//! Static weights: the objective is `Σ w_k · L_k` with fixed, configured `w_k` (1 for every task by default,
//! plain equal weighting). Kurin et al. 2022 ("In Defense of the Unitary Scalarization for Deep Multi-Task
//! Learning") and Xin et al. 2022 ("Do Current Multi-Task Optimization Methods in Deep Learning Even Help?")
//! found this hard to beat once tuned.

use std::collections::BTreeMap;

use candle_core::Tensor;
use mtl_core::TaskId;

use super::{scaled, LossWeighting};
use crate::Result;

pub struct StaticWeights {
    weights: BTreeMap<TaskId, f64>,
}

impl StaticWeights {
    pub fn new(weights: BTreeMap<TaskId, f64>) -> Self {
        Self { weights }
    }
}

impl LossWeighting for StaticWeights {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        scaled(losses, &self.weights)
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.weights.clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}
