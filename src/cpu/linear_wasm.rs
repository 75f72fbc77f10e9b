//! WebAssembly SIMD (simd128) version of the fused linear kernels: a register-resident 4-bit GEMV for the
//! decode step (M ≤ 4) and, through `linear_act8_wasm.rs`, the int8-activation kernel. Everything else is the
//! portable code (`wide` compiles to simd128 by itself).
//!
//! The 16-entry f32 table lives in four registers, one per byte plane (byte `k` of every entry). Sixteen
//! codes are looked up with four `i8x16.swizzle`s and their bytes re-interleaved into four f32x4 by two
//! rounds of unpack shuffles, so the decode never touches memory (the portable path decodes through a
//! 256-entry byte → pair table into a scratch tile and multiplies that in a second pass). Each decoded group
//! of 16 weights is used by every row of `x`; `J` weight rows share each load of `x`; the block's partial sum
//! `Σ table[q]·x` is scaled by its absmax once per block, as the x86 register GEMVs do. A build with
//! `+relaxed-simd` (web/build.sh makes one for browsers that validate it) multiplies and adds with
//! `f32x4.relaxed_madd`, fused where the hardware has FMA; the error bound covers both.

use super::linear_kernels::{output_pass, row_slices, tiled_product, PortableDecoder};
use super::table::{Job, LinearKernels};
use crate::format::layer::QuantWeight;
use core::arch::wasm32::*;

/// The simd128 linear kernels (selected at compile time: this module exists only in a `+simd128` build).
pub(crate) const SIMD128: LinearKernels = LinearKernels {
    block: block_job_simd128,
    dots: super::linear_kernels::dots::<wide::f32x8>,
    // One dot product per row: a row's bits never depend on the rows beside it.
    dots_half: |x, rows, out, _| super::linear_kernels::dots::<wide::f32x8>(x, rows, out),
    act8_block: super::linear_act8_wasm::block_simd128,
    pack_x: None,
    act8_quantize: super::linear_act8::quantize_portable,
    act8_interleaved: false,
    act8_layout: super::linear_act8::Act8Layout::EvenOdd,
    backward_cols: super::linear_backward_kernels::backward_cols::<wide::f32x8, super::linear_kernels::PortableDecoder>,
};

fn block_job_simd128(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) {
    if !gemv_4bit_simd128(job, o0, ob, out) {
        tiled_product::<wide::f32x8, PortableDecoder>(job, o0, ob, out);
    }
    output_pass::<wide::f32x8>(job, o0, ob, out);
}

/// Weight rows that share each load of `x` (16 v128 registers on x86 hosts: 4 table planes, the decode's
/// temporaries, `x` and one accumulator per weight row per row of `x`).
const J: usize = 2;

