//! The bitsandbytes 4-bit checkpoint layout (`docs/formats.md` §4): reading and writing [`FourBitTensor`]s
//! exactly as `bitsandbytes.nn.Linear4bit.state_dict()` (through `QuantState.as_dict(packed=True)`) stores them.
//!
//! For a weight named `W` (e.g. `model.layers.0.mlp.up_proj.weight`):
//!
//! | key | dtype, shape | meaning |
//! |---|---|---|
//! | `W` | u8 `[(numel+1)/2, 1]` | packed codes, first element in the high nibble |
//! | `W.absmax` | f32 `[nblocks]`, or u8 `[nblocks]` when double-quantized | block scales |
//! | `W.quant_map` | f32 `[16]` | the 4-bit table of `quant_type` |
//! | `W.nested_absmax` | f32 `[ceil(nblocks/256)]` | double quantization only |
//! | `W.nested_quant_map` | f32 `[256]` | double quantization only |
//! | `W.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8 `[len]` | UTF-8 JSON, see [`QuantStateJson`] |
//!
//! and a Linear layer's optional bias at `P.bias` for the layer prefix `P` (`W = P + "weight"`).
//!
//! Reading validates every entry (presence, dtype, length, JSON fields and types, finite values, exactly one
//! `quant_state` key per weight, nested parts present together) and compares every length with the bytes
//! actually present before anything proportional to a claimed shape is allocated, so a corrupt or hostile
//! file yields an [`Error::Format`], never a panic or an unbounded allocation. The plain loaders apply
//! [`Limits::DEFAULT`]; the `*_with_limits` variants take explicit [`Limits`] (largest tensor, JSON size and
//! depth).
//!
//! bitsandbytes decodes with its built-in table for `quant_type` and ignores the stored `quant_map` (its CUDA
//! GEMV uses the stored one), so a `quant_map` that differs from the built-in table is ambiguous: it is
//! rejected on reading, and [`to_tensors`] refuses to write a tensor whose table is not the built-in one.
//!
//! ```
//! use lowbit::io::{bnb, parse_safetensors, serialize_safetensors};
//! use lowbit::nf4::quantize_nf4;
//!
//! let w: Vec<f32> = (0..96 * 80).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
//! let q = quantize_nf4(&w, &[96, 80], 64, true)?;
//! let tensors = bnb::to_tensors("layer.weight", &q)?;
//! let bytes = serialize_safetensors(&tensors, None)?;
//! let file = parse_safetensors(&bytes)?;
//! let layer = bnb::load_layer(&file, "layer.")?;
//! assert_eq!(layer.weight, q);
//! assert!(layer.bias.is_none());
//! # Ok::<(), lowbit::Error>(())
//! ```

use crate::double_quant::DoubleQuantScales;
use crate::io::source::{self, bytes_to_f32, Borrowed, Entry, Source};
use crate::io::{float_dtype, view_to_f32, Limits, TensorData};
use crate::nf4::{BlockScales, FourBitFormat, FourBitTensor, BLOCK_SIZES};
use crate::{DType, Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;

/// The part of a quant-state key after the weight name: `W.quant_state.bitsandbytes__<quant_type>`.
pub const QUANT_STATE_INFIX: &str = ".quant_state.";
/// The prefix of the last key component, followed by the quant type (`nf4` / `fp4`).
pub const QUANT_STATE_TAG: &str = "bitsandbytes__";
/// Largest quant-state JSON accepted, in bytes (bitsandbytes writes about 200).
pub const MAX_QUANT_STATE_LEN: usize = 64 * 1024;
/// Largest number of dimensions accepted in a quant state's `shape`.
pub const MAX_DIMS: usize = 16;

/// The key of the quant-state blob of weight `name` for `format`: `name.quant_state.bitsandbytes__nf4`.
pub fn quant_state_key(name: &str, format: FourBitFormat) -> String {
    format!("{name}{QUANT_STATE_INFIX}{QUANT_STATE_TAG}{}", format.name())
}

/// The weight name of a quant-state key (`W.quant_state.bitsandbytes__*` gives `W`), or `None` for any other
/// key. Any last component starting with `bitsandbytes__` counts, so an unknown quant type is reported by the
/// loader instead of the weight being silently skipped.
pub fn weight_of_quant_state_key(key: &str) -> Option<&str> {
    let (weight, rest) = key.rsplit_once(QUANT_STATE_INFIX)?;
    (rest.starts_with(QUANT_STATE_TAG) && !weight.is_empty()).then_some(weight)
}

/// Whether any of `names` is a bitsandbytes 4-bit quant-state key, i.e. the file holds 4-bit weights.
pub fn is_bnb_quantized<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    names.into_iter().any(|n| weight_of_quant_state_key(n).is_some())
}

