//! AVX-512 VNNI int8-activation kernel: `vpdpbusd` multiplies 64 unsigned weight bytes by 64 signed `x` codes
//! and adds each 4 products into an i32 lane. The weight bytes are `c + 128` (4-bit: the int8 table shifted
//! into u8, looked up from the nibbles with one `vpshufb`) or the int8 codes themselves; the lane's accumulator
//! starts at `−offset · Σ(its 4 x codes)` (offset 128, or the zero point), so each lane ends with the exact
//! `Σ q·c`. Lanes 0–7 of a 64-code chunk belong to its first 32-block of `x`, lanes 8–15 to its second: one
//! f32 multiply-add per lane with that block's `d` times the weight scale.
//!
//! A 4-bit chunk is 32 packed bytes `b0..b31` (element 2i in the high nibble of `b_i`); it decodes to
//! `[hi(b0..15), lo(b0..15), hi(b16..31), lo(b16..31)]`, elements `0,2,…,30, 1,3,…,31, 32,…,62, 33,…,63`: the
//! order of `Act8X::vq` (each 32-block's even codes, then its odd ones).

use super::linear_act8::{
    add_tiles, base_portable, vnni_eligible, Act8Layout, Act8Tile, Act8View, Int8ParamIndex, INV127,
};
use super::linear_act8_interleaved_x86::base_interleaved;
use super::linear_x86::GEMV_PREFETCH;
use super::table::{Job, LinearKernels};
use super::x86_features::{avx512vnni_fn, Avx512Vnni};
use crate::format::layer::QuantWeight;
use crate::reference::act8::{int8_table, BLOCK};
use std::arch::x86_64::*;

/// `base` with the VNNI int8-activation block (the token proves detection).
pub(crate) fn vnni(_: Avx512Vnni, base: LinearKernels) -> LinearKernels {
    LinearKernels {
        // SAFETY: built only from an `Avx512Vnni` token (its features were detected); the kernel checks the
        // lengths of every slice it reads through raw pointers before its loops.
        act8_block: |job, o0, ob, out| unsafe { block_vnni(job, o0, ob, out) },
        act8_layout: Act8Layout::Vnni,
        act8_interleaved: true,
        ..base
    }
}

/// Weight rows handled together (their decoded chunks stay in registers for every row of `x`).
const J: usize = 4;
/// Rows of `x` per pass over the weight rows.
const R: usize = 4;

/// One 64-code chunk of a weight row as the kernel multiplies it.
trait Chunks {
    /// Whether every row has the same offset (4-bit: 128), so the accumulator start is shared by the rows.
    const SHARED_OFFSET: bool;
    /// (u8 weights, per-lane weight scale, `−offset` in every lane) of chunk `c` of row `o`.
    unsafe fn chunk(&self, o: usize, c: usize) -> (__m512i, __m512, __m512i);
}

struct FourBit<'a> {
    packed: *const u8,
    scales: &'a [f32],
    n_in: usize,
    shift: u32,
    table: __m512i,
}

impl Chunks for FourBit<'_> {
    const SHARED_OFFSET: bool = true;
    #[inline(always)]
    unsafe fn chunk(&self, o: usize, c: usize) -> (__m512i, __m512, __m512i) {
        let flat = o * self.n_in + 64 * c;
        // SAFETY: the caller checked `packed` holds `out × in / 2` bytes and `in % 64 == 0`, so the 32 bytes of
        // this chunk are inside.
        let v = _mm512_castsi256_si512(_mm256_loadu_si256(self.packed.add(flat / 2) as *const __m256i));
        // Four row streams restart every row group: ask for the bytes PREFETCH ahead (a hint, never faults).
        _mm_prefetch::<_MM_HINT_T0>(self.packed.wrapping_add(flat / 2 + GEMV_PREFETCH) as *const i8);
        let z = _mm512_shuffle_i64x2::<0x50>(v, v); // quarters [b0..15, b0..15, b16..31, b16..31]
        let z = _mm512_mask_srli_epi16::<4>(z, 0x00ff_00ff, z); // high nibbles in quarters 0 and 2
        let idx = _mm512_and_si512(z, _mm512_set1_epi8(15));
        let w = _mm512_shuffle_epi8(self.table, idx);
        let b = flat >> self.shift;
        let s = if self.shift >= 6 {
            _mm512_set1_ps(self.scales[b] * INV127)
        } else {
            // Block size 32: the chunk's two blocks.
            let (s0, s1) = (self.scales[b] * INV127, self.scales[b + 1] * INV127);
            _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0), _mm512_set1_ps(s1))
        };
        (w, s, _mm512_set1_epi32(-128))
    }
}

struct Int8<'a> {
    codes: *const u8,
    scales: &'a [f32],
    zero_points: &'a [u8],
    n_in: usize,
    /// The scale and zero point entry of each chunk.
    params: Int8ParamIndex,
}

impl<'a> Int8<'a> {
    fn new(t: &'a crate::format::affine::AffineTensor, n_in: usize) -> Int8<'a> {
        Int8 {
            codes: t.codes().as_ptr(),
            scales: t.scales(),
            zero_points: t.zero_points(),
            n_in,
            params: Int8ParamIndex::new(t.granularity(), n_in, 64),
        }
    }
}

impl Chunks for Int8<'_> {
    const SHARED_OFFSET: bool = false;
    #[inline(always)]
    unsafe fn chunk(&self, o: usize, c: usize) -> (__m512i, __m512, __m512i) {
        // SAFETY: the caller checked `codes` holds `out × in` bytes and `in % 64 == 0`.
        let w = _mm512_loadu_si512(self.codes.add(o * self.n_in + 64 * c) as *const _);
        _mm_prefetch::<_MM_HINT_T0>(self.codes.wrapping_add(o * self.n_in + 64 * c + GEMV_PREFETCH) as *const i8);
        let p = self.params.get(o, c);
        (w, _mm512_set1_ps(self.scales[p]), _mm512_set1_epi32(-(self.zero_points[p] as i32)))
    }
}

