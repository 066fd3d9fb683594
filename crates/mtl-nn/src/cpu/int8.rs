//! int8 for inference: each linear layer's weight is stored as int8 with one f32 scale per output
//! channel (symmetric, `w ≈ q · scale`, `scale = max |w_row| / 127`), a quarter of its f32 size. On a CPU
//! with AMX-INT8 or AVX2 the products quantise each token's activations too and multiply int8 by int8
//! ([`Int8Compute::Dynamic`]); elsewhere (and when asked) activations stay f32 ([`Int8Compute::WeightOnly`]). On a batch of many tokens a product dequantises the weight in one parallel pass and runs the f32
//! path's `gemm` on it (the pass costs a few percent of the product); on a few tokens (a request or two), where
//! reading the weights is the cost, each thread dequantises blocks of 64 weight rows into cache and multiplies
//! them there, reading a quarter of the f32 bytes.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::encoder::{infer, Dims, LayerWeights, Proj};
use super::gemm::{matmul, Threads, View, ViewMut};
use super::math::simd;

/// Weight rows dequantised at a time.
const BLOCK: usize = 64;
/// Input rows per thread from which a product dequantises the whole weight first.
const MIN_ROWS: usize = 32;

/// A `rows × cols` weight matrix (`[out, in]`, PyTorch's layout) in int8 with one scale per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Matrix {
    /// Quantises a row-major f32 matrix: each row by its own scale, to the nearest of -127..=127 (ties away
    /// from zero). A row of zeros gets scale 0.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "int8: weight of {} values is not {rows} × {cols}", w.len());
        let mut data = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        data.par_chunks_mut(cols.max(1)).zip(w.par_chunks(cols.max(1))).zip(scales.par_iter_mut()).for_each(
            |((q, w), s)| {
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                *s = amax / 127.0;
                if amax > 0.0 {
                    for (q, &v) in q.iter_mut().zip(w) {
                        *q = (v / *s).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            },
        );
        Self { rows, cols, data, scales }
    }

    /// A matrix from stored values and scales, checked.
    pub fn from_parts(rows: usize, cols: usize, data: Vec<i8>, scales: Vec<f32>) -> Result<Self, String> {
        if data.len() != rows * cols || scales.len() != rows {
            return Err(format!(
                "{} values and {} scales do not make a {rows} × {cols} matrix",
                data.len(),
                scales.len()
            ));
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(format!("scale {s} is not a finite non-negative number"));
        }
        Ok(Self { rows, cols, data, scales })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &[i8] {
        &self.data
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Rows `start..end` as a matrix of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> Self {
        Self {
            rows: end - start,
            cols: self.cols,
            data: self.data[start * self.cols..end * self.cols].to_vec(),
            scales: self.scales[start..end].to_vec(),
        }
    }

    /// Matrices of the same width, one under the other.
    pub fn stack(parts: &[&Self]) -> Self {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "int8: stacked matrices must have the same width");
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            scales: parts.iter().flat_map(|p| p.scales.iter().copied()).collect(),
        }
    }

    /// The f32 matrix the int8 one stands for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.data.len()];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    fn dequantize_rows(&self, start: usize, count: usize, dst: &mut [f32]) {
        let c = self.cols;
        simd(
            #[inline(always)]
            || {
                for (r, row) in dst[..count * c].chunks_exact_mut(c.max(1)).enumerate() {
                    let s = self.scales[start + r];
                    let q = &self.data[(start + r) * c..(start + r + 1) * c];
                    for (d, &q) in row.iter_mut().zip(q) {
                        *d = f32::from(q) * s;
                    }
                }
            },
        )
    }

    /// Writes `x Wᵀ + bias` into `out` (`n × rows`), `x` being `n × cols`.
    pub fn linear(&self, x: &[f32], n: usize, bias: &[f32], out: &mut [f32]) {
        let (o, k) = (self.rows, self.cols);
        assert!(x.len() == n * k && out.len() == n * o && bias.len() == o, "int8 linear: shapes do not match");
        if n == 0 || o == 0 {
            return;
        }
        if k == 0 {
            for row in out.chunks_exact_mut(o) {
                row.copy_from_slice(bias);
            }
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        if n >= MIN_ROWS * threads {
            // Many rows: the product dominates. The whole weight is dequantised once (in parallel, a pass
            // over memory) and the f32 product runs on every thread, as the f32 path's does.
            let mut w = vec![0f32; o * k];
            w.par_chunks_mut(BLOCK * k)
                .enumerate()
                .for_each(|(b, chunk)| self.dequantize_rows(b * BLOCK, chunk.len() / k, chunk));
            out.par_chunks_mut(o * MIN_ROWS).for_each(|chunk| {
                for row in chunk.chunks_exact_mut(o) {
                    row.copy_from_slice(bias);
                }
            });
            matmul(ViewMut::new(out, n, o), View::new(x, n, k), View::new(&w, o, k).t(), 1.0, true, Threads::All);
        } else {
            // Few rows (a request or two): the weight blocks are shared out instead, each task writing its
            // columns to a block of its own.
            let blocks: Vec<Vec<f32>> = (0..o.div_ceil(BLOCK))
                .into_par_iter()
                .map(|b| {
                    let (start, len) = (b * BLOCK, BLOCK.min(o - b * BLOCK));
                    let mut w = vec![0f32; len * k];
                    self.dequantize_rows(start, len, &mut w);
                    let mut y = vec![0f32; n * len];
                    for row in y.chunks_exact_mut(len) {
                        row.copy_from_slice(&bias[start..start + len]);
                    }
                    matmul(
                        ViewMut::new(&mut y, n, len),
                        View::new(x, n, k),
                        View::new(&w, len, k).t(),
                        1.0,
                        true,
                        Threads::One,
                    );
                    y
                })
                .collect();
            for (b, y) in blocks.iter().enumerate() {
                let (start, len) = (b * BLOCK, BLOCK.min(o - b * BLOCK));
                for (dst, src) in out.chunks_exact_mut(o).zip(y.chunks_exact(len)) {
                    dst[start..start + len].copy_from_slice(src);
                }
            }
        }
    }
}

