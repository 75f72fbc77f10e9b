//! A GGUF read on demand (`GgufFile::from_reader`: the header in memory, tensor data read through a
//! callback, as a browser page keeps a model file outside its WASM heap): every tensor decodes to the bits of
//! the in-memory file's, only the bytes asked for are read, and short prefixes, failed and short reads are
//! errors.

use lowbit::io::gguf::{GgufFile, ReadAt};
use lowbit::io::{Checkpoint, Limits};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn tiny() -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf")).unwrap()
}

/// A tiny GGUF with a header of `meta` bytes of padding metadata: larger than the first prefix read.
fn with_big_header(meta: usize) -> Vec<u8> {
    use lowbit::format::ggml::GgmlType;
    use lowbit::io::gguf::GgufValue;
    use lowbit_testkit::gguf::{f32_bytes, GgufWriter};
    GgufWriter::new()
        .kv("general.padding", GgufValue::String("x".repeat(meta)))
        .tensor("t", GgmlType::F32, &[3, 5], f32_bytes(&(0..15).map(|i| i as f32).collect::<Vec<_>>()))
        .to_bytes()
}

#[test]
fn tensors_read_on_demand_equal_the_in_memory_file() {
    let file = Arc::new(tiny());
    let read = Arc::new(AtomicUsize::new(0));
    let (f2, r2) = (file.clone(), read.clone());
    let read_at: ReadAt = Arc::new(move |off, len| {
        r2.fetch_add(len, Ordering::Relaxed);
        f2.get(off..off + len).map(<[u8]>::to_vec).ok_or_else(|| "past the end".to_string())
    });
    let whole = Checkpoint::from_shared(file.clone(), Limits::DEFAULT).unwrap();
    // A first read of 256 bytes (doubled until the header parses) leaves the tensors outside the prefix.
    let lazy = GgufFile::from_reader_with(file.len(), 256, read_at, Limits::DEFAULT).unwrap();
    assert!(lazy.bytes().as_ref().as_ref().len() < file.len() / 2);
    let lazy = Checkpoint::from_gguf(lazy, Limits::DEFAULT).unwrap();
    assert_eq!(lazy.tensor_names(), whole.tensor_names());
    assert_eq!(lazy.config(), whole.config());
    let mut decoded = 0;
    for name in whole.tensor_names() {
        let (a, b) = (whole.tensor_f32(name).unwrap(), lazy.tensor_f32(name).unwrap());
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        decoded += 1;
    }
    assert!(decoded >= 12);
    // Reading a tensor's rows reads only their bytes (a tensor whose data lie past the header's bytes).
    let g = lazy.gguf().unwrap();
    let map = lazy.gguf_mapping().unwrap();
    let prefix = g.bytes().as_ref().as_ref().len();
    let t = map
        .tensors()
        .values()
        .filter(|t| t.shape.len() == 2 && t.unpermute_heads.is_none())
        .max_by_key(|t| g.tensor_info(&t.gguf_name).unwrap().start)
        .unwrap();
    let info = g.tensor_info(&t.gguf_name).unwrap().clone();
    assert!(info.start >= prefix, "{} starts at {} inside the {prefix}-byte prefix", t.hf_name, info.start);
    let row_bytes = info.len / info.shape[0];
    let before = read.load(Ordering::Relaxed);
    let rows = lazy.tensor_rows_f32(&t.hf_name, 1..3).unwrap();
    assert_eq!(read.load(Ordering::Relaxed) - before, 2 * row_bytes);
    assert_eq!(rows, whole.tensor_rows_f32(&t.hf_name, 1..3).unwrap());
    // Views of data read on demand are refused with a message.
    let e = g.tensor_data(&t.gguf_name).unwrap_err();
    assert!(e.to_string().contains("not in memory"), "{e}");
}

#[test]
fn a_header_longer_than_the_first_prefix_is_read_whole() {
    let file = Arc::new(with_big_header(3 << 20));
    let reads = Arc::new(AtomicUsize::new(0));
    let (f2, r2) = (file.clone(), reads.clone());
    let read_at: ReadAt = Arc::new(move |off, len| {
        r2.fetch_add(1, Ordering::Relaxed);
        Ok(f2[off..off + len].to_vec())
    });
    let g = GgufFile::from_reader(file.len(), read_at, Limits::DEFAULT).unwrap();
    assert_eq!(reads.load(Ordering::Relaxed), 3, "1, 2 and 4 MiB prefixes (the file is {} bytes)", file.len());
    assert_eq!(g.tensor_f32("t").unwrap(), (0..15).map(|i| i as f32).collect::<Vec<_>>());
    // The tensor lies inside the 4 MiB prefix: served from memory.
    assert!(g.tensor_data("t").is_ok());
}

#[test]
fn short_prefixes_and_bad_reads_are_errors() {
    let file = Arc::new(tiny());
    let f2 = file.clone();
    let good: ReadAt = Arc::new(move |off, len| Ok(f2[off..off + len].to_vec()));
    // A file length past the real end: the header parses, the tensors past the end cannot be read.
    let f3 = file.clone();
    let past_end: ReadAt =
        Arc::new(move |off, len| f3.get(off..off + len).map(<[u8]>::to_vec).ok_or("past the end".into()));
    let g = GgufFile::from_reader_with(file.len() + 64, 256, past_end, Limits::DEFAULT).unwrap();
    let last = g.tensors().iter().max_by_key(|t| t.start).unwrap().name.clone();
    assert!(g.tensor_f32(&last).is_ok(), "the real tensors are still readable");
    // Truncated: tensors past the end are refused at parse time.
    let f4 = file.clone();
    let cut = file.len() - 100;
    let truncated: ReadAt = Arc::new(move |off, len| Ok(f4[off..(off + len).min(cut)].to_vec()));
    assert!(GgufFile::from_reader(cut, truncated, Limits::DEFAULT).is_err());
    // Reads that fail or come back short are errors naming what was read.
    let f5 = file.clone();
    let fails_later: ReadAt =
        Arc::new(
            move |off, len| if off == 0 { Ok(f5[..len].to_vec()) } else { Err("the page dropped the buffer".into()) },
        );
    let g = GgufFile::from_reader_with(file.len(), 256, fails_later, Limits::DEFAULT).unwrap();
    let name = &g.tensors().iter().max_by_key(|t| t.start).unwrap().name.clone();
    let e = g.tensor_f32(name).unwrap_err();
    assert!(e.to_string().contains("the page dropped the buffer"), "{e}");
    let f6 = file.clone();
    let short: ReadAt = Arc::new(move |off, len| if off == 0 { Ok(f6[..len].to_vec()) } else { Ok(vec![0; len / 2]) });
    let g = GgufFile::from_reader_with(file.len(), 256, short, Limits::DEFAULT).unwrap();
    let e = g.tensor_f32(name).unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
    let failing: ReadAt = Arc::new(|_, _| Err("no file".into()));
    assert!(GgufFile::from_reader(file.len(), failing, Limits::DEFAULT).unwrap_err().to_string().contains("no file"));
    let _ = good;
}
