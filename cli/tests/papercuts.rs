//! The papercuts of issue 13 for `lowbit forward` and `lowbit inspect`: x of any rank ≥ 2 and F64 x, the
//! `.weight` hint, one path per error message, a quiet `--device gpu` without XDG_RUNTIME_DIR, the inspect
//! summary, and model directories (single and sharded) and GGUFs as inputs.

mod common;

use common::{assert_clean_failure, assert_ok, lowbit, s, stderr, stdout};

use lowbit::io::{bnb, int8, Checkpoint, SafetensorsFile, TensorData};
use lowbit::DType;
use safetensors::Dtype;
use std::path::Path;
use std::process::{Command, Output};

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
const HIDDEN: usize = 100;
const INTER: usize = 24;

/// The tensors of a two-layer NF4 checkpoint (UP with a bias, DOWN double-quantized) plus a plain norm.
fn nf4_tensors() -> Vec<(String, TensorData)> {
    let up = lowbit::nf4::quantize_nf4(&values(INTER * HIDDEN, 1, 0.5), &[INTER, HIDDEN], 64, false).unwrap();
    let down = lowbit::nf4::quantize_nf4(&values(HIDDEN * INTER, 2, 0.5), &[HIDDEN, INTER], 64, true).unwrap();
    let mut t = bnb::to_tensors(&format!("{UP}.weight"), &up).unwrap();
    t.extend(bnb::to_tensors(&format!("{DOWN}.weight"), &down).unwrap());
    t.push((format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &values(INTER, 3, 1.0))));
    t.push(("model.norm.weight".into(), TensorData::from_slice(Dtype::F32, vec![HIDDEN], &values(HIDDEN, 4, 1.0))));
    t
}

fn write_nf4(path: &Path) {
    lowbit::io::write_safetensors(path, &nf4_tensors(), None, true).unwrap();
}

/// A sharded model directory of the NF4 tensors: two shards split in the middle of the sorted names (so a
/// weight and its parameter entries can sit in different shards), an index and a config.
fn write_sharded(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = nf4_tensors();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    let half = t.len() / 2;
    let (a, b) = t.split_at(half);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut map: Vec<String> = Vec::new();
    for (shard, part) in names.iter().zip([a, b]) {
        lowbit::io::write_safetensors(dir.join(shard), part, None, true).unwrap();
        for (n, _) in part {
            map.push(format!("{n:?}: {shard:?}"));
        }
    }
    let index = format!("{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}", map.join(", "));
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
}

/// Writes `x` with `shape` as F32 (or F64 holding the same values, or other F64 bits) and returns the f32
/// values the layer must see.
fn write_x(path: &Path, shape: &[usize], dtype: Dtype, salt: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let v = values(n, salt, 1.0);
    let data: Vec<u8> = match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F64 => v.iter().flat_map(|&x| f64::from(x).to_le_bytes()).collect(),
        _ => unreachable!(),
    };
    lowbit::io::write_safetensors(path, &[("x".into(), TensorData { dtype, shape: shape.to_vec(), data })], None, true)
        .unwrap();
    v
}

fn write_f64_x(path: &Path, shape: &[usize], v: &[f64]) {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = [("x".to_string(), TensorData { dtype: Dtype::F64, shape: shape.to_vec(), data })];
    lowbit::io::write_safetensors(path, &t, None, true).unwrap();
}

fn read_y(path: &Path) -> (Vec<usize>, Vec<u32>) {
    let f = SafetensorsFile::open(path).unwrap();
    let st = f.tensors().unwrap();
    let v = st.tensor("y").unwrap();
    assert_eq!(v.dtype(), Dtype::F32);
    let bits = lowbit::io::view_to_f32("y", &v).unwrap().iter().map(|x| x.to_bits()).collect();
    (v.shape().to_vec(), bits)
}

fn forward(ckpt: &Path, layer: &str, x: &Path, y: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["forward", s(ckpt), "--layer", layer, "--input", s(x), "-o", s(y), "--force"];
    args.extend(extra);
    lowbit(&args)
}

