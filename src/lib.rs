//! # lowbit
//!
//! Low-bit quantization kernels for LLM inference, exact and fast on every CPU.
//!
//! * [`affine`]: asymmetric 8-bit affine quantization (scale + zero point; per tensor, per output channel,
//!   per group), bit-identical to PyTorch's `quint8` (`MinMaxObserver` + `quantize_per_tensor` /
//!   `quantize_per_channel`).
//! * [`nf4`]: NF4 (and bitsandbytes FP4) blockwise 4-bit quantization, with [`double_quant`] of the block
//!   scales, bit-compatible with bitsandbytes / QLoRA checkpoints (`io::bnb`, with the `io` feature).
//!
//! The [`reference`](mod@reference) module is the executable specification: plain scalar loops that follow
//! `docs/formats.md` rule by rule. Every fast path in [`cpu`] (portable SIMD, AVX2, AVX-512, threads) gives the
//! same codes, parameters and dequantized bits as the reference, which the test suite checks.
//!
//! ```
//! use lowbit::affine::{quantize, Granularity};
//!
//! let w: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
//! let q = quantize(&w, &[8, 64], Granularity::PerChannel)?;
//! assert_eq!(q.scales().len(), 8); // one scale and one zero point per row
//! let back: Vec<f32> = q.dequantize()?;
//! for (x, y) in w.iter().zip(&back) {
//!     assert!((x - y).abs() <= q.scales()[0].max(q.scales()[7]));
//! }
//! # Ok::<(), lowbit::Error>(())
//! ```
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

// The layers, bottom up (each uses only the ones above it in this list):
// element / shape / error → format (data only) → reference (the spec) → cpu, gpu (kernels) → api → io.
pub mod element;
mod error;
pub mod shape;

pub mod format;

pub mod reference;

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;

mod api;
pub use api::{affine, double_quant, ggml, linear, merge, nf4, optim};

#[cfg(feature = "io")]
pub mod io;

pub use format::{lora, storage};

pub use element::{DType, Element};
pub use error::{Error, Result};
pub use format::scheme::Scheme;
pub use half::{bf16, f16};

/// The README's Rust examples, compiled and run as doctests so they stay accurate.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
