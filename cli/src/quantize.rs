//! `lowbit quantize`: quantizes the selected weights ([`crate::select`]) of a checkpoint (a safetensors file,
//! a Hugging Face model directory, single or sharded, or a GGUF, through [`Checkpoint::open`]) to lowbit's int8
//! layout ([`crate::int8_layout`]) or to the bitsandbytes 4-bit layout ([`lowbit::io::bnb`]), into one
//! safetensors file or a model directory ([`crate::output::Sink`]).

use crate::chunked::{self, Elems};
use crate::console;
use crate::error::{CliError, Context};
use crate::hf_config;
use crate::int8_layout;
use crate::output::Sink;
use crate::progress::Progress;
use crate::select::{Decision, Selection};
use lowbit::format::ggml::GgmlType;
use lowbit::io::{float_dtype, safetensors_dtype, Checkpoint, StoredType, TensorData, TensorInfo};
use lowbit::{DType, Scheme};
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// What `lowbit quantize` was asked to do.
pub struct Quantize<'a> {
    /// Checkpoint to read (file, model directory, shard index or GGUF).
    pub input: &'a Path,
    /// `*.safetensors` file or model directory to write.
    pub output: &'a Path,
    /// The format of the quantized weights.
    pub scheme: Scheme,
    /// `--skip` / `--include`.
    pub selection: Selection,
    /// Element type for GGUF tensors of quantized ggml types that are kept (default f32).
    pub dtype: Option<DType>,
    /// Largest shard of a model directory, in tensor bytes.
    pub max_shard_size: u64,
    /// Replace an existing output.
    pub force: bool,
    /// Memory for chunk buffers (`--memory-budget`; [`chunked::chunk_bytes`]).
    pub memory_budget: u64,
}

/// Whether a stored tensor is floating point (what can be quantized or widened to f32).
pub fn is_floating(stored: StoredType) -> bool {
    match stored {
        StoredType::Safetensors(d) => float_dtype(d).is_some(),
        StoredType::Ggml(t) => {
            !matches!(t, GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64 | GgmlType::F64)
        }
    }
}

