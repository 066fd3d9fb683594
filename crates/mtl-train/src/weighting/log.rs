//! The logarithm of each loss, `log(L_k + 10⁻⁸)`: the loss half of DB-MTL (Lin, Ye, Xu, Shi & Zhang,
//! "Dual-Balancing for Multi-Task Learning", 2023), which makes every task's objective invariant to the scale
//! of its loss (its gradient is `∇L_k / L_k`). With `surgery.method = "db_mtl"` it is the paper's method.
//! The reported weight of a task is the one its gradient effectively gets, `1 / (L_k + 10⁻⁸)`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::Tensor;
use mtl_core::TaskId;

use super::LossWeighting;
use crate::Result;

#[derive(Default)]
pub struct LogLosses {
    /// The effective weights of the last terms.
    last: Mutex<BTreeMap<TaskId, f64>>,
}

impl LossWeighting for LogLosses {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        losses
            .iter()
            .map(|(task, loss)| {
                last.insert(task.clone(), 1.0 / (f64::from(loss.to_scalar::<f32>()?) + 1e-8));
                Ok((loss + 1e-8)?.log()?)
            })
            .collect()
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}
