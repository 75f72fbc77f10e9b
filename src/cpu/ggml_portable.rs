//! Portable ggml block decoders and the scalar and portable kernel tables. Same names and results as
//! `ggml_x86.rs`, which compiles these very decoders for AVX2 / AVX-512.
//!
//! Each decoder takes one block as a fixed-size array and writes a fixed-size array, in runs of 16 or 32
//! elements that share one scale, with the reference's f32 operations in the reference's order (one rounding
//! per product and per difference, never fused), so the compiler vectorises them (nibble / bit-plane unpacking
//! becomes byte shifts and masks, widening and `cvtdq2ps`, one multiply and one subtract per lane) and every
//! result bit equals [`crate::reference::ggml`]'s. Nothing here is `unsafe`.

use super::table::GgmlKernels;
use crate::format::ggml::GgmlType;
use crate::reference::ggml::{self as reference, f16_bits_to_f32, k_scale_min, q3_k_scales};

// ---------------------------------------------------------------- block decoders

#[inline(always)]
fn f16_le(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// 16 F16 values (32 bytes); the branchless widening vectorises as integer selects.
#[inline(always)]
fn f16x16(b: &[u8; 32], out: &mut [f32; 16]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f16_bits_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]));
    }
}

/// 16 BF16 values (32 bytes).
#[inline(always)]
fn bf16x16(b: &[u8; 32], out: &mut [f32; 16]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16);
    }
}

/// 16 F32 values (64 bytes).
#[inline(always)]
fn f32x16(b: &[u8; 64], out: &mut [f32; 16]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
}

