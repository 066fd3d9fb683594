//! The row-wise and attention kernels of the fused encoder's layers: projections, LayerNorm with its
//! residual, column sums, dropout masks, softmax and attention forward and backward, each on plain slices.

use rayon::prelude::*;

use super::attention::QkvBias;
use super::*;
use crate::cpu::gemm::{matmul, Threads, View, ViewMut};
use crate::cpu::math::{self, simd};

/// Writes `x Wᵀ + b` into `out` (`rows × out_dim`, row stride `stride`), `w` being `[out_dim, in_dim]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    out: &mut [f32],
    rows: usize,
    in_dim: usize,
    stride: usize,
    bf16: bool,
) {
    let out_dim = b.len();
    if bf16 {
        // The bias is added as the tile unit's results are stored.
        let (dst, x) = (ViewMut::strided(out, rows, out_dim, stride), View::new(x, rows, in_dim));
        return crate::cpu::amx::linear_bf16(dst, x, View::new(w, out_dim, in_dim).t(), b, Threads::All);
    }
    out.par_chunks_mut(stride * ROWS_PER_TASK).for_each(|chunk| {
        simd(
            #[inline(always)]
            || {
                for row in chunk.chunks_mut(stride) {
                    row[..out_dim].copy_from_slice(b);
                }
            },
        )
    });
    matmul(
        ViewMut::strided(out, rows, out_dim, stride),
        View::new(x, rows, in_dim),
        View::new(w, out_dim, in_dim).t(),
        1.0,
        true,
        Threads::All,
    );
}

/// A matrix product in bf16 on AMX when `bf16` (the encoder's `Dims::bf16`), else in f32.
pub(super) fn matmul_in(
    bf16: bool,
    dst: ViewMut<'_>,
    a: View<'_>,
    b: View<'_>,
    scale: f32,
    accumulate: bool,
    threads: Threads,
) {
    match bf16 {
        true => crate::cpu::amx::matmul_bf16(dst, a, b, scale, accumulate, threads),
        false => matmul(dst, a, b, scale, accumulate, threads),
    }
}

/// The query, key and value parameters starting at `first` (`QW` for weights, `QB` for biases), one after the
/// other: the weights stack into `[3h × h]`, the biases into `[3h]`.
pub(super) fn stacked(w: &[&[f32]], first: usize) -> Vec<f32> {
    [w[first], w[first + 2], w[first + 4]].concat()
}

/// The q, k and v biases of a layer's parameters ([`LayerParams`] order).
pub(super) fn qkv_biases<'a>(w: &[&'a [f32]]) -> [&'a [f32]; 3] {
    [w[QB], w[QB + 2], w[QB + 4]]
}

/// `dst[j] += Σ_rows m[row, offset + j]` over rows of `stride` elements, in parallel over blocks of columns
/// (each column's sum is still taken in row order, so the result does not depend on the threads).
pub(super) fn col_sums(m: &[f32], stride: usize, offset: usize, dst: &mut [f32]) {
    const COLUMNS: usize = 64;
    dst.par_chunks_mut(COLUMNS).enumerate().for_each(|(c, d)| {
        let (start, width) = (offset + c * COLUMNS, d.len());
        simd(
            #[inline(always)]
            || {
                for row in m.chunks_exact(stride) {
                    for (d, v) in d.iter_mut().zip(&row[start..start + width]) {
                        *d += v;
                    }
                }
            },
        )
    });
}

