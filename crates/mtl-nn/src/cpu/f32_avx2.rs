//! f32 products `x Wᵀ + b` in our own blocked kernel with AVX2 + FMA, for CPUs without AVX-512 (AMD Zen 2 and
//! 3, Intel before Skylake-SP), with the bias and GELU applied while each tile is still in registers.
//!
//! The BLIS shape fixed for the encoder's products: the weight packed into panels of 16 outputs (input-major),
//! each task's rows of activations (up to 144, 288 KB at their depth) packed into micro-panels of 6 rows, a
//! 6 × 16 register tile (12 of the 16 vector registers accumulate, two hold the weight's row, one the
//! broadcast activation), depths up to 1,536 in one block so that the sums stay in registers.
//!
//! Measured on an AMD EPYC (Zen 3), `mtl-bench linear` and `mtl-bench infer|train --alternate-kernels`: at
//! parity with the `gemm` crate's AVX2 kernel (both about 90% of the FMA rate alone), and the GELU in the
//! epilogue costs what its own pass did (the pass is bound by the erf polynomial, not by memory).

#![allow(unsafe_code)]

use rayon::prelude::*;

use super::gemm::{View, ViewMut};

/// Rows of the register tile.
const MR: usize = 6;
/// Outputs of the register tile and of a packed weight panel: two vectors of 8.
const NR: usize = 16;
/// Most inputs of a depth block: the encoders' depths (384 to 3,072) in one or two blocks, so that a tile's
/// sums stay in registers over the whole depth (blocks of 384 were slower on the 1,536-deep output projection:
/// each block stores and reloads the partial sums).
const KC: usize = 1536;
/// Floats of a task's packed activations (its rows × a depth block): 288 KB, in L2 beside the weight panel.
const A_BLOCK: usize = 72 * 1024;
/// Most rows of a task.
const MAX_MC: usize = 144;

/// Rows a task packs and multiplies at depth `depth`: a multiple of [`MR`], as many as fit [`A_BLOCK`].
fn rows_per_task(depth: usize) -> usize {
    (A_BLOCK / depth.max(1) / MR * MR).clamp(4 * MR, MAX_MC)
}

/// Whether this CPU has AVX2 and FMA.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns [`preferred`] off (or back on), for benchmarks that time this kernel against the `gemm` crate in one
/// process.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the encoder's f32 projections run here rather than in the `gemm` crate: AVX2 and FMA without
/// AVX-512 (where the `gemm` crate's kernels are twice as wide as this one).
pub fn preferred() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ENABLED.load(std::sync::atomic::Ordering::Relaxed) && available() && !is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A weight `[out, in]` packed for [`linear`]: per panel of 16 outputs, `in` rows of the 16 outputs' weights,
/// zero-padded to whole panels.
#[derive(Clone, Debug)]
pub struct PackedF32 {
    out: usize,
    input: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Outputs (rows of the weight).
    pub fn out(&self) -> usize {
        self.out
    }

    /// Inputs (columns of the weight).
    pub fn input(&self) -> usize {
        self.input
    }
}

/// Packs `w` (`out × input`, row-major, as `nn.Linear` stores it) for [`linear`].
pub fn pack_weights(w: &[f32], out: usize, input: usize) -> PackedF32 {
    assert_eq!(w.len(), out * input, "pack_weights: {} values are not {out} × {input}", w.len());
    pack_stacked(&[w], input).with_out(out)
}

/// Packs the weights `parts` (each `rows × input`, row-major) stacked one under the other, as one weight of
/// all their rows (the q, k and v projections as one product), without copying them together first.
pub fn pack_stacked(parts: &[&[f32]], input: usize) -> PackedF32 {
    let rows: Vec<&[f32]> = match input {
        0 => Vec::new(),
        _ => parts
            .iter()
            .flat_map(|p| {
                assert!(p.len().is_multiple_of(input), "pack_stacked: {} values are not rows of {input}", p.len());
                p.chunks_exact(input)
            })
            .collect(),
    };
    let out = rows.len();
    let mut data = vec![0f32; out.div_ceil(NR) * NR * input];
    if input > 0 {
        data.par_chunks_mut(NR * input).zip(rows.par_chunks(NR)).for_each(|(panel, rows)| {
            for (j, row) in rows.iter().enumerate() {
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        });
    }
    PackedF32 { out, input, data }
}

/// Packs the right operand `b` (`k × n`, any strides) of a product `a · b` for [`matmul`].
fn pack_right(b: View<'_>) -> PackedF32 {
    let (k, n) = (b.rows(), b.cols());
    let (src, rs, cs) = b.raw();
    let mut data = vec![0f32; n.div_ceil(NR) * NR * k];
    if k > 0 {
        data.par_chunks_mut(NR * k).enumerate().for_each(|(p, panel)| {
            let width = NR.min(n - p * NR);
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let at = kk * rs + p * NR * cs;
                match cs {
                    // A row of b: 16 consecutive values.
                    1 => dst[..width].copy_from_slice(&src[at..at + width]),
                    _ => {
                        for (j, d) in dst[..width].iter_mut().enumerate() {
                            *d = src[at + j * cs];
                        }
                    }
                }
            }
        });
    }
    PackedF32 { out: n, input: k, data }
}

