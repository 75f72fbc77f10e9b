//! The int8-activation quantizer of `x` ([`crate::reference::act8::quantize_row`]) in AVX-512 and AVX2: the
//! same IEEE operations per element (`|x|` maximum as bits, one f32 division per block, the f32 product
//! `v·inv`), then `cvtps2dq`, which rounds half to even in the default rounding mode (the reference's
//! add-and-subtract of 1.5·2²³ does the same); its clamp to ±127 is a no-op for a finite `inv`
//! (`|v·inv| ≤ 127·(1 + ε)` rounds to 127), so the codes and scales are bit-identical. A block whose
//! `127 / amax` overflows, and a row's short last block, go through the reference block.
//!
//! It also writes each block's code sum when asked (the interleaved kernel's offset term), from the same
//! registers. The AVX-512 form takes 16 whole blocks at a time, reducing their maxima and sums together.

use super::linear_act8::quantize_portable;
use super::table::Act8Quantize;
use super::x86_features::{avx2_fn, avx512_fn, Avx2, Avx512};
use crate::reference::act8::BLOCK;
use std::arch::x86_64::*;

/// The AVX-512 quantizer (the token proves detection).
pub(crate) fn avx512(_: Avx512) -> Act8Quantize {
    // SAFETY: built only from an `Avx512` token; the kernel asserts the slice lengths it writes through.
    |x, q, d, sums| unsafe { quantize_512(x, q, d, sums) }
}

/// The AVX2 quantizer (the token proves detection).
pub(crate) fn avx2(_: Avx2) -> Act8Quantize {
    // SAFETY: built only from an `Avx2` token; the kernel asserts the slice lengths it writes through.
    |x, q, d, sums| unsafe { quantize_256(x, q, d, sums) }
}

/// Checks the lengths every kernel relies on: `q` as `x`, one `d` per block, `sums` empty or one per block.
fn check_lengths(x: &[f32], q: &[i8], d: &[f32], sums: &[i32]) {
    assert_eq!(q.len(), x.len(), "act8 quantize: codes");
    assert_eq!(d.len(), x.len().div_ceil(BLOCK), "act8 quantize: scales");
    assert!(sums.is_empty() || sums.len() == d.len(), "act8 quantize: sums");
}

/// Block `b` (the row's short last block or an overflowing `127 / amax`) through the portable quantizer, with
/// its sum when `sums` is asked for.
fn reference_block(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32], b: usize) {
    let end = x.len().min((b + 1) * BLOCK);
    let sum = if sums.is_empty() { &mut [][..] } else { &mut sums[b..=b] };
    quantize_portable(&x[b * BLOCK..end], &mut q[b * BLOCK..end], &mut d[b..=b], sum);
}

avx512_fn! {
    /// # Safety
    /// AVX-512 F/BW is available.
    unsafe fn quantize_512(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
        check_lengths(x, q, d, sums);
        let whole = x.len() / BLOCK;
        let mut b0 = 0;
        while b0 + BATCH <= whole {
            // SAFETY: blocks b0..b0 + 16 are whole; AVX-512 as the caller's.
            unsafe { batch_512(x, q, d, sums, b0) };
            b0 += BATCH;
        }
        for b in b0..whole {
            // SAFETY: block b is whole (b < len / 32), so its 32 floats and 32 codes are in bounds.
            let (xp, qp) = unsafe { (x.as_ptr().add(b * BLOCK), q.as_mut_ptr().add(b * BLOCK)) };
            // SAFETY: the block's 32 floats (as above).
            let (v0, v1) = unsafe { (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))) };
            // SAFETY: AVX-512 as the caller's.
            let amax = f32::from_bits(_mm512_reduce_max_epu32(unsafe { abs_max_bits(v0, v1) }));
            let inv = 127.0 / amax;
            if amax == 0.0 || !inv.is_finite() {
                reference_block(x, q, d, sums, b);
                continue;
            }
            d[b] = amax / 127.0;
            // SAFETY: the block's 32 codes (in bounds, as above); AVX-512 as the caller's.
            let codes = unsafe { store_codes(v0, v1, _mm512_set1_ps(inv), qp) };
            if !sums.is_empty() {
                sums[b] = _mm512_reduce_add_epi32(codes);
            }
        }
        if !x.len().is_multiple_of(BLOCK) {
            reference_block(x, q, d, sums, x.len() / BLOCK);
        }
    }
}

