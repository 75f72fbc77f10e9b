//! llama-family GGUFs through `lowbit::io::Checkpoint`: Hugging Face names and shapes, Q/K rows un-permuted,
//! and the `config.json` built from the metadata.
//!
//! * The real SmolLM2 GGUF (skipped loudly without it, see `lowbit_testkit::model`): all 272 tensors equal
//!   transformers' GGUF load bit for bit (sha256 of the f32 bytes against
//!   `tests/data/gguf/smollm2_transformers.json`, written by `gen_smollm2_reference.py`), and the config
//!   matches. transformers' state dict also holds `lm_head.weight`, tied to the embedding (the GGUF has no
//!   `output.weight`): the checkpoint does not list it and says `tie_word_embeddings: true`, and the fixture
//!   shows it is the embedding's tensor.
//! * Synthetic GGUFs (testkit's writer): the un-permutation against llama.cpp's `permute` written out, missing
//!   and malformed metadata, tensors without a Hugging Face name, unsupported architectures.
#![cfg(feature = "io")]

use lowbit::format::ggml::GgmlType;
use lowbit::io::gguf::GgufValue;
use lowbit::io::{Checkpoint, Layout, Limits, StoredType};
use lowbit::Error;
use lowbit_testkit::gguf::{f32_bytes, strings, GgufWriter};
use lowbit_testkit::{model, ScratchDir};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;

const REFERENCE: &str = include_str!("data/gguf/smollm2_transformers.json");

fn sha256_f32(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for chunk in values.chunks(1 << 14) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn sha256_helper_matches_numpy_and_hashlib() {
    // Python: hashlib.sha256(np.array(..., dtype="<f4").tobytes()).hexdigest(); the second input spans several
    // chunks of the helper.
    assert_eq!(sha256_f32(&[1.0, -2.0]), "ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b");
    let ramp: Vec<f32> = (0..40000).map(|i| i as f32).collect();
    assert_eq!(sha256_f32(&ramp), "0e33879ea8a9cfa430cc6e48eb782b21961203e6d56ff273c87f60a4e89d570c");
}

#[test]
fn smollm2_tensors_and_config_equal_transformers_gguf_load() {
    let Some(path) = model::smollm2_gguf("smollm2_tensors_and_config_equal_transformers_gguf_load") else {
        return;
    };
    let reference: Value = serde_json::from_str(REFERENCE).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        size,
        reference["gguf"]["bytes"].as_u64().unwrap(),
        "{} is not the file the fixture was made from (sha256 {})",
        path.display(),
        reference["gguf"]["sha256"]
    );

    let t0 = Instant::now();
    let ck = Checkpoint::open(&path).unwrap();
    let open_time = t0.elapsed();
    assert_eq!(*ck.layout(), Layout::Dense);
    let gguf = ck.gguf().expect("a GGUF checkpoint exposes its file");
    assert_eq!(gguf.tensors().len(), 272);
    let mapping = ck.gguf_mapping().unwrap();
    assert!(mapping.unmapped().is_empty(), "unmapped: {:?}", mapping.unmapped());

    // Names: transformers' state dict = our 272 names + the tied lm_head.weight.
    let ref_tensors = reference["tensors"].as_array().unwrap();
    let by_name: std::collections::BTreeMap<&str, &Value> =
        ref_tensors.iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    let mut expected: Vec<&str> = by_name.keys().copied().filter(|n| *n != "lm_head.weight").collect();
    expected.sort();
    assert_eq!(ck.tensor_names(), expected);
    assert_eq!(expected.len(), 272);
    assert!(reference["lm_head_shares_embedding"].as_bool().unwrap());
    assert_eq!(by_name["lm_head.weight"]["sha256"], by_name["model.embed_tokens.weight"]["sha256"]);
    assert_eq!(ck.config().unwrap()["tie_word_embeddings"], json!(true));
    assert!(ck.tensor_info("lm_head.weight").is_err(), "a tied lm_head is not a tensor of the GGUF");

    let t1 = Instant::now();
    let weights = assert_equals_transformers(&ck, &reference);
    eprintln!(
        "SmolLM2 GGUF: open {:.1} ms; 272 tensors ({weights} weights) decoded, un-permuted and hashed in {:.2} s",
        open_time.as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64()
    );
}

