//! MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).
//!
//! The update is the minimum-norm point of the convex hull of the task gradients, `Σ_k w_k g_k` with `w` on
//! the simplex, a common descent direction of every task (or zero at a Pareto-stationary point). The gradients
//! are first divided by a normaliser (LibMTL's `mgda_gn`: none, their L2 norm, the loss, or both), and the
//! update combines the normalised gradients, as LibMTL does. The minimum is found by the authors'
//! Frank-Wolfe solver, step for step: the best pair's closed-form minimum to start, then up to 250 steps
//! toward the simplex-projected descent point, each with the exact line search between two points.
//! Everything needs only dot products, so it runs on the Gram matrix. The update is multiplied by the number
//! of tasks, so that it has the scale of the static weighting's `Σ_k L_k` rather than of a mean.
//!
//! Sener & Koltun's "MGDA-UB" applies the same solver to the gradients of the shared representation, an upper
//! bound that avoids a backward pass per task through the encoder; here the gradients are the shared
//! parameters' own (LibMTL's `rep_grad = False`).

use mtl_config::MgdaNormalization;

use super::GradientSurgery;

pub struct Mgda {
    pub normalization: MgdaNormalization,
}

impl GradientSurgery for Mgda {
    fn coefficients(&self, gram: &[Vec<f64>], losses: &[f64], _step: usize) -> Vec<f64> {
        let k = gram.len() as f64;
        mgda(gram, losses, self.normalization).into_iter().map(|a| a * k).collect()
    }
}

/// The coefficients of MGDA's update `Σ_k a_k g_k` (the minimum-norm weights over the normalisers).
pub fn mgda(gram: &[Vec<f64>], losses: &[f64], normalization: MgdaNormalization) -> Vec<f64> {
    let k = gram.len();
    let norm = |i: usize| gram[i][i].max(0.0).sqrt();
    let normaliser: Vec<f64> = (0..k)
        .map(|i| match normalization {
            MgdaNormalization::None => 1.0,
            MgdaNormalization::L2 => norm(i),
            MgdaNormalization::Loss => losses[i],
            MgdaNormalization::LossPlus => losses[i] * norm(i),
        })
        .map(|n| if n > 0.0 && n.is_finite() { n } else { 1.0 })
        .collect();
    let scaled: Vec<Vec<f64>> =
        (0..k).map(|i| (0..k).map(|j| gram[i][j] / (normaliser[i] * normaliser[j])).collect()).collect();
    min_norm_weights(&scaled).iter().zip(&normaliser).map(|(w, n)| w / n).collect()
}

/// The weights on the simplex of the minimum-norm combination of vectors with Gram matrix `gram` (the
/// authors' `MinNormSolver.find_min_norm_element`).
pub fn min_norm_weights(gram: &[Vec<f64>]) -> Vec<f64> {
    const MAX_ITER: usize = 250;
    const STOP: f64 = 1e-5;
    let n = gram.len();
    if n < 2 {
        return vec![1.0; n];
    }
    let mut best: Option<((usize, usize), f64, f64)> = None;
    for i in 0..n {
        for j in i + 1..n {
            let (gamma, cost) = line_minimum(gram[i][i], gram[i][j], gram[j][j]);
            if best.is_none_or(|b| cost < b.2) {
                best = Some(((i, j), gamma, cost));
            }
        }
    }
    let ((i, j), gamma, _) = best.expect("two vectors make a pair");
    let mut w = vec![0.0; n];
    w[i] = gamma;
    w[j] = 1.0 - gamma;
    if n < 3 {
        return w;
    }
    let quad =
        |a: &[f64], b: &[f64]| -> f64 { (0..n).map(|p| (0..n).map(|q| a[p] * b[q] * gram[p][q]).sum::<f64>()).sum() };
    for _ in 0..MAX_ITER {
        let descent: Vec<f64> = (0..n).map(|p| -(0..n).map(|q| gram[p][q] * w[q]).sum::<f64>()).collect();
        let next = next_point(&w, &descent);
        let (gamma, _) = line_minimum(quad(&w, &w), quad(&w, &next), quad(&next, &next));
        let updated: Vec<f64> = w.iter().zip(&next).map(|(a, b)| gamma * a + (1.0 - gamma) * b).collect();
        let change: f64 = updated.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum();
        if change < STOP {
            return w;
        }
        w = updated;
    }
    w
}

