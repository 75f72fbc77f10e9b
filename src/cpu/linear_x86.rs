//! x86 versions of the fused linear kernels: the generic bodies of `linear.rs` compiled inside
//! `#[target_feature]` functions (so LLVM vectorizes them to AVX2 / AVX-512 with FMA), and 4-bit decoders that
//! look the 16-entry table up in registers.

use super::linear::{block_job as generic_block_job, four_bit_pairs, shrink_all as generic_shrink, Decoder, Job};
use crate::cpu::Isa;
use crate::linear::{AdapterSelection, QuantLinear};
use std::arch::x86_64::*;

/// Runs one output block with the kernels for `isa` (AVX2 or AVX-512, checked available by the caller).
pub(crate) fn block_job(isa: Isa, job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    match isa {
        // SAFETY: the caller chose Avx512 only after `Isa::Avx512.is_available()`.
        Isa::Avx512 => unsafe { block_job_avx512(job, o0, ob, out) },
        // SAFETY: as above for AVX2 (+FMA, checked together by `Isa::Avx2.is_available()`).
        _ => unsafe { block_job_avx2(job, o0, ob, out) },
    }
}

/// The LoRA shrink with the kernels for `isa`.
pub(crate) fn shrink_all(
    isa: Isa,
    layer: &QuantLinear,
    x: &[f32],
    m: usize,
    sel: AdapterSelection<'_>,
) -> Vec<Option<Vec<f32>>> {
    match isa {
        // SAFETY: availability checked by the caller, as above.
        Isa::Avx512 => unsafe { shrink_avx512(layer, x, m, sel) },
        // SAFETY: availability checked by the caller, as above.
        _ => unsafe { shrink_avx2(layer, x, m, sel) },
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn block_job_avx512(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    generic_block_job::<true, Avx512Decoder>(job, o0, ob, out)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn block_job_avx2(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    generic_block_job::<true, Avx2Decoder>(job, o0, ob, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn shrink_avx512(layer: &QuantLinear, x: &[f32], m: usize, sel: AdapterSelection<'_>) -> Vec<Option<Vec<f32>>> {
    generic_shrink::<true>(layer, x, m, sel)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_avx2(layer: &QuantLinear, x: &[f32], m: usize, sel: AdapterSelection<'_>) -> Vec<Option<Vec<f32>>> {
    generic_shrink::<true>(layer, x, m, sel)
}

/// Expands 8 packed bytes (16 codes, first in the high nibble) to 16 bytes in element order.
#[inline(always)]
unsafe fn nibbles16(bytes: __m128i) -> __m128i {
    let mask = _mm_set1_epi8(0x0f);
    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    let lo = _mm_and_si128(bytes, mask);
    _mm_unpacklo_epi8(hi, lo)
}

struct Avx512Decoder;

impl Decoder for Avx512Decoder {
    #[inline(always)]
    fn four_bit(packed: &[u8], flat: usize, table: &[f32; 16], pairs: &[[f32; 2]; 256], scale: f32, out: &mut [f32]) {
        // SAFETY: only reached from `block_job_avx512`, which has AVX-512 F/BW enabled and was called after a
        // run-time check; every load reads 8 bytes inside `packed` (checked below) and every store 16 floats
        // inside `out`.
        unsafe {
            let n = out.len();
            let mut i = 0;
            if flat & 1 == 1 && n > 0 {
                four_bit_pairs(packed, flat, table, pairs, scale, &mut out[..1]);
                i = 1;
            }
            let tab = _mm512_loadu_ps(table.as_ptr());
            let s = _mm512_set1_ps(scale);
            while i + 16 <= n {
                let byte = (flat + i) >> 1;
                debug_assert!(byte + 8 <= packed.len());
                let b = _mm_loadl_epi64(packed.as_ptr().add(byte) as *const __m128i);
                let idx = _mm512_cvtepu8_epi32(nibbles16(b));
                let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, tab), s);
                _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
                i += 16;
            }
            four_bit_pairs(packed, flat + i, table, pairs, scale, &mut out[i..]);
        }
    }
}

struct Avx2Decoder;

impl Decoder for Avx2Decoder {
    #[inline(always)]
    fn four_bit(packed: &[u8], flat: usize, table: &[f32; 16], pairs: &[[f32; 2]; 256], scale: f32, out: &mut [f32]) {
        // SAFETY: only reached from `block_job_avx2` (AVX2 enabled, checked at run time); each load reads 8
        // bytes inside `packed` and each iteration stores 16 floats inside `out`.
        unsafe {
            let n = out.len();
            let mut i = 0;
            if flat & 1 == 1 && n > 0 {
                four_bit_pairs(packed, flat, table, pairs, scale, &mut out[..1]);
                i = 1;
            }
            let lo_tab = _mm256_loadu_ps(table.as_ptr());
            let hi_tab = _mm256_loadu_ps(table.as_ptr().add(8));
            let s = _mm256_set1_ps(scale);
            let lookup = |idx: __m256i| {
                let lo = _mm256_permutevar8x32_ps(lo_tab, idx);
                let hi = _mm256_permutevar8x32_ps(hi_tab, idx);
                // Bit 3 of the code picks the upper half of the table: move it to the sign bit for blendv.
                _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
            };
            while i + 16 <= n {
                let byte = (flat + i) >> 1;
                debug_assert!(byte + 8 <= packed.len());
                let codes = nibbles16(_mm_loadl_epi64(packed.as_ptr().add(byte) as *const __m128i));
                let a = _mm256_mul_ps(lookup(_mm256_cvtepu8_epi32(codes)), s);
                let b = _mm256_mul_ps(lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))), s);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), a);
                _mm256_storeu_ps(out.as_mut_ptr().add(i + 8), b);
                i += 16;
            }
            four_bit_pairs(packed, flat + i, table, pairs, scale, &mut out[i..]);
        }
    }
}