/// The largest `|x|` of a block's two halves as bits, lane by lane (f32 bits of non-negative values order as
/// unsigned integers).
/// # Safety
/// AVX-512 F is available (inlined into the `avx512_fn!` kernels).
#[inline(always)]
unsafe fn abs_max_bits(v0: __m512, v1: __m512) -> __m512i {
    let abs = |v: __m512| _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff));
    _mm512_max_epu32(abs(v0), abs(v1))
}

/// Writes a block's 32 codes `cvt(v·inv)` (halves `v0`, `v1`) to `qp`; returns their lane-wise sum `c0 + c1`.
/// # Safety
/// AVX-512 F is available (inlined into the `avx512_fn!` kernels); `qp` points at 32 writable bytes.
#[inline(always)]
unsafe fn store_codes(v0: __m512, v1: __m512, inv: __m512, qp: *mut i8) -> __m512i {
    let code = |v: __m512| _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    let (c0, c1) = (code(v0), code(v1));
    // SAFETY: 16 + 16 bytes at qp (the caller's condition).
    unsafe {
        _mm_storeu_si128(qp.cast(), _mm512_cvtepi32_epi8(c0));
        _mm_storeu_si128(qp.add(16).cast(), _mm512_cvtepi32_epi8(c1));
    }
    _mm512_add_epi32(c0, c1)
}

/// Blocks per batch of [`batch_512`]: one per lane of a 512-bit register.
const BATCH: usize = 16;

/// Reduces 16 vectors to one whose lane `b` is `op` over all lanes of `v[b]` (a transposing tree: 15 `op`s and
/// 30 shuffles, where 16 separate horizontal reductions are 16 serial chains).
/// # Safety
/// AVX-512 F is available (it is inlined into the `avx512_fn!` kernel that calls it).
#[inline(always)]
unsafe fn reduce_16(v: [__m512i; 16], op: impl Fn(__m512i, __m512i) -> __m512i) -> __m512i {
    // Level 1: vector k holds block 2k's 8 partials in its low half and block 2k + 1's in its high half.
    let l1: [__m512i; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        op(_mm512_shuffle_i32x4::<0x44>(a, b), _mm512_shuffle_i32x4::<0xEE>(a, b))
    });
    // Level 2: 128-bit lane L of vector k holds block 4k + L's 4 partials.
    let l2: [__m512i; 4] = std::array::from_fn(|k| {
        let (a, b) = (l1[2 * k], l1[2 * k + 1]);
        op(_mm512_shuffle_i32x4::<0x88>(a, b), _mm512_shuffle_i32x4::<0xDD>(a, b))
    });
    // Level 3: lane L of vector k holds 2 partials of block 8k + L, then 2 of block 8k + 4 + L.
    let l3: [__m512i; 2] = std::array::from_fn(|k| {
        let (a, b) = (l2[2 * k], l2[2 * k + 1]);
        op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
    });
    // Level 4: dword 4L + j holds block 4j + L.
    let (a, b) = (_mm512_castsi512_ps(l3[0]), _mm512_castsi512_ps(l3[1]));
    let r =
        op(_mm512_castps_si512(_mm512_shuffle_ps::<0x88>(a, b)), _mm512_castps_si512(_mm512_shuffle_ps::<0xDD>(a, b)));
    // Lane b takes dword 4·(b mod 4) + b / 4.
    _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r)
}

