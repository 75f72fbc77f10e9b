//! The quantized formats a file can hold, behind one interface for `dequantize` and `inspect`:
//! lowbit's int8 layout ([`crate::int8_layout`]) and the bitsandbytes 4-bit layout ([`lowbit::io::bnb`]).

use crate::error::CliError;
use crate::int8_layout::Int8Layout;
use lowbit::affine::AffineTensor;
use lowbit::io::{bnb, Checkpoint, StoredType, TensorData};
use lowbit::linear::QuantWeight;
use lowbit::nf4::{BlockScales, FourBitTensor};
use lowbit::{DType, Scheme};
use safetensors::SafeTensors;

/// Suffixes of the entries bitsandbytes stores next to a 4-bit weight `W` (besides `W` itself and
/// `W.quant_state.bitsandbytes__*`).
const BNB_SUFFIXES: [&str; 4] = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"];

/// How the quantized weights of a file are stored.
pub enum Layout {
    /// `lowbit quantize --scheme int8` output.
    Int8(Int8Layout),
    /// bitsandbytes 4-bit (NF4/FP4) checkpoint; the names of its 4-bit weights, sorted.
    Bnb(Vec<String>),
}

/// One quantized weight, loaded and validated.
pub enum Quantized {
    /// int8 affine codes with the source dtype recorded in the metadata.
    Int8(AffineTensor, DType),
    /// NF4 / FP4 blocks.
    FourBit(FourBitTensor),
}

impl Layout {
    /// The layout [`Checkpoint::open`] detected; `None` for a plain checkpoint.
    pub fn of(ck: &Checkpoint) -> Option<Layout> {
        match ck.layout() {
            lowbit::io::Layout::Int8(l) => Some(Layout::Int8(l.clone())),
            lowbit::io::Layout::Bnb4bit => Some(Layout::Bnb(ck.quantized_weight_names().to_vec())),
            _ => None,
        }
    }

    /// Whether `name` is a quantized weight (a row of its own in listings).
    pub fn is_weight(&self, name: &str) -> bool {
        match self {
            Layout::Int8(l) => l.weights.contains_key(name),
            Layout::Bnb(names) => names.binary_search_by(|n| n.as_str().cmp(name)).is_ok(),
        }
    }

    /// The quantized weights, sorted.
    pub fn weights(&self) -> Vec<&str> {
        match self {
            Layout::Int8(l) => l.weights.keys().map(String::as_str).collect(),
            Layout::Bnb(names) => names.iter().map(String::as_str).collect(),
        }
    }

    /// Whether `key` stores parameters of a quantized weight (scales, zero points, tables, quant state).
    pub fn is_param_entry(&self, key: &str) -> bool {
        match self {
            Layout::Int8(l) => l.is_param_entry(key),
            Layout::Bnb(_) => {
                bnb::weight_of_quant_state_key(key).is_some()
                    || BNB_SUFFIXES.iter().any(|s| key.strip_suffix(s).is_some_and(|w| self.is_weight(w)))
            }
        }
    }

    /// The quantized weight whose parameters `key` stores (`W` for `W.scale`, `W.absmax`,
    /// `W.quant_state.bitsandbytes__nf4`, ...), or `None` when `key` is not a parameter entry.
    pub fn owner_of_param_entry<'k>(&self, key: &'k str) -> Option<&'k str> {
        let suffixes: &[&str] = match self {
            Layout::Int8(_) => &[".scale", ".zero_point"],
            Layout::Bnb(_) => {
                if let Some(w) = bnb::weight_of_quant_state_key(key).filter(|w| self.is_weight(w)) {
                    return Some(w);
                }
                &BNB_SUFFIXES
            }
        };
        suffixes.iter().find_map(|s| key.strip_suffix(s).filter(|w| self.is_weight(w)))
    }

    /// Loads and validates weight `name`.
    pub fn load(&self, st: &SafeTensors<'_>, name: &str) -> Result<Quantized, CliError> {
        match self {
            Layout::Int8(l) => Ok(Quantized::Int8(l.load(st, name)?, l.weights[name])),
            Layout::Bnb(_) => Ok(Quantized::FourBit(bnb::load_weight(st, name)?)),
        }
    }
}

