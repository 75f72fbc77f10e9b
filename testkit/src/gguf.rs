//! A small GGUF writer for tests and fuzz seeds: version, alignment, metadata of every type and tensors given
//! as (name, ggml type, row-major shape, raw bytes), written to a `Vec<u8>` laid out as gguf-py's
//! `GGUFWriter` lays it out (little-endian, each tensor's data padded to the alignment). It can also write
//! what a valid file must not hold (any version, raw tensor infos with any type id, dims and offset, raw
//! metadata bytes, duplicates), for hostile-input tests.
//!
//! ```
//! use lowbit::format::ggml::GgmlType;
//! use lowbit::io::gguf::{GgufFile, GgufValue};
//! use lowbit_testkit::gguf::GgufWriter;
//!
//! let bytes = GgufWriter::new()
//!     .kv("general.architecture", GgufValue::String("llama".into()))
//!     .tensor("w", GgmlType::F32, &[2, 3], [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect())
//!     .to_bytes();
//! assert_eq!(&bytes[..4], b"GGUF");
//! ```

use lowbit::format::ggml::GgmlType;
use lowbit::io::gguf::GgufValue;

/// `GGUF` as the first four bytes of every file.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// A tensor info exactly as written: any type id, any `ne` (file order: `ne[0]` is the row length), an
/// explicit data offset (relative to the data section) or `None` for the next aligned one, and the bytes to
/// place there.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    /// The name written.
    pub name: String,
    /// The ggml type id written (need not be one ggml defines).
    pub type_id: u32,
    /// `ne`, fastest-varying first (the reverse of a row-major shape). Its length is written as `n_dims`.
    pub ne: Vec<u64>,
    /// The offset written; `None` places the data after the previous tensor's, padded to the alignment.
    pub offset: Option<u64>,
    /// The data bytes written into the data section (an explicit `offset` does not move them: they are
    /// always appended in order).
    pub data: Vec<u8>,
}

/// Where the sections of a written file start (byte offsets), for tests that cut or patch a file at a
/// section boundary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// End of magic, version and the two counts (24 for v2/v3).
    pub header_end: usize,
    /// Start of each metadata key/value.
    pub kv_starts: Vec<usize>,
    /// Start of each tensor info.
    pub info_starts: Vec<usize>,
    /// End of the last tensor info.
    pub infos_end: usize,
    /// Start of the data section (`infos_end` rounded up to the alignment).
    pub data_start: usize,
    /// Absolute start of each tensor's data.
    pub tensor_starts: Vec<usize>,
    /// Total length.
    pub len: usize,
}

/// A GGUF file under construction (see the module docs). Defaults: version 3, alignment 32 (no
/// `general.alignment` key), no metadata, no tensors.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: usize,
    /// (key, type id, encoded value without the type id).
    metadata: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<RawTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file with the default alignment of 32.
    pub fn new() -> GgufWriter {
        GgufWriter { version: 3, alignment: 32, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Writes `version` in the header (any value; the layout written is always v2/v3's).
    pub fn version(mut self, version: u32) -> GgufWriter {
        self.version = version;
        self
    }

    /// Writes `general.alignment = alignment` (u32) and pads the data section and each tensor to it.
    /// Panics unless `alignment` is a power of two (write a bad one with [`kv`](Self::kv)).
    pub fn alignment(mut self, alignment: u32) -> GgufWriter {
        assert!(alignment.is_power_of_two(), "GgufWriter::alignment({alignment}): use kv() to write a bad one");
        self.alignment = alignment as usize;
        self.kv("general.alignment", GgufValue::U32(alignment))
    }

    /// Adds a metadata key/value (duplicates are written as given). An array's element type is its first
    /// element's; an empty array is written as an array of u8. Panics on an array whose elements differ in
    /// type (GGUF cannot encode it).
    pub fn kv(mut self, key: &str, value: GgufValue) -> GgufWriter {
        let mut payload = Vec::new();
        encode_value(&value, &mut payload);
        self.metadata.push((key.to_string(), value.type_id(), payload));
        self
    }

    /// Adds a metadata key with any type id and any payload bytes (written after the type id), for hostile
    /// files.
    pub fn kv_raw(mut self, key: &str, type_id: u32, payload: Vec<u8>) -> GgufWriter {
        self.metadata.push((key.to_string(), type_id, payload));
        self
    }

    /// Adds a tensor of type `ty` with row-major `shape` (written as `ne` = `shape` reversed) and its stored
    /// bytes, at the next aligned offset. Nothing is checked: a wrong length makes a hostile file.
    pub fn tensor(self, name: &str, ty: GgmlType, shape: &[usize], data: Vec<u8>) -> GgufWriter {
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.raw_tensor(RawTensor { name: name.to_string(), type_id: ty.id(), ne, offset: None, data })
    }

    /// Adds a tensor info written exactly as given.
    pub fn raw_tensor(mut self, tensor: RawTensor) -> GgufWriter {
        self.tensors.push(tensor);
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with_layout().0
    }

    /// The file's bytes and where its sections start.
    pub fn to_bytes_with_layout(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        let mut layout = Layout::default();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        layout.header_end = out.len();
        for (key, type_id, payload) in &self.metadata {
            layout.kv_starts.push(out.len());
            write_str(&mut out, key);
            out.extend_from_slice(&type_id.to_le_bytes());
            out.extend_from_slice(payload);
        }
        // Offsets relative to the data section: each tensor's data padded to the alignment, as gguf-py does.
        let mut rel = 0u64;
        let mut data_offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            layout.info_starts.push(out.len());
            write_str(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(rel).to_le_bytes());
            data_offsets.push(rel);
            rel += pad_len(t.data.len(), self.alignment) as u64;
        }
        layout.infos_end = out.len();
        out.resize(pad_len(out.len(), self.alignment), 0);
        layout.data_start = out.len();
        for (t, rel) in self.tensors.iter().zip(data_offsets) {
            layout.tensor_starts.push(layout.data_start + rel as usize);
            out.extend_from_slice(&t.data);
            out.resize(pad_len(out.len(), self.alignment), 0);
        }
        layout.len = out.len();
        (out, layout)
    }
}

/// `n` rounded up to a multiple of `align`.
fn pad_len(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes `value` without its leading type id (an array: element type, count, elements).
pub fn encode_value(value: &GgufValue, out: &mut Vec<u8>) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::Array(items) => {
            let elem = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                assert_eq!(item.type_id(), elem, "GGUF arrays hold one type: {items:?}");
                encode_value(item, out);
            }
        }
    }
}

/// Little-endian bytes of f32 values (an F32 tensor's data).
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An array of strings (`tokenizer.ggml.tokens`, `merges`).
pub fn strings<S: AsRef<str>>(items: &[S]) -> GgufValue {
    GgufValue::Array(items.iter().map(|s| GgufValue::String(s.as_ref().to_string())).collect())
}
