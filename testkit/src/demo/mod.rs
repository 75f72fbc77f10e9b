//! `lowbit demo`: quantizes a synthetic weight matrix with every format through every CPU path, checks each
//! path against the scalar reference bit for bit, and prints speed and error; then runs the fused QuantLinear
//! forward on the same weight ([`linear`]) and, when a GPU adapter exists, the same forward on the
//! GPU ([`gpu`]).
//!
//! The schemes shown are the entries of [`quantize::formats`]; adding one means one line there.

pub mod gpu;
pub mod linear;
pub mod quantize;

use crate::console;
use crate::error::{Context, Error};
use crate::stats::{fmt_db, ErrorStats};
use crate::synthetic::{synthetic_weight, SEED};
use lowbit::cpu::{Isa, KernelPath};
use quantize::{first_difference, formats, run_scheme, Run};
use std::time::Duration;

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

/// Runs the demo on a `size × size` matrix, printing its tables to stdout. Returns an error if any path
/// disagrees with the reference or any QuantLinear row is outside its bound.
pub fn run(size: usize) -> Result<(), Error> {
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

    console::line(&row([
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
    console::line(&"-".repeat(110))?;
    let mut ref_out = vec![1f32; n];
    let mut out = vec![1f32; n];
    let (mut runs, mut mismatches) = (0usize, 0usize);
    for f in &formats {
        let label = f.to_string();
        let mut reference: Option<(Run, ErrorStats)> = None;
        for &path in &paths {
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
            console::line(&row([
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
        }
        console::line("")?;
    }
    drop((ref_out, out));
    let linear = linear::run(&x, size)?;
    let gpu = gpu::run(&x, size)?;
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
        return Err(Error::new(format!("{} (rows marked MISMATCH)", failures.join("; "))));
    }
    console::line(&format!(
        "\nall {runs} quantization runs match the scalar reference bit for bit; all {} QuantLinear runs agree \
         with the f64 reference within the stated bound{}",
        linear.runs,
        if gpu.runs > 0 { format!("; all {} GPU QuantLinear runs too", gpu.runs) } else { String::new() }
    ))?;
    Ok(())
}
