//! `lowbit dequantize`: turns a quantized checkpoint (lowbit int8 or bitsandbytes 4-bit; a safetensors file or
//! a model directory, single or sharded; or a GGUF, whose quantized ggml tensors are decoded) back into
//! floating point, as one safetensors file or a dense model directory.

use crate::console;
use crate::error::{CliError, Context};
use crate::hf_config;
use crate::output::Sink;
use crate::progress::Progress;
use crate::quantize::{copy_plain, is_floating, plain_tensor};
use crate::quantized::Layout;
use lowbit::format::ggml::GgmlType;
use lowbit::io::{Checkpoint, StoredType};
use lowbit::linear::QuantWeight;
use lowbit::DType;
use std::collections::HashMap;
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
    /// Memory for chunk buffers (`--memory-budget`; [`crate::chunked::chunk_bytes`]).
    pub memory_budget: u64,
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
    if let Some(layout) = &layout {
        for w in layout.weights() {
            if names.binary_search_by(|n| n.as_str().cmp(w)).is_err() {
                return Err(CliError::new(format!(
                    "the checkpoint lists quantized tensor `{w}`, but it has no such tensor"
                )));
            }
        }
    }
    // The output's size against the free space: each 4-bit weight in the dtype its quant state records (2 bytes
    // when that cannot be read here; the load reports why later), int8 weights in f32, unless --dtype.
    let mut recorded: HashMap<&str, DType> = HashMap::new();
    if let Some(Layout::Bnb(_)) = &layout {
        for name in &names {
            if let Some(w) = lowbit::io::bnb::weight_of_quant_state_key(name) {
                let state = ck
                    .tensor(name)
                    .ok()
                    .and_then(|v| lowbit::io::bnb::QuantStateJson::parse_with_limits(v.data(), name, ck.limits()).ok());
                if let Some(state) = state {
                    recorded.insert(w, state.dtype);
                }
            }
        }
    }
    let mut needed = 0u64;
    for name in &names {
        let info = ck.tensor_info(name)?;
        let numel = info.shape.iter().product::<usize>() as u64;
        needed += if layout.as_ref().is_some_and(|l| l.is_weight(name)) {
            let default = match &layout {
                Some(Layout::Int8(_)) => DType::F32,
                _ => recorded.get(name.as_str()).copied().unwrap_or(DType::F16),
            };
            let size = d.dtype.unwrap_or(default).size() as u64;
            // A 4-bit weight's stored entry is its packed codes: two weights per byte.
            match &layout {
                Some(Layout::Bnb(_)) => 2 * info.bytes as u64 * size,
                _ => numel * size,
            }
        } else if layout.as_ref().is_some_and(|l| l.is_param_entry(name)) {
            0
        } else if let StoredType::Ggml(_) = info.stored {
            numel * d.dtype.map_or(4, |t| t.size()) as u64
        } else {
            info.bytes as u64
        };
    }
    crate::output::check_free_space(d.output, needed)?;
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
    let chunk_bytes = crate::chunked::chunk_bytes(d.memory_budget);
    let mut buffers = crate::chunked::Buffers::default();
    ck.advise_sequential();
    for name in &names {
        progress.set_message(name);
        if layout.as_ref().is_some_and(|l| l.is_weight(name)) {
            // The codes stay in the map (views, no copy); the weight is written a chunk at a time.
            let q = ck.quantized_weight(name)?;
            let target = d.dtype.unwrap_or(match &q {
                QuantWeight::Int8(_) => DType::F32,
                QuantWeight::FourBit(t) => t.dtype(),
            });
            let numel: usize = q.shape().iter().product();
            let shape = q.shape().to_vec();
            let w = sink.begin_unit((numel * target.size()) as u64)?;
            let mut check = |offset: usize, bytes: &[u8], values: &dyn Fn() -> Result<Vec<f32>, CliError>| {
                n_overflowed += check_overflow(name, &shape, offset, bytes, target, d.allow_overflow, values)?;
                Ok(())
            };
            crate::chunked::dequantize_into(w, name, &q, target, chunk_bytes, &mut buffers, &mut check)
                .context(|| format!("tensor `{name}`"))?;
            sink.end_unit(HashMap::new());
            note(target);
            n_weights += 1;
        } else if layout.as_ref().is_some_and(|l| l.is_param_entry(name)) {
        } else {
            let info = ck.tensor_info(name)?;
            match info.stored {
                StoredType::Ggml(g)
                    if is_floating(info.stored) && !matches!(g, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) =>
                {
                    let t = plain_tensor(&ck, name, &info, d.dtype)?;
                    let target = d.dtype.unwrap_or(DType::F32);
                    n_overflowed += check_overflow(name, &info.shape, 0, &t.data, target, d.allow_overflow, &|| {
                        ck.tensor_f32(name).context(|| format!("tensor `{name}`"))
                    })?;
                    sink.push(&[(name.clone(), t)], HashMap::new())?;
                    note(target);
                    n_weights += 1;
                }
                _ => {
                    copy_plain(&mut sink, &ck, name, &info, d.dtype)?;
                    n_copied += 1;
                }
            }
        }
        ck.release(name);
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

/// Checks `data` (little-endian elements of `dtype`, elements `offset..` of tensor `name`, the encoding of the
/// f32 values `source` returns) for elements that overflowed: ±inf or NaN in `data` where the f32 value is
/// finite. Returns how many there are when `allow`; otherwise the first one is an error naming `name`, its
/// flat and multi-dimensional index and its value. f32 never overflows here; `source` is called only when
/// `data` holds a non-finite element.
fn check_overflow(
    name: &str,
    shape: &[usize],
    offset: usize,
    data: &[u8],
    dtype: DType,
    allow: bool,
    source: &dyn Fn() -> Result<Vec<f32>, CliError>,
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
    let i = offset + i;
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
