//! `lowbit::io::gguf::GgufFile`: round trips through the testkit writer (every metadata type, F32/F16/BF16
//! tensors, v2 and v3, alignments), the real SmolLM2 GGUF, and hostile files (every truncation, counts and
//! offsets past the end, huge dims, bad types, alignments, duplicates, versions) → errors with useful messages.

use lowbit::format::ggml::GgmlType;
use lowbit::io::gguf::{GgufFile, GgufValue, MAX_ARRAY_DEPTH};
use lowbit::io::Limits;
use lowbit::Error;
use lowbit_testkit::gguf::{f32_bytes, strings, GgufWriter, RawTensor};
use lowbit_testkit::{Rng, ScratchDir};
use std::sync::Arc;

fn parse(bytes: Vec<u8>) -> lowbit::Result<GgufFile> {
    GgufFile::from_shared(Arc::new(bytes), Limits::DEFAULT)
}

fn parse_err(bytes: Vec<u8>) -> String {
    match parse(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_err_contains(bytes: Vec<u8>, needle: &str) {
    let msg = parse_err(bytes);
    assert!(msg.contains(needle), "error {msg:?} does not contain {needle:?}");
}

/// One value of every GGUF type, plus nested and empty arrays and non-ASCII text.
fn every_value() -> Vec<(&'static str, GgufValue)> {
    use GgufValue::*;
    vec![
        ("t.u8", U8(0xfe)),
        ("t.i8", I8(-7)),
        ("t.u16", U16(0xbeef)),
        ("t.i16", I16(-12345)),
        ("t.u32", U32(0xdead_beef)),
        ("t.i32", I32(i32::MIN)),
        ("t.u64", U64(u64::MAX - 1)),
        ("t.i64", I64(i64::MIN + 3)),
        ("t.f32", F32(-0.1)),
        ("t.f64", F64(std::f64::consts::PI)),
        ("t.bool.true", Bool(true)),
        ("t.bool.false", Bool(false)),
        ("t.string", String("héllo, ☃ \u{0}".into())),
        ("t.string.empty", String(std::string::String::new())),
        ("t.array.i32", Array(vec![I32(1), I32(-2), I32(3)])),
        ("t.array.f64", Array(vec![F64(1.5), F64(f64::MAX)])),
        ("t.array.bool", Array(vec![Bool(true), Bool(false)])),
        ("t.array.string", strings(&["a", "", "ü b"])),
        ("t.array.nested", Array(vec![Array(vec![U8(1), U8(2)]), Array(vec![]), Array(vec![U8(3)])])),
        ("t.array.empty", Array(vec![])),
    ]
}

#[test]
fn every_metadata_type_round_trips_in_v2_and_v3_and_every_alignment() {
    for version in [2, 3] {
        for alignment in [None, Some(1), Some(8), Some(64), Some(4096)] {
            let mut w = GgufWriter::new().version(version);
            if let Some(a) = alignment {
                w = w.alignment(a);
            }
            for (k, v) in every_value() {
                w = w.kv(k, v);
            }
            let w = w.tensor("x", GgmlType::F32, &[3], f32_bytes(&[1.0, 2.0, 3.0]));
            let (bytes, layout) = w.to_bytes_with_layout();
            let f = parse(bytes).unwrap_or_else(|e| panic!("v{version} alignment {alignment:?}: {e}"));
            assert_eq!(f.version(), version);
            assert_eq!(f.alignment(), alignment.unwrap_or(32) as usize);
            for (k, v) in every_value() {
                assert_eq!(f.get(k), Some(&v), "{k}");
            }
            let extra = usize::from(alignment.is_some());
            assert_eq!(f.metadata().len(), every_value().len() + extra);
            assert_eq!(f.tensors()[0].start, layout.tensor_starts[0]);
            assert_eq!(f.tensors()[0].start % f.alignment(), 0);
            assert_eq!(f.tensor_f32("x").unwrap(), [1.0, 2.0, 3.0]);
        }
    }
}

#[test]
fn accessors_and_typed_getters() {
    let mut w = GgufWriter::new();
    for (k, v) in every_value() {
        w = w.kv(k, v);
    }
    let f = parse(w.to_bytes()).unwrap();
    assert_eq!(f.get_u64("t.u32").unwrap(), Some(0xdead_beef));
    assert_eq!(f.get_i64("t.i32").unwrap(), Some(i32::MIN as i64));
    assert_eq!(f.get_f64("t.f32").unwrap(), Some(f64::from(-0.1f32)));
    assert_eq!(f.get_str("t.string").unwrap(), Some("héllo, ☃ \u{0}"));
    assert_eq!(f.get_bool("t.bool.true").unwrap(), Some(true));
    assert_eq!(f.get_u64("absent").unwrap(), None);
    let e = f.get_u64("t.i8").unwrap_err().to_string();
    assert!(e.contains("`t.i8`") && e.contains("i8") && e.contains("non-negative integer"), "{e}");
    let e = f.get_str("t.array.string").unwrap_err().to_string();
    assert!(e.contains("`t.array.string`") && e.contains("array of string"), "{e}");
    assert_eq!(f.get("t.array.string").and_then(GgufValue::as_array).map(<[_]>::len), Some(3));
    assert_eq!(f.architecture(), None);
    let dbg = format!("{f:?}");
    assert!(dbg.contains("<memory>") && dbg.contains("version: 3") && dbg.len() < 300, "{dbg}");
}

#[test]
fn float_tensors_round_trip() {
    let mut rng = Rng::new(13);
    let a = rng.normal_vec(5 * 7, 2.0);
    let mut b = rng.normal_vec(3 * 4 * 2, 1.0);
    b[0] = f32::INFINITY;
    b[1] = -0.0;
    b[2] = 6.1e-5; // an f16 subnormal after rounding
    let c = rng.normal_vec(9, 1e30);
    let b16: Vec<half::f16> = b.iter().map(|&v| half::f16::from_f32(v)).collect();
    let c16: Vec<half::bf16> = c.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let bytes = GgufWriter::new()
        .tensor("a", GgmlType::F32, &[5, 7], f32_bytes(&a))
        .tensor("b", GgmlType::F16, &[3, 4, 2], b16.iter().flat_map(|v| v.to_le_bytes()).collect())
        .tensor("c", GgmlType::BF16, &[9], c16.iter().flat_map(|v| v.to_le_bytes()).collect())
        .tensor("scalar", GgmlType::F32, &[], f32_bytes(&[42.0]))
        .tensor("empty", GgmlType::F32, &[0, 4], Vec::new())
        .tensor("nan", GgmlType::F16, &[2], vec![0x01, 0x7c, 0x00, 0xfe])
        .to_bytes();
    let f = parse(bytes).unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "scalar", "empty", "nan"], "file order");
    // NaN payloads as numpy widens them (a signalling NaN stays signalling).
    let nan: Vec<u32> = f.tensor_f32("nan").unwrap().iter().map(|v| v.to_bits()).collect();
    assert_eq!(nan, [0x7f80_2000, 0xffc0_0000]);
    let info = f.tensor_info("b").unwrap();
    assert_eq!((info.shape.as_slice(), info.ggml_type, info.len), (&[3, 4, 2][..], GgmlType::F16, 48));
    assert_eq!(f.tensor_f32("a").unwrap(), a);
    assert_eq!(f.tensor_data("a").unwrap(), f32_bytes(&a).as_slice());
    let want_b: Vec<u32> = b16.iter().map(|v| v.to_f32().to_bits()).collect();
    let got_b: Vec<u32> = f.tensor_f32("b").unwrap().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got_b, want_b);
    let want_c: Vec<f32> = c16.iter().map(|v| v.to_f32()).collect();
    assert_eq!(f.tensor_f32("c").unwrap(), want_c);
    assert_eq!(f.tensor_info("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f.tensor_f32("scalar").unwrap(), [42.0]);
    assert_eq!(f.tensor_info("empty").unwrap().shape, [0, 4]);
    assert_eq!(f.tensor_f32("empty").unwrap(), Vec::<f32>::new());
    let e = f.tensor_f32("nope").unwrap_err().to_string();
    assert!(e.contains("no tensor `nope`"), "{e}");
    assert!(f.tensor_data("nope").is_err());
}

#[test]
fn quantized_and_undecodable_types_parse_and_name_their_type() {
    let q4k = vec![0u8; 2 * 144];
    let iq = vec![0u8; 3 * 66];
    let f = parse(
        GgufWriter::new()
            .tensor("q", GgmlType::Q4_K, &[2, 256], q4k.clone())
            .tensor("iq", GgmlType::IQ2_XXS, &[3, 256], iq)
            .tensor("mx", GgmlType::MXFP4, &[1, 64], vec![0u8; 34])
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(f.tensor_info("q").unwrap().len, 288);
    assert_eq!(f.tensor_data("q").unwrap(), q4k.as_slice());
    for (name, ty) in [("iq", "IQ2_XXS"), ("mx", "MXFP4")] {
        match f.tensor_f32(name) {
            Err(Error::Unsupported { what }) => assert!(what.contains(ty) && what.contains(name), "{what}"),
            other => panic!("{name}: expected Unsupported naming {ty}, got {other:?}"),
        }
    }
}

#[test]
fn tensor_f32_respects_limits() {
    let bytes = GgufWriter::new().tensor("w", GgmlType::F16, &[64, 64], vec![0u8; 64 * 64 * 2]).to_bytes();
    // Stored 8 KiB, 16 KiB as f32: a limit between the two refuses it at parse time.
    let limits = Limits { max_tensor_bytes: 12 << 10, ..Limits::DEFAULT };
    let e = GgufFile::from_shared(Arc::new(bytes.clone()), limits).unwrap_err().to_string();
    assert!(e.contains("tensor `w`") && e.contains("max_tensor_bytes"), "{e}");
    let ok = Limits { max_tensor_bytes: 16 << 10, ..Limits::DEFAULT };
    assert_eq!(GgufFile::from_shared(Arc::new(bytes), ok).unwrap().tensor_f32("w").unwrap().len(), 4096);
}

fn tokenizer_file(extra: &[(&str, GgufValue)]) -> GgufWriter {
    let mut w = GgufWriter::new()
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strings(&["<s>", "a", "b", "ab"]))
        .kv("tokenizer.ggml.merges", strings(&["a b"]))
        .kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(vec![GgufValue::I32(3), GgufValue::I32(1), GgufValue::I32(1), GgufValue::I32(1)]),
        )
        .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(0))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0))
        .kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))
        .kv("tokenizer.chat_template", GgufValue::String("{{ messages }}".into()));
    for (k, v) in extra {
        w = w.kv(k, v.clone());
    }
    w
}

