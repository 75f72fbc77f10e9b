//! The NF4 / FP4 driver: spans of whole blocks over threads, through the kernel table of the chosen
//! instruction set.
//!
//! Work is split by whole blocks (threads take runs of whole blocks), and every kernel computes the same
//! per-element f32 arithmetic as [`crate::reference::nf4`]: the absmax is an exact max, the normalisation is
//! the same reciprocal and multiply, the code is the same "count of midpoints strictly below" (the SIMD paths
//! use a branchless binary search over the sorted midpoints, which counts the same), and dequantization is
//! the same single f32 multiply followed by round-to-nearest-even. So every path gives the same bytes and bits.
//!
//! The kernels live in `nf4_portable.rs` (`wide`: SSE2, NEON, wasm `simd128`) and `nf4_x86.rs` (AVX2 /
//! AVX-512) with the same names.

use super::dispatch::kernels;
use super::table::OutSlice;
use crate::cpu::{Isa, KernelPath};
use crate::element::Element;
use crate::reference::nf4::{self as reference, Codebook};
use crate::DType;

/// Elements per thread task (rounded up to whole blocks).
const PAR_TASK: usize = 1 << 16;

/// f32 outputs at least this large are written with non-temporal stores (bigger than a typical L3 slice, so
/// caching them would only evict the input).
pub(crate) const STREAM_MIN_BYTES: usize = 32 << 20;

// ---------------------------------------------------------------- finite check

/// Index and value of the first NaN/infinite element, scanning in chunks whose exponent test vectorises.
pub(crate) fn first_non_finite<T: Element>(x: &[T]) -> Option<(usize, f32)> {
    const C: usize = 256;
    let bad_chunk = |start: usize, len: usize| -> bool {
        match T::DTYPE {
            DType::F32 => {
                let b: &[u32] = bytemuck::cast_slice(&x[start..start + len]);
                b.iter().fold(0u32, |acc, &v| acc | ((v & 0x7f80_0000 == 0x7f80_0000) as u32)) != 0
            }
            DType::F16 => {
                let b: &[u16] = bytemuck::cast_slice(&x[start..start + len]);
                b.iter().fold(0u16, |acc, &v| acc | ((v & 0x7c00 == 0x7c00) as u16)) != 0
            }
            DType::BF16 => {
                let b: &[u16] = bytemuck::cast_slice(&x[start..start + len]);
                b.iter().fold(0u16, |acc, &v| acc | ((v & 0x7f80 == 0x7f80) as u16)) != 0
            }
        }
    };
    let mut start = 0;
    while start < x.len() {
        let len = C.min(x.len() - start);
        if bad_chunk(start, len) {
            let i = start + x[start..start + len].iter().position(|v| !v.to_f32().is_finite())?;
            return Some((i, x[i].to_f32()));
        }
        start += len;
    }
    None
}

fn absbits_run(isa: Isa, x: &[f32]) -> u32 {
    (kernels(isa).four_bit.absbits)(x)
}

fn quantize_run(isa: Isa, x: &[f32], absmax: f32, cb: &Codebook, out: &mut [u8]) {
    (kernels(isa).four_bit.quantize)(x, absmax, cb, out)
}

/// Quantizes a span of whole blocks (the last possibly partial) into `packed` / `absmax`. Stops with `Err` at
/// the first block holding a NaN or infinity (the absmax pass sees it for free).
fn quantize_span<T: Element>(
    isa: Isa,
    x: &[T],
    bs: usize,
    cb: &Codebook,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), ()> {
    let mut buf = vec![0.0f32; if T::DTYPE == DType::F32 { 0 } else { bs }];
    for ((blk, out), a) in x.chunks(bs).zip(packed.chunks_mut(bs / 2)).zip(absmax.iter_mut()) {
        let xf: &[f32] = if let Some(xf) = as_f32(blk) {
            xf
        } else {
            T::widen_slice(blk, &mut buf[..blk.len()]);
            &buf[..blk.len()]
        };
        let bits = absbits_run(isa, xf);
        if bits >= 0x7f80_0000 {
            return Err(());
        }
        *a = f32::from_bits(bits);
        quantize_run(isa, xf, *a, cb, out);
    }
    Ok(())
}