/// `y = LayerNorm((branch + bias) ∘ mask + residual)`, keeping the normalised input and 1/σ of each row
/// (`bias` is the projection's that produced `branch`, when that product left it out); inference takes
/// [`add_norm_in_place`].
#[allow(clippy::too_many_arguments)]
#[doc(hidden)] // public for the kernel benchmarks
pub fn add_norm(
    branch: &[f32],
    bias: Option<&[f32]>,
    mask: Option<DropoutMask<'_>>,
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let h = gamma.len();
    let chunk = h * ROWS_PER_TASK;
    // `buffer`: the thread's room for a block's multipliers, drawn here when the mask is a seed (the block stays
    // in cache for the pass).
    let rows = |c: usize, y: &mut [f32], xhat: &mut [f32], rstd: &mut [f32], buffer: &mut Vec<f32>| {
        let mask = mask.map(|m| m.part(c * chunk, y.len(), buffer));
        simd(
            #[inline(always)]
            || {
                let start = c * chunk;
                for (r, y) in y.chunks_exact_mut(h).enumerate() {
                    let xh = &mut xhat[r * h..(r + 1) * h];
                    let at = start + r * h;
                    // Zipped slices rather than indices: the bounds checks kept these loops scalar.
                    let (br, res) = (&branch[at..at + h], &residual[at..at + h]);
                    let terms = xh.iter_mut().zip(br).zip(res);
                    match (bias, mask.map(|m| &m[r * h..(r + 1) * h])) {
                        (Some(b), Some(m)) => {
                            for (((x, &br), &res), (&b, &m)) in terms.zip(b.iter().zip(m)) {
                                *x = (br + b) * m + res;
                            }
                        }
                        (Some(b), None) => {
                            for (((x, &br), &res), &b) in terms.zip(b) {
                                *x = br + b + res;
                            }
                        }
                        (None, Some(m)) => {
                            for (((x, &br), &res), &m) in terms.zip(m) {
                                *x = br * m + res;
                            }
                        }
                        (None, None) => {
                            for ((x, &br), &res) in terms {
                                *x = br + res;
                            }
                        }
                    }
                    let mean = math::sum(xh) / h as f32;
                    let var = math::sum_sq_dev(xh, mean) / h as f32;
                    let rs = 1.0 / (var + eps).sqrt();
                    rstd[r] = rs;
                    for (((x, y), &g), &b) in xh.iter_mut().zip(y.iter_mut()).zip(gamma).zip(beta) {
                        *x = (*x - mean) * rs;
                        *y = *x * g + b;
                    }
                }
            },
        )
    };
    assert_eq!(xhat.len(), y.len(), "add_norm: a normalised input per output");
    y.par_chunks_mut(chunk)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(xhat.par_chunks_mut(chunk))
        .enumerate()
        .for_each_init(Vec::new, |buffer, (c, ((y, rstd), xhat))| rows(c, y, xhat, rstd, buffer));
}

/// [`add_norm`] for inference, in place: `branch ← LayerNorm(branch + bias + residual)`. Writing over the
/// branch, which the next pass reads anyway, spares a destination whose every line the CPU would first have to
/// fetch (a write to memory not in cache reads it first).
pub(super) fn add_norm_in_place(
    branch: &mut [f32],
    bias: Option<&[f32]>,
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let h = gamma.len();
    assert_eq!(branch.len(), residual.len(), "add_norm_in_place: sizes");
    let chunk = h * ROWS_PER_TASK;
    branch.par_chunks_mut(chunk).zip(residual.par_chunks(chunk)).for_each(|(rows, residual)| {
        simd(
            #[inline(always)]
            || {
                for (x, res) in rows.chunks_exact_mut(h).zip(residual.chunks_exact(h)) {
                    match bias {
                        Some(b) => {
                            for ((x, &res), &b) in x.iter_mut().zip(res).zip(b) {
                                *x += b + res;
                            }
                        }
                        None => {
                            for (x, &res) in x.iter_mut().zip(res) {
                                *x += res;
                            }
                        }
                    }
                    let mean = math::sum(x) / h as f32;
                    let var = math::sum_sq_dev(x, mean) / h as f32;
                    let rs = 1.0 / (var + eps).sqrt();
                    for ((x, &g), &b) in x.iter_mut().zip(gamma).zip(beta) {
                        *x = (*x - mean) * rs * g + b;
                    }
                }
            },
        )
    });
}

