//! Attention per (example, head) in one kernel each way, without the general matrix product. Forward: the
//! scores come out of a register-blocked product with the keys packed once per head, the softmax runs on
//! each row while it is in cache, and the weighted sum of the values is written straight into the head's
//! columns of the context (no block per head, no copy). In inference the rows are not normalised: the
//! weighted sum is scaled by `1 / Σ` instead, one multiply per output rather than per probability. Backward:
//! the same two products give dV, dP, dQ and dK, written straight into the head's columns of dq|dk|dv.
//!
//! On a 2-core Sapphire Rapids this takes W2's attention (MiniLM, 32 × 128 tokens) from 41 to 35 ms, and W1's
//! from 28 + 41.5 to 26.5 + 38.5 ms: the products run at about 250-300 GFLOP/s; the rest is the softmax's
//! `exp`, packing keys and values, and in training reading the probabilities and drawing each head's dropout
//! multipliers from their seed (no mask of them is kept between the passes). Heads
//! whose size is not a multiple of 16 take the general products ([`super::kernels::attention_general`]).

// The heads of one example write their own columns of the same rows of the context: [`Columns`].
#![allow(unsafe_code)]

use rayon::prelude::*;

use super::kernels::{dropped, softmax_backward_rows, DropoutMask};
use super::Dims;
use crate::cpu::math;
use pulp::{Simd, WithSimd};

/// Vector registers per row of a tile of keys in the score product (64 keys with AVX-512).
const TILE: usize = 4;
/// Query rows the score product computes at once: 24 accumulator registers where the CPU has 32 (AVX-512);
/// with 16 (AVX2), [`SCORE_ROWS_16`].
const SCORE_ROWS: usize = 6;
/// With 16 vector registers: 8 accumulators, the keys and a broadcast without spilling.
const SCORE_ROWS_16: usize = 2;
/// Rows the weighted sum computes at once, over two vectors of head dimensions (12 registers) or one.
const SUM_ROWS: usize = 6;

/// The q, k and v biases (`hidden` each) when the projection left them out of the q|k|v rows for attention
/// to add as it packs them (one pass over those rows fewer), or `None` when the rows hold them.
pub(super) type QkvBias<'a> = Option<[&'a [f32]; 3]>;

/// Whether [`attention_fused`] takes heads of this size.
pub(super) fn fits(d: &Dims) -> bool {
    d.head_dim().is_multiple_of(16) && d.head_dim() > 0
}

/// One thread's buffers, reused from head to head.
#[derive(Default)]
struct Scratch {
    /// The score product's right-hand side, transposed by tiles of [`TILE`] vectors: `tiles × head_dim × TILE ×
    /// lanes`, zero past `seq` — the scaled keys forward, the values backward (for dP = dO Vᵀ).
    keys: Vec<f32>,
    /// What the scores of each key get added: forward 0, or `f32::MIN` at padding, and -∞ past `seq` to the
    /// tiles' end; backward 0 throughout.
    key_bias: Vec<f32>,
    /// The head's values (the keys in the backward pass), `seq × head_dim` (in the q|k|v rows they are
    /// `3 · hidden` apart, which puts them in a handful of cache sets).
    values: Vec<f32>,
    /// The head's queries and the gradient of its context (backward), packed as the values.
    queries: Vec<f32>,
    grads: Vec<f32>,
    /// The largest score of each row.
    max: Vec<f32>,
    /// The scores and then the (unnormalised) probabilities in inference; dP and then dS backward; `seq × seq`.
    scores: Vec<f32>,
    /// The probabilities after dropout in training.
    kept: Vec<f32>,
    /// `1 / Σ` of each row (1 where the rows are normalised already).
    inv: Vec<f32>,
    /// The head's dropout multipliers, where they are drawn from their seed.
    mask: Vec<f32>,
}

/// The context's rows, shared by the threads that each write their own head's columns (or, for the gradient
/// of a position bias, their own `seq × seq` block).
struct Columns<'a> {
    ptr: *mut f32,
    len: usize,
    _ctx: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: made from an exclusive borrow of the buffer ([`Columns::new`]), which it holds for its lifetime;
// each (example, head) writes only its own columns of its own rows (the `at` and `stride` of
// [`weighted_rows`], which asserts that its columns stay within the head), or only its own block of scores
// gradients, so concurrent writers never touch the same element.
unsafe impl Send for Columns<'_> {}
unsafe impl Sync for Columns<'_> {}

impl<'a> Columns<'a> {
    fn new(buffer: &'a mut [f32]) -> Self {
        Self { ptr: buffer.as_mut_ptr(), len: buffer.len(), _ctx: std::marker::PhantomData }
    }

    /// Writes `values` at `at..at + values.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes those elements at the same time.
    #[inline(always)]
    unsafe fn put(&self, at: usize, values: &[f32]) {
        assert!(at.checked_add(values.len()).is_some_and(|end| end <= self.len), "attention: write out of bounds");
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), values.len()) };
        dst.copy_from_slice(values);
    }
}

