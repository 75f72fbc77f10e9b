//! End-to-end tests of the QuantLinear commands: `lowbit forward`, `lowbit merge` and `lowbit bench`.

mod common;

use common::{assert_clean_failure, assert_ok, lowbit, s, stderr, stdout};

use lowbit::affine::Granularity;
use lowbit::io::bnb::QuantStateJson;
use lowbit::io::peft::{load_quant_linears, PeftAdapter};
use lowbit::io::{bnb, int8, SafetensorsFile, TensorData};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::DType;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

#[test]
fn bench_runs_every_format_and_checks_the_reference() {
    for format in ["nf4", "nf4-dq", "int8"] {
        let o = lowbit(&[
            "bench",
            "--format",
            format,
            "--shape",
            "24x100",
            "--batch",
            "3",
            "--lora-rank",
            "4",
            "--threads",
            "2",
            "--iters",
            "3",
        ]);
        assert_ok(&o);
        let out = stdout(&o);
        for needle in ["24x100", "M = 3", "LoRA rank 4", "2 rayon thread(s)", "GFLOP/s", "GB/s of packed weight"] {
            assert!(out.contains(needle), "{format}: {needle}: {out}");
        }
        assert!(out.contains("3 iterations"), "{out}");
        assert!(out.contains("vs reference (f64): max |err|") && out.trim_end().ends_with(": ok"), "{out}");
    }
    // Without LoRA, one iteration, default threads.
    let o = lowbit(&["bench", "--format", "nf4", "--shape", "7x33", "--iters", "1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("no LoRA, M = 1"), "{}", stdout(&o));
}

#[test]
fn bench_skips_the_reference_when_too_large() {
    // 4096 * 4096 * 16 = 2.7e8 multiply-adds > 2e8.
    let o = lowbit(&["bench", "--format", "int8", "--shape", "4096x4096", "--batch", "16", "--iters", "1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("vs reference: skipped (too large"), "{}", stdout(&o));
}

#[test]
fn bench_usage_errors() {
    for args in [
        &["bench", "--format", "nf4", "--shape", "0x4"][..],
        &["bench", "--format", "nf4", "--shape", "4096"],
        &["bench", "--format", "fp8", "--shape", "4x4"],
        &["bench", "--format", "nf4", "--shape", "4x4", "--batch", "0"],
        &["bench", "--format", "nf4", "--shape", "4x4", "--threads", "0"],
        &["bench", "--shape", "4x4"],
        &["bench", "--all", "--format", "nf4"],
        &["bench", "--all", "--shape", "4x4"],
        &["bench", "--all", "--batch", "8"],
        &["bench", "--json"],
        &["bench", "--quick", "--format", "nf4", "--shape", "4x4"],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = lowbit(&["bench", "--format", "nf4", "--shape", "100000x100000"]);
    assert_clean_failure(&o, "too large");
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
/// `in` of UP, `out` of DOWN (not a multiple of the NF4 block size: blocks cross rows).
const HIDDEN: usize = 100;
/// `out` of UP, `in` of DOWN.
const INTER: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Nf4,
    Int8,
}

/// A two-layer checkpoint: UP `[INTER, HIDDEN]` with an F32 bias (NF4 block 64, or int8 per channel), DOWN
/// `[HIDDEN, INTER]` without bias (NF4 + double quantization, or int8 per channel), and plain tensors.
fn write_checkpoint(path: &Path, format: Format) {
    let up = values(INTER * HIDDEN, 1, 0.5);
    let down = values(HIDDEN * INTER, 2, 0.5);
    let bias = values(INTER, 3, 1.0);
    let norm = values(HIDDEN, 4, 1.0);
    let mut t: Vec<(String, TensorData)> = Vec::new();
    let mut meta = None;
    match format {
        Format::Nf4 => {
            let q = lowbit::nf4::quantize_nf4(&up, &[INTER, HIDDEN], 64, false).unwrap();
            t.extend(bnb::to_tensors(&format!("{UP}.weight"), &q).unwrap());
            let q = lowbit::nf4::quantize_nf4(&down, &[HIDDEN, INTER], 64, true).unwrap();
            t.extend(bnb::to_tensors(&format!("{DOWN}.weight"), &q).unwrap());
        }
        Format::Int8 => {
            let g = Granularity::PerChannel;
            t.extend(int8::to_tensors(
                &format!("{UP}.weight"),
                &lowbit::affine::quantize(&up, &[INTER, HIDDEN], g).unwrap(),
            ));
            t.extend(int8::to_tensors(
                &format!("{DOWN}.weight"),
                &lowbit::affine::quantize(&down, &[HIDDEN, INTER], g).unwrap(),
            ));
            let (u, d) = (format!("{UP}.weight"), format!("{DOWN}.weight"));
            meta = Some(int8::metadata(g, [(u.as_str(), DType::F32), (d.as_str(), DType::F32)]));
        }
    }
    t.push((format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &bias)));
    t.push(("model.norm.weight".into(), TensorData::from_slice(Dtype::F32, vec![HIDDEN], &norm)));
    t.push(("position_ids".into(), TensorData::from_slice(Dtype::I64, vec![3], &[0i64, 1, 2])));
    lowbit::io::write_safetensors(path, &t, meta, false).unwrap();
}

/// A PEFT adapter directory with modules for UP (rank 4) and, optionally, DOWN (rank 2 through
/// `rank_pattern`) and a module the checkpoint lacks.
fn write_adapter(dir: &Path, with_down: bool, with_missing: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let config = r#"{
  "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
  "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "init_lora_weights": false,
  "target_modules": ["up_proj", "down_proj", "gate_proj"], "rank_pattern": {"down_proj": 2}, "alpha_pattern": {}
}"#;
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let key = |p: &str, ab: &str| format!("base_model.model.{p}.{ab}.weight");
    let f32t = |shape: Vec<usize>, v: &[f32]| TensorData::from_slice(Dtype::F32, shape, v);
    let mut t = vec![
        (key(UP, "lora_A"), f32t(vec![4, HIDDEN], &values(4 * HIDDEN, 10, 0.1))),
        (key(UP, "lora_B"), f32t(vec![INTER, 4], &values(INTER * 4, 11, 0.1))),
    ];
    if with_down {
        t.push((key(DOWN, "lora_A"), f32t(vec![2, INTER], &values(2 * INTER, 12, 0.1))));
        t.push((key(DOWN, "lora_B"), f32t(vec![HIDDEN, 2], &values(HIDDEN * 2, 13, 0.1))));
    }
    if with_missing {
        let p = "model.layers.0.mlp.gate_proj";
        t.push((key(p, "lora_A"), f32t(vec![4, HIDDEN], &values(4 * HIDDEN, 14, 0.1))));
        t.push((key(p, "lora_B"), f32t(vec![INTER, 4], &values(INTER * 4, 15, 0.1))));
    }
    lowbit::io::write_safetensors(dir.join("adapter_model.safetensors"), &t, None, false).unwrap();
}

/// Writes `x` `[m, k]` in `dtype` and returns its values as f32 (exactly what the file holds).
fn write_input(path: &Path, name: &str, m: usize, k: usize, dtype: Dtype) -> Vec<f32> {
    let v = values(m * k, 20 + m as u64, 1.0);
    let (data, x): (Vec<u8>, Vec<f32>) = match dtype {
        Dtype::F32 => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.clone()),
        Dtype::BF16 => (
            v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        ),
        Dtype::F16 => (
            v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        ),
        Dtype::I64 => (vec![0; m * k * 8], vec![0.0; m * k]),
        _ => unreachable!(),
    };
    let t = [(name.to_string(), TensorData { dtype, shape: vec![m, k], data })];
    lowbit::io::write_safetensors(path, &t, None, true).unwrap();
    x
}

/// The layer at `path` as the library loads it, with the adapter in `adapter` attached.
fn library_layer(checkpoint: &Path, path: &str, adapter: Option<&Path>) -> QuantLinear {
    let mut layers = load_quant_linears(&SafetensorsFile::open(checkpoint).unwrap()).unwrap();
    if let Some(dir) = adapter {
        PeftAdapter::load(dir).unwrap().attach(&mut layers, "default").unwrap();
    }
    layers.into_iter().find(|(p, _)| p == path).unwrap().1
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = SafetensorsFile::open(path).unwrap();
    let st = f.tensors().unwrap();
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F32);
    (v.shape().to_vec(), lowbit::io::view_to_f32(name, &v).unwrap())
}

#[test]
fn forward_matches_the_library_bit_for_bit() {
    let dir = tmp();
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, true, true);
    for format in [Format::Nf4, Format::Int8] {
        let ckpt = dir.path().join(format!("{format:?}.safetensors"));
        write_checkpoint(&ckpt, format);
        for (path, k, out) in [(UP, HIDDEN, INTER), (DOWN, INTER, HIDDEN)] {
            for (m, dtype) in [(1, Dtype::F32), (5, Dtype::BF16), (17, Dtype::F16)] {
                let xf = dir.path().join("x.safetensors");
                let x = write_input(&xf, "x", m, k, dtype);
                for with_adapter in [false, true] {
                    let y_path = dir.path().join("y.safetensors");
                    let mut args = vec!["forward", s(&ckpt), "--layer", path, "--input", s(&xf), "-o", s(&y_path)];
                    args.push("--force");
                    if with_adapter {
                        args.extend(["--adapter", s(&adapter)]);
                    }
                    let o = lowbit(&args);
                    assert_ok(&o);
                    let msg = stdout(&o);
                    assert!(msg.contains(&format!("y [{m}, {out}] f32 = layer `{path}`")), "{msg}");
                    assert_eq!(msg.contains("+ adapter"), with_adapter, "{msg}");
                    let (shape, y) = read_f32(&y_path, "y");
                    assert_eq!(shape, [m, out]);
                    let layer = library_layer(&ckpt, path, with_adapter.then_some(adapter.as_path()));
                    assert_eq!(layer.adapters().len(), usize::from(with_adapter));
                    let want = layer.forward(&x).unwrap();
                    let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{format:?} {path} M={m} {dtype:?} adapter={with_adapter}");
                    if with_adapter {
                        // The adapter changes the result (B is non-zero).
                        let base = library_layer(&ckpt, path, None).forward(&x).unwrap();
                        assert_ne!(base, y);
                    }
                }
            }
        }
    }
}

#[test]
fn forward_bad_inputs_fail_cleanly_without_output() {
    let dir = tmp();
    let ckpt = dir.path().join("nf4.safetensors");
    write_checkpoint(&ckpt, Format::Nf4);
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, false, false);
    let x = dir.path().join("x.safetensors");
    write_input(&x, "x", 2, HIDDEN, Dtype::F32);
    let y = dir.path().join("y.safetensors");
    let run = |layer: &str, input: &Path, extra: &[&str]| {
        let mut args = vec!["forward", s(&ckpt), "--layer", layer, "--input", s(input), "-o", s(&y)];
        args.extend(extra);
        lowbit(&args)
    };

    let o = run("model.layers.9.mlp.up_proj", &x, &[]);
    assert_clean_failure(&o, "no layer `model.layers.9.mlp.up_proj`");
    assert!(stderr(&o).contains(&format!("`{UP}`")), "lists the layers: {}", stderr(&o));
    assert_clean_failure(&run("model.norm", &x, &[]), "`model.norm.weight` is not quantized");

    let other = dir.path().join("other.safetensors");
    write_input(&other, "inputs", 2, HIDDEN, Dtype::F32);
    assert_clean_failure(&run(UP, &other, &[]), "has no tensor `x`");
    let narrow = dir.path().join("narrow.safetensors");
    write_input(&narrow, "x", 2, HIDDEN - 1, Dtype::F32);
    assert_clean_failure(&run(UP, &narrow, &[]), &format!("takes [M, {HIDDEN}]"));
    let ints = dir.path().join("ints.safetensors");
    write_input(&ints, "x", 2, HIDDEN, Dtype::I64);
    assert_clean_failure(&run(UP, &ints, &[]), "expected F32, F16, BF16 or F64");

    // The adapter has no module for DOWN; a missing adapter directory.
    let xd = dir.path().join("xd.safetensors");
    write_input(&xd, "x", 2, INTER, Dtype::F32);
    assert_clean_failure(&run(DOWN, &xd, &["--adapter", s(&adapter)]), "has no module for layer");
    let nowhere = dir.path().join("nowhere");
    assert_clean_failure(&run(UP, &x, &["--adapter", s(&nowhere)]), "adapter");

    // An unquantized checkpoint.
    let plain = dir.path().join("plain.safetensors");
    let t = [(format!("{UP}.weight"), TensorData::from_slice(Dtype::F32, vec![2, 2], &[1f32, 2.0, 3.0, 4.0]))];
    lowbit::io::write_safetensors(&plain, &t, None, false).unwrap();
    let o = lowbit(&["forward", s(&plain), "--layer", UP, "--input", s(&x), "-o", s(&y)]);
    assert_clean_failure(&o, "takes [M, 2]"); // a dense layer runs, but this one is [2, 2]
    assert!(!y.exists(), "no output on failure");

    // An existing output is kept without --force; the input is never the output.
    std::fs::write(&y, b"keep").unwrap();
    assert_clean_failure(&run(UP, &x, &[]), "already exists");
    assert_eq!(std::fs::read(&y).unwrap(), b"keep");
    let o = lowbit(&["forward", s(&ckpt), "--layer", UP, "--input", s(&x), "-o", s(&x), "--force"]);
    assert_clean_failure(&o, "is the input file");
}