#[test]
fn tokenizer_metadata() {
    let t = parse(tokenizer_file(&[]).to_bytes()).unwrap().tokenizer().unwrap();
    assert_eq!(t.model, "gpt2");
    assert_eq!(t.pre.as_deref(), Some("smollm"));
    assert_eq!(t.tokens, ["<s>", "a", "b", "ab"]);
    assert_eq!(t.merges, ["a b"]);
    assert_eq!(t.token_types, [3, 1, 1, 1]);
    assert!(t.scores.is_empty());
    assert_eq!((t.bos_id, t.eos_id, t.unk_id, t.pad_id), (Some(0), Some(0), None, None));
    assert_eq!(t.add_bos, Some(false));
    assert_eq!(t.chat_template.as_deref(), Some("{{ messages }}"));

    let e = parse(GgufWriter::new().to_bytes()).unwrap().tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.model") && e.contains("missing"), "{e}");
    // Wrong types and lengths: a Format error naming the key.
    let cases: [(&str, GgufValue); 4] = [
        ("tokenizer.ggml.unknown_token_id", GgufValue::String("0".into())),
        ("tokenizer.ggml.scores", GgufValue::Array(vec![GgufValue::F32(0.0)])),
        ("tokenizer.ggml.padding_token_id", GgufValue::I64(-1)),
        ("tokenizer.ggml.merges", GgufValue::Array(vec![GgufValue::U8(1)])),
    ];
    for (key, v) in cases {
        let mut w = tokenizer_file(&[]);
        if key == "tokenizer.ggml.merges" {
            w = GgufWriter::new()
                .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
                .kv("tokenizer.ggml.tokens", strings(&["a"]));
        }
        let f = parse(w.kv(key, v).to_bytes()).unwrap();
        match f.tokenizer() {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains(key), "{key}: {e}"),
            other => panic!("{key}: expected a Format error, got {other:?}"),
        }
    }
}

