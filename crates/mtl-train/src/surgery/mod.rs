//! Gradient surgery on the shared parameters, one file per method. Each takes every task's gradient on the
//! shared parameters (flattened into one vector per task, the step's weighted term already applied) and
//! returns the update direction that replaces their sum. The heads' gradients are left alone: each head only
//! ever receives its own task's gradient.

mod aligned;
mod cagrad;
mod db_mtl;
mod imtl;
mod mgda;
mod nash;
mod pcgrad;

use std::collections::BTreeMap;

use mtl_config::{SurgeryConfig, SurgeryMethod};
use mtl_core::TaskId;
use rayon::prelude::*;

pub use aligned::{aligned_mtl, AlignedMtl};
pub use cagrad::{cagrad, Cagrad};
pub use db_mtl::DbMtl;
pub use imtl::{imtl, Imtl};
pub use mgda::{mgda, min_norm_weights, Mgda};
pub use nash::{nash_mtl, NashMtl};
pub use pcgrad::{pcgrad, Pcgrad};

pub trait GradientSurgery: Send + Sync {
    /// The coefficients `a_k` of the update `Σ_k a_k g_k` that replaces the plain sum, from the Gram matrix
    /// of the tasks' gradients and their losses (in the same order), at optimiser step `step`. Most methods
    /// give combinations of the original gradients, so only their dot products are needed.
    fn coefficients(&self, gram: &[Vec<f64>], losses: &[f64], step: usize) -> Vec<f64>;

    /// Whether [`GradientSurgery::coefficients`] reads the Gram matrix (DB-MTL's does not).
    fn uses_gram(&self) -> bool {
        true
    }

    /// The update itself, for a method whose update is not a combination of the step's gradients (DB-MTL
    /// combines moving averages); `None` combines the gradients by the coefficients.
    fn direction(&self, _tasks: &[TaskId], _grads: &[&Segments], _step: usize) -> Option<Vec<Vec<f32>>> {
        None
    }

    /// State to keep in checkpoints, as named vectors.
    fn tensors(&self) -> BTreeMap<String, Vec<f32>> {
        BTreeMap::new()
    }

    /// Restores [`GradientSurgery::tensors`].
    fn load_tensors(&self, tensors: BTreeMap<String, Vec<f32>>) -> Result<(), String> {
        if tensors.is_empty() {
            Ok(())
        } else {
            Err("this surgery keeps no state".into())
        }
    }
}

/// The surgery a config asks for, if any; `seed` seeds PCGrad's projection orders.
pub fn surgery(config: &SurgeryConfig, seed: u64) -> Option<Box<dyn GradientSurgery>> {
    match config.method {
        SurgeryMethod::None => None,
        SurgeryMethod::Pcgrad => Some(Box::new(Pcgrad { seed })),
        SurgeryMethod::Cagrad => Some(Box::new(Cagrad { c: config.c })),
        SurgeryMethod::Mgda => Some(Box::new(Mgda { normalization: config.normalization })),
        SurgeryMethod::Imtl => Some(Box::new(Imtl)),
        SurgeryMethod::AlignedMtl => Some(Box::new(AlignedMtl)),
        SurgeryMethod::NashMtl => Some(Box::new(NashMtl)),
        SurgeryMethod::DbMtl => Some(Box::new(DbMtl::new(config.beta, config.beta_sigma))),
    }
}

const CHUNK: usize = 1 << 15;

/// A task's gradient on the shared parameters, as one slice per parameter; every task's is cut the same way.
pub type Segments<'a> = [&'a [f32]];

/// Every (segment, range) piece of work, chunked so that threads share big parameters.
fn pieces(lengths: &[usize]) -> Vec<(usize, std::ops::Range<usize>)> {
    lengths
        .iter()
        .enumerate()
        .flat_map(|(s, &n)| (0..n.div_ceil(CHUNK)).map(move |c| (s, c * CHUNK..((c + 1) * CHUNK).min(n))))
        .collect()
}

/// The Gram matrix of the gradients, `gram[i][j] = g_i · g_j`, in one pass over them (every pair's partial
/// product while a chunk is in cache). Partial sums are added in order, so the result does not depend on the
/// threads.
pub fn gram(grads: &[&Segments]) -> Vec<Vec<f64>> {
    let k = grads.len();
    let lengths: Vec<usize> = grads.first().map_or(Vec::new(), |g| g.iter().map(|s| s.len()).collect());
    let partial: Vec<Vec<f64>> = pieces(&lengths)
        .into_par_iter()
        .map(|(s, range)| {
            let mut p = vec![0f64; k * k];
            for i in 0..k {
                for j in i..k {
                    p[i * k + j] = grads[i][s][range.clone()]
                        .iter()
                        .zip(&grads[j][s][range.clone()])
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum();
                }
            }
            p
        })
        .collect();
    let mut upper = vec![0f64; k * k];
    for p in partial {
        for (u, v) in upper.iter_mut().zip(p) {
            *u += v;
        }
    }
    (0..k).map(|i| (0..k).map(|j| upper[i.min(j) * k + i.max(j)]).collect()).collect()
}

/// Cosine similarity of every pair of gradients from their Gram matrix, `(i, j, cos)` with `i < j`; 0 where a
/// gradient is zero.
pub fn cosine_similarities(gram: &[Vec<f64>]) -> Vec<(usize, usize, f64)> {
    let mut out = Vec::new();
    for i in 0..gram.len() {
        for j in i + 1..gram.len() {
            let norm = (gram[i][i] * gram[j][j]).sqrt();
            out.push((i, j, if norm > 0.0 { gram[i][j] / norm } else { 0.0 }));
        }
    }
    out
}

/// `Σ_k c_k · g_k` per segment, elementwise in f64.
pub fn combination(grads: &[&Segments], coefficients: &[f64]) -> Vec<Vec<f32>> {
    let lengths: Vec<usize> = grads.first().map_or(Vec::new(), |g| g.iter().map(|s| s.len()).collect());
    let mut out: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0f32; n]).collect();
    for (s, segment) in out.iter_mut().enumerate() {
        segment.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let start = c * CHUNK;
            for (i, o) in chunk.iter_mut().enumerate() {
                let v: f64 = grads.iter().zip(coefficients).map(|(g, &w)| w * f64::from(g[s][start + i])).sum();
                *o = v as f32;
            }
        });
    }
    out
}
