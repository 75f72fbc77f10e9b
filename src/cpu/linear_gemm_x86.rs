//! AVX-512 GEMM for the f32 mode at larger M (prefill): the outer-product form. A strip of 32 output features
//! × `KP` inputs of `W` is decoded once (bit-identical to the reference dequantization) into a transposed
//! panel `P[k][32]`, L1-resident; the micro-kernel then holds `MR × 2` accumulators of 16 outputs each and, per
//! `k`, loads the panel's two vectors and broadcasts one `x` value per row into 2 FMAs. No horizontal sums, and
//! every loaded value feeds several FMAs (the tiled inner-product kernel of `linear_kernels.rs` sums along K and
//! reduces each accumulator once per chunk).
//!
//! `x` comes packed once per forward ([`pack_x_group`]): the rows in groups of `MR`, each group `[k][rows]`,
//! so the `MR` broadcasts of one `k` read one cache line and each group is one sequential stream. 4096×14336,
//! M = 64, one thread: 118 GFLOP/s reading the `MR` strided rows of `x` directly (a row longer than L2 holds),
//! 138 packed, 155 with `x` made L1-resident (a bound, not a result).
//!
//! The next panel's weight lines are prefetched while the current one is decoded (each of a strip's rows is a
//! stream of its own, more than the hardware prefetcher follows at a long row stride), and 4-bit and int8 rows
//! of whole sixteens decode straight into the panel, 16 rows at a time through a register transpose. NF4+DQ
//! 4096×14336, M = 64, one thread: 63.9–67.6 ms before both, 54.8–59.7 ms after (57–61% of the FMA peak).
//!
//! Order of the sums: each output adds its products in ascending `k` within a panel and the panels in
//! ascending `k`: fixed, independent of M's split and the thread count; a different order than the GEMV's,
//! inside the same stated bound (any order of a K-term f32 sum is).

use super::linear_kernels::{decode_tile, Decoder, Int8Runs};
use super::linear_x86::nibbles16;
use super::table::Job;
use crate::affine::Granularity;
use crate::format::affine::AffineTensor;
use crate::format::four_bit::FourBitTensor;
use crate::format::layer::QuantWeight;
use std::arch::x86_64::*;

/// Inputs per panel (32 outputs × 128 inputs × 4 bytes = 16 KiB: L1 beside the rows of `x`).
const KP: usize = 128;
/// Output features per panel (two 16-lane vectors).
const NP: usize = 32;
/// Rows of `x` per micro-kernel call (24 accumulators of the 32 registers).
pub(crate) const MR: usize = 12;

