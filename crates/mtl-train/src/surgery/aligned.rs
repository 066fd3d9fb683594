//! Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
//! Learning", CVPR 2023).
//!
//! The task gradients' matrix `G` is replaced by its closest matrix with orthogonal rows of equal norm, scaled
//! to `G`'s smallest singular value, so that no task dominates and none conflicts: with `GGᵀ = V Λ Vᵀ` (the
//! eigenvalues above the rank tolerance kept), `B = √λ_min · V Λ^{-1/2} Vᵀ` and the update is `Σ_k α_k g_k`
//! with `α = Bᵀ 1`, as LibMTL's `Aligned_MTL` computes it. The rank tolerance is torch's:
//! `λ_max · K · ε` with ε the f32 machine epsilon. The update has the scale of a sum (for orthonormal
//! gradients `α = 1`), so it is not rescaled.

use super::GradientSurgery;

pub struct AlignedMtl;

impl GradientSurgery for AlignedMtl {
    fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], _step: usize) -> Vec<f64> {
        aligned_mtl(gram)
    }
}

/// Aligned-MTL's coefficients for gradients with Gram matrix `gram`.
pub fn aligned_mtl(gram: &[Vec<f64>]) -> Vec<f64> {
    let k = gram.len();
    let (values, vectors) = symmetric_eigen(gram);
    let largest = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if k == 0 || largest.is_nan() || largest <= 0.0 {
        return vec![1.0; k];
    }
    let tolerance = largest * k as f64 * f64::from(f32::EPSILON);
    let mut kept: Vec<usize> = (0..k).filter(|&i| values[i] > tolerance).collect();
    kept.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let smallest = values[*kept.last().expect("the largest is kept")];
    // α_j = Σ_i B_ij with B = √λ_min Σ_r v_r v_rᵀ / √λ_r.
    (0..k)
        .map(|j| {
            smallest.sqrt()
                * kept
                    .iter()
                    .map(|&r| {
                        let v = |i: usize| vectors[i][r];
                        (0..k).map(v).sum::<f64>() * v(j) / values[r].sqrt()
                    })
                    .sum::<f64>()
        })
        .collect()
}

/// Eigenvalues and eigenvectors (as columns, `vectors[i][r]`) of a symmetric matrix, by cyclic Jacobi
/// rotations.
pub(crate) fn symmetric_eigen(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let total: f64 = a.iter().flatten().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (row_p, row_q) = (a[p].clone(), a[q].clone());
                for (k, (apk, aqk)) in row_p.into_iter().zip(row_q).enumerate() {
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surgery::gram;

    #[derive(serde::Deserialize)]
    struct Case {
        grads: Vec<Vec<f64>>,
        weights: Vec<f64>,
    }

    /// Against LibMTL's `Aligned_MTL` weights on a tiny shared layer's task gradients
    /// (`scripts/make_fixtures.py weighting`).
    #[test]
    fn matches_libmtl() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/aligned_mtl.json")).expect("parses");
        for (n, case) in cases.iter().enumerate() {
            let grads: Vec<Vec<f32>> = case.grads.iter().map(|g| g.iter().map(|&v| v as f32).collect()).collect();
            let segments: Vec<[&[f32]; 1]> = grads.iter().map(|g| [g.as_slice()]).collect();
            let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
            let alpha = AlignedMtl.coefficients(&gram(&refs), &[], 0);
            for (a, b) in alpha.iter().zip(&case.weights) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "case {n}: {alpha:?} vs {:?}", case.weights);
            }
        }
    }

    #[test]
    fn eigen_decomposition_reconstructs_the_matrix() {
        let a = vec![vec![4.0, 1.0, 0.5], vec![1.0, 3.0, -0.2], vec![0.5, -0.2, 1.0]];
        let (values, vectors) = symmetric_eigen(&a);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| vectors[i][k] * values[k] * vectors[j][k]).sum();
                assert!((r - a[i][j]).abs() < 1e-12, "{i},{j}: {r}");
            }
        }
    }
}
