//! Uploading a [`QuantLinear`] to the GPU: the API's entry to [`GpuLinear`] (the GPU module itself works on
//! layer views and never names `QuantLinear`).

use super::QuantLinear;
use crate::gpu::{GpuContext, GpuLinear, UploadOptions};
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