/// Attention's forward pass into `ctx` (`tokens × hidden`, overwritten) as [`super::kernels::attention_into`]
/// computes it, for heads whose size [`fits`]: with `probs`, the normalised probabilities are kept there
/// (`batch × heads × seq × seq`) and `dropout` multiplies them before the weighted sum; with `bias`, the q|k|v
/// rows lack their biases, which are added as they are packed; `pos` is an additive bias of every head's scores
/// (`heads × seq × seq`, MPNet's relative positions).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fused(
    d: &Dims,
    qkv: &[f32],
    bias: QkvBias<'_>,
    pos: Option<&[f32]>,
    key_mask: &[u32],
    dropout: Option<DropoutMask<'_>>,
    probs: Option<&mut [f32]>,
    ctx: &mut [f32],
) {
    assert!(fits(d), "attention_fused: head size {} is not a multiple of 16", d.head_dim());
    assert!(bias.is_none_or(|b| b.iter().all(|b| b.len() == d.hidden)), "attention_fused: bias size");
    let s = d.seq;
    assert_eq!(ctx.len(), d.tokens() * d.hidden, "attention_fused: context size");
    assert!(pos.is_none_or(|p| p.len() == d.heads * s * s), "attention_fused: position bias size");
    let out = Columns::new(ctx);
    let heads = d.batch * d.heads;
    if let Some(p) = &probs {
        assert_eq!(p.len(), heads * s * s, "attention_fused: probabilities' size");
    }
    match probs {
        Some(probs) => probs.par_chunks_mut(s * s).enumerate().for_each(|(bn, p)| {
            with_scratch(&mut |scratch| {
                let probs = Some(&mut *p);
                pulp::Arch::new().dispatch(Head { d, qkv, bias, pos, key_mask, dropout, bn, probs, scratch, out: &out })
            })
        }),
        None => (0..heads).into_par_iter().for_each(|bn| {
            with_scratch(&mut |scratch| {
                let probs = None;
                pulp::Arch::new().dispatch(Head { d, qkv, bias, pos, key_mask, dropout, bn, probs, scratch, out: &out })
            })
        }),
    }
}

thread_local! {
    /// Each thread's [`Scratch`], kept from call to call: drawn anew per task, its first touch of fresh pages
    /// cost more than the products.
    static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
}

/// Runs `f` with this thread's [`Scratch`].
fn with_scratch(f: &mut dyn FnMut(&mut Scratch)) {
    SCRATCH.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// Attention's backward pass as [`super::kernels::attention_backward`] computes it, for heads whose size
/// [`fits`]: from the q|k|v rows, the probabilities kept by the forward pass, its dropout multipliers and the
/// gradient of the context, the gradient of q|k|v (`tokens × 3 · hidden`, overwritten), each head writing its
/// own columns; `bias` as in [`attention_fused`]. With `dscores` (`batch × heads × seq × seq`, overwritten),
/// the gradient of the scores before the softmax is kept there, which is that of a position bias per example.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward_fused(
    d: &Dims,
    qkv: &[f32],
    bias: QkvBias<'_>,
    probs: &[f32],
    dropout: Option<DropoutMask<'_>>,
    dctx: &[f32],
    dqkv: &mut [f32],
    dscores: Option<&mut [f32]>,
) {
    assert!(fits(d), "attention_backward_fused: head size {} is not a multiple of 16", d.head_dim());
    assert!(bias.is_none_or(|b| b.iter().all(|b| b.len() == d.hidden)), "attention_backward_fused: bias size");
    assert_eq!(dqkv.len(), d.tokens() * 3 * d.hidden, "attention_backward_fused: gradient size");
    let s = d.seq;
    assert!(dscores.as_ref().is_none_or(|g| g.len() == d.batch * d.heads * s * s), "attention_backward_fused: dS size");
    let out = Columns::new(dqkv);
    let ds_out = dscores.map(Columns::new);
    let ds_out = ds_out.as_ref();
    (0..d.batch * d.heads).into_par_iter().for_each(|bn| {
        with_scratch(&mut |scratch| {
            let out = &out;
            pulp::Arch::new().dispatch(HeadBackward { d, qkv, bias, probs, dropout, dctx, bn, scratch, out, ds_out })
        })
    });
}

/// One (example, head) of [`attention_backward_fused`].
struct HeadBackward<'a> {
    d: &'a Dims,
    qkv: &'a [f32],
    bias: QkvBias<'a>,
    probs: &'a [f32],
    dropout: Option<DropoutMask<'a>>,
    dctx: &'a [f32],
    bn: usize,
    scratch: &'a mut Scratch,
    out: &'a Columns<'a>,
    /// Where this head's dS goes, at block `bn`, when it is kept.
    ds_out: Option<&'a Columns<'a>>,
}

