//! `lowbit::io::Checkpoint`: single files, Hugging Face directories and sharded directories give the same
//! layers; layers of a mapped file share its pages (resident memory grows by the decoded scales only, not by
//! the packed codes); layouts (bitsandbytes 4-bit, lowbit int8, dense) are detected; bad indexes and
//! over-limit files are clear errors.
#![cfg(feature = "io")]

use lowbit::affine::{quantize, Granularity};
use lowbit::double_quant::{DoubleQuantScales, DYNAMIC_MAP};
use lowbit::io::{bnb, int8, parse_safetensors, peft, serialize_safetensors, Checkpoint, Layout, Limits, TensorData};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::nf4::{quantize_4bit, quantize_nf4, BlockScales, FourBitFormat, FourBitTensor, NF4_TABLE};
use lowbit::storage::{Bytes, SharedBytes};
use lowbit::{DType, Error};
use lowbit_testkit::{Rng, ScratchDir};
use safetensors::Dtype;
use std::path::Path;
use std::sync::Arc;

/// Serializes the tests of this file, so that the resident-memory measurement of the big test sees no other
/// test's allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deterministic bytes from the shared RNG (fast enough for hundreds of MB).
fn fill(rng: &mut Rng, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `n` values uniform in `[lo, hi)`.
fn f32s(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * rng.uniform() as f32).collect()
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 - 506.0) * 1e-3).collect()
}