/// A small valid file whose last tensor ends the file (no trailing padding), so that every strict prefix is
/// invalid.
fn small_file() -> (Vec<u8>, lowbit_testkit::gguf::Layout) {
    GgufWriter::new()
        .version(3)
        .alignment(16)
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("a", GgufValue::Array(vec![GgufValue::U16(1), GgufValue::U16(2)]))
        .kv("n", GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::Bool(true)])]))
        .tensor("t0", GgmlType::F16, &[3], vec![1, 2, 3, 4, 5, 6])
        .tensor("t1", GgmlType::Q8_0, &[1, 32], vec![7u8; 34])
        .tensor("t2", GgmlType::F32, &[2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))
        .to_bytes_with_layout()
}

#[test]
fn every_truncation_is_an_error() {
    let (bytes, layout) = small_file();
    assert_eq!(layout.len, bytes.len());
    assert_eq!(*layout.tensor_starts.last().unwrap() + 16, bytes.len(), "the last tensor ends the file");
    parse(bytes.clone()).expect("the whole file parses");
    for n in 0..bytes.len() {
        match parse(bytes[..n].to_vec()) {
            Err(Error::Format { .. }) => {}
            other => panic!("prefix of {n} bytes: expected a Format error, got {other:?}"),
        }
    }
    // Cut at each section: the message says what was being read.
    let at = |n: usize| parse_err(bytes[..n].to_vec());
    assert!(at(2).contains("magic"), "{}", at(2));
    assert!(at(6).contains("version"), "{}", at(6));
    assert!(at(layout.kv_starts[3] + 3).contains("metadata key #3"), "{}", at(layout.kv_starts[3] + 3));
    assert!(at(layout.info_starts[0]).contains("declares 3 tensors"), "{}", at(layout.info_starts[0]));
    assert!(at(layout.tensor_starts[2] + 1).contains("tensor `t2`"), "{}", at(layout.tensor_starts[2] + 1));
    assert!(at(layout.tensor_starts[2] + 1).contains("past the end"), "{}", at(layout.tensor_starts[2] + 1));
}