impl WithSimd for HeadBackward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let HeadBackward { d, qkv, bias, probs, dropout, dctx, bn, scratch, out, ds_out } = self;
        let (s, hd, h, lanes) = (d.seq, d.head_dim(), d.hidden, S::F32_LANES);
        let (b, head) = (bn / d.heads, bn % d.heads);
        let scale = 1.0 / (hd as f32).sqrt();
        let width = TILE * lanes;
        let base = b * s * 3 * h + head * hd;
        let row = |p: usize, i: usize| &qkv[base + i * 3 * h + p * h..][..hd];
        let dout_row = |i: usize| &dctx[(b * s + i) * h + head * hd..][..hd];
        let p = &probs[bn * s * s..(bn + 1) * s * s];
        let Scratch { keys, key_bias, values, queries, grads, max, scores, kept, mask, .. } = scratch;
        let m = dropout.map(|m| m.head(bn, s * s, mask));
        let b_ = |p: usize| bias.map(|b| &b[p][head * hd..(head + 1) * hd]);
        // Queries, keys and the context's gradient packed; the values transposed as the score product's keys.
        pack_rows(queries, s, b_(0), |i| row(0, i));
        // The key bias is left out here too: dQ = scale · dS K, and each row of dS sums to zero.
        pack_rows(values, s, None, |i| row(1, i));
        pack_rows(grads, s, None, dout_row);
        pack_keys(keys, |j| row(2, j), b_(2), s, hd, width, 1.0);
        let kv = S::as_simd_f32s(keys).0;
        key_bias.clear();
        key_bias.resize(s.div_ceil(width) * width, 0.0);
        max.resize(s, 0.0);
        let at = |part: usize| b * s * 3 * h + part * h + head * hd;
        // dV = P'ᵀ dO with P' the probabilities after dropout.
        let weights = dropped(p, m, kept);
        weighted_sums(simd, Weights::Columns(weights, s), s, &grads[..], hd, |_| 1.0, out, at(2), 3 * h);
        // dP = (dO Vᵀ) ∘ mask, then the softmax backward dS = P ∘ (dP − rowsum(P ∘ dP)).
        scores.resize(s * s, 0.0);
        let ds = &mut scores[..];
        all_scores(simd, |i| &grads[i * hd..(i + 1) * hd], kv, key_bias, ds, max, s);
        softmax_backward_rows(ds, p, m, s);
        if let Some(ds_out) = ds_out {
            // SAFETY: block `bn` is this head's alone.
            unsafe { ds_out.put(bn * s * s, ds) };
        }
        // S = scale · Q Kᵀ, so dQ = scale · dS K and dK = scale · dSᵀ Q.
        weighted_sums(simd, Weights::Rows(ds, s), s, &values[..], hd, |_| scale, out, at(0), 3 * h);
        weighted_sums(simd, Weights::Columns(ds, s), s, &queries[..], hd, |_| scale, out, at(1), 3 * h);
    }
}

/// One (example, head): scores, softmax, dropout and the weighted sum into the head's columns of `out`, at the
/// vector width of the CPU at hand ([`pulp`]'s dispatch).
struct Head<'a> {
    d: &'a Dims,
    qkv: &'a [f32],
    bias: QkvBias<'a>,
    pos: Option<&'a [f32]>,
    key_mask: &'a [u32],
    dropout: Option<DropoutMask<'a>>,
    bn: usize,
    probs: Option<&'a mut [f32]>,
    scratch: &'a mut Scratch,
    out: &'a Columns<'a>,
}

impl WithSimd for Head<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Head { d, qkv, bias, pos, key_mask, dropout, bn, probs, scratch, out } = self;
        let (s, hd, h, lanes) = (d.seq, d.head_dim(), d.hidden, S::F32_LANES);
        let (b, head) = (bn / d.heads, bn % d.heads);
        let scale = 1.0 / (hd as f32).sqrt();
        let width = TILE * lanes;
        let tiles = s.div_ceil(width);
        let base = b * s * 3 * h + head * hd;
        let row = |p: usize, i: usize| &qkv[base + i * 3 * h + p * h..][..hd];
        let km = &key_mask[b * s..(b + 1) * s];
        let Scratch { keys, key_bias, values, max, scores, kept, inv, mask, .. } = scratch;
        let train = probs.is_some();
        let p: &mut [f32] = match probs {
            Some(p) => p,
            None => {
                scores.resize(s * s, 0.0);
                scores
            }
        };
        let b_ = |p: usize| bias.map(|b| &b[p][head * hd..(head + 1) * hd]);
        // The keys, scaled and transposed tile by tile; zeros past the last key. The values, packed. The queries
        // are read in place. The key bias is left out: it adds q·b_k to every score of the query's row, which
        // the softmax cancels.
        pack_keys(keys, |j| row(1, j), None, s, hd, width, scale);
        let kv = S::as_simd_f32s(keys).0;
        pack_rows(values, s, b_(2), |j| row(2, j));
        key_bias.clear();
        key_bias.extend(km.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }));
        key_bias.resize(tiles * width, f32::NEG_INFINITY);
        if let Some(bq) = b_(0) {
            // (q + b_q)·k = q·k + b_q·k: the query bias adds the same to every row's score of key k, so it joins
            // the key bias (a padded key's f32::MIN or the -∞ past the last key absorb it).
            for (tile, kb) in keys.chunks_exact(hd * width).zip(key_bias.chunks_exact_mut(width)) {
                for (column, &b) in tile.chunks_exact(width).zip(bq) {
                    for (kb, &k) in kb.iter_mut().zip(column) {
                        *kb += b * k;
                    }
                }
            }
        }
        max.clear();
        max.resize(s, 0.0);
        // Scores, the key bias added on the way out.
        all_scores(simd, |i| row(0, i), kv, key_bias, p, max, s);
        if let Some(pos) = pos {
            // The head's position bias added to its scores, and the largest of each row taken again (a padded
            // key's f32::MIN absorbs the bias, as in transformers, where the mask is added after it).
            let block = &pos[head * s * s..(head + 1) * s * s];
            for ((r, br), top) in p.chunks_exact_mut(s).zip(block.chunks_exact(s)).zip(max.iter_mut()) {
                *top = f32::NEG_INFINITY;
                for (x, &b) in r.iter_mut().zip(br) {
                    *x += b;
                    *top = top.max(*x);
                }
            }
        }
        // The softmax of each row (the scores hold the key bias already, so a fully padded row comes out
        // uniform, as in transformers): normalised in training, where the probabilities are kept; in
        // inference `1 / Σ` is kept and applied to the weighted sums instead.
        inv.clear();
        for (r, &max) in p.chunks_exact_mut(s).zip(&*max) {
            for x in r.iter_mut() {
                *x = math::exp(*x - max);
            }
            let (vectors, tail) = S::as_simd_f32s(r);
            let sum = vectors.iter().fold(simd.splat_f32s(0.0), |a, &v| simd.add_f32s(a, v));
            let inv_sum = 1.0 / (simd.reduce_sum_f32s(sum) + tail.iter().sum::<f32>());
            if train {
                for x in r.iter_mut() {
                    *x *= inv_sum;
                }
                inv.push(1.0);
            } else {
                inv.push(inv_sum);
            }
        }
        let weights = dropped(p, dropout.map(|m| m.head(bn, s * s, mask)), kept);
        // The weighted sums into the head's columns of the context.
        let w = Weights::Rows(weights, s);
        weighted_sums(simd, w, s, &values[..], hd, |i| inv[i], out, b * s * h + head * hd, h);
    }
}

