//! The demo's GPU rows: the same QuantLinear cases as [`crate::demo::linear`] (NF4, NF4 + double
//! quantization, int8 per channel; M = 1 and 8; without and with a rank-16 adapter) run by the fused WGSL
//! kernels on the preferred adapter, each checked against the f64 reference under the GPU bound of
//! [`crate::agreement::compare`] (`BoundTarget::Gpu`). No adapter is not an error: the rows are skipped with the reason.

use crate::console;
use crate::demo::linear::Summary;
use crate::error::Error;

/// Largest matrix side the GPU rows use (lavapipe, Mesa's CPU Vulkan driver, stays quick at this size).
#[cfg(feature = "gpu")]
pub const MAX_SIZE: usize = 1024;

/// Without the `gpu` feature: says the GPU rows are not built.
#[cfg(not(feature = "gpu"))]
pub fn run(_w: &[f32], _size: usize) -> Result<Summary, Error> {
    console::line("\nGPU: not built (this lowbit was built without the `gpu` feature); GPU rows skipped")?;
    Ok(Summary { runs: 0, mismatches: 0 })
}

/// Runs the GPU rows on the demo's weight `w` (`[size, size]`), capped at [`MAX_SIZE`].
#[cfg(feature = "gpu")]
pub fn run(w: &[f32], size: usize) -> Result<Summary, Error> {
    use crate::agreement;
    use crate::error::Context;
    use crate::synthetic::{self, DEMO_SCHEMES, SEED};
    use crate::timing::{self, fmt_ms, fmt_rate};
    use lowbit::gpu::{GpuLinear, KernelChoice};
    use lowbit::linear::{BoundTarget, QuantWeight};
    use std::time::Duration;

    const BATCHES: [usize; 2] = [1, 8];
    const LORA_RANK: usize = 16;
    const ITERS: usize = 7;

    let ctx = match crate::gpu::try_open()? {
        Ok(ctx) => ctx,
        Err(detail) => {
            console::line(&format!("\nGPU: no adapter found ({detail}); GPU rows skipped"))?;
            return Ok(Summary { runs: 0, mismatches: 0 });
        }
    };
    let n = size.min(MAX_SIZE);
    let capped;
    let w = if n == size {
        w
    } else {
        capped = synthetic::synthetic_weight(n, n, SEED);
        &capped[..]
    };
    // A CPU adapter's times mean nothing: run each case once for correctness and show no speed.
    let timed = !ctx.is_cpu_adapter();
    let timestamps = ctx.features().timestamps;
    let clock = match (timed, timestamps) {
        (false, _) => "not timed",
        (true, true) => "ms = kernel time from GPU timestamp queries (median)",
        (true, false) => "ms = wall time per forward incl. x upload and y readback (no timestamp queries; median)",
    };
    let row = |cells: [&str; 10]| {
        let [format, m, lora, kernel, ms, gflops, gbps, err, ratio, check] = cells;
        format!(
            "{format:<17} {m:>3} {lora:>6} {kernel:<26} {ms:>9} {gflops:>9} {gbps:>8} {err:>10} {ratio:>10}  {check}"
        )
    };
    console::line(&format!(
        "\nGPU: {}\nGPU QuantLinear {n}x{n}: fused WGSL kernels, y = x*W^T + bias [+ rank-{LORA_RANK} LoRA] vs the \
         f64 reference (bound: f32 accumulation + GPU terms of QuantLinear::error_bound; {clock})",
        crate::gpu::describe(&ctx)
    ))?;
    console::line(&row([
        "format",
        "M",
        "LoRA",
        "kernel",
        "GPU ms",
        "GFLOP/s",
        "GB/s",
        "max |err|",
        "err/bound",
        "check",
    ]))?;
    console::line(&"-".repeat(120))?;
    let mut summary = Summary { runs: 0, mismatches: 0 };
    for format in DEMO_SCHEMES {
        let weight = QuantWeight::quantize(w, &[n, n], format).context(|| format!("GPU QuantLinear {format}"))?;
        let packed = weight.packed_bytes();
        for rank in [None, Some(LORA_RANK)] {
            let layer = synthetic::layer_from(weight.clone(), rank).context(|| format!("GPU QuantLinear {format}"))?;
            let gpu_layer = GpuLinear::upload(&ctx, &layer).context(|| format!("uploading {format} to the GPU"))?;
            for m in BATCHES {
                let lora = rank.map_or("-".to_string(), |r| format!("r{r}"));
                let what = || format!("GPU QuantLinear {format} M={m} LoRA {lora}");
                let x = synthetic::input(m, n);
                let choice = KernelChoice::default();
                let kernel = gpu_layer.kernel_for(&ctx, m, choice).context(what)?.name();
                let (y, time) = if !timed {
                    (gpu_layer.forward_blocking(&ctx, &x, m).context(what)?, None)
                } else if timestamps {
                    gpu_layer.forward_blocking(&ctx, &x, m).context(what)?; // warm-up: pipelines, buffers
                    let (y, ns) = gpu_layer.time_forward_blocking(&ctx, &x, m, choice, ITERS).context(what)?;
                    (y, ns.map(|ns| Duration::from_nanos(ns.round() as u64)))
                } else {
                    let mut y = Vec::new();
                    let t = timing::measure(1, ITERS, || {
                        y = gpu_layer.forward_blocking(&ctx, &x, m)?;
                        Ok::<(), lowbit::Error>(())
                    })
                    .context(what)?;
                    (y, Some(t.median))
                };
                let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).context(what)?;
                let a = agreement::compare(&layer, &x, &y, &want, BoundTarget::Gpu).context(what)?;
                summary.runs += 1;
                let check = if a.ok(BoundTarget::Gpu) {
                    "ok".to_string()
                } else {
                    summary.mismatches += 1;
                    format!("MISMATCH ({} outputs outside the bound, relative L2 {:.2e})", a.outside, a.nse.sqrt())
                };
                let dash = || "-".to_string();
                console::line(&row([
                    &format.to_string(),
                    &m.to_string(),
                    &lora,
                    &kernel,
                    &time.map_or_else(dash, fmt_ms),
                    &time.map_or_else(dash, |t| fmt_rate(2.0 * (m * n * n) as f64, t)),
                    &time.map_or_else(dash, |t| fmt_rate(packed as f64, t)),
                    &format!("{:.3e}", a.max_abs_err),
                    &format!("{:.2e}", a.worst_ratio),
                    &check,
                ]))?;
            }
        }
    }
    Ok(summary)
}
