//! `lowbit dequantize`: turns a quantized safetensors file back into floating point.

use crate::error::{CliError, Context};
use crate::int8_layout::Int8Layout;
use crate::output::check_output;
use crate::progress::Progress;
use lowbit::io::{safetensors_dtype, SafetensorsFile, TensorData};
use lowbit::DType;
use std::path::Path;

/// Dequantizes every quantized weight of `input` to `dtype` (f32 by default) and writes `output`; parameter
/// entries are dropped and every other tensor is copied unchanged.
pub fn run(input: &Path, output: &Path, dtype: Option<DType>, force: bool) -> Result<(), CliError> {
    check_output(input, output, force)?;
    let file = SafetensorsFile::open(input)?;
    let st = file.tensors()?;
    let mut metadata = file.metadata()?;
    let layout = Int8Layout::from_metadata(&metadata)?.ok_or_else(|| {
        CliError::new(format!(
            "{} holds no quantized tensors (no `lowbit.scheme` in its metadata); nothing to dequantize",
            input.display()
        ))
    })?;
    let dtype = dtype.unwrap_or(DType::F32);
    metadata.retain(|k, _| !k.starts_with("lowbit."));

    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for w in layout.weights.keys() {
        if !names.contains(w) {
            return Err(CliError::new(format!("the metadata lists quantized tensor `{w}`, but the file lacks it")));
        }
    }

    let progress = Progress::new(names.len() as u64, "dequantizing");
    let mut out: Vec<(String, TensorData)> = Vec::with_capacity(names.len());
    let (mut n_weights, mut n_copied) = (0usize, 0usize);
    for name in &names {
        progress.set_message(name);
        if layout.weights.contains_key(name) {
            let q = layout.load(&st, name)?;
            let data = q.dequantize_to_bytes(dtype).context(|| format!("tensor `{name}`"))?;
            out.push((name.clone(), TensorData { dtype: safetensors_dtype(dtype), shape: q.shape().to_vec(), data }));
            n_weights += 1;
        } else if !layout.is_param_entry(name) {
            out.push((name.clone(), TensorData::from_view(&st.tensor(name)?)));
            n_copied += 1;
        }
        progress.inc();
    }
    progress.set_message("writing");
    let metadata = if metadata.is_empty() { None } else { Some(metadata) };
    lowbit::io::write_safetensors(output, &out, metadata, force)?;
    drop(progress);
    println!("dequantized {n_weights} tensor(s) to {dtype}, copied {n_copied} unchanged; wrote {}", output.display());
    Ok(())
}
