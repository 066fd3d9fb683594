//! CPU kernels outside candle's op-by-op graph: a checked matrix multiply on strided views, vectorised math,
//! and the fused encoder stack with its own backward pass, and its int8 twin for inference.

pub mod decoder;
pub mod encoder;
pub mod fused;
pub mod gemm;
pub mod int8;
pub mod lora;
pub mod math;
pub mod quant;
