//! The ggml / GGUF dequantization driver: spans of whole blocks over threads, through the kernel table of the
//! chosen instruction set (`ggml_portable.rs`, `ggml_x86.rs`).
//!
//! Blocks are independent and every kernel computes each element with the reference's f32 operations, so
//! splitting the tensor into spans of whole blocks (one per thread task) gives the same bits on every path
//! and every thread count.

use super::dispatch::kernels;
use crate::cpu::KernelPath;
use crate::format::ggml::GgmlType;

/// Elements per thread task (rounded up to whole blocks).
const PAR_TASK: usize = 1 << 16;

/// Decodes whole blocks of `ty` from `data` into `out`. The caller checked that `ty` is decodable, that
/// `out.len()` is whole blocks and that `data.len()` is their size, and that `path.isa` is available.
pub(crate) fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32], path: KernelPath) {
    let f = kernels(path.isa).ggml.dequantize;
    let (be, bb) = (ty.block_elements(), ty.block_bytes());
    if cfg!(feature = "rayon") && path.parallel && out.len() >= super::PARALLEL_MIN_ELEMS {
        let task_blocks = PAR_TASK.div_ceil(be);
        let items: Vec<_> = out.chunks_mut(task_blocks * be).zip(data.chunks(task_blocks * bb)).collect();
        par_items(items, |(o, d)| f(ty, d, o));
    } else {
        f(ty, data, out);
    }
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