fn f32_tensor(shape: &[usize], v: &[f32]) -> TensorData {
    TensorData::from_slice(Dtype::F32, shape.to_vec(), v)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn assert_same_layer(a: &QuantLinear, b: &QuantLinear, what: &str) {
    assert_eq!(a.weight(), b.weight(), "{what}: weight");
    assert_eq!(a.bias(), b.bias(), "{what}: bias");
    let x = values(3 * a.in_features(), 5);
    assert!(same_bits(&a.forward(&x).unwrap(), &b.forward(&x).unwrap()), "{what}: forward");
}

// ------------------------------------------------------------------------------------- (b) files and directories

const UP: &str = "model.layers.0.mlp.up_proj";
const GATE: &str = "model.layers.0.mlp.gate_proj";
const DOWN: &str = "model.layers.0.mlp.down_proj";

/// Named tensors, as the safetensors writer takes them.
type Tensors = Vec<(String, TensorData)>;

/// Three 4-bit layers (NF4 + double quantization with an F16 bias, plain FP4 with an odd shape, plain NF4) and
/// two dense tensors, as `(tensors of shard 1, tensors of shard 2)`.
fn small_model() -> (Tensors, Tensors) {
    let up = quantize_nf4(&values(96 * 128, 1), &[96, 128], 64, true).unwrap();
    let gate = quantize_4bit(FourBitFormat::Fp4, &values(33 * 70, 2), &[33, 70], 128, false).unwrap();
    let down = quantize_nf4(&values(128 * 96, 3), &[128, 96], 32, false).unwrap();
    let mut one = bnb::to_tensors(&format!("{UP}.weight"), &up).unwrap();
    let bias: Vec<lowbit::f16> = values(96, 4).iter().map(|v| lowbit::f16::from_f32(*v)).collect();
    one.push((format!("{UP}.bias"), TensorData::from_slice(Dtype::F16, vec![96], &bias)));
    one.push(("model.norm.weight".into(), f32_tensor(&[128], &values(128, 6))));
    let mut two = bnb::to_tensors(&format!("{GATE}.weight"), &gate).unwrap();
    two.extend(bnb::to_tensors(&format!("{DOWN}.weight"), &down).unwrap());
    two.push(("model.embed_tokens.weight".into(), f32_tensor(&[10, 128], &values(1280, 7))));
    (one, two)
}

fn write(path: &Path, tensors: &[(String, TensorData)]) {
    std::fs::write(path, serialize_safetensors(tensors, None).unwrap()).unwrap();
}

/// Writes `model.safetensors.index.json` for two shards.
fn write_index(dir: &Path, shards: &[(&str, &[(String, TensorData)])]) {
    let mut map = serde_json::Map::new();
    for (file, tensors) in shards {
        for (name, _) in *tensors {
            map.insert(name.clone(), serde_json::Value::String(file.to_string()));
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn file_hf_directory_and_shards_give_the_same_layers() {
    let _serial = serial();
    let s = ScratchDir::new("checkpoint-dirs");
    let (one, two) = small_model();
    let all: Vec<(String, TensorData)> = one.iter().chain(&two).cloned().collect();
    let single = s.path().join("single.safetensors");
    write(&single, &all);
    let hf = s.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    write(&hf.join("model.safetensors"), &all);
    std::fs::write(hf.join("config.json"), r#"{"model_type": "llama", "hidden_size": 128}"#).unwrap();
    let sharded = s.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    write(&sharded.join("model-00001-of-00002.safetensors"), &one);
    write(&sharded.join("model-00002-of-00002.safetensors"), &two);
    write_index(&sharded, &[("model-00001-of-00002.safetensors", &one), ("model-00002-of-00002.safetensors", &two)]);

    let a = Checkpoint::open(&single).unwrap();
    let b = Checkpoint::open(&hf).unwrap();
    let c = Checkpoint::open(&sharded).unwrap();
    let d = Checkpoint::open(sharded.join("model.safetensors.index.json")).unwrap();
    let names = vec![DOWN.to_string(), GATE.to_string(), UP.to_string()];
    for (ck, what) in [(&a, "file"), (&b, "hf dir"), (&c, "sharded dir"), (&d, "index file")] {
        assert_eq!(ck.layer_names(), names, "{what}");
        assert_eq!(ck.layout(), &Layout::Bnb4bit, "{what}");
        assert_eq!(ck.tensor_names(), a.tensor_names(), "{what}");
        assert_eq!(ck.tensor_f32("model.norm.weight").unwrap(), values(128, 6), "{what}");
    }
    assert_eq!(c.files().len(), 2);
    assert_eq!(b.config().and_then(|v| v["hidden_size"].as_u64()), Some(128));
    assert!(a.config().is_none());

    // The old loader (copies out of a parsed buffer) gives the same layers.
    let bytes = std::fs::read(&single).unwrap();
    let old = peft::quant_linears_from(&parse_safetensors(&bytes).unwrap(), &Default::default()).unwrap();
    assert_eq!(old.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), names);
    for (name, owned) in &old {
        for ck in [&a, &b, &c, &d] {
            let l = ck.layer(name).unwrap();
            assert_same_layer(&l, owned, name);
            let QuantWeight::FourBit(t) = l.weight() else { panic!("4-bit") };
            assert!(t.packed_bytes().is_view(), "{name}: packed codes are a view of the map");
        }
        let QuantWeight::FourBit(t) = owned.weight() else { panic!("4-bit") };
        assert!(!t.packed_bytes().is_view(), "the old loader copies");
    }
    assert_eq!(a.layer(UP).unwrap().bias().map(<[f32]>::len), Some(96));
    assert_eq!(a.layers().unwrap().len(), 3);

    // Layers outlive their checkpoint (they hold the map).
    let kept = c.layer(DOWN).unwrap();
    drop(c);
    assert_same_layer(&kept, &old[0].1, "after drop");

    // In memory: the same layers.
    let m = Checkpoint::from_bytes(bytes).unwrap();
    assert_same_layer(&m.layer(GATE).unwrap(), &old[1].1, "from_bytes");
}

#[test]
fn layer_name_errors_help() {
    let _serial = serial();
    let s = ScratchDir::new("checkpoint-names");
    let (one, two) = small_model();
    let all: Vec<(String, TensorData)> = one.iter().chain(&two).cloned().collect();
    let path = s.path().join("m.safetensors");
    write(&path, &all);
    let ck = Checkpoint::open(&path).unwrap();
    let e = ck.layer(&format!("{UP}.weight")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert!(msg.contains(&format!("`{UP}`, not `{UP}.weight`")), "{msg}");
    assert!(msg.contains(DOWN) && msg.contains("m.safetensors"), "lists valid names and the file: {msg}");
    let msg = ck.layer("model.norm").unwrap_err().to_string();
    assert!(msg.contains("plain"), "{msg}");
    let msg = ck.layer("nope").unwrap_err().to_string();
    assert!(msg.contains("one of its 3 layers"), "{msg}");
    assert!(ck.tensor("nope").is_err());
    let msg = ck.tensor_f32(&format!("{UP}.weight")).unwrap_err().to_string();
    assert!(msg.contains("expected F32, F16 or BF16"), "{msg}");
    let e = Checkpoint::open(s.path().join("missing.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("missing.safetensors"), "{e}");
    let empty_dir = s.path().join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let msg = Checkpoint::open(&empty_dir).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn bad_shard_indexes_are_clear_errors() {
    let _serial = serial();
    let s = ScratchDir::new("checkpoint-shards");
    let (one, two) = small_model();
    let dir = s.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir.join("a.safetensors"), &one);
    write(&dir.join("b.safetensors"), &two);
    write(&s.path().join("x.safetensors"), &two); // outside the model directory
    let open_with = |index: &str| {
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        Checkpoint::open(&dir)
    };
    let index = |second: &str| {
        let mut map = serde_json::Map::new();
        for (n, _) in &one {
            map.insert(n.clone(), "a.safetensors".into());
        }
        for (n, _) in &two {
            map.insert(n.clone(), second.into());
        }
        serde_json::json!({ "weight_map": map }).to_string()
    };
    assert_eq!(open_with(&index("b.safetensors")).unwrap().layer_names().len(), 3);

    for bad in ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""] {
        let msg = open_with(&index(bad)).unwrap_err().to_string();
        assert!(msg.contains("no `..`") && msg.contains("model.safetensors.index.json"), "{bad}: {msg}");
    }
    let e = open_with(&index("c.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("c.safetensors"), "missing shard: {e}");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(s.path().join("x.safetensors"), dir.join("link.safetensors")).unwrap();
        let msg = open_with(&index("link.safetensors")).unwrap_err().to_string();
        assert!(msg.contains("outside the directory"), "symlink out: {msg}");
    }
    // A weight_map entry its shard lacks; a tensor in two shards.
    let mut wrong: serde_json::Value = serde_json::from_str(&index("b.safetensors")).unwrap();
    wrong["weight_map"]["model.norm.weight"] = "b.safetensors".into();
    let msg = open_with(&wrong.to_string()).unwrap_err().to_string();
    assert!(msg.contains("model.norm.weight") && msg.contains("no such tensor"), "{msg}");
    write(&dir.join("b.safetensors"), &one.iter().chain(&two).cloned().collect::<Vec<_>>());
    let msg = open_with(&index("b.safetensors")).unwrap_err().to_string();
    assert!(msg.contains("also in"), "duplicate tensor: {msg}");
    write(&dir.join("b.safetensors"), &two);
    // Not JSON, no weight_map, over the JSON limits.
    assert!(open_with("{").unwrap_err().to_string().contains("invalid JSON"));
    assert!(open_with("{}").unwrap_err().to_string().contains("weight_map"));
    std::fs::write(dir.join("model.safetensors.index.json"), index("b.safetensors")).unwrap();
    let tiny = Limits { max_json_bytes: 100, ..Limits::DEFAULT };
    let msg = Checkpoint::open_with_limits(&dir, tiny).unwrap_err().to_string();
    assert!(msg.contains("max_json_bytes"), "{msg}");
    let deep = format!("{{\"weight_map\": {{}}, \"x\": {}1{}}}", "[".repeat(50), "]".repeat(50));
    assert!(open_with(&deep).unwrap_err().to_string().contains("max_json_depth"));
}

// ------------------------------------------------------------------------------------- (c) layouts and limits

#[test]
fn int8_and_dense_layouts_are_detected() {
    let _serial = serial();
    let s = ScratchDir::new("checkpoint-layouts");
    let q = quantize(&values(24 * 40, 8), &[24, 40], Granularity::PerGroup(16)).unwrap();
    let mut t = int8::to_tensors("l.weight", &q).to_vec();
    t.push(("l.bias".into(), f32_tensor(&[24], &values(24, 9))));
    t.push(("emb".into(), f32_tensor(&[4, 4], &values(16, 10))));
    let meta = int8::metadata(q.granularity(), [("l.weight", DType::BF16)]);
    let path = s.path().join("int8.safetensors");
    std::fs::write(&path, serialize_safetensors(&t, Some(meta.clone())).unwrap()).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let Layout::Int8(l) = ck.layout() else { panic!("int8 expected, got {:?}", ck.layout()) };
    assert_eq!(l.granularity, Granularity::PerGroup(16));
    assert_eq!(ck.layer_names(), ["l"]);
    assert_eq!(ck.metadata(), &meta);
    let layer = ck.layer("l").unwrap();
    let QuantWeight::Int8(w) = layer.weight() else { panic!("int8 weight") };
    assert!(w.codes_bytes().is_view());
    assert_eq!(w, &q);
    let bytes = std::fs::read(&path).unwrap();
    let old = peft::quant_linears_from(&parse_safetensors(&bytes).unwrap(), &meta).unwrap();
    assert_same_layer(&layer, &old[0].1, "int8");

    // Over the tensor limit: the int8 loader refuses before copying (old path and Checkpoint).
    let tight = Limits { max_tensor_bytes: 24 * 40 - 1, ..Limits::DEFAULT };
    let e = peft::quant_linears_from_with_limits(&parse_safetensors(&bytes).unwrap(), &meta, &tight).unwrap_err();
    assert!(e.to_string().contains("max_tensor_bytes") && e.to_string().contains("l.weight"), "{e}");
    let e = Checkpoint::open_with_limits(&path, tight).unwrap_err();
    assert!(e.to_string().contains("max_tensor_bytes") && e.to_string().contains("int8.safetensors"), "{e}");
    let st = parse_safetensors(&bytes).unwrap();
    let e = l.load_with_limits(&st, "l.weight", &Limits { max_tensor_bytes: 2000, ..Limits::DEFAULT }).unwrap_err();
    assert!(e.to_string().contains("decoded to f32"), "{e}");

    // Dense.
    let dense = s.path().join("dense.safetensors");
    write(&dense, &[("w.weight".into(), f32_tensor(&[2, 3], &values(6, 11)))]);
    let ck = Checkpoint::open(&dense).unwrap();
    assert_eq!(ck.layout(), &Layout::Dense);
    assert!(ck.layer_names().is_empty());
    assert_eq!(ck.tensor_f32("w.weight").unwrap(), values(6, 11));
    let msg = ck.layer("w").unwrap_err().to_string();
    assert!(msg.contains("dense") && msg.contains("plain"), "{msg}");
    let tight = Limits { max_tensor_bytes: 16, ..Limits::DEFAULT };
    assert!(Checkpoint::open_with_limits(&dense, tight).unwrap_err().to_string().contains("max_tensor_bytes"));
}

#[test]
fn corrupt_files_are_errors_naming_the_file() {
    let _serial = serial();
    let s = ScratchDir::new("checkpoint-corrupt");
    let p = s.path().join("bad.safetensors");
    for bytes in [&b""[..], &b"\x05\0\0\0\0\0\0\0{}"[..], &(1u64 << 40).to_le_bytes()[..]] {
        std::fs::write(&p, bytes).unwrap();
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(
            matches!(e, Error::Format { .. } | Error::Io { .. }) && e.to_string().contains("bad.safetensors"),
            "{e}"
        );
    }
    // A layer whose packed bytes disagree with its quant state: the error names file and tensor.
    let (mut one, _) = small_model();
    let w = format!("{UP}.weight");
    let i = one.iter().position(|(n, _)| *n == w).unwrap();
    one[i].1 = TensorData::from_slice(Dtype::U8, vec![10, 1], &[0u8; 10]);
    write(&p, &one);
    let msg = Checkpoint::open(&p).unwrap().layer(UP).unwrap_err().to_string();
    assert!(msg.contains("bad.safetensors") && msg.contains(&w) && msg.contains("expected"), "{msg}");
}

// ------------------------------------------------------------------------------------- (a) memory

/// Resident memory of this process, in bytes: (total, anonymous, file-backed).
#[cfg(target_os = "linux")]
fn rss() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

/// One tensor of the big test file: a small bitsandbytes entry, or the shared packed codes.
#[cfg(target_os = "linux")]
enum Entry<'a> {
    Data(&'a TensorData),
    Packed(&'a [u8], [usize; 2]),
}

#[cfg(target_os = "linux")]
impl safetensors::View for &Entry<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Entry::Data(t) => t.dtype,
            Entry::Packed(..) => Dtype::U8,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Entry::Data(t) => &t.shape,
            Entry::Packed(_, shape) => shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Entry::Data(t) => std::borrow::Cow::Borrowed(&t.data),
            Entry::Packed(p, _) => std::borrow::Cow::Borrowed(p),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Entry::Data(t) => t.data.len(),
            Entry::Packed(p, _) => p.len(),
        }
    }
}

/// 8 NF4 + double-quantization layers of 4096 × 14336 (a Llama-8B `down_proj`), ~242 MB in the bitsandbytes
/// layout: building every layer of the mapped file must not copy the packed codes (resident memory grows by the
/// decoded f32 scales and the touched scale codes, a small fraction of the file), and a forward pass of a
/// mapped layer equals the owned (copied) layer bit for bit.
#[cfg(target_os = "linux")]
#[test]
fn big_checkpoint_layers_share_the_mapped_file() {
    let _serial = serial();
    const OUT: usize = 4096;
    const IN: usize = 14336;
    const LAYERS: usize = 8;
    let numel = OUT * IN;
    let nblocks = numel / 64;
    let s = ScratchDir::new("checkpoint-big");
    let path = s.path().join("model.safetensors");
    let name = |i: usize| format!("model.layers.{i}.mlp.down_proj");
    {
        // One random packed buffer shared (as a view) by the 8 tensors; small random scale codes per layer.
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut packed = vec![0u8; numel / 2];
        fill(&mut rng, &mut packed);
        let shared: SharedBytes = Arc::new(packed);
        let mut small: Vec<(String, TensorData)> = Vec::new();
        for i in 0..LAYERS {
            let mut codes = vec![0u8; nblocks];
            fill(&mut rng, &mut codes);
            let nested = f32s(&mut rng, nblocks.div_ceil(256), 0.01, 0.05);
            let dq = DoubleQuantScales::from_parts(codes, nested, 0.06, 256, Box::new(DYNAMIC_MAP)).unwrap();
            let t = FourBitTensor::from_parts(
                vec![OUT, IN],
                FourBitFormat::Nf4,
                64,
                NF4_TABLE,
                Bytes::view_all(shared.clone()),
                BlockScales::Double(dq),
                DType::BF16,
            )
            .unwrap();
            // The bitsandbytes writer's entries, minus the packed codes (written from the shared buffer).
            let w = format!("{}.weight", name(i));
            let BlockScales::Double(d) = t.scales() else { unreachable!() };
            let json = bnb::quant_state_of(&t).to_json().unwrap();
            small.push((format!("{w}.absmax"), TensorData::from_slice(Dtype::U8, vec![nblocks], d.codes())));
            small.push((format!("{w}.quant_map"), TensorData::from_slice(Dtype::F32, vec![16], t.table())));
            let nn = d.nested_absmax();
            small.push((format!("{w}.nested_absmax"), TensorData::from_slice(Dtype::F32, vec![nn.len()], nn)));
            small.push((format!("{w}.nested_quant_map"), TensorData::from_slice(Dtype::F32, vec![256], &d.map()[..])));
            small.push((
                bnb::quant_state_key(&w, t.format()),
                TensorData::from_slice(Dtype::U8, vec![json.len()], json.as_bytes()),
            ));
        }
        let weights: Vec<(String, &[u8])> =
            (0..LAYERS).map(|i| (format!("{}.weight", name(i)), (*shared).as_ref())).collect();
        write_big(&path, &small, &weights, numel / 2);
    }
    let file_size = std::fs::metadata(&path).unwrap().len();

    let before = rss();
    let ck = Checkpoint::open(&path).unwrap();
    let names = ck.layer_names();
    assert_eq!(names.len(), LAYERS);
    let layers: Vec<QuantLinear> = names.iter().map(|n| ck.layer(n).unwrap()).collect();
    let after = rss();
    let grew = after.0.saturating_sub(before.0);
    let decoded = (LAYERS * nblocks * 4) as u64;
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "checkpoint {:.1} MiB: VmRSS {:.1} -> {:.1} MiB (+{:.1} MiB = {:.1}% of the file; anon +{:.1}, file-backed \
         +{:.1}); decoded f32 scales of {LAYERS} layers: {:.1} MiB",
        mb(file_size),
        mb(before.0),
        mb(after.0),
        mb(grew),
        100.0 * grew as f64 / file_size as f64,
        mb(after.1.saturating_sub(before.1)),
        mb(after.2.saturating_sub(before.2)),
        mb(decoded)
    );
    for l in &layers {
        let QuantWeight::FourBit(t) = l.weight() else { panic!("4-bit") };
        assert!(t.packed_bytes().is_view());
        let BlockScales::Double(d) = t.scales() else { panic!("double-quantized") };
        assert!(d.codes_bytes().is_view());
    }
    // Expected growth: the decoded f32 scales (12% of the file here) plus the scale-code pages the decode reads
    // (3%); a copy of the packed codes would add 97% of the file.
    assert!(
        grew < file_size / 4,
        "building {LAYERS} layers grew resident memory by {grew} bytes, expected under a quarter of the \
         {file_size}-byte file (the packed codes must stay in the mapped file)"
    );

    // A forward of one layer on a few rows equals the owned layer read by the old loader (a copy), bit for bit.
    let x = values(4 * IN, 12);
    let y = layers[3].forward(&x).unwrap();
    let after_forward = rss();
    println!(
        "after one forward: VmRSS {:.1} MiB (file-backed +{:.1} MiB: the pages of the layer it read)",
        mb(after_forward.0),
        mb(after_forward.2.saturating_sub(before.2))
    );
    let file = lowbit::io::SafetensorsFile::open(&path).unwrap();
    let st = file.tensors().unwrap();
    let owned = bnb::load_layer(&st, &format!("{}.", names[3])).unwrap();
    assert!(!owned.weight.packed_bytes().is_view());
    let owned = QuantLinear::new(QuantWeight::FourBit(owned.weight), None).unwrap();
    assert_eq!(layers[3].weight(), owned.weight());
    assert!(same_bits(&y, &owned.forward(&x).unwrap()), "mapped and owned layers differ");
    drop((layers, ck));
}

/// Writes a safetensors file holding `small` and, for each `weights` entry, its `packed_len` bytes as U8
/// `[packed_len, 1]` (the bitsandbytes shape), streaming: the packed bytes are not copied.
#[cfg(target_os = "linux")]
fn write_big(path: &Path, small: &[(String, TensorData)], weights: &[(String, &[u8])], packed_len: usize) {
    let entries: Vec<(String, Entry<'_>)> = small
        .iter()
        .map(|(n, t)| (n.clone(), Entry::Data(t)))
        .chain(weights.iter().map(|(n, p)| (n.clone(), Entry::Packed(p, [packed_len, 1]))))
        .collect();
    safetensors::serialize_to_file(entries.iter().map(|(n, e)| (n.as_str(), e)), None, path).unwrap();
}

/// An engine shares one checkpoint and its layers across threads.
#[test]
fn checkpoints_and_layers_are_send_and_sync() {
    let _serial = serial();
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Checkpoint>();
    send_sync::<QuantLinear>();
    send_sync::<Bytes>();
}
