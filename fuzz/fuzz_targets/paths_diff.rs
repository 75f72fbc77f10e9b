//! Differential target: every fast path (`KernelPath::all_available()`: SIMD levels, single-threaded and threaded)
//! against `KernelPath::REFERENCE` on arbitrary inputs.
//!
//! * affine calibrate / quantize / dequantize and NF4 / FP4 quantize (with and without double quantization)
//!   / dequantize: identical codes, scales and dequantized bits (f32, f16, bf16 outputs), and identical
//!   errors (the same first non-finite index) on invalid input;
//! * `QuantLinear::forward` / `forward_batch`: within the f32 accumulation bound of tests/linear_paths.rs,
//!   `(K+3)·ε·Σ|x·w| + ε·|bias| + Σ_lora (K+r+3)·ε·|s|·Σ_r(Σ_k|x·A|)·|B|` plus half an ulp of the reference;
//! * the same forwards with int8 activations (`Activations::Int8`), with and without the interleaved layout
//!   (`build_act8_layout`): within their derived bound `QuantLinear::error_bound(.., Int8, Cpu)` of the exact
//!   reference (`docs/formats.md` §12).
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lowbit::affine::{self, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::linear::{Activations, BoundTarget, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::nf4::{self, FourBitFormat, FourBitTensor};
use lowbit::{bf16, f16, Element, Scheme};

#[derive(Arbitrary, Debug)]
enum Target {
    Quant { scheme: common::FuzzScheme, dims: Vec<u16>, big: bool },
    Linear { scheme: common::FuzzScheme, out: u8, inp: u16, m: u8, bias: bool, ranks: Vec<u8>, ids: Vec<Option<u8>> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    target: Target,
    fill: common::Fill,
    raw: Vec<u32>,
    seed: u64,
}

/// The scheme with every parameter made valid (group sizes 1..=300, allowed block sizes): this target
/// compares paths, the `quantize` target covers invalid parameters.
fn valid(s: Scheme) -> Scheme {
    match s {
        Scheme::Int8(Granularity::PerGroup(g)) => Scheme::Int8(Granularity::PerGroup(g % 300 + 1)),
        Scheme::FourBit { format, blocksize, double_quant } if !nf4::BLOCK_SIZES.contains(&blocksize) => {
            Scheme::FourBit { format, blocksize: nf4::BLOCK_SIZES[blocksize % nf4::BLOCK_SIZES.len()], double_quant }
        }
        s => s,
    }
}

fn granularity(s: Scheme) -> Option<Granularity> {
    match s {
        Scheme::Int8(g) => Some(g),
        Scheme::FourBit { .. } => None,
    }
}

fn four_bit(s: Scheme) -> Option<(FourBitFormat, usize, bool)> {
    match s {
        Scheme::FourBit { format, blocksize, double_quant } => Some((format, blocksize, double_quant)),
        Scheme::Int8(_) => None,
    }
}

fn same<T: Element>(a: &[T], b: &[T]) -> bool {
    bytemuck::cast_slice::<T, u8>(a) == bytemuck::cast_slice::<T, u8>(b)
}

fn dequant_all<T: Element>(f: impl Fn(KernelPath) -> Vec<T>) {
    let want = f(KernelPath::REFERENCE);
    for path in KernelPath::all_available() {
        assert!(same(&f(path), &want), "dequantize ({:?}) on {path} differs from the reference", T::DTYPE);
    }
}

fn check_affine_tensor(t: &affine::AffineTensor) {
    dequant_all::<f32>(|p| t.dequantize_with(p).unwrap());
    dequant_all::<f16>(|p| t.dequantize_with(p).unwrap());
    dequant_all::<bf16>(|p| t.dequantize_with(p).unwrap());
}

fn check_four_bit_tensor(t: &FourBitTensor) {
    dequant_all::<f32>(|p| t.dequantize_with(p).unwrap());
    dequant_all::<f16>(|p| t.dequantize_with(p).unwrap());
    dequant_all::<bf16>(|p| t.dequantize_with(p).unwrap());
}

fn quant<T: Element>(scheme: Scheme, x: &[T], shape: &[usize]) {
    if let Some(g) = granularity(scheme) {
        let want_p = affine::calibrate_with(x, shape, g, KernelPath::REFERENCE).map_err(|e| e.to_string());
        let want = affine::quantize_with(x, shape, g, KernelPath::REFERENCE).map_err(|e| e.to_string());
        for path in KernelPath::all_available() {
            let got_p = affine::calibrate_with(x, shape, g, path).map_err(|e| e.to_string());
            assert_eq!(format!("{got_p:?}"), format!("{want_p:?}"), "calibrate on {path}");
            let got = affine::quantize_with(x, shape, g, path).map_err(|e| e.to_string());
            match (&got, &want) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.codes(), b.codes(), "codes on {path}");
                    assert!(common::bits_eq(a.scales(), b.scales()), "scales on {path}");
                    assert_eq!(a.zero_points(), b.zero_points(), "zero points on {path}");
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "error on {path}"),
                _ => panic!("{path}: {got:?} vs reference {want:?}"),
            }
        }
        if let Ok(t) = want {
            check_affine_tensor(&t);
        }
    }
    if let Some((format, bs, dq)) = four_bit(scheme) {
        let want = nf4::quantize_4bit_with(format, x, shape, bs, dq, KernelPath::REFERENCE).map_err(|e| e.to_string());
        for path in KernelPath::all_available() {
            let got = nf4::quantize_4bit_with(format, x, shape, bs, dq, path).map_err(|e| e.to_string());
            match (&got, &want) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.packed(), b.packed(), "packed codes on {path}");
                    assert!(common::bits_eq(&a.absmax(), &b.absmax()), "scales on {path}");
                    assert_eq!(a, b, "tensor on {path}");
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "error on {path}"),
                _ => panic!("{path}: {got:?} vs reference {want:?}"),
            }
        }
        if let Ok(t) = want {
            check_four_bit_tensor(&t);
        }
    }
}

