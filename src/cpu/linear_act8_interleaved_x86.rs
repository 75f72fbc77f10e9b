//! The AVX-512 VNNI int8-activation kernel over the interleaved weight layout
//! ([`Act8Interleaved`](super::linear_act8_interleaved::Act8Interleaved)). Per 32-block of `x` and group of 16
//! weight rows: 4 loads of 64 bytes, each split into its low and high nibbles and looked up in the int8 table
//! (+128) with `vpshufb`, 8 `vpdpbusd` against 4 `x` codes broadcast to every lane, one i32 → f32 conversion and
//! one multiply-add with the 16 rows' block scales times the block's `d`. Each lane's accumulator starts at
//! `−128 · Σ(the block's x codes)`, so it ends with the exact `Σ q·c`: the same integers as the other kernels
//! (int8 weights: 8 loads of the codes themselves, and the start `−zero_point · Σ x`);
//! only the order of the f32 block sums differs (blocks in column order, one chain per row).

use super::linear_act8::Act8View;
use super::linear_act8_coded_scales_x86::{decode_entries_512, entry_512};
use super::linear_act8_interleaved::{with_decoded_scales, Act8Interleaved, LaneScales, ROWS};
use super::x86_features::avx512vnni_fn;
use crate::reference::act8::BLOCK;
use std::arch::x86_64::*;

avx512vnni_fn! {
/// `out[r, j] += Σ_k x̂[r, k] · ŵ[o0 + j, k]` for the `ob` rows from `o0` and the `m` rows of `x` (`out` is
/// `[m, ob]`), from the interleaved layout `il` and `x` quantized in `act` (codes, `d`, block sums).
pub(crate) unsafe fn base_interleaved(act: Act8View<'_>, il: &Act8Interleaved, m: usize, o0: usize, ob: usize, out: &mut [f32]) {
    il.check_kernel_call(act, m, o0, ob, out.len());
    if ob == 0 {
        return;
    }
    let (g0, g1) = (o0 / ROWS, (o0 + ob).div_ceil(ROWS));
    let mut k = Kernel {
        act,
        il,
        // SAFETY: 16 readable bytes.
        table: _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(il.table.as_ptr() as *const __m128i) }),
        o0,
        ob,
        out: out.as_mut_ptr(),
        f32_scales: match &il.scales {
            LaneScales::F32(v) => v.as_ptr(),
            LaneScales::Codes(_) => std::ptr::null(),
        },
        f32_group0: 0,
    };
    if let (true, LaneScales::Codes(c)) = (m > 4, &il.scales) {
        // Several passes over the groups (4 rows of x each): decode the coded scales once, not once per pass.
        let len = (g1 - g0) * il.per_row() * ROWS;
        return with_decoded_scales(len, |buf| {
            // SAFETY: entries g0·per_row.. for the len / 16 entries of groups g0..g1 < groups; AVX-512 enabled.
            unsafe { decode_entries_512(c, g0 * il.per_row(), buf) };
            (k.f32_scales, k.f32_group0) = (buf.as_ptr(), g0);
            // SAFETY: as the caller's.
            unsafe { k.passes(m, g0, g1) }
        });
    }
    // SAFETY: as the caller's.
    unsafe { k.passes(m, g0, g1) }
}
}

