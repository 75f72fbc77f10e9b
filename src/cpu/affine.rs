//! The affine int8 driver: whole tensors split into runs, over threads, through the kernel table of the
//! chosen instruction set.
//!
//! A "run" is a contiguous slice sharing one scale and zero point (the whole tensor, a row, or a group).
//! The run kernels are in `affine_portable.rs` and `affine_x86.rs` (same names). Inputs in f16/bf16 are widened to f32
//! in small stack chunks first; outputs in f16/bf16 are produced in f32 chunks and then rounded, so every
//! path computes the same f32 arithmetic as [`crate::reference::affine`].

use super::dispatch::kernels;
use crate::cpu::{Isa, KernelPath};
use crate::element::Element;
use crate::format::affine::{AffineParams, AffineTensor, Granularity};
use crate::reference::affine as reference;
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements per stack chunk when converting between f32 and f16/bf16.
const CHUNK: usize = 1024;

fn minmax_run(isa: Isa, x: &[f32]) -> (f32, f32, bool) {
    (kernels(isa).affine.minmax)(x)
}

fn quantize_run(isa: Isa, x: &[f32], p: AffineParams, out: &mut [u8]) {
    (kernels(isa).affine.quantize)(x, p, out)
}

fn dequantize_run(isa: Isa, codes: &[u8], p: AffineParams, out: &mut [f32], stream: bool) {
    (kernels(isa).affine.dequantize)(codes, p, out, stream)
}

// ---------------------------------------------------------------- element-type adapters

/// Min, max and finiteness of any element type (widening in chunks). `None` for an empty slice.
fn minmax_elems<T: Element>(isa: Isa, x: &[T]) -> Option<(f32, f32, bool)> {
    if x.is_empty() {
        return None;
    }
    if let Some(xf) = as_f32(x) {
        return Some(minmax_run(isa, xf));
    }
    let mut buf = [0.0f32; CHUNK];
    let mut acc = (f32::INFINITY, f32::NEG_INFINITY, true);
    for c in x.chunks(CHUNK) {
        T::widen_slice(c, &mut buf[..c.len()]);
        let (l, h, f) = minmax_run(isa, &buf[..c.len()]);
        acc = (acc.0.min(l), acc.1.max(h), acc.2 & f);
    }
    Some(acc)
}

/// The parameters of a run from its min / max (empty: [`AffineParams::EMPTY`]); `finite` is cleared when the
/// run holds a non-finite element.
fn params_of<T: Element>(isa: Isa, x: &[T], finite: &AtomicBool) -> AffineParams {
    match minmax_elems(isa, x) {
        None => AffineParams::EMPTY,
        Some((l, h, f)) => {
            if !f {
                finite.store(false, Ordering::Relaxed);
                return AffineParams::EMPTY;
            }
            reference::params_from_range(l, h)
        }
    }
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

/// Parameters for every entry; identical to [`reference::calibrate`] for every path. `None` when `x` holds a
/// NaN or an infinity (found in the same pass as the min / max).
pub(crate) fn calibrate<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
    path: KernelPath,
) -> Option<Vec<AffineParams>> {
    let mut out = vec![AffineParams::EMPTY; g.num_params(rows, cols)];
    let finite = AtomicBool::new(true);
    match g {
        Granularity::PerTensor => out[0] = tensor_params(x, path, &finite),
        _ => {
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            if cols == 0 || per_row == 0 {
                return Some(out);
            }
            let row_job = |(row, params): (&[T], &mut [AffineParams])| {
                for (chunk, p) in row.chunks(gl).zip(params.iter_mut()) {
                    *p = params_of(path.isa, chunk, &finite);
                }
            };
            let rows_iter = x.chunks(cols).zip(out.chunks_mut(per_row));
            for_each_item(path, x.len(), rows_iter, row_job);
        }
    }
    finite.into_inner().then_some(out)
}

/// The per-tensor parameters of `x` (threaded min / max when large).
fn tensor_params<T: Element>(x: &[T], path: KernelPath, finite: &AtomicBool) -> AffineParams {
    let mm = if use_threads(path, x.len()) { par_minmax(path.isa, x) } else { minmax_elems(path.isa, x) };
    match mm {
        None => AffineParams::EMPTY,
        Some((_, _, false)) => {
            finite.store(false, Ordering::Relaxed);
            AffineParams::EMPTY
        }
        Some((l, h, true)) => reference::params_from_range(l, h),
    }
}

/// Calibrates and quantizes in one pass over the data where the granularity allows it: per channel and per
/// group, each run's min / max, parameters and codes are computed while the run is in cache (per tensor: the
/// min / max pass, then the codes). Fills `params` (one per entry) and `codes` (one per element); the same
/// values as [`calibrate`] then [`quantize`]. Returns false when `x` holds a NaN or an infinity (then both
/// outputs are unspecified). Scales are not validated here.
pub(crate) fn calibrate_quantize<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
    params: &mut [AffineParams],
    codes: &mut [u8],
    path: KernelPath,
) -> bool {
    let finite = AtomicBool::new(true);
    match g {
        Granularity::PerTensor => {
            params[0] = tensor_params(x, path, &finite);
            if !finite.load(Ordering::Relaxed) {
                return false;
            }
            quantize(x, rows, cols, g, params, codes, path, false);
        }
        _ => {
            if cols == 0 {
                return true;
            }
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            let job = |((row, out), ps): ((&[T], &mut [u8]), &mut [AffineParams])| {
                for ((c, o), p) in row.chunks(gl).zip(out.chunks_mut(gl)).zip(ps.iter_mut()) {
                    *p = params_of(path.isa, c, &finite);
                    quantize_elems(path.isa, c, *p, o);
                }
            };
            let it = x.chunks(cols).zip(codes.chunks_mut(cols)).zip(params.chunks_mut(per_row));
            for_each_item(path, x.len(), it, job);
        }
    }
    finite.into_inner()
}

