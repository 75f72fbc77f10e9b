//! GPU kernels through `wgpu` (Vulkan, Metal, DX12, GL; WebGPU in the browser): fused
//! dequantize-matmul-plus-LoRA for NF4/FP4 (plain or double-quantized scales) and int8 affine weights.
//!
//! Enabled by the `gpu` cargo feature (off by default). Every GPU operation is `async` (the browser has no
//! blocking waits); native callers may use the `*_blocking` wrappers, which run the future with `pollster`.
//!
//! ```no_run
//! # async fn demo(layer: &lowbit::linear::QuantLinear, x: &[f32], m: usize) -> Result<(), lowbit::gpu::GpuError> {
//! use lowbit::gpu::{GpuContext, GpuLinear};
//! let ctx = GpuContext::new().await?;            // prefers a discrete GPU; GpuError::NoAdapter if none
//! let gpu_layer = GpuLinear::upload(&ctx, layer)?; // packed codes, compressed scales, bias, adapters: once
//! let y = gpu_layer.forward(&ctx, x, m).await?;   // y: [m, out], f32
//! # let _ = y; Ok(()) }
//! ```
//!
//! # Layout on the GPU
//! * Codes: the packed bytes reinterpreted as little-endian `u32` words (4-bit: 8 codes per word, first element
//!   in the high nibble of each byte; int8: 4 codes per word). Blocks run over the flattened tensor, so a
//!   block may cross a row boundary; kernels index by flat element.
//! * Scales stay compressed: plain f32 absmax per block, or for double quantization one u8 code per block
//!   (4 per word) decoded in the kernel as `map[q] * nested_absmax[b / 256] + offset`. int8: f32 scales plus
//!   u8 zero points (4 per word).
//! * A weight larger than one storage binding (`max_storage_buffer_binding_size`, 128 MiB by default) is
//!   split into chunks of whole output rows, each with its own codes and scales buffers and one dispatch.
//! * LoRA: all adapters' `A` (`[Σr, in]`) then all `B` (each `[out, r_a]`) in one f32 buffer; a shrink
//!   kernel computes `t = x·Aᵀ` for the rows that use each adapter, and the output pass adds `s·t·Bᵀ`.

mod context;
mod linear;
mod readback;
mod shader;

pub use context::{ContextOptions, GpuContext, GpuFeatures};
pub use linear::{GpuLinear, KernelChoice, UploadOptions};
pub use readback::read_f32;
pub use shader::{KernelKey, KernelOp, WeightKind};
/// The `wgpu` version lowbit is built with (for `wgpu::Backends` in [`ContextOptions`] and device access).
pub use wgpu;

use std::fmt;

/// Runs a lowbit GPU future to completion on the current thread (native only; the browser must `await`).
/// This is the blocking wrapper behind every `*_blocking` method.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// Errors of the GPU module.
#[derive(Debug)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter was found for the requested backends (e.g. no GPU driver, no lavapipe).
    NoAdapter {
        /// What was searched, for the message.
        detail: String,
    },
    /// The adapter refused to create a device.
    RequestDevice(String),
    /// A shader failed to preprocess or compile (a bug in lowbit, or a driver problem).
    Shader {
        /// The kernel or file concerned.
        kernel: String,
        /// The compiler's message.
        detail: String,
    },
    /// A GPU operation failed (validation, out of memory, lost device, failed readback).
    Wgpu(String),
    /// Invalid input (shape mismatch, adapter id out of range, tensor too large): nothing was sent to the GPU.
    Input(crate::Error),
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::NoAdapter { detail } => write!(f, "no GPU adapter: {detail}"),
            GpuError::RequestDevice(e) => write!(f, "GPU device request failed: {e}"),
            GpuError::Shader { kernel, detail } => write!(f, "GPU shader `{kernel}` failed: {detail}"),
            GpuError::Wgpu(e) => write!(f, "GPU error: {e}"),
            GpuError::Input(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for GpuError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GpuError::Input(e) => Some(e),
            _ => None,
        }
    }
}

impl From<crate::Error> for GpuError {
    fn from(e: crate::Error) -> Self {
        GpuError::Input(e)
    }
}