impl PackedF32 {
    /// The same packing for `out` outputs (an empty weight has no rows to count).
    fn with_out(mut self, out: usize) -> Self {
        self.out = out;
        self
    }
}

/// What is applied to each output as its tile is stored.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// `x Wᵀ`.
    None,
    /// `x Wᵀ + b`.
    Bias(&'a [f32]),
    /// `gelu(x Wᵀ + b)` (the exact GELU, [`super::math::gelu`]).
    BiasGelu(&'a [f32]),
}

impl<'a> Epilogue<'a> {
    fn bias(&self) -> Option<&'a [f32]> {
        match *self {
            Epilogue::None => None,
            Epilogue::Bias(b) | Epilogue::BiasGelu(b) => Some(b),
        }
    }

    fn gelu(&self) -> bool {
        matches!(self, Epilogue::BiasGelu(_))
    }
}

/// The destination rows, written by tasks in disjoint blocks.
#[derive(Clone, Copy)]
struct Dst(*mut f32);

// SAFETY: every task writes only its own rows × panels block of the destination (see `run`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// `out = epilogue(x Wᵀ)` for `n` rows of `x` (`n × in`, row-major), the outputs' rows `stride` apart in `out`.
/// Panics unless [`available`].
pub fn linear(x: &[f32], n: usize, w: &PackedF32, epilogue: Epilogue<'_>, out: &mut [f32], stride: usize) {
    let (o, k) = (w.out, w.input);
    assert!(
        x.len() == n * k && stride >= o && (n == 0 || (n - 1) * stride + o <= out.len()),
        "f32_avx2::linear: {} inputs for {n} × {k}, {} outputs for {n} × {o} every {stride}",
        x.len(),
        out.len()
    );
    if let Some(b) = epilogue.bias() {
        assert_eq!(b.len(), o, "f32_avx2::linear: {} biases for {o} outputs", b.len());
    }
    run(View::new(x, n, k), w, 1.0, false, epilogue, Dst(out.as_mut_ptr()), stride);
}

/// `dst = scale · a · b`, or `dst += scale · a · b` when `accumulate`, as [`super::gemm::matmul`] computes it
/// (which calls this for large products where [`preferred`]); `b` is packed in the call. Panics unless
/// [`available`].
pub fn matmul(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, scale: f32, accumulate: bool) {
    let (m, n, k) = (dst.rows(), dst.cols(), a.cols());
    assert!(a.rows() == m && b.rows() == k && b.cols() == n, "f32_avx2::matmul: shapes do not match");
    let packed = pack_right(b);
    let (data, stride) = dst.into_parts();
    run(a, &packed, scale, accumulate, Epilogue::None, Dst(data.as_mut_ptr()), stride);
}

/// `dst = epilogue(scale · a · w (+ dst))` in parallel tasks of rows × output panels.
///
/// `dst` must address `a.rows()` rows of `stride` floats with `w.out` valid in each (the callers check it).
fn run(a: View<'_>, w: &PackedF32, scale: f32, accumulate: bool, epilogue: Epilogue<'_>, dst: Dst, stride: usize) {
    let (n, o, k) = (a.rows(), w.out, w.input);
    assert_eq!(a.cols(), k, "f32_avx2: {} inputs against a weight of {k}", a.cols());
    assert!(available(), "f32_avx2 needs AVX2 and FMA (check available first)");
    if n == 0 || o == 0 {
        return;
    }
    let mc = rows_per_task(k.div_ceil(k.div_ceil(KC).max(1)));
    let panels = o.div_ceil(NR);
    let row_blocks = n.div_ceil(mc);
    // Enough tasks for every thread to take a few, splitting the outputs too when the rows are few.
    let groups = (4 * rayon::current_num_threads()).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let job = Job { a, w, scale, accumulate, epilogue, dst, stride };
    (0..row_blocks * groups).into_par_iter().for_each_init(
        || Vec::with_capacity(mc * KC.min(k)),
        |packed, t| {
            let (rb, g) = (t / groups, t % groups);
            let rows = rb * mc..(rb * mc + mc).min(n);
            let panels = g * per_group..((g + 1) * per_group).min(panels);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA are present (asserted above); the task writes rows `rows` × the outputs of
            // `panels` of the destination, inside it (the callers' contract) and disjoint from every other
            // task's block.
            unsafe {
                job.task(rows, panels, packed)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (packed, &job, rows, panels);
                unreachable!("AVX2 is x86-64 only");
            }
        },
    );
}

