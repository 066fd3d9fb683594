//! Fused multi-head self-attention for the CPU, with its backward pass.
//!
//! One op takes the packed `[q | k | v]` projections (`[batch * seq, 3 * hidden]`) and returns the attention
//! context already laid out as `[batch * seq, hidden]`, so no head transpose is ever copied. Scores, the
//! padding mask, softmax, attention dropout and the weighted sum happen per (example, head) in one pass, in
//! parallel over (example, head) pairs. The backward pass recomputes the probabilities from `q` and `k`
//! instead of storing them (as flash attention does). The composed candle ops in [`composed`] are the
//! reference it is tested against, and the path used on devices other than the CPU.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::layers::softmax_last;
use crate::Result;

/// The shape and masks of one attention call.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// `batch × seq`, 1 for real tokens and 0 for padding (keys at padding get no attention).
    pub key_mask: Arc<Vec<u32>>,
    /// `batch × heads × seq × seq` multipliers of the probabilities: 0 (dropped) or `1 / (1 - p)`.
    pub dropout: Option<Arc<Vec<f32>>>,
    /// A sliding window (ModernBERT's local layers): a query attends only to keys at most this many positions
    /// away; the others are masked as padding is.
    pub window: Option<usize>,
}

impl AttentionSpec {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn check(&self, layout: &Layout, cols: usize) -> candle_core::Result<(usize, usize)> {
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("fused attention: input must be contiguous")
        };
        if layout.dims() != [self.batch * self.seq, cols] {
            candle_core::bail!("fused attention: expected [{}, {cols}], got {:?}", self.batch * self.seq, layout.dims())
        }
        Ok(range)
    }
}

/// `softmax(q kᵀ / √d + mask) · v` per head; see the module docs.
pub fn fused(qkv: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    Ok(qkv.apply_op1(Forward(spec))?)
}

/// Dot product with eight independent accumulators, so that it vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `softmax(q kᵀ / √d + bias + mask) · v` per head, with `bias` (`[heads, seq, seq]`, MPNet's relative
/// position bias) differentiable as well; see the module docs.
pub fn fused_with_bias(qkv: &Tensor, bias: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    let bias = bias.contiguous()?;
    if bias.dims() != [spec.heads, spec.seq, spec.seq] {
        return Err(candle_core::Error::Msg(format!(
            "fused attention: a bias of {:?} for {} heads and {} positions",
            bias.dims(),
            spec.heads,
            spec.seq
        ))
        .into());
    }
    Ok(qkv.apply_op2(&bias, Forward(spec))?)
}

/// The bias row of head `n`, query `i`, when there is a bias.
fn bias_row<'a>(spec: &AttentionSpec, bias: Option<&'a [f32]>, n: usize, i: usize) -> Option<&'a [f32]> {
    let s = spec.seq;
    bias.map(|bias| &bias[(n * s + i) * s..(n * s + i + 1) * s])
}

/// The softmax probabilities of one query row (before dropout), written into `p`; `bias` is the row's
/// additive bias, if any.
fn probs_row(spec: &AttentionSpec, qkv: &[f32], b: usize, n: usize, i: usize, bias: Option<&[f32]>, p: &mut [f32]) {
    let (s, d, h3) = (spec.seq, spec.head_dim, 3 * spec.hidden());
    let row = |t: usize, part: usize| {
        let start = (b * s + t) * h3 + part * spec.hidden() + n * d;
        &qkv[start..start + d]
    };
    let q = row(i, 0);
    let mask = &spec.key_mask[b * s..(b + 1) * s];
    let scale = spec.scale();
    let mut max = f32::NEG_INFINITY;
    for j in 0..s {
        // As transformers does: add the most negative float at padded keys and keys outside the window (a row
        // with no key left is uniform).
        let outside = spec.window.is_some_and(|w| i.abs_diff(j) > w);
        let add = if mask[j] == 0 || outside { f32::MIN } else { 0.0 };
        p[j] = dot(q, row(j, 1)) * scale + bias.map_or(0.0, |r| r[j]) + add;
        max = max.max(p[j]);
    }
    let mut sum = 0.0;
    for x in p.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in p.iter_mut() {
        *x /= sum;
    }
}

fn dropout_row(spec: &AttentionSpec, b: usize, n: usize, i: usize) -> Option<&[f32]> {
    let s = spec.seq;
    spec.dropout.as_ref().map(|m| {
        let start = ((b * spec.heads + n) * s + i) * s;
        &m[start..start + s]
    })
}

struct Forward(AttentionSpec);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (start, end) = spec.check(layout, 3 * spec.hidden())?;
        let CpuStorage::F32(data) = storage else { candle_core::bail!("fused attention: f32 only") };
        forward_cpu(spec, &data[start..end], None)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &Backward(self.0.clone()))?))
    }
}

