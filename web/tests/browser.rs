//! `wasm-bindgen-test` in headless Chromium (through chromedriver; flags in `web/webdriver.json`): the
//! bindings called from Rust inside the browser, the CPU path against the reference, and lowbit's GPU module
//! directly on the browser's WebGPU adapter (SwiftShader headless). Run by `web/test.sh`:
//!
//! ```sh
//! cd web && CHROMEDRIVER=/usr/bin/chromedriver RUSTC_BOOTSTRAP=1 /usr/bin/cargo test --release \
//!     --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort --features webgpu
//! ```
#![cfg(target_arch = "wasm32")]

use lowbit_web::{quantize_int8, quantize_nf4, Checkpoint};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const PEFT_BASE: &[u8] = include_bytes!("../../tests/data/peft_base.safetensors");
const PEFT_CONFIG: &str = include_str!("../../tests/data/peft_adapter/adapter_config.json");
const PEFT_WEIGHTS: &[u8] = include_bytes!("../../tests/data/peft_adapter/adapter_model.safetensors");

fn vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

fn within(got: &[f32], want: &[f32], bound: &[f64]) -> Result<(), String> {
    if got.len() != want.len() || bound.len() != want.len() {
        return Err(format!("lengths {} / {} / {}", got.len(), want.len(), bound.len()));
    }
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let e = (g as f64 - w as f64).abs();
        if e > b {
            return Err(format!("element {i}: got {g}, reference {w}, |err| {e:e} > bound {b:e}"));
        }
    }
    Ok(())
}

#[wasm_bindgen_test]
fn simd128_is_the_cpu_path() {
    // The portable kernels (`wide`), compiled for wasm32 with simd128: one path, not listed twice.
    let info = lowbit_web::build_info();
    assert!(info.contains("\"isa\":\"portable\"") && info.contains("\"simd128\":true"), "{info}");
}

#[wasm_bindgen_test]
fn cpu_forward_every_format_within_bound() {
    let (out, inp) = (37, 67);
    let w = vec(out * inp, 1, 0.5);
    let layers = [
        quantize_int8(&w, out, inp, "channel", Some(vec(out, 2, 1.0))).unwrap(),
        quantize_int8(&w, out, inp, "group:5", None).unwrap(),
        quantize_nf4(&w, out, inp, 64, false, Some(vec(out, 3, 1.0))).unwrap(),
        quantize_nf4(&w, out, inp, 64, true, None).unwrap(),
    ];
    for mut l in layers {
        l.add_lora("a", 4, vec(4 * inp, 4, 0.3), vec(out * 4, 5, 0.3), 8.0, false).unwrap();
        for m in [1, 3, 8] {
            let x = vec(m * inp, 6 + m as u64, 1.0);
            let got = l.forward(&x, m).unwrap();
            let want = l.forward_reference(&x, m).unwrap();
            let bound = l.error_bound(&x, m, None, "cpu").unwrap();
            within(&got, &want, &bound).unwrap_or_else(|e| panic!("{} m={m}: {e}", l.describe()));
        }
    }
}

#[wasm_bindgen_test]
fn peft_fixture_attaches_and_forwards() {
    let mut ck = Checkpoint::from_bytes(PEFT_BASE).unwrap();
    let report = ck.attach_peft(PEFT_CONFIG, PEFT_WEIGHTS, "default").unwrap();
    assert!(report.contains("model.layers.0.mlp.up_proj"), "{report}");
    let l = ck.layer("model.layers.0.mlp.up_proj").unwrap();
    assert_eq!(l.adapter_names(), ["default"]);
    let x = vec(2 * l.in_features(), 9, 1.0);
    within(
        &l.forward(&x, 2).unwrap(),
        &l.forward_reference(&x, 2).unwrap(),
        &l.error_bound(&x, 2, None, "cpu").unwrap(),
    )
    .unwrap();
}

