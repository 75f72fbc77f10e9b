//! Portable ggml block decoders and the scalar and portable kernel tables. Same names and results as
//! `ggml_x86.rs`, which compiles these very decoders for AVX2 / AVX-512.
//!
//! Each decoder takes one block as a fixed-size array and writes a fixed-size array in two phases: first the
//! integer codes as byte arrays (nibble, 2-bit and bit planes: byte shifts and masks), then one f32 multiply
//! (and one add or subtract) per element with its sub-block's scale, the reference's operations in the
//! reference's order (never fused). Both phases are plain loops over fixed-size arrays that the compiler
//! vectorises, and every result bit equals [`crate::reference::ggml`]'s. Nothing here is `unsafe`.

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
    // gguf-py multiplies `q * d`; the product is exact (11 + 8 bits), so `d * q` has the same bits.
    let q: [i8; 32] = std::array::from_fn(|i| b[2 + i] as i8);
    scale_run(d, &q, out);
}

/// `out[i] = d * q[i]` over a run (one f32 multiply per element).
#[inline(always)]
fn scale_run<const N: usize>(d: f32, q: &[i8; N], out: &mut [f32; N]) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = d * q as f32;
    }
}

/// `out[i] = (d * q[i]) + m` over a run (two roundings, as numpy).
#[inline(always)]
fn scale_add_run<const N: usize>(d: f32, m: f32, q: &[u8; N], out: &mut [f32; N]) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = d * q as f32 + m;
    }
}

/// The 32 nibbles of a Q4 block: low nibbles of the 16 bytes first, then the high nibbles.
#[inline(always)]
fn nibbles32(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for i in 0..16 {
        q[i] = qs[i] & 0x0f;
        q[16 + i] = qs[i] >> 4;
    }
    q
}

#[inline(always)]
fn q4_0(b: &[u8; 18], out: &mut [f32; 32]) {
    let q = nibbles32(&b[2..18]).map(|q| q as i8 - 8);
    scale_run(f16_le(b, 0), &q, out);
}

#[inline(always)]
fn q4_1(b: &[u8; 20], out: &mut [f32; 32]) {
    scale_add_run(f16_le(b, 0), f16_le(b, 2), &nibbles32(&b[4..20]), out);
}

/// The 32 five-bit codes of a Q5 block: nibbles `qs` (16 bytes) plus bit `i` of `qh`.
#[inline(always)]
fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = nibbles32(qs);
    for (i, q) in q.iter_mut().enumerate() {
        *q |= (((qh >> i) & 1) as u8) << 4;
    }
    q
}

#[inline(always)]
fn q5_0(b: &[u8; 22], out: &mut [f32; 32]) {
    let q = q5_codes(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]).map(|q| q as i8 - 16);
    scale_run(f16_le(b, 0), &q, out);
}

#[inline(always)]
fn q5_1(b: &[u8; 24], out: &mut [f32; 32]) {
    let q = q5_codes(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24]);
    scale_add_run(f16_le(b, 0), f16_le(b, 2), &q, out);
}

// K-quants: first the 256 codes (byte shifts and masks, vectorised), then one multiply (and subtract) per element
// with the sub-block's scale, `SUB` elements per sub-block.

/// `out[e] = dl[e / SUB] * q[e]`.
#[inline(always)]
fn k_scale<const SUB: usize, const NS: usize>(dl: &[f32; NS], q: &[i8; 256], out: &mut [f32; 256]) {
    for ((o, q), &d) in out.chunks_exact_mut(SUB).zip(q.chunks_exact(SUB)).zip(dl) {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = d * q as f32;
        }
    }
}

/// `out[e] = dl[e / SUB] * q[e] - ml[e / SUB]`.
#[inline(always)]
fn k_scale_sub<const SUB: usize, const NS: usize>(dl: &[f32; NS], ml: &[f32; NS], q: &[u8; 256], out: &mut [f32; 256]) {
    for (((o, q), &d), &m) in out.chunks_exact_mut(SUB).zip(q.chunks_exact(SUB)).zip(dl).zip(ml) {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = d * q as f32 - m;
        }
    }
}

