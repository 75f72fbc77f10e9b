//! `lowbit merge`: the per-layer report of how much of the adapter survived requantization, the warning when
//! requantization erases it, the ways out (`--dtype`, `--scheme`), and the inputs it refuses to overwrite.

mod common;

use common::{assert_ok, lowbit, s, stderr, stdout};

use lowbit::affine::Granularity;
use lowbit::io::{bnb, Checkpoint, Layout, SafetensorsFile, TensorData};
use lowbit::linear::QuantWeight;
use safetensors::Dtype;
use std::path::Path;
use std::process::Output;

#[track_caller]
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

/// Deterministic values in about [-scale, scale].
fn values(n: usize, salt: u64, scale: f32) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

const UP: &str = "model.layers.0.mlp.up_proj";
const DOWN: &str = "model.layers.0.mlp.down_proj";
/// Realistic sizes for a small model's MLP (in = 256 is a whole number of NF4 blocks per row).
const HIDDEN: usize = 256;
const INTER: usize = 96;
const RANK: usize = 8;
const ALPHA: f32 = 16.0;

/// Weights like a trained layer's (|w| ≤ 0.05), an F32 bias and a plain norm; UP and DOWN quantized with
/// `quant` (the tensors of one weight), or stored dense F32 when `quant` is `None`.
/// Quantizes one weight (name, values, shape) into the entries that store it.
type Quant = fn(&str, &[f32], [usize; 2]) -> Vec<(String, TensorData)>;

fn write_base(path: &Path, quant: Option<Quant>) {
    let up = values(INTER * HIDDEN, 1, 0.05);
    let down = values(HIDDEN * INTER, 2, 0.05);
    let mut t = Vec::new();
    let mut meta = None;
    for (name, w, shape) in [(UP, &up, [INTER, HIDDEN]), (DOWN, &down, [HIDDEN, INTER])] {
        let name = format!("{name}.weight");
        match quant {
            Some(q) => t.extend(q(&name, w, shape)),
            None => t.push((name, TensorData::from_slice(Dtype::F32, shape.to_vec(), w))),
        }
    }
    if t.iter().any(|(n, _)| n.ends_with(".scale")) {
        let (u, d) = (format!("{UP}.weight"), format!("{DOWN}.weight"));
        meta = Some(lowbit::io::int8::metadata(
            Granularity::PerChannel,
            [(u.as_str(), lowbit::DType::F32), (d.as_str(), lowbit::DType::F32)],
        ));
    }
    t.push((format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &values(INTER, 3, 0.1))));
    t.push(("model.norm.weight".into(), TensorData::from_slice(Dtype::F32, vec![HIDDEN], &values(HIDDEN, 4, 1.0))));
    lowbit::io::write_safetensors(path, &t, meta, true).unwrap();
}

fn nf4(name: &str, w: &[f32], shape: [usize; 2]) -> Vec<(String, TensorData)> {
    bnb::to_tensors(name, &lowbit::nf4::quantize_nf4(w, &shape, 64, false).unwrap()).unwrap()
}

fn int8_channel(name: &str, w: &[f32], shape: [usize; 2]) -> Vec<(String, TensorData)> {
    lowbit::io::int8::to_tensors(name, &lowbit::affine::quantize(w, &shape, Granularity::PerChannel).unwrap()).into()
}

/// A PEFT adapter for UP only, rank 8, alpha 16 (s = 2), whose change is small, as after a short fine-tune:
/// RMS(s·B·A) ≈ 1e-3, below half an NF4 step of these weights (≈ 2e-3) but several int8 steps (≈ 4e-4).
fn write_adapter(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"{{"peft_type": "LORA", "r": {RANK}, "lora_alpha": {ALPHA}, "target_modules": ["up_proj"],
            "use_rslora": false, "fan_in_fan_out": false}}"#
    );
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let a = values(RANK * HIDDEN, 10, 0.1);
    let b = values(INTER * RANK, 11, 0.005);
    let key = |ab: &str| format!("base_model.model.{UP}.{ab}.weight");
    let t = [
        (key("lora_A"), TensorData::from_slice(Dtype::F32, vec![RANK, HIDDEN], &a)),
        (key("lora_B"), TensorData::from_slice(Dtype::F32, vec![INTER, RANK], &b)),
    ];
    lowbit::io::write_safetensors(dir.join("adapter_model.safetensors"), &t, None, true).unwrap();
    (a, b)
}

/// `s·B·A` in f32, PEFT's order (sum over the rank in increasing order, then times s).
fn delta(a: &[f32], b: &[f32]) -> Vec<f32> {
    let s = ALPHA / RANK as f32;
    let mut d = vec![0f32; INTER * HIDDEN];
    for o in 0..INTER {
        for k in 0..HIDDEN {
            let mut acc = 0f32;
            for j in 0..RANK {
                acc += b[o * RANK + j] * a[j * HIDDEN + k];
            }
            d[o * HIDDEN + k] = acc * s;
        }
    }
    d
}

