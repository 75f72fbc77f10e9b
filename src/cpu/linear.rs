//! Fused dequantize-matmul-plus-LoRA on the CPU.
//!
//! Work is split by output features into fixed blocks of [`out_block`] rows of `W` (one rayon task each, the
//! size a function of the layer's shape only), so results never depend on the thread count. Inside a block
//! the loop runs over chunks of [`KC`] input features: each `[TILE_ROWS × KC]` tile of `W` is decoded once
//! into L1-resident scratch (values bit-identical to the reference dequantization) and multiplied against
//! every row of `x` by a register-blocked micro-kernel (`MR` rows of `x` × `NR` rows of `W`, one SIMD
//! accumulator each). At M = 1 this streams the packed weight once (a GEMV); at larger M the same decoded tile
//! is reused by all M rows (a GEMM). The LoRA shrink `t = x·Aᵀ` is computed once per row before the pass;
//! bias and the expand `s·t·Bᵀ` are added in the same output pass.
//!
//! This file is the driver (scratch, the LoRA shrink, blocks over threads, the output conversion); the kernel
//! bodies are in `linear_kernels.rs` (generic over a small vector trait, instantiated portable with
//! `wide::f32x8`) and `linear_x86.rs` (AVX2 / AVX-512 with register-table 4-bit decode).

use super::dispatch::kernels;
use super::pool_split::{for_each_chunk, for_each_chunk_zip};
use super::table::{Job, LinearKernels};
use crate::api::linear::{all_finite, Activations, ForwardOptions};
use crate::cpu::KernelPath;
use crate::element::Element;
use crate::format::layer::{AdapterSelection, LayerView, QuantWeight};
use std::sync::atomic::{AtomicBool, Ordering};

/// Output features per task where [`rows_per_thread`] does not apply: a function of `n_out` only. 64 rows,
/// or 32 below 3072 outputs: SmolLM2's 576-row layers in blocks of 64 are 9 tasks, and a 5 : 4 split left the
/// second thread idle long enough to fall asleep (NF4, M = 8, 576×1536, one / two threads, inside the pool:
/// 0.219 / 0.179 ms in blocks of 64, 0.219 / 0.149 in blocks of 32). Large layers keep 64 (4096×14336 with
/// int8 activations, M = 1, two threads: 0.61 ms in blocks of 64, 0.71 in blocks of 32).
fn out_block(n_out: usize) -> usize {
    if n_out >= 3072 {
        64
    } else {
        32
    }
}

/// Output rows per block at `m` ≤ 4 (the kernels make one pass over the weight) where one block per thread
/// was measured to pay: int8 activations over the interleaved layout, where each thread then makes one kernel
/// call with four groups' accumulator chains in flight (32-row blocks gave small layers two chains and a call
/// per 32 rows: NF4+DQ M = 1 from L3, 1 / 2 threads, 576×576 7.8 → 6.8 / 5.4 → 5.05 µs, 1536×576 20.8 → 17.2 /
/// 11.9 → 10.4 µs; 4096×4096 0.1645 → 0.1637 ms at two threads), and the f32 kernels' layers under 3072 outputs
/// (576×576 17.6 → 17.0 / 10.7 → 10.6 µs, 1536×576 48.5 → 46.5 / 25.4 → 24.7 µs; at 4096×4096 int8 weights
/// took 1–2% longer, so larger layers keep their blocks). Blocks are whole groups of 16 rows, so the LoRA
/// expand groups the same outputs whatever the thread count (the same bits). `None`: keep [`out_block`].
///
/// With int8 activations over the interleaved layout this also holds at 5–8 rows (two passes of up to 4 rows of
/// `x` over the block) while a thread's block of weight codes fits [`PASSES_BLOCK_BYTES`], so that the second pass
/// reads it from the core's L2: NF4+DQ M = 8, two threads, from L3: 576×576 14.95 → 13.95 µs, 1536×576 32.75 →
/// 31.75 µs, 576×1536 31.25 → 30.85 µs (at M = 16 no gain: 25.0–64 µs either way).
fn rows_per_thread(layer: LayerView<'_>, m: usize, int8: bool, interleaved: bool, split: bool) -> Option<usize> {
    let n_out = layer.out_features;
    #[cfg(feature = "rayon")]
    let threads = if split { rayon::current_num_threads().max(1) } else { 1 };
    #[cfg(not(feature = "rayon"))]
    let threads = {
        let _ = split;
        1
    };
    let rows = n_out.div_ceil(threads).next_multiple_of(16).max(1);
    let code_bytes = match layer.weight {
        QuantWeight::FourBit(_) => rows * layer.in_features / 2,
        QuantWeight::Int8(_) => rows * layer.in_features,
    };
    let one_pass = m <= 4 && (interleaved || (!int8 && out_block(n_out) < 64));
    let passes_in_l2 = interleaved && m <= 8 && code_bytes <= PASSES_BLOCK_BYTES;
    (one_pass || passes_in_l2).then_some(rows)
}