/// Copies rows `0..s` one after the other into `buffer`, adding `bias` (of a row's length) where given.
#[inline(always)]
fn pack_rows<'a>(buffer: &mut Vec<f32>, s: usize, bias: Option<&[f32]>, row: impl Fn(usize) -> &'a [f32]) {
    buffer.clear();
    match bias {
        Some(bias) => {
            buffer.resize(s * bias.len(), 0.0);
            for (i, dst) in buffer.chunks_exact_mut(bias.len()).enumerate() {
                if i + AHEAD < s {
                    prefetch(row(i + AHEAD));
                }
                for ((d, &x), &b) in dst.iter_mut().zip(row(i)).zip(bias) {
                    *d = x + b;
                }
            }
        }
        None => {
            for i in 0..s {
                if i + AHEAD < s {
                    prefetch(row(i + AHEAD));
                }
                buffer.extend_from_slice(row(i));
            }
        }
    }
}

/// Rows ahead that [`pack_rows`] and the score product fetch into cache: in the q|k|v rows a head's rows are
/// `3 · hidden` apart, each row's first touch a miss that the hardware prefetcher does not foresee.
const AHEAD: usize = 4;

/// Asks for the cache lines of `x` ahead of their use.
#[inline(always)]
fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(16) {
        // SAFETY: a prefetch has no effect on memory; the address is inside `x`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
}

/// Writes the `s` keys (of `hd` dimensions each), plus `bias` where given, scaled and transposed into `keys`,
/// tiles of `width` keys: `tiles × hd × width`, zero past the last key. Compiled for the baseline instruction
/// set on purpose: with AVX-512 the compiler turns the strided stores into scatters, which made this 6× slower.
#[inline(never)]
fn pack_keys<'a>(
    keys: &mut Vec<f32>,
    key: impl Fn(usize) -> &'a [f32],
    bias: Option<&[f32]>,
    s: usize,
    hd: usize,
    width: usize,
    scale: f32,
) {
    keys.clear();
    keys.resize(s.div_ceil(width) * hd * width, 0.0);
    // Groups of 8 keys by 8 × 8 transposes in registers where the CPU has AVX; the rest one value at a time.
    let mut first = 0;
    #[cfg(target_arch = "x86_64")]
    if width.is_multiple_of(8) && hd.is_multiple_of(8) && std::is_x86_feature_detected!("avx") {
        first = s / 8 * 8;
        // SAFETY: AVX is present (checked above).
        unsafe { pack_key_groups_avx(keys, &key, bias, first, hd, width, scale) };
    }
    for (t, tile) in keys.chunks_exact_mut(hd * width).enumerate() {
        for (jj, j) in (t * width..((t + 1) * width).min(s)).enumerate().filter(|&(_, j)| j >= first) {
            let columns = tile.chunks_exact_mut(width).zip(key(j));
            match bias {
                Some(bias) => columns.zip(bias).for_each(|((column, &k), &b)| column[jj] = (k + b) * scale),
                None => columns.for_each(|(column, &k)| column[jj] = k * scale),
            }
        }
    }
}

