//! Reference dequantization of the ggml / GGUF tensor types (`docs/formats.md` §9), bit-identical to gguf-py's
//! `gguf.quants.dequantize` (numpy).
//!
//! One function per type decodes one block (`ty.block_bytes()` bytes → `ty.block_elements()` values), written
//! element by element with gguf-py's order of f32 operations: every scale is an f16 widened exactly to f32
//! (NaN payloads kept, as numpy does), integer codes become f32 exactly, and each product or difference is one
//! f32 operation, rounded to nearest even, in the order numpy evaluates it (`(d * q) + m`, `(d * sc) * q - (dmin *
//! m)`; never fused). Non-finite scales decode faithfully to infinities and NaNs, as gguf-py's do; callers that
//! need finite weights check the result.
//!
//! These loops validate nothing: [`dequantize`] takes whole blocks (the public [`crate::ggml`] checks lengths
//! and types first).

use crate::format::ggml::GgmlType;

/// Elements per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

/// An IEEE half (given as its bits) widened exactly to f32, keeping the sign, and for a NaN its payload
/// unquieted (numpy's `astype(np.float32)`; the `half` crate would set the quiet bit).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7c00;
    let o = (h & 0x7fff) << 13;
    let bits = if exp == 0x7c00 {
        // Infinity or NaN: exponent all ones, mantissa moved up unchanged.
        o + 0x7000_0000
    } else if exp == 0 {
        // Zero or subnormal (man * 2^-24): 2^-14 * (1 + man / 1024) - 2^-14, exact in f32.
        (f32::from_bits(o + 0x3880_0000) - f32::from_bits(0x3880_0000)).to_bits()
    } else {
        // Normal: rebias the exponent from 15 to 127.
        o + 0x3800_0000
    };
    f32::from_bits(bits | sign)
}

/// The little-endian f16 at `b[i..i + 2]`, widened (see [`f16_bits_to_f32`]).
#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// The little-endian bf16 at `b[i..i + 2]` as f32: its bits moved up by 16 (exact, NaNs included).
#[inline(always)]
pub fn bf16_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[i], b[i + 1]]) as u32) << 16)
}

/// F32: the little-endian bits, unchanged.
pub fn block_f32(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

/// F16: one exact widening.
pub fn block_f16(b: &[u8], out: &mut [f32]) {
    out[0] = f16_at(b, 0);
}

/// BF16: one exact widening.
pub fn block_bf16(b: &[u8], out: &mut [f32]) {
    out[0] = bf16_at(b, 0);
}

/// Q8_0 (34 bytes: f16 `d`, 32 × i8 `q`): `x[i] = q[i] * d`.
pub fn block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for i in 0..32 {
        out[i] = (b[2 + i] as i8) as f32 * d;
    }
}

/// Q4_0 (18 bytes: f16 `d`, 16 bytes of nibbles): element `i < 16` is the low nibble of byte `i`, element
/// `16 + i` its high nibble; `x = d * (q - 8)`.
pub fn block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for i in 0..16 {
        let q = b[2 + i];
        out[i] = d * ((q & 0x0f) as i32 - 8) as f32;
        out[16 + i] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1 (20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles as Q4_0): `x = (d * q) + m`.
pub fn block_q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for i in 0..16 {
        let q = b[4 + i];
        out[i] = d * (q & 0x0f) as f32 + m;
        out[16 + i] = d * (q >> 4) as f32 + m;
    }
}

/// The fifth bit of element `i` of a Q5 block: bit `i` of the little-endian u32 `qh`.
#[inline(always)]
fn q5_high(qh: u32, i: usize) -> u8 {
    ((qh >> i) & 1) as u8
}

/// Q5_0 (22 bytes: f16 `d`, u32 `qh`, 16 bytes of nibbles): `q = nibble | (bit i of qh) << 4`,
/// `x = d * (q - 16)`.
pub fn block_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for i in 0..16 {
        let q = b[6 + i];
        let lo = (q & 0x0f) | (q5_high(qh, i) << 4);
        let hi = (q >> 4) | (q5_high(qh, 16 + i) << 4);
        out[i] = d * (lo as i32 - 16) as f32;
        out[16 + i] = d * (hi as i32 - 16) as f32;
    }
}

/// Q5_1 (24 bytes: f16 `d`, f16 `m`, u32 `qh`, 16 bytes of nibbles): `x = (d * q) + m`, `q` as Q5_0.
pub fn block_q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for i in 0..16 {
        let q = b[8 + i];
        let lo = (q & 0x0f) | (q5_high(qh, i) << 4);
        let hi = (q >> 4) | (q5_high(qh, 16 + i) << 4);
        out[i] = d * lo as f32 + m;
        out[16 + i] = d * hi as f32 + m;
    }
}

