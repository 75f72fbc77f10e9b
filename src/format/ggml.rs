//! The tensor types of ggml / GGUF files (llama.cpp, Ollama, LM Studio): ids, block geometry and names.
//! Data only; dequantization is [`crate::ggml`], the rule per type is in `docs/formats.md` §9.

use crate::{Error, Result};
use std::fmt;

/// A ggml tensor type, as stored in a GGUF tensor info (`ggml_type`, a `u32`). Every type ggml defines today
/// is listed so that a file using one lowbit cannot decode is reported by name; which ones lowbit decodes is
/// [`GgmlType::can_dequantize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// `(type, id, name, elements per block, bytes per block)`, as ggml's `ggml.h` / gguf-py's
/// `GGML_QUANT_SIZES` define them (checked against both). One disagreement: Q8_1 (an in-memory dot-product
/// format, never stored in model files) is 36 bytes in ggml (`d`, `s` as f16; `ggml-common.h` asserts it)
/// while gguf-py's table still says 40 (the old f32 layout); lowbit follows ggml. NVFP4 and Q1_0 are the
/// newest ids.
const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// Every type, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|row| row.0)
    }

    /// The type with ggml id `id`, or `None` for an id ggml does not define (or no longer defines: 4, 5 and
    /// 31–33, 36–38 were removed; ids above 41 are not known to this build).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // Every variant has exactly one row (checked by a unit test).
        TABLE.iter().find(|row| row.0 == self).unwrap_or(&TABLE[0])
    }

    /// The ggml id stored in files.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's name (`Q4_K`, `F16`, ...).
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for plain types, 32 or 256 for quantized ones).
    pub fn block_elements(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// Whether [`crate::ggml::dequantize`] decodes this type to f32: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
    }

    /// Bytes that `elements` elements of this type occupy. Errors when `elements` is not a whole number of
    /// blocks (ggml requires every row to be) or the size overflows `usize`.
    pub fn bytes_for(self, elements: usize) -> Result<usize> {
        let (be, bb) = (self.block_elements(), self.block_bytes());
        if !elements.is_multiple_of(be) {
            return Err(Error::invalid(
                "element count",
                format!("{elements} elements of {}", self.name()),
                format!("a multiple of its block of {be} elements"),
            ));
        }
        (elements / be).checked_mul(bb).ok_or_else(|| {
            Error::invalid(
                "element count",
                format!("{elements} elements of {}", self.name()),
                "a size that fits in usize",
            )
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(GgmlType::from_id(row.1), Some(row.0));
            assert_eq!(row.0.id(), row.1);
            assert!(TABLE[..i].iter().all(|r| r.0 != row.0 && r.1 != row.1), "{} listed twice", row.2);
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::Q4_K.bytes_for(512).unwrap(), 288);
        assert!(GgmlType::Q4_K.bytes_for(100).is_err());
        assert_eq!(GgmlType::from_id(42), None);
    }

    /// Geometry of every type lowbit decodes, spelled out from its block layout (`docs/formats.md` §9), so a
    /// wrong table row cannot agree with itself.
    #[test]
    fn decodable_geometry_matches_the_block_layouts() {
        use GgmlType::*;
        let qk_k = 256;
        let expected = [
            (F32, 1, 4),
            (F16, 1, 2),
            (BF16, 1, 2),
            (Q8_0, 32, 2 + 32),
            (Q4_0, 32, 2 + 16),
            (Q4_1, 32, 2 + 2 + 16),
            (Q5_0, 32, 2 + 4 + 16),
            (Q5_1, 32, 2 + 2 + 4 + 16),
            (Q2_K, qk_k, qk_k / 16 + qk_k / 4 + 2 + 2),
            (Q3_K, qk_k, qk_k / 8 + qk_k / 4 + 12 + 2),
            (Q4_K, qk_k, 2 + 2 + 12 + qk_k / 2),
            (Q5_K, qk_k, 2 + 2 + 12 + qk_k / 8 + qk_k / 2),
            (Q6_K, qk_k, qk_k / 2 + qk_k / 4 + qk_k / 16 + 2),
        ];
        for (ty, be, bb) in expected {
            assert!(ty.can_dequantize(), "{ty}");
            assert_eq!((ty.block_elements(), ty.block_bytes()), (be, bb), "{ty}");
        }
        assert_eq!(GgmlType::all().filter(|t| t.can_dequantize()).count(), expected.len());
    }
}
