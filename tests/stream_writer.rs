//! `io::SafetensorsWriter`: files written tensor by tensor are valid safetensors (read back by the
//! `safetensors` crate itself), with the header in its reserved room or, when the estimate was too small,
//! through the copying fallback; bad pushes are errors; an unfinished writer leaves nothing behind; an
//! existing destination is only replaced when asked.

use lowbit::io::{SafetensorsWriter, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

fn tensors() -> Vec<(String, TensorData)> {
    (0..12)
        .map(|i| {
            let vals: Vec<f32> = (0..(i * 37 + 5)).map(|j| (i * 1000 + j) as f32 * 0.25).collect();
            (
                format!("model.layers.{i}.mlp.up_proj.weight"),
                TensorData::from_slice(Dtype::F32, vec![vals.len()], &vals),
            )
        })
        .chain(std::iter::once(("codes".to_string(), TensorData::from_slice(Dtype::U8, vec![3, 5], &[7u8; 15]))))
        .collect()
}

/// Writes `tensors()` with `estimate` bytes of header room and checks the file with the safetensors crate.
fn round_trip(dir: &Path, estimate: usize) -> u64 {
    let path = dir.join(format!("out-{estimate}.safetensors"));
    let ts = tensors();
    let mut w = SafetensorsWriter::create(&path, estimate).unwrap();
    w.extend_metadata([("format".to_string(), "pt".to_string())]);
    for (name, t) in &ts {
        w.push(name, t).unwrap();
    }
    assert_eq!(w.data_bytes(), ts.iter().map(|(_, t)| t.data.len()).sum::<usize>());
    assert!(!path.exists(), "nothing at the destination before finish");
    let size = w.finish(false).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(size, bytes.len() as u64);
    let st = SafeTensors::deserialize(&bytes).expect("the safetensors crate reads the file");
    assert_eq!(st.len(), ts.len());
    for (name, t) in &ts {
        let v = st.tensor(name).unwrap();
        assert_eq!((v.dtype(), v.shape(), v.data()), (t.dtype, &t.shape[..], &t.data[..]), "{name}");
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref(), Some(&HashMap::from([("format".to_string(), "pt".to_string())])));
    let stray: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".safetensors"))
        .collect();
    assert!(stray.is_empty(), "temporaries left: {stray:?}");
    size
}

#[test]
fn header_in_its_room_or_through_the_fallback_gives_a_valid_file() {
    let dir = lowbit_testkit::scratch::ScratchDir::new("stream-writer-room");
    let names: Vec<String> = tensors().into_iter().map(|(n, _)| n).collect();
    let estimate = SafetensorsWriter::header_estimate(names.iter().map(String::as_str), 16);
    let roomy = round_trip(dir.path(), estimate);
    // Too little room: the header goes into a second file and the data is copied after it (no padding).
    let tight = round_trip(dir.path(), 0);
    assert!(tight < roomy, "the fallback file has no reserved padding ({tight} vs {roomy} bytes)");
}

#[test]
fn bad_pushes_are_errors() {
    let dir = lowbit_testkit::scratch::ScratchDir::new("stream-writer-bad");
    let mut w = SafetensorsWriter::create(&dir.path().join("x.safetensors"), 4096).unwrap();
    let bad = TensorData { dtype: Dtype::F32, shape: vec![3], data: vec![0; 11] };
    let e = w.push("a", &bad).unwrap_err().to_string();
    assert!(e.contains("11 bytes") && e.contains("expected"), "{e}");
    let ok = TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32, 2.0]);
    w.push("a", &ok).unwrap();
    let e = w.push("a", &ok).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
    assert_eq!(w.names().collect::<Vec<_>>(), ["a"]);
}

#[test]
fn unfinished_writers_leave_nothing_and_existing_files_survive_without_replace() {
    let dir = lowbit_testkit::scratch::ScratchDir::new("stream-writer-unfinished");
    let path = dir.path().join("x.safetensors");
    let t = TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32, 2.0]);
    {
        let mut w = SafetensorsWriter::create(&path, 4096).unwrap();
        w.push("a", &t).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a dropped writer leaves no file");

    std::fs::write(&path, b"keep me").unwrap();
    let mut w = SafetensorsWriter::create(&path, 4096).unwrap();
    w.push("a", &t).unwrap();
    assert!(w.finish(false).is_err(), "no replace without asking");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the failed write's temporary is gone");
    let mut w = SafetensorsWriter::create(&path, 4096).unwrap();
    w.push("a", &t).unwrap();
    w.finish(true).unwrap();
    assert_eq!(SafeTensors::deserialize(&std::fs::read(&path).unwrap()).unwrap().names(), ["a"]);
}

/// A tensor written in pieces (`begin` / `write` / `end`) is the same file as one pushed whole; misuse is an
/// error, never a corrupt file: bytes with no tensor open, more or fewer bytes than the shape holds, a second
/// tensor started before the first ended, finishing with a tensor open.
#[test]
fn pieces_equal_a_whole_push_and_misuse_is_an_error() {
    let dir = lowbit_testkit::scratch::ScratchDir::new("stream-writer-pieces");
    let vals: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let t = TensorData::from_slice(Dtype::F32, vec![10, 100], &vals);
    let whole = dir.path().join("whole.safetensors");
    let mut w = SafetensorsWriter::create(&whole, 4096).unwrap();
    w.push("w", &t).unwrap();
    w.finish(false).unwrap();
    let pieces = dir.path().join("pieces.safetensors");
    let mut w = SafetensorsWriter::create(&pieces, 4096).unwrap();
    w.begin("w", Dtype::F32, vec![10, 100]).unwrap();
    for c in t.data.chunks(333) {
        w.write(c).unwrap();
    }
    w.end().unwrap();
    w.finish(false).unwrap();
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&pieces).unwrap());

    let bad = dir.path().join("bad.safetensors");
    let mut w = SafetensorsWriter::create(&bad, 4096).unwrap();
    assert!(w.write(&[1, 2, 3]).unwrap_err().to_string().contains("no tensor started"));
    assert!(w.end().is_err());
    w.begin("a", Dtype::U8, vec![4]).unwrap();
    assert!(w.begin("b", Dtype::U8, vec![4]).unwrap_err().to_string().contains("still being written"));
    assert!(w.write(&[0; 5]).unwrap_err().to_string().contains("more bytes"));
    w.write(&[0; 3]).unwrap();
    assert!(w.end().unwrap_err().to_string().contains("1 bytes short"));
    let mut w = SafetensorsWriter::create(&bad, 4096).unwrap();
    w.begin("a", Dtype::U8, vec![4]).unwrap();
    assert!(w.finish(false).unwrap_err().to_string().contains("still being written"));
    assert!(!bad.exists(), "a failed writer leaves nothing at the destination");
    let mut w = SafetensorsWriter::create(&bad, 4096).unwrap();
    assert!(w.begin("huge", Dtype::F32, vec![usize::MAX / 2, 3]).unwrap_err().to_string().contains("overflow"));
}
