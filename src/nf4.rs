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

use crate::cpu::KernelPath;
use crate::double_quant::DoubleQuantScales;
use crate::element::Element;
use crate::storage::Bytes;
use crate::{shape, DType, Error, Result};

/// The NF4 (NormalFloat) table of QLoRA, `bitsandbytes.functional.get_4bit_type("nf4")`: quantiles of a standard
/// normal normalised to `[-1, 1]`, sorted, code 7 exactly 0.0. Indexed by the 4-bit code.
#[allow(clippy::excessive_precision)] // the literals exactly as bitsandbytes (and docs/formats.md) write them
pub const NF4_TABLE: [f32; 16] = [
    -1.0,                 // 0
    -0.6961928009986877,  // 1
    -0.5250730514526367,  // 2
    -0.39491748809814453, // 3
    -0.28444138169288635, // 4
    -0.18477343022823334, // 5
    -0.09105003625154495, // 6
    0.0,                  // 7: exact zero
    0.07958029955625534,  // 8
    0.16093020141124725,  // 9
    0.24611230194568634,  // 10
    0.33791524171829224,  // 11
    0.44070982933044434,  // 12
    0.5626170039176941,   // 13
    0.7229568362236023,   // 14
    1.0,                  // 15
];

/// bitsandbytes' FP4 table, `get_4bit_type("fp4")`: 1 sign bit (bit 3), 2 exponent bits and 1 mantissa bit
/// with bias 2, values `[0, 0.0625, 8, 12, 4, 6, 2, 3]` divided by 12, in **bit-pattern order** (not sorted).
/// Code 8 ("-0") is stored as +0.0, as bitsandbytes builds it from the Python integer `-0`.
pub const FP4_TABLE: [f32; 16] = [
    0.0,           // 0b0000: zero
    0.0052083335,  // 0b0001: 0.0625 / 12
    0.6666667,     // 0b0010: 8 / 12
    1.0,           // 0b0011: 12 / 12
    0.33333334,    // 0b0100: 4 / 12
    0.5,           // 0b0101: 6 / 12
    0.16666667,    // 0b0110: 2 / 12
    0.25,          // 0b0111: 3 / 12
    0.0,           // 0b1000: "-0", stored as +0.0
    -0.0052083335, // 0b1001
    -0.6666667,    // 0b1010
    -1.0,          // 0b1011
    -0.33333334,   // 0b1100
    -0.5,          // 0b1101
    -0.16666667,   // 0b1110
    -0.25,         // 0b1111
];

/// The block sizes bitsandbytes accepts (powers of two from 32 to 4096); 64 is its default.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Which 16-entry table a 4-bit tensor uses (bitsandbytes' `quant_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FourBitFormat {
    /// NormalFloat 4 (`"nf4"`, QLoRA), table [`NF4_TABLE`].
    Nf4,
    /// bitsandbytes' 4-bit float (`"fp4"`, bitsandbytes' default `quant_type`), table [`FP4_TABLE`].
    Fp4,
}

impl FourBitFormat {
    /// The `quant_type` string bitsandbytes writes: `"nf4"` or `"fp4"`.
    pub const fn name(self) -> &'static str {
        match self {
            FourBitFormat::Nf4 => "nf4",
            FourBitFormat::Fp4 => "fp4",
        }
    }

    /// The built-in 16-entry table of this format, indexed by code.
    pub const fn table(self) -> &'static [f32; 16] {
        match self {
            FourBitFormat::Nf4 => &NF4_TABLE,
            FourBitFormat::Fp4 => &FP4_TABLE,
        }
    }

    /// Parses `"nf4"` / `"fp4"` (case-insensitive).
    pub fn from_name(name: &str) -> Result<FourBitFormat> {
        match name.to_ascii_lowercase().as_str() {
            "nf4" => Ok(FourBitFormat::Nf4),
            "fp4" => Ok(FourBitFormat::Fp4),
            _ => Err(Error::invalid("quant_type", format!("{name:?}"), "\"nf4\" or \"fp4\"")),
        }
    }
}

impl std::fmt::Display for FourBitFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FourBitFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<FourBitFormat> {
        FourBitFormat::from_name(s)
    }
}

/// The per-block scales of a 4-bit tensor: plain f32, or double-quantized to one byte each.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockScales {
    /// One f32 `absmax` per block (finite, non-negative).
    Plain(Vec<f32>),
    /// One u8 code per block plus nested scales ([`crate::double_quant`]).
    Double(DoubleQuantScales),
}

impl BlockScales {
    /// Number of block scales.
    pub fn len(&self) -> usize {
        match self {
            BlockScales::Plain(v) => v.len(),
            BlockScales::Double(d) => d.len(),
        }
    }
    /// Whether there are none (an empty tensor).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The f32 scales (decoded exactly when double-quantized), as a new vector.
    pub fn decode(&self) -> Vec<f32> {
        self.decoded().to_vec()
    }
    /// The f32 scales, borrowed: the plain scales themselves, or the one decoded copy double-quantized scales
    /// keep ([`DoubleQuantScales::decoded`]).
    pub fn decoded(&self) -> &[f32] {
        match self {
            BlockScales::Plain(v) => v,
            BlockScales::Double(d) => d.decoded(),
        }
    }
    /// Storage in bits of the scales, excluding fixed tables (the 256-entry map): 32 per plain scale; 8 per
    /// code plus 32 per nested absmax plus 32 for the offset when double-quantized.
    pub fn storage_bits(&self) -> u64 {
        match self {
            BlockScales::Plain(v) => 32 * v.len() as u64,
            BlockScales::Double(d) => 8 * d.len() as u64 + 32 * d.nested_absmax().len() as u64 + 32,
        }
    }
}

