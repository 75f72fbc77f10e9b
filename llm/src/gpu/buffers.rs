//! Creating storage buffers from host slices and reading buffers back (blocking, native only): for tests and
//! for the model's one-time uploads. Nothing here is used while recording a forward.

#[cfg(not(target_arch = "wasm32"))]
use crate::{Error, Result};
use lowbit::gpu::{wgpu, GpuContext};
use wgpu::util::DeviceExt;

/// The usages of every buffer made here: bindable as storage, writable by `queue.write_buffer` / copies, and
/// readable by [`read_f32_blocking`] (which copies out of it).
pub const STORAGE_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

fn init(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    // A zero-sized buffer cannot be bound: an empty slice gets one zero word.
    let zero = [0u8; 4];
    let contents = if bytes.is_empty() { &zero[..] } else { bytes };
    ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents,
        usage: STORAGE_USAGE,
    })
}

/// A storage buffer ([`STORAGE_USAGE`]) holding `data` (f32, little-endian, from byte 0).
pub fn storage_f32(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    init(ctx, label, bytemuck::cast_slice(data))
}

/// A storage buffer ([`STORAGE_USAGE`]) holding `data` (u32: token ids, argmax results).
pub fn storage_u32(ctx: &GpuContext, label: &str, data: &[u32]) -> wgpu::Buffer {
    init(ctx, label, bytemuck::cast_slice(data))
}

/// A zero-filled storage buffer ([`STORAGE_USAGE`]) of `len` 4-byte elements (at least one).
pub fn storage_zeroed(ctx: &GpuContext, label: &str, len: usize) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (len.max(1) as u64) * 4,
        usage: STORAGE_USAGE,
        mapped_at_creation: false,
    })
}

/// Copies the first `len` 4-byte elements of `buffer` (usage `COPY_SRC`) to a staging buffer, submits that copy
/// (after everything submitted before it), waits, and returns the raw 32-bit words.
#[cfg(not(target_arch = "wasm32"))]
fn read_words_blocking(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u32>> {
    let bytes = (len as u64).saturating_mul(4);
    if bytes > buffer.size() {
        return Err(Error::Invalid(format!(
            "readback of {len} elements ({bytes} bytes) from a buffer of {} bytes",
            buffer.size()
        )));
    }
    if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
        return Err(Error::Invalid(format!("readback needs a buffer with COPY_SRC usage, got {:?}", buffer.usage())));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("lowbit-llm readback"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
    enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    ctx.queue().submit([enc.finish()]);
    // `read_f32` copies the bytes verbatim (`f32::from_le_bytes`), so `to_bits` recovers any 32-bit word.
    let v = lowbit::gpu::block_on(lowbit::gpu::read_f32(ctx.device(), &staging, len))?;
    Ok(v.into_iter().map(f32::to_bits).collect())
}

/// Reads the first `len` f32 values of `buffer` (which needs `COPY_SRC` usage, as [`STORAGE_USAGE`] has),
/// blocking until everything submitted before has run. Errors ([`Error::Invalid`]) when the buffer is too
/// small or lacks `COPY_SRC`; ([`Error::Lowbit`]) when mapping fails.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_f32_blocking(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
    Ok(read_words_blocking(ctx, buffer, len)?.into_iter().map(f32::from_bits).collect())
}

/// [`read_f32_blocking`] for u32 buffers (token ids, [`GpuOps::encode_argmax`](super::GpuOps::encode_argmax)).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_u32_blocking(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u32>> {
    read_words_blocking(ctx, buffer, len)
}
