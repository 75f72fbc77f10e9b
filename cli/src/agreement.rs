//! How closely a fused [`QuantLinear`] forward agrees with the f64 reference, judged by the bound that
//! `tests/linear_paths.rs` states (the same formula, so the demo and the tests hold the kernels to one rule).
//!
//! The fused kernels use exactly the reference's dequantized weights, so the only error is f32 accumulation.
//! Per output element the allowed difference is `(K + 3)·ε·Σ_k|x_k·w_k|` for the base product (K = `in`),
//! plus `ε·|bias|`, plus for each enabled LoRA adapter `(K + r + 3)·ε·|s|·Σ_r (Σ_k|x_k·A_rk|)·|B_or|`, plus
//! half an ulp of the reference value (it is rounded to f32 once).

use lowbit::linear::QuantLinear;
use rayon::prelude::*;

/// The comparison of one fused output with the reference output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// max |y − y_ref|.
    pub max_abs: f64,
    /// ‖y − y_ref‖₂ / ‖y_ref‖₂ (0 when both are zero).
    pub rel_l2: f64,
    /// max over elements of |y − y_ref| / allowed: ≤ 1 means within the bound.
    pub worst_ratio: f64,
    /// Elements outside the bound.
    pub outside: usize,
}

impl Agreement {
    /// Whether every element is within the bound.
    pub fn ok(&self) -> bool {
        self.outside == 0
    }

    /// [`ok`](Self::ok), and the normalised squared error within [`GPU_NSE_LIMIT`] (the GPU checks' rule).
    #[cfg(feature = "gpu")]
    pub fn ok_gpu(&self) -> bool {
        self.ok() && self.rel_l2 * self.rel_l2 <= GPU_NSE_LIMIT
    }
}

/// Per-element bounds (without the reference's half ulp) for `layer` on `x: [M, in]` with every enabled
/// adapter applied to every row, as [`QuantLinear::forward`] does. Costs about M·out·in f64 operations,
/// spread over rayon's pool.
pub fn bounds(layer: &QuantLinear, x: &[f32]) -> Vec<f64> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let m = x.len() / inp;
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    // Σ_k |x_k·A_rk| for every row of x and every rank of every enabled adapter.
    let lora: Vec<(&lowbit::lora::LoraAdapter, Vec<f64>)> = layer
        .adapters()
        .iter()
        .filter(|a| a.is_enabled())
        .map(|a| {
            let r = a.rank();
            let t = (0..m * r)
                .into_par_iter()
                .map(|i| {
                    let (row, k) = (i / r, i % r);
                    abs_dot(&x[row * inp..(row + 1) * inp], &a.a()[k * inp..(k + 1) * inp])
                })
                .collect();
            (a, t)
        })
        .collect();
    let per_feature: Vec<Vec<f64>> = (0..out)
        .into_par_iter()
        .map(|o| {
            let w_row = &w[o * inp..(o + 1) * inp];
            (0..m)
                .map(|row| {
                    let mut bound = (inp as f64 + 3.0) * eps * abs_dot(&x[row * inp..(row + 1) * inp], w_row);
                    if let Some(bias) = layer.bias() {
                        bound += eps * (bias[o] as f64).abs();
                    }
                    for (a, t) in &lora {
                        let r = a.rank();
                        let s: f64 = (0..r).map(|k| t[row * r + k] * (a.b()[o * r + k] as f64).abs()).sum();
                        bound += (inp + r + 3) as f64 * eps * (a.scaling() as f64).abs() * s;
                    }
                    bound + 1e-30
                })
                .collect()
        })
        .collect();
    let mut b = vec![0.0; m * out];
    for (o, col) in per_feature.iter().enumerate() {
        for (row, &v) in col.iter().enumerate() {
            b[row * out + o] = v;
        }
    }
    b
}

fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum()
}

/// Compares the fused output `got` with the reference output `want` of `layer` on `x`.
pub fn compare(layer: &QuantLinear, x: &[f32], got: &[f32], want: &[f32]) -> Agreement {
    compare_with(&bounds(layer, x), got, want)
}

/// Largest normalised squared error `Σ(y − y_ref)² / Σy_ref²` the GPU checks accept for f32 kernels (the
/// limit of `tests/gpu_kernels.rs`), on top of the per-element bound.
#[cfg(feature = "gpu")]
pub const GPU_NSE_LIMIT: f64 = 1e-10;

