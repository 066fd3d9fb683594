//! IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).
//!
//! The update `g = Σ_k α_k g_k`, `Σ_k α_k = 1`, whose projections on every task's unit gradient `u_k` are
//! equal: `g·(u_1 − u_k) = 0` for every `k > 1`, a linear system of `K − 1` equations in the closed form of
//! the paper (LibMTL's `IMTL`): `α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹` with `D` rows `g_1 − g_k` and `U` rows
//! `u_1 − u_k`. Every product is a dot product of gradients, so it runs on the Gram matrix. Paired with the
//! loss scales of `weighting.method = "imtl"` (IMTL-L) it is the paper's IMTL. The update is multiplied by the
//! number of tasks, as CAGrad's and MGDA's are. Where the system is singular (two tasks with parallel
//! gradients, or a zero gradient) the weights are uniform.

use super::GradientSurgery;

pub struct Imtl;

impl GradientSurgery for Imtl {
    fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], _step: usize) -> Vec<f64> {
        let k = gram.len() as f64;
        imtl(gram).into_iter().map(|a| a * k).collect()
    }
}

/// IMTL-G's weights `α` (summing to 1) for gradients with Gram matrix `gram`.
pub fn imtl(gram: &[Vec<f64>]) -> Vec<f64> {
    let k = gram.len();
    let uniform = vec![1.0 / k as f64; k];
    if k < 2 {
        return uniform;
    }
    let norms: Vec<f64> = (0..k).map(|i| gram[i][i].max(0.0).sqrt()).collect();
    if norms.iter().any(|n| *n <= 0.0 || !n.is_finite()) {
        return uniform;
    }
    // g_a · u_b
    let gu = |a: usize, b: usize| gram[a][b] / norms[b];
    // b_j = g_1 · (u_1 − u_j); m_ij = (g_1 − g_i) · (u_1 − u_j), for i, j in 2..K.
    let b: Vec<f64> = (1..k).map(|j| gu(0, 0) - gu(0, j)).collect();
    let m: Vec<Vec<f64>> =
        (1..k).map(|i| (1..k).map(|j| gu(0, 0) - gu(0, j) - gu(i, 0) + gu(i, j)).collect()).collect();
    // α_{2..K} = b M⁻¹, that is Mᵀ αᵀ = bᵀ.
    let transposed: Vec<Vec<f64>> = (0..k - 1).map(|i| (0..k - 1).map(|j| m[j][i]).collect()).collect();
    let Some(rest) = solve(transposed, b) else { return uniform };
    let first = 1.0 - rest.iter().sum::<f64>();
    std::iter::once(first).chain(rest).collect()
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None` when `a` is (nearly) singular.
pub(crate) fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale == 0.0 || !scale.is_finite() {
        return None;
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, below) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (offset, row) in below.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (r, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *r -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surgery::{combination, gram};

    #[derive(serde::Deserialize)]
    struct Case {
        grads: Vec<Vec<f32>>,
        weights: Vec<f64>,
        update: Vec<f64>,
    }

    /// Against LibMTL 1.1.5's `IMTL.backward` (random loss scales) on a tiny shared layer
    /// (`scripts/make_fixtures.py weighting`): the weights, and the shared update (ours over the number of tasks).
    #[test]
    fn matches_libmtl() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/imtl.json")).expect("fixture parses");
        for (n, case) in cases.iter().enumerate() {
            let segments: Vec<[&[f32]; 1]> = case.grads.iter().map(|g| [g.as_slice()]).collect();
            let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
            let g = gram(&refs);
            let alpha = imtl(&g);
            for (a, b) in alpha.iter().zip(&case.weights) {
                assert!((a - b).abs() < 2e-3 * (1.0 + b.abs()), "case {n}: {alpha:?} vs {:?}", case.weights);
            }
            let k = g.len() as f64;
            let coefficients: Vec<f64> = Imtl.coefficients(&g, &[], 0).iter().map(|c| c / k).collect();
            let got = combination(&refs, &coefficients).remove(0);
            let norm = case.update.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (a, b) in got.iter().zip(&case.update) {
                assert!((f64::from(*a) - b).abs() < 2e-3 * norm, "case {n}: {got:?} vs {:?}", case.update);
            }
            // The defining property: equal projections on every unit gradient.
            let update: Vec<f64> =
                (0..g.len()).map(|i| (0..g.len()).map(|j| alpha[j] * g[j][i]).sum::<f64>()).collect();
            let projections: Vec<f64> = (0..g.len()).map(|i| update[i] / g[i][i].sqrt()).collect();
            for p in &projections {
                assert!((p - projections[0]).abs() < 1e-6 * projections[0].abs().max(1e-9), "{projections:?}");
            }
        }
    }
}
