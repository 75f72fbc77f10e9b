//! Conversion memory is flat in model size: `quantize` and `dequantize` write each tensor as it is converted
//! (`io::SafetensorsWriter`), so their anonymous memory stays near one tensor's worth whatever the number
//! of tensors. Measured, not hoped: the child's `RssAnon` (anonymous resident memory; the mapped input and
//! the page cache of the output are not anonymous) sampled from `/proc/PID/status` every millisecond until it
//! exits. Sampling can only miss a peak, never invent one, so the bound below is a real floor on the
//! regression it catches: holding the output (as before streaming) keeps ≥ 256 MiB resident until the end.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TENSORS: usize = 64;
const ROWS: usize = 1024;
const COLS: usize = 1024;

/// A dense f32 checkpoint of `TENSORS` [ROWS, COLS] weights (256 MiB), written without holding it.
fn write_model(path: &Path) {
    use std::io::Write;
    let per = ROWS * COLS * 4;
    let mut header = serde_json::Map::new();
    for i in 0..TENSORS {
        header.insert(
            format!("model.layers.{i}.mlp.up_proj.weight"),
            serde_json::json!({"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [i * per, (i + 1) * per]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let row: Vec<u8> = (0..COLS * 64)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect();
    for _ in 0..TENSORS * ROWS / 64 {
        f.write_all(&row).unwrap();
    }
    f.flush().unwrap();
}

/// Runs lowbit with `args`, sampling its anonymous resident memory; returns (success, peak MiB, stderr).
fn peak_anon_mib(args: &[&str]) -> (bool, f64, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowbit"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let anon = text
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_kib = peak_kib.max(anon.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.success(), peak_kib as f64 / 1024.0, err)
}

#[test]
fn conversions_hold_one_tensor_not_the_model() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc (RssAnon sampling needs Linux)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense.safetensors");
    write_model(&dense);
    let nf4 = tmp.path().join("nf4.safetensors");
    let back = tmp.path().join("back.safetensors");
    let int8_dir = tmp.path().join("int8");
    let model_mib = (TENSORS * ROWS * COLS * 4) as f64 / (1 << 20) as f64;
    // One tensor is 4 MiB (its f32 copy, codes and parameters; measured peaks 2–11 MiB). Holding the output
    // instead would need 36 MiB (NF4+DQ), 64 MiB (int8) or 256 MiB (f32).
    let bound = 32.0;
    for (what, args) in [
        ("quantize nf4:64+dq to a file", vec!["quantize", s(&dense), "--scheme", "nf4:64+dq", "-o", s(&nf4)]),
        ("dequantize to a file", vec!["dequantize", s(&nf4), "-o", s(&back)]),
        ("quantize int8 to a directory", vec!["quantize", s(&dense), "--scheme", "int8", "-o", s(&int8_dir)]),
    ] {
        let (ok, peak, err) = peak_anon_mib(&args);
        assert!(ok, "{what}: {err}");
        eprintln!("{what}: peak RssAnon {peak:.1} MiB for a {model_mib:.0} MiB model");
        assert!(peak < bound, "{what}: peak anonymous memory {peak:.1} MiB ≥ {bound} MiB (model {model_mib:.0} MiB)");
    }
    // The streamed files are complete: every tensor is there, and the round trip is the quantized values.
    let o = lowbit(&["inspect", s(&back)]);
    assert_ok(&o);
    assert!(stdout(&o).contains(&format!("{TENSORS} tensor(s)")), "{}", stdout(&o));
}

/// One tensor larger than the whole budget is converted in chunks: a 512 MiB f32 weight (a sparse file, so
/// the test costs no disk for the input) is quantized and dequantized with `--memory-budget 16MiB` in far less
/// anonymous memory than the tensor (whole-tensor conversion needed its codes, 64 MiB for NF4 and 128 MiB for
/// int8, or its 512 MiB of f32 at once).
#[test]
fn one_tensor_larger_than_the_budget_is_converted_in_chunks() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc (RssAnon sampling needs Linux)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("huge.safetensors");
    let (rows, cols) = (8192usize, 16384usize);
    let bytes = rows * cols * 4;
    let header =
        serde_json::json!({"model.embed.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, bytes]}});
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut head = (h.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&h);
    std::fs::write(&dense, &head).unwrap();
    std::fs::OpenOptions::new().write(true).open(&dense).unwrap().set_len((head.len() + bytes) as u64).unwrap();
    let bound = 48.0;
    for scheme in ["nf4:64+dq", "int8:channel"] {
        let q = tmp.path().join(format!("q-{}.safetensors", scheme.replace(':', "_")));
        let args =
            ["quantize", s(&dense), "--scheme", scheme, "--include", "*", "--memory-budget", "16MiB", "-o", s(&q)];
        let (ok, peak, err) = peak_anon_mib(&args);
        assert!(ok, "quantize {scheme}: {err}");
        eprintln!("quantize {scheme}, one 512 MiB tensor: peak RssAnon {peak:.1} MiB");
        assert!(peak < bound, "quantize {scheme}: peak anonymous memory {peak:.1} MiB ≥ {bound} MiB");
        let back = tmp.path().join("back.safetensors");
        let args = ["dequantize", s(&q), "--memory-budget", "16MiB", "--force", "-o", s(&back)];
        let (ok, peak, err) = peak_anon_mib(&args);
        assert!(ok, "dequantize {scheme}: {err}");
        eprintln!("dequantize {scheme}, one 512 MiB tensor: peak RssAnon {peak:.1} MiB");
        assert!(peak < bound, "dequantize {scheme}: peak anonymous memory {peak:.1} MiB ≥ {bound} MiB");
        let ck = lowbit::io::Checkpoint::open(&back).unwrap();
        let t = ck.tensor("model.embed.weight").unwrap();
        assert_eq!((t.shape(), t.data().len()), (&[rows, cols][..], bytes), "{scheme}: the whole tensor back");
        assert!(t.data().iter().all(|&b| b == 0), "{scheme}: zeros dequantize to zeros");
    }
}