/// LayerNorm backward: returns the gradient of the normalised input and adds to `dgamma` and `dbeta`.
/// Partial sums are added in chunk order, so the result does not depend on scheduling.
#[doc(hidden)] // public for the kernel benchmarks
pub fn norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    let h = gamma.len();
    let chunk = h * ROWS_PER_TASK;
    let mut dx = pool::take(dy.len());
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(c, dx)| {
            simd(
                #[inline(always)]
                || {
                    let (mut dg, mut db) = (vec![0f32; h], vec![0f32; h]);
                    for (r, dx) in dx.chunks_exact_mut(h).enumerate() {
                        let at = c * chunk + r * h;
                        let (dy, xh) = (&dy[at..at + h], &xhat[at..at + h]);
                        let (sum_g, sum_gx) = (math::dot(dy, gamma), math::dot3(dy, gamma, xh));
                        for (((dg, db), &dy), &xh) in dg.iter_mut().zip(db.iter_mut()).zip(dy).zip(xh) {
                            *dg += dy * xh;
                            *db += dy;
                        }
                        let (mg, mgx, rs) = (sum_g / h as f32, sum_gx / h as f32, rstd[c * ROWS_PER_TASK + r]);
                        for (((dx, &dy), &g), &xh) in dx.iter_mut().zip(dy).zip(gamma).zip(xh) {
                            *dx = rs * (dy * g - mg - xh * mgx);
                        }
                    }
                    (dg, db)
                },
            )
        })
        .collect();
    for (pg, pb) in partials {
        dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    dx
}

pub(super) fn elementwise(a: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    a.par_chunks_mut(1 << 14).enumerate().for_each(|(c, chunk)| {
        simd(
            #[inline(always)]
            || f(chunk, c << 14),
        )
    });
}

/// `u ← gelu(u + bias)` over rows of `width` (the bias added where the product left it out).
pub(super) fn gelu_rows(u: &mut [f32], bias: Option<&[f32]>, width: usize) {
    u.par_chunks_mut(width * ROWS_PER_TASK).for_each(|rows| {
        simd(
            #[inline(always)]
            || {
                for row in rows.chunks_exact_mut(width) {
                    if let Some(b) = bias {
                        for (v, b) in row.iter_mut().zip(b) {
                            *v += b;
                        }
                    }
                    for v in row.iter_mut() {
                        *v = math::gelu(*v);
                    }
                }
            },
        )
    });
}

/// `(g, u) ← (gelu(u + bias), gelu'(u + bias))` over rows of `width`.
pub(super) fn gelu_and_grad_rows(u: &mut [f32], g: &mut [f32], bias: Option<&[f32]>, width: usize) {
    let chunk = width * ROWS_PER_TASK;
    u.par_chunks_mut(chunk).zip(g.par_chunks_mut(chunk)).for_each(|(u, g)| {
        simd(
            #[inline(always)]
            || {
                for (u, g) in u.chunks_exact_mut(width).zip(g.chunks_exact_mut(width)) {
                    if let Some(b) = bias {
                        for (v, b) in u.iter_mut().zip(b) {
                            *v += b;
                        }
                    }
                    for (g, u) in g.iter_mut().zip(u.iter_mut()) {
                        (*g, *u) = math::gelu_and_grad(*u);
                    }
                }
            },
        )
    });
}

/// `x ∘ mask` (in a pooled buffer: [`recycle`] it), or `x` itself (no copy) without dropout; a mask given by its
/// seed is drawn chunk by chunk as it is applied ([`math::fill_dropped`]).
pub(super) fn masked<'a>(x: &'a [f32], mask: Option<DropoutMask<'_>>) -> std::borrow::Cow<'a, [f32]> {
    let Some(mask) = mask else { return std::borrow::Cow::Borrowed(x) };
    let mut out = pool::take(x.len());
    match mask {
        DropoutMask::Seed { seed, p } => math::fill_dropped(seed, p, x, &mut out),
        DropoutMask::Values(m) => elementwise(
            &mut out,
            #[inline(always)]
            |c, start| {
                for ((o, x), m) in c.iter_mut().zip(&x[start..]).zip(&m[start..]) {
                    *o = x * m;
                }
            },
        ),
    }
    std::borrow::Cow::Owned(out)
}

