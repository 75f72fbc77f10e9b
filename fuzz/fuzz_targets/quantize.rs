//! Quantize / dequantize with arbitrary shapes, granularities, group sizes, block sizes, formats, double
//! quantization, element types and raw f32 bit patterns (NaN, ±Inf, subnormals, -0.0).
//!
//! Oracle: an error exactly when the input is invalid (non-finite value, length not matching the shape, bad
//! group or block size); otherwise a tensor whose parts pass `from_parts`, whose dequantization is finite
//! and within the format's error bound of the input, on every path.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::affine::{self, AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::nf4::{self, BlockScales, FourBitTensor};
use lowbit::{bf16, f16, Element, Error, Scheme};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ty {
    F32,
    F16,
    Bf16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    scheme: common::FuzzScheme,
    ty: Ty,
    dims: Vec<u16>,
    /// Elements added to (or removed from) the length the shape implies.
    len_delta: i8,
    fill: common::Fill,
    seed: u64,
    raw: Vec<u32>,
}

fn run<T: Element>(input: &Input, x: &[T], shape: &[usize], numel: usize) {
    let finite = x.iter().all(|v| v.to_f32().is_finite());
    let len_ok = x.len() == numel;
    let path = KernelPath::best();
    let Some(scheme) = input.scheme.scheme() else { return };
    match scheme {
        Scheme::Int8(g) => {
            let valid = finite && len_ok && g.validate().is_ok();
            let r = affine::quantize_with(x, shape, g, path);
            // A finite range wider than f32::MAX / 255 per entry gives a scale that is refused (formats.md).
            let (range_must_fail, range_may_fail) = if valid { widest_entry(x, shape, g) } else { (false, false) };
            match r {
                Err(e) if valid && range_may_fail => {
                    assert!(matches!(e, Error::InvalidArgument { .. }), "range overflow reported as {e}")
                }
                Ok(_) if range_must_fail => panic!("a range too wide for an f32 scale accepted ({g})"),
                Err(e) if valid => panic!("valid input rejected: {e}"),
                Err(_) => {}
                Ok(_) if !valid => panic!("invalid input accepted (finite {finite}, len ok {len_ok}, {g})"),
                Ok(q) => check_affine(x, &q),
            }
        }
        Scheme::FourBit { format, blocksize: bs, double_quant } => {
            // Mostly valid block sizes, sometimes arbitrary ones (FuzzScheme).
            let valid = finite && len_ok && nf4::BLOCK_SIZES.contains(&bs);
            let r = nf4::quantize_4bit_with(format, x, shape, bs, double_quant, path);
            match r {
                Err(e) if valid => panic!("valid input rejected: {e}"),
                Err(Error::NonFinite { index, .. }) => assert!(!x[index].to_f32().is_finite()),
                Err(_) => {}
                Ok(_) if !valid => panic!("invalid input accepted"),
                Ok(q) => check_four_bit(x, &q),
            }
        }
    }
}

/// Whether some parameter entry's range `max(x, 0) - min(x, 0)` is certainly / possibly too wide for a
/// finite scale times 255 (a 1% margin either side of f32::MAX absorbs the f32 rounding of the width).
fn widest_entry<T: Element>(x: &[T], shape: &[usize], g: Granularity) -> (bool, bool) {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let per_row = match g {
        Granularity::PerGroup(gs) => cols.div_ceil(gs.max(1)),
        _ => 1,
    };
    let entry = |i: usize| match g {
        Granularity::PerTensor => 0,
        Granularity::PerChannel => i / cols,
        Granularity::PerGroup(gs) => (i / cols) * per_row + (i % cols) / gs.max(1),
    };
    let mut ranges: std::collections::HashMap<usize, (f64, f64)> = Default::default();
    for (i, v) in x.iter().enumerate() {
        let v = v.to_f32() as f64;
        let r = ranges.entry(entry(i)).or_insert((0.0, 0.0));
        *r = (r.0.min(v), r.1.max(v));
    }
    let widest = ranges.values().map(|(lo, hi)| hi - lo).fold(0.0, f64::max);
    (widest > 1.01 * f32::MAX as f64, widest > 0.99 * f32::MAX as f64)
}

