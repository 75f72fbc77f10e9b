//! x86 versions of the fused linear kernels: the generic bodies of `linear_kernels.rs` compiled inside
//! `#[target_feature]` functions (so LLVM vectorizes them to AVX2 / AVX-512 with FMA), and 4-bit decoders that
//! look the 16-entry table up in registers.

use super::linear_kernels::{
    dot as generic_dot, four_bit_segments, output_pass, row_slices, tiled_product, Decoder, Int8Runs, Vf,
};
use super::table::Job;
use super::table::{LinearKernels, PackX};
use super::x86_features::{avx2_fn, avx512_fn, Avx2, Avx512};
use crate::format::affine::Granularity;
use crate::format::layer::QuantWeight;
use std::arch::x86_64::*;

/// The AVX2 + FMA linear kernels (the token proves detection).
pub(crate) fn avx2(t: Avx2) -> LinearKernels {
    LinearKernels {
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        block: |job, o0, ob, out| unsafe { block_job_avx2(job, o0, ob, out) },
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // asserted inside the kernel.
        dots: |x, rows, out| unsafe { dots_avx2(x, rows, out) },
        // SAFETY: as `dots`. A 16-row call is two 8-lane groups: the half is one of them, the same bits.
        dots_half: |x, rows, out, _| unsafe { dots_avx2(x, rows, out) },
        act8_block: super::linear_act8::block_portable,
        pack_x: None,
        act8_quantize: super::linear_act8_quantize_x86::avx2(t),
        act8_interleaved: false,
        act8_layout: super::linear_act8::Act8Layout::Natural,
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); lengths are
        // asserted inside the kernel.
        backward_cols: |job, dy, k0, out| unsafe { backward_cols_avx2(job, dy, k0, out) },
    }
}

/// The AVX-512 linear kernels (the token proves detection).
pub(crate) fn avx512(t: Avx512) -> LinearKernels {
    LinearKernels {
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // checked by the drivers (and asserted inside the kernels).
        block: |job, o0, ob, out| unsafe { block_job_avx512(job, o0, ob, out) },
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // asserted inside the kernel.
        dots: |x, rows, out| unsafe { dots_avx512(x, rows, out) },
        // SAFETY: as `dots`.
        dots_half: |x, rows, out, half| unsafe { dots_half_avx512(x, rows, out, half) },
        act8_block: super::linear_act8::block_portable,
        pack_x: Some(PackX {
            min_m: PANEL_MIN_M,
            group_rows: super::linear_gemm_x86::MR,
            // SAFETY: built only from an `Avx512` token (its features were detected).
            pack_group: |x, n_in, out| unsafe { pack_x_group_avx512(x, n_in, out) },
        }),
        act8_quantize: super::linear_act8_quantize_x86::avx512(t),
        act8_interleaved: false,
        act8_layout: super::linear_act8::Act8Layout::Natural,
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); lengths are
        // asserted inside the kernel.
        backward_cols: |job, dy, k0, out| unsafe { backward_cols_avx512(job, dy, k0, out) },
    }
}

/// How far ahead (bytes) the register GEMVs prefetch each weight row. 4096×14336 NF4+DQ, M = 1, warm-ish (one
/// layer repeated), 1 / 2 threads, int8-activation kernel: 3.56 / 1.58 ms without, 2.24 / 1.00 ms at 256 B,
/// 1.50–1.87 / 0.85–1.03 ms at 2048 B.
pub(crate) const GEMV_PREFETCH: usize = 2048;

/// From this many rows of `x` on, the AVX-512 f32 GEMM runs through transposed panels
/// (`linear_gemm_x86.rs`). Measured at 4096×4096 NF4, one thread: M = 5 and 8 took 3.9 / 8.0 ms through the
/// tiled inner-product kernel and 2.9 / 3.3 ms through panels; M ≤ 4 has the register GEMVs.
const PANEL_MIN_M: usize = 5;

avx512_fn! {
unsafe fn pack_x_group_avx512(x: &[f32], n_in: usize, out: &mut [f32]) {
    super::linear_gemm_x86::pack_x_group(x, n_in, out)
}
}

avx512_fn! {
unsafe fn block_job_avx512(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    if !gemv_4bit_avx512(job, o0, ob, out)
        && !gemv_int8_avx512(job, o0, ob, out)
        && !fused_gemv::<V512, Avx512Decoder>(job, o0, ob, out)
    {
        if job.m >= PANEL_MIN_M && job.x_packed.len() == job.m * job.layer.in_features {
            super::linear_gemm_x86::panel_gemm::<Avx512Decoder>(job, o0, ob, out);
        } else {
            tiled_product::<V512, Avx512Decoder>(job, o0, ob, out);
        }
    }
    output_pass::<V512>(job, o0, ob, out);
}
}

avx2_fn! {
unsafe fn block_job_avx2(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    if !gemv_int8_avx2(job, o0, ob, out) && !fused_gemv::<V256, Avx2Decoder>(job, o0, ob, out) {
        tiled_product::<V256, Avx2Decoder>(job, o0, ob, out);
    }
    output_pass::<V256>(job, o0, ob, out);
}
}

