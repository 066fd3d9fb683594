//! CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
//! 2021).
//!
//! With `g0` the average gradient and `G` the Gram matrix of the task gradients, CAGrad finds the simplex
//! weights `w` minimising `F(w) = wᵀ G 1/K + c‖g0‖ · sqrt(wᵀ G w)`, and updates along
//! `d = (g0 + c‖g0‖ / ‖g_w‖ · g_w) / (1 + c²)` with `g_w = Σ w_k g_k` (the authors' `rescale = 1`). `F` is
//! convex, and is minimised here by projected gradient descent with backtracking (the authors call SLSQP;
//! the tests compare with it). The update is multiplied by the number of tasks, so that it has the scale of
//! the static weighting's `Σ_k L_k` rather than of their mean.

use super::GradientSurgery;

pub struct Cagrad {
    /// The radius of the ball around `g0` (the paper's c).
    pub c: f64,
}

impl GradientSurgery for Cagrad {
    fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], _step: usize) -> Vec<f64> {
        let k = gram.len() as f64;
        cagrad(gram, self.c).into_iter().map(|a| a * k).collect()
    }
}

/// The coefficients of the CAGrad update `d = Σ_k a_k g_k` for gradients with Gram matrix `gram`.
pub fn cagrad(gram: &[Vec<f64>], c: f64) -> Vec<f64> {
    let k = gram.len();
    if k == 0 {
        return Vec::new();
    }
    let n = k as f64;
    let mean: f64 = gram.iter().flatten().sum::<f64>() / (n * n);
    let radius = c * (mean + 1e-8).sqrt() + 1e-8;
    let w = minimise_on_simplex(gram, radius);
    // ‖g_w‖² = wᵀ G w
    let gw_norm = quad(gram, &w).max(0.0).sqrt();
    let lambda = radius / (gw_norm + 1e-8);
    (0..k).map(|i| (1.0 / n + lambda * w[i]) / (1.0 + c * c)).collect()
}

fn mat_vec(a: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    a.iter().map(|row| row.iter().zip(x).map(|(a, x)| a * x).sum()).collect()
}

fn quad(a: &[Vec<f64>], x: &[f64]) -> f64 {
    mat_vec(a, x).iter().zip(x).map(|(a, x)| a * x).sum()
}

/// `F(w) = wᵀ G b + radius · sqrt(wᵀ G w + 1e-8)` with `b` uniform, as the authors write it.
fn objective(gram: &[Vec<f64>], radius: f64, w: &[f64]) -> f64 {
    let b = vec![1.0 / gram.len() as f64; gram.len()];
    let gb = mat_vec(gram, &b);
    w.iter().zip(&gb).map(|(w, g)| w * g).sum::<f64>() + radius * (quad(gram, w) + 1e-8).sqrt()
}

fn minimise_on_simplex(gram: &[Vec<f64>], radius: f64) -> Vec<f64> {
    let k = gram.len();
    let b = vec![1.0 / k as f64; k];
    let gb = mat_vec(gram, &b);
    let mut w = b.clone();
    let mut f = objective(gram, radius, &w);
    let scale = gram.iter().map(|r| r.iter().map(|v| v.abs()).sum::<f64>()).fold(0.0, f64::max).max(1e-12);
    let mut step = 1.0 / scale;
    for _ in 0..5000 {
        let gw = mat_vec(gram, &w);
        let root = (w.iter().zip(&gw).map(|(a, b)| a * b).sum::<f64>() + 1e-8).sqrt();
        let grad: Vec<f64> = (0..k).map(|i| gb[i] + radius * gw[i] / root).collect();
        // Backtracking: shrink the step until the projected point decreases F enough.
        let mut accepted = None;
        for _ in 0..60 {
            let candidate = project_to_simplex(&w.iter().zip(&grad).map(|(w, g)| w - step * g).collect::<Vec<_>>());
            let fc = objective(gram, radius, &candidate);
            let moved: f64 = candidate.iter().zip(&w).map(|(c, w)| (c - w) * (c - w)).sum();
            let predicted: f64 = grad.iter().zip(candidate.iter().zip(&w)).map(|(g, (c, w))| g * (c - w)).sum();
            if fc <= f + predicted + moved / (2.0 * step) {
                accepted = Some((candidate, fc, moved));
                break;
            }
            step *= 0.5;
        }
        let Some((candidate, fc, moved)) = accepted else { break };
        w = candidate;
        let improvement = f - fc;
        f = fc;
        if moved < 1e-24 || improvement.abs() <= 1e-15 * f.abs().max(1e-300) {
            break;
        }
        step *= 2.0;
    }
    w
}

/// The Euclidean projection onto the probability simplex (Duchi, Shalev-Shwartz, Singer & Chandra 2008).
fn project_to_simplex(v: &[f64]) -> Vec<f64> {
    let mut u = v.to_vec();
    u.sort_by(|a, b| b.total_cmp(a));
    let mut cumulative = 0.0;
    let mut theta = 0.0;
    for (i, &x) in u.iter().enumerate() {
        cumulative += x;
        let t = (cumulative - 1.0) / (i + 1) as f64;
        if x - t > 0.0 {
            theta = t;
        }
    }
    v.iter().map(|x| (x - theta).max(0.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surgery::{combination, gram};

    #[derive(serde::Deserialize)]
    struct Case {
        grads: Vec<Vec<f32>>,
        c: f64,
        objective: f64,
        result: Vec<f64>,
    }

    /// Against the authors' `cagrad` with scipy's SLSQP on random gradients (`scripts/make_fixtures.py
    /// weighting`): the minimum found is at least as low, and the update agrees.
    #[test]
    fn matches_the_authors_update() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/cagrad.json")).expect("fixture parses");
        for case in cases {
            let segments: Vec<[&[f32]; 1]> = case.grads.iter().map(|g| [g.as_slice()]).collect();
            let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
            let g = gram(&refs);
            let n = g.len() as f64;
            let mean: f64 = g.iter().flatten().sum::<f64>() / (n * n);
            let radius = case.c * (mean + 1e-8).sqrt() + 1e-8;
            let w = minimise_on_simplex(&g, radius);
            let f = objective(&g, radius, &w);
            assert!(f <= case.objective + 1e-6 * case.objective.abs().max(1.0), "F {f} vs SLSQP {}", case.objective);
            let got = combination(&refs, &cagrad(&g, case.c)).remove(0);
            let norm = case.result.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (a, b) in got.iter().zip(&case.result) {
                assert!((f64::from(*a) - b).abs() < 1e-3 * norm, "{got:?} vs {:?}", case.result);
            }
        }
    }

    #[test]
    fn projection_lands_on_the_simplex() {
        assert_eq!(project_to_simplex(&[0.2, 0.3, 0.5]), vec![0.2, 0.3, 0.5]);
        assert_eq!(project_to_simplex(&[2.0, 0.0]), vec![1.0, 0.0]);
        let p = project_to_simplex(&[0.9, 0.8, -3.0]);
        assert!((p[0] - 0.55).abs() < 1e-12 && (p[1] - 0.45).abs() < 1e-12 && p[2] == 0.0, "{p:?}");
    }
}
