//! `lowbit_llm::Tokenizer`: against transformers' ids and text for the SmolLM2 GGUF (fixture
//! `data/tokenizer_transformers.json`, written by `data/gen_tokenizer_reference.py`; skipped without the
//! model), and on tiny vocabularies built here (always run).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lowbit::io::gguf::{GgufFile, GgufTokenizer};
use lowbit_llm::{Error, Tokenizer};
use serde_json::Value;

const FIXTURE: &str = include_str!("data/tokenizer_transformers.json");
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn fixture() -> Value {
    let v: Value = serde_json::from_str(FIXTURE).expect("fixture is JSON");
    assert_eq!(v["gguf_sha256"], SMOLLM2_SHA256);
    v
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("an id array").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// The SmolLM2 tokenizer, built once for all tests here (or `None`: the model is absent).
fn smollm2(test: &str) -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let path = lowbit_testkit::model::smollm2_gguf(test)?;
    TOK.get_or_init(|| {
        let gguf = GgufFile::open(&path).expect("open the SmolLM2 GGUF");
        Some(Tokenizer::from_gguf(&gguf.tokenizer().expect("GGUF tokenizer")).expect("build the tokenizer"))
    })
    .as_ref()
}

#[test]
fn smollm2_matches_transformers() {
    let Some(tok) = smollm2("smollm2_matches_transformers") else { return };
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(plain, ids_of(&case["ids"]), "ids of {text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids_of(&case["ids_add_special"]), "ids (add_special) of {text:?}");
        assert_eq!(tok.decode(&plain, false).unwrap(), case["decode"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(
            tok.decode(&plain, true).unwrap(),
            case["decode_skip_special"].as_str().unwrap(),
            "decode (skip special) of {text:?}"
        );
    }
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_id().map(u64::from), fx["bos_id"].as_u64());
    let eos = tok.eos_ids();
    assert_eq!(u64::from(eos[0]), fx["eos_id"].as_u64().unwrap());
    assert!(eos.contains(&(fx["im_end_id"].as_u64().unwrap() as u32)));
    assert!(eos.contains(&(fx["endoftext_id"].as_u64().unwrap() as u32)));
    assert_eq!(tok.token_to_id("<|im_end|>").map(u64::from), fx["im_end_id"].as_u64());
    assert!(tok.has_chat_template());
}

#[test]
fn smollm2_france_and_chat_prompt() {
    let Some(tok) = smollm2("smollm2_france_and_chat_prompt") else { return };
    assert_eq!(tok.encode("The capital of France is", false).unwrap(), [504, 3575, 282, 4649, 314]);
    // SmolLM2 adds no BOS.
    assert_eq!(tok.encode("The capital of France is", true).unwrap(), [504, 3575, 282, 4649, 314]);

    let prompt = Tokenizer::chat_prompt(&[("system", "Be brief."), ("user", "hi")]);
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, true).unwrap();
    let (start, end) = (tok.token_to_id("<|im_start|>").unwrap(), tok.token_to_id("<|im_end|>").unwrap());
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == end).count(), 2);
    assert_eq!(ids[0], start);
    assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
    // The ChatML prompt as the fixture recorded it.
    let fx = fixture();
    let chat = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().ends_with("<|im_start|>assistant\n"))
        .expect("a ChatML case");
    let messages = [("system", "You are a helpful assistant."), ("user", "What is the capital of France?")];
    assert_eq!(Tokenizer::chat_prompt(&messages), chat["text"].as_str().unwrap());
    assert_eq!(tok.encode(&Tokenizer::chat_prompt(&messages), false).unwrap(), ids_of(&chat["ids"]));
}

#[test]
fn smollm2_stream_concatenates_to_decode() {
    let Some(tok) = smollm2("smollm2_stream_concatenates_to_decode") else { return };
    let fx = fixture();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = ids_of(&case["ids"]);
        let mut stream = tok.stream();
        let mut out = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: a piece with a partial character: {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&stream.finish().unwrap());
        assert_eq!(out, case["decode_skip_special"].as_str().unwrap(), "stream of {text:?}");
        checked += usize::from(!text.is_ascii());
    }
    assert!(checked >= 5, "unicode cases streamed: {checked}");
}

