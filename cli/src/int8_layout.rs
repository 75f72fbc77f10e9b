//! The int8 file layout written by `lowbit quantize --scheme int8` and read by `dequantize` and `inspect`.
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
//! [`lowbit::affine::AffineTensor::scales`]' layout. The header's `__metadata__` records
//! `lowbit.scheme = int8`, `lowbit.granularity = tensor|channel|group:G` and, per quantized weight,
//! `lowbit.dtype.NAME = float32|float16|bfloat16` (the source dtype, PyTorch's name). The `lowbit.dtype.*`
//! keys are the list of quantized weights; every other tensor of the file is plain.

use crate::error::{CliError, Context};
use lowbit::affine::{AffineTensor, Granularity};
use lowbit::io::TensorData;
use lowbit::DType;
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

/// Key of the scales of weight `name`.
pub fn scale_key(name: &str) -> String {
    format!("{name}.scale")
}

/// Key of the zero points of weight `name`.
pub fn zero_point_key(name: &str) -> String {
    format!("{name}.zero_point")
}

/// The three entries that store `q` under `name`.
pub fn to_tensors(name: &str, q: &AffineTensor) -> [(String, TensorData); 3] {
    let n = q.scales().len();
    [
        (name.to_string(), TensorData::from_slice(Dtype::U8, q.shape().to_vec(), q.codes())),
        (scale_key(name), TensorData::from_slice(Dtype::F32, vec![n], &le_f32_bytes(q.scales()))),
        (zero_point_key(name), TensorData::from_slice(Dtype::U8, vec![n], q.zero_points())),
    ]
}

fn le_f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// What the metadata of an int8 file says.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Layout {
    /// The granularity every quantized weight uses.
    pub granularity: Granularity,
    /// Quantized weights by name, with their source dtype.
    pub weights: BTreeMap<String, DType>,
}

impl Int8Layout {
    /// Reads the layout from a file's metadata: `Ok(None)` when the file has no `lowbit.scheme` key, an error
    /// when the scheme is not `int8` or a key is malformed.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Option<Int8Layout>, CliError> {
        let Some(scheme) = meta.get(SCHEME_KEY) else { return Ok(None) };
        if scheme != SCHEME_INT8 {
            return Err(CliError::new(format!(
                "metadata `{SCHEME_KEY}` is {scheme:?}; this version of lowbit reads only \"{SCHEME_INT8}\""
            )));
        }
        let granularity: Granularity = meta
            .get(GRANULARITY_KEY)
            .ok_or_else(|| CliError::new(format!("metadata `{GRANULARITY_KEY}` is missing from an int8 file")))?
            .parse()
            .context(|| format!("metadata `{GRANULARITY_KEY}`"))?;
        let mut weights = BTreeMap::new();
        for (k, v) in meta {
            if let Some(name) = k.strip_prefix(DTYPE_KEY_PREFIX) {
                let dtype = DType::from_torch_name(v).ok_or_else(|| {
                    CliError::new(format!("metadata `{k}` is {v:?}; expected float32, float16 or bfloat16"))
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

    /// Loads weight `name` from `st`, checking every entry's dtype and length.
    pub fn load(&self, st: &SafeTensors<'_>, name: &str) -> Result<AffineTensor, CliError> {
        let ctx = || format!("int8 tensor `{name}`");
        let get = |key: &str, dtype: Dtype, one_d: bool| -> Result<_, CliError> {
            let view = st.tensor(key).map_err(|_| CliError::new(format!("entry `{key}` is missing")))?;
            if view.dtype() != dtype {
                return Err(CliError::new(format!("entry `{key}` has dtype {:?}, expected {dtype:?}", view.dtype())));
            }
            if one_d && view.shape().len() != 1 {
                return Err(CliError::new(format!("entry `{key}` has shape {:?}, expected 1-D", view.shape())));
            }
            Ok(view)
        };
        let codes = get(name, Dtype::U8, false).context(ctx)?;
        let scales = get(&scale_key(name), Dtype::F32, true).context(ctx)?;
        let zero_points = get(&zero_point_key(name), Dtype::U8, true).context(ctx)?;
        let scales = lowbit::io::view_to_f32(&scale_key(name), &scales).context(ctx)?;
        AffineTensor::from_parts(
            codes.shape().to_vec(),
            self.granularity,
            codes.data().to_vec(),
            scales,
            zero_points.data().to_vec(),
        )
        .context(ctx)
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
        meta.insert(SCHEME_KEY.to_string(), "int4".to_string());
        assert!(Int8Layout::from_metadata(&meta).is_err());
    }
}