/// The names of every 4-bit weight in `file` (each weight with a `quant_state.bitsandbytes__*` key), sorted
/// and without duplicates.
pub fn quantized_weight_names(file: &SafeTensors<'_>) -> Vec<String> {
    crate::io::checkpoint::quantized_weights(&crate::io::Layout::Bnb4bit, &Borrowed(file))
}

/// Double-quantization fields of a [`QuantStateJson`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NestedJson {
    /// `nested_blocksize`: scales per nested block (256 in everything bitsandbytes writes).
    pub blocksize: usize,
    /// `nested_offset`: the mean subtracted from the scales before quantizing them (an f32 value; bitsandbytes
    /// writes it as a JSON number, the f32 widened to f64).
    pub offset: f32,
}

/// The fields of the `quant_state.bitsandbytes__*` JSON blob, in the order bitsandbytes writes them:
/// `quant_type`, `blocksize`, `dtype`, `shape`, and when double-quantized `nested_blocksize`, `nested_dtype`
/// (always `"float32"`) and `nested_offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateJson {
    /// `quant_type`: `"nf4"` or `"fp4"`.
    pub format: FourBitFormat,
    /// `blocksize`: one of [`BLOCK_SIZES`].
    pub blocksize: usize,
    /// `dtype`: the original weight dtype (`"float32"`, `"float16"` or `"bfloat16"`).
    pub dtype: DType,
    /// `shape`: the original weight shape (`[out, in]` for a Linear layer).
    pub shape: Vec<usize>,
    /// The nested fields, present iff the scales are double-quantized.
    pub nested: Option<NestedJson>,
}

fn json_usize(ctx: &str, obj: &serde_json::Map<String, serde_json::Value>, field: &str) -> Result<usize> {
    match obj.get(field) {
        None => Err(Error::format(ctx, format!("missing field `{field}`"))),
        Some(v) => v
            .as_u64()
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| Error::format(ctx, format!("field `{field}` is {v}, expected a non-negative integer"))),
    }
}

fn json_str<'a>(ctx: &str, obj: &'a serde_json::Map<String, serde_json::Value>, field: &str) -> Result<&'a str> {
    match obj.get(field) {
        None => Err(Error::format(ctx, format!("missing field `{field}`"))),
        Some(v) => v.as_str().ok_or_else(|| Error::format(ctx, format!("field `{field}` is {v}, expected a string"))),
    }
}

fn check_blocksize_field(ctx: &str, field: &str, bs: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&bs) {
        Ok(())
    } else {
        Err(Error::format(ctx, format!("`{field}` is {bs}, expected one of {BLOCK_SIZES:?}")))
    }
}

const KNOWN_FIELDS: [&str; 7] =
    ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"];
const NESTED_FIELDS: [&str; 3] = ["nested_blocksize", "nested_dtype", "nested_offset"];

impl QuantStateJson {
    /// Parses and validates the JSON bytes of a quant-state blob. `context` names the tensor in errors.
    ///
    /// Errors: not UTF-8 / not JSON / not an object, more than [`MAX_QUANT_STATE_LEN`] bytes, a missing,
    /// ill-typed or unknown field (bitsandbytes rejects unknown fields too), a quant type other than nf4/fp4,
    /// a block size outside [`BLOCK_SIZES`], an unknown dtype, a shape with more than [`MAX_DIMS`]
    /// dimensions or whose element count overflows, some but not all nested fields, a `nested_dtype` other
    /// than `"float32"`, or a non-finite `nested_offset` (or one outside the f32 range).
    pub fn parse(bytes: &[u8], context: &str) -> Result<QuantStateJson> {
        QuantStateJson::parse_with_limits(bytes, context, &Limits::DEFAULT)
    }

