//! Reference for double quantization of block scales (`docs/formats.md` §3).
//!
//! These loops are the specification. They validate nothing: callers pass finite, non-negative scales (the
//! public API in [`crate::double_quant`] checks that first).

/// The offset: arithmetic mean of `absmax`, accumulated in f64 and rounded once to f32 (0 for an empty slice).
///
/// bitsandbytes calls `torch.Tensor.mean()` on f32, whose CPU kernel sums in a vectorised cascade whose exact
/// rounding depends on the tensor length and the build. An f64 sum of at most 2^53 f32 values is exact enough
/// that the f32 result is the correctly rounded mean in practice, and it is the same on every path and thread
/// count; the result may differ from torch's by an ulp. That only moves the codes re-quantization picks: the
/// offset is stored, so decoding a checkpoint (what must match bit for bit) does not depend on this choice.
pub fn mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&v| v as f64).sum();
    (sum / absmax.len() as f64) as f32
}

/// The 255 decision boundaries of a sorted 256-entry map: `(map[i] + map[i + 1]) * 0.5` in f32.
pub fn map_midpoints(map: &[f32; 256]) -> [f32; 255] {
    std::array::from_fn(|i| (map[i] + map[i + 1]) * 0.5)
}

/// Nearest-entry code of a normalised value: the number of midpoints strictly below `xn` (ties go to the lower
/// code, like `torch.bucketize` with `right=False`). The midpoints of a sorted map are sorted, so that count is
/// the partition point of `m < xn`.
pub fn code_of(xn: f32, mids: &[f32; 255]) -> u8 {
    mids.partition_point(|&m| m < xn) as u8
}

/// Double-quantizes `absmax` with nested blocks of `nested_blocksize` and the sorted `map`; returns
/// `(codes, nested_absmax, offset)`.
///
/// `offset = mean(absmax)`; per nested block `nested_absmax = max |absmax - offset|` (the f32 differences);
/// `code = nearest map index of clamp((absmax - offset) * (1 / max(nested_absmax, 1e-38)), -1, 1)`, the
/// f32 reciprocal and multiply of bitsandbytes' reference backend.
pub fn quantize(absmax: &[f32], nested_blocksize: usize, map: &[f32; 256]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = mean(absmax);
    let mids = map_midpoints(map);
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested = Vec::with_capacity(absmax.len().div_ceil(nested_blocksize));
    for block in absmax.chunks(nested_blocksize) {
        let m = block.iter().fold(0.0f32, |m, &a| m.max((a - offset).abs()));
        let inv = 1.0f32 / m.max(1e-38);
        codes.extend(block.iter().map(|&a| code_of(((a - offset) * inv).clamp(-1.0, 1.0), &mids)));
        nested.push(m);
    }
    (codes, nested, offset)
}

pub use crate::format::double_quant::{decode, decode_value};
