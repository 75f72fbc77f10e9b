//! End-to-end tests of the `lowbit` binary: quantize → inspect → dequantize round trips, corrupt inputs,
//! output protection and the demo.

mod common;

use common::{assert_clean_failure, assert_ok, lowbit, s, stderr, stdout};

use lowbit::affine::Granularity;
use lowbit::io::{SafetensorsFile, TensorData};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// Deterministic values with a spread of magnitudes, an exact zero and some negative runs.
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt.wrapping_mul(97)) >> 8;
            let v = (h % 20001) as f32 / 10000.0 - 1.0; // [-1, 1]
            if i % 17 == 0 {
                0.0
            } else {
                v * (1.0 + (i % 5) as f32)
            }
        })
        .collect()
}

struct Weight {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The values as the file holds them, widened to f32 exactly.
    x: Vec<f32>,
}

fn weights() -> Vec<Weight> {
    let f32w = values(16 * 100, 1);
    let bf16w: Vec<f32> = values(8 * 64, 2).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    let f16w: Vec<f32> = values(2 * 3 * 40, 3).iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    vec![
        Weight { name: "layers.0.mlp.weight", dtype: Dtype::F32, shape: vec![16, 100], x: f32w },
        Weight { name: "layers.0.attn.weight", dtype: Dtype::BF16, shape: vec![8, 64], x: bf16w },
        Weight { name: "conv.weight", dtype: Dtype::F16, shape: vec![2, 3, 40], x: f16w },
    ]
}

fn encode(w: &Weight) -> TensorData {
    let data: Vec<u8> = match w.dtype {
        Dtype::F32 => w.x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => w.x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        Dtype::F16 => w.x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        _ => unreachable!(),
    };
    TensorData { dtype: w.dtype, shape: w.shape.clone(), data }
}

/// Tensors that must be copied unchanged: a 1-D bias, a 2-D integer tensor and a scalar.
fn plain_tensors() -> Vec<(String, TensorData)> {
    let bias: Vec<f32> = values(16, 9);
    vec![
        ("layers.0.mlp.bias".into(), TensorData::from_slice(Dtype::F32, vec![16], &bias)),
        ("position_ids".into(), TensorData::from_slice(Dtype::I64, vec![2, 3], &[0i64, 1, 2, 3, 4, 5])),
        ("temperature".into(), TensorData::from_slice(Dtype::F32, vec![], &[0.5f32])),
    ]
}

fn write_model(path: &Path) {
    let mut tensors: Vec<(String, TensorData)> = weights().iter().map(|w| (w.name.to_string(), encode(w))).collect();
    tensors.extend(plain_tensors());
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    lowbit::io::write_safetensors(path, &tensors, Some(meta), false).unwrap();
}

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    lowbit::io::view_to_f32("test", view).unwrap()
}