/// A tensor quantized to NF4 or FP4: packed 4-bit codes, block scales, the table and the original shape.
///
/// Invariants (checked by [`FourBitTensor::from_parts`], kept by every constructor):
/// * `blocksize` is one of [`BLOCK_SIZES`];
/// * `packed.len() == ceil(numel / 2)` (first element in the high nibble);
/// * the number of block scales is `ceil(numel / blocksize)`;
/// * the table is finite; decoded scales are finite (plain scales also non-negative).
///
/// Storage: the packed codes are [`Bytes`], owned or a view into a shared (e.g. memory-mapped) buffer. The f32
/// block scales exist once: plain scales are kept as given, double-quantized scales keep their u8 codes, the
/// nested absmax and one decoded f32 copy ([`decoded_scales`](Self::decoded_scales) borrows either).
#[derive(Clone, Debug, PartialEq)]
pub struct FourBitTensor {
    shape: Vec<usize>,
    format: FourBitFormat,
    blocksize: usize,
    table: [f32; 16],
    packed: Bytes,
    scales: BlockScales,
    dtype: DType,
}

/// Checks a block size against [`BLOCK_SIZES`].
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid("blocksize", blocksize, format!("one of {BLOCK_SIZES:?}")))
    }
}

impl FourBitTensor {
    /// Builds a tensor from its parts (e.g. read from a bitsandbytes checkpoint), validating every invariant
    /// listed on the type. `table` is used as given (checkpoints carry their `quant_map`); `dtype` is the
    /// original / compute dtype bitsandbytes records. `packed` is a `Vec<u8>` or any [`Bytes`] (a view keeps
    /// sharing its buffer; nothing is copied). Never panics.
    pub fn from_parts(
        shape: Vec<usize>,
        format: FourBitFormat,
        blocksize: usize,
        table: [f32; 16],
        packed: impl Into<Bytes>,
        scales: BlockScales,
        dtype: DType,
    ) -> Result<Self> {
        let packed = packed.into();
        check_blocksize(blocksize)?;
        let n = shape::numel(&shape)?;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::shape(
                format!("number of packed bytes for shape {shape:?} (two 4-bit codes per byte)"),
                packed.len(),
                n.div_ceil(2),
            ));
        }
        let nb = n.div_ceil(blocksize);
        if scales.len() != nb {
            return Err(Error::shape(
                format!("number of block scales for shape {shape:?}, block size {blocksize}"),
                scales.len(),
                nb,
            ));
        }
        if let Some(i) = table.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("quant_map", format!("{} at index {i}", table[i]), "16 finite values"));
        }
        if let BlockScales::Plain(v) = &scales {
            if let Some(i) = v.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
                return Err(Error::invalid("absmax", format!("{} at index {i}", v[i]), "finite non-negative scales"));
            }
        }
        if let BlockScales::Double(d) = &scales {
            let absmax = d.decoded();
            if let Some(i) = absmax.iter().position(|s| !s.is_finite()) {
                return Err(Error::format(
                    "double-quantized absmax",
                    format!("block {i} decodes to {}, expected a finite scale", absmax[i]),
                ));
            }
        }
        Ok(FourBitTensor { shape, format, blocksize, table, packed, scales, dtype })
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// NF4 or FP4 (bitsandbytes' `quant_type`).
    pub fn format(&self) -> FourBitFormat {
        self.format
    }
    /// Elements per block (one of [`BLOCK_SIZES`]).
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    /// The 16-entry table codes index (bitsandbytes' `quant_map`).
    pub fn table(&self) -> &[f32; 16] {
        &self.table
    }
    /// Packed codes, `ceil(numel / 2)` bytes, the first element of each pair in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    /// The storage of the packed codes (owned, or a view sharing a mapped file's pages).
    pub fn packed_bytes(&self) -> &Bytes {
        &self.packed
    }
    /// The block scales as stored (plain or double-quantized).
    pub fn scales(&self) -> &BlockScales {
        &self.scales
    }
    /// The original (compute) dtype, as bitsandbytes records it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of blocks, `ceil(numel / blocksize)`.
    pub fn num_blocks(&self) -> usize {
        self.scales.len()
    }

    /// The f32 scale of every block; for double-quantized scales the exact decode
    /// `(map[q] * nested_absmax) + offset` that bitsandbytes computes.
    pub fn absmax(&self) -> Vec<f32> {
        self.decoded_scales().to_vec()
    }

    /// The decoded f32 block scales, borrowed (the one f32 copy the tensor keeps: the plain scales, or the
    /// decode of the double-quantized ones; equal to [`absmax`](Self::absmax)). Kernels read these instead of
    /// decoding again.
    pub fn decoded_scales(&self) -> &[f32] {
        self.scales.decoded()
    }

    /// Storage cost in bits per weight: 4 for the code plus [`BlockScales::storage_bits`] spread over the
    /// elements (32 per block when plain; 8 per block + 32 per nested block + 32 for the offset when
    /// double-quantized). Fixed tables (the 16-entry table, the 256-entry map) are excluded. Block 64:
    /// 4.5 plain, ≈ 4.127 double-quantized. An empty tensor reports 4.
    pub fn bits_per_weight(&self) -> f64 {
        let n = self.numel();
        if n == 0 {
            return 4.0;
        }
        4.0 + self.scales.storage_bits() as f64 / n as f64
    }

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
        crate::cpu::nf4::dequantize(&self.packed, self.decoded_scales(), self.blocksize, &self.table, out, path);
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
