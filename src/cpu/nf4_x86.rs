//! AVX2 / AVX-512 versions of the NF4 / FP4 kernels (same names as the portable ones in `nf4_portable.rs`).
//!
//! * Dequantization holds the 16-entry table in registers: one `vpermps` (`_mm512_permutexvar_ps`) per 16
//!   values on AVX-512; two `vpermps` (`_mm256_permutevar8x32_ps`, low and high half of the table) and a blend
//!   on bit 3 of the code on AVX2. Codes are expanded so that the high nibble comes first. Large f32 outputs
//!   use non-temporal stores once the output pointer is aligned (the unaligned head is written separately).
//! * Quantization uses an exact SIMD absmax, the reference's reciprocal-and-multiply normalisation, and a
//!   branchless 4-step binary search over the 15 sorted midpoints held in a register (the same count as the
//!   reference's "midpoints strictly below"), then the sorted-position → code permutation (identity for NF4).
//!
//! Reached only through the kernel tables, which need a detection token.

use super::table::{with_out_slice, FourBitKernels};
use super::x86_features::{avx2_fn, avx512_fn, Avx2, Avx512};
use crate::element::Element;
use crate::reference::nf4::{self as reference, Codebook};
use crate::DType;
use std::arch::x86_64::*;

/// Checks what the `#[target_feature]` dequantize kernels rely on (buffer lengths, block size).
fn check_span(packed: &[u8], absmax: &[f32], bs: usize, n: usize) {
    assert!(packed.len() >= n.div_ceil(2) && absmax.len() >= n.div_ceil(bs) && bs.is_power_of_two() && bs >= 32);
}

/// The AVX2 kernels (the token proves detection).
pub(crate) fn avx2(_: Avx2) -> FourBitKernels {
    FourBitKernels {
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        absbits: |x| unsafe { absbits_256(x) },
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        quantize: |x, absmax, cb, out| unsafe { quantize_run_256(x, absmax, cb, out) },
        dequantize: |packed, absmax, bs, table, out, stream| {
            with_out_slice!(out, |o| {
                check_span(packed, absmax, bs, o.len());
                // SAFETY: built only from an `Avx2` token (features detected); `check_span` checked the lengths.
                unsafe { dequantize_span_256(packed, absmax, bs, table, o, stream) }
            })
        },
    }
}

/// The AVX-512 kernels (the token proves detection).
pub(crate) fn avx512(_: Avx512) -> FourBitKernels {
    FourBitKernels {
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        absbits: |x| unsafe { absbits_512(x) },
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        quantize: |x, absmax, cb, out| unsafe { quantize_run_512(x, absmax, cb, out) },
        dequantize: |packed, absmax, bs, table, out, stream| {
            with_out_slice!(out, |o| {
                check_span(packed, absmax, bs, o.len());
                // SAFETY: built only from an `Avx512` token (features detected); `check_span` checked the lengths.
                unsafe { dequantize_span_512(packed, absmax, bs, table, o, stream) }
            })
        },
    }
}

// ---------------------------------------------------------------- shared scalar helpers

/// Writes element `i` of `out` from f32 with the reference rounding.
#[inline(always)]
fn put<T: Element>(out: &mut [T], i: usize, packed: &[u8], absmax: &[f32], bs: usize, table: &[f32; 16]) {
    out[i] = T::from_f32(reference::dequantize_value(reference::code_at(packed, i), absmax[i / bs], table));
}

/// Number of leading elements to write one by one so that the rest of `out` is `align`-byte aligned, or
/// `None` when that is impossible with whole bytes of codes (odd count) or `out` is too short.
fn aligned_head<T>(out: &[T], align: usize) -> Option<usize> {
    let addr = out.as_ptr() as usize;
    let mis = (align - addr % align) % align;
    let esz = std::mem::size_of::<T>();
    (mis.is_multiple_of(esz) && (mis / esz).is_multiple_of(2) && mis / esz <= out.len()).then_some(mis / esz)
}

// ---------------------------------------------------------------- AVX-512

avx512_fn! {
unsafe fn absbits_512(x: &[f32]) -> u32 {
    let mask = _mm512_set1_epi32(0x7fff_ffff);
    let mut m0 = _mm512_setzero_si512();
    let mut m1 = _mm512_setzero_si512();
    let mut i = 0;
    while i + 32 <= x.len() {
        // SAFETY: i + 32 <= x.len(), unaligned loads.
        let (a, b) = unsafe {
            (_mm512_loadu_si512(x.as_ptr().add(i).cast()), _mm512_loadu_si512(x.as_ptr().add(i + 16).cast()))
        };
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(a, mask));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(b, mask));
        i += 32;
    }
    let r = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
    x[i..].iter().fold(r, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}
}

