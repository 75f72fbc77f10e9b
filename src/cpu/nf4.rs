//! Fast NF4 / FP4 kernels: dispatch over instruction sets and threads, plus the portable `wide` versions.
//!
//! Work is split by whole blocks (threads take runs of whole blocks), and every kernel computes the same
//! per-element f32 arithmetic as [`crate::reference::nf4`]: the absmax is an exact max, the normalisation is
//! the same reciprocal and multiply, the code is the same "count of midpoints strictly below" (the SIMD paths
//! use a branchless binary search over the sorted midpoints, which counts the same), and dequantization is
//! the same single f32 multiply followed by round-to-nearest-even. So every path gives the same bytes and bits.
//!
//! The AVX2 / AVX-512 kernels live in `nf4_x86.rs` with the same names. NEON and wasm `simd128` use the
//! portable `wide` kernels.

use super::dispatch::{kernels, with_out_slice, FourBitKernels, OutSlice};
use crate::cpu::{Isa, KernelPath};
use crate::element::Element;
use crate::reference::nf4::{self as reference, Codebook};
use crate::DType;
use wide::f32x8;

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

// ---------------------------------------------------------------- portable kernels (wide)

/// Largest `|x|` as an f32 bit pattern (0 when empty). Non-negative floats order like their bits, so this is
/// the exact absmax for finite data, and any value `>= 0x7f80_0000` means a NaN or infinity was seen.
pub(crate) fn absbits_portable(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

/// Codes of one block (or a run of elements inside one block starting at an even offset): writes
/// `ceil(x.len() / 2)` bytes, padding an odd count with the code of 0.0.
pub(crate) fn quantize_run_portable(x: &[f32], absmax: f32, cb: &Codebook, out: &mut [u8]) {
    let inv = f32x8::splat(1.0f32 / absmax.max(reference::ABSMAX_FLOOR));
    let (neg, pos) = (f32x8::splat(-1.0), f32x8::splat(1.0));
    let one = f32x8::splat(1.0);
    let full = x.len() / 8 * 8;
    let (out_full, out_tail) = out.split_at_mut(full / 2);
    for (c, o) in x[..full].chunks_exact(8).zip(out_full.chunks_exact_mut(4)) {
        let xn = (f32x8::new(c.try_into().expect("chunk of 8")) * inv).fast_max(neg).fast_min(pos);
        let mut count = f32x8::splat(0.0);
        for &m in &cb.mids {
            count += xn.simd_gt(f32x8::splat(m)) & one;
        }
        let p = count.to_array();
        for (k, d) in o.iter_mut().enumerate() {
            *d = (cb.codes[p[2 * k] as usize] << 4) | cb.codes[p[2 * k + 1] as usize];
        }
    }
    quantize_run_scalar(&x[full..], absmax, cb, out_tail);
}

/// Scalar codes of a run (reference arithmetic), packed, odd count padded.
pub(crate) fn quantize_run_scalar(x: &[f32], absmax: f32, cb: &Codebook, out: &mut [u8]) {
    let pad = reference::pad_code(cb);
    for (c, d) in x.chunks(2).zip(out.iter_mut()) {
        let hi = reference::code_of(reference::normalise(c[0], absmax), cb);
        let lo = c.get(1).map_or(pad, |&v| reference::code_of(reference::normalise(v, absmax), cb));
        *d = (hi << 4) | lo;
    }
}

/// Dequantizes a run starting at an even element inside one block: `out.len()` values from `packed`.
pub(crate) fn dequantize_run_portable(packed: &[u8], absmax: f32, table: &[f32; 16], out: &mut [f32]) {
    let a = f32x8::splat(absmax);
    let full = out.len() / 8 * 8;
    let (out_full, out_tail) = out.split_at_mut(full);
    for (o, p) in out_full.chunks_exact_mut(8).zip(packed[..full / 2].chunks_exact(4)) {
        let v = f32x8::new(std::array::from_fn(|i| {
            let b = p[i / 2];
            table[if i.is_multiple_of(2) { (b >> 4) as usize } else { (b & 15) as usize }]
        }));
        o.copy_from_slice(&(v * a).to_array());
    }
    let p = &packed[full / 2..];
    for (i, d) in out_tail.iter_mut().enumerate() {
        *d = reference::dequantize_value(reference::code_at(p, i), absmax, table);
    }
}

// ---------------------------------------------------------------- tables and dispatch

/// The scalar reference kernels.
pub(crate) const SCALAR: FourBitKernels = FourBitKernels {
    absbits: absbits_portable,
    quantize: quantize_run_scalar,
    dequantize: |packed, absmax, bs, table, out, _stream| {
        with_out_slice!(out, |o| dequantize_span_scalar(packed, absmax, bs, table, o))
    },
};

/// The portable (`wide`) kernels.
pub(crate) const PORTABLE: FourBitKernels = FourBitKernels {
    absbits: absbits_portable,
    quantize: quantize_run_portable,
    dequantize: |packed, absmax, bs, table, out, _stream| {
        with_out_slice!(out, |o| dequantize_span_portable(packed, absmax, bs, table, o))
    },
};

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

/// The scalar reference span: one value at a time.
fn dequantize_span_scalar<T: Element>(packed: &[u8], absmax: &[f32], bs: usize, table: &[f32; 16], out: &mut [T]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::from_f32(reference::dequantize_value(reference::code_at(packed, i), absmax[i / bs], table));
    }
}

/// The portable span: a block at a time through f32 (rounded to `T` from a stack chunk).
fn dequantize_span_portable<T: Element>(packed: &[u8], absmax: &[f32], bs: usize, table: &[f32; 16], out: &mut [T]) {
    let mut buf = [0.0f32; 256];
    for ((o, p), &a) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).zip(absmax) {
        if let Some(of) = as_f32_mut(o) {
            dequantize_run_portable(p, a, table, of);
        } else {
            // Blocks of up to 4096 elements: 256 at a time (an even count, so chunks stay byte-aligned).
            for (oc, pc) in o.chunks_mut(256).zip(p.chunks(128)) {
                dequantize_run_portable(pc, a, table, &mut buf[..oc.len()]);
                T::narrow_slice(&buf[..oc.len()], oc);
            }
        }
    }
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

fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == DType::F32).then(|| bytemuck::cast_slice_mut(x))
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
    #[cfg(not(feature = "rayon"))]
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