/// Hands a [`masked`] buffer back to the pool.
pub(super) fn recycle(v: std::borrow::Cow<'_, [f32]>) {
    if let std::borrow::Cow::Owned(v) = v {
        pool::give(v);
    }
}

/// Softmax of one row of scaled scores in place, keys at padding set to the most negative float first (as
/// transformers does, so a fully padded row comes out uniform).
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32], key_mask: &[u32]) {
    for (x, &m) in row.iter_mut().zip(key_mask) {
        if m == 0 {
            *x += f32::MIN;
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

/// The probabilities after dropout, `p ∘ m`, in `kept`; `p` itself without dropout.
#[inline(always)]
pub(super) fn dropped<'a>(p: &'a [f32], m: Option<&[f32]>, kept: &'a mut Vec<f32>) -> &'a [f32] {
    match m {
        Some(m) => {
            kept.resize(p.len(), 0.0);
            for ((o, p), m) in kept.iter_mut().zip(p).zip(m) {
                *o = p * m;
            }
            kept
        }
        None => p,
    }
}

/// Dropout multipliers (0 or `1 / (1 - p)`; attention's are `batch × heads × seq × seq`): in memory, or the seed
/// of [`math::mask_of_seed`] they are drawn from, each part drawn where it is read (for attention, each (example,
/// head) its own block), so that no mask is written out and read back twice.
#[derive(Clone, Copy, Debug)]
pub enum DropoutMask<'a> {
    Values(&'a [f32]),
    Seed { seed: u64, p: f32 },
}

impl<'a> DropoutMask<'a> {
    /// The multipliers of (example, head) `bn`, `len` (seq²) of them: a slice of the values, or drawn into `buffer`.
    #[inline(always)]
    pub(super) fn head<'b>(self, bn: usize, len: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        self.part(bn * len, len, buffer)
    }

    /// Multipliers `offset .. offset + len`: a slice of the values, or drawn into `buffer`.
    #[inline(always)]
    pub(super) fn part<'b>(self, offset: usize, len: usize, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Self::Values(m) => &m[offset..offset + len],
            Self::Seed { seed, p } => {
                buffer.resize(len, 0.0);
                math::fill_mask_at(seed, p, offset, buffer);
                buffer
            }
        }
    }
}

/// The softmax's backward pass in place on each row (`s` wide) of `ds`, which holds dO Vᵀ: the dropout
/// multipliers `m` applied, then dS = P ∘ (dP − rowsum(P ∘ dP)).
#[inline(always)]
pub(super) fn softmax_backward_rows(ds: &mut [f32], p: &[f32], m: Option<&[f32]>, s: usize) {
    for (i, row) in ds.chunks_exact_mut(s).enumerate() {
        let pr = &p[i * s..(i + 1) * s];
        if let Some(m) = m {
            for (x, m) in row.iter_mut().zip(&m[i * s..(i + 1) * s]) {
                *x *= m;
            }
        }
        let inner = math::dot(row, pr);
        for (x, p) in row.iter_mut().zip(pr) {
            *x = p * (*x - inner);
        }
    }
}

/// Views of one head's q, k and v rows for one example.
pub(super) fn head_views<'a>(d: &Dims, qkv: &'a [f32], bn: usize) -> [View<'a>; 3] {
    let (s, hd, h) = (d.seq, d.head_dim(), d.hidden);
    let (b, head) = (bn / d.heads, bn % d.heads);
    let base = b * s * 3 * h + head * hd;
    [0, 1, 2].map(|p| View::strided(&qkv[base + p * h..], s, hd, 3 * h))
}