impl Kernel<'_> {
    /// Every pass of 4 rows of `x` over groups `g0..g1`.
    #[inline(always)]
    unsafe fn passes(&self, m: usize, g0: usize, g1: usize) {
        let (k, il) = (self, self.il);
        let mut r0 = 0;
        while r0 < m {
            let rr = (m - r0).min(4);
            let mut g = g0;
            // Several groups per pass for independent accumulator chains; fewer when several x rows share them.
            if il.is_int8() {
                g = k.all_groups::<Int8Pieces>(g, g1, r0, rr);
            } else {
                g = k.all_groups::<FourBitPieces>(g, g1, r0, rr);
            }
            debug_assert_eq!(g, g1);
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
    /// f32 scales `[groups from f32_group0][per_row][16]`: the layout's, or the call's coded scales decoded ahead;
    /// null while coded scales are decoded where they are used.
    f32_scales: *const f32,
    f32_group0: usize,
}

/// How a weight kind feeds `vpdpbusd`: per group and 32-block of `x`, `PER_BLOCK` pieces (64-byte loads),
/// each giving `OPERANDS` weight operands against consecutive 4-code groups of `x`, and the accumulator start
/// that removes the weights' offset.
trait Pieces {
    const PER_BLOCK: usize;
    const OPERANDS: usize;
    /// The start of a lane's accumulator for a block whose `x` codes sum to `sum`.
    unsafe fn start(k: &Kernel<'_>, group: usize, param: usize, sum: i32) -> __m512i;
    /// The weight operands of piece `p` (of the block `kb`) of `group`.
    unsafe fn operands(k: &Kernel<'_>, group: usize, kb: usize, p: usize) -> [__m512i; 2];
}

struct FourBitPieces;
struct Int8Pieces;

impl Pieces for FourBitPieces {
    const PER_BLOCK: usize = BLOCK / 8;
    const OPERANDS: usize = 2;
    #[inline(always)]
    unsafe fn start(_: &Kernel<'_>, _: usize, _: usize, sum: i32) -> __m512i {
        // Weights are c + 128: start at −128·Σx so each lane ends with Σ c·x.
        _mm512_set1_epi32(-128 * sum)
    }
    #[inline(always)]
    unsafe fn operands(k: &Kernel<'_>, group: usize, kb: usize, p: usize) -> [__m512i; 2] {
        let pieces = k.il.n_in / 8;
        // SAFETY: group < groups and kb·4 + p < pieces: the 64 bytes are inside `bytes` (asserted).
        let v = unsafe {
            _mm512_loadu_si512(
                k.il.bytes.as_ptr().cast::<u8>().add((group * pieces + kb * Self::PER_BLOCK + p) * 64) as *const _
            )
        };
        let m15 = _mm512_set1_epi8(15);
        [
            _mm512_shuffle_epi8(k.table, _mm512_and_si512(v, m15)),
            _mm512_shuffle_epi8(k.table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), m15)),
        ]
    }
}

impl Pieces for Int8Pieces {
    const PER_BLOCK: usize = BLOCK / 4;
    const OPERANDS: usize = 1;
    #[inline(always)]
    unsafe fn start(k: &Kernel<'_>, group: usize, param: usize, sum: i32) -> __m512i {
        // Weights are the u8 codes: start at −zero_point·Σx so each lane ends with Σ (code − zero_point)·x.
        // SAFETY: group < groups and param < per_row: 16 zero points inside `zero_points` (asserted).
        let zp = unsafe {
            _mm512_loadu_si512(k.il.zero_points.as_ptr().add((group * k.il.per_row() + param) * ROWS) as *const _)
        };
        _mm512_mullo_epi32(zp, _mm512_set1_epi32(-sum))
    }
    #[inline(always)]
    unsafe fn operands(k: &Kernel<'_>, group: usize, kb: usize, p: usize) -> [__m512i; 2] {
        let pieces = k.il.n_in / 4;
        // SAFETY: group < groups and kb·8 + p < pieces: the 64 bytes are inside `bytes` (asserted).
        let v = unsafe {
            _mm512_loadu_si512(
                k.il.bytes.as_ptr().cast::<u8>().add((group * pieces + kb * Self::PER_BLOCK + p) * 64) as *const _
            )
        };
        [v, v]
    }
}

impl Kernel<'_> {
    /// Groups `g..g1` against rows `r0..r0 + rr` of `x` (`rr` ≤ 4), several groups per pass for independent
    /// accumulator chains (fewer when several rows of `x` share them). Returns `g1`.
    #[inline(always)]
    unsafe fn all_groups<P: Pieces>(&self, mut g: usize, g1: usize, r0: usize, rr: usize) -> usize {
        if rr == 1 {
            while g + 4 <= g1 {
                self.groups::<P, 4, 1>(g, r0);
                g += 4;
            }
            // A block of 32 rows (layers under 3072 outputs) is two groups: two chains, not one at a time.
            if g + 2 <= g1 {
                self.groups::<P, 2, 1>(g, r0);
                g += 2;
            }
        } else {
            while g + 2 <= g1 {
                match rr {
                    2 => self.groups::<P, 2, 2>(g, r0),
                    3 => self.groups::<P, 2, 3>(g, r0),
                    _ => self.groups::<P, 2, 4>(g, r0),
                }
                g += 2;
            }
        }
        while g < g1 {
            match rr {
                1 => self.groups::<P, 1, 1>(g, r0),
                2 => self.groups::<P, 1, 2>(g, r0),
                3 => self.groups::<P, 1, 3>(g, r0),
                _ => self.groups::<P, 1, 4>(g, r0),
            }
            g += 1;
        }
        g
    }

    /// The 16 rows' scales of parameter entry `param` of `group` (both in range): loaded, or decoded from
    /// double-quantization codes with one gather and the decoded scales' f32 operations (the same bits).
    #[inline(always)]
    unsafe fn scales(&self, group: usize, param: usize) -> __m512 {
        if !self.f32_scales.is_null() {
            let at = ((group - self.f32_group0) * self.il.per_row() + param) * ROWS;
            // SAFETY: f32_group0 ≤ group and param < per_row: inside the f32 scales (the layout's, sized when built,
            // or the call's decoded buffer).
            return unsafe { _mm512_loadu_ps(self.f32_scales.add(at)) };
        }
        let entry = group * self.il.per_row() + param;
        match &self.il.scales {
            LaneScales::F32(_) => _mm512_setzero_ps(), // never: f32 scales are read through `f32_scales`
            // SAFETY: entry < groups · per_row.
            LaneScales::Codes(c) => unsafe { entry_512(c, entry) },
        }
    }

    /// Groups `g..g + G` against rows `r0..r0 + RR` of `x`; adds into the lanes of `out` inside `o0..o0 + ob`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // gg and i index several arrays in step
    unsafe fn groups<P: Pieces, const G: usize, const RR: usize>(&self, g: usize, r0: usize) {
        let (act, il) = (self.act, self.il);
        let n_in = il.n_in;
        let nb = n_in / BLOCK;
        let mut y = [[_mm512_setzero_ps(); G]; RR];
        // The groups' scales of the current parameter entry (decoded again only when the entry changes).
        let mut ws = [_mm512_setzero_ps(); G];
        let mut ws_param = usize::MAX;
        for kb in 0..nb {
            let param = il.param_of_block()[kb] as usize;
            if param != ws_param {
                for gg in 0..G {
                    // SAFETY: g + gg < groups and param < per_row.
                    ws[gg] = unsafe { self.scales(g + gg, param) };
                }
                ws_param = param;
            }
            let mut acc = [[_mm512_setzero_si512(); G]; RR];
            for i in 0..RR {
                let sum = act.sums[(r0 + i) * nb + kb];
                for gg in 0..G {
                    acc[i][gg] = P::start(self, g + gg, param, sum);
                }
            }
            for p in 0..P::PER_BLOCK {
                // The piece's x codes: 4 per operand, broadcast to every lane.
                let mut xs = [[_mm512_setzero_si512(); 2]; RR];
                for i in 0..RR {
                    for (o, x) in xs[i].iter_mut().enumerate().take(P::OPERANDS) {
                        let col = (r0 + i) * n_in + kb * BLOCK + P::OPERANDS * 4 * p + 4 * o;
                        // SAFETY: r0 + i < m and col + 4 <= the row's end: inside `q` (asserted).
                        *x = _mm512_set1_epi32(unsafe { (act.q.as_ptr().add(col) as *const i32).read_unaligned() });
                    }
                }
                for gg in 0..G {
                    let w = P::operands(self, g + gg, kb, p);
                    for i in 0..RR {
                        for o in 0..P::OPERANDS {
                            acc[i][gg] = _mm512_dpbusd_epi32(acc[i][gg], w[o], xs[i][o]);
                        }
                    }
                }
            }
            for gg in 0..G {
                for i in 0..RR {
                    let d = _mm512_set1_ps(act.d[(r0 + i) * nb + kb]);
                    y[i][gg] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][gg]), _mm512_mul_ps(ws[gg], d), y[i][gg]);
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