avx512_fn! {
    /// Blocks `b0..b0 + 16` (all whole) as `quantize_512`'s loop does them one by one, with the 16 maxima and
    /// sums reduced together and both divisions done as one vector each (the same IEEE operations per lane).
    /// # Safety
    /// AVX-512 F/BW is available; `check_lengths` held and `(b0 + 16)·32 ≤ x.len()`.
    unsafe fn batch_512(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32], b0: usize) {
        assert!((b0 + BATCH) * BLOCK <= x.len() && q.len() == x.len() && d.len() >= b0 + BATCH);
        assert!(sums.is_empty() || sums.len() >= b0 + BATCH, "act8 quantize: sums");
        // SAFETY: b < 16 and h < 2 at every call: blocks b0..b0 + 16 are inside x (asserted).
        let load = |b: usize, h: usize| unsafe { _mm512_loadu_ps(x.as_ptr().add((b0 + b) * BLOCK + 16 * h)) };
        // SAFETY: AVX-512 as the caller's.
        let maxima: [__m512i; BATCH] = std::array::from_fn(|b| unsafe { abs_max_bits(load(b, 0), load(b, 1)) });
        // SAFETY: AVX-512 as the caller's.
        let amax = _mm512_castsi512_ps(unsafe { reduce_16(maxima, |a, b| _mm512_max_epu32(a, b)) });
        let inv = _mm512_div_ps(_mm512_set1_ps(127.0), amax);
        // Blocks the reference quantizes itself: amax zero, or 127 / amax not finite (overflow; NaN input).
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(inv), _mm512_set1_ps(f32::INFINITY));
        let zero = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(amax, _mm512_setzero_ps());
        let mut special = !finite | zero;
        // SAFETY: d[b0..b0 + 16] (asserted).
        unsafe { _mm512_storeu_ps(d.as_mut_ptr().add(b0), _mm512_div_ps(amax, _mm512_set1_ps(127.0))) };
        let mut invs = [0f32; BATCH];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(invs.as_mut_ptr(), inv) };
        let block_sums: [__m512i; BATCH] = std::array::from_fn(|b| {
            let qp = q.as_mut_ptr().wrapping_add((b0 + b) * BLOCK);
            // SAFETY: the block's 32 codes are inside q (asserted); AVX-512 as the caller's.
            unsafe { store_codes(load(b, 0), load(b, 1), _mm512_set1_ps(invs[b]), qp) }
        });
        if !sums.is_empty() {
            // SAFETY: AVX-512 as the caller's; sums[b0..b0 + 16] (asserted).
            unsafe {
                let total = reduce_16(block_sums, |a, b| _mm512_add_epi32(a, b));
                _mm512_storeu_si512(sums.as_mut_ptr().add(b0).cast(), total);
            }
        }
        while special != 0 {
            reference_block(x, q, d, sums, b0 + special.trailing_zeros() as usize);
            special &= special - 1;
        }
    }
}

avx2_fn! {
    /// # Safety
    /// AVX2 is available.
    unsafe fn quantize_256(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
        check_lengths(x, q, d, sums);
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        // After the two packs the 32 codes are in 4-byte groups 0, 2, 4, 6, 1, 3, 5, 7 of the block.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..x.len() / BLOCK {
            // SAFETY: block b is whole (b < len / 32), so its 32 floats and 32 codes are in bounds.
            let (xp, qp) = unsafe { (x.as_ptr().add(b * BLOCK), q.as_mut_ptr().add(b * BLOCK)) };
            // SAFETY: the block's 32 floats (as above).
            let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xp.add(8 * i)) });
            let a: [__m256i; 4] = std::array::from_fn(|i| _mm256_and_si256(_mm256_castps_si256(v[i]), abs));
            let m = _mm256_max_epu32(_mm256_max_epu32(a[0], a[1]), _mm256_max_epu32(a[2], a[3]));
            let m = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
            let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
            let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
            let amax = f32::from_bits(_mm_cvtsi128_si32(m) as u32);
            let inv = 127.0 / amax;
            if amax == 0.0 || !inv.is_finite() {
                reference_block(x, q, d, sums, b);
                continue;
            }
            d[b] = amax / 127.0;
            let inv = _mm256_set1_ps(inv);
            let c: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
            // SAFETY: the 32 codes of block b (in bounds, as above).
            unsafe { _mm256_storeu_si256(qp.cast(), _mm256_permutevar8x32_epi32(packed, order)) };
            if !sums.is_empty() {
                let s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
                sums[b] = _mm_cvtsi128_si32(s);
            }
        }
        if !x.len().is_multiple_of(BLOCK) {
            reference_block(x, q, d, sums, x.len() / BLOCK);
        }
    }
}
