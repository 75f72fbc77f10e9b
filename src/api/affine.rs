//! Asymmetric 8-bit affine quantization, bit-identical to PyTorch's `quint8`.
//!
//! A value `x` is stored as a code `q` in `0..=255` with parameters `scale` (f32) and `zero_point` (u8):
//! `q = clamp(round_half_even(x * (1/scale)) + zero_point, 0, 255)` and `x̂ = (q - zero_point) as f32 * scale`.
//! Parameters come from the min/max of the data, widened to include 0 so that 0.0 is exact
//! (`docs/formats.md` §1; [`crate::reference::affine`] is the executable spec).
//!
//! # Where the parameters live
//! A tensor of shape `[d0, .., dn]` is seen as a `[rows, cols]` matrix with `cols = dn` (see [`crate::shape`]).
//! [`AffineTensor::scales`] and [`AffineTensor::zero_points`] hold one entry per
//! * [`Granularity::PerTensor`]: the whole tensor (1 entry);
//! * [`Granularity::PerChannel`]: each row, i.e. each output channel of an `[out, in]` weight (`rows` entries);
//! * [`Granularity::PerGroup`]`(g)`: each run of `g` consecutive elements along a row, the last group of a row
//!   possibly shorter (`rows * ceil(cols / g)` entries, row-major: entry `r * ceil(cols / g) + j` is group `j`
//!   of row `r`). Groups never cross rows.

pub use crate::format::affine::*;

use crate::cpu::KernelPath;
use crate::element::{check_finite, Element};
use crate::{shape, DType, Error, Result};

impl AffineTensor {
    /// Dequantizes to a new vector through the fastest path.
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>> {
        self.dequantize_with(KernelPath::best())
    }

    /// Dequantizes to a new vector through `path`.
    pub fn dequantize_with<T: Element>(&self, path: KernelPath) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.codes.len()];
        self.dequantize_into_with(&mut out, path)?;
        Ok(out)
    }

    /// Dequantizes into `out` (length = number of elements) through the fastest path.
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        self.dequantize_into_with(out, KernelPath::best())
    }

    /// Dequantizes rows `rows` of the matrix view (`[rows, cols]`, [`matrix_dims`](Self::matrix_dims)) into
    /// `out` (`rows.len() × cols` values): the same bits as the same rows of [`dequantize`](Self::dequantize),
    /// without decoding the rest (an embedding lookup, a streamed conversion). Errors: a range past the last
    /// row or reversed, or `out` of another length.
    pub fn dequantize_rows_into(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let (n_rows, cols) = self.matrix_dims();
        if rows.start > rows.end || rows.end > n_rows {
            return Err(Error::invalid("rows", format!("{rows:?}"), format!("a range within 0..{n_rows}")));
        }
        if out.len() != rows.len() * cols {
            return Err(Error::shape("length of `out`", out.len(), rows.len() * cols));
        }
        let per_row = self.granularity.num_params(1, cols);
        for (i, r) in rows.enumerate() {
            let codes = &self.codes[r * cols..(r + 1) * cols];
            let dst = &mut out[i * cols..(i + 1) * cols];
            for (c, (&q, o)) in codes.iter().zip(dst.iter_mut()).enumerate() {
                let entry = match self.granularity {
                    Granularity::PerTensor => 0,
                    Granularity::PerChannel => r,
                    Granularity::PerGroup(g) => r * per_row + c / g,
                };
                *o = crate::reference::affine::dequantize_value(q, self.params(entry));
            }
        }
        Ok(())
    }

    /// Dequantizes into `out` through `path`. Every path writes the same bits.
    pub fn dequantize_into_with<T: Element>(&self, out: &mut [T], path: KernelPath) -> Result<()> {
        if out.len() != self.codes.len() {
            return Err(Error::shape("length of `out`", out.len(), self.codes.len()));
        }
        path.check()?;
        crate::cpu::affine::dequantize(self, out, path);
        Ok(())
    }

    /// Dtype-erased dequantization into bytes (little-endian) of `dtype`.
    pub fn dequantize_to_bytes(&self, dtype: DType) -> Result<Vec<u8>> {
        Ok(match dtype {
            DType::F32 => bytemuck::cast_slice(&self.dequantize::<f32>()?).to_vec(),
            DType::F16 => bytemuck::cast_slice(&self.dequantize::<half::f16>()?).to_vec(),
            DType::BF16 => bytemuck::cast_slice(&self.dequantize::<half::bf16>()?).to_vec(),
        })
    }
}

