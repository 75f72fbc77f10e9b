//! A valid bitsandbytes 4-bit layer, then structured corruptions: the quant-state JSON's fields (shape,
//! block sizes, types, nesting, offsets, unknown keys, raw text), tensor lengths, dtypes, shapes and bytes,
//! removed or renamed keys. The loader must return Ok or Err; whatever loads must dequantize identically on
//! every path and survive a write/read round trip.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::io::{bnb, parse_safetensors_with_limits};
use lowbit::nf4::{quantize_4bit, FourBitFormat, BLOCK_SIZES};

const NAME: &str = "model.layers.0.mlp.up_proj.weight";
const PREFIX: &str = "model.layers.0.mlp.up_proj.";

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn value(&self) -> serde_json::Value {
        use serde_json::Value as V;
        match self {
            Json::Null => V::Null,
            Json::Bool(b) => V::Bool(*b),
            Json::U64(u) => V::from(*u),
            Json::I64(i) => V::from(*i),
            Json::F64(f) => serde_json::Number::from_f64(*f).map_or(V::Null, V::Number),
            Json::Str(s) => V::String(s.clone()),
            Json::Array(a) => V::Array(a.iter().map(Json::value).collect()),
            Json::Object(o) => V::Object(o.iter().map(|(k, v)| (k.clone(), v.value())).collect()),
        }
    }
}

const FIELDS: [&str; 8] =
    ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset", "extra"];
const DTYPES: [&str; 12] = ["U8", "I8", "F16", "BF16", "F32", "F64", "I32", "U16", "BOOL", "F8_E4M3", "I64", "??"];