/// The bias's slice of a contiguous storage.
fn bias_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let (Some((start, end)), CpuStorage::F32(data)) = (layout.contiguous_offsets(), storage) else {
        candle_core::bail!("fused attention: the bias must be contiguous f32")
    };
    Ok(&data[start..end])
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "fused-attention-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (start, end) = spec.check(l1, 3 * spec.hidden())?;
        let CpuStorage::F32(data) = s1 else { candle_core::bail!("fused attention: f32 only") };
        forward_cpu(spec, &data[start..end], Some(bias_slice(s2, l2)?))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let spec = &self.0;
        let grad = grad_res.contiguous()?;
        // One pass gives both: dqkv, then Σ over the batch of dscores per head, packed in one vector.
        let packed = qkv.apply_op3_no_bwd(bias, &grad, &Backward(spec.clone()))?;
        let n = spec.batch * spec.seq * 3 * spec.hidden();
        let dqkv = packed.narrow(0, 0, n)?.reshape((spec.batch * spec.seq, 3 * spec.hidden()))?;
        let dbias = packed.narrow(0, n, spec.heads * spec.seq * spec.seq)?.reshape((spec.heads, spec.seq, spec.seq))?;
        Ok((Some(dqkv), Some(dbias)))
    }
}

fn forward_cpu(spec: &AttentionSpec, qkv: &[f32], bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
    let (s, d, h) = (spec.seq, spec.head_dim, spec.hidden());
    // One [seq × head_dim] block per (example, head), computed in parallel, then scattered.
    let blocks: Vec<Vec<f32>> = (0..spec.batch * spec.heads)
        .into_par_iter()
        .map(|bn| {
            let (b, n) = (bn / spec.heads, bn % spec.heads);
            let mut out = vec![0f32; s * d];
            let mut p = vec![0f32; s];
            for i in 0..s {
                probs_row(spec, qkv, b, n, i, bias_row(spec, bias, n, i), &mut p);
                if let Some(drop) = dropout_row(spec, b, n, i) {
                    p.iter_mut().zip(drop).for_each(|(p, m)| *p *= m);
                }
                let o = &mut out[i * d..(i + 1) * d];
                for (j, &pj) in p.iter().enumerate() {
                    let v = (b * s + j) * 3 * h + 2 * h + n * d;
                    axpy(pj, &qkv[v..v + d], o);
                }
            }
            out
        })
        .collect();
    let mut ctx = vec![0f32; spec.batch * s * h];
    for (bn, block) in blocks.iter().enumerate() {
        let (b, n) = (bn / spec.heads, bn % spec.heads);
        for i in 0..s {
            let dst = (b * s + i) * h + n * d;
            ctx[dst..dst + d].copy_from_slice(&block[i * d..(i + 1) * d]);
        }
    }
    Ok((CpuStorage::F32(ctx), Shape::from((spec.batch * s, h))))
}

struct Backward(AttentionSpec);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (qkv, dout) = qkv_and_grad(spec, (s1, l1), (s2, l2))?;
        let (dqkv, _) = backward_cpu(spec, qkv, dout, None);
        Ok((CpuStorage::F32(dqkv), Shape::from((spec.batch * spec.seq, 3 * spec.hidden()))))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "fused-attention-bias-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (qkv, dout) = qkv_and_grad(spec, (s1, l1), (s3, l3))?;
        let (mut packed, dbias) = backward_cpu(spec, qkv, dout, Some(bias_slice(s2, l2)?));
        packed.extend(dbias.unwrap_or_default());
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// The packed `[q | k | v]` and the context's gradient, as slices of their storages.
fn qkv_and_grad<'a>(
    spec: &AttentionSpec,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (a0, a1) = spec.check(l1, 3 * spec.hidden())?;
    let (g0, g1) = spec.check(l2, spec.hidden())?;
    let (CpuStorage::F32(qkv), CpuStorage::F32(dout)) = (s1, s2) else {
        candle_core::bail!("fused attention: f32 only")
    };
    Ok((&qkv[a0..a1], &dout[g0..g1]))
}