/// The most weight-code bytes a thread's block may hold when the int8-activation kernel passes over it twice
/// (5–8 rows of `x`): a quarter of a 1 MiB L2, the smallest of current x86 server cores'.
const PASSES_BLOCK_BYTES: usize = 256 << 10;

/// Scratch a forward reuses across calls: per-adapter shrink results and the block-major accumulator. After
/// the first call with a given shape, a call allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    shrink: Vec<Vec<f32>>,
    used: Vec<bool>,
    acc: Vec<f32>,
    act8: super::linear_act8::Act8X,
    /// `x` as the f32 block kernel asked for it (`LinearKernels::pack_x`).
    x_packed: Vec<f32>,
    /// The shrink's pieces when the blocks of a split forward compute it.
    deferred: super::linear_shrink::DeferredShrink,
}

/// The LoRA shrink `t = x·Aᵀ` for every adapter used by some row (rows that do not use it stay zero), into
/// `scratch`. The `rows × rank` dot products are independent, so they are split over threads (each computed
/// whole by one thread: the result does not depend on the split).
fn shrink_all(
    layer: LayerView<'_>,
    x: &[f32],
    m: usize,
    sel: AdapterSelection<'_>,
    path: KernelPath,
    split: bool,
    scratch: &mut Scratch,
) {
    let n_in = layer.in_features;
    let n_ad = layer.adapters.len();
    let dots = kernels(path.isa).linear.dots;
    mark_used(layer, m, sel, &mut scratch.used);
    if scratch.shrink.len() < n_ad {
        scratch.shrink.resize_with(n_ad, Vec::new);
    }
    for (a, ad) in layer.adapters.iter().enumerate() {
        if !scratch.used[a] {
            continue;
        }
        let rank = ad.rank();
        let t = &mut scratch.shrink[a];
        t.clear();
        t.resize(m * rank, 0.0);
        // Pieces of 16 consecutive entries of a row of `t` (whole rows when the rank is not a multiple of 16):
        // one `dots` call each.
        let piece = if rank.is_multiple_of(16) { 16 } else { rank };
        let one = move |i: usize, out: &mut [f32]| {
            let (r, k0) = (i * piece / rank, i * piece % rank);
            if layer.uses(sel, r, a) {
                dots(&x[r * n_in..(r + 1) * n_in], &ad.a()[k0 * n_in..(k0 + out.len()) * n_in], out);
            }
        };
        for_each_chunk(split && m * rank * n_in >= 1 << 16, t, piece, one);
    }
}

/// `used[a]`: whether some row of `x` uses adapter `a`.
fn mark_used(layer: LayerView<'_>, m: usize, sel: AdapterSelection<'_>, used: &mut Vec<bool>) {
    used.clear();
    used.extend((0..layer.adapters.len()).map(|a| (0..m).any(|r| layer.uses(sel, r, a))));
}

/// Byte → (value of the high nibble, value of the low nibble).
pub(crate) fn pair_table(table: &[f32; 16]) -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [table[b >> 4], table[b & 15]])
}