#[test]
fn header_errors_name_the_problem() {
    let (good, _) = small_file();
    let patch = |at: usize, b: &[u8]| {
        let mut v = good.clone();
        v[at..at + b.len()].copy_from_slice(b);
        v
    };
    assert_err_contains(patch(0, b"GGML"), "expected the GGUF magic");
    assert_err_contains(patch(4, &1u32.to_le_bytes()), "version 1");
    assert_err_contains(patch(4, &4u32.to_le_bytes()), "version 4");
    assert_err_contains(patch(4, &3u32.to_be_bytes()), "big-endian");
    assert_err_contains(patch(8, &u64::MAX.to_le_bytes()), "declares 18446744073709551615 tensors");
    assert_err_contains(patch(16, &(1u64 << 40).to_le_bytes()), "declares 1099511627776 metadata key/values");
    assert_err_contains(Vec::new(), "magic");
}

#[test]
fn metadata_errors() {
    let base = || GgufWriter::new();
    let dup = base().kv("k", GgufValue::U8(1)).kv("k", GgufValue::U8(2)).to_bytes();
    assert_err_contains(dup, "metadata key `k` appears twice");
    // A string declaring more bytes than the file holds.
    let mut payload = (1u64 << 50).to_le_bytes().to_vec();
    payload.extend_from_slice(b"abc");
    assert_err_contains(base().kv_raw("s", 8, payload).to_bytes(), "declares 1125899906842624 bytes");
    // An array of 2^60 u64: refused from its count, before allocating.
    let mut payload = 10u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert_err_contains(base().kv_raw("a", 9, payload).to_bytes(), "1152921504606846976 declared");
    assert_err_contains(base().kv_raw("x", 13, vec![0; 8]).to_bytes(), "value type id 13");
    let mut payload = 42u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u64.to_le_bytes());
    assert_err_contains(base().kv_raw("x", 9, payload).to_bytes(), "array of value type id 42");
    assert_err_contains(base().kv_raw("b", 7, vec![2]).to_bytes(), "bool of byte 2");
    // Invalid UTF-8 in a key.
    let mut bytes = base().kv("k\u{e9}", GgufValue::U8(0)).to_bytes();
    let at = bytes.windows(2).position(|w| w == "\u{e9}".as_bytes()).unwrap();
    bytes[at] = 0xff;
    assert_err_contains(bytes, "not valid UTF-8");
    // Nesting: MAX_ARRAY_DEPTH levels parse, one more is refused.
    let nest =
        |depth: usize| (1..depth).fold(GgufValue::Array(vec![GgufValue::U8(1)]), |v, _| GgufValue::Array(vec![v]));
    parse(base().kv("deep", nest(MAX_ARRAY_DEPTH)).to_bytes()).expect("MAX_ARRAY_DEPTH levels");
    assert_err_contains(base().kv("deep", nest(MAX_ARRAY_DEPTH + 1)).to_bytes(), "nests arrays deeper");
    // Alignment: a u32 power of two.
    for (v, what) in [(GgufValue::U32(0), "u32 0"), (GgufValue::U32(48), "u32 48"), (GgufValue::U64(32), "u64")] {
        let msg = parse_err(base().kv("general.alignment", v).to_bytes());
        assert!(msg.contains("general.alignment") && msg.contains(what) && msg.contains("power of two"), "{msg}");
    }
}