/// GEMV for 4-bit weights with M ≤ 4 and rows of whole blocks (`in % blocksize == 0`, blocksize a multiple
/// of 16). Returns `false` (doing nothing) when the layer does not qualify. Error: the block scale applied
/// after the sum changes rounding by at most one extra ulp of `|w|` per product, inside the stated bound.
#[inline(always)]
fn gemv_4bit_simd128(job: &Job<'_>, o0: usize, ob: usize, out: &mut [f32]) -> bool {
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

/// 16 bytes as a v128.
#[inline(always)]
fn load_bytes(b: &[u8; 16]) -> v128 {
    // SAFETY: `b` is 16 readable bytes; wasm's v128.load has no alignment requirement.
    unsafe { v128_load(b.as_ptr() as *const v128) }
}

/// 4 floats as a v128.
#[inline(always)]
fn load4(x: &[f32]) -> v128 {
    let x: &[f32; 4] = x[..4].try_into().expect("4 floats");
    // SAFETY: `x` is 4 readable f32 (16 bytes); wasm's v128.load has no alignment requirement.
    unsafe { v128_load(x.as_ptr() as *const v128) }
}

/// The table's byte planes: plane `k` holds byte `k` (little-endian) of each of the 16 entries.
#[inline(always)]
fn byte_planes(table: &[f32; 16]) -> [v128; 4] {
    let mut planes = [[0u8; 16]; 4];
    for (c, v) in table.iter().enumerate() {
        for (k, byte) in v.to_le_bytes().into_iter().enumerate() {
            planes[k][c] = byte;
        }
    }
    planes.map(|p| load_bytes(&p))
}

/// The table values of the 16 codes in 8 packed bytes (code `2p` in the high nibble of byte `p`, code
/// `2p + 1` in the low one), in code order: lanes 0–3, 4–7, 8–11, 12–15. Bit-identical to the table entries.
#[inline(always)]
fn decode16(bytes: u64, planes: &[v128; 4]) -> [v128; 4] {
    let v = u64x2_splat(bytes);
    let hi = u8x16_shr(v, 4);
    let lo = v128_and(v, u8x16_splat(15));
    let codes = i8x16_shuffle::<0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23>(hi, lo);
    let p: [v128; 4] = std::array::from_fn(|k| i8x16_swizzle(planes[k], codes));
    // Bytes 0–1 and 2–3 of each entry side by side (codes 0–7, then 8–15), then the two halves together.
    let b01_lo = i8x16_shuffle::<0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23>(p[0], p[1]);
    let b01_hi = i8x16_shuffle::<8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31>(p[0], p[1]);
    let b23_lo = i8x16_shuffle::<0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23>(p[2], p[3]);
    let b23_hi = i8x16_shuffle::<8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31>(p[2], p[3]);
    [
        i16x8_shuffle::<0, 8, 1, 9, 2, 10, 3, 11>(b01_lo, b23_lo),
        i16x8_shuffle::<4, 12, 5, 13, 6, 14, 7, 15>(b01_lo, b23_lo),
        i16x8_shuffle::<0, 8, 1, 9, 2, 10, 3, 11>(b01_hi, b23_hi),
        i16x8_shuffle::<4, 12, 5, 13, 6, 14, 7, 15>(b01_hi, b23_hi),
    ]
}

/// `a·b + c`: one fused or unfused multiply-add with relaxed SIMD (a `+relaxed-simd` build, for browsers
/// that validate it), a multiply then an add with plain simd128.
#[inline(always)]
fn madd(a: v128, b: v128, c: v128) -> v128 {
    #[cfg(target_feature = "relaxed-simd")]
    {
        f32x4_relaxed_madd(a, b, c)
    }
    #[cfg(not(target_feature = "relaxed-simd"))]
    {
        f32x4_add(f32x4_mul(a, b), c)
    }
}

#[inline(always)]
fn hsum(v: v128) -> f32 {
    (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
        + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
}

/// Rows `o0 + j0 .. o0 + j0 + JJ` of [`gemv_4bit_simd128`] for `R` rows of `x`.
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
    let zero = f32x4_splat(0.0);
    let mut total = [[zero; JJ]; R];
    for b in 0..n_in / bs {
        let mut acc = [[zero; JJ]; R];
        for g in 0..bs / 16 {
            let k = b * bs + g * 16;
            let xv: [[v128; 4]; R] = std::array::from_fn(|r| {
                let x16 = &xs[r][k..k + 16];
                std::array::from_fn(|h| load4(&x16[4 * h..]))
            });
            for i in 0..JJ {
                let bytes: [u8; 8] = rows[i][k / 2..k / 2 + 8].try_into().expect("8 bytes");
                let w = decode16(u64::from_le_bytes(bytes), &planes);
                for r in 0..R {
                    let s01 = madd(xv[r][0], w[0], f32x4_mul(xv[r][1], w[1]));
                    let s23 = madd(xv[r][2], w[2], f32x4_mul(xv[r][3], w[3]));
                    acc[r][i] = f32x4_add(acc[r][i], f32x4_add(s01, s23));
                }
            }
        }
        for i in 0..JJ {
            let s = f32x4_splat(row_scales[i][b]);
            for r in 0..R {
                total[r][i] = madd(acc[r][i], s, total[r][i]);
            }
        }
    }
    for r in 0..R {
        for i in 0..JJ {
            out[r * ob + j0 + i] += hsum(total[r][i]);
        }
    }
}
