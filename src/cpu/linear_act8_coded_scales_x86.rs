//! Decoding the interleaved act8 layout's double-quantized scale codes
//! ([`CodedScales`](super::linear_act8_interleaved::CodedScales)) on x86: each entry's 16 lanes are
//! `((map[code] · nested) + offset) · (1/127)`, three separately rounded f32 operations, the bits of the decoded
//! scale times 1/127. Kernels decode an entry where they use it (one gather from the 256-entry map, hidden behind
//! the weight stream at one row of `x`); calls that pass over the same groups several times decode their range
//! ahead, with AVX-512 VBMI byte lookups where the CPU has them (four entries per step: the map's four byte planes
//! looked up with `vpermi2b`, interleaved back into f32 bit patterns) and the gather otherwise.

use super::linear_act8::INV127;
use super::linear_act8_interleaved::{CodedScales, ROWS};
use super::x86_features::{avx512_fn, avx512vbmi_fn, Avx512Vbmi};
use std::arch::x86_64::*;

/// The 16 lanes of entry `entry` (one gather from the map).
///
/// # Safety
/// AVX-512 F is enabled in the caller; `entry` is below the layout's `groups · per_row` (the codes, the run index
/// and its run are then inside `c`: checked when the layout was built).
#[inline(always)]
pub(crate) unsafe fn entry_512(c: &CodedScales, entry: usize) -> __m512 {
    // SAFETY: the caller's `entry` bound; the codes are below 256, inside `map`.
    unsafe {
        let run = *c.run_of().get_unchecked(entry) as usize;
        let nested = _mm512_loadu_ps(c.nested.as_ptr().add(run * ROWS));
        let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.codes.as_ptr().add(entry * ROWS) as *const __m128i));
        let mapped = _mm512_i32gather_ps::<4>(codes, c.map.as_ptr());
        finish_512(mapped, nested, c.offset)
    }
}

/// Half `h` (lanes `8h..8h + 8`) of entry `entry` (one gather from the map).
///
/// # Safety
/// AVX2 is enabled in the caller; `entry` as in [`entry_512`], `h` < 2.
#[inline(always)]
pub(crate) unsafe fn entry_half_256(c: &CodedScales, entry: usize, h: usize) -> __m256 {
    // SAFETY: the caller's `entry` bound; the codes are below 256, inside `map`.
    unsafe {
        let run = *c.run_of().get_unchecked(entry) as usize;
        let nested = _mm256_loadu_ps(c.nested.as_ptr().add(run * ROWS + 8 * h));
        let codes = _mm_loadl_epi64(c.codes.as_ptr().add(entry * ROWS + 8 * h) as *const __m128i);
        let mapped = _mm256_i32gather_ps::<4>(c.map.as_ptr(), _mm256_cvtepu8_epi32(codes));
        let absmax = _mm256_add_ps(_mm256_mul_ps(mapped, nested), _mm256_set1_ps(c.offset));
        _mm256_mul_ps(absmax, _mm256_set1_ps(INV127))
    }
}

/// Decodes entries `first..first + out.len() / 16` into `out` (16 floats per entry), two gathers each: the values
/// [`entry_half_256`] gives.
///
/// # Safety
/// AVX2 is enabled in the caller; `first + out.len() / 16` is at most the layout's `groups · per_row`, and
/// `out.len()` is a multiple of 16.
#[inline(always)]
pub(crate) unsafe fn decode_entries_256(c: &CodedScales, first: usize, out: &mut [f32]) {
    debug_assert!(out.len().is_multiple_of(ROWS));
    for e in 0..out.len() / ROWS {
        for h in 0..2 {
            // SAFETY: first + e is below the caller's bound; 8 floats at 16e + 8h are inside `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(e * ROWS + 8 * h), entry_half_256(c, first + e, h)) };
        }
    }
}

/// `((mapped · nested) + offset) · (1/127)`, each operation rounded (no FMA).
#[inline(always)]
unsafe fn finish_512(mapped: __m512, nested: __m512, offset: f32) -> __m512 {
    let absmax = _mm512_add_ps(_mm512_mul_ps(mapped, nested), _mm512_set1_ps(offset));
    _mm512_mul_ps(absmax, _mm512_set1_ps(INV127))
}

/// Decodes entries `first..first + out.len() / 16` into `out` (16 floats per entry), with VBMI where the CPU has
/// it: the values [`entry_512`] gives.
///
/// # Safety
/// AVX-512 F/BW/VL/DQ are present; `first + out.len() / 16` is at most the layout's `groups · per_row`, and
/// `out.len()` is a multiple of 16.
pub(crate) unsafe fn decode_entries_512(c: &CodedScales, first: usize, out: &mut [f32]) {
    debug_assert!(out.len().is_multiple_of(ROWS));
    match Avx512Vbmi::detect() {
        // SAFETY: VBMI detected; the caller's bounds.
        Some(_) => unsafe { decode_vbmi(c, first, out) },
        // SAFETY: the caller's features and bounds.
        None => unsafe { decode_gather(c, first, 0, out) },
    }
}

avx512_fn! {
/// Entries `first + done..` into `out[16·done..]`, one gather each.
unsafe fn decode_gather(c: &CodedScales, first: usize, done: usize, out: &mut [f32]) {
    for e in done..out.len() / ROWS {
        // SAFETY: first + e is below the caller's bound; 16 floats at 16e are inside `out`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(e * ROWS), entry_512(c, first + e)) };
    }
}
}

