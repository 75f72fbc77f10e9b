//! The public API over the kernels: quantize / dequantize ([`affine`], [`nf4`], [`double_quant`]),
//! [`QuantLinear`](linear::QuantLinear) with LoRA adapters and its error bounds ([`linear`]), and merging
//! adapters into weights ([`merge`]). Re-exported at the crate root.

pub mod affine;
pub mod double_quant;
pub mod ggml;
pub mod linear;
pub mod merge;
pub mod nf4;
pub mod optim;