/// Quantizes `x` in blocks; returns `(packed, absmax)` identical to [`reference::quantize`], or the index and
/// value of the first NaN/infinite element.
pub(crate) fn quantize<T: Element>(
    x: &[T],
    bs: usize,
    table: &[f32; 16],
    path: KernelPath,
) -> Result<(Vec<u8>, Vec<f32>), (usize, f32)> {
    let cb = reference::codebook(table);
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let mut absmax = vec![0.0f32; x.len().div_ceil(bs)];
    let ok = if use_threads(path, x.len()) {
        let task = PAR_TASK.div_ceil(bs) * bs;
        let items: Vec<_> = x.chunks(task).zip(packed.chunks_mut(task / 2)).zip(absmax.chunks_mut(task / bs)).collect();
        par_all(items, |((xc, pc), ac)| quantize_span(path.isa, xc, bs, &cb, pc, ac).is_ok())
    } else {
        quantize_span(path.isa, x, bs, &cb, &mut packed, &mut absmax).is_ok()
    };
    if ok {
        Ok((packed, absmax))
    } else {
        Err(first_non_finite(x).unwrap_or((0, f32::NAN)))
    }
}

/// Dequantizes a span that starts at a block boundary: `out.len()` elements.
fn dequantize_span<T: Element>(
    isa: Isa,
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    table: &[f32; 16],
    out: &mut [T],
    stream: bool,
) {
    (kernels(isa).four_bit.dequantize)(packed, absmax, bs, table, OutSlice::of(out), stream)
}

/// Dequantizes into `out` (`out.len()` elements); identical bits to [`reference::dequantize_to`].
pub(crate) fn dequantize<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    table: &[f32; 16],
    out: &mut [T],
    path: KernelPath,
) {
    let stream = T::DTYPE == DType::F32 && std::mem::size_of_val(out) >= STREAM_MIN_BYTES;
    if use_threads(path, out.len()) {
        let task = PAR_TASK.div_ceil(bs) * bs;
        let items: Vec<_> = out.chunks_mut(task).zip(packed.chunks(task / 2)).zip(absmax.chunks(task / bs)).collect();
        par_items(items, |((o, p), a)| dequantize_span(path.isa, p, a, bs, table, o, stream));
    } else {
        dequantize_span(path.isa, packed, absmax, bs, table, out, stream);
    }
}

fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    (T::DTYPE == DType::F32).then(|| bytemuck::cast_slice(x))
}

// ---------------------------------------------------------------- threading helpers

fn use_threads(path: KernelPath, n: usize) -> bool {
    cfg!(feature = "rayon") && path.parallel && n >= super::PARALLEL_MIN_ELEMS
}

/// Runs `job` over every item (in parallel with `rayon`) and reports whether every call returned `true`.
fn par_all<I: Send, F: Fn(I) -> bool + Sync + Send>(items: Vec<I>, job: F) -> bool {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        items.into_par_iter().with_min_len(1).map(job).reduce(|| true, |a, b| a && b)
    }
    // Every job runs (`all` would stop at the first `false`).
    #[cfg(not(feature = "rayon"))]
    #[allow(clippy::unnecessary_fold)]
    items.into_iter().map(job).fold(true, |a, b| a && b)
}

/// Runs `job` over every item, in parallel when the `rayon` feature is on. Items own disjoint output and
/// whole blocks, so the result does not depend on the number of threads.
fn par_items<I: Send, F: Fn(I) + Sync + Send>(items: Vec<I>, job: F) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        items.into_par_iter().with_min_len(1).for_each(job);
    }
    #[cfg(not(feature = "rayon"))]
    items.into_iter().for_each(job);
}
