//! The AVX-512 VNNI int8-activation kernel over the interleaved 4-bit layout
//! ([`Act8Interleaved`](super::linear_act8_interleaved::Act8Interleaved)). Per 32-block of `x` and group of 16
//! weight rows: 4 loads of 64 bytes, each split into its low and high nibbles and looked up in the int8 table
//! (+128) with `vpshufb`, 8 `vpdpbusd` against 4 `x` codes broadcast to every lane, one i32 → f32 conversion and
//! one multiply-add with the 16 rows' block scales times the block's `d`. Each lane's accumulator starts at
//! `−128 · Σ(the block's x codes)`, so it ends with the exact `Σ q·c`: the same integers as the other kernels;
//! only the order of the f32 block sums differs (blocks in column order, one chain per row).

use super::linear_act8::Act8View;
use super::linear_act8_interleaved::{Act8Interleaved, ROWS};
use super::x86_features::avx512vnni_fn;
use crate::reference::act8::BLOCK;
use std::arch::x86_64::*;

avx512vnni_fn! {
/// `out[r, j] += Σ_k x̂[r, k] · ŵ[o0 + j, k]` for the `ob` rows from `o0` and the `m` rows of `x` (`out` is
/// `[m, ob]`), from the interleaved layout `il` and `x` quantized in `act` (codes, `d`, block sums).
pub(crate) unsafe fn base_interleaved(act: Act8View<'_>, il: &Act8Interleaved, m: usize, o0: usize, ob: usize, out: &mut [f32]) {
    let n_in = il.n_in;
    let nb = n_in / BLOCK;
    assert!(n_in.is_multiple_of(64) && act.q.len() == m * n_in && act.d.len() == m * nb && act.sums.len() == m * nb);
    assert!(il.nibbles.len() == il.groups * n_in * 8);
    assert!(il.scales.len() == il.groups * (nb >> il.block_shift) * ROWS);
    assert!(o0 + ob <= il.groups * ROWS && out.len() >= m * ob);
    if ob == 0 {
        return;
    }
    let k = Kernel {
        act,
        il,
        // SAFETY: 16 readable bytes.
        table: _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(il.table.as_ptr() as *const __m128i) }),
        o0,
        ob,
        out: out.as_mut_ptr(),
    };
    let (g0, g1) = (o0 / ROWS, (o0 + ob).div_ceil(ROWS));
    let mut r0 = 0;
    while r0 < m {
        let rr = (m - r0).min(4);
        let mut g = g0;
        // Several groups per pass for independent accumulator chains; fewer when several x rows share them.
        if rr == 1 {
            while g + 4 <= g1 {
                k.groups::<4, 1>(g, r0);
                g += 4;
            }
        } else {
            while g + 2 <= g1 {
                match rr {
                    2 => k.groups::<2, 2>(g, r0),
                    3 => k.groups::<2, 3>(g, r0),
                    _ => k.groups::<2, 4>(g, r0),
                }
                g += 2;
            }
        }
        while g < g1 {
            match rr {
                1 => k.groups::<1, 1>(g, r0),
                2 => k.groups::<1, 2>(g, r0),
                3 => k.groups::<1, 3>(g, r0),
                _ => k.groups::<1, 4>(g, r0),
            }
            g += 1;
        }
        r0 += rr;
    }
}
}

struct Kernel<'a> {
    act: Act8View<'a>,
    il: &'a Act8Interleaved,
    table: __m512i,
    o0: usize,
    ob: usize,
    out: *mut f32,
}

impl Kernel<'_> {
    /// Groups `g..g + G` against rows `r0..r0 + RR` of `x`; adds into the lanes of `out` inside `o0..o0 + ob`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // gg and i index several arrays in step
    unsafe fn groups<const G: usize, const RR: usize>(&self, g: usize, r0: usize) {
        let (act, il) = (self.act, self.il);
        let n_in = il.n_in;
        let (nb, pieces) = (n_in / BLOCK, n_in / 8);
        let per_row = nb >> il.block_shift;
        let m15 = _mm512_set1_epi8(15);
        let mut y = [[_mm512_setzero_ps(); G]; RR];
        let nib = il.nibbles.as_ptr();
        let q = act.q.as_ptr();
        for kb in 0..nb {
            let mut acc = [[_mm512_setzero_si512(); G]; RR];
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: r0 + i < m and kb < nb: inside `sums` (asserted by the caller).
                let start = _mm512_set1_epi32(-128 * unsafe { *act.sums.get_unchecked((r0 + i) * nb + kb) });
                *a = [start; G];
            }
            for p4 in 0..BLOCK / 8 {
                let p = kb * (BLOCK / 8) + p4;
                let mut xlo = [_mm512_setzero_si512(); RR];
                let mut xhi = [_mm512_setzero_si512(); RR];
                for i in 0..RR {
                    // SAFETY: 8p + 8 <= n_in and r0 + i < m: the 8 codes are inside row r0 + i of `q` (length
                    // m · n_in), read as two unaligned i32.
                    let (lo, hi) = unsafe {
                        let at = q.add((r0 + i) * n_in + 8 * p) as *const i32;
                        (at.read_unaligned(), at.add(1).read_unaligned())
                    };
                    xlo[i] = _mm512_set1_epi32(lo);
                    xhi[i] = _mm512_set1_epi32(hi);
                }
                for gg in 0..G {
                    // SAFETY: g + gg < groups and p < pieces: the 64 bytes are inside `nibbles`.
                    let v = unsafe { _mm512_loadu_si512(nib.add(((g + gg) * pieces + p) * 64) as *const _) };
                    let lo = _mm512_shuffle_epi8(self.table, _mm512_and_si512(v, m15));
                    let hi = _mm512_shuffle_epi8(self.table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), m15));
                    for i in 0..RR {
                        acc[i][gg] = _mm512_dpbusd_epi32(acc[i][gg], lo, xlo[i]);
                        acc[i][gg] = _mm512_dpbusd_epi32(acc[i][gg], hi, xhi[i]);
                    }
                }
            }
            for gg in 0..G {
                // SAFETY: g + gg < groups and kb >> block_shift < per_row: 16 scales inside `scales`.
                let ws = unsafe {
                    _mm512_loadu_ps(il.scales.as_ptr().add(((g + gg) * per_row + (kb >> il.block_shift)) * ROWS))
                };
                for i in 0..RR {
                    // SAFETY: r0 + i < m and kb < nb: inside `d`.
                    let d = _mm512_set1_ps(unsafe { *act.d.get_unchecked((r0 + i) * nb + kb) });
                    y[i][gg] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][gg]), _mm512_mul_ps(ws, d), y[i][gg]);
                }
            }
        }
        for gg in 0..G {
            // Lanes of rows inside o0..o0 + ob (the first and last groups may be partly outside).
            let row0 = (g + gg) * ROWS;
            let lo = self.o0.saturating_sub(row0);
            let hi = (self.o0 + self.ob - row0).min(ROWS);
            let mask: __mmask16 = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
            for (i, yi) in y.iter().enumerate() {
                // Lane l is out[(r0 + i) · ob + row0 + l − o0]; only the masked lanes (inside the row's ob
                // entries) are read or written, and masked-off lanes of AVX-512 loads and stores never fault.
                let at = self.out.wrapping_add((r0 + i) * self.ob + row0).wrapping_sub(self.o0);
                // SAFETY: every unmasked lane l has o0 ≤ row0 + l < o0 + ob, so it is inside `out`'s row r0 + i.
                unsafe {
                    let cur = _mm512_maskz_loadu_ps(mask, at);
                    _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(cur, yi[gg]));
                }
            }
        }
    }
}