/// Per-element bound of tests/linear_paths.rs, or `None` where the sums leave the range in which the f32
/// accumulation of a fast path cannot overflow (those elements are not compared).
fn bounds(layer: &QuantLinear, x: &[f32], rows_adapters: &[Vec<usize>]) -> Vec<Option<f64>> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    let mut b = Vec::new();
    for (r, ads) in rows_adapters.iter().enumerate() {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let s_base: f64 =
                xr.iter().zip(&w[o * inp..(o + 1) * inp]).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let mut bound = (inp as f64 + 3.0) * eps * s_base;
            let mut total = s_base;
            if let Some(bias) = layer.bias() {
                bound += eps * (bias[o] as f64).abs();
                total += (bias[o] as f64).abs();
            }
            for &a in ads {
                let ad = &layer.adapters()[a];
                let rank = ad.rank();
                let mut s_lora = 0.0;
                for k in 0..rank {
                    let t: f64 = xr
                        .iter()
                        .zip(&ad.a()[k * inp..(k + 1) * inp])
                        .map(|(&x, &a)| (x as f64 * a as f64).abs())
                        .sum();
                    total = total.max(t);
                    s_lora += t * (ad.b()[o * rank + k] as f64).abs();
                }
                let s = (ad.scaling() as f64).abs();
                bound += (inp + rank + 3) as f64 * eps * s * s_lora;
                total += s * s_lora + s_lora;
            }
            b.push((total < 1e30).then_some(bound + 1e-30));
        }
    }
    b
}

