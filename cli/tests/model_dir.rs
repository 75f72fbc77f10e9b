//! End-to-end tests of `lowbit quantize` / `dequantize` on Hugging Face model directories (single and
//! sharded) and the directories they write: config.json and its quantization_config, shards and index,
//! tokenizer files, the default tensor selection with --skip / --include, strict --dtype, fp4, file modes
//! under the user's umask, crash safety; and the real SmolLM2 GGUF when it is available.

mod common;

use common::{lowbit, s, stdout};

use lowbit::io::{Checkpoint, Layout, TensorData};
use lowbit::nf4::FourBitFormat;
use lowbit_testkit::Rng;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[track_caller]
fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

/// One tensor of the synthetic model, as the file stores it and widened to f32.
struct T {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    x: Vec<f32>,
}

impl T {
    fn new(rng: &mut Rng, name: &'static str, dtype: Dtype, shape: &[usize]) -> T {
        let n: usize = shape.iter().product();
        let x: Vec<f32> = rng
            .normal_vec(n, 0.05)
            .into_iter()
            .map(|v| match dtype {
                Dtype::BF16 => lowbit::bf16::from_f32(v).to_f32(),
                Dtype::F16 => lowbit::f16::from_f32(v).to_f32(),
                _ => v,
            })
            .collect();
        T { name, dtype, shape: shape.to_vec(), x }
    }

    fn data(&self) -> TensorData {
        let data: Vec<u8> = match self.dtype {
            Dtype::BF16 => self.x.iter().flat_map(|&v| lowbit::bf16::from_f32(v).to_le_bytes()).collect(),
            Dtype::F16 => self.x.iter().flat_map(|&v| lowbit::f16::from_f32(v).to_le_bytes()).collect(),
            _ => self.x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        TensorData { dtype: self.dtype, shape: self.shape.clone(), data }
    }

    fn is_linear(&self) -> bool {
        self.name.contains(".layers.") && self.shape.len() == 2 && !self.name.contains("norm")
    }
}

/// A two-layer llama-like model: embedding, per-layer q_proj (BF16) / up_proj / down_proj (F32) and norms,
/// final norm, an untied lm_head.
fn model() -> Vec<T> {
    let mut rng = Rng::new(13);
    let mut v = vec![T::new(&mut rng, "model.embed_tokens.weight", Dtype::F32, &[40, 32])];
    let layers: [[&'static str; 4]; 2] = [
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
        ],
        [
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
        ],
    ];
    for [q, up, down, norm] in layers {
        v.push(T::new(&mut rng, q, Dtype::BF16, &[32, 32]));
        v.push(T::new(&mut rng, up, Dtype::F32, &[48, 32]));
        v.push(T::new(&mut rng, down, Dtype::F32, &[32, 48]));
        v.push(T::new(&mut rng, norm, Dtype::F32, &[32]));
    }
    v.push(T::new(&mut rng, "model.norm.weight", Dtype::F32, &[32]));
    v.push(T::new(&mut rng, "lm_head.weight", Dtype::F32, &[40, 32]));
    v
}

fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "vocab_size": 40,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
    })
}

const TOKENIZER: &str = "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n";
const TOKENIZER_CONFIG: &str = "{\"model_max_length\": 2048}\n";

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// config.json + model.safetensors + tokenizer.json + tokenizer_config.json.
fn write_hf_dir(dir: &Path, tensors: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    let data: Vec<(String, TensorData)> = tensors.iter().map(|t| (t.name.to_string(), t.data())).collect();
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    lowbit::io::write_safetensors(dir.join("model.safetensors"), &data, Some(meta), false).unwrap();
    write_json(&dir.join("config.json"), &config());
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), TOKENIZER_CONFIG).unwrap();
}

