//! AVX2 / AVX-512 versions of the affine run kernels (same names and results as the portable ones in
//! `affine_portable.rs`). Reached only through the kernel tables, which need a detection token.
//!
//! Exactness: quantize multiplies by the f32 reciprocal, rounds with round-to-nearest-even
//! (`roundscale`/`round` with `_MM_FROUND_TO_NEAREST_INT`), adds the zero point in f32 (exact: both are
//! integers below 2^24, and beyond that the clamp saturates the same way) and clamps to [0, 255] before the
//! conversion, so the code is the reference's. Dequantize converts the code and the zero point to f32 exactly,
//! subtracts (exact) and multiplies once: the reference's single rounding.

use super::affine_portable::{dequantize_runs_with, RunCursor};
use super::table::AffineKernels;
use super::x86_features::{avx2_fn, avx512_fn, Avx2, Avx512};
use crate::format::affine::AffineParams;
use std::arch::x86_64::*;

/// Outputs at least this long (in elements) are written with non-temporal stores, which skip reading the
/// destination into cache; only worth it when the whole output is far larger than the last-level cache.
pub(crate) const STREAM_MIN_RUN: usize = 4096;

/// The AVX2 run kernels (the token proves detection).
pub(crate) fn avx2(_: Avx2) -> AffineKernels {
    AffineKernels {
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        minmax: |x| unsafe { minmax_avx2(x) },
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        quantize: |x, p, out| unsafe { quantize_avx2(x, p, out) },
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        dequantize: |c, p, out, stream| unsafe { dequantize_avx2(c, p, out, stream && out.len() >= STREAM_MIN_RUN) },
        dequantize_runs: |c, scales, zero_points, run, out, stream| {
            if stream {
                // SAFETY: this table is built only from an `Avx2` token (its features were detected); the
                // kernel asserts its length invariants.
                unsafe { dequantize_runs_stream_avx2(c, scales, zero_points, run, out) }
            } else {
                // SAFETY: as above; each run has its own `out` slice of the same length.
                let kernel: fn(&[u8], AffineParams, &mut [f32]) = |c, p, o| unsafe { dequantize_avx2(c, p, o, false) };
                dequantize_runs_with(kernel, c, scales, zero_points, run, out)
            }
        },
    }
}

/// The AVX-512 run kernels (the token proves detection).
pub(crate) fn avx512(_: Avx512) -> AffineKernels {
    AffineKernels {
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        minmax: |x| unsafe { minmax_avx512(x) },
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        quantize: |x, p, out| unsafe { quantize_avx512(x, p, out) },
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        dequantize: |c, p, out, stream| unsafe { dequantize_avx512(c, p, out, stream && out.len() >= STREAM_MIN_RUN) },
        dequantize_runs: |c, scales, zero_points, run, out, stream| {
            if stream {
                // SAFETY: this table is built only from an `Avx512` token (its features were detected); the
                // kernel asserts its length invariants.
                unsafe { dequantize_runs_stream_avx512(c, scales, zero_points, run, out) }
            } else {
                // SAFETY: as above; each run has its own `out` slice of the same length.
                let kernel: fn(&[u8], AffineParams, &mut [f32]) =
                    |c, p, o| unsafe { dequantize_avx512(c, p, o, false) };
                dequantize_runs_with(kernel, c, scales, zero_points, run, out)
            }
        },
    }
}

/// Continues a min / max / finiteness fold over the tail `x`.
fn scalar_minmax(x: &[f32], acc: (f32, f32, bool)) -> (f32, f32, bool) {
    x.iter().fold(acc, |(l, h, f), &v| (l.min(v), h.max(v), f & v.is_finite()))
}

