//! Every affine int8 path (scalar reference, portable SIMD, AVX2, AVX-512, threaded) gives the reference's
//! parameters, codes and dequantized bits, for f32/f16/bf16 inputs and outputs.

use lowbit::affine::{self, AffineParams, AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::reference::affine as reference;
use lowbit::{bf16, f16, Element};
use proptest::prelude::*;

/// Reference parameters, codes and f32 values for `x`.
fn reference_of<T: Element>(x: &[T], shape: &[usize], g: Granularity) -> (Vec<AffineParams>, Vec<u8>, Vec<f32>) {
    let (rows, cols) = lowbit::shape::as_matrix(shape).unwrap();
    let params = reference::calibrate(x, rows, cols, g);
    let codes = reference::quantize(x, rows, cols, g, &params);
    let values = reference::dequantize(&codes, rows, cols, g, &params);
    (params, codes, values)
}

fn bits<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Asserts that every available path agrees with the reference, and returns the reference tensor.
fn check_all_paths<T: Element>(x: &[T], shape: &[usize], g: Granularity) -> AffineTensor {
    let (params, codes, values) = reference_of(x, shape, g);
    let want_f16: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let want_bf16: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut first = None;
    for path in KernelPath::all_available() {
        let got_params = affine::calibrate_with(x, shape, g, path).unwrap();
        assert_eq!(got_params, params, "params differ on {path} for {g} {shape:?}");
        let q = affine::quantize_with(x, shape, g, path).unwrap();
        assert_eq!(q.codes(), &codes[..], "codes differ on {path} for {g} {shape:?}");
        // The caller-buffer form, into buffers holding garbage from an earlier call.
        let mut got_codes = vec![0xA5u8; x.len()];
        let mut got = vec![AffineParams { scale: 3.0, zero_point: 9 }; params.len()];
        affine::quantize_into_with(x, shape, g, &mut got_codes, &mut got, path).unwrap();
        assert_eq!((&got, &got_codes), (&params, &codes), "quantize_into differs on {path} for {g} {shape:?}");
        // With the parameters known: the same codes, allocated or into a buffer holding garbage.
        let known = affine::quantize_with_params(x, shape, g, &params, path).unwrap();
        assert_eq!(known.codes(), &codes[..], "quantize_with_params differs on {path} for {g} {shape:?}");
        got_codes.fill(0x5A);
        affine::quantize_with_params_into(x, shape, g, &params, &mut got_codes, path).unwrap();
        assert_eq!(got_codes, codes, "quantize_with_params_into differs on {path} for {g} {shape:?}");
        let d: Vec<f32> = q.dequantize_with(path).unwrap();
        assert_eq!(bits(&d), bits(&values), "f32 dequantization differs on {path}");
        let d: Vec<f16> = q.dequantize_with(path).unwrap();
        assert_eq!(bits(&d), bits(&want_f16), "f16 dequantization differs on {path}");
        let d: Vec<bf16> = q.dequantize_with(path).unwrap();
        assert_eq!(bits(&d), bits(&want_bf16), "bf16 dequantization differs on {path}");
        first.get_or_insert(q);
    }
    first.unwrap()
}

/// Inside the calibrated range, the error is at most half a step; 0.0 is exact.
fn check_error_bound(x: &[f32], q: &AffineTensor) {
    let (rows, cols) = q.matrix_dims();
    let d: Vec<f32> = q.dequantize().unwrap();
    reference::for_each_run(rows, cols, q.granularity(), |e, s, n| {
        let p = q.params(e);
        for i in s..s + n {
            // scale/2 plus the rounding of x*(1/scale) and of the final product (a few ulps of |x|).
            let bound = p.scale * 0.5 * (1.0 + 4.0 * f32::EPSILON) + 4.0 * f32::EPSILON * x[i].abs();
            assert!((x[i] - d[i]).abs() <= bound, "x={} x̂={} scale={} bound={bound}", x[i], d[i], p.scale);
            if x[i] == 0.0 {
                assert_eq!(d[i], 0.0, "0.0 must round-trip exactly");
            }
        }
    });
}

/// Random data of one of several range families, including exact .5 ties.
fn data(kind: u8, n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|i| {
            let u = next() as f32;
            match kind % 7 {
                0 => 1.0 + u * 1e-9,          // 1e-9 wide
                1 => (u - 0.3) * 1e6,         // 1e6 wide
                2 => -1.0 - 5.0 * u,          // all negative
                3 => 0.5 + 3.0 * u,           // all positive
                4 => 2.75,                    // constant
                5 => (i % 256) as f32 - 64.5, // range [-64.5, 190.5]: scale 1, x/scale on .5 ties
                _ => (u - 0.5) * 2.0 * (1.0 + (i % 13) as f32),
            }
        })
        .collect()
}