/// The merged layer's forward agrees with the unmerged layer's (base + adapter) within the requantization
/// error plus f32 accumulation: for output `o`,
/// |y_merged − y_unmerged| ≤ Σ_k|x_k|·|W'_ok − T_ok| + 2·(K + r + 3)·ε·S_o, where `T = dequant(W) + s·B·A`
/// is the merge target, W' the requantized weight and S_o = Σ_k|x_k|·(|W'_ok| + |W_ok|) +
/// |s|·Σ_j(Σ_k|x_k·A_jk|)·|B_oj| + |bias_o| bounds the magnitudes both forwards accumulate.
fn check_merged_forward(merged: &QuantLinear, unmerged: &QuantLinear, x: &[f32]) {
    let (out, k) = (unmerged.out_features(), unmerged.in_features());
    let ad = &unmerged.adapters()[0];
    let (r, sc) = (ad.rank(), ad.scaling());
    let w = unmerged.weight().dequantize_reference();
    let w2 = merged.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    let m = x.len() / k;
    let y1 = merged.forward(x).unwrap();
    let y0 = unmerged.forward(x).unwrap();
    for row in 0..m {
        let xr = &x[row * k..(row + 1) * k];
        for o in 0..out {
            let (mut req, mut mag) = (0f64, 0f64);
            for c in 0..k {
                let mut d = 0f32;
                for j in 0..r {
                    d += ad.b()[o * r + j] * ad.a()[j * k + c];
                }
                let target = w[o * k + c] + d * sc;
                let xa = (xr[c] as f64).abs();
                req += xa * (w2[o * k + c] as f64 - target as f64).abs();
                mag += xa * ((w2[o * k + c] as f64).abs() + (w[o * k + c] as f64).abs());
            }
            for j in 0..r {
                let t: f64 = (0..k).map(|c| (xr[c] as f64 * ad.a()[j * k + c] as f64).abs()).sum();
                mag += (sc as f64).abs() * t * (ad.b()[o * r + j] as f64).abs();
            }
            mag += unmerged.bias().map_or(0.0, |b| (b[o] as f64).abs());
            let bound = req + 2.0 * (k + r + 3) as f64 * eps * mag + 1e-30;
            let (a, b) = (y1[row * out + o], y0[row * out + o]);
            let err = (a as f64 - b as f64).abs();
            assert!(err <= bound, "row {row} out {o}: merged {a}, unmerged {b}, |err| {err:e} > {bound:e}");
        }
    }
}

