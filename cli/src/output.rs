//! Where `quantize` and `dequantize` write: one safetensors file (`-o FILE.safetensors`) or a Hugging Face
//! model directory (any other path, [`crate::hf_dir`]); and the guards around the output: never touch an
//! input (by path or by inode), never replace an existing output without `--force`, and with it only a regular
//! file; writes are crash-safe ([`lowbit::io::atomic`]).

use crate::error::CliError;
use crate::hf_dir::{check_dir_output, HfDirWriter};
use lowbit::io::{atomic, SafetensorsWriter, TensorData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Whether `output` names a single safetensors file (it ends in `.safetensors`) rather than a model directory.
pub fn is_file_output(output: &Path) -> bool {
    output.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The identity of an existing file: (device, inode) on Unix, so hard links to an input are recognised.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Other platforms compare canonical paths only.
#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// The most directory entries looked at when an input directory's files are protected.
const MAX_LISTED: usize = 100_000;

/// `path` itself and, for a directory, the regular files directly in it (shards, index, config).
fn with_files(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    if path.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            out.extend(entries.take(MAX_LISTED).flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    out
}

/// The canonical form of `path`, also when it does not exist yet (its parent canonicalised, plus its name).
fn canonical(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path)
        .ok()
        .or_else(|| Some(std::fs::canonicalize(atomic::parent_dir(path)).ok()?.join(path.file_name()?)))
}

/// Refuses an `output` that is one of `inputs` (each with a description for the message), a file of an input
/// directory, or a directory holding an input, compared by canonical path and by (device, inode) so hard
/// links and symbolic links are caught. Holds even with `--force`: inputs are never replaced.
pub fn protect_inputs(inputs: &[(&Path, &str)], output: &Path) -> Result<(), CliError> {
    let Some(out) = canonical(output) else { return Ok(()) };
    let out_id = file_id(output);
    for (input, what) in inputs {
        for p in with_files(input) {
            let same_path = canonical(&p).is_some_and(|c| c == out || c.starts_with(&out));
            let same_file = out_id.is_some() && file_id(&p) == out_id;
            if same_path || same_file {
                let what = if p == *input { what.to_string() } else { format!("{} (a file of {what})", p.display()) };
                return Err(CliError::new(format!(
                    "output {} is {what}; choose another output path (inputs are never replaced, even with --force)",
                    output.display()
                )));
            }
        }
    }
    Ok(())
}

/// Checks, before any work is done, that `output` may be written: it must not be `input` (nor a file of it, nor
/// a hard link to it), and it must not exist unless `force` is set, in which case it must be a regular file
/// (a FIFO, device, socket or directory is never replaced).
pub fn check_output(input: &Path, output: &Path, force: bool) -> Result<(), CliError> {
    let dir = atomic::parent_dir(output);
    if !dir.is_dir() {
        return Err(CliError::new(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            dir.display()
        )));
    }
    protect_inputs(&[(input, "the input file")], output)?;
    let Ok(meta) = std::fs::symlink_metadata(output) else { return Ok(()) };
    let followed = std::fs::metadata(output).unwrap_or(meta);
    if followed.is_dir() {
        return Err(CliError::new(format!("output {} is a directory; expected a file path", output.display())));
    }
    if !force {
        return Err(CliError::new(format!("output {} already exists; pass --force to replace it", output.display())));
    }
    if !followed.is_file() {
        return Err(CliError::new(format!(
            "output {} is {}; --force replaces only regular files",
            output.display(),
            atomic::describe_file_type(&followed)
        )));
    }
    Ok(())
}

/// Refuses, before anything is written, an output of about `needed` bytes that cannot fit in the free space
/// of the filesystem that will hold `output` (what an unprivileged user may still write there). Does nothing
/// where the free space cannot be read.
pub fn check_free_space(output: &Path, needed: u64) -> Result<(), CliError> {
    let Some(free) = free_bytes(atomic::parent_dir(output)) else { return Ok(()) };
    if needed > free {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(CliError::new(format!(
            "cannot write {}: the output needs about {:.2} GiB and its filesystem has {:.2} GiB free",
            output.display(),
            gib(needed),
            gib(free)
        )));
    }
    Ok(())
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory for one `statvfs`, which the call
    // fills completely when it returns 0 (the only case in which it is read).
    let ok = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } == 0;
    if !ok {
        return None;
    }
    // SAFETY: initialised by the successful call above.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 / u64); widening is lossless everywhere.
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// The destination of a command's tensors.
pub enum Sink {
    /// One safetensors file, written tensor by tensor (nothing but the tensor being converted is held).
    File {
        /// The file being written (a temporary next to the output until [`Sink::finish`]).
        writer: Box<SafetensorsWriter>,
        /// The output.
        path: PathBuf,
        /// Replace an existing file.
        force: bool,
    },
    /// A model directory, written shard by shard.
    Dir(Box<HfDirWriter>),
}

impl Sink {
    /// Checks `output` (file or directory rules) and prepares it. `metadata` goes into the file, or into
    /// every shard of a directory. `names` (the input's tensor names) size the room reserved for headers.
    pub fn open<'a>(
        input: &Path,
        output: &Path,
        force: bool,
        max_shard: u64,
        metadata: HashMap<String, String>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Sink, CliError> {
        let meta_bytes = metadata.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let estimate = SafetensorsWriter::header_estimate(names, meta_bytes);
        if is_file_output(output) {
            check_output(input, output, force)?;
            let mut writer = SafetensorsWriter::create(output, estimate)?;
            writer.extend_metadata(metadata);
            Ok(Sink::File { writer: Box::new(writer), path: output.to_path_buf(), force })
        } else {
            check_dir_output(input, output, force)?;
            Ok(Sink::Dir(Box::new(HfDirWriter::create(output, force, max_shard, metadata, estimate)?)))
        }
    }

    /// Adds one tensor's entries and the `__metadata__` entries describing them.
    pub fn push(&mut self, unit: &[(String, TensorData)], meta: HashMap<String, String>) -> Result<(), CliError> {
        let bytes: u64 = unit.iter().map(|(_, t)| t.data.len() as u64).sum();
        let w = self.begin_unit(bytes)?;
        for (name, t) in unit {
            w.push(name, t)?;
        }
        self.end_unit(meta);
        Ok(())
    }

    /// The writer for one tensor's entries (about `bytes` bytes in all), which the caller writes whole
    /// ([`SafetensorsWriter::push`]) or in pieces ([`SafetensorsWriter::begin`]) and completes with
    /// [`end_unit`](Self::end_unit). A directory keeps a unit in one shard.
    pub fn begin_unit(&mut self, bytes: u64) -> Result<&mut SafetensorsWriter, CliError> {
        match self {
            Sink::File { writer, .. } => Ok(writer),
            Sink::Dir(w) => w.begin_unit(bytes),
        }
    }

    /// Completes the unit from [`begin_unit`](Self::begin_unit), adding `meta` to the `__metadata__`.
    pub fn end_unit(&mut self, meta: HashMap<String, String>) {
        match self {
            Sink::File { writer, .. } => writer.extend_metadata(meta),
            Sink::Dir(w) => w.end_unit(meta),
        }
    }

    /// Writes what remains and returns a description for the summary line (`wrote DIR (3 shards, ...)`).
    /// A directory also gets `config` as `config.json`, the tokenizer files of `tokenizer_dir`, or else, for a
    /// GGUF input (`gguf_tokenizer`), its tokenizer as `tokenizer.json` + `tokenizer_config.json`.
    pub fn finish(
        self,
        config: Option<&serde_json::Value>,
        tokenizer_dir: Option<&Path>,
        gguf_tokenizer: Option<&lowbit::io::gguf::GgufTokenizer>,
    ) -> Result<String, CliError> {
        match self {
            Sink::File { writer, path, force } => {
                writer.finish(force)?;
                Ok(format!("wrote {}", path.display()))
            }
            Sink::Dir(w) => {
                let out = w.output().to_path_buf();
                // A tokenizer lowbit cannot rebuild (not byte-level BPE) costs the tokenizer files, not the
                // conversion: the weights and config are still a valid model directory.
                let generated = match (tokenizer_dir, gguf_tokenizer) {
                    (None, Some(tok)) => lowbit_llm::Tokenizer::hf_files_from_gguf(tok).unwrap_or_else(|e| {
                        eprintln!(
                            "warning: {} gets no tokenizer files: {}",
                            crate::console::escape(&out.display().to_string()),
                            crate::console::escape(&e.to_string())
                        );
                        Vec::new()
                    }),
                    _ => Vec::new(),
                };
                let written = w.finish(config, tokenizer_dir, &generated)?;
                let mib = written.total_size as f64 / (1024.0 * 1024.0);
                let files = if written.shards == 1 {
                    format!("model.safetensors, {mib:.2} MiB")
                } else {
                    format!("{} shards + index, {mib:.2} MiB", written.shards)
                };
                let config = if config.is_some() { ", config.json" } else { ", no config.json (the input has none)" };
                let tok = if written.copied.is_empty() {
                    String::new()
                } else if generated.is_empty() {
                    format!(", copied {}", written.copied.join(", "))
                } else {
                    format!(", {} from the GGUF's tokenizer", written.copied.join(", "))
                };
                Ok(format!("wrote {} ({files}{config}{tok})", out.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output larger than any filesystem's free space is refused up front with both sizes named; a small
    /// one passes.
    #[test]
    fn free_space_is_checked_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        check_free_space(&out, 1 << 20).unwrap();
        if free_bytes(dir.path()).is_none() {
            eprintln!("skipped: the free space of {} cannot be read here", dir.path().display());
            return;
        }
        let e = check_free_space(&out, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("needs about") && e.contains("GiB free"), "{e}");
        assert!(!out.exists());
    }
}
