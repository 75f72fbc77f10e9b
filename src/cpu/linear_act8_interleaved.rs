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
//! `round(127·T)`). Double-quantized scales (`docs/formats.md` §3) stay 8-bit codes in the same order
//! ([`LaneScales::Codes`]), one byte per block and row instead of four: the kernel decodes 16 at once with one
//! gather from the 256-entry map and the same f32 operations as the weight's decoded scales, so the same bits,
//! and the layout reads 4.16 bits per weight instead of 4.5 at block 64 (the GEMV is bound by those bytes).
//!
//! Int8 weights: pieces of 4 columns, byte `4r + j` of piece `p` the code of row `16g + r` at column `4p + j`
//! (the `vpdpbusd` operand as loaded); scales and zero points `[groups][entries per row][16]`.

use crate::format::affine::Granularity;
use crate::format::double_quant::DoubleQuantScales;
use crate::format::four_bit::BlockScales;
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
    /// 4-bit: `[groups][in / 8]` pieces of packed code bytes. Int8: `[groups][in / 4]` pieces of codes, byte
    /// `4r + j` of piece `p` the code of row `16g + r` at column `4p + j`.
    pub bytes: Vec<Piece>,
    /// Every group's 16 scales per parameter entry.
    pub scales: LaneScales,
    /// Int8 only: `[groups][per_row][16]` zero points (empty for 4-bit weights).
    pub zero_points: Vec<i32>,
    /// 4-bit only: the int8 table plus 128, as the unsigned bytes `vpdpbusd` multiplies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub table: [u8; 16],
}

/// One 64-byte piece of the layout on a 64-byte boundary: every load of the kernels is one cache line. (A
/// `Vec<u8>` is placed where the allocator likes, often 16 bytes past a line, and then each 64-byte load
/// touches two lines.)
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Piece(pub [u8; 64]);

/// The scales of a group's 16 rows, per parameter entry.
#[derive(Clone)]
pub(crate) enum LaneScales {
    /// `[groups][per_row][16]` f32: a 4-bit block's absmax / 127, or an int8 scale (zero on padding rows).
    F32(Vec<f32>),
    /// A double-quantized 4-bit weight's scales as their codes, decoded per lane as
    /// `((map[code] · nested) + offset) · (1/127)` (three separately rounded f32 operations): the same bits as the
    /// decoded scale times 1/127 (checked for every entry when built).
    Codes(CodedScales),
}

/// Double-quantized block scales in the interleaved order (see [`LaneScales::Codes`]).
#[derive(Clone)]
pub(crate) struct CodedScales {
    /// `[groups][per_row][16]` 8-bit codes (0 on padding rows).
    pub codes: Vec<u8>,
    /// The 256-entry map the codes index.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub map: Box<[f32; 256]>,
    /// Byte `k` (little-endian) of every map entry's f32 bits, plane by plane (the VBMI decode's lookup tables).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub map_planes: Box<[[u8; 256]; 4]>,
    /// The weight's offset, added after the nested scaling.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub offset: f32,
    /// `[groups][per_row]`: the run of 16 nested scales (an index into `nested`) that entry's lanes take. Private:
    /// every index is below `nested.len() / 16` (checked when built), which the kernels' raw reads rely on.
    run_of: Vec<u32>,
    /// `[runs][16]` nested absmax per lane (0 on padding rows); a new run starts wherever a lane's nested block
    /// changes along a group's entries.
    pub nested: Vec<f32>,
}