/// [`pack_keys`] for keys `0..end` (a multiple of 8), 8 keys by 8 dimensions at a time: eight loads, a
/// transpose in registers and eight stores of 8 consecutive keys, where the scalar loop stores one value per
/// key and dimension (on a 2-core AMD EPYC the scalar loop was 2% of W2). The next group's rows are prefetched:
/// in the q|k|v rows the keys are `3 · hidden` apart, so each group's first touch is a cache miss.
///
/// # Safety
/// The CPU has AVX; `width` and `hd` are multiples of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_key_groups_avx<'a>(
    keys: &mut [f32],
    key: &impl Fn(usize) -> &'a [f32],
    bias: Option<&[f32]>,
    end: usize,
    hd: usize,
    width: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    let scale = _mm256_set1_ps(scale);
    for j in (0..end).step_by(8) {
        let rows: [&[f32]; 8] = std::array::from_fn(|r| &key(j + r)[..hd]);
        if j + 8 < end {
            for r in 0..8 {
                prefetch(&key(j + 8 + r)[..hd]);
            }
        }
        let tile = &mut keys[(j / width) * hd * width..][..hd * width];
        let jj = j % width;
        for d in (0..hd).step_by(8) {
            let v: [__m256; 8] = std::array::from_fn(|r| {
                let x = _mm256_loadu_ps(rows[r][d..d + 8].as_ptr());
                let x = match bias {
                    Some(b) => _mm256_add_ps(x, _mm256_loadu_ps(b[d..d + 8].as_ptr())),
                    None => x,
                };
                _mm256_mul_ps(x, scale)
            });
            // The 8 × 8 transpose: pairs, then quads, then the two 128-bit halves.
            let t0 = _mm256_unpacklo_ps(v[0], v[1]);
            let t1 = _mm256_unpackhi_ps(v[0], v[1]);
            let t2 = _mm256_unpacklo_ps(v[2], v[3]);
            let t3 = _mm256_unpackhi_ps(v[2], v[3]);
            let t4 = _mm256_unpacklo_ps(v[4], v[5]);
            let t5 = _mm256_unpackhi_ps(v[4], v[5]);
            let t6 = _mm256_unpacklo_ps(v[6], v[7]);
            let t7 = _mm256_unpackhi_ps(v[6], v[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let columns = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (r, column) in columns.into_iter().enumerate() {
                _mm256_storeu_ps(tile[(d + r) * width + jj..][..8].as_mut_ptr(), column);
            }
        }
    }
}

/// The scores of every query row (`q(i)`, `s` of them) against every tile of `keys`: [`score_rows`] as many rows at
/// a time as the CPU's registers hold.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn all_scores<'q, S: Simd>(
    simd: S,
    q: impl Fn(usize) -> &'q [f32],
    keys: &[S::f32s],
    key_bias: &[f32],
    p: &mut [f32],
    max: &mut [f32],
    s: usize,
) {
    let mut i = 0;
    if S::REGISTER_COUNT >= 32 {
        while i + SCORE_ROWS <= s {
            for r in i + AHEAD..(i + AHEAD + SCORE_ROWS).min(s) {
                prefetch(q(r));
            }
            score_rows::<S, SCORE_ROWS>(simd, std::array::from_fn(|r| q(i + r)), keys, key_bias, i, p, max, s);
            i += SCORE_ROWS;
        }
    } else {
        while i + SCORE_ROWS_16 <= s {
            for r in i + AHEAD..(i + AHEAD + SCORE_ROWS_16).min(s) {
                prefetch(q(r));
            }
            score_rows::<S, SCORE_ROWS_16>(simd, std::array::from_fn(|r| q(i + r)), keys, key_bias, i, p, max, s);
            i += SCORE_ROWS_16;
        }
    }
    for i in i..s {
        score_rows::<S, 1>(simd, [q(i)], keys, key_bias, i, p, max, s);
    }
}

/// The scores of `R` query rows starting at row `i` against every tile of `keys` (vectors, `TILE` per head
/// dimension and tile), plus `key_bias`, into rows `i..i + R` of `p` (`seq × seq`), and their largest into
/// `max[i..i + R]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_rows<S: Simd, const R: usize>(
    simd: S,
    q: [&[f32]; R],
    keys: &[S::f32s],
    key_bias: &[f32],
    i: usize,
    p: &mut [f32],
    max: &mut [f32],
    s: usize,
) {
    let (hd, lanes) = (q[0].len(), S::F32_LANES);
    let bias = S::as_simd_f32s(key_bias).0;
    let mut largest = [simd.splat_f32s(f32::NEG_INFINITY); R];
    for (t, tile) in keys.chunks_exact(hd * TILE).enumerate() {
        let mut acc = [[simd.splat_f32s(0.0); TILE]; R];
        for (dd, k) in tile.chunks_exact(TILE).enumerate() {
            for r in 0..R {
                let qv = simd.splat_f32s(q[r][dd]);
                for v in 0..TILE {
                    acc[r][v] = simd.mul_add_e_f32s(qv, k[v], acc[r][v]);
                }
            }
        }
        let from = t * TILE * lanes;
        let n = (s - from).min(TILE * lanes);
        for (r, acc) in acc.iter().enumerate() {
            let dst = &mut p[(i + r) * s + from..][..n];
            for (v, &a) in acc.iter().enumerate() {
                // Forward, the bias past the last key is -∞, so the maximum is that of the scores stored.
                let x = simd.add_f32s(a, bias[t * TILE + v]);
                largest[r] = simd.max_f32s(largest[r], x);
                let (lo, hi) = (v * lanes, ((v + 1) * lanes).min(n));
                if hi - lo == lanes {
                    // A whole vector: a plain store (pulp's partial store goes through a masked-store stub).
                    S::as_mut_simd_f32s(&mut dst[lo..hi]).0[0] = x;
                } else if lo < hi {
                    simd.partial_store_f32s(&mut dst[lo..hi], x);
                }
            }
        }
    }
    for (r, &l) in largest.iter().enumerate() {
        max[i + r] = simd.reduce_max_f32s(l);
    }
}

/// `acc[r] += weights[r] · v` for the first `N` vectors of `v`. A function rather than a closure: a closure
/// the compiler does not inline is compiled without the CPU's vector instructions, each vector operation in it
/// a call (measured: attention 10× slower).
#[inline(always)]
fn accumulate<S: Simd, const R: usize, const N: usize>(
    simd: S,
    acc: &mut [[S::f32s; N]; R],
    weights: [f32; R],
    v: &[f32],
) {
    let v = S::as_simd_f32s(&v[..N * S::F32_LANES]).0;
    for r in 0..R {
        let wv = simd.splat_f32s(weights[r]);
        for x in 0..N {
            acc[r][x] = simd.mul_add_e_f32s(wv, v[x], acc[r][x]);
        }
    }
}