#[inline(always)]
fn q8_0(b: &[u8; 34], out: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

#[inline(always)]
fn q4_0(b: &[u8; 18], out: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for (o, &q) in lo.iter_mut().zip(&b[2..18]) {
        *o = d * ((q & 0x0f) as i32 - 8) as f32;
    }
    for (o, &q) in hi.iter_mut().zip(&b[2..18]) {
        *o = d * ((q >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
fn q4_1(b: &[u8; 20], out: &mut [f32; 32]) {
    let (d, m) = (f16_le(b, 0), f16_le(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for (o, &q) in lo.iter_mut().zip(&b[4..20]) {
        *o = d * (q & 0x0f) as f32 + m;
    }
    for (o, &q) in hi.iter_mut().zip(&b[4..20]) {
        *o = d * (q >> 4) as f32 + m;
    }
}

/// The 32 five-bit codes of a Q5 block: nibbles `qs` (16 bytes) plus bit `i` of `qh`.
#[inline(always)]
fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for i in 0..16 {
        q[i] = (qs[i] & 0x0f) | ((((qh >> i) & 1) as u8) << 4);
        q[16 + i] = (qs[i] >> 4) | ((((qh >> (16 + i)) & 1) as u8) << 4);
    }
    q
}

#[inline(always)]
fn q5_0(b: &[u8; 22], out: &mut [f32; 32]) {
    let d = f16_le(b, 0);
    let q = q5_codes(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]);
    for (o, &q) in out.iter_mut().zip(&q) {
        *o = d * (q as i32 - 16) as f32;
    }
}

#[inline(always)]
fn q5_1(b: &[u8; 24], out: &mut [f32; 32]) {
    let (d, m) = (f16_le(b, 0), f16_le(b, 2));
    let q = q5_codes(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24]);
    for (o, &q) in out.iter_mut().zip(&q) {
        *o = d * q as f32 + m;
    }
}

#[inline(always)]
fn q2_k(b: &[u8; 84], out: &mut [f32; 256]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_le(b, 80), f16_le(b, 82));
    for h in 0..2 {
        for s in 0..4 {
            let e0 = 128 * h + 32 * s;
            for half in 0..2 {
                let sc = scales[e0 / 16 + half];
                let dl = d * (sc & 0x0f) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let src = &qs[32 * h + 16 * half..32 * h + 16 * half + 16];
                for (o, &q) in out[e0 + 16 * half..e0 + 16 * half + 16].iter_mut().zip(src) {
                    *o = dl * ((q >> (2 * s)) & 3) as f32 - ml;
                }
            }
        }
    }
}

#[inline(always)]
fn q3_k(b: &[u8; 110], out: &mut [f32; 256]) {
    let (hmask, qs) = (&b[..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_le(b, 108);
    for h in 0..2 {
        for s in 0..4 {
            let e0 = 128 * h + 32 * s;
            let plane = e0 / 32;
            for half in 0..2 {
                let dl = d * scales[e0 / 16 + half] as f32;
                let r = 16 * half..16 * half + 16;
                let low = &qs[32 * h + r.start..32 * h + r.end];
                for ((o, &ql), &hm) in out[e0 + r.start..e0 + r.end].iter_mut().zip(low).zip(&hmask[r]) {
                    let lo = ((ql >> (2 * s)) & 3) as i32;
                    let hi = ((hm >> plane) & 1) as i32;
                    *o = dl * (lo - ((hi ^ 1) << 2)) as f32;
                }
            }
        }
    }
}

#[inline(always)]
fn q4_k(b: &[u8; 144], out: &mut [f32; 256]) {
    let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for j in 0..4 {
        for s in 0..2 {
            let sub = 2 * j + s;
            let dl = d * sc[sub] as f32;
            let dm = dmin * m[sub] as f32;
            for (o, &q) in out[32 * sub..32 * sub + 32].iter_mut().zip(&qs[32 * j..32 * j + 32]) {
                *o = dl * ((q >> (4 * s)) & 0x0f) as f32 - dm;
            }
        }
    }
}

#[inline(always)]
fn q5_k(b: &[u8; 176], out: &mut [f32; 256]) {
    let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for j in 0..4 {
        for s in 0..2 {
            let sub = 2 * j + s;
            let dl = d * sc[sub] as f32;
            let dm = dmin * m[sub] as f32;
            let o = &mut out[32 * sub..32 * sub + 32];
            for ((o, &ql), &qh) in o.iter_mut().zip(&qs[32 * j..32 * j + 32]).zip(qh) {
                let q = ((ql >> (4 * s)) & 0x0f) | (((qh >> sub) & 1) << 4);
                *o = dl * q as f32 - dm;
            }
        }
    }
}

#[inline(always)]
fn q6_k(b: &[u8; 210], out: &mut [f32; 256]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_le(b, 208);
    for h in 0..2 {
        for s in 0..4 {
            let e0 = 128 * h + 32 * s;
            for half in 0..2 {
                let dl = d * (scales[e0 / 16 + half] as i8) as f32;
                let r = 16 * half..16 * half + 16;
                let lo_src = &ql[64 * h + 32 * (s % 2) + r.start..64 * h + 32 * (s % 2) + r.end];
                let hi_src = &qh[32 * h + r.start..32 * h + r.end];
                for ((o, &l), &hb) in out[e0 + r.start..e0 + r.end].iter_mut().zip(lo_src).zip(hi_src) {
                    let q = ((l >> (4 * (s / 2))) & 0x0f) | (((hb >> (2 * s)) & 3) << 4);
                    *o = dl * (q as i32 - 32) as f32;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- spans

/// Applies the fixed-size decoder `$f` (`&[u8; $bb]` → `&mut [f32; $be]`) to every whole block of `$data` /
/// `$out` (lengths checked by the caller; a mismatch only shortens the work, it cannot read or write out of
/// bounds). A macro, not a function taking the decoder, so the decoder is a direct call that inlines into each
/// instruction set's entry point.
macro_rules! blocks {
    ($data:expr, $out:expr, $f:ident, $bb:expr, $be:expr) => {
        for (b, o) in $data.chunks_exact($bb).zip($out.chunks_exact_mut($be)) {
            if let (Ok(b), Ok(o)) = (<&[u8; $bb]>::try_from(b), <&mut [f32; $be]>::try_from(o)) {
                $f(b, o);
            }
        }
    };
}

/// Plain (one-element) types of `$esize` bytes: runs of 16 through `$f`, then the tail element by element with
/// the reference's `$one`.
macro_rules! plain {
    ($data:expr, $out:expr, $f:ident, $one:path, $esize:literal) => {{
        let full = $out.len() / 16 * 16;
        let (head, tail) = $out.split_at_mut(full);
        let (data_head, data_tail) = $data.split_at((full * $esize).min($data.len()));
        blocks!(data_head, head, $f, { 16 * $esize }, 16);
        for (b, o) in data_tail.chunks_exact($esize).zip(tail.chunks_exact_mut(1)) {
            $one(b, o);
        }
    }};
}

/// Decodes whole blocks of `ty` (any decodable type) with the decoders above; inlined into each instruction
/// set's entry point so that the compiler vectorises it for that set. Types lowbit cannot decode are left
/// untouched (the API rejects them first).
#[inline(always)]
pub(crate) fn dequantize_blocks(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    use GgmlType::*;
    match ty {
        F32 => plain!(data, out, f32x16, reference::block_f32, 4),
        F16 => plain!(data, out, f16x16, reference::block_f16, 2),
        BF16 => plain!(data, out, bf16x16, reference::block_bf16, 2),
        Q8_0 => blocks!(data, out, q8_0, 34, 32),
        Q4_0 => blocks!(data, out, q4_0, 18, 32),
        Q4_1 => blocks!(data, out, q4_1, 20, 32),
        Q5_0 => blocks!(data, out, q5_0, 22, 32),
        Q5_1 => blocks!(data, out, q5_1, 24, 32),
        Q2_K => blocks!(data, out, q2_k, 84, 256),
        Q3_K => blocks!(data, out, q3_k, 110, 256),
        Q4_K => blocks!(data, out, q4_k, 144, 256),
        Q5_K => blocks!(data, out, q5_k, 176, 256),
        Q6_K => blocks!(data, out, q6_k, 210, 256),
        _ => {}
    }
}

/// The portable entry point (baseline target features: SSE2 on x86_64, NEON on aarch64).
pub(crate) fn dequantize_portable(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    dequantize_blocks(ty, data, out)
}

// ---------------------------------------------------------------- tables

/// The scalar reference kernels.
pub(crate) const SCALAR: GgmlKernels = GgmlKernels { dequantize: reference::dequantize };

/// The portable kernels.
pub(crate) const PORTABLE: GgmlKernels = GgmlKernels { dequantize: dequantize_portable };