/// Index of the scale entry that element `i` of a `[rows, cols]` tensor uses.
fn entry_of(g: Granularity, cols: usize, i: usize) -> usize {
    match g {
        Granularity::PerTensor => 0,
        Granularity::PerChannel => i / cols,
        Granularity::PerGroup(gs) => (i / cols) * cols.div_ceil(gs) + (i % cols) / gs,
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn round_trip_every_granularity() {
    let dir = tmp();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let input_bytes = std::fs::read(&input).unwrap();

    for gran in ["tensor", "channel", "group:32", "group:7"] {
        let g: Granularity = gran.parse().unwrap();
        let q_path = dir.path().join(format!("q-{}.safetensors", gran.replace(':', "")));
        let o = lowbit(&["quantize", "--scheme", "int8", "--granularity", gran, s(&input), "-o", s(&q_path)]);
        assert_ok(&o);
        assert!(stdout(&o).contains("quantized 3 tensor(s)"), "{}", stdout(&o));

        // The file holds the documented layout and metadata, equal to the library's own quantization.
        let qf = SafetensorsFile::open(&q_path).unwrap();
        let qst = qf.tensors().unwrap();
        let meta = qf.metadata().unwrap();
        assert_eq!(meta["lowbit.scheme"], "int8");
        assert_eq!(meta["lowbit.granularity"], gran);
        assert_eq!(meta["format"], "pt", "input metadata is kept");
        assert_eq!(meta["lowbit.dtype.layers.0.mlp.weight"], "float32");
        assert_eq!(meta["lowbit.dtype.layers.0.attn.weight"], "bfloat16");
        assert_eq!(meta["lowbit.dtype.conv.weight"], "float16");
        assert_eq!(qst.len(), 3 * 3 + 3);
        let mut expected = Vec::new();
        for w in weights() {
            let q = lowbit::affine::quantize(&w.x, &w.shape, g).unwrap();
            let codes = qst.tensor(w.name).unwrap();
            assert_eq!((codes.dtype(), codes.shape()), (Dtype::U8, &w.shape[..]));
            assert_eq!(codes.data(), q.codes(), "{gran} {}", w.name);
            let scale = qst.tensor(&format!("{}.scale", w.name)).unwrap();
            assert_eq!((scale.dtype(), scale.shape()), (Dtype::F32, &[q.scales().len()][..]));
            assert_eq!(f32s(&scale), q.scales());
            let zp = qst.tensor(&format!("{}.zero_point", w.name)).unwrap();
            assert_eq!((zp.dtype(), zp.shape()), (Dtype::U8, &[q.scales().len()][..]));
            assert_eq!(zp.data(), q.zero_points());
            expected.push((w, q));
        }
        let src = SafetensorsFile::open(&input).unwrap();
        for (name, _) in plain_tensors() {
            let a = qst.tensor(&name).unwrap();
            let b = src.tensors().unwrap().tensor(&name).unwrap().clone();
            assert_eq!((a.dtype(), a.shape(), a.data()), (b.dtype(), b.shape(), b.data()), "{name} copied");
        }

        // inspect lists the formats and, with --compare, the error against the original.
        let o = lowbit(&["inspect", s(&q_path), "--compare", s(&input)]);
        assert_ok(&o);
        let listing = stdout(&o);
        assert!(listing.contains(&format!("int8 {gran} (from bf16)")), "{listing}");
        assert!(listing.contains("SQNR dB") && listing.contains("plain"), "{listing}");
        assert!(!listing.contains(".zero_point"), "parameter entries are folded: {listing}");
        assert!(listing.contains("6 tensor(s) in 12 entries; 3 quantized"), "{listing}");

        // dequantize: default f32, bit-identical to the library, within scale/2 of the original.
        let d_path = dir.path().join(format!("d-{}.safetensors", gran.replace(':', "")));
        assert_ok(&lowbit(&["dequantize", s(&q_path), "-o", s(&d_path)]));
        let df = SafetensorsFile::open(&d_path).unwrap();
        let dst = df.tensors().unwrap();
        assert_eq!(dst.len(), 6, "parameter entries dropped");
        assert!(df.metadata().unwrap().keys().all(|k| !k.starts_with("lowbit.")));
        for (w, q) in &expected {
            let v = dst.tensor(w.name).unwrap();
            assert_eq!((v.dtype(), v.shape()), (Dtype::F32, &w.shape[..]));
            let got = f32s(&v);
            let lib: Vec<f32> = q.dequantize().unwrap();
            assert!(got.iter().zip(&lib).all(|(a, b)| a.to_bits() == b.to_bits()), "{gran} {}", w.name);
            let cols = *w.shape.last().unwrap();
            for (i, (&x, &y)) in w.x.iter().zip(&got).enumerate() {
                let scale = q.scales()[entry_of(g, cols, i)];
                assert!((x - y).abs() <= scale / 2.0 * (1.0 + 1e-5), "{gran} {}[{i}]: {x} vs {y}", w.name);
            }
        }
        for (name, _) in plain_tensors() {
            let a = dst.tensor(&name).unwrap();
            let b = src.tensors().unwrap().tensor(&name).unwrap().clone();
            assert_eq!((a.dtype(), a.shape(), a.data()), (b.dtype(), b.shape(), b.data()), "{name} copied");
        }

        // --dtype bf16 gives the library's bf16 bits.
        let b_path = dir.path().join(format!("b-{}.safetensors", gran.replace(':', "")));
        assert_ok(&lowbit(&["dequantize", s(&q_path), "-o", s(&b_path), "--dtype", "bf16"]));
        let bf = SafetensorsFile::open(&b_path).unwrap();
        for (w, q) in &expected {
            let v = bf.tensors().unwrap().tensor(w.name).unwrap().clone();
            assert_eq!(v.dtype(), Dtype::BF16);
            assert_eq!(v.data(), &q.dequantize_to_bytes(lowbit::DType::BF16).unwrap()[..]);
        }
    }
    assert_eq!(std::fs::read(&input).unwrap(), input_bytes, "the input is never modified");
}

fn corrupt_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let good = dir.join("good.safetensors");
    write_model(&good);
    let bytes = std::fs::read(&good).unwrap();
    let mut out = Vec::new();
    let mut add = |name: &'static str, data: Vec<u8>| {
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, data).unwrap();
        out.push((name, p));
    };
    add("truncated", bytes[..bytes.len() / 2].to_vec());
    add("header-only", bytes[..20].to_vec());
    add("empty", Vec::new());
    let mut garbage = u64::MAX.to_le_bytes().to_vec();
    garbage.extend(b"{ this is not json");
    add("huge-header-length", garbage);
    let mut bad_json = 16u64.to_le_bytes().to_vec();
    bad_json.extend(b"{\"a\": [1, 2, 3]}");
    add("garbage-header", bad_json);
    out.push(("missing", dir.join("does-not-exist.safetensors")));
    out
}