avx512_fn! {
/// Sorted-position search: the number of `mids` strictly below each lane of `xn` (mids in lanes 0..15,
/// lane 15 unused), then mapped through `codes`.
#[inline]
fn codes_512(xn: __m512, mids: __m512, codes: __m512i) -> __m512i {
    let mut pos = _mm512_setzero_si512();
    for step in [8, 4, 2, 1] {
        let m = _mm512_permutexvar_ps(_mm512_add_epi32(pos, _mm512_set1_epi32(step - 1)), mids);
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xn, m);
        pos = _mm512_mask_add_epi32(pos, gt, pos, _mm512_set1_epi32(step));
    }
    _mm512_permutexvar_epi32(pos, codes)
}
}

avx512_fn! {
unsafe fn quantize_run_512(x: &[f32], absmax: f32, cb: &Codebook, out: &mut [u8]) {
    assert!(out.len() >= x.len().div_ceil(2));
    let inv = _mm512_set1_ps(1.0f32 / absmax.max(reference::ABSMAX_FLOOR));
    let (lo, hi) = (_mm512_set1_ps(-1.0), _mm512_set1_ps(1.0));
    let mut m16 = [f32::INFINITY; 16];
    m16[..15].copy_from_slice(&cb.mids);
    let c16: [i32; 16] = std::array::from_fn(|i| cb.codes[i] as i32);
    // SAFETY: 16-element arrays, unaligned loads.
    let (mids, codes) = unsafe { (_mm512_loadu_ps(m16.as_ptr()), _mm512_loadu_si512(c16.as_ptr().cast())) };
    let mut i = 0;
    while i + 32 <= x.len() {
        // SAFETY: i + 32 <= x.len().
        let (a, b) = unsafe { (_mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(x.as_ptr().add(i + 16))) };
        let qa = codes_512(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(a, inv), lo), hi), mids, codes);
        let qb = codes_512(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(b, inv), lo), hi), mids, codes);
        // Each 64-bit lane holds (even code, odd code); byte = even << 4 | odd, then keep the low byte.
        let pa = _mm512_or_si512(_mm512_slli_epi64::<4>(qa), _mm512_srli_epi64::<32>(qa));
        let pb = _mm512_or_si512(_mm512_slli_epi64::<4>(qb), _mm512_srli_epi64::<32>(qb));
        let bytes = _mm_unpacklo_epi64(_mm512_cvtepi64_epi8(pa), _mm512_cvtepi64_epi8(pb));
        // SAFETY: i/2 + 16 <= ceil(x.len()/2) <= out.len().
        unsafe { _mm_storeu_si128(out.as_mut_ptr().add(i / 2).cast(), bytes) };
        i += 32;
    }
    super::nf4_portable::quantize_run_scalar(&x[i..], absmax, cb, &mut out[i / 2..]);
}
}

avx512_fn! {
unsafe fn dequantize_span_512<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    table: &[f32; 16],
    out: &mut [T],
    stream: bool,
) {
    let n = out.len();
    let shift = bs.trailing_zeros();
    // SAFETY: `table` has 16 f32.
    let tbl = unsafe { _mm512_loadu_ps(table.as_ptr()) };
    let perm0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let perm1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let nib = _mm512_set1_epi32(15);
    let mut e = 0;
    let stream = stream && T::DTYPE == DType::F32 && aligned_head(out, 64).is_some();
    if stream {
        let h = aligned_head(out, 64).unwrap_or(0);
        for i in 0..h {
            put(out, i, packed, absmax, bs, table);
        }
        e = h;
    }
    let optr = out.as_mut_ptr();
    while e + 32 <= n {
        // SAFETY: e is even and e/2 + 16 <= ceil(n/2) <= packed.len().
        let bytes = unsafe { _mm_loadu_si128(packed.as_ptr().add(e / 2).cast()) };
        let x = _mm512_cvtepu8_epi32(bytes);
        let (h, l) = (_mm512_srli_epi32::<4>(x), _mm512_and_si512(x, nib));
        let v0 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(h, perm0, l), tbl);
        let v1 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(h, perm1, l), tbl);
        let b = e >> shift;
        let off = e & (bs - 1);
        let a0 = _mm512_set1_ps(absmax[b]);
        let (s0, s1) = if off + 32 <= bs {
            (a0, a0)
        } else {
            // The chunk crosses into block b + 1 after k = bs - off elements (blocks are >= 32 long).
            let k = (bs - off) as i32;
            let a1 = _mm512_set1_ps(absmax[b + 1]);
            let m0 = _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32(k));
            let m1 = _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32(k - 16));
            (_mm512_mask_blend_ps(m0, a1, a0), _mm512_mask_blend_ps(m1, a1, a0))
        };
        let (y0, y1) = (_mm512_mul_ps(v0, s0), _mm512_mul_ps(v1, s1));
        // SAFETY: e + 32 <= n elements of T; stream stores only when `out[e..]` is 64-byte aligned (f32).
        unsafe {
            match T::DTYPE {
                DType::F32 => {
                    let p = optr.add(e).cast::<f32>();
                    if stream {
                        _mm512_stream_ps(p, y0);
                        _mm512_stream_ps(p.add(16), y1);
                    } else {
                        _mm512_storeu_ps(p, y0);
                        _mm512_storeu_ps(p.add(16), y1);
                    }
                }
                DType::F16 => {
                    let p = optr.add(e).cast::<__m256i>();
                    _mm256_storeu_si256(p, _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y0));
                    _mm256_storeu_si256(
                        p.add(1),
                        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y1),
                    );
                }
                DType::BF16 => {
                    let p = optr.add(e).cast::<__m256i>();
                    _mm256_storeu_si256(p, bf16_512(y0));
                    _mm256_storeu_si256(p.add(1), bf16_512(y1));
                }
            }
        }
        e += 32;
    }
    if stream {
        _mm_sfence();
    }
    for i in e..n {
        put(out, i, packed, absmax, bs, table);
    }
}
}

