//! Fused CPU kernels with their backward passes: LayerNorm, the exact (erf) GELU, and linear layers whose
//! weights are frozen.
//!
//! Composed from candle ops, LayerNorm takes nine tensor ops forward and about twenty backward, each
//! allocating a full tensor; the fused version makes one pass over the rows each way, in parallel over row
//! chunks. Both are tested against the composed forms in `crate::layers`, values and gradients. The kernels
//! take plain tensors; the layers that call them (and compose ops on other devices) live in `crate::layers`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::contiguous;
use super::gemm::{self, Threads, View, ViewMut};
use crate::Result;

const ROWS_PER_TASK: usize = 64;

/// The row width of `[rows, dim]` data `x` normalised with `[dim]` parameters, checking that `other` (a
/// bias or an output gradient) has the length it must have.
fn row_width(x: &[f32], w: &[f32], other: usize, expected: usize, what: &str) -> candle_core::Result<usize> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) || other != expected {
        candle_core::bail!("{what}: shapes do not match")
    }
    Ok(d)
}

/// LayerNorm over the last dimension of `x` (`[rows, dim]`), with `weight` and `bias` of `[dim]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(weight, bias, LayerNormOp { eps: eps as f32 })?)
}

struct LayerNormOp {
    eps: f32,
}

/// Where [`embed_norm`] reads each row's word embedding.
pub enum Words<'a> {
    /// Row `ids[r]` of the table (`[vocab, width]`).
    Table(&'a Tensor, &'a [u32]),
    /// Row `r` of these (`[rows, width]`).
    Rows(&'a Tensor),
}

