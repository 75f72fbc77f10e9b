//! `lowbit quantize`: quantizes the floating-point weights of a safetensors file, to lowbit's int8 layout
//! ([`crate::int8_layout`]) or to the bitsandbytes 4-bit layout ([`lowbit::io::bnb`]).

use crate::console;
use crate::error::{CliError, Context};
use crate::int8_layout;
use crate::output::check_output;
use crate::progress::Progress;
use crate::quantized::Layout;
use lowbit::io::{float_dtype, SafetensorsFile, TensorData};
use lowbit::nf4::{FourBitFormat, FourBitTensor};
use lowbit::Scheme;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Whether a tensor of this dtype and shape is quantized: floating point (F32/F16/BF16) with ≥ 2 dimensions.
pub fn is_quantizable(dtype: Dtype, shape: &[usize]) -> bool {
    float_dtype(dtype).is_some() && shape.len() >= 2
}

/// Quantizes every quantizable tensor of `input` with `scheme` and writes `output`; other tensors and the
/// input's metadata are copied.
pub fn run(input: &Path, output: &Path, scheme: Scheme, force: bool) -> Result<(), CliError> {
    check_output(input, output, force)?;
    let file = SafetensorsFile::open(input)?;
    let st = file.tensors()?;
    let mut metadata = file.metadata()?;
    if let Some(layout) = Layout::detect(&metadata, &st)? {
        let what = match layout {
            Layout::Int8(_) => "lowbit int8",
            Layout::Bnb(_) => "bitsandbytes 4-bit",
        };
        return Err(CliError::new(format!(
            "{} is already quantized ({what} layout); dequantize it first",
            input.display()
        )));
    }
    metadata.retain(|k, _| !k.starts_with("lowbit."));

    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let all: HashSet<&str> = names.iter().map(String::as_str).collect();

    let progress = Progress::new(names.len() as u64, "quantizing");
    let mut out: Vec<(String, TensorData)> = Vec::with_capacity(names.len());
    let (mut n_quantized, mut n_params, mut bytes_in, mut bytes_out) = (0usize, 0usize, 0usize, 0usize);
    for name in &names {
        progress.set_message(name);
        let view = st.tensor(name)?;
        bytes_in += view.data().len();
        if !is_quantizable(view.dtype(), view.shape()) {
            bytes_out += view.data().len();
            out.push((name.clone(), TensorData::from_view(&view)));
            progress.inc();
            continue;
        }
        let entries = quantize_tensor(name, &view, scheme, &mut metadata).context(|| format!("tensor `{name}`"))?;
        if let Some((key, _)) = entries.iter().skip(1).find(|(k, _)| all.contains(k.as_str())) {
            return Err(CliError::new(format!(
                "tensor `{name}` cannot be quantized: the input already has a tensor named `{key}`, where its \
                 parameters would go"
            )));
        }
        for entry in entries {
            bytes_out += entry.1.data.len();
            out.push(entry);
        }
        n_quantized += 1;
        n_params += view.shape().iter().product::<usize>();
        progress.inc();
    }
    if let Scheme::Int8(granularity) = scheme {
        metadata.insert(int8_layout::SCHEME_KEY.to_string(), int8_layout::SCHEME_INT8.to_string());
        metadata.insert(int8_layout::GRANULARITY_KEY.to_string(), granularity.to_string());
    }

    progress.set_message("writing");
    let metadata = if metadata.is_empty() { None } else { Some(metadata) };
    lowbit::io::write_safetensors(output, &out, metadata, force)?;
    drop(progress);
    console::line(&format!(
        "quantized {n_quantized} tensor(s) ({n_params} weights) to {scheme}, copied {} unchanged; \
         {:.2} MiB -> {:.2} MiB; wrote {}",
        names.len() - n_quantized,
        mib(bytes_in),
        mib(bytes_out),
        output.display()
    ))
}

/// The entries storing tensor `name` quantized with `scheme` (the codes first), recording what the layout
/// needs in `metadata`.
fn quantize_tensor(
    name: &str,
    view: &TensorView<'_>,
    scheme: Scheme,
    metadata: &mut HashMap<String, String>,
) -> Result<Vec<(String, TensorData)>, CliError> {
    let source = float_dtype(view.dtype()).ok_or_else(|| CliError::new("not a floating-point tensor"))?;
    match scheme {
        Scheme::Int8(granularity) => {
            let x = lowbit::io::view_to_f32(name, view)?;
            let q = lowbit::affine::quantize(&x, view.shape(), granularity)?;
            metadata.insert(format!("{}{name}", int8_layout::DTYPE_KEY_PREFIX), source.torch_name().to_string());
            Ok(int8_layout::to_tensors(name, &q).into())
        }
        Scheme::FourBit { format, blocksize, double_quant } => {
            let t = quantize_4bit_view(view, format, blocksize, double_quant)?;
            Ok(lowbit::io::bnb::to_tensors(name, &t)?)
        }
    }
}

/// NF4 / FP4-quantizes a floating view in its own element type, so the recorded dtype is the source dtype.
fn quantize_4bit_view(
    view: &TensorView<'_>,
    format: FourBitFormat,
    blocksize: usize,
    double_quant: bool,
) -> lowbit::Result<FourBitTensor> {
    use lowbit::nf4::quantize_4bit;
    let (d, shape) = (view.data(), view.shape());
    match view.dtype() {
        Dtype::F16 => quantize_4bit(format, &decode(d, lowbit::f16::from_le_bytes), shape, blocksize, double_quant),
        Dtype::BF16 => quantize_4bit(format, &decode(d, lowbit::bf16::from_le_bytes), shape, blocksize, double_quant),
        _ => quantize_4bit(format, &decode(d, f32::from_le_bytes), shape, blocksize, double_quant),
    }
}

/// Decodes little-endian elements of `N` bytes (any alignment).
fn decode<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(std::array::from_fn(|i| c[i]))).collect()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
