//! `lowbit inspect`: a summary of a checkpoint (size, parameters, bits per weight, worst SQNR), then its
//! tensors and formats, optionally with each quantized tensor's error against the original. Reads any form
//! [`Checkpoint::open`] accepts: a safetensors file, a model directory (single or sharded), a GGUF.

use crate::console;
use crate::error::{CliError, Context};
use crate::quantized::{load_from_checkpoint, stored_name, Layout};
use crate::table::{Align, Table};
use lowbit::format::ggml::GgmlType;
use lowbit::io::{Checkpoint, StoredType};
use lowbit_testkit::stats::{fmt_db, ErrorStats};
use std::path::Path;

/// Whether a ggml type is quantized (blocks of codes and scales) rather than a plain number type.
fn is_quantized_ggml(t: GgmlType) -> bool {
    t.block_elements() > 1
}

/// Running totals for the summary.
#[derive(Default)]
struct Totals {
    /// Rows listed (quantized weights count once, with their parameter entries).
    tensors: usize,
    /// Bytes of tensor data, every entry included.
    bytes: usize,
    /// Elements over all rows (a quantized weight counts its original shape).
    params: usize,
    /// Quantized rows, their elements and their stored bits.
    quantized: usize,
    q_weights: usize,
    q_bits: f64,
    /// The worst SQNR with --compare (see [`worse`]) as printed, and its tensor.
    worst: Option<(Sqnr, String)>,
}

/// An SQNR as `inspect` reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sqnr {
    /// A number of dB: `inf` for an exact reconstruction, `-inf` for an infinite error.
    Db(f64),
    /// A NaN appeared (in a value or in the error, e.g. inf - inf): the ratio means nothing.
    NaN,
    /// Nothing to measure: no elements, or all of them zero in both tensors.
    Undefined,
}

impl Sqnr {
    /// Reads `s`: NaN anywhere (NaN max error, or a NaN ratio of a nonzero error) is [`Sqnr::NaN`], a NaN
    /// ratio of zero error over zero signal [`Sqnr::Undefined`].
    fn of(s: &ErrorStats) -> Sqnr {
        if s.max_abs.is_nan() || (s.sqnr_db.is_nan() && s.max_abs != 0.0) {
            Sqnr::NaN
        } else if s.sqnr_db.is_nan() {
            Sqnr::Undefined
        } else {
            Sqnr::Db(s.sqnr_db)
        }
    }

    /// `NaN`, `-` or the dB figure (`inf`, `-inf`, `12.34`).
    fn text(self) -> String {
        match self {
            Sqnr::Db(db) => fmt_db(db),
            Sqnr::NaN => "NaN".to_string(),
            Sqnr::Undefined => "-".to_string(),
        }
    }
}

/// Whether `a` is worse than `b`: NaN is worst, then the lowest dB (`-inf` below every number); undefined
/// ratios are never worse.
fn worse(a: Sqnr, b: Sqnr) -> bool {
    match (a, b) {
        (Sqnr::Undefined, _) | (_, Sqnr::NaN) => false,
        (Sqnr::NaN, _) | (_, Sqnr::Undefined) => true,
        (Sqnr::Db(a), Sqnr::Db(b)) => a < b,
    }
}

