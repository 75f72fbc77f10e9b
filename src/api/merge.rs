//! Merging a LoRA adapter into a quantized weight: `W' = dequant(W) + s·B·A`, requantized in the same format.
//!
//! [`merge_adapter`] builds `W'` in f32 (one `[out, in]` buffer, the only full-size f32 copy of the weight:
//! `dequant(W)` is written into it, then each row gets `s·(B·A)[row]` added in place), then requantizes it:
//! * int8 affine: the same [`Granularity`], parameters recalibrated on `W'`
//!   (PyTorch min/max rules, [`crate::affine::quantize`]);
//! * NF4 / FP4: the same format, block size and double-quantization setting, and the same recorded dtype
//!   ([`crate::nf4::quantize_4bit`]).
//!
//! The delta follows PEFT's `merge` order: `(B·A)[o, k] = Σ_j B[o, j]·A[j, k]` accumulated over `j` in
//! increasing order in f32, multiplied by `s` in f32, then added to `dequant(W)[o, k]` in f32.
//!
//! The [`MergeReport`] measures what requantizing added: `err = dequant(W') − (dequant(W) + s·B·A)` where the
//! second term is the f32 target above, decoded element by element with the exact dequantization rules (no
//! second f32 copy of the weight).
//!
//! ```
//! use lowbit::linear::{QuantLinear, QuantWeight};
//! use lowbit::lora::LoraAdapter;
//! use lowbit::merge::merge_adapter;
//!
//! let (out, inp) = (8, 64);
//! let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 113) as f32 - 56.0) / 100.0).collect();
//! let mut layer = QuantLinear::new(QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], 64, true)?), None)?;
//! layer.add_adapter(LoraAdapter::new("default", 2, vec![0.01; 2 * inp], vec![0.02; out * 2], 4.0, false)?)?;
//! let (merged, report) = merge_adapter(&layer, "default")?;
//! assert_eq!(merged.shape(), &[out, inp]);
//! assert!(report.sqnr_db > 15.0, "{report:?}");
//! # Ok::<(), lowbit::Error>(())
//! ```

use crate::affine::{quantize, AffineTensor, Granularity};
use crate::linear::{QuantLinear, QuantWeight};
use crate::nf4::{quantize_4bit, BlockScales, FourBitTensor};
use crate::{Error, Result};

/// What merging one adapter did to the weight.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeReport {
    /// The merged adapter's name.
    pub adapter: String,
    /// The scaling `s` used (the adapter's [`LoraAdapter::scaling`](crate::lora::LoraAdapter::scaling)).
    pub scaling: f32,
    /// Number of weight elements (`out · in`).
    pub numel: usize,
    /// `max |s·B·A|` over the weight: the size of the update being merged.
    pub delta_max_abs: f32,
    /// `sqrt(mean((s·B·A)²))`.
    pub delta_rms: f64,
    /// `max |dequant(W') − (dequant(W) + s·B·A)|`: the largest error requantization added.
    pub max_abs_error: f32,
    /// `sqrt(mean(err²))` (accumulated in f64).
    pub rms_error: f64,
    /// `10·log10(Σ target² / Σ err²)` in dB with `target = dequant(W) + s·B·A`; `+∞` when `err` is all zero.
    pub sqnr_db: f64,
}