#[test]
fn smollm2_for_model_and_errors() {
    let Some(tok) = smollm2("smollm2_for_model_and_errors") else { return };
    let path = lowbit_testkit::model::smollm2_gguf("smollm2_for_model_and_errors").unwrap();
    let via_path = Tokenizer::for_model(&path).unwrap();
    assert_eq!(via_path.vocab_size(), tok.vocab_size());
    assert_eq!(via_path.encode("日本語 text", true).unwrap(), tok.encode("日本語 text", true).unwrap());
    let n = tok.vocab_size() as u32;
    assert!(matches!(tok.decode(&[1, n], false), Err(Error::Invalid(m)) if m.contains(&n.to_string())));
    assert!(matches!(tok.stream().push(n), Err(Error::Invalid(_))));
}

/// GPT-2's `bytes_to_unicode`.
fn byte_chars() -> Vec<char> {
    let mut out = Vec::new();
    let mut n = 0;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out.push(if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        });
    }
    out
}

/// A byte-level vocabulary: 3 control tokens, the 256 byte tokens, a user-defined `<think>`, merged tokens.
fn tiny() -> GgufTokenizer {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    let mut token_types = vec![3, 3, 3];
    tokens.extend(byte_chars().into_iter().map(String::from));
    token_types.extend([1; 256]);
    tokens.push("<think>".into());
    token_types.push(4);
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ã ©"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        token_types.push(1);
    }
    GgufTokenizer {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        merges: merges.map(String::from).to_vec(),
        token_types,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: Some(false),
        ..GgufTokenizer::default()
    }
}

#[test]
fn tiny_gguf_round_trip() {
    let g = tiny();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let id = |t: &str| g.tokens.iter().position(|x| x == t).unwrap() as u32;
    assert_eq!(tok.vocab_size(), g.tokens.len());
    assert_eq!(tok.encode("hello world", true).unwrap(), [id("hello"), id("Ġworld")]);
    assert_eq!(tok.encode("<|im_start|>hello<|im_end|>", false).unwrap(), [1, id("hello"), 2]);
    assert_eq!(tok.encode("<think>", false).unwrap(), [id("<think>")]);
    assert_eq!(tok.encode("é", false).unwrap(), [id("Ã©")]);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), [2, 0]);
    assert_eq!(tok.token_to_id("Ġworld"), Some(id("Ġworld")));
    assert!(!tok.has_chat_template());
    for text in ["hello world", "héllo <think> wörld 日本 😀\n\t  x", "<|im_start|>user\nhi<|im_end|>\n", ""] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let mut stream = tok.stream();
        let mut out = String::new();
        for &i in &ids {
            out.push_str(&stream.push(i).unwrap());
        }
        out.push_str(&stream.finish().unwrap());
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }
    assert_eq!(tok.decode(&tok.encode("<|im_start|>hi<|im_end|>", false).unwrap(), true).unwrap(), "hi");
    // A character cut between byte tokens: held back, then emitted whole; an incomplete tail at finish.
    let emoji = tok.encode("😀", false).unwrap();
    assert_eq!(emoji.len(), 4);
    let mut stream = tok.stream();
    let pieces: Vec<String> = emoji.iter().map(|&i| stream.push(i).unwrap()).collect();
    assert_eq!(pieces, ["", "", "", "😀"]);
    let mut stream = tok.stream();
    assert_eq!(stream.push(emoji[0]).unwrap(), "");
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");

    // add_bos: BOS first with add_special only.
    let with_bos = Tokenizer::from_gguf(&GgufTokenizer { add_bos: Some(true), ..tiny() }).unwrap();
    assert_eq!(with_bos.encode("hello", true).unwrap(), [1, id("hello")]);
    assert_eq!(with_bos.encode("hello", false).unwrap(), [id("hello")]);
    // Llama 3's split (llama-bpe) and Qwen2's build too, and agree on plain text here.
    for pre in ["llama-bpe", "qwen2", "gpt-2", "default"] {
        let t = Tokenizer::from_gguf(&GgufTokenizer { pre: Some(pre.into()), ..tiny() }).unwrap();
        assert_eq!(t.encode("hello world", false).unwrap(), [id("hello"), id("Ġworld")], "{pre}");
    }
}