    /// [`parse`](Self::parse) under explicit limits: the JSON is refused before parsing if it is longer than
    /// the smaller of [`MAX_QUANT_STATE_LEN`] and [`Limits::max_json_bytes`] or nested deeper than
    /// [`Limits::max_json_depth`].
    pub fn parse_with_limits(bytes: &[u8], context: &str, limits: &Limits) -> Result<QuantStateJson> {
        if bytes.len() > MAX_QUANT_STATE_LEN {
            return Err(Error::format(
                context,
                format!("{} bytes of JSON, expected at most {MAX_QUANT_STATE_LEN}", bytes.len()),
            ));
        }
        let value = limits.parse_json(context, bytes)?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format(context, format!("JSON is {}, expected an object", json_kind(&value))))?;
        if let Some(k) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            return Err(Error::format(context, format!("unknown field `{k}`; expected only {KNOWN_FIELDS:?}")));
        }
        let qt = json_str(context, obj, "quant_type")?;
        let format = match qt {
            "nf4" => FourBitFormat::Nf4,
            "fp4" => FourBitFormat::Fp4,
            other => {
                return Err(Error::format(context, format!("`quant_type` is {other:?}, expected \"nf4\" or \"fp4\"")))
            }
        };
        let blocksize = json_usize(context, obj, "blocksize")?;
        check_blocksize_field(context, "blocksize", blocksize)?;
        let dt = json_str(context, obj, "dtype")?;
        let dtype = DType::from_torch_name(dt).ok_or_else(|| {
            Error::format(context, format!("`dtype` is {dt:?}, expected \"float32\", \"float16\" or \"bfloat16\""))
        })?;
        let shape = match obj.get("shape") {
            None => return Err(Error::format(context, "missing field `shape`")),
            Some(serde_json::Value::Array(a)) => {
                if a.len() > MAX_DIMS {
                    return Err(Error::format(
                        context,
                        format!("`shape` has {} dimensions, expected at most {MAX_DIMS}", a.len()),
                    ));
                }
                a.iter()
                    .map(|d| {
                        d.as_u64().and_then(|u| usize::try_from(u).ok()).ok_or_else(|| {
                            Error::format(context, format!("`shape` holds {d}, expected non-negative integers"))
                        })
                    })
                    .collect::<Result<Vec<usize>>>()?
            }
            Some(v) => return Err(Error::format(context, format!("`shape` is {v}, expected a list of integers"))),
        };
        if crate::shape::numel(&shape).is_err() {
            return Err(Error::format(context, format!("`shape` {shape:?} has more elements than fit in usize")));
        }
        let present: Vec<&str> = NESTED_FIELDS.iter().copied().filter(|f| obj.contains_key(*f)).collect();
        let nested = match present.len() {
            0 => None,
            3 => {
                let nbs = json_usize(context, obj, "nested_blocksize")?;
                check_blocksize_field(context, "nested_blocksize", nbs)?;
                let nd = json_str(context, obj, "nested_dtype")?;
                if nd != "float32" {
                    return Err(Error::format(context, format!("`nested_dtype` is {nd:?}, expected \"float32\"")));
                }
                let v = &obj["nested_offset"];
                let off = v
                    .as_f64()
                    .ok_or_else(|| Error::format(context, format!("`nested_offset` is {v}, expected a number")))?;
                let off32 = off as f32;
                if !off32.is_finite() {
                    return Err(Error::format(context, format!("`nested_offset` is {off}, expected a finite f32")));
                }
                Some(NestedJson { blocksize: nbs, offset: off32 })
            }
            _ => {
                return Err(Error::format(
                    context,
                    format!("has nested fields {present:?} but not all of {NESTED_FIELDS:?}"),
                ))
            }
        };
        Ok(QuantStateJson { format, blocksize, dtype, shape, nested })
    }

    /// The JSON text bitsandbytes writes for these fields, byte for byte: Python's `json.dumps` of the dict
    /// (separators `", "` and `": "`, fields in bitsandbytes' order, `nested_offset` printed like Python's
    /// `repr(float)`). Errors if `nested_offset` is not finite.
    pub fn to_json(&self) -> Result<String> {
        use std::fmt::Write;
        let mut s = String::with_capacity(200);
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.format.name(),
            self.blocksize,
            self.dtype.torch_name(),
            dims.join(", ")
        );
        if let Some(n) = self.nested {
            if !n.offset.is_finite() {
                return Err(Error::invalid("nested_offset", n.offset, "a finite f32"));
            }
            let _ = write!(
                s,
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.blocksize,
                python_float_repr(n.offset as f64)
            );
        }
        s.push('}');
        Ok(s)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Formats a finite f64 exactly like Python's `repr(float)` (and so `json.dumps`): the shortest digits that
/// round-trip, fixed notation with at least one fractional digit when the decimal exponent is in `-4..16`,
/// otherwise `d.ddde±XX` with at least two exponent digits (`1e-05`, `1.5e+16`).
pub fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    if !v.is_finite() {
        // json.dumps writes these names (not valid JSON); lowbit never writes them.
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "d.ddde-X" / "de-X".
    let e = format!("{:e}", v.abs());
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if v < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// A 4-bit Linear layer read from a bitsandbytes checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4bitLayer {
    /// The quantized weight (`[out, in]`).
    pub weight: FourBitTensor,
    /// The bias as stored (floating dtype, shape `[out]`), if the layer has one.
    pub bias: Option<TensorData>,
}