#[derive(Arbitrary, Debug)]
enum Mutation {
    /// Replace the JSON `shape` by these dimensions.
    Shape(Vec<u64>),
    /// Set one of the known fields (or an unknown one) to an arbitrary JSON value.
    Field(u8, Json),
    /// Set a known integer field to a number.
    Number(u8, u64),
    /// Remove a field.
    RemoveField(u8),
    /// Replace the whole JSON text.
    RawJson(String),
    /// Truncate tensor `i` to `len` bytes (shape recomputed as 1-D of the dtype, or kept: `keep_shape`).
    Truncate { tensor: u8, len: u16, keep_shape: bool },
    /// Append bytes to tensor `i`.
    Extend { tensor: u8, bytes: Vec<u8>, keep_shape: bool },
    /// Overwrite bytes of tensor `i` at `offset`.
    Poke { tensor: u8, offset: u16, bytes: Vec<u8> },
    /// Change the dtype name of tensor `i`.
    Dtype { tensor: u8, dtype: u8 },
    /// Change the declared shape of tensor `i` (bytes unchanged).
    Reshape { tensor: u8, shape: Vec<u64> },
    /// Remove tensor `i`.
    Remove(u8),
    /// Rename tensor `i`.
    Rename { tensor: u8, name: String },
    /// Add a quant-state key with another suffix and the same JSON.
    ExtraQuantState(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    rows: u8,
    cols: u8,
    fp4: bool,
    double_quant: bool,
    blocksize: u8,
    bias: bool,
    seed: u64,
    mutations: Vec<Mutation>,
}

fn tensor_entry(name: &str, t: &lowbit::io::TensorData) -> (String, String, Vec<u64>, Vec<u8>) {
    (name.to_string(), format!("{:?}", t.dtype), t.shape.iter().map(|&d| d as u64).collect(), t.data.clone())
}

fn dtype_size(name: &str) -> u64 {
    match name {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" | "U16" => 2,
        _ => 1,
    }
}

fuzz_target!(|input: Input| {
    let (rows, cols) = (input.rows as usize % 40, input.cols as usize % 200 + 1);
    let bs = BLOCK_SIZES[input.blocksize as usize % 4];
    let format = if input.fp4 { FourBitFormat::Fp4 } else { FourBitFormat::Nf4 };
    let mut s = common::Stretch::new(input.seed);
    let w: Vec<f32> = (0..rows * cols).map(|_| ((s.next_u64() >> 40) as f32 / 8388608.0 - 1.0) * 0.1).collect();
    let t = quantize_4bit(format, &w, &[rows, cols], bs, input.double_quant).expect("valid input quantizes");
    let mut tensors: Vec<(String, String, Vec<u64>, Vec<u8>)> =
        bnb::to_tensors(NAME, &t).unwrap().iter().map(|(n, d)| tensor_entry(n, d)).collect();
    if input.bias {
        let b: Vec<u8> = (0..rows).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
        tensors.push((format!("{PREFIX}bias"), "F32".into(), vec![rows as u64], b));
    }
    let qs_index = tensors.iter().position(|(n, ..)| n.contains(".quant_state.")).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&tensors[qs_index].3).unwrap();
    let mut raw_json: Option<String> = None;

    for m in input.mutations.iter().take(8) {
        let n = tensors.len().max(1);
        match m {
            Mutation::Shape(dims) => json["shape"] = serde_json::json!(dims),
            Mutation::Field(f, v) => json[FIELDS[*f as usize % FIELDS.len()]] = v.value(),
            Mutation::Number(f, v) => json[FIELDS[*f as usize % FIELDS.len()]] = serde_json::json!(v),
            Mutation::RemoveField(f) => {
                json.as_object_mut().map(|o| o.remove(FIELDS[*f as usize % FIELDS.len()]));
            }
            Mutation::RawJson(text) => raw_json = Some(text.clone()),
            Mutation::Truncate { tensor, len, keep_shape } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    e.3.truncate(*len as usize);
                    if !keep_shape {
                        e.2 = vec![e.3.len() as u64 / dtype_size(&e.1)];
                    }
                }
            }
            Mutation::Extend { tensor, bytes, keep_shape } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    e.3.extend_from_slice(bytes);
                    if !keep_shape {
                        e.2 = vec![e.3.len() as u64 / dtype_size(&e.1)];
                    }
                }
            }
            Mutation::Poke { tensor, offset, bytes } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    for (i, b) in bytes.iter().enumerate() {
                        let len = e.3.len();
                        if len > 0 {
                            e.3[(*offset as usize + i) % len] = *b;
                        }
                    }
                }
            }
            Mutation::Dtype { tensor, dtype } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    e.1 = DTYPES[*dtype as usize % DTYPES.len()].to_string();
                }
            }
            Mutation::Reshape { tensor, shape } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    e.2 = shape.iter().take(6).copied().collect();
                }
            }
            Mutation::Remove(i) => {
                if !tensors.is_empty() {
                    tensors.remove(*i as usize % n);
                }
            }
            Mutation::Rename { tensor, name } => {
                if let Some(e) = tensors.get_mut(*tensor as usize % n) {
                    e.0 = name.clone();
                }
            }
            Mutation::ExtraQuantState(suffix) => {
                let data = serde_json::to_vec(&json).unwrap();
                tensors.push((format!("{NAME}.quant_state.{suffix}"), "U8".into(), vec![data.len() as u64], data));
            }
        }
    }
    // The (possibly mutated) JSON goes back into the quant-state tensor, if it is still there.
    if let Some(e) = tensors.iter_mut().find(|(n, ..)| n.contains(".quant_state.bitsandbytes__")) {
        let text = raw_json.unwrap_or_else(|| json.to_string());
        e.2 = vec![text.len() as u64];
        e.3 = text.into_bytes();
    }
    let bytes = common::write_safetensors(&tensors);
    let limits = common::limits();
    let Ok(st) = parse_safetensors_with_limits(&bytes, &limits) else { return };
    if let Ok(all) = bnb::load_checkpoint_with_limits(&st, &limits) {
        for (name, t) in &all {
            common::check_four_bit(name, t);
        }
    }
    if let Ok(layer) = bnb::load_layer_with_limits(&st, PREFIX, &limits) {
        layer.bias_f32().expect("a loaded bias decodes");
        common::check_four_bit(NAME, &layer.weight);
    }
});