/// GEMV for 4-bit weights whose rows hold whole blocks (`in % blocksize == 0`) and M ≤ 4: each group of 16
/// codes is decoded in registers and multiplied straight into `M` accumulators (no scratch tile); the block's
/// partial sum `Σ table[q]·x` is scaled by its absmax once per block. Returns `false` (doing nothing) when
/// the layer does not qualify. Error: the block scale applied after the sum changes rounding by at most one
/// extra ulp of `|w|` per product, inside the bound the tests state.
#[inline(always)]
fn fused_gemv<V: Vf, D: Table16<V>>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    let t = match job.layer.weight {
        QuantWeight::FourBit(t) => t,
        QuantWeight::Int8(_) => {
            return match job.m {
                1 => int8_gemv_rows::<V, D, 1>(job, o0, ob, out),
                2 => int8_gemv_rows::<V, D, 2>(job, o0, ob, out),
                3 => int8_gemv_rows::<V, D, 3>(job, o0, ob, out),
                4 => int8_gemv_rows::<V, D, 4>(job, o0, ob, out),
                _ => false,
            }
        }
    };
    let (n_in, m, bs) = (job.layer.in_features, job.m, t.blocksize());
    if m == 0 || m > 4 || n_in % bs != 0 {
        return false;
    }
    match m {
        1 => gemv_rows::<V, D, 1, 4>(job, t.packed(), bs, o0, ob, out),
        2 => gemv_rows::<V, D, 2, 4>(job, t.packed(), bs, o0, ob, out),
        3 => gemv_rows::<V, D, 3, 2>(job, t.packed(), bs, o0, ob, out),
        _ => gemv_rows::<V, D, 4, 2>(job, t.packed(), bs, o0, ob, out),
    }
    true
}

/// `J` weight rows at a time share every load of `x` (at long rows `x` lives in L2, not L1, and would
/// otherwise be re-read once per output); rows left over are done one at a time.
#[inline(always)]
fn gemv_rows<V: Vf, D: Table16<V>, const R: usize, const J: usize>(
    job: &Job<'_>,
    packed: &[u8],
    bs: usize,
    o0: usize,
    ob: usize,
    out: &mut [f32],
) {
    let mut j = 0;
    while j + J <= ob {
        gemv_row_group::<V, D, R, J>(job, packed, bs, o0, j, ob, out);
        j += J;
    }
    while j < ob {
        gemv_row_group::<V, D, R, 1>(job, packed, bs, o0, j, ob, out);
        j += 1;
    }
}

/// Rows `o0 + j0 .. o0 + j0 + J` of the 4-bit GEMV for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_row_group<V: Vf, D: Table16<V>, const R: usize, const J: usize>(
    job: &Job<'_>,
    packed: &[u8],
    bs: usize,
    o0: usize,
    j0: usize,
    ob: usize,
    out: &mut [f32],
) {
    let n_in = job.layer.in_features;
    let QuantWeight::FourBit(t) = job.layer.weight else { return };
    let tab = D::load_table(t.table());
    let scales = job.layer.block_scales();
    let rows: [&[u8]; J] = row_slices(packed, n_in / 2, o0 + j0);
    // Each row's scales as a slice, indexed by block: no division per block (rows hold whole blocks).
    let row_scales: [&[f32]; J] = row_slices(scales, n_in / bs, o0 + j0);
    let mut total = [[V::zero(); J]; R];
    for b in 0..n_in / bs {
        let mut acc = [[V::zero(); J]; R];
        for g in 0..bs / 16 {
            let k = b * bs + g * 16;
            let mut w = [[V::zero(); 2]; J];
            for i in 0..J {
                w[i] = D::decode(rows[i][k / 2..k / 2 + 8].try_into().expect("8 bytes"), &tab);
            }
            for r in 0..R {
                for h in 0..16 / V::LANES {
                    let xv = V::load(&job.x[r * n_in + k + h * V::LANES..]);
                    for i in 0..J {
                        acc[r][i] = V::fmadd(xv, w[i][h], acc[r][i]);
                    }
                }
            }
        }
        for i in 0..J {
            let s = V::splat(row_scales[i][b]);
            for r in 0..R {
                total[r][i] = V::fmadd(acc[r][i], s, total[r][i]);
            }
        }
    }
    for r in 0..R {
        for i in 0..J {
            out[r * ob + j0 + i] += total[r][i].hsum();
        }
    }
}

/// AVX-512 GEMV for 4-bit weights, M ≤ 4, rows of whole blocks: like [`fused_gemv`] but each group of 16
/// codes costs one shuffle instead of three. The 8 packed bytes are broadcast to every 64-bit lane (a load,
/// no shuffle), each 32-bit lane shifts its own nibble down (`vpsrlvd`), and `vpermps` looks the table up
/// with the low 4 bits of each lane (it ignores the rest), so no mask, unpack or byte widening is needed.
/// The lanes then hold the codes in the order 0, 8, 1, 9, …, 7, 15 (lane 2q: code q of the low 32 bits, lane
/// 2q + 1: code 8 + q of the high 32 bits); `x` is permuted to the same order once per 16 inputs and shared
/// by the 4 weight rows of a step. Only the summation order differs from [`fused_gemv`] (same bound).
/// Returns `false` (doing nothing) when the layer does not qualify.
#[inline(always)]
fn gemv_4bit_avx512(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    let QuantWeight::FourBit(t) = job.layer.weight else { return false };
    let (n_in, m, bs) = (job.layer.in_features, job.m, t.blocksize());
    if m == 0 || m > 4 || !bs.is_multiple_of(16) || !n_in.is_multiple_of(bs) {
        return false;
    }
    let mut j = 0;
    while j + 4 <= ob {
        gemv_4bit_avx512_group::<4>(job, o0, j, ob, out);
        j += 4;
    }
    while j < ob {
        gemv_4bit_avx512_group::<1>(job, o0, j, ob, out);
        j += 1;
    }
    true
}

