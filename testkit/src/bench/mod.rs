//! `lowbit bench`: times the fused QuantLinear forward on a synthetic layer (on the CPU, or on the preferred
//! GPU adapter) and checks it against the f64 reference; [`all`] is `lowbit bench --all`.

pub mod all;
pub mod estimate;

use crate::agreement;
use crate::console;
use crate::error::{Context, Error};
use crate::synthetic;
use crate::timing::{self, fmt_ms, fmt_rate};
use lowbit::cpu::KernelPath;
use lowbit::linear::BoundTarget;
use lowbit::Scheme;

/// Untimed runs before the timed ones (page faults, rayon's pool, caches).
const WARMUP: usize = 2;
/// The reference forward (f64, single-threaded) is computed only up to this many multiply-adds.
pub const REFERENCE_MAX_MACS: usize = 200_000_000;
/// Largest synthetic weight, in elements (4 GiB of f32 while it is generated).
const MAX_WEIGHT: usize = 1 << 30;

/// Where the benchmark runs the layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The fused CPU kernels (best instruction set, rayon threads).
    #[default]
    Cpu,
    /// The fused WGSL kernels on the preferred GPU adapter (feature `gpu`; an error without it).
    Gpu,
}

/// What to benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Bench {
    /// Weight format.
    pub format: Scheme,
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
    /// Where to run the layer.
    pub device: Device,
    /// Run even when the estimated work exceeds [`estimate::MAX_SECONDS`].
    pub yes: bool,
}

/// Runs the benchmark, in a pool of `threads` threads when given. Returns an error if the fused result is
/// outside the stated bound of the reference, and, before building anything, if the estimated work
/// ([`estimate::Estimate`]) exceeds [`estimate::MAX_SECONDS`] and `b.yes` is not set.
pub fn run(b: Bench) -> Result<(), Error> {
    if b.out.checked_mul(b.inp).is_none_or(|n| n > MAX_WEIGHT) {
        return Err(Error::new(format!(
            "shape {}x{} is too large for a synthetic benchmark (at most {MAX_WEIGHT} weights)",
            b.out, b.inp
        )));
    }
    if b.batch.checked_mul(b.inp.max(b.out)).is_none_or(|n| n > MAX_WEIGHT) {
        return Err(Error::new(format!(
            "--batch {} is too large for {}x{} (x and y would exceed {MAX_WEIGHT} elements)",
            b.batch, b.out, b.inp
        )));
    }
    let work = estimate::Estimate::of(&b);
    if work.seconds() > estimate::MAX_SECONDS && !b.yes {
        return Err(Error::new(format!(
            "this benchmark ({}x{}, M = {}, {} iterations) is estimated at {}; that is over the {} s bound. Pass \
             --yes to run it anyway, or lower --iters, --batch or --shape",
            b.out,
            b.inp,
            b.batch,
            b.iters,
            work.describe(),
            estimate::MAX_SECONDS
        )));
    }
    if b.device == Device::Gpu {
        if b.threads.is_some() {
            return Err(Error::new("--threads applies to --device cpu only"));
        }
        return bench_gpu(b);
    }
    match b.threads {
        None => bench(b),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| Error::new(format!("starting a pool of {n} threads: {e}")))?
            .install(|| bench(b)),
    }
}