fn granularity() -> impl Strategy<Value = Granularity> {
    prop_oneof![
        Just(Granularity::PerTensor),
        Just(Granularity::PerChannel),
        (1usize..70).prop_map(Granularity::PerGroup),
        prop_oneof![Just(32usize), Just(64), Just(128)].prop_map(Granularity::PerGroup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn every_path_equals_reference_f32(rows in 1usize..9, cols in 1usize..150, kind in 0u8..7, seed: u64, g in granularity()) {
        let x = data(kind, rows * cols, seed);
        let q = check_all_paths(&x, &[rows, cols], g);
        check_error_bound(&x, &q);
    }

    #[test]
    fn every_path_equals_reference_half(rows in 1usize..6, cols in 1usize..90, kind in 0u8..7, seed: u64, g in granularity()) {
        // f16 tops out at 65504: keep the 1e6-wide family in range.
        let x: Vec<f32> = data(kind, rows * cols, seed).into_iter().map(|v| v.clamp(-6e4, 6e4)).collect();
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        check_all_paths(&h, &[rows, cols], g);
        check_all_paths(&b, &[rows, cols], g);
    }
}

#[test]
fn large_tensors_take_the_threaded_and_streaming_paths() {
    // 300 x 1000 exceeds the threading threshold; 13M elements (52 MB of f32) exceed the streaming threshold.
    for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(96)] {
        let x = data(6, 300 * 1000, 7);
        check_all_paths(&x, &[300, 1000], g);
    }
    let x = data(1, 13 << 20, 11);
    let (params, codes, values) = reference_of(&x, &[13, 1 << 20], Granularity::PerTensor);
    for path in KernelPath::all_available().into_iter().filter(|p| *p != KernelPath::REFERENCE) {
        let q = affine::quantize_with(&x, &[13, 1 << 20], Granularity::PerTensor, path).unwrap();
        assert_eq!(q.params(0), params[0]);
        assert!(q.codes() == &codes[..], "codes differ on {path}");
        let d: Vec<f32> = q.dequantize_with(path).unwrap();
        assert!(bits(&d) == bits(&values), "streaming dequantization differs on {path}");
    }
}

#[test]
fn streamed_channel_and_group_runs_equal_the_reference_in_any_alignment() {
    // 1031 x 12291 (51 MB of f32 out) takes the streaming path; rows of 12291 and groups of 51 elements are not
    // whole vectors, so runs start mid-vector (assembled element by element), and an output one float past
    // an aligned start moves every run against the vector grid.
    let (rows, cols) = (1031, 12291);
    let x = data(6, rows * cols, 5);
    for g in [Granularity::PerChannel, Granularity::PerGroup(51)] {
        let (_, _, values) = reference_of(&x, &[rows, cols], g);
        let q = affine::quantize(&x, &[rows, cols], g).unwrap();
        for path in KernelPath::all_available().into_iter().filter(|p| *p != KernelPath::REFERENCE) {
            let mut buf = vec![f32::NAN; rows * cols + 16];
            for offset in [0, 1] {
                let out = &mut buf[offset..offset + rows * cols];
                q.dequantize_into_with(out, path).unwrap();
                assert!(bits(out) == bits(&values), "streamed {g} dequantization differs on {path} at +{offset}");
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let x = data(6, 513 * 777, 3);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(64)]
                .map(|g| {
                    let q = affine::quantize(&x, &[513, 777], g).unwrap();
                    let d: Vec<f32> = q.dequantize().unwrap();
                    (q, bits(&d))
                })
                .to_vec()
        })
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(3));
}