/// [`gemv_4bit_avx512_rows`] for `J` weight rows, with `R` = the number of `x` rows (1–4) as a constant.
#[inline(always)]
fn gemv_4bit_avx512_group<const J: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    match job.m {
        1 => gemv_4bit_avx512_rows::<1, J>(job, o0, j0, ob, out),
        2 => gemv_4bit_avx512_rows::<2, J>(job, o0, j0, ob, out),
        3 => gemv_4bit_avx512_rows::<3, J>(job, o0, j0, ob, out),
        _ => gemv_4bit_avx512_rows::<4, J>(job, o0, j0, ob, out),
    }
}

/// Rows `o0 + j0 .. o0 + j0 + J` of [`gemv_4bit_avx512`] for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_4bit_avx512_rows<const R: usize, const J: usize>(
    job: &Job<'_>,
    o0: usize,
    j0: usize,
    ob: usize,
    out: &mut [f32],
) {
    let n_in = job.layer.in_features;
    let QuantWeight::FourBit(t) = job.layer.weight else { return };
    let bs = t.blocksize();
    let scales = job.layer.block_scales();
    let packed = t.packed();
    let rows: [&[u8]; J] = row_slices(packed, n_in / 2, o0 + j0);
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    // Lane L = 2q + h holds code 8h + q: bit 8·(q / 2) + 4·(q even) of its 32-bit half (first code in the
    // high nibble).
    let shifts: [u32; 16] = std::array::from_fn(|l| {
        let q = (l / 2) as u32;
        8 * (q / 2) + if q.is_multiple_of(2) { 4 } else { 0 }
    });
    let order: [u32; 16] = std::array::from_fn(|l| ((l % 2) * 8 + l / 2) as u32);
    let row_scales: [&[f32]; J] = row_slices(scales, n_in / bs, o0 + j0);
    // SAFETY: AVX-512F is enabled in the only caller (`block_job_avx512`, built from a detection token).
    // Every load reads a slice that was bounds-checked just before: 16 floats of `xs[r][k..k + 16]`, 8 bytes
    // of `rows[i][k / 2..k / 2 + 8]`, 16 lanes of the local arrays and of `t.table()`.
    unsafe {
        let tab = _mm512_loadu_ps(t.table().as_ptr());
        let shift = _mm512_loadu_si512(shifts.as_ptr() as *const _);
        let perm = _mm512_loadu_si512(order.as_ptr() as *const _);
        let mut total = [[_mm512_setzero_ps(); J]; R];
        for b in 0..n_in / bs {
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            for g in 0..bs / 16 {
                let k = b * bs + g * 16;
                let mut xv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    let x16 = &xs[r][k..k + 16];
                    xv[r] = _mm512_permutexvar_ps(perm, _mm512_loadu_ps(x16.as_ptr()));
                }
                if (k / 2).is_multiple_of(64) {
                    for row in &rows {
                        // A hint (never faults): J row streams restart every row group, so the hardware
                        // prefetcher alone leaves the GEMV latency-bound.
                        _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(k / 2 + GEMV_PREFETCH) as *const i8);
                    }
                }
                for i in 0..J {
                    let bytes: [u8; 8] = rows[i][k / 2..k / 2 + 8].try_into().expect("8 bytes");
                    let idx = _mm512_srlv_epi32(_mm512_set1_epi64(i64::from_le_bytes(bytes)), shift);
                    let w = _mm512_permutexvar_ps(idx, tab);
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(xv[r], w, acc[r][i]);
                    }
                }
            }
            for i in 0..J {
                let s = _mm512_set1_ps(row_scales[i][b]);
                for r in 0..R {
                    total[r][i] = _mm512_fmadd_ps(acc[r][i], s, total[r][i]);
                }
            }
        }
        for r in 0..R {
            for i in 0..J {
                out[r * ob + j0 + i] += _mm512_reduce_add_ps(total[r][i]);
            }
        }
    }
}

/// AVX-512 int8 GEMV for M ≤ 4 whose runs of one scale (the row, or a group) are whole multiples of 16 inputs:
/// 4 weight rows share every load of `x` (a long `x` lives in L2 and would otherwise be re-read per row), and
/// `q − zp` is formed in integers before the one conversion to f32 (exact). Per row the arithmetic is
/// [`int8_gemv_rows`]'s: one 16-lane accumulator per run, reduced and scaled once. Returns `false` (doing
/// nothing) when the layer does not qualify.
#[inline(always)]
fn gemv_int8_avx512(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    if !Int8Runs::whole_sixteens(job) {
        return false;
    }
    let mut j = 0;
    while j + 4 <= ob {
        gemv_int8_avx512_group::<4>(job, o0, j, ob, out);
        j += 4;
    }
    while j < ob {
        gemv_int8_avx512_group::<1>(job, o0, j, ob, out);
        j += 1;
    }
    true
}

/// [`gemv_int8_avx512_rows`] for `J` weight rows, with `R` = the number of `x` rows (1–4) as a constant.
#[inline(always)]
fn gemv_int8_avx512_group<const J: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    match job.m {
        1 => gemv_int8_avx512_rows::<1, J>(job, o0, j0, ob, out),
        2 => gemv_int8_avx512_rows::<2, J>(job, o0, j0, ob, out),
        3 => gemv_int8_avx512_rows::<3, J>(job, o0, j0, ob, out),
        _ => gemv_int8_avx512_rows::<4, J>(job, o0, j0, ob, out),
    }
}

