//! GGUF files (llama.cpp, Ollama, LM Studio): [`GgufFile`] reads the header, the metadata key/values, the
//! tensor infos and the data section of a GGUF v2 or v3 file, checking every count, size and offset against
//! the file and [`Limits`] before allocating. Tensors are decoded to f32 by [`crate::ggml`].
//! [`llama`] maps llama-family tensor names and layouts to Hugging Face's.

pub mod llama;
mod reader;
mod tokenizer;
mod value;

pub use reader::MAX_ARRAY_DEPTH;

use crate::format::ggml::GgmlType;
use crate::io::Limits;
use crate::storage::SharedBytes;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A metadata value. Arrays hold values of one type.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

/// One tensor info: name, dimensions, type and where its data starts.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name in the file (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape in row-major order (the file's `ne` reversed: `[rows, cols]` for a matrix), as Hugging Face
    /// and numpy see it.
    pub shape: Vec<usize>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data within the file (data section start + the info's offset).
    pub start: usize,
    /// Bytes of data (whole blocks).
    pub len: usize,
}

/// The tokenizer stored in a GGUF's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model` (`gpt2` for byte-level BPE, `llama` for SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre` (pre-tokenizer name), if present.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges` (`"a b"` pairs, by rank), empty if absent.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`, by id, empty if absent.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, by id, empty if absent.
    pub scores: Vec<f32>,
    /// Special token ids, if present.
    pub bos_id: Option<u32>,
    /// End of sequence.
    pub eos_id: Option<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Padding.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`, if present.
    pub add_bos: Option<bool>,
    /// `tokenizer.chat_template` (Jinja), if present.
    pub chat_template: Option<String>,
}

/// A GGUF file, memory-mapped (or in memory), with its parsed header.
///
/// Parsing checks, before allocating anything a count or length declares: the magic, the version (2 or 3;
/// version 1 and big-endian files are refused by name), every string length, array count, metadata and
/// tensor count against the bytes that remain, nested arrays up to [`MAX_ARRAY_DEPTH`], unique metadata keys
/// and tensor names, `general.alignment` (a u32 power of two, default 32), at most 4 dimensions per tensor,
/// a ggml type id ggml defines, rows of whole blocks (`ne[0]` a multiple of the type's block), element counts
/// without overflow, [`Limits::max_tensor_bytes`] for each tensor as stored and as f32, aligned data offsets,
/// data inside the file and no two tensors' data overlapping. Dimensions of 0 are accepted (an empty
/// tensor), and so is `n_dims` = 0 (a scalar: shape `[]`, one element). Metadata is held in memory as
/// [`GgufValue`]s, at most 32 bytes per byte of file (a u8 array's elements). Types lowbit cannot decode (IQ*, TQ*, MXFP4, Q8_K, ...) parse; [`tensor_f32`](Self::tensor_f32)
/// then names the type.
///
/// Memory mapping: as for [`Checkpoint`](crate::io::Checkpoint), do not modify the file while it is open.
#[derive(Clone)]
pub struct GgufFile {
    path: PathBuf,
    /// The whole file, or (with `read_at`) a prefix holding its header.
    bytes: SharedBytes,
    /// Reads tensor data of a file that is not in memory ([`GgufFile::from_reader`]).
    read_at: Option<ReadAt>,
    version: u32,
    alignment: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    limits: Limits,
}

/// Reads `len` bytes at byte `offset` of a GGUF file that is not held in memory (a browser's buffer outside
/// the WASM heap, a file read on demand, an HTTP range request). It must return exactly `len` bytes, or an
/// error message.
pub type ReadAt = Arc<dyn Fn(usize, usize) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("bytes", &self.bytes.as_ref().as_ref().len())
            .field("read_at", &self.read_at.is_some())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("architecture", &self.architecture())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the GGUF file at `path` under [`Limits::DEFAULT`].
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        GgufFile::open_with_limits(path, Limits::DEFAULT)
    }

    /// [`open`](Self::open) under explicit limits.
    /// Directories, FIFOs, sockets and devices are refused by their file type before the file is opened.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<GgufFile> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        check_regular(path, &meta.file_type())?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        check_regular(path, &meta.file_type())?;
        let bytes: SharedBytes = if meta.len() == 0 {
            Arc::new(Vec::<u8>::new())
        } else {
            // SAFETY: the map is read-only and lowbit never writes the file. The borrowed slices stay valid
            // while the map (kept alive by the `Arc`) exists; what Rust cannot guard against is another
            // process truncating or rewriting the file in place meanwhile (a truncation makes reading the lost
            // pages raise SIGBUS). As for `Checkpoint` ("Memory mapping"): do not modify a file while it is
            // open, and use `from_shared` with a buffer where that cannot be ruled out.
            Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        GgufFile::parse(path.to_path_buf(), bytes, limits)
    }

    /// Parses GGUF bytes already in memory (or a map the caller made); [`path`](Self::path) is `<memory>`.
    pub fn from_shared(bytes: SharedBytes, limits: Limits) -> Result<GgufFile> {
        GgufFile::parse(PathBuf::from("<memory>"), bytes, limits)
    }

    /// A GGUF file of `file_len` bytes that is not held in memory, read through `read_at`: its header
    /// (metadata and tensor infos) is read and kept, tensor data are read on demand, so memory stays at the
    /// header plus the tensors being decoded. [`tensor_f32`](Self::tensor_f32) and
    /// [`tensor_bytes`](Self::tensor_bytes) read through `read_at`; [`tensor_data`](Self::tensor_data)
    /// serves only what lies in the header's bytes.
    ///
    /// The header is read as a prefix of 1 MiB, doubled while it does not parse, up to 64 MiB (a vocabulary
    /// of millions of tokens); a file whose header does not parse within that is an error with the parser's
    /// message. Errors also: a failed or short read.
    pub fn from_reader(file_len: usize, read_at: ReadAt, limits: Limits) -> Result<GgufFile> {
        GgufFile::from_reader_with(file_len, 1 << 20, read_at, limits)
    }

    /// [`from_reader`](Self::from_reader) whose first read is `first_read` bytes (at least 64), doubled
    /// while the header does not parse, up to 64 MiB.
    pub fn from_reader_with(file_len: usize, first_read: usize, read_at: ReadAt, limits: Limits) -> Result<GgufFile> {
        const MAX_HEADER: usize = 64 << 20;
        let path = PathBuf::from("<reader>");
        let ctx = format!("GGUF file {}", path.display());
        let mut n = first_read.clamp(64, MAX_HEADER).min(file_len);
        loop {
            let header = read_at(0, n).map_err(|e| Error::format(&ctx, format!("reading its first {n} bytes: {e}")))?;
            if header.len() != n {
                return Err(Error::format(&ctx, format!("reading its first {n} bytes: got {}", header.len())));
            }
            match reader::parse_with_len(&header, file_len, &limits, &ctx) {
                Ok(p) => return Ok(GgufFile::from_parsed(path, Arc::new(header), Some(read_at), p, limits)),
                // A header longer than the prefix reads as truncated: try a longer prefix.
                Err(_) if n < file_len.min(MAX_HEADER) => n = (n * 2).min(file_len).min(MAX_HEADER),
                Err(e) => return Err(e),
            }
        }
    }

    fn parse(path: PathBuf, bytes: SharedBytes, limits: Limits) -> Result<GgufFile> {
        let ctx = format!("GGUF file {}", path.display());
        let p = reader::parse((*bytes).as_ref(), &limits, &ctx)?;
        Ok(GgufFile::from_parsed(path, bytes, None, p, limits))
    }

    /// The file from its parsed header, its bytes (all of it, or the header with `read_at` for the rest).
    fn from_parsed(
        path: PathBuf,
        bytes: SharedBytes,
        read_at: Option<ReadAt>,
        p: reader::Parsed,
        limits: Limits,
    ) -> GgufFile {
        let index = p.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        GgufFile {
            path,
            bytes,
            read_at,
            version: p.version,
            alignment: p.alignment,
            metadata: p.metadata,
            tensors: p.tensors,
            index,
            limits,
        }
    }

    /// `GGUF file <path>`, the context of this file's errors.
    fn ctx(&self) -> String {
        format!("GGUF file {}", self.path.display())
    }

    /// The limits this file was parsed with (also applied by [`tensor_f32`](Self::tensor_f32)).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The path it was opened from, or `<memory>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file's bytes (shared with every view).
    pub fn bytes(&self) -> &SharedBytes {
        &self.bytes
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Every metadata key/value, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (`llama`, ...), if present.
    pub fn architecture(&self) -> Option<&str> {
        match self.get("general.architecture") {
            Some(GgufValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name` (a GGUF name).
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| {
            Error::format(
                self.ctx(),
                format!("no tensor `{name}` (the file has {} tensors; see GgufFile::tensors)", self.tensors.len()),
            )
        })
    }

    /// The stored bytes of tensor `name` (`len` bytes at `start`, checked against the file when it was parsed);
    /// an error if there is no such tensor.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_err(name)?;
        let bytes: &[u8] = (*self.bytes).as_ref();
        bytes.get(info.start..info.start + info.len).ok_or_else(|| {
            let why = if self.read_at.is_some() {
                "not in memory (this file is read on demand: use tensor_bytes or tensor_f32)"
            } else {
                "data past the end of the buffer (changed since parsing?)"
            };
            Error::format(self.ctx(), format!("tensor `{name}`: {why}"))
        })
    }

    /// Bytes `range` (relative to the tensor's data) of tensor `name`: borrowed from memory, or read through
    /// the [`ReadAt`] of a file opened with [`from_reader`](Self::from_reader). Errors: no such tensor, a
    /// range past its data, a failed or short read.
    pub fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> Result<std::borrow::Cow<'_, [u8]>> {
        let info = self.info_or_err(name)?;
        if range.start > range.end || range.end > info.len {
            return Err(Error::invalid(
                "byte range",
                format!("{range:?} of tensor `{name}`"),
                format!("a range within its {} bytes", info.len),
            ));
        }
        let (start, len) = (info.start + range.start, range.len());
        let bytes: &[u8] = (*self.bytes).as_ref();
        if let Some(b) = bytes.get(start..start + len) {
            return Ok(std::borrow::Cow::Borrowed(b));
        }
        let Some(read_at) = &self.read_at else {
            return Err(Error::format(
                self.ctx(),
                format!("tensor `{name}`: data past the end of the buffer (changed since parsing?)"),
            ));
        };
        let got = read_at(start, len).map_err(|e| {
            Error::format(self.ctx(), format!("reading {len} bytes of tensor `{name}` at {start}: {e}"))
        })?;
        if got.len() != len {
            return Err(Error::format(
                self.ctx(),
                format!("reading tensor `{name}`: got {} bytes at {start}, expected {len}", got.len()),
            ));
        }
        Ok(std::borrow::Cow::Owned(got))
    }

    /// Tensor `name` decoded to f32 (row-major, [`GgufTensorInfo::shape`]), as stored (no name or layout
    /// mapping; see [`llama`] for that). Every type lowbit decodes (F32, F16 and BF16 widened exactly, NaN
    /// payloads included, as numpy and so gguf-py do; the quantized types) goes through
    /// [`crate::ggml::dequantize`]. Errors: no such tensor, its f32 size above
    /// [`Limits::max_tensor_bytes`], or a type lowbit cannot decode ([`Error::Unsupported`] naming it).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info_or_err(name)?;
        let numel: usize = info.shape.iter().product();
        let ty = info.ggml_type;
        self.limits.check_elements(&format!("{}: tensor `{name}` as f32", self.ctx()), numel, 4)?;
        if !ty.can_dequantize() {
            return Err(Error::Unsupported {
                what: format!(
                    "decoding tensor `{name}` of {}: ggml type {ty} (lowbit decodes F32, F16, BF16, Q8_0, Q4_0, \
                     Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K)",
                    self.ctx()
                ),
            });
        }
        let data = self.tensor_bytes(name, 0..info.len)?;
        crate::ggml::dequantize(ty, &data, numel)
    }

    /// The tokenizer metadata; an error if the file has none (`tokenizer.ggml.model` / `tokens` missing), or
    /// a key has the wrong type (a [`Error::Format`] naming the key).
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        self.read_tokenizer()
    }

    fn typed<T>(&self, key: &str, expected: &str, conv: impl Fn(&GgufValue) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| {
                Error::format(
                    format!("{}: `{key}`", self.ctx()),
                    format!("is {} {v}, expected {expected}", v.type_description()),
                )
            }),
        }
    }

    /// Metadata `key` as a `u64` ([`GgufValue::as_u64`]: any non-negative integer): `None` if absent, an
    /// [`Error::Format`] naming the key if present with another type or a negative value.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// Metadata `key` as an `i64` ([`GgufValue::as_i64`]); errors as [`get_u64`](Self::get_u64).
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "an integer", GgufValue::as_i64)
    }

    /// Metadata `key` as an `f64` ([`GgufValue::as_f64`]: a float, or an integer f64 holds exactly); errors as
    /// [`get_u64`](Self::get_u64).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    /// Metadata `key` as a string; errors as [`get_u64`](Self::get_u64).
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::format(
                format!("{}: `{key}`", self.ctx()),
                format!("is {} {v}, expected a string", v.type_description()),
            )),
        }
    }

    /// Metadata `key` as a bool; errors as [`get_u64`](Self::get_u64).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }
}

/// Refuses anything but a regular file (or a link to one) by its type, before it is opened: opening a FIFO
/// would block and a directory or device cannot be mapped.
fn check_regular(path: &Path, ty: &std::fs::FileType) -> Result<()> {
    if ty.is_file() {
        return Ok(());
    }
    let kind = if ty.is_dir() { "a directory" } else { special_kind(ty) };
    Err(Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, expected a GGUF file (a regular file)"),
        ),
    ))
}

#[cfg(unix)]
fn special_kind(ty: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ty.is_fifo() {
        "a FIFO (named pipe)"
    } else if ty.is_socket() {
        "a socket"
    } else if ty.is_block_device() {
        "a block device"
    } else if ty.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}