#[test]
fn merge_round_trip_preserves_the_format() {
    let dir = tmp();
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, true, true);
    let adapter_up_only = dir.path().join("adapter_up");
    write_adapter(&adapter_up_only, false, false);
    for format in [Format::Nf4, Format::Int8] {
        let base = dir.path().join(format!("{format:?}.safetensors"));
        write_checkpoint(&base, format);
        let merged_path = dir.path().join(format!("{format:?}-merged.safetensors"));
        let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&merged_path)]);
        assert_ok(&o);
        let msg = stdout(&o);
        for needle in [UP, DOWN, "added max abs err", "added RMS err", "SQNR dB", "into 2 layer(s)"] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        assert!(
            msg.contains("1 adapter module(s) matched no quantized layer")
                && msg.contains("`model.layers.0.mlp.gate_proj` (no such layer)"),
            "{msg}"
        );

        // Same keys, dtypes and metadata as the base; plain tensors byte for byte.
        let (bf, mf) = (SafetensorsFile::open(&base).unwrap(), SafetensorsFile::open(&merged_path).unwrap());
        let (bst, mst) = (bf.tensors().unwrap(), mf.tensors().unwrap());
        let mut bnames = bst.names();
        let mut mnames = mst.names();
        bnames.sort();
        mnames.sort();
        assert_eq!(bnames, mnames, "{format:?}");
        for n in &bnames {
            let (a, b) = (bst.tensor(n).unwrap(), mst.tensor(n).unwrap());
            if bnb::weight_of_quant_state_key(n).is_some() {
                // The JSON blob: same fields but the nested offset, whose text length may differ.
                let (qa, qb) =
                    (QuantStateJson::parse(a.data(), n).unwrap(), QuantStateJson::parse(b.data(), n).unwrap());
                assert_eq!(
                    (qa.format, qa.blocksize, qa.dtype, &qa.shape),
                    (qb.format, qb.blocksize, qb.dtype, &qb.shape)
                );
                assert_eq!(qa.nested.map(|n| n.blocksize), qb.nested.map(|n| n.blocksize), "{n}");
                continue;
            }
            assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{n}");
        }
        for n in [format!("{UP}.bias"), "model.norm.weight".into(), "position_ids".into()] {
            assert_eq!(bst.tensor(&n).unwrap().data(), mst.tensor(&n).unwrap().data(), "{n}");
        }
        assert_eq!(bf.metadata().unwrap(), mf.metadata().unwrap());

        // Each merged layer equals the library's merge bit for bit and runs within the bound of the unmerged
        // layer with its adapter.
        let merged_layers: HashMap<String, QuantLinear> = load_quant_linears(&mf).unwrap().into_iter().collect();
        for path in [UP, DOWN] {
            let unmerged = library_layer(&base, path, Some(&adapter));
            let (want, _) = lowbit::merge::merge_adapter(&unmerged, "default").unwrap();
            let got = &merged_layers[path];
            assert_eq!(got.weight(), &want, "{format:?} {path}");
            assert!(got.adapters().is_empty());
            match (format, got.weight()) {
                (Format::Nf4, QuantWeight::FourBit(_)) | (Format::Int8, QuantWeight::Int8(_)) => {}
                (f, w) => panic!("{f:?} base merged into {w:?}"),
            }
            let x = values(3 * unmerged.in_features(), 30, 1.0);
            check_merged_forward(got, &unmerged, &x);
        }

        // An adapter for UP only: DOWN is copied byte for byte.
        let up_only = dir.path().join(format!("{format:?}-up.safetensors"));
        let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter_up_only), "-o", s(&up_only)]);
        assert_ok(&o);
        assert!(stdout(&o).contains("into 1 layer(s)") && !stdout(&o).contains("matched no"), "{}", stdout(&o));
        let uf = SafetensorsFile::open(&up_only).unwrap();
        let ust = uf.tensors().unwrap();
        for n in bst.names().into_iter().filter(|n| n.starts_with(DOWN)) {
            assert_eq!(bst.tensor(n).unwrap().data(), ust.tensor(n).unwrap().data(), "{n}");
        }
    }
}

