//! Fused CPU kernels of the Llama decoder, each with its hand-written backward pass: RMSNorm, the SwiGLU gate
//! (`silu(gate) · up`), and causal grouped-query attention with rotary position embeddings and padding.
//!
//! Composed from candle ops, RMSNorm takes six tensor ops forward and about fifteen backward, SwiGLU four and
//! eight, and attention (rotation, repeated key/value heads, scores, mask, softmax, context) some thirty, each
//! allocating a full tensor and most running on one thread. Each kernel here is one pass, in parallel over row
//! chunks or over (example, key/value head) pairs. Attention keeps nothing for backward but its inputs: the
//! probabilities are recomputed per head (a small product beside the projections), so memory does not grow with
//! `heads × seq²` per layer. `crate::llama` composes the same computations from candle ops on other devices,
//! and `llama_tests.rs` checks values and every gradient against that composed form.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, Threads, View, ViewMut};
use super::math::{self, simd};
use crate::Result;

const ROWS_PER_TASK: usize = 32;

/// A 2-D f32 input read in place: `rows` rows of `cols` values starting every `stride` values (a column block
/// of a wider matrix, as `narrow` leaves it, needs no copy).
struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Rows<'_> {
    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.stride..i * self.stride + self.cols]
    }

    fn view(&self, first: usize, rows: usize, col: usize, cols: usize) -> View<'_> {
        View::strided(&self.data[first * self.stride + col..], rows, cols, self.stride)
    }
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Rows<'a>> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    let [rows, cols] = l.dims() else { candle_core::bail!("{what}: a 2-D input expected, got {:?}", l.dims()) };
    let (rows, cols) = (*rows, *cols);
    let st = l.stride();
    if cols > 1 && st[1] != 1 {
        candle_core::bail!("{what}: the rows must be contiguous")
    }
    let stride = if rows > 1 { st[0] } else { cols };
    if rows > 1 && stride < cols {
        candle_core::bail!("{what}: overlapping rows")
    }
    let start = l.start_offset();
    let len = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * stride + cols };
    if start + len > data.len() {
        candle_core::bail!("{what}: the layout runs past the data")
    }
    Ok(Rows { data: &data[start..start + len], rows, cols, stride })
}

/// [`rows`] of a tensor's storage (inside a backward pass).
fn with_rows<R>(t: &Tensor, what: &str, f: impl FnOnce(Rows<'_>) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*s else { candle_core::bail!("{what}: CPU tensors only") };
    f(rows(cpu, l, what)?)
}

/// RMSNorm over the last dimension of `x` (`[rows, dim]`): `x / sqrt(mean(x²) + eps) · (offset + weight)`
/// (`offset` 0 for Llama; 1 for Gemma, whose weights are offsets from 1).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f32) -> Result<Tensor> {
    Ok(x.apply_op2(weight, RmsNorm { eps: eps as f32, offset })?)
}

struct RmsNorm {
    eps: f32,
    offset: f32,
}

#[inline(always)]
fn rms_inv(x: &[f32], eps: f32) -> f32 {
    1.0 / (math::dot(x, x) / x.len() as f32 + eps).sqrt()
}

