//! Branch-free `exp`, `erf` and GELU for loops the compiler vectorises. `simd` runs a closure compiled for
//! the best instruction set the CPU has (AVX2 + FMA or AVX-512 where present), chosen at run time, so the
//! binary stays portable. Also the dropout masks drawn from a seed.

use rayon::prelude::*;

/// Runs `f` with the widest vector instructions this CPU supports enabled (through `pulp`'s dispatch).
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `eˣ` with a relative error below 3e-7 (two ulp); exactly 0 below -87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    // x = k ln2 + r with |r| <= ln2 / 2, then eˣ = 2ᵏ eʳ, eʳ by its Taylor polynomial to r⁶ (error < r⁷/7!).
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer without a call to `floorf`.
    const ROUND: f32 = 12_582_912.0;
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = r.mul_add(1.0 / 720.0, 1.0 / 120.0);
    let p = r.mul_add(p, 1.0 / 24.0);
    let p = r.mul_add(p, 1.0 / 6.0);
    let p = r.mul_add(p, 0.5);
    let p = r.mul_add(p, 1.0);
    let p = r.mul_add(p, 1.0);
    // 2ᵏ from the bits of the shifted value, whose low mantissa bits hold k + 2²²: integer operations only (a
    // float-to-int `as` saturates, and its fix-ups kept this loop from vectorising: 4.7× slower).
    let two_k = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_k
    }
}

/// The error function, absolute error below 3e-7: `x P(x²) / Q(x²)` on |x| ≤ 3.92 and ±1 beyond (erf(3.92) is
/// 1 - 3.3e-8), P of degree 6 and Q of degree 4, fitted by `scripts/fit_erf.py` (1e-7 in exact arithmetic).
/// Ten fused multiply-adds, two multiplies and a division, no `exp`: about half the instructions of A&S 7.1.26
/// with its `exp`, which GELU's forward pass is bound by.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: [f32; 7] =
        [1.128_378_9, 2.056_676_2e-1, 5.132_559e-2, 3.935_289_4e-3, 1.466_265_8e-4, -1.954_481_1e-6, 1.940_435_8e-8];
    const Q: [f32; 5] = [1.0, 5.155_982_4e-1, 1.173_654_5e-1, 1.483_459_9e-2, 1.010_033_2e-3];
    let x = x.clamp(-3.92, 3.92);
    let x2 = x * x;
    let p = x2.mul_add(P[6], P[5]);
    let p = x2.mul_add(p, P[4]);
    let p = x2.mul_add(p, P[3]);
    let p = x2.mul_add(p, P[2]);
    let p = x2.mul_add(p, P[1]);
    let p = x2.mul_add(p, P[0]);
    let q = x2.mul_add(Q[4], Q[3]);
    let q = x2.mul_add(q, Q[2]);
    let q = x2.mul_add(q, Q[1]);
    let q = x2.mul_add(q, Q[0]);
    x * p / q
}

/// `(erf(x), e^(-x²))`, the second computed on the way (Abramowitz & Stegun 7.1.26, absolute error below 5e-7
/// in f32): where `e^(-x²)` is needed too, this is cheaper than `erf` and an `exp`.
#[inline(always)]
fn erf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t.mul_add(1.061_405_4, -1.453_152);
    let poly = t.mul_add(poly, 1.421_413_7);
    let poly = t.mul_add(poly, -0.284_496_74);
    let poly = t.mul_add(poly, 0.254_829_6);
    let poly = t * poly;
    let gauss = exp(-a * a);
    let y = 1.0 - poly * gauss;
    (if x < 0.0 { -y } else { y }, gauss)
}

// Reductions with 16 independent partial sums: a single running sum is a sequential chain the compiler must
// not reorder, so it would stay scalar (and keep the whole loop around it scalar). The lanes are added in a fixed
// order, so results do not depend on scheduling.
const LANES: usize = 16;

// The terms are read through `chunks_exact` rather than by index: an indexed read is bounds-checked, and the
// checks kept these loops scalar (softmax's max: 3-5x slower).
#[inline(always)]
fn reduce1(x: &[f32], init: f32, term: impl Fn(f32) -> f32, combine: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut tail = init;
    for &v in chunks.remainder() {
        tail = combine(tail, term(v));
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = combine(*a, term(v));
        }
    }
    acc.iter().fold(tail, |a, &b| combine(a, b))
}