/// Quantizes the selected tensors of `q.input` with `q.scheme` and writes `q.output`; every other tensor is
/// copied (plain dtypes unchanged; GGUF tensors of quantized ggml types decoded to f32 or `q.dtype`). A model
/// directory output also gets the input's `config.json` with a `quantization_config` and its tokenizer files.
pub fn run(q: Quantize<'_>) -> Result<(), CliError> {
    let ck = Checkpoint::open(q.input)?;
    if !matches!(ck.layout(), lowbit::io::Layout::Dense) {
        return Err(CliError::new(format!(
            "{} is already quantized ({} layout); dequantize it first",
            q.input.display(),
            ck.layout().name()
        )));
    }
    let names: Vec<String> = ck.tensor_names().into_iter().map(str::to_string).collect();
    let all: HashSet<&str> = names.iter().map(String::as_str).collect();
    q.selection.check_all_match(&names.iter().map(String::as_str).collect::<Vec<_>>())?;

    let mut metadata = ck.metadata().clone();
    metadata.retain(|k, _| !k.starts_with("lowbit."));
    if let Scheme::Int8(granularity) = q.scheme {
        metadata.insert(int8_layout::SCHEME_KEY.to_string(), int8_layout::SCHEME_INT8.to_string());
        metadata.insert(int8_layout::GRANULARITY_KEY.to_string(), granularity.to_string());
    }
    // Every tensor's size and fate up front: the output's size is checked against the free space before
    // anything is written.
    let mut plan = Vec::with_capacity(names.len());
    let mut needed = 0u64;
    for name in &names {
        let info = ck.tensor_info(name)?;
        let decision = q.selection.decide(name, is_floating(info.stored) && info.shape.len() >= 2);
        let numel: usize = info.shape.iter().product();
        needed += match (decision, info.stored) {
            (Decision::Quantize, _) => estimate_quantized_bytes(numel, q.scheme),
            (_, StoredType::Safetensors(_)) => info.bytes as u64,
            (_, StoredType::Ggml(_)) => (numel * q.dtype.map_or(4, |d| d.size()).min(4)) as u64,
        };
        plan.push((info, decision));
    }
    crate::output::check_free_space(q.output, needed)?;
    let mut sink =
        Sink::open(q.input, q.output, q.force, q.max_shard_size, metadata, names.iter().map(String::as_str))?;

    let chunk_bytes = crate::chunked::chunk_bytes(q.memory_budget);
    let mut buffers = chunked::Buffers::default();
    ck.advise_sequential();
    let progress = Progress::new(names.len() as u64, "quantizing");
    let mut n = Counts::default();
    let mut kept_weights: Vec<&str> = Vec::new();
    let mut source_dtypes: Vec<DType> = Vec::new();
    let mut lm_head_quantized = false;
    for (name, (info, decision)) in names.iter().zip(plan) {
        progress.set_message(name);
        n.bytes_in += info.bytes;
        match decision {
            Decision::Quantize => {}
            Decision::NotQuantizable => {}
            Decision::KeptByRule => n.by_rule.push(name.as_str()),
            Decision::Skipped => n.skipped += 1,
        }
        if decision == Decision::Quantize {
            let params = param_names(name, q.scheme);
            if let Some(key) = params.iter().find(|k| all.contains(k.as_str())) {
                return Err(CliError::new(format!(
                    "tensor `{name}` cannot be quantized: the input already has a tensor named `{key}`, where its \
                     parameters would go"
                )));
            }
            let numel: usize = info.shape.iter().product();
            let w = sink.begin_unit(estimate_quantized_bytes(numel, q.scheme))?;
            let start = w.data_bytes();
            let source = quantize_tensor(w, &ck, name, &info, q.scheme, chunk_bytes, &mut buffers)
                .context(|| format!("tensor `{name}`"))?;
            n.bytes_out += w.data_bytes() - start;
            let mut meta = HashMap::new();
            if let Scheme::Int8(_) = q.scheme {
                meta.insert(format!("{}{name}", int8_layout::DTYPE_KEY_PREFIX), source.torch_name().to_string());
            }
            sink.end_unit(meta);
            if !source_dtypes.contains(&source) {
                source_dtypes.push(source);
            }
            n.quantized += 1;
            lm_head_quantized |= name == "lm_head.weight";
            n.weights += numel;
        } else {
            if is_floating(info.stored) && info.shape.len() >= 2 {
                kept_weights.push(name);
            }
            n.bytes_out += copy_plain(&mut sink, &ck, name, &info, q.dtype)?;
        }
        ck.release(name);
        progress.inc();
    }

    progress.set_message("writing");
    let quantization = match q.scheme {
        Scheme::FourBit { format, double_quant, .. } => {
            // Compute in the dtype the weights had (f32 for GGUF's quantized types), f32 when they differ.
            let compute = match source_dtypes.as_slice() {
                [one] => *one,
                _ => DType::F32,
            };
            let skip = hf_config::skip_modules(kept_weights.iter().copied(), lm_head_quantized);
            hf_config::bnb_4bit(format, double_quant, compute, &skip)
        }
        Scheme::Int8(_) => {
            hf_config::lowbit_int8(q.scheme, &hf_config::skip_modules(kept_weights.iter().copied(), lm_head_quantized))
        }
    };
    let config = hf_config::with_quantization(ck.config(), Some(quantization));
    let tokenizer_dir = crate::hf_dir::tokenizer_source(q.input);
    let gguf_tokenizer = ck.gguf().and_then(|g| g.tokenizer().ok());
    let wrote = sink.finish(config.as_ref(), tokenizer_dir, gguf_tokenizer.as_ref())?;
    drop(progress);
    let by_rule = if n.by_rule.is_empty() {
        String::new()
    } else {
        let shown: Vec<&str> = n.by_rule.iter().take(4).copied().collect();
        let more = if n.by_rule.len() > 4 { format!(", +{} more", n.by_rule.len() - 4) } else { String::new() };
        format!(" ({} kept by the default rule: {}{more})", n.by_rule.len(), shown.join(", "))
    };
    let skipped = if n.skipped > 0 { format!(", {} by --skip", n.skipped) } else { String::new() };
    console::line(&format!(
        "quantized {} tensor(s) ({} weights) to {}, copied {} unchanged{by_rule}{skipped}; {:.2} MiB -> {:.2} MiB; {wrote}",
        n.quantized,
        n.weights,
        q.scheme,
        names.len() - n.quantized,
        mib(n.bytes_in),
        mib(n.bytes_out),
    ))
}

