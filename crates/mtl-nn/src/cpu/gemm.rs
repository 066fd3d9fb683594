//! A checked, safe front to the `gemm` crate: the same matrix multiply candle runs on the CPU, called on
//! strided views of our own buffers, so that transposes, head slices and column blocks never get copied.
#![allow(unsafe_code)]

use gemm::Parallelism;

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Rows of `cols` elements starting every `row_stride` elements (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        let view = Self { data, rows, cols, rs: row_stride, cs: 1 };
        assert!(fits(data.len(), rows, cols, view.rs, view.cs), "matrix view out of bounds");
        view
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The underlying slice with the row and column strides.
    pub(crate) fn raw(&self) -> (&'a [f32], usize, usize) {
        (self.data, self.rs, self.cs)
    }

    /// Element `(i, j)`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// A writable matrix view, row-major with a row stride.
#[derive(Debug)]
pub struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> ViewMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(fits(data.len(), rows, cols, row_stride, 1), "matrix view out of bounds");
        Self { data, rows, cols, rs: row_stride }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The view as a destination that threads write disjoint blocks of.
    pub(crate) fn into_raw(self) -> RawDst<'a> {
        RawDst { ptr: self.data.as_mut_ptr(), rows: self.rows, cols: self.cols, rs: self.rs, _data: Default::default() }
    }
}

/// A [`ViewMut`] shared by threads that each write their own blocks ([`RawDst::store`]).
pub(crate) struct RawDst<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    _data: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a RawDst is made from an exclusive borrow; `store`'s contract is that concurrent callers write
// disjoint blocks.
unsafe impl Send for RawDst<'_> {}
unsafe impl Sync for RawDst<'_> {}

impl RawDst<'_> {
    /// Writes (or with `accumulate` adds) `scale · block`, plus `bias` (indexed by the destination's column)
    /// where given, at rows `row..row + B`, columns `col..col + B` of the destination, `block` being `B × B`
    /// row-major (or, `transposed`, column-major); the parts beyond the destination's edges are dropped.
    ///
    /// # Safety
    /// No other thread reads or writes the same block at the same time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn store<const B2: usize>(
        &self,
        row: usize,
        col: usize,
        block: &[f32; B2],
        transposed: bool,
        scale: f32,
        accumulate: bool,
        bias: Option<&[f32]>,
    ) {
        const MAX: usize = 64;
        let b = B2.isqrt();
        assert!(b <= MAX, "store: blocks of at most {MAX} × {MAX}");
        let width = b.min(self.cols.saturating_sub(col));
        let bias = bias.map(|bias| &bias[col..col + width]);
        super::math::simd(
            #[inline(always)]
            || {
                let mut column = [0f32; MAX];
                for r in 0..b.min(self.rows.saturating_sub(row)) {
                    // SAFETY: row + r < rows and col + width <= cols, inside the borrowed slice (checked when the
                    // ViewMut was made).
                    let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add((row + r) * self.rs + col), width) };
                    let src = match transposed {
                        false => &block[r * b..r * b + width],
                        true => {
                            for (j, v) in column[..width].iter_mut().enumerate() {
                                *v = block[j * b + r];
                            }
                            &column[..width]
                        }
                    };
                    match (accumulate, bias) {
                        (true, None) => dst.iter_mut().zip(src).for_each(|(d, s)| *d += scale * s),
                        (false, None) => dst.iter_mut().zip(src).for_each(|(d, s)| *d = scale * s),
                        (true, Some(bias)) => {
                            dst.iter_mut().zip(src).zip(bias).for_each(|((d, s), b)| *d += scale * s + b)
                        }
                        (false, Some(bias)) => {
                            dst.iter_mut().zip(src).zip(bias).for_each(|((d, s), b)| *d = scale * s + b)
                        }
                    }
                }
            },
        )
    }
}

fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// Whether a product runs on the rayon pool or on the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Every rayon thread (for the big projections).
    All,
    /// The calling thread (inside work that is already parallel, such as per-head attention).
    One,
}

/// `dst = scale · a · b`, or `dst += scale · a · b` when `accumulate`.
pub fn matmul(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, scale: f32, accumulate: bool, threads: Threads) {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "matmul: shapes {m}x{n} = {}x{} · {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst.data[i * dst.rs..i * dst.rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => Parallelism::Rayon(rayon::current_num_threads()),
        _ => Parallelism::None,
    };
    // SAFETY: every view was checked at construction to address only elements inside its slice, the shapes
    // agree (checked above), and `dst` is borrowed mutably, so it aliases neither `a` nor `b`. Strides fit in
    // isize because they index into slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_with_transposes_strides_and_accumulation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (33, 17, 65), (64, 96, 128)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let want = naive(&a, &b, m, n, k);
            // a stored transposed ([k × m]), b embedded as a column block of a wider matrix.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let wide: Vec<f32> =
                (0..k * (n + 3))
                    .map(|i| {
                        if i % (n + 3) >= 2 && i % (n + 3) < n + 2 {
                            b[(i / (n + 3)) * n + i % (n + 3) - 2]
                        } else {
                            9.0
                        }
                    })
                    .collect();
            let mut c = vec![1f32; m * (n + 1)];
            let dst = ViewMut::strided(&mut c, m, n, n + 1);
            matmul(dst, View::new(&at, k, m).t(), View::strided(&wide[2..], k, n, n + 3), 2.0, true, Threads::All);
            for i in 0..m {
                for j in 0..n {
                    let got = c[i * (n + 1) + j];
                    assert!((got - (1.0 + 2.0 * want[i * n + j])).abs() < 1e-4, "{m}x{n}x{k} at ({i},{j})");
                }
                assert_eq!(c[i * (n + 1) + n], 1.0, "the gap between rows is untouched");
            }
        }
    }
}