#[test]
fn forward_takes_x_of_any_rank_and_f64() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nf4.safetensors");
    write_nf4(&ckpt);
    let layer = Checkpoint::open(&ckpt).unwrap().layer(UP).unwrap();
    let (x2, x3, x4, x64) = (
        dir.path().join("x2.safetensors"),
        dir.path().join("x3.safetensors"),
        dir.path().join("x4.safetensors"),
        dir.path().join("x64.safetensors"),
    );
    let v = write_x(&x2, &[6, HIDDEN], Dtype::F32, 7);
    assert_eq!(write_x(&x3, &[2, 3, HIDDEN], Dtype::F32, 7), v);
    assert_eq!(write_x(&x4, &[1, 2, 3, HIDDEN], Dtype::F32, 7), v);
    assert_eq!(write_x(&x64, &[2, 3, HIDDEN], Dtype::F64, 7), v);
    let want: Vec<u32> = layer.forward(&v).unwrap().iter().map(|y| y.to_bits()).collect();

    let y = dir.path().join("y.safetensors");
    for (x, shape) in
        [(&x2, vec![6, INTER]), (&x3, vec![2, 3, INTER]), (&x4, vec![1, 2, 3, INTER]), (&x64, vec![2, 3, INTER])]
    {
        let o = forward(&ckpt, UP, x, &y, &[]);
        assert_ok(&o);
        let (got_shape, got) = read_y(&y);
        assert_eq!(got_shape, shape, "{}", stdout(&o));
        assert_eq!(got, want, "{x:?}: the same y as the flattened f32 x, bit for bit");
        assert!(stdout(&o).contains(&format!("y {shape:?} f32")), "{}", stdout(&o));
    }
    assert!(stdout(&forward(&ckpt, UP, &x64, &y, &[])).contains("f64, rounded to f32"));

    // F64 values that are not f32 values are rounded to nearest.
    let fine: Vec<f64> = v.iter().enumerate().map(|(i, &x)| f64::from(x) + (i as f64) * 1e-12).collect();
    write_f64_x(&x64, &[6, HIDDEN], &fine);
    let rounded: Vec<f32> = fine.iter().map(|&x| x as f32).collect();
    assert_ne!(rounded, v, "the test needs values that round");
    assert_ok(&forward(&ckpt, UP, &x64, &y, &[]));
    let want: Vec<u32> = layer.forward(&rounded).unwrap().iter().map(|y| y.to_bits()).collect();
    assert_eq!(read_y(&y).1, want);

    // Non-finite and out-of-range F64 values, rank 1, the wrong width: clear errors, no output.
    std::fs::remove_file(&y).unwrap();
    for (bad, needle) in
        [(f64::NAN, "element 5 is NaN"), (f64::INFINITY, "element 5 is inf"), (1e39, "outside the f32 range")]
    {
        let mut w = fine.clone();
        w[5] = bad;
        write_f64_x(&x64, &[6, HIDDEN], &w);
        assert_clean_failure(&forward(&ckpt, UP, &x64, &y, &[]), needle);
    }
    write_x(&x2, &[HIDDEN], Dtype::F32, 7);
    assert_clean_failure(&forward(&ckpt, UP, &x2, &y, &[]), &format!("takes [M, {HIDDEN}]"));
    write_x(&x3, &[2, HIDDEN, 3], Dtype::F32, 7);
    assert_clean_failure(&forward(&ckpt, UP, &x3, &y, &[]), "[2, 100, 3]");
    assert!(!y.exists());
}

#[test]
fn layer_named_by_its_weight_gets_the_hint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nf4.safetensors");
    write_nf4(&ckpt);
    let x = dir.path().join("x.safetensors");
    write_x(&x, &[2, HIDDEN], Dtype::F32, 1);
    let o = forward(&ckpt, &format!("{UP}.weight"), &x, &dir.path().join("y.safetensors"), &[]);
    assert_clean_failure(&o, &format!("a layer is named by its module path: `{UP}`"));
    assert!(!stderr(&o).contains(".weight.weight"), "{}", stderr(&o));
}

