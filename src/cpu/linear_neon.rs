//! aarch64 NEON version of the fused linear kernels: register-resident 4-bit and int8 GEMVs for the decode
//! step (M ≤ 4) and, through `linear_act8_neon.rs`, the int8-activation kernel. Everything else is the portable code
//! (`wide` compiles to NEON by itself).
//!
//! The same design as the simd128 kernel (`linear_wasm.rs`): the 16-entry f32 table lives in four registers,
//! one per byte plane (byte `k` of every entry); sixteen codes are looked up with four `tbl`s and their bytes
//! re-interleaved into four f32x4 by `zip1`/`zip2` on bytes then on halfwords, so the decode never touches
//! memory and gives the table entries' exact bits. Each decoded group of 16 weights is used by every row of
//! `x`; `J` weight rows share each load of `x`; the block's partial sum `Σ table[q]·x` (fused multiply-adds)
//! is scaled by its absmax once per block, as the x86 register GEMVs do (error: inside the stated bound, which
//! allows fused or unfused multiply-adds).

use super::linear_kernels::{output_pass, row_slices, tiled_product, Int8Runs, PortableDecoder};
use super::table::{Job, LinearKernels};
use crate::format::layer::QuantWeight;
use core::arch::aarch64::*;

/// The NEON linear kernels (NEON is part of the aarch64 baseline: no detection needed).
pub(crate) const NEON: LinearKernels = LinearKernels {
    block: block_job_neon,
    dots: super::linear_kernels::dots::<wide::f32x8>,
    // One dot product per row: a row's bits never depend on the rows beside it.
    dots_half: |x, rows, out, _| super::linear_kernels::dots::<wide::f32x8>(x, rows, out),
    act8_block: super::linear_act8_neon::block_neon,
    pack_x: None,
    act8_quantize: super::linear_act8::quantize_portable,
    act8_interleaved: false,
    act8_layout: super::linear_act8::Act8Layout::EvenOdd,
    backward_cols: super::linear_backward_kernels::backward_cols::<wide::f32x8, super::linear_kernels::PortableDecoder>,
};

fn block_job_neon(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    if !gemv_4bit_neon(job, o0, ob, out) && !gemv_int8_neon(job, o0, ob, out) {
        tiled_product::<wide::f32x8, PortableDecoder>(job, o0, ob, out);
    }
    output_pass::<wide::f32x8>(job, o0, ob, out);
}

/// Weight rows that share each load of `x` (32 NEON registers: 4 table planes, the decode's temporaries, `x`
/// and one accumulator pair per weight row per row of `x`).
const J: usize = 4;

/// GEMV for 4-bit weights with M ≤ 4 and rows of whole blocks (`in % blocksize == 0`, blocksize a multiple
/// of 16). Returns `false` (doing nothing) when the layer does not qualify.
#[inline(always)]
fn gemv_4bit_neon(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    let QuantWeight::FourBit(t) = job.layer.weight else { return false };
    let (n_in, m, bs) = (job.layer.in_features, job.m, t.blocksize());
    if m == 0 || m > 4 || !bs.is_multiple_of(16) || !n_in.is_multiple_of(bs) {
        return false;
    }
    let mut j = 0;
    while j + J <= ob {
        gemv_group::<J>(job, o0, j, ob, out);
        j += J;
    }
    while j < ob {
        gemv_group::<1>(job, o0, j, ob, out);
        j += 1;
    }
    true
}

#[inline(always)]
fn gemv_group<const JJ: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    match job.m {
        1 => gemv_rows::<1, JJ>(job, o0, j0, ob, out),
        2 => gemv_rows::<2, JJ>(job, o0, j0, ob, out),
        3 => gemv_rows::<3, JJ>(job, o0, j0, ob, out),
        _ => gemv_rows::<4, JJ>(job, o0, j0, ob, out),
    }
}

/// 4 floats as a float32x4.
#[inline(always)]
fn load4(x: &[f32]) -> float32x4_t {
    let x: &[f32; 4] = x[..4].try_into().expect("4 floats");
    // SAFETY: `x` is 4 readable f32; NEON is in the aarch64 baseline.
    unsafe { vld1q_f32(x.as_ptr()) }
}

