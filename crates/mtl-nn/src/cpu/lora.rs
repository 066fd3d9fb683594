//! A frozen linear layer with its LoRA update as one op: `y = x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ`, each block of
//! rows through its own adapter, with a hand-written backward that gives the input's and the adapters'
//! gradients (never the frozen weight's).
//!
//! Composed from candle ops, the update is five ops per route (dropout, two products, the scale, the sum) and
//! autograd keeps every intermediate alive until backward: per projection, three or four more tensors of its
//! output's size. This op keeps its inputs only; the dropout mask is drawn again from its seed in backward and
//! the rank-`r` product `drop(x) Aᵀ` is recomputed (`r` columns: small beside the frozen product).

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::gemm::{matmul, Threads, View, ViewMut};
use super::math::mask_of_seed;
use super::quant::QuantMatrix;
use super::{contiguous, with_f32};
use crate::Result;

/// A pretrained weight matrix: f32, or in a GGUF block format ([`QuantMatrix`]). Under LoRA it does not
/// train; a quantised one never does.
#[derive(Clone, Debug)]
pub enum BaseWeight {
    Dense(Tensor),
    Quantized(std::sync::Arc<QuantMatrix>),
}

impl BaseWeight {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => {
                let d = t.dims();
                (d.first().copied().unwrap_or(0), d.get(1).copied().unwrap_or(0))
            }
            Self::Quantized(q) => q.dims(),
        }
    }

    /// `y = x Wᵀ` for `m` rows of `x`.
    pub(crate) fn forward(&self, x: &[f32], m: usize, y: &mut [f32], what: &str) -> candle_core::Result<()> {
        let (out, input) = self.dims();
        match self {
            Self::Dense(w) => with_f32(w, what, |w| {
                matmul(
                    ViewMut::new(y, m, out),
                    View::new(x, m, input),
                    View::new(w, out, input).t(),
                    1.0,
                    false,
                    Threads::All,
                );
                Ok(())
            }),
            Self::Quantized(q) => {
                q.matmul_t(x, m, y);
                Ok(())
            }
        }
    }

    /// `dx = g W` for `m` rows of `g`.
    pub(crate) fn backward(&self, g: &[f32], m: usize, dx: &mut [f32], what: &str) -> candle_core::Result<()> {
        let (out, input) = self.dims();
        match self {
            Self::Dense(w) => with_f32(w, what, |w| {
                matmul(
                    ViewMut::new(dx, m, input),
                    View::new(g, m, out),
                    View::new(w, out, input),
                    1.0,
                    false,
                    Threads::All,
                );
                Ok(())
            }),
            Self::Quantized(q) => {
                q.matmul_acc(g, m, dx, false);
                Ok(())
            }
        }
    }
}

/// The rows one adapter updates.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRows {
    pub rows: Range<usize>,
    /// Index of the adapter: rows `adapter · r ..` of the stacked A, columns `adapter · r ..` of the stacked B.
    pub adapter: usize,
    /// The seed of the rows' dropout mask ([`crate::layers::DropoutRng::next_seed`]); `None`: no dropout.
    pub dropout_seed: Option<u64>,
}

/// `x Wᵀ` plus the LoRA update of each block of rows. The adapters' matrices come stacked: A as
/// `[adapters · r, in]`, B as `[out, adapters · r]`.
#[derive(Clone, Debug)]
pub struct LoraProjection {
    /// The frozen weight, `[out, in]`.
    pub weight: BaseWeight,
    pub routes: Vec<LoraRows>,
    pub rank: usize,
    pub scale: f32,
    pub dropout: f32,
}

/// The sizes of one call, checked.
struct Dims {
    n: usize,
    input: usize,
    out: usize,
    /// Adapters stacked in A and B.
    adapters: usize,
}

impl LoraProjection {
    pub fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, self.clone())?)
    }

    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> candle_core::Result<Dims> {
        let (out, w_in) = self.weight.dims();
        let &[n, input] = x else { candle_core::bail!("lora projection: a 2-D input expected") };
        let r = self.rank;
        let ok_a = matches!(a, &[rows, cols] if r > 0 && rows % r == 0 && cols == input);
        let adapters = a.first().copied().unwrap_or(0) / r.max(1);
        let ok_b = matches!(b, &[rows, cols] if rows == out && cols == adapters * r);
        if w_in != input || !ok_a || !ok_b {
            candle_core::bail!(
                "lora projection: x {x:?}, weight {:?}, A {a:?}, B {b:?} for rank {r}",
                self.weight.dims()
            )
        }
        let mut next = 0;
        for route in &self.routes {
            if route.rows.start != next || route.adapter >= adapters {
                candle_core::bail!("lora projection: routes {:?} for {n} rows and {adapters} adapters", self.routes)
            }
            next = route.rows.end;
        }
        if next != n {
            candle_core::bail!("lora projection: routes {:?} do not cover {n} rows", self.routes)
        }
        Ok(Dims { n, input, out, adapters })
    }

    /// The route's dropout mask and its input rows after dropout, when it has dropout (else the rows are read
    /// in place).
    fn dropped(&self, route: &LoraRows, x: &[f32], input: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let seed = route.dropout_seed?;
        let rows = &x[route.rows.start * input..route.rows.end * input];
        let mask = mask_of_seed(seed, rows.len(), self.dropout);
        let kept = mask.iter().zip(rows).map(|(m, x)| m * x).collect();
        Some((mask, kept))
    }
}

