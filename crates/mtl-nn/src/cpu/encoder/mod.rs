//! The whole stack of transformer layers as one candle op on the CPU, with a hand-written backward pass.
//!
//! candle's autograd allocates a zero-filled gradient buffer and adds into it for every op of the graph, and
//! every op allocates a fresh output: at 16 × 128 tokens that generic work cost more than the matrix products
//! themselves. Here a layer is four projections (through the same `gemm` candle uses, on strided views, so no
//! transpose or head split is ever copied), attention per (example, head), and fused passes for bias, dropout,
//! residual and LayerNorm. The forward pass in training keeps what the backward pass needs (a "tape": the
//! q|k|v projections, the attention probabilities, LayerNorm's normalised inputs, the intermediate
//! activations); the backward pass walks it back, returns the gradient of the encoder input to candle's graph,
//! and hands the gradient of every layer parameter to a [`GradSink`], which the model merges into candle's
//! gradient store.
//!
//! MPNet's relative position bias ([`PositionBias`]) is added to every layer's attention scores, and the
//! backward pass gives its parameter the gradient of those scores, summed over the batch and the layers.
//!
//! With LoRA ([`FusedLora`]) the backbone is frozen: the pass adds each projection's low-rank update, row
//! ranges through their own adapters, and the backward pass computes the adapters' gradients and the input
//! gradients it needs, none of the frozen weights'. Its dropout is kept as seeds ([`SiteDropout`]): the
//! multipliers are drawn where they are applied, forward and backward.
//!
//! The composed path in `bert.rs` (candle ops, per-op fused kernels) is the reference: tests compare values
//! and every parameter's gradient, with padding, fully padded rows and dropout, with and without LoRA.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use super::gemm::{matmul, Threads, View, ViewMut};
use super::pool;
use super::profile::{time, Phase};

mod attention;
use attention::QkvBias;
mod kernels;
mod lora;

use kernels::*;
pub use kernels::{add_norm, attention_backward, attention_forward, norm_backward, DropoutMask};
use lora::*;
pub use lora::{FusedLora, SiteDropout, SITES};

/// Rows per rayon task in the row-wise passes.
const ROWS_PER_TASK: usize = 32;

/// Parameter gradients produced by a backward pass, waiting to be merged into candle's gradient store.
pub type GradSink = Arc<Mutex<Vec<(Tensor, Tensor)>>>;

/// The sizes of one encoder call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f32,
    /// The projections' products in bf16 on AMX ([`super::amx`]); only set where [`super::amx::available`].
    pub bf16: bool,
}

impl Dims {
    fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

// The order of a layer's parameters in `LayerParams`.
const QW: usize = 0;
const QB: usize = 1;
const OW: usize = 6;
const OB: usize = 7;
const N1W: usize = 8;
const N1B: usize = 9;
const IW: usize = 10;
const IB: usize = 11;
const FW: usize = 12;
const FB: usize = 13;
const N2W: usize = 14;
const N2B: usize = 15;

/// A layer's parameters: query, key, value (weight, bias each), attention output dense, its LayerNorm,
/// intermediate dense, output dense, its LayerNorm. Weights are `[out, in]` as in PyTorch.
pub type LayerParams = [Tensor; 16];

/// Dropout of one layer at rate `p`, as the seeds of its masks ([`crate::cpu::math::mask_of_seed`]): on the
/// attention probabilities (`batch × heads × seq × seq`), which the attention kernels draw head by head where
/// they read them, and on the two sublayer outputs before their residual adds (`tokens × hidden`), which the
/// residual-and-LayerNorm pass draws row block by row block and the backward pass draws again. No mask is kept
/// from the forward pass to the backward (at W1's shapes 75 MB of attention's and 38 MB of the sublayers'
/// multipliers a step).
#[derive(Debug, Clone, Copy)]
pub struct LayerDropout {
    pub attention: u64,
    pub p: f32,
    pub attention_output: u64,
    pub output: u64,
}

impl LayerDropout {
    fn attention_mask(&self) -> DropoutMask<'static> {
        DropoutMask::Seed { seed: self.attention, p: self.p }
    }

    fn attention_output_mask(&self) -> DropoutMask<'static> {
        DropoutMask::Seed { seed: self.attention_output, p: self.p }
    }

    fn output_mask(&self) -> DropoutMask<'static> {
        DropoutMask::Seed { seed: self.output, p: self.p }
    }
}

