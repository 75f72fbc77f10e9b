//! `QuantLinear::backward*` against PyTorch autograd through PEFT's `lora.Linear` (fixture:
//! `tests/data/gen_backward_fixture.py`, read its header): the committed bitsandbytes nf4+dq layers (from f32
//! and from bf16, with and without bias), an fp4 layer, a torch quint8 per-channel layer, rsLoRA, and two
//! adapters active at once.
//!
//! Tolerance (stated, not tuned): the fixture's f64 values are the exact gradients of the same f32 operands
//! (numpy in f64; they match torch's float64 autograd to 4e-16). Every lowbit path must be within
//! `QuantLinear::backward_error_bound` of them (the f32 accumulation bound, derived in
//! `lowbit::reference::linear_backward`) plus half an ulp; PyTorch's own f32 results are held to the same
//! bound, so the two agree to within twice it. The scaling is PEFT's Python float (f64); lowbit computes it in
//! f32 (`alpha / √r`), which for the rsLoRA adapter differs by 4.5e-8 relative; each element is allowed
//! `2·|Δs/s|·|g_exact|` more for it (a generous cover of the adapter's share of the value).
//! Measured: every path within 1% of the bound.
#![cfg(feature = "io")]

use lowbit::affine::{AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::io::peft::load_quant_linears;
use lowbit::io::{view_to_f32, SafetensorsFile};
use lowbit::linear::{BackwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use serde_json::Value;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

struct Fixture {
    file: SafetensorsFile,
    cases: Value,
}

impl Fixture {
    fn open() -> Fixture {
        let file = SafetensorsFile::open(format!("{DATA}/peft_backward.safetensors")).unwrap();
        let cases = serde_json::from_str(&file.metadata().unwrap()["cases"]).unwrap();
        Fixture { file, cases }
    }
    fn f32(&self, key: &str) -> Vec<f32> {
        let st = self.file.tensors().unwrap();
        let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        view_to_f32(key, &v).unwrap()
    }
    fn f64(&self, key: &str) -> Vec<f64> {
        let st = self.file.tensors().unwrap();
        let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(v.dtype(), safetensors::Dtype::F64, "{key}");
        v.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn raw(&self, key: &str) -> Vec<u8> {
        self.file.tensors().unwrap().tensor(key).unwrap().data().to_vec()
    }
}

fn base_layer(fx: &Fixture, case: &str) -> QuantLinear {
    let c = &fx.cases[case];
    if case == "int8" {
        let (out, inp) = (c["out"].as_u64().unwrap() as usize, c["in"].as_u64().unwrap() as usize);
        let zps: Vec<u8> = fx
            .raw("int8.zero_points")
            .chunks_exact(8)
            .map(|b| u8::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
            .collect();
        let t = AffineTensor::from_parts(
            vec![out, inp],
            Granularity::PerChannel,
            fx.raw("int8.codes"),
            fx.f32("int8.scales"),
            zps,
        )
        .unwrap();
        return QuantLinear::new(QuantWeight::Int8(t), Some(fx.f32("int8.bias"))).unwrap();
    }
    let layers = load_quant_linears(&SafetensorsFile::open(format!("{DATA}/peft_base.safetensors")).unwrap()).unwrap();
    let name = c["layer"].as_str().unwrap();
    layers.into_iter().find(|(p, _)| p == name).unwrap_or_else(|| panic!("no layer {name}")).1
}

#[test]
fn backward_matches_pytorch_autograd_through_peft() {
    let fx = Fixture::open();
    let eps = f32::EPSILON as f64;
    for case in ["up", "down", "multi", "int8", "fp4"] {
        let c = &fx.cases[case];
        let mut layer = base_layer(&fx, case);
        // The base weight is PyTorch's, bit for bit.
        let w = fx.f32(&format!("{case}.w"));
        assert_eq!(layer.weight().dequantize_reference(), w, "{case}: dequantized weight");
        if let Some(b) = c["bias"].as_bool() {
            assert_eq!(layer.bias().is_some(), b, "{case}: bias");
        }
        let mut scale_err = 0.0f64;
        for ad in c["adapters"].as_array().unwrap() {
            let name = ad["name"].as_str().unwrap();
            let r = ad["r"].as_u64().unwrap() as usize;
            let alpha = ad["alpha"].as_f64().unwrap() as f32;
            let rslora = ad["use_rslora"].as_bool().unwrap();
            let a = fx.f32(&format!("{case}.{name}.lora_A"));
            let b = fx.f32(&format!("{case}.{name}.lora_B"));
            let lora = LoraAdapter::new(name, r, a, b, alpha, rslora).unwrap();
            let peft = ad["scaling"].as_f64().unwrap();
            scale_err = scale_err.max(((lora.scaling() as f64 - peft) / peft).abs());
            layer.add_adapter(lora).unwrap();
        }
        let (x, dy) = (fx.f32(&format!("{case}.x")), fx.f32(&format!("{case}.dy")));
        let bound = layer.backward_error_bound(&x, &dy, lowbit::linear::AdapterSelection::Enabled).unwrap();
        let torch_f32_dx = fx.f32(&format!("{case}.dx"));
        let want_dx = fx.f64(&format!("{case}.dx_f64"));
        let within = |got: &[f32], want: &[f64], bound: &[f64], what: &str| -> f64 {
            assert_eq!(got.len(), want.len(), "{what}");
            let mut worst = 0.0f64;
            for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
                let allowed = b + 0.5 * eps * w.abs() + 2.0 * scale_err * w.abs() + 1e-30;
                let err = (g as f64 - w).abs();
                worst = worst.max(err / allowed);
                assert!(err <= allowed, "{what}: element {i}: {g} vs exact {w} (|Δ| {err:e} > {allowed:e})");
            }
            worst
        };
        // PyTorch's own f32 result is inside the same bound (the bound is not lowbit-specific).
        within(&torch_f32_dx, &want_dx, &bound.dx, &format!("{case}: PyTorch f32 dx"));
        let mut worst = 0.0f64;
        for path in KernelPath::all_available() {
            let g = layer.backward_with(&x, &dy, BackwardOptions::default().path(path)).unwrap();
            worst = worst.max(within(&g.dx, &want_dx, &bound.dx, &format!("{case} {path}: dx")));
            for (i, ad) in c["adapters"].as_array().unwrap().iter().enumerate() {
                let name = ad["name"].as_str().unwrap();
                for (which, got, b) in
                    [("A", &g.adapters[i].a, &bound.adapters[i].0), ("B", &g.adapters[i].b, &bound.adapters[i].1)]
                {
                    let want = fx.f64(&format!("{case}.{name}.grad_{which}_f64"));
                    worst = worst.max(within(got, &want, b, &format!("{case} {path}: d{which} of {name}")));
                }
            }
        }
        eprintln!("{case}: worst |Δ|/bound over every path {worst:.3}");
    }
}
