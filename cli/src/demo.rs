//! `lowbit demo`: quantizes a synthetic weight matrix with every format through every CPU path, checks each
//! path against the scalar reference bit for bit, and prints speed and error; then runs the fused QuantLinear
//! forward on the same weight ([`crate::demo_linear`]) and, when a GPU adapter exists, the same forward on the
//! GPU ([`crate::demo_gpu`]).
//!
//! The schemes shown are the entries of [`formats`]; adding one means one line there.

use crate::console;
use crate::demo_gpu;
use crate::demo_linear;
use crate::error::{CliError, Context};
use crate::progress::Progress;
use crate::stats::{fmt_db, ErrorStats};
use lowbit::cpu::{Isa, KernelPath};
use lowbit::nf4::BlockScales;
use lowbit::Scheme;
use lowbit_testkit::synthetic::{synthetic_weight, SEED};
use std::time::{Duration, Instant};

/// One quantize + dequantize through one path.
pub struct Run {
    /// Time to quantize (calibration included).
    pub quantize: Duration,
    /// Time to dequantize to f32 (into a preallocated buffer where the format allows).
    pub dequantize: Duration,
    /// Storage cost in bits per weight, parameters included.
    pub bits_per_weight: f64,
    /// Named buffers (codes, parameters) that must equal the reference path's byte for byte.
    pub parts: Vec<(&'static str, Vec<u8>)>,
}

/// Quantizes `x` (row-major, `shape`) with `scheme` through `path`, then dequantizes it into `out` through
/// `path`, timing both and keeping every stored buffer for the bit-for-bit comparison.
fn run_scheme(scheme: Scheme, x: &[f32], shape: &[usize], path: KernelPath, out: &mut [f32]) -> lowbit::Result<Run> {
    match scheme.validate()? {
        Scheme::Int8(g) => {
            let t = Instant::now();
            let q = lowbit::affine::quantize_with(x, shape, g, path)?;
            let quantize = t.elapsed();
            let t = Instant::now();
            q.dequantize_into_with(out, path)?;
            let dequantize = t.elapsed();
            Ok(Run {
                quantize,
                dequantize,
                bits_per_weight: q.bits_per_weight(),
                parts: vec![
                    ("codes", q.codes().to_vec()),
                    ("scales", f32_bits(q.scales())),
                    ("zero points", q.zero_points().to_vec()),
                ],
            })
        }
        Scheme::FourBit { format, blocksize, double_quant } => {
            let t = Instant::now();
            let q = lowbit::nf4::quantize_4bit_with(format, x, shape, blocksize, double_quant, path)?;
            let quantize = t.elapsed();
            let t = Instant::now();
            q.dequantize_into_with(out, path)?;
            let dequantize = t.elapsed();
            let mut parts = vec![("packed codes", q.packed().to_vec()), ("absmax", f32_bits(&q.absmax()))];
            if let BlockScales::Double(d) = q.scales() {
                parts.push(("absmax codes", d.codes().to_vec()));
                parts.push(("nested absmax", f32_bits(d.nested_absmax())));
                parts.push(("nested offset", f32_bits(&[d.offset()])));
            }
            Ok(Run { quantize, dequantize, bits_per_weight: q.bits_per_weight(), parts })
        }
    }
}

fn f32_bits(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect()
}

/// Every scheme the demo shows, in table order.
pub fn formats() -> Vec<Scheme> {
    ["int8:tensor", "int8:channel", "int8:group:128", "int8:group:32", "nf4:64", "nf4:64+dq", "fp4:64"]
        .iter()
        .map(|s| s.parse().expect("a valid scheme"))
        .collect()
}

/// Where `run` (with dequantized values `out`) first differs from the reference, or `None`.
fn first_difference(reference: &Run, ref_out: &[f32], run: &Run, out: &[f32]) -> Option<String> {
    for ((name, a), (_, b)) in reference.parts.iter().zip(&run.parts) {
        if a.len() != b.len() {
            return Some(format!("{name}: length {} vs {}", b.len(), a.len()));
        }
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            return Some(format!("{name} byte {i}"));
        }
    }
    if let Some(i) = ref_out.iter().zip(out).position(|(x, y)| x.to_bits() != y.to_bits()) {
        return Some(format!("dequantized [{i}]: {} vs {}", out[i], ref_out[i]));
    }
    None
}

fn row(cells: [&str; 10]) -> String {
    let [path, format, tq, td, gq, gd, err, sqnr, bits, check] = cells;
    format!("{path:<16} {format:<16} {tq:>9} {td:>9} {gq:>8} {gd:>8} {err:>10} {sqnr:>7} {bits:>6}  {check}")
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn gbps(bytes: usize, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        "-".into()
    } else {
        format!("{:.2}", bytes as f64 / s / 1e9)
    }
}