/// The fused forward into `y` (`[m, out]` row-major, rounded to `O`) with `opts`' path, adapter selection and
/// activation mode. `x` is `[m, in]` f32, already validated together with the selection; `y.len() == m * out`.
/// Allocates only when `scratch` must grow. Returns whether every element of `y` is finite (checked per block
/// by the thread that wrote it at `m == 1`, while the block is in its cache).
pub(crate) fn forward_into<O: Element>(
    layer: LayerView<'_>,
    x: &[f32],
    m: usize,
    opts: ForwardOptions<'_>,
    scratch: &mut Scratch,
    y: &mut [O],
) -> bool {
    let n_out = layer.out_features;
    if m == 0 {
        return true;
    }
    let ForwardOptions { path, adapters: sel, activations, .. } = opts;
    let int8 = activations == Activations::Int8;
    // The f32 kernels' table of decoded code pairs (the int8-activation kernels never read it).
    let pairs = match layer.weight {
        QuantWeight::FourBit(t) if !int8 => pair_table(t.table()),
        _ => [[0.0; 2]; 256],
    };
    let block_rows = out_block(n_out);
    let table = &kernels(path.isa).linear;
    // Int8 activations over the interleaved layout (about a quarter of the f32 mode's time per multiply-add).
    let interleaved = int8 && layer.act8_interleaved.is_some() && table.act8_interleaved;
    let split = path.parallel && n_out > block_rows && worth_threads(m, n_out, layer.in_features, int8, interleaved);
    let block_rows = rows_per_thread(layer, m, int8, interleaved, split).unwrap_or(block_rows);
    let chunk = m * block_rows;
    // Cleared by a block of `y` (at m == 1) that is not all finite; read after the blocks are joined.
    let finite = AtomicBool::new(true);
    // One entry into the pool for the shrink and the blocks (the shrink's split is then ~1 µs, not a second
    // wake-up of the workers).
    on_pool(split, || {
        // Split: the blocks compute the shrink's pieces themselves (`linear_shrink.rs`) where there are two or more.
        let defer = split && scratch.deferred.plan(layer, m, sel) >= 2;
        if defer {
            mark_used(layer, m, sel, &mut scratch.used);
        } else {
            shrink_all(layer, x, m, sel, path, split, scratch);
        }
        let Scratch { shrink, used, acc, act8, x_packed, deferred } = scratch;
        let deferred = defer.then(|| deferred.view(layer, x, table, n_out.div_ceil(block_rows)));
        if int8 {
            act8.prepare(x, m, layer.in_features, layer.weight, table, interleaved);
            x_packed.clear();
        } else {
            pack_x(table, x, m, layer.in_features, split, x_packed);
        }
        let act8 = int8.then(|| act8.view());
        let job = Job { layer, x, m, pairs: &pairs, shrink, used, sel, act8, x_packed, deferred };
        // Block-major accumulator: block b (outputs o0..o0+ob) is `[m, ob]` at offset o0 * m, so every block
        // owns one contiguous piece (disjoint pieces for the threads), zeroed by the task that fills it.
        acc.resize(m * n_out, 0.0);
        let block = if int8 { table.act8_block } else { table.block };
        let run = move |b: usize, out: &mut [f32]| {
            if let Some(d) = &job.deferred {
                d.claim_share();
            }
            out.fill(0.0);
            block(&job, b * block_rows, out.len() / m, out)
        };
        if m == 1 {
            // One row: block b is also y's slice b, so each task rounds its own block into y.
            let finite = &finite;
            let run_into_y = move |b: usize, out: &mut [f32], y_part: &mut [O]| {
                run(b, out);
                O::narrow_slice(out, y_part);
                if !all_finite(y_part) {
                    finite.store(false, Ordering::Relaxed);
                }
            };
            for_each_chunk_zip(split, acc, chunk, &mut *y, block_rows, run_into_y);
        } else {
            for_each_chunk(split, acc, chunk, run);
        }
        if split {
            super::pool_linger::linger();
        }
    });
    if m == 1 {
        return finite.into_inner();
    }
    // Scatter the blocks into y's rows, rounding to O.
    let acc = &scratch.acc;
    for (b, part) in acc.chunks(chunk).enumerate() {
        let (o0, ob) = (b * block_rows, part.len() / m);
        for r in 0..m {
            O::narrow_slice(&part[r * ob..(r + 1) * ob], &mut y[r * n_out + o0..r * n_out + o0 + ob]);
        }
    }
    all_finite(y)
}

/// Writes `x` (`[m, n_in]`) into `out` as `table`'s f32 block kernel asked for it (`LinearKernels::pack_x`), its
/// groups of rows over the pool when `split`; leaves `out` empty when the kernel asks for nothing at this `m`.
fn pack_x(table: &LinearKernels, x: &[f32], m: usize, n_in: usize, split: bool, out: &mut Vec<f32>) {
    out.clear();
    let Some(p) = table.pack_x.filter(|p| m >= p.min_m && n_in > 0) else { return };
    out.resize(m * n_in, 0.0);
    let group = p.group_rows * n_in;
    let one = move |g: usize, dst: &mut [f32]| (p.pack_group)(&x[g * group..g * group + dst.len()], n_in, dst);
    for_each_chunk(split, out, group, one);
}