#[derive(Default)]
struct Counts<'a> {
    quantized: usize,
    weights: usize,
    skipped: usize,
    by_rule: Vec<&'a str>,
    bytes_in: usize,
    bytes_out: usize,
}

/// The names of the parameter entries `scheme` stores next to weight `name`.
fn param_names(name: &str, scheme: Scheme) -> Vec<String> {
    match scheme {
        Scheme::Int8(_) => vec![int8_layout::scale_key(name), int8_layout::zero_point_key(name)],
        Scheme::FourBit { format, .. } => [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .chain(std::iter::once(lowbit::io::bnb::quant_state_key(name, format)))
            .collect(),
    }
}

/// About how many bytes `numel` weights take quantized with `scheme`, parameters included (an upper bound,
/// for choosing a shard).
fn estimate_quantized_bytes(numel: usize, scheme: Scheme) -> u64 {
    let n = numel as u64;
    match scheme {
        Scheme::Int8(_) => 2 * n + 4096,
        Scheme::FourBit { blocksize, .. } => n.div_ceil(2) + 4 * n.div_ceil(blocksize.max(1) as u64) + 4096,
    }
}

/// Quantizes tensor `name` with `scheme` into `w` (codes in chunks of about `chunk_bytes` of input, then the
/// parameters); returns the dtype it was quantized from.
fn quantize_tensor(
    w: &mut lowbit::io::SafetensorsWriter,
    ck: &Checkpoint,
    name: &str,
    info: &TensorInfo,
    scheme: Scheme,
    chunk_bytes: usize,
    buffers: &mut chunked::Buffers,
) -> Result<DType, CliError> {
    let shape = &info.shape;
    let (source, values) = floats(ck, name, info)?;
    match &values {
        Floats::F32(v) => chunked::quantize_into(w, name, v, shape, scheme, chunk_bytes, buffers)?,
        Floats::F16(v) => chunked::quantize_into(w, name, v, shape, scheme, chunk_bytes, buffers)?,
        Floats::BF16(v) => chunked::quantize_into(w, name, v, shape, scheme, chunk_bytes, buffers)?,
    }
    Ok(source)
}

/// A floating tensor's values in the element type they are stored in (see [`Elems`]).
enum Floats<'a> {
    F32(Elems<'a, f32>),
    F16(Elems<'a, lowbit::f16>),
    BF16(Elems<'a, lowbit::bf16>),
}

/// Reads a floating tensor in its own element type: safetensors (and GGUF tensors stored as the Hugging Face
/// tensor) F32/F16/BF16 from the map, in place when aligned; other GGUF F16/BF16 as themselves (their f32
/// widening is exact, so narrowing back is too); other GGUF types decoded to f32.
fn floats<'a>(ck: &'a Checkpoint, name: &str, info: &TensorInfo) -> Result<(DType, Floats<'a>), CliError> {
    let mapped = match info.stored {
        StoredType::Safetensors(_) => Some(ck.tensor(name)?),
        StoredType::Ggml(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => ck.tensor(name).ok(),
        StoredType::Ggml(_) => None,
    };
    if let Some(view) = mapped {
        let data = view.data();
        return Ok(match view.dtype() {
            Dtype::F16 => (DType::F16, Floats::F16(elems(data))),
            Dtype::BF16 => (DType::BF16, Floats::BF16(elems(data))),
            Dtype::F32 => (DType::F32, Floats::F32(elems(data))),
            other => {
                return Err(CliError::new(format!("dtype {other:?}; expected a floating tensor (F32, F16, BF16)")))
            }
        });
    }
    let numel: usize = info.shape.iter().product();
    Ok(match info.stored {
        StoredType::Ggml(GgmlType::F16) => {
            (DType::F16, Floats::F16(Elems::Owned(narrow(ck.tensor_f32(name)?, numel, lowbit::f16::from_f32)?)))
        }
        StoredType::Ggml(GgmlType::BF16) => {
            (DType::BF16, Floats::BF16(Elems::Owned(narrow(ck.tensor_f32(name)?, numel, lowbit::bf16::from_f32)?)))
        }
        _ => (DType::F32, Floats::F32(Elems::Owned(ck.tensor_f32(name)?))),
    })
}

/// f32 values narrowed (exactly, they came from this type) to their stored type.
fn narrow<T>(v: Vec<f32>, numel: usize, f: fn(f32) -> T) -> Result<Vec<T>, CliError> {
    let mut out = Vec::new();
    chunked::reserve(&mut out, numel)?;
    out.extend(v.into_iter().map(f));
    Ok(out)
}

/// The elements of `bytes` in place when aligned for `T` on a little-endian machine (no copy: the mapped
/// checkpoint is read once, by the quantizer), else decoded a chunk at a time.
fn elems<T: bytemuck::Pod>(bytes: &[u8]) -> Elems<'_, T> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(v) if cfg!(target_endian = "little") => Elems::Borrowed(v),
        _ => Elems::Unaligned(bytes),
    }
}

/// Writes a tensor that is not quantized ([`plain_tensor`]'s rules) as one unit; safetensors tensors straight
/// from the map, without a copy. Returns the bytes written.
pub fn copy_plain(
    sink: &mut Sink,
    ck: &Checkpoint,
    name: &str,
    info: &TensorInfo,
    dtype: Option<DType>,
) -> Result<usize, CliError> {
    if let StoredType::Safetensors(_) = info.stored {
        let view = ck.tensor(name)?;
        let w = sink.begin_unit(view.data().len() as u64)?;
        w.begin(name, view.dtype(), view.shape().to_vec())?;
        w.write(view.data())?;
        w.end()?;
        sink.end_unit(HashMap::new());
        return Ok(view.data().len());
    }
    let t = plain_tensor(ck, name, info, dtype)?;
    let bytes = t.data.len();
    sink.push(&[(name.to_string(), t)], HashMap::new())?;
    Ok(bytes)
}

/// A tensor that is not quantized: safetensors tensors as stored; GGUF F32/F16/BF16 in their own type; GGUF
/// tensors of quantized ggml types decoded and written as `dtype` (default f32).
pub fn plain_tensor(
    ck: &Checkpoint,
    name: &str,
    info: &TensorInfo,
    dtype: Option<DType>,
) -> Result<TensorData, CliError> {
    let ggml = match info.stored {
        StoredType::Safetensors(_) => return Ok(TensorData::from_view(&ck.tensor(name)?)),
        StoredType::Ggml(t) => t,
    };
    if !is_floating(info.stored) {
        return Err(CliError::new(format!(
            "tensor `{name}` is stored as ggml {}; lowbit converts only floating GGUF tensors",
            ggml.name()
        )));
    }
    let target = match ggml {
        GgmlType::F32 => DType::F32,
        GgmlType::F16 => DType::F16,
        GgmlType::BF16 => DType::BF16,
        _ => dtype.unwrap_or(DType::F32),
    };
    let x = ck.tensor_f32(name).context(|| format!("tensor `{name}`"))?;
    Ok(TensorData { dtype: safetensors_dtype(target), shape: info.shape.clone(), data: encode_f32(&x, target) })
}

/// `x` as little-endian bytes of `dtype` (f16 / bf16 round to nearest even).
pub fn encode_f32(x: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * dtype.size());
    match dtype {
        DType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => x.iter().for_each(|&v| out.extend_from_slice(&lowbit::f16::from_f32(v).to_le_bytes())),
        DType::BF16 => x.iter().for_each(|&v| out.extend_from_slice(&lowbit::bf16::from_f32(v).to_le_bytes())),
    }
    out
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
