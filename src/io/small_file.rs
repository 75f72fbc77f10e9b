//! Reading small files (configs, JSON) with a byte cap, only from regular files.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// `Error::io` for `path` with the operation named (`reading`), never "malformed".
fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(path, std::io::Error::new(e.kind(), format!("reading {what}: {e}")))
}

/// Reads the file at `path` (the `what` of messages, e.g. "adapter config") if it is at most `cap` bytes.
///
/// The file type is checked before the file is opened for reading (so a FIFO never blocks): a regular file,
/// or a symlink to one, is accepted; a directory, a FIFO, a socket or a device (`/dev/zero`) is an error
/// ("is a FIFO, expected a regular file"). At most `cap + 1` bytes are read whatever size the file claims
/// (files in `/proc` report 0), so memory is bounded by `cap`; a longer file is an [`Error::Format`]. I/O
/// errors are [`Error::Io`] naming the path and saying "reading".
pub fn read_capped(path: &Path, cap: usize, what: &str) -> Result<Vec<u8>> {
    // `metadata` follows symlinks: the type of what would be opened.
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, what, e))?;
    if !meta.file_type().is_file() {
        let kind = super::atomic::describe_file_type(&meta);
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} is {kind}, expected a regular file")),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| io_err(path, what, e))?;
    let cap64 = cap as u64;
    let hint = meta.len().min(cap64) as usize;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(hint).map_err(|e| io_err(path, what, std::io::Error::other(e.to_string())))?;
    file.take(cap64.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| io_err(path, what, e))?;
    if bytes.len() > cap {
        return Err(Error::format(
            path.display().to_string(),
            format!("{what} is more than {cap} bytes, the most accepted (Limits::max_json_bytes)"),
        ));
    }
    Ok(bytes)
}
