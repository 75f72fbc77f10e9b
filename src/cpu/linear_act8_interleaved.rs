//! The interleaved weight layout of the AVX-512 VNNI int8-activation GEMV/GEMM
//! ([`QuantLinear::build_act8_layout`](crate::linear::QuantLinear::build_act8_layout)): a private copy of a
//! 4-bit or int8 weight in which 16 output rows share every 64-byte load, so that one `vpdpbusd` adds 4 products into
//! each of 16 rows' lanes, the block scales of 16 rows are one vector, and no horizontal sum is left at the end
//! (ggml's repacked `_8x8` / AMX layouts follow the same idea). Files, `packed()` and the dequantized values
//! are unchanged; the f32 mode never reads this copy.
//!
//! Rows are taken in groups of [`ROWS`] (the last one padded with zero codes and zero scales). Group `g`'s
//! codes are `in / 8` pieces of 64 bytes; byte `4r + j` of piece `p` holds the code of row `16g + r` at column
//! `8p + j` in its low nibble and at column `8p + 4 + j` in its high nibble. So the low nibbles of a piece,
//! looked up in the int8 table, are 16 lanes × 4 consecutive columns: the `vpdpbusd` operand against the 4
//! `x` codes `8p..8p+4` broadcast to every lane; the high nibbles go with `x` codes `8p+4..8p+8`.
//! Scales: `[groups][in / blocksize][16]`, each the block's absmax / 127 (the kernel's int8 table is
//! `round(127·T)`).
//!
//! Int8 weights: pieces of 4 columns, byte `4r + j` of piece `p` the code of row `16g + r` at column `4p + j`
//! (the `vpdpbusd` operand as loaded); scales and zero points `[groups][entries per row][16]`.

use crate::format::affine::Granularity;
use crate::format::layer::QuantWeight;
use crate::reference::act8::int8_table;
use crate::reference::nf4::code_at;

/// Output rows per interleaved group: the 16 i32 lanes of a 512-bit register.
pub(crate) const ROWS: usize = 16;

/// A 4-bit or int8 weight in the interleaved layout (see the module documentation).
#[derive(Clone)]
pub(crate) struct Act8Interleaved {
    pub groups: usize,
    pub n_in: usize,
    /// Per 32-block `kb` of a row, its parameter entry within the row (`kb >> log2(blocksize / 32)` for 4-bit
    /// weights; 0 per channel or tensor, `32·kb / g` per int8 group of `g`). Private, like `per_row`: every
    /// entry is below `per_row` (checked once in [`build`](Self::build), the only constructor), which the
    /// kernels' raw-pointer reads rely on without a per-call scan.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    param_of_block: Vec<u32>,
    /// Parameter entries per row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    per_row: usize,
    /// 4-bit: `[groups][in / 8][64]` packed code bytes. Int8: `[groups][in / 4][64]` codes, byte `4r + j` of
    /// piece `p` the code of row `16g + r` at column `4p + j`.
    pub bytes: Vec<u8>,
    /// `[groups][per_row][16]` scales: 4-bit block absmax / 127, int8 scales (zero on padding rows).
    pub scales: Vec<f32>,
    /// Int8 only: `[groups][per_row][16]` zero points (empty for 4-bit weights).
    pub zero_points: Vec<i32>,
    /// 4-bit only: the int8 table plus 128, as the unsigned bytes `vpdpbusd` multiplies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub table: [u8; 16],
}

impl Act8Interleaved {
    /// Whether a weight fits the layout: rows of whole 64-column chunks, and parameters constant over every
    /// 32-block of a row: 4-bit block sizes that are powers of two of at least 32 dividing the row; int8 per
    /// tensor, per channel, or groups that are multiples of 32 dividing the row.
    pub fn fits(weight: &QuantWeight, n_in: usize) -> bool {
        n_in.is_multiple_of(64)
            && match weight {
                QuantWeight::FourBit(t) => {
                    let bs = t.blocksize();
                    bs.is_power_of_two() && bs >= 32 && n_in.is_multiple_of(bs)
                }
                QuantWeight::Int8(t) => match t.granularity() {
                    Granularity::PerGroup(g) => g.is_multiple_of(32) && n_in.is_multiple_of(g),
                    _ => true,
                },
            }
    }

