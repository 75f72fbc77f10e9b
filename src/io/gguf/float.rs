//! Exact widening of GGUF's F32, F16 and BF16 tensor data to f32, as numpy's `astype(np.float32)` (what
//! gguf-py's `dequantize` does for these types) gives it: every value exact, NaN payloads kept bit for bit
//! (a signalling f16 NaN stays signalling; hardware conversions would set the quiet bit).

use crate::format::ggml::GgmlType;

/// f16 bits → f32 bits: exact for every value, NaN payloads shifted into place unchanged.
pub(crate) fn f16_bits_to_f32_bits(h: u16) -> u32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1f;
    let man = u32::from(h) & 0x3ff;
    match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man × 2^-24, normalised for f32.
            let shift = man.leading_zeros() - 21; // brings the leading 1 to bit 10
            let man = (man << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (man << 13)
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    }
}

/// Decodes F32, F16 or BF16 little-endian data (any alignment) to f32; `None` for any other type.
pub(crate) fn widen(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        GgmlType::F16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits(f16_bits_to_f32_bits(u16::from_le_bytes([b[0], b[1]]))))
            .collect(),
        GgmlType::BF16 => {
            data.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)).collect()
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_is_exact_and_keeps_nan_payloads() {
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
            assert_eq!(f16_bits_to_f32_bits(h), want, "{h:#06x}");
        }
        for h in 0..=u16::MAX {
            let v = half::f16::from_bits(h);
            let got = f32::from_bits(f16_bits_to_f32_bits(h));
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), v.to_f32().to_bits(), "{h:#06x}");
            }
        }
    }
}