/// One product's operands, shared by its tasks.
struct Job<'a> {
    a: View<'a>,
    w: &'a PackedF32,
    scale: f32,
    accumulate: bool,
    epilogue: Epilogue<'a>,
    dst: Dst,
    stride: usize,
}

impl Job<'_> {
    /// One task: rows `rows` of `a` against weight panels `panels`, depth block by depth block.
    ///
    /// # Safety
    /// AVX2 and FMA are present; the destination holds `rows.end` rows of `stride` floats, `w.out` valid in
    /// each; no other thread touches rows `rows` × the outputs of `panels`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn task(&self, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>, packed: &mut Vec<f32>) {
        let (o, k, epilogue, dst, stride) = (self.w.out, self.w.input, self.epilogue, self.dst, self.stride);
        let n = rows.len();
        let micro = n.div_ceil(MR);
        if k == 0 {
            // No products: the epilogue of the destination (when accumulating) or of zeros.
            for r in rows {
                for j in panels.start * NR..(panels.end * NR).min(o) {
                    let at = dst.0.add(r * stride + j);
                    let v = if self.accumulate { *at } else { 0.0 } + epilogue.bias().map_or(0.0, |b| b[j]);
                    *at = if epilogue.gelu() { super::math::gelu(v) } else { v };
                }
            }
            return;
        }
        let (src, rs, cs) = self.a.raw();
        let blocks = k.div_ceil(KC);
        let depth = k.div_ceil(blocks);
        packed.resize(micro * MR * depth, 0.0);
        for b in 0..blocks {
            let k0 = b * depth;
            let kc = depth.min(k - k0);
            // The rows' inputs k0..k0 + kc as micro-panels of MR rows, input-major; zero past the last row.
            for m in 0..micro {
                let panel = &mut packed[m * MR * kc..(m + 1) * MR * kc];
                let first = rows.start + m * MR;
                let valid = MR.min(n - m * MR);
                if rs == 1 && valid == MR {
                    // Stored transposed (a gradient's transpose): six consecutive values per input.
                    for (kk, d) in panel.chunks_exact_mut(MR).enumerate() {
                        let at = (k0 + kk) * cs + first;
                        d.copy_from_slice(&src[at..at + MR]);
                    }
                    continue;
                }
                for r in 0..MR {
                    if r < valid {
                        let at = (first + r) * rs + k0 * cs;
                        for kk in 0..kc {
                            panel[kk * MR + r] = src[at + kk * cs];
                        }
                    } else {
                        for kk in 0..kc {
                            panel[kk * MR + r] = 0.0;
                        }
                    }
                }
            }
            let (first, last) = (b == 0, b + 1 == blocks);
            let tail = if last { epilogue } else { Epilogue::None };
            for p in panels.clone() {
                let wp = self.w.data.as_ptr().add(p * NR * k + k0 * NR);
                let (c0, cols) = (p * NR, NR.min(o - p * NR));
                let bias = tail.bias().map(|b| &b[c0..c0 + cols]);
                for m in 0..micro {
                    let row = rows.start + m * MR;
                    tile(
                        kc,
                        packed.as_ptr().add(m * MR * kc),
                        wp,
                        dst.0.add(row * stride + c0),
                        stride,
                        MR.min(n - m * MR),
                        cols,
                        self.scale,
                        self.accumulate || !first,
                        bias,
                        tail.gelu(),
                    );
                }
            }
        }
    }
}