/// How often `needle` occurs in `hay`.
fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn every_path_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nf4.safetensors");
    write_nf4(&ckpt);
    let x = dir.path().join("x.safetensors");
    write_x(&x, &[2, HIDDEN], Dtype::F32, 1);
    let y = dir.path().join("y.safetensors");
    let missing = dir.path().join("no-such-adapter");
    let o = forward(&ckpt, UP, &x, &y, &["--adapter", s(&missing)]);
    assert_clean_failure(&o, "adapter");
    assert_eq!(count(&stderr(&o), s(&missing)), 1, "{}", stderr(&o));
    let o = lowbit(&["merge", s(&ckpt), "--adapter", s(&missing), "-o", s(&y)]);
    assert_clean_failure(&o, "adapter");
    assert_eq!(count(&stderr(&o), s(&missing)), 1, "{}", stderr(&o));

    // An adapter directory without weights: the file is named, the directory not twice.
    let half = dir.path().join("half-adapter");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#).unwrap();
    let o = forward(&ckpt, UP, &x, &y, &["--adapter", s(&half)]);
    assert_clean_failure(&o, "adapter_model.safetensors");
    assert_eq!(count(&stderr(&o), s(&half)), 1, "{}", stderr(&o));

    // Missing inputs and a corrupt checkpoint, in every command that reads them.
    let nowhere = dir.path().join("nowhere.safetensors");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, &std::fs::read(&ckpt).unwrap()[..100]).unwrap();
    for bad in [&nowhere, &corrupt] {
        for args in [
            vec!["inspect", s(bad)],
            vec!["inspect", s(&ckpt), "--compare", s(bad)],
            vec!["forward", s(bad), "--layer", UP, "--input", s(&x), "-o", s(&y)],
            vec!["forward", s(&ckpt), "--layer", UP, "--input", s(bad), "-o", s(&y)],
            vec!["merge", s(bad), "--adapter", s(&half), "-o", s(&y)],
        ] {
            let o = lowbit(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
            assert_eq!(count(&stderr(&o), s(bad)), 1, "{args:?}: {}", stderr(&o));
        }
    }
}

/// Mesa's (libwayland's) `error: XDG_RUNTIME_DIR is invalid or not set` must not appear: lowbit points the
/// variable at a private directory first. With or without an adapter, the only `error:` line is lowbit's.
#[test]
fn gpu_forward_is_quiet_without_xdg_runtime_dir() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("nf4.safetensors");
    write_nf4(&ckpt);
    let x = dir.path().join("x.safetensors");
    write_x(&x, &[2, HIDDEN], Dtype::F32, 1);
    let y = dir.path().join("y.safetensors");
    for value in [None, Some("relative/dir"), Some("/nonexistent/runtime")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowbit"));
        cmd.args(["forward", s(&ckpt), "--layer", UP, "--input", s(&x), "-o", s(&y), "--force", "--device", "gpu"]);
        match value {
            None => cmd.env_remove("XDG_RUNTIME_DIR"),
            Some(v) => cmd.env("XDG_RUNTIME_DIR", v),
        };
        let o = cmd.output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("XDG_RUNTIME_DIR"), "{value:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        if o.status.success() {
            eprintln!("GPU forward ran ({value:?})");
        } else {
            eprintln!("*** no usable GPU adapter here: checked the failure output only ({value:?}) ***");
            assert_eq!(err.lines().count(), 1, "one lowbit line: {err}");
            assert!(err.starts_with("error: "), "{err}");
        }
    }
}

/// The summary's figures, parsed back.
fn summary_value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in {out}"))
}

#[test]
fn inspect_prints_a_summary_first() {
    let dir = tempfile::tempdir().unwrap();
    // An int8 checkpoint: two quantized weights, a plain bias; and the original.
    let (a, b) = (values(INTER * HIDDEN, 1, 0.5), values(HIDDEN * INTER, 2, 0.01));
    let orig = dir.path().join("orig.safetensors");
    let t = vec![
        (format!("{UP}.weight"), TensorData::from_slice(Dtype::F32, vec![INTER, HIDDEN], &a)),
        (format!("{DOWN}.weight"), TensorData::from_slice(Dtype::F32, vec![HIDDEN, INTER], &b)),
        (format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &values(INTER, 3, 1.0))),
    ];
    lowbit::io::write_safetensors(&orig, &t, None, false).unwrap();
    let q = dir.path().join("q.safetensors");
    let g = lowbit::affine::Granularity::PerTensor;
    let (qa, qb) = (
        lowbit::affine::quantize(&a, &[INTER, HIDDEN], g).unwrap(),
        lowbit::affine::quantize(&b, &[HIDDEN, INTER], g).unwrap(),
    );
    let mut tq: Vec<(String, TensorData)> = int8::to_tensors(&format!("{UP}.weight"), &qa).into();
    tq.extend(int8::to_tensors(&format!("{DOWN}.weight"), &qb));
    tq.push(t[2].clone());
    let (nu, nd) = (format!("{UP}.weight"), format!("{DOWN}.weight"));
    let meta = int8::metadata(g, [(nu.as_str(), DType::F32), (nd.as_str(), DType::F32)]);
    lowbit::io::write_safetensors(&q, &tq, Some(meta), false).unwrap();

    let o = lowbit(&["inspect", s(&q), "--compare", s(&orig)]);
    assert_ok(&o);
    let out = stdout(&o);
    let header = out.lines().position(|l| l.starts_with("name ")).expect("table header");
    for prefix in ["total size: ", "worst SQNR: "] {
        let at = out.lines().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {out}"));
        assert!(at < header, "the summary comes before the rows: {out}");
    }
    assert!(out.contains("3 tensor(s) in 7 entries; 2 quantized (4800 weights, "), "{out}");

    // Size, parameters and bits per weight from the file itself.
    let f = SafetensorsFile::open(&q).unwrap();
    let bytes: usize = f.tensors().unwrap().tensors().iter().map(|(_, v)| v.data().len()).sum();
    let params = 2 * INTER * HIDDEN + INTER;
    let size = summary_value(&out, "total size: ");
    let want = format!(
        "{:.2} MiB of tensor data; {params} parameters; {:.3} bits/weight on average over all tensors",
        bytes as f64 / 1048576.0,
        bytes as f64 * 8.0 / params as f64
    );
    assert_eq!(size, want);

    // The worst SQNR is the lower of the two rows', computed here from the decoded weights; DOWN (tiny
    // values, one scale) is the worse.
    let sqnr = |x: &[f32], q: &lowbit::affine::AffineTensor| {
        let xh = q.dequantize::<f32>().unwrap();
        let (sig, err) = x.iter().zip(&xh).fold((0f64, 0f64), |(s, e), (&x, &y)| {
            (s + f64::from(x) * f64::from(x), e + (f64::from(x) - f64::from(y)).powi(2))
        });
        10.0 * (sig / err).log10()
    };
    let (su, sd) = (sqnr(&a, &qa), sqnr(&b, &qb));
    let (worst, name) = if su < sd { (su, &nu) } else { (sd, &nd) };
    assert_eq!(summary_value(&out, "worst SQNR: "), format!("{worst:.2} dB (`{name}`)"));
}

