//! Reference for asymmetric 8-bit affine quantization (`docs/formats.md` §1, PyTorch `quint8`).
//!
//! These loops are the specification. They validate nothing: callers pass finite data of the right length
//! (the public API in [`crate::affine`] checks that first).

use crate::element::Element;
use crate::format::affine::{AffineParams, Granularity};

/// Parameters from a range `[x_min, x_max]`, exactly as PyTorch's `MinMaxObserver` (`quint8`, affine):
/// the range is widened to contain 0, `scale = max((hi - lo) / 255, f32::EPSILON)` in f32, and
/// `zero_point = clamp(0 - round_half_even(lo / scale), 0, 255)`.
pub fn params_from_range(x_min: f32, x_max: f32) -> AffineParams {
    let lo = x_min.min(0.0);
    let hi = x_max.max(0.0);
    let scale = ((hi - lo) / 255.0f32).max(f32::EPSILON);
    let zp = (0.0 - (lo / scale).round_ties_even()).clamp(0.0, 255.0);
    AffineParams { scale, zero_point: zp as u8 }
}

/// Parameters for a run of values: min/max, then [`params_from_range`]; an empty run gives
/// [`AffineParams::EMPTY`] (scale 1, zero point 0).
pub fn calibrate_slice<T: Element>(x: &[T]) -> AffineParams {
    if x.is_empty() {
        return AffineParams::EMPTY;
    }
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for v in x {
        let v = v.to_f32();
        lo = lo.min(v);
        hi = hi.max(v);
    }
    params_from_range(lo, hi)
}

/// One code: `clamp(round_half_even(x * (1.0 / scale)) + zero_point, 0, 255)`, the reciprocal in f32 and
/// the rounding before the zero point is added (ATen / fbgemm).
pub fn quantize_value(x: f32, p: AffineParams) -> u8 {
    let inv = 1.0f32 / p.scale;
    let r = (x * inv).round_ties_even();
    // Saturate in f32 first so that huge values cannot wrap; the clamp below makes the bound irrelevant.
    let r = r.clamp(-1024.0, 1024.0) as i32;
    (r + p.zero_point as i32).clamp(0, 255) as u8
}

/// One value: `((q - zero_point) as f32) * scale`, a single f32 multiply of the exact integer difference.
pub fn dequantize_value(q: u8, p: AffineParams) -> f32 {
    (q as i32 - p.zero_point as i32) as f32 * p.scale
}

/// Visits each parameter entry of a `[rows, cols]` matrix: `f(entry, flat_start, len)` for every contiguous
/// run that shares one entry (per tensor the whole buffer is one run).
pub fn for_each_run(rows: usize, cols: usize, g: Granularity, mut f: impl FnMut(usize, usize, usize)) {
    match g {
        Granularity::PerTensor => f(0, 0, rows * cols),
        Granularity::PerChannel => (0..rows).for_each(|r| f(r, r * cols, cols)),
        Granularity::PerGroup(gs) => {
            let per_row = cols.div_ceil(gs);
            for r in 0..rows {
                for j in 0..per_row {
                    let start = j * gs;
                    f(r * per_row + j, r * cols + start, gs.min(cols - start));
                }
            }
        }
    }
}

/// Parameters for every entry (layout of [`crate::affine`]).
pub fn calibrate<T: Element>(x: &[T], rows: usize, cols: usize, g: Granularity) -> Vec<AffineParams> {
    let mut out = vec![AffineParams::EMPTY; g.num_params(rows, cols)];
    for_each_run(rows, cols, g, |e, s, n| out[e] = calibrate_slice(&x[s..s + n]));
    out
}

/// Codes for every element with the given parameters.
pub fn quantize<T: Element>(x: &[T], rows: usize, cols: usize, g: Granularity, params: &[AffineParams]) -> Vec<u8> {
    let mut codes = vec![0u8; x.len()];
    for_each_run(rows, cols, g, |e, s, n| {
        for i in s..s + n {
            codes[i] = quantize_value(x[i].to_f32(), params[e]);
        }
    });
    codes
}

/// Dequantized f32 values for every code.
pub fn dequantize(codes: &[u8], rows: usize, cols: usize, g: Granularity, params: &[AffineParams]) -> Vec<f32> {
    let mut out = vec![0.0f32; codes.len()];
    for_each_run(rows, cols, g, |e, s, n| {
        for i in s..s + n {
            out[i] = dequantize_value(codes[i], params[e]);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytorch_edge_cases() {
        // All zeros: scale = eps, zero point 0.
        assert_eq!(calibrate_slice(&[0.0f32; 5]), AffineParams { scale: f32::EPSILON, zero_point: 0 });
        // Positive constant c: range [0, c], scale c/255, zp 0, codes 255.
        let p = calibrate_slice(&[3.0f32; 4]);
        assert_eq!(p, AffineParams { scale: 3.0 / 255.0, zero_point: 0 });
        assert_eq!(quantize_value(3.0, p), 255);
        // lo / scale = -2.5 exactly: lo = -2.5, hi = 252.5 -> scale 1, zp = round_half_even(2.5) = 2.
        let p = params_from_range(-2.5, 252.5);
        assert_eq!(p, AffineParams { scale: 1.0, zero_point: 2 });
        // Round before adding the zero point: 0.5 -> 0 (+2) and 1.5 -> 2 (+2).
        assert_eq!(quantize_value(0.5, p), 2);
        assert_eq!(quantize_value(1.5, p), 4);
        // Saturation on both sides.
        assert_eq!(quantize_value(1e30, p), 255);
        assert_eq!(quantize_value(-1e30, p), 0);
        assert_eq!(dequantize_value(p.zero_point, p), 0.0);
    }
}
