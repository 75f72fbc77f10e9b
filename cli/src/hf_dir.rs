//! Writing a Hugging Face model directory: `model.safetensors`, or shards `model-00001-of-0000N.safetensors`
//! plus `model.safetensors.index.json` when the tensors exceed `--max-shard-size`; `config.json`; the
//! tokenizer files copied from the input directory.
//!
//! Crash safety: everything is built in a temporary sibling directory (`.NAME.lowbit-tmp.PID.N`, registered
//! with [`lowbit::io::atomic`] so SIGINT/SIGTERM delete it) that is renamed to the output path at the end
//! without replacing anything (`renameat2(RENAME_NOREPLACE)`, or check-then-rename where that is unsupported)
//! unless `--force`, which replaces only a directory lowbit could have written (or a regular file); a failure
//! (or a kill) never leaves a partial output under the real name, and the temporary directory is removed.
//! Memory: each tensor goes to its shard's file as it is pushed ([`SafetensorsWriter`]), so nothing is held
//! beyond the tensor being converted; a shard is completed and synced before the next one starts.

use crate::error::CliError;
use lowbit::io::{atomic, SafetensorsWriter, HF_INDEX_FILE, HF_WEIGHTS_FILE};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The files a model directory may carry besides weights and config, copied when the input directory has them.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
];

/// Parses a shard size: bytes (`1048576`), or an integer with a unit: `KB`, `MB`, `GB`, `TB` (powers of 10)
/// or `KiB`, `MiB`, `GiB`, `TiB` (powers of 2), case-insensitive, as `transformers` reads `max_shard_size`.
/// Zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a size; expected bytes or an integer with a unit: 500MB, 2GB, 1GiB");
    let units: [(&str, u64); 9] = [
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("TIB", 1 << 40),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("B", 1),
    ];
    let upper = t.to_ascii_uppercase();
    let (digits, mult) =
        units.iter().find_map(|(u, m)| upper.strip_suffix(u).map(|d| (d.trim(), *m))).unwrap_or((upper.as_str(), 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("{s:?}: a shard size must be at least 1 byte"));
    }
    Ok(bytes)
}

