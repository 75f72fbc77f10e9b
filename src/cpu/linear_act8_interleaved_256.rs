//! The 256-bit int8-activation kernels over the interleaved weight layout
//! ([`Act8Interleaved`](super::linear_act8_interleaved::Act8Interleaved)), for CPUs without AVX-512: the same
//! layout and integers as the AVX-512 kernel (`linear_act8_interleaved_x86.rs`). Each 64-byte piece is loaded
//! as two 32-byte halves, rows 0–7 and 8–15 of the group; 4-bit halves are looked up in the int8 table with
//! `vpshufb`; each 32-bit lane adds the 4 products of its row's bytes with 4 `x` codes broadcast to every lane.
//! Lanes end with the exact `Σ q·c` of the block; then one i32 → f32 conversion and one multiply-add per block
//! with the rows' scales times the block's `d`. Only the order of the f32 block sums differs from the portable
//! kernel (blocks in column order, one chain per row), inside `reference::act8::kernel_bound`.
//!
//! The 4-product step comes in two forms ([`Dot4`]), which give the same integers and so the same bits:
//! - [`Vnni`] (AVX-VNNI, Intel's hybrid client cores): one `vpdpbusd` of the unsigned bytes (`c + 128` for
//!   4-bit weights, the codes for int8) with the signed `x` codes; lanes start at `−offset · Σ(x codes)`.
//! - [`Maddubs`] (plain AVX2: Zen 2/3, Intel before Alder Lake): 4-bit weights take the signed table `c` and
//!   ggml's `vpmaddubsw(|x|, sign(c, x))` (both factors ≤ 127 in magnitude, so a pair sum ≤ 32258 never
//!   saturates the i16) then `vpmaddwd` by ones, from lanes at 0; int8 codes split into their low 7 bits and
//!   their top bit (each `vpmaddubsw` pair sum then fits an i16), summed in i32 from lanes at
//!   `−zero point · Σ(x codes)`: exactly `vpdpbusd`.

use super::linear_act8::Act8View;
use super::linear_act8_coded_scales_x86::{decode_entries_256, entry_half_256};
use super::linear_act8_interleaved::{with_decoded_scales, Act8Interleaved, LaneScales, ROWS};
use super::x86_features::{avx2_fn, avxvnni_fn};
use crate::reference::act8::BLOCK;
use std::arch::x86_64::*;

/// `acc + Σ_{j < 4} w[4l + j] · x[4l + j]` in each i32 lane `l`, exactly.
pub(crate) trait Dot4 {
    /// Whether 4-bit weights are multiplied as the signed table values `c` (else as `c + 128`, corrected by
    /// the lanes' start).
    const SIGNED_TABLE: bool;
    /// The 4-bit step: `w` bytes from the table lookup (signed `c` or unsigned `c + 128`, see
    /// [`SIGNED_TABLE`](Self::SIGNED_TABLE)), `x` signed codes.
    ///
    /// # Safety
    /// The implementation's instruction set is enabled in the caller.
    unsafe fn table_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
    /// The int8 step: `w` unsigned codes, `x` signed codes.
    ///
    /// # Safety
    /// As [`table_dot`](Self::table_dot).
    unsafe fn code_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
}

/// AVX-VNNI's `vpdpbusd`.
pub(crate) struct Vnni;

impl Dot4 for Vnni {
    const SIGNED_TABLE: bool = false;
    #[inline(always)]
    unsafe fn table_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
    #[inline(always)]
    unsafe fn code_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
}

/// AVX2's `vpmaddubsw` + `vpmaddwd` (see the module documentation).
pub(crate) struct Maddubs;

impl Dot4 for Maddubs {
    const SIGNED_TABLE: bool = true;
    #[inline(always)]
    unsafe fn table_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn code_dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // w = low + high with low ≤ 127 and high ∈ {0, 128}; x codes are in −127..=127 (the quantizer's clamp), so
        // each pair sum is at most 2·128·127 = 32512 in magnitude.
        let top = _mm256_set1_epi8(-128);
        let low = _mm256_maddubs_epi16(_mm256_andnot_si256(top, w), x);
        let high = _mm256_maddubs_epi16(_mm256_and_si256(top, w), x);
        let ones = _mm256_set1_epi16(1);
        _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(high, ones)))
    }
}

avxvnni_fn! {
/// `out[r, j] += Σ_k x̂[r, k] · ŵ[o0 + j, k]` for the `ob` rows from `o0` and the `m` rows of `x` (`out` is
/// `[m, ob]`), from the interleaved layout `il` and `x` quantized in `act` (codes, `d`, block sums): the
/// AVX-VNNI form.
pub(crate) unsafe fn base_interleaved_256(
    act: Act8View<'_>,
    il: &Act8Interleaved,
    m: usize,
    o0: usize,
    ob: usize,
    out: &mut [f32],
) {
    base::<Vnni>(act, il, m, o0, ob, out)
}
}

avx2_fn! {
/// [`base_interleaved_256`] in the plain AVX2 form (the same bits).
pub(crate) unsafe fn base_interleaved_256_maddubs(
    act: Act8View<'_>,
    il: &Act8Interleaved,
    m: usize,
    o0: usize,
    ob: usize,
    out: &mut [f32],
) {
    base::<Maddubs>(act, il, m, o0, ob, out)
}
}

