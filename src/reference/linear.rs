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