/// `(kept, ratio)`: `<Δ', Δ>/‖Δ‖²` and `‖Δ' − Δ‖/‖Δ‖` with `Δ' = merged − base`, in f64.
fn survival(base: &[f32], d: &[f32], merged: &[f32]) -> (f64, f64) {
    let (mut dot, mut dd, mut diff) = (0f64, 0f64, 0f64);
    for ((&w0, &d), &w1) in base.iter().zip(d).zip(merged) {
        let dp = f64::from(w1) - f64::from(w0);
        let d = f64::from(d);
        dot += dp * d;
        dd += d * d;
        diff += (dp - d) * (dp - d);
    }
    (dot / dd, (diff / dd).sqrt())
}

/// The weight of layer `path` of a checkpoint, dequantized (or dense) to f32.
fn weight_f32(ckpt: &Path, path: &str) -> Vec<f32> {
    let ck = Checkpoint::open(ckpt).unwrap();
    match ck.layout() {
        Layout::Dense => ck.tensor_f32(&format!("{path}.weight")).unwrap(),
        _ => ck.layer(path).unwrap().weight().dequantize_reference(),
    }
}

/// The report row of `path`: its cells split on runs of spaces.
fn row<'a>(out: &'a str, path: &str) -> Vec<&'a str> {
    let line = out.lines().find(|l| l.starts_with(path)).unwrap_or_else(|| panic!("no row for {path}: {out}"));
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect()
}

/// Checks the row's `kept` and `|Δ'-Δ|/|Δ|` cells against the values computed here.
#[track_caller]
fn check_row(out: &str, kept: f64, ratio: f64) -> bool {
    let header = out.lines().find(|l| l.starts_with("layer ")).unwrap();
    let cols: Vec<&str> = header.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    let r = row(out, UP);
    let at = |name: &str| cols.iter().position(|c| *c == name).unwrap_or_else(|| panic!("{name}: {header}"));
    assert_eq!(r[at("kept")], format!("{:.1}%", 100.0 * kept), "{out}");
    assert_eq!(r[at("|Δ'-Δ|/|Δ|")], format!("{ratio:.3}"), "{out}");
    r.last() == Some(&"!")
}

#[test]
fn nf4_erasing_a_small_adapter_warns_and_int8_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let (a, b) = write_adapter(&adapter);
    let d = delta(&a, &b);
    for (what, quant, erased) in [("nf4", nf4 as Quant, true), ("int8", int8_channel as Quant, false)] {
        let base = dir.path().join(format!("{what}.safetensors"));
        write_base(&base, Some(quant));
        let out = dir.path().join(format!("{what}-merged.safetensors"));
        let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&out)]);
        assert_ok(&o);
        let (report, err) = (stdout(&o), stderr(&o));
        let (kept, ratio) = survival(&weight_f32(&base, UP), &d, &weight_f32(&out, UP));
        eprintln!("{what}: kept {:.1}%, |Δ'-Δ|/|Δ| = {ratio:.3}", 100.0 * kept);
        let marked = check_row(&report, kept, ratio);
        assert_eq!(ratio >= 1.0, erased, "{what}: the case must be realistic: {report}");
        assert_eq!(marked, erased, "{what}: {report}");
        if erased {
            assert!(kept < 0.5, "{what}: {report}");
            assert!(err.contains("warning: in 1 of 1 merged layer(s)"), "{err}");
            assert_eq!(err.matches("warning:").count(), 1, "once per run: {err}");
            for way in ["--dtype f16|bf16|f32", "--scheme int8:channel"] {
                assert!(err.contains(way), "{way}: {err}");
            }
        } else {
            assert!(kept > 0.9, "{what}: {report}");
            assert!(!err.contains("warning"), "{what}: {err}");
        }
    }
}

