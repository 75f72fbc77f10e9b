//! Int8 activations (`Activations::Int8`) on every CPU path against the exact f32-mode reference, within the
//! derived bound `QuantLinear::error_bound(.., activations = Int8, ..)` (`docs/formats.md` §9: the
//! quantization of `x` (≤ amax/254 per element), of the 4-bit table to int8 (≤ absmax/254 per weight), and the
//! kernels' f32 rounding of exact integer sums). The tight per-kernel check against the exact int8 value is
//! the unit test in `src/cpu/linear_act8.rs`.

use lowbit::affine::Granularity;
use lowbit::cpu::KernelPath;
use lowbit::linear::{Activations, Agreement, BoundTarget, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use lowbit_testkit::Rng;
use proptest::prelude::*;

fn make_layer(scheme: Scheme, out: usize, inp: usize, bias: bool, ranks: &[usize], rng: &mut Rng) -> QuantLinear {
    let w = rng.vec(out * inp, 0.5);
    let weight = QuantWeight::quantize(&w, &[out, inp], scheme).unwrap();
    let mut layer = QuantLinear::new(weight, bias.then(|| rng.vec(out, 1.0))).unwrap();
    for (i, &r) in ranks.iter().enumerate() {
        let ad =
            LoraAdapter::new(format!("a{i}"), r, rng.vec(r * inp, 0.3), rng.vec(out * r, 0.3), 2.0 * r as f32, false);
        layer.add_adapter(ad.unwrap()).unwrap();
    }
    layer
}

fn scheme_strategy() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::Int8(Granularity::PerTensor)),
        Just(Scheme::Int8(Granularity::PerChannel)),
        prop_oneof![1usize..80, Just(64), Just(128)].prop_map(|g| Scheme::Int8(Granularity::PerGroup(g))),
        (prop_oneof![Just(32usize), Just(64), Just(128), Just(256)], any::<bool>(), any::<bool>())
            .prop_map(|(bs, dq, fp4)| if fp4 { Scheme::fp4(bs, dq) } else { Scheme::nf4(bs, dq) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn int8_activations_within_the_derived_bound(
        scheme in scheme_strategy(),
        out in 1usize..40,
        // Odd widths (the portable kernel) and whole 64-chunks (the VNNI kernel where the CPU has it).
        inp in prop_oneof![1usize..300, (1usize..6).prop_map(|c| 64 * c)],
        m in prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(5), Just(8), Just(17)],
        bias: bool,
        ranks in proptest::collection::vec(1usize..17, 0..3),
        x_scale in prop_oneof![Just(1.0f32), Just(1e-3), Just(300.0)],
        seed: u64,
    ) {
        let mut rng = Rng::new(seed | 1);
        let layer = make_layer(scheme, out, inp, bias, &ranks, &mut rng);
        let x = rng.vec(m * inp, x_scale);
        let want = layer.forward_with(&x, ForwardOptions::reference()).unwrap();
        let int8 = ForwardOptions::default().activations(Activations::Int8);
        let bound = layer.error_bound(&x, int8, BoundTarget::Cpu).unwrap();
        // And with the interleaved layout (`build_act8_layout`; built only where the CPU has AVX-512 VNNI and
        // the weight fits it, else the same kernels run again).
        let mut interleaved = layer.clone();
        let built = interleaved.build_act8_layout();
        for (l, name) in [(&layer, "plain"), (&interleaved, if built { "interleaved" } else { "plain again" })] {
            for path in KernelPath::all_available() {
                let got = l.forward_with(&x, int8.path(path)).unwrap();
                let a = Agreement::compare(&got, &want, &bound);
                prop_assert!(a.outside == 0, "{scheme:?} {out}x{inp} M={m} {path} {name}: {a:?}");
            }
        }
    }
}

/// The quantization of `x` by hand: one block with `amax = 127` (so `d = 1` and codes are `x` rounded half to
/// even) against an int8 weight of ones, where the int8 forward is `Σ q · ŵ`.
#[test]
fn x_codes_round_half_to_even() {
    let w = vec![1.0f32; 32];
    let layer =
        QuantLinear::new(QuantWeight::quantize(&w, &[1, 32], Scheme::Int8(Granularity::PerTensor)).unwrap(), None)
            .unwrap();
    let w_hat = layer.weight().dequantize_reference()[0] as f64;
    let mut x = vec![0f32; 32];
    x[..8].copy_from_slice(&[127.0, 63.5, 2.5, 1.5, -0.5, -2.5, 0.49, -126.6]);
    let codes = [127.0, 64.0, 2.0, 2.0, 0.0, -2.0, 0.0, -127.0];
    let want = codes.iter().sum::<f64>() * w_hat;
    for path in KernelPath::all_available() {
        let opts = ForwardOptions::default().path(path).activations(Activations::Int8);
        let got = layer.forward_with(&x, opts).unwrap()[0] as f64;
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{path}: {got} vs {want}");
    }
    let exact = layer.forward_with(&x, ForwardOptions::reference().activations(Activations::Int8)).unwrap()[0] as f64;
    assert!((exact - want).abs() <= 1e-6 * want.abs(), "reference: {exact} vs {want}");
}

/// Int8 activations really quantize (the result differs from the f32 mode), all-zero rows give exactly the
/// bias, and a GPU bound target is refused with a clear error.
#[test]
fn int8_mode_quantizes_and_refuses_gpu_bounds() {
    let mut rng = Rng::new(11);
    let layer = make_layer(Scheme::nf4(64, true), 16, 128, true, &[], &mut rng);
    let x = rng.vec(2 * 128, 1.0);
    let f32_mode = layer.forward(&x).unwrap();
    let int8 = layer.forward_with(&x, ForwardOptions::default().activations(Activations::Int8)).unwrap();
    assert_ne!(f32_mode, int8);
    let zeros = layer.forward_with(&[0f32; 128], ForwardOptions::default().activations(Activations::Int8)).unwrap();
    assert_eq!(zeros.as_slice(), layer.bias().unwrap());
    let err =
        layer.error_bound(&x, ForwardOptions::default().activations(Activations::Int8), BoundTarget::Gpu).unwrap_err();
    assert!(err.to_string().contains("int8 activations"), "{err}");
}
