//! Malformed bitsandbytes checkpoints: every corruption gives an `Error::Format` naming the problem, never a
//! panic or an allocation proportional to a claimed (rather than present) size.
#![cfg(feature = "io")]

use lowbit::io::bnb::{self, QuantStateJson};
use lowbit::io::{parse_safetensors, serialize_safetensors, TensorData};
use lowbit::nf4::{quantize_4bit, quantize_nf4, FourBitFormat};
use lowbit::Error;
use safetensors::Dtype;

const W: &str = "model.layers.0.mlp.up_proj.weight";
const P: &str = "model.layers.0.mlp.up_proj.";

fn weights(n: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919) % 1013) as f32 - 506.0) * 1e-3).collect()
}

/// A valid nested NF4 layer (600 blocks of 64: three nested blocks) with a bias.
fn nested_layer() -> Vec<(String, TensorData)> {
    let t = quantize_nf4(&weights(300 * 128), &[300, 128], 64, true).unwrap();
    let mut v = bnb::to_tensors(W, &t).unwrap();
    v.push((format!("{P}bias"), TensorData::from_slice(Dtype::F32, vec![300], &vec![0.5f32; 300])));
    v
}

/// A valid plain FP4 layer with an odd element count.
fn plain_layer() -> Vec<(String, TensorData)> {
    let t = quantize_4bit(FourBitFormat::Fp4, &weights(7 * 9), &[7, 9], 64, false).unwrap();
    bnb::to_tensors(W, &t).unwrap()
}

fn load(tensors: &[(String, TensorData)]) -> lowbit::Result<()> {
    let bytes = serialize_safetensors(tensors, None)?;
    let st = parse_safetensors(&bytes)?;
    bnb::load_layer(&st, P)?;
    bnb::load_checkpoint(&st)?;
    Ok(())
}

fn set(tensors: &mut Vec<(String, TensorData)>, key: &str, t: TensorData) {
    match tensors.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = t,
        None => tensors.push((key.to_string(), t)),
    }
}

fn remove(tensors: &mut Vec<(String, TensorData)>, key: &str) {
    let before = tensors.len();
    tensors.retain(|(k, _)| k != key);
    assert_eq!(tensors.len() + 1, before, "{key} not present");
}

fn json_tensor(s: &str) -> TensorData {
    TensorData::from_slice(Dtype::U8, vec![s.len()], s.as_bytes())
}

fn qs_key(format: &str) -> String {
    format!("{W}.quant_state.bitsandbytes__{format}")
}

/// Applies `f` to a valid layer and expects a format error whose message contains `needle`.
fn expect_err(base: fn() -> Vec<(String, TensorData)>, needle: &str, f: impl FnOnce(&mut Vec<(String, TensorData)>)) {
    let mut t = base();
    load(&t).expect("the unmodified layer loads");
    f(&mut t);
    match load(&t) {
        Ok(()) => panic!("expected an error containing {needle:?}, got Ok"),
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
        }
        Err(e) => panic!("expected Error::Format containing {needle:?}, got {e:?}"),
    }
}

const NESTED_JSON: &str =
    "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [300, 128], \
                           \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.25}";

fn with_json(json: &str, needle: &str) {
    let json = json.to_string();
    expect_err(nested_layer, needle, move |t| set(t, &qs_key("nf4"), json_tensor(&json)));
}

#[test]
fn valid_variants_load() {
    load(&nested_layer()).unwrap();
    load(&plain_layer()).unwrap();
    // Our own JSON with a different (valid) offset loads too.
    let mut t = nested_layer();
    set(&mut t, &qs_key("nf4"), json_tensor(NESTED_JSON));
    load(&t).unwrap();
}

#[test]
fn bad_json() {
    with_json("not json", "invalid JSON");
    with_json("{\"quant_type\": \"nf4\"", "invalid JSON");
    with_json("[1, 2]", "expected an object");
    with_json("\"nf4\"", "expected an object");
    with_json("null", "expected an object");
    expect_err(nested_layer, "invalid JSON", |t| {
        set(t, &qs_key("nf4"), TensorData::from_slice(Dtype::U8, vec![3], &[0xffu8, 0xfe, 0x7b]))
    });
    // JSON has no NaN; Python's json.dumps would write `NaN`, which is rejected as invalid JSON.
    with_json(&NESTED_JSON.replace("0.25", "NaN"), "invalid JSON");
    expect_err(nested_layer, "at most", |t| {
        let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000));
        set(t, &qs_key("nf4"), json_tensor(&big))
    });
}

