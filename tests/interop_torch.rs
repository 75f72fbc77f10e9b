//! lowbit's int8 affine quantization against PyTorch `quint8`, bit for bit.
//!
//! The fixture `tests/data/torch_quint8.safetensors` is produced by `tests/data/gen_fixtures.py` with
//! `MinMaxObserver` + `quantize_per_tensor` and `PerChannelMinMaxObserver(ch_axis=0)` + `quantize_per_channel`.
//! Every case must match on scales, zero points, codes and dequantized values exactly, through every
//! available CPU path.

use lowbit::affine::{calibrate_with, quantize_with, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::io::{view_to_f32, SafetensorsFile};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_quint8.safetensors");

struct Expected {
    scales: Vec<f32>,
    zero_points: Vec<u8>,
    codes: Vec<u8>,
    dequant: Vec<f32>,
}

fn f32s(st: &safetensors::SafeTensors<'_>, key: &str) -> Vec<f32> {
    let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(v.dtype(), safetensors::Dtype::F32, "{key}");
    view_to_f32(key, &v).unwrap()
}

fn u8s(st: &safetensors::SafeTensors<'_>, key: &str) -> Vec<u8> {
    let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(v.dtype(), safetensors::Dtype::U8, "{key}");
    v.data().to_vec()
}

fn expected(st: &safetensors::SafeTensors<'_>, case: &str, kind: &str) -> Expected {
    Expected {
        scales: f32s(st, &format!("{case}.{kind}.scale")),
        zero_points: u8s(st, &format!("{case}.{kind}.zero_point")),
        codes: u8s(st, &format!("{case}.{kind}.codes")),
        dequant: f32s(st, &format!("{case}.{kind}.dequant")),
    }
}

fn cases(file: &SafetensorsFile) -> Vec<String> {
    let meta = file.metadata().unwrap();
    serde_json::from_str(meta.get("cases").expect("metadata `cases`")).unwrap()
}

/// Compares one case through one path; returns a list of human-readable mismatches (empty when exact).
fn compare(case: &str, x: &[f32], shape: &[usize], g: Granularity, exp: &Expected, path: KernelPath) -> Vec<String> {
    let mut bad = Vec::new();
    let params = calibrate_with(x, shape, g, path).unwrap();
    let q = quantize_with(x, shape, g, path).unwrap();
    let tag = format!("{case} {g} {}", path.name());
    assert_eq!(params.len(), exp.scales.len(), "{tag}: number of params");
    for (i, p) in params.iter().enumerate() {
        if p.scale.to_bits() != exp.scales[i].to_bits() || q.scales()[i].to_bits() != exp.scales[i].to_bits() {
            bad.push(format!("{tag}: scale[{i}] lowbit {:e} torch {:e}", p.scale, exp.scales[i]));
        }
        if p.zero_point != exp.zero_points[i] || q.zero_points()[i] != exp.zero_points[i] {
            bad.push(format!("{tag}: zero_point[{i}] lowbit {} torch {}", p.zero_point, exp.zero_points[i]));
        }
    }
    for (i, (a, b)) in q.codes().iter().zip(&exp.codes).enumerate() {
        if a != b {
            bad.push(format!("{tag}: code[{i}] (x = {:e}) lowbit {a} torch {b}", x[i]));
        }
    }
    let dq: Vec<f32> = q.dequantize_with(path).unwrap();
    for (i, (a, b)) in dq.iter().zip(&exp.dequant).enumerate() {
        if a.to_bits() != b.to_bits() {
            bad.push(format!("{tag}: dequant[{i}] (code {}) lowbit {a:e} torch {b:e}", q.codes()[i]));
        }
    }
    bad
}

#[test]
fn affine_matches_pytorch_bit_for_bit() {
    let file = SafetensorsFile::open(FIXTURE).unwrap();
    let st = file.tensors().unwrap();
    let names = cases(&file);
    assert!(names.len() >= 12, "fixture lists {} cases", names.len());
    let mut bad = Vec::new();
    let mut checked_elements = 0usize;
    for case in &names {
        let xv = st.tensor(&format!("{case}.x")).unwrap();
        let shape = xv.shape().to_vec();
        let x = view_to_f32(case, &xv).unwrap();
        for (g, kind) in [(Granularity::PerTensor, "tensor"), (Granularity::PerChannel, "channel")] {
            let exp = expected(&st, case, kind);
            assert_eq!(exp.codes.len(), x.len());
            for path in KernelPath::all_available() {
                bad.extend(compare(case, &x, &shape, g, &exp, path));
                checked_elements += x.len();
            }
        }
    }
    assert!(checked_elements > 0);
    assert!(bad.is_empty(), "{} mismatches against PyTorch:\n{}", bad.len(), bad.join("\n"));
}

/// The dequantized values PyTorch gives are exactly `((q - zp) as f32) * scale` (docs/formats.md §1): a guard
/// that the fixture itself follows the documented rule, independent of lowbit's code paths.
#[test]
fn fixture_dequant_follows_documented_rule() {
    let file = SafetensorsFile::open(FIXTURE).unwrap();
    let st = file.tensors().unwrap();
    for case in cases(&file) {
        let shape = st.tensor(&format!("{case}.x")).unwrap().shape().to_vec();
        let cols = *shape.last().unwrap();
        for kind in ["tensor", "channel"] {
            let exp = expected(&st, &case, kind);
            for (i, (&q, &d)) in exp.codes.iter().zip(&exp.dequant).enumerate() {
                let e = if exp.scales.len() == 1 { 0 } else { i / cols };
                let rule = (q as i32 - exp.zero_points[e] as i32) as f32 * exp.scales[e];
                assert_eq!(rule.to_bits(), d.to_bits(), "{case}.{kind}[{i}]");
            }
        }
    }
}

/// Spot checks on the edge cases, so that a regenerated fixture cannot silently lose them.
#[test]
fn fixture_covers_edge_cases() {
    let file = SafetensorsFile::open(FIXTURE).unwrap();
    let st = file.tensors().unwrap();
    // All zeros: scale = f32::EPSILON, zero point 0.
    assert_eq!(f32s(&st, "zeros.tensor.scale"), vec![f32::EPSILON]);
    assert_eq!(u8s(&st, "zeros.tensor.zero_point"), vec![0]);
    // Scale exactly 1 with the zero point on a tie (round_half_even(2.5) = 2).
    assert_eq!(f32s(&st, "ties_scale1.tensor.scale"), vec![1.0]);
    assert_eq!(u8s(&st, "ties_scale1.tensor.zero_point"), vec![2]);
    assert_eq!(f32s(&st, "ties_scale_half.tensor.scale"), vec![0.5]);
    // All negative: the range is widened to 0, so the zero point is 255.
    assert_eq!(u8s(&st, "neg.tensor.zero_point"), vec![255]);
    // Tiny range: the scale is floored at f32::EPSILON.
    assert_eq!(f32s(&st, "tiny_1e-9.tensor.scale"), vec![f32::EPSILON]);
}
