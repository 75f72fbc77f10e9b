//! [`SafetensorsWriter`]: a safetensors file written tensor by tensor, so that a conversion holds one tensor
//! in memory, never the whole output.
//!
//! The header must precede the data but is only known at the end, so the writer reserves room for it at the
//! start of the file (the caller's estimate, [`SafetensorsWriter::header_estimate`]) and writes each tensor's
//! bytes after that room as they come. [`finish`](SafetensorsWriter::finish) writes the header into the room,
//! padded with spaces (the format allows trailing whitespace in the header), or, when the header outgrew the
//! estimate, writes a second file with the header and copies the data after it in the kernel
//! (`copy_file_range` on Linux): memory stays flat either way. Tensors are stored in the order pushed. The
//! file is a registered temporary next to the destination until it is complete, synced and moved into place
//! ([`atomic::TempFile::persist`]), so an interrupted conversion leaves nothing behind.
//!
//! A tensor too large to hold is written in pieces: [`begin`](SafetensorsWriter::begin) declares its name,
//! dtype and shape (so its length is known), [`write`](SafetensorsWriter::write) appends bytes as they are
//! converted, and [`end`](SafetensorsWriter::end) checks that exactly the declared length arrived.

use super::atomic::{self, TempFile};
use super::{check_tensor_bytes, header_json, TensorData, HEADER_LEN_BYTES as LEN_BYTES, MAX_HEADER_BYTES};
use crate::error::{Error, Result};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest single `write` of tensor data.
const WRITE_CHUNK: usize = 1 << 20;

/// A safetensors file being written; see the module docs.
#[derive(Debug)]
pub struct SafetensorsWriter {
    dest: PathBuf,
    tmp: TempFile,
    /// Bytes reserved before the data: the 8-byte length plus room for the JSON header (a multiple of 8).
    reserved: usize,
    entries: Vec<(String, TensorInfo)>,
    /// The names in `entries` (a duplicate check that stays linear in the number of tensors).
    seen: HashSet<String>,
    data_bytes: usize,
    metadata: HashMap<String, String>,
    /// The tensor being written in pieces: its name, info and the bytes still expected.
    open: Option<(String, TensorInfo, usize)>,
}