/// A matrix of weights `W(o, j)` for [`weighted_sums`]: output row `o`, summation index `j`.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// `W(o, j) = w[o · n + j]`.
    Rows(&'a [f32], usize),
    /// `W(o, j) = w[j · n + o]`: the transpose of the former.
    Columns(&'a [f32], usize),
}

/// `rows` output rows `o`, each `scale(o) · Σⱼ W(o, j) values[j]` with `values` packed (`n × hd`, `n` the
/// summation length), written at `at + o · stride` of `out`: [`SUM_ROWS`] rows and two vectors of head dimensions
/// at a time where the sizes allow.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_sums<S: Simd>(
    simd: S,
    w: Weights<'_>,
    rows: usize,
    values: &[f32],
    hd: usize,
    scale: impl Fn(usize) -> f32,
    out: &Columns<'_>,
    at: usize,
    stride: usize,
) {
    let lanes = S::F32_LANES;
    let two = hd.is_multiple_of(2 * lanes);
    for c in (0..hd).step_by(if two { 2 * lanes } else { lanes }) {
        let mut o = 0;
        while o < rows {
            let full = o + SUM_ROWS <= rows;
            let at = at + o * stride + c;
            match (full, two) {
                (true, true) => {
                    let scale = std::array::from_fn(|r| scale(o + r));
                    weighted_rows::<S, SUM_ROWS, 2>(simd, w, o, values, hd, c, scale, out, at, stride)
                }
                (true, false) => {
                    let scale = std::array::from_fn(|r| scale(o + r));
                    weighted_rows::<S, SUM_ROWS, 1>(simd, w, o, values, hd, c, scale, out, at, stride)
                }
                (false, true) => weighted_rows::<S, 1, 2>(simd, w, o, values, hd, c, [scale(o)], out, at, stride),
                (false, false) => weighted_rows::<S, 1, 1>(simd, w, o, values, hd, c, [scale(o)], out, at, stride),
            }
            o += if full { SUM_ROWS } else { 1 };
        }
    }
}