/// Rows `o0 + j0 .. o0 + j0 + J` of [`gemv_int8_avx512`] for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_int8_avx512_rows<const R: usize, const J: usize>(
    job: &Job<'_>,
    o0: usize,
    j0: usize,
    ob: usize,
    out: &mut [f32],
) {
    let n_in = job.layer.in_features;
    let QuantWeight::Int8(t) = job.layer.weight else { return };
    let runs = Int8Runs::of(t.granularity(), n_in);
    let (run, entry) = (runs.run, |o, gi| runs.entry(o, gi));
    let codes = t.codes();
    let rows: [&[u8]; J] = row_slices(codes, n_in, o0 + j0);
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    let mut total = [[0.0f32; J]; R];
    // SAFETY: AVX-512F is enabled in the only caller (`block_job_avx512`, built from a detection token).
    // Every load reads a slice bounds-checked just before: 16 floats of `xs[r][k..k + 16]` and 16 bytes of
    // `rows[i][k..k + 16]`.
    unsafe {
        for gi in 0..n_in / run {
            // A loop, not `array::from_fn`: a closure would not inline the intrinsic (no target features).
            let mut params = [(0.0f32, _mm512_setzero_si512()); J];
            for (i, p) in params.iter_mut().enumerate() {
                let e = entry(o0 + j0 + i, gi);
                *p = (t.scales()[e], _mm512_set1_epi32(i32::from(t.zero_points()[e])));
            }
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            for c in 0..run / 16 {
                let k = gi * run + c * 16;
                let mut xv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    xv[r] = _mm512_loadu_ps(xs[r][k..k + 16].as_ptr());
                }
                if k.is_multiple_of(64) {
                    for row in &rows {
                        // A hint (never faults), as in the 4-bit GEMV.
                        _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(k + GEMV_PREFETCH) as *const i8);
                    }
                }
                for i in 0..J {
                    let b = _mm_loadu_si128(rows[i][k..k + 16].as_ptr() as *const __m128i);
                    let d = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), params[i].1));
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(xv[r], d, acc[r][i]);
                    }
                }
            }
            for i in 0..J {
                for r in 0..R {
                    total[r][i] += _mm512_reduce_add_ps(acc[r][i]) * params[i].0;
                }
            }
        }
    }
    for r in 0..R {
        for i in 0..J {
            out[r * ob + j0 + i] += total[r][i];
        }
    }
}

/// The AVX2 twin of [`gemv_int8_avx512`]: 4 weight rows share each `x` load for one or two rows of `x` (2 for
/// three or four, to stay within 16 registers), `q − zp` in integers, and per row the accumulation of
/// [`int8_gemv_rows`] on 8 lanes (two halves of 16 codes into one accumulator, the same reduction).
#[inline(always)]
fn gemv_int8_avx2(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    if !Int8Runs::whole_sixteens(job) {
        return false;
    }
    match job.m {
        1 => gemv_int8_avx2_all::<1, 4>(job, o0, ob, out),
        2 => gemv_int8_avx2_all::<2, 4>(job, o0, ob, out),
        3 => gemv_int8_avx2_all::<3, 2>(job, o0, ob, out),
        _ => gemv_int8_avx2_all::<4, 2>(job, o0, ob, out),
    }
    true
}

/// Every row of the block: groups of `J` weight rows, then the rest one at a time.
#[inline(always)]
fn gemv_int8_avx2_all<const R: usize, const J: usize>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    let mut j = 0;
    while j + J <= ob {
        gemv_int8_avx2_rows::<R, J>(job, o0, j, ob, out);
        j += J;
    }
    while j < ob {
        gemv_int8_avx2_rows::<R, 1>(job, o0, j, ob, out);
        j += 1;
    }
}

/// Rows `o0 + j0 .. o0 + j0 + J` of [`gemv_int8_avx2`] for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_int8_avx2_rows<const R: usize, const J: usize>(
    job: &Job<'_>,
    o0: usize,
    j0: usize,
    ob: usize,
    out: &mut [f32],
) {
    let n_in = job.layer.in_features;
    let QuantWeight::Int8(t) = job.layer.weight else { return };
    let runs = Int8Runs::of(t.granularity(), n_in);
    let (run, entry) = (runs.run, |o, gi| runs.entry(o, gi));
    let codes = t.codes();
    let rows: [&[u8]; J] = row_slices(codes, n_in, o0 + j0);
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    let mut total = [[0.0f32; J]; R];
    // SAFETY: AVX2 and FMA are enabled in the only caller (`block_job_avx2`, built from a detection token).
    // Every load reads a slice bounds-checked just before: 8 floats of `xs[r][k + 8h..k + 8h + 8]` and 8 bytes
    // of `rows[i][k + 8h..k + 8h + 8]`.
    unsafe {
        for gi in 0..n_in / run {
            // A loop, not `array::from_fn`: a closure would not inline the intrinsic (no target features).
            let mut params = [(0.0f32, _mm256_setzero_si256()); J];
            for (i, p) in params.iter_mut().enumerate() {
                let e = entry(o0 + j0 + i, gi);
                *p = (t.scales()[e], _mm256_set1_epi32(i32::from(t.zero_points()[e])));
            }
            let mut acc = [[_mm256_setzero_ps(); J]; R];
            for c in 0..run / 16 {
                let k = gi * run + c * 16;
                for h in 0..2 {
                    let kh = k + 8 * h;
                    let mut xv = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        xv[r] = _mm256_loadu_ps(xs[r][kh..kh + 8].as_ptr());
                    }
                    for i in 0..J {
                        let b = _mm_loadl_epi64(rows[i][kh..kh + 8].as_ptr() as *const __m128i);
                        let d = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), params[i].1));
                        for r in 0..R {
                            acc[r][i] = _mm256_fmadd_ps(xv[r], d, acc[r][i]);
                        }
                    }
                }
            }
            for i in 0..J {
                for r in 0..R {
                    total[r][i] += V256(acc[r][i]).hsum() * params[i].0;
                }
            }
        }
    }
    for r in 0..R {
        for i in 0..J {
            out[r * ob + j0 + i] += total[r][i];
        }
    }
}

