//! Reference backward of the linear layer: the gradients of `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` with the base
//! weight frozen, in plain loops with every sum in f64. The oracle the CPU (and GPU) backward kernels are
//! tested against, and their stated error bound.
//!
//! With `u = dy·B` (`[M, r]`) and `t = x·Aᵀ` (`[M, r]`), per adapter applied to row `m`:
//! * `dx[m, i] = Σ_o dy[m, o]·W[o, i] + Σ_adapters s·Σ_k u[m, k]·A[k, i]`
//! * `dA[k, i] = s·Σ_m u[m, k]·x[m, i]`
//! * `dB[o, k] = s·Σ_m dy[m, o]·t[m, k]`
//!
//! The bias is frozen too (its gradient would be `Σ_m dy[m, o]`; no caller trains it).

use super::linear::dequantize_weight;
use crate::format::layer::{AdapterSelection, LayerView};

/// Gradients before their final rounding: `dx` `[M, in]`, and per adapter (in the layer's order) `dA`
/// `[r, in]` and `dB` `[out, r]`, `None` for an adapter no row uses.
pub(crate) struct Grads64 {
    pub dx: Vec<f64>,
    pub adapters: Vec<Option<(Vec<f64>, Vec<f64>)>>,
}

/// The exact (f64-accumulated) gradients for `x` (`[M, in]`) and `dy` (`[M, out]`), already validated.
pub(crate) fn backward_f64(layer: LayerView<'_>, x: &[f32], dy: &[f32], sel: AdapterSelection<'_>) -> Grads64 {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let m = x.len() / n_in;
    let w = dequantize_weight(layer.weight);
    let mut dx = vec![0.0f64; m * n_in];
    for r in 0..m {
        for o in 0..n_out {
            let d = dy[r * n_out + o] as f64;
            for i in 0..n_in {
                dx[r * n_in + i] += d * w[o * n_in + i] as f64;
            }
        }
    }
    let mut adapters = Vec::with_capacity(layer.adapters.len());
    for (a, ad) in layer.adapters.iter().enumerate() {
        let rows: Vec<usize> = (0..m).filter(|&r| layer.uses(sel, r, a)).collect();
        if rows.is_empty() {
            adapters.push(None);
            continue;
        }
        let (rank, s) = (ad.rank(), ad.scaling() as f64);
        let (am, bm) = (ad.a(), ad.b());
        let mut da = vec![0.0f64; rank * n_in];
        let mut db = vec![0.0f64; n_out * rank];
        for &r in &rows {
            let xr = &x[r * n_in..(r + 1) * n_in];
            let dyr = &dy[r * n_out..(r + 1) * n_out];
            let u: Vec<f64> =
                (0..rank).map(|k| (0..n_out).map(|o| dyr[o] as f64 * bm[o * rank + k] as f64).sum()).collect();
            let t: Vec<f64> =
                (0..rank).map(|k| (0..n_in).map(|i| xr[i] as f64 * am[k * n_in + i] as f64).sum()).collect();
            for k in 0..rank {
                for i in 0..n_in {
                    dx[r * n_in + i] += s * u[k] * am[k * n_in + i] as f64;
                    da[k * n_in + i] += s * u[k] * xr[i] as f64;
                }
            }
            for o in 0..n_out {
                for k in 0..rank {
                    db[o * rank + k] += s * dyr[o] as f64 * t[k];
                }
            }
        }
        adapters.push(Some((da, db)));
    }
    Grads64 { dx, adapters }
}

