//! CPU kernels outside candle's op-by-op graph: a checked matrix multiply on strided views, vectorised math,
//! and the fused encoder stack with its own backward pass.

pub mod encoder;
pub mod gemm;
pub mod math;
