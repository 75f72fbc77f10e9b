//! [`Embedding`]: the token embedding `[vocab, hidden]`, dense f32 (what transformers runs) or int8-quantized
//! (a quarter of the memory; rows dequantized on lookup, bit-identical to lowbit's dequantization), in which
//! case a tied `lm_head` runs on the same quantized matrix through lowbit's fused kernels.

use crate::{Error, Result};
use lowbit::linear::{QuantLinear, QuantWeight};
use std::sync::Arc;

/// The token embedding.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// Dense f32, row-major `[vocab, hidden]`.
    F32(Vec<f32>),
    /// An int8 weight `[vocab, hidden]` (any granularity; no bias, no adapters), shared with a GPU upload.
    Int8(Arc<QuantLinear>),
}

impl Embedding {
    /// An int8 embedding from a quantized matrix; errors for a 4-bit weight, a bias or adapters.
    pub fn int8(q: QuantLinear) -> Result<Embedding> {
        if !matches!(q.weight(), QuantWeight::Int8(_)) || q.bias().is_some() || !q.adapters().is_empty() {
            return Err(Error::Model(
                "a quantized embedding must be an int8 weight without bias or adapters (4-bit embeddings are not supported)"
                    .into(),
            ));
        }
        Ok(Embedding::Int8(Arc::new(q)))
    }

    /// `(rows, cols)`.
    pub fn dims(&self, hidden: usize) -> (usize, usize) {
        match self {
            Embedding::F32(v) => (v.len() / hidden.max(1), hidden),
            Embedding::Int8(q) => (q.out_features(), q.in_features()),
        }
    }

    /// The dense matrix, when it is one.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Embedding::F32(v) => Some(v),
            Embedding::Int8(_) => None,
        }
    }

    /// The whole matrix in f32 (a copy for a quantized one: for references and tests).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Embedding::F32(v) => v.clone(),
            Embedding::Int8(q) => q.weight().dequantize_reference(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Embedding::F32(v) => v.len() * 4,
            Embedding::Int8(q) => match q.weight() {
                QuantWeight::Int8(t) => (t.bits_per_weight() * t.codes().len() as f64 / 8.0) as usize,
                QuantWeight::FourBit(t) => {
                    (t.bits_per_weight() * (q.out_features() * q.in_features()) as f64 / 8.0) as usize
                }
            },
        }
    }

    /// Row `token` into `out` (`hidden` values; a dense matrix is read as rows of `out.len()`). Errors for a
    /// token past the last row, or (int8) an `out` of another length than its rows.
    pub fn row_into(&self, token: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.dims(out.len());
        if token >= rows || out.len() != cols {
            return Err(Error::Invalid(format!(
                "embedding row {token} into {} values: the embedding has {rows} rows of {cols}",
                out.len()
            )));
        }
        match self {
            Embedding::F32(v) => {
                out.copy_from_slice(&v[token * cols..(token + 1) * cols]);
                Ok(())
            }
            Embedding::Int8(q) => match q.weight() {
                QuantWeight::Int8(t) => Ok(t.dequantize_rows_into(token..token + 1, out)?),
                QuantWeight::FourBit(_) => Err(Error::Model("a 4-bit embedding (not constructible)".into())),
            },
        }
    }

    /// Whether every value is finite (a quantized one is by construction).
    pub fn is_finite(&self) -> bool {
        match self {
            Embedding::F32(v) => v.iter().all(|x| x.is_finite()),
            Embedding::Int8(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_equal_the_dequantized_matrix_and_bad_rows_are_errors() {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.37).collect();
        let q = QuantWeight::quantize(&w, &[4, 3], "int8:channel".parse().unwrap()).unwrap();
        let full = q.dequantize_reference();
        let e = Embedding::int8(QuantLinear::new(q, None).unwrap()).unwrap();
        for (emb, want, knows_width) in [(Embedding::F32(w.clone()), &w, false), (e, &full, true)] {
            let mut out = [0.0f32; 3];
            for t in 0..4 {
                emb.row_into(t, &mut out).unwrap();
                assert_eq!(
                    out.map(f32::to_bits),
                    <[f32; 3]>::try_from(&want[t * 3..t * 3 + 3]).unwrap().map(f32::to_bits)
                );
            }
            assert!(emb.row_into(4, &mut out).is_err(), "past the last row");
            // A dense matrix has no row width of its own (rows of `out.len()`); an int8 one does.
            assert_eq!(emb.row_into(0, &mut [0.0; 2]).is_err(), knows_width, "a short row");
            assert!(emb.row_into(usize::MAX / 2, &mut out).is_err(), "a huge token id");
        }
        let four_bit = QuantWeight::quantize(&[0.5; 64], &[1, 64], "nf4:64".parse().unwrap()).unwrap();
        assert!(Embedding::int8(QuantLinear::new(four_bit, None).unwrap()).is_err());
    }
}
