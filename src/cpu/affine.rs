//! Fast affine int8 kernels: dispatch over instruction sets and threads, plus the portable `wide` versions.
//!
//! A "run" is a contiguous slice sharing one scale and zero point (the whole tensor, a row, or a group).
//! Run kernels for each ISA have the same names in `affine_x86.rs`. Inputs in f16/bf16 are widened to f32
//! in small stack chunks first; outputs in f16/bf16 are produced in f32 chunks and then rounded, so every
//! path computes the same f32 arithmetic as [`crate::reference::affine`].

use super::dispatch::{kernels, AffineKernels};
use crate::affine::{AffineParams, AffineTensor, Granularity};
use crate::cpu::{Isa, KernelPath};
use crate::element::Element;
use crate::reference::affine as reference;
use wide::f32x8;

/// Elements per stack chunk when converting between f32 and f16/bf16.
const CHUNK: usize = 1024;

// ---------------------------------------------------------------- portable run kernels (wide)

/// Min and max of a non-empty f32 slice.
pub(crate) fn minmax_portable(x: &[f32]) -> (f32, f32) {
    let mut lo = f32x8::splat(f32::INFINITY);
    let mut hi = f32x8::splat(f32::NEG_INFINITY);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        let v = f32x8::new(c.try_into().expect("chunk of 8"));
        lo = lo.fast_min(v);
        hi = hi.fast_max(v);
    }
    let mut l = lo.to_array().into_iter().fold(f32::INFINITY, f32::min);
    let mut h = hi.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        l = l.min(v);
        h = h.max(v);
    }
    (l, h)
}

pub(crate) fn quantize_run_portable(x: &[f32], p: AffineParams, out: &mut [u8]) {
    let inv = f32x8::splat(1.0f32 / p.scale);
    let zp = f32x8::splat(p.zero_point as f32);
    let (lo, hi) = (f32x8::splat(0.0), f32x8::splat(255.0));
    // Round half to even without an instruction for it: for |v| <= 2^22, (v + 1.5·2^23) - 1.5·2^23 rounds v
    // to an integer in the current (nearest-even) mode. Larger |v| saturate to 0 or 255 either way.
    let (limit, magic) = (f32x8::splat(4_194_304.0), f32x8::splat(12_582_912.0));
    let mut xs = x.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for (c, o) in (&mut xs).zip(&mut os) {
        let v = f32x8::new(c.try_into().expect("chunk of 8"));
        let r = ((v * inv).fast_max(-limit).fast_min(limit) + magic) - magic;
        // r is an integer; adding zp in f32 is exact, then the clamp saturates like the reference.
        let q = (r + zp).fast_max(lo).fast_min(hi).to_array();
        for (d, s) in o.iter_mut().zip(q) {
            *d = s as u8;
        }
    }
    for (d, &s) in os.into_remainder().iter_mut().zip(xs.remainder()) {
        *d = reference::quantize_value(s, p);
    }
}

pub(crate) fn dequantize_run_portable(codes: &[u8], p: AffineParams, out: &mut [f32]) {
    let scale = f32x8::splat(p.scale);
    let zp = f32x8::splat(p.zero_point as f32);
    let mut cs = codes.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for (c, o) in (&mut cs).zip(&mut os) {
        let q = f32x8::new(std::array::from_fn(|i| c[i] as f32));
        // (q - zp) is an exact small integer, so this is the reference's single rounding.
        o.copy_from_slice(&((q - zp) * scale).to_array());
    }
    for (d, &s) in os.into_remainder().iter_mut().zip(cs.remainder()) {
        *d = reference::dequantize_value(s, p);
    }
}

// ---------------------------------------------------------------- tables and dispatch of run kernels

/// The scalar reference run kernels.
pub(crate) const SCALAR: AffineKernels = AffineKernels {
    minmax: |x| x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v))),
    quantize: |x, p, out| {
        for (d, &s) in out.iter_mut().zip(x) {
            *d = reference::quantize_value(s, p);
        }
    },
    dequantize: |codes, p, out, _stream| {
        for (d, &s) in out.iter_mut().zip(codes) {
            *d = reference::dequantize_value(s, p);
        }
    },
};

