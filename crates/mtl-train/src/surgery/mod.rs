//! Gradient surgery on the shared parameters, one file per method. Each takes every task's gradient on the
//! shared parameters (flattened into one vector per task, the step's weighted term already applied) and
//! returns the update direction that replaces their sum. The heads' gradients are left alone: each head only
//! ever receives its own task's gradient.

mod cagrad;
mod pcgrad;

use mtl_config::{SurgeryConfig, SurgeryMethod};
use rayon::prelude::*;

pub use cagrad::{cagrad, Cagrad};
pub use pcgrad::{pcgrad, Pcgrad};

pub trait GradientSurgery: Send {
    /// The combined gradient of `grads` (one vector per task, all the same length) at optimiser step `step`.
    fn combine(&self, grads: &[Vec<f32>], step: usize) -> Vec<f32>;
}

/// The surgery a config asks for, if any; `seed` seeds PCGrad's projection orders.
pub fn surgery(config: &SurgeryConfig, seed: u64) -> Option<Box<dyn GradientSurgery>> {
    match config.method {
        SurgeryMethod::None => None,
        SurgeryMethod::Pcgrad => Some(Box::new(Pcgrad { seed })),
        SurgeryMethod::Cagrad => Some(Box::new(Cagrad { c: config.c })),
    }
}

const CHUNK: usize = 1 << 15;

/// The dot product in f64. Chunk sums are added in order, so the result does not depend on the threads.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let partial: Vec<f64> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum())
        .collect();
    partial.iter().sum()
}

/// The Gram matrix of the gradients: `gram[i][j] = g_i · g_j`.
pub fn gram(grads: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let k = grads.len();
    let mut g = vec![vec![0.0; k]; k];
    for i in 0..k {
        for j in i..k {
            let d = dot(&grads[i], &grads[j]);
            g[i][j] = d;
            g[j][i] = d;
        }
    }
    g
}

/// Cosine similarity of every pair of gradients, `(i, j, cos)` with `i < j`; 0 where a gradient is zero.
pub fn cosine_similarities(grads: &[Vec<f32>]) -> Vec<(usize, usize, f64)> {
    let g = gram(grads);
    let mut out = Vec::new();
    for i in 0..grads.len() {
        for j in i + 1..grads.len() {
            let norm = (g[i][i] * g[j][j]).sqrt();
            out.push((i, j, if norm > 0.0 { g[i][j] / norm } else { 0.0 }));
        }
    }
    out
}

/// `Σ_k c_k · g_k`, elementwise in f64.
pub(crate) fn combination(grads: &[Vec<f32>], coefficients: &[f64]) -> Vec<f32> {
    let n = grads.first().map_or(0, Vec::len);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let start = c * CHUNK;
        for (i, o) in chunk.iter_mut().enumerate() {
            let v: f64 = grads.iter().zip(coefficients).map(|(g, &w)| w * f64::from(g[start + i])).sum();
            *o = v as f32;
        }
    });
    out
}
