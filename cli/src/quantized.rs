//! The quantized formats a file can hold, behind one interface for `dequantize` and `inspect`:
//! lowbit's int8 layout ([`crate::int8_layout`]) and the bitsandbytes 4-bit layout ([`lowbit::io::bnb`]).

use crate::error::CliError;
use crate::int8_layout::Int8Layout;
use lowbit::affine::AffineTensor;
use lowbit::io::{bnb, Checkpoint};
use lowbit::linear::QuantWeight;
use lowbit::nf4::{BlockScales, FourBitTensor};
use lowbit::DType;
use safetensors::SafeTensors;
use std::collections::HashMap;

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
    /// Detects the layout from the metadata (int8) or the tensor names (bitsandbytes), by the library's one
    /// detection rule ([`lowbit::io::Layout::detect`]); `None` for a plain file.
    pub fn detect(meta: &HashMap<String, String>, st: &SafeTensors<'_>) -> Result<Option<Layout>, CliError> {
        Ok(match lowbit::io::Layout::detect(meta, st.names())? {
            lowbit::io::Layout::Int8(l) => Some(Layout::Int8(l)),
            lowbit::io::Layout::Bnb4bit => Some(Layout::Bnb(bnb::quantized_weight_names(st))),
            _ => None,
        })
    }

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

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}
