//! Reference linear-layer forward: dequantize through the reference module, plain loops, f64 accumulation.
//! The oracle every fused kernel is tested against, and the stated error bound of the f32 kernels (CPU and GPU).

use crate::format::four_bit::BlockScales;
use crate::format::layer::{AdapterSelection, LayerView, QuantWeight};

/// The weight dequantized through the reference module (f32, `[out, in]` row-major).
pub(crate) fn dequantize_weight(weight: &QuantWeight) -> Vec<f32> {
    match weight {
        QuantWeight::Int8(t) => {
            let (rows, cols) = t.matrix_dims();
            let params: Vec<_> = (0..t.scales().len()).map(|i| t.params(i)).collect();
            super::affine::dequantize(t.codes(), rows, cols, t.granularity(), &params)
        }
        QuantWeight::FourBit(t) => {
            super::nf4::dequantize(t.packed(), t.decoded_scales(), t.blocksize(), t.numel(), t.table())
        }
    }
}

/// `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` with every sum in f64, rounded to f32 once per output.
/// `x` is `[M, in]` f32, already validated.
pub(crate) fn forward(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f32> {
    forward_f64(layer, x, sel).into_iter().map(|v| v as f32).collect()
}

/// [`forward`] before its final rounding.
pub(crate) fn forward_f64(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f64> {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let m = x.len() / n_in;
    let w = dequantize_weight(layer.weight);
    let mut y = vec![0.0f64; m * n_out];
    for r in 0..m {
        let xr = &x[r * n_in..(r + 1) * n_in];
        let adapters: Vec<usize> = layer.adapters_for_row(sel, r).collect();
        // Shrink: t = x·Aᵀ per adapter.
        let shrink: Vec<Vec<f64>> = adapters
            .iter()
            .map(|&a| {
                let ad = &layer.adapters[a];
                (0..ad.rank()).map(|k| dot(xr, &ad.a()[k * n_in..(k + 1) * n_in])).collect()
            })
            .collect();
        for o in 0..n_out {
            let mut acc = dot(xr, &w[o * n_in..(o + 1) * n_in]);
            if let Some(b) = layer.bias {
                acc += b[o] as f64;
            }
            for (t, &a) in shrink.iter().zip(&adapters) {
                let ad = &layer.adapters[a];
                let brow = &ad.b()[o * ad.rank()..(o + 1) * ad.rank()];
                let e: f64 = t.iter().zip(brow).map(|(&t, &b)| t * b as f64).sum();
                acc += ad.scaling() as f64 * e;
            }
            y[r * n_out + o] = acc;
        }
    }
    y
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Per weight element of a double-quantized 4-bit weight, `|T[q]|·(|map[c]·nested| + |offset|)`: the size
/// of what a kernel decoding the block scale as one FMA `map[c]·nested + offset` (instead of the reference's
/// two roundings) may change, in units of ε (see [`error_bound`] and the backward's bound). `None` for other
/// weights, where the GPU decoder performs exactly the reference's f32 operations.
pub(crate) fn dq_fma_terms(weight: &QuantWeight) -> Option<Vec<f64>> {
    let QuantWeight::FourBit(t) = weight else { return None };
    let BlockScales::Double(dq) = t.scales() else { return None };
    Some(
        (0..t.numel())
            .map(|e| {
                let q = super::nf4::code_at(t.packed(), e);
                let b = e / t.blocksize();
                let c = dq.codes()[b] as usize;
                let s = (dq.map()[c] as f64 * dq.nested_absmax()[b / dq.nested_blocksize()] as f64).abs()
                    + (dq.offset() as f64).abs();
                (t.table()[q as usize] as f64).abs() * s
            })
            .collect(),
    )
}

/// Which kernels' rounding an error bound covers (see [`error_bound`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GpuTerms {
    /// Add the GPU kernels' allowances (bias added late, double-quant scale decoded with a possible FMA).
    pub gpu: bool,
    /// Add the f16-product allowance of the f16 GEMM variant.
    pub f16: bool,
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
///
/// GPU kernels (`terms.gpu`) add what a shader compiler may do differently:
/// * the bias is added after the LoRA expand and the chunk sum: `3ε·|bias|` instead of `ε·|bias|`;
/// * double-quantized scales are decoded in the kernel as `map[c]·nested + offset`, possibly contracted into
///   one FMA whose rounding is not the reference's: per weight `ε·|x_k|·|T[q_k]|·(|map[c]·nested| + |offset|)`.
///
/// The f16 GEMM (`terms.f16`) rounds both factors to f16 (relative error u_h = 2⁻¹¹ each, plus the product's
/// rounding) and flushes values below 2⁻²⁴: per product `3.01·u_h·|x·w| + 2⁻²⁴·(|x| + |w| + 1)`.
pub(crate) fn error_bound(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>, terms: GpuTerms) -> Vec<f64> {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let m = x.len() / n_in;
    let w = dequantize_weight(layer.weight);
    let eps = f32::EPSILON as f64;
    let (uh, sub) = (2f64.powi(-11), 2f64.powi(-24));
    let abs_dot = |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum() };
    // Double-quantization FMA allowance per weight: |T[q]|·(|map[c]·nested| + |offset|).
    let dq_term = if terms.gpu { dq_fma_terms(layer.weight) } else { None };
    let bias_factor = if terms.gpu { 3.0 } else { 1.0 };
    let mut bounds = Vec::with_capacity(m * n_out);
    for r in 0..m {
        let xr = &x[r * n_in..(r + 1) * n_in];
        let adapters: Vec<usize> = layer.adapters_for_row(sel, r).collect();
        // T_k = Σ_i |x_i·A_ki| per adapter (shared by every output).
        let t_abs: Vec<Vec<f64>> = adapters
            .iter()
            .map(|&a| {
                let ad = &layer.adapters[a];
                (0..ad.rank()).map(|k| abs_dot(xr, &ad.a()[k * n_in..(k + 1) * n_in])).collect()
            })
            .collect();
        for o in 0..n_out {
            let wr = &w[o * n_in..(o + 1) * n_in];
            let mut bound = (n_in as f64 + 3.0) * eps * abs_dot(xr, wr);
            if let Some(dq) = &dq_term {
                bound += eps
                    * xr.iter().zip(&dq[o * n_in..(o + 1) * n_in]).map(|(&a, &d)| (a as f64).abs() * d).sum::<f64>();
            }
            if terms.f16 {
                bound += xr
                    .iter()
                    .zip(wr)
                    .map(|(&a, &b)| {
                        let (a, b) = ((a as f64).abs(), (b as f64).abs());
                        3.01 * uh * a * b + sub * (a + b + 1.0)
                    })
                    .sum::<f64>();
            }
            if let Some(bias) = layer.bias {
                bound += bias_factor * eps * (bias[o] as f64).abs();
            }
            for (t, &a) in t_abs.iter().zip(&adapters) {
                let ad = &layer.adapters[a];
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