avx512_fn! {
/// f32 → bf16 bits, round to nearest even (exact for finite values, subnormals included).
#[inline]
fn bf16_512(y: __m512) -> __m256i {
    let bits = _mm512_castps_si512(y);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(r))
}
}

// ---------------------------------------------------------------- AVX2

avx2_fn! {
unsafe fn absbits_256(x: &[f32]) -> u32 {
    let mask = _mm256_set1_epi32(0x7fff_ffff);
    let mut m0 = _mm256_setzero_si256();
    let mut m1 = _mm256_setzero_si256();
    let mut i = 0;
    while i + 16 <= x.len() {
        // SAFETY: i + 16 <= x.len().
        let (a, b) =
            unsafe { (_mm256_loadu_si256(x.as_ptr().add(i).cast()), _mm256_loadu_si256(x.as_ptr().add(i + 8).cast())) };
        m0 = _mm256_max_epu32(m0, _mm256_and_si256(a, mask));
        m1 = _mm256_max_epu32(m1, _mm256_and_si256(b, mask));
        i += 16;
    }
    let mut lanes = [0u32; 8];
    // SAFETY: 8-element array, unaligned store.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_max_epu32(m0, m1)) };
    let r = lanes.into_iter().fold(0u32, u32::max);
    x[i..].iter().fold(r, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}
}

avx2_fn! {
/// 16-entry lookup of f32 `lo`/`hi` table halves by the low 4 bits of `idx` (bit 3 picks the half).
#[inline]
fn lut_256(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
    let sel = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
    _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel)
}
}

avx2_fn! {
unsafe fn quantize_run_256(x: &[f32], absmax: f32, cb: &Codebook, out: &mut [u8]) {
    assert!(out.len() >= x.len().div_ceil(2));
    let inv = _mm256_set1_ps(1.0f32 / absmax.max(reference::ABSMAX_FLOOR));
    let (lo, hi) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(1.0));
    let mut m16 = [f32::INFINITY; 16];
    m16[..15].copy_from_slice(&cb.mids);
    // Codes as f32 bit patterns so the same float lookup serves both tables.
    let c16: [f32; 16] = std::array::from_fn(|i| f32::from_bits(cb.codes[i] as u32));
    // SAFETY: 16-element arrays.
    let (mlo, mhi, clo, chi) = unsafe {
        (
            _mm256_loadu_ps(m16.as_ptr()),
            _mm256_loadu_ps(m16.as_ptr().add(8)),
            _mm256_loadu_ps(c16.as_ptr()),
            _mm256_loadu_ps(c16.as_ptr().add(8)),
        )
    };
    // Picks byte 0 and byte 8 (the packed low bytes of both 64-bit halves) of each 128-bit lane.
    let pick = _mm256_setr_epi8(
        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1,
    );
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: i + 8 <= x.len().
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
        let xn = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, inv), lo), hi);
        let mut pos = _mm256_setzero_si256();
        for step in [8, 4, 2, 1] {
            let m = lut_256(_mm256_add_epi32(pos, _mm256_set1_epi32(step - 1)), mlo, mhi);
            let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(xn, m));
            pos = _mm256_add_epi32(pos, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
        }
        let q = _mm256_castps_si256(lut_256(pos, clo, chi));
        let p = _mm256_shuffle_epi8(_mm256_or_si256(_mm256_slli_epi64::<4>(q), _mm256_srli_epi64::<32>(q)), pick);
        let w = (_mm256_extract_epi16::<0>(p) as u16 as u32) | ((_mm256_extract_epi16::<8>(p) as u16 as u32) << 16);
        out[i / 2..i / 2 + 4].copy_from_slice(&w.to_le_bytes());
        i += 8;
    }
    super::nf4_portable::quantize_run_scalar(&x[i..], absmax, cb, &mut out[i / 2..]);
}
}