/// The directory whose tokenizer files a model-directory output copies: the input when it is a directory, the
/// index's directory when it is a `*.index.json`, else none (a bare safetensors file or a GGUF).
pub fn tokenizer_source(input: &Path) -> Option<&Path> {
    if input.is_dir() {
        return Some(input);
    }
    let is_index = input.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"));
    is_index.then(|| input.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Refuses an output path that is (or holds) the input, or that exists unless `force`; with `force`, an
/// existing output must be a directory lowbit could have written ([`is_model_dir_output`]) or a regular file.
pub fn check_dir_output(input: &Path, output: &Path, force: bool) -> Result<(), CliError> {
    let parent = atomic::parent_dir(output);
    if !parent.is_dir() {
        return Err(CliError::new(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            parent.display()
        )));
    }
    if output.file_name().is_none() {
        return Err(CliError::new(format!("output {} has no final name; expected a directory path", output.display())));
    }
    crate::output::protect_inputs(&[(input, "the input")], output)?;
    let Ok(meta) = std::fs::symlink_metadata(output) else { return Ok(()) };
    if !force {
        return Err(CliError::new(format!("output {} already exists; pass --force to replace it", output.display())));
    }
    let replaceable = meta.is_file() || (meta.is_dir() && is_model_dir_output(output));
    if !replaceable {
        let what = if meta.is_dir() {
            "a directory holding files lowbit does not write".to_string()
        } else {
            atomic::describe_file_type(&meta).to_string()
        };
        return Err(CliError::new(format!(
            "output {} is {what}; --force replaces only a regular file or a model directory (safetensors, JSON \
             and tokenizer files only)",
            output.display()
        )));
    }
    Ok(())
}

/// Whether `dir` holds only what a model directory output holds: regular `*.safetensors` and `*.json` files and
/// the [`TOKENIZER_FILES`] (so `--force` can never delete a directory of other things).
pub fn is_model_dir_output(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.take(100_000).all(|e| {
        let Ok(e) = e else { return false };
        let name = e.file_name().to_string_lossy().into_owned();
        let known =
            name.ends_with(".safetensors") || name.ends_with(".json") || TOKENIZER_FILES.contains(&name.as_str());
        known && e.file_type().is_ok_and(|t| t.is_file())
    })
}

/// What [`HfDirWriter::finish`] wrote.
#[derive(Debug)]
pub struct Written {
    /// Number of safetensors files.
    pub shards: usize,
    /// Tensor bytes in all shards (`metadata.total_size` of the index).
    pub total_size: u64,
    /// The tokenizer (and generation config) files copied or generated.
    pub copied: Vec<&'static str>,
}

/// Builds a model directory shard by shard; see the module docs.
pub struct HfDirWriter {
    output: PathBuf,
    tmp: PathBuf,
    force: bool,
    max_shard: u64,
    /// `__metadata__` of every shard (`format: pt` and what the caller adds).
    metadata: HashMap<String, String>,
    /// The shard being written (its tensors go to disk as they are pushed).
    current: Option<SafetensorsWriter>,
    current_bytes: u64,
    /// Header room reserved in each shard ([`SafetensorsWriter::header_estimate`]).
    header_estimate: usize,
    /// Written shards: temporary file name and the tensors it holds.
    shards: Vec<(PathBuf, Vec<String>)>,
    /// Data bytes of the current shard when the unit being written began.
    unit_start: u64,
    total_size: u64,
    finished: bool,
    /// The temporary directory's entry in the registry that SIGINT/SIGTERM clean.
    registration: Option<atomic::Registration>,
}

impl HfDirWriter {
    /// Starts a directory for `output` (checked with [`check_dir_output`] beforehand): creates the temporary
    /// sibling. Every shard gets `metadata` plus `format: pt` (transformers refuses safetensors files without it)
    /// and `header_estimate` bytes of room for its header.
    pub fn create(
        output: &Path,
        force: bool,
        max_shard: u64,
        mut metadata: HashMap<String, String>,
        header_estimate: usize,
    ) -> Result<HfDirWriter, CliError> {
        let tmp = atomic::temp_path_for(output);
        // Registered first, so a signal right after creation still removes it.
        let registration = atomic::register(&tmp, true);
        if let Err(e) = std::fs::create_dir(&tmp) {
            registration.keep(); // not ours: leave it
            return Err(io_err(&tmp, e));
        }
        let registration = Some(registration);
        metadata.insert("format".to_string(), "pt".to_string());
        Ok(HfDirWriter {
            output: output.to_path_buf(),
            tmp,
            force,
            max_shard,
            metadata,
            current: None,
            current_bytes: 0,
            header_estimate,
            shards: Vec::new(),
            unit_start: 0,
            total_size: 0,
            finished: false,
            registration,
        })
    }

    /// The final output path.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// The shard writer for the entries of one tensor of about `bytes` bytes, written by the caller (whole
    /// or in pieces) before [`end_unit`](Self::end_unit). Starts a new shard first when the current one is
    /// non-empty and would exceed the limit; a unit larger than the limit gets a shard of its own.
    pub fn begin_unit(&mut self, bytes: u64) -> Result<&mut SafetensorsWriter, CliError> {
        if self.current.is_some() && self.current_bytes + bytes > self.max_shard {
            self.flush()?;
        }
        if self.current.is_none() {
            let path = self.tmp.join(format!("shard-{:05}.part", self.shards.len() + 1));
            let mut w = SafetensorsWriter::create(&path, self.header_estimate)?;
            w.extend_metadata(self.metadata.clone());
            self.current = Some(w);
        }
        let w = self.current.as_mut().expect("a shard is open");
        self.unit_start = w.data_bytes() as u64;
        Ok(w)
    }

    /// Completes the unit started by [`begin_unit`](Self::begin_unit): counts the bytes written to it and adds
    /// `meta` to its shard's `__metadata__`.
    pub fn end_unit(&mut self, meta: HashMap<String, String>) {
        if let Some(w) = &mut self.current {
            let bytes = w.data_bytes() as u64 - self.unit_start;
            w.extend_metadata(meta);
            self.current_bytes += bytes;
            self.total_size += bytes;
        }
    }

    /// Completes the current shard under a temporary name.
    fn flush(&mut self) -> Result<(), CliError> {
        let path = self.tmp.join(format!("shard-{:05}.part", self.shards.len() + 1));
        let w = match self.current.take() {
            Some(w) => w,
            None => {
                // An empty model still gets one (empty) shard.
                let mut w = SafetensorsWriter::create(&path, 4096)?;
                w.extend_metadata(self.metadata.clone());
                w
            }
        };
        let names = w.names().map(str::to_string).collect();
        w.finish(false)?;
        self.shards.push((path, names));
        self.current_bytes = 0;
        Ok(())
    }

    /// Writes the last shard, names the shards (`model.safetensors` when there is one), writes the index,
    /// `config` as `config.json` (if given), copies the tokenizer files of `tokenizer_dir` and writes the
    /// `generated` ones (name, contents; e.g. a GGUF's tokenizer as `tokenizer.json`), then moves the
    /// directory into place (replacing an existing output only with `force`, as checked at the start).
    pub fn finish(
        mut self,
        config: Option<&serde_json::Value>,
        tokenizer_dir: Option<&Path>,
        generated: &[(&'static str, String)],
    ) -> Result<Written, CliError> {
        if self.current.is_some() || self.shards.is_empty() {
            self.flush()?;
        }
        let n = self.shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, (part, names)) in self.shards.iter().enumerate() {
            let file =
                if n == 1 { HF_WEIGHTS_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
            let dest = self.tmp.join(&file);
            std::fs::rename(part, &dest).map_err(|e| io_err(&dest, e))?;
            for name in names {
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            }
        }
        if n > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_size },
                "weight_map": weight_map,
            });
            write_json(&self.tmp.join(HF_INDEX_FILE), &index)?;
        }
        if let Some(config) = config {
            write_json(&self.tmp.join("config.json"), config)?;
        }
        let mut copied = Vec::new();
        if let Some(dir) = tokenizer_dir {
            for f in TOKENIZER_FILES {
                let src = dir.join(f);
                if src.is_file() {
                    let dest = self.tmp.join(f);
                    std::fs::copy(&src, &dest)
                        .map_err(|e| CliError::new(format!("copying {} to {}: {e}", src.display(), dest.display())))?;
                    copied.push(f);
                }
            }
        }
        for (f, text) in generated {
            if !copied.contains(f) {
                let dest = self.tmp.join(f);
                std::fs::write(&dest, text).map_err(|e| io_err(&dest, e))?;
                copied.push(f);
            }
        }
        atomic::sync_dir(&self.tmp);
        self.move_into_place()?;
        self.finished = true;
        if let Some(r) = self.registration.take() {
            r.keep();
        }
        Ok(Written { shards: n, total_size: self.total_size, copied })
    }

    /// Renames the temporary directory to the output without replacing anything that exists (also one that
    /// appeared during the write); with `force`, an existing output (checked replaceable at the start, and
    /// again here) is renamed aside first and removed after the new one is in place.
    fn move_into_place(&self) -> Result<(), CliError> {
        let out = &self.output;
        if !self.force {
            rename_noreplace(&self.tmp, out)?;
            atomic::sync_dir(atomic::parent_dir(out));
            return Ok(());
        }
        let old = match std::fs::symlink_metadata(out) {
            Ok(m) => {
                if !(m.is_file() || (m.is_dir() && is_model_dir_output(out))) {
                    return Err(CliError::new(format!(
                        "output {} changed while writing and is no longer a model directory or a regular file; \
                         nothing replaced",
                        out.display()
                    )));
                }
                let aside = atomic::temp_path_for(out);
                std::fs::rename(out, &aside).map_err(|e| io_err(out, e))?;
                Some(aside)
            }
            Err(_) => None,
        };
        if let Err(e) = rename_noreplace(&self.tmp, out) {
            if let Some(aside) = &old {
                let _ = std::fs::rename(aside, out); // put the old output back
            }
            return Err(e);
        }
        if let Some(aside) = old {
            let removed = if aside.is_dir() { std::fs::remove_dir_all(&aside) } else { std::fs::remove_file(&aside) };
            removed.map_err(|e| io_err(&aside, e))?;
        }
        atomic::sync_dir(atomic::parent_dir(out));
        Ok(())
    }
}

/// Renames `from` to `to` only if `to` does not exist, atomically where the kernel offers
/// `renameat2(RENAME_NOREPLACE)` (Linux); elsewhere, or on file systems without it, check then rename.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), CliError> {
    let appeared = || {
        CliError::new(format!("{} appeared while writing; nothing replaced; pass --force to replace it", to.display()))
    };
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        if let (Ok(f), Ok(t)) =
            (std::ffi::CString::new(from.as_os_str().as_bytes()), std::ffi::CString::new(to.as_os_str().as_bytes()))
        {
            // SAFETY: both pointers are NUL-terminated strings that live for the call.
            let rc = unsafe {
                libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE)
            };
            if rc == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Err(appeared()),
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {} // fall back below
                _ => return Err(io_err(to, e)),
            }
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(appeared());
    }
    std::fs::rename(from, to).map_err(|e| io_err(to, e))
}

impl Drop for HfDirWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes pretty-printed JSON with a final newline (as `transformers` does), created with default permissions.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CliError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| CliError::new(format!("{}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, e: std::io::Error) -> CliError {
    CliError::new(format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10kib"), Ok(10 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in ["", "MB", "1.5GB", "-1", "5 XB", "0", "99999999999999999999TB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