/// int8 GEMV for M ≤ 4: codes are widened in registers and `Σ (q − zp)·x` is accumulated per run of one
/// scale (the row, or a group whose size is a multiple of 16), then scaled once. `(q − zp)` is exact, so the
/// only difference to the reference is where the scale's rounding happens (inside the stated bound).
/// Returns `false` for groups that are not multiples of 16 (the tiled path handles them).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn int8_gemv_rows<V: Vf, D: Table16<V>, const R: usize>(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    let QuantWeight::Int8(t) = job.layer.weight else { return false };
    let n_in = job.layer.in_features;
    if matches!(t.granularity(), Granularity::PerGroup(g) if g % 16 != 0) {
        return false;
    }
    let runs = Int8Runs::of(t.granularity(), n_in);
    let run = runs.run;
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    for j in 0..ob {
        let o = o0 + j;
        let codes = &t.codes()[o * n_in..(o + 1) * n_in];
        let mut total = [0.0f32; R];
        for (gi, seg) in codes.chunks(run).enumerate() {
            let entry = runs.entry(o, gi);
            let (scale, zp) = (t.scales()[entry], t.zero_points()[entry] as f32);
            let zpv = V::splat(zp);
            let k0 = gi * run;
            let mut acc = [V::zero(); R];
            let full = seg.len() / 16 * 16;
            for (c, bytes) in seg[..full].chunks_exact(16).enumerate() {
                let w = D::widen16(bytes.try_into().expect("16 bytes"));
                let k = k0 + c * 16;
                for r in 0..R {
                    for (h, wh) in w.iter().enumerate().take(16 / V::LANES) {
                        let d = V::fmadd(V::splat(-1.0), zpv, *wh); // q - zp, exact
                        acc[r] = V::fmadd(V::load(&xs[r][k + h * V::LANES..]), d, acc[r]);
                    }
                }
            }
            for r in 0..R {
                let mut tail = 0.0f32;
                for (kk, &q) in seg[full..].iter().enumerate() {
                    tail += (q as f32 - zp) * xs[r][k0 + full + kk];
                }
                total[r] += (acc[r].hsum() + tail) * scale;
            }
        }
        for r in 0..R {
            out[r * ob + j] += total[r];
        }
    }
    true
}

/// A 16-entry table held in registers, and the decode of 16 codes with it.
pub(crate) trait Table16<V: Vf> {
    /// The table, loaded into registers.
    type Tab;
    /// Loads the table.
    fn load_table(table: &[f32; 16]) -> Self::Tab;
    /// `table[code]` for the 16 codes of 8 packed bytes (first code in the high nibble), as 16 / LANES vectors
    /// (two vectors of 8 for AVX2; for AVX-512 the second vector is unused and zero).
    fn decode(bytes: &[u8; 8], tab: &Self::Tab) -> [V; 2];
    /// The 16 bytes widened to f32 (exact), as 16 / LANES vectors (unused second vector is zero).
    fn widen16(bytes: &[u8; 16]) -> [V; 2];
}

avx512_fn! {
unsafe fn backward_cols_avx512(job: &Job<'_>, dy: &[f32], k0: usize, out: &mut [f32]) {
    super::linear_backward_kernels::backward_cols::<V512, Avx512Decoder>(job, dy, k0, out)
}
}

avx2_fn! {
unsafe fn backward_cols_avx2(job: &Job<'_>, dy: &[f32], k0: usize, out: &mut [f32]) {
    super::linear_backward_kernels::backward_cols::<V256, Avx2Decoder>(job, dy, k0, out)
}
}

avx2_fn! {
unsafe fn dots_avx2(x: &[f32], rows: &[f32], out: &mut [f32]) {
    grouped_dots::<V256>(x, rows, out)
}
}

avx512_fn! {
/// The output pass (bias, then the LoRA expand 16 outputs at a time) with AVX-512 vectors, for the
/// int8-activation blocks.
/// # Safety
/// AVX-512 F/BW/VL/DQ, AVX2 and FMA are available.
pub(crate) unsafe fn output_pass_avx512(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    output_pass::<V512>(job, o0, ob, out)
}
}

avx2_fn! {
/// The output pass (bias, then the LoRA expand 8 outputs at a time) with AVX2 vectors, for the int8-activation
/// blocks.
/// # Safety
/// AVX2 and FMA are available.
pub(crate) unsafe fn output_pass_avx2(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    output_pass::<V256>(job, o0, ob, out)
}
}

avx512_fn! {
unsafe fn dots_avx512(x: &[f32], rows: &[f32], out: &mut [f32]) {
    grouped_dots::<V512>(x, rows, out)
}
}

avx512_fn! {
/// Rows `8·half .. 8·half + 8` of a 16-row [`dots_avx512`] call, given those 8 rows: the same 16 FMA chains
/// with the other half's chains left at zero, and the same shuffle tree, which never adds two rows' partial sums
/// together, so each row's lane gets the bits of the whole call (tested against it).
unsafe fn dots_half_avx512(x: &[f32], rows: &[f32], out: &mut [f32], half: usize) {
    let n = x.len();
    assert!(out.len() == 8 && half < 2 && rows.len() >= 8 * n);
    let full_cols = n / 16 * 16;
    let mut q = [_mm512_setzero_ps(); 8];
    for c in (0..full_cols).step_by(16) {
        // SAFETY: c + 16 ≤ full_cols ≤ n: inside `x` and inside each of the 8 rows of n floats (asserted).
        unsafe {
            let xv = _mm512_loadu_ps(x.as_ptr().add(c));
            for (j, qj) in q.iter_mut().enumerate() {
                *qj = _mm512_fmadd_ps(xv, _mm512_loadu_ps(rows.as_ptr().add(j * n + c)), *qj);
            }
        }
    }
    let mut p = [_mm512_setzero_ps(); 16];
    p[8 * half..8 * half + 8].copy_from_slice(&q);
    let mut sums = [0f32; 16];
    // SAFETY: AVX-512F is enabled (this function's features).
    V512(unsafe { sum16(&p) }).store(&mut sums);
    for (j, o) in out.iter_mut().enumerate() {
        let row = &rows[j * n..(j + 1) * n];
        *o = sums[8 * half + j] + x[full_cols..].iter().zip(&row[full_cols..]).map(|(a, b)| a * b).sum::<f32>();
    }
}
}