/// The portable (`wide`) run kernels.
pub(crate) const PORTABLE: AffineKernels = AffineKernels {
    minmax: minmax_portable,
    quantize: quantize_run_portable,
    dequantize: |codes, p, out, _stream| dequantize_run_portable(codes, p, out),
};

fn minmax_run(isa: Isa, x: &[f32]) -> (f32, f32) {
    (kernels(isa).affine.minmax)(x)
}

fn quantize_run(isa: Isa, x: &[f32], p: AffineParams, out: &mut [u8]) {
    (kernels(isa).affine.quantize)(x, p, out)
}

fn dequantize_run(isa: Isa, codes: &[u8], p: AffineParams, out: &mut [f32], stream: bool) {
    (kernels(isa).affine.dequantize)(codes, p, out, stream)
}

// ---------------------------------------------------------------- element-type adapters

/// Min/max of any element type (widening in chunks). `None` for an empty slice.
fn minmax_elems<T: Element>(isa: Isa, x: &[T]) -> Option<(f32, f32)> {
    if x.is_empty() {
        return None;
    }
    if let Some(xf) = as_f32(x) {
        return Some(minmax_run(isa, xf));
    }
    let mut buf = [0.0f32; CHUNK];
    let mut acc = (f32::INFINITY, f32::NEG_INFINITY);
    for c in x.chunks(CHUNK) {
        T::widen_slice(c, &mut buf[..c.len()]);
        let (l, h) = minmax_run(isa, &buf[..c.len()]);
        acc = (acc.0.min(l), acc.1.max(h));
    }
    Some(acc)
}

fn quantize_elems<T: Element>(isa: Isa, x: &[T], p: AffineParams, out: &mut [u8]) {
    if let Some(xf) = as_f32(x) {
        return quantize_run(isa, xf, p, out);
    }
    let mut buf = [0.0f32; CHUNK];
    for (c, o) in x.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        T::widen_slice(c, &mut buf[..c.len()]);
        quantize_run(isa, &buf[..c.len()], p, o);
    }
}

fn dequantize_elems<T: Element>(isa: Isa, codes: &[u8], p: AffineParams, out: &mut [T], stream: bool) {
    if let Some(of) = as_f32_mut(out) {
        return dequantize_run(isa, codes, p, of, stream);
    }
    let mut buf = [0.0f32; CHUNK];
    for (c, o) in codes.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        dequantize_run(isa, c, p, &mut buf[..c.len()], false);
        T::narrow_slice(&buf[..c.len()], o);
    }
}

fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    (T::DTYPE == crate::DType::F32).then(|| bytemuck::cast_slice(x))
}

fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == crate::DType::F32).then(|| bytemuck::cast_slice_mut(x))
}

// ---------------------------------------------------------------- whole-tensor drivers

/// Parameters for every entry; identical to [`reference::calibrate`] for every path.
pub(crate) fn calibrate<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
    path: KernelPath,
) -> Vec<AffineParams> {
    let from = |r: Option<(f32, f32)>| r.map_or(AffineParams::EMPTY, |(l, h)| reference::params_from_range(l, h));
    match g {
        Granularity::PerTensor => {
            let mm = if use_threads(path, x.len()) { par_minmax(path.isa, x) } else { minmax_elems(path.isa, x) };
            vec![from(mm)]
        }
        _ => {
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            let mut out = vec![AffineParams::EMPTY; g.num_params(rows, cols)];
            let row_job = |(row, params): (&[T], &mut [AffineParams])| {
                for (chunk, p) in row.chunks(gl).zip(params.iter_mut()) {
                    *p = from(minmax_elems(path.isa, chunk));
                }
            };
            if cols == 0 || per_row == 0 {
                return out;
            }
            let rows_iter = x.chunks(cols).zip(out.chunks_mut(per_row));
            if use_threads(path, x.len()) {
                par_rows(rows_iter.collect(), row_job);
            } else {
                rows_iter.for_each(row_job);
            }
            out
        }
    }
}