#[test]
fn dtype_writes_the_merged_model_dense() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let (a, b) = write_adapter(&adapter);
    let d = delta(&a, &b);
    let base = dir.path().join("nf4.safetensors");
    write_base(&base, Some(nf4));
    let (up0, down0) = (weight_f32(&base, UP), weight_f32(&base, DOWN));
    for (dtype, st, round) in [
        ("f16", Dtype::F16, (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32),
        ("bf16", Dtype::BF16, |x: f32| half::bf16::from_f32(x).to_f32()),
        ("f32", Dtype::F32, |x: f32| x),
    ] {
        let out = dir.path().join(format!("merged-{dtype}.safetensors"));
        let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&out), "--dtype", dtype]);
        assert_ok(&o);
        assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
        assert!(stdout(&o).contains(&format!("wrote them dense in {dtype}")), "{}", stdout(&o));
        let f = SafetensorsFile::open(&out).unwrap();
        let t = f.tensors().unwrap();
        let mut names = t.names();
        names.sort();
        assert_eq!(
            names,
            [format!("{DOWN}.weight"), format!("{UP}.bias"), format!("{UP}.weight"), "model.norm.weight".into()]
        );
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.layout(), &Layout::Dense);
        for (path, want) in [
            (UP, up0.iter().zip(&d).map(|(w, d)| round(w + d)).collect::<Vec<f32>>()),
            (DOWN, down0.iter().map(|&w| round(w)).collect()),
        ] {
            let v = t.tensor(&format!("{path}.weight")).unwrap();
            assert_eq!(v.dtype(), st, "{path}");
            let got = ck.tensor_f32(&format!("{path}.weight")).unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype} {path}");
        }
        let bt = SafetensorsFile::open(&base).unwrap();
        let bt = bt.tensors().unwrap();
        for plain in [format!("{UP}.bias"), "model.norm.weight".into()] {
            assert_eq!(t.tensor(&plain).unwrap().data(), bt.tensor(&plain).unwrap().data(), "{plain}");
        }
        if dtype == "f32" {
            // Nothing lost but the f32 rounding of dequant(W) + s·B·A: every change kept.
            let (kept, ratio) = survival(&up0, &d, &weight_f32(&out, UP));
            check_row(&stdout(&o), kept, ratio);
            assert!((kept - 1.0).abs() < 1e-3 && ratio < 1e-3, "{kept} {ratio}");
        }
    }

    // A dense base: a plain merge has no format to requantize into; --dtype merges it.
    let dense = dir.path().join("dense.safetensors");
    write_base(&dense, None);
    let out = dir.path().join("dense-merged.safetensors");
    assert_clean_failure(&lowbit(&["merge", s(&dense), "--adapter", s(&adapter), "-o", s(&out)]), "--dtype");
    assert_ok(&lowbit(&["merge", s(&dense), "--adapter", s(&adapter), "-o", s(&out), "--dtype", "f32"]));
    let up = values(INTER * HIDDEN, 1, 0.05);
    let want: Vec<f32> = up.iter().zip(&d).map(|(w, d)| w + d).collect();
    assert_eq!(weight_f32(&out, UP), want);
}

#[test]
fn scheme_requantizes_to_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let (a, b) = write_adapter(&adapter);
    let d = delta(&a, &b);
    let base = dir.path().join("nf4.safetensors");
    write_base(&base, Some(nf4));
    let (up0, down0) = (weight_f32(&base, UP), weight_f32(&base, DOWN));
    let out = dir.path().join("merged-int8.safetensors");
    let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&out), "--scheme", "int8:channel"]);
    assert_ok(&o);
    assert!(!stderr(&o).contains("warning"), "int8 keeps the adapter: {}", stderr(&o));
    assert!(stdout(&o).contains("1 other quantized tensor(s) requantized to int8:channel"), "{}", stdout(&o));

    let ck = Checkpoint::open(&out).unwrap();
    assert!(matches!(ck.layout(), Layout::Int8(_)), "{:?}", ck.layout());
    assert!(!ck.tensor_names().iter().any(|n| n.contains("absmax") || n.contains("quant_state")));
    let target: Vec<f32> = up0.iter().zip(&d).map(|(w, d)| w + d).collect();
    for (path, values, shape) in [(UP, &target, [INTER, HIDDEN]), (DOWN, &down0, [HIDDEN, INTER])] {
        let want = lowbit::affine::quantize(values, &shape, Granularity::PerChannel).unwrap();
        assert_eq!(ck.layer(path).unwrap().weight(), &QuantWeight::Int8(want), "{path}");
    }
    let (kept, ratio) = survival(&up0, &d, &weight_f32(&out, UP));
    assert!(!check_row(&stdout(&o), kept, ratio));

    // Another 4-bit scheme keeps the bitsandbytes layout; the untouched layer, already nf4:64, is copied.
    let out4 = dir.path().join("merged-nf4dq.safetensors");
    let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&out4), "--scheme", "nf4:64"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("0 other quantized tensor(s) requantized to nf4:64, 1 already in it"),
        "{}",
        stdout(&o)
    );
    let (bf, mf) = (SafetensorsFile::open(&base).unwrap(), SafetensorsFile::open(&out4).unwrap());
    let (bt, mt) = (bf.tensors().unwrap(), mf.tensors().unwrap());
    for n in bt.names().into_iter().filter(|n| n.starts_with(DOWN)) {
        assert_eq!(bt.tensor(n).unwrap().data(), mt.tensor(n).unwrap().data(), "{n}");
    }
    // The same as the default merge (nf4:64 is the base's scheme).
    let same = dir.path().join("merged-same.safetensors");
    assert_ok(&lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&same)]));
    assert_eq!(std::fs::read(&same).unwrap(), std::fs::read(&out4).unwrap());

    // --dtype and --scheme conflict (usage error).
    let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&out), "--dtype", "f16", "--scheme", "int8"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn merge_never_overwrites_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    let base = dir.path().join("nf4.safetensors");
    write_base(&base, Some(nf4));
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(&base, model.join("model.safetensors")).unwrap();
    let protected = [
        (base.clone(), base.clone(), "the base checkpoint"),
        (base.clone(), adapter.join("adapter_model.safetensors"), "a file of the adapter directory"),
        (base.clone(), adapter.join("adapter_config.json"), "a file of the adapter directory"),
        (model.clone(), model.join("model.safetensors"), "the base checkpoint"),
    ];
    for (b, out, needle) in protected {
        let before = std::fs::read(&out).unwrap();
        let o = lowbit(&["merge", s(&b), "--adapter", s(&adapter), "-o", s(&out), "--force"]);
        assert_clean_failure(&o, needle);
        assert_eq!(std::fs::read(&out).unwrap(), before, "{out:?} untouched");
    }
    // A model directory as the base works like its file.
    let (from_file, from_dir) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    assert_ok(&lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&from_file)]));
    assert_ok(&lowbit(&["merge", s(&model), "--adapter", s(&adapter), "-o", s(&from_dir)]));
    assert_eq!(std::fs::read(&from_file).unwrap(), std::fs::read(&from_dir).unwrap());
}