/// Copies per-(example, head) blocks of `seq × head_dim` into their columns of a `tokens × width` matrix.
pub(super) fn scatter_heads<'a>(
    d: &Dims,
    block: impl Fn(usize) -> &'a [f32] + Sync,
    width: usize,
    offset: usize,
    dst: &mut [f32],
) {
    let (s, hd) = (d.seq, d.head_dim());
    dst.par_chunks_mut(s * width).enumerate().for_each(|(b, rows)| {
        for head in 0..d.heads {
            let block = block(b * d.heads + head);
            for i in 0..s {
                let at = i * width + offset + head * hd;
                rows[at..at + hd].copy_from_slice(&block[i * hd..(i + 1) * hd]);
            }
        }
    });
}

#[doc(hidden)] // public for the kernel benchmarks
pub fn attention_forward(
    d: &Dims,
    qkv: &[f32],
    key_mask: &[u32],
    dropout: Option<&[f32]>,
    probs: Option<&mut [f32]>,
) -> Vec<f32> {
    let mut blocks = vec![0f32; d.tokens() * d.hidden];
    let mut ctx = vec![0f32; d.tokens() * d.hidden];
    let dropout = dropout.map(DropoutMask::Values);
    attention_into(d, qkv, None, None, key_mask, dropout, probs, &mut blocks, &mut ctx);
    ctx
}

/// Attention's forward pass into `ctx` (`tokens × hidden`, overwritten), per (example, head): the scaled scores,
/// the masked softmax (kept in `probs` in training), dropout, and the weighted sum of the values, each head's
/// `seq × head_dim` result into its block of `blocks` (same size as `ctx`, overwritten) and from there into its
/// columns of `ctx`. The scores of inference and the dropped-out probabilities live in one buffer per thread.
/// Heads whose size is a multiple of 16 take [`super::attention::attention_fused`], the others the general
/// products of [`attention_general`]; only the latter uses `blocks` (it may be empty otherwise). `bias`: the
/// q|k|v rows lack their biases, for the fused kernel to add ([`super::attention::QkvBias`]; the general path
/// takes rows with their biases only). `pos`: a bias added to every head's scores (`heads × seq × seq`, MPNet's
/// relative positions), where given.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_into(
    d: &Dims,
    qkv: &[f32],
    bias: QkvBias<'_>,
    pos: Option<&[f32]>,
    key_mask: &[u32],
    dropout: Option<DropoutMask<'_>>,
    probs: Option<&mut [f32]>,
    blocks: &mut [f32],
    ctx: &mut [f32],
) {
    if super::attention::fits(d) {
        super::attention::attention_fused(d, qkv, bias, pos, key_mask, dropout, probs, ctx)
    } else {
        assert!(bias.is_none(), "attention: deferred q|k|v biases with heads the fused kernel does not take");
        attention_general(d, qkv, pos, key_mask, dropout, probs, blocks, ctx)
    }
}

