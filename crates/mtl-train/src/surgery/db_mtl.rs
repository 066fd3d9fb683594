//! DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023), the gradient half.
//!
//! Each task keeps a moving average of its gradient on the shared parameters, `b_k ← g_k + β_t (b_k − g_k)`
//! with `β_t = β / t^σ` at optimiser step `t` (from 1), and the update is `Σ_k (max_j ‖b_j‖ / ‖b_k‖) b_k`:
//! every task's averaged gradient scaled to the largest one's norm, as LibMTL's `DB_MTL` computes it. The
//! loss half, the logarithm of each loss, is `weighting.method = "log"`; together they are the paper's
//! method. The averages start at zero and, when a batch lacks a task, that task's average neither moves nor
//! takes part in the update. They are kept in checkpoints (`surgery.safetensors`), one vector per task and
//! shared parameter, so a resumed run continues exactly.

use std::collections::BTreeMap;
use std::sync::Mutex;

use mtl_core::TaskId;
use rayon::prelude::*;

use super::{GradientSurgery, Segments, CHUNK};

pub struct DbMtl {
    pub beta: f64,
    pub beta_sigma: f64,
    /// Each task's averages, one vector per shared parameter (in the order of the step's segments).
    averages: Mutex<BTreeMap<TaskId, Vec<Vec<f32>>>>,
}

impl DbMtl {
    pub fn new(beta: f64, beta_sigma: f64) -> Self {
        Self { beta, beta_sigma, averages: Mutex::new(BTreeMap::new()) }
    }
}

impl GradientSurgery for DbMtl {
    fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], _step: usize) -> Vec<f64> {
        vec![1.0; gram.len()]
    }

    fn uses_gram(&self) -> bool {
        false
    }

    fn direction(&self, tasks: &[TaskId], grads: &[&Segments], step: usize) -> Option<Vec<Vec<f32>>> {
        let rate = (self.beta / ((step + 1) as f64).powf(self.beta_sigma)) as f32;
        let mut averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        let mut norms = Vec::with_capacity(tasks.len());
        for (task, g) in tasks.iter().zip(grads) {
            let average =
                averages.entry(task.clone()).or_insert_with(|| g.iter().map(|s| vec![0f32; s.len()]).collect());
            if average.len() != g.len() || average.iter().zip(g.iter()).any(|(a, s)| a.len() != s.len()) {
                // The shared parameters changed (a layer unfrozen): start this task's average again.
                *average = g.iter().map(|s| vec![0f32; s.len()]).collect();
            }
            let mut sum = 0f64;
            for (a, s) in average.iter_mut().zip(g.iter()) {
                sum += a
                    .par_chunks_mut(CHUNK)
                    .zip(s.par_chunks(CHUNK))
                    .map(|(a, s)| {
                        let mut part = 0f64;
                        for (a, &g) in a.iter_mut().zip(s) {
                            *a = g + rate * (*a - g);
                            part += f64::from(*a) * f64::from(*a);
                        }
                        part
                    })
                    .sum::<f64>();
            }
            norms.push(sum.sqrt());
        }
        let largest = norms.iter().copied().fold(0.0, f64::max);
        let scales: Vec<f32> = norms.iter().map(|n| (largest / (n + 1e-8)) as f32).collect();
        let present: Vec<&Vec<Vec<f32>>> = tasks.iter().map(|t| &averages[t]).collect();
        let mut out: Vec<Vec<f32>> =
            grads.first().map_or(Vec::new(), |g| g.iter().map(|s| vec![0f32; s.len()]).collect());
        for (p, segment) in out.iter_mut().enumerate() {
            segment.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let start = c * CHUNK;
                for (average, &scale) in present.iter().zip(&scales) {
                    for (o, a) in chunk.iter_mut().zip(&average[p][start..]) {
                        *o += scale * a;
                    }
                }
            });
        }
        Some(out)
    }

    fn tensors(&self) -> BTreeMap<String, Vec<f32>> {
        let averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        averages
            .iter()
            .flat_map(|(task, parts)| parts.iter().enumerate().map(move |(i, v)| (format!("{task}.{i}"), v.clone())))
            .collect()
    }

    fn load_tensors(&self, tensors: BTreeMap<String, Vec<f32>>) -> Result<(), String> {
        let mut loaded: BTreeMap<TaskId, BTreeMap<usize, Vec<f32>>> = BTreeMap::new();
        for (name, values) in tensors {
            let (task, index) = name.rsplit_once('.').ok_or_else(|| format!("`{name}` is not TASK.INDEX"))?;
            let task = TaskId::new(task).map_err(|e| format!("`{name}`: {e}"))?;
            let index: usize = index.parse().map_err(|e| format!("`{name}`: {e}"))?;
            loaded.entry(task).or_default().insert(index, values);
        }
        let mut averages = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        averages.clear();
        for (task, parts) in loaded {
            if parts.keys().copied().ne(0..parts.len()) {
                return Err(format!("the averages of `{task}` are not numbered 0..{}", parts.len()));
            }
            averages.insert(task, parts.into_values().collect());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Step {
        grads: Vec<Vec<f32>>,
        update: Vec<f64>,
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        beta: f64,
        beta_sigma: f64,
        steps: Vec<Step>,
    }

    /// Against LibMTL's `DB_MTL` over 4 steps of a tiny shared layer's log-loss gradients
    /// (`scripts/make_fixtures.py weighting`): the update of every step, and the same after a resume from the
    /// state of step 2.
    #[test]
    fn matches_libmtl() {
        let f: Fixture = serde_json::from_str(include_str!("../../../../tests/fixtures/db_mtl.json")).expect("parses");
        let tasks: Vec<TaskId> =
            (0..f.steps[0].grads.len()).map(|i| TaskId::new(format!("t{i}")).expect("valid")).collect();
        let db = DbMtl::new(f.beta, f.beta_sigma);
        let resumed = DbMtl::new(f.beta, f.beta_sigma);
        for (step, case) in f.steps.iter().enumerate() {
            if step == 2 {
                resumed.load_tensors(db.tensors()).expect("state loads");
            }
            let segments: Vec<[&[f32]; 1]> = case.grads.iter().map(|g| [g.as_slice()]).collect();
            let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
            let got = db.direction(&tasks, &refs, step).expect("a direction").remove(0);
            let norm = case.update.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (a, b) in got.iter().zip(&case.update) {
                assert!((f64::from(*a) - b).abs() < 1e-5 * norm, "step {step}: {got:?} vs {:?}", case.update);
            }
            if step >= 2 {
                assert_eq!(resumed.direction(&tasks, &refs, step).expect("a direction").remove(0), got);
            }
        }
    }
}