#[test]
fn pinned_pytorch_edge_cases() {
    // All-zero tensor: scale = f32::EPSILON, zero point 0, codes 0.
    let q = affine::quantize(&[0.0f32; 10], &[2, 5], Granularity::PerTensor).unwrap();
    assert_eq!(q.params(0), AffineParams { scale: f32::EPSILON, zero_point: 0 });
    assert!(q.codes().iter().all(|&c| c == 0));
    // Positive constant c: scale c/255, zero point 0, codes 255.
    let c = 0.731f32;
    let q = affine::quantize(&[c; 7], &[7], Granularity::PerTensor).unwrap();
    assert_eq!(q.params(0), AffineParams { scale: c / 255.0, zero_point: 0 });
    assert!(q.codes().iter().all(|&v| v == 255));
    // lo / scale exactly -2.5 -> zero point round_half_even(2.5) = 2.
    let q = affine::quantize(&[-2.5f32, 252.5, 0.0], &[3], Granularity::PerTensor).unwrap();
    assert_eq!(q.params(0), AffineParams { scale: 1.0, zero_point: 2 });
    // 252.5 rounds half-to-even to 252 before the zero point is added.
    assert_eq!(q.codes(), &[0, 254, 2]);
}

#[test]
fn parameter_layout_per_group_is_row_major_and_groups_do_not_cross_rows() {
    // 2 rows of 5 with groups of 2: groups [0,1] [2,3] [4] per row, 6 entries.
    let x: Vec<f32> = vec![1.0, 2.0, -3.0, 4.0, 10.0, /* row 1 */ -1.0, 0.5, 7.0, 7.0, -20.0];
    let q = affine::quantize(&x, &[2, 5], Granularity::PerGroup(2)).unwrap();
    assert_eq!(q.scales().len(), 6);
    let want = [(0.0, 2.0), (-3.0, 4.0), (0.0, 10.0), (-1.0, 0.5), (0.0, 7.0), (-20.0, 0.0)];
    for (i, (lo, hi)) in want.into_iter().enumerate() {
        assert_eq!(q.params(i), reference::params_from_range(lo, hi), "entry {i}");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    assert!(affine::quantize(&x, &[3], Granularity::PerTensor).is_err(), "length vs shape");
    assert!(affine::quantize(&x, &[4], Granularity::PerGroup(0)).is_err(), "group size 0");
    assert!(affine::quantize(&x, &[4], Granularity::PerGroup(usize::MAX)).is_err(), "oversized group");
    assert!(affine::quantize(&[1.0, f32::NAN], &[2], Granularity::PerTensor).is_err(), "NaN");
    assert!(affine::quantize(&[f32::INFINITY], &[1], Granularity::PerChannel).is_err(), "Inf");
    assert!(affine::quantize(&x, &[usize::MAX, 2], Granularity::PerTensor).is_err(), "overflowing shape");
    let e = affine::quantize(&[1.0, f32::NEG_INFINITY], &[2], Granularity::PerTensor).unwrap_err();
    assert!(e.to_string().contains("index 1"), "{e}");
    let bad_params = [AffineParams { scale: 0.0, zero_point: 0 }];
    assert!(affine::quantize_with_params(&x, &[4], Granularity::PerTensor, &bad_params, KernelPath::best()).is_err());
    assert!(AffineTensor::from_parts(vec![2, 2], Granularity::PerChannel, vec![0; 4], vec![1.0], vec![0]).is_err());
    assert!(AffineTensor::from_parts(vec![2, 2], Granularity::PerTensor, vec![0; 3], vec![1.0], vec![0]).is_err());
    assert!(AffineTensor::from_parts(vec![4], Granularity::PerTensor, vec![0; 4], vec![f32::NAN], vec![0]).is_err());
    let q = affine::quantize(&x, &[4], Granularity::PerTensor).unwrap();
    let mut short = [0.0f32; 3];
    assert!(q.dequantize_into(&mut short).is_err());
    // Empty tensors are valid: an empty range gives scale 1, zero point 0.
    let q = affine::quantize::<f32>(&[], &[0, 4], Granularity::PerTensor).unwrap();
    assert_eq!(q.params(0), AffineParams::EMPTY);
    let q = affine::quantize::<f32>(&[], &[3, 0], Granularity::PerChannel).unwrap();
    assert_eq!(q.scales(), &[1.0; 3]);
}

#[test]
fn input_is_not_modified() {
    let x = data(6, 4096, 9);
    let copy = x.clone();
    let _ = affine::quantize(&x, &[64, 64], Granularity::PerGroup(32)).unwrap();
    assert_eq!(bits(&x), bits(&copy));
}

/// NaN and ±inf are found by the min / max pass itself (no separate scan) on every path, granularity and
/// element type, wherever they sit: inside a vector step, in a tail, in the last row; the error names the
/// first one's flat index, for `calibrate`, `quantize` and `quantize_into`.
#[test]
fn non_finite_values_are_found_by_every_path_at_every_position() {
    let (rows, cols) = (5usize, 203usize); // 203 = 3·64 + 11: full AVX-512 steps, a 16-step and a tail
    let n = rows * cols;
    let base: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, 17, 63, 64, 200, 202, cols + 5, n - 1, n / 2] {
            let mut x = base.clone();
            x[at] = bad;
            if at + 7 < n {
                x[at + 7] = f32::NAN; // a later one must not be the one reported
            }
            for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(64)] {
                for path in KernelPath::all_available() {
                    check_non_finite(&x, &[rows, cols], g, path, at);
                    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                    check_non_finite(&xh, &[rows, cols], g, path, at);
                    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    check_non_finite(&xb, &[rows, cols], g, path, at);
                }
            }
        }
    }
    // Large enough for the threaded per-tensor min / max.
    let mut x = vec![0.25f32; 1 << 20];
    x[(1 << 20) - 3] = f32::INFINITY;
    for path in KernelPath::all_available() {
        check_non_finite(&x, &[1024, 1024], Granularity::PerTensor, path, (1 << 20) - 3);
        check_non_finite(&x, &[1024, 1024], Granularity::PerChannel, path, (1 << 20) - 3);
    }
    // Rows longer than the known-parameter quantizer's 4096-element check pieces: a value in a later piece of a
    // row, with a later row also bad (threads may meet that one first; the first must be named).
    let mut x = vec![-0.5f32; 8 * 10_000];
    x[3 * 10_000 + 9_000] = f32::NAN;
    x[7 * 10_000 + 5] = f32::INFINITY;
    for path in KernelPath::all_available() {
        for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(5_000)] {
            check_non_finite(&x, &[8, 10_000], g, path, 3 * 10_000 + 9_000);
        }
    }
}