/// What the backward pass of one layer needs from its forward pass.
#[derive(Clone)]
struct Tape {
    /// The q|k|v rows, without their biases where `qkv_biased` is false (the attention kernels add them).
    qkv: Vec<f32>,
    qkv_biased: bool,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    y1: Vec<f32>,
    /// GELU's derivative at the intermediate pre-activations.
    dgelu: Vec<f32>,
    /// GELU's output.
    g: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// The layer's output, which is the next layer's input (absent for the last layer).
    out: Option<Vec<f32>>,
    /// Per LoRA site, `drop(x) Aᵀ` of every row (`tokens × r`).
    lora_h: [Option<Vec<f32>>; SITES],
}

impl Tape {
    /// Hands the buffers back to the pool once the backward pass is done with them.
    fn recycle(self) {
        let Tape { qkv, probs, ctx, xhat1, rstd1, y1, dgelu, g, xhat2, rstd2, out, lora_h, .. } = self;
        for v in [qkv, probs, ctx, xhat1, rstd1, y1, dgelu, g, xhat2, rstd2]
            .into_iter()
            .chain(out)
            .chain(lora_h.into_iter().flatten())
        {
            pool::give(v);
        }
    }
}

/// A bias added to every layer's attention scores (MPNet's relative positions, T5's buckets): `values`
/// (`heads × seq × seq`) are rows of a `[buckets, heads]` parameter, row `buckets[i · seq + j]` for query `i` and
/// key `j`. With `param`, the backward pass hands that parameter its gradient (summed over the batch, the layers
/// and the pairs of each bucket).
pub struct PositionBias {
    pub values: Vec<f32>,
    pub buckets: Vec<u32>,
    pub param: Option<Tensor>,
}

/// The encoder op; see the module docs.
pub struct FusedEncoder {
    pub dims: Dims,
    pub layers: Vec<LayerParams>,
    /// `batch × seq`, 1 for real tokens, 0 for padding.
    pub key_mask: Arc<Vec<u32>>,
    /// One entry per layer in training with dropout; `None` otherwise.
    pub dropout: Option<Vec<LayerDropout>>,
    /// Keep the tape (training): only then can the op run backward.
    pub train: bool,
    /// Keep the tape through backward passes, so that several losses can each run one (per-task gradients).
    pub retain: bool,
    pub sink: GradSink,
    /// LoRA on a frozen backbone; the op then takes the packed adapters as its second input
    /// (`apply_op2`), and the backbone's parameters get no gradient.
    pub lora: Option<FusedLora>,
    pub position_bias: Option<PositionBias>,
    tape: Mutex<Option<Vec<Tape>>>,
}

impl FusedEncoder {
    pub fn new(
        dims: Dims,
        layers: Vec<LayerParams>,
        key_mask: Arc<Vec<u32>>,
        dropout: Option<Vec<LayerDropout>>,
        train: bool,
        sink: GradSink,
    ) -> Self {
        let tape = Mutex::new(None);
        Self { dims, layers, key_mask, dropout, train, retain: false, sink, lora: None, position_bias: None, tape }
    }

    fn layer_lora<'a>(
        &'a self,
        offsets: &'a [[Option<usize>; SITES]],
        packed: Option<&'a [f32]>,
        l: usize,
    ) -> Option<LayerLora<'a>> {
        let (lora, packed) = (self.lora.as_ref()?, packed?);
        Some(LayerLora { lora, packed, offsets: offsets[l], dropout: lora.dropout.as_ref().map(|m| &m[l]) })
    }

    fn lora_offsets(&self) -> Vec<[Option<usize>; SITES]> {
        self.lora.as_ref().map(|l| l.offsets(&self.dims).0).unwrap_or_default()
    }

    fn layer_dropout(&self, l: usize) -> Option<&LayerDropout> {
        self.dropout.as_ref().map(|d| &d[l])
    }

    fn position_values(&self) -> Option<&[f32]> {
        self.position_bias.as_ref().map(|p| &p.values[..])
    }
}

/// Read access to the f32 data of contiguous CPU tensors.
struct Slices<'a> {
    guards: Vec<(candle_core::StorageRef<'a>, &'a Layout)>,
}

impl<'a> Slices<'a> {
    fn new(tensors: &'a [Tensor]) -> Self {
        Self { guards: tensors.iter().map(|t| t.storage_and_layout()).collect() }
    }

