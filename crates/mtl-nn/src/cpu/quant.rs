//! Frozen weight matrices kept in their GGUF block formats (Q4_0, Q4_1, Q8_0, the K-quants, …) and multiplied
//! without ever being dequantised whole: each product dequantises a few rows at a time into a small buffer
//! that stays in cache and runs the f32 matrix product on it. The result equals the product with the
//! dequantised matrix (the activations stay f32: no 8-bit rounding of the inputs as in llama.cpp's integer
//! dot products), so a LoRA trained on a quantised base learns against exactly the weights it will run with.
//! Products with a few input rows (decoding a few sequences) of Q4_0, Q4_1 and Q8_0 go further: each block is
//! decoded in registers and multiplied into every input row there, and no dequantised row is ever written.
//!
//! The legacy formats (Q4_0, Q4_1, Q8_0) are dequantised here, in loops the compiler vectorises for the CPU
//! at hand; the others go through candle's `GgmlType::to_float`. Backward gives the input's gradient only:
//! these weights never train.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::gemm::{matmul, Threads, View, ViewMut};
use super::math::simd;
use crate::{NnError, Result};

/// The most rows dequantised per task of a forward product with fewer than [`MANY_ROWS`] input rows (256
/// rows of 576 columns: 576 KiB, within a core's L2 here; of 2,048 columns, 2 MiB).
const ROWS_PER_TASK: usize = 256;
/// Rows of the matrix dequantised at a time for a product with many input rows.
const BLOCK: usize = 1024;
/// From this many input rows on, a product dequantises blocks in turn and multiplies on every thread.
const MANY_ROWS: usize = 64;
/// Up to this many input rows (decoding a few sequences), Q4_0, Q4_1 and Q8_0 products decode each block in
/// registers and multiply it into every input row there: the dequantised rows are never written out. (On
/// the 2-core AVX-512 machine of BENCHMARKS.md, 1,536 × 576 Q4_1: 131 µs against 174 at 16 rows, 177
/// against 167 at 20.)
const FUSED_ROWS: usize = 16;
/// Rows of the matrix per task of a fused product.
const FUSED_ROWS_PER_TASK: usize = 16;

/// Whether products with few input rows take the fused path for `dtype` on this CPU.
fn fused_format(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0);
    }
    let _ = dtype;
    false
}

/// A frozen `[rows, cols]` matrix in a GGUF block format.
#[derive(Debug)]
pub struct QuantMatrix {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl QuantMatrix {
    /// `q` must be 2-D and on the CPU.
    pub fn new(q: QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let dtype = q.dtype();
        if !matches!(q.device(), Device::Cpu) {
            return Err(NnError::Unsupported("quantised weights live on the CPU".into()));
        }
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(NnError::Input(format!("{cols} columns are not whole {dtype:?} blocks")));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let matrix = Self { q: Arc::new(q), rows, cols, row_bytes };
        if matrix.bytes().len() != rows * row_bytes {
            return Err(NnError::Input(format!("a {dtype:?} matrix of {rows} × {cols} with the wrong byte count")));
        }
        Ok(matrix)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes the matrix takes.
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    fn bytes(&self) -> &[u8] {
        match self.q.data().expect("a CPU quantised tensor has its data in memory") {
            std::borrow::Cow::Borrowed(b) => b,
            std::borrow::Cow::Owned(_) => unreachable!("CPU storage is borrowed"),
        }
    }

    /// Rows `first..first + out.len() / cols` as f32, into `out`.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        let bytes = &self.bytes()[first * self.row_bytes..(first + n) * self.row_bytes];
        dequantize(self.dtype(), bytes, out);
    }

    /// The whole matrix as an f32 tensor (full fine-tuning, other devices).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(ROWS_PER_TASK * self.cols)
            .enumerate()
            .for_each(|(c, chunk)| self.dequantize_rows(c * ROWS_PER_TASK, chunk));
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// The rows `ids` (an embedding lookup), `[ids, cols]`.
    pub fn embedding(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(NnError::Input(format!("token id {bad} is outside the vocabulary of {}", self.rows)));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols).zip(ids.par_iter()).for_each(|(row, &id)| self.dequantize_rows(id as usize, row));
        Ok(out)
    }