#[wasm_bindgen_test]
fn int8_activations_simd128_equal_the_exact_int8_value() {
    // The simd128 int8-activation kernel (the `portable` level of this build) against the exact int8 value
    // (the reference path with `Activations::Int8`). With x ≥ 0 and W ≥ 0 every product is ≥ 0, so the f32
    // rounding of the kernel's exact integer block sums is at most (K + 8)·ε·|y| (docs/formats.md §12).
    use lowbit::affine::Granularity;
    use lowbit::cpu::{Isa, KernelPath};
    use lowbit::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight};
    use lowbit::Scheme;
    let schemes = [
        Scheme::nf4(64, false),
        Scheme::nf4(32, true),
        Scheme::Int8(Granularity::PerTensor),
        Scheme::Int8(Granularity::PerChannel),
        Scheme::Int8(Granularity::PerGroup(64)),
        Scheme::Int8(Granularity::PerGroup(128)),
    ];
    let mut checked = 0;
    for scheme in schemes {
        for (out, inp) in [(13, 256), (6, 192)] {
            let w: Vec<f32> = vec(out * inp, 11, 0.5).iter().map(|v| v.abs()).collect();
            let layer = QuantLinear::new(QuantWeight::quantize(&w, &[out, inp], scheme).unwrap(), None).unwrap();
            for m in [1, 2, 3] {
                let x: Vec<f32> = vec(m * inp, 12 + m as u64, 2.0).iter().map(|v| v.abs()).collect();
                let want = layer.forward_with(&x, ForwardOptions::reference().activations(Activations::Int8)).unwrap();
                let simd = ForwardOptions::default().path(KernelPath::single(Isa::Portable));
                let got = layer.forward_with(&x, simd.activations(Activations::Int8)).unwrap();
                for (i, (&g, &v)) in got.iter().zip(&want).enumerate() {
                    let allowed = (inp + 8) as f64 * f32::EPSILON as f64 * v.abs() as f64;
                    let err = (g as f64 - v as f64).abs();
                    assert!(err <= allowed, "{scheme:?} {out}x{inp} m={m}: y[{i}] = {g}, exact {v}, |err| {err:e}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 6 * 2 * 3);
}

#[wasm_bindgen_test]
fn corrupt_input_is_an_error_not_a_panic() {
    let mut bad = PEFT_BASE.to_vec();
    bad[9] ^= 0x55;
    assert!(Checkpoint::from_bytes(&bad).is_err());
    assert!(Checkpoint::from_bytes(&PEFT_BASE[..PEFT_BASE.len() - 7]).is_err());
    assert!(Checkpoint::from_bytes(&[]).is_err());
    let l = quantize_nf4(&vec(64, 1, 1.0), 1, 64, 64, false, None).unwrap();
    assert!(l.forward(&[1.0; 5], 1).is_err());
    assert!(l.forward(&[f32::NAN; 64], 1).is_err());
    assert!(l.forward_batch(&[0.0; 64], 1, &[3]).is_err());
}

#[wasm_bindgen_test]
async fn webgpu_forward_within_bound() {
    if !lowbit_web::build_info().contains("\"webgpu_compiled\":true") {
        let e = JsFuture::from(quantize_nf4(&[0.0; 64], 1, 64, 64, false, None).unwrap().forward_async(
            vec![0.0; 64],
            1,
            "webgpu",
        ))
        .await;
        assert!(e.is_err(), "a build without WebGPU must reject");
        return;
    }
    // A missing adapter fails the test: test.sh runs Chromium with --enable-unsafe-webgpu (SwiftShader).
    if let Err(e) = lowbit_web::init_web_gpu().await {
        panic!("no WebGPU adapter: {:?}", wasm_bindgen::JsValue::from(e));
    }
    let (out, inp) = (130, 72);
    let w = vec(out * inp, 11, 0.5);
    for mut l in [
        quantize_nf4(&w, out, inp, 64, true, Some(vec(out, 12, 1.0))).unwrap(),
        quantize_int8(&w, out, inp, "group:16", None).unwrap(),
    ] {
        l.add_lora("a", 8, vec(8 * inp, 13, 0.3), vec(out * 8, 14, 0.3), 16.0, true).unwrap();
        for m in [1, 5] {
            let x = vec(m * inp, 15, 1.0);
            let y = JsFuture::from(l.forward_async(x.clone(), m, "webgpu")).await.expect("webgpu forward");
            let got = js_sys::Float32Array::from(y).to_vec();
            let want = l.forward_reference(&x, m).unwrap();
            let bound = l.error_bound(&x, m, None, "webgpu").unwrap();
            within(&got, &want, &bound).unwrap_or_else(|e| panic!("{} m={m}: {e}", l.describe()));
        }
    }
}