    fn get(&self, i: usize) -> candle_core::Result<&[f32]> {
        let (storage, layout) = &self.guards[i];
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("fused encoder: parameters must be on the CPU") };
        f32_slice(cpu, layout)
    }

    fn all(&self) -> candle_core::Result<Vec<&[f32]>> {
        (0..self.guards.len()).map(|i| self.get(i)).collect()
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    super::contiguous(s, l, "fused encoder")
}

fn check_params(d: &Dims, w: &[&[f32]]) -> candle_core::Result<()> {
    let (h, i) = (d.hidden, d.intermediate);
    let want = [h * h, h, h * h, h, h * h, h, h * h, h, h, h, i * h, i, h * i, h, h, h];
    if w.len() != want.len() || w.iter().zip(want).any(|(w, n)| w.len() != n) {
        candle_core::bail!("fused encoder: parameter shapes do not match hidden {h}, intermediate {i}")
    }
    Ok(())
}

impl FusedEncoder {
    fn forward(&self, x0: &[f32], packed: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let d = &self.dims;
        if x0.len() != d.tokens() * d.hidden
            || self.key_mask.len() != d.tokens()
            || d.heads == 0
            || !d.hidden.is_multiple_of(d.heads)
        {
            candle_core::bail!("fused encoder: input does not match {d:?}")
        }
        if let Some(masks) = &self.dropout {
            if masks.len() != self.layers.len() || !masks.iter().all(|m| (0.0..1.0).contains(&m.p)) {
                candle_core::bail!("fused encoder: dropout does not match the layers, or its rate is not in [0, 1)")
            }
        }
        if let Some(p) = &self.position_bias {
            let ss = d.seq * d.seq;
            let rows = p.param.as_ref().map(|t| t.dims2()).transpose()?;
            let fits = p.values.len() == d.heads * ss
                && p.buckets.len() == ss
                && rows.is_none_or(|(b, h)| h == d.heads && p.buckets.iter().all(|&i| (i as usize) < b));
            if !fits {
                candle_core::bail!("fused encoder: the position bias does not match {d:?}")
            }
        }
        match (&self.lora, packed) {
            (Some(lora), Some(packed)) => lora.check(d, self.layers.len(), packed.len())?,
            (None, None) => {}
            _ => candle_core::bail!("fused encoder: LoRA needs its packed adapters, and only LoRA has them"),
        }
        let offsets = self.lora_offsets();
        let lost = || candle_core::Error::Msg("fused encoder: a layer output went missing".into());
        let mut tapes: Vec<Tape> = Vec::new();
        let mut carry: Option<Vec<f32>> = None;
        let mut output = if self.layers.is_empty() { x0.to_vec() } else { Vec::new() };
        for (l, params) in self.layers.iter().enumerate() {
            let slices = Slices::new(params);
            let w = slices.all()?;
            check_params(d, &w)?;
            let last = l + 1 == self.layers.len();
            let input: &[f32] = match l {
                0 => x0,
                _ if self.train => tapes.last().and_then(|t| t.out.as_deref()).ok_or_else(lost)?,
                _ => carry.as_deref().ok_or_else(lost)?,
            };
            let layer = F32Layer { w: &w, hidden: d.hidden, intermediate: d.intermediate, bf16: d.bf16 };
            let lora = self.layer_lora(&offsets, packed, l);
            let dropout = self.layer_dropout(l);
            let (pos, key_mask) = (self.position_values(), &self.key_mask[..]);
            let (y, tape) = layer_forward(d, &layer, input, key_mask, pos, dropout, self.train, lora.as_ref());
            match tape {
                Some(mut tape) => {
                    if last {
                        output = y;
                    } else {
                        tape.out = Some(y);
                    }
                    tapes.push(tape);
                }
                None if last => output = y,
                None => {
                    if let Some(previous) = carry.replace(y) {
                        pool::give(previous);
                    }
                }
            }
        }
        if self.train {
            *self.tape.lock().map_err(|_| candle_core::Error::Msg("fused encoder: tape lock poisoned".into()))? =
                Some(tapes);
        }
        Ok(output)
    }