/// A vector type that computes `LANES` dot products at once, one FMA chain each (a single chain per dot product
/// is latency-bound), reduced in one shuffle tree: lane `j` is the dot product with row `j`.
trait DotLanes: Vf {
    /// `Σ_{c < cols} x[c]·rows[j·stride + c]` in lane `j` (`j < LANES`).
    ///
    /// # Safety
    /// The type's instruction set is enabled; `cols` is a multiple of `LANES`; `x` holds `cols` floats and
    /// `rows` `LANES` rows of `cols` floats, `stride` apart.
    unsafe fn dot_lanes(x: *const f32, rows: *const f32, stride: usize, cols: usize) -> Self;
}

/// `out[k] = dot(x, rows[k·n..(k + 1)·n])`, `n = x.len()` (the LoRA shrink): `LANES` rows at a time through
/// [`DotLanes::dot_lanes`] plus a scalar column tail; rows after the last whole group one [`generic_dot`] each.
/// Inlined into each instruction set's `#[target_feature]` wrapper.
#[inline(always)]
fn grouped_dots<V: DotLanes>(x: &[f32], rows: &[f32], out: &mut [f32]) {
    let (n, g) = (x.len(), V::LANES);
    assert!(rows.len() >= out.len() * n);
    let (full_rows, full_cols) = (out.len() / g * g, n / g * g);
    let mut sums = [0f32; 16];
    for k0 in (0..full_rows).step_by(g) {
        // SAFETY: the caller enabled V's instruction set; full_cols ≤ n is a multiple of LANES, and rows
        // k0..k0 + LANES ≤ out.len() of `rows` hold n floats each (asserted).
        unsafe { V::dot_lanes(x.as_ptr(), rows.as_ptr().add(k0 * n), n, full_cols) }.store(&mut sums);
        for (j, o) in out[k0..k0 + g].iter_mut().enumerate() {
            let row = &rows[(k0 + j) * n..(k0 + j + 1) * n];
            *o = sums[j] + x[full_cols..].iter().zip(&row[full_cols..]).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    for (k, o) in out.iter_mut().enumerate().skip(full_rows) {
        *o = generic_dot::<V>(x, &rows[k * n..(k + 1) * n]);
    }
}

/// The LoRA expand `y[j] += s · Σ_k t[k]·b[j·rank + k]` ([`Vf::expand`]): `LANES` outputs per
/// [`DotLanes::dot_lanes`] when the rank is a multiple of `LANES`, one [`generic_dot`] per output otherwise
/// and for the tail.
#[inline(always)]
fn grouped_expand<V: DotLanes>(t: &[f32], b: &[f32], s: f32, y: &mut [f32]) {
    let (rank, g) = (t.len(), V::LANES);
    let full = if rank > 0 && rank.is_multiple_of(g) { y.len() / g * g } else { 0 };
    assert!(b.len() >= y.len() * rank);
    let (sv, one) = (V::splat(s), V::splat(1.0));
    for j0 in (0..full).step_by(g) {
        // SAFETY: the caller enabled V's instruction set; `t` holds rank floats (a multiple of LANES) and rows
        // j0..j0 + LANES ≤ y.len() of `b` hold rank floats each (asserted).
        let sums = unsafe { V::dot_lanes(t.as_ptr(), b.as_ptr().add(j0 * rank), rank, rank) };
        // y + s·sums, rounded once after the product as a plain add would (the fma's `1 · y` is exact).
        V::fmadd(one, V::load(&y[j0..]), V::mul(sv, sums)).store(&mut y[j0..]);
    }
    for j in full..y.len() {
        y[j] += s * generic_dot::<V>(t, &b[j * rank..(j + 1) * rank]);
    }
}

/// 16 f32 lanes in an AVX-512 register. Only used inside `block_job_avx512` / `dots_avx512`, which enable
/// AVX-512 after a run-time check, so the intrinsics below always run on a CPU that has them.
#[derive(Clone, Copy)]
struct V512(__m512);

/// Lane `j` of the result is the sum of the 16 lanes of `p[j]` (30 shuffles and 15 adds for 16 sums, where one
/// horizontal sum each takes 4 shuffles and 4 adds in series).
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn sum16(p: &[__m512; 16]) -> __m512 {
    // Pairs (2i, 2i+1): per 128-bit block, [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
    let mut q = [_mm512_setzero_ps(); 8];
    for (i, qi) in q.iter_mut().enumerate() {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        *qi = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Quads: per 128-bit block, the 4 outputs' block sums.
    let mut r = [_mm512_setzero_ps(); 4];
    for (i, ri) in r.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(q[2 * i]), _mm512_castps_pd(q[2 * i + 1]));
        *ri = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Across the 4 blocks: [r0 (L0+L2), r0 (L1+L3), r1 (L0+L2), r1 (L1+L3)], then the pairs of those.
    let u = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(r[0], r[1]), _mm512_shuffle_f32x4::<0xee>(r[0], r[1]));
    let w = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(r[2], r[3]), _mm512_shuffle_f32x4::<0xee>(r[2], r[3]));
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u, w), _mm512_shuffle_f32x4::<0xdd>(u, w))
}