/// dqkv, and with a bias, its gradient (`[heads, seq, seq]`, summed over the batch).
fn backward_cpu(spec: &AttentionSpec, qkv: &[f32], dout: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Option<Vec<f32>>) {
    let (s, d, h) = (spec.seq, spec.head_dim, spec.hidden());
    let scale = spec.scale();
    let at = |t: usize, part: usize, n: usize| spec_row(spec, t) + part * h + n * d;
    // Per (example, head): dq, dk, dv blocks of [seq × head_dim], and the scores' gradient when there is a
    // bias.
    let blocks: Vec<([Vec<f32>; 3], Vec<f32>)> = (0..spec.batch * spec.heads)
        .into_par_iter()
        .map(|bn| {
            let (b, n) = (bn / spec.heads, bn % spec.heads);
            let mut dq = vec![0f32; s * d];
            let mut dk = vec![0f32; s * d];
            let mut dv = vec![0f32; s * d];
            let mut p = vec![0f32; s];
            let mut dp = vec![0f32; s];
            let mut dscores = vec![0f32; if bias.is_some() { s * s } else { 0 }];
            for i in 0..s {
                probs_row(spec, qkv, b, n, i, bias_row(spec, bias, n, i), &mut p);
                let drop = dropout_row(spec, b, n, i);
                let go = &dout[(b * s + i) * h + n * d..(b * s + i) * h + (n + 1) * d];
                for j in 0..s {
                    let v = at(b * s + j, 2, n);
                    let kept = drop.map_or(1.0, |m| m[j]);
                    // dV_j += p'_ij dO_i; dP_ij = (dO_i · v_j) * dropout_ij
                    axpy(p[j] * kept, go, &mut dv[j * d..(j + 1) * d]);
                    dp[j] = dot(go, &qkv[v..v + d]) * kept;
                }
                // Softmax backward: dS_ij = p_ij (dP_ij - Σ_k p_ik dP_ik).
                let inner: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                let q = at(b * s + i, 0, n);
                for j in 0..s {
                    let raw = p[j] * (dp[j] - inner);
                    if !dscores.is_empty() {
                        dscores[i * s + j] = raw;
                    }
                    let ds = raw * scale;
                    if ds == 0.0 {
                        continue;
                    }
                    let k = at(b * s + j, 1, n);
                    axpy(ds, &qkv[k..k + d], &mut dq[i * d..(i + 1) * d]);
                    axpy(ds, &qkv[q..q + d], &mut dk[j * d..(j + 1) * d]);
                }
            }
            ([dq, dk, dv], dscores)
        })
        .collect();
    let mut dqkv = vec![0f32; spec.batch * s * 3 * h];
    let mut dbias = bias.map(|_| vec![0f32; spec.heads * s * s]);
    for (bn, (parts, dscores)) in blocks.iter().enumerate() {
        let (b, n) = (bn / spec.heads, bn % spec.heads);
        for (part, block) in parts.iter().enumerate() {
            for i in 0..s {
                let dst = at(b * s + i, part, n);
                dqkv[dst..dst + d].copy_from_slice(&block[i * d..(i + 1) * d]);
            }
        }
        if let Some(dbias) = &mut dbias {
            dbias[n * s * s..(n + 1) * s * s].iter_mut().zip(dscores).for_each(|(a, g)| *a += g);
        }
    }
    (dqkv, dbias)
}

fn spec_row(spec: &AttentionSpec, token: usize) -> usize {
    token * 3 * spec.hidden()
}

/// The same computation from composed candle ops (differentiable through candle's autograd), with `bias`
/// (`[heads, seq, seq]`, MPNet's relative position bias) added to the scaled scores where given.
pub fn composed(qkv: &Tensor, spec: &AttentionSpec, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, s, nh, d, h) = (spec.batch, spec.seq, spec.heads, spec.head_dim, spec.hidden());
    let heads = |part: usize| -> Result<Tensor> {
        Ok(qkv.narrow(1, part * h, h)?.reshape((b, s, nh, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
    let mask = match spec.window {
        None => {
            let keep: Vec<f32> = spec.key_mask.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }).collect();
            Tensor::from_vec(keep, (b, 1, 1, s), qkv.device())?
        }
        Some(w) => {
            let keep: Vec<f32> = (0..b)
                .flat_map(|e| {
                    let keys = &spec.key_mask[e * s..(e + 1) * s];
                    (0..s).flat_map(move |i| {
                        (0..s).map(move |j| if keys[j] == 0 || i.abs_diff(j) > w { f32::MIN } else { 0.0 })
                    })
                })
                .collect();
            Tensor::from_vec(keep, (b, 1, s, s), qkv.device())?
        }
    };
    let mut scores = (q.matmul(&k.t()?)? * f64::from(spec.scale()))?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let scores = scores.broadcast_add(&mask)?;
    let mut probs = softmax_last(&scores)?;
    if let Some(drop) = &spec.dropout {
        probs = (probs * Tensor::from_slice(drop.as_slice(), (b, nh, s, s), qkv.device())?)?;
    }
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h))?)
}