/// The minimum of `‖γ v1 + (1 − γ) v2‖²` over `γ ∈ [0, 1]` from the three dot products: `(γ, cost)`, with the
/// authors' 0.999 / 0.001 at the ends.
fn line_minimum(v1v1: f64, v1v2: f64, v2v2: f64) -> (f64, f64) {
    if v1v2 >= v1v1 {
        return (0.999, v1v1);
    }
    if v1v2 >= v2v2 {
        return (0.001, v2v2);
    }
    let gamma = -(v1v2 - v2v2) / (v1v1 + v2v2 - 2.0 * v1v2);
    (gamma, v2v2 + gamma * (v1v2 - v2v2))
}

/// The authors' `_next_point`: a step along the descent direction with its mean removed, as long as the
/// first coordinate reaches a bound, then projected on the simplex.
fn next_point(current: &[f64], descent: &[f64]) -> Vec<f64> {
    let n = current.len() as f64;
    let mean = descent.iter().sum::<f64>() / n;
    let projected: Vec<f64> = descent.iter().map(|d| d - mean).collect();
    let mut t: f64 = 1.0;
    let to_zero = projected.iter().zip(current).filter(|(p, _)| **p < 0.0).map(|(p, c)| -c / p);
    let to_one = projected.iter().zip(current).filter(|(p, _)| **p > 0.0).map(|(p, c)| (1.0 - c) / p);
    if let Some(m) = to_zero.filter(|v| *v > 1e-7).reduce(f64::min) {
        t = m;
    }
    if let Some(m) = to_one.filter(|v| *v > 1e-7).reduce(f64::min) {
        t = t.min(m);
    }
    project_to_simplex(&projected.iter().zip(current).map(|(p, c)| p * t + c).collect::<Vec<_>>())
}

/// The authors' `_projection2simplex` (sorting, the first threshold that clears the next value).
fn project_to_simplex(y: &[f64]) -> Vec<f64> {
    let m = y.len();
    let mut sorted = y.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut threshold = (y.iter().sum::<f64>() - 1.0) / m as f64;
    let mut sum = 0.0;
    for i in 0..m - 1 {
        sum += sorted[i];
        let t = (sum - 1.0) / (i + 1) as f64;
        if t > sorted[i + 1] {
            threshold = t;
            break;
        }
    }
    y.iter().map(|v| (v - threshold).max(0.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surgery::{combination, gram};

    #[derive(serde::Deserialize)]
    struct Case {
        normalization: MgdaNormalization,
        grads: Vec<Vec<f32>>,
        losses: Vec<f64>,
        weights: Vec<f64>,
        update: Vec<f64>,
    }

    /// Against LibMTL 1.1.5's `MGDA.backward` on a tiny shared layer (`scripts/make_fixtures.py weighting`),
    /// every normalisation: the simplex weights and the shared update it leaves (ours over the number of tasks).
    #[test]
    fn matches_libmtl() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/mgda.json")).expect("fixture parses");
        for (n, case) in cases.iter().enumerate() {
            let segments: Vec<[&[f32]; 1]> = case.grads.iter().map(|g| [g.as_slice()]).collect();
            let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
            let g = gram(&refs);
            let k = g.len() as f64;
            let coefficients = Mgda { normalization: case.normalization }.coefficients(&g, &case.losses, 0);
            let got = combination(&refs, &coefficients.iter().map(|c| c / k).collect::<Vec<_>>()).remove(0);
            let norm = case.update.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (a, b) in got.iter().zip(&case.update) {
                assert!((f64::from(*a) - b).abs() < 1e-4 * norm.max(1e-6), "case {n}: {got:?} vs {:?}", case.update);
            }
            let scaled: Vec<Vec<f64>> = {
                let normaliser: Vec<f64> = (0..g.len())
                    .map(|i| match case.normalization {
                        MgdaNormalization::None => 1.0,
                        MgdaNormalization::L2 => g[i][i].sqrt(),
                        MgdaNormalization::Loss => case.losses[i],
                        MgdaNormalization::LossPlus => case.losses[i] * g[i][i].sqrt(),
                    })
                    .collect();
                (0..g.len())
                    .map(|i| (0..g.len()).map(|j| g[i][j] / (normaliser[i] * normaliser[j])).collect())
                    .collect()
            };
            for (a, b) in min_norm_weights(&scaled).iter().zip(&case.weights) {
                assert!((a - b).abs() < 1e-4, "case {n}: weights vs {:?}", case.weights);
            }
        }
    }

    /// Two orthogonal vectors of norms 1 and 2: the minimum-norm point weighs them 0.8 and 0.2.
    #[test]
    fn two_orthogonal_vectors() {
        let w = min_norm_weights(&[vec![1.0, 0.0], vec![0.0, 4.0]]);
        assert!((w[0] - 0.8).abs() < 1e-12 && (w[1] - 0.2).abs() < 1e-12, "{w:?}");
    }
}
