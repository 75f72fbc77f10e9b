//! Where `quantize` and `dequantize` write: one safetensors file (`-o FILE.safetensors`) or a Hugging Face
//! model directory (any other path, [`crate::hf_dir`]); and the guards around the output: never touch the
//! input, never replace an existing output without `--force`.

use crate::error::CliError;
use crate::hf_dir::{check_dir_output, HfDirWriter};
use lowbit::io::TensorData;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Whether `output` names a single safetensors file (it ends in `.safetensors`) rather than a model directory.
pub fn is_file_output(output: &Path) -> bool {
    output.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Checks, before any work is done, that `output` may be written: it must not be `input` itself (which is
/// memory-mapped while we read it), and it must not exist unless `force` is set.
pub fn check_output(input: &Path, output: &Path, force: bool) -> Result<(), CliError> {
    if output.is_dir() {
        return Err(CliError::new(format!("output {} is a directory; expected a file path", output.display())));
    }
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(CliError::new(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            dir.display()
        )));
    }
    if !output.exists() {
        return Ok(());
    }
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if a == b {
            return Err(CliError::new(format!(
                "output {} is the input file; choose another output path (the input is never modified)",
                output.display()
            )));
        }
    }
    if !force {
        return Err(CliError::new(format!("output {} already exists; pass --force to replace it", output.display())));
    }
    Ok(())
}

/// The destination of a command's tensors.
pub enum Sink {
    /// One safetensors file, written at the end (the whole output is held in memory).
    File {
        /// The file.
        path: PathBuf,
        /// Replace an existing file.
        force: bool,
        /// Everything pushed so far.
        tensors: Vec<(String, TensorData)>,
        /// `__metadata__`.
        metadata: HashMap<String, String>,
    },
    /// A model directory, written shard by shard.
    Dir(Box<HfDirWriter>),
}

impl Sink {
    /// Checks `output` (file or directory rules) and prepares it. `metadata` goes into the file, or into
    /// every shard of a directory.
    pub fn open(
        input: &Path,
        output: &Path,
        force: bool,
        max_shard: u64,
        metadata: HashMap<String, String>,
    ) -> Result<Sink, CliError> {
        if is_file_output(output) {
            check_output(input, output, force)?;
            Ok(Sink::File { path: output.to_path_buf(), force, tensors: Vec::new(), metadata })
        } else {
            check_dir_output(input, output, force)?;
            Ok(Sink::Dir(Box::new(HfDirWriter::create(output, force, max_shard, metadata)?)))
        }
    }

    /// Adds one tensor's entries and the `__metadata__` entries describing them.
    pub fn push(&mut self, unit: Vec<(String, TensorData)>, meta: HashMap<String, String>) -> Result<(), CliError> {
        match self {
            Sink::File { tensors, metadata, .. } => {
                tensors.extend(unit);
                metadata.extend(meta);
                Ok(())
            }
            Sink::Dir(w) => w.push(unit, meta),
        }
    }

    /// Writes what remains and returns a description for the summary line (`wrote DIR (3 shards, ...)`).
    /// A directory also gets `config` as `config.json` and the tokenizer files of `tokenizer_dir`.
    pub fn finish(self, config: Option<&serde_json::Value>, tokenizer_dir: Option<&Path>) -> Result<String, CliError> {
        match self {
            Sink::File { path, force, tensors, metadata } => {
                let metadata = if metadata.is_empty() { None } else { Some(metadata) };
                lowbit::io::write_safetensors(&path, &tensors, metadata, force)?;
                Ok(format!("wrote {}", path.display()))
            }
            Sink::Dir(w) => {
                let out = w.output().to_path_buf();
                let written = w.finish(config, tokenizer_dir)?;
                let mib = written.total_size as f64 / (1024.0 * 1024.0);
                let files = if written.shards == 1 {
                    format!("model.safetensors, {mib:.2} MiB")
                } else {
                    format!("{} shards + index, {mib:.2} MiB", written.shards)
                };
                let config = if config.is_some() { ", config.json" } else { ", no config.json (the input has none)" };
                let tok = if written.copied.is_empty() {
                    String::new()
                } else {
                    format!(", copied {}", written.copied.join(", "))
                };
                Ok(format!("wrote {} ({files}{config}{tok})", out.display()))
            }
        }
    }
}
