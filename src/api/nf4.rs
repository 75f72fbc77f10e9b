//! NF4 and FP4 blockwise 4-bit quantization, bit-compatible with bitsandbytes / QLoRA (`docs/formats.md` §2).
//!
//! A tensor is flattened in row-major order and cut into blocks of `blocksize` consecutive elements (one of
//! [`BLOCK_SIZES`]; the last block may be partial). Each block keeps one f32 scale `absmax = max |x|`; each
//! element keeps a 4-bit code, the index of the nearest entry of a 16-value table ([`NF4_TABLE`] or
//! [`FP4_TABLE`]) to `x / absmax`. Two codes share a byte, **the first element in the high nibble**; an odd
//! count pads the last low nibble with the code of 0.0. Dequantization is `table[code] * absmax` in f32, then
//! rounded (to nearest, ties to even) to the output type.
//!
//! The block scales can themselves be compressed to one byte each ([`crate::double_quant`]), as bitsandbytes
//! does with `compress_statistics=True`; see [`BlockScales`].
//!
//! [`crate::reference::nf4`] is the executable spec; every [`crate::cpu::KernelPath`] gives the same bytes and bits.
//!
//! ```
//! use lowbit::nf4::{quantize_nf4, FourBitFormat};
//!
//! let w: Vec<f32> = (0..4 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
//! let q = quantize_nf4(&w, &[4, 64], 64, true)?;
//! assert_eq!(q.format(), FourBitFormat::Nf4);
//! assert_eq!(q.packed().len(), 128);
//! let back: Vec<f32> = q.dequantize()?;
//! let absmax = q.absmax();
//! for (i, (x, y)) in w.iter().zip(&back).enumerate() {
//!     assert!((x - y).abs() <= 0.16 * absmax[i / 64]); // half the widest NF4 gap, plus slack
//! }
//! # Ok::<(), lowbit::Error>(())
//! ```

pub use crate::format::four_bit::*;

use crate::cpu::KernelPath;
use crate::element::Element;
use crate::{shape, Error, Result};

impl FourBitTensor {
    /// Dequantizes to a new vector through the fastest path.
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>> {
        self.dequantize_with(KernelPath::best())
    }

    /// Dequantizes to a new vector through `path`. Every path returns the same bits.
    pub fn dequantize_with<T: Element>(&self, path: KernelPath) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.numel()];
        self.dequantize_into_with(&mut out, path)?;
        Ok(out)
    }

    /// Dequantizes into `out` (length = number of elements) through the fastest path.
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        self.dequantize_into_with(out, KernelPath::best())
    }

    /// Dequantizes into `out` through `path`: `out[i] = T::from_f32(table[code_i] * absmax[i / blocksize])`.
    /// Errors if `out` has the wrong length or the path's instruction set is unavailable.
    pub fn dequantize_into_with<T: Element>(&self, out: &mut [T], path: KernelPath) -> Result<()> {
        if out.len() != self.numel() {
            return Err(Error::shape("length of `out`", out.len(), self.numel()));
        }
        path.check()?;
        crate::cpu::nf4::dequantize(self.packed(), self.decoded_scales(), self.blocksize(), self.table(), out, path);
        Ok(())
    }
}

/// Quantizes `x` (row-major, `shape`) to NF4 through the fastest path; see [`quantize_4bit_with`].
pub fn quantize_nf4<T: Element>(
    x: &[T],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<FourBitTensor> {
    quantize_4bit_with(FourBitFormat::Nf4, x, shape, blocksize, double_quant, KernelPath::best())
}

/// [`quantize_nf4`] through an explicit `path`; every path returns the same tensor.
pub fn quantize_nf4_with<T: Element>(
    x: &[T],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
    path: KernelPath,
) -> Result<FourBitTensor> {
    quantize_4bit_with(FourBitFormat::Nf4, x, shape, blocksize, double_quant, path)
}

/// Quantizes to NF4 or FP4 through the fastest path; see [`quantize_4bit_with`].
pub fn quantize_4bit<T: Element>(
    format: FourBitFormat,
    x: &[T],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<FourBitTensor> {
    quantize_4bit_with(format, x, shape, blocksize, double_quant, KernelPath::best())
}

/// Quantizes `x` (row-major, `shape`) in blocks of `blocksize` with `format`'s table, optionally
/// double-quantizing the scales, through `path`. The recorded dtype is `T::DTYPE`.
///
/// Errors: a block size not in [`BLOCK_SIZES`], `x.len()` not matching `shape`, a NaN/infinite element
/// ([`Error::NonFinite`]), or an unavailable instruction set. Every path returns the same tensor, equal to
/// [`crate::reference::nf4::quantize`] (and [`crate::double_quant::double_quantize`] of its scales).
pub fn quantize_4bit_with<T: Element>(
    format: FourBitFormat,
    x: &[T],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
    path: KernelPath,
) -> Result<FourBitTensor> {
    check_blocksize(blocksize)?;
    shape::check_len("x", x.len(), shape)?;
    path.check()?;
    // The kernels see NaN/infinity in their absmax pass (no separate scan) and report the first one.
    let (packed, absmax) = crate::cpu::nf4::quantize(x, blocksize, format.table(), path)
        .map_err(|(index, value)| Error::NonFinite { arg: "x".to_string(), index, value })?;
    let scales = if double_quant {
        BlockScales::Double(crate::double_quant::double_quantize(&absmax)?)
    } else {
        BlockScales::Plain(absmax)
    };
    FourBitTensor::from_parts(shape.to_vec(), format, blocksize, *format.table(), packed, scales, T::DTYPE)
}