/// Elements per piece that [`quantize`] checks and then quantizes when asked to: 16 KiB of f32, in L1.
const FINITE_PIECE: usize = 4096;

/// Codes for every element; identical to [`reference::quantize`] for every path. Runs over threads as the
/// granularity splits them, each run quantized elementwise. With `check` (an `x` not yet found finite), each
/// piece of [`FINITE_PIECE`] elements is checked for NaN and infinity just before it is quantized, while it is
/// in L1, so the check costs no second pass over memory; returns false when `x` holds a non-finite value (then
/// `codes` is partly written). Without `check`, `x` must be finite (the caller's min / max pass found it so)
/// and the result is true.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
    params: &[AffineParams],
    codes: &mut [u8],
    path: KernelPath,
    check: bool,
) -> bool {
    let _ = rows;
    let finite = AtomicBool::new(true);
    let run = |c: &[T], p: AffineParams, o: &mut [u8]| {
        if !check {
            return quantize_elems(path.isa, c, p, o);
        }
        for (c, o) in c.chunks(FINITE_PIECE).zip(o.chunks_mut(FINITE_PIECE)) {
            // Stop at the first non-finite piece (of this run, or of another thread's).
            if !finite.load(Ordering::Relaxed) || !minmax_elems(path.isa, c).is_none_or(|m| m.2) {
                return finite.store(false, Ordering::Relaxed);
            }
            quantize_elems(path.isa, c, p, o);
        }
    };
    match g {
        Granularity::PerTensor => {
            let job = |(c, o): (&[T], &mut [u8])| run(c, params[0], o);
            if use_threads(path, x.len()) {
                par_rows(x.chunks(PAR_CHUNK).zip(codes.chunks_mut(PAR_CHUNK)).collect(), job);
            } else {
                job((x, codes));
            }
        }
        _ => {
            if cols == 0 {
                return true;
            }
            let gl = g.group_len(cols);
            let per_row = g.num_params(1, cols);
            let job = |((row, out), ps): ((&[T], &mut [u8]), &[AffineParams])| {
                for ((c, o), p) in row.chunks(gl).zip(out.chunks_mut(gl)).zip(ps) {
                    run(c, *p, o);
                }
            };
            let it = x.chunks(cols).zip(codes.chunks_mut(cols)).zip(params.chunks(per_row));
            for_each_item(path, x.len(), it, job);
        }
    }
    finite.into_inner()
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
            if let (true, 0, Some(of)) = (stream, cols % gl, as_f32_mut(out)) {
                // Equal runs into f32: spans of whole rows, each streamed with one fence at its end.
                let rows_per_span = (PAR_CHUNK / cols).max(1);
                let span = rows_per_span * cols;
                let runs = kernels(path.isa).affine.dequantize_runs;
                let job = |(k, (c, o)): (usize, (&[u8], &mut [f32]))| {
                    let entries = k * rows_per_span * per_row..(k * rows_per_span + c.len() / cols) * per_row;
                    runs(c, &t.scales[entries.clone()], &t.zero_points[entries], gl, o, true)
                };
                let it = codes.chunks(span).zip(of.chunks_mut(span)).enumerate();
                for_each_item(path, codes.len(), it, job);
                return;
            }
            let job = |(r, (c, o)): (usize, (&[u8], &mut [T]))| {
                let entries = r * per_row..(r + 1) * per_row;
                let params = t.scales[entries.clone()].iter().zip(&t.zero_points[entries]);
                for ((cc, oo), (&scale, &zero_point)) in c.chunks(gl).zip(o.chunks_mut(gl)).zip(params) {
                    dequantize_elems(path.isa, cc, AffineParams { scale, zero_point }, oo, stream);
                }
            };
            let it = codes.chunks(cols).zip(out.chunks_mut(cols)).enumerate();
            for_each_item(path, codes.len(), it, job);
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

/// Runs `job` over every item of `items`: through [`par_rows`] when a tensor of `n` elements is worth threads
/// on `path`, else in order on this thread.
fn for_each_item<I: Send, F: Fn(I) + Sync + Send>(path: KernelPath, n: usize, items: impl Iterator<Item = I>, job: F) {
    if use_threads(path, n) {
        par_rows(items.collect(), job);
    } else {
        items.for_each(job);
    }
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

/// Parallel min/max (and finiteness) over fixed-size chunks; min and max are exact, so the split does not
/// change the result.
fn par_minmax<T: Element>(isa: Isa, x: &[T]) -> Option<(f32, f32, bool)> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        x.par_chunks(PAR_CHUNK).map(|c| minmax_elems(isa, c)).reduce(
            || None,
            |a, b| match (a, b) {
                (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1), a.2 & b.2)),
                (a, None) => a,
                (None, b) => b,
            },
        )
    }
    #[cfg(not(feature = "rayon"))]
    minmax_elems(isa, x)
}