    /// The input's gradient, and with LoRA the packed adapters'; the backbone's parameter gradients (without
    /// LoRA) go to the sink.
    fn backward(
        &self,
        x0: &[f32],
        packed: Option<&[f32]>,
        mut dy: Vec<f32>,
    ) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        let d = &self.dims;
        let mut tape =
            self.tape.lock().map_err(|_| candle_core::Error::Msg("fused encoder: tape lock poisoned".into()))?;
        let mut tapes = if self.retain { tape.clone() } else { tape.take() }.ok_or_else(|| {
            candle_core::Error::Msg("fused encoder: backward needs a forward pass in training mode, once".into())
        })?;
        drop(tape);
        if dy.len() != x0.len() || tapes.len() != self.layers.len() {
            candle_core::bail!("fused encoder: the output gradient or the tape does not match the forward pass")
        }
        let offsets = self.lora_offsets();
        let mut lora_grad = packed.map(|p| vec![0f32; p.len()]);
        let mut grads = Vec::new();
        // The position bias's gradient, `heads × seq × seq`, summed over the layers.
        let position = self.position_bias.as_ref().and_then(|p| p.param.as_ref().map(|param| (p, param)));
        let mut dpos = position.map(|_| vec![0f32; d.heads * d.seq * d.seq]);
        while let Some(tape) = tapes.pop() {
            let l = tapes.len();
            let slices = Slices::new(&self.layers[l]);
            let w = slices.all()?;
            let x = match tapes.last() {
                Some(prev) => prev
                    .out
                    .as_deref()
                    .ok_or_else(|| candle_core::Error::Msg("fused encoder: tape lost a layer output".into()))?,
                None => x0,
            };
            let lora = self.layer_lora(&offsets, packed, l);
            match (lora.as_ref(), lora_grad.as_deref_mut()) {
                // A frozen backbone: no parameter gradients.
                (Some(lora), Some(lg)) => {
                    let (drop, lora) = (self.layer_dropout(l), Some((lora, lg)));
                    let dx = layer_backward(d, &w, x, &tape, drop, &dy, None, lora, dpos.as_deref_mut());
                    pool::give(std::mem::replace(&mut dy, dx));
                }
                _ => {
                    let mut g: Vec<Vec<f32>> = w.iter().map(|w| vec![0f32; w.len()]).collect();
                    let (drop, layer_grads) = (self.layer_dropout(l), Some(&mut g[..]));
                    let dx = layer_backward(d, &w, x, &tape, drop, &dy, layer_grads, None, dpos.as_deref_mut());
                    pool::give(std::mem::replace(&mut dy, dx));
                    for (param, g) in self.layers[l].iter().zip(g) {
                        grads.push((param.clone(), Tensor::from_vec(g, param.shape(), param.device())?));
                    }
                }
            }
            tape.recycle();
        }
        if let (Some((p, param)), Some(dpos)) = (position, dpos) {
            // Each pair's gradient into its bucket's row of the parameter.
            let (buckets, heads) = param.dims2()?;
            let ss = d.seq * d.seq;
            let mut g = vec![0f32; buckets * heads];
            for (head, block) in dpos.chunks_exact(ss).enumerate() {
                for (&bucket, &x) in p.buckets.iter().zip(block) {
                    g[bucket as usize * heads + head] += x;
                }
            }
            grads.push((param.clone(), Tensor::from_vec(g, param.shape(), param.device())?));
        }
        self.sink
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused encoder: gradient sink poisoned".into()))?
            .extend(grads);
        Ok((dy, lora_grad))
    }
}