/// A route's input rows: after dropout when `dropped` holds them, else read in place from `x`.
fn route_input<'a>(route: &LoraRows, x: &'a [f32], input: usize, dropped: Option<&'a [f32]>) -> View<'a> {
    match dropped {
        Some(xd) => View::new(xd, route.rows.len(), input),
        None => View::new(&x[route.rows.start * input..], route.rows.len(), input),
    }
}

impl CustomOp3 for LoraProjection {
    fn name(&self) -> &'static str {
        "lora-projection"
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
        let d = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let (x, a, b) =
            (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?, contiguous(s3, l3, self.name())?);
        let (r, stacked) = (self.rank, d.adapters * self.rank);
        let mut y = vec![0f32; d.n * d.out];
        if d.n > 0 {
            self.weight.forward(x, d.n, &mut y, self.name())?;
        }
        for route in &self.routes {
            let rows = route.rows.len();
            if rows == 0 {
                continue;
            }
            let dropped = self.dropped(route, x, d.input);
            let xs = route_input(route, x, d.input, dropped.as_ref().map(|(_, kept)| &kept[..]));
            let a_t = View::new(&a[route.adapter * r * d.input..], r, d.input).t();
            let mut u = vec![0f32; rows * r];
            matmul(ViewMut::new(&mut u, rows, r), xs, a_t, 1.0, false, Threads::All);
            let b_t = View::strided(&b[route.adapter * r..], d.out, r, stacked).t();
            let ys = ViewMut::new(&mut y[route.rows.start * d.out..route.rows.end * d.out], rows, d.out);
            matmul(ys, View::new(&u, rows, r), b_t, self.scale, true, Threads::All);
        }
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.dims(), a.dims(), b.dims())?;
        let need_dx = x.track_op();
        let grad = grad.contiguous()?;
        let (r, stacked) = (self.rank, d.adapters * self.rank);
        let (mut dx, mut da, mut db) =
            (vec![0f32; d.n * d.input], vec![0f32; stacked * d.input], vec![0f32; d.out * stacked]);
        with_f32(x, self.name(), |x| {
            with_f32(a, self.name(), |a| {
                with_f32(b, self.name(), |b| {
                    with_f32(&grad, self.name(), |g| {
                        // The input of the first layer's projections needs no gradient: skip the frozen product.
                        if d.n > 0 && need_dx {
                            self.weight.backward(g, d.n, &mut dx, self.name())?;
                        }
                        for route in &self.routes {
                            let rows = route.rows.len();
                            if rows == 0 {
                                continue;
                            }
                            let dropped = self.dropped(route, x, d.input);
                            let xs = route_input(route, x, d.input, dropped.as_ref().map(|(_, kept)| &kept[..]));
                            let gs = View::new(&g[route.rows.start * d.out..], rows, d.out);
                            let a_r = View::new(&a[route.adapter * r * d.input..], r, d.input);
                            let b_r = View::strided(&b[route.adapter * r..], d.out, r, stacked);
                            // u = drop(x) Aᵀ, gb = g B (both rows × r).
                            let (mut u, mut gb) = (vec![0f32; rows * r], vec![0f32; rows * r]);
                            matmul(ViewMut::new(&mut u, rows, r), xs, a_r.t(), 1.0, false, Threads::All);
                            matmul(ViewMut::new(&mut gb, rows, r), gs, b_r, 1.0, false, Threads::All);
                            // dA += scale · gbᵀ drop(x); dB += scale · gᵀ u.
                            let da_r = ViewMut::new(
                                &mut da[route.adapter * r * d.input..(route.adapter + 1) * r * d.input],
                                r,
                                d.input,
                            );
                            matmul(da_r, View::new(&gb, rows, r).t(), xs, self.scale, true, Threads::All);
                            let db_r = ViewMut::strided(&mut db[route.adapter * r..], d.out, r, stacked);
                            matmul(db_r, gs.t(), View::new(&u, rows, r), self.scale, true, Threads::All);
                            // dx += scale · (gb A) ∘ mask.
                            let dxs = &mut dx[route.rows.start * d.input..route.rows.end * d.input];
                            match &dropped {
                                Some((mask, _)) => {
                                    let mut t = vec![0f32; rows * d.input];
                                    matmul(
                                        ViewMut::new(&mut t, rows, d.input),
                                        View::new(&gb, rows, r),
                                        a_r,
                                        self.scale,
                                        false,
                                        Threads::All,
                                    );
                                    dxs.iter_mut().zip(t.iter().zip(mask)).for_each(|(dx, (t, m))| *dx += t * m);
                                }
                                None => matmul(
                                    ViewMut::new(dxs, rows, d.input),
                                    View::new(&gb, rows, r),
                                    a_r,
                                    self.scale,
                                    true,
                                    Threads::All,
                                ),
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            if need_dx { Some(Tensor::from_vec(dx, x.shape(), x.device())?) } else { None },
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}