avx512vnni_fn! {
/// The int8-activation block: the VNNI base product where the layer is eligible (else the portable one), then
/// the f32 output pass.
unsafe fn block_vnni(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let act = job.act8.expect("int8 activations prepared");
    let n_in = job.layer.in_features;
    let interleaved = job.layer.act8_interleaved.filter(|_| act.sums.len() == job.m * (n_in / 32));
    if let Some(il) = interleaved {
        base_interleaved(act, il, job.m, o0, ob, out);
    } else if !vnni_eligible(job.layer.weight, n_in) || act.vq.len() != job.m * n_in {
        base_portable(job, o0, ob, out);
    } else {
        match job.layer.weight {
            QuantWeight::FourBit(t) => {
                assert!(t.packed().len() * 2 >= job.layer.out_features * n_in);
                let c: [i8; 16] = int8_table(t.table());
                let bytes: [u8; 16] = std::array::from_fn(|i| (c[i] as i16 + 128) as u8);
                // SAFETY: 16 readable bytes.
                let table = _mm512_broadcast_i32x4(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
                let w = FourBit {
                    packed: t.packed().as_ptr(),
                    scales: job.layer.block_scales(),
                    n_in,
                    shift: t.blocksize().trailing_zeros(),
                    table,
                };
                base(job, act, &w, o0, ob, out);
            }
            QuantWeight::Int8(t) => {
                assert!(t.codes().len() >= job.layer.out_features * n_in);
                let w = Int8::new(t, n_in);
                base(job, act, &w, o0, ob, out);
            }
        }
    }
    // SAFETY: AVX-512 F/BW/VL/DQ, AVX2 and FMA come with the caller's AVX-512 VNNI.
    unsafe { super::linear_x86::output_pass_avx512(job, o0, ob, out) };
}

/// `out[r, j] += Σ_c Σ_lanes scale · (exact lane sum)` for rows `o0..o0+ob` of `W`, `J` weight rows × up to
/// `R` rows of `x` at a time.
#[inline]
unsafe fn base<W: Chunks>(job: &Job<'_>, act: Act8View<'_>, w: &W, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    let nb = n_in / BLOCK;
    assert!(act.vq.len() == m * n_in && act.lanes.len() == m * n_in / 4 && act.d.len() == m * nb);
    add_tiles(&Tiles { act, w, n_in }, m, o0, ob, out);
}
}

/// The kernel's tiles over one layer (see [`add_tiles`]).
struct Tiles<'a, W> {
    act: Act8View<'a>,
    w: &'a W,
    n_in: usize,
}

impl<W: Chunks> Act8Tile<J, R> for Tiles<'_, W> {
    #[inline(always)]
    unsafe fn tile(&self, rows: [usize; J], r0: usize, rr: usize, acc: &mut [[f32; J]; R]) {
        let (act, w, n_in) = (self.act, self.w, self.n_in);
        match rr {
            1 => tile::<W, 1>(act, w, rows, r0, n_in, acc),
            2 => tile::<W, 2>(act, w, rows, r0, n_in, acc),
            3 => tile::<W, 3>(act, w, rows, r0, n_in, acc),
            _ => tile::<W, R>(act, w, rows, r0, n_in, acc),
        }
    }
}

/// `acc[i][j] = Σ over the row of x row `r0 + i` · weight row `rows[j]` (`RR` ≤ `R` rows of `x`).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // i and j index several arrays in step
unsafe fn tile<W: Chunks, const RR: usize>(
    act: Act8View<'_>,
    w: &W,
    rows: [usize; J],
    r0: usize,
    n_in: usize,
    acc: &mut [[f32; J]; R],
) {
    let nb = n_in / BLOCK;
    let mut v = [[_mm512_setzero_ps(); J]; RR];
    // Lanes 0–7 take the chunk's first d, lanes 8–15 its second.
    let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for c in 0..n_in / 64 {
        let mut wv = [_mm512_setzero_si512(); J];
        let mut sv = [_mm512_setzero_ps(); J];
        let mut zv = [_mm512_setzero_si512(); J];
        for j in 0..J {
            (wv[j], sv[j], zv[j]) = w.chunk(rows[j], c);
        }
        for i in 0..RR {
            let r = r0 + i;
            // SAFETY: r < m and c < in / 64; `base` asserted the lengths of `vq`, `lanes` and `d`.
            let xq = _mm512_loadu_si512(act.vq.as_ptr().add(r * n_in + 64 * c) as *const _);
            let lanes = _mm512_loadu_si512(act.lanes.as_ptr().add(r * n_in / 4 + 16 * c) as *const _);
            let pair = _mm_castpd_ps(_mm_load_sd(act.d.as_ptr().add(r * nb + 2 * c) as *const f64));
            let d = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(pair));
            let shared = _mm512_mullo_epi32(lanes, zv[0]);
            for j in 0..J {
                let start = if W::SHARED_OFFSET { shared } else { _mm512_mullo_epi32(lanes, zv[j]) };
                let sum = _mm512_dpbusd_epi32(start, wv[j], xq);
                v[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, sv[j]), v[i][j]);
            }
        }
    }
    for i in 0..RR {
        for j in 0..J {
            acc[i][j] = _mm512_reduce_add_ps(v[i][j]);
        }
    }
}