impl Quantized {
    /// Shape of the original weight.
    pub fn shape(&self) -> &[usize] {
        match self {
            Quantized::Int8(q, _) => q.shape(),
            Quantized::FourBit(t) => t.shape(),
        }
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        match self {
            Quantized::Int8(q, _) => q.codes().len(),
            Quantized::FourBit(t) => t.numel(),
        }
    }

    /// The dtype the weight had before quantization.
    pub fn source_dtype(&self) -> DType {
        match self {
            Quantized::Int8(_, d) => *d,
            Quantized::FourBit(t) => t.dtype(),
        }
    }

    /// Human description, e.g. `int8 group:128` or `nf4 block:64 nested`.
    pub fn describe(&self) -> String {
        match self {
            Quantized::Int8(q, _) => describe_int8(q),
            Quantized::FourBit(t) => describe_4bit(t),
        }
    }

    /// Storage cost in bits per weight, parameters included.
    pub fn bits_per_weight(&self) -> f64 {
        match self {
            Quantized::Int8(q, _) => q.bits_per_weight(),
            Quantized::FourBit(t) => t.bits_per_weight(),
        }
    }

    /// The dequantized values in f32.
    pub fn dequantize_f32(&self) -> Result<Vec<f32>, CliError> {
        Ok(match self {
            Quantized::Int8(q, _) => q.dequantize()?,
            Quantized::FourBit(t) => t.dequantize()?,
        })
    }

    /// The dequantized values as little-endian bytes of `dtype`.
    pub fn dequantize_to_bytes(&self, dtype: DType) -> Result<Vec<u8>, CliError> {
        let bytes = match self {
            Quantized::Int8(q, _) => q.dequantize_to_bytes(dtype)?,
            Quantized::FourBit(t) => match dtype {
                DType::F32 => le_bytes(&t.dequantize::<f32>()?, |v| v.to_le_bytes()),
                DType::F16 => le_bytes(&t.dequantize::<lowbit::f16>()?, |v| v.to_le_bytes()),
                DType::BF16 => le_bytes(&t.dequantize::<lowbit::bf16>()?, |v| v.to_le_bytes()),
            },
        };
        Ok(bytes)
    }
}

/// How a checkpoint tensor is stored, for listings: the safetensors dtype (`F32`, `U8`, ...) or the ggml type
/// (`Q4_1`, ...).
pub fn stored_name(stored: StoredType) -> String {
    match stored {
        StoredType::Safetensors(d) => format!("{d:?}"),
        StoredType::Ggml(t) => t.name().to_string(),
    }
}

/// [`Quantized::describe`] for a layer's weight.
pub fn describe_weight(w: &QuantWeight) -> String {
    match w {
        QuantWeight::Int8(q) => describe_int8(q),
        QuantWeight::FourBit(t) => describe_4bit(t),
    }
}

fn describe_int8(q: &AffineTensor) -> String {
    format!("int8 {}", q.granularity())
}

fn describe_4bit(t: &FourBitTensor) -> String {
    let nested = if matches!(t.scales(), BlockScales::Double(_)) { " nested" } else { "" };
    format!("{} block:{}{nested}", t.format(), t.blocksize())
}

/// The values as little-endian bytes: one `memcpy` on a little-endian machine, `f` per element elsewhere.
fn le_bytes<T: bytemuck::Pod, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") && std::mem::size_of::<T>() == N {
        return bytemuck::cast_slice::<T, u8>(v).to_vec();
    }
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