/// Validates the shape and granularity shared by every quantize entry point and returns `(rows, cols)`. `x`'s
/// values are checked by the passes themselves: the min / max pass, or the per-piece check of the known-parameter
/// quantizer (then [`non_finite`] names the first NaN or infinity).
fn check_shape<T: Element>(x: &[T], shape: &[usize], granularity: Granularity) -> Result<(usize, usize)> {
    granularity.validate()?;
    shape::check_len("x", x.len(), shape)
}

/// The error for an `x` the min / max pass found non-finite, naming its first such element.
fn non_finite<T: Element>(x: &[T]) -> Error {
    check_finite("x", x).err().unwrap_or_else(|| Error::invalid("x", "a non-finite value", "finite numbers"))
}

/// Errors when a scale from calibration is unusable: a finite range whose width `max - min` overflows f32
/// (values near ±3.4e38 of both signs) gives an infinite scale, which would dequantize every element to NaN.
fn check_calibrated(params: &[AffineParams], granularity: Granularity) -> Result<()> {
    if let Some(i) = params.iter().position(|p| !scale_is_valid(p.scale)) {
        return Err(Error::invalid(
            "x",
            format!(
                "a range whose width max - min overflows f32, or whose scale ({}) times 255 does (parameter entry \
                 {i}, {granularity})",
                params[i].scale
            ),
            "values whose range per entry is at most f32::MAX wide",
        ));
    }
    Ok(())
}

/// Computes the parameters PyTorch's min/max observers would choose for `x` seen as `shape`, through the
/// fastest path. Errors on NaN/Inf, a length that does not match `shape`, a bad group size, or a range
/// `max - min` too wide for f32 (its scale would be infinite).
pub fn calibrate<T: Element>(x: &[T], shape: &[usize], granularity: Granularity) -> Result<Vec<AffineParams>> {
    calibrate_with(x, shape, granularity, KernelPath::best())
}

/// [`calibrate`] through an explicit `path`. One pass over `x`: the min / max kernels also detect NaN and
/// infinity.
pub fn calibrate_with<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    path: KernelPath,
) -> Result<Vec<AffineParams>> {
    let (rows, cols) = check_shape(x, shape, granularity)?;
    path.check()?;
    let params = crate::cpu::affine::calibrate(x, rows, cols, granularity, path).ok_or_else(|| non_finite(x))?;
    check_calibrated(&params, granularity)?;
    Ok(params)
}

/// Calibrates and quantizes `x` (row-major, `shape`) through the fastest path.
pub fn quantize<T: Element>(x: &[T], shape: &[usize], granularity: Granularity) -> Result<AffineTensor> {
    quantize_with(x, shape, granularity, KernelPath::best())
}

/// [`quantize`] through an explicit `path`; every path returns the same tensor.
pub fn quantize_with<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    path: KernelPath,
) -> Result<AffineTensor> {
    let (rows, cols) = check_shape(x, shape, granularity)?;
    let mut codes = vec![0u8; x.len()];
    let mut params = vec![AffineParams::EMPTY; granularity.num_params(rows, cols)];
    quantize_into_with(x, shape, granularity, &mut codes, &mut params, path)?;
    Ok(tensor_of(shape, granularity, codes, &params))
}

/// The tensor holding `codes` and `params` (already validated together).
fn tensor_of(shape: &[usize], granularity: Granularity, codes: Vec<u8>, params: &[AffineParams]) -> AffineTensor {
    AffineTensor {
        shape: shape.to_vec(),
        granularity,
        codes: codes.into(),
        scales: params.iter().map(|p| p.scale).collect(),
        zero_points: params.iter().map(|p| p.zero_point).collect::<Vec<u8>>().into(),
    }
}

