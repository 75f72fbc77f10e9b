//! AVX2 / AVX-512 versions of the ggml block decoders (same names as `ggml_portable.rs`): the portable
//! decoders, inlined into entry points compiled with each instruction set's features, so the compiler
//! vectorises them 8 or 16 lanes wide. Same f32 operations in the same order, hence the same bits; no explicit
//! intrinsics (the F16 widening is the reference's integer one, which keeps signalling NaNs as gguf-py does).
//!
//! Reached only through the kernel tables, which need a detection token.

use super::ggml_portable::dequantize_blocks;
use super::table::GgmlKernels;
use super::x86_features::{avx2_fn, avx512_fn, Avx2, Avx512};
use crate::format::ggml::GgmlType;

avx2_fn! {
    /// [`dequantize_blocks`] compiled for AVX2 + FMA + F16C (FMA is never contracted into: Rust does not fuse
    /// `a * b + c`).
    unsafe fn dequantize_256(ty: GgmlType, data: &[u8], out: &mut [f32]) {
        dequantize_blocks(ty, data, out)
    }
}

avx512_fn! {
    /// [`dequantize_blocks`] compiled for AVX-512 F/BW/VL/DQ.
    unsafe fn dequantize_512(ty: GgmlType, data: &[u8], out: &mut [f32]) {
        dequantize_blocks(ty, data, out)
    }
}

/// The AVX2 kernels (the token proves detection).
pub(crate) fn avx2(_: Avx2) -> GgmlKernels {
    GgmlKernels {
        // SAFETY: this table is built only from an `Avx2` token (its features were detected); the kernel is
        // safe code (bounds-checked slices) apart from its target features.
        dequantize: |ty, data, out| unsafe { dequantize_256(ty, data, out) },
    }
}

/// The AVX-512 kernels (the token proves detection).
pub(crate) fn avx512(_: Avx512) -> GgmlKernels {
    GgmlKernels {
        // SAFETY: this table is built only from an `Avx512` token (its features were detected); the kernel is
        // safe code (bounds-checked slices) apart from its target features.
        dequantize: |ty, data, out| unsafe { dequantize_512(ty, data, out) },
    }
}
