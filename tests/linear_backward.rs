//! `QuantLinear::backward*` on every CPU path against the f64 reference, the reference against the forward
//! (directional derivatives), thread-count independence, accumulation and input validation.
//!
//! Tolerances (stated, not tuned):
//! * kernels vs reference: `QuantLinear::backward_error_bound` (f32 accumulation of each sum, derived in
//!   `lowbit::reference::linear_backward`), plus the half-ulp of the reference's own rounding to f32;
//! * reference vs forward: the loss `L = Σ dy ⊙ y` is linear in `x`, in `A` and in `B` separately, so the
//!   central difference `(L(p + δ) − L(p − δ)) / 2` with a step of 1 equals `⟨∂L/∂p, δ⟩` exactly; the only
//!   error is the reference forward's rounding of each `y` to f32 (half an ulp, weighted by `|dy|`, for both
//!   points), plus the f64 sums (1e-12 relative).

use lowbit::affine::Granularity;
use lowbit::cpu::KernelPath;
use lowbit::linear::{AdapterGrad, BackwardOptions, ForwardOptions, QuantLinear, QuantWeight, Workspace};
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
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let allowed = b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5;
        assert!(err <= allowed, "{what}: element {i}: got {g}, reference {w}, |err| {err:e} > bound {allowed:e}");
    }
}

fn format_strategy() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::Int8(Granularity::PerTensor)),
        Just(Scheme::Int8(Granularity::PerChannel)),
        (1usize..80).prop_map(|g| Scheme::Int8(Granularity::PerGroup(g))),
        (prop_oneof![Just(32usize), Just(64), Just(256)], any::<bool>(), any::<bool>())
            .prop_map(|(blocksize, dq, fp4)| if fp4 { Scheme::fp4(blocksize, dq) } else { Scheme::nf4(blocksize, dq) }),
    ]
}