impl Bnb4bitLayer {
    /// The bias widened to f32, if present.
    pub fn bias_f32(&self) -> Result<Option<Vec<f32>>> {
        let Some(b) = &self.bias else { return Ok(None) };
        let view = TensorView::new(b.dtype, b.shape.clone(), &b.data)
            .map_err(|e| Error::format("bias", format!("inconsistent tensor: {e}")))?;
        view_to_f32("bias", &view).map(Some)
    }

    /// The bias' element type, if present (always a floating type).
    pub fn bias_dtype(&self) -> Option<DType> {
        self.bias.as_ref().and_then(|b| float_dtype(b.dtype))
    }
}

fn get<'a>(src: &'a dyn Source, key: &str) -> Option<Entry<'a>> {
    src.entry(key)
}

fn require<'a>(src: &'a dyn Source, key: &str, weight: &str) -> Result<Entry<'a>> {
    get(src, key)
        .ok_or_else(|| Error::format(format!("bitsandbytes weight `{weight}`"), format!("missing tensor `{key}`")))
}

fn check_view(view: &Entry<'_>, key: &str, dtypes: &[Dtype], len: usize, what: &str) -> Result<()> {
    let ctx = format!("tensor `{key}`");
    if !dtypes.contains(&view.dtype) {
        return Err(Error::format(ctx, format!("dtype {:?}, expected {}", view.dtype, dtype_list(dtypes))));
    }
    // safetensors validated the shape against the data length; numel is checked anyway.
    let numel = crate::shape::numel(&view.shape).map_err(|e| Error::format(&ctx, e.to_string()))?;
    if numel != len {
        return Err(Error::format(ctx, format!("{numel} elements (shape {:?}), expected {len} ({what})", view.shape)));
    }
    Ok(())
}

fn dtype_list(d: &[Dtype]) -> String {
    d.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(" or ")
}

fn f32_values(view: &Entry<'_>, key: &str) -> Result<Vec<f32>> {
    let v = bytes_to_f32(key, view.dtype, view.data)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(
            format!("tensor `{key}`"),
            format!("non-finite value {} at index {i}, expected finite values", v[i]),
        ));
    }
    Ok(v)
}

/// Reads the 4-bit weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`) from `file`.
///
/// Errors ([`Error::Format`]) on any inconsistency listed in the module docs: no or several
/// `name.quant_state.*` keys, a quant-state suffix that does not match the JSON's `quant_type`, bad JSON,
/// wrong dtypes or lengths (`(numel+1)/2` packed bytes, `ceil(numel/blocksize)` scales,
/// `ceil(nblocks/nested_blocksize)` nested scales, 16 / 256 table entries), non-finite or negative scales,
/// non-finite tables, a `quant_map` different from the built-in table, or nested parts present without the
/// others.
pub fn load_weight(file: &SafeTensors<'_>, name: &str) -> Result<FourBitTensor> {
    load_weight_with_limits(file, name, &Limits::DEFAULT)
}

/// [`load_weight`] under explicit limits: the quant-state JSON is checked against [`Limits::max_json_bytes`]
/// and [`Limits::max_json_depth`] before it is parsed, and the weight against [`Limits::max_tensor_bytes`]
/// (its packed bytes, and `numel × 4` bytes decoded to f32) before anything is copied.
pub fn load_weight_with_limits(file: &SafeTensors<'_>, name: &str, limits: &Limits) -> Result<FourBitTensor> {
    load_weight_from(&Borrowed(file), name, limits)
}