/// Lists `file`; with `compare`, measures every quantized tensor against the tensor of the same name there.
pub fn run(file: &Path, compare: Option<&Path>) -> Result<(), CliError> {
    let ck = Checkpoint::open(file)?;
    let layout = Layout::of(&ck);
    let original = compare.map(Checkpoint::open).transpose()?;

    let mut columns =
        vec![("name", Align::Left), ("dtype", Align::Left), ("shape", Align::Left), ("format", Align::Left)];
    columns.push(("bits/weight", Align::Right));
    if compare.is_some() {
        columns.extend([("max abs err", Align::Right), ("mean abs err", Align::Right), ("SQNR dB", Align::Right)]);
    }
    let mut table = Table::new(&columns);

    let names = ck.tensor_names(); // sorted
    let mut t = Totals::default();
    let mut is_gguf = false;
    for &name in &names {
        let info = ck.tensor_info(name)?;
        t.bytes += info.bytes;
        let numel: usize = info.shape.iter().product();
        let bits = |bytes: usize, n: usize| {
            if n == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", bytes as f64 * 8.0 / n as f64)
            }
        };
        // x_hat (the decoded quantized tensor), when this row is quantized.
        let (row, x_hat) = match (&layout, info.stored) {
            (Some(l), _) if l.is_param_entry(name) => continue,
            (Some(l), _) if l.is_weight(name) => {
                let q = load_from_checkpoint(&ck, l, name)?;
                t.quantized += 1;
                t.q_weights += q.numel();
                t.q_bits += q.bits_per_weight() * q.numel() as f64;
                t.params += q.numel();
                let row = vec![
                    name.to_string(),
                    stored_name(info.stored),
                    format!("{:?}", q.shape()),
                    format!("{} (from {})", q.describe(), q.source_dtype()),
                    if q.numel() == 0 { "-".to_string() } else { format!("{:.3}", q.bits_per_weight()) },
                ];
                let x_hat = if compare.is_some() { Some((q.shape().to_vec(), q.dequantize_f32()?)) } else { None };
                (row, x_hat)
            }
            (_, StoredType::Ggml(g)) if is_quantized_ggml(g) => {
                is_gguf = true;
                t.quantized += 1;
                t.q_weights += numel;
                t.q_bits += info.bytes as f64 * 8.0;
                t.params += numel;
                let row = vec![
                    name.to_string(),
                    g.name().to_string(),
                    format!("{:?}", info.shape),
                    format!("ggml {}", g.name()),
                    bits(info.bytes, numel),
                ];
                let x_hat = match compare {
                    Some(_) => {
                        Some((info.shape.clone(), ck.tensor_f32(name).context(|| format!("decoding `{name}`"))?))
                    }
                    None => None,
                };
                (row, x_hat)
            }
            (_, stored) => {
                is_gguf |= matches!(stored, StoredType::Ggml(_));
                t.params += numel;
                let row = vec![
                    name.to_string(),
                    stored_name(stored),
                    format!("{:?}", info.shape),
                    "plain".into(),
                    bits(info.bytes, numel),
                ];
                (row, None)
            }
        };
        t.tensors += 1;
        let mut row = row;
        if let (Some(orig), Some(orig_path), Some((shape, x_hat))) = (&original, compare, x_hat) {
            let ctx = || format!("comparing `{name}` with {}", orig_path.display());
            let o = orig
                .tensor_info(name)
                .map_err(|_| CliError::new(format!("tensor `{name}` is not in the original")))
                .context(ctx)?;
            if o.shape != shape {
                return Err(CliError::new(format!("shape {:?} in the original, {shape:?} here", o.shape))).context(ctx);
            }
            let x = orig.tensor_f32(name).context(ctx)?;
            let s = ErrorStats::compute(&x, &x_hat);
            let sqnr = Sqnr::of(&s);
            if sqnr != Sqnr::Undefined && t.worst.as_ref().is_none_or(|(w, _)| worse(sqnr, *w)) {
                t.worst = Some((sqnr, name.to_string()));
            }
            row.extend([format!("{:.6e}", s.max_abs), format!("{:.6e}", s.mean_abs), sqnr.text()]);
        }
        table.push(row);
    }

    let format = if is_gguf { "GGUF" } else { ck.layout().name() };
    let mut summary = format!(
        "{}: {format}, {} file(s)\n{} tensor(s) in {} entries",
        file.display(),
        ck.files().len(),
        t.tensors,
        names.len()
    );
    if t.quantized > 0 {
        summary.push_str(&format!(
            "; {} quantized ({} weights, {:.3} bits/weight on average)",
            t.quantized,
            t.q_weights,
            t.q_bits / t.q_weights.max(1) as f64
        ));
    }
    summary.push_str(&format!(
        "\ntotal size: {:.2} MiB of tensor data; {} parameters; {} bits/weight on average over all tensors",
        t.bytes as f64 / (1024.0 * 1024.0),
        t.params,
        if t.params == 0 { "-".to_string() } else { format!("{:.3}", t.bytes as f64 * 8.0 / t.params as f64) }
    ));
    if compare.is_some() {
        summary.push_str(&match t.worst {
            Some((Sqnr::NaN, name)) => format!("\nworst SQNR: NaN (`{name}`: a NaN in the values or the error)"),
            Some((sqnr, name)) => format!("\nworst SQNR: {} dB (`{name}`)", sqnr.text()),
            None => "\nworst SQNR: - (no quantized tensor to compare)".to_string(),
        });
    }
    console::line(&summary)?;
    console::out(&table.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_errors_are_reported_honestly() {
        let sq = |x: &[f32], y: &[f32]| Sqnr::of(&ErrorStats::compute(x, y));
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        assert_eq!(sq(&[1.0, 2.0], &[1.0, 2.0]).text(), "inf");
        assert_eq!(sq(&[1.0, 2.0], &[inf, 2.0]).text(), "-inf");
        assert_eq!(sq(&[1.0, 2.0], &[nan, 2.0]).text(), "NaN");
        assert_eq!(sq(&[inf, 2.0], &[1.0, 2.0]).text(), "NaN"); // inf / inf
        assert_eq!(sq(&[0.0], &[0.0]).text(), "-");
        let db = sq(&[1.0, 2.0], &[1.5, 2.0]);
        assert!(worse(Sqnr::NaN, Sqnr::Db(f64::NEG_INFINITY)) && !worse(Sqnr::Db(f64::NEG_INFINITY), Sqnr::NaN));
        assert!(worse(Sqnr::Db(f64::NEG_INFINITY), db) && worse(db, Sqnr::Db(f64::INFINITY)));
        assert!(!worse(Sqnr::Undefined, db) && worse(db, Sqnr::Undefined));
    }
}