/// The GPU kernels' extra allowance on top of [`bounds`], term for term as `tests/gpu_common` states it:
///
/// * double-quantized scales are decoded in the kernel as `map[c]·nested + offset`, with an FMA whose
///   rounding is not the reference's: per weight `ε·|T[q]|·(|map[c]·nested| + |offset|)`, times `|x_k|`;
/// * the bias is added after the LoRA expand and the chunk sum: `3ε·|bias|` instead of `ε·|bias|`.
#[cfg(feature = "gpu")]
pub fn gpu_extra(layer: &QuantLinear, x: &[f32]) -> Vec<f64> {
    use lowbit::linear::QuantWeight;
    use lowbit::nf4::BlockScales;
    let (out, inp) = (layer.out_features(), layer.in_features());
    let m = x.len() / inp;
    let eps = f32::EPSILON as f64;
    let dq = match layer.weight() {
        QuantWeight::FourBit(t) => match t.scales() {
            BlockScales::Double(dq) => Some((t, dq)),
            BlockScales::Plain(_) => None,
        },
        QuantWeight::Int8(_) => None,
    };
    let per_feature: Vec<Vec<f64>> = (0..out)
        .into_par_iter()
        .map(|o| {
            // |T[q]|·(|map[c]·nested| + |offset|) for the weights of row o.
            let d: Vec<f64> = match dq {
                None => Vec::new(),
                Some((t, dq)) => (o * inp..(o + 1) * inp)
                    .map(|e| {
                        let byte = t.packed()[e / 2];
                        let q = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                        let b = e / t.blocksize();
                        let c = dq.codes()[b] as usize;
                        let s = (dq.map()[c] as f64 * dq.nested_absmax()[b / dq.nested_blocksize()] as f64).abs()
                            + (dq.offset() as f64).abs();
                        (t.table()[q as usize] as f64).abs() * s
                    })
                    .collect(),
            };
            let bias = layer.bias().map_or(0.0, |b| 2.0 * eps * (b[o] as f64).abs());
            (0..m)
                .map(|row| {
                    let xr = &x[row * inp..(row + 1) * inp];
                    bias + eps * xr.iter().zip(&d).map(|(&a, &d)| (a as f64).abs() * d).sum::<f64>()
                })
                .collect()
        })
        .collect();
    let mut b = vec![0.0; m * out];
    for (o, col) in per_feature.iter().enumerate() {
        for (row, &v) in col.iter().enumerate() {
            b[row * out + o] = v;
        }
    }
    b
}

/// Compares a GPU forward's output `got` with the reference output `want` of `layer` on `x` (every enabled
/// adapter on every row), under [`bounds`] plus [`gpu_extra`]. Use [`Agreement::ok_gpu`] to judge it.
#[cfg(feature = "gpu")]
pub fn compare_gpu(layer: &QuantLinear, x: &[f32], got: &[f32], want: &[f32]) -> Agreement {
    let mut bound = bounds(layer, x);
    for (b, e) in bound.iter_mut().zip(gpu_extra(layer, x)) {
        *b += e;
    }
    compare_with(&bound, got, want)
}

/// Compares `got` with `want` under the per-element `bound` (plus half an ulp of the reference).
fn compare_with(bound: &[f64], got: &[f32], want: &[f32]) -> Agreement {
    let (mut max_abs, mut worst_ratio, mut outside, mut num, mut den) = (0f64, 0f64, 0usize, 0f64, 0f64);
    for ((&g, &w), &b) in got.iter().zip(want).zip(bound) {
        let err = (g as f64 - w as f64).abs();
        let allowed = b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5;
        max_abs = max_abs.max(err);
        let ratio = if err.is_nan() { f64::INFINITY } else { err / allowed };
        worst_ratio = worst_ratio.max(ratio);
        if err > allowed || err.is_nan() {
            outside += 1;
        }
        num += err * err;
        den += (w as f64) * (w as f64);
    }
    let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    Agreement { max_abs, rel_l2, worst_ratio, outside: outside + got.len().abs_diff(want.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{self, LayerFormat};

    #[test]
    fn fused_forward_is_within_the_bound_and_a_perturbation_is_not() {
        let layer = synthetic::layer(LayerFormat::Nf4Dq, 33, 130, Some(5)).unwrap();
        let x = synthetic::input(3, 130);
        let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
        let mut got = layer.forward(&x).unwrap();
        let a = compare(&layer, &x, &got, &want);
        assert!(a.ok(), "{a:?}");
        assert!(a.worst_ratio < 1.0);
        got[7] += 1e-3;
        let a = compare(&layer, &x, &got, &want);
        assert_eq!(a.outside, 1, "{a:?}");
        assert!(a.max_abs >= 0.9e-3);
    }

    #[test]
    fn bounds_equal_the_library_error_bound() {
        for format in [LayerFormat::Nf4, LayerFormat::Nf4Dq, LayerFormat::Int8] {
            for rank in [None, Some(3)] {
                let layer = synthetic::layer(format, 17, 130, rank).unwrap();
                let x = synthetic::input(4, 130);
                let lib = layer
                    .error_bound(&x, lowbit::linear::ForwardOptions::default(), lowbit::linear::BoundTarget::Cpu)
                    .unwrap();
                let ours = bounds(&layer, &x);
                for (a, b) in ours.iter().zip(&lib) {
                    assert!((a - b).abs() <= 1e-12 * b.abs(), "{format} {rank:?}: {a} vs {b}");
                }
            }
        }
    }

    #[cfg(feature = "gpu")]
    #[test]
    fn gpu_extra_covers_double_quant_and_bias_only() {
        let x = synthetic::input(2, 130);
        let plain = synthetic::layer(LayerFormat::Nf4, 17, 130, None).unwrap();
        let dq = synthetic::layer(LayerFormat::Nf4Dq, 17, 130, None).unwrap();
        let eps = f32::EPSILON as f64;
        let bias_only: Vec<f64> =
            (0..2).flat_map(|_| plain.bias().unwrap().iter().map(|&b| 2.0 * eps * (b as f64).abs())).collect();
        assert_eq!(gpu_extra(&plain, &x), bias_only);
        let extra = gpu_extra(&dq, &x);
        assert!(extra.iter().zip(&bias_only).all(|(e, b)| e > b), "{extra:?}");
        // Far below the accumulation bound itself: a small allowance, not a loosened check.
        let base = bounds(&dq, &x);
        assert!(extra.iter().zip(&base).all(|(e, b)| *e < 0.1 * b));
    }
}
