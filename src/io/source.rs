//! Where the loaders read tensors from: one parsed safetensors buffer (borrowed, so its tensors are copied
//! into owned storage) or a [`Checkpoint`](crate::io::Checkpoint) (shared, memory-mapped: its tensors
//! become views). Every layout reader (bitsandbytes, int8, the bias rule) is written once against [`Source`].

use crate::io::{float_dtype, Limits};
use crate::storage::Bytes;
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};

/// One tensor of a [`Source`]: dtype, shape and its bytes (validated against the buffer by the parser).
pub(crate) struct Entry<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// A set of named tensors.
pub(crate) trait Source {
    /// Every tensor name (any order).
    fn names(&self) -> Vec<&str>;
    /// The tensor `name`, or `None` when there is none.
    fn entry(&self, name: &str) -> Option<Entry<'_>>;
    /// The bytes of tensor `name` (`entry` is its entry) as storage for a quantized tensor: a view sharing the
    /// source's buffer when it is shared, else a copy.
    fn bytes(&self, name: &str, entry: &Entry<'_>) -> Bytes;
}

/// A parsed safetensors buffer that the caller owns: tensors are copied out.
pub(crate) struct Borrowed<'s, 'd>(pub &'s SafeTensors<'d>);

impl Source for Borrowed<'_, '_> {
    fn names(&self) -> Vec<&str> {
        self.0.names()
    }
    fn entry(&self, name: &str) -> Option<Entry<'_>> {
        let v = self.0.tensor(name).ok()?;
        Some(Entry { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data() })
    }
    fn bytes(&self, _name: &str, entry: &Entry<'_>) -> Bytes {
        Bytes::from(entry.data)
    }
}

/// Decodes little-endian F32 / F16 / BF16 bytes (any alignment) to f32; `name` names the tensor in errors.
pub(crate) fn bytes_to_f32(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(Error::format(
                format!("tensor `{name}`"),
                format!("dtype {other:?}, expected F32, F16 or BF16"),
            ))
        }
    };
    Ok(out)
}

/// The bias rule, shared by every loader: the optional `key` (`{P}.bias` of layer `P`) must be an F32, F16 or
/// BF16 tensor of `out_features` elements (any shape with that many elements), within
/// [`Limits::max_tensor_bytes`]. Returns `None` when there is no such tensor.
pub(crate) fn bias_entry<'a>(
    src: &'a dyn Source,
    key: &str,
    out_features: usize,
    limits: &Limits,
) -> Result<Option<Entry<'a>>> {
    let Some(e) = src.entry(key) else { return Ok(None) };
    let numel =
        crate::shape::numel(&e.shape).map_err(|err| Error::format(format!("tensor `{key}`"), err.to_string()))?;
    if float_dtype(e.dtype).is_none() {
        return Err(Error::format(
            format!("tensor `{key}`"),
            format!("dtype {:?}, expected F32 or F16 or BF16 (a layer bias)", e.dtype),
        ));
    }
    if numel != out_features {
        return Err(Error::format(
            format!("tensor `{key}`"),
            format!("{numel} elements (shape {:?}), expected {out_features} (one per output feature)", e.shape),
        ));
    }
    limits.check_tensor_bytes(&format!("tensor `{key}`"), e.data.len())?;
    Ok(Some(e))
}

/// [`bias_entry`] decoded to f32 and checked finite.
pub(crate) fn bias_f32(src: &dyn Source, key: &str, out_features: usize, limits: &Limits) -> Result<Option<Vec<f32>>> {
    let Some(e) = bias_entry(src, key, out_features, limits)? else { return Ok(None) };
    let b = bytes_to_f32(key, e.dtype, e.data)?;
    crate::element::check_finite(key, &b)?;
    Ok(Some(b))
}