/// A tensor's f32 data as a vector (the output gradient, which the backward pass overwrites).
fn host_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp1 for FusedEncoder {
    fn name(&self) -> &'static str {
        "fused-encoder"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.forward(f32_slice(storage, layout)?, None)?;
        Ok((CpuStorage::F32(output), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let arg = arg.contiguous()?;
        let (x0, layout) = arg.storage_and_layout();
        let Storage::Cpu(x0) = &*x0 else { candle_core::bail!("fused encoder: input must be on the CPU") };
        let (dx, _) = self.backward(f32_slice(x0, layout)?, None, host_vec(grad_res)?)?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// With LoRA: the encoder input and the packed adapters.
impl CustomOp2 for FusedEncoder {
    fn name(&self) -> &'static str {
        "fused-encoder-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.forward(f32_slice(s1, l1)?, Some(f32_slice(s2, l2)?))?;
        Ok((CpuStorage::F32(output), l1.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (arg, packed) = (arg.contiguous()?, packed.contiguous()?);
        let ((x0, xl), (p, pl)) = (arg.storage_and_layout(), packed.storage_and_layout());
        let (Storage::Cpu(x0), Storage::Cpu(p)) = (&*x0, &*p) else {
            candle_core::bail!("fused encoder: inputs must be on the CPU")
        };
        let (dx, dp) = self.backward(f32_slice(x0, xl)?, Some(f32_slice(p, pl)?), host_vec(grad_res)?)?;
        let dp = dp.ok_or_else(|| candle_core::Error::Msg("fused encoder: no LoRA gradient".into()))?;
        Ok((
            Some(Tensor::from_vec(dx, arg.shape(), arg.device())?),
            Some(Tensor::from_vec(dp, packed.shape(), packed.device())?),
        ))
    }
}

/// A layer's four projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    /// q | k | v side by side (`3 · hidden` outputs).
    Qkv,
    AttentionOutput,
    Intermediate,
    Output,
}

/// The weights of one layer as its forward pass uses them: f32 parameters ([`F32Layer`]) or int8 ones
/// ([`super::int8::Int8Layer`]).
pub trait LayerWeights: Sync {
    /// Writes `x Wᵀ + b` of projection `p` into `out` (`rows × out_dim`).
    fn project(&self, p: Proj, x: &[f32], rows: usize, out: &mut [f32]);
    /// Writes `x Wᵀ` of projection `p` into `out` and returns the bias `b` for the pass that reads `out` to
    /// add, or writes `x Wᵀ + b` itself and returns `None` (the default).
    fn project_deferred(&self, p: Proj, x: &[f32], rows: usize, out: &mut [f32]) -> Option<&[f32]> {
        self.project(p, x, rows, out);
        None
    }
    /// Writes the q|k|v rows into `out` (`rows × 3 · hidden`) without their biases and returns those, for the
    /// attention kernel to add as it packs the rows, or writes them with the biases and returns `None` (the
    /// default).
    fn project_qkv_deferred(&self, x: &[f32], rows: usize, out: &mut [f32]) -> QkvBias<'_> {
        self.project(Proj::Qkv, x, rows, out);
        None
    }
    /// The attention LayerNorm's weight and bias, then the output LayerNorm's.
    fn norms(&self) -> [&[f32]; 4];
}

/// A layer's f32 parameters in [`LayerParams`] order.
struct F32Layer<'a> {
    w: &'a [&'a [f32]],
    hidden: usize,
    intermediate: usize,
    bf16: bool,
}

impl LayerWeights for F32Layer<'_> {
    fn project(&self, p: Proj, x: &[f32], rows: usize, out: &mut [f32]) {
        let (w, h, i, bf16) = (self.w, self.hidden, self.intermediate, self.bf16);
        match p {
            // q, k and v in one product against the stacked [3h × h] weight.
            Proj::Qkv => linear(x, &stacked(w, QW), &stacked(w, QB), out, rows, h, 3 * h, bf16),
            Proj::AttentionOutput => linear(x, w[OW], w[OB], out, rows, h, h, bf16),
            Proj::Intermediate => linear(x, w[IW], w[IB], out, rows, h, i, bf16),
            Proj::Output => linear(x, w[FW], w[FB], out, rows, i, h, bf16),
        }
    }

    /// In f32 the product overwrites `out` and the bias is left to the next pass (LayerNorm, GELU), which reads
    /// `out` anyway: that saves the pass that filled `out` with the bias and the product's read of it. q|k|v
    /// keep theirs, as attention reads them through the products per head.
    fn project_deferred(&self, p: Proj, x: &[f32], rows: usize, out: &mut [f32]) -> Option<&[f32]> {
        let (weight, bias, in_dim) = match p {
            Proj::AttentionOutput if !self.bf16 => (self.w[OW], self.w[OB], self.hidden),
            Proj::Intermediate if !self.bf16 => (self.w[IW], self.w[IB], self.hidden),
            Proj::Output if !self.bf16 => (self.w[FW], self.w[FB], self.intermediate),
            _ => {
                self.project(p, x, rows, out);
                return None;
            }
        };
        let out_dim = bias.len();
        matmul(
            ViewMut::new(out, rows, out_dim),
            View::new(x, rows, in_dim),
            View::new(weight, out_dim, in_dim).t(),
            1.0,
            false,
            Threads::All,
        );
        Some(bias)
    }

    /// In f32 the product overwrites `out`: neither a pass filling `out` with the biases nor the product's
    /// read of it.
    fn project_qkv_deferred(&self, x: &[f32], rows: usize, out: &mut [f32]) -> QkvBias<'_> {
        if self.bf16 {
            self.project(Proj::Qkv, x, rows, out);
            return None;
        }
        let h = self.hidden;
        let weight = stacked(self.w, QW);
        matmul(
            ViewMut::new(out, rows, 3 * h),
            View::new(x, rows, h),
            View::new(&weight, 3 * h, h).t(),
            1.0,
            false,
            Threads::All,
        );
        Some(qkv_biases(self.w))
    }

    fn norms(&self) -> [&[f32]; 4] {
        [self.w[N1W], self.w[N1B], self.w[N2W], self.w[N2B]]
    }
}