/// How an int8 layer multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Compute {
    /// Weight-only: the int8 weights dequantised into the f32 product; activations stay f32.
    WeightOnly,
    /// Dynamic quantisation (as ONNX Runtime's and PyTorch's dynamic int8): each token's activations
    /// quantised to int8 by their own scale at every product, int8 × int8 summed in i32 on AMX
    /// ([`super::amx::linear_int8`]), or with AVX2's 16-bit multiplies where the CPU has no AMX-INT8
    /// ([`super::int8_avx2::linear_int8`], the same results). Without either it runs as
    /// [`Int8Compute::WeightOnly`].
    Dynamic,
}

/// Whether this CPU multiplies int8 by int8 (AMX-INT8 or AVX2): [`Int8Compute::Dynamic`] runs there.
pub fn dynamic_available() -> bool {
    super::amx::int8_available() || super::int8_avx2::available()
}

impl Default for Int8Compute {
    /// Dynamic where this CPU has AMX-INT8 or AVX2, weight-only elsewhere.
    fn default() -> Self {
        match dynamic_available() {
            true => Int8Compute::Dynamic,
            false => Int8Compute::WeightOnly,
        }
    }
}

/// One encoder layer with int8 projections; biases and LayerNorms stay f32.
#[derive(Clone, Debug)]
pub struct Int8Layer {
    /// q | k | v (stacked), attention output, intermediate, output: in [`Proj`] order.
    projections: [Int8Matrix; 4],
    biases: [Vec<f32>; 4],
    /// The attention LayerNorm's weight and bias, then the output LayerNorm's.
    norms: [Vec<f32>; 4],
    compute: Int8Compute,
    /// The projections packed for this CPU's int8 products, at their first dynamic product.
    packed: [std::sync::OnceLock<Packed>; 4],
}