fn raw(name: &str, type_id: u32, ne: &[u64], offset: Option<u64>, data: Vec<u8>) -> RawTensor {
    RawTensor { name: name.into(), type_id, ne: ne.to_vec(), offset, data }
}

#[test]
fn tensor_info_errors() {
    let one = |t: RawTensor| GgufWriter::new().raw_tensor(t).to_bytes();
    assert_err_contains(
        one(raw("x", 77, &[4], None, vec![0; 16])),
        "tensor `x` has ggml type id 77, which ggml does not define",
    );
    assert_err_contains(one(raw("x", 4, &[4], None, vec![0; 16])), "type id 4");
    assert_err_contains(
        one(raw("x", 0, &[1, 1, 1, 1, 1], None, vec![0; 4])),
        "n_dims 5, more than ggml's GGML_MAX_DIMS = 4",
    );
    assert_err_contains(one(raw("x", 0, &[4], Some(1 << 40), vec![0; 16])), "past the end of the file");
    assert_err_contains(one(raw("x", 0, &[4], Some(u64::MAX - 31), vec![0; 16])), "past the end of the file");
    assert_err_contains(one(raw("x", 0, &[4], Some(4), vec![0; 32])), "not a multiple of the alignment 32");
    assert_err_contains(one(raw("x", 0, &[u64::MAX], None, vec![])), "exceeds ggml's int64 range");
    assert_err_contains(one(raw("x", 0, &[1 << 32, 1 << 32, 1 << 32], None, vec![])), "overflows");
    assert_err_contains(one(raw("x", 0, &[1 << 40, 1 << 10], None, vec![])), "max_tensor_bytes");
    // A zero extent does not hide the others: ggml's strides are their product (a fuzz find).
    assert_err_contains(one(raw("x", 0, &[0, 1 << 32, 1 << 32, 1 << 32], None, vec![])), "overflows");
    assert_err_contains(one(raw("x", 0, &[1 << 32, 1 << 32, 1 << 32, 0], None, vec![])), "overflows");
    assert_err_contains(one(raw("x", 0, &[1 << 20], None, vec![])), "past the end");
    assert_err_contains(one(raw("x", 2, &[33, 2], None, vec![0; 72])), "not whole Q4_0 blocks of 32");
    let two = GgufWriter::new()
        .raw_tensor(raw("x", 0, &[8], None, vec![0; 32]))
        .raw_tensor(raw("x", 0, &[8], None, vec![0; 32]))
        .to_bytes();
    assert_err_contains(two, "tensor `x` appears twice");
    let overlap = GgufWriter::new()
        .raw_tensor(raw("x", 0, &[16], None, vec![0; 64]))
        .raw_tensor(raw("y", 0, &[8], Some(32), vec![0; 32]))
        .to_bytes();
    assert_err_contains(overlap, "overlap");
    // Zero-size tensors at the same offset do not overlap anything.
    let empties = GgufWriter::new()
        .raw_tensor(raw("x", 0, &[0], Some(0), vec![]))
        .raw_tensor(raw("y", 0, &[8], Some(0), vec![0; 32]))
        .to_bytes();
    parse(empties).unwrap();
}