#[test]
fn corrupt_files_fail_cleanly_without_output() {
    let dir = tmp();
    for (what, path) in corrupt_files(dir.path()) {
        let out = dir.path().join(format!("out-{what}.safetensors"));
        let needle = if what == "missing" { "does-not-exist" } else { "malformed" };
        assert_clean_failure(&lowbit(&["quantize", s(&path), "-o", s(&out)]), needle);
        assert_clean_failure(&lowbit(&["dequantize", s(&path), "-o", s(&out)]), needle);
        assert_clean_failure(&lowbit(&["inspect", s(&path)]), needle);
        assert!(!out.exists(), "{what}: no output file");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.starts_with("out-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// One bad file: name, tensors, metadata, and a phrase the error must contain.
type Case = (&'static str, Vec<(String, TensorData)>, std::collections::HashMap<String, String>, &'static str);

/// A well-formed safetensors file whose int8 entries are inconsistent.
#[test]
fn inconsistent_int8_files_fail_cleanly() {
    let dir = tmp();
    let codes = TensorData::from_slice(Dtype::U8, vec![2, 4], &[0u8; 8]);
    let meta = |g: &str| -> std::collections::HashMap<String, String> {
        [("lowbit.scheme", "int8"), ("lowbit.granularity", g), ("lowbit.dtype.w", "float32")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cases: Vec<Case> = vec![
        (
            "wrong-count",
            vec![
                ("w".into(), codes.clone()),
                ("w.scale".into(), TensorData::from_slice(Dtype::F32, vec![3], &[1f32; 3])),
                ("w.zero_point".into(), TensorData::from_slice(Dtype::U8, vec![3], &[0u8; 3])),
            ],
            meta("channel"),
            "number of scales",
        ),
        (
            "negative-scale",
            vec![
                ("w".into(), codes.clone()),
                ("w.scale".into(), TensorData::from_slice(Dtype::F32, vec![1], &[-1f32])),
                ("w.zero_point".into(), TensorData::from_slice(Dtype::U8, vec![1], &[0u8])),
            ],
            meta("tensor"),
            "positive",
        ),
        ("missing-params", vec![("w".into(), codes.clone())], meta("tensor"), "w.scale"),
        ("bad-granularity", vec![("w".into(), codes.clone())], meta("group:0"), "lowbit.granularity"),
        (
            "codes-not-u8",
            vec![
                ("w".into(), TensorData::from_slice(Dtype::F32, vec![2, 4], &[0f32; 8])),
                ("w.scale".into(), TensorData::from_slice(Dtype::F32, vec![1], &[1f32])),
                ("w.zero_point".into(), TensorData::from_slice(Dtype::U8, vec![1], &[0u8])),
            ],
            meta("tensor"),
            "expected U8",
        ),
    ];
    for (what, tensors, meta, needle) in cases {
        let p = dir.path().join(format!("{what}.safetensors"));
        lowbit::io::write_safetensors(&p, &tensors, Some(meta), false).unwrap();
        let out = dir.path().join(format!("out-{what}.safetensors"));
        assert_clean_failure(&lowbit(&["dequantize", s(&p), "-o", s(&out)]), needle);
        assert_clean_failure(&lowbit(&["inspect", s(&p)]), needle);
        assert!(!out.exists(), "{what}");
    }
}

#[test]
fn existing_output_is_refused_without_force() {
    let dir = tmp();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    assert_clean_failure(&lowbit(&["quantize", s(&input), "-o", s(&out)]), "--force");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    assert_ok(&lowbit(&["quantize", s(&input), "-o", s(&out), "--force"]));
    let q = SafetensorsFile::open(&out).unwrap();
    assert_eq!(q.metadata().unwrap()["lowbit.granularity"], "channel", "channel is the default");

    let deq = dir.path().join("deq.safetensors");
    std::fs::write(&deq, b"keep me too").unwrap();
    assert_clean_failure(&lowbit(&["dequantize", s(&out), "-o", s(&deq)]), "--force");
    assert_eq!(std::fs::read(&deq).unwrap(), b"keep me too");
    assert_ok(&lowbit(&["dequantize", s(&out), "-o", s(&deq), "--force"]));

    // Writing over the input is refused even with --force.
    let before = std::fs::read(&input).unwrap();
    assert_clean_failure(&lowbit(&["quantize", s(&input), "-o", s(&input), "--force"]), "is the input");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tmp();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let out = dir.path().join("out.safetensors");

    // A plain file has nothing to dequantize; a quantized file is not quantized again.
    assert_clean_failure(&lowbit(&["dequantize", s(&input), "-o", s(&out)]), "no quantized tensors");
    assert_ok(&lowbit(&["quantize", s(&input), "-o", s(&out)]));
    let again = dir.path().join("again.safetensors");
    assert_clean_failure(&lowbit(&["quantize", s(&out), "-o", s(&again)]), "already quantized");
    assert!(!again.exists());

    // NaN in a weight names the tensor.
    let nan = dir.path().join("nan.safetensors");
    let mut x = values(4 * 8, 5);
    x[11] = f32::NAN;
    let t = vec![("bad.weight".to_string(), TensorData::from_slice(Dtype::F32, vec![4, 8], &x))];
    lowbit::io::write_safetensors(&nan, &t, None, false).unwrap();
    let nan_out = dir.path().join("nan-out.safetensors");
    assert_clean_failure(&lowbit(&["quantize", s(&nan), "-o", s(&nan_out)]), "bad.weight");
    assert!(!nan_out.exists());

    // The parameters of a weight would collide with an existing tensor.
    let clash = dir.path().join("clash.safetensors");
    let t = vec![
        ("w".to_string(), TensorData::from_slice(Dtype::F32, vec![2, 2], &[1f32, 2., 3., 4.])),
        ("w.scale".to_string(), TensorData::from_slice(Dtype::F32, vec![1], &[1f32])),
    ];
    lowbit::io::write_safetensors(&clash, &t, None, false).unwrap();
    // (`w` is not a `*.weight`, so the default rule keeps it: --include selects it.)
    assert_clean_failure(&lowbit(&["quantize", s(&clash), "--include", "w", "-o", s(&nan_out)]), "w.scale");

    // An output directory that does not exist.
    let nowhere = dir.path().join("no-such-dir").join("out.safetensors");
    assert_clean_failure(&lowbit(&["quantize", s(&input), "-o", s(&nowhere)]), "does not exist");

    // --compare against a file lacking the tensor.
    assert_clean_failure(&lowbit(&["inspect", s(&out), "--compare", s(&nan)]), "not in the original");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["quantize", "a", "-o", "b", "--granularity", "group:0"][..],
        &["quantize", "a", "-o", "b", "--granularity", "row"][..],
        &["quantize", "a", "-o", "b", "--scheme", "int3"][..],
        &["dequantize", "a", "-o", "b", "--dtype", "f8"][..],
        &["quantize", "a"][..],
        &["frobnicate"][..],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn help_documents_the_layout() {
    let o = lowbit(&["quantize", "--help"]);
    assert_ok(&o);
    let help = stdout(&o);
    for needle in ["NAME.scale", "NAME.zero_point", "lowbit.granularity", "lowbit.dtype.NAME"] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
}

#[test]
fn demo_small_matches_reference_on_every_path() {
    let o = lowbit(&["demo", "--size", "96"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("CPU ISA:"), "{out}");
    for g in ["int8:tensor", "int8:channel", "int8:group:128", "int8:group:32", "nf4:64 ", "nf4:64+dq", "fp4:64"] {
        assert!(out.contains(g), "{g}: {out}");
    }
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(out.contains("match the scalar reference"), "{out}");
    // The QuantLinear rows: 3 formats x M in {1, 8} x without / with a rank-16 adapter.
    assert!(out.contains("QuantLinear 96x96"), "{out}");
    let linear = &out[out.find("QuantLinear 96x96").unwrap_or(0)..];
    // The GPU section (rows or the skip line; tests/gpu.rs checks it) follows the CPU rows.
    let linear = &linear[..linear.find("\nGPU").unwrap_or(linear.len())];
    let linear_rows = linear.lines().filter(|l| l.ends_with("  ok")).count();
    assert_eq!(linear_rows, 12, "{out}");
    assert!(out.contains("all 12 QuantLinear runs agree with the f64 reference"), "{out}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name)
}

/// NF4-quantizes a weight in its own element type, as the CLI does (so the recorded dtype is the source's).
fn nf4_of(w: &Weight, blocksize: usize, dq: bool) -> lowbit::nf4::FourBitTensor {
    use lowbit::nf4::quantize_nf4;
    match w.dtype {
        Dtype::F32 => quantize_nf4(&w.x, &w.shape, blocksize, dq),
        Dtype::BF16 => {
            let x: Vec<half::bf16> = w.x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            quantize_nf4(&x, &w.shape, blocksize, dq)
        }
        Dtype::F16 => {
            let x: Vec<half::f16> = w.x.iter().map(|&v| half::f16::from_f32(v)).collect();
            quantize_nf4(&x, &w.shape, blocksize, dq)
        }
        _ => unreachable!(),
    }
    .unwrap()
}

#[test]
fn nf4_round_trip_writes_the_bitsandbytes_layout() {
    let dir = tmp();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    // The scheme as text (`nf4:64+dq`) or as `nf4` refined by --blocksize / --double-quant.
    for (scheme, blocksize, dq) in [("nf4", 64, false), ("nf4:64+dq", 64, true), ("nf4", 32, true)] {
        let tag = format!("{blocksize}{}", if dq { "dq" } else { "" });
        let q_path = dir.path().join(format!("nf4-{tag}.safetensors"));
        let mut args = vec!["quantize", "--scheme", scheme, s(&input), "-o", s(&q_path)];
        let bs = blocksize.to_string();
        if blocksize != 64 {
            args.extend(["--blocksize", &bs]);
        }
        if dq && scheme == "nf4" {
            args.push("--double-quant");
        }
        assert_ok(&lowbit(&args));

        // Exactly the entries lowbit::io::bnb writes for the library's own quantization, plus the copies.
        let qf = SafetensorsFile::open(&q_path).unwrap();
        let qst = qf.tensors().unwrap();
        assert!(qf.metadata().unwrap().keys().all(|k| !k.starts_with("lowbit.")), "pure bitsandbytes layout");
        let mut n_entries = plain_tensors().len();
        let mut expected = Vec::new();
        for w in weights() {
            let t = nf4_of(&w, blocksize, dq);
            for (key, td) in lowbit::io::bnb::to_tensors(w.name, &t).unwrap() {
                let v = qst.tensor(&key).unwrap();
                assert_eq!((v.dtype(), v.shape(), v.data()), (td.dtype, &td.shape[..], &td.data[..]), "{tag} {key}");
                n_entries += 1;
            }
            expected.push((w, t));
        }
        assert_eq!(qst.len(), n_entries);

        let o = lowbit(&["inspect", s(&q_path), "--compare", s(&input)]);
        assert_ok(&o);
        let listing = stdout(&o);
        let nested = if dq { " nested" } else { "" };
        assert!(listing.contains(&format!("nf4 block:{blocksize}{nested} (from bf16)")), "{listing}");
        assert!(listing.contains("[2, 3, 40]") && !listing.contains(".absmax"), "{listing}");

        // Default dtype: the one each quant state records; values are the library's bits.
        let d_path = dir.path().join(format!("d-{tag}.safetensors"));
        assert_ok(&lowbit(&["dequantize", s(&q_path), "-o", s(&d_path)]));
        let df = SafetensorsFile::open(&d_path).unwrap();
        let dst = df.tensors().unwrap();
        assert_eq!(dst.len(), 6, "quantization entries dropped");
        for (w, t) in &expected {
            let v = dst.tensor(w.name).unwrap();
            assert_eq!((v.dtype(), v.shape()), (w.dtype, &w.shape[..]), "{tag} {}", w.name);
            let lib = match w.dtype {
                Dtype::F32 => bytemuck::cast_slice::<_, u8>(&t.dequantize::<f32>().unwrap()).to_vec(),
                Dtype::BF16 => bytemuck::cast_slice::<_, u8>(&t.dequantize::<half::bf16>().unwrap()).to_vec(),
                _ => bytemuck::cast_slice::<_, u8>(&t.dequantize::<half::f16>().unwrap()).to_vec(),
            };
            assert_eq!(v.data(), &lib[..], "{tag} {}", w.name);
        }
        let f32_path = dir.path().join(format!("f-{tag}.safetensors"));
        assert_ok(&lowbit(&["dequantize", s(&q_path), "-o", s(&f32_path), "--dtype", "f32"]));
        let ff = SafetensorsFile::open(&f32_path).unwrap();
        for (w, t) in &expected {
            let v = ff.tensors().unwrap().tensor(w.name).unwrap().clone();
            assert_eq!(v.dtype(), Dtype::F32);
            assert_eq!(f32s(&v), t.dequantize::<f32>().unwrap());
        }
    }
}

/// A checkpoint written by bitsandbytes itself (two `Linear4bit` layers: NF4 nested bf16, FP4 f16).
#[test]
fn dequantize_real_bitsandbytes_checkpoint() {
    let dir = tmp();
    let ckpt = fixture("bnb_linear4bit.safetensors");
    let expected = SafetensorsFile::open(fixture("bnb_4bit.safetensors")).unwrap();
    let exp = expected.tensors().unwrap();

    let o = lowbit(&["inspect", s(&ckpt)]);
    assert_ok(&o);
    let listing = stdout(&o);
    assert!(listing.contains("nf4 block:64 nested (from bf16)"), "{listing}");
    assert!(listing.contains("fp4 block:64 (from f16)"), "{listing}");
    assert!(listing.contains("4 tensor(s) in 12 entries; 2 quantized"), "{listing}");

    for (dtype, suffix) in [(None, "dequant"), (Some("f32"), "dequant_f32")] {
        let out = dir.path().join(format!("{suffix}.safetensors"));
        let mut args = vec!["dequantize", s(&ckpt), "-o", s(&out)];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        assert_ok(&lowbit(&args));
        let f = SafetensorsFile::open(&out).unwrap();
        let st = f.tensors().unwrap();
        let mut names: Vec<&str> = st.names().into_iter().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.mlp.up_proj.bias",
                "model.layers.0.mlp.up_proj.weight",
                "model.norm.weight"
            ]
        );
        for layer in ["down_proj", "up_proj"] {
            let got = st.tensor(&format!("model.layers.0.mlp.{layer}.weight")).unwrap();
            let want = exp.tensor(&format!("linear4bit.model.layers.0.mlp.{layer}.{suffix}")).unwrap();
            assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()), "{layer} {suffix}");
            assert_eq!(got.data(), want.data(), "{layer} {suffix}: bitsandbytes' reference bits");
        }
        let src = SafetensorsFile::open(&ckpt).unwrap();
        for plain in ["model.layers.0.mlp.up_proj.bias", "model.norm.weight"] {
            assert_eq!(st.tensor(plain).unwrap().data(), src.tensors().unwrap().tensor(plain).unwrap().data());
        }
    }
}

#[test]
fn corrupt_bitsandbytes_entries_fail_cleanly() {
    let dir = tmp();
    let src = SafetensorsFile::open(fixture("bnb_linear4bit.safetensors")).unwrap();
    let st = src.tensors().unwrap();
    let all: Vec<(String, TensorData)> =
        st.tensors().into_iter().map(|(n, v)| (n.to_string(), TensorData::from_view(&v))).collect();
    const W: &str = "model.layers.0.mlp.down_proj.weight";
    type Edit = Box<dyn Fn(&mut Vec<(String, TensorData)>)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "short-absmax",
            Box::new(|t| {
                let e = t.iter_mut().find(|(n, _)| n == &format!("{W}.absmax")).unwrap();
                e.1 = TensorData::from_slice(Dtype::F32, vec![3], &[1f32; 3]);
            }),
        ),
        (
            "bad-json",
            Box::new(|t| {
                let e = t.iter_mut().find(|(n, _)| n.ends_with("bitsandbytes__fp4")).unwrap();
                e.1 = TensorData::from_slice(Dtype::U8, vec![5], b"{oops");
            }),
        ),
        ("no-quant-map", Box::new(|t| t.retain(|(n, _)| n != &format!("{W}.quant_map")))),
    ];
    for (what, edit) in edits {
        let mut t = all.clone();
        edit(&mut t);
        let p = dir.path().join(format!("{what}.safetensors"));
        lowbit::io::write_safetensors(&p, &t, None, false).unwrap();
        let out = dir.path().join(format!("out-{what}.safetensors"));
        assert_clean_failure(&lowbit(&["dequantize", s(&p), "-o", s(&out)]), "down_proj");
        assert_clean_failure(&lowbit(&["inspect", s(&p)]), "down_proj");
        let q = dir.path().join(format!("q-{what}.safetensors"));
        assert_clean_failure(&lowbit(&["quantize", s(&p), "-o", s(&q)]), "already quantized");
        assert!(!out.exists() && !q.exists(), "{what}");
    }
}

#[test]
fn scheme_options_are_checked() {
    for args in [
        &["quantize", "a", "-o", "b", "--scheme", "nf4", "--granularity", "channel"][..],
        &["quantize", "a", "-o", "b", "--blocksize", "64"][..],
        &["quantize", "a", "-o", "b", "--double-quant"][..],
        &["quantize", "a", "-o", "b", "--scheme", "nf4", "--blocksize", "48"][..],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn quantize_takes_any_scheme_text_fp4_included() {
    let dir = tmp();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let q_path = dir.path().join("fp4.safetensors");
    assert_ok(&lowbit(&["quantize", "--scheme", "fp4:128+dq", s(&input), "-o", s(&q_path)]));
    let qf = SafetensorsFile::open(&q_path).unwrap();
    let qst = qf.tensors().unwrap();
    for w in weights() {
        let t = lowbit::io::bnb::load_weight(&qst, w.name).unwrap();
        assert_eq!(t.format(), lowbit::nf4::FourBitFormat::Fp4, "{}", w.name);
        assert_eq!(t.blocksize(), 128);
        assert!(matches!(t.scales(), lowbit::nf4::BlockScales::Double(_)));
    }
    let o = lowbit(&["quantize", "--scheme", "nf4:100", s(&input), "-o", s(&dir.path().join("bad.safetensors"))]);
    assert_eq!(o.status.code(), Some(2), "a bad scheme is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("blocksize"), "{}", String::from_utf8_lossy(&o.stderr));
}
