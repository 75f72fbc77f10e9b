//! The demo's QuantLinear rows: the fused dequantize-matmul (+ LoRA) forward on the demo's weight for NF4,
//! NF4 + double quantization and int8 per channel, at M = 1 (decode) and M = 8, without and with a rank-16
//! adapter; each checked against the f64 reference under the bound of [`crate::agreement`].

use crate::agreement;
use crate::console;
use crate::error::{Context, Error};
use crate::synthetic::{self, DEMO_SCHEMES};
use crate::timing::{self, fmt_ms, fmt_rate};
use lowbit::linear::{BoundTarget, QuantWeight};

/// Rows of x shown.
const BATCHES: [usize; 2] = [1, 8];
/// Rank of the adapter of the LoRA rows.
const LORA_RANK: usize = 16;
/// Timed iterations per row (the median is shown), after one warm-up.
const ITERS: usize = 7;

/// Outcome of the QuantLinear rows.
pub struct Summary {
    /// Rows run.
    pub runs: usize,
    /// Rows outside the bound.
    pub mismatches: usize,
}

fn row(cells: [&str; 9]) -> String {
    let [format, m, lora, ms, gflops, gbps, err, ratio, check] = cells;
    format!("{format:<17} {m:>3} {lora:>6} {ms:>10} {gflops:>9} {gbps:>8} {err:>10} {ratio:>10}  {check}")
}

/// Runs every row on `w` (`[size, size]`, the demo's synthetic weight) and prints the table.
pub fn run(w: &[f32], size: usize) -> Result<Summary, Error> {
    let formats = DEMO_SCHEMES;
    console::line(&format!(
        "QuantLinear {size}x{size}: fused y = x*W^T + bias [+ rank-{LORA_RANK} LoRA] vs the f64 reference \
         (bound: f32 accumulation error, as in tests/linear_paths.rs)"
    ))?;
    console::line(&row(["format", "M", "LoRA", "fused ms", "GFLOP/s", "GB/s", "max |err|", "err/bound", "check"]))?;
    console::line(&"-".repeat(96))?;
    let mut summary = Summary { runs: 0, mismatches: 0 };
    for format in formats {
        let weight = QuantWeight::quantize(w, &[size, size], format).context(|| format!("QuantLinear {format}"))?;
        let packed = weight.packed_bytes();
        for rank in [None, Some(LORA_RANK)] {
            let layer = synthetic::layer_from(weight.clone(), rank).context(|| format!("QuantLinear {format}"))?;
            for m in BATCHES {
                let lora = rank.map_or("-".to_string(), |r| format!("r{r}"));
                let ctx = || format!("QuantLinear {format} M={m} LoRA {lora}");
                let x = synthetic::input(m, size);
                let mut y = Vec::new();
                let t = timing::measure(1, ITERS, || {
                    y = layer.forward(&x)?;
                    Ok::<(), lowbit::Error>(())
                })
                .context(ctx)?;
                let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).context(ctx)?;
                let a = agreement::compare(&layer, &x, &y, &want, BoundTarget::Cpu).context(ctx)?;
                summary.runs += 1;
                let check = if a.ok(BoundTarget::Cpu) {
                    "ok".to_string()
                } else {
                    summary.mismatches += 1;
                    format!("MISMATCH ({} outputs outside the bound)", a.outside)
                };
                console::line(&row([
                    &format.to_string(),
                    &m.to_string(),
                    &lora,
                    &fmt_ms(t.median),
                    &fmt_rate(2.0 * (m * size * size) as f64, t.median),
                    &fmt_rate(packed as f64, t.median),
                    &format!("{:.3e}", a.max_abs_err),
                    &format!("{:.2e}", a.worst_ratio),
                    &check,
                ]))?;
            }
        }
    }
    Ok(summary)
}
