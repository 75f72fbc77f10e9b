//! `lowbit inspect`: lists a file's tensors and formats, optionally with each quantized tensor's error
//! against the original.

use crate::console;
use crate::error::{CliError, Context};
use crate::quantized::Layout;
use crate::table::{Align, Table};
use lowbit::io::SafetensorsFile;
use lowbit_testkit::stats::{fmt_db, ErrorStats};
use std::path::Path;

/// Lists `file`; with `compare`, measures every quantized tensor against the tensor of the same name there.
pub fn run(file: &Path, compare: Option<&Path>) -> Result<(), CliError> {
    let f = SafetensorsFile::open(file)?;
    let st = f.tensors()?;
    let layout = Layout::detect(&f.metadata()?, &st)?;
    let original = compare.map(SafetensorsFile::open).transpose()?;
    let original_st = original.as_ref().map(|o| o.tensors()).transpose()?;

    let mut columns =
        vec![("name", Align::Left), ("dtype", Align::Left), ("shape", Align::Left), ("format", Align::Left)];
    columns.push(("bits/weight", Align::Right));
    if compare.is_some() {
        columns.extend([("max abs err", Align::Right), ("mean abs err", Align::Right), ("SQNR dB", Align::Right)]);
    }
    let mut table = Table::new(&columns);

    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (mut n_tensors, mut n_quantized, mut q_weights, mut q_bits) = (0usize, 0usize, 0usize, 0f64);
    for name in &names {
        let view = st.tensor(name)?;
        let layout = match &layout {
            Some(l) if l.is_param_entry(name) => continue,
            Some(l) if l.is_weight(name) => l,
            _ => {
                n_tensors += 1;
                table.push(vec![
                    name.clone(),
                    format!("{:?}", view.dtype()),
                    format!("{:?}", view.shape()),
                    "plain".into(),
                    format!("{}", view.dtype().bitsize()),
                ]);
                continue;
            }
        };
        let q = layout.load(&st, name)?;
        n_tensors += 1;
        n_quantized += 1;
        q_weights += q.numel();
        q_bits += q.bits_per_weight() * q.numel() as f64;
        let mut row = vec![
            name.clone(),
            format!("{:?}", view.dtype()),
            format!("{:?}", q.shape()),
            format!("{} (from {})", q.describe(), q.source_dtype()),
            if q.numel() == 0 { "-".to_string() } else { format!("{:.3}", q.bits_per_weight()) },
        ];
        if let (Some(orig), Some(orig_path)) = (&original_st, compare) {
            let ctx = || format!("comparing `{name}` with {}", orig_path.display());
            let o = orig
                .tensor(name)
                .map_err(|_| CliError::new(format!("tensor `{name}` is not in the original")))
                .context(ctx)?;
            if o.shape() != q.shape() {
                return Err(CliError::new(format!("shape {:?} in the original, {:?} here", o.shape(), q.shape())))
                    .context(ctx);
            }
            let x = lowbit::io::view_to_f32(name, &o).context(ctx)?;
            let x_hat = q.dequantize_f32().context(ctx)?;
            let s = ErrorStats::compute(&x, &x_hat);
            row.extend([format!("{:.6e}", s.max_abs), format!("{:.6e}", s.mean_abs), fmt_db(s.sqnr_db)]);
        }
        table.push(row);
    }
    console::out(&table.render())?;
    let mut summary = format!("{n_tensors} tensor(s) in {} entries", names.len());
    if n_quantized > 0 {
        summary.push_str(&format!(
            "; {n_quantized} quantized ({q_weights} weights, {:.3} bits/weight on average)",
            q_bits / q_weights.max(1) as f64
        ));
    }
    console::line(&summary)
}