/// The layers' forward pass for inference (no tape, no dropout), with a position bias on every layer's scores
/// where `pos` (`heads × seq × seq`, [`PositionBias::values`]).
pub fn infer(d: &Dims, layers: &[impl LayerWeights], x0: &[f32], key_mask: &[u32], pos: Option<&[f32]>) -> Vec<f32> {
    let mut x = x0.to_vec();
    for layer in layers {
        let y = layer_forward(d, layer, &x, key_mask, pos, None, false, None).0;
        pool::give(std::mem::replace(&mut x, y));
    }
    x
}

#[allow(clippy::too_many_arguments)]
fn layer_forward(
    d: &Dims,
    w: &dyn LayerWeights,
    x: &[f32],
    key_mask: &[u32],
    pos: Option<&[f32]>,
    dropout: Option<&LayerDropout>,
    train: bool,
    lora: Option<&LayerLora>,
) -> (Vec<f32>, Option<Tape>) {
    let (n, h, inter) = (d.tokens(), d.hidden, d.intermediate);
    let [n1w, n1b, n2w, n2b] = w.norms();
    let mut lora_h: [Option<Vec<f32>>; SITES] = Default::default();
    let mut adapt = |site: usize, x: &[f32], out: &mut [f32], stride: usize, offset: usize| {
        if let Some(lora) = lora {
            lora_h[site] = lora.forward(d, site, x, out, stride, offset);
        }
    };
    // The fused attention kernel adds the q|k|v biases itself (the general path takes rows with them).
    let (qkv, qkv_bias) = time(Phase::Projections, || {
        let mut qkv = pool::take(n * 3 * h);
        let bias = match attention::fits(d) {
            true => w.project_qkv_deferred(x, n, &mut qkv),
            false => {
                w.project(Proj::Qkv, x, n, &mut qkv);
                None
            }
        };
        for site in 0..3 {
            adapt(site, x, &mut qkv, 3 * h, site * h);
        }
        (qkv, bias)
    });
    let mut probs = if train { pool::take(d.batch * d.heads * d.seq * d.seq) } else { Vec::new() };
    let ctx = time(Phase::Attention, || {
        // The general path writes each head's block before its columns of the context; the fused one needs none.
        let mut blocks = if attention::fits(d) { Vec::new() } else { pool::take(n * h) };
        let mut ctx = pool::take(n * h);
        let mask = dropout.map(LayerDropout::attention_mask);
        let probs = train.then_some(&mut probs[..]);
        attention_into(d, &qkv, qkv_bias, pos, key_mask, mask, probs, &mut blocks, &mut ctx);
        pool::give(blocks);
        ctx
    });
    let (a, a_bias) = time(Phase::Projections, || {
        let mut a = pool::take(n * h);
        let bias = w.project_deferred(Proj::AttentionOutput, &ctx, n, &mut a);
        adapt(3, &ctx, &mut a, h, 0);
        (a, bias)
    });
    // LayerNorm of `branch` (+ `bias`, dropout) + `residual`: in training into new buffers, with the normalised
    // inputs and 1/σ the backward pass needs; in inference over the branch itself.
    let norm = |mut branch: Vec<f32>, bias, mask: Option<DropoutMask<'_>>, residual: &[f32], gamma, beta| {
        if !train && mask.is_none() {
            time(Phase::Norms, || add_norm_in_place(&mut branch, bias, residual, gamma, beta, d.eps));
            return (branch, Vec::new(), Vec::new());
        }
        let (mut y, mut xhat, mut rstd) = (pool::take(n * h), pool::take(n * h), pool::take(n));
        time(Phase::Norms, || {
            add_norm(&branch, bias, mask, residual, gamma, beta, d.eps, &mut y, &mut xhat, &mut rstd)
        });
        pool::give(branch);
        (y, xhat, rstd)
    };
    let (y1, xhat1, rstd1) = norm(a, a_bias, dropout.map(LayerDropout::attention_output_mask), x, n1w, n1b);
    let (mut u, u_bias) = time(Phase::Projections, || {
        let mut u = pool::take(n * inter);
        let bias = w.project_deferred(Proj::Intermediate, &y1, n, &mut u);
        adapt(4, &y1, &mut u, inter, 0);
        (u, bias)
    });
    // g = gelu(u + b) for the next product. In training u is overwritten by gelu'(u + b), all the backward
    // pass needs; in inference u itself becomes g.
    let g = time(Phase::Activation, || {
        if !train {
            gelu_rows(&mut u, u_bias, inter);
            return Vec::new();
        }
        let mut g = pool::take(n * inter);
        gelu_and_grad_rows(&mut u, &mut g, u_bias, inter);
        g
    });
    let (g, dgelu) = if train { (g, u) } else { (u, Vec::new()) };
    let (o, o_bias) = time(Phase::Projections, || {
        let mut o = pool::take(n * h);
        let bias = w.project_deferred(Proj::Output, &g, n, &mut o);
        adapt(5, &g, &mut o, h, 0);
        (o, bias)
    });
    let (y2, xhat2, rstd2) = norm(o, o_bias, dropout.map(LayerDropout::output_mask), &y1, n2w, n2b);
    if train {
        let qkv_biased = qkv_bias.is_none();
        let tape = Tape { qkv, qkv_biased, probs, ctx, xhat1, rstd1, y1, dgelu, g, xhat2, rstd2, out: None, lora_h };
        return (y2, Some(tape));
    }
    for v in [qkv, ctx, xhat1, rstd1, y1, g, xhat2, rstd2] {
        pool::give(v);
    }
    (y2, None)
}

