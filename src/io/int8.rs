//! lowbit's own int8 file layout (what `lowbit quantize --scheme int8` writes), readable from the library.
//!
//! For each quantized weight `NAME` (shape `[d0, .., dn]`, seen as a row-major matrix with `dn` columns):
//!
//! | key | dtype, shape | meaning |
//! |---|---|---|
//! | `NAME` | U8 `[d0, .., dn]` | the codes, same shape as the weight |
//! | `NAME.scale` | F32 `[n]` | one scale per tensor / row / group, row-major |
//! | `NAME.zero_point` | U8 `[n]` | one zero point per entry, aligned with `NAME.scale` |
//!
//! `n` is 1 (tensor), `rows` (channel) or `rows * ceil(cols / G)` (group:G), exactly
//! [`AffineTensor::scales`]' layout. The header's `__metadata__` records `lowbit.scheme = int8`,
//! `lowbit.granularity = tensor|channel|group:G` and, per quantized weight, `lowbit.dtype.NAME =
//! float32|float16|bfloat16` (the source dtype, PyTorch's name). The `lowbit.dtype.*` keys are the list of
//! quantized weights; every other tensor of the file is plain.
//!
//! The CLI's `quantize`, `dequantize` and `inspect` use this module (one definition of the keys and checks);
//! errors are [`crate::Error`].
//!
//! ```
//! use lowbit::affine::{quantize, Granularity};
//! use lowbit::io::{int8, parse_safetensors, serialize_safetensors};
//!
//! let w: Vec<f32> = (0..4 * 6).map(|i| i as f32 * 0.1 - 1.0).collect();
//! let q = quantize(&w, &[4, 6], Granularity::PerChannel)?;
//! let bytes = serialize_safetensors(&int8::to_tensors("l.weight", &q), Some(int8::metadata(q.granularity(), [("l.weight", lowbit::DType::F32)])))?;
//! let file = parse_safetensors(&bytes)?;
//! let meta = int8::read_metadata(&bytes)?;
//! let layout = int8::Int8Layout::from_metadata(&meta)?.expect("an int8 file");
//! assert_eq!(layout.load(&file, "l.weight")?, q);
//! # Ok::<(), lowbit::Error>(())
//! ```

use crate::affine::{AffineTensor, Granularity};
use crate::io::source::{bytes_to_f32, Borrowed, Source};
use crate::io::{check_header, Limits, TensorData};
use crate::{DType, Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};

/// Metadata key holding the scheme (`int8`).
pub const SCHEME_KEY: &str = "lowbit.scheme";
/// Metadata key holding the granularity (`tensor`, `channel`, `group:G`).
pub const GRANULARITY_KEY: &str = "lowbit.granularity";
/// Prefix of the per-weight source dtype keys (`lowbit.dtype.NAME`).
pub const DTYPE_KEY_PREFIX: &str = "lowbit.dtype.";
/// Value of [`SCHEME_KEY`] for this layout.
pub const SCHEME_INT8: &str = "int8";

/// Key of the scales of weight `name` (`NAME.scale`).
pub fn scale_key(name: &str) -> String {
    format!("{name}.scale")
}

/// Key of the zero points of weight `name` (`NAME.zero_point`).
pub fn zero_point_key(name: &str) -> String {
    format!("{name}.zero_point")
}

/// The three entries that store `q` under `name`: codes (U8, `q`'s shape), scales (F32 `[n]`) and zero points
/// (U8 `[n]`).
pub fn to_tensors(name: &str, q: &AffineTensor) -> [(String, TensorData); 3] {
    let [scale, zero_point] = param_tensors(name, q.scales(), q.zero_points());
    [(name.to_string(), TensorData::from_slice(Dtype::U8, q.shape().to_vec(), q.codes())), scale, zero_point]
}

/// The entries [`to_tensors`] writes after the codes (`NAME.scale`, `NAME.zero_point`), from the parameters
/// alone: what a writer that streams the codes in pieces adds after them. The codes entry is `NAME`, U8 of the
/// weight's shape.
pub fn param_tensors(name: &str, scales: &[f32], zero_points: &[u8]) -> [(String, TensorData); 2] {
    let bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    [
        (scale_key(name), TensorData::from_slice(Dtype::F32, vec![scales.len()], &bytes)),
        (zero_point_key(name), TensorData::from_slice(Dtype::U8, vec![zero_points.len()], zero_points)),
    ]
}

/// The `__metadata__` of an int8 file holding `weights` (name and source dtype), all with `granularity`.
pub fn metadata<'a>(
    granularity: Granularity,
    weights: impl IntoIterator<Item = (&'a str, DType)>,
) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert(SCHEME_KEY.to_string(), SCHEME_INT8.to_string());
    meta.insert(GRANULARITY_KEY.to_string(), granularity.to_string());
    for (name, dtype) in weights {
        meta.insert(format!("{DTYPE_KEY_PREFIX}{name}"), dtype.torch_name().to_string());
    }
    meta
}

/// The `__metadata__` string map of safetensors bytes already in memory (empty if absent), under
/// [`Limits::DEFAULT`] (see [`read_metadata_with_limits`]).
pub fn read_metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    read_metadata_with_limits(bytes, &Limits::DEFAULT)
}

