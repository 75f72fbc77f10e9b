//! Async readback of GPU buffers (works on native, where we poll the device, and on the web, where the
//! browser's event loop completes the map).

use crate::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// A one-shot slot filled by a `map_async` callback.
type Slot = Arc<Mutex<(Option<Result<(), wgpu::BufferAsyncError>>, Option<Waker>)>>;

struct MapFuture(Slot);

impl Future for MapFuture {
    type Output = Result<(), wgpu::BufferAsyncError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Maps `buffer` (usage `MAP_READ`) for reading, waits for the GPU, and copies out its first `len` f32 values.
/// The buffer is unmapped again before returning. Errors: [`Error::ShapeMismatch`] when `len` values exceed
/// the buffer, [`Error::InvalidArgument`] when it lacks `MAP_READ`, [`Error::Gpu`] when mapping fails.
pub async fn read_f32(device: &wgpu::Device, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, Error> {
    let bytes = (len as u64).saturating_mul(4);
    if bytes > buffer.size() {
        return Err(Error::ShapeMismatch {
            what: format!("readback of {len} f32 values: bytes vs the buffer's size"),
            got: bytes.to_string(),
            expected: format!("at most {}", buffer.size()),
        });
    }
    if !buffer.usage().contains(wgpu::BufferUsages::MAP_READ) {
        return Err(Error::invalid("buffer", format!("a buffer with usage {:?}", buffer.usage()), "usage MAP_READ"));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let slot: Slot = Arc::new(Mutex::new((None, None)));
    let s2 = slot.clone();
    buffer.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let mut g = match s2.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.0 = Some(r);
        if let Some(w) = g.1.take() {
            w.wake();
        }
    });
    #[cfg(not(target_arch = "wasm32"))]
    device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::gpu("device poll", e))?;
    #[cfg(target_arch = "wasm32")]
    let _ = device;
    MapFuture(slot).await.map_err(|e| Error::gpu("map buffer for reading", e))?;
    let out = {
        let view = buffer.get_mapped_range(0..bytes).map_err(|e| Error::gpu("mapped range", format!("{e:?}")))?;
        let mut v = vec![0f32; len];
        for (d, c) in v.iter_mut().zip(view.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        v
    };
    buffer.unmap();
    Ok(out)
}

/// Like [`read_f32`] for u64 values (timestamp queries).
pub(crate) async fn read_u64(device: &wgpu::Device, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u64>, Error> {
    let f = read_f32(device, buffer, len * 2).await?;
    Ok(f.chunks_exact(2).map(|c| (c[0].to_bits() as u64) | ((c[1].to_bits() as u64) << 32)).collect())
}