/// The same model as an index + 2 shards (layer 0 and the embedding in the first, the rest in the second).
fn write_sharded_dir(dir: &Path, tensors: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut shards: [Vec<(String, TensorData)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = BTreeMap::new();
    for t in tensors {
        let i = usize::from(!(t.name.contains("layers.0") || t.name.contains("embed")));
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        weight_map.insert(t.name.to_string(), Value::String(file));
        shards[i].push((t.name.to_string(), t.data()));
    }
    for (i, shard) in shards.iter().enumerate() {
        let p = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        lowbit::io::write_safetensors(p, shard, None, false).unwrap();
    }
    let total: usize = tensors.iter().map(|t| t.data().data.len()).sum();
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    );
    write_json(&dir.join("config.json"), &config());
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The NF4/FP4 tensor the library makes of `t` (quantized in its own dtype, like the CLI).
fn expected_4bit(t: &T, format: FourBitFormat, bs: usize, dq: bool) -> lowbit::nf4::FourBitTensor {
    use lowbit::nf4::quantize_4bit;
    match t.dtype {
        Dtype::BF16 => {
            let x: Vec<lowbit::bf16> = t.x.iter().map(|&v| lowbit::bf16::from_f32(v)).collect();
            quantize_4bit(format, &x, &t.shape, bs, dq).unwrap()
        }
        _ => quantize_4bit(format, &t.x, &t.shape, bs, dq).unwrap(),
    }
}

/// Checks an NF4(+DQ) output directory of `model()`: the quantized layers are exactly the library's, every
/// kept tensor is byte-identical to the input.
fn check_quantized_dir(out: &Path, tensors: &[T], format: FourBitFormat, dq: bool) {
    let ck = Checkpoint::open(out).unwrap();
    assert_eq!(ck.layout(), &Layout::Bnb4bit);
    let linear: Vec<&T> = tensors.iter().filter(|t| t.is_linear()).collect();
    let mut want: Vec<String> = linear.iter().map(|t| t.name.to_string()).collect();
    want.sort();
    assert_eq!(ck.quantized_weight_names(), want.as_slice());
    for t in &linear {
        let path = t.name.strip_suffix(".weight").unwrap();
        let layer = ck.layer(path).unwrap();
        let expected = expected_4bit(t, format, 64, dq);
        let got: Vec<f32> = match layer.weight() {
            lowbit::linear::QuantWeight::FourBit(w) => {
                assert_eq!(w.format(), format, "{}", t.name);
                assert_eq!(w.dtype(), expected.dtype(), "{}", t.name);
                w.dequantize().unwrap()
            }
            other => panic!("{}: {other:?}", t.name),
        };
        let want: Vec<f32> = expected.dequantize().unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}",
            t.name
        );
    }
    for t in tensors.iter().filter(|t| !t.is_linear()) {
        let view = ck.tensor(t.name).unwrap();
        assert_eq!((view.dtype(), view.shape()), (t.dtype, t.shape.as_slice()), "{}", t.name);
        assert_eq!(view.data(), t.data().data.as_slice(), "{} copied unchanged", t.name);
    }
}

fn no_temp_left(parent: &Path) {
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary entries left behind: {left:?}");
}

#[test]
fn quantize_hf_dir_to_nf4_dq_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    let tensors = model();
    write_hf_dir(&input, &tensors);
    let o = lowbit(&["quantize", s(&input), "--scheme", "nf4:64+dq", "-o", s(&out)]);
    assert_ok(&o);
    let line = stdout(&o);
    assert!(line.contains("quantized 6 tensor(s)"), "{line}");
    assert!(line.contains("2 kept by the default rule: lm_head.weight, model.embed_tokens.weight"), "{line}");

    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    assert_eq!(std::fs::read_to_string(out.join("tokenizer.json")).unwrap(), TOKENIZER);
    assert_eq!(std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(), TOKENIZER_CONFIG);

    let written = read_json(&out.join("config.json"));
    for (k, v) in config().as_object().unwrap() {
        assert_eq!(&written[k], v, "config.json keeps the input's `{k}`");
    }
    let q = &written["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["load_in_4bit"], true);
    assert_eq!(q["load_in_8bit"], false);
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    assert_eq!(q["bnb_4bit_quant_storage"], "uint8");
    // The weights were BF16 (q_proj) and F32: mixed source dtypes compute in float32.
    assert_eq!(q["bnb_4bit_compute_dtype"], "float32");
    assert_eq!(q["llm_int8_skip_modules"], json!(["lm_head", "model.embed_tokens"]));

    let st = lowbit::io::SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    assert_eq!(st.metadata().unwrap().get("format").map(String::as_str), Some("pt"));
    check_quantized_dir(&out, &tensors, FourBitFormat::Nf4, true);
    no_temp_left(tmp.path());
}