/// The body of both forms, inlined into each `#[target_feature]` wrapper.
#[inline(always)]
unsafe fn base<D: Dot4>(act: Act8View<'_>, il: &Act8Interleaved, m: usize, o0: usize, ob: usize, out: &mut [f32]) {
    il.check_kernel_call(act, m, o0, ob, out.len());
    // SAFETY: 16 readable bytes.
    let table = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(il.table.as_ptr() as *const __m128i) });
    // The stored table is c + 128; flipping the top bit gives c.
    let table = if D::SIGNED_TABLE { _mm256_xor_si256(table, _mm256_set1_epi8(-128)) } else { table };
    let (g0, g1) = (o0 / ROWS, (o0 + ob).div_ceil(ROWS));
    let mut k = Kernel {
        act,
        il,
        table,
        o0,
        ob,
        out,
        f32_scales: match &il.scales {
            LaneScales::F32(v) => v.as_ptr(),
            LaneScales::Codes(_) => std::ptr::null(),
        },
        f32_group0: 0,
        dot: std::marker::PhantomData::<D>,
    };
    if let (true, LaneScales::Codes(c)) = (m > 2, &il.scales) {
        // Several passes over each group (2 rows of x each): decode the coded scales once, not once per pass.
        let len = (g1 - g0) * il.per_row() * ROWS;
        return with_decoded_scales(len, |buf| {
            // SAFETY: entries g0·per_row.. for the len / 16 entries of groups g0..g1 < groups; AVX2 enabled.
            unsafe { decode_entries_256(c, g0 * il.per_row(), buf) };
            (k.f32_scales, k.f32_group0) = (buf.as_ptr(), g0);
            // SAFETY: as the caller's.
            unsafe { k.passes(m, g0, g1) }
        });
    }
    // SAFETY: as the caller's.
    unsafe { k.passes(m, g0, g1) }
}

impl<D: Dot4> Kernel<'_, '_, D> {
    /// Every group from `g0` to `g1` against every row of `x`.
    #[inline(always)]
    unsafe fn passes(&mut self, m: usize, g0: usize, g1: usize) {
        let mut g = g0;
        let k = self;
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

struct Kernel<'a, 'o, D> {
    act: Act8View<'a>,
    il: &'a Act8Interleaved,
    table: __m256i,
    o0: usize,
    ob: usize,
    out: &'o mut [f32],
    /// f32 scales `[groups from f32_group0][per_row][16]`: the layout's, or the call's coded scales decoded ahead;
    /// null while coded scales are decoded where they are used.
    f32_scales: *const f32,
    f32_group0: usize,
    dot: std::marker::PhantomData<D>,
}

impl<D: Dot4> Kernel<'_, '_, D> {
    /// The 16 rows' scales (two halves of 8) of parameter entry `param` of `group` (both in range): loaded, or
    /// decoded from double-quantization codes with a gather per half and the decoded scales' f32 operations.
    #[inline(always)]
    unsafe fn scales(&self, group: usize, param: usize) -> [__m256; 2] {
        if !self.f32_scales.is_null() {
            let at = ((group - self.f32_group0) * self.il.per_row() + param) * ROWS;
            // SAFETY: f32_group0 ≤ group and param < per_row: inside the f32 scales (the layout's, sized when built,
            // or the call's decoded buffer).
            return std::array::from_fn(|h| unsafe { _mm256_loadu_ps(self.f32_scales.add(at + 8 * h)) });
        }
        let entry = group * self.il.per_row() + param;
        std::array::from_fn(|h| match &self.il.scales {
            LaneScales::F32(_) => _mm256_setzero_ps(), // never: f32 scales are read through `f32_scales`
            // SAFETY: entry < groups · per_row, h < 2.
            LaneScales::Codes(c) => unsafe { entry_half_256(c, entry, h) },
        })
    }

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
        // The groups' scales of the current parameter entry (decoded again only when the entry changes).
        let mut ws = [[_mm256_setzero_ps(); 2]; G];
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
                        } else if D::SIGNED_TABLE {
                            _mm256_setzero_si256()
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
                    let piece =
                        unsafe { il.bytes.as_ptr().cast::<u8>().add(((g + gg) * pieces + kb * per_block + p) * 64) };
                    for h in 0..2 {
                        // SAFETY: bytes 32·h..32·h + 32 of the piece.
                        let v = unsafe { _mm256_loadu_si256(piece.add(32 * h) as *const __m256i) };
                        if int8 {
                            for i in 0..R {
                                acc[i][gg][h] = D::code_dot(acc[i][gg][h], v, xs[i][0]);
                            }
                        } else {
                            let lo = _mm256_shuffle_epi8(self.table, _mm256_and_si256(v, m15));
                            let hi = _mm256_shuffle_epi8(self.table, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m15));
                            for i in 0..R {
                                acc[i][gg][h] = D::table_dot(acc[i][gg][h], lo, xs[i][0]);
                                acc[i][gg][h] = D::table_dot(acc[i][gg][h], hi, xs[i][1]);
                            }
                        }
                    }
                }
            }
            for gg in 0..G {
                for h in 0..2 {
                    for i in 0..R {
                        let d = _mm256_set1_ps(act.d[(r0 + i) * nb + kb]);
                        y[i][gg][h] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc[i][gg][h]),
                            _mm256_mul_ps(ws[gg][h], d),
                            y[i][gg][h],
                        );
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
