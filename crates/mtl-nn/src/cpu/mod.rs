//! CPU kernels outside candle's op-by-op graph: a checked matrix multiply on strided views, vectorised math,
//! and the fused encoder stack with its own backward pass, and its int8 twin for inference.

pub mod amx;
pub(crate) mod blocks;
pub mod decoder;
pub mod encoder;
pub mod fused;
pub mod gemm;
pub mod int8;
pub mod int8_avx2;
pub mod lm_loss;
pub mod lora;
pub mod math;
pub mod paged;
pub(crate) mod pool;
pub mod profile;
pub mod quant;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The f32 values of a contiguous CPU storage (inside a custom op); `what` names the op in the error.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: tensors must be contiguous") };
    Ok(&data[a..b])
}

/// `f` on the f32 values of a contiguous CPU tensor (a backward pass's inputs, a weight an op holds).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*s else { candle_core::bail!("{what}: CPU tensors only") };
    f(contiguous(cpu, l, what)?)
}
