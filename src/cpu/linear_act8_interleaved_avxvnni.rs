//! The AVX-VNNI (256-bit) int8-activation kernel over the interleaved weight layout
//! ([`Act8Interleaved`](super::linear_act8_interleaved::Act8Interleaved)), for CPUs with AVX-VNNI but without
//! AVX-512 (Intel's hybrid client cores). The same layout and integers as the AVX-512 kernel
//! (`linear_act8_interleaved_x86.rs`): each 64-byte piece is loaded as two 32-byte halves, rows 0–7 and 8–15
//! of the group, each looked up in the int8 table (+128) with `vpshufb` and fed to the VEX `vpdpbusd` against
//! 4 `x` codes broadcast to every lane; lanes start at `−offset · Σ(the block's x codes)` and end with the exact
//! `Σ q·c`; one i32 → f32 conversion and one multiply-add per block with the rows' scales times the block's
//! `d`. Only the order of the f32 block sums differs from the portable kernel (blocks in column order, one
//! chain per row), inside `reference::act8::kernel_bound`.

use super::linear_act8::Act8View;
use super::linear_act8_interleaved::{Act8Interleaved, ROWS};
use super::x86_features::avxvnni_fn;
use crate::reference::act8::BLOCK;
use std::arch::x86_64::*;

avxvnni_fn! {
/// `out[r, j] += Σ_k x̂[r, k] · ŵ[o0 + j, k]` for the `ob` rows from `o0` and the `m` rows of `x` (`out` is
/// `[m, ob]`), from the interleaved layout `il` and `x` quantized in `act` (codes, `d`, block sums).
pub(crate) unsafe fn base_interleaved_256(
    act: Act8View<'_>,
    il: &Act8Interleaved,
    m: usize,
    o0: usize,
    ob: usize,
    out: &mut [f32],
) {
    il.check_kernel_call(act, m, o0, ob, out.len());
    // SAFETY: 16 readable bytes.
    let table = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(il.table.as_ptr() as *const __m128i) });
    let mut k = Kernel { act, il, table, o0, ob, out };
    let (mut g, g1) = (o0 / ROWS, (o0 + ob).div_ceil(ROWS));
    // One row of x: two groups per pass (four independent accumulator chains); more rows: one group, two rows.
    if m == 1 {
        while g + 2 <= g1 {
            k.groups::<1, 2>(g, 0);
            g += 2;
        }
    }
    while g < g1 {
        let mut r0 = 0;
        while r0 < m {
            if m - r0 == 1 {
                k.groups::<1, 1>(g, r0);
            } else {
                k.groups::<2, 1>(g, r0);
            }
            r0 += (m - r0).min(2);
        }
        g += 1;
    }
}
}

struct Kernel<'a, 'o> {
    act: Act8View<'a>,
    il: &'a Act8Interleaved,
    table: __m256i,
    o0: usize,
    ob: usize,
    out: &'o mut [f32],
}