/// `vpermb` order that makes the two `unpack` rounds below leave entry `q`'s 16 lanes in register `q`: byte
/// `16L + 4q + s` takes code `16q + 4L + s` (`L`: 128-bit lane, `s`: 0..4).
const ORDER: [u8; 64] = {
    let mut order = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (l, q, s) = (i / 16, i % 16 / 4, i % 4);
        order[i] = (16 * q + 4 * l + s) as u8;
        i += 1;
    }
    order
};

avx512vbmi_fn! {
/// [`decode_gather`]'s values four entries (64 codes) per step: each byte plane of the map's f32 bit patterns
/// looked up with two `vpermi2b` (codes below and above 128) and a blend, the planes interleaved into f32 bits.
unsafe fn decode_vbmi(c: &CodedScales, first: usize, out: &mut [f32]) {
    let entries = out.len() / ROWS;
    let planes: [[__m512i; 4]; 4] = std::array::from_fn(|k| {
        std::array::from_fn(|j| {
            // SAFETY: bytes 64j..64j + 64 of a 256-byte plane.
            unsafe { _mm512_loadu_si512(c.map_planes[k].as_ptr().add(64 * j) as *const _) }
        })
    });
    // SAFETY: ORDER is 64 bytes.
    let order = unsafe { _mm512_loadu_si512(ORDER.as_ptr() as *const _) };
    let mut e = 0;
    while e + 4 <= entries {
        // SAFETY: entries first + e .. first + e + 4 are below the caller's bound: 64 codes inside `codes`.
        let codes = unsafe { _mm512_loadu_si512(c.codes.as_ptr().add((first + e) * ROWS) as *const _) };
        let idx = _mm512_permutexvar_epi8(order, codes);
        let high = _mm512_movepi8_mask(idx);
        let p: [__m512i; 4] = std::array::from_fn(|k| {
            let low = _mm512_permutex2var_epi8(planes[k][0], idx, planes[k][1]);
            let top = _mm512_permutex2var_epi8(planes[k][2], idx, planes[k][3]);
            _mm512_mask_blend_epi8(high, low, top)
        });
        let (lo01, hi01) = (_mm512_unpacklo_epi8(p[0], p[1]), _mm512_unpackhi_epi8(p[0], p[1]));
        let (lo23, hi23) = (_mm512_unpacklo_epi8(p[2], p[3]), _mm512_unpackhi_epi8(p[2], p[3]));
        let mapped = [
            _mm512_unpacklo_epi16(lo01, lo23),
            _mm512_unpackhi_epi16(lo01, lo23),
            _mm512_unpacklo_epi16(hi01, hi23),
            _mm512_unpackhi_epi16(hi01, hi23),
        ];
        for (q, bits) in mapped.into_iter().enumerate() {
            // SAFETY: the entry is below the caller's bound, so its run index and run are inside `c` (checked when
            // built); 16 floats at 16(e + q) are inside `out`.
            unsafe {
                let run = *c.run_of().get_unchecked(first + e + q) as usize;
                let nested = _mm512_loadu_ps(c.nested.as_ptr().add(run * ROWS));
                let v = finish_512(_mm512_castsi512_ps(bits), nested, c.offset);
                _mm512_storeu_ps(out.as_mut_ptr().add((e + q) * ROWS), v);
            }
        }
        e += 4;
    }
    // SAFETY: the caller's bounds; VBMI implies the gather's features.
    unsafe { decode_gather(c, first, e, out) }
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::linear_act8_interleaved::{Act8Interleaved, LaneScales};
    use crate::format::layer::QuantWeight;
    use crate::format::scheme::Scheme;

    /// The VBMI decode gives the gather's bits for every entry (all 256 codes, ranges not multiples of 4), and
    /// both give the decoded scale times 1/127.
    #[test]
    fn vbmi_and_gather_decodes_agree_bit_for_bit() {
        if crate::cpu::x86_features::Avx512::detect().is_none() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let (out, n_in) = (50, 4096);
        let w: Vec<f32> =
            (0..out * n_in).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * (1.0 + (i % 4099) as f32)).collect();
        let weight = QuantWeight::quantize(&w, &[out, n_in], Scheme::nf4(32, true)).unwrap();
        let QuantWeight::FourBit(t) = &weight else { panic!("4-bit") };
        let il = Act8Interleaved::build(&weight, out, n_in, t.decoded_scales()).unwrap();
        let LaneScales::Codes(c) = &il.scales else { panic!("coded scales") };
        let per_row = n_in / 32;
        let mut seen = [false; 256];
        c.codes.iter().for_each(|&q| seen[q as usize] = true);
        assert!(seen.iter().filter(|&&s| s).count() > 200, "most of the map's codes occur");
        let entries = il.groups * per_row;
        for (first, n) in [(0, entries), (3, entries - 3), (5, 7), (entries - 1, 1)] {
            let mut gather = vec![0f32; n * ROWS];
            // SAFETY: AVX-512 detected; first + n ≤ entries.
            unsafe { decode_gather(c, first, 0, &mut gather) };
            for (i, v) in gather.iter().enumerate() {
                let (e, r) = (first + i / ROWS, i % ROWS);
                let (g, b) = (e / per_row, e % per_row);
                let o = g * ROWS + r;
                if o < out {
                    let want = t.decoded_scales()[o * per_row + b] * INV127;
                    assert_eq!(v.to_bits(), want.to_bits(), "entry {e} lane {r}");
                }
            }
            if Avx512Vbmi::detect().is_some() {
                let mut vbmi = vec![0f32; n * ROWS];
                // SAFETY: VBMI detected; first + n ≤ entries.
                unsafe { decode_vbmi(c, first, &mut vbmi) };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&vbmi), bits(&gather), "entries {first}+{n}");
            } else {
                eprintln!("skipped the VBMI half: no AVX-512 VBMI on this CPU");
            }
        }
    }
}