/// Q2_K (84 bytes: 16 scale bytes, 64 bytes of 2-bit codes, f16 `d`, f16 `dmin`). Element
/// `e = 128 h + 32 s + l` (`h < 2`, `s < 4`, `l < 32`) is `(qs[32 h + l] >> 2 s) & 3`; its sub-block is `e / 16`
/// with scale byte `sc`: `x = (d * (sc & 15)) * q - (dmin * (sc >> 4))`.
pub fn block_q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (e, o) in out.iter_mut().enumerate().take(QK_K) {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let q = (qs[32 * h + l] >> (2 * s)) & 3;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0f) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *o = dl * q as f32 - ml;
    }
}

/// The 16 signed 6-bit scales of a Q3_K block from its 12 scale bytes: scale `j` has low 4 bits from byte
/// `j % 8` (low nibble for `j < 8`, high nibble otherwise) and high 2 bits from byte `8 + j % 4`, bits
/// `2 (j / 4)`; the value is that 6-bit number minus 32.
pub fn q3_k_scales(sb: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { sb[j] & 0x0f } else { sb[j - 8] >> 4 };
        let high = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Q3_K (110 bytes: 32 bytes `hmask`, 64 bytes of 2-bit codes, 12 scale bytes, f16 `d`). Element
/// `e = 128 h + 32 s + l` has low bits `(qs[32 h + l] >> 2 s) & 3` and high bit `(hmask[l] >> (e / 32)) & 1`;
/// `q = low - 4` when the high bit is 0, `low` when it is 1; `x = (d * scale[e / 16]) * q`.
pub fn block_q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs) = (&b[..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for (e, o) in out.iter_mut().enumerate().take(QK_K) {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i8;
        let high = (hmask[l] >> (e / 32)) & 1;
        let q = low - (((high ^ 1) << 2) as i8);
        let dl = d * scales[e / 16] as f32;
        *o = dl * q as f32;
    }
}

/// The 8 scales and 8 mins (6 bits each) of a Q4_K / Q5_K block from its 12 scale bytes `s`: for `j < 4`,
/// `sc = s[j] & 63`, `m = s[4 + j] & 63`; for `j >= 4`, `sc = (s[4 + j] & 15) | ((s[j - 4] >> 6) << 4)` and
/// `m = (s[4 + j] >> 4) | ((s[j] >> 6) << 4)`.
pub fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let sc = std::array::from_fn(|j| if j < 4 { s[j] & 0x3f } else { (s[4 + j] & 0x0f) | ((s[j - 4] >> 2) & 0x30) });
    let m = std::array::from_fn(|j| if j < 4 { s[4 + j] & 0x3f } else { (s[4 + j] >> 4) | ((s[j] >> 2) & 0x30) });
    (sc, m)
}

/// Q4_K (144 bytes: f16 `d`, f16 `dmin`, 12 scale bytes, 128 bytes of nibbles). Element `e = 64 j + 32 s + l`
/// (`s < 2`) is `(qs[32 j + l] >> 4 s) & 15`, sub-block `e / 32`: `x = (d * sc) * q - (dmin * m)`.
pub fn block_q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for (e, o) in out.iter_mut().enumerate().take(QK_K) {
        let (j, s, l) = (e / 64, (e / 32) % 2, e % 32);
        let q = (qs[32 * j + l] >> (4 * s)) & 0x0f;
        let dl = d * sc[e / 32] as f32;
        let dm = dmin * m[e / 32] as f32;
        *o = dl * q as f32 - dm;
    }
}

/// Q5_K (176 bytes: f16 `d`, f16 `dmin`, 12 scale bytes, 32 bytes `qh`, 128 bytes of nibbles). Low 4 bits as
/// Q4_K, fifth bit `(qh[e % 32] >> (e / 32)) & 1`; `x = (d * sc) * q - (dmin * m)`.
pub fn block_q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (e, o) in out.iter_mut().enumerate().take(QK_K) {
        let (j, s, l) = (e / 64, (e / 32) % 2, e % 32);
        let q = ((qs[32 * j + l] >> (4 * s)) & 0x0f) | (((qh[l] >> (e / 32)) & 1) << 4);
        let dl = d * sc[e / 32] as f32;
        let dm = dmin * m[e / 32] as f32;
        *o = dl * q as f32 - dm;
    }
}

