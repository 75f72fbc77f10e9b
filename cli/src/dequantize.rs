//! `lowbit dequantize`: turns a quantized checkpoint (lowbit int8 or bitsandbytes 4-bit; a safetensors file or
//! a model directory, single or sharded; or a GGUF, whose quantized ggml tensors are decoded) back into
//! floating point, as one safetensors file or a dense model directory.

use crate::console;
use crate::error::{CliError, Context};
use crate::hf_config;
use crate::output::Sink;
use crate::progress::Progress;
use crate::quantize::{is_floating, plain_tensor};
use crate::quantized::{Layout, Quantized};
use lowbit::format::ggml::GgmlType;
use lowbit::io::{safetensors_dtype, Checkpoint, StoredType, TensorData};
use lowbit::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What `lowbit dequantize` was asked to do.
pub struct Dequantize<'a> {
    /// Checkpoint to read.
    pub input: &'a Path,
    /// `*.safetensors` file or model directory to write.
    pub output: &'a Path,
    /// Element type of the dequantized weights (see [`run`]).
    pub dtype: Option<DType>,
    /// Largest shard of a model directory, in tensor bytes.
    pub max_shard_size: u64,
    /// Replace an existing output.
    pub force: bool,
    /// Let values beyond the range of an f16 / bf16 `dtype` round to ±inf (IEEE rounding) instead of failing.
    pub allow_overflow: bool,
}

/// Dequantizes every quantized weight of `d.input` and writes `d.output`; parameter entries are dropped and
/// every other tensor is copied unchanged. The dtype is `d.dtype` if given, else f32 for int8 weights and
/// GGUF tensors of quantized ggml types, and the dtype each bitsandbytes quant state records for 4-bit
/// weights. A directory output gets the input's `config.json` without `quantization_config`.
///
/// A finite value that becomes ±inf in an f16 / bf16 output (|x| beyond 65504 for f16) is an error naming the
/// first such element (tensor, index, value), unless `d.allow_overflow`: then the
/// IEEE rounding is kept (±inf written) and the summary counts those elements.
pub fn run(d: Dequantize<'_>) -> Result<(), CliError> {
    let ck = Checkpoint::open(d.input)?;
    let names: Vec<String> = ck.tensor_names().into_iter().map(str::to_string).collect();
    let mut ggml_quantized = 0usize;
    for name in &names {
        if let StoredType::Ggml(t) = ck.tensor_info(name)?.stored {
            if !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                ggml_quantized += 1;
            }
        }
    }
    let layout = Layout::of(&ck);
    if layout.is_none() && ggml_quantized == 0 {
        return Err(CliError::new(format!(
            "{} holds no quantized tensors (no `lowbit.scheme` metadata, no bitsandbytes quant_state entries, no \
             quantized GGUF tensors); nothing to dequantize",
            d.input.display()
        )));
    }
    let mut metadata = ck.metadata().clone();
    metadata.retain(|k, _| !k.starts_with("lowbit."));
    // Each quantized weight's parameter entries, gathered so the weight can be loaded from any shard.
    let mut params: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    if let Some(layout) = &layout {
        for w in layout.weights() {
            if names.binary_search_by(|n| n.as_str().cmp(w)).is_err() {
                return Err(CliError::new(format!(
                    "the checkpoint lists quantized tensor `{w}`, but it has no such tensor"
                )));
            }
        }
        for name in &names {
            if let Some(owner) = layout.owner_of_param_entry(name) {
                params.entry(owner).or_default().push(name);
            }
        }
    }
    let mut sink =
        Sink::open(d.input, d.output, d.force, d.max_shard_size, metadata, names.iter().map(String::as_str))?;

    let progress = Progress::new(names.len() as u64, "dequantizing");
    let (mut n_weights, mut n_copied, mut n_overflowed) = (0usize, 0usize, 0usize);
    let mut dtypes_used: Vec<DType> = Vec::new();
    let mut note = |t: DType| {
        if !dtypes_used.contains(&t) {
            dtypes_used.push(t);
        }
    };
    // The dequantized bytes of one weight; the allocation moves into the written unit and back.
    let mut scratch: Vec<u8> = Vec::new();
    for name in &names {
        progress.set_message(name);
        let weight = layout.as_ref().filter(|l| l.is_weight(name));
        let tensor = if let Some(layout) = weight {
            let q = load(&ck, layout, name, params.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]))?;
            let target = d.dtype.unwrap_or(match q {
                Quantized::Int8(..) => DType::F32,
                Quantized::FourBit(_) => q.source_dtype(),
            });
            q.dequantize_into_bytes(target, &mut scratch).context(|| format!("tensor `{name}`"))?;
            let data = std::mem::take(&mut scratch);
            n_overflowed += check_overflow(name, q.shape(), &data, target, d.allow_overflow, || q.dequantize_f32())?;
            note(target);
            n_weights += 1;
            Some(TensorData { dtype: safetensors_dtype(target), shape: q.shape().to_vec(), data })
        } else if layout.as_ref().is_some_and(|l| l.is_param_entry(name)) {
            None
        } else {
            let info = ck.tensor_info(name)?;
            let t = plain_tensor(&ck, name, &info, d.dtype)?;
            match info.stored {
                StoredType::Ggml(g)
                    if is_floating(info.stored) && !matches!(g, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) =>
                {
                    let target = d.dtype.unwrap_or(DType::F32);
                    n_overflowed += check_overflow(name, &info.shape, &t.data, target, d.allow_overflow, || {
                        ck.tensor_f32(name).context(|| format!("tensor `{name}`"))
                    })?;
                    note(target);
                    n_weights += 1;
                }
                _ => n_copied += 1,
            }
            Some(t)
        };
        if let Some(t) = tensor {
            let unit = [(name.clone(), t)];
            sink.push(&unit, HashMap::new())?;
            let [(_, t)] = unit;
            if weight.is_some() {
                scratch = t.data;
            }
        }
        progress.inc();
    }
    progress.set_message("writing");
    let config = hf_config::with_quantization(ck.config(), None);
    let gguf_tokenizer = ck.gguf().and_then(|g| g.tokenizer().ok());
    let wrote = sink.finish(config.as_ref(), crate::hf_dir::tokenizer_source(d.input), gguf_tokenizer.as_ref())?;
    drop(progress);
    let dtypes: Vec<String> = dtypes_used.iter().map(DType::to_string).collect();
    console::line(&format!(
        "dequantized {n_weights} tensor(s) to {}, copied {n_copied} unchanged; {wrote}",
        if dtypes.is_empty() { "-".to_string() } else { dtypes.join("/") },
    ))?;
    if n_overflowed > 0 {
        console::line(&format!(
            "note: {n_overflowed} finite value(s) beyond the range of {} were written as ±inf (--allow-overflow)",
            dtypes.join("/")
        ))?;
    }
    Ok(())
}