    /// `y = x Wᵀ` for `x` of `m × cols`; `y` is `m × rows`. Each task dequantises its own block of rows and
    /// writes its block of `yᵀ`, so tasks share nothing but `x`; `yᵀ` is transposed into `y` at the end.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() == m * cols && y.len() == m * rows, "quantised product: shapes do not match");
        if m == 0 || rows == 0 {
            return;
        }
        if m >= MANY_ROWS {
            // Many rows (training, prompts): blocks of the matrix dequantised in turn (in parallel), each
            // followed by one product on every thread, written into its columns of `y`.
            let mut w = vec![0f32; BLOCK.min(rows) * cols];
            for first in (0..rows).step_by(BLOCK) {
                let n = BLOCK.min(rows - first);
                let w = &mut w[..n * cols];
                w.par_chunks_mut(16 * cols)
                    .enumerate()
                    .for_each(|(c, part)| self.dequantize_rows(first + c * 16, part));
                let yv = ViewMut::strided(&mut y[first..], m, n, rows);
                matmul(yv, View::new(x, m, cols), View::new(w, n, cols).t(), 1.0, false, Threads::All);
            }
            return;
        }
        let mut yt = vec![0f32; rows * m];
        let fused = m <= FUSED_ROWS && fused_format(self.dtype());
        // Fused tasks are small: they need no buffer, and the threads share small matrices evenly. Dequantising
        // ones take about a quarter of the matrix per thread (within 32 to 256 rows): the f32 product gains from
        // longer runs, and each thread still gets a share of a small matrix.
        let task_rows = match fused {
            true => FUSED_ROWS_PER_TASK,
            false => (rows / (4 * rayon::current_num_threads().max(1))).clamp(32, ROWS_PER_TASK).next_multiple_of(16),
        };
        yt.par_chunks_mut(task_rows * m).enumerate().for_each(|(c, yt)| {
            let n = yt.len() / m;
            let first = c * task_rows;
            #[cfg(target_arch = "x86_64")]
            if fused {
                let bytes = &self.bytes()[first * self.row_bytes..(first + n) * self.row_bytes];
                avx2::dot_rows(self.dtype(), bytes, n, cols, x, m, yt);
                return;
            }
            let _ = fused;
            with_buffer(n * cols, |w| {
                self.dequantize_rows(first, w);
                matmul(
                    ViewMut::new(yt, n, m),
                    View::new(w, n, cols),
                    View::new(x, m, cols).t(),
                    1.0,
                    false,
                    Threads::One,
                );
            });
        });
        if m == 1 {
            y.copy_from_slice(&yt);
            return;
        }
        // yᵀ (rows × m) into y (m × rows), in blocks that stay in cache.
        const B: usize = 32;
        y.par_chunks_mut(B * rows).enumerate().for_each(|(ib, yb)| {
            for jb in (0..rows).step_by(B) {
                for (ii, yrow) in yb.chunks_exact_mut(rows).enumerate() {
                    let i = ib * B + ii;
                    for j in jb..(jb + B).min(rows) {
                        yrow[j] = yt[j * m + i];
                    }
                }
            }
        });
    }

    /// `dx (+)= g W` for `g` of `m × rows`; `dx` is `m × cols`: blocks of rows dequantised in turn (in
    /// parallel), each followed by one product on every thread.
    pub fn matmul_acc(&self, g: &[f32], m: usize, dx: &mut [f32], accumulate: bool) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(g.len() == m * rows && dx.len() == m * cols, "quantised product: shapes do not match");
        if !accumulate {
            dx.fill(0.0);
        }
        if m == 0 {
            return;
        }
        let mut w = vec![0f32; BLOCK.min(rows) * cols];
        for first in (0..rows).step_by(BLOCK) {
            let n = BLOCK.min(rows - first);
            let w = &mut w[..n * cols];
            w.par_chunks_mut(16 * cols).enumerate().for_each(|(c, part)| self.dequantize_rows(first + c * 16, part));
            let gv = View::strided(&g[first..], m, n, rows);
            matmul(ViewMut::new(dx, m, cols), gv, View::new(w, n, cols), 1.0, true, Threads::All);
        }
    }
}

