//! `lowbit quantize`: quantizes the floating-point weights of a safetensors file (layout in
//! [`crate::int8_layout`]).

use crate::error::{CliError, Context};
use crate::int8_layout::{self, Int8Layout};
use crate::output::check_output;
use crate::progress::Progress;
use lowbit::affine::Granularity;
use lowbit::io::{float_dtype, SafetensorsFile, TensorData};
use std::collections::HashSet;
use std::path::Path;

/// Whether a tensor of this dtype and shape is quantized: floating point (F32/F16/BF16) with ≥ 2 dimensions.
pub fn is_quantizable(dtype: safetensors::Dtype, shape: &[usize]) -> bool {
    float_dtype(dtype).is_some() && shape.len() >= 2
}

/// Quantizes every quantizable tensor of `input` to int8 with `granularity` and writes `output`.
pub fn run_int8(input: &Path, output: &Path, granularity: Granularity, force: bool) -> Result<(), CliError> {
    check_output(input, output, force)?;
    let file = SafetensorsFile::open(input)?;
    let st = file.tensors()?;
    let mut metadata = file.metadata()?;
    if let Some(scheme) = metadata.get(int8_layout::SCHEME_KEY) {
        return Err(CliError::new(format!(
            "{} is already quantized (metadata `{}` = {scheme:?}); dequantize it first",
            input.display(),
            int8_layout::SCHEME_KEY
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
        for key in [int8_layout::scale_key(name), int8_layout::zero_point_key(name)] {
            if all.contains(key.as_str()) {
                return Err(CliError::new(format!(
                    "tensor `{name}` cannot be quantized: the input already has a tensor named `{key}`, where its \
                     parameters would go"
                )));
            }
        }
        let source = float_dtype(view.dtype()).expect("checked by is_quantizable");
        let ctx = || format!("tensor `{name}`");
        let x = lowbit::io::view_to_f32(name, &view).context(ctx)?;
        let q = lowbit::affine::quantize(&x, view.shape(), granularity).context(ctx)?;
        for entry in int8_layout::to_tensors(name, &q) {
            bytes_out += entry.1.data.len();
            out.push(entry);
        }
        metadata.insert(format!("{}{name}", int8_layout::DTYPE_KEY_PREFIX), source.torch_name().to_string());
        n_quantized += 1;
        n_params += x.len();
        progress.inc();
    }
    metadata.insert(int8_layout::SCHEME_KEY.to_string(), int8_layout::SCHEME_INT8.to_string());
    metadata.insert(int8_layout::GRANULARITY_KEY.to_string(), granularity.to_string());
    debug_assert!(Int8Layout::from_metadata(&metadata).is_ok());

    progress.set_message("writing");
    lowbit::io::write_safetensors(output, &out, Some(metadata), force)?;
    drop(progress);
    println!(
        "quantized {n_quantized} tensor(s) ({n_params} weights) to int8 {granularity}, copied {} unchanged; \
         {:.2} MiB -> {:.2} MiB; wrote {}",
        names.len() - n_quantized,
        mib(bytes_in),
        mib(bytes_out),
        output.display()
    );
    Ok(())
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