/// 2-bit planes: element `128 h + 32 s + l` is `(src[32 h + l] >> 2 s) & 3` (Q2_K codes, Q3_K low bits, Q6_K
/// high bits).
#[inline(always)]
fn crumbs256(src: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (qh, src) in q.chunks_exact_mut(128).zip(src.chunks_exact(32)) {
        for (s, qs) in qh.chunks_exact_mut(32).enumerate() {
            for (q, &b) in qs.iter_mut().zip(src) {
                *q = (b >> (2 * s)) & 3;
            }
        }
    }
    q
}

/// 4-bit planes: element `64 j + 32 s + l` is `(src[32 j + l] >> 4 s) & 15` (Q4_K / Q5_K low bits).
#[inline(always)]
fn nibbles256(src: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (qj, src) in q.chunks_exact_mut(64).zip(src.chunks_exact(32)) {
        let (lo, hi) = qj.split_at_mut(32);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(src) {
            *l = b & 0x0f;
            *h = b >> 4;
        }
    }
    q
}

/// Bit planes: element `e` is `(src[e % 32] >> (e / 32)) & 1` (Q3_K `hmask`, Q5_K `qh`).
#[inline(always)]
fn bits256(src: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (p, qp) in q.chunks_exact_mut(32).enumerate() {
        for (q, &b) in qp.iter_mut().zip(src) {
            *q = (b >> p) & 1;
        }
    }
    q
}

#[inline(always)]
fn q2_k(b: &[u8; 84], out: &mut [f32; 256]) {
    let (d, dmin) = (f16_le(b, 80), f16_le(b, 82));
    let dl: [f32; 16] = std::array::from_fn(|i| d * (b[i] & 0x0f) as f32);
    let ml: [f32; 16] = std::array::from_fn(|i| dmin * (b[i] >> 4) as f32);
    k_scale_sub::<16, 16>(&dl, &ml, &crumbs256(&b[16..80]), out);
}

#[inline(always)]
fn q3_k(b: &[u8; 110], out: &mut [f32; 256]) {
    let d = f16_le(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    let dl: [f32; 16] = std::array::from_fn(|i| d * scales[i] as f32);
    let (low, high) = (crumbs256(&b[32..96]), bits256(&b[..32]));
    let mut q = [0i8; 256];
    for ((q, &lo), &hi) in q.iter_mut().zip(&low).zip(&high) {
        *q = lo as i8 - (((hi ^ 1) << 2) as i8);
    }
    k_scale::<16, 16>(&dl, &q, out);
}

#[inline(always)]
fn q4_k(b: &[u8; 144], out: &mut [f32; 256]) {
    let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let dl = sc.map(|s| d * s as f32);
    let ml = m.map(|m| dmin * m as f32);
    k_scale_sub::<32, 8>(&dl, &ml, &nibbles256(&b[16..144]), out);
}

#[inline(always)]
fn q5_k(b: &[u8; 176], out: &mut [f32; 256]) {
    let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let dl = sc.map(|s| d * s as f32);
    let ml = m.map(|m| dmin * m as f32);
    let mut q = nibbles256(&b[48..176]);
    for (q, &h) in q.iter_mut().zip(&bits256(&b[16..48])) {
        *q |= h << 4;
    }
    k_scale_sub::<32, 8>(&dl, &ml, &q, out);
}

#[inline(always)]
fn q6_k(b: &[u8; 210], out: &mut [f32; 256]) {
    let (ql, qh) = (&b[..128], &b[128..192]);
    let d = f16_le(b, 208);
    let dl: [f32; 16] = std::array::from_fn(|i| d * (b[192 + i] as i8) as f32);
    // Low bits: element `128 h + 32 s + l` is nibble `s / 2` of `ql[64 h + 32 (s % 2) + l]`, i.e. per half `h`
    // the low nibbles of its 64 `ql` bytes, then their high nibbles.
    let mut low = [0u8; 256];
    for (lh, src) in low.chunks_exact_mut(128).zip(ql.chunks_exact(64)) {
        let (lo, hi) = lh.split_at_mut(64);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(src) {
            *l = b & 0x0f;
            *h = b >> 4;
        }
    }
    let mut q = [0i8; 256];
    for ((q, &lo), &hi) in q.iter_mut().zip(&low).zip(&crumbs256(qh)) {
        *q = (lo | (hi << 4)) as i8 - 32;
    }
    k_scale::<16, 16>(&dl, &q, out);
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