#[test]
fn open_refuses_what_is_not_a_regular_file() {
    let dir = ScratchDir::new("gguf-open");
    let e = GgufFile::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("is a directory, expected a GGUF file"), "{e}");
    let missing = dir.path().join("missing.gguf");
    assert!(matches!(GgufFile::open(&missing), Err(Error::Io { .. })));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(GgufFile::open(&empty).unwrap_err().to_string().contains("magic"));
    let good = dir.path().join("small.gguf");
    std::fs::write(&good, small_file().0).unwrap();
    let f = GgufFile::open(&good).unwrap();
    assert_eq!(f.path(), good);
    assert_eq!(f.tensor_f32("t2").unwrap(), [1.0, 2.0, 3.0, 4.0]);
    #[cfg(unix)]
    {
        let e = GgufFile::open("/dev/null").unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
        let fifo = dir.path().join("fifo.gguf");
        match std::process::Command::new("mkfifo").arg(&fifo).status() {
            Ok(s) if s.success() => {
                // Opening a FIFO for reading would block forever: refused by type first.
                let e = GgufFile::open(&fifo).unwrap_err().to_string();
                assert!(e.contains("FIFO"), "{e}");
            }
            _ => eprintln!("skipped: the FIFO case (mkfifo unavailable)"),
        }
    }
}

#[test]
fn smollm2_gguf_parses() {
    let Some(path) = lowbit_testkit::model::smollm2_gguf("smollm2_gguf_parses") else { return };
    let t = std::time::Instant::now();
    let f = GgufFile::open(&path).unwrap();
    let parse_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count").unwrap(), Some(30));
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), Some(9));
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), Some(3));
    let tok = f.tokenizer().unwrap();
    assert_eq!(tok.model, "gpt2");
    assert_eq!(tok.tokens.len(), 49152);
    assert!(!tok.merges.is_empty() && tok.chat_template.is_some());
    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!((emb.shape.as_slice(), emb.ggml_type), (&[49152, 576][..], GgmlType::Q8_0));
    let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.shape.as_slice(), q.ggml_type), (&[576, 576][..], GgmlType::Q4_1));
    let norm = f.tensor_f32("output_norm.weight").unwrap();
    assert_eq!(norm.len(), 576);
    assert!(norm.iter().all(|v| v.is_finite()));
    let stored: usize = f.tensors().iter().map(|t| t.len).sum();
    assert!(stored <= f.bytes().as_ref().as_ref().len());
    eprintln!("SmolLM2 GGUF: {} tensors, {stored} bytes of data, parsed in {parse_ms:.1} ms", f.tensors().len());
}

/// The committed seeds of the `gguf_load` fuzz target (`fuzz/seeds/gguf_load/`), built by the writer.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut every = GgufWriter::new().version(2).alignment(8);
    for (k, v) in every_value() {
        every = every.kv(k, v);
    }
    let every = every.tensor("x", GgmlType::BF16, &[2, 2], vec![0x80, 0x3f, 0, 0xc0, 0, 0, 0x80, 0x7f]);
    let quant = GgufWriter::new()
        .tensor("q4k", GgmlType::Q4_K, &[1, 256], (0..144u32).map(|i| (i * 37 % 251) as u8).collect())
        .tensor("iq", GgmlType::IQ4_NL, &[2, 32], vec![0x11; 36])
        .tensor("scalar", GgmlType::F32, &[], f32_bytes(&[-1.5]))
        .tensor("empty", GgmlType::Q8_0, &[0, 32], Vec::new());
    vec![
        ("small.gguf", small_file().0),
        ("tokenizer.gguf", tokenizer_file(&[]).tensor("t", GgmlType::F16, &[2], vec![0, 0x3c, 0, 0xbc]).to_bytes()),
        ("every_value_v2.gguf", every.to_bytes()),
        ("quantized.gguf", quant.to_bytes()),
    ]
}

/// The committed seeds parse and equal what the writer makes today (regenerate with
/// `LOWBIT_WRITE_FUZZ_SEEDS=1 cargo test -p lowbit --test gguf_file fuzz_seeds`).
#[test]
fn fuzz_seeds_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf_load");
    let write = std::env::var("LOWBIT_WRITE_FUZZ_SEEDS").is_ok_and(|v| v == "1");
    for (name, bytes) in fuzz_seeds() {
        parse(bytes.clone()).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(committed == bytes, "{} is stale: regenerate it (see this test's doc)", path.display());
    }
}