/// Per-element bounds on `|g − g_ref|` for every f32 backward kernel, in [`Grads64`]'s shapes (an adapter no
/// row uses gets `None`). Same reasoning as the forward's bound (`super::linear::error_bound`): a sum of K
/// products in f32, in any order, with or without FMA, is within `γ_K·Σ|terms|`, allowed as `(K + 3)·ε·Σ|…|`
/// with ε = 2u (generous by about 2×, never tuned):
/// * `dx[m, i]`: `(out + 3)·ε·Σ_o |dy·W[o, i]|` for the base, and per adapter
///   `(out + r + 3)·ε·|s|·Σ_k (Σ_o |dy[m, o]·B[o, k]|)·|A[k, i]|` (the `u = dy·B` sums, the r-term sum, the
///   scaling and the final add);
/// * `dA[k, i]`: `(out + M + 3)·ε·|s|·Σ_m (Σ_o |dy[m, o]·B[o, k]|)·|x[m, i]|`;
/// * `dB[o, k]`: `(in + M + 3)·ε·|s|·Σ_m |dy[m, o]|·(Σ_i |x[m, i]·A[k, i]|)`;
///
/// plus 1e-30 for underflow. The bound covers one call into zeroed gradients; adding into non-zero ones
/// costs one more rounding of the sum (ε/2 of its magnitude).
///
/// `gpu` adds what the GPU kernels (`shaders/backward_dx.wgsl`, `shaders/lora_grads.wgsl`) may do
/// differently. Their sums are the same kinds of f32 sums (any fixed order, a split weight's chunk partials
/// added in row order, with or without FMA), so the terms above cover them; the LoRA kernels never touch `W`.
/// The one difference is the weight decode of a double-quantized 4-bit weight: the shader computes the block
/// scale `s̃ = map[c]·nested + offset`, which a driver may contract into one FMA, where the reference rounds
/// twice. With `P = map[c]·nested`, `S = P + offset` exact and u = ε/2: the reference `s` has
/// `|s − S| ≤ 2u|P| + u|offset| + O(u²)`, the FMA `|s̃ − S| ≤ u(|P| + |offset|)`, and the decoded weights
/// `fl(T[q]·s̃)`, `fl(T[q]·s)` add one rounding each (`u·|T[q]|·(|P| + |offset|)·(1 + 2u)` apiece), so
/// `|w̃ − w| ≤ |T[q]|·(5u|P| + 4u|offset|) + O(u²) ≤ 3ε·|T[q]|·(|P| + |offset|)`. Through `dx = Σ_o dy·W` this
/// adds `3ε·Σ_o |dy[m, o]|·|T[q_oi]|·(|map[c]·nested| + |offset|)` to `dx[m, i]` (zero for other weights,
/// which the shader decodes with exactly the reference's f32 operations). A GPU that flushes subnormals
/// changes each operation by less than 2⁻¹²⁶, which the 1e-30 floor covers for any sum of fewer than 10⁷
/// terms.
pub(crate) fn error_bound(
    layer: LayerView<'_>,
    x: &[f32],
    dy: &[f32],
    sel: AdapterSelection<'_>,
    gpu: bool,
) -> Grads64 {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let m = x.len() / n_in;
    let eps = f32::EPSILON as f64;
    let w = dequantize_weight(layer.weight);
    let mut dx = vec![0.0f64; m * n_in];
    for r in 0..m {
        for o in 0..n_out {
            let d = (dy[r * n_out + o] as f64).abs();
            for i in 0..n_in {
                dx[r * n_in + i] += d * (w[o * n_in + i] as f64).abs();
            }
        }
        for v in &mut dx[r * n_in..(r + 1) * n_in] {
            *v *= (n_out + 3) as f64 * eps;
        }
    }
    if let Some(dq) = gpu.then(|| super::linear::dq_fma_terms(layer.weight)).flatten() {
        for r in 0..m {
            for o in 0..n_out {
                let d = 3.0 * eps * (dy[r * n_out + o] as f64).abs();
                for (b, &t) in dx[r * n_in..(r + 1) * n_in].iter_mut().zip(&dq[o * n_in..(o + 1) * n_in]) {
                    *b += d * t;
                }
            }
        }
    }
    let mut adapters = Vec::with_capacity(layer.adapters.len());
    for (a, ad) in layer.adapters.iter().enumerate() {
        let rows: Vec<usize> = (0..m).filter(|&r| layer.uses(sel, r, a)).collect();
        if rows.is_empty() {
            adapters.push(None);
            continue;
        }
        let (rank, s) = (ad.rank(), (ad.scaling() as f64).abs());
        let (am, bm) = (ad.a(), ad.b());
        let mut da = vec![0.0f64; rank * n_in];
        let mut db = vec![0.0f64; n_out * rank];
        for &r in &rows {
            let xr = &x[r * n_in..(r + 1) * n_in];
            let dyr = &dy[r * n_out..(r + 1) * n_out];
            let u_abs: Vec<f64> =
                (0..rank).map(|k| (0..n_out).map(|o| (dyr[o] as f64 * bm[o * rank + k] as f64).abs()).sum()).collect();
            let t_abs: Vec<f64> =
                (0..rank).map(|k| (0..n_in).map(|i| (xr[i] as f64 * am[k * n_in + i] as f64).abs()).sum()).collect();
            let fx = (n_out + rank + 3) as f64 * eps * s;
            let fa = (n_out + m + 3) as f64 * eps * s;
            for k in 0..rank {
                for i in 0..n_in {
                    dx[r * n_in + i] += fx * u_abs[k] * (am[k * n_in + i] as f64).abs();
                    da[k * n_in + i] += fa * u_abs[k] * (xr[i] as f64).abs();
                }
            }
            let fb = (n_in + m + 3) as f64 * eps * s;
            for o in 0..n_out {
                for k in 0..rank {
                    db[o * rank + k] += fb * (dyr[o] as f64).abs() * t_abs[k];
                }
            }
        }
        adapters.push(Some((da, db)));
    }
    let floor = |v: &mut Vec<f64>| v.iter_mut().for_each(|b| *b += 1e-30);
    floor(&mut dx);
    for (da, db) in adapters.iter_mut().flatten() {
        floor(da);
        floor(db);
    }
    Grads64 { dx, adapters }
}