    /// The layout of `weight` (`[out, n_in]`; `scales`: a 4-bit weight's decoded block scales), or `None` when
    /// it does not [`fit`](Self::fits).
    pub fn build(weight: &QuantWeight, out: usize, n_in: usize, scales: &[f32]) -> Option<Act8Interleaved> {
        if !Self::fits(weight, n_in) {
            return None;
        }
        let groups = out.div_ceil(ROWS);
        let nb = n_in / 32;
        match weight {
            QuantWeight::FourBit(t) => {
                let bs = t.blocksize();
                let packed = t.packed();
                let code = |o: usize, col: usize| code_at(packed, o * n_in + col);
                // Piece p: columns 8p..8p+4 in the low nibbles, 8p+4..8p+8 in the high ones.
                let bytes = interleave_pieces(out, groups, n_in / 8, |o, p, j| {
                    code(o, 8 * p + j) | (code(o, 8 * p + 4 + j) << 4)
                });
                let per_row = n_in / bs;
                let scales = interleave_params(out, groups, per_row, |o, b| {
                    scales[o * per_row + b] * super::linear_act8::INV127
                });
                let c = int8_table(t.table());
                let shift = (bs / 32).trailing_zeros();
                Some(Self::checked(Act8Interleaved {
                    groups,
                    n_in,
                    param_of_block: (0..nb as u32).map(|kb| kb >> shift).collect(),
                    per_row,
                    bytes,
                    scales,
                    zero_points: Vec::new(),
                    table: std::array::from_fn(|i| (c[i] as i16 + 128) as u8),
                }))
            }
            QuantWeight::Int8(t) => {
                let codes = t.codes();
                let bytes = interleave_pieces(out, groups, n_in / 4, |o, p, j| codes[o * n_in + 4 * p + j]);
                let (per_row, group) = match t.granularity() {
                    Granularity::PerGroup(g) => (n_in / g, g),
                    _ => (1, n_in),
                };
                let entry = |o: usize, b: usize| match t.granularity() {
                    Granularity::PerTensor => 0,
                    Granularity::PerChannel => o,
                    Granularity::PerGroup(_) => o * per_row + b,
                };
                Some(Self::checked(Act8Interleaved {
                    groups,
                    n_in,
                    param_of_block: (0..nb).map(|kb| (32 * kb / group) as u32).collect(),
                    per_row,
                    bytes,
                    scales: interleave_params(out, groups, per_row, |o, b| t.scales()[entry(o, b)]),
                    zero_points: interleave_params(out, groups, per_row, |o, b| t.zero_points()[entry(o, b)] as i32),
                    table: [0; 16],
                }))
            }
        }
    }

    /// `il` after asserting the invariant the kernels rely on: every block's parameter entry is inside a row.
    fn checked(il: Act8Interleaved) -> Act8Interleaved {
        assert!(il.param_of_block.iter().all(|&p| (p as usize) < il.per_row), "act8 layout: parameter entries");
        il
    }

    /// Per 32-block of a row, its parameter entry within the row (each below [`per_row`](Self::per_row)).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn param_of_block(&self) -> &[u32] {
        &self.param_of_block
    }

    /// Parameter entries per row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Whether the weight is int8 (else 4-bit).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn is_int8(&self) -> bool {
        !self.zero_points.is_empty()
    }

    /// Whether this machine's int8-activation kernel reads the layout (x86 with AVX2: AVX-512 VNNI, AVX-VNNI or
    /// the AVX2 `vpmaddubsw` form).
    pub fn used_here() -> bool {
        super::dispatch::kernels(crate::cpu::Isa::best()).linear.act8_interleaved
    }

    /// Asserts what the interleaved kernels read through raw pointers: rows of whole 64-column chunks, `x`
    /// quantized with its block sums for `m` rows, the layout's arrays at their sizes, every block's parameter
    /// entry inside a row, rows `o0..o0 + ob` inside the groups and an `out` of at least `[m, ob]`.
    #[cfg(target_arch = "x86_64")]
    pub fn check_kernel_call(
        &self,
        act: super::linear_act8::Act8View<'_>,
        m: usize,
        o0: usize,
        ob: usize,
        out_len: usize,
    ) {
        let n_in = self.n_in;
        let nb = n_in / crate::reference::act8::BLOCK;
        assert!(
            n_in.is_multiple_of(64) && act.q.len() == m * n_in && act.d.len() == m * nb && act.sums.len() == m * nb
        );
        let piece_bytes = if self.is_int8() { 16 } else { 8 }; // bytes of a group per column
        assert!(self.bytes.len() == self.groups * n_in * piece_bytes);
        assert!(self.scales.len() == self.groups * self.per_row * ROWS);
        assert!(!self.is_int8() || self.zero_points.len() == self.scales.len());
        // Every entry of `param_of_block` is below `per_row`: checked once when the layout was built.
        assert!(self.param_of_block.len() == nb);
        assert!(o0 + ob <= self.groups * ROWS && out_len >= m * ob);
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.len() + 4 * (self.scales.len() + self.zero_points.len() + self.param_of_block.len())
    }
}

/// `[groups][pieces][64]` bytes: byte `4r + j` of piece `p` of group `g` is `byte(16g + r, p, j)` (0 on padding
/// rows).
fn interleave_pieces(out: usize, groups: usize, pieces: usize, byte: impl Fn(usize, usize, usize) -> u8) -> Vec<u8> {
    let mut bytes = vec![0u8; groups * pieces * 64];
    for o in 0..out {
        let (g, r) = (o / ROWS, o % ROWS);
        for p in 0..pieces {
            let at = (g * pieces + p) * 64 + 4 * r;
            for (j, b) in bytes[at..at + 4].iter_mut().enumerate() {
                *b = byte(o, p, j);
            }
        }
    }
    bytes
}

/// `[groups][per_row][16]` parameters: entry `b` of row `16g + r` at `(g·per_row + b)·16 + r` (default on padding
/// rows).
fn interleave_params<T: Copy + Default>(
    out: usize,
    groups: usize,
    per_row: usize,
    param: impl Fn(usize, usize) -> T,
) -> Vec<T> {
    let mut v = vec![T::default(); groups * per_row * ROWS];
    for o in 0..out {
        let (g, r) = (o / ROWS, o % ROWS);
        for b in 0..per_row {
            v[(g * per_row + b) * ROWS + r] = param(o, b);
        }
    }
    v
}

impl std::fmt::Debug for Act8Interleaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Act8Interleaved {{ groups: {}, in: {}, bytes: {} }}", self.groups, self.n_in, self.bytes())
    }
}