fn compare_paths(layer: &QuantLinear, x: &[f32], dy: &[f32], opts: BackwardOptions<'_>, what: &str) {
    let want = layer.backward_with(x, dy, BackwardOptions { path: KernelPath::REFERENCE, ..opts }).unwrap();
    let bound = layer.backward_error_bound(x, dy, opts.adapters).unwrap();
    for path in KernelPath::all_available() {
        let got = layer.backward_with(x, dy, opts.path(path)).unwrap();
        let what = format!("{what} {path}");
        check(&got.dx, &want.dx, &bound.dx, &format!("{what} dx"));
        for (a, (g, w)) in got.adapters.iter().zip(&want.adapters).enumerate() {
            check(&g.a, &w.a, &bound.adapters[a].0, &format!("{what} dA[{a}]"));
            check(&g.b, &w.b, &bound.adapters[a].1, &format!("{what} dB[{a}]"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn backward_paths_match_reference(
        format in format_strategy(),
        out in 1usize..40,
        inp in 1usize..200,
        m in prop_oneof![Just(1usize), Just(2), Just(3), Just(7), Just(33)],
        bias: bool,
        ranks in proptest::collection::vec(1usize..20, 0..3),
        seed: u64,
    ) {
        let mut rng = Rng::new(seed | 1);
        let layer = make_layer(format, out, inp, bias, &ranks, &mut rng);
        let x = rng.vec(m * inp, 1.0);
        let dy = rng.vec(m * out, 1.0);
        compare_paths(&layer, &x, &dy, BackwardOptions::default(), &format!("{format:?} {out}x{inp} M={m}"));
        let ids: Vec<Option<usize>> =
            (0..m).map(|r| if ranks.is_empty() || r % 3 == 2 { None } else { Some(r % ranks.len()) }).collect();
        compare_paths(&layer, &x, &dy, BackwardOptions::default().adapter_ids(&ids), &format!("batch {format:?} {out}x{inp} M={m}"));
    }
}

/// `Σ dy ⊙ forward(x)` in f64 from the reference forward (the exact value rounded once to f32 per element), and
/// the allowance for those roundings: half an ulp of each `y`, weighted by `|dy|`.
fn loss(layer: &QuantLinear, x: &[f32], dy: &[f32]) -> (f64, f64) {
    let y = layer.forward_with(x, ForwardOptions::reference()).unwrap();
    let l = y.iter().zip(dy).map(|(&y, &d)| y as f64 * d as f64).sum();
    let tol = y.iter().zip(dy).map(|(&y, &d)| (d as f64).abs() * (y as f64).abs() * f32::EPSILON as f64 * 0.5).sum();
    (l, tol)
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

#[test]
fn reference_gradients_are_the_forward_derivatives() {
    for (s, scheme) in
        [Scheme::nf4(64, true), Scheme::fp4(32, false), Scheme::Int8(Granularity::PerGroup(16))].into_iter().enumerate()
    {
        let mut rng = Rng::new(0x5eed + s as u64);
        let (out, inp, m) = (13, 70, 3);
        let mut layer = make_layer(scheme, out, inp, true, &[4, 3], &mut rng);
        let x = rng.vec(m * inp, 1.0);
        let dy = rng.vec(m * out, 1.0);
        let g = layer.backward_with(&x, &dy, BackwardOptions::reference()).unwrap();
        let check_dir = |plus: (f64, f64), minus: (f64, f64), analytic: f64, what: &str| {
            let fd = (plus.0 - minus.0) / 2.0;
            let tol = (plus.1 + minus.1) / 2.0 + 1e-12 * analytic.abs().max(1.0);
            assert!(
                (fd - analytic).abs() <= tol,
                "{scheme:?} {what}: finite difference {fd}, analytic {analytic}, tol {tol:e}"
            );
        };
        // dx along a random direction.
        let d = rng.vec(m * inp, 1.0);
        let xp: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
        let xm: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a - b).collect();
        // x ± d is exact in f32 only if no rounding occurs; use the rounded points' actual difference.
        let dd: Vec<f32> = xp.iter().zip(&xm).map(|(p, q)| (p - q) / 2.0).collect();
        check_dir(loss(&layer, &xp, &dy), loss(&layer, &xm, &dy), dot64(&g.dx, &dd), "dx");
        // dA and dB of each adapter.
        for a in 0..2 {
            let base = layer.adapters()[a].clone();
            for which in ["A", "B"] {
                let len = if which == "A" { base.a().len() } else { base.b().len() };
                let d = rng.vec(len, 0.05);
                let mut at = |sign: f32| {
                    let ad = &mut layer.adapters_mut()[a];
                    let (v, orig) = if which == "A" { (ad.a_mut(), base.a()) } else { (ad.b_mut(), base.b()) };
                    for ((v, &o), &di) in v.iter_mut().zip(orig).zip(&d) {
                        *v = o + sign * di;
                    }
                    let vals: Vec<f32> = v.to_vec();
                    (loss(&layer, &x, &dy), vals)
                };
                let (lp, vp) = at(1.0);
                let (lm, vm) = at(-1.0);
                let dd: Vec<f32> = vp.iter().zip(&vm).map(|(p, q)| (p - q) / 2.0).collect();
                let grad = if which == "A" { &g.adapters[a].a } else { &g.adapters[a].b };
                check_dir(lp, lm, dot64(grad, &dd), &format!("d{which}[{a}]"));
                layer.adapters_mut()[a] = base.clone();
            }
        }
    }
}

#[test]
fn gradients_do_not_depend_on_the_thread_count_and_accumulate() {
    let mut rng = Rng::new(77);
    let (out, inp, m) = (200, 300, 40);
    let layer = make_layer(Scheme::nf4(64, true), out, inp, true, &[8, 5], &mut rng);
    let x = rng.vec(m * inp, 1.0);
    let dy = rng.vec(m * out, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        // Inside the pool every split is taken, so the threaded code runs even for this small layer.
        pool.install(|| layer.backward_with(&x, &dy, BackwardOptions::default()).unwrap())
    };
    let (one, two, three) = (run(1), run(2), run(3));
    assert_eq!(one, two);
    assert_eq!(one, three);
    // A second call adds: grads twice as large (exactly: doubling is exact in binary floating point).
    let mut grads = layer.zero_grads();
    let mut ws = Workspace::default();
    for _ in 0..2 {
        layer.backward_into(&x, &dy, None, &mut grads, &mut ws, BackwardOptions::default()).unwrap();
    }
    for (g2, g1) in grads.iter().zip(&one.adapters) {
        assert!(g2.a.iter().zip(&g1.a).all(|(a, b)| *a == 2.0 * b));
        assert!(g2.b.iter().zip(&g1.b).all(|(a, b)| *a == 2.0 * b));
    }
}

#[test]
fn bad_inputs_are_errors_and_write_nothing() {
    let mut rng = Rng::new(3);
    let layer = make_layer(Scheme::nf4(64, false), 8, 64, false, &[2], &mut rng);
    let x = rng.vec(2 * 64, 1.0);
    let dy = rng.vec(2 * 8, 1.0);
    let mut ws = Workspace::default();
    let opts = BackwardOptions::default();
    let sentinel = |n: usize| vec![7.0f32; n];
    let untouched = |v: &[f32]| v.iter().all(|&v| v == 7.0);
    let mut grads = vec![AdapterGrad { a: sentinel(2 * 64), b: sentinel(8 * 2) }];
    let mut dx = sentinel(2 * 64);
    // dy of the wrong length.
    let e = layer.backward_into(&x, &dy[..15], Some(&mut dx), &mut grads, &mut ws, opts).unwrap_err();
    assert!(e.to_string().contains("dy"), "{e}");
    // NaN in dy.
    let mut bad = dy.clone();
    bad[3] = f32::NAN;
    let e = layer.backward_into(&x, &bad, Some(&mut dx), &mut grads, &mut ws, opts).unwrap_err();
    assert!(e.to_string().contains("dy"), "{e}");
    // dx of the wrong length.
    let mut short = sentinel(10);
    assert!(layer.backward_into(&x, &dy, Some(&mut short), &mut grads, &mut ws, opts).is_err());
    // Gradients of the wrong shape or count.
    let mut wrong = vec![AdapterGrad { a: sentinel(2 * 63), b: sentinel(16) }];
    let e = layer.backward_into(&x, &dy, Some(&mut dx), &mut wrong, &mut ws, opts).unwrap_err();
    assert!(e.to_string().contains("gradients of adapter"), "{e}");
    assert!(layer.backward_into(&x, &dy, Some(&mut dx), &mut [], &mut ws, opts).is_err());
    // A per-row selection with an id out of range.
    let ids = [Some(5), None];
    assert!(layer.backward_into(&x, &dy, Some(&mut dx), &mut grads, &mut ws, opts.adapter_ids(&ids)).is_err());
    assert!(untouched(&dx) && untouched(&short) && untouched(&grads[0].a) && untouched(&grads[0].b));
    assert!(untouched(&wrong[0].a));
    // An overflow is reported, not returned silently.
    let big = vec![3e38f32; 2 * 8];
    let e = layer.backward_into(&x, &big, Some(&mut dx), &mut grads, &mut ws, opts).unwrap_err();
    assert!(matches!(e, lowbit::Error::NonFinite { .. }), "{e}");
}