/// The table's byte planes: plane `k` holds byte `k` (little-endian) of each of the 16 entries.
#[inline(always)]
pub(crate) fn byte_planes(table: &[f32; 16]) -> [uint8x16_t; 4] {
    let mut planes = [[0u8; 16]; 4];
    for (c, v) in table.iter().enumerate() {
        for (k, byte) in v.to_le_bytes().into_iter().enumerate() {
            planes[k][c] = byte;
        }
    }
    // SAFETY: each plane is 16 readable bytes; NEON is in the aarch64 baseline.
    planes.map(|p| unsafe { vld1q_u8(p.as_ptr()) })
}

/// The table values of the 16 codes in 8 packed bytes (code `2p` in the high nibble of byte `p`, code
/// `2p + 1` in the low one), in code order: lanes 0–3, 4–7, 8–11, 12–15. Bit-identical to the table entries.
#[inline(always)]
pub(crate) fn decode16(bytes: u64, planes: &[uint8x16_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: register-only intrinsics; NEON is in the aarch64 baseline.
    unsafe {
        let v = vreinterpretq_u8_u64(vdupq_n_u64(bytes));
        let hi = vshrq_n_u8::<4>(v);
        let lo = vandq_u8(v, vdupq_n_u8(15));
        // hi[0], lo[0], hi[1], lo[1], …: codes 0..16 in order.
        let codes = vzip1q_u8(hi, lo);
        let p0 = vqtbl1q_u8(planes[0], codes);
        let p1 = vqtbl1q_u8(planes[1], codes);
        let p2 = vqtbl1q_u8(planes[2], codes);
        let p3 = vqtbl1q_u8(planes[3], codes);
        // Bytes 0–1 and 2–3 of each entry side by side (codes 0–7, then 8–15), then the two halves together.
        let b01_lo = vreinterpretq_u16_u8(vzip1q_u8(p0, p1));
        let b01_hi = vreinterpretq_u16_u8(vzip2q_u8(p0, p1));
        let b23_lo = vreinterpretq_u16_u8(vzip1q_u8(p2, p3));
        let b23_hi = vreinterpretq_u16_u8(vzip2q_u8(p2, p3));
        [
            vreinterpretq_f32_u16(vzip1q_u16(b01_lo, b23_lo)),
            vreinterpretq_f32_u16(vzip2q_u16(b01_lo, b23_lo)),
            vreinterpretq_f32_u16(vzip1q_u16(b01_hi, b23_hi)),
            vreinterpretq_f32_u16(vzip2q_u16(b01_hi, b23_hi)),
        ]
    }
}

/// Rows `o0 + j0 .. o0 + j0 + JJ` of [`gemv_4bit_neon`] for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_rows<const R: usize, const JJ: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    let n_in = job.layer.in_features;
    let QuantWeight::FourBit(t) = job.layer.weight else { return };
    let bs = t.blocksize();
    let scales = job.layer.block_scales();
    let packed = t.packed();
    let planes = byte_planes(t.table());
    let rows: [&[u8]; JJ] = row_slices(packed, n_in / 2, o0 + j0);
    let row_scales: [&[f32]; JJ] = row_slices(scales, n_in / bs, o0 + j0);
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    // SAFETY (every block below): register-only intrinsics; NEON is in the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut total = [[zero; JJ]; R];
    for b in 0..n_in / bs {
        let mut acc = [[zero; JJ]; R];
        for g in 0..bs / 16 {
            let k = b * bs + g * 16;
            let mut xv = [[zero; 4]; R];
            for r in 0..R {
                for h in 0..4 {
                    xv[r][h] = load4(&xs[r][k + 4 * h..]);
                }
            }
            for i in 0..JJ {
                let bytes: [u8; 8] = rows[i][k / 2..k / 2 + 8].try_into().expect("8 bytes");
                let w = decode16(u64::from_le_bytes(bytes), &planes);
                for r in 0..R {
                    // SAFETY: see above.
                    acc[r][i] = unsafe {
                        let s01 = vfmaq_f32(vmulq_f32(xv[r][1], w[1]), xv[r][0], w[0]);
                        let s23 = vfmaq_f32(vmulq_f32(xv[r][3], w[3]), xv[r][2], w[2]);
                        vaddq_f32(acc[r][i], vaddq_f32(s01, s23))
                    };
                }
            }
        }
        for i in 0..JJ {
            // SAFETY: see above.
            unsafe {
                let s = vdupq_n_f32(row_scales[i][b]);
                for r in 0..R {
                    total[r][i] = vfmaq_f32(total[r][i], acc[r][i], s);
                }
            }
        }
    }
    for r in 0..R {
        for i in 0..JJ {
            // SAFETY: see above.
            out[r * ob + j0 + i] += unsafe { vaddvq_f32(total[r][i]) };
        }
    }
}

