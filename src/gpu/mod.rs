//! GPU kernels through `wgpu` (Vulkan, Metal, DX12, GL; WebGPU in the browser): fused
//! dequantize-matmul-plus-LoRA for NF4/FP4 (plain or double-quantized scales) and int8 affine weights.
//!
//! Enabled by the `gpu` cargo feature (off by default). Every GPU operation is `async` (the browser has no
//! blocking waits); native callers may use the `*_blocking` wrappers, which run the future with `pollster`.
//!
//! ```no_run
//! # async fn demo(layers: &[lowbit::linear::QuantLinear], x: &[f32], m: usize) -> lowbit::Result<()> {
//! use lowbit::gpu::{wgpu, GpuContext, GpuLinear};
//! let ctx = GpuContext::new().await?;              // prefers a discrete GPU; Error::NoGpuAdapter if none
//! let gpu: Vec<GpuLinear> = layers.iter().map(|l| GpuLinear::upload(&ctx, l)).collect::<Result<_, _>>()?;
//!
//! // Host slices in, Vec out: one layer, one submit, one readback.
//! let y0 = gpu[0].forward(&ctx, x, m).await?;      // [m, out], f32
//!
//! // An engine keeps activations on the device and chains layers (out of layer i = in of layer i+1):
//! // every forward is recorded into one encoder, one submit runs them all, nothing is read back between.
//! let buf = |floats: usize| ctx.device().create_buffer(&wgpu::BufferDescriptor {
//!     label: None,
//!     size: (floats.max(1) * 4) as u64,
//!     usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
//!     mapped_at_creation: false,
//! });
//! let mut acts = vec![buf(m * gpu[0].in_features())];
//! acts.extend(gpu.iter().map(|l| buf(m * l.out_features())));
//! ctx.queue().write_buffer(&acts[0], 0, lowbit::gpu::bytes_of_f32(x));
//! let mut enc = ctx.device().create_command_encoder(&Default::default());
//! for (i, layer) in gpu.iter().enumerate() {
//!     layer.encode_forward(&ctx, &mut enc, &acts[i], &acts[i + 1], m)?; // records; submits nothing
//! }
//! // Only the last output comes back (an engine would feed it to its next kernel instead).
//! let n = m * gpu[gpu.len() - 1].out_features();
//! let read = ctx.device().create_buffer(&wgpu::BufferDescriptor {
//!     label: None,
//!     size: (n.max(1) * 4) as u64,
//!     usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
//!     mapped_at_creation: false,
//! });
//! enc.copy_buffer_to_buffer(&acts[gpu.len()], 0, &read, 0, (n * 4) as u64);
//! ctx.queue().submit([enc.finish()]);
//! let y = lowbit::gpu::read_f32(ctx.device(), &read, n).await?;
//! # let _ = (y0, y); Ok(()) }
//! ```
//!
//! # Recording many forwards into one submission
//! [`GpuLinear::encode_forward`] only records commands; nothing is written through `queue.write_buffer`.
//! That matters because every `write_buffer` is executed at the *next submit, before all of that submit's
//! commands*: a per-call uniform rewritten for each recorded forward would leave every forward of the
//! submission seeing the last call's values. So everything a recorded forward reads besides the caller's
//! `x` is immutable once created:
//! * the per-call uniform `Call` (m, adapter mask stride, LoRA on/off) and the adapter masks per row live in
//!   small buffers created *with their contents* (`create_buffer_init`) and cached per
//!   (m, adapter selection); a different m or selection gets its own pair, never a rewrite;
//! * bind groups are cached per (x, y, m, selection) and reused; there is one bind group layout for every
//!   kernel variant, so a cached group fits GEMV, GEMM, subgroup, f16 and shrink pipelines alike;
//! * the LoRA scratch `t` ([m, Σr], written by the shrink kernel and read by the output kernel of the same
//!   forward) is one buffer per layer shared by all recorded forwards: commands run in recording order and
//!   wgpu puts a barrier between dispatches that write and then read or write a buffer, so forward k+1's
//!   shrink cannot overtake forward k's output pass.
//!
//! Both caches are bounded ([`CACHE_ENTRIES`] entries each, least recently used evicted). Evicting is safe
//! at any time: wgpu keeps a buffer or bind group alive while a recorded command buffer refers to it.
//! A cached bind group holds a reference to the caller's `x` and `y` buffers, keeping them alive until the
//! entry is evicted or [`GpuLinear::clear_bind_groups`] is called.

//! # Backward (QLoRA training)
//! [`GpuLinear::encode_backward`] records `dx = dy·W + Σ s·(dy·B)·A` (writing a caller buffer; `W` decoded in
//! the kernel, never materialised) and ADDS the LoRA gradients `dA = s·(dy·B)ᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)` into
//! caller buffers ([`GpuAdapterGrad`]), under the same recording rules as the forward. Every output element is
//! summed in one fixed order, so results are deterministic. Its own two bind group layouts
//! (`shaders/backward_dx.wgsl`; `shaders/lora_grads.wgsl` plus `shrink.wgsl`) keep each kernel within
//! WebGPU's 8 storage buffers. [`GpuLinear::backward`] is the host-slice convenience. The stated error bound is
//! `QuantLinear::backward_error_bound_for(.., BoundTarget::Gpu)`.
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
mod layout;
mod linear;
mod linear_backward;
mod readback;
mod shader;

pub use context::{ContextOptions, GpuContext, GpuFeatures};
pub use layout::{uniform_layouts, UniformLayout};
pub use linear::{GpuLinear, KernelChoice, UploadOptions, CACHE_ENTRIES, F16_SAFE_PRODUCT};
pub use linear_backward::GpuAdapterGrad;
pub use readback::read_f32;
pub use shader::{KernelKey, KernelOp};
/// The `wgpu` version lowbit is built with (for `wgpu::Backends` in [`ContextOptions`] and device access).
pub use wgpu;

/// Runs a lowbit GPU future to completion on the current thread (native only; the browser must `await`).
/// This is the blocking wrapper behind every `*_blocking` method.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// The bytes of `v` (little-endian f32, as GPU buffers hold them), for `queue.write_buffer`.
pub fn bytes_of_f32(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}