#[test]
fn quantize_sharded_dir_and_write_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, one, sharded) = (tmp.path().join("in"), tmp.path().join("one"), tmp.path().join("sharded"));
    let tensors = model();
    write_sharded_dir(&input, &tensors);
    assert_ok(&lowbit(&["quantize", s(&input), "--scheme", "nf4:64+dq", "-o", s(&one)]));
    check_quantized_dir(&one, &tensors, FourBitFormat::Nf4, true);
    assert!(one.join("model.safetensors").is_file() && !one.join("model.safetensors.index.json").exists());
    assert_eq!(std::fs::read_to_string(one.join("tokenizer.json")).unwrap(), TOKENIZER);
    // The index file itself is an input too; the tokenizer comes from its directory.
    let via_index = tmp.path().join("via-index");
    let index = input.join("model.safetensors.index.json");
    assert_ok(&lowbit(&["quantize", s(&index), "--scheme", "nf4:64+dq", "-o", s(&via_index)]));
    check_quantized_dir(&via_index, &tensors, FourBitFormat::Nf4, true);
    assert!(via_index.join("tokenizer.json").is_file());

    // 3000 bytes per shard: the 40x32 f32 embedding and head (5120 bytes) get shards of their own, the rest
    // packs several tensors per shard.
    let max = 3000u64;
    assert_ok(&lowbit(&[
        "quantize",
        s(&input),
        "--scheme",
        "nf4:64+dq",
        "--max-shard-size",
        "3000",
        "-o",
        s(&sharded),
    ]));
    check_quantized_dir(&sharded, &tensors, FourBitFormat::Nf4, true);
    assert!(!sharded.join("model.safetensors").exists());
    let index = read_json(&sharded.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    let shard_files: std::collections::BTreeSet<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    let n = shard_files.len();
    assert!(n >= 4, "{n} shards");
    let expect: Vec<String> = (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect();
    assert_eq!(shard_files.iter().map(|s| s.to_string()).collect::<Vec<_>>(), expect);
    let mut total = 0u64;
    let mut listed = 0usize;
    for f in &shard_files {
        let file = lowbit::io::SafetensorsFile::open(sharded.join(f)).unwrap();
        let st = file.tensors().unwrap();
        let bytes: u64 = st.iter().map(|(_, v)| v.data().len() as u64).sum();
        let names = st.names();
        // A shard holds whole quantized weights (codes and parameters together).
        for name in &names {
            assert_eq!(weight_map[*name], *f, "{name}");
            let owner = name.split(".weight").next().unwrap();
            for other in weight_map.keys().filter(|k| k.starts_with(&format!("{owner}.weight"))) {
                assert_eq!(weight_map[other], *f, "{other} is in another shard than {name}");
            }
        }
        assert!(bytes <= max || names.len() <= 6, "{f}: {bytes} bytes in {} entries", names.len());
        total += bytes;
        listed += names.len();
    }
    assert_eq!(listed, weight_map.len());
    assert_eq!(index["metadata"]["total_size"], json!(total));
}

#[test]
fn skip_and_include_override_the_default_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    let tensors = model();
    write_hf_dir(&input, &tensors);
    let o = lowbit(&[
        "quantize",
        s(&input),
        "--scheme",
        "nf4",
        "--skip",
        "model.layers.?.mlp.up_*",
        "--include",
        "lm_head.weight",
        "--include",
        "model.layers.1.*",
        "-o",
        s(&out),
    ]);
    assert_ok(&o);
    assert!(stdout(&o).contains("2 by --skip"), "{}", stdout(&o));
    let ck = Checkpoint::open(&out).unwrap();
    let mut want = vec![
        "lm_head.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ];
    want.sort();
    assert_eq!(ck.quantized_weight_names(), want.as_slice(), "1-D norms stay dense even when --include matches");
    let up = ck.tensor("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!(up.dtype(), Dtype::F32);
    let q = &read_json(&out.join("config.json"))["quantization_config"];
    // lm_head was quantized (--include), so it is not on the list.
    assert_eq!(
        q["llm_int8_skip_modules"],
        json!(["model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"])
    );
    assert_eq!(q["bnb_4bit_use_double_quant"], false);

    let bad = lowbit(&["quantize", s(&input), "--skip", "model.layer.*", "-o", s(&tmp.path().join("bad"))]);
    assert_fails(&bad, 1, "--skip \"model.layer.*\" matches no tensor");
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn int8_directory_with_shards_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    let tensors = model();
    write_hf_dir(&input, &tensors);
    assert_ok(&lowbit(&["quantize", s(&input), "--scheme", "int8", "--max-shard-size", "4KB", "-o", s(&out)]));
    assert!(out.join("model.safetensors.index.json").is_file());
    let ck = Checkpoint::open(&out).unwrap();
    assert!(matches!(ck.layout(), Layout::Int8(_)));
    assert_eq!(ck.layer_names().len(), 6);
    for t in tensors.iter().filter(|t| t.is_linear()) {
        let layer = ck.layer(t.name.strip_suffix(".weight").unwrap()).unwrap();
        let expected = match t.dtype {
            Dtype::BF16 => {
                let x: Vec<lowbit::bf16> = t.x.iter().map(|&v| lowbit::bf16::from_f32(v)).collect();
                lowbit::affine::quantize(&x, &t.shape, lowbit::affine::Granularity::PerChannel).unwrap()
            }
            _ => lowbit::affine::quantize(&t.x, &t.shape, lowbit::affine::Granularity::PerChannel).unwrap(),
        };
        match layer.weight() {
            lowbit::linear::QuantWeight::Int8(q) => assert_eq!(q.codes(), expected.codes(), "{}", t.name),
            other => panic!("{other:?}"),
        }
    }
    let q = &read_json(&out.join("config.json"))["quantization_config"];
    assert_eq!(q["quant_method"], "lowbit");
    assert_eq!(q["scheme"], "int8:channel");
}

#[test]
fn dequantize_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, q, dense, half) =
        (tmp.path().join("in"), tmp.path().join("q"), tmp.path().join("dense"), tmp.path().join("half"));
    let tensors = model();
    write_sharded_dir(&input, &tensors);
    assert_ok(&lowbit(&["quantize", s(&input), "--scheme", "nf4:64+dq", "--max-shard-size", "3000", "-o", s(&q)]));
    let o = lowbit(&["dequantize", s(&q), "-o", s(&dense)]);
    assert_ok(&o);
    assert!(stdout(&o).contains("dequantized 6 tensor(s)"), "{}", stdout(&o));
    let config = read_json(&dense.join("config.json"));
    assert!(config.get("quantization_config").is_none(), "{config}");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(std::fs::read_to_string(dense.join("tokenizer.json")).unwrap(), TOKENIZER);
    let ck = Checkpoint::open(&dense).unwrap();
    assert_eq!(ck.layout(), &Layout::Dense);
    assert_eq!(ck.tensor_names().len(), tensors.len());
    for t in &tensors {
        let view = ck.tensor(t.name).unwrap();
        if t.is_linear() {
            let want = expected_4bit(t, FourBitFormat::Nf4, 64, true);
            assert_eq!(view.dtype(), t.dtype, "{}: the recorded dtype", t.name);
            let want_bytes: Vec<u8> = match t.dtype {
                Dtype::BF16 => {
                    want.dequantize::<lowbit::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
                }
                _ => want.dequantize::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            assert_eq!(view.data(), want_bytes.as_slice(), "{}", t.name);
        } else {
            assert_eq!(view.data(), t.data().data.as_slice(), "{}", t.name);
        }
    }
    // --dtype bf16 into shards of 2000 bytes.
    assert_ok(&lowbit(&["dequantize", s(&q), "--dtype", "bf16", "--max-shard-size", "2000", "-o", s(&half)]));
    let ck = Checkpoint::open(&half).unwrap();
    assert!(ck.files().len() > 2);
    for t in tensors.iter().filter(|t| t.is_linear()) {
        assert_eq!(ck.tensor(t.name).unwrap().dtype(), Dtype::BF16, "{}", t.name);
    }
    // A dense directory has nothing to dequantize.
    assert_fails(&lowbit(&["dequantize", s(&dense), "-o", s(&tmp.path().join("x"))]), 1, "no quantized tensors");
}

#[test]
fn dtype_is_strict_and_listed() {
    let help = lowbit(&["dequantize", "-h"]);
    assert_ok(&help);
    assert!(stdout(&help).contains("[possible values: f32, f16, bf16]"), "{}", stdout(&help));
    let long = stdout(&lowbit(&["dequantize", "--help"]));
    assert!(["- f32:", "- f16:", "- bf16:"].iter().all(|v| long.contains(v)), "{long}");
    for bad in ["float16", "half", "F16", "fp16"] {
        let o = lowbit(&["dequantize", "a", "-o", "b", "--dtype", bad]);
        assert_fails(&o, 2, "[possible values: f32, f16, bf16]");
        assert_fails(&o, 2, bad);
    }
    assert_fails(&lowbit(&["quantize", "a", "-o", "b", "--dtype", "float32"]), 2, "possible values");
    assert_fails(&lowbit(&["quantize", "a", "-o", "b", "--max-shard-size", "1.5GB"]), 2, "not a size");
}

#[test]
fn fp4_scheme_writes_an_fp4_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    let tensors = model();
    write_hf_dir(&input, &tensors);
    assert_ok(&lowbit(&["quantize", s(&input), "--scheme", "fp4", "-o", s(&out)]));
    check_quantized_dir(&out, &tensors, FourBitFormat::Fp4, false);
    let q = &read_json(&out.join("config.json"))["quantization_config"];
    assert_eq!(q["bnb_4bit_quant_type"], "fp4");
    assert_eq!(q["bnb_4bit_use_double_quant"], false);
}