/// Loads quantized weight `name` of `ck` (stored in `layout`): its entries (the codes and every parameter entry
/// `layout` assigns to it, from whichever shard holds them) are copied into a small in-memory file and read by
/// [`Layout::load`], so every layout rule applies as for a single file.
pub fn load_from_checkpoint(ck: &Checkpoint, layout: &Layout, name: &str) -> Result<Quantized, CliError> {
    let mut entries = vec![(name.to_string(), TensorData::from_view(&ck.tensor(name)?))];
    for key in ck.tensor_names() {
        if layout.owner_of_param_entry(key) == Some(name) {
            entries.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?)));
        }
    }
    let bytes = lowbit::io::serialize_safetensors(&entries, None)?;
    let st = lowbit::io::parse_safetensors(&bytes)?;
    layout.load(&st, name)
}

/// `values` (f32) as little-endian bytes of `dtype`, rounded to nearest even (exact for f32).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => le_bytes(values, f32::to_le_bytes),
        DType::F16 => le_bytes(values, |v| lowbit::f16::from_f32(v).to_le_bytes()),
        DType::BF16 => le_bytes(values, |v| lowbit::bf16::from_f32(v).to_le_bytes()),
    }
}

/// `values` rounded to `dtype` (nearest even) and widened back to f32: what a dense `dtype` file holds.
pub fn round_to(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => values.to_vec(),
        DType::F16 => values.iter().map(|&v| lowbit::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => values.iter().map(|&v| lowbit::bf16::from_f32(v).to_f32()).collect(),
    }
}

/// Quantizes `values` (`shape`) with `scheme`; a 4-bit weight records `source` as its dtype (as `quantize`
/// records the source dtype).
pub fn quantize_f32(values: &[f32], shape: &[usize], scheme: Scheme, source: DType) -> Result<QuantWeight, CliError> {
    Ok(match scheme.validate()? {
        Scheme::Int8(g) => QuantWeight::Int8(lowbit::affine::quantize(values, shape, g)?),
        Scheme::FourBit { format, blocksize, double_quant } => {
            let q = lowbit::nf4::quantize_4bit(format, values, shape, blocksize, double_quant)?;
            QuantWeight::FourBit(FourBitTensor::from_parts(
                q.shape().to_vec(),
                q.format(),
                q.blocksize(),
                *q.table(),
                q.packed().to_vec(),
                q.scales().clone(),
                source,
            )?)
        }
    })
}

/// Whether `w` is stored exactly as `scheme` would store it (same granularity; same format, block size and
/// double quantization).
pub fn is_in_scheme(w: &QuantWeight, scheme: Scheme) -> bool {
    match (w, scheme) {
        (QuantWeight::Int8(q), Scheme::Int8(g)) => q.granularity() == g,
        (QuantWeight::FourBit(t), Scheme::FourBit { format, blocksize, double_quant }) => {
            t.format() == format
                && t.blocksize() == blocksize
                && matches!(t.scales(), BlockScales::Double(_)) == double_quant
        }
        _ => false,
    }
}

/// The entries that store `w` under `name`: the bitsandbytes layout for 4-bit weights, lowbit's int8 layout
/// (codes, scales, zero points; the metadata is the caller's) otherwise.
pub fn weight_to_tensors(name: &str, w: &QuantWeight) -> Result<Vec<(String, TensorData)>, CliError> {
    Ok(match w {
        QuantWeight::FourBit(t) => bnb::to_tensors(name, t)?,
        QuantWeight::Int8(q) => crate::int8_layout::to_tensors(name, q).into(),
    })
}

impl Quantized {
    /// The weight as the library's [`QuantWeight`] (the int8 source dtype is dropped).
    pub fn into_weight(self) -> QuantWeight {
        match self {
            Quantized::Int8(q, _) => QuantWeight::Int8(q),
            Quantized::FourBit(t) => QuantWeight::FourBit(t),
        }
    }
}

/// `w` dequantized to f32 by the fast paths (bit-identical to the reference), `[out, in]` row-major.
pub fn dequantize_weight(w: &QuantWeight) -> Result<Vec<f32>, CliError> {
    Ok(match w {
        QuantWeight::Int8(q) => q.dequantize::<f32>()?,
        QuantWeight::FourBit(t) => t.dequantize::<f32>()?,
    })
}
