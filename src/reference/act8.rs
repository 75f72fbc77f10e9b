//! Int8 activations (`Activations::Int8`): the executable spec of how `x` is quantized, of the int8 table a
//! 4-bit weight is multiplied through, of the exact value the int8 kernels round, and of their error bound
//! (`docs/formats.md` §12).

use super::linear::{dequantize_weight, GpuTerms};
use crate::format::affine::Granularity;
use crate::format::layer::{AdapterSelection, LayerView, QuantWeight};

/// Elements of `x` per scale (along a row; the last block of a row may be shorter).
pub(crate) const BLOCK: usize = 32;

/// Quantizes one row of `x` (finite) in blocks of [`BLOCK`]: `amax = max|x|` over the block; `amax = 0` gives
/// `d = 0` and codes 0; otherwise `d = amax / 127` and `q = round_half_even(x · (127 / amax))` in f32 (clamped to
/// ±127; the f32 product never exceeds 127·(1 + ε), which rounds to 127). Where `127 / amax` overflows f32
/// (`amax` below ~3.7e-37) the product is formed in f64. `q.len() == x.len()`, `d.len() == x.len().div_ceil(32)`.
pub(crate) fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)).zip(d.iter_mut()) {
        *db = quantize_block(xb, qb);
    }
}

/// One block of [`quantize_row`] (`xb.len() == qb.len() ≤ BLOCK`, finite): writes the codes, returns `d`.
pub(crate) fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
    // For finite values the order of |x| is the order of its bits as u32 (a loop that vectorizes).
    let amax = f32::from_bits(xb.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
    if amax == 0.0 {
        qb.fill(0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    if inv.is_finite() {
        // |v·inv| ≤ 127·(1 + ε) < 2²²: adding and subtracting 1.5·2²³ rounds the f32 product to an integer,
        // half to even, exactly as `round_ties_even` (which is a libm call without SSE4.1).
        for (c, &v) in qb.iter_mut().zip(xb) {
            *c = ((v * inv + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0) as i8;
        }
    } else {
        let inv = 127.0 / amax as f64;
        for (c, &v) in qb.iter_mut().zip(xb) {
            *c = (v as f64 * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    amax / 127.0
}

/// 1.5·2²³: for |v| < 2²², `(v + ROUND_MAGIC) − ROUND_MAGIC` in f32 is `v` rounded to an integer, half to even.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The int8 stand-ins of a 4-bit table: `round_half_even(127 · T[i])` (|T[i]| ≤ 1 for NF4 and FP4), so a
/// weight `T[i]·absmax` becomes `c[i] · absmax / 127`, off by at most `absmax / 254`.
pub(crate) fn int8_table(table: &[f32; 16]) -> [i8; 16] {
    std::array::from_fn(|i| (table[i] as f64 * 127.0).round_ties_even().clamp(-127.0, 127.0) as i8)
}

/// The weight as the int8 kernels see it, exactly (f64, `[out, in]`): `c[code]·absmax/127` for 4-bit
/// weights, `scale·(code − zero_point)` for int8 (the same value as the f32 mode, before its f32 rounding).
fn weight_hat(weight: &QuantWeight) -> Vec<f64> {
    match weight {
        QuantWeight::FourBit(t) => {
            let c = int8_table(t.table());
            let scales = t.decoded_scales();
            (0..t.numel())
                .map(|e| {
                    let code = super::nf4::code_at(t.packed(), e);
                    c[code as usize] as f64 * scales[e / t.blocksize()] as f64 / 127.0
                })
                .collect()
        }
        QuantWeight::Int8(t) => {
            let (rows, cols) = t.matrix_dims();
            let per_row = match t.granularity() {
                Granularity::PerGroup(g) => cols.div_ceil(g),
                _ => 1,
            };
            (0..rows * cols)
                .map(|e| {
                    let (o, k) = (e / cols, e % cols);
                    let p = match t.granularity() {
                        Granularity::PerTensor => 0,
                        Granularity::PerChannel => o,
                        Granularity::PerGroup(g) => o * per_row + k / g,
                    };
                    t.scales()[p] as f64 * (t.codes()[e] as f64 - t.zero_points()[p] as f64)
                })
                .collect()
        }
    }
}

/// `x` quantized row by row: (`x̂ = d·q` exactly in f64, per element the block's `amax`).
fn x_hat(x: &[f32], n_in: usize) -> (Vec<f64>, Vec<f64>) {
    let mut q = vec![0i8; n_in];
    let mut d = vec![0f32; n_in.div_ceil(BLOCK)];
    let mut xh = Vec::with_capacity(x.len());
    let mut amax = Vec::with_capacity(x.len());
    for row in x.chunks(n_in) {
        quantize_row(row, &mut q, &mut d);
        for (k, &c) in q.iter().enumerate() {
            xh.push(d[k / BLOCK] as f64 * c as f64);
        }
        for xb in row.chunks(BLOCK) {
            let a = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            amax.extend(std::iter::repeat_n(a, xb.len()));
        }
    }
    (xh, amax)
}

/// The exact value the int8 kernels round: `Σ_k x̂_k·ŵ_k` in f64 plus the bias and the LoRA terms on the f32
/// `x` (as [`super::linear::forward`]), rounded to f32 once per output. `x` is `[M, in]`, validated.
pub(crate) fn forward(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f32> {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let (xh, _) = x_hat(x, n_in);
    let wh = weight_hat(layer.weight);
    // Everything but the base product: the f32-mode reference minus its base product, both in f64.
    let w = dequantize_weight(layer.weight);
    let full = super::linear::forward_f64(layer, x, sel);
    let mut y = vec![0f32; full.len()];
    for (r, xr) in x.chunks(n_in).enumerate() {
        let xhr = &xh[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let base: f64 = xr.iter().zip(&w[o * n_in..(o + 1) * n_in]).map(|(&a, &b)| a as f64 * b as f64).sum();
            let hat: f64 = xhr.iter().zip(&wh[o * n_in..(o + 1) * n_in]).map(|(a, b)| a * b).sum();
            y[r * n_out + o] = (full[r * n_out + o] - base + hat) as f32;
        }
    }
    y
}

/// Per-output bound on `|y − y_ref|` for the int8-activation kernels, where `y_ref` is the exact f32-mode
/// value ([`super::linear::forward`] before rounding). With `x̂ = d·q` and `ŵ` the int8 kernels' weight
/// ([`weight_hat`]), `|x_k − x̂_k| ≤ amax_b·(1/254 + 4ε) + 127·2⁻¹⁵⁰` (rounding to nearest plus the f32 roundings
/// of `127/amax`, `x·(127/amax)` and `amax/127`, and a subnormal `d`), `|w_k − ŵ_k| ≤ absmax/254 + ε|w_k|` for
/// 4-bit weights (the table rounded to int8) and `≤ ε|w_k|` for int8 weights. So
/// `|Σx̂ŵ − Σxw| ≤ Σ_k (|x_k − x̂_k|·|ŵ_k| + |x_k|·|w_k − ŵ_k|)`; the kernels add f32 rounding to the exact
/// `Σx̂ŵ`: the integer sums are exact, each block's `i32 → f32` is exact (|sum| < 2²⁴) and its scale
/// `d·absmax/127` takes at most 3 roundings, so `(K + 8)·ε·Σ|x̂ŵ|` plus `2⁻¹⁴⁰·Σ|q·c|` for a scale product that
/// underflows. The f32-mode bound (bias, LoRA terms, which the int8 mode computes as the f32 mode does) is
/// added whole.
pub(crate) fn error_bound(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f64> {
    bound(layer, x, sel, true)
}

/// [`error_bound`] without the quantization terms: the bound on `|y − forward(..)|` (before its rounding) for
/// the int8 kernels, which tests use to check them tightly.
#[cfg(test)]
pub(crate) fn kernel_bound(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>) -> Vec<f64> {
    bound(layer, x, sel, false)
}

fn bound(layer: LayerView<'_>, x: &[f32], sel: AdapterSelection<'_>, quantization: bool) -> Vec<f64> {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    let eps = f32::EPSILON as f64;
    let mut bounds = super::linear::error_bound(layer, x, sel, GpuTerms::default());
    let (xh, amax) = x_hat(x, n_in);
    let wh = weight_hat(layer.weight);
    let w = dequantize_weight(layer.weight);
    let w_err: Vec<f64> = match layer.weight {
        QuantWeight::FourBit(t) => {
            let scales = t.decoded_scales();
            (0..n_out * n_in)
                .map(|e| (scales[e / t.blocksize()] as f64).abs() / 254.0 + eps * (w[e] as f64).abs())
                .collect()
        }
        QuantWeight::Int8(_) => w.iter().map(|&v| eps * (v as f64).abs()).collect(),
    };
    for r in 0..x.len() / n_in.max(1) {
        let row = r * n_in..(r + 1) * n_in;
        let (xr, xhr, ar) = (&x[row.clone()], &xh[row.clone()], &amax[row]);
        for o in 0..n_out {
            let wo = o * n_in..(o + 1) * n_in;
            let (whr, wer) = (&wh[wo.clone()], &w_err[wo]);
            let mut b = 0f64;
            let mut abs_hat = 0f64;
            for k in 0..n_in {
                abs_hat += (xhr[k] * whr[k]).abs();
                if quantization {
                    let ex = ar[k] * (1.0 / 254.0 + 4.0 * eps) + 127.0 * 2f64.powi(-150);
                    b += ex * whr[k].abs() + (xr[k] as f64).abs() * wer[k];
                }
            }
            // Σ|q·c| ≤ Σ|x̂ŵ| / (d·s) is not bounded when d·s underflows; 127·255 per element covers it.
            b += (n_in as f64 + 8.0) * eps * abs_hat + 2f64.powi(-140) * 127.0 * 255.0 * n_in as f64;
            bounds[r * n_out + o] += b;
        }
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast rounding and max in `quantize_row` equal `round_ties_even` of the f32 product and `max|x|`.
    #[test]
    fn quantize_row_equals_the_plain_formula() {
        let mut seed = 3u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed
        };
        for case in 0..2000 {
            let n = 1 + (next() % 100) as usize;
            let scale = [1.0f32, 1e-30, 1e30, 3.0e-39][case % 4];
            let mut x: Vec<f32> =
                (0..n).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect();
            // Exact ties of the scaled value: x = (k + 0.5)·amax/127 for a few k.
            if case % 5 == 0 && n > 2 {
                x[0] = 127.0;
                x[1] = 2.5;
                x[2] = -0.5;
            }
            let mut q = vec![0i8; n];
            let mut d = vec![0f32; n.div_ceil(BLOCK)];
            quantize_row(&x, &mut q, &mut d);
            for (b, xb) in x.chunks(BLOCK).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(d[b], if amax == 0.0 { 0.0 } else { amax / 127.0 });
                for (i, &v) in xb.iter().enumerate() {
                    let want = if amax == 0.0 {
                        0
                    } else if (127.0 / amax).is_finite() {
                        (v * (127.0 / amax)).round_ties_even().clamp(-127.0, 127.0) as i8
                    } else {
                        (v as f64 * (127.0 / amax as f64)).round_ties_even().clamp(-127.0, 127.0) as i8
                    };
                    assert_eq!(q[b * BLOCK + i], want, "x = {v}, amax = {amax}");
                }
            }
        }
    }
}
