//! One table of kernel functions per instruction set, built once after detection (as ggml's
//! `type_traits_cpu`): callers look the table up by [`Isa`] and call through it, so no call site matches on
//! the instruction set, and adding one means adding one table.
//!
//! The x86 tables can only be built with a detection token ([`super::x86_features`]), so a `#[target_feature]`
//! kernel is unreachable before its instruction set was detected.

use super::linear::Job;
use super::Isa;
use crate::affine::AffineParams;
use crate::reference::nf4::Codebook;
use crate::{bf16, f16};
use std::sync::OnceLock;

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
            $crate::cpu::dispatch::OutSlice::F32($o) => $call,
            $crate::cpu::dispatch::OutSlice::F16($o) => $call,
            $crate::cpu::dispatch::OutSlice::Bf16($o) => $call,
        }
    };
}
pub(crate) use with_out_slice;

/// Affine int8 run kernels (one scale and zero point per run).
#[derive(Clone, Copy)]
pub(crate) struct AffineKernels {
    /// Min and max of a non-empty slice.
    pub minmax: fn(&[f32]) -> (f32, f32),
    /// Codes of a run (`x.len() == out.len()`).
    pub quantize: fn(&[f32], AffineParams, &mut [u8]),
    /// Values of a run (`codes.len() == out.len()`); the flag asks for non-temporal stores.
    pub dequantize: fn(&[u8], AffineParams, &mut [f32], bool),
}

/// NF4 / FP4 kernels.
#[derive(Clone, Copy)]
pub(crate) struct FourBitKernels {
    /// Largest `|x|` as f32 bits (`>= 0x7f80_0000` on NaN / infinity).
    pub absbits: fn(&[f32]) -> u32,
    /// Packed codes of a run inside one block (starting at an even element), odd count padded.
    pub quantize: fn(&[f32], f32, &Codebook, &mut [u8]),
    /// Dequantizes a span starting at a block boundary: (packed, absmax, blocksize, table, out, stream).
    pub dequantize: fn(&[u8], &[f32], usize, &[f32; 16], OutSlice<'_>, bool),
}

/// Fused linear kernels.
#[derive(Clone, Copy)]
pub(crate) struct LinearKernels {
    /// Computes one output block `[m, ob]` (base product, bias, LoRA expand) into a zeroed slice.
    pub block: fn(&Job<'_>, usize, usize, &mut [f32]),
    /// A dot product (LoRA shrink).
    pub dot: fn(&[f32], &[f32]) -> f32,
}

/// Every kernel of one instruction set.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub affine: AffineKernels,
    pub four_bit: FourBitKernels,
    pub linear: LinearKernels,
}

/// The table for `isa`. Callers pass only levels [`Isa::is_available`] reported (every public entry checks
/// its `KernelPath` first); an unavailable level falls back to the portable table, never to its kernels.
pub(crate) fn kernels(isa: Isa) -> &'static Kernels {
    static SCALAR: OnceLock<Kernels> = OnceLock::new();
    static PORTABLE: OnceLock<Kernels> = OnceLock::new();
    let portable = || PORTABLE.get_or_init(portable_kernels);
    match isa {
        Isa::Scalar => SCALAR.get_or_init(scalar_kernels),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            static AVX2: OnceLock<Option<Kernels>> = OnceLock::new();
            AVX2.get_or_init(|| super::x86_features::Avx2::detect().map(avx2_kernels)).as_ref().unwrap_or_else(portable)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            static AVX512: OnceLock<Option<Kernels>> = OnceLock::new();
            AVX512
                .get_or_init(|| super::x86_features::Avx512::detect().map(avx512_kernels))
                .as_ref()
                .unwrap_or_else(portable)
        }
        _ => portable(),
    }
}

fn scalar_kernels() -> Kernels {
    Kernels {
        affine: super::affine::SCALAR,
        four_bit: super::nf4::SCALAR,
        // The linear kernels have no scalar version of their own: the reference is the scalar path.
        linear: super::linear::PORTABLE,
    }
}

fn portable_kernels() -> Kernels {
    Kernels { affine: super::affine::PORTABLE, four_bit: super::nf4::PORTABLE, linear: super::linear::PORTABLE }
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernels(t: super::x86_features::Avx2) -> Kernels {
    Kernels {
        affine: super::affine_x86::avx2(t),
        four_bit: super::nf4_x86::avx2(t),
        linear: super::linear_x86::avx2(t),
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_kernels(t: super::x86_features::Avx512) -> Kernels {
    Kernels {
        affine: super::affine_x86::avx512(t),
        four_bit: super::nf4_x86::avx512(t),
        linear: super::linear_x86::avx512(t),
    }
}
