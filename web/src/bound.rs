//! The stated error bound of the fused f32 kernels against lowbit's reference forward.
//!
//! The same bound as the native tests (`tests/linear_paths.rs`): the fused kernels use exactly the reference's
//! dequantized weights, so the only error is f32 accumulation. For any summation order a K-term f32 sum is
//! within γ_K·Σ|x_k·w_k| of the exact sum; we allow (K + 3)·ε·Σ|x_k·w_k| for the base product, plus per LoRA
//! term (K + r + 3)·ε·|s|·Σ_r (Σ_k|x_k·A_rk|)·|B_or|, plus ε·|bias|, plus half an ulp of the reference (which
//! is computed in f64 and rounded once to f32).

use lowbit::linear::QuantLinear;

/// Per-element bound for `y: [m, out]`; `rows_adapters[r]` lists the adapter ids applied to row `r`, and
/// `want` is the reference output.
pub(crate) fn bounds(layer: &QuantLinear, x: &[f32], rows_adapters: &[Vec<usize>], want: &[f32]) -> Vec<f64> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    let mut b = Vec::with_capacity(rows_adapters.len() * out);
    for (r, ads) in rows_adapters.iter().enumerate() {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let s_base: f64 =
                xr.iter().zip(&w[o * inp..(o + 1) * inp]).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let mut bound = (inp as f64 + 3.0) * eps * s_base;
            if let Some(bias) = layer.bias() {
                bound += eps * (bias[o] as f64).abs();
            }
            for &a in ads {
                let ad = &layer.adapters()[a];
                let rank = ad.rank();
                let mut s_lora = 0.0;
                for k in 0..rank {
                    let t: f64 = xr
                        .iter()
                        .zip(&ad.a()[k * inp..(k + 1) * inp])
                        .map(|(&x, &a)| (x as f64 * a as f64).abs())
                        .sum();
                    s_lora += t * (ad.b()[o * rank + k] as f64).abs();
                }
                bound += (inp + rank + 3) as f64 * eps * (ad.scaling() as f64).abs() * s_lora;
            }
            let half_ulp = want.get(r * out + o).map_or(0.0, |&v| (v.abs() as f64) * eps * 0.5);
            b.push(bound + half_ulp + 1e-30);
        }
    }
    b
}
