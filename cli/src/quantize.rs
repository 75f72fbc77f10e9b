//! `lowbit quantize`: quantizes the selected weights ([`crate::select`]) of a checkpoint (a safetensors file,
//! a Hugging Face model directory, single or sharded, or a GGUF, through [`Checkpoint::open`]) to lowbit's int8
//! layout ([`crate::int8_layout`]) or to the bitsandbytes 4-bit layout ([`lowbit::io::bnb`]), into one
//! safetensors file or a model directory ([`crate::output::Sink`]).

use crate::console;
use crate::error::{CliError, Context};
use crate::hf_config;
use crate::int8_layout;
use crate::output::Sink;
use crate::progress::Progress;
use crate::select::{Decision, Selection};
use lowbit::format::ggml::GgmlType;
use lowbit::io::{float_dtype, safetensors_dtype, Checkpoint, StoredType, TensorData, TensorInfo};
use lowbit::{DType, Element, Scheme};
use safetensors::Dtype;
use std::borrow::Cow;
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
    let mut sink =
        Sink::open(q.input, q.output, q.force, q.max_shard_size, metadata, names.iter().map(String::as_str))?;

    let progress = Progress::new(names.len() as u64, "quantizing");
    let mut n = Counts::default();
    let mut kept_weights: Vec<&str> = Vec::new();
    let mut source_dtypes: Vec<DType> = Vec::new();
    let mut lm_head_quantized = false;
    for name in &names {
        progress.set_message(name);
        let info = ck.tensor_info(name)?;
        n.bytes_in += info.bytes;
        let decision = q.selection.decide(name, is_floating(info.stored) && info.shape.len() >= 2);
        match decision {
            Decision::Quantize => {}
            Decision::NotQuantizable => {}
            Decision::KeptByRule => n.by_rule.push(name.as_str()),
            Decision::Skipped => n.skipped += 1,
        }
        let (unit, meta) = if decision == Decision::Quantize {
            let (unit, meta, source) =
                quantize_tensor(&ck, name, &info, q.scheme).context(|| format!("tensor `{name}`"))?;
            if let Some((key, _)) = unit.iter().skip(1).find(|(k, _)| all.contains(k.as_str())) {
                return Err(CliError::new(format!(
                    "tensor `{name}` cannot be quantized: the input already has a tensor named `{key}`, where its \
                     parameters would go"
                )));
            }
            if !source_dtypes.contains(&source) {
                source_dtypes.push(source);
            }
            n.quantized += 1;
            lm_head_quantized |= name == "lm_head.weight";
            n.weights += info.shape.iter().product::<usize>();
            (unit, meta)
        } else {
            if is_floating(info.stored) && info.shape.len() >= 2 {
                kept_weights.push(name);
            }
            (vec![(name.clone(), plain_tensor(&ck, name, &info, q.dtype)?)], HashMap::new())
        };
        n.bytes_out += unit.iter().map(|(_, t)| t.data.len()).sum::<usize>();
        sink.push(&unit, meta)?;
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

/// The entries of one tensor as written (a quantized weight's codes first, then its parameters).
type Entries = Vec<(String, TensorData)>;

#[derive(Default)]
struct Counts<'a> {
    quantized: usize,
    weights: usize,
    skipped: usize,
    by_rule: Vec<&'a str>,
    bytes_in: usize,
    bytes_out: usize,
}

/// The entries storing tensor `name` quantized with `scheme` (the codes first), the `__metadata__` entries
/// the layout needs for it, and the dtype it was quantized from.
fn quantize_tensor(
    ck: &Checkpoint,
    name: &str,
    info: &TensorInfo,
    scheme: Scheme,
) -> Result<(Entries, HashMap<String, String>, DType), CliError> {
    let (source, values) = floats(ck, name, info)?;
    let shape = &info.shape;
    let entries = match &values {
        Floats::F32(v) => quantize_values(name, v, shape, scheme)?,
        Floats::F16(v) => quantize_values(name, v, shape, scheme)?,
        Floats::BF16(v) => quantize_values(name, v, shape, scheme)?,
    };
    let mut meta = HashMap::new();
    if let Scheme::Int8(_) = scheme {
        meta.insert(format!("{}{name}", int8_layout::DTYPE_KEY_PREFIX), source.torch_name().to_string());
    }
    Ok((entries, meta, source))
}

/// A floating tensor's values in the element type they are stored in: borrowed from the mapped checkpoint
/// when the bytes are aligned for the type (safetensors data usually is), else decoded into a copy.
enum Floats<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [lowbit::f16]>),
    BF16(Cow<'a, [lowbit::bf16]>),
}

/// Reads a floating tensor in its own element type: safetensors F32/F16/BF16 as stored, GGUF F16/BF16 as
/// themselves (their f32 widening is exact, so narrowing back is too), other GGUF types decoded to f32.
fn floats<'a>(ck: &'a Checkpoint, name: &str, info: &TensorInfo) -> Result<(DType, Floats<'a>), CliError> {
    Ok(match info.stored {
        StoredType::Safetensors(d) => {
            let view = ck.tensor(name)?;
            let data = view.data();
            match d {
                Dtype::F16 => (DType::F16, Floats::F16(cast_or_decode(data, lowbit::f16::from_le_bytes))),
                Dtype::BF16 => (DType::BF16, Floats::BF16(cast_or_decode(data, lowbit::bf16::from_le_bytes))),
                Dtype::F32 => (DType::F32, Floats::F32(cast_or_decode(data, f32::from_le_bytes))),
                other => {
                    return Err(CliError::new(format!("dtype {other:?}; expected a floating tensor (F32, F16, BF16)")))
                }
            }
        }
        StoredType::Ggml(GgmlType::F16) => (
            DType::F16,
            Floats::F16(ck.tensor_f32(name)?.into_iter().map(lowbit::f16::from_f32).collect::<Vec<_>>().into()),
        ),
        StoredType::Ggml(GgmlType::BF16) => (
            DType::BF16,
            Floats::BF16(ck.tensor_f32(name)?.into_iter().map(lowbit::bf16::from_f32).collect::<Vec<_>>().into()),
        ),
        StoredType::Ggml(_) => (DType::F32, Floats::F32(ck.tensor_f32(name)?.into())),
    })
}

/// Quantizes values of one element type; the 4-bit quant state records that type.
fn quantize_values<T: Element>(name: &str, x: &[T], shape: &[usize], scheme: Scheme) -> Result<Entries, CliError> {
    Ok(match scheme {
        Scheme::Int8(granularity) => {
            let q = lowbit::affine::quantize(x, shape, granularity)?;
            int8_layout::to_tensors(name, &q).into()
        }
        Scheme::FourBit { format, blocksize, double_quant } => {
            let t = lowbit::nf4::quantize_4bit(format, x, shape, blocksize, double_quant)?;
            lowbit::io::bnb::to_tensors(name, &t)?
        }
    })
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

/// The elements in place when `bytes` is aligned for `T` on a little-endian machine (no copy: the mapped
/// checkpoint is read once, by the quantizer), else decoded with `f`.
fn cast_or_decode<T: bytemuck::Pod, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(v) if cfg!(target_endian = "little") && std::mem::size_of::<T>() == N => Cow::Borrowed(v),
        _ => Cow::Owned(decode(bytes, f)),
    }
}

/// Decodes little-endian elements of `N` bytes (any alignment).
fn decode<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(std::array::from_fn(|i| c[i]))).collect()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