/// A projection's weight gradient `doutᵀ · input` (`[out, in]`, overwritten) over `n` rows.
fn weight_grad(bf16: bool, gw: &mut [f32], dout: &[f32], input: &[f32], n: usize) {
    let (out_dim, in_dim) = (dout.len() / n.max(1), input.len() / n.max(1));
    matmul_in(
        bf16,
        ViewMut::new(gw, out_dim, in_dim),
        View::new(dout, n, out_dim).t(),
        View::new(input, n, in_dim),
        1.0,
        false,
        Threads::All,
    );
}

/// LayerNorm's backward pass with its weight's gradient at `g[weight]` and its bias's at `g[weight + 1]`, or
/// into scratch buffers for a frozen layer (`g` absent).
fn norm_grads(
    g: Option<&mut [Vec<f32>]>,
    weight: usize,
    h: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> Vec<f32>,
) -> Vec<f32> {
    match g {
        Some(g) => {
            let (lo, hi) = g.split_at_mut(weight + 1);
            f(&mut lo[weight], &mut hi[0])
        }
        None => f(&mut vec![0f32; h], &mut vec![0f32; h]),
    }
}

/// One layer's backward pass: returns the gradient of its input. The parameters' gradients go into `g`
/// (absent for a frozen layer), LoRA's into the packed buffer beside its [`LayerLora`], a position bias's
/// (`heads × seq × seq`) added to `dpos`.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    d: &Dims,
    w: &[&[f32]],
    x: &[f32],
    t: &Tape,
    dropout: Option<&LayerDropout>,
    dy: &[f32],
    mut g: Option<&mut [Vec<f32>]>,
    mut lora: Option<(&LayerLora, &mut [f32])>,
    dpos: Option<&mut [f32]>,
) -> Vec<f32> {
    let (n, h, inter) = (d.tokens(), d.hidden, d.intermediate);
    // The LoRA update of `site` (input `input`, output gradient `dout`): its adapters' gradients, and its input's
    // added to `dx`.
    let mut adapted = |site: usize, input: &[f32], dout: &[f32], stride: usize, offset: usize, dx: &mut [f32]| {
        if let (Some((lora, lg)), Some(hs)) = (lora.as_mut(), t.lora_h[site].as_deref()) {
            lora.backward(d, site, input, hs, dout, stride, offset, dx, lg);
        }
    };
    // Output LayerNorm, then the dropout on the feed-forward output.
    let dr2 = time(Phase::Norms, || {
        norm_grads(g.as_deref_mut(), N2W, h, |gw, gb| norm_backward(dy, &t.xhat2, &t.rstd2, w[N2W], gw, gb))
    });
    let dout = time(Phase::Other, || masked(&dr2, dropout.map(LayerDropout::output_mask)));
    if let Some(g) = g.as_deref_mut() {
        time(Phase::Other, || col_sums(&dout, h, 0, &mut g[FB]));
        time(Phase::Projections, || weight_grad(d.bf16, &mut g[FW], &dout, &t.g, n));
    }
    let mut du = time(Phase::Projections, || {
        let mut du = pool::take(n * inter);
        matmul_in(
            d.bf16,
            ViewMut::new(&mut du, n, inter),
            View::new(&dout, n, h),
            View::new(w[FW], h, inter),
            1.0,
            false,
            Threads::All,
        );
        adapted(5, &t.g, &dout, h, 0, &mut du);
        du
    });
    recycle(dout);
    time(Phase::Activation, || {
        elementwise(
            &mut du,
            #[inline(always)]
            |c, start| {
                for (g, &d) in c.iter_mut().zip(&t.dgelu[start..]) {
                    *g *= d;
                }
            },
        )
    });
    if let Some(g) = g.as_deref_mut() {
        time(Phase::Other, || col_sums(&du, inter, 0, &mut g[IB]));
        time(Phase::Projections, || weight_grad(d.bf16, &mut g[IW], &du, &t.y1, n));
    }
    let mut dy1 = dr2;
    time(Phase::Projections, || {
        matmul_in(
            d.bf16,
            ViewMut::new(&mut dy1, n, h),
            View::new(&du, n, inter),
            View::new(w[IW], inter, h),
            1.0,
            true,
            Threads::All,
        );
        adapted(4, &t.y1, &du, inter, 0, &mut dy1);
    });
    pool::give(du);
    // Attention LayerNorm, dropout, output projection.
    let dr1 = time(Phase::Norms, || {
        norm_grads(g.as_deref_mut(), N1W, h, |gw, gb| norm_backward(&dy1, &t.xhat1, &t.rstd1, w[N1W], gw, gb))
    });
    drop(dy1);
    let da = time(Phase::Other, || masked(&dr1, dropout.map(LayerDropout::attention_output_mask)));
    if let Some(g) = g.as_deref_mut() {
        time(Phase::Other, || col_sums(&da, h, 0, &mut g[OB]));
        time(Phase::Projections, || weight_grad(d.bf16, &mut g[OW], &da, &t.ctx, n));
    }
    let dctx = time(Phase::Projections, || {
        let mut dctx = pool::take(n * h);
        matmul_in(
            d.bf16,
            ViewMut::new(&mut dctx, n, h),
            View::new(&da, n, h),
            View::new(w[OW], h, h),
            1.0,
            false,
            Threads::All,
        );
        adapted(3, &t.ctx, &da, h, 0, &mut dctx);
        dctx
    });
    recycle(da);
    let bias = (!t.qkv_biased).then(|| qkv_biases(w));
    let mask = dropout.map(LayerDropout::attention_mask);
    let dqkv = time(Phase::Attention, || match dpos {
        Some(dpos) => {
            // The scores' gradient per example, summed over the batch into the position bias's.
            let mut ds = pool::take(d.batch * d.heads * d.seq * d.seq);
            let dqkv = attention_backward_biased(d, &t.qkv, bias, &t.probs, mask, &dctx, Some(&mut ds[..]));
            for example in ds.chunks_exact(dpos.len()) {
                for (g, &x) in dpos.iter_mut().zip(example) {
                    *g += x;
                }
            }
            pool::give(ds);
            dqkv
        }
        None => attention_backward_biased(d, &t.qkv, bias, &t.probs, mask, &dctx, None),
    });
    pool::give(dctx);
    // The q, k, v projections, as one product against the stacked weight.
    let mut dx = dr1;
    if let Some(g) = g {
        let (mut gw, mut gb) = (vec![0f32; 3 * h * h], vec![0f32; 3 * h]);
        time(Phase::Other, || col_sums(&dqkv, 3 * h, 0, &mut gb));
        time(Phase::Projections, || weight_grad(d.bf16, &mut gw, &dqkv, x, n));
        time(Phase::Other, || {
            for p in 0..3 {
                g[QW + 2 * p].copy_from_slice(&gw[p * h * h..(p + 1) * h * h]);
                g[QB + 2 * p].copy_from_slice(&gb[p * h..(p + 1) * h]);
            }
        });
    }
    let wqkv = time(Phase::Other, || stacked(w, QW));
    time(Phase::Projections, || {
        matmul_in(
            d.bf16,
            ViewMut::new(&mut dx, n, h),
            View::new(&dqkv, n, 3 * h),
            View::new(&wqkv, 3 * h, h),
            1.0,
            true,
            Threads::All,
        );
        for site in 0..3 {
            adapted(site, x, &dqkv, 3 * h, site * h, &mut dx);
        }
    });
    pool::give(dqkv);
    dx
}