avx512_fn! {
unsafe fn minmax_avx512(x: &[f32]) -> (f32, f32, bool) {
    let n = x.len();
    let p = x.as_ptr();
    let mut lo = [_mm512_set1_ps(f32::INFINITY); 4];
    let mut hi = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    // Finiteness: fma(v, 0, bad) stays 0 while every v is finite; ±inf or NaN make it NaN for good.
    let mut bad = [_mm512_setzero_ps(); 4];
    let zero = _mm512_setzero_ps();
    let mut i = 0;
    while i + 64 <= n {
        for k in 0..4 {
            // SAFETY: i + 16k + 16 <= n, unaligned load.
            let v = unsafe { _mm512_loadu_ps(p.add(i + 16 * k)) };
            lo[k] = _mm512_min_ps(lo[k], v);
            hi[k] = _mm512_max_ps(hi[k], v);
            bad[k] = _mm512_fmadd_ps(v, zero, bad[k]);
        }
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n.
        let v = unsafe { _mm512_loadu_ps(p.add(i)) };
        lo[0] = _mm512_min_ps(lo[0], v);
        hi[0] = _mm512_max_ps(hi[0], v);
        bad[0] = _mm512_fmadd_ps(v, zero, bad[0]);
        i += 16;
    }
    let l = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let h = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    let b = _mm512_add_ps(_mm512_add_ps(bad[0], bad[1]), _mm512_add_ps(bad[2], bad[3]));
    let finite = _mm512_reduce_add_ps(b) == 0.0;
    scalar_minmax(&x[i..], (_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h), finite))
}
}

avx2_fn! {
unsafe fn minmax_avx2(x: &[f32]) -> (f32, f32, bool) {
    let n = x.len();
    let p = x.as_ptr();
    let mut lo = [_mm256_set1_ps(f32::INFINITY); 4];
    let mut hi = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    // Finiteness: fma(v, 0, bad) stays 0 while every v is finite; ±inf or NaN make it NaN for good.
    let mut bad = [_mm256_setzero_ps(); 4];
    let zero = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        for k in 0..4 {
            // SAFETY: i + 8k + 8 <= n, unaligned load.
            let v = unsafe { _mm256_loadu_ps(p.add(i + 8 * k)) };
            lo[k] = _mm256_min_ps(lo[k], v);
            hi[k] = _mm256_max_ps(hi[k], v);
            bad[k] = _mm256_fmadd_ps(v, zero, bad[k]);
        }
        i += 32;
    }
    let l = _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3]));
    let h = _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3]));
    let b = _mm256_add_ps(_mm256_add_ps(bad[0], bad[1]), _mm256_add_ps(bad[2], bad[3]));
    let mut la = [0.0f32; 8];
    let mut ha = [0.0f32; 8];
    let mut ba = [0.0f32; 8];
    // SAFETY: storing 8 floats into 8-element arrays.
    unsafe {
        _mm256_storeu_ps(la.as_mut_ptr(), l);
        _mm256_storeu_ps(ha.as_mut_ptr(), h);
        _mm256_storeu_ps(ba.as_mut_ptr(), b);
    }
    let acc = (
        la.into_iter().fold(f32::INFINITY, f32::min),
        ha.into_iter().fold(f32::NEG_INFINITY, f32::max),
        ba.into_iter().sum::<f32>() == 0.0,
    );
    scalar_minmax(&x[i..], acc)
}
}

avx512_fn! {
unsafe fn quantize_avx512(x: &[f32], p: AffineParams, out: &mut [u8]) {
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = x.len();
    let inv = _mm512_set1_ps(1.0f32 / p.scale);
    let zp = _mm512_set1_ps(p.zero_point as f32);
    let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
    let code = |v: __m512| {
        let r = _mm512_roundscale_ps::<RN>(_mm512_mul_ps(v, inv));
        let q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, zp), lo), hi);
        _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q))
    };
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n for both slices (equal lengths); unaligned load/store.
        unsafe { _mm_storeu_si128(op.add(i) as *mut __m128i, code(_mm512_loadu_ps(xp.add(i)))) };
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        // SAFETY: masked load/store touch only the n - i remaining elements.
        unsafe { _mm_mask_storeu_epi8(op.add(i) as *mut i8, m, code(_mm512_maskz_loadu_ps(m, xp.add(i)))) };
    }
}
}