/// A projection packed for the int8 × int8 products this CPU runs.
#[derive(Clone, Debug)]
enum Packed {
    /// In AMX's int8 tile layout.
    Amx(super::amx::PackedInt8),
    /// As 16-bit pairs for AVX2.
    Avx2(super::int8_avx2::PackedI16),
}

impl Int8Layer {
    /// `projections` and `biases` in [`Proj`] order (q, k and v stacked), `norms` as [`LayerWeights::norms`].
    pub fn new(projections: [Int8Matrix; 4], biases: [Vec<f32>; 4], norms: [Vec<f32>; 4]) -> Result<Self, String> {
        for (m, b) in projections.iter().zip(&biases) {
            if m.rows != b.len() {
                return Err(format!("a bias of {} values for a projection of {} outputs", b.len(), m.rows));
            }
        }
        Ok(Self { projections, biases, norms, compute: Int8Compute::default(), packed: Default::default() })
    }

    /// Chooses weight-only or dynamic products (see [`Int8Compute`]).
    pub fn set_compute(&mut self, compute: Int8Compute) {
        self.compute = compute;
    }

    /// What this layer runs on this machine.
    pub fn compute(&self) -> Int8Compute {
        match self.compute {
            Int8Compute::Dynamic if dynamic_available() => Int8Compute::Dynamic,
            _ => Int8Compute::WeightOnly,
        }
    }

    pub fn projection(&self, p: Proj) -> &Int8Matrix {
        &self.projections[p as usize]
    }

    /// Bytes the int8 weights and their scales take.
    pub fn weight_bytes(&self) -> usize {
        self.projections.iter().map(|m| m.data.len() + 4 * m.scales.len()).sum()
    }

    fn check(&self, d: &Dims) -> candle_core::Result<()> {
        let (h, i) = (d.hidden, d.intermediate);
        let want = [(3 * h, h), (h, h), (i, h), (h, i)];
        let fits = self.projections.iter().zip(want).all(|(m, (r, c))| m.rows == r && m.cols == c);
        if !fits || self.norms.iter().any(|n| n.len() != h) {
            candle_core::bail!("int8 encoder: layer shapes do not match hidden {h}, intermediate {i}")
        }
        Ok(())
    }
}

impl LayerWeights for Int8Layer {
    fn project(&self, p: Proj, x: &[f32], rows: usize, out: &mut [f32]) {
        let (m, bias) = (&self.projections[p as usize], &self.biases[p as usize]);
        match self.compute() {
            Int8Compute::Dynamic => {
                let packed = self.packed[p as usize].get_or_init(|| match super::amx::int8_available() {
                    true => Packed::Amx(super::amx::pack_weights_int8(m.data(), m.rows, m.cols)),
                    false => Packed::Avx2(super::int8_avx2::pack_weights(m.data(), m.rows, m.cols)),
                });
                match packed {
                    Packed::Amx(w) => super::amx::linear_int8(x, rows, w, m.scales(), bias, out),
                    Packed::Avx2(w) => super::int8_avx2::linear_int8(x, rows, w, m.scales(), bias, out),
                }
            }
            Int8Compute::WeightOnly => m.linear(x, rows, bias, out),
        }
    }

    fn norms(&self) -> [&[f32]; 4] {
        [&self.norms[0], &self.norms[1], &self.norms[2], &self.norms[3]]
    }
}

/// The int8 layer stack as one candle op, for inference (it has no backward pass).
pub struct Int8Encoder {
    pub dims: Dims,
    pub layers: Arc<Vec<Int8Layer>>,
    /// `batch × seq`, 1 for real tokens, 0 for padding.
    pub key_mask: Arc<Vec<u32>>,
    /// MPNet's relative position bias, `heads × seq × seq` ([`super::encoder::PositionBias::values`]).
    pub position_bias: Option<Vec<f32>>,
}

