//! Malformed PEFT adapter directories give clear errors, never panics; accepted variants load correctly.
#![cfg(feature = "io")]

use lowbit::io::peft::{PeftAdapter, PeftConfig};
use lowbit::io::{serialize_safetensors, TensorData};
use lowbit::{f16, Error};
use lowbit_testkit::ScratchDir;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const P: &str = "base_model.model.model.layers.0.mlp.up_proj";

fn base_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DATA}/peft_adapter/adapter_config.json")).unwrap()).unwrap()
}

fn f32_tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> TensorData {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(f).collect();
    TensorData::from_slice(Dtype::F32, shape.to_vec(), &v)
}

/// A valid rank-8 module `[out 6, in 5]`.
fn good_tensors() -> Vec<(String, TensorData)> {
    vec![
        (format!("{P}.lora_A.weight"), f32_tensor(&[8, 5], |i| i as f32 * 0.01)),
        (format!("{P}.lora_B.weight"), f32_tensor(&[6, 8], |i| 0.5 - i as f32 * 0.02)),
    ]
}

fn write(dir: &Path, config: Option<&str>, tensors: Option<&[(String, TensorData)]>) {
    if let Some(c) = config {
        std::fs::write(dir.join("adapter_config.json"), c).unwrap();
    }
    if let Some(t) = tensors {
        std::fs::write(dir.join("adapter_model.safetensors"), serialize_safetensors(t, None).unwrap()).unwrap();
    }
}

fn load_with(name: &str, config: &Value, tensors: &[(String, TensorData)]) -> lowbit::Result<PeftAdapter> {
    let s = ScratchDir::new(&format!("peft-{name}"));
    write(s.path(), Some(&config.to_string()), Some(tensors));
    PeftAdapter::load(s.path())
}