avx2_fn! {
unsafe fn quantize_avx2(x: &[f32], p: AffineParams, out: &mut [u8]) {
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = x.len();
    let inv = _mm256_set1_ps(1.0f32 / p.scale);
    let zp = _mm256_set1_ps(p.zero_point as f32);
    let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
    let code = |v: __m256| {
        let r = _mm256_round_ps::<RN>(_mm256_mul_ps(v, inv));
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zp), lo), hi))
    };
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n for both slices; unaligned loads/stores.
        unsafe {
            let a = code(_mm256_loadu_ps(xp.add(i)));
            let b = code(_mm256_loadu_ps(xp.add(i + 8)));
            let c = code(_mm256_loadu_ps(xp.add(i + 16)));
            let d = code(_mm256_loadu_ps(xp.add(i + 24)));
            // Values are already in 0..=255, so the saturating packs are exact; the permute undoes the
            // per-128-bit-lane interleaving of the packs.
            let ab = _mm256_packus_epi32(a, b);
            let cd = _mm256_packus_epi32(c, d);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), fix);
            _mm256_storeu_si256(op.add(i) as *mut __m256i, bytes);
        }
        i += 32;
    }
    super::affine_portable::quantize_run_portable(&x[i..], p, &mut out[i..]);
}
}

avx512_fn! {
unsafe fn dequantize_avx512(codes: &[u8], p: AffineParams, out: &mut [f32], stream: bool) {
    let n = codes.len();
    let scale = _mm512_set1_ps(p.scale);
    let zp = _mm512_set1_ps(p.zero_point as f32);
    let value = |c: __m128i| _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), zp), scale);
    let (cp, op) = (codes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    if stream {
        // Scalar head until the output is 64-byte aligned, then aligned streaming stores.
        let head = (op.align_offset(64)).min(n);
        super::affine_portable::dequantize_run_portable(&codes[..head], p, &mut out[..head]);
        i = head;
        while i + 64 <= n {
            // SAFETY: i + 64 <= n; op + i is 64-byte aligned (head above, steps of 64 floats).
            unsafe {
                for k in 0..4 {
                    let v = value(_mm_loadu_si128(cp.add(i + 16 * k) as *const __m128i));
                    _mm512_stream_ps(op.add(i + 16 * k), v);
                }
            }
            i += 64;
        }
        // Orders the streaming stores before any later store or a hand-off to another thread.
        _mm_sfence();
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n; unaligned load/store.
        unsafe { _mm512_storeu_ps(op.add(i), value(_mm_loadu_si128(cp.add(i) as *const __m128i))) };
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        // SAFETY: masked load/store touch only the n - i remaining elements.
        unsafe { _mm512_mask_storeu_ps(op.add(i), m, value(_mm_maskz_loadu_epi8(m, cp.add(i) as *const i8))) };
    }
}
}

avx512_fn! {
/// Streams the values of consecutive equal runs: a scalar head to the first 64-byte boundary, then aligned
/// 16-float non-temporal stores (a vector that straddles two runs is assembled element by element), a plain
/// tail, and one fence.
unsafe fn dequantize_runs_stream_avx512(codes: &[u8], scales: &[f32], zero_points: &[u8], run: usize, out: &mut [f32]) {
    let n = codes.len();
    assert!(out.len() == n && scales.len() * run == n);
    let mut cur = RunCursor::new(scales, zero_points, run);
    let (cp, op) = (codes.as_ptr(), out.as_mut_ptr());
    let head = op.align_offset(64).min(n);
    cur.scalar(codes, out, 0..head);
    let mut i = head;
    while i + 16 <= n {
        let p = cur.at(i);
        let v = if cur.holds(i, 16) {
            let (scale, zp) = (_mm512_set1_ps(p.scale), _mm512_set1_ps(p.zero_point as f32));
            // SAFETY: i + 16 <= n: the 16 code bytes are inside `codes`.
            let c = unsafe { _mm_loadu_si128(cp.add(i) as *const __m128i) };
            _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), zp), scale)
        } else {
            let mut tmp = [0.0f32; 16];
            for (k, t) in tmp.iter_mut().enumerate() {
                *t = crate::reference::affine::dequantize_value(codes[i + k], cur.at(i + k));
            }
            // SAFETY: a 16-float read of a local array.
            unsafe { _mm512_loadu_ps(tmp.as_ptr()) }
        };
        // SAFETY: i + 16 <= n; op + i is 64-byte aligned (the head above, then steps of 16 floats).
        unsafe { _mm512_stream_ps(op.add(i), v) };
        i += 16;
    }
    cur.scalar(codes, out, i..n);
    // Orders the streaming stores before any later store or a hand-off to another thread.
    _mm_sfence();
}
}

