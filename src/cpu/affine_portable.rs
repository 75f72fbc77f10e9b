//! Portable affine run kernels (`wide`, so SSE2 / NEON / simd128 as the target has them) and the scalar and
//! portable kernel tables. Same names and results as `affine_x86.rs`.

use super::table::AffineKernels;
use crate::format::affine::AffineParams;
use crate::reference::affine as reference;
use wide::f32x8;

// ---------------------------------------------------------------- portable run kernels (wide)

/// Min and max of a non-empty f32 slice, and whether every element is finite: `v * 0` is 0 for a finite `v`
/// and NaN for ±inf or NaN, and a NaN survives every later addition, so one sum answers for the whole slice.
pub(crate) fn minmax_portable(x: &[f32]) -> (f32, f32, bool) {
    let mut lo = f32x8::splat(f32::INFINITY);
    let mut hi = f32x8::splat(f32::NEG_INFINITY);
    let mut bad = f32x8::splat(0.0);
    let zero = f32x8::splat(0.0);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        let v = f32x8::new(c.try_into().expect("chunk of 8"));
        lo = lo.fast_min(v);
        hi = hi.fast_max(v);
        bad += v * zero;
    }
    let mut l = lo.to_array().into_iter().fold(f32::INFINITY, f32::min);
    let mut h = hi.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max);
    let mut finite = bad.to_array().into_iter().sum::<f32>() == 0.0;
    for &v in tail {
        l = l.min(v);
        h = h.max(v);
        finite &= v.is_finite();
    }
    (l, h, finite)
}

/// The scalar min, max and finiteness (the reference's order: `f32::min` / `f32::max` from ±inf).
pub(crate) fn minmax_scalar(x: &[f32]) -> (f32, f32, bool) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY, true), |(l, h, f), &v| (l.min(v), h.max(v), f & v.is_finite()))
}

pub(crate) fn quantize_run_portable(x: &[f32], p: AffineParams, out: &mut [u8]) {
    let inv = f32x8::splat(1.0f32 / p.scale);
    let zp = f32x8::splat(p.zero_point as f32);
    let (lo, hi) = (f32x8::splat(0.0), f32x8::splat(255.0));
    // Round half to even without an instruction for it: for |v| <= 2^22, (v + 1.5·2^23) - 1.5·2^23 rounds v
    // to an integer in the current (nearest-even) mode. Larger |v| saturate to 0 or 255 either way.
    let (limit, magic) = (f32x8::splat(4_194_304.0), f32x8::splat(12_582_912.0));
    let mut xs = x.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for (c, o) in (&mut xs).zip(&mut os) {
        let v = f32x8::new(c.try_into().expect("chunk of 8"));
        let r = ((v * inv).fast_max(-limit).fast_min(limit) + magic) - magic;
        // r is an integer; adding zp in f32 is exact, then the clamp saturates like the reference.
        let q = (r + zp).fast_max(lo).fast_min(hi).to_array();
        for (d, s) in o.iter_mut().zip(q) {
            *d = s as u8;
        }
    }
    for (d, &s) in os.into_remainder().iter_mut().zip(xs.remainder()) {
        *d = reference::quantize_value(s, p);
    }
}

pub(crate) fn dequantize_run_portable(codes: &[u8], p: AffineParams, out: &mut [f32]) {
    let scale = f32x8::splat(p.scale);
    let zp = f32x8::splat(p.zero_point as f32);
    let mut cs = codes.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for (c, o) in (&mut cs).zip(&mut os) {
        let q = f32x8::new(std::array::from_fn(|i| c[i] as f32));
        // (q - zp) is an exact small integer, so this is the reference's single rounding.
        o.copy_from_slice(&((q - zp) * scale).to_array());
    }
    for (d, &s) in os.into_remainder().iter_mut().zip(cs.remainder()) {
        *d = reference::dequantize_value(s, p);
    }
}

/// Walks consecutive runs of `run` elements: the parameters of element `i` are entry `i / run`, found without
/// a division (indices must not decrease between calls).
pub(crate) struct RunCursor<'a> {
    scales: &'a [f32],
    zero_points: &'a [u8],
    run: usize,
    entry: usize,
    end: usize,
}

impl<'a> RunCursor<'a> {
    pub(crate) fn new(scales: &'a [f32], zero_points: &'a [u8], run: usize) -> Self {
        assert!(run > 0 && scales.len() == zero_points.len());
        RunCursor { scales, zero_points, run, entry: 0, end: run }
    }

    /// The parameters of element `i`.
    #[inline(always)]
    pub(crate) fn at(&mut self, i: usize) -> AffineParams {
        while i >= self.end {
            self.entry += 1;
            self.end += self.run;
        }
        AffineParams { scale: self.scales[self.entry], zero_point: self.zero_points[self.entry] }
    }

    /// Whether elements `i..i + len` share the parameters of the last [`RunCursor::at`]`(i)`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn holds(&self, i: usize, len: usize) -> bool {
        i + len <= self.end
    }

    /// Reference values of `codes[range]` into `out[range]`.
    #[inline(always)]
    pub(crate) fn scalar(&mut self, codes: &[u8], out: &mut [f32], range: std::ops::Range<usize>) {
        for j in range {
            out[j] = reference::dequantize_value(codes[j], self.at(j));
        }
    }
}

/// [`AffineKernels::dequantize_runs`] through a run kernel, one run at a time (no streaming).
pub(crate) fn dequantize_runs_with(
    run_kernel: fn(&[u8], AffineParams, &mut [f32]),
    codes: &[u8],
    scales: &[f32],
    zero_points: &[u8],
    run: usize,
    out: &mut [f32],
) {
    assert!(run > 0 && codes.len() == out.len() && codes.len() == scales.len() * run);
    for (((c, o), &scale), &zero_point) in codes.chunks(run).zip(out.chunks_mut(run)).zip(scales).zip(zero_points) {
        run_kernel(c, AffineParams { scale, zero_point }, o);
    }
}

// ---------------------------------------------------------------- tables and dispatch of run kernels

/// The scalar reference run kernels.
pub(crate) const SCALAR: AffineKernels = AffineKernels {
    minmax: minmax_scalar,
    quantize: |x, p, out| {
        for (d, &s) in out.iter_mut().zip(x) {
            *d = reference::quantize_value(s, p);
        }
    },
    dequantize: |codes, p, out, _stream| {
        for (d, &s) in out.iter_mut().zip(codes) {
            *d = reference::dequantize_value(s, p);
        }
    },
    dequantize_runs: |codes, scales, zero_points, run, out, _stream| {
        assert!(codes.len() == out.len() && codes.len() == scales.len() * run);
        RunCursor::new(scales, zero_points, run).scalar(codes, out, 0..codes.len())
    },
};

/// The portable (`wide`) run kernels.
pub(crate) const PORTABLE: AffineKernels = AffineKernels {
    minmax: minmax_portable,
    quantize: quantize_run_portable,
    dequantize: |codes, p, out, _stream| dequantize_run_portable(codes, p, out),
    dequantize_runs: |codes, scales, zero_points, run, out, _stream| {
        dequantize_runs_with(dequantize_run_portable, codes, scales, zero_points, run, out)
    },
};