#[test]
fn existing_outputs_and_failures_leave_no_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    let tensors = model();
    write_hf_dir(&input, &tensors);
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    assert_fails(&lowbit(&["quantize", s(&input), "--scheme", "nf4", "-o", s(&out)]), 1, "--force");
    // --force replaces only a directory lowbit could have written, never one holding other files.
    assert_fails(
        &lowbit(&["quantize", s(&input), "--scheme", "nf4", "-o", s(&out), "--force"]),
        1,
        "--force replaces only",
    );
    assert!(out.join("keep").is_file());
    std::fs::rename(out.join("keep"), out.join("keep.json")).unwrap();
    assert_ok(&lowbit(&["quantize", s(&input), "--scheme", "nf4", "-o", s(&out), "--force"]));
    assert!(!out.join("keep.json").exists() && out.join("model.safetensors").is_file());
    // The input itself is never the output.
    assert_fails(&lowbit(&["quantize", s(&input), "-o", s(&input), "--force"]), 1, "inputs are never replaced");
    assert!(input.join("model.safetensors").is_file());

    // A NaN in the last tensor fails after earlier shards were written: no output, no temporary directory.
    let mut bad = model();
    let last = bad.iter_mut().rev().find(|t| t.is_linear()).unwrap();
    last.x[5] = f32::NAN;
    let name = last.name;
    let (bad_in, bad_out) = (tmp.path().join("bad-in"), tmp.path().join("bad-out"));
    write_hf_dir(&bad_in, &bad);
    let o = lowbit(&["quantize", s(&bad_in), "--scheme", "nf4", "--max-shard-size", "1000", "-o", s(&bad_out)]);
    assert_fails(&o, 1, name);
    assert!(!bad_out.exists());
    no_temp_left(tmp.path());
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs lowbit under `umask MASK` (through `sh`, so the test process's own umask is untouched).
#[cfg(unix)]
fn lowbit_umask(mask: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("umask {mask} && exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_lowbit")).args(args);
    cmd.output().expect("run sh")
}

