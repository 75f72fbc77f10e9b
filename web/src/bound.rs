//! The stated error bounds of the fused f32 kernels against lowbit's reference forward.
//!
//! CPU (the bound of `tests/linear_paths.rs`): the fused kernels use exactly the reference's dequantized
//! weights, so the only error is f32 accumulation. For any summation order a K-term f32 sum is within
//! γ_K·Σ|x_k·w_k| ≤ K·ε·Σ|x_k·w_k| of the exact sum; per element we allow
//! * base product: (K + 3)·ε·Σ_k|x_k·w_k|;
//! * bias: ε·|bias|;
//! * each LoRA term: (K + r + 3)·ε·|s|·Σ_j(Σ_k|x_k·A_jk|)·|B_oj| (shrink, expand, scaling);
//! * the reference's own final rounding (it accumulates in f64 and rounds once): ε/2·|y_ref|.
//!
//! WebGPU (the f32 kernel bound of `tests/gpu_kernels.rs`) adds what a shader compiler may do differently:
//! * bias: 3·ε·|bias| instead of ε·|bias| (added into the epilogue sum, then to the dot product);
//! * double quantization: ε·Σ_k|x_k|·|T[q_k]|·(|map[c_b]·nested_b| + |offset|) (the scale `map[c]·nested +
//!   offset` may be contracted into one FMA, which differs by at most one rounding of that size).

use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::nf4::BlockScales;

/// Per-element bound for `y: [m, out]`; `rows_adapters[r]` lists the adapter ids applied to row `r`, `want`
/// is the reference output, `gpu` selects the WebGPU allowances.
pub(crate) fn bounds(
    layer: &QuantLinear,
    x: &[f32],
    rows_adapters: &[Vec<usize>],
    want: &[f32],
    gpu: bool,
) -> Vec<f64> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    // Double-quantization FMA allowance per weight: |T[q]|·(|map[c]·nested| + |offset|).
    let dq_term: Option<Vec<f64>> = match layer.weight() {
        QuantWeight::FourBit(t) if gpu => match t.scales() {
            BlockScales::Double(dq) => Some(
                (0..out * inp)
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
            ),
            BlockScales::Plain(_) => None,
        },
        _ => None,
    };
    let bias_factor = if gpu { 3.0 } else { 1.0 };
    let mut b = Vec::with_capacity(rows_adapters.len() * out);
    for (r, ads) in rows_adapters.iter().enumerate() {
        let xr = &x[r * inp..(r + 1) * inp];
        // Σ_k|x_k·A_jk| for each adapter of this row (independent of the output feature).
        let shrink: Vec<Vec<f64>> = ads
            .iter()
            .map(|&a| {
                let ad = &layer.adapters()[a];
                (0..ad.rank())
                    .map(|j| {
                        xr.iter().zip(&ad.a()[j * inp..(j + 1) * inp]).map(|(&x, &a)| (x as f64 * a as f64).abs()).sum()
                    })
                    .collect()
            })
            .collect();
        for o in 0..out {
            let s_base: f64 =
                xr.iter().zip(&w[o * inp..(o + 1) * inp]).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let mut bound = (inp as f64 + 3.0) * eps * s_base;
            if let Some(dq) = &dq_term {
                bound +=
                    eps * xr.iter().zip(&dq[o * inp..(o + 1) * inp]).map(|(&a, &d)| (a as f64).abs() * d).sum::<f64>();
            }
            if let Some(bias) = layer.bias() {
                bound += bias_factor * eps * (bias[o] as f64).abs();
            }
            for (&a, t) in ads.iter().zip(&shrink) {
                let ad = &layer.adapters()[a];
                let rank = ad.rank();
                let s_lora: f64 = t.iter().enumerate().map(|(j, &t)| t * (ad.b()[o * rank + j] as f64).abs()).sum();
                bound += (inp + rank + 3) as f64 * eps * (ad.scaling() as f64).abs() * s_lora;
            }
            let half_ulp = want.get(r * out + o).map_or(0.0, |&v| (v.abs() as f64) * eps * 0.5);
            b.push(bound + half_ulp + 1e-30);
        }
    }
    b
}