#[test]
fn inspect_and_forward_on_model_directories() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nf4.safetensors");
    write_nf4(&file);
    let single = dir.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    write_nf4(&single.join("model.safetensors"));
    std::fs::write(single.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let sharded = dir.path().join("sharded");
    write_sharded(&sharded);

    let listing = stdout(&lowbit(&["inspect", s(&file)]));
    let rows = |l: &str| l.lines().skip_while(|l| !l.starts_with("name ")).collect::<Vec<_>>().join("\n");
    let x = dir.path().join("x.safetensors");
    write_x(&x, &[3, HIDDEN], Dtype::F32, 9);
    let y0 = dir.path().join("y0.safetensors");
    assert_ok(&forward(&file, UP, &x, &y0, &[]));
    for (d, files) in [(&single, 1), (&sharded, 2)] {
        let o = lowbit(&["inspect", s(d)]);
        assert_ok(&o);
        let out = stdout(&o);
        assert!(out.contains(&format!("bitsandbytes 4-bit, {files} file(s)")), "{out}");
        assert_eq!(rows(&out), rows(&listing), "the same rows as the single file");
        let y = dir.path().join("y.safetensors");
        let o = forward(d, UP, &x, &y, &[]);
        assert_ok(&o);
        assert_eq!(read_y(&y), read_y(&y0), "{d:?}");
    }
}

/// The real model: `inspect` of the GGUF lists its tensors under Hugging Face names with their ggml types
/// and bits per weight (Q4_1: 20 bytes per 32 weights = 5 bits).
#[test]
fn inspect_lists_a_gguf_under_hugging_face_names() {
    let Some(gguf) = lowbit_testkit::model::smollm2_gguf("inspect_lists_a_gguf_under_hugging_face_names") else {
        return;
    };
    let o = lowbit(&["inspect", s(&gguf)]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("GGUF, 1 file(s)"), "{}", &out[..out.len().min(2000)]);
    let row = out
        .lines()
        .find(|l| l.starts_with("model.layers.0.self_attn.q_proj.weight "))
        .unwrap_or_else(|| panic!("no q_proj row: {}", &out[..out.len().min(2000)]));
    assert!(row.contains("Q4_1") && row.contains("[576, 576]") && row.trim_end().ends_with("5.000"), "{row}");
    let norm = out.lines().find(|l| l.starts_with("model.norm.weight ")).expect("norm row");
    assert!(norm.contains("F32") && norm.contains("plain") && norm.trim_end().ends_with("32.000"), "{norm}");
    assert!(out.contains("272 tensor(s) in 272 entries; "), "{}", &out[..out.len().min(2000)]);
}