impl CustomOp1 for Int8Encoder {
    fn name(&self) -> &'static str {
        "int8-encoder"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = &self.dims;
        let CpuStorage::F32(data) = storage else { candle_core::bail!("int8 encoder: f32 input only") };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("int8 encoder: input must be contiguous")
        };
        let x0 = &data[a..b];
        let tokens = d.batch * d.seq;
        if x0.len() != tokens * d.hidden
            || self.key_mask.len() != tokens
            || d.heads == 0
            || !d.hidden.is_multiple_of(d.heads)
            || self.position_bias.as_ref().is_some_and(|p| p.len() != d.heads * d.seq * d.seq)
        {
            candle_core::bail!("int8 encoder: input does not match {d:?}")
        }
        for layer in self.layers.iter() {
            layer.check(d)?;
        }
        let pos = self.position_bias.as_deref();
        Ok((CpuStorage::F32(infer(d, &self.layers, x0, &self.key_mask, pos)), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    #[test]
    fn quantisation_rounds_each_row_by_its_own_scale() {
        let w = [0.6, -1.0, 0.25, 0.0, 0.0, 0.0, 2.54, -0.011, 1.0];
        let q = Int8Matrix::quantize(&w, 3, 3);
        assert_eq!(q.scales(), &[1.0 / 127.0, 0.0, 2.54 / 127.0]);
        // 0.6 · 127 = 76.2, 0.25 · 127 = 31.75; -0.011 / 0.02 = -0.55, 1.0 / 0.02 = 50.
        assert_eq!(q.data(), &[76, -127, 32, 0, 0, 0, 127, -1, 50]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let w = random(&mut rng, 40 * 70, 0.3);
        let q = Int8Matrix::quantize(&w, 40, 70);
        for (r, (row, deq)) in w.chunks(70).zip(q.dequantize().chunks(70)).enumerate() {
            let s = q.scales()[r];
            assert!(
                row.iter().zip(deq).all(|(a, b)| (a - b).abs() <= s / 2.0 + 1e-7),
                "row {r} off by more than half a step"
            );
        }
    }

    #[test]
    fn int8_linear_equals_f32_product_with_the_dequantised_weight() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // Output widths that are and are not multiples of the block; few rows and many (both code paths).
        for (n, o, k) in [(1, 3, 5), (7, 64, 33), (5, 130, 48), (200, 130, 48), (301, 64, 96)] {
            let w = random(&mut rng, o * k, 0.5);
            let x = random(&mut rng, n * k, 1.0);
            let bias = random(&mut rng, o, 0.1);
            let q = Int8Matrix::quantize(&w, o, k);
            let deq = q.dequantize();
            let mut got = vec![f32::NAN; n * o];
            q.linear(&x, n, &bias, &mut got);
            for i in 0..n {
                for j in 0..o {
                    let want: f32 = bias[j] + (0..k).map(|l| x[i * k + l] * deq[j * k + l]).sum::<f32>();
                    assert!(
                        (got[i * o + j] - want).abs() < 1e-4,
                        "{n}x{o}x{k} at ({i},{j}): {} vs {want}",
                        got[i * o + j]
                    );
                }
            }
        }
    }

    #[test]
    fn stacking_and_slicing_rows_round_trip() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let parts: Vec<Int8Matrix> =
            (0..3).map(|_| Int8Matrix::quantize(&random(&mut rng, 4 * 6, 1.0), 4, 6)).collect();
        let stacked = Int8Matrix::stack(&parts.iter().collect::<Vec<_>>());
        assert_eq!(stacked.rows(), 12);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(&stacked.slice_rows(4 * i, 4 * (i + 1)), p);
        }
        assert!(Int8Matrix::from_parts(2, 2, vec![1; 4], vec![0.1, f32::NAN]).is_err());
        assert!(Int8Matrix::from_parts(2, 2, vec![1; 3], vec![0.1, 0.1]).is_err());
    }
}
