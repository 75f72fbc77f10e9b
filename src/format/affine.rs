//! The 8-bit affine format's data: granularity, parameters and [`AffineTensor`] (codes, scales, zero points,
//! shape and their invariants). No kernels and no I/O: quantizing and dequantizing are in [`crate::affine`].
//!
//! # Where the parameters live
//! A tensor of shape `[d0, .., dn]` is seen as a `[rows, cols]` matrix with `cols = dn` (see [`crate::shape`]).
//! [`AffineTensor::scales`] and [`AffineTensor::zero_points`] hold one entry per
//! * [`Granularity::PerTensor`]: the whole tensor (1 entry);
//! * [`Granularity::PerChannel`]: each row, i.e. each output channel of an `[out, in]` weight (`rows` entries);
//! * [`Granularity::PerGroup`]`(g)`: each run of `g` consecutive elements along a row, the last group of a row
//!   possibly shorter (`rows * ceil(cols / g)` entries, row-major: entry `r * ceil(cols / g) + j` is group `j`
//!   of row `r`). Groups never cross rows.

use super::storage::Bytes;
use crate::{shape, Error, Result};

/// Which elements share one scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale and zero point for the whole tensor.
    PerTensor,
    /// One per row (output channel) of the `[rows, cols]` view.
    PerChannel,
    /// One per group of this many consecutive elements along a row (≥ 1).
    PerGroup(usize),
}

/// Largest accepted group size.
pub const MAX_GROUP_SIZE: usize = 1 << 20;

impl Granularity {
    /// Checks the group size: 1 ≤ g ≤ [`MAX_GROUP_SIZE`].
    pub fn validate(self) -> Result<()> {
        match self {
            Granularity::PerGroup(g) if g == 0 || g > MAX_GROUP_SIZE => {
                Err(Error::invalid("group_size", g, format!("an integer in 1..={MAX_GROUP_SIZE}")))
            }
            _ => Ok(()),
        }
    }

    /// Number of elements per parameter entry along a row of `cols` elements (≥ 1 even for empty rows).
    pub(crate) fn group_len(self, cols: usize) -> usize {
        match self {
            Granularity::PerTensor | Granularity::PerChannel => cols.max(1),
            Granularity::PerGroup(g) => g.min(cols.max(1)),
        }
    }

    /// Number of parameter entries for a `[rows, cols]` matrix.
    pub fn num_params(self, rows: usize, cols: usize) -> usize {
        match self {
            Granularity::PerTensor => 1,
            Granularity::PerChannel => rows,
            Granularity::PerGroup(g) => rows * cols.div_ceil(g.max(1)),
        }
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Granularity::PerTensor => f.write_str("tensor"),
            Granularity::PerChannel => f.write_str("channel"),
            Granularity::PerGroup(g) => write!(f, "group:{g}"),
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    /// Parses `tensor`, `channel` or `group:G`.
    fn from_str(s: &str) -> Result<Granularity> {
        let expected = "`tensor`, `channel` or `group:G` with G a positive integer";
        let g = match s {
            "tensor" => Granularity::PerTensor,
            "channel" => Granularity::PerChannel,
            _ => match s.strip_prefix("group:").map(str::parse::<usize>) {
                Some(Ok(g)) => Granularity::PerGroup(g),
                _ => return Err(Error::invalid("granularity", format!("{s:?}"), expected)),
            },
        };
        g.validate()?;
        Ok(g)
    }
}

/// One scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffineParams {
    /// Step between neighbouring codes (> 0, at least `f32::EPSILON`, and `scale · 255` finite).
    pub scale: f32,
    /// The code that represents 0.0 exactly.
    pub zero_point: u8,
}

impl AffineParams {
    /// Parameters for an empty range: scale 1, zero point 0.
    pub const EMPTY: AffineParams = AffineParams { scale: 1.0, zero_point: 0 };
}

/// What a valid scale is, for error messages.
pub(crate) const SCALE_RULE: &str =
    "finite positive scales with scale × 255 finite (at most f32::MAX / 255 ≈ 1.33e36), so that (q − zero_point) · scale cannot overflow f32";

/// Whether `scale` is valid: positive and `scale · 255` finite, so that `(q − zp) · scale` is finite for every
/// `q`, `zp` in `0..=255` and dequantizing a valid tensor never writes inf or NaN.
pub(crate) fn scale_is_valid(scale: f32) -> bool {
    scale > 0.0 && (scale * 255.0).is_finite()
}

/// A tensor quantized to 8-bit affine codes, with its parameters.
///
/// Storage: codes and zero points are [`Bytes`] (owned, or views into a shared, e.g. memory-mapped, buffer);
/// the f32 scales are owned (small, and not necessarily 4-byte aligned in a file).
#[derive(Clone, Debug, PartialEq)]
pub struct AffineTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) granularity: Granularity,
    pub(crate) codes: Bytes,
    pub(crate) scales: Vec<f32>,
    pub(crate) zero_points: Bytes,
}

impl AffineTensor {
    /// Builds a tensor from its parts, checking every length and that scales are positive with `scale · 255`
    /// finite (so dequantizing can never overflow to inf).
    /// `codes` and `zero_points` are `Vec<u8>` or any [`Bytes`] (views keep sharing their buffer).
    pub fn from_parts(
        shape: Vec<usize>,
        granularity: Granularity,
        codes: impl Into<Bytes>,
        scales: Vec<f32>,
        zero_points: impl Into<Bytes>,
    ) -> Result<AffineTensor> {
        let (codes, zero_points) = (codes.into(), zero_points.into());
        granularity.validate()?;
        let (rows, cols) = shape::check_len("codes", codes.len(), &shape)?;
        let n = granularity.num_params(rows, cols);
        if scales.len() != n {
            return Err(Error::shape(format!("number of scales for shape {shape:?}, {granularity}"), scales.len(), n));
        }
        if zero_points.len() != n {
            return Err(Error::shape(
                format!("number of zero points for shape {shape:?}, {granularity}"),
                zero_points.len(),
                n,
            ));
        }
        if let Some(i) = scales.iter().position(|s| !scale_is_valid(*s)) {
            return Err(Error::invalid("scales", format!("{:e} at index {i}", scales[i]), SCALE_RULE));
        }
        Ok(AffineTensor { shape, granularity, codes, scales, zero_points })
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// How parameters are shared (see the module docs for the layout).
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }
    /// The codes, one byte per element, row-major.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }
    /// The storage of the codes (owned, or a view sharing a mapped file's pages).
    pub fn codes_bytes(&self) -> &Bytes {
        &self.codes
    }
    /// One scale per tensor / row / group (module docs).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// One zero point per tensor / row / group, aligned with [`scales`](Self::scales).
    pub fn zero_points(&self) -> &[u8] {
        &self.zero_points
    }
    /// `(rows, cols)` of the matrix view.
    pub fn matrix_dims(&self) -> (usize, usize) {
        shape::as_matrix(&self.shape).unwrap_or((1, self.codes.len()))
    }
    /// The parameters of entry `i`.
    pub fn params(&self, i: usize) -> AffineParams {
        AffineParams { scale: self.scales[i], zero_point: self.zero_points[i] }
    }
    /// Storage cost in bits per weight: 8 for the code plus 40 (f32 scale + u8 zero point) per entry.
    pub fn bits_per_weight(&self) -> f64 {
        let n = self.codes.len().max(1) as f64;
        8.0 + 40.0 * self.scales.len() as f64 / n
    }
}
