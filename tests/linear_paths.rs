//! Every fused QuantLinear path against the f64 reference, for every weight format.
//!
//! Tolerance (stated, not tuned): `QuantLinear::error_bound`, derived from f32 accumulation error
//! (`|y − y_ref| ≤ (K+3)·ε·Σ|x·w| + ε·|bias| + Σ (K+r+3)·ε·|s|·Σ_r(Σ_k|x·A|)·|B|`; see
//! `lowbit::reference::linear::error_bound` for the derivation), plus the half-ulp of the reference's own final
//! rounding to f32.

use lowbit::affine::{self, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use lowbit_testkit::Rng;
use proptest::prelude::*;

fn make_layer(scheme: Scheme, out: usize, inp: usize, bias: bool, ranks: &[usize], rng: &mut Rng) -> QuantLinear {
    let w = rng.vec(out * inp, 0.5);
    let weight = QuantWeight::quantize(&w, &[out, inp], scheme).unwrap();
    let bias = bias.then(|| rng.vec(out, 1.0));
    let mut layer = QuantLinear::new(weight, bias).unwrap();
    for (i, &r) in ranks.iter().enumerate() {
        let a = rng.vec(r * inp, 0.3);
        let b = rng.vec(out * r, 0.3);
        let ad = LoraAdapter::new(format!("adapter{i}"), r, a, b, 2.0 * r as f32, i % 2 == 1).unwrap();
        layer.add_adapter(ad).unwrap();
    }
    layer
}

fn check(got: &[f32], want: &[f32], bound: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w as f64).abs();
        // The reference is rounded to f32 once: allow that half-ulp too.
        let allowed = b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5;
        assert!(err <= allowed, "{what}: element {i}: got {g}, reference {w}, |err| {err:e} > bound {allowed:e}");
    }
}

/// `layer`'s forward of `x` on every available path against the reference, within the stated bound.
fn every_path_matches_reference(layer: &QuantLinear, x: &[f32], what: &str) {
    let want = layer.forward_with(x, lowbit::linear::ForwardOptions::reference()).unwrap();
    let bound =
        layer.error_bound(x, lowbit::linear::ForwardOptions::default(), lowbit::linear::BoundTarget::Cpu).unwrap();
    for path in KernelPath::all_available() {
        let got = layer.forward_with(x, lowbit::linear::ForwardOptions::default().path(path)).unwrap();
        check(&got, &want, &bound, &format!("{what} {path}"));
    }
}

fn format_strategy() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::Int8(Granularity::PerTensor)),
        Just(Scheme::Int8(Granularity::PerChannel)),
        (1usize..80).prop_map(|g| Scheme::Int8(Granularity::PerGroup(g))),
        (prop_oneof![Just(32usize), Just(64), Just(128), Just(256)], any::<bool>(), any::<bool>())
            .prop_map(|(blocksize, dq, fp4)| if fp4 { Scheme::fp4(blocksize, dq) } else { Scheme::nf4(blocksize, dq) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fused_paths_match_reference(
        format in format_strategy(),
        out in 1usize..40,
        inp in 1usize..300,
        m in prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(5), Just(8), Just(17), Just(64)],
        bias: bool,
        ranks in proptest::collection::vec(1usize..65, 0..3),
        seed: u64,
    ) {
        let mut rng = Rng::new(seed | 1);
        let layer = make_layer(format, out, inp, bias, &ranks, &mut rng);
        let x = rng.vec(m * inp, 1.0);
        let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
        let bound = layer.error_bound(&x, lowbit::linear::ForwardOptions::default(), lowbit::linear::BoundTarget::Cpu).unwrap();
        for path in KernelPath::all_available() {
            let got = layer.forward_with(&x, lowbit::linear::ForwardOptions::default().path(path)).unwrap();
            check(&got, &want, &bound, &format!("{format:?} {out}x{inp} M={m} {path}"));
        }
        // Multi-adapter batch: ids mixed and absent.
        let ids: Vec<Option<usize>> = (0..m).map(|r| if ranks.is_empty() || r % 3 == 2 { None } else { Some(r % ranks.len()) }).collect();
        let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference().adapter_ids(&ids)).unwrap();
        let bound = layer.error_bound(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&ids), lowbit::linear::BoundTarget::Cpu).unwrap();
        for path in KernelPath::all_available() {
            let got = layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&ids).path(path)).unwrap();
            check(&got, &want, &bound, &format!("batch {format:?} {out}x{inp} M={m} {path}"));
        }
    }
}