/// [`load_weight_with_limits`] on any [`Source`]: the packed codes and the double-quantized scale codes are
/// [`Source::bytes`] (views of a shared checkpoint, copies of a borrowed buffer).
pub(crate) fn load_weight_from(file: &dyn Source, name: &str, limits: &Limits) -> Result<FourBitTensor> {
    let ctx = format!("bitsandbytes weight `{name}`");
    let qs_prefix = format!("{name}{QUANT_STATE_INFIX}");
    // The keys bitsandbytes writes are looked up directly (a hash lookup each), so loading every weight of a
    // checkpoint is linear in its number of tensors. Only when neither is present are all names scanned, to
    // name what is there instead (an error path, taken at most once per load). Known limitation: an extra
    // unknown `W.quant_state.*` key next to a valid nf4/fp4 one is not noticed.
    let known: Vec<String> =
        [FourBitFormat::Fp4, FourBitFormat::Nf4].iter().map(|f| quant_state_key(name, *f)).collect();
    let mut qs_keys: Vec<&str> = known.iter().map(String::as_str).filter(|k| file.entry(k).is_some()).collect();
    let names;
    if qs_keys.is_empty() {
        names = file.names();
        qs_keys = names.iter().copied().filter(|k| k.starts_with(&qs_prefix)).collect();
    }
    qs_keys.sort();
    let qs_key = match qs_keys.as_slice() {
        [] => return Err(Error::format(ctx, format!("no `{qs_prefix}{QUANT_STATE_TAG}*` tensor: not a 4-bit weight"))),
        [k] => *k,
        many => {
            return Err(Error::format(
                ctx,
                format!("{} quant-state tensors {many:?}, expected exactly one", many.len()),
            ))
        }
    };
    let suffix = &qs_key[qs_prefix.len()..];
    let Some(tag_type) = suffix.strip_prefix(QUANT_STATE_TAG) else {
        return Err(Error::format(
            ctx,
            format!("quant-state key `{qs_key}` does not end in `{QUANT_STATE_TAG}nf4|fp4`"),
        ));
    };
    let qs_view = require(file, qs_key, name)?;
    if qs_view.dtype != Dtype::U8 {
        return Err(Error::format(
            format!("tensor `{qs_key}`"),
            format!("dtype {:?}, expected U8 (UTF-8 JSON bytes)", qs_view.dtype),
        ));
    }
    let qs = QuantStateJson::parse_with_limits(qs_view.data, &format!("quant state `{qs_key}`"), limits)?;
    if tag_type != qs.format.name() {
        return Err(Error::format(
            ctx,
            format!("key `{qs_key}` says quant type {tag_type:?} but its JSON says {:?}", qs.format.name()),
        ));
    }

    // Lengths implied by the (validated, non-overflowing) shape; nothing is allocated from them.
    let numel = crate::shape::numel(&qs.shape).map_err(|_| Error::format(&ctx, "shape overflows"))?;
    let packed_len = numel.div_ceil(2);
    let nblocks = numel.div_ceil(qs.blocksize);

    // Packed codes: bitsandbytes stores u8 [(n+1)/2, 1]; other `quant_storage` dtypes are read as raw bytes,
    // as bitsandbytes does (`A.view(torch.uint8)`).
    let w = require(file, name, name)?;
    const STORAGE: [Dtype; 5] = [Dtype::U8, Dtype::I8, Dtype::F16, Dtype::BF16, Dtype::F32];
    if !STORAGE.contains(&w.dtype) {
        return Err(Error::format(
            format!("tensor `{name}`"),
            format!("dtype {:?}, expected U8 packed 4-bit codes", w.dtype),
        ));
    }
    if w.data.len() != packed_len {
        return Err(Error::format(
            format!("tensor `{name}`"),
            format!(
                "{} bytes (shape {:?}), expected (numel + 1) / 2 = {packed_len} for shape {:?}",
                w.data.len(),
                w.shape,
                qs.shape
            ),
        ));
    }
    limits.check_tensor_bytes(&format!("tensor `{name}`"), w.data.len())?;
    // The packed bytes are present (checked above); the decoded tensor must fit the limit too.
    limits.check_elements(&format!("tensor `{name}` decoded to f32"), numel, 4)?;

    let qmap_key = format!("{name}.quant_map");
    let qmap_view = require(file, &qmap_key, name)?;
    check_view(&qmap_view, &qmap_key, &[Dtype::F32], 16, "the 16-entry 4-bit table")?;
    let qmap = f32_values(&qmap_view, &qmap_key)?;
    let table: [f32; 16] = std::array::from_fn(|i| qmap[i]);
    let builtin = qs.format.table();
    if let Some(i) = (0..16).find(|&i| table[i].to_bits() != builtin[i].to_bits()) {
        return Err(Error::format(
            format!("tensor `{qmap_key}`"),
            format!(
                "entry {i} is {:e}, expected {:e} of the built-in {} table (bitsandbytes decodes with the built-in \
                 table and ignores quant_map, so a different quant_map is ambiguous)",
                table[i],
                builtin[i],
                qs.format.name()
            ),
        ));
    }

    let absmax_key = format!("{name}.absmax");
    let absmax_view = require(file, &absmax_key, name)?;
    let nested_key = format!("{name}.nested_absmax");
    let nmap_key = format!("{name}.nested_quant_map");
    let nested_view = get(file, &nested_key);
    let nmap_view = get(file, &nmap_key);
    let what = format!("ceil({numel} / {}) blocks", qs.blocksize);
    let scales = match (qs.nested, nested_view, nmap_view) {
        (None, None, None) => {
            check_view(&absmax_view, &absmax_key, &[Dtype::F32], nblocks, &what)?;
            let a = f32_values(&absmax_view, &absmax_key)?;
            if let Some(i) = a.iter().position(|v| *v < 0.0) {
                return Err(Error::format(
                    format!("tensor `{absmax_key}`"),
                    format!("negative scale {} at index {i}", a[i]),
                ));
            }
            BlockScales::Plain(a)
        }
        (Some(n), Some(nv), Some(mv)) => {
            check_view(&absmax_view, &absmax_key, &[Dtype::U8], nblocks, &format!("{what}, double-quantized codes"))?;
            let nn = nblocks.div_ceil(n.blocksize);
            check_view(
                &nv,
                &nested_key,
                &[Dtype::F32],
                nn,
                &format!("ceil({nblocks} / {}) nested blocks", n.blocksize),
            )?;
            let nested_absmax = f32_values(&nv, &nested_key)?;
            if let Some(i) = nested_absmax.iter().position(|v| *v < 0.0) {
                return Err(Error::format(
                    format!("tensor `{nested_key}`"),
                    format!("negative scale {} at index {i}", nested_absmax[i]),
                ));
            }
            check_view(&mv, &nmap_key, &[Dtype::F32], 256, "the 256-entry dynamic map")?;
            let m = f32_values(&mv, &nmap_key)?;
            let map: Box<[f32; 256]> = Box::new(std::array::from_fn(|i| m[i]));
            let codes = file.bytes(&absmax_key, &absmax_view);
            let dq = DoubleQuantScales::from_parts(codes, nested_absmax, n.offset, n.blocksize, map)
                .map_err(|e| Error::format(&ctx, format!("double-quantized scales: {e}")))?;
            BlockScales::Double(dq)
        }
        (nested, nv, mv) => {
            let have = |b: bool| if b { "present" } else { "absent" };
            return Err(Error::format(
                ctx,
                format!(
                    "double-quantization parts disagree: JSON nested fields {}, `{nested_key}` {}, `{nmap_key}` {} \
                     (all three must be present or all absent)",
                    have(nested.is_some()),
                    have(nv.is_some()),
                    have(mv.is_some())
                ),
            ));
        }
    };
    let packed = file.bytes(name, &w);
    FourBitTensor::from_parts(qs.shape, qs.format, qs.blocksize, table, packed, scales, qs.dtype)
        .map_err(|e| Error::format(ctx, e.to_string()))
}

