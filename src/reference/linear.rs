//! Reference `QuantLinear` forward: dequantize through the reference module, plain loops, f64 accumulation.
//! The oracle every fused kernel is tested against.

use crate::linear::{AdapterSelection, QuantLinear};

/// `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` with every sum in f64, rounded to f32 once per output.
/// `x` is `[M, in]` f32, already validated.
pub(crate) fn forward(layer: &QuantLinear, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f32> {
    let (n_out, n_in) = (layer.out_features(), layer.in_features());
    let m = x.len() / n_in;
    let w = layer.weight().dequantize_reference();
    let mut y = vec![0.0f32; m * n_out];
    for r in 0..m {
        let xr = &x[r * n_in..(r + 1) * n_in];
        let adapters: Vec<usize> = layer.adapters_for_row(sel, r).collect();
        // Shrink: t = x·Aᵀ per adapter.
        let shrink: Vec<Vec<f64>> = adapters
            .iter()
            .map(|&a| {
                let ad = &layer.adapters()[a];
                (0..ad.rank()).map(|k| dot(xr, &ad.a()[k * n_in..(k + 1) * n_in])).collect()
            })
            .collect();
        for o in 0..n_out {
            let mut acc = dot(xr, &w[o * n_in..(o + 1) * n_in]);
            if let Some(b) = layer.bias() {
                acc += b[o] as f64;
            }
            for (t, &a) in shrink.iter().zip(&adapters) {
                let ad = &layer.adapters()[a];
                let brow = &ad.b()[o * ad.rank()..(o + 1) * ad.rank()];
                let e: f64 = t.iter().zip(brow).map(|(&t, &b)| t * b as f64).sum();
                acc += ad.scaling() as f64 * e;
            }
            y[r * n_out + o] = acc as f32;
        }
    }
    y
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Per-output bound on `|y − y_ref|` for any f32 forward of `layer` on `x` (`[M, in]`) under `sel`, where
/// `y_ref` is [`forward`]'s f64 result (before its final rounding to f32).
///
/// Every fused kernel uses the reference's dequantized weights (or applies a block scale after summing,
/// which adds at most one rounding per product), so the only error is f32 accumulation. A sum of K products
/// in f32, in any order, with or without FMA, is within γ_K·Σ|x_k·w_k| of the exact sum (γ_K = K·u/(1−K·u),
/// u = ε/2). The bound allows `(K + 3)·ε·Σ|x_k·w_k|` for the base product and the final additions,
/// `ε·|bias|`, and per LoRA term `(K + r + 3)·ε·|s|·Σ_r (Σ_k |x_k·A_rk|)·|B_or|` (the shrink's K-term sums,
/// the expand's r-term sum, the scaling), plus 1e-30 for underflow. Using ε = 2u makes it generous by about
/// 2× but never tuned to pass.
pub(crate) fn error_bound(layer: &QuantLinear, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f64> {
    let (n_out, n_in) = (layer.out_features(), layer.in_features());
    let m = x.len() / n_in;
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    let abs_dot = |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum() };
    let mut bounds = Vec::with_capacity(m * n_out);
    for r in 0..m {
        let xr = &x[r * n_in..(r + 1) * n_in];
        let adapters: Vec<usize> = layer.adapters_for_row(sel, r).collect();
        // T_k = Σ_i |x_i·A_ki| per adapter (shared by every output).
        let t_abs: Vec<Vec<f64>> = adapters
            .iter()
            .map(|&a| {
                let ad = &layer.adapters()[a];
                (0..ad.rank()).map(|k| abs_dot(xr, &ad.a()[k * n_in..(k + 1) * n_in])).collect()
            })
            .collect();
        for o in 0..n_out {
            let mut bound = (n_in as f64 + 3.0) * eps * abs_dot(xr, &w[o * n_in..(o + 1) * n_in]);
            if let Some(bias) = layer.bias() {
                bound += eps * (bias[o] as f64).abs();
            }
            for (t, &a) in t_abs.iter().zip(&adapters) {
                let ad = &layer.adapters()[a];
                let rank = ad.rank();
                let s_lora: f64 =
                    t.iter().zip(&ad.b()[o * rank..(o + 1) * rank]).map(|(&t, &b)| t * (b as f64).abs()).sum();
                bound += (n_in + rank + 3) as f64 * eps * (ad.scaling() as f64).abs() * s_lora;
            }
            bounds.push(bound + 1e-30);
        }
    }
    bounds
}