#[test]
fn nf4_blocks_crossing_rows_and_odd_sizes() {
    // in = 100 is not a multiple of 64: blocks cross row boundaries, rows start on odd nibbles (in odd below).
    for (out, inp) in [(1, 1), (3, 100), (7, 33), (130, 97), (65, 257)] {
        let mut rng = Rng::new(42 + out as u64);
        for format in [Scheme::nf4(64, false), Scheme::nf4(32, true)] {
            let layer = make_layer(format, out, inp, true, &[3, 16], &mut rng);
            for m in [1, 4, 5] {
                let x = rng.vec(m * inp, 2.0);
                every_path_matches_reference(&layer, &x, &format!("{out}x{inp} M={m}"));
            }
        }
    }
}

#[test]
fn gemm_panels_of_whole_16_row_groups_match_reference() {
    // Panels of whole sixteens of inputs and 16 rows: the AVX-512 GEMM decodes 4-bit rows (in % 16 == 0) and int8
    // rows (groups of whole sixteens; group 24 is not) straight into its transposed panels (the other cases
    // decode row by row); 33 rows leave a 1-row strip, 384 inputs make three whole 128-input panels, 272 two and
    // a 16-input tail, 576 (SmolLM2) four and a 64-input tail, 200 a 72-input tail (row by row).
    for (out, inp) in [(48, 256), (33, 384), (16, 272), (32, 576), (17, 200)] {
        let mut rng = Rng::new(7 + out as u64);
        for format in [
            Scheme::nf4(64, false),
            Scheme::nf4(64, true),
            Scheme::fp4(128, true),
            Scheme::nf4(32, false),
            Scheme::Int8(Granularity::PerTensor),
            Scheme::Int8(Granularity::PerChannel),
            Scheme::Int8(Granularity::PerGroup(48)),
            Scheme::Int8(Granularity::PerGroup(24)),
        ] {
            let layer = make_layer(format, out, inp, true, &[], &mut rng);
            for m in [5, 12, 64] {
                let x = rng.vec(m * inp, 2.0);
                every_path_matches_reference(&layer, &x, &format!("{format:?} {out}x{inp} M={m}"));
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = Rng::new(7);
    let layer = make_layer(Scheme::nf4(64, true), 300, 520, true, &[8], &mut rng);
    // M = 1 takes its own route (each block task rounds straight into y), so it is checked too, with a
    // half-precision output that must be the f32 output rounded.
    for m in [9, 1] {
        let x = rng.vec(m * 520, 1.0);
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                let mut ws = lowbit::linear::Workspace::default();
                let mut y16 = vec![lowbit::bf16::ZERO; m * 300];
                layer.forward_into(&x, &mut y16, &mut ws).unwrap();
                (layer.forward(&x).unwrap(), y16)
            })
        };
        let (one, one16) = run(1);
        assert_eq!(one16, one.iter().map(|&v| lowbit::bf16::from_f32(v)).collect::<Vec<_>>(), "m = {m}");
        assert_eq!((one.clone(), one16.clone()), run(2), "m = {m}");
        assert_eq!((one, one16), run(3), "m = {m}");
    }
}

/// A forward of up to 4 rows of `x` (up to 8 with int8 activations over the interleaved layout) splits into one
/// block per thread (whole groups of 16 rows; here 392 rows, the last group half padding); the bits stay
/// those of the same instruction set without threads (no split), for 1–3 threads, with the forward run inside
/// the pool, as an engine's decode runs it (where this size splits), with two adapters applied (a split forward's
/// blocks compute their LoRA shrink in pieces: the same bits as the whole shrink).
#[test]
fn thread_count_does_not_change_results_of_one_block_per_thread() {
    use lowbit::linear::{Activations, ForwardOptions};
    let mut rng = Rng::new(17);
    // Rank 16 takes the expand's 16-output groups, rank 8 its one-dot-per-output form.
    let mut layer = make_layer(Scheme::nf4(64, true), 392, 576, true, &[8, 16], &mut rng);
    layer.build_act8_layout();
    for activations in [Activations::F32, Activations::Int8] {
        let opts = ForwardOptions::default().activations(activations);
        for m in [1, 3, 4, 5, 8, 9] {
            let x = rng.vec(m * 576, 1.0);
            let run = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| layer.forward_with(&x, opts).unwrap())
            };
            // The same path without threads: no split, the LoRA shrink computed whole before the blocks (a split
            // forward's blocks compute it in pieces, with the same bits).
            let single = KernelPath { parallel: false, ..KernelPath::best() };
            let one = layer.forward_with(&x, opts.path(single)).unwrap();
            for threads in [1, 2, 3] {
                let got = run(threads);
                let first_difference = (0..one.len()).find(|&i| one[i].to_bits() != got[i].to_bits());
                assert_eq!(first_difference, None, "{activations:?} m = {m}, {threads} threads");
            }
        }
    }
}