/// `out += x · W[o0..o0+ob]ᵀ` (`out` is `[m, ob]`) through transposed panels. Call inside an `avx512_fn!`.
#[inline(always)]
pub(crate) unsafe fn panel_gemm<D: Decoder>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let (n_in, m) = (job.layer.in_features, job.m);
    assert!(job.x_packed.len() == m * n_in && out.len() >= m * ob);
    let mut panel = [0f32; KP * NP];
    // The strip's rows decoded row-major (16 at a time), then transposed into the panel.
    let mut rows = [0f32; 16 * KP];
    for s0 in (0..ob).step_by(NP) {
        let ns = NP.min(ob - s0);
        for k0 in (0..n_in).step_by(KP) {
            let kc = KP.min(n_in - k0);
            // The next panel's weight lines, one stream per row (too many streams for the hardware prefetcher
            // at this stride: without this, the first load of each row's line waited on memory).
            if k0 + KP < n_in {
                prefetch_panel(job, o0 + s0, ns, k0 + KP);
            } else if s0 + NP < ob {
                prefetch_panel(job, o0 + s0 + NP, NP.min(ob - s0 - NP), 0);
            }
            for half in 0..NP / 16 {
                let first = o0 + s0 + half * 16;
                if kc.is_multiple_of(16) && half * 16 + 16 <= ns {
                    match job.layer.weight {
                        QuantWeight::FourBit(t) if n_in.is_multiple_of(16) => {
                            decode_transposed_4bit(
                                t,
                                job.layer.block_scales(),
                                n_in,
                                first,
                                (k0, kc),
                                &mut panel,
                                half * 16,
                            );
                            continue;
                        }
                        QuantWeight::Int8(t) if groups_of_sixteens(t.granularity()) => {
                            decode_transposed_int8(t, n_in, first, (k0, kc), &mut panel, half * 16);
                            continue;
                        }
                        _ => {}
                    }
                }
                for j in 0..16 {
                    let row = &mut rows[j * KP..(j + 1) * KP];
                    if half * 16 + j < ns {
                        decode_tile::<D>(job, o0 + s0 + half * 16 + j, 1, k0, kc, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                let full = kc / 16 * 16;
                for c in (0..full).step_by(16) {
                    // SAFETY: rows holds 16 rows of KP ≥ c + 16 floats; the panel holds KP·NP floats and
                    // rows c..c+16 of it, columns half·16..half·16+16, are inside.
                    transpose16(rows.as_ptr().add(c), KP, panel.as_mut_ptr().add(c * NP + half * 16), NP);
                }
                for k in full..kc {
                    for j in 0..16 {
                        panel[k * NP + half * 16 + j] = rows[j * KP + k];
                    }
                }
            }
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(MR);
                let args = Strip { x: job.x_packed, n_in, r0, k0, kc, out_row: ob, col: s0, ns };
                match rows {
                    12 => micro::<12>(&args, &panel, out),
                    11 => micro::<11>(&args, &panel, out),
                    10 => micro::<10>(&args, &panel, out),
                    9 => micro::<9>(&args, &panel, out),
                    8 => micro::<8>(&args, &panel, out),
                    7 => micro::<7>(&args, &panel, out),
                    6 => micro::<6>(&args, &panel, out),
                    5 => micro::<5>(&args, &panel, out),
                    4 => micro::<4>(&args, &panel, out),
                    3 => micro::<3>(&args, &panel, out),
                    2 => micro::<2>(&args, &panel, out),
                    _ => micro::<1>(&args, &panel, out),
                }
                r0 += rows;
            }
        }
    }
}

/// Decodes inputs `k0..k0 + kc` of the 16 rows `o0..o0 + 16` of a 4-bit weight straight into lanes
/// `lane0..lane0 + 16` of the panel (`panel[k·NP + lane0 + r]` = row `o0 + r`, input `k0 + k`): per 16 inputs,
/// 16 codes of each row decoded as the reference does (`table[q] · scale`, one rounding), a register transpose
/// and 16 stores. One bound check for the whole call instead of three per 16 codes, and no row buffer.
/// Needs `n_in`, `k0` and `kc` (≤ `KP`) to be multiples of 16, so a group of 16 codes is 8 whole bytes inside
/// one block (blocks are multiples of 16).
#[inline(always)]
unsafe fn decode_transposed_4bit(
    t: &FourBitTensor,
    scales: &[f32],
    n_in: usize,
    o0: usize,
    (k0, kc): (usize, usize),
    panel: &mut [f32; KP * NP],
    lane0: usize,
) {
    let (packed, shift) = (t.packed(), t.blocksize().trailing_zeros());
    let last = (o0 + 15) * n_in + k0 + kc;
    assert!(n_in.is_multiple_of(16) && k0.is_multiple_of(16) && kc.is_multiple_of(16) && kc <= KP);
    assert!(kc > 0 && lane0 + 16 <= NP);
    assert!(last / 2 <= packed.len() && (last - 1) >> shift < scales.len());
    let tab = _mm512_loadu_ps(t.table().as_ptr());
    let mut r = [_mm512_setzero_ps(); 16];
    for c in (0..kc).step_by(16) {
        for (j, v) in r.iter_mut().enumerate() {
            let f = (o0 + j) * n_in + k0 + c;
            // SAFETY: f + 16 ≤ last, so bytes f/2..f/2 + 8 are inside `packed` and f >> shift inside `scales`
            // (asserted above).
            let bytes = _mm_loadl_epi64(packed.as_ptr().add(f / 2) as *const __m128i);
            let w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles16(bytes)), tab);
            *v = _mm512_mul_ps(w, _mm512_set1_ps(*scales.get_unchecked(f >> shift)));
        }
        for (k, v) in transpose16_regs(&r).iter().enumerate() {
            // SAFETY: (c + k)·NP + lane0 + 16 ≤ kc·NP ≤ KP·NP.
            _mm512_storeu_ps(panel.as_mut_ptr().add((c + k) * NP + lane0), *v);
        }
    }
}

/// Whether every 16 inputs starting at a multiple of 16 share one scale and zero point.
fn groups_of_sixteens(g: Granularity) -> bool {
    match g {
        Granularity::PerTensor | Granularity::PerChannel => true,
        Granularity::PerGroup(g) => g.is_multiple_of(16),
    }
}