#[test]
fn merge_bad_inputs_fail_cleanly_without_output() {
    let dir = tmp();
    let base = dir.path().join("int8.safetensors");
    write_checkpoint(&base, Format::Int8);
    let out = dir.path().join("out.safetensors");

    // An adapter whose modules match nothing.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#).unwrap();
    let t = [
        (
            "base_model.model.lm_head.lora_A.weight".to_string(),
            TensorData::from_slice(Dtype::F32, vec![2, 4], &[0.1f32; 8]),
        ),
        (
            "base_model.model.lm_head.lora_B.weight".to_string(),
            TensorData::from_slice(Dtype::F32, vec![4, 2], &[0.1f32; 8]),
        ),
    ];
    lowbit::io::write_safetensors(other.join("adapter_model.safetensors"), &t, None, false).unwrap();
    let o = lowbit(&["merge", s(&base), "--adapter", s(&other), "-o", s(&out)]);
    assert_clean_failure(&o, "matches no layer");
    assert!(stderr(&o).contains("`lm_head`") && stderr(&o).contains(&format!("`{UP}`")), "{}", stderr(&o));

    // A shape mismatch between the adapter and the layer.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(wrong.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#).unwrap();
    let t = [
        (format!("base_model.model.{UP}.lora_A.weight"), TensorData::from_slice(Dtype::F32, vec![2, 4], &[0.1f32; 8])),
        (format!("base_model.model.{UP}.lora_B.weight"), TensorData::from_slice(Dtype::F32, vec![4, 2], &[0.1f32; 8])),
    ];
    lowbit::io::write_safetensors(wrong.join("adapter_model.safetensors"), &t, None, false).unwrap();
    let o = lowbit(&["merge", s(&base), "--adapter", s(&wrong), "-o", s(&out)]);
    assert_clean_failure(&o, UP);

    // A bad adapter config; an unquantized base.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "{not json").unwrap();
    std::fs::copy(other.join("adapter_model.safetensors"), bad.join("adapter_model.safetensors")).unwrap();
    assert_clean_failure(&lowbit(&["merge", s(&base), "--adapter", s(&bad), "-o", s(&out)]), "adapter_config.json");
    let plain = dir.path().join("plain.safetensors");
    let t = [("w".to_string(), TensorData::from_slice(Dtype::F32, vec![2, 2], &[1f32; 4]))];
    lowbit::io::write_safetensors(&plain, &t, None, false).unwrap();
    let o = lowbit(&["merge", s(&plain), "--adapter", s(&other), "-o", s(&out)]);
    assert_clean_failure(&o, "holds no quantized layers");
    assert!(!out.exists(), "no output on failure");
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name)
}