/// The forward result of one path. Finite inputs may still overflow f32 (the library then reports
/// `NonFinite` for `y`); a path may do so only where the reference is within its error bound of f32::MAX.
fn path_result(r: lowbit::Result<Vec<f32>>, want: &[f32], bound: &[Option<f64>], what: &str) -> Option<Vec<f32>> {
    match r {
        Ok(y) => Some(y),
        Err(lowbit::Error::NonFinite { arg, .. }) if arg.starts_with('y') => {
            let near_max = want
                .iter()
                .zip(bound)
                .any(|(&w, b)| b.is_none_or(|b| w.abs() as f64 + 2.0 * b >= f32::MAX as f64));
            assert!(near_max, "{what}: overflowed although the reference is far from f32::MAX");
            None
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

fn check_linear(got: &[f32], want: &[f32], bound: &[Option<f64>], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let Some(b) = b else { continue };
        let err = (g as f64 - w as f64).abs();
        let allowed = b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5;
        assert!(err <= allowed, "{what}: element {i}: got {g}, reference {w}, |err| {err:e} > bound {allowed:e}");
    }
}

#[allow(clippy::too_many_arguments)]
fn linear(
    input: &Input,
    scheme: Scheme,
    out: usize,
    inp: usize,
    m: usize,
    bias: bool,
    ranks: &[u8],
    ids: &[Option<u8>],
) {
    let mut s = common::Stretch::new(input.seed);
    let mut vals = |n: usize| {
        let v = common::make_values(n, &input.raw, input.fill, s.next_u64());
        // Finite values only here: invalid inputs are the other targets' business.
        v.into_iter().map(|x| if x.is_finite() { x } else { 0.5 }).collect::<Vec<f32>>()
    };
    let w = vals(out * inp);
    let Ok(weight) = QuantWeight::quantize(&w, &[out, inp], scheme) else { return };
    let b = bias.then(|| vals(out));
    let mut layer = QuantLinear::new(weight, b).expect("a valid layer");
    for (i, &r) in ranks.iter().take(3).enumerate() {
        let r = r as usize % 16 + 1;
        let ad = LoraAdapter::new(format!("a{i}"), r, vals(r * inp), vals(out * r), (2 * r) as f32, i % 2 == 1)
            .expect("a valid adapter");
        layer.add_adapter(ad).unwrap();
    }
    let x = vals(m * inp);
    // Finite inputs whose product overflows f32 are refused (NonFinite for y); that is not this target's oracle.
    let Ok(want) = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()) else { return };
    let all: Vec<usize> = (0..layer.adapters().len()).collect();
    let bound = bounds(&layer, &x, &vec![all; m]);
    for path in KernelPath::all_available() {
        let what = format!("forward {out}x{inp} M={m} {path}");
        let r = layer.forward_with(&x, lowbit::linear::ForwardOptions::default().path(path));
        if let Some(got) = path_result(r, &want, &bound, &what) {
            check_linear(&got, &want, &bound, &what);
        }
    }
    act8(&layer, &x, &want, ForwardOptions::default(), &format!("{out}x{inp} M={m}"));
    let n_ad = layer.adapters().len();
    let ids: Vec<Option<usize>> =
        (0..m).map(|r| ids.get(r).copied().flatten().filter(|_| n_ad > 0).map(|i| i as usize % n_ad.max(1))).collect();
    let Ok(want) = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference().adapter_ids(&ids)) else {
        return;
    };
    let rows: Vec<Vec<usize>> = ids.iter().map(|id| id.iter().copied().collect()).collect();
    let bound = bounds(&layer, &x, &rows);
    for path in KernelPath::all_available() {
        let what = format!("batch {out}x{inp} M={m} {path}");
        let r = layer.forward_with(&x, lowbit::linear::ForwardOptions::default().adapter_ids(&ids).path(path));
        if let Some(got) = path_result(r, &want, &bound, &what) {
            check_linear(&got, &want, &bound, &what);
        }
    }
    act8(&layer, &x, &want, ForwardOptions::default().adapter_ids(&ids), &format!("batch {out}x{inp} M={m}"));
}

/// `opts` with int8 activations on every path, on `layer` and on a copy with the interleaved layout (built only
/// where the best kernels read it), against `want` (the exact reference with `opts`' adapters) within the
/// derived bound. Elements whose bound leaves f32's range are not compared, as in [`bounds`].
fn act8(layer: &QuantLinear, x: &[f32], want: &[f32], opts: ForwardOptions<'_>, what: &str) {
    let int8 = opts.activations(Activations::Int8);
    let bound: Vec<Option<f64>> = layer
        .error_bound(x, int8, BoundTarget::Cpu)
        .expect("a bound for a valid input")
        .into_iter()
        .map(|b| (b < 1e30).then_some(b))
        .collect();
    let mut interleaved = layer.clone();
    let name = if interleaved.build_act8_layout() { "interleaved" } else { "plain again" };
    for (l, layout) in [(layer, "plain"), (&interleaved, name)] {
        for path in KernelPath::all_available() {
            let what = format!("act8 {what} {path} {layout}");
            if let Some(got) = path_result(l.forward_with(x, int8.path(path)), want, &bound, &what) {
                check_linear(&got, want, &bound, &what);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match &input.target {
        Target::Quant { scheme, dims, big } => {
            let Some(scheme) = scheme.scheme().map(valid) else { return };
            // `big` reaches the threaded paths (they start at 32k elements).
            let shape = common::make_shape(dims, if *big { 1 << 18 } else { 4096 });
            let n: usize = shape.iter().product();
            let x = common::make_values(n, &input.raw, input.fill, input.seed);
            match input.seed % 3 {
                0 => quant(scheme, &x, &shape),
                1 => quant(scheme, &x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), &shape),
                _ => quant(scheme, &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), &shape),
            }
        }
        Target::Linear { scheme, out, inp, m, bias, ranks, ids } => {
            let Some(scheme) = scheme.scheme().map(valid) else { return };
            let (out, inp, m) = (*out as usize % 70 + 1, *inp as usize % 600 + 1, *m as usize % 20);
            linear(&input, scheme, out, inp, m, *bias, ranks, ids);
        }
    }
});