/// Codes for every element; identical to [`reference::quantize`] for every path.
pub(crate) fn quantize<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
    params: &[AffineParams],
    codes: &mut [u8],
    path: KernelPath,
) {
    let _ = rows;
    match g {
        Granularity::PerTensor => {
            let job = |(c, o): (&[T], &mut [u8])| quantize_elems(path.isa, c, params[0], o);
            if use_threads(path, x.len()) {
                par_rows(x.chunks(PAR_CHUNK).zip(codes.chunks_mut(PAR_CHUNK)).collect(), job);
            } else {
                job((x, codes));
            }
        }
        _ => {
            if cols == 0 {
                return;
            }
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            let job = |((row, out), ps): ((&[T], &mut [u8]), &[AffineParams])| {
                for ((c, o), p) in row.chunks(gl).zip(out.chunks_mut(gl)).zip(ps) {
                    quantize_elems(path.isa, c, *p, o);
                }
            };
            let it = x.chunks(cols).zip(codes.chunks_mut(cols)).zip(params.chunks(per_row));
            if use_threads(path, x.len()) {
                par_rows(it.collect(), job);
            } else {
                it.for_each(job);
            }
        }
    }
}

/// Dequantized values; identical bits to [`reference::dequantize`] for every path.
pub(crate) fn dequantize<T: Element>(t: &AffineTensor, out: &mut [T], path: KernelPath) {
    let (_, cols) = t.matrix_dims();
    let codes = &t.codes[..];
    let stream = codes.len() * 4 >= STREAM_MIN_BYTES;
    match t.granularity {
        Granularity::PerTensor => {
            let p = t.params(0);
            let job = |(c, o): (&[u8], &mut [T])| dequantize_elems(path.isa, c, p, o, stream);
            if use_threads(path, codes.len()) {
                par_rows(codes.chunks(PAR_CHUNK).zip(out.chunks_mut(PAR_CHUNK)).collect(), job);
            } else {
                job((codes, out));
            }
        }
        g => {
            if cols == 0 {
                return;
            }
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            let job = |(r, (c, o)): (usize, (&[u8], &mut [T]))| {
                let entries = r * per_row..(r + 1) * per_row;
                let params = t.scales[entries.clone()].iter().zip(&t.zero_points[entries]);
                for ((cc, oo), (&scale, &zero_point)) in c.chunks(gl).zip(o.chunks_mut(gl)).zip(params) {
                    dequantize_elems(path.isa, cc, AffineParams { scale, zero_point }, oo, stream);
                }
            };
            let it = codes.chunks(cols).zip(out.chunks_mut(cols)).enumerate();
            if use_threads(path, codes.len()) {
                par_rows(it.collect(), job);
            } else {
                it.for_each(job);
            }
        }
    }
}

// ---------------------------------------------------------------- threading helpers

/// Outputs at least this large (bytes) are far past the last-level cache: streaming stores pay off.
const STREAM_MIN_BYTES: usize = 48 << 20;

/// Elements per task when a single run (per-tensor granularity) is split across threads.
const PAR_CHUNK: usize = 1 << 16;

fn use_threads(path: KernelPath, n: usize) -> bool {
    cfg!(feature = "rayon") && path.parallel && n >= super::PARALLEL_MIN_ELEMS
}

/// Runs `job` over every item, in parallel when the `rayon` feature is on. Each item owns disjoint output,
/// so the result does not depend on the number of threads.
fn par_rows<I: Send, F: Fn(I) + Sync + Send>(items: Vec<I>, job: F) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        items.into_par_iter().with_min_len(1).for_each(job);
    }
    #[cfg(not(feature = "rayon"))]
    items.into_iter().for_each(job);
}

/// Parallel min/max over fixed-size chunks; min and max are exact, so the split does not change the result.
fn par_minmax<T: Element>(isa: Isa, x: &[T]) -> Option<(f32, f32)> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        x.par_chunks(PAR_CHUNK).map(|c| minmax_elems(isa, c)).reduce(
            || None,
            |a, b| match (a, b) {
                (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
                (a, None) => a,
                (None, b) => b,
            },
        )
    }
    #[cfg(not(feature = "rayon"))]
    minmax_elems(isa, x)
}
