//! `lowbit dequantize`: turns a quantized safetensors file (lowbit int8 or bitsandbytes 4-bit) back into
//! floating point.

use crate::console;
use crate::error::{CliError, Context};
use crate::output::check_output;
use crate::progress::Progress;
use crate::quantized::{Layout, Quantized};
use lowbit::io::{safetensors_dtype, SafetensorsFile, TensorData};
use lowbit::DType;
use std::path::Path;

/// Dequantizes every quantized weight of `input` and writes `output`; parameter entries are dropped and every
/// other tensor is copied unchanged. The dtype is `dtype` if given, else f32 for int8 files and the dtype
/// each bitsandbytes quant state records for 4-bit files.
pub fn run(input: &Path, output: &Path, dtype: Option<DType>, force: bool) -> Result<(), CliError> {
    check_output(input, output, force)?;
    let file = SafetensorsFile::open(input)?;
    let st = file.tensors()?;
    let mut metadata = file.metadata()?;
    let layout = Layout::detect(&metadata, &st)?.ok_or_else(|| {
        CliError::new(format!(
            "{} holds no quantized tensors (no `lowbit.scheme` metadata and no bitsandbytes quant_state \
             entries); nothing to dequantize",
            input.display()
        ))
    })?;
    if matches!(layout, Layout::Int8(_)) {
        metadata.retain(|k, _| !k.starts_with("lowbit."));
    }

    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for w in layout.weights() {
        if names.binary_search_by(|n| n.as_str().cmp(w)).is_err() {
            return Err(CliError::new(format!("the metadata lists quantized tensor `{w}`, but the file lacks it")));
        }
    }

    let progress = Progress::new(names.len() as u64, "dequantizing");
    let mut out: Vec<(String, TensorData)> = Vec::with_capacity(names.len());
    let (mut n_weights, mut n_copied) = (0usize, 0usize);
    let mut dtypes_used: Vec<DType> = Vec::new();
    for name in &names {
        progress.set_message(name);
        if layout.is_weight(name) {
            let q = layout.load(&st, name)?;
            let target = dtype.unwrap_or(match q {
                Quantized::Int8(..) => DType::F32,
                Quantized::FourBit(_) => q.source_dtype(),
            });
            let data = q.dequantize_to_bytes(target).context(|| format!("tensor `{name}`"))?;
            out.push((name.clone(), TensorData { dtype: safetensors_dtype(target), shape: q.shape().to_vec(), data }));
            if !dtypes_used.contains(&target) {
                dtypes_used.push(target);
            }
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
    let dtypes: Vec<String> = dtypes_used.iter().map(DType::to_string).collect();
    console::line(&format!(
        "dequantized {n_weights} tensor(s) to {}, copied {n_copied} unchanged; wrote {}",
        if dtypes.is_empty() { "-".to_string() } else { dtypes.join("/") },
        output.display()
    ))
}