/// Runs `f` on a buffer of `len` floats that each thread keeps for the next call (its contents are
/// whatever the last call left; every caller overwrites it whole).
fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            b.resize(len, 0.0);
        }
        f(&mut b[..len])
    })
}

/// Dequantises whole rows of `dtype` blocks.
fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && avx2::dequantize(dtype, bytes, out) {
        return;
    }
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match dtype {
        // Fixed-size arrays, so that each half block is one vector of 16 lanes.
        GgmlDType::Q4_0 => simd(
            #[inline(always)]
            || {
                for (block, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                    let d = f16_at(block, 0);
                    let q: &[u8; 16] = block[2..18].try_into().expect("16 bytes");
                    let y: &mut [f32; 32] = y.try_into().expect("32 values");
                    for j in 0..16 {
                        y[j] = (f32::from(q[j] & 0x0F) - 8.0) * d;
                        y[j + 16] = (f32::from(q[j] >> 4) - 8.0) * d;
                    }
                }
            },
        ),
        GgmlDType::Q4_1 => simd(
            #[inline(always)]
            || {
                for (block, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                    let q: &[u8; 16] = block[4..20].try_into().expect("16 bytes");
                    let y: &mut [f32; 32] = y.try_into().expect("32 values");
                    for j in 0..16 {
                        y[j] = f32::from(q[j] & 0x0F) * d + m;
                        y[j + 16] = f32::from(q[j] >> 4) * d + m;
                    }
                }
            },
        ),
        GgmlDType::Q8_0 => simd(
            #[inline(always)]
            || {
                for (block, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                    let d = f16_at(block, 0);
                    let q: &[u8; 32] = block[2..34].try_into().expect("32 bytes");
                    let y: &mut [f32; 32] = y.try_into().expect("32 values");
                    for j in 0..32 {
                        y[j] = f32::from(q[j] as i8) * d;
                    }
                }
            },
        ),
        GgmlDType::F32 => {
            for (x, y) in bytes.chunks_exact(4).zip(out) {
                *y = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            }
        }
        GgmlDType::F16 => {
            for (x, y) in bytes.chunks_exact(2).zip(out) {
                *y = f16::from_le_bytes([x[0], x[1]]).to_f32();
            }
        }
        GgmlDType::BF16 => {
            for (x, y) in bytes.chunks_exact(2).zip(out) {
                *y = bf16::from_le_bytes([x[0], x[1]]).to_f32();
            }
        }
        GgmlDType::Q5_0 => via_candle::<k_quants::BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => via_candle::<k_quants::BlockQ5_1>(bytes, out),
        GgmlDType::Q8_1 => via_candle::<k_quants::BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => via_candle::<k_quants::BlockQ2K>(bytes, out),
        GgmlDType::Q3K => via_candle::<k_quants::BlockQ3K>(bytes, out),
        GgmlDType::Q4K => via_candle::<k_quants::BlockQ4K>(bytes, out),
        GgmlDType::Q5K => via_candle::<k_quants::BlockQ5K>(bytes, out),
        GgmlDType::Q6K => via_candle::<k_quants::BlockQ6K>(bytes, out),
        GgmlDType::Q8K => via_candle::<k_quants::BlockQ8K>(bytes, out),
    }
}