/// Reads one 4-bit Linear layer: the weight `{prefix}weight` (see [`load_weight`]) and the optional bias
/// `{prefix}bias`. `prefix` is the module path with its trailing dot (`"model.layers.0.mlp.up_proj."`), or
/// `""` for a bare layer state dict. The tensors are copied out of `file`; [`crate::io::Checkpoint::layer`]
/// reads the same layout (same checks, same bias rule) without copying the packed codes.
///
/// Errors as [`load_weight`], and when the bias is not an F32/F16/BF16 tensor of `shape[0]` elements.
pub fn load_layer(file: &SafeTensors<'_>, prefix: &str) -> Result<Bnb4bitLayer> {
    load_layer_with_limits(file, prefix, &Limits::DEFAULT)
}

/// [`load_layer`] under explicit limits (see [`load_weight_with_limits`]).
pub fn load_layer_with_limits(file: &SafeTensors<'_>, prefix: &str, limits: &Limits) -> Result<Bnb4bitLayer> {
    let src = Borrowed(file);
    let name = format!("{prefix}weight");
    let weight = load_weight_from(&src, &name, limits)?;
    let bias_key = format!("{prefix}bias");
    let out = weight.shape().first().copied().unwrap_or(1);
    let bias = source::bias_entry(&src, &bias_key, out, limits)?.map(|b| TensorData {
        dtype: b.dtype,
        shape: b.shape,
        data: b.data.to_vec(),
    });
    Ok(Bnb4bitLayer { weight, bias })
}