#[test]
fn half_inputs_are_widened_exactly() {
    let mut rng = Rng::new(9);
    let layer = make_layer(Scheme::Int8(Granularity::PerChannel), 20, 70, false, &[4], &mut rng);
    let x: Vec<lowbit::bf16> = rng.vec(3 * 70, 1.0).into_iter().map(lowbit::bf16::from_f32).collect();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    assert_eq!(layer.forward(&x).unwrap(), layer.forward(&xf).unwrap());
}

#[test]
fn disabled_adapters_do_not_apply() {
    let mut rng = Rng::new(11);
    let mut layer = make_layer(Scheme::nf4(64, false), 16, 64, false, &[4], &mut rng);
    let x = rng.vec(64, 1.0);
    let with = layer.forward(&x).unwrap();
    layer.set_adapter_enabled("adapter0", false).unwrap();
    let without = layer.forward(&x).unwrap();
    assert_ne!(with, without);
    let base = QuantLinear::new(layer.weight().clone(), None).unwrap().forward(&x).unwrap();
    assert_eq!(without, base);
    assert!(
        layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&[Some(0)])).is_err(),
        "a disabled adapter cannot be selected"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng::new(13);
    let mut layer = make_layer(Scheme::Int8(Granularity::PerTensor), 8, 16, true, &[2], &mut rng);
    let x = rng.vec(2 * 16, 1.0);
    assert!(layer.forward(&x[..15]).is_err(), "x not a multiple of in");
    assert!(layer.forward(&[f32::NAN; 16]).is_err(), "NaN input");
    assert!(
        layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&[Some(0)])).is_err(),
        "ids length != M"
    );
    assert!(
        layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&[Some(0), Some(1)])).is_err(),
        "id out of range"
    );
    assert!(layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&[None, Some(0)])).is_ok());
    assert!(layer
        .add_adapter(LoraAdapter::new("x", 2, vec![0.0; 2 * 15], vec![0.0; 16], 1.0, false).unwrap())
        .is_err());
    assert!(layer
        .add_adapter(LoraAdapter::new("adapter0", 2, vec![0.0; 32], vec![0.0; 16], 1.0, false).unwrap())
        .is_err());
    assert!(LoraAdapter::new("z", 0, vec![], vec![], 1.0, false).is_err());
    assert!(LoraAdapter::new("z", 3, vec![0.0; 4], vec![0.0; 3], 1.0, false).is_err());
    assert!(LoraAdapter::new("z", 1, vec![f32::INFINITY], vec![0.0], 1.0, false).is_err());
    let w1 = affine::quantize(&[1.0f32; 4], &[4], Granularity::PerTensor).unwrap();
    assert!(QuantLinear::new(QuantWeight::Int8(w1), None).is_err(), "1-D weight");
    let w = affine::quantize(&[1.0f32; 4], &[2, 2], Granularity::PerTensor).unwrap();
    assert!(QuantLinear::new(QuantWeight::Int8(w), Some(vec![0.0; 3])).is_err(), "bias length");
    assert_eq!(layer.forward::<f32>(&[]).unwrap(), Vec::<f32>::new(), "M = 0 is an empty batch");
}

#[test]
fn nf4_rows_of_whole_blocks_take_the_register_gemv() {
    // in % blocksize == 0 and M <= 4: the x86 paths decode in registers and scale once per block.
    for (out, inp, blocksize) in [(70, 256, 32), (9, 512, 64), (33, 384, 128), (5, 256, 256)] {
        let mut rng = Rng::new(99 + inp as u64);
        for dq in [false, true] {
            let layer = make_layer(Scheme::nf4(blocksize, dq), out, inp, true, &[5], &mut rng);
            for m in 1..=5 {
                let x = rng.vec(m * inp, 1.5);
                let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
                let bound = layer
                    .error_bound(&x, lowbit::linear::ForwardOptions::default(), lowbit::linear::BoundTarget::Cpu)
                    .unwrap();
                for path in KernelPath::all_available() {
                    check(
                        &layer.forward_with(&x, lowbit::linear::ForwardOptions::default().path(path)).unwrap(),
                        &want,
                        &bound,
                        &format!("{out}x{inp}/{blocksize} M={m} {path}"),
                    );
                }
            }
        }
    }
}

