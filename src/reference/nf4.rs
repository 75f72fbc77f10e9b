//! Reference for NF4 / FP4 blockwise 4-bit quantization (`docs/formats.md` §2, bitsandbytes semantics).
//!
//! These loops are the specification. They validate nothing: callers pass finite data, an allowed block size
//! and buffers of the right length (the public API in [`crate::nf4`] checks that first).

use crate::element::Element;

/// Smallest absmax used as a divisor: a block of zeros or subnormals normalises to 0 (code of 0.0).
pub const ABSMAX_FLOOR: f32 = 1e-38;

/// Decision data for one 16-entry table: the table sorted by value, its 15 midpoints, and which code sits at
/// each sorted position.
///
/// For NF4 (already sorted) `codes` is the identity. For FP4 (stored in bit-pattern order) it is
/// `torch.argsort(table)` (a stable sort, the first of two equal zeros first), as bitsandbytes' reference
/// backend uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Codebook {
    /// `mids[i] = (sorted[i] + sorted[i + 1]) * 0.5`, computed in f32.
    pub mids: [f32; 15],
    /// `codes[p]` is the 4-bit code whose table value is the `p`-th smallest.
    pub codes: [u8; 16],
}

/// Builds the [`Codebook`] of `table` (stable sort by value; -0.0 and 0.0 compare equal).
pub fn codebook(table: &[f32; 16]) -> Codebook {
    let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
    order.sort_by(|&a, &b| table[a as usize].partial_cmp(&table[b as usize]).unwrap_or(std::cmp::Ordering::Equal));
    let sorted: [f32; 16] = std::array::from_fn(|p| table[order[p] as usize]);
    Codebook { mids: std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) * 0.5), codes: order }
}

/// The code of a normalised value: the code at sorted position `#{ i : xn > mids[i] }`. A value exactly on a
/// midpoint takes the lower position.
#[inline]
pub fn code_of(xn: f32, cb: &Codebook) -> u8 {
    let pos = cb.mids.iter().filter(|&&m| xn > m).count();
    cb.codes[pos]
}

/// The code that pads an odd element count: the code of 0.0 (7 for NF4, 0 for FP4).
pub fn pad_code(cb: &Codebook) -> u8 {
    code_of(0.0, cb)
}

/// `max |x|` of a block in f32 (inputs widened exactly first); 0 for an empty block.
pub fn block_absmax<T: Element>(x: &[T]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()))
}

/// `clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`: the f32 reciprocal, then one f32 multiply.
#[inline]
pub fn normalise(x: f32, absmax: f32) -> f32 {
    let inv = 1.0f32 / absmax.max(ABSMAX_FLOOR);
    (x * inv).clamp(-1.0, 1.0)
}

/// One dequantized value: `table[code] * absmax`, a single f32 multiply.
#[inline]
pub fn dequantize_value(code: u8, absmax: f32, table: &[f32; 16]) -> f32 {
    table[(code & 15) as usize] * absmax
}

/// Quantizes `x` in blocks of `blocksize` over the flat data; returns `(packed, absmax)` with
/// `packed.len() == ceil(n / 2)` (first element in the high nibble, odd count padded with [`pad_code`]) and one
/// absmax per block (the last block may be partial).
pub fn quantize<T: Element>(x: &[T], blocksize: usize, table: &[f32; 16]) -> (Vec<u8>, Vec<f32>) {
    let cb = codebook(table);
    let mut codes = Vec::with_capacity(x.len() + 1);
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let a = block_absmax(block);
        absmax.push(a);
        codes.extend(block.iter().map(|v| code_of(normalise(v.to_f32(), a), &cb)));
    }
    if !codes.len().is_multiple_of(2) {
        codes.push(pad_code(&cb));
    }
    (pack(&codes), absmax)
}

/// Packs codes two per byte, the first in the high nibble: `byte[k] = (q[2k] << 4) | q[2k+1]`.
pub fn pack(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|c| (c[0] << 4) | c.get(1).copied().unwrap_or(0)).collect()
}

/// The 4-bit code of flat element `i` in `packed`.
#[inline]
pub fn code_at(packed: &[u8], i: usize) -> u8 {
    let b = packed[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 15
    }
}

/// Dequantizes `n` elements to f32: `table[q] * absmax[i / blocksize]`.
pub fn dequantize(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize, table: &[f32; 16]) -> Vec<f32> {
    (0..n).map(|i| dequantize_value(code_at(packed, i), absmax[i / blocksize], table)).collect()
}

/// Dequantizes to any element type: the f32 result of [`dequantize`] rounded to nearest, ties to even.
pub fn dequantize_to<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    n: usize,
    table: &[f32; 16],
) -> Vec<T> {
    dequantize(packed, absmax, blocksize, n, table).into_iter().map(T::from_f32).collect()
}