/// The legacy formats dequantised with AVX2, FMA and F16C: a block's 16 or 32 bytes become four vectors of 8 floats
/// in a handful of instructions, where the portable loops take about a cycle per value.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use candle_core::quantized::GgmlDType;

    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }

    /// Dequantises Q4_0, Q4_1 or Q8_0 blocks; `false` for other formats (nothing written).
    pub(super) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
        let blocks = out.len() / 32;
        let size = match dtype {
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            _ => return false,
        };
        assert!(bytes.len() >= blocks * size, "{dtype:?}: {} bytes for {blocks} blocks", bytes.len());
        // SAFETY: `available()` checked AVX2, FMA and F16C at run time, and the loops read `blocks` whole blocks
        // of `size` bytes (checked above) and write `blocks · 32` floats of `out`.
        unsafe {
            match dtype {
                GgmlDType::Q4_0 => q4_blocks(bytes.as_ptr(), out.as_mut_ptr(), blocks, false),
                GgmlDType::Q4_1 => q4_blocks(bytes.as_ptr(), out.as_mut_ptr(), blocks, true),
                _ => q8_blocks(bytes.as_ptr(), out.as_mut_ptr(), blocks),
            }
        }
        true
    }

    /// `yt[r·m + i] = Σ_c W[r, c] · x[i, c]` for the `n` rows of Q4_0, Q4_1 or Q8_0 blocks in `bytes` (each of
    /// `cols` values) and the `m` rows of `x`: each block is decoded into vectors of 8 or 16 floats (the values
    /// [`dequantize`] writes) and multiplied into up to four input rows at once, so the decoded weights never
    /// leave the registers. The caller checked [`available`] and the format.
    pub(super) fn dot_rows(dtype: GgmlDType, bytes: &[u8], n: usize, cols: usize, x: &[f32], m: usize, yt: &mut [f32]) {
        dot_rows_with(wide(), dtype, bytes, n, cols, x, m, yt)
    }

    /// [`dot_rows`] with the 16-lane kernels (`wide`, where the CPU has AVX-512F) or the 8-lane ones.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dot_rows_with(
        wide: bool,
        dtype: GgmlDType,
        bytes: &[u8],
        n: usize,
        cols: usize,
        x: &[f32],
        m: usize,
        yt: &mut [f32],
    ) {
        let size = match dtype {
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            _ => unreachable!("fused products of {dtype:?} blocks"),
        };
        let blocks = cols / 32;
        assert!(
            available()
                && (!wide || self::wide())
                && cols.is_multiple_of(32)
                && bytes.len() == n * blocks * size
                && x.len() == m * cols
                && yt.len() == n * m,
            "fused quantised product: shapes do not match"
        );
        // Kernels for 1, 2, 3 and 4 input rows at a time: 16-lane ones for several rows where the CPU has
        // AVX-512 (about 1.3 times faster there; for one row the 8-lane ones are, their sums being shorter).
        let kernels: [Kernel; 4] = match (dtype, wide) {
            (GgmlDType::Q8_0, false) => [q8_dot::<1, 4>, q8_dot::<2, 2>, q8_dot::<3, 2>, q8_dot::<4, 2>],
            (GgmlDType::Q8_0, true) => [q8_dot::<1, 4>, q8_dot16::<2, 2>, q8_dot16::<3, 2>, q8_dot16::<4, 2>],
            (_, false) => [q4_dot::<1, 4>, q4_dot::<2, 2>, q4_dot::<3, 2>, q4_dot::<4, 2>],
            (_, true) => [q4_dot::<1, 4>, q4_dot16::<2, 2>, q4_dot16::<3, 2>, q4_dot16::<4, 2>],
        };
        for r in 0..n {
            let row = &bytes[r * blocks * size..(r + 1) * blocks * size];
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(4);
                let (xs, out) = (&x[i * cols..], &mut yt[r * m + i..r * m + i + rows]);
                // SAFETY: AVX2, FMA and F16C were checked at run time (`available()`, asserted above), and
                // AVX-512F for the 16-lane kernels (`wide()`); the kernels read `blocks` blocks of `size` bytes
                // of `row` (its length), `rows` rows of `cols` floats of `xs` (within `x`: i + rows <= m), and
                // write `rows` floats of `out`.
                unsafe { kernels[rows - 1](row.as_ptr(), blocks, size, xs.as_ptr(), cols, out.as_mut_ptr()) };
                i += rows;
            }
        }
    }

    /// A fused kernel: one row of `blocks` blocks of `size` bytes times input rows `stride` floats apart, each
    /// row's product written to `out`.
    type Kernel = unsafe fn(*const u8, usize, usize, *const f32, usize, *mut f32);

    /// Whether the CPU has AVX-512F (16-lane kernels).
    pub(super) fn wide() -> bool {
        static WIDE: OnceLock<bool> = OnceLock::new();
        *WIDE.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    /// A vector of f32 lanes, so that the 8- and 16-lane kernels share their inner loops. Every method is
    /// inlined into the kernel that calls it, which enables the instructions it needs.
    trait Lanes: Copy {
        const LANES: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }

    impl Lanes for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    impl Lanes for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
    }

    /// Multiplies the `K` decoded vectors `w` of one block (values `32·b ..`) into the `MR` input rows at `x`
    /// (`stride` floats apart), with `ACC` accumulators per input row (independent chains of additions).
    #[inline(always)]
    unsafe fn accumulate<V: Lanes, const K: usize, const MR: usize, const ACC: usize>(
        w: &[V; K],
        x: *const f32,
        stride: usize,
        b: usize,
        acc: &mut [[V; ACC]; MR],
    ) {
        for (i, acc) in acc.iter_mut().enumerate() {
            let xi = x.add(i * stride + 32 * b);
            for (k, wk) in w.iter().enumerate() {
                acc[k % ACC] = V::fma(*wk, V::load(xi.add(V::LANES * k)), acc[k % ACC]);
            }
        }
    }

    /// Writes the sums of each input row's accumulators.
    #[inline(always)]
    unsafe fn store<V: Lanes, const MR: usize, const ACC: usize>(acc: &[[V; ACC]; MR], out: *mut f32) {
        for (i, acc) in acc.iter().enumerate() {
            let mut total = acc[0];
            for a in &acc[1..] {
                total = V::add(total, *a);
            }
            *out.add(i) = total.sum();
        }
    }

    /// One row of Q4_0 (`size` 18) or Q4_1 (20) blocks times `MR` input rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_dot<const MR: usize, const ACC: usize>(
        row: *const u8,
        blocks: usize,
        size: usize,
        x: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let mut acc = [[__m256::zero(); ACC]; MR];
        for b in 0..blocks {
            accumulate(&q4_block(row.add(b * size), size == 20), x, stride, b, &mut acc);
        }
        store(&acc, out);
    }

    /// One row of Q8_0 blocks times `MR` input rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_dot<const MR: usize, const ACC: usize>(
        row: *const u8,
        blocks: usize,
        _size: usize,
        x: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let mut acc = [[__m256::zero(); ACC]; MR];
        for b in 0..blocks {
            accumulate(&q8_block(row.add(b * 34)), x, stride, b, &mut acc);
        }
        store(&acc, out);
    }

    /// [`q4_dot`] with 16 lanes: a block's 16 bytes widen to 16 lanes once, its low and high nibbles are two
    /// vectors.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q4_dot16<const MR: usize, const ACC: usize>(
        row: *const u8,
        blocks: usize,
        size: usize,
        x: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let with_min = size == 20;
        let (mask, minus_eight) = (_mm512_set1_epi32(0x0F), _mm512_set1_ps(-8.0));
        let mut acc = [[__m512::zero(); ACC]; MR];
        for b in 0..blocks {
            let block = row.add(b * size);
            let scales = f16_pair(block);
            let dv = _mm512_broadcastss_ps(scales);
            let mv = match with_min {
                true => _mm512_broadcastss_ps(_mm_movehdup_ps(scales)),
                false => _mm512_mul_ps(dv, minus_eight),
            };
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.add(if with_min { 4 } else { 2 }).cast()));
            let lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), dv, mv);
            let hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), dv, mv);
            accumulate(&[lo, hi], x, stride, b, &mut acc);
        }
        store(&acc, out);
    }

    /// [`q8_dot`] with 16 lanes.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q8_dot16<const MR: usize, const ACC: usize>(
        row: *const u8,
        blocks: usize,
        _size: usize,
        x: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let mut acc = [[__m512::zero(); ACC]; MR];
        for b in 0..blocks {
            let block = row.add(b * 34);
            let dv = _mm512_broadcastss_ps(f16_pair(block));
            let value = |k: usize| {
                _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(2 + 16 * k).cast()))),
                    dv,
                )
            };
            accumulate(&[value(0), value(1)], x, stride, b, &mut acc);
        }
        store(&acc, out);
    }

    /// The two f16 at `p` as the first two lanes (a block's scale, and Q4_1's minimum): one 32-bit load, so
    /// that the conversion depends on nothing but memory (a 16-bit insert would also wait for whatever last
    /// wrote the register it merges into, an accumulator of the loop).
    #[inline(always)]
    unsafe fn f16_pair(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()))
    }

    /// Q4_0 (`(q − 8) · d`, 18-byte blocks) or Q4_1 (`q · d + m`, 20-byte blocks): low nibbles first, then high.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_blocks(src: *const u8, dst: *mut f32, blocks: usize, with_min: bool) {
        let size = if with_min { 20 } else { 18 };
        for b in 0..blocks {
            store_block(&q4_block(src.add(b * size), with_min), dst.add(b * 32));
        }
    }

    /// Q8_0: `q · d` for 32 signed bytes after each f16 scale (34-byte blocks).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_blocks(src: *const u8, dst: *mut f32, blocks: usize) {
        for b in 0..blocks {
            store_block(&q8_block(src.add(b * 34)), dst.add(b * 32));
        }
    }

    /// The 32 values of the Q4_0 (18 bytes: `(q − 8) · d`) or Q4_1 (20 bytes: `q · d + m`) block at `block`, as
    /// four vectors of 8: low nibbles first, then high. What [`dequantize`] writes and the fused kernels use.
    #[inline(always)]
    unsafe fn q4_block(block: *const u8, with_min: bool) -> [__m256; 4] {
        let scales = f16_pair(block);
        let dv = _mm256_broadcastss_ps(scales);
        let mv = match with_min {
            true => _mm256_broadcastss_ps(_mm_movehdup_ps(scales)),
            false => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
        };
        let mask = _mm_set1_epi8(0x0F);
        let q = _mm_loadu_si128(block.add(if with_min { 4 } else { 2 }).cast());
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let value = |bytes: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), dv, mv);
        [value(lo), value(_mm_srli_si128(lo, 8)), value(hi), value(_mm_srli_si128(hi, 8))]
    }

    /// The 32 values `q · d` of the Q8_0 block (34 bytes) at `block`, as four vectors of 8.
    #[inline(always)]
    unsafe fn q8_block(block: *const u8) -> [__m256; 4] {
        let dv = _mm256_broadcastss_ps(f16_pair(block));
        let value = |k: usize| {
            let part = _mm_loadl_epi64(block.add(2 + 8 * k).cast());
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), dv)
        };
        [value(0), value(1), value(2), value(3)]
    }

    /// Writes a decoded block's 32 values at `y`.
    #[inline(always)]
    unsafe fn store_block(w: &[__m256; 4], y: *mut f32) {
        for (k, wk) in w.iter().enumerate() {
            _mm256_storeu_ps(y.add(8 * k), *wk);
        }
    }
}