/// On the real bitsandbytes + PEFT fixture (tests/data/gen_peft_fixture.py): `lowbit forward` equals the
/// library's forward bit for bit and reproduces PEFT's output within (K + r + 4)·ε·(Σ|x·w| + |b| +
/// |s|·Σ_j(Σ_k|x_k·A_jk|)·|B_oj|), the bound of tests/peft_interop.rs; `lowbit merge` merges the two targeted
/// layers and copies the untargeted FP4 layer byte for byte.
#[test]
fn forward_and_merge_on_the_bitsandbytes_peft_fixture() {
    let dir = tmp();
    let base = fixture("peft_base.safetensors");
    let io = SafetensorsFile::open(fixture("peft_io.safetensors")).unwrap();
    let io = io.tensors().unwrap();
    for adir in ["peft_adapter", "peft_adapter_rslora"] {
        let adapter = fixture(adir);
        for path in [UP, DOWN] {
            let xv = io.tensor(&format!("{path}.x")).unwrap();
            let x = lowbit::io::view_to_f32("x", &xv).unwrap();
            let xf = dir.path().join("x.safetensors");
            lowbit::io::write_safetensors(&xf, &[("x".into(), TensorData::from_view(&xv))], None, true).unwrap();
            let y_path = dir.path().join("y.safetensors");
            let o = lowbit(&[
                "forward",
                s(&base),
                "--layer",
                path,
                "--adapter",
                s(&adapter),
                "--input",
                s(&xf),
                "-o",
                s(&y_path),
                "--force",
            ]);
            assert_ok(&o);
            let (_, y) = read_f32(&y_path, "y");
            let l = library_layer(&base, path, Some(&adapter));
            let want = l.forward(&x).unwrap();
            assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{adir} {path}");
            let peft = lowbit::io::view_to_f32("y", &io.tensor(&format!("{path}.y.{adir}")).unwrap()).unwrap();
            let (k, n) = (l.in_features(), l.out_features());
            let w = l.weight().dequantize_reference();
            let ad = &l.adapters()[0];
            let eps = f32::EPSILON as f64;
            for (i, (&a, &b)) in y.iter().zip(&peft).enumerate() {
                let (m, o) = (i / n, i % n);
                let xr = &x[m * k..(m + 1) * k];
                let mut mag: f64 = (0..k).map(|c| (xr[c] as f64 * w[o * k + c] as f64).abs()).sum();
                mag += l.bias().map_or(0.0, |b| (b[o] as f64).abs());
                for j in 0..ad.rank() {
                    let t: f64 = (0..k).map(|c| (xr[c] as f64 * ad.a()[j * k + c] as f64).abs()).sum();
                    mag += (ad.scaling() as f64).abs() * t * (ad.b()[o * ad.rank() + j] as f64).abs();
                }
                let tol = (k + ad.rank() + 4) as f64 * eps * mag;
                assert!((a as f64 - b as f64).abs() <= tol, "{adir} {path} [{m}, {o}]: {a} vs PEFT {b}");
            }
        }
        let merged = dir.path().join(format!("{adir}-merged.safetensors"));
        let o = lowbit(&["merge", s(&base), "--adapter", s(&adapter), "-o", s(&merged)]);
        assert_ok(&o);
        assert!(stdout(&o).contains("into 2 layer(s)"), "{}", stdout(&o));
        let (bf, mf) = (SafetensorsFile::open(&base).unwrap(), SafetensorsFile::open(&merged).unwrap());
        let (bst, mst) = (bf.tensors().unwrap(), mf.tensors().unwrap());
        let gate = "model.layers.0.mlp.gate_proj";
        let mut gate_keys = 0;
        for n in bst.names().into_iter().filter(|n| n.starts_with(gate)) {
            assert_eq!(bst.tensor(n).unwrap().data(), mst.tensor(n).unwrap().data(), "{n}");
            gate_keys += 1;
        }
        assert!(gate_keys >= 4);
        let layers: HashMap<String, QuantLinear> = load_quant_linears(&mf).unwrap().into_iter().collect();
        for path in [UP, DOWN] {
            let (want, _) =
                lowbit::merge::merge_adapter(&library_layer(&base, path, Some(&adapter)), "default").unwrap();
            assert_eq!(layers[path].weight(), &want, "{adir} {path}");
        }
    }
}

#[test]
fn help_and_usage_errors() {
    for (cmd, needles) in [
        ("forward", &["PREFIX.weight", "base_model.model.PREFIX.lora_A.weight", "[M, out] as F32"][..]),
        ("merge", &["requantizes", "SQNR", "matched no quantized layer"]),
        ("bench", &["GFLOP/s", "GB/s", "2e8"]),
    ] {
        let o = lowbit(&[cmd, "--help"]);
        assert_ok(&o);
        for n in needles {
            assert!(stdout(&o).contains(n), "{cmd}: {n}: {}", stdout(&o));
        }
    }
    for args in [
        &["forward", "a.safetensors", "--input", "x.safetensors", "-o", "y.safetensors"][..],
        &["forward", "a.safetensors", "--layer", "l", "-o", "y.safetensors"],
        &["merge", "a.safetensors", "-o", "y.safetensors"],
        &["merge", "a.safetensors", "--adapter", "dir"],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
