//! aarch64 NEON NF4 / FP4 dequantize: 16 codes at a time through the register table lookups of the NEON GEMV
//! (`linear_neon::decode16`: four `tbl`s on the table's byte planes, exact entry bits), times the block's
//! absmax, so every value is the reference `table[code] · absmax` bit for bit. Quantize and the absmax scan
//! are the portable ones (`wide` compiles them to NEON).

use super::linear_neon::{byte_planes, decode16};
use super::nf4_portable::{absbits_portable, as_f32_mut, dequantize_run_portable, quantize_run_portable};
use super::table::{with_out_slice, FourBitKernels};
use crate::element::Element;
use core::arch::aarch64::*;

/// The NEON kernels.
pub(crate) const NEON: FourBitKernels = FourBitKernels {
    absbits: absbits_portable,
    quantize: quantize_run_portable,
    dequantize: |packed, absmax, bs, table, out, _stream| {
        with_out_slice!(out, |o| dequantize_span(packed, absmax, bs, table, o))
    },
};

/// Dequantizes a span starting at a block boundary.
fn dequantize_span<T: Element>(packed: &[u8], absmax: &[f32], bs: usize, table: &[f32; 16], out: &mut [T]) {
    let planes = byte_planes(table);
    let mut buf = [0.0f32; 256];
    for ((o, p), &a) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).zip(absmax) {
        if let Some(of) = as_f32_mut(o) {
            dequantize_run(p, a, table, &planes, of);
        } else {
            // Blocks of up to 4096 elements: 256 at a time (an even count, so chunks stay byte-aligned).
            for (oc, pc) in o.chunks_mut(256).zip(p.chunks(128)) {
                dequantize_run(pc, a, table, &planes, &mut buf[..oc.len()]);
                T::narrow_slice(&buf[..oc.len()], oc);
            }
        }
    }
}

/// `out.len()` values of one block's run from `packed` (starting at an even element).
fn dequantize_run(packed: &[u8], absmax: f32, table: &[f32; 16], planes: &[uint8x16_t; 4], out: &mut [f32]) {
    let full = out.len() / 16 * 16;
    let (out_full, out_tail) = out.split_at_mut(full);
    // SAFETY: register-only intrinsics; NEON is in the aarch64 baseline.
    let a = unsafe { vdupq_n_f32(absmax) };
    for (o, p) in out_full.chunks_exact_mut(16).zip(packed[..full / 2].chunks_exact(8)) {
        let w = decode16(u64::from_le_bytes(p.try_into().expect("8 bytes")), planes);
        for (h, v) in w.into_iter().enumerate() {
            // SAFETY: `o` holds 16 floats, so the 4 at 4·h are writable.
            unsafe { vst1q_f32(o[4 * h..4 * h + 4].as_mut_ptr(), vmulq_f32(v, a)) };
        }
    }
    dequantize_run_portable(&packed[full / 2..], absmax, table, out_tail);
}