#[test]
fn tiny_gguf_errors() {
    let llama = GgufTokenizer { model: "llama".into(), ..tiny() };
    let err = Tokenizer::from_gguf(&llama).unwrap_err();
    assert!(matches!(&err, Error::Tokenizer(m) if m.contains("`llama`") && m.contains("not supported")), "{err}");

    let bad_merge = GgufTokenizer { merges: vec!["h e".into(), "he zz".into()], ..tiny() };
    let err = Tokenizer::from_gguf(&bad_merge).unwrap_err();
    assert!(matches!(&err, Error::Tokenizer(m) if m.contains("zz")), "{err}");
    let no_result = GgufTokenizer { merges: vec!["q z".into()], ..tiny() };
    assert!(matches!(Tokenizer::from_gguf(&no_result), Err(Error::Tokenizer(_))));
    let three = GgufTokenizer { merges: vec!["h e l".into()], ..tiny() };
    assert!(matches!(Tokenizer::from_gguf(&three), Err(Error::Tokenizer(m)) if m.contains("two tokens")));
    let bos_out = GgufTokenizer { bos_id: Some(100_000), ..tiny() };
    assert!(matches!(Tokenizer::from_gguf(&bos_out), Err(Error::Tokenizer(m)) if m.contains("100000")));

    let tok = Tokenizer::from_gguf(&tiny()).unwrap();
    let n = tok.vocab_size() as u32;
    let err = tok.decode(&[5, n, 6], false).unwrap_err();
    assert!(matches!(&err, Error::Invalid(m) if m.contains(&format!("token id {n}"))), "{err}");
    assert!(matches!(tok.decode(&[u32::MAX], true), Err(Error::Invalid(_))));
}

/// A scratch directory for this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowbit-llm-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A minimal `tokenizer.json`: word-level-ish BPE over a few tokens, no post-processor.
const TOKENIZER_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "Ġ": 4, "ab": 5, "Ġab": 6},
            "merges": [["a", "b"], ["Ġ", "ab"]]}
}"#;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn tokenizer_json_with_config() {
    let dir = scratch("json");
    write(&dir.join("tokenizer.json"), TOKENIZER_JSON);
    write(
        &dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": {"content": "<s>"}, "chat_template": "{{ x }}"}"#,
    );
    write(&dir.join("special_tokens_map.json"), r#"{"eos_token": "</s>"}"#);
    write(&dir.join("config.json"), "{}");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.encode("ab ab", true).unwrap(), [0, 5, 6]);
    assert_eq!(tok.encode("ab ab", false).unwrap(), [5, 6]);
    assert_eq!(tok.decode(&[0, 5, 6, 1], true).unwrap(), "ab ab");
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_ids(), [1]);
    assert_eq!(tok.vocab_size(), 7);
    assert!(tok.has_chat_template());
    for path in [dir.clone(), dir.join("config.json"), dir.join("tokenizer.json")] {
        let t = Tokenizer::for_model(&path).unwrap();
        assert_eq!(t.encode("ab ab", true).unwrap(), [0, 5, 6], "{}", path.display());
    }
    assert!(matches!(tok.decode(&[7], false), Err(Error::Invalid(_))));

    // Errors: a directory without tokenizer.json, a missing path, a broken tokenizer.json, an unknown BOS.
    let empty = scratch("empty");
    assert!(matches!(Tokenizer::for_model(&empty), Err(Error::Tokenizer(m)) if m.contains("tokenizer.json")));
    assert!(matches!(Tokenizer::for_model(&empty.join("nope")), Err(Error::Tokenizer(_))));
    write(&empty.join("tokenizer.json"), "{ not json");
    assert!(matches!(Tokenizer::from_file(&empty.join("tokenizer.json")), Err(Error::Tokenizer(_))));
    write(&dir.join("tokenizer_config.json"), r#"{"bos_token": "<missing>"}"#);
    let err = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap_err();
    assert!(matches!(&err, Error::Tokenizer(m) if m.contains("<missing>")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}
