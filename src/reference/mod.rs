//! The executable specification: plain scalar loops, one file per format, never optimised.
//!
//! Each function follows `docs/formats.md` rule by rule. Every fast path is tested against these.

pub mod act8;
pub mod affine;
pub mod double_quant;
pub mod ggml;
pub mod linear;
pub mod linear_backward;
pub mod nf4;
