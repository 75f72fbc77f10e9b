//! The interleaved 4-bit layout of the AVX-512 VNNI int8-activation GEMV/GEMM
//! ([`QuantLinear::build_act8_layout`](crate::linear::QuantLinear::build_act8_layout)): a private copy of a
//! 4-bit weight in which 16 output rows share every 64-byte load, so that one `vpdpbusd` adds 4 products into
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

use crate::format::layer::QuantWeight;
use crate::reference::act8::int8_table;
use crate::reference::nf4::code_at;

/// Output rows per interleaved group: the 16 i32 lanes of a 512-bit register.
pub(crate) const ROWS: usize = 16;

/// A 4-bit weight in the interleaved layout (see the module documentation).
#[derive(Clone)]
pub(crate) struct Act8Interleaved {
    pub groups: usize,
    pub n_in: usize,
    /// `log2(blocksize / 32)`: the weight block of `x`'s 32-block `kb` (within a row) is `kb >> block_shift`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub block_shift: u32,
    /// `[groups][in / 8][64]` packed code bytes.
    pub nibbles: Vec<u8>,
    /// `[groups][in / blocksize][16]` block scales / 127 (zero on padding rows).
    pub scales: Vec<f32>,
    /// The int8 table plus 128, as the unsigned bytes `vpdpbusd` multiplies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub table: [u8; 16],
}

impl Act8Interleaved {
    /// Whether a weight fits the layout: 4-bit, rows of whole 64-column chunks, and a power-of-two block size
    /// of at least 32 that divides the row (so every block lies inside one row).
    pub fn fits(weight: &QuantWeight, n_in: usize) -> bool {
        match weight {
            QuantWeight::FourBit(t) => {
                let bs = t.blocksize();
                n_in.is_multiple_of(64) && bs.is_power_of_two() && bs >= 32 && n_in.is_multiple_of(bs)
            }
            QuantWeight::Int8(_) => false,
        }
    }

    /// The layout of `weight` (`[out, n_in]`, decoded block scales `scales`), or `None` when it does not
    /// [`fit`](Self::fits).
    pub fn build(weight: &QuantWeight, out: usize, n_in: usize, scales: &[f32]) -> Option<Act8Interleaved> {
        if !Self::fits(weight, n_in) {
            return None;
        }
        let QuantWeight::FourBit(t) = weight else { return None };
        let bs = t.blocksize();
        let groups = out.div_ceil(ROWS);
        let pieces = n_in / 8;
        let packed = t.packed();
        let mut nibbles = vec![0u8; groups * pieces * 64];
        for o in 0..out {
            let (g, r) = (o / ROWS, o % ROWS);
            for p in 0..pieces {
                let at = (g * pieces + p) * 64 + 4 * r;
                for j in 0..4 {
                    let lo = code_at(packed, o * n_in + 8 * p + j);
                    let hi = code_at(packed, o * n_in + 8 * p + 4 + j);
                    nibbles[at + j] = lo | (hi << 4);
                }
            }
        }
        let per_row = n_in / bs;
        let mut interleaved_scales = vec![0f32; groups * per_row * ROWS];
        for o in 0..out {
            let (g, r) = (o / ROWS, o % ROWS);
            for b in 0..per_row {
                interleaved_scales[(g * per_row + b) * ROWS + r] = scales[o * per_row + b] * super::linear_act8::INV127;
            }
        }
        let c = int8_table(t.table());
        Some(Act8Interleaved {
            groups,
            n_in,
            block_shift: (bs / 32).trailing_zeros(),
            nibbles,
            scales: interleaved_scales,
            table: std::array::from_fn(|i| (c[i] as i16 + 128) as u8),
        })
    }

    /// Whether this machine's int8-activation kernel reads the layout (AVX-512 VNNI).
    pub fn used_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::dispatch::kernels(crate::cpu::Isa::best()).linear.act8_layout == super::linear_act8::Act8Layout::Vnni
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.nibbles.len() + 4 * self.scales.len()
    }
}

impl std::fmt::Debug for Act8Interleaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Act8Interleaved {{ groups: {}, in: {}, bytes: {} }}", self.groups, self.n_in, self.bytes())
    }
}
