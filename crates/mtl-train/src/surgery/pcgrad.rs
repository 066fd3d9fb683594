//! PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS
//! 2020).
//!
//! For each task `i`, start from `g_i` and, for every other task `j` in a random order, when the running
//! `g_i` conflicts with the original `g_j` (negative dot product), remove its component along `g_j`:
//! `g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j`. The update is the sum of the projected gradients (the paper's
//! TensorFlow code sums; a sum also matches the static weighting's `Σ_k L_k`). The random orders come from a
//! generator seeded by the run's seed and the step, so a resumed run projects exactly as an uninterrupted one.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::GradientSurgery;

pub struct Pcgrad {
    pub seed: u64,
}

impl GradientSurgery for Pcgrad {
    fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], step: usize) -> Vec<f64> {
        let k = gram.len();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x9C_6EAD ^ ((step as u64) << 24));
        let orders: Vec<Vec<usize>> = (0..k)
            .map(|i| {
                let mut order: Vec<usize> = (0..k).filter(|&j| j != i).collect();
                order.shuffle(&mut rng);
                order
            })
            .collect();
        pcgrad(gram, &orders)
    }
}

/// The coefficients of PCGrad's update with given projection orders (`orders[i]` lists the tasks `g_i` is
/// projected against, in turn), from the Gram matrix of the gradients.
///
/// Each projected gradient stays a combination of the originals, `g_i' = Σ_j a_ij g_j`, so the projections
/// are done on the coefficients and the vectors are combined once at the end.
pub fn pcgrad(gram: &[Vec<f64>], orders: &[Vec<usize>]) -> Vec<f64> {
    let k = gram.len();
    let mut total = vec![0f64; k];
    for (i, order) in orders.iter().enumerate() {
        let mut a = vec![0f64; k];
        a[i] = 1.0;
        for &j in order {
            // (Σ_m a_m g_m) · g_j
            let d: f64 = (0..k).map(|m| a[m] * gram[m][j]).sum();
            if d < 0.0 && gram[j][j] > 0.0 {
                a[j] -= d / gram[j][j];
            }
        }
        for m in 0..k {
            total[m] += a[m];
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surgery::{combination, gram};

    /// The combined update of flat gradients.
    fn update(grads: &[Vec<f32>], coefficients: &[f64]) -> Vec<f32> {
        let segments: Vec<[&[f32]; 1]> = grads.iter().map(|g| [g.as_slice()]).collect();
        let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
        combination(&refs, coefficients).remove(0)
    }

    fn gram_of(grads: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let segments: Vec<[&[f32]; 1]> = grads.iter().map(|g| [g.as_slice()]).collect();
        let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
        gram(&refs)
    }

    #[derive(serde::Deserialize)]
    struct Case {
        grads: Vec<Vec<f32>>,
        orders: Vec<Vec<usize>>,
        result: Vec<f64>,
    }

    /// Against the authors' projection loop on random gradients (`scripts/make_fixtures.py weighting`).
    #[test]
    fn matches_reference_projection() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/pcgrad.json")).expect("fixture parses");
        for case in cases {
            let got = update(&case.grads, &pcgrad(&gram_of(&case.grads), &case.orders));
            for (g, w) in got.iter().zip(&case.result) {
                assert!((f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()), "{got:?} vs {:?}", case.result);
            }
        }
    }

    /// Two conflicting gradients by hand: g1 = (1, 0), g2 = (-1, 1). g1·g2 = -1, so g1' = g1 + g2/2 =
    /// (0.5, 0.5) and g2' = g2 + g1 = (0, 1); the sum is (0.5, 1.5). Gradients that agree pass unchanged.
    #[test]
    fn projects_conflicts_only() {
        let grads = [vec![1.0, 0.0], vec![-1.0, 1.0]];
        assert_eq!(update(&grads, &pcgrad(&gram_of(&grads), &[vec![1], vec![0]])), vec![0.5, 1.5]);
        let agree = [vec![1.0, 2.0], vec![0.5, 1.0]];
        assert_eq!(update(&agree, &Pcgrad { seed: 1 }.coefficients(&gram_of(&agree), &[], 7)), vec![1.5, 3.0]);
    }
}