fn check_width(x: &Rows<'_>, w: &[f32], what: &str) -> candle_core::Result<()> {
    if x.cols != w.len() {
        candle_core::bail!("{what}: rows of {} values, a weight of {}", x.cols, w.len())
    }
    Ok(())
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = rows(s1, l1, self.name())?;
        let w = super::contiguous(s2, l2, self.name())?;
        check_width(&x, w, self.name())?;
        let d = x.cols;
        let mut y = vec![0f32; x.rows * d];
        y.par_chunks_mut(d * ROWS_PER_TASK).enumerate().for_each(|(c, out)| {
            simd(
                #[inline(always)]
                || {
                    for (i, y) in out.chunks_exact_mut(d).enumerate() {
                        let x = x.row(c * ROWS_PER_TASK + i);
                        let r = rms_inv(x, self.eps);
                        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                            *y = x * r * (w + self.offset);
                        }
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), Shape::from((x.rows, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = with_rows(x, self.name(), |x| {
            with_rows(&grad, self.name(), |g| {
                // The input's gradient goes through the scale actually applied; the weight's does not depend on it.
                let wv: Vec<f32> = w.flatten_all()?.to_vec1::<f32>()?.iter().map(|w| w + self.offset).collect();
                check_width(&x, &wv, self.name())?;
                Ok(rms_norm_backward(&x, &wv, &g, self.eps))
            })
        })?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dx, dweight)`: `dx = r (g∘w) − x r³ mean((g∘w)∘x)` per row, `dweight = Σ_rows g ∘ x r`.
fn rms_norm_backward(x: &Rows<'_>, w: &[f32], g: &Rows<'_>, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = x.cols;
    let mut dx = vec![0f32; x.rows * d];
    // Each task returns its partial dweight; they are added in task order (deterministic).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .map(|(c, out)| {
            let mut dw = vec![0f32; d];
            simd(
                #[inline(always)]
                || {
                    for (i, dx) in out.chunks_exact_mut(d).enumerate() {
                        let (x, g) = (x.row(c * ROWS_PER_TASK + i), g.row(c * ROWS_PER_TASK + i));
                        let r = rms_inv(x, eps);
                        let mean = math::dot3(g, w, x) / d as f32;
                        let k = r * r * r * mean;
                        for j in 0..d {
                            dx[j] = r * g[j] * w[j] - x[j] * k;
                            dw[j] += g[j] * x[j] * r;
                        }
                    }
                },
            );
            dw
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in &partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

/// The gate activation of a feed-forward block, `act(gate) ∘ up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama's SwiGLU).
    Silu,
    /// GELU with the tanh approximation (transformers' `gelu_pytorch_tanh`; Gemma's GeGLU).
    GeluTanh,
}

impl Activation {
    /// `(act(x), act'(x))`.
    #[inline(always)]
    fn with_grad(self, x: f32) -> (f32, f32) {
        match self {
            Self::Silu => {
                let s = sigmoid(x);
                (x * s, s * (1.0 + x * (1.0 - s)))
            }
            Self::GeluTanh => {
                const C: f32 = 0.797_884_6; // √(2/π)
                const A: f32 = 0.044_715;
                let u = C * (x + A * x * x * x);
                // tanh(u) = 1 − 2 / (e^(2u) + 1), exact at both ends (e^(2u) saturates to 0 or a huge value).
                let t = 1.0 - 2.0 / (math::exp(2.0 * u) + 1.0);
                (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x * x))
            }
        }
    }
}

/// The gated feed-forward activation `act(gate) ∘ up` of two `[rows, intermediate]` inputs (SwiGLU for Llama,
/// GeGLU with tanh-approximate GELU for Gemma).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(gate.apply_op2(up, Gated { act })?)
}

struct Gated {
    act: Activation,
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + math::exp(-x))
}

fn same_shape(a: &Rows<'_>, b: &Rows<'_>, what: &str) -> candle_core::Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        candle_core::bail!("{what}: inputs of {}×{} and {}×{}", a.rows, a.cols, b.rows, b.cols)
    }
    Ok(())
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, u) = (rows(s1, l1, self.name())?, rows(s2, l2, self.name())?);
        same_shape(&a, &u, self.name())?;
        let d = a.cols;
        let mut y = vec![0f32; a.rows * d];
        y.par_chunks_mut(d * ROWS_PER_TASK).enumerate().for_each(|(c, out)| {
            simd(
                #[inline(always)]
                || {
                    for (i, y) in out.chunks_exact_mut(d).enumerate() {
                        let r = c * ROWS_PER_TASK + i;
                        for ((y, &a), &u) in y.iter_mut().zip(a.row(r)).zip(u.row(r)) {
                            *y = self.act.with_grad(a).0 * u;
                        }
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), Shape::from((a.rows, d))))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (da, du) = with_rows(gate, self.name(), |a| {
            with_rows(up, self.name(), |u| {
                with_rows(&grad, self.name(), |g| {
                    same_shape(&a, &u, self.name())?;
                    same_shape(&a, &g, self.name())?;
                    let d = a.cols;
                    let (mut da, mut du) = (vec![0f32; a.rows * d], vec![0f32; a.rows * d]);
                    da.par_chunks_mut(d * ROWS_PER_TASK)
                        .zip(du.par_chunks_mut(d * ROWS_PER_TASK))
                        .enumerate()
                        .for_each(|(c, (da, du))| {
                            simd(
                                #[inline(always)]
                                || {
                                    for (i, (da, du)) in da.chunks_exact_mut(d).zip(du.chunks_exact_mut(d)).enumerate()
                                    {
                                        let r = c * ROWS_PER_TASK + i;
                                        let (a, u, g) = (a.row(r), u.row(r), g.row(r));
                                        for j in 0..d {
                                            let (act, grad) = self.act.with_grad(a[j]);
                                            du[j] = g[j] * act;
                                            da[j] = g[j] * u[j] * grad;
                                        }
                                    }
                                },
                            )
                        });
                    Ok((da, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(da, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// Softmax of each row of `cols` scores in place, where `masked(i, j)` hides key `j` from query `i`: as the
/// composed form's additive bias, a row whose keys are all masked comes out uniform.
pub(crate) fn masked_softmax(p: &mut [f32], cols: usize, masked: impl Fn(usize, usize) -> bool) {
    simd(
        #[inline(always)]
        || {
            for (i, row) in p.chunks_exact_mut(cols).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    if masked(i, j) {
                        *x = f32::MIN;
                    }
                }
                let max = math::max(row);
                for x in row.iter_mut() {
                    *x = math::exp(*x - max);
                }
                let inv = 1.0 / math::sum(row);
                for x in row.iter_mut() {
                    *x *= inv;
                }
            }
        },
    );
}

/// Per-(row, head) blocks of `s × d` context into `[rows · s, heads · d]`.
fn scatter_heads(blocks: &[Vec<f32>], rows: usize, s: usize, heads: usize, d: usize) -> Vec<f32> {
    let width = heads * d;
    let mut ctx = vec![0f32; rows * s * width];
    ctx.par_chunks_mut(s * width).enumerate().for_each(|(r, out)| {
        for head in 0..heads {
            let block = &blocks[r * heads + head];
            for i in 0..s {
                out[i * width + head * d..][..d].copy_from_slice(&block[i * d..(i + 1) * d]);
            }
        }
    });
    ctx
}

/// The rotary tables of every position, `[positions × head_dim]` each, row-major (see `crate::llama`).
#[derive(Debug)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
}

impl RopeTables {
    /// Rotates `x` (one head, `head_dim` values) to position `p`: `x cos + rotate_half(x) sin`.
    #[inline(always)]
    pub(crate) fn rotate(&self, x: &[f32], p: usize, out: &mut [f32]) {
        let d = self.head_dim;
        let h = d / 2;
        let (c, s) = (&self.cos[p * d..(p + 1) * d], &self.sin[p * d..(p + 1) * d]);
        for i in 0..h {
            out[i] = x[i] * c[i] - x[i + h] * s[i];
            out[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
        }
    }

    /// The gradient of [`RopeTables::rotate`]'s input from its output's gradient `g` (the transposed rotation).
    #[inline(always)]
    fn unrotate(&self, g: &[f32], p: usize, out: &mut [f32]) {
        let d = self.head_dim;
        let h = d / 2;
        let (c, s) = (&self.cos[p * d..(p + 1) * d], &self.sin[p * d..(p + 1) * d]);
        for i in 0..h {
            out[i] = g[i] * c[i] + g[i + h] * s[i + h];
            out[i + h] = g[i + h] * c[i + h] - g[i] * s[i];
        }
    }
}

/// Causal grouped-query self-attention of a batch of `batch` rows of `seq` tokens: rotary embeddings on the
/// queries and keys at each token's position, each key/value head serving `heads / kv_heads` query heads,
/// keys that are padding (mask 0) or in the future masked out.
#[derive(Clone, Debug)]
pub struct CausalAttention {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each token's rotary position, `batch × seq`.
    pub positions: Arc<Vec<u32>>,
    /// 1 for a real token, 0 for padding, `batch × seq`.
    pub mask: Arc<Vec<u32>>,
    pub rope: Arc<RopeTables>,
    /// The scores' scale (`1/√head_dim` in Llama).
    pub scale: f32,
    /// A sliding window: query `i` sees keys `i − window < j ≤ i` only.
    pub window: Option<usize>,
}

impl CausalAttention {
    /// The context `[batch · seq, heads · head_dim]` of queries `[batch · seq, heads · head_dim]` and keys and
    /// values `[batch · seq, kv_heads · head_dim]`, before rotation.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(q.apply_op3(k, v, self.clone())?)
    }

    fn check(&self, q: &Rows<'_>, k: &Rows<'_>, v: &Rows<'_>) -> candle_core::Result<()> {
        let n = self.batch * self.seq;
        let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        if q.rows != n || k.rows != n || v.rows != n || q.cols != qw || k.cols != kw || v.cols != kw {
            candle_core::bail!(
                "fused attention: q {}×{}, k {}×{}, v {}×{} for {n} tokens, {qw} query and {kw} key columns",
                q.rows,
                q.cols,
                k.rows,
                k.cols,
                v.rows,
                v.cols
            )
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) || !self.head_dim.is_multiple_of(2) {
            candle_core::bail!("fused attention: {} heads over {} key/value heads", self.heads, self.kv_heads)
        }
        if self.positions.len() != n || self.mask.len() != n || self.rope.head_dim != self.head_dim {
            candle_core::bail!("fused attention: positions, mask or rotary tables do not match the batch")
        }
        let max = self.positions.iter().max().map_or(0, |&p| p as usize + 1);
        if max * self.head_dim > self.rope.cos.len() {
            candle_core::bail!("fused attention: position {} is past the rotary tables", max - 1)
        }
        Ok(())
    }

    /// One head's rows of `x` (columns `head · head_dim ..`) for example `b`, rotated to their positions.
    fn rotated(&self, x: &Rows<'_>, b: usize, head: usize) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let mut out = vec![0f32; s * d];
        for i in 0..s {
            let t = b * s + i;
            self.rope.rotate(
                &x.row(t)[head * d..(head + 1) * d],
                self.positions[t] as usize,
                &mut out[i * d..(i + 1) * d],
            );
        }
        out
    }

    /// The attention probabilities `[seq × seq]` of rotated query and key blocks of example `b`.
    fn probs(&self, q: &[f32], k: &[f32], b: usize) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let mut p = vec![0f32; s * s];
        matmul(ViewMut::new(&mut p, s, s), View::new(q, s, d), View::new(k, s, d).t(), self.scale, false, Threads::One);
        let mask = &self.mask[b * s..(b + 1) * s];
        let window = self.window.unwrap_or(usize::MAX);
        masked_softmax(&mut p, s, |i, j| j > i || mask[j] == 0 || i - j >= window);
        p
    }

    /// `(dq, dk, dv)` from the output's gradient `g` (`[batch · seq, heads · head_dim]`).
    fn backward(&self, q: &Rows<'_>, k: &Rows<'_>, v: &Rows<'_>, g: &Rows<'_>) -> [Vec<f32>; 3] {
        let (s, d, nh, kvh) = (self.seq, self.head_dim, self.heads, self.kv_heads);
        let groups = nh / kvh;
        let scale = self.scale;
        // One task per (example, key/value head): its query heads' gradients and its own key and value's.
        let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..self.batch * kvh)
            .into_par_iter()
            .map(|task| {
                let (b, kv) = (task / kvh, task % kvh);
                let kr = self.rotated(k, b, kv);
                let vv = v.view(b * s, s, kv * d, d);
                let (mut dq, mut dk, mut dv) = (vec![0f32; groups * s * d], vec![0f32; s * d], vec![0f32; s * d]);
                let mut ds = vec![0f32; s * s];
                let mut dq_rot = vec![0f32; s * d];
                for n in 0..groups {
                    let head = kv * groups + n;
                    let qr = self.rotated(q, b, head);
                    let p = self.probs(&qr, &kr, b);
                    let dout = g.view(b * s, s, head * d, d);
                    // dV += Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − rowsum(P ∘ dP)).
                    matmul(ViewMut::new(&mut dv, s, d), View::new(&p, s, s).t(), dout, 1.0, n > 0, Threads::One);
                    matmul(ViewMut::new(&mut ds, s, s), dout, vv.t(), 1.0, false, Threads::One);
                    simd(
                        #[inline(always)]
                        || {
                            for (row, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                                let inner = math::dot(row, pr);
                                for (x, p) in row.iter_mut().zip(pr) {
                                    *x = p * (*x - inner);
                                }
                            }
                        },
                    );
                    // S = scale · Q Kᵀ: dQ = scale · dS K, dK += scale · dSᵀ Q (both rotated).
                    matmul(
                        ViewMut::new(&mut dq_rot, s, d),
                        View::new(&ds, s, s),
                        View::new(&kr, s, d),
                        scale,
                        false,
                        Threads::One,
                    );
                    matmul(
                        ViewMut::new(&mut dk, s, d),
                        View::new(&ds, s, s).t(),
                        View::new(&qr, s, d),
                        scale,
                        n > 0,
                        Threads::One,
                    );
                    let dq = &mut dq[n * s * d..(n + 1) * s * d];
                    for i in 0..s {
                        let p = self.positions[b * s + i] as usize;
                        self.rope.unrotate(&dq_rot[i * d..(i + 1) * d], p, &mut dq[i * d..(i + 1) * d]);
                    }
                }
                let mut dk_in = vec![0f32; s * d];
                for i in 0..s {
                    let p = self.positions[b * s + i] as usize;
                    self.rope.unrotate(&dk[i * d..(i + 1) * d], p, &mut dk_in[i * d..(i + 1) * d]);
                }
                (dq, dk_in, dv)
            })
            .collect();
        let n = self.batch * s;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * nh * d], vec![0f32; n * kvh * d], vec![0f32; n * kvh * d]);
        for (task, (bq, bk, bv)) in blocks.iter().enumerate() {
            let (b, kv) = (task / kvh, task % kvh);
            for i in 0..s {
                let t = b * s + i;
                for m in 0..groups {
                    let head = kv * groups + m;
                    dq[t * nh * d + head * d..][..d].copy_from_slice(&bq[(m * s + i) * d..][..d]);
                }
                dk[t * kvh * d + kv * d..][..d].copy_from_slice(&bk[i * d..][..d]);
                dv[t * kvh * d + kv * d..][..d].copy_from_slice(&bv[i * d..][..d]);
            }
        }
        [dq, dk, dv]
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
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
        let (q, k, v) = (rows(s1, l1, self.name())?, rows(s2, l2, self.name())?, rows(s3, l3, self.name())?);
        self.check(&q, &k, &v)?;
        let (s, d, nh) = (self.seq, self.head_dim, self.heads);
        let groups = nh / self.kv_heads;
        let blocks: Vec<Vec<f32>> = (0..self.batch * nh)
            .into_par_iter()
            .map(|task| {
                let (b, head) = (task / nh, task % nh);
                let kv = head / groups;
                let p = self.probs(&self.rotated(&q, b, head), &self.rotated(&k, b, kv), b);
                let mut out = vec![0f32; s * d];
                matmul(
                    ViewMut::new(&mut out, s, d),
                    View::new(&p, s, s),
                    v.view(b * s, s, kv * d, d),
                    1.0,
                    false,
                    Threads::One,
                );
                out
            })
            .collect();
        let width = nh * d;
        let ctx = scatter_heads(&blocks, self.batch, s, nh, d);
        Ok((CpuStorage::F32(ctx), Shape::from((self.batch * s, width))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let [dq, dk, dv] = with_rows(q, self.name(), |qr| {
            with_rows(k, self.name(), |kr| {
                with_rows(v, self.name(), |vr| with_rows(&grad, self.name(), |g| Ok(self.backward(&qr, &kr, &vr, &g))))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

/// The keys (rotated) and values of every layer on the host, for batched decoding that records nothing for
/// backward: each layer holds `rows × kv_heads × capacity × head_dim` values of each, written in place as
/// tokens come (no copy of the whole cache per token, as concatenating tensors does).
#[derive(Debug)]
pub struct DecodeCache {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rows: usize,
    capacity: usize,
    len: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// `rows × capacity`: 1 where a cached position is a real token, 0 for padding.
    real: Vec<u8>,
    /// Each row's rotary position for its next real token.
    next: Vec<u32>,
}

impl DecodeCache {
    pub fn new(layers: usize, heads: usize, kv_heads: usize, head_dim: usize, rows: usize, capacity: usize) -> Self {
        let size = rows * kv_heads * capacity * head_dim;
        Self {
            heads,
            kv_heads,
            head_dim,
            rows,
            capacity,
            len: 0,
            layers: (0..layers).map(|_| (vec![0f32; size], vec![0f32; size])).collect(),
            real: vec![0; rows * capacity],
            next: vec![0; rows],
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Layers, query heads, key/value heads and head size it was made for.
    pub fn geometry(&self) -> (usize, usize, usize, usize) {
        (self.layers.len(), self.heads, self.kv_heads, self.head_dim)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The rotary position of each of `s` new tokens per row (`mask`: 1 for a real token): the count of real
    /// tokens before it in its row.
    pub fn positions(&self, mask: &[u32], s: usize) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.rows * s);
        for r in 0..self.rows {
            let mut next = self.next[r];
            for i in 0..s {
                let real = mask[r * s + i] != 0;
                positions.push(if real { next } else { 0 });
                next += u32::from(real);
            }
        }
        positions
    }

    /// Attention of layer `layer` for `s` new tokens per row: queries `[rows · s, heads · head_dim]`, keys and
    /// values `[rows · s, kv_heads · head_dim]` before rotation. The new keys and values join the cache; each
    /// query sees the cached real tokens and the new real ones up to itself. Returns the context, `[rows · s,
    /// heads · head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: usize,
        positions: &[u32],
        mask: &[u32],
        rope: &RopeTables,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (nh, kvh, d, cap, past) = (self.heads, self.kv_heads, self.head_dim, self.capacity, self.len);
        assert!(past + s <= cap, "decode cache: {past} + {s} positions exceed its capacity {cap}");
        let (kc, vc) = &mut self.layers[layer];
        // The new keys (rotated) and values into their rows' blocks.
        kc.par_chunks_mut(kvh * cap * d).zip(vc.par_chunks_mut(kvh * cap * d)).enumerate().for_each(|(r, (kr, vr))| {
            for i in 0..s {
                let t = r * s + i;
                for g in 0..kvh {
                    let at = (g * cap + past + i) * d;
                    rope.rotate(&k[t * kvh * d + g * d..][..d], positions[t] as usize, &mut kr[at..at + d]);
                    vr[at..at + d].copy_from_slice(&v[t * kvh * d + g * d..][..d]);
                }
            }
        });
        let (kc, vc) = (&*kc, &*vc);
        let groups = nh / kvh;
        let total = past + s;
        let window = window.unwrap_or(usize::MAX);
        let real = &self.real;
        let blocks: Vec<Vec<f32>> = (0..self.rows * nh)
            .into_par_iter()
            .map(|task| {
                let (r, head) = (task / nh, task % nh);
                let g = head / groups;
                let mut qr = vec![0f32; s * d];
                for i in 0..s {
                    let t = r * s + i;
                    rope.rotate(&q[t * nh * d + head * d..][..d], positions[t] as usize, &mut qr[i * d..(i + 1) * d]);
                }
                let base = (r * kvh + g) * cap * d;
                let (keys, values) = (View::new(&kc[base..], total, d), View::new(&vc[base..], total, d));
                let mut p = vec![0f32; s * total];
                matmul(ViewMut::new(&mut p, s, total), View::new(&qr, s, d), keys.t(), scale, false, Threads::One);
                let key_real = |j: usize| if j < past { real[r * cap + j] != 0 } else { mask[r * s + j - past] != 0 };
                masked_softmax(&mut p, total, |i, j| j > past + i || !key_real(j) || past + i - j >= window);
                let mut out = vec![0f32; s * d];
                matmul(ViewMut::new(&mut out, s, d), View::new(&p, s, total), values, 1.0, false, Threads::One);
                out
            })
            .collect();
        scatter_heads(&blocks, self.rows, s, nh, d)
    }

    /// Ends a step of `s` new tokens per row (after every layer attended): they count as cached.
    pub fn advance(&mut self, mask: &[u32], s: usize) {
        for r in 0..self.rows {
            for i in 0..s {
                let real = mask[r * s + i] != 0;
                self.real[r * self.capacity + self.len + i] = u8::from(real);
                self.next[r] += u32::from(real);
            }
        }
        self.len += s;
    }

    /// A cache of one row copied into `rows` rows: a prefix that every prompt of a batch shares is computed
    /// once and then continued by each prompt's own tokens.
    pub fn broadcast(&mut self, rows: usize) {
        assert_eq!(self.rows, 1, "only a cache of one row is broadcast");
        for (k, v) in &mut self.layers {
            *k = k.repeat(rows);
            *v = v.repeat(rows);
        }
        self.real = self.real.repeat(rows);
        self.next = vec![self.next[0]; rows];
        self.rows = rows;
    }

    /// Keeps the rows `keep` (increasing indices), dropping the others: finished rows stop costing work.
    pub fn retain(&mut self, keep: &[usize]) {
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]) && keep.last().is_none_or(|&l| l < self.rows),
            "retain: rows {keep:?} must increase and be below {}",
            self.rows
        );
        let block = self.kv_heads * self.capacity * self.head_dim;
        for (k, v) in &mut self.layers {
            for (to, &from) in keep.iter().enumerate() {
                if to != from {
                    k.copy_within(from * block..(from + 1) * block, to * block);
                    v.copy_within(from * block..(from + 1) * block, to * block);
                }
            }
            k.truncate(keep.len() * block);
            v.truncate(keep.len() * block);
        }
        for (to, &from) in keep.iter().enumerate() {
            self.real.copy_within(from * self.capacity..(from + 1) * self.capacity, to * self.capacity);
            self.next[to] = self.next[from];
        }
        self.real.truncate(keep.len() * self.capacity);
        self.next.truncate(keep.len());
        self.rows = keep.len();
    }
}