/// candle's dequantisation of whole blocks of type `T` stored in `bytes`.
#[allow(unsafe_code)]
fn via_candle<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size) && bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0,
        "{:?} blocks: misaligned or partial data",
        T::DTYPE
    );
    // SAFETY: the blocks are plain `repr(C)` structs of integers and f16 values (any bit pattern is a value),
    // the pointer is aligned for `T` and the length is a whole number of blocks (both checked above), and the
    // slice borrows `bytes`, so it lives no longer than the data.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
    T::to_float(blocks, &mut out[..blocks.len() * T::BLCK_SIZE]);
}

/// `x Wᵀ` of a quantised frozen weight, with the input's gradient only in backward.
pub fn quant_project(x: &Tensor, w: &Arc<QuantMatrix>) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(QuantLinear { w: w.clone() })?)
}

struct QuantLinear {
    w: Arc<QuantMatrix>,
}

fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, cols: usize, what: &str) -> candle_core::Result<(&'a [f32], usize)> {
    if l.dims().last() != Some(&cols) {
        candle_core::bail!("{what}: rows of {:?} values for a matrix of {cols} columns", l.dims().last())
    }
    let data = super::contiguous(s, l, what)?;
    Ok((data, data.len() / cols.max(1)))
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quantised-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = self.w.dims();
        let (x, m) = f32_rows(s, l, cols, self.name())?;
        let mut y = vec![0f32; m * rows];
        self.w.matmul_t(x, m, &mut y);
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = rows;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (rows, cols) = self.w.dims();
        let grad = grad.contiguous()?;
        let (s, l) = grad.storage_and_layout();
        let Storage::Cpu(cpu) = &*s else { candle_core::bail!("{}: CPU tensors only", self.name()) };
        let (g, m) = f32_rows(cpu, l, rows, self.name())?;
        let mut dx = vec![0f32; m * cols];
        self.w.matmul_acc(g, m, &mut dx, false);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every supported block format against candle's own dequantisation, and both products against f32
    /// products with the dequantised matrix (odd row counts, one row and many).
    #[test]
    fn products_equal_those_of_the_dequantised_matrix_in_every_format() -> Result<()> {
        let device = Device::Cpu;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            let (rows, cols) = (77, 512);
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &device)?;
            let q = QTensor::quantize(&w, dtype)?;
            let reference = q.dequantize(&device)?;
            let m = QuantMatrix::new(q)?;
            let ours = m.dequantize(&device)?;
            let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}: dequantisation differs by {diff}");
            let embedded = m.embedding(&[5, 0, 76])?;
            assert_eq!(&embedded[cols..2 * cols], &reference.get(0)?.to_vec1::<f32>()?[..], "{dtype:?} embedding");
            // 1 to 8 rows take the fused products (1 to 4 input rows at a time), 130 the blocked ones.
            for n in [1, 2, 3, 4, 5, 8, 130] {
                let x = Tensor::randn(0f32, 1.0, (n, cols), &device)?;
                let want = x.matmul(&reference.t()?)?;
                let got = quant_project(&x, &Arc::new(QuantMatrix::new(QTensor::quantize(&w, dtype)?)?))?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff <= 1e-5 * scale.max(1.0), "{dtype:?}, {n} rows: product differs by {diff}");
                let g = Tensor::randn(0f32, 1.0, (n, rows), &device)?;
                let mut dx = vec![0f32; n * cols];
                m.matmul_acc(&g.flatten_all()?.to_vec1()?, n, &mut dx, false);
                let want = g.matmul(&reference)?.flatten_all()?.to_vec1::<f32>()?;
                let diff = dx.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-4 * scale.max(1.0), "{dtype:?}, {n} rows: input gradient differs by {diff}");
            }
        }
        Ok(())
    }

    /// The fused kernels of both widths (8 lanes; 16 where the CPU has AVX-512) against the dequantised rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_products_of_both_widths_equal_the_dequantised_ones() -> Result<()> {
        if !avx2::available() {
            return Ok(());
        }
        let device = Device::Cpu;
        let (rows, cols) = (9, 96);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &device)?;
            let q = QuantMatrix::new(QTensor::quantize(&w, dtype)?)?;
            let dense = q.dequantize(&device)?.to_vec2::<f32>()?;
            for m in 1..=7 {
                let x: Vec<f32> = (0..m * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                let xs = &x;
                let want: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        let row = &dense[r];
                        (0..m).map(move |i| row.iter().zip(&xs[i * cols..]).map(|(a, b)| a * b).sum::<f32>())
                    })
                    .collect();
                for wide in [false, true].into_iter().filter(|&w| !w || avx2::wide()) {
                    let mut yt = vec![0f32; rows * m];
                    avx2::dot_rows_with(wide, dtype, q.bytes(), rows, cols, &x, m, &mut yt);
                    let diff = yt.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(diff < 1e-3, "{dtype:?}, {m} rows, wide {wide}: differs by {diff}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn backward_gives_the_input_gradient() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &device)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let dense = q.dequantize(&device)?;
        let m = Arc::new(QuantMatrix::new(q)?);
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 64), &device)?)?;
        let weights = Tensor::randn(0f32, 1.0, (6, 40), &device)?;
        let got = (quant_project(x.as_tensor(), &m)? * &weights)?.sum_all()?.backward()?;
        let want = (x.as_tensor().matmul(&dense.t()?)? * &weights)?.sum_all()?.backward()?;
        let (got, want) = (got.get(x.as_tensor()).expect("dx"), want.get(x.as_tensor()).expect("dx"));
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradient differs by {diff}");
        Ok(())
    }
}