fn check_affine<T: Element>(x: &[T], q: &AffineTensor) {
    let rebuilt = AffineTensor::from_parts(
        q.shape().to_vec(),
        q.granularity(),
        q.codes().to_vec(),
        q.scales().to_vec(),
        q.zero_points().to_vec(),
    );
    if let Err(e) = rebuilt {
        panic!("quantize produced a tensor from_parts rejects: {e}");
    }
    let want: Vec<f32> = q.dequantize_with(KernelPath::REFERENCE).unwrap();
    let (rows, cols) = q.matrix_dims();
    let per_row = match q.granularity() {
        Granularity::PerTensor => 0,
        Granularity::PerChannel => 1,
        Granularity::PerGroup(g) => cols.div_ceil(g),
    };
    for (i, (&v, &y)) in x.iter().zip(&want).enumerate() {
        assert!(y.is_finite(), "dequantized value {y} at {i}");
        let entry = match q.granularity() {
            Granularity::PerTensor => 0,
            Granularity::PerChannel => i / cols.max(1),
            Granularity::PerGroup(g) => (i / cols) * per_row + (i % cols) / g,
        };
        let s = q.scales()[entry];
        let v = v.to_f32();
        let err = (v - y).abs();
        // Half a step for rounding, half a step for a clipped end of the range, plus f32 rounding.
        assert!(err <= s + 4.0 * f32::EPSILON * v.abs(), "element {i}: {v} -> {y}, scale {s}");
    }
    let _ = rows;
    for path in KernelPath::all_available() {
        let got: Vec<T> = q.dequantize_with(path).unwrap();
        let want_t: Vec<T> = q.dequantize_with(KernelPath::REFERENCE).unwrap();
        assert!(bytemuck_eq(&got, &want_t), "affine dequantize path {path} differs");
    }
}

fn check_four_bit<T: Element>(x: &[T], q: &FourBitTensor) {
    let rebuilt = FourBitTensor::from_parts(
        q.shape().to_vec(),
        q.format(),
        q.blocksize(),
        *q.table(),
        q.packed().to_vec(),
        q.scales().clone(),
        q.dtype(),
    );
    assert_eq!(rebuilt.as_ref().ok(), Some(q), "from_parts of quantize's own parts");
    let y: Vec<f32> = q.dequantize_with(KernelPath::REFERENCE).unwrap();
    let absmax = q.absmax();
    // True block maxima, to bound the double-quantization error of the scales.
    let bs = q.blocksize();
    for (b, chunk) in x.chunks(bs).enumerate() {
        let true_max = chunk.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
        let scale_err = match q.scales() {
            BlockScales::Plain(a) => {
                assert_eq!(a[b].to_bits(), true_max.to_bits(), "plain absmax of block {b}");
                0.0
            }
            BlockScales::Double(_) => (absmax[b] - true_max).abs(),
        };
        for (j, v) in chunk.iter().enumerate() {
            let (v, yv) = (v.to_f32(), y[b * bs + j]);
            assert!(yv.is_finite());
            // Half the widest gap of either table (NF4: 0.1385, FP4: 0.1667) times the block scale.
            let bound = 0.167 * true_max + scale_err + 4.0 * f32::EPSILON * true_max + f32::MIN_POSITIVE;
            assert!(
                (v - yv).abs() <= bound,
                "block {b} elem {j}: {v} -> {yv} (absmax {true_max}, decoded {})",
                absmax[b]
            );
        }
    }
    for path in KernelPath::all_available() {
        let got: Vec<T> = q.dequantize_with(path).unwrap();
        let want: Vec<T> = q.dequantize_with(KernelPath::REFERENCE).unwrap();
        assert!(bytemuck_eq(&got, &want), "4-bit dequantize path {path} differs");
    }
}

fn bytemuck_eq<T: Element>(a: &[T], b: &[T]) -> bool {
    bytemuck::cast_slice::<T, u8>(a) == bytemuck::cast_slice::<T, u8>(b)
}

fuzz_target!(|input: Input| {
    let shape = common::make_shape(&input.dims, 1 << 17);
    let numel: usize = shape.iter().product();
    let len = (numel as isize + input.len_delta as isize % 3).max(0) as usize;
    let xf = common::make_values(len, &input.raw, input.fill, input.seed);
    match input.ty {
        Ty::F32 => run(&input, &xf, &shape, numel),
        Ty::F16 => {
            let x: Vec<f16> = if matches!(input.fill, common::Fill::Raw) {
                (0..len)
                    .map(|i| f16::from_bits(input.raw.get(i % input.raw.len().max(1)).copied().unwrap_or(0) as u16))
                    .collect()
            } else {
                xf.iter().map(|&v| f16::from_f32(v)).collect()
            };
            run(&input, &x, &shape, numel)
        }
        Ty::Bf16 => {
            let x: Vec<bf16> = xf.iter().map(|&v| bf16::from_f32(v)).collect();
            run(&input, &x, &shape, numel)
        }
    }
});