/// Every tensor of `ck` has the shape and f32 bytes (sha256) of the tensor of that name in `reference`
/// (written by the generator; `tensors`, `config`, `model_class`), and every config field transformers built
/// is the same in `ck.config()`, and absent where transformers left it unset (`architectures` is unset by
/// AutoConfig for a GGUF, so the class transformers instantiated stands in for it). Returns the number of weights compared.
fn assert_equals_transformers(ck: &Checkpoint, reference: &Value) -> usize {
    let by_name: std::collections::BTreeMap<&str, &Value> =
        reference["tensors"].as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    let mut weights = 0usize;
    for name in ck.tensor_names() {
        let r = by_name.get(name).unwrap_or_else(|| panic!("`{name}` is not in transformers' state dict"));
        let info = ck.tensor_info(name).unwrap();
        let shape: Vec<usize> = r["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(info.shape, shape, "{name}");
        assert!(matches!(info.stored, StoredType::Ggml(_)), "{name}: {:?}", info.stored);
        let v = ck.tensor_f32(name).unwrap();
        assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
        weights += v.len();
        assert_eq!(sha256_f32(&v), r["sha256"].as_str().unwrap(), "{name}: f32 bytes differ from transformers'");
    }
    let config = ck.config().unwrap();
    for (field, want) in reference["config"].as_object().unwrap() {
        match (field.as_str(), want) {
            ("architectures", Value::Null) => {
                assert_eq!(config.get(field), Some(&json!([reference["model_class"]])), "config `architectures`")
            }
            // Unset in transformers' config (e.g. no padding token): absent here too.
            (_, Value::Null) => assert!(config.get(field).is_none_or(Value::is_null), "config field `{field}`"),
            _ => assert_eq!(config.get(field), Some(want), "config field `{field}`"),
        }
    }
    weights
}

#[test]
fn tiny_llama_and_qwen2_equal_transformers_gguf_load() {
    // Random GGUFs written by gguf-py as llama.cpp's converter lays them out (generator in tests/data/gguf):
    // llama with Q8_0 / Q4_1 Q and K permuted and an untied output.weight; qwen2 with q/k/v biases, unpermuted.
    let reference: Value = serde_json::from_str(include_str!("data/gguf/tiny_transformers.json")).unwrap();
    for (arch, class, names) in [("llama", "LlamaForCausalLM", 12), ("qwen2", "Qwen2ForCausalLM", 15)] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/gguf/tiny_{arch}.gguf"));
        let ck = Checkpoint::open(&path).unwrap();
        let r = &reference[arch];
        assert_eq!(r["model_class"], class);
        // Untied: transformers' state dict is exactly the checkpoint's tensors.
        assert_eq!(ck.tensor_names().len(), names, "{arch}");
        assert_eq!(r["tensors"].as_array().unwrap().len(), names, "{arch}");
        assert_eq!(ck.config().unwrap()["tie_word_embeddings"], json!(false));
        assert_equals_transformers(&ck, r);
    }
}

/// The llama.cpp converter's `permute(w, n_head, n_head_kv)`, written out: `w.reshape(n_head, 2, d, cols)
/// .swapaxes(1, 2)`, i.e. stored row `h·2d + 2j + i` = Hugging Face row `h·2d + i·d + j`.
fn llama_cpp_permute(w: &[f32], cols: usize, n_head: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / n_head / 2;
    let mut out = vec![f32::NAN; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d {
                let hf = h * 2 * d + i * d + j;
                let stored = h * 2 * d + 2 * j + i;
                out[stored * cols..(stored + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 6;

/// Distinct values for a tensor (`tag` keeps tensors apart).
fn values(n: usize, tag: f32) -> Vec<f32> {
    (0..n).map(|i| tag + i as f32 / 64.0).collect()
}

/// A one-block llama GGUF with F32 tensors: metadata minus `omit`, the given tensors (Hugging Face layout; Q
/// and K are permuted here as llama.cpp's converter does) plus `extra` raw tensors.
fn llama_gguf(omit: &[&str], extra: &[(&str, Vec<f32>)]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    let meta: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("general.name", GgufValue::String("tiny".into())),
        ("llama.context_length", GgufValue::U32(128)),
        ("llama.embedding_length", GgufValue::U32(HIDDEN as u32)),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.feed_forward_length", GgufValue::U32(16)),
        ("llama.attention.head_count", GgufValue::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", GgufValue::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", GgufValue::F32(500000.0)),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6)),
        ("llama.rope.dimension_count", GgufValue::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "c", "d", "e", "f"])),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
    ];
    for (k, v) in meta {
        if !omit.contains(&k) {
            w = w.kv(k, v);
        }
    }
    let q = values(HIDDEN * HIDDEN, 1.0);
    let k = values(KV_HEADS * HEAD_DIM * HIDDEN, 2.0);
    w = w
        .tensor("token_embd.weight", GgmlType::F32, &[VOCAB, HIDDEN], f32_bytes(&values(VOCAB * HIDDEN, 0.0)))
        .tensor(
            "blk.0.attn_q.weight",
            GgmlType::F32,
            &[HIDDEN, HIDDEN],
            f32_bytes(&llama_cpp_permute(&q, HIDDEN, HEADS)),
        )
        .tensor(
            "blk.0.attn_k.weight",
            GgmlType::F32,
            &[KV_HEADS * HEAD_DIM, HIDDEN],
            f32_bytes(&llama_cpp_permute(&k, HIDDEN, KV_HEADS)),
        )
        .tensor("blk.0.attn_norm.weight", GgmlType::F32, &[HIDDEN], f32_bytes(&values(HIDDEN, 3.0)))
        .tensor("output_norm.weight", GgmlType::F32, &[HIDDEN], f32_bytes(&values(HIDDEN, 4.0)));
    for (name, v) in extra {
        w = w.tensor(name, GgmlType::F32, &[v.len()], f32_bytes(v));
    }
    w.to_bytes()
}