impl DotLanes for V512 {
    #[inline(always)]
    unsafe fn dot_lanes(x: *const f32, rows: *const f32, stride: usize, cols: usize) -> Self {
        // SAFETY: AVX-512F is enabled and the reads are in bounds (the caller's contract).
        unsafe {
            let mut p = [_mm512_setzero_ps(); 16];
            for c in (0..cols).step_by(16) {
                let xv = _mm512_loadu_ps(x.add(c));
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = _mm512_fmadd_ps(xv, _mm512_loadu_ps(rows.add(j * stride + c)), *pj);
                }
            }
            V512(sum16(&p))
        }
    }
}

impl Vf for V512 {
    const LANES: usize = 16;
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        // SAFETY: AVX-512F is enabled in every caller (see the type's docs).
        V512(unsafe { _mm512_mul_ps(a.0, b.0) })
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        assert!(dst.len() >= 16);
        // SAFETY: 16 floats in bounds (asserted); unaligned store; AVX-512F enabled in every caller.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: AVX-512F is enabled in every caller (see the type's docs).
        V512(unsafe { _mm512_set1_ps(v) })
    }
    #[inline(always)]
    fn zero() -> Self {
        // SAFETY: AVX-512F is enabled in every caller (see the type's docs).
        V512(unsafe { _mm512_setzero_ps() })
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        assert!(s.len() >= 16);
        // SAFETY: 16 floats are in bounds (asserted); unaligned load; AVX-512F enabled in every caller.
        V512(unsafe { _mm512_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512F enabled in every caller.
        V512(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        // SAFETY: AVX-512F enabled in every caller.
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    fn expand(t: &[f32], b: &[f32], s: f32, y: &mut [f32]) {
        grouped_expand::<Self>(t, b, s, y)
    }
}

/// 8 f32 lanes in an AVX register with FMA; only used inside the AVX2 wrappers (run-time checked).
#[derive(Clone, Copy)]
struct V256(__m256);

impl Vf for V256 {
    const LANES: usize = 8;
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        // SAFETY: AVX enabled in every caller.
        V256(unsafe { _mm256_mul_ps(a.0, b.0) })
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        assert!(dst.len() >= 8);
        // SAFETY: 8 floats in bounds (asserted); unaligned store; AVX enabled in every caller.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: AVX enabled in every caller.
        V256(unsafe { _mm256_set1_ps(v) })
    }
    #[inline(always)]
    fn zero() -> Self {
        // SAFETY: AVX enabled in every caller.
        V256(unsafe { _mm256_setzero_ps() })
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        assert!(s.len() >= 8);
        // SAFETY: 8 floats in bounds (asserted); unaligned load; AVX enabled in every caller.
        V256(unsafe { _mm256_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: FMA enabled in every caller.
        V256(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        // SAFETY: AVX enabled in every caller; fixed reduction order (high half + low half, then pairs).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }
    #[inline(always)]
    fn expand(t: &[f32], b: &[f32], s: f32, y: &mut [f32]) {
        grouped_expand::<Self>(t, b, s, y)
    }
}

/// Lane `j` of the result is the sum of the 8 lanes of `p[j]` (14 shuffles and 7 adds for 8 sums).
///
/// # Safety
/// AVX is available.
#[inline(always)]
unsafe fn sum8(p: &[__m256; 8]) -> __m256 {
    // Pairs (2i, 2i+1): per 128-bit half, [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
    let q: [__m256; 4] = std::array::from_fn(|i| {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b))
    });
    // Quads: per 128-bit half, the 4 outputs' half sums.
    let r: [__m256; 2] = std::array::from_fn(|i| {
        let (a, b) = (_mm256_castps_pd(q[2 * i]), _mm256_castps_pd(q[2 * i + 1]));
        _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)))
    });
    // Low halves + high halves: outputs 0..4 from r0, 4..8 from r1.
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(r[0], r[1]), _mm256_permute2f128_ps::<0x31>(r[0], r[1]))
}

impl DotLanes for V256 {
    #[inline(always)]
    unsafe fn dot_lanes(x: *const f32, rows: *const f32, stride: usize, cols: usize) -> Self {
        // SAFETY: AVX and FMA are enabled and the reads are in bounds (the caller's contract).
        unsafe {
            let mut p = [_mm256_setzero_ps(); 8];
            for c in (0..cols).step_by(8) {
                let xv = _mm256_loadu_ps(x.add(c));
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rows.add(j * stride + c)), *pj);
                }
            }
            V256(sum8(&p))
        }
    }
}

/// Expands 8 packed bytes (16 codes, first in the high nibble) to 16 bytes in element order.
#[inline(always)]
pub(crate) unsafe fn nibbles16(bytes: __m128i) -> __m128i {
    let mask = _mm_set1_epi8(0x0f);
    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    let lo = _mm_and_si128(bytes, mask);
    _mm_unpacklo_epi8(hi, lo)
}

struct Avx512Decoder;

impl Decoder for Avx512Decoder {
    #[inline(always)]
    fn four_bit(
        packed: &[u8],
        flat: usize,
        table: &[f32; 16],
        pairs: &[[f32; 2]; 256],
        scales: &[f32],
        shift: u32,
        out: &mut [f32],
    ) {
        four_bit_registers::<V512, Self>(packed, flat, table, pairs, scales, shift, out)
    }
}

