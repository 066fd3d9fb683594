//! The LM loss of chosen positions fused with the LM head: `-log softmax(h Wᵀ)[target]` for each row of `h`,
//! computed a block of rows at a time, so that at most [`LOGITS_BUDGET`] logits exist at once instead of
//! rows × vocabulary (49,152 for SmolLM2, 262,144 for Gemma 3) several times over, as the composed logits,
//! log-softmax and gather keep for backward. Backward computes each block's logits again and turns them into
//! their gradient in place: `softmax − one-hot`, scaled by the row's incoming gradient. The head is a frozen
//! pretrained weight (f32 or in its GGUF blocks) or, in full fine-tuning, a trained f32 one whose gradient
//! backward accumulates block by block.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, Threads, View, ViewMut};
use super::lora::BaseWeight;
use super::math::{exp, max, simd, sum_exp};
use super::{contiguous, with_f32};
use crate::{NnError, Result};

const NAME: &str = "lm-loss";

/// The most logits one block holds (16 MiB of f32), unless [`MIN_ROWS`] rows need more.
const LOGITS_BUDGET: usize = 1 << 22;
/// The fewest rows in a block.
const MIN_ROWS: usize = 64;

/// Each row's LM loss, `[n]`, for hidden states `hidden` (`[n, in]`) under the head `head` (`[vocab, in]`)
/// and one target token per row. With `train_head`, a dense head also gets its gradient (full fine-tuning).
pub fn token_losses(hidden: &Tensor, head: &BaseWeight, targets: &[u32], train_head: bool) -> Result<Tensor> {
    let (vocab, input) = head.dims();
    let (n, width) = hidden.dims2()?;
    if width != input || n != targets.len() {
        return Err(NnError::Input(format!(
            "LM loss: {n} rows of {width} values and {} targets for a head of {vocab} × {input}",
            targets.len()
        )));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(NnError::Input(format!("LM loss: target token {bad} is outside the vocabulary of {vocab}")));
    }
    let op = LmLoss { head: head.clone(), targets: Arc::new(targets.to_vec()) };
    let hidden = hidden.contiguous()?;
    Ok(match head {
        BaseWeight::Dense(w) if train_head => hidden.apply_op2(&w.contiguous()?, op)?,
        _ => hidden.apply_op1(op)?,
    })
}

struct LmLoss {
    head: BaseWeight,
    targets: Arc<Vec<u32>>,
}

impl LmLoss {
    /// At least [`MIN_ROWS`] rows, so that a quantised head runs its many-row product (each block of the
    /// matrix dequantised once for all rows) even with Gemma's 262,144 tokens.
    fn rows_per_block(&self) -> usize {
        (LOGITS_BUDGET / self.head.dims().0.max(1)).max(MIN_ROWS)
    }

    /// Each row's loss.
    fn forward(&self, h: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (vocab, input) = self.head.dims();
        let n = self.targets.len();
        let per = self.rows_per_block();
        let mut losses = vec![0f32; n];
        let mut logits = vec![0f32; per.min(n) * vocab];
        for (b, (loss, targets)) in losses.chunks_mut(per).zip(self.targets.chunks(per)).enumerate() {
            let m = targets.len();
            let logits = &mut logits[..m * vocab];
            self.head.forward(&h[b * per * input..(b * per + m) * input], m, logits, "LM loss")?;
            logits.par_chunks(vocab).zip(loss.par_iter_mut()).zip(targets.par_iter()).for_each(|((l, loss), &t)| {
                *loss = log_sum_exp(l) - l[t as usize];
            });
        }
        Ok(losses)
    }

    /// The gradient of the hidden states and, with `dw`, the head's (accumulated into it), for incoming
    /// gradients `g` (one per row) and the forward pass's losses.
    fn backward(
        &self,
        h: &[f32],
        losses: &[f32],
        g: &[f32],
        mut dw: Option<&mut [f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        let (vocab, input) = self.head.dims();
        let n = self.targets.len();
        let per = self.rows_per_block();
        let mut dh = vec![0f32; n * input];
        let mut logits = vec![0f32; per.min(n) * vocab];
        for (b, targets) in self.targets.chunks(per).enumerate() {
            let (first, m) = (b * per, targets.len());
            let logits = &mut logits[..m * vocab];
            let h = &h[first * input..(first + m) * input];
            self.head.forward(h, m, logits, "LM loss")?;
            // log Σ eˡ = loss + l[target]: the forward pass's value, not summed again.
            let rows = logits.par_chunks_mut(vocab).zip(targets.par_iter()).zip(&losses[first..first + m]);
            rows.zip(&g[first..first + m]).for_each(|(((l, &t), &loss), &g)| {
                let lse = loss + l[t as usize];
                simd(
                    #[inline(always)]
                    || {
                        for v in l.iter_mut() {
                            *v = g * exp(*v - lse);
                        }
                    },
                );
                l[t as usize] -= g;
            });
            self.head.backward(logits, m, &mut dh[first * input..(first + m) * input], "LM loss")?;
            if let Some(dw) = dw.as_deref_mut() {
                let dwv = ViewMut::new(dw, vocab, input);
                matmul(dwv, View::new(logits, m, vocab).t(), View::new(h, m, input), 1.0, true, Threads::All);
            }
        }
        Ok(dh)
    }
}

/// `log Σ eˡ`, shifted by the maximum.
fn log_sum_exp(l: &[f32]) -> f32 {
    simd(
        #[inline(always)]
        || {
            let m = max(l);
            m + sum_exp(l, m).ln()
        },
    )
}

impl CustomOp1 for LmLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = contiguous(s, l, NAME)?;
        Ok((CpuStorage::F32(self.forward(h)?), Shape::from(self.targets.len())))
    }

    fn bwd(&self, hidden: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dh = with_f32(hidden, NAME, |h| {
            with_f32(res, NAME, |losses| with_f32(&grad.contiguous()?, NAME, |g| self.backward(h, losses, g, None)))
        })?;
        Ok(Some(Tensor::from_vec(dh, hidden.shape(), hidden.device())?))
    }
}

