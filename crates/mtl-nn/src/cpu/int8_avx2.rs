//! int8 × int8 products with AVX2 alone, for CPUs without VNNI or AMX-INT8 (AMD Zen 2 and 3, Intel before Ice
//! Lake): the dynamic quantisation of [`super::amx::linear_int8`] (each token's activations by their own scale,
//! each weight row by its own, sums in exact 32-bit integers), with the same results.
//!
//! Both operands are signed (-127..=127) and held as 16-bit integers: `vpmaddwd` multiplies 16 pairs and sums
//! each two into 32 bits, exactly, one instruction per 16 multiply-accumulates (two f32 FMAs' worth). AVX2's byte
//! multiply (`vpmaddubsw`) takes unsigned × signed bytes only: signed × signed needs a `vpabsb` and a `vpsignb`
//! per product, and on Zen 3 those run on the same two pipes as the multiplies — measured, that kernel reached
//! half the rate of this one's instruction mix. The weights are packed once as 16-bit pairs (half their f32
//! bytes); `mtl-bench rates` gives the instruction rates of the CPU at hand.

#![allow(unsafe_code)]

use rayon::prelude::*;

use super::amx::quantize_rows;

/// Rows a task multiplies (the packed activations are padded to a multiple of it).
const ROWS: usize = 32;
/// Rows of the register block: 4 rows × 16 outputs, 8 accumulators.
const MR: usize = 4;
/// Outputs of a packed panel: two vectors of 8.
const PANEL: usize = 16;

/// Whether this CPU has AVX2.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An int8 weight `[out, in]` packed for [`linear_int8`]: per panel of 16 outputs, `depth / 2` rows of 16
/// outputs' two consecutive inputs as 16-bit integers, zero-padded to whole panels and an even depth.
#[derive(Clone, Debug)]
pub struct PackedI16 {
    out: usize,
    input: usize,
    depth: usize,
    data: Vec<i16>,
}

/// Packs `w` (`out × input`, row-major int8) for [`linear_int8`].
pub fn pack_weights(w: &[i8], out: usize, input: usize) -> PackedI16 {
    assert_eq!(w.len(), out * input, "pack_weights: {} values are not {out} × {input}", w.len());
    let depth = input.next_multiple_of(2).max(2);
    let mut data = vec![0i16; out.div_ceil(PANEL) * PANEL * depth];
    data.par_chunks_mut(PANEL * depth).enumerate().for_each(|(p, panel)| {
        for j in 0..PANEL.min(out - p * PANEL) {
            let row = &w[(p * PANEL + j) * input..][..input];
            for (kk, &v) in row.iter().enumerate() {
                panel[(kk / 2) * 2 * PANEL + 2 * j + kk % 2] = i16::from(v);
            }
        }
    });
    PackedI16 { out, input, depth, data }
}

/// `out = x Wᵀ + bias` (`n × out`) with each row of `x` quantised by its own scale and the products summed in
/// exact integers, as [`super::amx::linear_int8`] computes it. Panics unless [`available`].
pub fn linear_int8(x: &[f32], n: usize, w: &PackedI16, w_scales: &[f32], bias: &[f32], out: &mut [f32]) {
    let (o, k, depth) = (w.out, w.input, w.depth);
    assert!(
        x.len() == n * k && out.len() == n * o && bias.len() == o && w_scales.len() == o,
        "linear_int8: shapes do not match"
    );
    assert!(available(), "int8_avx2::linear_int8 needs AVX2 (check available first)");
    if n == 0 || o == 0 {
        return;
    }
    let (xq, xs) = quantize_rows(x, n, k, n.next_multiple_of(ROWS), depth);
    out.par_chunks_mut(ROWS * o).enumerate().for_each(|(block, out)| {
        let rows = out.len() / o;
        // The task's rows widened to 16 bits (a few KB, in cache for every panel).
        let a: Vec<i16> = xq[block * ROWS * depth..(block + 1) * ROWS * depth].iter().map(|&v| i16::from(v)).collect();
        let scales = &xs[block * ROWS..][..rows];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is present (asserted above); `a` holds ROWS rows of `depth` values, `w.data` the packed
        // panels, `out` `rows × o` values.
        unsafe {
            rows_block(&a, depth, &w.data, o, scales, w_scales, bias, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AVX2 is x86-64 only: {a:?} {scales:?}");
    });
}

/// One task's rows (`out.len() / o` of them, at most [`ROWS`]) against every panel of 16 outputs: the panel
/// outer, so that it stays in cache for the rows, which stay there for the panels.
///
/// # Safety
/// AVX2 is present; `a` has `ROWS × depth` values (zero past the real rows), `data` the packed panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block(
    a: &[i16],
    depth: usize,
    data: &[i16],
    o: usize,
    x_scales: &[f32],
    w_scales: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows = out.len() / o;
    assert!(a.len() >= rows.next_multiple_of(MR) * depth && data.len() >= o.div_ceil(PANEL) * PANEL * depth);
    for p in 0..o.div_ceil(PANEL) {
        let panel = data[p * PANEL * depth..(p + 1) * PANEL * depth].as_ptr();
        let cols = PANEL.min(o - p * PANEL);
        for r0 in (0..rows).step_by(MR) {
            let a0 = a[r0 * depth..(r0 + MR) * depth].as_ptr();
            let mut acc = [[_mm256_setzero_si256(); 2]; MR];
            for t in 0..depth / 2 {
                // Outputs 0-7 and 8-15 of the panel, two inputs each.
                let b0 = _mm256_loadu_si256(panel.add(t * 2 * PANEL).cast());
                let b1 = _mm256_loadu_si256(panel.add(t * 2 * PANEL + PANEL).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(a0.add(r * depth + 2 * t).cast::<i32>().read_unaligned());
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, b0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, b1));
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows - r0) {
                let row = r0 + r;
                let sx = x_scales[row];
                let c = p * PANEL;
                let dst = &mut out[row * o + c..][..cols];
                if cols == PANEL {
                    // bias + (sum · sx) · w_scale, rounded as the scalar form below (no fused multiply-add).
                    for (half, &acc) in acc.iter().enumerate() {
                        let at = c + 8 * half;
                        let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx));
                        let w = _mm256_loadu_ps(w_scales[at..at + 8].as_ptr());
                        let y = _mm256_add_ps(_mm256_loadu_ps(bias[at..at + 8].as_ptr()), _mm256_mul_ps(scaled, w));
                        _mm256_storeu_ps(dst[8 * half..8 * half + 8].as_mut_ptr(), y);
                    }
                    continue;
                }
                let mut sums = [0i32; PANEL];
                _mm256_storeu_si256(sums.as_mut_ptr().cast(), acc[0]);
                _mm256_storeu_si256(sums.as_mut_ptr().add(8).cast(), acc[1]);
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = bias[c + j] + sums[j] as f32 * sx * w_scales[c + j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_product_is_exact_on_the_quantised_rows() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        super::super::amx::tests::assert_exact_int8_product(|x, n, w, (o, k), ws, bias, out| {
            linear_int8(x, n, &pack_weights(w, o, k), ws, bias, out)
        });
    }
}
