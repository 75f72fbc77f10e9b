//! Portable NF4 / FP4 kernels (`wide`) and the scalar and portable kernel tables. Same names and results as
//! `nf4_x86.rs`.

use super::table::{with_out_slice, FourBitKernels};
use crate::element::{DType, Element};
use crate::reference::nf4::{self as reference, Codebook};
use wide::f32x8;

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

pub(crate) fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == DType::F32).then(|| bytemuck::cast_slice_mut(x))
}