/// [`decode_transposed_4bit`] for an int8 weight whose groups are multiples of 16 (or per tensor / channel):
/// `(q − zero point) · scale` as the reference computes it (the exact integer difference, one rounding).
/// `k0` and `kc` (≤ `KP`) are multiples of 16.
#[inline(always)]
unsafe fn decode_transposed_int8(
    t: &AffineTensor,
    n_in: usize,
    o0: usize,
    (k0, kc): (usize, usize),
    panel: &mut [f32; KP * NP],
    lane0: usize,
) {
    let (codes, scales, zps) = (t.codes(), t.scales(), t.zero_points());
    let runs = Int8Runs::of(t.granularity(), n_in);
    let entry = |o: usize, k: usize| runs.entry(o, k / runs.run);
    assert!(k0.is_multiple_of(16) && kc.is_multiple_of(16) && kc > 0 && kc <= KP && lane0 + 16 <= NP);
    assert!(groups_of_sixteens(t.granularity()) && (o0 + 15) * n_in + k0 + kc <= codes.len());
    assert!(entry(o0 + 15, k0 + kc - 1) < scales.len() && scales.len() == zps.len());
    let mut r = [_mm512_setzero_ps(); 16];
    for c in (0..kc).step_by(16) {
        for (j, v) in r.iter_mut().enumerate() {
            let f = (o0 + j) * n_in + k0 + c;
            let e = entry(o0 + j, k0 + c);
            // SAFETY: f + 16 ≤ (o0 + 15)·n_in + k0 + kc ≤ codes.len(), and e ≤ the last entry (asserted above;
            // a group holds whole sixteens, so inputs k0 + c.. k0 + c + 16 share entry e).
            let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(f) as *const __m128i)));
            let zp = _mm512_set1_ps(*zps.get_unchecked(e) as f32);
            *v = _mm512_mul_ps(_mm512_sub_ps(q, zp), _mm512_set1_ps(*scales.get_unchecked(e)));
        }
        for (k, v) in transpose16_regs(&r).iter().enumerate() {
            // SAFETY: (c + k)·NP + lane0 + 16 ≤ kc·NP ≤ KP·NP.
            _mm512_storeu_ps(panel.as_mut_ptr().add((c + k) * NP + lane0), *v);
        }
    }
}

/// Asks for the cache lines that hold inputs `k0..k0 + KP` of rows `o0..o0 + rows` of the weight (codes and,
/// for 4-bit weights, the block scales): a hint, no loads.
#[inline(always)]
unsafe fn prefetch_panel(job: &Job<'_>, o0: usize, rows: usize, k0: usize) {
    let n_in = job.layer.in_features;
    for o in o0..o0 + rows {
        let flat = o * n_in + k0;
        match job.layer.weight {
            QuantWeight::Int8(t) => {
                // SAFETY: a prefetch does not access memory; the addresses are computed with wrapping arithmetic.
                let p = t.codes().as_ptr().wrapping_add(flat);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64) as *const i8);
            }
            QuantWeight::FourBit(t) => {
                let p = t.packed().as_ptr().wrapping_add(flat / 2);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                let s = job.layer.block_scales().as_ptr().wrapping_add(flat / t.blocksize());
                _mm_prefetch::<_MM_HINT_T0>(s as *const i8);
            }
        }
    }
}

/// Writes the transpose of the 16×16 block at `src` (rows `src_stride` apart) to `dst` (rows `dst_stride` apart):
/// `dst[c·dst_stride + r] = src[r·src_stride + c]`.
#[inline(always)]
unsafe fn transpose16(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    // Loops, not `array::from_fn`: a closure is compiled without this function's target features, so its
    // intrinsics would be out-of-line calls.
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(src.add(i * src_stride));
    }
    for (c, v) in transpose16_regs(&r).iter().enumerate() {
        _mm512_storeu_ps(dst.add(c * dst_stride), *v);
    }
}

/// The transpose of 16 rows of 16 lanes: lane `r` of result `c` is lane `c` of row `r`, with 64 shuffles
/// (unpack 32-bit, unpack 64-bit, two rounds of 128-bit block shuffles).
#[inline(always)]
unsafe fn transpose16_regs(r: &[__m512; 16]) -> [__m512; 16] {
    // t[2p], t[2p+1]: rows 2p and 2p+1 interleaved (per 128-bit block L: columns 4L, 4L+1 / 4L+2, 4L+3).
    let mut t = [_mm512_setzero_ps(); 16];
    for p in (0..16).step_by(2) {
        t[p] = _mm512_unpacklo_ps(r[p], r[p + 1]);
        t[p + 1] = _mm512_unpackhi_ps(r[p], r[p + 1]);
    }
    // u[4g + q]: per block L, column 4L + q of rows 4g..4g+3.
    let mut u = [_mm512_setzero_ps(); 16];
    for (i, v) in u.iter_mut().enumerate() {
        let (g, q) = (i / 4, i % 4);
        let (a, b) = (_mm512_castps_pd(t[4 * g + q / 2]), _mm512_castps_pd(t[4 * g + 2 + q / 2]));
        *v = _mm512_castpd_ps(if q % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) });
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        // [g0.L0, g0.L1, g1.L0, g1.L1] and [g0.L2, g0.L3, g1.L2, g1.L3], likewise for groups 2 and 3.
        let v01 = _mm512_shuffle_f32x4::<0x44>(u[q], u[4 + q]);
        let w01 = _mm512_shuffle_f32x4::<0xee>(u[q], u[4 + q]);
        let v23 = _mm512_shuffle_f32x4::<0x44>(u[8 + q], u[12 + q]);
        let w23 = _mm512_shuffle_f32x4::<0xee>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(v01, v23);
        out[4 + q] = _mm512_shuffle_f32x4::<0xdd>(v01, v23);
        out[8 + q] = _mm512_shuffle_f32x4::<0x88>(w01, w23);
        out[12 + q] = _mm512_shuffle_f32x4::<0xdd>(w01, w23);
    }
    out
}

