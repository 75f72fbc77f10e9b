//! Backward of the fused linear layer on the CPU: `dx = dy·W + Σ s·(dy·B)·A` without building `W`, and the
//! LoRA gradients `dA = s·(dy·B)ᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)`.
//!
//! `dx` is split over threads by fixed chunks of [`BACKWARD_COLS`] input features: a task decodes its columns
//! of `W` tile by tile ([`BACKWARD_ROWS`] rows of `W` at a time, bit-identical to the reference dequantization,
//! the same decoder as the forward) and adds `dy[:, o]·W[o, chunk]` into every row of its `[M, chunk]`
//! accumulator, `o` ascending (the kernel is in `linear_backward_kernels.rs`). `dA` is split by its rows, `dB` by blocks of its rows. Every element is
//! computed whole by one task in a fixed order, so results never depend on the thread count.

use super::dispatch::kernels;
use super::linear_backward_kernels::BACKWARD_COLS;
use super::table::Job;
use crate::api::linear::AdapterGrad;
use crate::cpu::KernelPath;
use crate::format::layer::{AdapterSelection, LayerView, QuantWeight};

/// Multiply-adds below which a backward runs on the calling thread (see `linear.rs`'s forward line).
const PARALLEL_MIN_MACS: usize = 4 << 20;

/// Scratch a backward reuses across calls: `t = x·Aᵀ` and `u = dy·B` per adapter, and the chunk-major
/// accumulator of `dx`.
#[derive(Debug, Default)]
pub(crate) struct BackwardScratch {
    t: Vec<Vec<f32>>,
    u: Vec<Vec<f32>>,
    used: Vec<bool>,
    acc: Vec<f32>,
}

/// The fused backward: `dx` (overwritten, when given) and, for every adapter some row uses, `dA` and `dB`
/// added into `grads[a]`. Inputs are validated by the caller (`x`: `[m, in]`, `dy`: `[m, out]`, `dx`:
/// `[m, in]`, `grads` sized for every adapter). Allocates only when `scratch` must grow (plus one row-sized
/// buffer per `dA`/`dB` task).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_into(
    layer: LayerView<'_>,
    x: &[f32],
    dy: &[f32],
    m: usize,
    sel: AdapterSelection<'_>,
    path: KernelPath,
    dx: Option<&mut [f32]>,
    grads: &mut [AdapterGrad],
    scratch: &mut BackwardScratch,
) {
    let (n_out, n_in) = (layer.out_features, layer.in_features);
    if m == 0 {
        return;
    }
    let table = &kernels(path.isa).linear;
    let parallel = path.parallel && worth_threads(m, n_out, n_in);
    let BackwardScratch { t, u, used, acc } = scratch;
    used.clear();
    used.extend((0..layer.adapters.len()).map(|a| (0..m).any(|r| layer.uses(sel, r, a))));
    if t.len() < layer.adapters.len() {
        t.resize_with(layer.adapters.len(), Vec::new);
        u.resize_with(layer.adapters.len(), Vec::new);
    }
    // t = x·Aᵀ and u = dy·B for the rows that use each adapter (zero elsewhere), one row per task.
    for (a, ad) in layer.adapters.iter().enumerate() {
        if !used[a] {
            continue;
        }
        let rank = ad.rank();
        let (ta, ua) = (&mut t[a], &mut u[a]);
        ta.clear();
        ta.resize(m * rank, 0.0);
        ua.clear();
        ua.resize(m * rank, 0.0);
        let par = parallel && m > 1;
        par_chunks(par, ta, rank, |r, tr| {
            if layer.uses(sel, r, a) {
                // The forward's shrink kernel, so t has the forward's bits.
                (table.dots)(&x[r * n_in..(r + 1) * n_in], ad.a(), tr);
            }
        });
        par_chunks(par, ua, rank, |r, ur| {
            if layer.uses(sel, r, a) {
                for (o, &d) in dy[r * n_out..(r + 1) * n_out].iter().enumerate() {
                    for (uk, &b) in ur.iter_mut().zip(&ad.b()[o * rank..(o + 1) * rank]) {
                        *uk += d * b;
                    }
                }
            }
        });
    }
    let (t, u, used) = (&t[..], &u[..], &used[..]);
    if let Some(dx) = dx {
        let pairs = match layer.weight {
            QuantWeight::FourBit(w) => super::linear::pair_table(w.table()),
            QuantWeight::Int8(_) => [[0.0; 2]; 256],
        };
        let job =
            Job { layer, x, m, pairs: &pairs, shrink: &[], used: &[], sel, act8: None, x_packed: &[], deferred: None };
        // Chunk-major accumulator: chunk c (columns k0..k0+kb) is `[m, kb]` at offset k0·m.
        acc.clear();
        acc.resize(m * n_in, 0.0);
        let run = |c: usize, out: &mut [f32]| {
            let k0 = c * BACKWARD_COLS;
            let kb = out.len() / m;
            (table.backward_cols)(&job, dy, k0, out);
            lora_dx(layer, sel, u, used, m, k0, kb, out);
        };
        par_chunks(parallel, acc, m * BACKWARD_COLS, run);
        for (c, part) in acc.chunks(m * BACKWARD_COLS).enumerate() {
            let (k0, kb) = (c * BACKWARD_COLS, part.len() / m);
            for r in 0..m {
                dx[r * n_in + k0..r * n_in + k0 + kb].copy_from_slice(&part[r * kb..(r + 1) * kb]);
            }
        }
    }
    for (a, ad) in layer.adapters.iter().enumerate() {
        if !used[a] {
            continue;
        }
        let (rank, s) = (ad.rank(), ad.scaling());
        let rows: Vec<usize> = (0..m).filter(|&r| layer.uses(sel, r, a)).collect();
        let (ta, ua) = (&t[a], &u[a]);
        let g = &mut grads[a];
        // dA[k, :] += s·Σ_r u[r, k]·x[r, :], r ascending.
        par_chunks(parallel, &mut g.a, n_in, |k, da| {
            let mut row = vec![0.0f32; n_in];
            for &r in &rows {
                let c = ua[r * rank + k];
                for (v, &xv) in row.iter_mut().zip(&x[r * n_in..(r + 1) * n_in]) {
                    *v += c * xv;
                }
            }
            for (d, v) in da.iter_mut().zip(&row) {
                *d += s * v;
            }
        });
        // dB[o, :] += s·Σ_r dy[r, o]·t[r, :], r ascending; 64 rows of dB per task.
        par_chunks(parallel, &mut g.b, 64 * rank, |blk, db| {
            let mut sum = vec![0.0f32; rank];
            for (j, dbo) in db.chunks_exact_mut(rank).enumerate() {
                let o = blk * 64 + j;
                sum.fill(0.0);
                for &r in &rows {
                    let d = dy[r * n_out + o];
                    for (v, &tv) in sum.iter_mut().zip(&ta[r * rank..(r + 1) * rank]) {
                        *v += d * tv;
                    }
                }
                for (dst, v) in dbo.iter_mut().zip(&sum) {
                    *dst += s * v;
                }
            }
        });
    }
}