/// [`reduce1`] over the terms of two slices of one length.
#[inline(always)]
fn reduce2(x: &[f32], y: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0f32; LANES];
    let full = n - n % LANES;
    let mut tail = 0.0;
    for (&a, &b) in x[full..].iter().zip(&y[full..]) {
        tail += term(a, b);
    }
    for (cx, cy) in x[..full].chunks_exact(LANES).zip(y[..full].chunks_exact(LANES)) {
        for ((a, &u), &v) in acc.iter_mut().zip(cx).zip(cy) {
            *a += term(u, v);
        }
    }
    acc.iter().fold(tail, |a, &b| a + b)
}

/// `Σ x`.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    reduce1(
        x,
        0.0,
        #[inline(always)]
        |v| v,
        #[inline(always)]
        |a, b| a + b,
    )
}

/// `Σ (x - c)²`.
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    reduce1(
        x,
        0.0,
        #[inline(always)]
        |v| (v - c) * (v - c),
        #[inline(always)]
        |a, b| a + b,
    )
}

/// `Σ a b` over the shorter length.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce2(
        a,
        b,
        #[inline(always)]
        |x, y| x * y,
    )
}

/// `Σ a b c` over the shortest length.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; LANES];
    let full = n - n % LANES;
    let mut tail = 0.0;
    for ((&x, &y), &z) in a[full..].iter().zip(&b[full..]).zip(&c[full..]) {
        tail += x * y * z;
    }
    let chunks = a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)).zip(c[..full].chunks_exact(LANES));
    for ((ca, cb), cc) in chunks {
        for (((s, &x), &y), &z) in acc.iter_mut().zip(ca).zip(cb).zip(cc) {
            *s += x * y * z;
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// `Σ e^(x - c)`.
#[inline(always)]
pub fn sum_exp(x: &[f32], c: f32) -> f32 {
    reduce1(
        x,
        0.0,
        #[inline(always)]
        |v| exp(v - c),
        #[inline(always)]
        |a, b| a + b,
    )
}

/// The largest element (`-∞` for an empty slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    reduce1(
        x,
        f32::NEG_INFINITY,
        #[inline(always)]
        |v| v,
        #[inline(always)]
        |a, b| if b > a { b } else { a },
    )
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU, `x Φ(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `(gelu(x), gelu'(x))` for the price of one: erf(x/√2) already computes e^(-x²/2), which φ(x) needs.
#[inline(always)]
pub fn gelu_and_grad(x: f32) -> (f32, f32) {
    let (erf, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    (x * cdf, cdf + x * FRAC_1_SQRT_2PI * gauss)
}

/// `d gelu(x) / dx = Φ(x) + x φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011; the generator PyTorch
/// and JAX draw dropout masks from on GPUs): four 32-bit words from a 128-bit counter and a 64-bit key, by ten
/// rounds of multiply-xor. Counter-based, so any part of a stream is drawn without the rest.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(0x9E37_79B9), k[1].wrapping_add(0xBB67_AE85)];
        }
        let p0 = u64::from(0xD251_1F53u32) * u64::from(c[0]);
        let p1 = u64::from(0xCD9E_8D57u32) * u64::from(c[2]);
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// Philox4x32-10 on 16 consecutive counters `(first + j, 0, 0, 0)` at once, word by word (so the rounds
/// vectorise): `out[w][j]` is word `w` of counter `first + j`.
#[inline(always)]
fn philox_16(first: u64, key: [u32; 2]) -> [[u32; 16]; 4] {
    let counter = |j: usize| first + j as u64;
    let mut c = [
        std::array::from_fn(|j| counter(j) as u32),
        std::array::from_fn(|j| (counter(j) >> 32) as u32),
        [0u32; 16],
        [0u32; 16],
    ];
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(0x9E37_79B9), k[1].wrapping_add(0xBB67_AE85)];
        }
        let mut next = [[0u32; 16]; 4];
        for j in 0..16 {
            let p0 = u64::from(0xD251_1F53u32) * u64::from(c[0][j]);
            let p1 = u64::from(0xCD9E_8D57u32) * u64::from(c[2][j]);
            next[0][j] = (p1 >> 32) as u32 ^ c[1][j] ^ k[0];
            next[1][j] = p1 as u32;
            next[2][j] = (p0 >> 32) as u32 ^ c[3][j] ^ k[1];
            next[3][j] = p0 as u32;
        }
        c = next;
    }
    c
}