/// The embeddings of inference in one pass over the rows, recording no graph: row `r` (position `r % seq`) is
/// `LayerNorm(word(r) + positions[r % seq] + token_types[type(r)])`, with `positions` the `[seq, width]` rows
/// of the positions in use, and `types` each row's token type (absent: every row takes the table's first).
/// What a graph of gather, two adds and [`layer_norm`] computes, without the three full-size passes and
/// allocations between them (4.5 of a 340 ms inference step on MiniLM, 32 × 128 tokens).
#[allow(clippy::too_many_arguments)]
pub fn embed_norm(
    words: Words<'_>,
    positions: Option<&Tensor>,
    token_types: Option<&Tensor>,
    types: Option<&[u32]>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    seq: usize,
) -> Result<Tensor> {
    const WHAT: &str = "embeddings";
    let (table, rows) = match words {
        Words::Table(table, ids) => (table, ids.len()),
        Words::Rows(rows) => (rows, rows.dim(0)?),
    };
    let width = weight.elem_count();
    let device = table.device().clone();
    // The tensors' storages, read in place (the word table is tens of megabytes).
    let tensors = [Some(table), positions, token_types, Some(weight), Some(bias)];
    let guards: Vec<_> = tensors.iter().map(|t| t.map(|t| t.storage_and_layout())).collect();
    let slice = |i: usize| -> candle_core::Result<Option<&[f32]>> {
        let Some((storage, layout)) = &guards[i] else { return Ok(None) };
        Ok(Some(cpu_f32(storage, layout, WHAT)?))
    };
    let (Some(table), positions, token_types, Some(gamma), Some(beta)) =
        (slice(0)?, slice(1)?, slice(2)?, slice(3)?, slice(4)?)
    else {
        unreachable!("the table and the norm's parameters are always given")
    };
    let ok = width > 0
        && beta.len() == width
        && table.len().is_multiple_of(width)
        && positions.is_none_or(|p| p.len() == seq * width)
        && token_types.is_none_or(|t| !t.is_empty() && t.len().is_multiple_of(width))
        && types.is_none_or(|t| t.len() == rows)
        && rows.is_multiple_of(seq.max(1));
    if !ok {
        return Err(candle_core::Error::Msg(format!("{WHAT}: shapes do not match")).into());
    }
    let word_row = |r: usize| -> candle_core::Result<&[f32]> {
        let i = match words {
            Words::Table(_, ids) => ids[r] as usize,
            Words::Rows(_) => r,
        };
        table
            .get(i * width..(i + 1) * width)
            .ok_or_else(|| candle_core::Error::Msg(format!("{WHAT}: id {i} out of range")))
    };
    let type_row = |r: usize| -> candle_core::Result<Option<&[f32]>> {
        let Some(t) = token_types else { return Ok(None) };
        let i = types.map_or(0, |types| types[r] as usize);
        t.get(i * width..(i + 1) * width)
            .map(Some)
            .ok_or_else(|| candle_core::Error::Msg(format!("{WHAT}: token type {i} out of range")))
    };
    let mut y = vec![0f32; rows * width];
    let eps = eps as f32;
    y.par_chunks_mut(width * ROWS_PER_TASK).enumerate().try_for_each(|(c, ys)| -> candle_core::Result<()> {
        for (i, y) in ys.chunks_exact_mut(width).enumerate() {
            let r = c * ROWS_PER_TASK + i;
            let (w, t) = (word_row(r)?, type_row(r)?);
            let p = positions.map(|p| &p[(r % seq) * width..(r % seq + 1) * width]);
            super::math::simd(
                #[inline(always)]
                || {
                    y.copy_from_slice(w);
                    for extra in [p, t].into_iter().flatten() {
                        for (y, &e) in y.iter_mut().zip(extra) {
                            *y += e;
                        }
                    }
                    let mean = super::math::sum(y) / width as f32;
                    let rstd = 1.0 / (super::math::sum_sq_dev(y, mean) / width as f32 + eps).sqrt();
                    for ((y, &g), &b) in y.iter_mut().zip(gamma).zip(beta) {
                        *y = (*y - mean) * rstd * g + b;
                    }
                },
            );
        }
        Ok(())
    })?;
    drop(guards);
    Ok(Tensor::from_vec(y, (rows, width), &device)?)
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (x, w, b) =
            (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?, contiguous(s3, l3, self.name())?);
        let d = row_width(x, w, b.len(), w.len(), self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK).zip(x.par_chunks(d * ROWS_PER_TASK)).for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (mean, rstd) = row_stats(x, self.eps);
                for i in 0..d {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / w.elem_count();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(w.shape())?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Returns `[rows + 2, dim]`: dx, then dweight, then dbias.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
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
        let (x, w, dy) =
            (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?, contiguous(s3, l3, self.name())?);
        let d = row_width(x, w, dy.len(), x.len(), self.name())?;
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, _) = out.split_at_mut(rows * d);
        // Each task returns its partial dweight and dbias; they are added in task order (deterministic).
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK).zip(dy.par_chunks(d * ROWS_PER_TASK)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                for ((dx, x), dy) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(dy.chunks_exact(d)) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (x[i] - mean) * rstd;
                        let g = dy[i] * w[i];
                        sum_g += g;
                        sum_gx += g * xhat[i];
                        dw[i] += dy[i] * xhat[i];
                        db[i] += dy[i];
                    }
                    let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
                    for i in 0..d {
                        dx[i] = rstd * (dy[i] * w[i] - mg - xhat[i] * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = out[rows * d..].split_at_mut(d);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2`, as transformers' `"gelu"`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

/// erf with a maximum absolute error of 1.2e-7 (Numerical Recipes' `erfc` Chebyshev fit).
#[inline]
fn erf(x: f32) -> f32 {
    let z = f64::from(x.abs());
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = (1.0 - t * poly.exp()) as f32;
    if x >= 0.0 {
        r
    } else {
        -r
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14).zip(dy.par_chunks(1 << 14))).for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                *dx = dy * (cdf + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp());
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x Wᵀ + b` of linear layers whose weights do not train (a backbone under LoRA, adapters or prefix tuning),
/// several layers of the same input side by side. Backward gives the input's gradient only: candle's own matmul
/// also computes the gradient of its second operand, a product as large as the input's that nothing would read,
/// and a bias gradient besides.
/// The layers are given as their weights and biases; `x` is on the CPU.
pub(crate) fn frozen_linear(x: &Tensor, weights: &[&Tensor], biases: &[&Tensor]) -> Result<Tensor> {
    let weights = weights.iter().map(|w| w.contiguous()).collect::<candle_core::Result<_>>()?;
    let biases = Some(biases.iter().map(|b| b.contiguous()).collect::<candle_core::Result<_>>()?);
    Ok(x.contiguous()?.apply_op1(FrozenLinear { weights, biases })?)
}

/// `x Wᵀ` for a frozen `W` without bias (a Llama projection under LoRA, or its LM head), with the input's
/// gradient only, as [`frozen_linear`].
pub(crate) fn frozen_project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Ok(x.matmul(&weight.detach().t()?)?);
    }
    Ok(x.contiguous()?.apply_op1(FrozenLinear { weights: vec![weight.contiguous()?], biases: None })?)
}

struct FrozenLinear {
    /// Each `[out_i, in]`; their outputs are written side by side.
    weights: Vec<Tensor>,
    /// One per weight, or none at all.
    biases: Option<Vec<Tensor>>,
}

fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else { candle_core::bail!("{what}: parameters must be on the CPU") };
    contiguous(cpu, layout, what)
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let k = l.dims().last().copied().unwrap_or(0);
        let rows = x.len().checked_div(k).unwrap_or(0);
        let outs: Vec<usize> = self.weights.iter().map(|w| w.dims().first().copied().unwrap_or(0)).collect();
        let out: usize = outs.iter().sum();
        let mut y = vec![0f32; rows * out];
        let mut col = 0;
        for (i, (w, o)) in self.weights.iter().zip(outs).enumerate() {
            let (ws, wl) = w.storage_and_layout();
            let w = cpu_f32(&ws, wl, self.name())?;
            if w.len() != o * k {
                candle_core::bail!("{}: a weight of {} values for {o} outputs of {k} inputs", self.name(), w.len())
            }
            let bias = self.biases.as_ref().map(|b| b[i].storage_and_layout());
            if let Some((bs, bl)) = &bias {
                let b = cpu_f32(bs, bl, self.name())?;
                if b.len() != o {
                    candle_core::bail!("{}: a bias of {} values for {o} outputs", self.name(), b.len())
                }
                for row in y.chunks_exact_mut(out) {
                    row[col..col + o].copy_from_slice(b);
                }
            }
            if rows > 0 {
                let dst = ViewMut::strided(&mut y[col..], rows, o, out);
                gemm::matmul(dst, View::new(x, rows, k), View::new(w, o, k).t(), 1.0, bias.is_some(), Threads::All);
            }
            col += o;
        }
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = match self.weights.as_slice() {
            [w] => w.detach(),
            ws => Tensor::cat(ws, 0)?.detach(),
        };
        let dx = grad.reshape(((), w.dim(0)?))?.matmul(&w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>()).expect("same shapes")
    }

    #[test]
    fn layer_norm_matches_composed() -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (rows, dim) in [(1, 1), (3, 7), (130, 33), (200, 384)] {
            let mut r = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-scale..scale)).collect() };
            let x = Var::from_vec(r(rows * dim, 3.0), (rows, dim), &Device::Cpu)?;
            let w = Var::from_vec(r(dim, 1.5), dim, &Device::Cpu)?;
            let b = Var::from_vec(r(dim, 0.5), dim, &Device::Cpu)?;
            let probe = Tensor::from_vec(r(rows * dim, 1.0), (rows, dim), &Device::Cpu)?;
            let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
            let composed = crate::layers::layer_norm_composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
            assert!(max_diff(&fused, &composed) < 1e-5, "values {rows}x{dim}: {}", max_diff(&fused, &composed));
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (composed * &probe)?.sum_all()?.backward()?;
            for v in [&x, &w, &b] {
                let (a, c) = (gf.get(v.as_tensor()).expect("grad"), gc.get(v.as_tensor()).expect("grad"));
                assert!(max_diff(a, c) < 2e-4, "gradients {rows}x{dim}: {}", max_diff(a, c));
            }
        }
        Ok(())
    }

    #[test]
    fn gelu_matches_candle() -> Result<()> {
        let data: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 100.0).collect();
        let x = Var::from_vec(data, 2001, &Device::Cpu)?;
        let fused = gelu_erf(x.as_tensor())?;
        let reference = x.as_tensor().gelu_erf()?;
        assert!(max_diff(&fused, &reference) < 1e-5);
        let gf = fused.sum_all()?.backward()?;
        let gr = reference.sum_all()?.backward()?;
        let (a, b) = (gf.get(x.as_tensor()).expect("grad"), gr.get(x.as_tensor()).expect("grad"));
        assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_matmul_and_passes_the_input_gradient_only() -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut r = |shape: &[usize]| -> Result<Tensor> {
            let n = shape.iter().product();
            Ok(Tensor::from_vec((0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu)?)
        };
        let (rows, k) = (37, 24);
        let layers: Vec<Linear> =
            [16, 8, 16].iter().map(|&o| Ok(Linear { weight: r(&[o, k])?, bias: r(&[o])? })).collect::<Result<_>>()?;
        let refs: Vec<&Linear> = layers.iter().collect();
        let x = Var::from_tensor(&r(&[rows, k])?)?;
        let probe = r(&[rows, 40])?;
        let frozen = crate::layers::frozen_linear(x.as_tensor(), &refs)?;
        let reference = Linear::stacked(&refs)?.forward(x.as_tensor())?;
        assert_eq!(frozen.dims(), &[rows, 40]);
        assert!(max_diff(&frozen, &reference) < 1e-5, "{}", max_diff(&frozen, &reference));
        let gf = (frozen * &probe)?.sum_all()?.backward()?;
        let gr = (reference * &probe)?.sum_all()?.backward()?;
        let (a, b) = (gf.get(x.as_tensor()).expect("grad"), gr.get(x.as_tensor()).expect("grad"));
        assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        for l in &layers {
            assert!(gf.get(&l.weight).is_none() && gf.get(&l.bias).is_none(), "a frozen parameter got a gradient");
        }
        let projected = frozen_project(x.as_tensor(), &layers[0].weight)?;
        let reference = x.as_tensor().matmul(&layers[0].weight.t()?)?;
        assert!(max_diff(&projected, &reference) < 1e-5, "{}", max_diff(&projected, &reference));
        // No rows.
        let empty =
            crate::layers::frozen_linear(&Tensor::zeros((0, k), candle_core::DType::F32, &Device::Cpu)?, &refs)?;
        assert_eq!(empty.dims(), &[0, 40]);
        Ok(())
    }
}