#[test]
fn missing_fields() {
    for field in ["quant_type", "blocksize", "dtype", "shape"] {
        let v: serde_json::Value = serde_json::from_str(NESTED_JSON).unwrap();
        let mut o = v.as_object().unwrap().clone();
        o.remove(field);
        with_json(&serde_json::Value::Object(o).to_string(), &format!("missing field `{field}`"));
    }
    // Some but not all nested fields.
    for field in ["nested_blocksize", "nested_dtype", "nested_offset"] {
        let v: serde_json::Value = serde_json::from_str(NESTED_JSON).unwrap();
        let mut o = v.as_object().unwrap().clone();
        o.remove(field);
        with_json(&serde_json::Value::Object(o).to_string(), "not all of");
    }
}

#[test]
fn ill_typed_fields() {
    let cases = [
        ("\"quant_type\": \"nf4\"", "\"quant_type\": \"int4\"", "quant_type"),
        ("\"quant_type\": \"nf4\"", "\"quant_type\": 4", "expected a string"),
        ("\"blocksize\": 64", "\"blocksize\": \"64\"", "non-negative integer"),
        ("\"blocksize\": 64", "\"blocksize\": -64", "non-negative integer"),
        ("\"blocksize\": 64", "\"blocksize\": 64.5", "non-negative integer"),
        ("\"blocksize\": 64", "\"blocksize\": 65", "expected one of"),
        ("\"blocksize\": 64", "\"blocksize\": 0", "expected one of"),
        ("\"dtype\": \"float32\"", "\"dtype\": \"int8\"", "`dtype`"),
        ("\"dtype\": \"float32\"", "\"dtype\": null", "expected a string"),
        ("\"shape\": [300, 128]", "\"shape\": \"300x128\"", "list of integers"),
        ("\"shape\": [300, 128]", "\"shape\": [300, -128]", "non-negative integers"),
        ("\"shape\": [300, 128]", "\"shape\": [300, 1.5]", "non-negative integers"),
        ("\"shape\": [300, 128]", "\"shape\": null", "list of integers"),
        ("\"nested_blocksize\": 256", "\"nested_blocksize\": 100", "nested_blocksize"),
        ("\"nested_dtype\": \"float32\"", "\"nested_dtype\": \"float16\"", "nested_dtype"),
        ("\"nested_offset\": 0.25", "\"nested_offset\": \"0.25\"", "expected a number"),
        ("\"nested_offset\": 0.25", "\"nested_offset\": 1e39", "finite f32"),
        ("\"quant_type\": \"nf4\"", "\"quant_type\": \"nf4\", \"extra\": 1", "unknown field `extra`"),
    ];
    for (from, to, needle) in cases {
        assert!(NESTED_JSON.contains(from), "{from}");
        with_json(&NESTED_JSON.replace(from, to), needle);
    }
}

#[test]
fn quant_state_key_problems() {
    // Two quant-state keys for one weight.
    expect_err(nested_layer, "expected exactly one", |t| set(t, &qs_key("fp4"), json_tensor(NESTED_JSON)));
    // Key suffix disagrees with the JSON's quant_type.
    expect_err(nested_layer, "says quant type \"fp4\"", |t| {
        let (_, v) = t.iter().find(|(k, _)| *k == qs_key("nf4")).unwrap().clone();
        remove(t, &qs_key("nf4"));
        set(t, &qs_key("fp4"), v);
    });
    // A quant_state key that is not bitsandbytes__*.
    expect_err(nested_layer, "does not end in", |t| {
        let (_, v) = t.iter().find(|(k, _)| *k == qs_key("nf4")).unwrap().clone();
        remove(t, &qs_key("nf4"));
        set(t, &format!("{W}.quant_state.other"), v);
    });
    // No quant state at all.
    expect_err(nested_layer, "not a 4-bit weight", |t| remove(t, &qs_key("nf4")));
    // Wrong dtype of the JSON tensor.
    expect_err(nested_layer, "expected U8", |t| {
        set(t, &qs_key("nf4"), TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32, 2.0]))
    });
}

