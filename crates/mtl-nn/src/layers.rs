//! Differentiable building blocks. Each one is composed of candle ops that all have a backward pass.

use std::sync::Mutex;

use candle_core::{DType, Tensor, D};
use mtl_core::Mode;
use rand::{RngCore, SeedableRng};

use serde::{Deserialize, Serialize};

use crate::params::{Init, ParamBuilder};
use crate::Result;

/// An encoder's activation function (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact, erf-based GELU (`"gelu"` in transformers).
    Gelu,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

/// `y = x Wᵀ + b` over the last dimension, with `W` stored as `[out, in]` (PyTorch's layout).
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl Linear {
    pub fn new(pb: &ParamBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = pb.get((out_dim, in_dim), "weight", Init::Normal { std: 0.02 })?;
        let bias = pb.get(out_dim, "bias", Init::Zeros)?;
        Ok(Self { weight, bias })
    }

    /// One layer computing several layers of the same input at once: their outputs side by side.
    pub fn stacked(layers: &[&Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().map(|l| &l.bias).collect();
        Ok(Self { weight: Tensor::cat(&weights, 0)?, bias: Tensor::cat(&biases, 0)? })
    }

    /// `x` is `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

/// `x Wᵀ + b` of linear layers whose weights do not train (a backbone under LoRA, adapters or prefix tuning),
/// several layers of the same input side by side, with the input's gradient only: the fused kernel on the CPU
/// ([`crate::cpu::fused::frozen_linear`]), composed ops on detached weights elsewhere (correct, without the
/// saving).
pub(crate) fn frozen_linear(x: &Tensor, layers: &[&Linear]) -> Result<Tensor> {
    if x.device().is_cpu() {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().map(|l| &l.bias).collect();
        return crate::cpu::fused::frozen_linear(x, &weights, &biases);
    }
    let stacked = Linear::stacked(layers)?;
    Linear { weight: stacked.weight.detach(), bias: stacked.bias.detach() }.forward(x)
}

/// cos and sin of transformers' rotary angles `p · θ^(-2i/d) / factor_i` for positions `p < positions` and
/// frequencies `i < d/2` (factors 1 by default), row-major `[positions, d]`, each frequency repeated for both
/// halves of the head (the `rotate_half` layout).
pub(crate) fn rotary_angles(theta: f64, positions: usize, d: usize, factors: Option<&[f64]>) -> (Vec<f32>, Vec<f32>) {
    let factor = |i: usize| factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
    let inv: Vec<f32> = (0..d / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / d as f64) / factor(i)) as f32).collect();
    let (mut cos, mut sin) = (Vec::with_capacity(positions * d), Vec::with_capacity(positions * d));
    for p in 0..positions {
        for _ in 0..2 {
            for f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// LayerNorm over the last dimension, written out so that it has a backward pass (candle-nn's fast path
/// has none).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = pb.get(dim, "weight", Init::Ones)?;
        let bias = pb.get(dim, "bias", Init::Zeros)?;
        Ok(Self { weight, bias, eps })
    }

    /// The fused kernel on the CPU; composed candle ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            crate::cpu::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            layer_norm_composed(x, &self.weight, &self.bias, self.eps)
        }
    }
}

/// LayerNorm from composed, differentiable candle ops (the reference of the fused kernel).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension. The row maximum is subtracted for stability and detached: it cancels
/// out of the result, so its gradient is zero anyway.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The random source of every dropout mask of a model. It is seeded, so a run is reproducible (candle's CPU
/// device cannot be seeded).
#[derive(Debug)]
pub struct DropoutRng {
    p: f32,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
}

impl DropoutRng {
    pub fn new(p: f32, seed: u64) -> Self {
        Self { p, rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)) }
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    /// How far the generator has advanced, for a checkpoint (ChaCha's word position).
    pub fn position(&self) -> u128 {
        self.rng.lock().expect("dropout rng lock poisoned; this is a bug").get_word_pos()
    }

    /// Moves the generator to a position from [`DropoutRng::position`]: the masks drawn next are those an
    /// uninterrupted run would draw.
    pub fn set_position(&self, position: u128) {
        self.rng.lock().expect("dropout rng lock poisoned; this is a bug").set_word_pos(position);
    }

    /// A mask of `n` multipliers: 0 with probability `p`, `1 / (1 - p)` otherwise. `None` when `p` is 0.
    ///
    /// One draw from the model's generator seeds the mask ([`crate::cpu::math::mask_of_seed`]: Philox, any
    /// chunk drawn on its own), filled in parallel, so the mask does not depend on the number of threads.
    pub fn mask(&self, n: usize) -> Option<Vec<f32>> {
        self.mask_with(n, self.p)
    }

    /// A mask as [`DropoutRng::mask`] draws it, with rate `p` instead of the model's (LoRA's own dropout),
    /// from the same generator.
    pub fn mask_with(&self, n: usize, p: f32) -> Option<Vec<f32>> {
        if p == 0.0 {
            return None;
        }
        Some(crate::cpu::math::mask_of_seed(self.next_seed(), n, p))
    }

    /// One draw from the generator: the seed of the next mask ([`mask_of_seed`]). A fused kernel keeps the
    /// seed instead of the mask and draws the mask again in its backward pass.
    pub fn next_seed(&self) -> u64 {
        self.rng.lock().expect("dropout rng lock poisoned; this is a bug").next_u64()
    }
    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)` in training; the
    /// identity in evaluation.
    pub fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.apply_with(x, self.p, mode)
    }

    /// [`DropoutRng::apply`] with rate `p` instead of the model's.
    pub fn apply_with(&self, x: &Tensor, p: f32, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval || p == 0.0 {
            return Ok(x.clone());
        }
        let Some(mask) = self.mask_with(x.elem_count(), p) else { return Ok(x.clone()) };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// Cross-entropy averaged over rows: `logits` is `[n, classes]`, `targets` holds `n` class indices.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}