/// Reads every 4-bit weight of a checkpoint (every name with a `quant_state.bitsandbytes__*` key), sorted by
/// name. Other tensors (embeddings, norms, biases) are ignored. Errors as [`load_weight`] on the first bad
/// weight.
pub fn load_checkpoint(file: &SafeTensors<'_>) -> Result<Vec<(String, FourBitTensor)>> {
    load_checkpoint_with_limits(file, &Limits::DEFAULT)
}

/// [`load_checkpoint`] under explicit limits (see [`load_weight_with_limits`]).
pub fn load_checkpoint_with_limits(file: &SafeTensors<'_>, limits: &Limits) -> Result<Vec<(String, FourBitTensor)>> {
    let mut out = BTreeMap::new();
    for name in quantized_weight_names(file) {
        let t = load_weight_with_limits(file, &name, limits)?;
        out.insert(name, t);
    }
    Ok(out.into_iter().collect())
}

/// The quant-state fields of `t` (what [`to_tensors`] writes as JSON).
pub fn quant_state_of(t: &FourBitTensor) -> QuantStateJson {
    quant_state(t.format(), t.blocksize(), t.dtype(), t.shape().to_vec(), t.scales())
}

/// The quant-state fields of a 4-bit weight of `shape` (quantized from `dtype`) with `scales`.
pub fn quant_state(
    format: FourBitFormat,
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    scales: &BlockScales,
) -> QuantStateJson {
    QuantStateJson {
        format,
        blocksize,
        dtype,
        shape,
        nested: match scales {
            BlockScales::Plain(_) => None,
            BlockScales::Double(d) => Some(NestedJson { blocksize: d.nested_blocksize(), offset: d.offset() }),
        },
    }
}

/// The validity rule shared by the writer and the reader for a 4-bit weight's name and shape: the name is
/// non-empty (a quant-state key `.quant_state.bitsandbytes__*` with nothing before it names no weight, so the
/// reader would not see the weight) and the shape has at most [`MAX_DIMS`] dimensions (the reader refuses a
/// longer quant-state `shape`). The quant-state JSON itself must be at most [`MAX_QUANT_STATE_LEN`] bytes,
/// checked by [`to_tensors`] once it is built.
pub fn check_writable(name: &str, shape: &[usize]) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(
            "tensor name",
            "\"\" (empty)",
            "a non-empty name (the reader cannot find a weight with an empty name)",
        ));
    }
    if shape.len() > MAX_DIMS {
        return Err(Error::invalid(
            "shape",
            format!("{shape:?} of weight {name:?} ({} dimensions)", shape.len()),
            format!("at most {MAX_DIMS} dimensions (MAX_DIMS; the reader refuses more)"),
        ));
    }
    Ok(())
}

/// The tensors bitsandbytes stores for weight `name` (module docs), in the order of
/// `QuantState.as_dict(packed=True)` after the weight itself: `name`, `name.absmax`, `name.quant_map`,
/// [`name.nested_absmax`, `name.nested_quant_map`,] `name.quant_state.bitsandbytes__<type>`.
///
/// Errors if `t`'s table is not the built-in table of its format (bitsandbytes would decode it with the
/// built-in one), and on anything the reader would refuse ([`check_writable`]): what this writes, lowbit reads.
pub fn to_tensors(name: &str, t: &FourBitTensor) -> Result<Vec<(String, TensorData)>> {
    let builtin = t.format().table();
    if let Some(i) = (0..16).find(|&i| t.table()[i].to_bits() != builtin[i].to_bits()) {
        return Err(Error::invalid(
            "table",
            format!("entry {i} = {:e}", t.table()[i]),
            format!("the built-in {} table ({:e}); bitsandbytes ignores a stored quant_map", t.format(), builtin[i]),
        ));
    }
    let params = param_tensors(name, &quant_state_of(t), t.scales())?;
    let mut out = vec![(name.to_string(), TensorData::from_slice(Dtype::U8, vec![t.packed().len(), 1], t.packed()))];
    out.extend(params);
    Ok(out)
}