#[cfg(unix)]
#[test]
fn outputs_follow_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_hf_dir(&input, &model());
    for (mask, file_mode, dir_mode) in [("022", 0o644, 0o755), ("027", 0o640, 0o750), ("077", 0o600, 0o700)] {
        let file = tmp.path().join(format!("q{mask}.safetensors"));
        let dir = tmp.path().join(format!("q{mask}"));
        assert_ok(&lowbit_umask(mask, &["quantize", s(&input), "--scheme", "nf4", "-o", s(&file)]));
        assert_ok(&lowbit_umask(mask, &["quantize", s(&input), "--scheme", "nf4", "-o", s(&dir)]));
        assert_eq!(mode(&file), file_mode, "umask {mask}: {}", file.display());
        assert_eq!(mode(&dir), dir_mode, "umask {mask}: {}", dir.display());
        for f in ["model.safetensors", "config.json"] {
            assert_eq!(mode(&dir.join(f)), file_mode, "umask {mask}: {f}");
        }
        let deq = tmp.path().join(format!("d{mask}.safetensors"));
        assert_ok(&lowbit_umask(mask, &["dequantize", s(&file), "-o", s(&deq)]));
        assert_eq!(mode(&deq), file_mode, "umask {mask}: dequantize output");
    }
}

/// The real model: SmolLM2-135M (Q4_1 GGUF) to an NF4+DQ directory, read back. Prints the time.
#[test]
fn smollm2_gguf_to_nf4_dq_directory() {
    let Some(gguf) = lowbit_testkit::model::smollm2_gguf("smollm2_gguf_to_nf4_dq_directory") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-nf4");
    let start = std::time::Instant::now();
    let o = lowbit(&["quantize", s(&gguf), "--scheme", "nf4:64+dq", "-o", s(&out)]);
    let secs = start.elapsed().as_secs_f64();
    assert_ok(&o);
    eprintln!("smollm2 GGUF -> NF4+DQ directory: {secs:.2} s; {}", stdout(&o).trim());

    let src = Checkpoint::open(&gguf).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.layout(), &Layout::Bnb4bit);
    assert_eq!(ck.layer_names().len(), 30 * 7, "every linear layer of the 30 decoder layers");
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["num_hidden_layers"], 30);
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["bnb_4bit_compute_dtype"], "float32");
    assert!(q["llm_int8_skip_modules"].as_array().unwrap().contains(&json!("model.embed_tokens")));
    // The Q8_0 embedding is kept, decoded to f32 exactly as the GGUF reader decodes it.
    let emb = ck.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((emb.dtype(), emb.shape()), (Dtype::F32, &[49152usize, 576][..]));
    let want: Vec<u8> =
        src.tensor_f32("model.embed_tokens.weight").unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(emb.data() == want.as_slice(), "embedding differs from the GGUF's decoding");
    // One layer: the library's NF4+DQ of the GGUF's decoded weights.
    let name = "model.layers.7.self_attn.k_proj";
    let w = src.tensor_f32(&format!("{name}.weight")).unwrap();
    let shape = src.tensor_info(&format!("{name}.weight")).unwrap().shape;
    let expected = lowbit::nf4::quantize_4bit(FourBitFormat::Nf4, &w, &shape, 64, true).unwrap();
    match ck.layer(name).unwrap().weight() {
        lowbit::linear::QuantWeight::FourBit(t) => {
            assert_eq!(t.shape(), shape.as_slice());
            assert!(t.dequantize::<f32>().unwrap() == expected.dequantize::<f32>().unwrap(), "{name}");
        }
        other => panic!("{other:?}"),
    }
    // The GGUF's tokenizer becomes tokenizer.json + tokenizer_config.json with the same ids, so the directory
    // is a whole model: `lowbit generate` runs it and answers as from the GGUF.
    let from_gguf = lowbit_llm::Tokenizer::for_model(&gguf).unwrap();
    let from_dir = lowbit_llm::Tokenizer::for_model(&out).unwrap();
    assert_eq!(from_dir.encode("The capital of France is", true).unwrap(), [504, 3575, 282, 4649, 314]);
    for text in ["<|im_start|>user\nHi<|im_end|>", "  spaces\t\ttabs 12345 déjà vu 日本語 🙂", ""] {
        assert_eq!(from_dir.encode(text, true).unwrap(), from_gguf.encode(text, true).unwrap(), "{text:?}");
    }
    assert_eq!((from_dir.bos_id(), from_dir.eos_ids()), (from_gguf.bos_id(), from_gguf.eos_ids()));
    assert_eq!(from_dir.has_chat_template(), from_gguf.has_chat_template());
    let g = lowbit(&["generate", s(&out), "--prompt", "The capital of France is", "--max-tokens", "3"]);
    assert_ok(&g);
    assert!(stdout(&g).contains("Paris"), "{}", stdout(&g));

    // Kept quantized GGUF tensors take --dtype; shards bound the size of each file.
    let bf16 = tmp.path().join("smollm2-nf4-bf16");
    let args = ["quantize", s(&gguf), "--scheme", "nf4:64+dq", "--dtype", "bf16", "--max-shard-size", "30MB"];
    assert_ok(&lowbit(&[&args[..], &["-o", s(&bf16)]].concat()));
    let ck16 = Checkpoint::open(&bf16).unwrap();
    assert!(ck16.files().len() >= 3, "{} shards", ck16.files().len());
    let emb16 = ck16.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb16.dtype(), Dtype::BF16);
    let want16: Vec<u8> = src
        .tensor_f32("model.embed_tokens.weight")
        .unwrap()
        .iter()
        .flat_map(|&v| lowbit::bf16::from_f32(v).to_le_bytes())
        .collect();
    assert!(emb16.data() == want16.as_slice(), "bf16 embedding differs from the GGUF's decoding, rounded");
    assert_eq!(ck16.layer_names(), ck.layer_names());

    // dequantize reads the GGUF directly: a dense directory of the decoded tensors.
    let dense = tmp.path().join("smollm2-dense");
    assert_ok(&lowbit(&["dequantize", s(&gguf), "--max-shard-size", "100MB", "-o", s(&dense)]));
    let ckd = Checkpoint::open(&dense).unwrap();
    assert_eq!(ckd.tensor_names(), src.tensor_names());
    assert!(dense.join("tokenizer.json").is_file() && dense.join("tokenizer_config.json").is_file());
    for name in ["model.layers.7.self_attn.k_proj.weight", "model.norm.weight"] {
        let want: Vec<u8> = src.tensor_f32(name).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(ckd.tensor(name).unwrap().data() == want.as_slice(), "{name}");
    }
}
