//! `lowbit bench --convert`: whole-checkpoint conversion throughput next to the memory bandwidth of the same
//! run. A synthetic dense f32 checkpoint of `--size` bytes (64 MiB tensors) is written to a scratch directory;
//! then `lowbit quantize` (NF4+DQ, int8) and `lowbit dequantize` run on it as child processes, each after a
//! `sync` and one untimed warm-up (so the input is in the page cache, the case the targets are stated for),
//! and the median wall time of `--iters` runs is reported as GB/s of input and of output, with the copy
//! bandwidth (in-memory `memcpy`, all threads) and a plain sequential file write of the same size as the
//! physical references.

use crate::console;
use crate::error::CliError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// What `lowbit bench --convert` was asked to do.
pub struct ConvertBench {
    /// Size of the synthetic f32 checkpoint, in bytes.
    pub size: u64,
    /// Timed runs per conversion (the median is reported).
    pub iters: usize,
    /// Directory for the scratch files (default: the system's temporary directory).
    pub dir: Option<PathBuf>,
}

/// Elements per tensor (64 MiB of f32).
const TENSOR_ELEMS: usize = 4096 * 4096;

/// Runs the bench and prints a Markdown table.
pub fn run(b: ConvertBench) -> Result<(), CliError> {
    let base = b.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch::create(&base)?;
    let dir = scratch.0.as_path();
    let tensors = (b.size as usize / (TENSOR_ELEMS * 4)).max(1);
    let input = dir.join("dense.safetensors");
    let input_bytes = write_dense(&input, tensors)?;
    crate::output::check_free_space(&dir.join("x"), 3 * input_bytes)?;
    let nf4 = dir.join("nf4.safetensors");
    let int8 = dir.join("int8.safetensors");
    let back = dir.join("back.safetensors");
    let exe = std::env::current_exe().map_err(|e| CliError::new(format!("cannot find the lowbit binary: {e}")))?;
    let s = |p: &Path| p.display().to_string();
    let runs: [(&str, Vec<String>, &Path, &Path); 3] = [
        (
            "quantize nf4:64+dq",
            vec!["quantize", &s(&input), "--scheme", "nf4:64+dq", "--include", "*", "--force", "-o", &s(&nf4)]
                .into_iter()
                .map(String::from)
                .collect(),
            &input,
            &nf4,
        ),
        (
            "quantize int8:channel",
            vec!["quantize", &s(&input), "--scheme", "int8:channel", "--include", "*", "--force", "-o", &s(&int8)]
                .into_iter()
                .map(String::from)
                .collect(),
            &input,
            &int8,
        ),
        (
            "dequantize nf4:64+dq -> f32",
            vec!["dequantize", &s(&nf4), "--force", "-o", &s(&back)].into_iter().map(String::from).collect(),
            &nf4,
            &back,
        ),
    ];
    let mut rows = Vec::new();
    for (what, args, from, to) in &runs {
        let mut times = Vec::new();
        for i in 0..=b.iters {
            sync();
            let t = Instant::now();
            let out = Command::new(&exe).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output();
            let secs = t.elapsed().as_secs_f64();
            let out = out.map_err(|e| CliError::new(format!("cannot run {}: {e}", exe.display())))?;
            if !out.status.success() {
                return Err(CliError::new(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr))));
            }
            if i > 0 {
                times.push(secs);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let (read, written) = (file_len(from)? as f64, file_len(to)? as f64);
        rows.push((what.to_string(), median, read, written));
    }
    sync();
    let file_write = time_file_write(&dir.join("write-probe"), input_bytes)?;
    let limits = lowbit_testkit::membw::measure(lowbit_testkit::membw::DEFAULT_BYTES, 3);
    let gb = |b: f64| b / 1e9;
    let copy = limits.all.copy;
    let file_bw = input_bytes as f64 / file_write;
    let mut out = format!(
        "conversion of a {:.2} GiB f32 checkpoint ({tensors} tensors of 4096x4096), input in the page cache, \
         median of {} runs, {} threads\n\n| conversion | time (s) | input GB/s | output GB/s | output ÷ file write \
         | (in+out) ÷ memcpy |\n|---|---|---|---|---|---|\n",
        input_bytes as f64 / (1u64 << 30) as f64,
        b.iters,
        limits.threads,
    );
    for (what, secs, read, written) in &rows {
        out.push_str(&format!(
            "| {what} | {secs:.2} | {:.2} | {:.2} | {:.0}% | {:.0}% |\n",
            gb(read / secs),
            gb(written / secs),
            100.0 * written / secs / file_bw,
            100.0 * (read + written) / secs / copy
        ));
    }
    out.push_str(&format!(
        "\nsame run: sequential file write into the page cache {:.2} GB/s ({:.2} GiB in 1 MiB writes, the \
         physical limit of writing the output); memcpy {:.1} GB/s (read+write), read {:.1} GB/s ({} threads)",
        gb(file_bw),
        input_bytes as f64 / (1u64 << 30) as f64,
        gb(copy),
        gb(limits.all.read),
        limits.threads,
    ));
    console::line(&out)
}

/// Writes a dense f32 checkpoint of `tensors` 4096x4096 weights with deterministic values, a tensor at a time;
/// returns its size.
fn write_dense(path: &Path, tensors: usize) -> Result<u64, CliError> {
    let io = |e: std::io::Error| CliError::new(format!("writing {}: {e}", path.display()));
    let per = TENSOR_ELEMS * 4;
    let mut header = serde_json::Map::new();
    for i in 0..tensors {
        header.insert(
            format!("model.layers.{i}.mlp.up_proj.weight"),
            serde_json::json!({"dtype": "F32", "shape": [4096, 4096], "data_offsets": [i * per, (i + 1) * per]}),
        );
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| CliError::new(e.to_string()))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&h).map_err(io)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let row: Vec<u8> = (0..4096 * 16)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect();
    for _ in 0..tensors * 4096 / 16 {
        f.write_all(&row).map_err(io)?;
    }
    f.flush().map_err(io)?;
    file_len(path)
}

fn file_len(path: &Path) -> Result<u64, CliError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| CliError::new(format!("reading {}: {e}", path.display())))
}

/// Seconds to write `bytes` zero bytes to a new file at `path` in 1 MiB writes (no sync), then removes it.
fn time_file_write(path: &Path, bytes: u64) -> Result<f64, CliError> {
    let io = |e: std::io::Error| CliError::new(format!("writing {}: {e}", path.display()));
    let buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(path).map_err(io)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(io)?;
        left -= n as u64;
    }
    drop(f);
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    Ok(secs)
}

/// Flushes dirty pages, so one run's write-back does not slow the next.
fn sync() {
    #[cfg(unix)]
    // SAFETY: `sync` takes no arguments and cannot fail.
    unsafe {
        libc::sync()
    };
}

/// A scratch directory removed with everything in it when dropped (also when the bench fails).
struct Scratch(PathBuf);

impl Scratch {
    fn create(base: &Path) -> Result<Scratch, CliError> {
        let dir = base.join(format!("lowbit-bench-convert-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| CliError::new(format!("cannot create scratch directory {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