impl SafetensorsWriter {
    /// A header estimate for tensors named `names` (each possibly stored as several entries, e.g. a
    /// quantized weight and its parameters: up to 8 entries of the name plus a suffix, a 4-D shape and two
    /// 20-digit offsets) plus `metadata_bytes` of `__metadata__`. Generous by design: the cost of a bad guess
    /// is one in-kernel copy of the data at [`finish`](Self::finish), the cost of a generous one a few unused
    /// bytes per tensor.
    pub fn header_estimate<'a>(names: impl IntoIterator<Item = &'a str>, metadata_bytes: usize) -> usize {
        let per_name: usize = names.into_iter().map(|n| 8 * (n.len() + 48 + 160)).sum();
        (per_name + 2 * metadata_bytes + 4096).min(MAX_HEADER_BYTES)
    }

    /// Starts the file for `dest` (a registered temporary next to it; `dest` is not touched before
    /// [`finish`](Self::finish)), reserving `header_estimate` bytes for the header.
    pub fn create(dest: &Path, header_estimate: usize) -> Result<SafetensorsWriter> {
        let mut tmp = TempFile::create_for(dest)?;
        let reserved = LEN_BYTES + header_estimate.min(MAX_HEADER_BYTES).next_multiple_of(LEN_BYTES);
        let path = tmp.path().to_path_buf();
        tmp.file().seek(SeekFrom::Start(reserved as u64)).map_err(|e| atomic::write_error(&path, e))?;
        Ok(SafetensorsWriter {
            dest: dest.to_path_buf(),
            tmp,
            reserved,
            entries: Vec::new(),
            seen: HashSet::new(),
            data_bytes: 0,
            metadata: HashMap::new(),
            open: None,
        })
    }

    /// Appends one tensor. Errors (nothing written) when its byte length does not match its dtype and
    /// shape, or the name is already in the file; a write error names the temporary.
    pub fn push(&mut self, name: &str, t: &TensorData) -> Result<()> {
        check_tensor_bytes(name, t)?;
        self.begin(name, t.dtype, t.shape.clone())?;
        self.write(&t.data)?;
        self.end()
    }

    /// Starts tensor `name` of `dtype` and `shape`, whose bytes follow through [`write`](Self::write).
    /// Errors when another tensor is still open, the name is already in the file, or the shape's byte length
    /// overflows.
    pub fn begin(&mut self, name: &str, dtype: Dtype, shape: Vec<usize>) -> Result<()> {
        if let Some((open, ..)) = &self.open {
            return Err(Error::format(
                "safetensors output",
                format!("tensor `{name}` started while `{open}` is still being written"),
            ));
        }
        if self.seen.contains(name) {
            return Err(Error::format("safetensors output", format!("tensor `{name}` written twice")));
        }
        let len = crate::shape::numel(&shape)
            .ok()
            .and_then(|n| n.checked_mul(dtype.bitsize()))
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| {
                Error::format("safetensors output", format!("tensor `{name}`: {dtype:?} {shape:?} overflows usize"))
            })?;
        let start = self.data_bytes;
        let info = TensorInfo { dtype, shape, data_offsets: (start, start + len) };
        self.open = Some((name.to_string(), info, len));
        Ok(())
    }

    /// Appends bytes of the open tensor. Errors when no tensor is open or `bytes` runs past its declared
    /// length; a write error names the temporary.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((name, _, left)) = &mut self.open else {
            return Err(Error::format("safetensors output", "bytes written with no tensor started"));
        };
        if bytes.len() > *left {
            return Err(Error::format(
                "safetensors output",
                format!("tensor `{name}`: {} more bytes than its dtype and shape hold", bytes.len() - *left),
            ));
        }
        *left -= bytes.len();
        let path = self.tmp.path().to_path_buf();
        // In pieces of WRITE_CHUNK: one huge write() is several times slower into the page cache (measured on
        // Linux/ext4: 4 GiB in 128 MiB writes 0.4 GB/s, in 1 MiB writes 4.4 GB/s).
        for piece in bytes.chunks(WRITE_CHUNK) {
            self.tmp.file().write_all(piece).map_err(|e| atomic::write_error(&path, e))?;
        }
        self.data_bytes += bytes.len();
        Ok(())
    }

    /// Completes the open tensor. Errors when none is open or fewer bytes arrived than it holds.
    pub fn end(&mut self) -> Result<()> {
        match self.open.take() {
            None => Err(Error::format("safetensors output", "end() with no tensor started")),
            Some((name, _, left)) if left > 0 => {
                Err(Error::format("safetensors output", format!("tensor `{name}` ended {left} bytes short")))
            }
            Some((name, info, _)) => {
                self.seen.insert(name.clone());
                self.entries.push((name, info));
                Ok(())
            }
        }
    }

    /// Adds `__metadata__` entries.
    pub fn extend_metadata(&mut self, entries: impl IntoIterator<Item = (String, String)>) {
        self.metadata.extend(entries);
    }

    /// Bytes of tensor data written so far.
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Names of the tensors written so far, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Writes the header, syncs, and moves the file to its destination (replacing an existing regular file
    /// only with `replace`; see [`atomic::persist_file`]). Returns the size of the file.
    pub fn finish(self, replace: bool) -> Result<u64> {
        let ctx = "safetensors output";
        if let Some((name, ..)) = &self.open {
            return Err(Error::format(ctx, format!("finished while tensor `{name}` is still being written")));
        }
        let SafetensorsWriter { dest, mut tmp, reserved, entries, data_bytes, metadata, .. } = self;
        let metadata = if metadata.is_empty() { None } else { Some(metadata) };
        let mut json = header_json(metadata, entries)?;
        let path = tmp.path().to_path_buf();
        let io = |e| atomic::write_error(&path, e);
        if LEN_BYTES + json.len() <= reserved {
            json.resize(reserved - LEN_BYTES, b' ');
            let f = tmp.file();
            f.seek(SeekFrom::Start(0)).map_err(io)?;
            f.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            tmp.persist(replace)?;
            return Ok((reserved + data_bytes) as u64);
        }
        // The header outgrew its room: a second temporary with the header, then the data copied after it.
        let mut out = TempFile::create_for(&dest)?;
        let out_path = out.path().to_path_buf();
        let oio = |e| atomic::write_error(&out_path, e);
        out.file().write_all(&(json.len() as u64).to_le_bytes()).map_err(oio)?;
        out.file().write_all(&json).map_err(oio)?;
        let src = tmp.file();
        src.seek(SeekFrom::Start(reserved as u64)).map_err(io)?;
        let mut src = std::io::Read::take(&*src, data_bytes as u64);
        let copied = std::io::copy(&mut src, out.file()).map_err(oio)?;
        if copied != data_bytes as u64 {
            return Err(Error::format(
                ctx,
                format!("copied {copied} of {data_bytes} data bytes from {}", path.display()),
            ));
        }
        drop(tmp);
        out.persist(replace)?;
        Ok((LEN_BYTES + json.len() + data_bytes) as u64)
    }
}
