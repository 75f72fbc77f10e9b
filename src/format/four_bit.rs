//! The NF4 / FP4 blockwise 4-bit format's data (`docs/formats.md` §2): the tables, block sizes,
//! [`BlockScales`] and [`FourBitTensor`] (packed codes, scales, shape and their invariants). No kernels and no
//! I/O: quantizing and dequantizing are in [`crate::nf4`].

pub use super::block_size::{check_blocksize, BLOCK_SIZES};
use super::double_quant::DoubleQuantScales;
use super::storage::Bytes;
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
}
