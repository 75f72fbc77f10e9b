//! Uploading a [`QuantLinear`] to the GPU: the API's entry to [`GpuLinear`] (the GPU module itself works on
//! layer views and never names `QuantLinear`).

use super::{AdapterGrad, LinearGrads, QuantLinear};
use crate::gpu::{wgpu, GpuContext, GpuLinear, UploadOptions};
use crate::Error;

impl GpuLinear {
    /// Uploads `layer` (weight, scales, bias, every attached adapter with its enabled state) to the GPU.
    pub fn upload(ctx: &GpuContext, layer: &QuantLinear) -> Result<GpuLinear, Error> {
        Self::upload_with(ctx, layer, UploadOptions::default())
    }

    /// [`upload`](Self::upload) with options. Errors (never GPU faults) when a tensor cannot be indexed with
    /// 32-bit indices, or when one output row, the LoRA weights or the small per-layer constants exceed one
    /// storage binding. A weight larger than one binding is split into chunks of whole rows.
    pub fn upload_with(ctx: &GpuContext, layer: &QuantLinear, opts: UploadOptions) -> Result<GpuLinear, Error> {
        GpuLinear::upload_view(ctx, layer.view(), opts)
    }
}

impl GpuLinear {
    /// The backward for host slices: uploads `x` (`[m, in]`) and `dy` (`[m, out]`), records
    /// [`encode_backward`](Self::encode_backward) into zeroed gradient buffers, submits once and reads back
    /// `dx` and every adapter's gradients (zero for adapters no row uses), as [`QuantLinear::backward`] returns
    /// them. Every enabled adapter applies to every row. Errors (before anything reaches the GPU) on wrong
    /// lengths or non-finite `x` / `dy`; a non-finite result (an f32 overflow) is an [`Error::NonFinite`]
    /// naming it. Allocates its buffers per call (a convenience; engines use `encode_backward`).
    pub async fn backward(&self, ctx: &GpuContext, x: &[f32], dy: &[f32], m: usize) -> Result<LinearGrads, Error> {
        self.backward_with(ctx, x, dy, m, None).await
    }

    /// [`backward`](Self::backward) with a per-row adapter selection (`Some(ids)`: row `i` used only adapter
    /// `ids[i]`, as [`forward_batch`](Self::forward_batch)).
    pub async fn backward_with(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        dy: &[f32],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
    ) -> Result<LinearGrads, Error> {
        use crate::gpu::{read_f32, GpuAdapterGrad};
        use wgpu::BufferUsages as U;
        let (n_in, n_out) = (self.in_features(), self.out_features());
        for (arg, v, width) in [("x", x, n_in), ("dy", dy, n_out)] {
            if v.len() != m.saturating_mul(width) {
                return Err(Error::shape(
                    format!("length of {arg} for m = {m} rows of {width}"),
                    v.len(),
                    m.saturating_mul(width),
                ));
            }
            crate::element::check_finite(arg, v)?;
        }
        let ranks = self.adapter_ranks().to_vec();
        let zero_grads = || ranks.iter().map(|&r| AdapterGrad { a: vec![0.0; r * n_in], b: vec![0.0; n_out * r] });
        if m == 0 {
            // Validates the selection; nothing to compute.
            if let Some(ids) = adapter_ids {
                if !ids.is_empty() {
                    return Err(Error::shape("length of adapter_ids (one per row of x)", ids.len(), 0));
                }
            }
            return Ok(LinearGrads { dx: Vec::new(), adapters: zero_grads().collect() });
        }
        self.prepare_backward(ctx).await?;
        let dev = ctx.device();
        let buf = |label: &str, floats: usize, usage: U| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (floats.max(1) * 4) as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let xb = buf("lowbit backward x", m * n_in, U::STORAGE | U::COPY_DST);
        let dyb = buf("lowbit backward dy", m * n_out, U::STORAGE | U::COPY_DST);
        let dxb = buf("lowbit backward dx", m * n_in, U::STORAGE | U::COPY_SRC);
        // New buffers are zero-initialised by wgpu: the gradients start at zero.
        let gbufs: Vec<(wgpu::Buffer, wgpu::Buffer)> = ranks
            .iter()
            .map(|&r| {
                (
                    buf("lowbit dA", r * n_in, U::STORAGE | U::COPY_SRC),
                    buf("lowbit dB", n_out * r, U::STORAGE | U::COPY_SRC),
                )
            })
            .collect();
        let grads: Vec<GpuAdapterGrad<'_>> = gbufs.iter().map(|(a, b)| GpuAdapterGrad { a, b }).collect();
        let total = m * n_in + ranks.iter().map(|&r| r * (n_in + n_out)).sum::<usize>();
        let readback = buf("lowbit backward readback", total, U::MAP_READ | U::COPY_DST);
        ctx.queue().write_buffer(&xb, 0, bytemuck::cast_slice(x));
        ctx.queue().write_buffer(&dyb, 0, bytemuck::cast_slice(dy));
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("lowbit backward") });
        self.encode_backward_with(ctx, &mut enc, &xb, &dyb, Some(&dxb), &grads, m, adapter_ids)?;
        let mut off = 0u64;
        let mut copy = |src: &wgpu::Buffer, floats: usize| {
            enc.copy_buffer_to_buffer(src, 0, &readback, off, (floats * 4) as u64);
            off += (floats * 4) as u64;
        };
        copy(&dxb, m * n_in);
        for ((a, b), &r) in gbufs.iter().zip(&ranks) {
            copy(a, r * n_in);
            copy(b, n_out * r);
        }
        ctx.queue().submit([enc.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(Error::gpu("backward", e));
        }
        let all = read_f32(dev, &readback, total).await?;
        let (dx, mut rest) = all.split_at(m * n_in);
        let mut adapters = Vec::with_capacity(ranks.len());
        for &r in &ranks {
            let (a, tail) = rest.split_at(r * n_in);
            let (b, tail) = tail.split_at(n_out * r);
            adapters.push(AdapterGrad { a: a.to_vec(), b: b.to_vec() });
            rest = tail;
        }
        // `x`, `dy` and the layer were finite: a non-finite value is an f32 overflow, reported, never returned.
        let first_bad = |what: String, v: &[f32]| match v.iter().position(|x| !x.is_finite()) {
            Some(index) => Err(Error::NonFinite { arg: what, index, value: v[index] }),
            None => Ok(()),
        };
        first_bad("dx (a backward of finite values overflowed f32)".into(), dx)?;
        for (a, g) in adapters.iter().enumerate() {
            first_bad(format!("dA of adapter {a} (overflowed f32)"), &g.a)?;
            first_bad(format!("dB of adapter {a} (overflowed f32)"), &g.b)?;
        }
        Ok(LinearGrads { dx: dx.to_vec(), adapters })
    }

    /// Blocking [`backward`](Self::backward) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_blocking(&self, ctx: &GpuContext, x: &[f32], dy: &[f32], m: usize) -> Result<LinearGrads, Error> {
        pollster::block_on(self.backward(ctx, x, dy, m))
    }

    /// Blocking [`backward_with`](Self::backward_with) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_with_blocking(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        dy: &[f32],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
    ) -> Result<LinearGrads, Error> {
        pollster::block_on(self.backward_with(ctx, x, dy, m, adapter_ids))
    }
}
