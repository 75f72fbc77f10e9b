//! `lowbit bench`: times the fused QuantLinear forward on a synthetic layer and checks it against the f64
//! reference.

use crate::agreement;
use crate::console;
use crate::error::{CliError, Context};
use crate::synthetic::{self, LayerFormat};
use crate::timing::{self, fmt_ms, fmt_rate};
use lowbit::cpu::Path;

/// Untimed runs before the timed ones (page faults, rayon's pool, caches).
const WARMUP: usize = 2;
/// The reference forward (f64, single-threaded) is computed only up to this many multiply-adds.
pub const REFERENCE_MAX_MACS: usize = 200_000_000;
/// Largest synthetic weight, in elements (4 GiB of f32 while it is generated).
const MAX_WEIGHT: usize = 1 << 30;

/// What to benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Bench {
    /// Weight format.
    pub format: LayerFormat,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Rows of x.
    pub batch: usize,
    /// Rank of the LoRA adapter, if any.
    pub lora_rank: Option<usize>,
    /// Size of the rayon pool (default: rayon's, one thread per hardware thread).
    pub threads: Option<usize>,
    /// Timed iterations.
    pub iters: usize,
}

/// Runs the benchmark, in a pool of `threads` threads when given. Fails (exit 1) if the fused result is
/// outside the stated bound of the reference.
pub fn run(b: Bench) -> Result<(), CliError> {
    if b.out.checked_mul(b.inp).is_none_or(|n| n > MAX_WEIGHT) {
        return Err(CliError::new(format!(
            "shape {}x{} is too large for a synthetic benchmark (at most {MAX_WEIGHT} weights)",
            b.out, b.inp
        )));
    }
    if b.batch.checked_mul(b.inp.max(b.out)).is_none_or(|n| n > MAX_WEIGHT) {
        return Err(CliError::new(format!(
            "--batch {} is too large for {}x{} (x and y would exceed {MAX_WEIGHT} elements)",
            b.batch, b.out, b.inp
        )));
    }
    match b.threads {
        None => bench(b),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| CliError::new(format!("starting a pool of {n} threads: {e}")))?
            .install(|| bench(b)),
    }
}

fn bench(b: Bench) -> Result<(), CliError> {
    let Bench { format, out, inp, batch: m, lora_rank, iters, .. } = b;
    let layer = synthetic::layer(format, out, inp, lora_rank).context(|| format!("building a {out}x{inp} layer"))?;
    let x = synthetic::input(m, inp);
    let path = Path::best();
    let lora = lora_rank.map_or_else(|| "no LoRA".to_string(), |r| format!("LoRA rank {r}"));
    let packed = layer.weight().packed_bytes();
    console::line(&format!(
        "lowbit bench: {format} weight {out}x{inp} (out x in) + bias, {lora}, M = {m}\n\
         path {path}, {} rayon thread(s); packed weight {:.2} MiB ({:.3} bits/weight, scales included)",
        rayon::current_num_threads(),
        packed as f64 / (1024.0 * 1024.0),
        packed as f64 * 8.0 / (out * inp) as f64,
    ))?;

    let mut y = Vec::new();
    let t = timing::measure(WARMUP, iters, || -> Result<(), CliError> {
        y = layer.forward(&x)?;
        Ok(())
    })?;
    let flops = 2.0 * (m * out * inp) as f64;
    console::line(&format!(
        "fused forward: {} ms median (min {}, max {}; {} iterations after {WARMUP} warm-up)\n\
         {:>10} GFLOP/s (2*M*out*in = {:.3} GFLOP)\n\
         {:>10} GB/s of packed weight read",
        fmt_ms(t.median),
        fmt_ms(t.min),
        fmt_ms(t.max),
        t.iters,
        fmt_rate(flops, t.median),
        flops / 1e9,
        fmt_rate(packed as f64, t.median),
    ))?;

    let macs = out.saturating_mul(inp).saturating_mul(m);
    if macs > REFERENCE_MAX_MACS {
        return console::line(&format!("vs reference: skipped (too large: out*in*M = {macs} > {REFERENCE_MAX_MACS})"));
    }
    let want = layer.forward_reference(&x)?;
    let a = agreement::compare(&layer, &x, &y, &want);
    console::line(&format!(
        "vs reference (f64): max |err| {:.3e}, relative L2 {:.3e}, worst err/bound {:.2e}: {}",
        a.max_abs,
        a.rel_l2,
        a.worst_ratio,
        if a.ok() { "ok" } else { "MISMATCH" }
    ))?;
    if !a.ok() {
        return Err(CliError::new(format!(
            "{} of {} outputs are outside the stated error bound of the reference",
            a.outside,
            y.len()
        )));
    }
    Ok(())
}