avx2_fn! {
/// [`dequantize_runs_stream_avx512`] with 8-float vectors and 32-byte alignment.
unsafe fn dequantize_runs_stream_avx2(codes: &[u8], scales: &[f32], zero_points: &[u8], run: usize, out: &mut [f32]) {
    let n = codes.len();
    assert!(out.len() == n && scales.len() * run == n);
    let mut cur = RunCursor::new(scales, zero_points, run);
    let (cp, op) = (codes.as_ptr(), out.as_mut_ptr());
    let head = op.align_offset(32).min(n);
    cur.scalar(codes, out, 0..head);
    let mut i = head;
    while i + 8 <= n {
        let p = cur.at(i);
        let v = if cur.holds(i, 8) {
            let (scale, zp) = (_mm256_set1_ps(p.scale), _mm256_set1_ps(p.zero_point as f32));
            // SAFETY: i + 8 <= n: the 8 code bytes are inside `codes`.
            let c = unsafe { _mm_loadl_epi64(cp.add(i) as *const __m128i) };
            _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), zp), scale)
        } else {
            let mut tmp = [0.0f32; 8];
            for (k, t) in tmp.iter_mut().enumerate() {
                *t = crate::reference::affine::dequantize_value(codes[i + k], cur.at(i + k));
            }
            // SAFETY: an 8-float read of a local array.
            unsafe { _mm256_loadu_ps(tmp.as_ptr()) }
        };
        // SAFETY: i + 8 <= n; op + i is 32-byte aligned (the head above, then steps of 8 floats).
        unsafe { _mm256_stream_ps(op.add(i), v) };
        i += 8;
    }
    cur.scalar(codes, out, i..n);
    // Orders the streaming stores before any later store or a hand-off to another thread.
    _mm_sfence();
}
}

avx2_fn! {
unsafe fn dequantize_avx2(codes: &[u8], p: AffineParams, out: &mut [f32], stream: bool) {
    let n = codes.len();
    let scale = _mm256_set1_ps(p.scale);
    let zp = _mm256_set1_ps(p.zero_point as f32);
    let value = |c: __m128i| _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), zp), scale);
    let (cp, op) = (codes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    if stream {
        let head = (op.align_offset(32)).min(n);
        super::affine_portable::dequantize_run_portable(&codes[..head], p, &mut out[..head]);
        i = head;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n; op + i is 32-byte aligned; each 8-byte load stays inside `codes`.
            unsafe {
                for k in 0..4 {
                    let v = value(_mm_loadl_epi64(cp.add(i + 8 * k) as *const __m128i));
                    _mm256_stream_ps(op.add(i + 8 * k), v);
                }
            }
            i += 32;
        }
        // Orders the streaming stores before later stores or a hand-off to another thread.
        _mm_sfence();
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n; 8-byte load and 8-float store inside the slices.
        unsafe { _mm256_storeu_ps(op.add(i), value(_mm_loadl_epi64(cp.add(i) as *const __m128i))) };
        i += 8;
    }
    super::affine_portable::dequantize_run_portable(&codes[i..], p, &mut out[i..]);
}
}
