//! GGUF files: arbitrary bytes → `io::gguf::GgufFile::from_shared` under `common::limits()`, which must return
//! Ok or Err. A file that parses has version 2 or 3, a power-of-two alignment, and for every tensor: its info
//! found by name, aligned data of exactly the bytes its type and shape need, inside the buffer; `tensor_f32`
//! gives one value per element (F32/F16/BF16 always; other types Ok or `Unsupported`). The tokenizer, every
//! typed getter and every value's `Display` return without panicking.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use lowbit::format::ggml::GgmlType;
use lowbit::io::gguf::GgufFile;
use lowbit::Error;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_shared(Arc::new(data.to_vec()), common::limits()) else { return };
    assert!(matches!(f.version(), 2 | 3));
    assert!(f.alignment().is_power_of_two());
    for t in f.tensors() {
        assert_eq!(f.tensor_info(&t.name), Some(t));
        let bytes = f.tensor_data(&t.name).expect("a parsed tensor's data is in the buffer");
        assert_eq!(bytes.len(), t.len);
        assert_eq!(t.start % f.alignment(), 0);
        assert!(t.start + t.len <= data.len());
        let numel: usize = t.shape.iter().product();
        assert_eq!(t.ggml_type.bytes_for(numel).expect("whole blocks"), t.len);
        match f.tensor_f32(&t.name) {
            Ok(v) => assert_eq!(v.len(), numel),
            Err(Error::Unsupported { .. })
                if !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => {}
            Err(e) => panic!("tensor_f32 of parsed tensor `{}` ({}): {e}", t.name, t.ggml_type),
        }
    }
    if let Ok(tok) = f.tokenizer() {
        assert!(tok.token_types.is_empty() || tok.token_types.len() == tok.tokens.len());
        assert!(tok.scores.is_empty() || tok.scores.len() == tok.tokens.len());
    }
    for (k, v) in f.metadata() {
        let _ = v.to_string();
        let _ = (f.get_u64(k), f.get_i64(k), f.get_f64(k), f.get_str(k), f.get_bool(k));
    }
    let _ = format!("{f:?}");
});
