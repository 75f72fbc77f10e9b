//! The shapes of the kernel tables (one [`Kernels`] value per instruction set, built in `dispatch.rs`) and the
//! argument bundle of the linear block kernel. Types only: the kernel files fill the tables, the drivers
//! (`affine.rs`, `nf4.rs`, `linear.rs`) call through them.

use crate::format::affine::AffineParams;
use crate::format::layer::{AdapterSelection, LayerView};
use crate::reference::nf4::Codebook;
use crate::{bf16, f16};

/// A mutable output slice of one of the element types (function pointers cannot be generic).
pub(crate) enum OutSlice<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

impl<'a> OutSlice<'a> {
    /// Views `out` as the element type it is (a checked, zero-copy cast).
    pub fn of<T: crate::Element>(out: &'a mut [T]) -> OutSlice<'a> {
        match T::DTYPE {
            crate::DType::F32 => OutSlice::F32(bytemuck::cast_slice_mut(out)),
            crate::DType::F16 => OutSlice::F16(bytemuck::cast_slice_mut(out)),
            crate::DType::BF16 => OutSlice::Bf16(bytemuck::cast_slice_mut(out)),
        }
    }
}

/// Calls a kernel generic over the output element with the slice an [`OutSlice`] holds.
macro_rules! with_out_slice {
    ($out:expr, |$o:ident| $call:expr) => {
        match $out {
            $crate::cpu::table::OutSlice::F32($o) => $call,
            $crate::cpu::table::OutSlice::F16($o) => $call,
            $crate::cpu::table::OutSlice::Bf16($o) => $call,
        }
    };
}
pub(crate) use with_out_slice;

/// Affine int8 run kernels (one scale and zero point per run).
#[derive(Clone, Copy)]
pub(crate) struct AffineKernels {
    /// Min and max of a non-empty slice, and whether every element is finite (no NaN, no ±inf). When the flag
    /// is false the min and max are meaningless.
    pub minmax: fn(&[f32]) -> (f32, f32, bool),
    /// Codes of a run (`x.len() == out.len()`).
    pub quantize: fn(&[f32], AffineParams, &mut [u8]),
    /// Values of a run (`codes.len() == out.len()`); the flag asks for non-temporal stores.
    pub dequantize: fn(&[u8], AffineParams, &mut [f32], bool),
    /// Values of consecutive runs of equal length (`codes.len() == out.len() == scales.len() · run`, one
    /// zero point per scale): the per-channel and per-group layouts. With the flag, non-temporal stores over
    /// the whole span and one fence at its end (a fence per run stalls on every short run).
    pub dequantize_runs: AffineDequantizeRuns,
}

/// Values of equal runs: (codes, scales, zero points, run length, out, stream).
pub(crate) type AffineDequantizeRuns = fn(&[u8], &[f32], &[u8], usize, &mut [f32], bool);

/// The int8-activation quantizer of one row of `x`: `(x, q, d, sums)` writes `reference::act8::quantize_row`'s
/// codes `q` and scales `d` and, when `sums` is not empty (then one entry per 32-block), each block's code sum.
pub(crate) type Act8Quantize = fn(&[f32], &mut [i8], &mut [f32], &mut [i32]);

/// Dequantizes a 4-bit span starting at a block boundary: (packed, decoded scales, blocksize, table, out, stream).
pub(crate) type FourBitDequantize = fn(&[u8], &[f32], usize, &[f32; 16], OutSlice<'_>, bool);

/// NF4 / FP4 kernels.
#[derive(Clone, Copy)]
pub(crate) struct FourBitKernels {
    /// Largest `|x|` as f32 bits (`>= 0x7f80_0000` on NaN / infinity).
    pub absbits: fn(&[f32]) -> u32,
    /// Packed codes of a run inside one block (starting at an even element), odd count padded.
    pub quantize: fn(&[f32], f32, &Codebook, &mut [u8]),
    /// Dequantizes a span starting at a block boundary: (packed, absmax, blocksize, table, out, stream).
    pub dequantize: FourBitDequantize,
}

/// Fused linear kernels.
#[derive(Clone, Copy)]
pub(crate) struct LinearKernels {
    /// Computes one output block `[m, ob]` (base product, bias, LoRA expand) into a zeroed slice.
    pub block: fn(&Job<'_>, usize, usize, &mut [f32]),
    /// `out[k] = dot(x, rows[k·n..(k + 1)·n])` for every `k < out.len()`, `n = x.len()` (the LoRA shrink).
    pub dots: fn(&[f32], &[f32], &mut [f32]),
    /// `(x, rows, out, half)`: the 8 dot products of rows `8·half .. 8·half + 8` of a 16-row [`dots`](Self::dots)
    /// call, given those 8 rows (`out.len() == 8`, `half < 2`), with the same bits as that call gives them: the
    /// LoRA shrink of a split forward, half a 16-rank piece per thread.
    pub dots_half: fn(&[f32], &[f32], &mut [f32], usize),
    /// [`block`](Self::block) with int8 activations (`Job::act8` prepared in `act8_layout`).
    pub act8_block: fn(&Job<'_>, usize, usize, &mut [f32]),
    /// `out[r, c] = Σ_o dy[r, o]·W[o, k0 + c]`: one column chunk of the backward's `dx` (`linear_backward.rs`).
    pub backward_cols: fn(&Job<'_>, &[f32], usize, &mut [f32]),
    /// The copy of `x` that `block` reads besides `x` in f32 forwards, if it wants one.
    pub pack_x: Option<PackX>,
    /// Quantizes one row of `x` for `act8_block` (bit-identical to `reference::act8::quantize_row`).
    pub act8_quantize: Act8Quantize,
    /// Whether `act8_block` reads the interleaved weight layout where a layer has it (then `x` comes with its
    /// block sums; `QuantLinear::build_act8_layout` builds the layout only where the best table does).
    pub act8_interleaved: bool,
    /// The layout of the quantized `x` that `act8_block` reads.
    pub act8_layout: super::linear_act8::Act8Layout,
}

/// ggml / GGUF tensor-type kernels.
#[derive(Clone, Copy)]
pub(crate) struct GgmlKernels {
    /// Decodes whole blocks of a decodable type: `out.len() / block_elements` blocks from `data`.
    pub dequantize: fn(crate::format::ggml::GgmlType, &[u8], &mut [f32]),
}

/// Every kernel of one instruction set.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub affine: AffineKernels,
    pub four_bit: FourBitKernels,
    pub linear: LinearKernels,
    pub ggml: GgmlKernels,
}

/// How a block kernel wants `x` packed (f32 forwards with `m ≥ min_m`): the rows in groups of `group_rows`
/// (the last one shorter), each group at offset `first row · in`, written by `pack_group(rows of x, in, out)`.
#[derive(Clone, Copy)]
pub(crate) struct PackX {
    pub min_m: usize,
    pub group_rows: usize,
    pub pack_group: fn(&[f32], usize, &mut [f32]),
}

/// Everything a block job needs, borrowed from the layer and the scratch (`Copy`: a split hands each thread its
/// own copy, see [`super::pool_split`]).
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    pub layer: LayerView<'a>,
    pub x: &'a [f32],
    pub m: usize,
    pub pairs: &'a [[f32; 2]; 256],
    /// Per adapter: `t[row * rank + r]` (zeros for rows that do not use it); only read where `used[a]`.
    pub shrink: &'a [Vec<f32>],
    /// Per adapter: whether any row uses it.
    pub used: &'a [bool],
    pub sel: AdapterSelection<'a>,
    /// `x` quantized to int8 (int8-activation forwards only).
    pub act8: Option<super::linear_act8::Act8View<'a>>,
    /// `x` as the f32 block kernel asked for it through [`LinearKernels::pack_x`] (empty: not asked).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub x_packed: &'a [f32],
    /// A split forward's LoRA shrink, computed by the blocks (`shrink` is then unused): each block claims its
    /// share before its base product, and the output pass reads `t` from here once every piece is done.
    pub deferred: Option<super::linear_shrink::SharedShrink<'a>>,
}