impl CodedScales {
    /// The run of nested scales of every `[group][entry]` (each below `nested.len() / 16`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn run_of(&self) -> &[u32] {
        &self.run_of
    }
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
    /// Double-quantized scales are kept as codes ([`LaneScales::Codes`]) wherever they decode to the same bits.
    pub fn build(weight: &QuantWeight, out: usize, n_in: usize, scales: &[f32]) -> Option<Act8Interleaved> {
        Self::build_with(weight, out, n_in, scales, true)
    }

    /// [`build`](Self::build), with 4-bit scales always as f32 when `codes` is false (tests compare both forms).
    pub(crate) fn build_with(
        weight: &QuantWeight,
        out: usize,
        n_in: usize,
        scales: &[f32],
        codes: bool,
    ) -> Option<Act8Interleaved> {
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
                let scales = match t.scales() {
                    BlockScales::Double(dq) if codes => coded_scales(dq, out, groups, per_row, scales),
                    _ => None,
                }
                .map(LaneScales::Codes)
                .unwrap_or_else(|| {
                    LaneScales::F32(interleave_params(out, groups, per_row, |o, b| {
                        scales[o * per_row + b] * super::linear_act8::INV127
                    }))
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
                    scales: LaneScales::F32(interleave_params(out, groups, per_row, |o, b| t.scales()[entry(o, b)])),
                    zero_points: interleave_params(out, groups, per_row, |o, b| t.zero_points()[entry(o, b)] as i32),
                    table: [0; 16],
                }))
            }
        }
    }

    /// `il` after asserting the invariants the kernels rely on: every block's parameter entry is inside a row,
    /// the scales have an entry per group, parameter entry and row, and every coded entry's run is inside `nested`.
    fn checked(il: Act8Interleaved) -> Act8Interleaved {
        assert!(il.param_of_block.iter().all(|&p| (p as usize) < il.per_row), "act8 layout: parameter entries");
        let entries = il.groups * il.per_row;
        match &il.scales {
            LaneScales::F32(v) => assert_eq!(v.len(), entries * ROWS, "act8 layout: scales"),
            LaneScales::Codes(c) => {
                assert!(c.codes.len() == entries * ROWS && c.run_of.len() == entries, "act8 layout: coded scales");
                let runs = c.nested.len() / ROWS;
                assert!(c.run_of.iter().all(|&r| (r as usize) < runs), "act8 layout: nested runs");
            }
        }
        il
    }

    /// Whether the scales are kept as double-quantization codes ([`LaneScales::Codes`]).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub fn scales_are_codes(&self) -> bool {
        matches!(self.scales, LaneScales::Codes(_))
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
        assert!(self.bytes.len() * 64 == self.groups * n_in * piece_bytes);
        assert!(!self.is_int8() || self.zero_points.len() == self.groups * self.per_row * ROWS);
        // Every entry of `param_of_block` is below `per_row`, the scales' sizes and the coded scales' runs: checked
        // once when the layout was built.
        assert!(self.param_of_block.len() == nb);
        assert!(o0 + ob <= self.groups * ROWS && out_len >= m * ob);
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        let scales = match &self.scales {
            LaneScales::F32(v) => 4 * v.len(),
            LaneScales::Codes(c) => c.codes.len() + 4 * 256 + 4 * (256 + c.run_of.len() + c.nested.len()),
        };
        64 * self.bytes.len() + scales + 4 * (self.zero_points.len() + self.param_of_block.len())
    }
}

/// `[groups][pieces]` pieces: byte `4r + j` of piece `p` of group `g` is `byte(16g + r, p, j)` (0 on padding
/// rows).
fn interleave_pieces(out: usize, groups: usize, pieces: usize, byte: impl Fn(usize, usize, usize) -> u8) -> Vec<Piece> {
    let mut bytes = vec![Piece([0; 64]); groups * pieces];
    for o in 0..out {
        let (g, r) = (o / ROWS, o % ROWS);
        for p in 0..pieces {
            for (j, b) in bytes[g * pieces + p].0[4 * r..4 * r + 4].iter_mut().enumerate() {
                *b = byte(o, p, j);
            }
        }
    }
    bytes
}