/// Adds `s·Σ_k u[r, k]·A[k, k0..k0+kb]` (k ascending, then scaled) into `out` (`[m, kb]`) for every adapter
/// each row uses.
#[allow(clippy::too_many_arguments)]
fn lora_dx(
    layer: LayerView<'_>,
    sel: AdapterSelection<'_>,
    u: &[Vec<f32>],
    used: &[bool],
    m: usize,
    k0: usize,
    kb: usize,
    out: &mut [f32],
) {
    let n_in = layer.in_features;
    let mut v = [0.0f32; BACKWARD_COLS];
    for (a, ad) in layer.adapters.iter().enumerate() {
        if !used[a] {
            continue;
        }
        let (rank, s) = (ad.rank(), ad.scaling());
        for r in (0..m).filter(|&r| layer.uses(sel, r, a)) {
            let v = &mut v[..kb];
            v.fill(0.0);
            for k in 0..rank {
                let c = u[a][r * rank + k];
                for (vi, &ai) in v.iter_mut().zip(&ad.a()[k * n_in + k0..k * n_in + k0 + kb]) {
                    *vi += c * ai;
                }
            }
            for (o, &vi) in out[r * kb..(r + 1) * kb].iter_mut().zip(v.iter()) {
                *o += s * vi;
            }
        }
    }
}

/// Whether splitting pays: the base `dx` product is `m·out·in` multiply-adds.
fn worth_threads(m: usize, n_out: usize, n_in: usize) -> bool {
    #[cfg(feature = "rayon")]
    if rayon::current_thread_index().is_some() {
        return true;
    }
    m.saturating_mul(n_out).saturating_mul(n_in) >= PARALLEL_MIN_MACS
}

/// `f(i, chunk_i)` for consecutive chunks of `chunk` items, over the rayon pool when `parallel` (and the
/// feature is on).
fn par_chunks(parallel: bool, items: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    #[cfg(feature = "rayon")]
    if parallel {
        use rayon::prelude::*;
        items.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let _ = parallel;
    items.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}
