//! Data-only format types: which format ([`Scheme`](scheme::Scheme)), the quantized tensors with their
//! invariants (codes, scales, shapes), storage that is owned or a view of a shared map, LoRA adapters, and
//! borrowed views of a whole layer that the reference and the kernels read. Nothing here runs a kernel or
//! touches a file; the public modules [`crate::affine`], [`crate::nf4`], [`crate::double_quant`] re-export these
//! types next to the functions that quantize and dequantize them.

pub mod affine;
pub mod block_size;
pub mod double_quant;
pub mod four_bit;
pub mod ggml;
pub mod layer;
pub mod lora;
pub mod scheme;
pub mod storage;