/// The real model: an adapter for two attention layers merged into the Q4_1 GGUF, written dense in bf16. The
/// merged layer is bf16(decode(W) + s·B·A), every other Q4_1 tensor bf16(decode(W)), the F32 norms stay F32.
#[test]
fn merge_into_the_gguf_writes_a_dense_model() {
    let Some(gguf) = lowbit_testkit::model::smollm2_gguf("merge_into_the_gguf_writes_a_dense_model") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj"]}"#,
    )
    .unwrap();
    let (a, b) = (values(4 * 576, 20, 0.05), values(192 * 4, 21, 0.01));
    let layer = "model.layers.2.self_attn.v_proj";
    let key = |ab: &str| format!("base_model.model.{layer}.{ab}.weight");
    let t = [
        (key("lora_A"), TensorData::from_slice(Dtype::F32, vec![4, 576], &a)),
        (key("lora_B"), TensorData::from_slice(Dtype::F32, vec![192, 4], &b)),
    ];
    lowbit::io::write_safetensors(adapter.join("adapter_model.safetensors"), &t, None, true).unwrap();
    let out = dir.path().join("merged.safetensors");
    let started = std::time::Instant::now();
    let o = lowbit(&["merge", s(&gguf), "--adapter", s(&adapter), "-o", s(&out), "--dtype", "bf16"]);
    assert_ok(&o);
    eprintln!("merge of the GGUF to bf16: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        stdout(&o).contains("into 1 layer(s)") && stdout(&o).contains("210 other quantized tensor(s)"),
        "{}",
        stdout(&o)
    );

    let src = Checkpoint::open(&gguf).unwrap();
    let f = SafetensorsFile::open(&out).unwrap();
    let st = f.tensors().unwrap();
    assert_eq!(st.len(), 272);
    let bf = |v: f32| half::bf16::from_f32(v).to_bits();
    let bits = |name: &str| -> Vec<u16> {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::BF16, "{name}");
        v.data().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    };
    let w = src.tensor_f32(&format!("{layer}.weight")).unwrap();
    let mut d = vec![0f32; 192 * 576];
    for o in 0..192 {
        for k in 0..576 {
            let mut acc = 0f32;
            for j in 0..4 {
                acc += b[o * 4 + j] * a[j * 576 + k];
            }
            d[o * 576 + k] = acc * 2.0;
        }
    }
    let want: Vec<u16> = w.iter().zip(&d).map(|(w, d)| bf(w + d)).collect();
    assert_eq!(bits(&format!("{layer}.weight")), want);
    let other = "model.layers.5.mlp.down_proj.weight";
    let want: Vec<u16> = src.tensor_f32(other).unwrap().iter().map(|&v| bf(v)).collect();
    assert_eq!(bits(other), want);
    let norm = st.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.dtype(), Dtype::F32);
    assert_eq!(lowbit::io::view_to_f32("n", &norm).unwrap(), src.tensor_f32("model.norm.weight").unwrap());
}