thread_local! {
    static DECODED_SCALES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer for decoded scales, `len` floats long (grown when a call needs more, kept for
/// the thread's next call: no allocation once it is large enough). Kernels that pass over the same groups several
/// times (several rows of `x`) decode coded scales into it once per call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn with_decoded_scales<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    DECODED_SCALES.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// A double-quantized weight's scales in the interleaved order, or `None` when some entry's decode
/// `((map[code] · nested) + offset) · (1/127)` would not give the bits of `decoded[i] · (1/127)` (it always does
/// for the formats' arithmetic; the check keeps the kernels exact whatever a file holds).
fn coded_scales(
    dq: &DoubleQuantScales,
    out: usize,
    groups: usize,
    per_row: usize,
    decoded: &[f32],
) -> Option<CodedScales> {
    use super::linear_act8::INV127;
    let (codes, nested_absmax, offset, map) = (dq.codes(), dq.nested_absmax(), dq.offset(), dq.map());
    let nbs = dq.nested_blocksize().max(1);
    let nested_of = |o: usize, b: usize| nested_absmax.get((o * per_row + b) / nbs).copied();
    for o in 0..out {
        for b in 0..per_row {
            let i = o * per_row + b;
            let lane = ((map[*codes.get(i)? as usize] * nested_of(o, b)?) + offset) * INV127;
            if lane.to_bits() != (decoded.get(i)? * INV127).to_bits() {
                return None;
            }
        }
    }
    let mut run_of = Vec::with_capacity(groups * per_row);
    let mut nested: Vec<f32> = Vec::new();
    for g in 0..groups {
        let rows = g * ROWS..((g + 1) * ROWS).min(out);
        // The nested block of each lane at entry b (None on padding rows).
        let blocks = |b: usize| -> [Option<usize>; ROWS] {
            std::array::from_fn(|r| rows.contains(&(g * ROWS + r)).then(|| ((g * ROWS + r) * per_row + b) / nbs))
        };
        let mut last = None;
        for b in 0..per_row {
            let now = blocks(b);
            if last != Some(now) {
                nested.extend(now.map(|n| n.map_or(0.0, |n| nested_absmax[n])));
                last = Some(now);
            }
            run_of.push((nested.len() / ROWS - 1) as u32);
        }
    }
    Some(CodedScales {
        codes: interleave_params(out, groups, per_row, |o, b| codes[o * per_row + b]),
        map: Box::new(*map),
        map_planes: Box::new(std::array::from_fn(|k| std::array::from_fn(|i| (map[i].to_bits() >> (8 * k)) as u8))),
        offset,
        run_of,
        nested,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::scheme::Scheme;

    /// Coded scales are kept only when every entry decodes to the bits of the decoded scale, so a layout never
    /// silently changes a kernel's result; runs follow each lane's nested block.
    #[test]
    fn coded_scales_are_kept_only_where_they_decode_to_the_same_bits() {
        use super::super::linear_act8::INV127;
        // 40 rows × 320 columns at block 32: 10 entries per row, nested blocks of 256 entries (25.6 rows). Group 0
        // (rows 0..16) lies in nested block 0; in group 1 row 25 changes block at entry 6 (rows 26.. are in block
        // 1): two runs; group 2 (rows 32..40, then padding) lies in block 1.
        let (out, n_in, per_row) = (40, 320, 10);
        let w: Vec<f32> = (0..out * n_in).map(|i| ((i * 37 % 101) as f32 - 50.0) * (1.0 + (i / 977) as f32)).collect();
        let weight = QuantWeight::quantize(&w, &[out, n_in], Scheme::nf4(32, true)).unwrap();
        let QuantWeight::FourBit(t) = &weight else { panic!("4-bit") };
        let BlockScales::Double(dq) = t.scales() else { panic!("double-quantized") };
        let decoded = t.decoded_scales();
        let c = coded_scales(dq, out, 3, per_row, decoded).expect("the formats' decode gives the same bits");
        assert_eq!(c.nested.len() / ROWS, 4);
        for o in 0..out {
            for b in 0..per_row {
                let (g, r) = (o / ROWS, o % ROWS);
                let run = c.run_of()[g * per_row + b] as usize;
                let code = c.codes[(g * per_row + b) * ROWS + r] as usize;
                let got = ((c.map[code] * c.nested[run * ROWS + r]) + c.offset) * INV127;
                assert_eq!(got.to_bits(), (decoded[o * per_row + b] * INV127).to_bits(), "row {o} entry {b}");
            }
        }
        let mut tampered = decoded.to_vec();
        tampered[77] = f32::from_bits(tampered[77].to_bits() ^ 1);
        assert!(coded_scales(dq, out, 3, per_row, &tampered).is_none());
    }
}