/// The dropout mask of `seed` (`crate::layers::DropoutRng::next_seed`): `n` multipliers, 0 with probability `p`,
/// `1 / (1 - p)` otherwise, from Philox4x32-10 keyed by the seed, 16 bits per element: element
/// `128 b + 32 w + 16 h + j` compares half `h` (low, high) of word `w` of counter `16 b + j` against
/// `round(p · 2¹⁶)` (so a block's halves land in contiguous runs; the rate is `p` to within 2⁻¹⁷, and one
/// draw of the generator serves 8 elements, half the cost of a 32-bit comparison, which made the masks of a
/// training step the larger part of its random-number time). Any chunk is drawn on its own: the mask is filled
/// in parallel and does not depend on the number of threads.
pub fn mask_of_seed(seed: u64, n: usize, p: f32) -> Vec<f32> {
    // Every element is written by `fill_mask`, so a reused buffer will do.
    let mut mask = super::pool::take(n);
    fill_mask(seed, p, &mut mask);
    mask
}

/// Writes the mask of `seed` ([`mask_of_seed`], `mask.len()` elements) into `mask`, so that the masks of
/// several seeds can be drawn side by side into one buffer.
pub fn fill_mask(seed: u64, p: f32, mask: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| fill_mask_at(seed, p, i * CHUNK, chunk));
}

/// Writes elements `offset .. offset + mask.len()` of the mask of `seed` ([`mask_of_seed`]) into `mask`, on
/// the calling thread: a kernel that keeps the seed draws the part of the mask it reads where it reads it,
/// instead of reading a mask drawn whole.
pub fn fill_mask_at(seed: u64, p: f32, offset: usize, mask: &mut [f32]) {
    // Dropped where the half-word is below the threshold; 2¹⁶ (p = 1) drops everything.
    let threshold = (f64::from(p) * 65536.0).round() as u32;
    let scale = 1.0 / (1.0 - p);
    let key = [seed as u32, (seed >> 32) as u32];
    simd(
        #[inline(always)]
        || {
            // A start inside a block: that block drawn whole, its tail copied.
            let skip = offset % 128;
            let mut rest = &mut mask[..];
            if skip > 0 && !rest.is_empty() {
                let mut first = [0f32; 128];
                mask_block(offset / 128, key, threshold, scale, &mut first);
                let take = rest.len().min(128 - skip);
                rest[..take].copy_from_slice(&first[skip..skip + take]);
                rest = &mut rest[take..];
            }
            for (b, out) in rest.chunks_mut(128).enumerate() {
                mask_block(offset.div_ceil(128) + b, key, threshold, scale, out);
            }
        },
    )
}

/// `out = x ∘ mask` with the mask of `seed` ([`mask_of_seed`], `x.len()` elements), drawn chunk by chunk into
/// `out` and multiplied there while the chunk is in cache: dropout applied from its seed, without a mask in
/// memory. In parallel; the result does not depend on the number of threads.
pub fn fill_dropped(seed: u64, p: f32, x: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    assert_eq!(x.len(), out.len(), "fill_dropped: input and output sizes differ");
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(i, (chunk, x))| {
        fill_mask_at(seed, p, i * CHUNK, chunk);
        simd(
            #[inline(always)]
            || {
                for (o, &x) in chunk.iter_mut().zip(x) {
                    *o *= x;
                }
            },
        )
    });
}