#[test]
fn int8_register_gemv_per_tensor_channel_and_group() {
    // M <= 4 and groups that are multiples of 16 take the x86 register GEMV; group 24 and M = 5 do not. Rows
    // of whole 16-multiples (96, 256) take the AVX-512 kernel that shares `x` across 4 weight rows (17 and 41
    // rows: groups of 4 plus leftovers).
    let grans = [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(32), Granularity::PerGroup(24)];
    for g in grans {
        for (out, inp) in [(1, 1), (17, 100), (40, 257), (17, 96), (41, 256)] {
            let mut rng = Rng::new(5 + inp as u64);
            let layer = make_layer(Scheme::Int8(g), out, inp, true, &[3], &mut rng);
            for m in 1..=5 {
                let x = rng.vec(m * inp, 1.5);
                let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
                let bound = layer
                    .error_bound(&x, lowbit::linear::ForwardOptions::default(), lowbit::linear::BoundTarget::Cpu)
                    .unwrap();
                for path in KernelPath::all_available() {
                    check(
                        &layer.forward_with(&x, lowbit::linear::ForwardOptions::default().path(path)).unwrap(),
                        &want,
                        &bound,
                        &format!("{g} {out}x{inp} M={m} {path}"),
                    );
                }
            }
        }
    }
}

/// `forward_into` rounds the f32 result to f16 / bf16 nearest-even (the same bits as rounding `forward`'s f32
/// output), accepts f16 / bf16 `x`, reuses one workspace across layers and shapes, and refuses a `y` of the
/// wrong length without touching it.
#[test]
fn forward_into_writes_f32_f16_bf16_outputs_and_checks_y() {
    use lowbit::linear::{ForwardOptions, Workspace};
    use lowbit::{bf16, f16};
    let mut rng = Rng::new(0x5eed_f00d);
    let mut ws = Workspace::default();
    for (format, out, inp, m) in [
        (Scheme::nf4(64, true), 70, 128, 3),
        (Scheme::Int8(Granularity::PerGroup(32)), 65, 96, 9),
        (Scheme::Int8(Granularity::PerChannel), 129, 64, 1),
    ] {
        let layer = make_layer(format, out, inp, true, &[4], &mut rng);
        let x = rng.vec(m * inp, 1.0);
        for path in KernelPath::all_available() {
            let opts = ForwardOptions::default().path(path);
            let want = layer.forward_with(&x, opts).unwrap();
            let mut y32 = vec![f32::NAN; m * out];
            layer.forward_into_with(&x, &mut y32, &mut ws, opts).unwrap();
            assert_eq!(y32, want, "{format:?} {path}: f32 output");
            let mut y16 = vec![f16::ZERO; m * out];
            layer.forward_into_with(&x, &mut y16, &mut ws, opts).unwrap();
            assert!(y16.iter().zip(&want).all(|(a, b)| a.to_bits() == f16::from_f32(*b).to_bits()), "{path}: f16");
            let mut yb = vec![bf16::ZERO; m * out];
            layer.forward_into_with(&x, &mut yb, &mut ws, opts).unwrap();
            assert!(yb.iter().zip(&want).all(|(a, b)| a.to_bits() == bf16::from_f32(*b).to_bits()), "{path}: bf16");
            // f16 input: the same as widening it first.
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xw: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            layer.forward_into_with(&xh, &mut y32, &mut ws, opts).unwrap();
            assert_eq!(y32, layer.forward_with(&xw, opts).unwrap(), "{path}: f16 input");
        }
        let mut short = vec![7.0f32; m * out - 1];
        let e = layer.forward_into(&x, &mut short, &mut ws).unwrap_err().to_string();
        assert!(e.contains("length of y"), "{e}");
        assert!(short.iter().all(|&v| v == 7.0), "y untouched on error");
    }
}

/// Ranks that are multiples of the vector width take the grouped LoRA kernels (16 on AVX-512, 8 on AVX2: that
/// many shrink dot products at once, that many expand outputs per reduction tree): every output position in a
/// group and the tails past it, ranks that are multiples of 8 but not 16, inputs shorter and longer than a
/// vector, a mixed multi-adapter batch.
#[test]
fn lora_ranks_of_sixteens_match_reference_on_every_path() {
    let mut rng = Rng::new(7);
    for (out, inp) in [(1, 16), (15, 33), (16, 1), (17, 256), (40, 15), (64, 100)] {
        let layer = make_layer(Scheme::nf4(32, false), out, inp, true, &[16, 32, 48, 5, 24], &mut rng);
        for m in [1, 2, 9] {
            let x = rng.vec(m * inp, 1.5);
            let ids: Vec<Option<usize>> = (0..m).map(|r| if r % 5 == 4 { None } else { Some(r % 4) }).collect();
            for opts in
                [lowbit::linear::ForwardOptions::default(), lowbit::linear::ForwardOptions::default().adapter_ids(&ids)]
            {
                let want = layer.forward_with(&x, opts.path(KernelPath::REFERENCE)).unwrap();
                let bound = layer.error_bound(&x, opts, lowbit::linear::BoundTarget::Cpu).unwrap();
                for path in KernelPath::all_available() {
                    let got = layer.forward_with(&x, opts.path(path)).unwrap();
                    check(&got, &want, &bound, &format!("{out}x{inp} M={m} {path}"));
                }
            }
        }
    }
}