fn expect_err(r: lowbit::Result<PeftAdapter>, needle: &str) -> Error {
    let e = r.expect_err("expected an error");
    assert!(e.to_string().contains(needle), "error {e:?} does not mention {needle:?}");
    e
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

#[test]
fn valid_synthetic_adapter_loads() {
    let a = load_with("valid", &base_config(), &good_tensors()).unwrap();
    let m = a.module("model.layers.0.mlp.up_proj").unwrap();
    assert_eq!((m.rank, m.in_features, m.out_features, m.alpha), (8, 5, 6, 16.0));
    assert_eq!(m.a[3], 0.03);
}

#[test]
fn missing_files_and_dirs() {
    let e = PeftAdapter::load(format!("{DATA}/no_such_adapter")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("no_such_adapter"), "{e}");
    let s = ScratchDir::new("peft-nofiles");
    let e = PeftAdapter::load(s.path()).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    write(s.path(), Some(&base_config().to_string()), None);
    let e = PeftAdapter::load(s.path()).unwrap_err();
    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
    std::fs::write(s.path().join("adapter_model.bin"), b"pickle").unwrap();
    let e = PeftAdapter::load(s.path()).unwrap_err();
    assert!(e.to_string().contains("safe_serialization"), "{e}");
}

#[test]
fn bad_configs() {
    let t = good_tensors();
    let s = ScratchDir::new("peft-badjson");
    write(s.path(), Some("{\"r\": 8,"), Some(&t));
    expect_err(PeftAdapter::load(s.path()), "invalid JSON");
    write(s.path(), Some("[1, 2]"), None);
    expect_err(PeftAdapter::load(s.path()), "JSON object");
    std::fs::write(s.path().join("adapter_config.json"), [0xff, 0xfe, b'{']).unwrap();
    expect_err(PeftAdapter::load(s.path()), "UTF-8");

    let mut no_r = base_config();
    no_r.as_object_mut().unwrap().remove("r");
    expect_err(load_with("no_r", &no_r, &t), "`r`");
    for (i, bad) in [json!(0), json!(2.5), json!("8"), json!(-1)].into_iter().enumerate() {
        expect_err(load_with(&format!("r{i}"), &with(base_config(), "r", bad), &t), "`r`");
    }
    expect_err(load_with("alpha", &with(base_config(), "lora_alpha", json!("16")), &t), "lora_alpha");
    expect_err(load_with("alpha_big", &with(base_config(), "lora_alpha", json!(1e300)), &t), "lora_alpha");
    expect_err(load_with("rslora", &with(base_config(), "use_rslora", json!("yes")), &t), "use_rslora");
    expect_err(load_with("type", &with(base_config(), "peft_type", json!("IA3")), &t), "peft_type");
    expect_err(load_with("tm", &with(base_config(), "target_modules", json!(7)), &t), "target_modules");
    expect_err(load_with("tm2", &with(base_config(), "target_modules", json!(["a", 1])), &t), "target_modules");
}

#[test]
fn unsupported_config_features_are_rejected_clearly() {
    let t = good_tensors();
    for (key, v, needle) in [
        ("fan_in_fan_out", json!(true), "fan_in_fan_out"),
        ("bias", json!("all"), "bias"),
        ("bias", json!("lora_only"), "bias"),
        ("use_dora", json!(true), "DoRA"),
        ("lora_bias", json!(true), "lora_bias"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        ("target_parameters", json!(["experts.weight"]), "target_parameters"),
        ("rank_pattern", json!({"^model.*up_proj$": 4}), "regular expression"),
        ("alpha_pattern", json!({"layers\\.0": 4}), "regular expression"),
    ] {
        let e = expect_err(load_with(key, &with(base_config(), key, v), &t), needle);
        assert!(matches!(e, Error::Unsupported { .. }), "{key}: {e:?}");
    }
    // Accepted spellings of the defaults.
    for (key, v) in [("bias", json!("none")), ("fan_in_fan_out", json!(false)), ("modules_to_save", json!(null))] {
        load_with(key, &with(base_config(), key, v), &t).unwrap();
    }
    let mut minimal = json!({"r": 8, "lora_alpha": 16});
    assert!(load_with("minimal", &minimal, &t).is_ok(), "only r and lora_alpha are required");
    minimal["use_rslora"] = json!(null);
    assert!(!load_with("minimal_null", &minimal, &t).unwrap().config().use_rslora);
}

#[test]
fn rank_and_alpha_patterns() {
    let c = PeftConfig::parse(
        &json!({"r": 8, "lora_alpha": 16, "rank_pattern": {"up_proj": 4, "mlp.up_proj": 4},
                "alpha_pattern": {"layers.0.mlp.up_proj": 2.5}})
        .to_string(),
    )
    .unwrap();
    assert_eq!(c.rank_and_alpha("model.layers.0.mlp.up_proj").unwrap(), (4, 2.5));
    assert_eq!(c.rank_and_alpha("model.layers.0.mlp.down_proj").unwrap(), (8, 16.0));
    assert_eq!(c.rank_and_alpha("model.layers.0.mlp.gate_up_proj").unwrap(), (8, 16.0), "suffix at a dot only");
    let amb = PeftConfig::parse(
        &json!({"r": 8, "lora_alpha": 16, "rank_pattern": {"up_proj": 4, "mlp.up_proj": 2}}).to_string(),
    )
    .unwrap();
    assert!(amb.rank_and_alpha("model.layers.0.mlp.up_proj").unwrap_err().to_string().contains("different values"));
    expect_err(
        load_with("rp0", &with(base_config(), "rank_pattern", json!({"up_proj": 0})), &good_tensors()),
        "rank_pattern",
    );
    // The rank from the pattern is what the shapes are checked against.
    let e = load_with("rp4", &with(base_config(), "rank_pattern", json!({"up_proj": 4})), &good_tensors()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("r = 4"), "{e}");
}

#[test]
fn bad_weights() {
    let c = base_config();
    let a = |shape: &[usize]| (format!("{P}.lora_A.weight"), f32_tensor(shape, |_| 0.1));
    let b = |shape: &[usize]| (format!("{P}.lora_B.weight"), f32_tensor(shape, |_| 0.1));
    expect_err(load_with("noB", &c, &[a(&[8, 5])]), "no lora_B");
    expect_err(load_with("noA", &c, &[b(&[6, 8])]), "no lora_A");
    expect_err(load_with("rankA", &c, &[a(&[4, 5]), b(&[6, 8])]), "r = 8");
    expect_err(load_with("rankB", &c, &[a(&[8, 5]), b(&[6, 4])]), "r = 8");
    expect_err(load_with("zeroin", &c, &[a(&[8, 0]), b(&[6, 8])]), "lora_A");
    expect_err(
        load_with("3d", &c, &[(format!("{P}.lora_A.weight"), f32_tensor(&[8, 5, 1], |_| 0.1)), b(&[6, 8])]),
        "2-D",
    );
    expect_err(load_with("empty", &c, &[]), "no LoRA weights");
    let e = load_with(
        "nan",
        &c,
        &[(format!("{P}.lora_A.weight"), f32_tensor(&[8, 5], |i| if i == 7 { f32::NAN } else { 0.0 })), b(&[6, 8])],
    )
    .unwrap_err();
    assert!(matches!(e, Error::NonFinite { index: 7, .. }) && e.to_string().contains("lora_A"), "{e}");
    let ints = TensorData::from_slice(Dtype::I32, vec![8, 5], &[1i32; 40]);
    expect_err(load_with("int", &c, &[(format!("{P}.lora_A.weight"), ints), b(&[6, 8])]), "dtype");
    expect_err(
        load_with("prefix", &c, &[("model.x.lora_A.weight".into(), f32_tensor(&[8, 5], |_| 0.0))]),
        "base_model.model.",
    );
    let e =
        load_with("emb", &c, &[(format!("{P}.lora_embedding_A.default"), f32_tensor(&[8, 5], |_| 0.0))]).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("embedding"), "{e}");
    let e = load_with(
        "extra",
        &c,
        &[a(&[8, 5]), b(&[6, 8]), (format!("{P}.base_layer.weight"), f32_tensor(&[6, 5], |_| 0.0))],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    expect_err(
        load_with("bias", &c, &[a(&[8, 5]), b(&[6, 8]), (format!("{P}.lora_B.bias"), f32_tensor(&[6], |_| 0.0))]),
        "bias",
    );
    // Mixed adapter-name segments.
    let mixed = [
        (format!("{P}.lora_A.default.weight"), f32_tensor(&[8, 5], |_| 0.1)),
        (format!("{P}.lora_B.other.weight"), f32_tensor(&[6, 8], |_| 0.1)),
    ];
    expect_err(load_with("mixed", &c, &mixed), "adapter-name");
}

#[test]
fn adapter_name_segment_and_half_precision_are_accepted() {
    let a16: Vec<f16> = (0..40).map(|i| f16::from_f32(i as f32 * 0.25)).collect();
    let t = [
        (format!("{P}.lora_A.default.weight"), TensorData::from_slice(Dtype::F16, vec![8, 5], &a16)),
        (format!("{P}.lora_B.default.weight"), f32_tensor(&[6, 8], |i| i as f32)),
    ];
    let a = load_with("named", &base_config(), &t).unwrap();
    assert_eq!(a.key_adapter_name(), Some("default"));
    let m = a.module("model.layers.0.mlp.up_proj").unwrap();
    assert_eq!(m.a[5], 1.25);
}

#[test]
fn corrupted_files_never_panic() {
    let good = serialize_safetensors(&good_tensors(), None).unwrap();
    let cfg = base_config().to_string().into_bytes();
    let s = ScratchDir::new("peft-fuzz");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for i in 0..300 {
        let (mut w, mut c) = (good.clone(), cfg.clone());
        let target = if i % 2 == 0 { &mut w } else { &mut c };
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % target.len();
            target[at] = next() as u8;
        }
        if i % 7 == 0 {
            let cut = (next() as usize) % w.len();
            w.truncate(cut);
        }
        std::fs::write(s.path().join("adapter_model.safetensors"), &w).unwrap();
        std::fs::write(s.path().join("adapter_config.json"), &c).unwrap();
        match PeftAdapter::load(s.path()) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(err > 50, "corruption should mostly be detected ({ok} loaded, {err} rejected)");
}

#[test]
fn layer_loading_errors() {
    use lowbit::affine::{quantize, Granularity};
    use lowbit::io::peft::quant_linears_from;
    use lowbit::io::{int8, parse_safetensors};
    let plain = serialize_safetensors(&[("w".into(), f32_tensor(&[2, 2], |_| 1.0))], None).unwrap();
    let e = quant_linears_from(&parse_safetensors(&plain).unwrap(), &Default::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("lowbit.scheme"), "{e}");

    let q = quantize(&[0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0], &[2, 3], Granularity::PerChannel).unwrap();
    let meta = int8::metadata(Granularity::PerChannel, [("l.weight", lowbit::DType::F32)]);
    let mut t = int8::to_tensors("l.weight", &q).to_vec();
    t.remove(1); // drop l.weight.scale
    let bytes = serialize_safetensors(&t, Some(meta.clone())).unwrap();
    let e = quant_linears_from(&parse_safetensors(&bytes).unwrap(), &meta).unwrap_err();
    assert!(e.to_string().contains("l.weight.scale"), "{e}");

    let mut t = int8::to_tensors("l.weight", &q).to_vec();
    t.push(("l.bias".into(), f32_tensor(&[3], |_| 0.0))); // 3 biases for 2 outputs
    let bytes = serialize_safetensors(&t, Some(meta.clone())).unwrap();
    let e = quant_linears_from(&parse_safetensors(&bytes).unwrap(), &meta).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("l.bias"), "{e}");
    assert!(e.to_string().contains("one per output feature"), "{e}");

    let mut bad_meta = meta;
    bad_meta.insert(int8::GRANULARITY_KEY.into(), "group:0".into());
    let e = quant_linears_from(&parse_safetensors(&bytes).unwrap(), &bad_meta).unwrap_err();
    assert!(e.to_string().contains("granularity"), "{e}");
}

/// Limits apply to adapters like to checkpoints: a LoRA matrix over `max_tensor_bytes` and a config over
/// `max_json_bytes` / `max_json_depth` are refused before anything proportional to them is decoded.
#[test]
fn adapter_limits() {
    use lowbit::io::Limits;
    let s = ScratchDir::new("peft-limits");
    let config = base_config();
    let mut tensors = good_tensors();
    // A [8, 5000] lora_A: 160 000 bytes.
    tensors[0].1 = f32_tensor(&[8, 5000], |i| (i % 7) as f32 * 0.01);
    tensors[1].1 = f32_tensor(&[6, 8], |_| 0.1);
    write(s.path(), Some(&config.to_string()), Some(&tensors));
    assert!(PeftAdapter::load(s.path()).is_ok(), "within the default limits");
    let tight = Limits { max_tensor_bytes: 100_000, ..Limits::DEFAULT };
    let e = PeftAdapter::load_with_limits(s.path(), &tight).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("max_tensor_bytes"), "{e}");
    assert!(e.to_string().contains("lora_A"), "names the tensor: {e}");

    // Config larger than max_json_bytes: refused before reading.
    let small_json = Limits { max_json_bytes: 64, ..Limits::DEFAULT };
    let e = PeftAdapter::load_with_limits(s.path(), &small_json).unwrap_err();
    assert!(e.to_string().contains("max_json_bytes") || e.to_string().contains("accepted for a config"), "{e}");

    // A deeply nested config: refused by the depth scan, not by the parser's recursion limit.
    let deep_text = format!("{{\"r\": 8, \"lora_alpha\": 16, \"extra\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    let e = PeftConfig::parse_with_limits(&deep_text, &Limits::DEFAULT).unwrap_err();
    assert!(e.to_string().contains("max_json_depth"), "{e}");
    write(s.path(), Some(&deep_text), None);
    let e = PeftAdapter::load(s.path()).unwrap_err();
    assert!(e.to_string().contains("max_json_depth"), "{e}");
}