/// Block `b` of a mask (elements `128 b ..`), from Philox's counters `16 b .. 16 b + 15`; a short `out` takes its
/// first elements. Inlined into its caller's vectorised closure (compiled for the CPU's instruction set).
#[inline(always)]
fn mask_block(b: usize, key: [u32; 2], threshold: u32, scale: f32, out: &mut [f32]) {
    let words = philox_16((b * 16) as u64, key);
    for (run, (word, half)) in out.chunks_mut(16).zip(words.iter().flat_map(|w| [(w, 0u32), (w, 16u32)])) {
        for (m, &r) in run.iter_mut().zip(word) {
            *m = if (r >> half) & 0xFFFF >= threshold { scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123s_known_answers() {
        // Random123's tests/kat_vectors for philox4x32_10.
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
        // The 16-wide form is the same generator.
        let key = [0x1234_5678, 0x9abc_def0];
        let wide = philox_16(5 << 32, key);
        for j in 0..16u32 {
            let got = wide.map(|word| word[j as usize]);
            assert_eq!(got, philox4x32_10([j, 5, 0, 0], key));
        }
    }

    #[test]
    fn any_part_of_a_mask_is_drawn_on_its_own() {
        let whole = mask_of_seed(7, 3 * 65536 + 300, 0.1);
        for (offset, len) in [(0, 5), (3, 100), (100, 300), (128, 128), (250, 7), (65530, 200), (3 * 65536, 300)] {
            let mut part = vec![f32::NAN; len];
            fill_mask_at(7, 0.1, offset, &mut part);
            assert_eq!(part, whole[offset..offset + len], "offset {offset}, {len} elements");
        }
    }

    #[test]
    fn dropout_from_a_seed_is_the_input_times_its_mask() {
        // Across the chunks drawn in parallel, with a length that ends inside a block.
        let n = 3 * (1 << 14) + 300;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mask = mask_of_seed(11, n, 0.2);
        let mut out = vec![f32::NAN; n];
        fill_dropped(11, 0.2, &x, &mut out);
        let expected: Vec<f32> = x.iter().zip(&mask).map(|(x, m)| x * m).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn dropout_masks_drop_at_their_rate_from_any_chunk() {
        let n = (1 << 20) + 77;
        let mask = mask_of_seed(42, n, 0.1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        // 1 M draws: the rate's standard error is 0.0003.
        assert!((dropped - 0.1).abs() < 0.0015, "dropped {dropped}");
        assert!(mask.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
        // A prefix is the same mask's prefix, and another seed draws another mask.
        assert_eq!(mask_of_seed(42, 1000, 0.1), mask[..1000]);
        assert_ne!(mask_of_seed(43, 1000, 0.1), mask[..1000]);
        // Neighbours are independent: P(both dropped) ≈ p², and so are the two halves of a word (16 apart).
        for gap in [1, 16] {
            let pairs = mask.iter().zip(&mask[gap..]).filter(|(a, b)| **a == 0.0 && **b == 0.0).count() as f64
                / (n - gap) as f64;
            assert!((pairs - 0.01).abs() < 0.0006, "pairs {gap} apart {pairs}");
        }
    }

    #[test]
    fn reductions_match_plain_loops() {
        for n in [0, 1, 15, 16, 17, 100, 384] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
            let c: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
            let close = |x: f32, y: f64| (f64::from(x) - y).abs() < 1e-4 * (1.0 + y.abs());
            let f = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            let (a64, b64, c64) = (f(&a), f(&b), f(&c));
            assert!(close(sum(&a), a64.iter().sum()));
            assert!(close(sum_sq_dev(&a, 0.5), a64.iter().map(|x| (x - 0.5) * (x - 0.5)).sum()));
            assert!(close(dot(&a, &b), a64.iter().zip(&b64).map(|(x, y)| x * y).sum()));
            assert!(close(dot3(&a, &b, &c), (0..n).map(|i| a64[i] * b64[i] * c64[i]).sum()));
            assert_eq!(max(&a), a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        }
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan(), "a NaN stays a NaN (the training loop skips such steps)");
    }

    #[test]
    fn erf_and_gelu_match_f64_references() {
        // erf(x) in f64: its Taylor series up to |x| = 2.5, beyond that 1 - erfc(x) from erfc's continued
        // fraction e^(-x²)/√π / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
        let erf64 = |x: f64| -> f64 {
            if x.abs() > 2.5 {
                let a = x.abs();
                let mut t = a;
                for k in (1..=80).rev() {
                    t = a + f64::from(k) / 2.0 / t;
                }
                return x.signum() * (1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / t);
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let (mut worst, mut worst_gauss) = (0f64, 0f64);
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let e = erf64(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - e).abs());
            worst_gauss = worst_gauss.max((f64::from(erf_and_gauss(x).0) - e).abs());
            let g = 0.5 * f64::from(x) * (1.0 + erf64(f64::from(x) / std::f64::consts::SQRT_2));
            assert!((f64::from(gelu(x)) - g).abs() < 2e-6, "gelu({x})");
            // The derivative against a central difference of the f64 GELU.
            let h = 1e-4;
            let g64 = |x: f64| 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let d = (g64(f64::from(x) + h) - g64(f64::from(x) - h)) / (2.0 * h);
            assert!((f64::from(gelu_grad(x)) - d).abs() < 1e-5, "gelu'({x})");
            let (g, dg) = gelu_and_grad(x);
            assert!(
                (g - gelu(x)).abs() <= 1e-6 * (1.0 + g.abs()) && (dg - gelu_grad(x)).abs() <= 1e-6,
                "gelu_and_grad({x})"
            );
        }
        assert!(worst < 3e-7, "erf: absolute error {worst}");
        assert!(worst_gauss < 5e-7, "erf_and_gauss: absolute error {worst_gauss}");
        assert!(
            gelu(f32::NAN).is_nan()
                && (erf(f32::INFINITY) - 1.0).abs() < 3e-7
                && erf(f32::NEG_INFINITY) == -erf(f32::INFINITY)
        );
    }
}