/// The 6 × 16 register tile: `c = scale · a · b (+ c)` over `kc` inputs, then the bias and GELU, stored into
/// the `rows × cols` valid part.
///
/// # Safety
/// AVX2 and FMA are present; `a` holds `kc × 6` floats, `b` `kc × 16`, `c` `rows` rows of `cols` floats `ldc`
/// apart; `bias` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    accumulate: bool,
    bias: Option<&[f32]>,
    gelu: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for kk in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(kk * NR));
        let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(kk * MR + r));
            acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
        }
    }
    if scale != 1.0 {
        let s = _mm256_set1_ps(scale);
        for acc in acc.iter_mut() {
            acc[0] = _mm256_mul_ps(acc[0], s);
            acc[1] = _mm256_mul_ps(acc[1], s);
        }
    }
    let mut t = [[0f32; NR]; MR];
    if rows == MR && cols == NR {
        for (r, acc) in acc.iter_mut().enumerate() {
            if accumulate {
                acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(c.add(r * ldc)));
                acc[1] = _mm256_add_ps(acc[1], _mm256_loadu_ps(c.add(r * ldc + 8)));
            }
            if let Some(bias) = bias {
                acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(bias.as_ptr()));
                acc[1] = _mm256_add_ps(acc[1], _mm256_loadu_ps(bias.as_ptr().add(8)));
            }
            if !gelu {
                _mm256_storeu_ps(c.add(r * ldc), acc[0]);
                _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
            } else {
                _mm256_storeu_ps(t[r].as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(t[r].as_mut_ptr().add(8), acc[1]);
            }
        }
        if gelu {
            for v in t.as_flattened_mut() {
                *v = super::math::gelu(*v);
            }
            for (r, t) in t.iter().enumerate() {
                std::ptr::copy_nonoverlapping(t.as_ptr(), c.add(r * ldc), NR);
            }
        }
        return;
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(t[r].as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(t[r].as_mut_ptr().add(8), acc[1]);
    }
    for (r, t) in t.iter().enumerate().take(rows) {
        for (j, &v) in t.iter().enumerate().take(cols) {
            let at = c.add(r * ldc + j);
            let mut v = if accumulate { v + *at } else { v };
            if let Some(bias) = bias {
                v += bias[j];
            }
            *at = if gelu { super::math::gelu(v) } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_the_naive_product_with_each_epilogue() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Edges in every direction: partial tiles, panels and tasks, three depth blocks, one row, no inputs.
        for (n, o, k) in
            [(1, 1, 1), (7, 17, 5), (100, 33, 385), (97, 48, 800), (200, 16, 384), (50, 20, 3100), (3, 5, 0)]
        {
            let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..o * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..o).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let packed = pack_weights(&w, o, k);
            for epilogue in [Epilogue::None, Epilogue::Bias(&bias), Epilogue::BiasGelu(&bias)] {
                let stride = o + 3;
                let mut out = vec![7f32; n * stride];
                linear(&x, n, &packed, epilogue, &mut out, stride);
                for i in 0..n {
                    for j in 0..o {
                        let dot: f64 = (0..k).map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l])).sum();
                        let want = match epilogue {
                            Epilogue::None => dot as f32,
                            Epilogue::Bias(b) => dot as f32 + b[j],
                            Epilogue::BiasGelu(b) => super::super::math::gelu(dot as f32 + b[j]),
                        };
                        let got = out[i * stride + j];
                        assert!((got - want).abs() < 1e-4, "{n}×{o}×{k} {epilogue:?} at ({i},{j}): {got} vs {want}");
                    }
                    assert!(out[i * stride + o..(i + 1) * stride].iter().all(|&v| v == 7.0), "row gaps untouched");
                }
            }
        }
    }

    #[test]
    fn matmul_matches_the_naive_product_with_transposes_strides_scale_and_accumulation() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for (m, n, k) in [(1, 1, 1), (13, 17, 5), (150, 40, 1700)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            // b as a column block of a wider matrix: rows of n + 3, two values before the block.
            let wide: Vec<f32> = (0..k * (n + 3))
                .map(|i| match i % (n + 3) {
                    c if (2..n + 2).contains(&c) => b[(i / (n + 3)) * n + c - 2],
                    _ => 9.0,
                })
                .collect();
            for (a_t, b_layout, accumulate) in [(false, 0, false), (true, 1, true), (true, 2, false), (false, 1, true)]
            {
                let av = if a_t { View::new(&at, k, m).t() } else { View::new(&a, m, k) };
                let bv = match b_layout {
                    0 => View::new(&b, k, n),
                    1 => View::new(&bt, n, k).t(),
                    _ => View::strided(&wide[2..], k, n, n + 3),
                };
                let mut c = vec![1f32; m * (n + 1)];
                matmul(ViewMut::strided(&mut c, m, n, n + 1), av, bv, 2.0, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j])).sum();
                        let want = 2.0 * dot as f32 + if accumulate { 1.0 } else { 0.0 };
                        let got = c[i * (n + 1) + j];
                        assert!((got - want).abs() < 1e-4, "{m}x{n}x{k} a_t {a_t} b {b_layout} at ({i},{j})");
                    }
                    assert_eq!(c[i * (n + 1) + n], 1.0, "the gap between rows is untouched");
                }
            }
        }
    }
}