/// Runs the demo on a `size × size` matrix. Fails (exit 1) if any path disagrees with the reference.
pub fn run(size: usize) -> Result<(), CliError> {
    let (rows, cols) = (size, size);
    let shape = [rows, cols];
    let n = rows * cols;
    let x = synthetic_weight(rows, cols, SEED);

    let available: Vec<String> = Isa::available().iter().map(|i| i.name().to_string()).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    console::out(&format!(
        "lowbit demo: synthetic {rows}x{cols} f32 weight ({:.1} MiB; log-normal row scales, ~1/16384 outliers)\n\
         CPU ISA: {} (available: {}); {threads} hardware thread(s)\n\
         every path is checked against the scalar reference: codes, parameters and dequantized bits\n\n",
        (n * 4) as f64 / (1024.0 * 1024.0),
        Isa::best(),
        available.join(", ")
    ))?;

    // The reference first, then every other path.
    let mut paths = vec![KernelPath::REFERENCE];
    paths.extend(KernelPath::all_available().into_iter().filter(|p| *p != KernelPath::REFERENCE));
    let formats = formats();

    // Start rayon's pool and touch every kernel once, so the first timed run does not pay for it.
    let warm = synthetic_weight(64, 64, SEED);
    let mut warm_out = vec![0f32; warm.len()];
    for f in &formats {
        for &p in &paths {
            run_scheme(*f, &warm, &[64, 64], p, &mut warm_out).context(|| format!("{f} on {p}"))?;
        }
    }

    let progress = Progress::new((formats.len() * paths.len()) as u64, "demo");
    progress.println(&row([
        "path",
        "format",
        "quant ms",
        "deq ms",
        "q GB/s",
        "dq GB/s",
        "max |err|",
        "SQNR dB",
        "bits/w",
        "check",
    ]))?;
    progress.println(&"-".repeat(110))?;
    let mut ref_out = vec![1f32; n];
    let mut out = vec![1f32; n];
    let (mut runs, mut mismatches) = (0usize, 0usize);
    for f in &formats {
        let label = f.to_string();
        let mut reference: Option<(Run, ErrorStats)> = None;
        for &path in &paths {
            progress.set_message(&format!("{label} on {path}"));
            let ctx = || format!("{label} on {path}");
            let (run, stats, check) = match &reference {
                None => {
                    let run = run_scheme(*f, &x, &shape, path, &mut ref_out).context(ctx)?;
                    let stats = ErrorStats::compute(&x, &ref_out);
                    (run, stats, "reference".to_string())
                }
                Some((r, ref_stats)) => {
                    let run = run_scheme(*f, &x, &shape, path, &mut out).context(ctx)?;
                    runs += 1;
                    match first_difference(r, &ref_out, &run, &out) {
                        None => (run, *ref_stats, "ok".to_string()),
                        Some(what) => {
                            mismatches += 1;
                            (run, ErrorStats::compute(&x, &out), format!("MISMATCH ({what})"))
                        }
                    }
                }
            };
            progress.println(&row([
                &path.name(),
                &label,
                &ms(run.quantize),
                &ms(run.dequantize),
                &gbps(n * 4, run.quantize),
                &gbps(n * 4, run.dequantize),
                &format!("{:.3e}", stats.max_abs),
                &fmt_db(stats.sqnr_db),
                &format!("{:.3}", run.bits_per_weight),
                &check,
            ]))?;
            if reference.is_none() {
                reference = Some((run, stats));
            }
            progress.inc();
        }
        progress.println("")?;
    }
    drop(progress);
    drop((ref_out, out));
    let linear = demo_linear::run(&x, size)?;
    let gpu = demo_gpu::run(&x, size)?;
    let mut failures = Vec::new();
    if mismatches > 0 {
        failures.push(format!("{mismatches} of {runs} quantization runs disagree with the scalar reference"));
    }
    if linear.mismatches > 0 {
        failures.push(format!(
            "{} of {} QuantLinear runs are outside the stated bound of the f64 reference",
            linear.mismatches, linear.runs
        ));
    }
    if gpu.mismatches > 0 {
        failures.push(format!(
            "{} of {} GPU QuantLinear runs are outside the stated bound of the f64 reference",
            gpu.mismatches, gpu.runs
        ));
    }
    if !failures.is_empty() {
        return Err(CliError::new(format!("{} (rows marked MISMATCH)", failures.join("; "))));
    }
    console::line(&format!(
        "\nall {runs} quantization runs match the scalar reference bit for bit; all {} QuantLinear runs agree \
         with the f64 reference within the stated bound{}",
        linear.runs,
        if gpu.runs > 0 { format!("; all {} GPU QuantLinear runs too", gpu.runs) } else { String::new() }
    ))?;
    Ok(())
}