/// int8 GEMV for M ≤ 4 (rows of whole runs that are multiples of 16 inputs, as the x86 ones): codes widened
/// in registers, `(q − zp)` exact in i16 then converted to f32, `Σ (q − zp)·x` accumulated per run of one
/// scale with fused multiply-adds, then scaled once (inside the stated bound). Returns `false` (doing nothing)
/// when the layer does not qualify.
#[inline(always)]
fn gemv_int8_neon(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
    if !Int8Runs::whole_sixteens(job) {
        return false;
    }
    let mut j = 0;
    while j + J <= ob {
        gemv_int8_group::<J>(job, o0, j, ob, out);
        j += J;
    }
    while j < ob {
        gemv_int8_group::<1>(job, o0, j, ob, out);
        j += 1;
    }
    true
}

#[inline(always)]
fn gemv_int8_group<const JJ: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    match job.m {
        1 => gemv_int8_rows::<1, JJ>(job, o0, j0, ob, out),
        2 => gemv_int8_rows::<2, JJ>(job, o0, j0, ob, out),
        3 => gemv_int8_rows::<3, JJ>(job, o0, j0, ob, out),
        _ => gemv_int8_rows::<4, JJ>(job, o0, j0, ob, out),
    }
}

/// The 16 codes at `b` minus `zp`, as four float32x4 (elements 0–3, 4–7, 8–11, 12–15). Exact.
#[inline(always)]
fn widen16(b: &[u8], zp: int16x8_t) -> [float32x4_t; 4] {
    let b: &[u8; 16] = b[..16].try_into().expect("16 bytes");
    // SAFETY: `b` is 16 readable bytes; the rest are register-only intrinsics (NEON is in the aarch64
    // baseline).
    unsafe {
        let v = vld1q_u8(b.as_ptr());
        let lo = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(v))), zp);
        let hi = vsubq_s16(vreinterpretq_s16_u16(vmovl_high_u8(v)), zp);
        [
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
            vcvtq_f32_s32(vmovl_high_s16(lo)),
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
            vcvtq_f32_s32(vmovl_high_s16(hi)),
        ]
    }
}

/// Rows `o0 + j0 .. o0 + j0 + JJ` of [`gemv_int8_neon`] for `R` rows of `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemv_int8_rows<const R: usize, const JJ: usize>(job: &Job<'_>, o0: usize, j0: usize, ob: usize, out: &mut [f32]) {
    let n_in = job.layer.in_features;
    let QuantWeight::Int8(t) = job.layer.weight else { return };
    let runs = Int8Runs::of(t.granularity(), n_in);
    let run = runs.run;
    let rows: [&[u8]; JJ] = row_slices(t.codes(), n_in, o0 + j0);
    let xs: [&[f32]; R] = row_slices(job.x, n_in, 0);
    // SAFETY (every block below): register-only intrinsics; NEON is in the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut total = [[0f32; JJ]; R];
    for gi in 0..n_in / run {
        let mut scale = [0f32; JJ];
        let mut zp = [unsafe { vdupq_n_s16(0) }; JJ];
        for i in 0..JJ {
            let e = runs.entry(o0 + j0 + i, gi);
            scale[i] = t.scales()[e];
            zp[i] = unsafe { vdupq_n_s16(i16::from(t.zero_points()[e])) };
        }
        let mut acc = [[zero; JJ]; R];
        for c in 0..run / 16 {
            let k = gi * run + c * 16;
            let mut xv = [[zero; 4]; R];
            for r in 0..R {
                for h in 0..4 {
                    xv[r][h] = load4(&xs[r][k + 4 * h..]);
                }
            }
            for i in 0..JJ {
                let w = widen16(&rows[i][k..], zp[i]);
                for r in 0..R {
                    // SAFETY: see above.
                    acc[r][i] = unsafe {
                        let s01 = vfmaq_f32(vmulq_f32(xv[r][1], w[1]), xv[r][0], w[0]);
                        let s23 = vfmaq_f32(vmulq_f32(xv[r][3], w[3]), xv[r][2], w[2]);
                        vaddq_f32(acc[r][i], vaddq_f32(s01, s23))
                    };
                }
            }
        }
        for i in 0..JJ {
            for r in 0..R {
                // SAFETY: see above.
                total[r][i] += unsafe { vaddvq_f32(acc[r][i]) } * scale[i];
            }
        }
    }
    for r in 0..R {
        for i in 0..JJ {
            out[r * ob + j0 + i] += total[r][i];
        }
    }
}