/// [`attention_into`] with the general matrix product per (example, head).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_general(
    d: &Dims,
    qkv: &[f32],
    pos: Option<&[f32]>,
    key_mask: &[u32],
    dropout: Option<DropoutMask<'_>>,
    probs: Option<&mut [f32]>,
    blocks: &mut [f32],
    ctx: &mut [f32],
) {
    let (s, hd) = (d.seq, d.head_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    assert!(pos.is_none_or(|p| p.len() == d.heads * s * s), "attention: position bias size");
    let head = |bn: usize, p: &mut [f32], (kept, mask): &mut (Vec<f32>, Vec<f32>), out: &mut [f32]| {
        let [q, k, v] = head_views(d, qkv, bn);
        matmul(ViewMut::new(p, s, s), q, k.t(), scale, false, Threads::One);
        if let Some(pos) = pos {
            let head = bn % d.heads;
            for (x, &b) in p.iter_mut().zip(&pos[head * s * s..(head + 1) * s * s]) {
                *x += b;
            }
        }
        let km = &key_mask[(bn / d.heads) * s..(bn / d.heads + 1) * s];
        simd(
            #[inline(always)]
            || {
                for row in p.chunks_exact_mut(s) {
                    softmax_row(row, km);
                }
            },
        );
        let m = dropout.map(|m| m.head(bn, s * s, mask));
        let weights = simd(
            #[inline(always)]
            || dropped(p, m, kept),
        );
        matmul(ViewMut::new(out, s, hd), View::new(weights, s, s), v, 1.0, false, Threads::One);
    };
    let outs = blocks.par_chunks_mut(s * hd).enumerate();
    match probs {
        Some(probs) => {
            let init = || (Vec::new(), Vec::new());
            outs.zip(probs.par_chunks_mut(s * s))
                .for_each_init(init, |buffers, ((bn, out), p)| head(bn, p, buffers, out))
        }
        None => outs.for_each_init(
            || (vec![0f32; s * s], (Vec::new(), Vec::new())),
            |(p, buffers), (bn, out)| head(bn, p, buffers, out),
        ),
    }
    scatter_heads(d, |bn| &blocks[bn * s * hd..(bn + 1) * s * hd], d.hidden, 0, ctx);
}

/// Attention's backward pass: the gradient of q|k|v (`tokens × 3 · hidden`) from the q|k|v rows, the
/// probabilities the forward pass kept, its dropout multipliers and the gradient of the context. Heads whose
/// size is a multiple of 16 take [`super::attention::attention_backward_fused`], the others
/// [`attention_backward_general`].
#[doc(hidden)] // public for the kernel benchmarks
pub fn attention_backward(d: &Dims, qkv: &[f32], probs: &[f32], dropout: Option<&[f32]>, dctx: &[f32]) -> Vec<f32> {
    attention_backward_biased(d, qkv, None, probs, dropout.map(DropoutMask::Values), dctx, None)
}

/// [`attention_backward`] with the q|k|v rows' biases left to the kernel where `bias` ([`attention_into`]), and
/// the gradient of the scores before the softmax (`batch × heads × seq × seq`, that of a position bias per
/// example) kept in `dscores` where given.
pub(super) fn attention_backward_biased(
    d: &Dims,
    qkv: &[f32],
    bias: QkvBias<'_>,
    probs: &[f32],
    dropout: Option<DropoutMask<'_>>,
    dctx: &[f32],
    dscores: Option<&mut [f32]>,
) -> Vec<f32> {
    if super::attention::fits(d) {
        let mut dqkv = pool::take(d.tokens() * 3 * d.hidden);
        super::attention::attention_backward_fused(d, qkv, bias, probs, dropout, dctx, &mut dqkv, dscores);
        return dqkv;
    }
    assert!(bias.is_none(), "attention: deferred q|k|v biases with heads the fused kernel does not take");
    attention_backward_general(d, qkv, probs, dropout, dctx, dscores)
}

/// [`attention_backward_biased`] with the general matrix product per (example, head).
pub(super) fn attention_backward_general(
    d: &Dims,
    qkv: &[f32],
    probs: &[f32],
    dropout: Option<DropoutMask<'_>>,
    dctx: &[f32],
    dscores: Option<&mut [f32]>,
) -> Vec<f32> {
    let (s, hd, h) = (d.seq, d.head_dim(), d.hidden);
    let scale = 1.0 / (hd as f32).sqrt();
    assert!(dscores.as_ref().is_none_or(|g| g.len() == d.batch * d.heads * s * s), "attention: dS size");

    // Each (example, head) writes dQ, dK and dV one after the other into its block; the dropped-out
    // probabilities, dS and the head's dropout multipliers (when drawn from a seed) live in one buffer each per
    // thread.
    type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>);
    let mut blocks = pool::take(d.tokens() * 3 * h);
    let head = |bn: usize, (kept, ds, mask): &mut Scratch, block: &mut [f32], keep: Option<&mut [f32]>| {
        let [q, k, v] = head_views(d, qkv, bn);
        let (b, head) = (bn / d.heads, bn % d.heads);
        let p = &probs[bn * s * s..(bn + 1) * s * s];
        let m = dropout.map(|m| m.head(bn, s * s, mask));
        let dout = View::strided(&dctx[b * s * h + head * hd..], s, hd, h);
        let (dq, rest) = block.split_at_mut(s * hd);
        let (dk, dv) = rest.split_at_mut(s * hd);
        // dV = P'ᵀ dO with P' the probabilities after dropout.
        let weights = simd(
            #[inline(always)]
            || dropped(p, m, kept),
        );
        matmul(ViewMut::new(dv, s, hd), View::new(weights, s, s).t(), dout, 1.0, false, Threads::One);
        // dP = (dO Vᵀ) ∘ mask, then the softmax backward dS = P ∘ (dP − rowsum(P ∘ dP)).
        ds.resize(s * s, 0.0);
        matmul(ViewMut::new(ds, s, s), dout, v.t(), 1.0, false, Threads::One);
        simd(
            #[inline(always)]
            || softmax_backward_rows(ds, p, m, s),
        );
        if let Some(keep) = keep {
            keep.copy_from_slice(ds);
        }
        // S = scale · Q Kᵀ, so dQ = scale · dS K and dK = scale · dSᵀ Q.
        matmul(ViewMut::new(dq, s, hd), View::new(ds, s, s), k, scale, false, Threads::One);
        matmul(ViewMut::new(dk, s, hd), View::new(ds, s, s).t(), q, scale, false, Threads::One);
    };
    let blocks_mut = blocks.par_chunks_mut(3 * s * hd).enumerate();
    let init = || (Vec::new(), Vec::new(), Vec::new());
    match dscores {
        Some(dscores) => blocks_mut
            .zip(dscores.par_chunks_mut(s * s))
            .for_each_init(init, |scratch, ((bn, block), keep)| head(bn, scratch, block, Some(keep))),
        None => blocks_mut.for_each_init(init, |scratch, (bn, block)| head(bn, scratch, block, None)),
    }
    let mut dqkv = pool::take(d.tokens() * 3 * h);
    for (p, offset) in [0, h, 2 * h].into_iter().enumerate() {
        let at = |bn: usize| &blocks[(3 * bn + p) * s * hd..(3 * bn + p + 1) * s * hd];
        scatter_heads(d, at, 3 * h, offset, &mut dqkv);
    }
    pool::give(blocks);
    dqkv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_drawn_from_its_seed_equals_the_mask_in_memory() {
        // 70 rows over three row blocks of the pass (ROWS_PER_TASK each), 37 wide, so later blocks start inside
        // a 128-element block of the mask.
        let (rows, h, p) = (70, 37, 0.3);
        let values = |k: f32| -> Vec<f32> { (0..rows * h).map(|i| (i as f32 * k).sin()).collect() };
        let (branch, residual) = (values(0.37), values(0.11));
        let (gamma, beta, bias) = (vec![1.2f32; h], vec![0.1f32; h], vec![0.05f32; h]);
        let mask = math::mask_of_seed(9, rows * h, p);
        let run = |m: DropoutMask<'_>| {
            let (mut y, mut xhat, mut rstd) = (vec![0f32; rows * h], vec![0f32; rows * h], vec![0f32; rows]);
            add_norm(&branch, Some(&bias), Some(m), &residual, &gamma, &beta, 1e-12, &mut y, &mut xhat, &mut rstd);
            (y, xhat, rstd)
        };
        assert_eq!(run(DropoutMask::Seed { seed: 9, p }), run(DropoutMask::Values(&mask)));
        // The backward pass's `x ∘ mask`, likewise.
        let seeded = masked(&branch, Some(DropoutMask::Seed { seed: 9, p })).into_owned();
        assert_eq!(seeded, masked(&branch, Some(DropoutMask::Values(&mask))).into_owned());
        assert!(seeded.iter().zip(&branch).any(|(s, b)| s != b), "the mask drops something");
    }
}