/// Attention whose keys and values start with a prefix of `length` learned positions (prefix tuning):
/// `prefix_k` and `prefix_v` are `[batch, length, hidden]`, every query attends to them, and no mask hides them.
/// `spec.dropout`, if any, is `batch × heads × seq × (length + seq)`. Composed candle ops.
pub fn with_prefix(qkv: &Tensor, prefix_k: &Tensor, prefix_v: &Tensor, spec: &AttentionSpec) -> Result<Tensor> {
    let (b, s, nh, d, h) = (spec.batch, spec.seq, spec.heads, spec.head_dim, spec.hidden());
    let l = prefix_k.dim(1)?;
    let heads =
        |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, n, nh, d))?.transpose(1, 2)?.contiguous()?) };
    let own = |part: usize| -> Result<Tensor> { heads(&qkv.narrow(1, part * h, h)?, s) };
    let q = own(0)?;
    let k = Tensor::cat(&[heads(prefix_k, l)?, own(1)?], 2)?;
    let v = Tensor::cat(&[heads(prefix_v, l)?, own(2)?], 2)?;
    let keep: Vec<f32> = (0..b)
        .flat_map(|e| {
            let mask = &spec.key_mask[e * s..(e + 1) * s];
            std::iter::repeat_n(0.0, l).chain(mask.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }))
        })
        .collect();
    let mask = Tensor::from_vec(keep, (b, 1, 1, l + s), qkv.device())?;
    let scores = (q.matmul(&k.t()?)? * f64::from(spec.scale()))?.broadcast_add(&mask)?;
    let mut probs = softmax_last(&scores)?;
    if let Some(drop) = &spec.dropout {
        probs = (probs * Tensor::from_slice(drop.as_slice(), (b, nh, s, l + s), qkv.device())?)?;
    }
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>()).expect("same shapes")
    }

    /// Fused and composed attention agree in value and in gradient, over odd shapes, padding, a fully padded
    /// example, dropout, and a sliding window.
    #[test]
    fn fused_matches_composed() -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (batch, seq, heads, head_dim, with_dropout, window) in [
            (1, 1, 1, 8, false, None),
            (2, 5, 3, 7, false, None),
            (3, 9, 2, 16, true, None),
            (2, 17, 4, 33, true, None),
            (3, 9, 2, 16, false, Some(2)),
            (2, 17, 4, 33, true, Some(4)),
        ] {
            let h = heads * head_dim;
            let mut key_mask: Vec<u32> = (0..batch * seq).map(|i| u32::from(i % seq < seq - (i / seq) % 3)).collect();
            if batch > 2 {
                key_mask[seq..2 * seq].fill(0); // a fully padded example
            }
            let dropout = with_dropout.then(|| {
                Arc::new(
                    (0..batch * heads * seq * seq).map(|_| if rng.gen::<f32>() < 0.2 { 0.0 } else { 1.25 }).collect(),
                )
            });
            let spec = AttentionSpec { batch, seq, heads, head_dim, key_mask: Arc::new(key_mask), dropout, window };
            let data: Vec<f32> = (0..batch * seq * 3 * h).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let qkv = Var::from_vec(data, (batch * seq, 3 * h), &Device::Cpu)?;
            let weights = Tensor::from_vec(
                (0..batch * seq * h).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
                (batch * seq, h),
                &Device::Cpu,
            )?;
            let a = fused(qkv.as_tensor(), spec.clone())?;
            let b = composed(qkv.as_tensor(), &spec, None)?;
            assert!(max_diff(&a, &b) < 1e-5, "values differ by {}", max_diff(&a, &b));
            let ga = (a * &weights)?.sum_all()?.backward()?;
            let gb = (b * &weights)?.sum_all()?.backward()?;
            let (ga, gb) = (ga.get(qkv.as_tensor()).expect("grad"), gb.get(qkv.as_tensor()).expect("grad"));
            assert!(
                max_diff(ga, gb) < 1e-4,
                "gradients differ by {} for {batch}x{seq}x{heads}x{head_dim}",
                max_diff(ga, gb)
            );
            // With an additive bias per head (MPNet's relative positions): the same, and the bias's gradient.
            let bias = Var::from_vec(
                (0..heads * seq * seq).map(|_| rng.gen_range(-1.5f32..1.5)).collect(),
                (heads, seq, seq),
                &Device::Cpu,
            )?;
            let a = fused_with_bias(qkv.as_tensor(), bias.as_tensor(), spec.clone())?;
            let b = composed(qkv.as_tensor(), &spec, Some(bias.as_tensor()))?;
            assert!(max_diff(&a, &b) < 1e-5, "values with a bias differ by {}", max_diff(&a, &b));
            let ga = (a * &weights)?.sum_all()?.backward()?;
            let gb = (b * &weights)?.sum_all()?.backward()?;
            for (what, var) in [("qkv", &qkv), ("bias", &bias)] {
                let (x, y) = (ga.get(var.as_tensor()).expect("grad"), gb.get(var.as_tensor()).expect("grad"));
                assert!(max_diff(x, y) < 1e-4, "{what} gradients with a bias differ by {}", max_diff(x, y));
            }
        }
        Ok(())
    }
}