/// Checks `data` (little-endian elements of `dtype`, the encoding of the f32 values `source` returns) for
/// elements that overflowed: ±inf or NaN in `data` where the f32 value is finite. Returns how many there are
/// when `allow`; otherwise the first one is an error naming `name`, its flat and multi-dimensional index and
/// its value. f32 never overflows here; `source` is called only when `data` holds a non-finite element.
fn check_overflow(
    name: &str,
    shape: &[usize],
    data: &[u8],
    dtype: DType,
    allow: bool,
    source: impl FnOnce() -> Result<Vec<f32>, CliError>,
) -> Result<usize, CliError> {
    let (exponent, limit) = match dtype {
        DType::F32 => return Ok(0),
        DType::F16 => (0x7c00u16, "65504"),
        DType::BF16 => (0x7f80u16, "3.3895314e38"),
    };
    let non_finite = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]) & exponent == exponent;
    if !data.chunks_exact(2).any(non_finite) {
        return Ok(0);
    }
    let x = source()?;
    let mut overflowed = data.chunks_exact(2).zip(&x).enumerate().filter(|(_, (c, v))| non_finite(c) && v.is_finite());
    if allow {
        return Ok(overflowed.count());
    }
    let Some((i, (_, v))) = overflowed.next() else { return Ok(0) };
    Err(CliError::new(format!(
        "tensor `{name}`: element {i} (index {:?}) = {v:e} overflows {dtype} (largest finite magnitude {limit}) and \
         would be written as {}inf; use --dtype f32, or --allow-overflow to keep the IEEE rounding to ±inf",
        unflatten(i, shape),
        if v.is_sign_negative() { "-" } else { "+" },
    )))
}

/// The row-major multi-dimensional index of flat element `i` of `shape`.
fn unflatten(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// Loads quantized weight `name` with its parameter entries `params`: the entries are gathered into a small
/// in-memory safetensors buffer (one weight's bytes), so a weight whose entries sit in different shards loads
/// as well as one in a single file, through the same validating loaders.
fn load(ck: &Checkpoint, layout: &Layout, name: &str, params: &[&str]) -> Result<Quantized, CliError> {
    let mut entries = Vec::with_capacity(params.len() + 1);
    for key in std::iter::once(&name).chain(params) {
        entries.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?)));
    }
    let bytes = lowbit::io::serialize_safetensors(&entries, None)?;
    let st = lowbit::io::parse_safetensors_with_limits(&bytes, ck.limits())?;
    layout.load(&st, name)
}