/// [`weighted_sums`] for output rows `o..o + R` and `N` vectors of head dimensions from `c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_rows<S: Simd, const R: usize, const N: usize>(
    simd: S,
    w: Weights<'_>,
    o: usize,
    values: &[f32],
    hd: usize,
    c: usize,
    scale: [f32; R],
    out: &Columns<'_>,
    at: usize,
    stride: usize,
) {
    assert!(c + N * S::F32_LANES <= hd, "weighted_rows: columns past the head");
    let mut acc = [[simd.splat_f32s(0.0); N]; R];
    match w {
        Weights::Rows(w, n) => {
            let rows: [&[f32]; R] = std::array::from_fn(|r| &w[(o + r) * n..(o + r + 1) * n]);
            for (j, v) in values.chunks_exact(hd).take(n).enumerate() {
                accumulate(simd, &mut acc, std::array::from_fn(|r| rows[r][j]), &v[c..]);
            }
        }
        Weights::Columns(w, n) => {
            for (column, v) in w.chunks_exact(n).zip(values.chunks_exact(hd)) {
                let weights: &[f32; R] = column[o..o + R].try_into().expect("R weights");
                accumulate(simd, &mut acc, *weights, &v[c..]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let scaled = acc.map(|a| simd.mul_f32s(a, simd.splat_f32s(scale[r])));
        // SAFETY: these columns of output row `o + r` belong to this (example, head) alone.
        unsafe { out.put(at + r * stride, pulp::bytemuck::cast_slice(&scaled)) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{attention_backward_general, attention_general};
    use super::*;
    use rand::{Rng, SeedableRng};

    fn dims(batch: usize, seq: usize, heads: usize, hd: usize) -> Dims {
        Dims { batch, seq, hidden: heads * hd, heads, intermediate: 4, eps: 1e-12, bf16: false }
    }

    /// Random q, k and v biases, and the q|k|v rows less them.
    fn split_biases(rng: &mut impl Rng, qkv: &[f32], h: usize) -> ([Vec<f32>; 3], Vec<f32>) {
        let biases: [Vec<f32>; 3] = std::array::from_fn(|_| (0..h).map(|_| rng.gen_range(-1.0..1.0)).collect());
        let unbiased = qkv.iter().enumerate().map(|(i, x)| x - biases[(i / h) % 3][i % h]).collect();
        (biases, unbiased)
    }

    /// The fused kernel against the products of the general path, in inference and in training (with the
    /// probabilities and dropout), at sizes around the tile edges and with padded and fully padded examples,
    /// with and without a position bias.
    #[test]
    fn fused_attention_matches_general_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (batch, seq, heads, hd) in
            [(2, 1, 1, 16), (3, 5, 2, 32), (2, 37, 3, 16), (2, 64, 2, 32), (1, 65, 2, 64), (2, 130, 1, 48)]
        {
            let d = dims(batch, seq, heads, hd);
            let n = d.tokens();
            let qkv: Vec<f32> = (0..n * 3 * d.hidden).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let mut key_mask: Vec<u32> = (0..n).map(|t| u32::from(t % seq < seq - seq / 3)).collect();
            if batch > 1 {
                key_mask[seq..2 * seq].fill(0);
            }
            // The multipliers in memory and drawn head by head from their seed, the general path taking the seed.
            let seed = rng.gen::<u64>();
            let drop = math::mask_of_seed(seed, batch * heads * seq * seq, 0.2);
            let (biases, unbiased) = split_biases(&mut rng, &qkv, d.hidden);
            let bias = Some([&biases[0][..], &biases[1][..], &biases[2][..]]);
            let position: Vec<f32> = (0..heads * seq * seq).map(|_| rng.gen_range(-3.0..3.0)).collect();
            for (train, pos) in [(false, None), (true, None), (false, Some(&position[..])), (true, Some(&position[..]))]
            {
                let values = train.then_some(DropoutMask::Values(&drop));
                let seeded = train.then_some(DropoutMask::Seed { seed, p: 0.2 });
                let (mut p1, mut p2) = (vec![0f32; drop.len()], vec![0f32; drop.len()]);
                let (mut blocks, mut want) = (vec![0f32; n * d.hidden], vec![0f32; n * d.hidden]);
                let probs = train.then_some(&mut p1[..]);
                attention_general(&d, &qkv, pos, &key_mask, seeded, probs, &mut blocks, &mut want);
                // The rows with their biases, and without them for the kernel to add.
                for (rows, bias, dropout) in [(&qkv, None, values), (&unbiased, bias, seeded)] {
                    let mut got = vec![f32::NAN; n * d.hidden];
                    attention_fused(&d, rows, bias, pos, &key_mask, dropout, train.then_some(&mut p2[..]), &mut got);
                    let deferred = (bias.is_some(), pos.is_some());
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{batch}x{seq}x{heads}x{hd} train={train} (deferred, pos)={deferred:?} ctx[{i}]: {a} vs {b}"
                        );
                    }
                    if train {
                        for (i, (a, b)) in p2.iter().zip(&p1).enumerate() {
                            let ok = (a - b).abs() <= 1e-6 + 1e-5 * b;
                            assert!(ok, "{batch}x{seq}x{heads}x{hd} {deferred:?} probs[{i}]: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// The fused backward pass against the general one, with and without dropout, and the gradient of the
    /// scores both keep for a position bias.
    #[test]
    fn fused_attention_backward_matches_general_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (batch, seq, heads, hd) in [(2, 1, 1, 16), (3, 5, 2, 32), (2, 37, 3, 16), (1, 65, 2, 64), (2, 130, 1, 48)] {
            let d = dims(batch, seq, heads, hd);
            let n = d.tokens();
            let qkv: Vec<f32> = (0..n * 3 * d.hidden).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let dctx: Vec<f32> = (0..n * d.hidden).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let key_mask: Vec<u32> = (0..n).map(|t| u32::from(t % seq < seq - seq / 3)).collect();
            let seed = rng.gen::<u64>();
            let drop = math::mask_of_seed(seed, batch * heads * seq * seq, 0.2);
            let mut probs = vec![0f32; drop.len()];
            let mut ctx = vec![0f32; n * d.hidden];
            attention_fused(&d, &qkv, None, None, &key_mask, None, Some(&mut probs[..]), &mut ctx);
            let (biases, unbiased) = split_biases(&mut rng, &qkv, d.hidden);
            let bias = Some([&biases[0][..], &biases[1][..], &biases[2][..]]);
            for dropout in [None, Some(&drop[..])] {
                let mut want_ds = vec![f32::NAN; drop.len()];
                let (values, seeded) =
                    (dropout.map(DropoutMask::Values), dropout.map(|_| DropoutMask::Seed { seed, p: 0.2 }));
                let want = attention_backward_general(&d, &qkv, &probs, values, &dctx, Some(&mut want_ds[..]));
                // dS against its definition for a few rows: P ∘ (dP − rowsum(P ∘ dP)), dP = (dO Vᵀ) ∘ mask.
                for (bn, i) in [(0, 0), (batch * heads - 1, seq - 1)] {
                    let (b, head) = (bn / heads, bn % heads);
                    let row = |t: usize, part: usize| {
                        &qkv[(b * seq + t) * 3 * d.hidden + part * d.hidden + head * hd..][..hd]
                    };
                    let dout = &dctx[(b * seq + i) * d.hidden + head * hd..][..hd];
                    let at = |j: usize| (bn * seq + i) * seq + j;
                    let dp: Vec<f32> = (0..seq)
                        .map(|j| {
                            let x: f32 = dout.iter().zip(row(j, 2)).map(|(a, b)| a * b).sum();
                            x * dropout.map_or(1.0, |m| m[at(j)])
                        })
                        .collect();
                    let inner: f32 = (0..seq).map(|j| probs[at(j)] * dp[j]).sum();
                    for j in 0..seq {
                        let expected = probs[at(j)] * (dp[j] - inner);
                        let ok = (want_ds[at(j)] - expected).abs() <= 1e-5 * (1.0 + expected.abs());
                        assert!(ok, "dS[{bn}, {i}, {j}]: {} vs {expected}", want_ds[at(j)]);
                    }
                }
                // The multipliers drawn from their seed by the kernel with the rows without their biases.
                for (rows, bias, mask) in [(&qkv, None, values), (&unbiased, bias, seeded)] {
                    let mut got = vec![f32::NAN; n * 3 * d.hidden];
                    let mut got_ds = vec![f32::NAN; drop.len()];
                    attention_backward_fused(&d, rows, bias, &probs, mask, &dctx, &mut got, Some(&mut got_ds[..]));
                    for (i, (a, b)) in got_ds.iter().zip(&want_ds).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{batch}x{seq}x{heads}x{hd} dS[{i}]: {a} vs {b}"
                        );
                    }
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        let ok = (a - b).abs() <= 1e-5 * (1.0 + b.abs());
                        let (dropout, deferred) = (dropout.is_some(), bias.is_some());
                        assert!(
                            ok,
                            "{batch}x{seq}x{heads}x{hd} dropout={dropout} deferred={deferred} dqkv[{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Both passes, one head after the other, with the vector width of `simd` rather than the CPU's.
    fn both_passes<S: Simd>(
        simd: S,
        d: &Dims,
        (qkv, bias): (&[f32], QkvBias<'_>),
        key_mask: &[u32],
        drop: &[f32],
        dctx: &[f32],
    ) -> [Vec<f32>; 4] {
        let n = d.tokens();
        let (mut ctx, mut probs, mut dqkv) =
            (vec![f32::NAN; n * d.hidden], vec![f32::NAN; drop.len()], vec![f32::NAN; n * 3 * d.hidden]);
        let mut inference = vec![f32::NAN; n * d.hidden];
        let mut scratch = Scratch::default();
        let ss = d.seq * d.seq;
        {
            let out = Columns::new(&mut ctx);
            for (bn, p) in probs.chunks_mut(ss).enumerate() {
                let scratch = &mut scratch;
                let (pos, dropout, probs) = (None, Some(DropoutMask::Values(drop)), Some(p));
                Head { d, qkv, bias, pos, key_mask, dropout, bn, probs, scratch, out: &out }.with_simd(simd);
            }
        }
        {
            let out = Columns::new(&mut inference);
            for bn in 0..d.batch * d.heads {
                let scratch = &mut scratch;
                let (pos, dropout, probs) = (None, None, None);
                Head { d, qkv, bias, pos, key_mask, dropout, bn, probs, scratch, out: &out }.with_simd(simd);
            }
        }
        {
            let out = Columns::new(&mut dqkv);
            for bn in 0..d.batch * d.heads {
                let (probs, scratch) = (&probs[..], &mut scratch);
                let (dropout, ds_out) = (Some(DropoutMask::Values(drop)), None);
                HeadBackward { d, qkv, bias, probs, dropout, dctx, bn, scratch, out: &out, ds_out }.with_simd(simd);
            }
        }
        [ctx, probs, dqkv, inference]
    }

    /// The kernels at every vector width the dispatch may pick (1, 4, 8 and 16 lanes: no SIMD, NEON or SSE,
    /// AVX2, AVX-512, here emulated) against the general path, in training and inference, so that every CPU runs
    /// checked code; with a fully padded example (the second shape).
    #[test]
    fn fused_attention_matches_at_every_vector_width() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for (batch, seq, heads, hd) in [(2, 7, 2, 16), (2, 37, 1, 32), (1, 70, 2, 48)] {
            let d = dims(batch, seq, heads, hd);
            let n = d.tokens();
            let qkv: Vec<f32> = (0..n * 3 * d.hidden).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let dctx: Vec<f32> = (0..n * d.hidden).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut key_mask: Vec<u32> = (0..n).map(|t| u32::from(t % seq < seq - seq / 3)).collect();
            if seq == 37 {
                key_mask[seq..].fill(0);
            }
            let drop: Vec<f32> =
                (0..batch * heads * seq * seq).map(|_| if rng.gen_bool(0.2) { 0.0 } else { 1.25 }).collect();
            let mut want_probs = vec![0f32; drop.len()];
            let (mut blocks, mut want_ctx) = (vec![0f32; n * d.hidden], vec![0f32; n * d.hidden]);
            let probs = Some(&mut want_probs[..]);
            let values = Some(DropoutMask::Values(&drop));
            attention_general(&d, &qkv, None, &key_mask, values, probs, &mut blocks, &mut want_ctx);
            let want_dqkv = attention_backward_general(&d, &qkv, &want_probs, values, &dctx, None);
            let mut want_inference = vec![0f32; n * d.hidden];
            attention_general(&d, &qkv, None, &key_mask, None, None, &mut blocks, &mut want_inference);
            // The rows with their biases, and without them for the kernels to add.
            let (biases, unbiased) = split_biases(&mut rng, &qkv, d.hidden);
            let bias = Some([&biases[0][..], &biases[1][..], &biases[2][..]]);
            for (rows, deferred) in [((&qkv[..], None), false), ((&unbiased[..], bias), true)] {
                let got = [
                    both_passes(pulp::Scalar::new(), &d, rows, &key_mask, &drop, &dctx),
                    both_passes(pulp::Scalar128b, &d, rows, &key_mask, &drop, &dctx),
                    both_passes(pulp::Scalar256b, &d, rows, &key_mask, &drop, &dctx),
                    both_passes(pulp::Scalar512b, &d, rows, &key_mask, &drop, &dctx),
                ];
                for (lanes, [ctx, probs, dqkv, inference]) in [1, 4, 8, 16].into_iter().zip(got) {
                    let outputs = [
                        ("ctx", ctx, &want_ctx),
                        ("probs", probs, &want_probs),
                        ("dqkv", dqkv, &want_dqkv),
                        ("inference ctx", inference, &want_inference),
                    ];
                    for (what, got, want) in outputs {
                        for (i, (a, b)) in got.iter().zip(want).enumerate() {
                            let ok = (a - b).abs() <= 1e-5 * (1.0 + b.abs());
                            assert!(
                                ok,
                                "{lanes} lanes, {batch}x{seq}x{heads}x{hd} deferred={deferred} {what}[{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Heads the kernel does not take are named.
    #[test]
    fn fits_only_multiples_of_16() {
        assert!(fits(&dims(1, 4, 12, 32)) && fits(&dims(1, 4, 12, 64)) && fits(&dims(1, 4, 2, 48)));
        assert!(!fits(&dims(1, 4, 3, 8)) && !fits(&dims(1, 4, 2, 20)));
    }
}