/// 4-bit decode into `out` through the register table of `D` (aligned groups of 16) and the portable decoder
/// (heads and tails). Values are `table[q] * scale` with one rounding, as the reference.
///
/// Groups of 16 codes start at a multiple of 16 in the flat index (a head of up to 15 values goes through the
/// portable decoder first), so one group reads 8 whole bytes and, blocks being multiples of 16, never crosses a
/// block. No closure on this path: every helper is `#[inline(always)]`, so the whole decode is compiled inside
/// the caller's `#[target_feature]` function and its intrinsics inline (a closure is compiled without the
/// caller's features, and on AVX2 its intrinsics became out-of-line calls: ~30% of a training step).
#[inline(always)]
fn four_bit_registers<V: Vf, D: Table16<V>>(
    packed: &[u8],
    flat: usize,
    table: &[f32; 16],
    pairs: &[[f32; 2]; 256],
    scales: &[f32],
    shift: u32,
    out: &mut [f32],
) {
    let tab = D::load_table(table);
    let n = out.len();
    let head = ((16 - flat % 16) % 16).min(n);
    four_bit_segments(packed, flat, table, pairs, scales, shift, &mut out[..head]);
    let mut i = head;
    while i + 16 <= n {
        let f = flat + i;
        let bytes: &[u8; 8] = packed[f / 2..f / 2 + 8].try_into().expect("8 bytes");
        let w = D::decode(bytes, &tab);
        let s = V::splat(scales[f >> shift]);
        let dst = &mut out[i..i + 16];
        for (h, wh) in w.iter().enumerate().take(16 / V::LANES) {
            V::mul(*wh, s).store(&mut dst[h * V::LANES..]);
        }
        i += 16;
    }
    four_bit_segments(packed, flat + i, table, pairs, scales, shift, &mut out[i..]);
}

struct Avx2Decoder;

impl Decoder for Avx2Decoder {
    #[inline(always)]
    fn four_bit(
        packed: &[u8],
        flat: usize,
        table: &[f32; 16],
        pairs: &[[f32; 2]; 256],
        scales: &[f32],
        shift: u32,
        out: &mut [f32],
    ) {
        four_bit_registers::<V256, Self>(packed, flat, table, pairs, scales, shift, out)
    }
}

impl Table16<V512> for Avx512Decoder {
    type Tab = __m512;
    #[inline(always)]
    fn load_table(table: &[f32; 16]) -> __m512 {
        // SAFETY: 16 floats in bounds; AVX-512F enabled in every caller (`block_job_avx512`).
        unsafe { _mm512_loadu_ps(table.as_ptr()) }
    }
    #[inline(always)]
    fn decode(bytes: &[u8; 8], tab: &__m512) -> [V512; 2] {
        // SAFETY: reads the 8 bytes of `bytes`; AVX-512 F/BW enabled in every caller.
        unsafe {
            let idx = _mm512_cvtepu8_epi32(nibbles16(_mm_loadl_epi64(bytes.as_ptr() as *const __m128i)));
            [V512(_mm512_permutexvar_ps(idx, *tab)), V512(_mm512_setzero_ps())]
        }
    }
    #[inline(always)]
    fn widen16(bytes: &[u8; 16]) -> [V512; 2] {
        // SAFETY: reads the 16 bytes of `bytes`; AVX-512F enabled in every caller.
        unsafe {
            let b = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
            [V512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))), V512(_mm512_setzero_ps())]
        }
    }
}

/// `table[idx]` for 8 codes in `0..16` from a 16-entry table held as two halves: two `vpermps` and a blend on
/// bit 3 of the code. A function, not a closure, so it inlines into the AVX2 caller with its features.
///
/// # Safety
/// AVX2 must be available (every caller is compiled with it).
#[inline(always)]
unsafe fn lookup16_avx2(tab: &(__m256, __m256), idx: __m256i) -> __m256 {
    // SAFETY: register-only AVX2 operations; the caller guarantees AVX2.
    unsafe {
        let lo = _mm256_permutevar8x32_ps(tab.0, idx);
        let hi = _mm256_permutevar8x32_ps(tab.1, idx);
        _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
    }
}

impl Table16<V256> for Avx2Decoder {
    type Tab = (__m256, __m256);
    #[inline(always)]
    fn load_table(table: &[f32; 16]) -> (__m256, __m256) {
        // SAFETY: 16 floats in bounds; AVX enabled in every caller (`block_job_avx2`).
        unsafe { (_mm256_loadu_ps(table.as_ptr()), _mm256_loadu_ps(table.as_ptr().add(8))) }
    }
    #[inline(always)]
    fn decode(bytes: &[u8; 8], tab: &(__m256, __m256)) -> [V256; 2] {
        // Each half: its 4 bytes broadcast to every lane (a load, no shuffle), lane l shifted right so code l
        // (byte l / 2, the high nibble for even l) is in its low 4 bits; the lookup reads only those bits (the
        // blend takes bit 3 to the sign, the rest shift out). 4 shuffle-port µops per 16 codes where unpacking
        // and widening the nibbles took 7 (4096×14336 NF4, M = 1, one thread: 7.78 → 5.93 ms).
        // SAFETY: reads the 8 bytes of `bytes`; AVX2 enabled in every caller.
        unsafe {
            let shift = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
            let half = |h: usize| {
                let four = (bytes.as_ptr().add(4 * h) as *const i32).read_unaligned();
                V256(lookup16_avx2(tab, _mm256_srlv_epi32(_mm256_set1_epi32(four), shift)))
            };
            [half(0), half(1)]
        }
    }
    #[inline(always)]
    fn widen16(bytes: &[u8; 16]) -> [V256; 2] {
        // SAFETY: reads the 16 bytes of `bytes`; AVX2 enabled in every caller.
        unsafe {
            let b = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b)));
            [V256(lo), V256(hi)]
        }
    }
}