/// Q6_K (210 bytes: 128 bytes `ql`, 64 bytes `qh`, 16 × i8 scales, f16 `d`). Element `e = 128 h + 32 s + l`
/// (`s < 4`) has low 4 bits `(ql[64 h + 32 (s % 2) + l] >> 4 (s / 2)) & 15` and high 2 bits
/// `(qh[32 h + l] >> 2 s) & 3`; `q = bits - 32`, `x = (d * scale[e / 16]) * q`.
pub fn block_q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (e, o) in out.iter_mut().enumerate().take(QK_K) {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = (ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0f;
        let high = (qh[32 * h + l] >> (2 * s)) & 3;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * (scales[e / 16] as i8) as f32;
        *o = dl * q as f32;
    }
}

/// A block decoder: `ty.block_bytes()` bytes in, `ty.block_elements()` values out.
pub type BlockFn = fn(&[u8], &mut [f32]);

/// The block decoder of `ty`, or `None` when lowbit cannot decode it ([`GgmlType::can_dequantize`]).
pub fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => block_f32,
        F16 => block_f16,
        BF16 => block_bf16,
        Q8_0 => block_q8_0,
        Q4_0 => block_q4_0,
        Q4_1 => block_q4_1,
        Q5_0 => block_q5_0,
        Q5_1 => block_q5_1,
        Q2_K => block_q2_k,
        Q3_K => block_q3_k,
        Q4_K => block_q4_k,
        Q5_K => block_q5_k,
        Q6_K => block_q6_k,
        _ => return None,
    })
}

/// Decodes whole blocks of `ty`: `data` holds `out.len() / ty.block_elements()` blocks. Does nothing for a type
/// lowbit cannot decode (the public API rejects those first).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    if let Some(f) = block_fn(ty) {
        for (b, o) in data.chunks_exact(ty.block_bytes()).zip(out.chunks_exact_mut(ty.block_elements())) {
            f(b, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_equals_numpy_on_known_patterns() {
        // From numpy: np.array([b], np.uint16).view(np.float16).astype(np.float32).view(np.uint32).
        let numpy = [
            (0x7c01u16, 0x7f80_2000u32),
            (0xfe00, 0xffc0_0000),
            (0x0001, 0x3380_0000),
            (0x8000, 0x8000_0000),
            (0x3c00, 0x3f80_0000),
            (0x7bff, 0x477f_e000),
            (0x03ff, 0x387f_c000),
            (0x7c00, 0x7f80_0000),
        ];
        for (h, want) in numpy {
            assert_eq!(f16_bits_to_f32(h).to_bits(), want, "{h:#06x}");
        }
    }

    #[test]
    fn f16_widening_matches_half_except_for_the_nan_quiet_bit() {
        for h in 0..=u16::MAX {
            let ours = f16_bits_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
                // Same sign and payload; numpy keeps a signalling NaN signalling.
                assert_eq!(ours.to_bits() | 0x0040_0000, theirs.to_bits(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn q3_k_and_k_scale_unpacking_follow_the_bit_diagrams() {
        // Q3_K scale j: low nibble from byte j % 8 (high nibble when j >= 8), high pair from byte 8 + j % 4 at
        // bits 2 (j / 4); value - 32.
        let mut sb = [0u8; 12];
        sb[1] = 0x70; // scale 9's low nibble (byte 1, high nibble)
        sb[9] = 0b10 << 4; // scale 9's high pair (byte 9, bits 4..6)
        sb[2] = 0x0a; // scale 2's low nibble
        sb[10] = 0b01; // scale 2's high pair (byte 10, bits 0..2)
        let s = q3_k_scales(&sb);
        assert_eq!(s[9], 0b10_0111 - 32);
        assert_eq!(s[2], 0b01_1010 - 32);
        assert_eq!(s[1], -32);
        assert_eq!(s[5], -32);
        // Q4_K: j = 5 takes sc from byte 9's low nibble and byte 1's top 2 bits, m from byte 9's high nibble and
        // byte 5's top 2 bits.
        let mut s = [0u8; 12];
        s[9] = 0xa3;
        s[1] = 0b1100_0000;
        s[5] = 0b0100_0000;
        let (sc, m) = k_scale_min(&s);
        assert_eq!(sc[5], 0x03 | (0b11 << 4));
        assert_eq!(m[5], 0x0a | (0b01 << 4));
        assert_eq!(sc[1], 0);
        assert_eq!(m[1], 0);
    }
}