#[track_caller]
fn check_non_finite<T: Element>(x: &[T], shape: &[usize], g: Granularity, path: KernelPath, at: usize) {
    let want = format!("index {at}");
    let e = affine::calibrate_with(x, shape, g, path).unwrap_err().to_string();
    assert!(e.contains(&want), "calibrate on {path} {g}: {e}");
    let e = affine::quantize_with(x, shape, g, path).unwrap_err().to_string();
    assert!(e.contains(&want), "quantize on {path} {g}: {e}");
    let (rows, cols) = lowbit::shape::as_matrix(shape).unwrap();
    let mut codes = vec![0u8; x.len()];
    let mut params = vec![AffineParams::EMPTY; g.num_params(rows, cols)];
    let e = affine::quantize_into_with(x, shape, g, &mut codes, &mut params, path).unwrap_err().to_string();
    assert!(e.contains(&want), "quantize_into on {path} {g}: {e}");
    // With valid parameters given, the quantizer's own per-piece check finds it.
    let given = vec![AffineParams { scale: 0.01, zero_point: 128 }; params.len()];
    let e = affine::quantize_with_params(x, shape, g, &given, path).unwrap_err().to_string();
    assert!(e.contains(&want), "quantize_with_params on {path} {g}: {e}");
    let e = affine::quantize_with_params_into(x, shape, g, &given, &mut codes, path).unwrap_err().to_string();
    assert!(e.contains(&want), "quantize_with_params_into on {path} {g}: {e}");
}

/// Caller buffers of the wrong length are errors, and then nothing is written.
#[test]
fn quantize_into_checks_its_buffers_first() {
    let x = vec![0.5f32; 64];
    let mut codes = vec![7u8; 63];
    let mut params = vec![AffineParams::EMPTY; 4];
    assert!(affine::quantize_into(&x, &[4, 16], Granularity::PerChannel, &mut codes, &mut params).is_err());
    assert!(codes.iter().all(|&c| c == 7));
    let mut codes = vec![7u8; 64];
    let mut params = vec![AffineParams::EMPTY; 3];
    assert!(affine::quantize_into(&x, &[4, 16], Granularity::PerChannel, &mut codes, &mut params).is_err());
    assert!(codes.iter().all(|&c| c == 7));
}