/// Writes one group of rows of `x` (`[rows, n_in]`, rows ≤ `MR`) into `out` as [`panel_gemm`] reads it:
/// `[n_in][rows]` (the groups of `MR` rows lie at `first row · n_in`, see `table::PackX`): 16 columns at a
/// time through a register transpose and masked stores of `rows` lanes.
///
/// # Safety
/// AVX-512 F is available (call inside an `avx512_fn!`).
#[inline(always)]
pub(crate) unsafe fn pack_x_group(x: &[f32], n_in: usize, out: &mut [f32]) {
    let rows = x.len() / n_in.max(1);
    assert!(out.len() == x.len() && rows <= MR && x.len() == rows * n_in);
    let keep: __mmask16 = (1u16 << rows) - 1;
    let full = n_in / 16 * 16;
    let mut r = [_mm512_setzero_ps(); 16];
    for c in (0..full).step_by(16) {
        for (i, v) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row i < rows, columns c..c+16 ≤ n_in.
            *v = _mm512_loadu_ps(x.as_ptr().add(i * n_in + c));
        }
        for (k, v) in transpose16_regs(&r).iter().enumerate() {
            // SAFETY: `rows` lanes at (c + k)·rows, inside out (len rows·n_in, c + k < n_in).
            _mm512_mask_storeu_ps(out.as_mut_ptr().add((c + k) * rows), keep, *v);
        }
    }
    for k in full..n_in {
        for i in 0..rows {
            out[k * rows + i] = x[i * n_in + k];
        }
    }
}

/// Where a micro-kernel call reads and writes.
struct Strip<'a> {
    /// `x` packed by [`pack_x_group`].
    x: &'a [f32],
    n_in: usize,
    /// First row of `x`.
    r0: usize,
    /// First input of the panel and its length.
    k0: usize,
    kc: usize,
    /// Row length of `out` (the block's `ob`), first column of the strip and its width (≤ 32).
    out_row: usize,
    col: usize,
    ns: usize,
}

/// `out[r0 + i, col..col+ns] += Σ_k x[r0 + i, k0 + k] · P[k][..ns]` for `R` rows.
#[inline(always)]
unsafe fn micro<const R: usize>(s: &Strip<'_>, panel: &[f32; KP * NP], out: &mut [f32]) {
    // Lanes of the strip's two vectors that exist (the last strip of a block may be narrower).
    let m0: __mmask16 = if s.ns >= 16 { 0xffff } else { (1u16 << s.ns) - 1 };
    let m1: __mmask16 = if s.ns >= 32 {
        0xffff
    } else if s.ns > 16 {
        (1u16 << (s.ns - 16)) - 1
    } else {
        0
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY (every pointer below): rows r0..r0+R ≤ m are the packed group at r0·n_in (r0 is a multiple of MR,
    // R its rows), columns k0..k0+kc ≤ n_in of it (`x.len() == m·n_in`, asserted by the caller); `panel` holds
    // KP·NP floats and k < kc ≤ KP; `out` holds m·ob floats and col + ns ≤ ob with the masks limiting the
    // lanes to ns.
    let xp = s.x.as_ptr().add(s.r0 * s.n_in + s.k0 * R);
    for k in 0..s.kc {
        let w0 = _mm512_loadu_ps(panel.as_ptr().add(k * NP));
        let w1 = _mm512_loadu_ps(panel.as_ptr().add(k * NP + 16));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*xp.add(k * R + i));
            a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add((s.r0 + i) * s.out_row + s.col);
        _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), a[0]));
        if m1 != 0 {
            let o1 = o.add(16);
            _mm512_mask_storeu_ps(o1, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o1), a[1]));
        }
    }
}