impl CustomOp2 for LmLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // The head is the one this op holds (the same tensor as the second operand).
        CustomOp1::cpu_fwd(self, s1, l1)
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut dw = vec![0f32; w.elem_count()];
        let dh = with_f32(hidden, NAME, |h| {
            with_f32(res, NAME, |losses| {
                with_f32(&grad.contiguous()?, NAME, |g| self.backward(h, losses, g, Some(&mut dw)))
            })
        })?;
        let dh = Tensor::from_vec(dh, hidden.shape(), hidden.device())?;
        Ok((Some(dh), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::QuantMatrix;
    use crate::layers::log_softmax_last;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>()).expect("same shapes")
    }

    /// The composed loss: logits, log-softmax, gather.
    fn composed(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let logp = log_softmax_last(&h.matmul(&w.t()?)?)?;
        let gold = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), h.device())?;
        Ok(logp.gather(&gold, 1)?.squeeze(1)?.neg()?)
    }

    /// Values and both gradients against the composed ops, with the rows split over several blocks (a large
    /// vocabulary), in one block, and a single row; incoming gradients differ per row (a weighted mean).
    #[test]
    fn matches_the_composed_loss_and_its_gradients() -> Result<()> {
        let device = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (n, vocab, input) in [(1, 7, 5), (9, 100, 16), (70, 70_001, 8)] {
            let mut r = |k: usize, s: f32| -> Vec<f32> { (0..k).map(|_| rng.gen_range(-s..s)).collect() };
            let h = Var::from_vec(r(n * input, 2.0), (n, input), &device)?;
            let w = Var::from_vec(r(vocab * input, 1.0), (vocab, input), &device)?;
            let weights = Tensor::from_vec(r(n, 1.0), n, &device)?;
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
            let want = composed(h.as_tensor(), w.as_tensor(), &targets)?;
            let want_grads = (&want * &weights)?.sum_all()?.backward()?;
            for train_head in [true, false] {
                let got = token_losses(h.as_tensor(), &BaseWeight::Dense(w.as_tensor().clone()), &targets, train_head)?;
                assert!(max_diff(&got, &want) < 1e-4, "loss {n}×{vocab}: {}", max_diff(&got, &want));
                let grads = (&got * &weights)?.sum_all()?.backward()?;
                let (dh, want_dh) = (grads.get(&h).expect("dh"), want_grads.get(&h).expect("dh"));
                assert!(max_diff(dh, want_dh) < 1e-4, "dh {n}×{vocab}: {}", max_diff(dh, want_dh));
                match (train_head, grads.get(&w)) {
                    (true, Some(dw)) => {
                        let want_dw = want_grads.get(&w).expect("dw");
                        assert!(max_diff(dw, want_dw) < 1e-4, "dw {n}×{vocab}: {}", max_diff(dw, want_dw));
                    }
                    (false, None) => {}
                    (t, g) => panic!("train_head {t}: head gradient present {}", g.is_some()),
                }
            }
        }
        Ok(())
    }

    /// A head in GGUF blocks gives the loss and input gradient of its dequantised matrix.
    #[test]
    fn a_quantised_head_matches_its_dequantised_matrix() -> Result<()> {
        let device = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let (n, vocab, input) = (100, 300, 64);
        let mut r = |k: usize, s: f32| -> Vec<f32> { (0..k).map(|_| rng.gen_range(-s..s)).collect() };
        let dense = Tensor::from_vec(r(vocab * input, 1.0), (vocab, input), &device)?;
        let q = Arc::new(QuantMatrix::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?);
        let w = q.dequantize(&device)?;
        let h = Var::from_vec(r(n * input, 1.0), (n, input), &device)?;
        let targets: Vec<u32> = (0..n).map(|i| ((i * 31) % vocab) as u32).collect();
        let want = composed(h.as_tensor(), &w, &targets)?;
        let got = token_losses(h.as_tensor(), &BaseWeight::Quantized(q), &targets, true)?;
        assert!(max_diff(&got, &want) < 1e-4);
        let (dh, want_dh) = (got.sum_all()?.backward()?, want.sum_all()?.backward()?);
        assert!(max_diff(dh.get(&h).expect("dh"), want_dh.get(&h).expect("dh")) < 1e-5);
        Ok(())
    }

    #[test]
    fn targets_outside_the_vocabulary_are_refused() -> Result<()> {
        let h = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu)?;
        let w = BaseWeight::Dense(Tensor::zeros((5, 4), candle_core::DType::F32, &Device::Cpu)?);
        let err = token_losses(&h, &w, &[1, 5], false).expect_err("token 5 of 5");
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        assert!(token_losses(&h, &w, &[1], false).is_err(), "2 rows, 1 target");
        Ok(())
    }
}