/// The entries [`to_tensors`] writes after the packed codes (`name.absmax`, ..., the quant state), from the
/// quant state and the block scales alone: what a writer that streams the codes in pieces (see
/// [`SafetensorsWriter::begin`](crate::io::SafetensorsWriter::begin)) adds after them. The codes entry is
/// `name`, U8 of shape `[(numel + 1) / 2, 1]`. Errors as [`to_tensors`] ([`check_writable`], the quant-state
/// size), or when the number of scales does not match the shape and block size.
pub fn param_tensors(name: &str, state: &QuantStateJson, scales: &BlockScales) -> Result<Vec<(String, TensorData)>> {
    check_writable(name, &state.shape)?;
    let numel = crate::shape::numel(&state.shape)?;
    let nb = numel.div_ceil(state.blocksize.max(1));
    if scales.len() != nb {
        return Err(Error::shape(
            format!("number of block scales for shape {:?}, block size {}", state.shape, state.blocksize),
            scales.len(),
            nb,
        ));
    }
    let json = state.to_json()?;
    if json.len() > MAX_QUANT_STATE_LEN {
        return Err(Error::invalid(
            "quant state",
            format!("{} bytes of JSON for weight {name:?}", json.len()),
            format!("at most {MAX_QUANT_STATE_LEN} (MAX_QUANT_STATE_LEN; the reader refuses more)"),
        ));
    }
    let table = state.format.table();
    let mut out = Vec::with_capacity(5);
    match scales {
        BlockScales::Plain(a) => {
            out.push((format!("{name}.absmax"), TensorData::from_slice(Dtype::F32, vec![nb], a)));
            out.push((format!("{name}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], table)));
        }
        BlockScales::Double(d) => {
            out.push((format!("{name}.absmax"), TensorData::from_slice(Dtype::U8, vec![nb], d.codes())));
            out.push((format!("{name}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], table)));
            let nn = d.nested_absmax();
            out.push((format!("{name}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![nn.len()], nn)));
            out.push((format!("{name}.nested_quant_map"), TensorData::from_slice(Dtype::F32, vec![256], &d.map()[..])));
        }
    }
    out.push((
        quant_state_key(name, state.format),
        TensorData::from_slice(Dtype::U8, vec![json.len()], json.as_bytes()),
    ));
    Ok(out)
}

/// The tensors of a whole Linear layer under `prefix` (`{prefix}weight...` from [`to_tensors`], then
/// `{prefix}bias` if given). Errors as [`to_tensors`], or if the bias is not a floating tensor of
/// `shape[0]` elements.
pub fn layer_to_tensors(prefix: &str, layer: &Bnb4bitLayer) -> Result<Vec<(String, TensorData)>> {
    let mut out = to_tensors(&format!("{prefix}weight"), &layer.weight)?;
    if let Some(b) = &layer.bias {
        let out_features = layer.weight.shape().first().copied().unwrap_or(1);
        let n = crate::shape::numel(&b.shape).unwrap_or(usize::MAX);
        let ok =
            float_dtype(b.dtype).is_some_and(|d| n.checked_mul(d.size()) == Some(b.data.len())) && n == out_features;
        if !ok {
            return Err(Error::shape(
                format!("bias of {prefix}weight (dtype {:?}, shape {:?})", b.dtype, b.shape),
                n,
                out_features,
            ));
        }
        out.push((format!("{prefix}bias"), b.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_matches_json_dumps() {
        // Values checked against Python 3.11 `json.dumps(float(np.float32(v)))`.
        for (v, s) in [
            (0.12885741889476776f64, "0.12885741889476776"),
            (3.833235025405884, "3.833235025405884"),
            (1e-05, "1e-05"),
            (1.5e-05, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (2.0, "2.0"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (100.0, "100.0"),
            (1.2345678e20, "1.2345678e+20"),
            (f32::MIN_POSITIVE as f64, "1.1754943508222875e-38"),
        ] {
            assert_eq!(python_float_repr(v), s, "{v:e}");
        }
    }

    #[test]
    fn quant_state_json_round_trip() {
        let q = QuantStateJson {
            format: FourBitFormat::Nf4,
            blocksize: 64,
            dtype: DType::BF16,
            shape: vec![96, 80],
            nested: Some(NestedJson { blocksize: 256, offset: 0.128_857_42 }),
        };
        let s = q.to_json().unwrap();
        assert_eq!(
            s,
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [96, 80], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.12885741889476776}"
        );
        assert_eq!(QuantStateJson::parse(s.as_bytes(), "t").unwrap(), q);
    }

    #[test]
    fn key_helpers() {
        assert_eq!(weight_of_quant_state_key("a.weight.quant_state.bitsandbytes__nf4"), Some("a.weight"));
        assert_eq!(weight_of_quant_state_key("a.weight.absmax"), None);
        assert_eq!(weight_of_quant_state_key(".quant_state.bitsandbytes__nf4"), None);
        assert!(is_bnb_quantized(["x", "w.quant_state.bitsandbytes__fp4"]));
        assert!(!is_bnb_quantized(["x", "w.absmax"]));
        assert_eq!(quant_state_key("w", FourBitFormat::Fp4), "w.quant_state.bitsandbytes__fp4");
    }
}