fn bench(b: Bench) -> Result<(), Error> {
    let Bench { format, out, inp, batch: m, lora_rank, iters, .. } = b;
    let layer = synthetic::layer(format, out, inp, lora_rank).context(|| format!("building a {out}x{inp} layer"))?;
    let x = synthetic::input(m, inp);
    let path = KernelPath::best();
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
    let t = timing::measure(WARMUP, iters, || -> Result<(), Error> {
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

    check_reference(&layer, &x, &y, false)
}

/// Compares `y` with the f64 reference (skipped above [`REFERENCE_MAX_MACS`]); `gpu` selects the GPU bound.
fn check_reference(layer: &lowbit::linear::QuantLinear, x: &[f32], y: &[f32], gpu: bool) -> Result<(), Error> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let m = x.len() / inp.max(1);
    let macs = out.saturating_mul(inp).saturating_mul(m);
    if macs > REFERENCE_MAX_MACS {
        return console::line(&format!("vs reference: skipped (too large: out*in*M = {macs} > {REFERENCE_MAX_MACS})"));
    }
    let want = layer.forward_with(x, lowbit::linear::ForwardOptions::reference())?;
    let (target, rule) = if gpu { (BoundTarget::Gpu, " (GPU bound)") } else { (BoundTarget::Cpu, "") };
    let a = agreement::compare(layer, x, y, &want, target)?;
    let ok = a.ok(target);
    console::line(&format!(
        "vs reference (f64){rule}: max |err| {:.3e}, relative L2 {:.3e}, worst err/bound {:.2e}: {}",
        a.max_abs_err,
        a.nse.sqrt(),
        a.worst_ratio,
        if ok { "ok" } else { "MISMATCH" }
    ))?;
    if !ok {
        return Err(Error::new(format!(
            "{} of {} outputs are outside the stated error bound of the reference",
            a.outside,
            y.len()
        )));
    }
    Ok(())
}

#[cfg(not(feature = "gpu"))]
fn bench_gpu(_b: Bench) -> Result<(), Error> {
    Err(Error::new("--device gpu: this lowbit was built without the `gpu` feature"))
}

/// The benchmark on the preferred GPU adapter: kernel time from timestamp queries when the adapter has them,
/// else wall time per forward.
#[cfg(feature = "gpu")]
fn bench_gpu(b: Bench) -> Result<(), Error> {
    use lowbit::gpu::{GpuLinear, KernelChoice};
    use std::time::Duration;

    let Bench { format, out, inp, batch: m, lora_rank, iters, .. } = b;
    let ctx = crate::gpu::open()?;
    let layer = synthetic::layer(format, out, inp, lora_rank).context(|| format!("building a {out}x{inp} layer"))?;
    let x = synthetic::input(m, inp);
    let lora = lora_rank.map_or_else(|| "no LoRA".to_string(), |r| format!("LoRA rank {r}"));
    let packed = layer.weight().packed_bytes();
    let gpu_layer = GpuLinear::upload(&ctx, &layer).context(|| format!("uploading the {out}x{inp} layer"))?;
    let choice = KernelChoice::default();
    let kernel = gpu_layer.kernel_for(&ctx, m, choice)?.name();
    console::line(&format!(
        "lowbit bench: {format} weight {out}x{inp} (out x in) + bias, {lora}, M = {m}\n\
         GPU {}\n\
         kernel {kernel}; packed weight {:.2} MiB ({:.3} bits/weight, scales included)",
        crate::gpu::describe(&ctx),
        packed as f64 / (1024.0 * 1024.0),
        packed as f64 * 8.0 / (out * inp) as f64,
    ))?;

    let mut y = Vec::new();
    for _ in 0..WARMUP {
        y = gpu_layer.forward_blocking(&ctx, &x, m)?;
    }
    let (ty, ns) = gpu_layer.time_forward_blocking(&ctx, &x, m, choice, iters)?;
    let (median, what) = match ns {
        Some(ns) => {
            y = ty;
            (
                Duration::from_secs_f64(ns * 1e-9),
                format!(
                    "kernel time (GPU timestamp queries): {} ms median of {iters} runs",
                    fmt_ms(Duration::from_secs_f64(ns * 1e-9))
                ),
            )
        }
        None => {
            let t = timing::measure(0, iters, || -> Result<(), Error> {
                y = gpu_layer.forward_blocking(&ctx, &x, m)?;
                Ok(())
            })?;
            let what = format!(
                "wall time per forward (no timestamp queries on this adapter; x upload and y readback included): \
                 {} ms median (min {}, max {}; {} iterations after {WARMUP} warm-up)",
                fmt_ms(t.median),
                fmt_ms(t.min),
                fmt_ms(t.max),
                t.iters
            );
            (t.median, what)
        }
    };
    let flops = 2.0 * (m * out * inp) as f64;
    console::line(&format!(
        "{what}\n\
         {:>10} GFLOP/s (2*M*out*in = {:.3} GFLOP)\n\
         {:>10} GB/s of packed weight read",
        fmt_rate(flops, median),
        flops / 1e9,
        fmt_rate(packed as f64, median),
    ))?;
    check_reference(&layer, &x, &y, true)
}