fn open(bytes: Vec<u8>) -> lowbit::Result<Checkpoint> {
    Checkpoint::from_shared(Arc::new(bytes), Limits::DEFAULT)
}

#[test]
fn qk_rows_are_unpermuted_and_plain_tensors_are_views() {
    let dir = ScratchDir::new("gguf-llama-unpermute");
    // No `.gguf` extension: recognised by the magic.
    let path = dir.path().join("tiny.bin");
    std::fs::write(&path, llama_gguf(&[], &[])).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(
        ck.tensor_names(),
        [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight",
        ]
    );
    assert_eq!(*ck.layout(), Layout::Dense);
    assert!(ck.layer_names().is_empty());

    let q = ck.tensor_f32("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q, values(HIDDEN * HIDDEN, 1.0), "Q rows back in Hugging Face order");
    let k = ck.tensor_f32("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(k, values(KV_HEADS * HEAD_DIM * HIDDEN, 2.0), "K rows back in Hugging Face order");
    let info = ck.tensor_info("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(info.shape, [KV_HEADS * HEAD_DIM, HIDDEN]);
    assert_eq!(info.stored, StoredType::Ggml(GgmlType::F32));
    assert_eq!(info.bytes, KV_HEADS * HEAD_DIM * HIDDEN * 4);

    // A permuted F32 tensor has no view (its bytes are not the Hugging Face tensor); a norm has one.
    let e = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap_err().to_string();
    assert!(e.contains("tensor_f32") && e.contains("permuted"), "{e}");
    let norm = ck.tensor("model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(norm.shape(), [HIDDEN]);
    assert_eq!(norm.data(), f32_bytes(&values(HIDDEN, 3.0)));
    assert_eq!(ck.tensor_f32("model.norm.weight").unwrap(), values(HIDDEN, 4.0));

    let c = ck.config().unwrap();
    let want = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": 128,
        "rms_norm_eps": f64::from(1e-6f32), "rope_theta": 500000.0,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": true, "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    assert_eq!(c, &want);
    assert_eq!(ck.gguf().unwrap().architecture(), Some("llama"));
}

#[test]
fn missing_or_malformed_metadata_names_the_key() {
    for key in ["llama.attention.head_count", "llama.embedding_length", "llama.attention.layer_norm_rms_epsilon"] {
        let e = open(llama_gguf(&[key], &[])).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{key}: {e:?}");
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
    let e = open(llama_gguf(&["general.architecture"], &[])).unwrap_err().to_string();
    assert!(e.contains("general.architecture"), "{e}");

    // head_count_kv = 3 does not divide head_count = 2.
    let bytes = GgufWriter::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.attention.head_count_kv", GgufValue::U32(3))
        .to_bytes();
    let e = open(bytes).unwrap_err().to_string();
    assert!(e.contains("llama.embedding_length"), "first missing key named: {e}");
}

#[test]
fn tensors_without_a_hugging_face_name_are_listed_not_served() {
    let extra = [("rope_freqs.weight", vec![1.0, 2.0]), ("blk.0.mystery.weight", vec![3.0; 4])];
    let ck = open(llama_gguf(&[], &extra)).unwrap();
    let mapping = ck.gguf_mapping().unwrap();
    assert_eq!(mapping.unmapped(), ["rope_freqs.weight", "blk.0.mystery.weight"]);
    assert_eq!(ck.tensor_names().len(), 5);
    assert!(ck.tensor_names().iter().all(|n| !n.contains("rope_freqs") && !n.contains("mystery")));
    let e = ck.tensor_f32("rope_freqs.weight").unwrap_err().to_string();
    assert!(e.contains("no Hugging Face name"), "{e}");
    // Still readable under the GGUF name.
    assert_eq!(ck.gguf().unwrap().tensor_f32("blk.0.mystery.weight").unwrap(), [3.0; 4]);
    // A GGUF name of a mapped tensor points to its Hugging Face name.
    let e = ck.tensor_info("blk.0.attn_q.weight").unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.q_proj.weight"), "{e}");
}

#[test]
fn unsupported_architectures_and_bad_shapes_are_errors() {
    let bytes = GgufWriter::new()
        .kv("general.architecture", GgufValue::String("mamba".into()))
        .tensor("token_embd.weight", GgmlType::F32, &[2, 2], f32_bytes(&[0.0; 4]))
        .to_bytes();
    let e = open(bytes).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("mamba") && e.to_string().contains("llama"), "{e}");

    // A block past block_count.
    let e = open(llama_gguf(&[], &[("blk.1.attn_norm.weight", vec![0.0; HIDDEN])])).unwrap_err().to_string();
    assert!(e.contains("blk.1.attn_norm.weight") && e.contains("block_count"), "{e}");
}