/// Multiply-adds of the base product below which a forward called from outside the thread pool runs on the
/// calling thread: injecting the blocks into the pool (waking a sleeping worker, joining) cost about 20–25 µs
/// per call on the development machine (2-core Zen 4), more than the whole GEMV of a small layer. Measured
/// from outside the pool (NF4+DQ, one thread / two): SmolLM2's 192×576 M=1 3.4 / 26 µs, 576×576 M=1
/// 9.1 / 30 µs and M=8 88 / 99 µs, 576×1536 M=1 39 / 51 µs; above the line 576×1536 M=8 239 / 156 µs,
/// 1536×576 M=8 231 / 132 µs. Int8 activations do about a third of the work per multiply-add, so their line is
/// 3× higher. A forward already running on a pool worker (an engine's forward inside `rayon::scope`, as
/// lowbit-llm's) always splits: its siblings are awake and a split costs ~1 µs (SmolLM2 decode at 2 threads,
/// NF4+DQ: 219 tokens/s splitting every layer, 153 with this line applied inside the pool too, 128 never
/// splitting). Results never depend on it (the blocks are fixed either way).
const PARALLEL_MIN_MACS: usize = 4 << 20;

/// Multiply-adds below which an int8-activation forward over the interleaved layout stays on its thread even
/// on a pool worker: its whole product is a few µs, and the split (~1 µs) plus a block of imbalance cost more
/// than the second thread saves. Measured inside the pool with the weights read from the last-level cache, as a
/// decode reads them (NF4+DQ, M = 1 unless noted, one layer cycled through 64 copies, staying / splitting at two
/// threads): 192×576 3.1 / 3.6 µs; above the line 384×576 6.5 / 6.0 µs, 288×1024 8.9 / 7.7 µs, 576×576 10.4 /
/// 8.4 µs (M = 2: 9.8 / 7.5 µs). SmolLM2-135M `--act8` decode at two threads, this line against the earlier
/// 768 K (set from one layer timed in L2, where 576×576 gained nothing): 77–85 against 70–73 tokens/s. The f32
/// mode splits them all.
#[cfg_attr(not(feature = "rayon"), allow(dead_code))]
const IN_POOL_INTERLEAVED_MIN_MACS: usize = 192 << 10;

/// Whether splitting the base product over the pool pays (see [`PARALLEL_MIN_MACS`] and
/// [`IN_POOL_INTERLEAVED_MIN_MACS`]).
fn worth_threads(m: usize, n_out: usize, n_in: usize, int8_activations: bool, interleaved: bool) -> bool {
    let macs = m.saturating_mul(n_out).saturating_mul(n_in);
    #[cfg(feature = "rayon")]
    if rayon::current_thread_index().is_some() {
        return !interleaved || macs >= IN_POOL_INTERLEAVED_MIN_MACS;
    }
    let _ = interleaved;
    macs >= if int8_activations { 3 * PARALLEL_MIN_MACS } else { PARALLEL_MIN_MACS }
}

/// Runs `f` on a pool worker when `split` and the caller is outside the pool (one injection: the splits inside
/// `f` then cost what a split between awake workers costs), else on the calling thread.
fn on_pool(split: bool, f: impl FnOnce() + Send) {
    #[cfg(feature = "rayon")]
    if split && rayon::current_thread_index().is_none() {
        return rayon::scope(|_| f());
    }
    let _ = split;
    f()
}

#[cfg(all(test, feature = "rayon"))]
mod tests {
    use super::worth_threads;

    /// On a pool worker every forward splits except an int8-activation one over the interleaved layout below
    /// its line; outside the pool the plain line holds (int8 activations at 3×).
    #[test]
    fn small_interleaved_act8_products_stay_on_their_thread_inside_the_pool() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            for (m, out, inp) in [(1, 192, 576), (1, 128, 576), (2, 96, 576)] {
                assert!(!worth_threads(m, out, inp, true, true), "{m}x{out}x{inp} interleaved act8");
                assert!(worth_threads(m, out, inp, true, false), "{m}x{out}x{inp} act8 without the layout");
                assert!(worth_threads(m, out, inp, false, false), "{m}x{out}x{inp} f32");
            }
            for (m, out, inp) in
                [(1, 384, 576), (1, 576, 576), (2, 576, 576), (1, 576, 1536), (1, 1536, 576), (8, 576, 576)]
            {
                assert!(worth_threads(m, out, inp, true, true), "{m}x{out}x{inp} interleaved act8");
            }
        });
        assert!(!worth_threads(1, 576, 1536, false, false) && worth_threads(1, 4096, 4096, false, false));
        assert!(!worth_threads(1, 2048, 2048, true, true) && worth_threads(1, 4096, 4096, true, true));
    }
}