#[test]
fn wrong_lengths_and_dtypes() {
    // Packed codes: truncated by one byte, one byte too many, wrong dtype.
    expect_err(nested_layer, "expected (numel + 1) / 2", |t| {
        set(t, W, TensorData::from_slice(Dtype::U8, vec![300 * 64 - 1, 1], &vec![0x77u8; 300 * 64 - 1]))
    });
    expect_err(plain_layer, "expected (numel + 1) / 2", |t| {
        set(t, W, TensorData::from_slice(Dtype::U8, vec![33, 1], &[0x77u8; 33]))
    });
    expect_err(nested_layer, "packed 4-bit codes", |t| {
        set(t, W, TensorData::from_slice(Dtype::I32, vec![300 * 16], &vec![0i32; 300 * 16]))
    });
    // Scales.
    expect_err(nested_layer, "blocks", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::U8, vec![599], &[0u8; 599]))
    });
    expect_err(nested_layer, "expected U8", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::F32, vec![600], &[1.0f32; 600]))
    });
    expect_err(plain_layer, "expected F32", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::U8, vec![1], &[1u8]))
    });
    expect_err(plain_layer, "blocks", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32; 2]))
    });
    // Tables.
    expect_err(plain_layer, "16-entry", |t| {
        set(t, &format!("{W}.quant_map"), TensorData::from_slice(Dtype::F32, vec![15], &[0.0f32; 15]))
    });
    expect_err(plain_layer, "expected F32", |t| {
        set(t, &format!("{W}.quant_map"), TensorData::from_slice(Dtype::F16, vec![16], &[0u16; 16]))
    });
    expect_err(plain_layer, "built-in fp4 table", |t| {
        let mut table = *FourBitFormat::Fp4.table();
        table[3] = 0.9;
        set(t, &format!("{W}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], &table))
    });
    // The NF4 table under an fp4 quant state.
    expect_err(plain_layer, "built-in fp4 table", |t| {
        set(t, &format!("{W}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], FourBitFormat::Nf4.table()))
    });
    expect_err(nested_layer, "nested blocks", |t| {
        set(t, &format!("{W}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32; 2]))
    });
    expect_err(nested_layer, "256-entry", |t| {
        set(t, &format!("{W}.nested_quant_map"), TensorData::from_slice(Dtype::F32, vec![255], &[0.0f32; 255]))
    });
    expect_err(nested_layer, "expected F32", |t| {
        set(t, &format!("{W}.nested_absmax"), TensorData::from_slice(Dtype::F16, vec![3], &[0u16; 3]))
    });
    // Bias: wrong length, non-float dtype.
    expect_err(nested_layer, "one per output feature", |t| {
        set(t, &format!("{P}bias"), TensorData::from_slice(Dtype::F32, vec![299], &[0.0f32; 299]))
    });
    expect_err(nested_layer, "expected F32 or F16 or BF16", |t| {
        set(t, &format!("{P}bias"), TensorData::from_slice(Dtype::U8, vec![300], &[0u8; 300]))
    });
}

#[test]
fn missing_tensors_and_nested_mismatch() {
    expect_err(nested_layer, "missing tensor", |t| remove(t, W));
    expect_err(nested_layer, "missing tensor", |t| remove(t, &format!("{W}.absmax")));
    expect_err(nested_layer, "missing tensor", |t| remove(t, &format!("{W}.quant_map")));
    expect_err(nested_layer, "disagree", |t| remove(t, &format!("{W}.nested_absmax")));
    expect_err(nested_layer, "disagree", |t| remove(t, &format!("{W}.nested_quant_map")));
    // nested_absmax present but the JSON is not nested.
    expect_err(nested_layer, "disagree", |t| {
        set(
            t,
            &qs_key("nf4"),
            json_tensor("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [300, 128]}"),
        )
    });
    // JSON nested but no nested tensors.
    expect_err(plain_layer, "disagree", |t| {
        set(
            t,
            &qs_key("fp4"),
            json_tensor(
                "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [7, 9], \
                 \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}",
            ),
        )
    });
}

#[test]
fn non_finite_and_negative_values() {
    expect_err(plain_layer, "non-finite", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::F32, vec![1], &[f32::NAN]))
    });
    expect_err(plain_layer, "non-finite", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::F32, vec![1], &[f32::INFINITY]))
    });
    expect_err(plain_layer, "negative", |t| {
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::F32, vec![1], &[-1.0f32]))
    });
    expect_err(plain_layer, "non-finite", |t| {
        let mut table = *FourBitFormat::Fp4.table();
        table[0] = f32::INFINITY;
        set(t, &format!("{W}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], &table))
    });
    expect_err(nested_layer, "non-finite", |t| {
        set(t, &format!("{W}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![3], &[1.0, f32::NAN, 1.0]))
    });
    expect_err(nested_layer, "negative", |t| {
        set(t, &format!("{W}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![3], &[1.0f32, -1.0, 1.0]))
    });
    expect_err(nested_layer, "non-finite", |t| {
        let mut m = lowbit::double_quant::DYNAMIC_MAP;
        m[200] = f32::NAN;
        set(t, &format!("{W}.nested_quant_map"), TensorData::from_slice(Dtype::F32, vec![256], &m))
    });
    // Finite parts whose decode overflows to infinity.
    expect_err(nested_layer, "finite scale", |t| {
        set(t, &format!("{W}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![3], &[3e38f32; 3]));
        set(t, &format!("{W}.absmax"), TensorData::from_slice(Dtype::U8, vec![600], &[255u8; 600]));
        set(t, &qs_key("nf4"), json_tensor(&NESTED_JSON.replace("0.25", "3e38")));
    });
}

#[test]
fn absurd_shapes_fail_before_allocating() {
    // Overflowing element count.
    with_json(&NESTED_JSON.replace("[300, 128]", "[4611686018427387904, 4611686018427387904]"), "fit in usize");
    with_json(&NESTED_JSON.replace("[300, 128]", "[18446744073709551615, 2]"), "fit in usize");
    // Enormous but representable: rejected by the byte-length check, before any allocation of that size.
    with_json(&NESTED_JSON.replace("[300, 128]", "[1099511627776, 1048576]"), "expected (numel + 1) / 2");
    with_json(&NESTED_JSON.replace("[300, 128]", "[18446744073709551615]"), "expected (numel + 1) / 2");
    // Too many dimensions.
    let dims = vec!["1"; 17].join(", ");
    with_json(&NESTED_JSON.replace("[300, 128]", &format!("[{dims}]")), "dimensions");
    // A shape larger than usize in JSON.
    with_json(&NESTED_JSON.replace("[300, 128]", "[1e30, 2]"), "non-negative integers");
    with_json(&NESTED_JSON.replace("[300, 128]", "[184467440737095516150, 2]"), "non-negative integers");
    // Same element count, other shape: fine (bitsandbytes only checks bytes too).
    let mut t = nested_layer();
    set(&mut t, &qs_key("nf4"), json_tensor(&NESTED_JSON.replace("[300, 128]", "[300, 2, 64]")));
    load(&t).unwrap();
}

#[test]
fn truncated_and_corrupted_files() {
    let bytes = serialize_safetensors(&nested_layer(), None).unwrap();
    for cut in [0, 1, 7, 8, 9, 50, bytes.len() / 2, bytes.len() - 1] {
        let r = parse_safetensors(&bytes[..cut]).and_then(|st| bnb::load_checkpoint(&st).map(|_| ()));
        assert!(matches!(r, Err(Error::Format { .. })), "cut at {cut}: {r:?}");
    }
    // Random byte corruption anywhere: errors or (for harmless flips in data) success, never a panic.
    let plain = serialize_safetensors(&plain_layer(), None).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for round in 0..3000 {
        let src = if round % 2 == 0 { &bytes } else { &plain };
        let mut b = src.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        let r = std::panic::catch_unwind(|| {
            parse_safetensors(&b).and_then(|st| {
                let all = bnb::load_checkpoint(&st)?;
                for (_, t) in &all {
                    t.dequantize::<f32>()?;
                }
                bnb::load_layer(&st, P).map(|_| ())
            })
        });
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("panic on corrupted input (round {round})"),
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok} err {err}");
}

#[test]
fn quant_state_json_parse_errors_directly() {
    assert!(QuantStateJson::parse(b"{}", "t").is_err());
    assert!(QuantStateJson::parse(&[0xff], "t").is_err());
    let q = QuantStateJson::parse(NESTED_JSON.as_bytes(), "t").unwrap();
    assert_eq!(q.shape, vec![300, 128]);
    assert_eq!(q.nested.unwrap().offset, 0.25);
    assert_eq!(q.to_json().unwrap(), NESTED_JSON);
    // Field order does not matter on reading.
    let reordered = "{\"shape\": [2], \"dtype\": \"bfloat16\", \"blocksize\": 32, \"quant_type\": \"fp4\"}";
    let q = QuantStateJson::parse(reordered.as_bytes(), "t").unwrap();
    assert_eq!(
        q.to_json().unwrap(),
        "{\"quant_type\": \"fp4\", \"blocksize\": 32, \"dtype\": \"bfloat16\", \"shape\": [2]}"
    );
}

#[test]
fn writer_refuses_non_builtin_tables() {
    let t = quantize_nf4(&weights(64), &[64], 64, false).unwrap();
    let mut table = *t.table();
    table[1] = -0.7;
    let odd = lowbit::nf4::FourBitTensor::from_parts(
        t.shape().to_vec(),
        t.format(),
        t.blocksize(),
        table,
        t.packed().to_vec(),
        t.scales().clone(),
        t.dtype(),
    )
    .unwrap();
    assert!(bnb::to_tensors("w", &odd).is_err());
}
