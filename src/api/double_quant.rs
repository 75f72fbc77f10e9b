//! Double quantization of NF4/FP4 block scales (bitsandbytes `compress_statistics=True`, `docs/formats.md` §3).
//!
//! The f32 `absmax` of every 4-bit block is stored as one byte: an index into bitsandbytes' signed
//! "dynamic tree" map ([`DYNAMIC_MAP`]), relative to a per-tensor `offset` (the mean of all scales) and scaled
//! by one f32 `nested_absmax` per run of [`NESTED_BLOCKSIZE`] consecutive scales:
//!
//! ```text
//! absmax[i] ≈ (map[codes[i]] * nested_absmax[i / nested_blocksize]) + offset   // two f32 roundings, no FMA
//! ```
//!
//! [`DoubleQuantScales::decode`] reproduces that formula bit for bit, so the scales of a bitsandbytes checkpoint
//! decode exactly. [`double_quantize`] picks, for each scale, the nearest map entry (ties to the lower code);
//! bitsandbytes' own backends disagree among themselves at such ties, so re-quantizing is close but need not be
//! byte-identical to every one of them. [`crate::reference::double_quant`] is the executable spec.

pub use crate::format::double_quant::*;

use crate::{Error, Result};

/// Double-quantizes f32 block scales with [`DYNAMIC_MAP`] and [`NESTED_BLOCKSIZE`] (`docs/formats.md` §3).
///
/// `offset` is the mean of `absmax` (summed in f64, rounded once to f32; see
/// [`crate::reference::double_quant::mean`]); each code is the nearest map entry to
/// `clamp((absmax[i] - offset) * (1 / max(nested_absmax, 1e-38)), -1, 1)`, ties to the lower code.
/// Errors on a NaN/infinite or negative scale.
pub fn double_quantize(absmax: &[f32]) -> Result<DoubleQuantScales> {
    if let Some(index) = absmax.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { arg: "absmax".to_string(), index, value: absmax[index] });
    }
    if let Some(i) = absmax.iter().position(|v| *v < 0.0) {
        return Err(Error::invalid("absmax", format!("{} at index {i}", absmax[i]), "non-negative block scales"));
    }
    let (codes, nested_absmax, offset) =
        crate::reference::double_quant::quantize(absmax, NESTED_BLOCKSIZE, &DYNAMIC_MAP);
    DoubleQuantScales::from_parts(codes, nested_absmax, offset, NESTED_BLOCKSIZE, Box::new(DYNAMIC_MAP))
}