/// Calibrates and quantizes `x` into caller buffers through the fastest path: `codes` (one per element) and
/// `params` (one per entry, [`Granularity::num_params`]), so that repeated calls reuse one allocation. The
/// same codes and parameters as [`quantize`]; see [`quantize_into_with`].
pub fn quantize_into<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    codes: &mut [u8],
    params: &mut [AffineParams],
) -> Result<()> {
    quantize_into_with(x, shape, granularity, codes, params, KernelPath::best())
}

/// [`quantize_into`] through an explicit `path`. Per channel and per group this is one pass over `x` (each
/// row's min / max, parameters and codes while it is in cache; NaN and infinity found by the same pass); per
/// tensor two (min / max, then codes). Errors as [`quantize`], or when `codes` / `params` have the wrong
/// length (then nothing is written); after a data error (NaN/Inf, a too-wide range) their contents are
/// unspecified.
pub fn quantize_into_with<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    codes: &mut [u8],
    params: &mut [AffineParams],
    path: KernelPath,
) -> Result<()> {
    let (rows, cols) = check_shape(x, shape, granularity)?;
    path.check()?;
    if codes.len() != x.len() {
        return Err(Error::shape("length of `codes`", codes.len(), x.len()));
    }
    let n = granularity.num_params(rows, cols);
    if params.len() != n {
        return Err(Error::shape(format!("number of params for shape {shape:?}, {granularity}"), params.len(), n));
    }
    if !crate::cpu::affine::calibrate_quantize(x, rows, cols, granularity, params, codes, path) {
        return Err(non_finite(x));
    }
    check_calibrated(params, granularity)
}

/// Quantizes `x` with given parameters (one per entry, in the layout of the module docs).
pub fn quantize_with_params<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    params: &[AffineParams],
    path: KernelPath,
) -> Result<AffineTensor> {
    let (rows, cols) = check_shape(x, shape, granularity)?;
    path.check()?;
    check_params(params, shape, granularity, rows, cols)?;
    let mut codes = vec![0u8; x.len()];
    if !crate::cpu::affine::quantize(x, rows, cols, granularity, params, &mut codes, path, true) {
        return Err(non_finite(x));
    }
    Ok(tensor_of(shape, granularity, codes, params))
}

/// Quantizes `x` with given parameters into a caller-provided `codes` buffer (length = number of elements),
/// so that repeated calls reuse one allocation. Same codes as [`quantize_with_params`]. One pass over `x`: each
/// piece is checked for NaN / infinity while it is in cache, just before its codes are written, so after that
/// error `codes` is partly written (after any other error it is untouched).
pub fn quantize_with_params_into<T: Element>(
    x: &[T],
    shape: &[usize],
    granularity: Granularity,
    params: &[AffineParams],
    codes: &mut [u8],
    path: KernelPath,
) -> Result<()> {
    let (rows, cols) = check_shape(x, shape, granularity)?;
    path.check()?;
    check_params(params, shape, granularity, rows, cols)?;
    if codes.len() != x.len() {
        return Err(Error::shape("length of `codes`", codes.len(), x.len()));
    }
    if !crate::cpu::affine::quantize(x, rows, cols, granularity, params, codes, path, true) {
        return Err(non_finite(x));
    }
    Ok(())
}

fn check_params(
    params: &[AffineParams],
    shape: &[usize],
    granularity: Granularity,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = granularity.num_params(rows, cols);
    if params.len() != n {
        return Err(Error::shape(format!("number of params for shape {shape:?}, {granularity}"), params.len(), n));
    }
    if let Some(i) = params.iter().position(|p| !scale_is_valid(p.scale)) {
        return Err(Error::invalid("params", format!("scale {} at index {i}", params[i].scale), SCALE_RULE));
    }
    Ok(())
}