impl Kernel<'_, '_> {
    /// Groups `g..g + G` (16 weight rows each, two halves of 8 lanes) against rows `r0..r0 + R` of `x` (all
    /// below `m`); adds the sums of the group rows inside `o0..o0 + ob` into `out`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // i, gg and h index several arrays in step
    unsafe fn groups<const R: usize, const G: usize>(&mut self, g: usize, r0: usize) {
        let (act, il) = (self.act, self.il);
        let n_in = il.n_in;
        let nb = n_in / BLOCK;
        let int8 = il.is_int8();
        // Pieces of 64 bytes per row of a group: 8 columns each (4-bit) or 4 (int8).
        let (pieces, per_block) = if int8 { (n_in / 4, BLOCK / 4) } else { (n_in / 8, BLOCK / 8) };
        let m15 = _mm256_set1_epi8(15);
        let mut y = [[[_mm256_setzero_ps(); 2]; G]; R];
        for kb in 0..nb {
            let param = il.param_of_block()[kb] as usize;
            let mut acc = [[[_mm256_setzero_si256(); 2]; G]; R];
            for i in 0..R {
                let sum = act.sums[(r0 + i) * nb + kb];
                for gg in 0..G {
                    for h in 0..2 {
                        acc[i][gg][h] = if int8 {
                            // Weights are the u8 codes: start at −zero_point·Σx.
                            let at = ((g + gg) * il.per_row() + param) * ROWS + 8 * h;
                            // SAFETY: at + 8 ≤ zero_points.len() (g + gg < groups, param < per_row; asserted).
                            let zp = unsafe { _mm256_loadu_si256(il.zero_points.as_ptr().add(at) as *const __m256i) };
                            _mm256_mullo_epi32(zp, _mm256_set1_epi32(-sum))
                        } else {
                            // Weights are c + 128: start at −128·Σx.
                            _mm256_set1_epi32(-128 * sum)
                        };
                    }
                }
            }
            for p in 0..per_block {
                // The piece's first x column; 4-bit pieces also take the 4 after it (high nibbles).
                let col = kb * BLOCK + if int8 { 4 * p } else { 8 * p };
                let mut xs = [[_mm256_setzero_si256(); 2]; R];
                for i in 0..R {
                    for (o, x) in xs[i].iter_mut().enumerate().take(if int8 { 1 } else { 2 }) {
                        // SAFETY: r0 + i < m and col + 4·o + 4 ≤ n_in: inside `q` (asserted).
                        let x4 = unsafe {
                            (act.q.as_ptr().add((r0 + i) * n_in + col + 4 * o) as *const i32).read_unaligned()
                        };
                        *x = _mm256_set1_epi32(x4);
                    }
                }
                for gg in 0..G {
                    // SAFETY: g + gg < groups and kb·per_block + p < pieces: the 64 bytes are inside `bytes`.
                    let piece = unsafe { il.bytes.as_ptr().add(((g + gg) * pieces + kb * per_block + p) * 64) };
                    for h in 0..2 {
                        // SAFETY: bytes 32·h..32·h + 32 of the piece.
                        let v = unsafe { _mm256_loadu_si256(piece.add(32 * h) as *const __m256i) };
                        if int8 {
                            for i in 0..R {
                                acc[i][gg][h] = _mm256_dpbusd_avx_epi32(acc[i][gg][h], v, xs[i][0]);
                            }
                        } else {
                            let lo = _mm256_shuffle_epi8(self.table, _mm256_and_si256(v, m15));
                            let hi = _mm256_shuffle_epi8(self.table, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m15));
                            for i in 0..R {
                                acc[i][gg][h] = _mm256_dpbusd_avx_epi32(acc[i][gg][h], lo, xs[i][0]);
                                acc[i][gg][h] = _mm256_dpbusd_avx_epi32(acc[i][gg][h], hi, xs[i][1]);
                            }
                        }
                    }
                }
            }
            for gg in 0..G {
                let at = ((g + gg) * il.per_row() + param) * ROWS;
                for h in 0..2 {
                    // SAFETY: at + 16 ≤ scales.len() (asserted).
                    let ws = unsafe { _mm256_loadu_ps(il.scales.as_ptr().add(at + 8 * h)) };
                    for i in 0..R {
                        let d = _mm256_set1_ps(act.d[(r0 + i) * nb + kb]);
                        y[i][gg][h] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][gg][h]), _mm256_mul_ps(ws, d), y[i][gg][h]);
                    }
                }
            }
        }
        for i in 0..R {
            for gg in 0..G {
                // Only the group's rows inside o0..o0 + ob (the first and last groups may be partly outside).
                let mut lanes = [0f32; ROWS];
                _mm256_storeu_ps(lanes.as_mut_ptr(), y[i][gg][0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), y[i][gg][1]);
                for (l, v) in lanes.iter().enumerate() {
                    let row = (g + gg) * ROWS + l;
                    if (self.o0..self.o0 + self.ob).contains(&row) {
                        self.out[(r0 + i) * self.ob + row - self.o0] += v;
                    }
                }
            }
        }
    }
}