avx2_fn! {
unsafe fn dequantize_span_256<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    table: &[f32; 16],
    out: &mut [T],
    stream: bool,
) {
    let n = out.len();
    let shift = bs.trailing_zeros();
    // SAFETY: `table` has 16 f32.
    let (tlo, thi) = unsafe { (_mm256_loadu_ps(table.as_ptr()), _mm256_loadu_ps(table.as_ptr().add(8))) };
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let nib = _mm256_set1_epi32(15);
    let mut e = 0;
    let stream = stream && T::DTYPE == DType::F32 && aligned_head(out, 32).is_some();
    if stream {
        let h = aligned_head(out, 32).unwrap_or(0);
        for i in 0..h {
            put(out, i, packed, absmax, bs, table);
        }
        e = h;
    }
    let optr = out.as_mut_ptr();
    while e + 16 <= n {
        // SAFETY: e is even and e/2 + 8 <= ceil(n/2) <= packed.len().
        let bytes = unsafe { _mm_loadl_epi64(packed.as_ptr().add(e / 2).cast()) };
        let x = _mm256_cvtepu8_epi32(bytes);
        let (h, l) = (_mm256_srli_epi32::<4>(x), _mm256_and_si256(x, nib));
        let (u0, u1) = (_mm256_unpacklo_epi32(h, l), _mm256_unpackhi_epi32(h, l));
        let i0 = _mm256_permute2x128_si256::<0x20>(u0, u1);
        let i1 = _mm256_permute2x128_si256::<0x31>(u0, u1);
        let (v0, v1) = (lut_256(i0, tlo, thi), lut_256(i1, tlo, thi));
        let b = e >> shift;
        let off = e & (bs - 1);
        let a0 = _mm256_set1_ps(absmax[b]);
        let (s0, s1) = if off + 16 <= bs {
            (a0, a0)
        } else {
            let k = (bs - off) as i32;
            let a1 = _mm256_set1_ps(absmax[b + 1]);
            let m0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), iota));
            let m1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k - 8), iota));
            (_mm256_blendv_ps(a1, a0, m0), _mm256_blendv_ps(a1, a0, m1))
        };
        let (y0, y1) = (_mm256_mul_ps(v0, s0), _mm256_mul_ps(v1, s1));
        // SAFETY: e + 16 <= n elements of T; stream stores only when `out[e..]` is 32-byte aligned (f32).
        unsafe {
            match T::DTYPE {
                DType::F32 => {
                    let p = optr.add(e).cast::<f32>();
                    if stream {
                        _mm256_stream_ps(p, y0);
                        _mm256_stream_ps(p.add(8), y1);
                    } else {
                        _mm256_storeu_ps(p, y0);
                        _mm256_storeu_ps(p.add(8), y1);
                    }
                }
                DType::F16 => {
                    let p = optr.add(e).cast::<__m128i>();
                    _mm_storeu_si128(p, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y0));
                    _mm_storeu_si128(p.add(1), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y1));
                }
                DType::BF16 => {
                    let p = optr.add(e).cast::<__m128i>();
                    _mm_storeu_si128(p, bf16_256(y0));
                    _mm_storeu_si128(p.add(1), bf16_256(y1));
                }
            }
        }
        e += 16;
    }
    if stream {
        _mm_sfence();
    }
    for i in e..n {
        put(out, i, packed, absmax, bs, table);
    }
}
}

avx2_fn! {
/// f32 → bf16 bits, round to nearest even (exact for finite values).
#[inline]
fn bf16_256(y: __m256) -> __m128i {
    let bits = _mm256_castps_si256(y);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)));
    // r < 2^16 in every lane: pack to u16 (per 128-bit lane), then gather the two low halves.
    let p = _mm256_packus_epi32(r, r);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(p))
}
}