/// Merges adapter `adapter_name` of `layer` into its weight and returns the requantized weight (same format
/// and parameter style, see the module docs) and the error report. The layer is not modified; the adapter is
/// merged whether or not it is enabled.
///
/// Errors: no adapter of that name; a 4-bit weight whose table is not its format's built-in table (it
/// could not be requantized identically); a merged weight that is not finite (overflow).
pub fn merge_adapter(layer: &QuantLinear, adapter_name: &str) -> Result<(QuantWeight, MergeReport)> {
    let id = layer.adapter_id(adapter_name).ok_or_else(|| {
        let names: Vec<&str> = layer.adapters().iter().map(|a| a.name()).collect();
        Error::invalid("adapter_name", format!("{adapter_name:?}"), format!("one of the layer's adapters {names:?}"))
    })?;
    let ad = &layer.adapters()[id];
    let (out, inp, r, s) = (layer.out_features(), layer.in_features(), ad.rank(), ad.scaling());
    let weight = layer.weight();
    if let QuantWeight::FourBit(t) = weight {
        if t.table().iter().zip(t.format().table()).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(Error::Unsupported {
                what: format!("merging into a {} weight whose table differs from the built-in one", t.format()),
            });
        }
    }

    // W' = dequant(W) + s·B·A, in one f32 buffer.
    let mut w = match weight {
        QuantWeight::Int8(t) => t.dequantize::<f32>()?,
        QuantWeight::FourBit(t) => t.dequantize::<f32>()?,
    };
    let (a, b) = (ad.a(), ad.b());
    let mut d = vec![0.0f32; inp];
    let (mut delta_max, mut delta_sq) = (0.0f32, 0.0f64);
    for (o, row) in w.chunks_exact_mut(inp).enumerate() {
        d.fill(0.0);
        for j in 0..r {
            let bj = b[o * r + j];
            for (dk, ak) in d.iter_mut().zip(&a[j * inp..(j + 1) * inp]) {
                *dk += bj * ak;
            }
        }
        for (wk, dk) in row.iter_mut().zip(&d) {
            let delta = *dk * s;
            delta_max = delta_max.max(delta.abs());
            delta_sq += f64::from(delta) * f64::from(delta);
            *wk += delta;
        }
    }
    if let Some(index) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            arg: format!("merged weight (adapter `{adapter_name}`)"),
            index,
            value: w[index],
        });
    }

    let shape = [out, inp];
    let merged = match weight {
        QuantWeight::Int8(t) => QuantWeight::Int8(quantize(&w, &shape, t.granularity())?),
        QuantWeight::FourBit(t) => {
            let double = matches!(t.scales(), BlockScales::Double(_));
            let q = quantize_4bit(t.format(), &w, &shape, t.blocksize(), double)?;
            // Keep the recorded (compute) dtype of the original checkpoint.
            QuantWeight::FourBit(FourBitTensor::from_parts(
                q.shape().to_vec(),
                q.format(),
                q.blocksize(),
                *q.table(),
                q.packed().to_vec(),
                q.scales().clone(),
                t.dtype(),
            )?)
        }
    };

    let (mut max_err, mut err_sq, mut sig_sq) = (0.0f32, 0.0f64, 0.0f64);
    let mut account = |i: usize, value: f32| {
        let e = value - w[i];
        max_err = max_err.max(e.abs());
        err_sq += f64::from(e) * f64::from(e);
        sig_sq += f64::from(w[i]) * f64::from(w[i]);
    };
    match &merged {
        QuantWeight::Int8(t) => decode_int8(t, &mut account),
        QuantWeight::FourBit(t) => decode_4bit(t, &mut account),
    }
    let n = (out * inp) as f64;
    let report = MergeReport {
        adapter: adapter_name.to_string(),
        scaling: s,
        numel: out * inp,
        delta_max_abs: delta_max,
        delta_rms: (delta_sq / n).sqrt(),
        max_abs_error: max_err,
        rms_error: (err_sq / n).sqrt(),
        sqnr_db: if err_sq == 0.0 { f64::INFINITY } else { 10.0 * (sig_sq / err_sq).log10() },
    };
    Ok((merged, report))
}

/// Merges adapter `adapter_name` (see [`merge_adapter`]) and returns a new layer with the merged weight, the
/// same bias and every other adapter (same order, same enabled state), plus the report.
pub fn merge_into_layer(layer: &QuantLinear, adapter_name: &str) -> Result<(QuantLinear, MergeReport)> {
    let (weight, report) = merge_adapter(layer, adapter_name)?;
    let mut merged = QuantLinear::new(weight, layer.bias().map(<[f32]>::to_vec))?;
    for a in layer.adapters().iter().filter(|a| a.name() != adapter_name) {
        merged.add_adapter(a.clone())?;
    }
    Ok((merged, report))
}

/// Calls `f(i, x̂_i)` for every element with the exact int8 dequantization `((q − zp) as f32) · scale`.
fn decode_int8(t: &AffineTensor, f: &mut impl FnMut(usize, f32)) {
    let (rows, cols) = t.matrix_dims();
    let per_row = match t.granularity() {
        Granularity::PerGroup(g) => cols.div_ceil(g),
        _ => 1,
    };
    for r in 0..rows {
        for c in 0..cols {
            let p = match t.granularity() {
                Granularity::PerTensor => 0,
                Granularity::PerChannel => r,
                Granularity::PerGroup(g) => r * per_row + c / g,
            };
            let i = r * cols + c;
            let x = (i32::from(t.codes()[i]) - i32::from(t.zero_points()[p])) as f32 * t.scales()[p];
            f(i, x);
        }
    }
}

/// Calls `f(i, x̂_i)` for every element with the exact 4-bit dequantization `table[q] · absmax[i / bs]`.
fn decode_4bit(t: &FourBitTensor, f: &mut impl FnMut(usize, f32)) {
    let absmax = t.absmax();
    for i in 0..t.numel() {
        let byte = t.packed()[i / 2];
        let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        f(i, t.table()[usize::from(q)] * absmax[i / t.blocksize()]);
    }
}