/// [`read_metadata`] under explicit limits: the header's declared length is checked against
/// [`Limits::max_json_bytes`] and the bytes present, and its nesting against [`Limits::max_json_depth`], before
/// it is parsed.
pub fn read_metadata_with_limits(bytes: &[u8], limits: &Limits) -> Result<HashMap<String, String>> {
    check_header(bytes, limits, "safetensors buffer")?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::format("safetensors buffer", e.to_string()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// What the metadata of an int8 file says.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Layout {
    /// The granularity every quantized weight uses.
    pub granularity: Granularity,
    /// Quantized weights by name (sorted), with their source dtype.
    pub weights: BTreeMap<String, DType>,
}

impl Int8Layout {
    /// Reads the layout from a file's metadata: `Ok(None)` when the file has no `lowbit.scheme` key; an
    /// [`Error::Format`] when the scheme is not `int8`, the granularity is missing or malformed, or a
    /// `lowbit.dtype.*` value is not a floating PyTorch dtype name.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Option<Int8Layout>> {
        let ctx = "lowbit int8 file metadata";
        let Some(scheme) = meta.get(SCHEME_KEY) else { return Ok(None) };
        if scheme != SCHEME_INT8 {
            return Err(Error::format(
                ctx,
                format!("`{SCHEME_KEY}` is {scheme:?}; this version of lowbit reads only \"{SCHEME_INT8}\""),
            ));
        }
        let granularity: Granularity = meta
            .get(GRANULARITY_KEY)
            .ok_or_else(|| Error::format(ctx, format!("`{GRANULARITY_KEY}` is missing from an int8 file")))?
            .parse()
            .map_err(|e| Error::format(ctx, format!("`{GRANULARITY_KEY}`: {e}")))?;
        let mut weights = BTreeMap::new();
        for (k, v) in meta {
            if let Some(name) = k.strip_prefix(DTYPE_KEY_PREFIX) {
                let dtype = DType::from_torch_name(v).ok_or_else(|| {
                    Error::format(ctx, format!("`{k}` is {v:?}; expected float32, float16 or bfloat16"))
                })?;
                weights.insert(name.to_string(), dtype);
            }
        }
        Ok(Some(Int8Layout { granularity, weights }))
    }

    /// Whether `key` is the `.scale` or `.zero_point` entry of a quantized weight.
    pub fn is_param_entry(&self, key: &str) -> bool {
        [".scale", ".zero_point"]
            .iter()
            .any(|suffix| key.strip_suffix(suffix).is_some_and(|w| self.weights.contains_key(w)))
    }

    /// Loads weight `name` from `st`, checking every entry's presence, dtype (U8 codes, F32 1-D scales, U8 1-D
    /// zero points) and length, and the scales (finite, positive) through [`AffineTensor::from_parts`], under
    /// [`Limits::DEFAULT`]. The codes are copied out of `st` ([`crate::io::Checkpoint::layer`] shares them).
    /// Errors are [`Error::Format`] naming the weight; never panics.
    pub fn load(&self, st: &SafeTensors<'_>, name: &str) -> Result<AffineTensor> {
        self.load_with_limits(st, name, &Limits::DEFAULT)
    }

    /// [`load`](Self::load) under explicit limits: the codes are refused if they are larger than
    /// [`Limits::max_tensor_bytes`], stored or decoded to f32 (`numel × 4`), before anything is copied.
    pub fn load_with_limits(&self, st: &SafeTensors<'_>, name: &str, limits: &Limits) -> Result<AffineTensor> {
        self.load_from(&Borrowed(st), name, limits)
    }

    pub(crate) fn load_from(&self, st: &dyn Source, name: &str, limits: &Limits) -> Result<AffineTensor> {
        let ctx = format!("int8 weight `{name}`");
        let get = |key: &str, dtype: Dtype, one_d: bool| -> Result<_> {
            let view = st.entry(key).ok_or_else(|| Error::format(&ctx, format!("entry `{key}` is missing")))?;
            if view.dtype != dtype {
                return Err(Error::format(
                    &ctx,
                    format!("entry `{key}` has dtype {:?}, expected {dtype:?}", view.dtype),
                ));
            }
            if one_d && view.shape.len() != 1 {
                return Err(Error::format(&ctx, format!("entry `{key}` has shape {:?}, expected 1-D", view.shape)));
            }
            limits.check_tensor_bytes(&format!("{ctx}: entry `{key}`"), view.data.len())?;
            Ok(view)
        };
        let codes = get(name, Dtype::U8, false)?;
        limits.check_elements(&format!("{ctx} decoded to f32"), codes.data.len(), 4)?;
        let scales = get(&scale_key(name), Dtype::F32, true)?;
        let zero_points = get(&zero_point_key(name), Dtype::U8, true)?;
        let scales = bytes_to_f32(&scale_key(name), scales.dtype, scales.data)?;
        AffineTensor::from_parts(
            codes.shape.clone(),
            self.granularity,
            st.bytes(name, &codes),
            scales,
            st.bytes(&zero_point_key(name), &zero_points),
        )
        .map_err(|e| Error::format(&ctx, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip_and_errors() {
        let mut meta = HashMap::new();
        assert_eq!(Int8Layout::from_metadata(&meta).unwrap(), None);
        meta.insert(SCHEME_KEY.to_string(), "int8".to_string());
        assert!(Int8Layout::from_metadata(&meta).is_err(), "granularity is required");
        meta.insert(GRANULARITY_KEY.to_string(), "group:32".to_string());
        meta.insert(format!("{DTYPE_KEY_PREFIX}a.weight"), "bfloat16".to_string());
        let l = Int8Layout::from_metadata(&meta).unwrap().unwrap();
        assert_eq!(l.granularity, Granularity::PerGroup(32));
        assert_eq!(l.weights["a.weight"], DType::BF16);
        assert!(l.is_param_entry("a.weight.scale") && l.is_param_entry("a.weight.zero_point"));
        assert!(!l.is_param_entry("a.weight") && !l.is_param_entry("b.scale"));
        assert_eq!(metadata(Granularity::PerGroup(32), [("a.weight", DType::BF16)]), meta);
        meta.insert(SCHEME_KEY.to_string(), "int4".to_string());
        assert!(Int8Layout::from_metadata(&meta).is_err());
    }
}