/// The real model: `forward` runs a GGUF layer densely (Q4_1 decoded to f32, f64 accumulation, one rounding),
/// on a 3-D x, with the same result as that rule computed here.
#[test]
fn forward_runs_a_gguf_layer() {
    let Some(gguf) = lowbit_testkit::model::smollm2_gguf("forward_runs_a_gguf_layer") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layer = "model.layers.3.self_attn.k_proj";
    let ck = Checkpoint::open(&gguf).unwrap();
    let w = ck.tensor_f32(&format!("{layer}.weight")).unwrap();
    let (out, inp) = (192, 576);
    assert_eq!(w.len(), out * inp);
    let x = dir.path().join("x.safetensors");
    let xv = write_x(&x, &[2, 3, inp], Dtype::F32, 5);
    let y = dir.path().join("y.safetensors");
    let o = forward(&gguf, layer, &x, &y, &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("dense Q4_1"), "{}", stdout(&o));
    let want: Vec<u32> = xv
        .chunks_exact(inp)
        .flat_map(|xr| {
            (0..out).map(|o| {
                let acc: f64 =
                    xr.iter().zip(&w[o * inp..(o + 1) * inp]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                (acc as f32).to_bits()
            })
        })
        .collect();
    assert_eq!(read_y(&y), (vec![2, 3, out], want));
    // The weight's name gets the hint here too; the GPU runs quantized layers only.
    assert_clean_failure(&forward(&gguf, &format!("{layer}.weight"), &x, &y, &[]), "module path");
    assert_clean_failure(&forward(&gguf, layer, &x, &y, &["--device", "gpu"]), "--device cpu");
}

/// A dense checkpoint (F16 weight, F32 bias) runs with a PEFT adapter: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, each output
/// accumulated in f64 in index order and rounded once, as computed here.
#[test]
fn forward_runs_a_dense_layer_with_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<half::f16> = values(INTER * HIDDEN, 1, 0.5).into_iter().map(half::f16::from_f32).collect();
    let bias = values(INTER, 2, 0.1);
    let ckpt = dir.path().join("dense.safetensors");
    let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let t = [
        (format!("{UP}.weight"), TensorData { dtype: Dtype::F16, shape: vec![INTER, HIDDEN], data: wb }),
        (format!("{UP}.bias"), TensorData::from_slice(Dtype::F32, vec![INTER], &bias)),
    ];
    lowbit::io::write_safetensors(&ckpt, &t, None, false).unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 6}"#).unwrap();
    let (a, b) = (values(2 * HIDDEN, 3, 0.1), values(INTER * 2, 4, 0.1));
    let key = |ab: &str| format!("base_model.model.{UP}.{ab}.weight");
    let t = [
        (key("lora_A"), TensorData::from_slice(Dtype::F32, vec![2, HIDDEN], &a)),
        (key("lora_B"), TensorData::from_slice(Dtype::F32, vec![INTER, 2], &b)),
    ];
    lowbit::io::write_safetensors(adapter.join("adapter_model.safetensors"), &t, None, false).unwrap();
    let x = dir.path().join("x.safetensors");
    let xv = write_x(&x, &[4, HIDDEN], Dtype::F32, 6);
    let y = dir.path().join("y.safetensors");
    let o = forward(&ckpt, UP, &x, &y, &["--adapter", s(&adapter)]);
    assert_ok(&o);
    assert!(stdout(&o).contains("dense F16") && stdout(&o).contains("+ adapter"), "{}", stdout(&o));
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let (wf, af, bf) = (w.iter().map(|v| f64::from(v.to_f32())).collect::<Vec<f64>>(), f64s(&a), f64s(&b));
    let want: Vec<u32> = xv
        .chunks_exact(HIDDEN)
        .flat_map(|xr| {
            let xr = f64s(xr);
            let xa: Vec<f64> =
                (0..2).map(|j| xr.iter().zip(&af[j * HIDDEN..(j + 1) * HIDDEN]).map(|(x, a)| x * a).sum()).collect();
            (0..INTER)
                .map(|o| {
                    let mut acc: f64 = xr.iter().zip(&wf[o * HIDDEN..(o + 1) * HIDDEN]).map(|(x, w)| x * w).sum();
                    acc += f64::from(bias[o]);
                    acc += 3.0 * xa.iter().zip(&bf[o * 2..o * 2 + 2]).map(|(t, b)| t * b).sum::<f64>();
                    (acc as f32).to_bits()
                })
                .collect::<Vec<u32>>()
        })
        .collect();
    assert_eq!(read_y(&y), (vec![4, INTER], want));
}
