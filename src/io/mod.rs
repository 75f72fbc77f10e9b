//! Reading and writing tensors in safetensors files (the `io` feature, on by default).
//!
//! * [`Checkpoint`] opens a safetensors file, a Hugging Face model directory or a sharded directory, memory-maps
//!   each file once and builds [`QuantLinear`](crate::linear::QuantLinear) layers whose packed codes are views of
//!   the mapped pages (no copy). Layout detection ([`Layout`]: bitsandbytes 4-bit, lowbit int8, dense), the bias
//!   rule and the [`Limits`] live there once; the older loaders below share the same code.
//! * [`SafetensorsFile`] memory-maps a file and validates its header (no unbounded allocation on corrupt
//!   input: safetensors checks every offset against the file length before anything is read).
//! * [`write_safetensors`] writes to a temporary file next to the destination and moves it into place without
//!   replacing anything that appeared meanwhile ([`atomic`]), so a failed or interrupted write never leaves a
//!   partial output.
//! * [`bnb`]: the bitsandbytes 4-bit layout.
//! * [`Limits`]: resource limits for untrusted files (header and JSON size, JSON depth, tensor size), checked
//!   before anything proportional to a declared size is allocated or parsed.

pub mod atomic;
pub mod bnb;
mod checkpoint;
pub mod gguf;
pub mod int8;
mod limits;
pub mod peft;
mod peft_write;
pub mod small_file;
mod source;
pub mod stream_writer;

pub use checkpoint::{Checkpoint, Layout, StoredType, TensorInfo, HF_INDEX_FILE, HF_WEIGHTS_FILE};
pub use limits::Limits;
pub use stream_writer::SafetensorsWriter;

use crate::{DType, Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An owned tensor ready to be written: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// safetensors element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw little-endian bytes (`numel * dtype size`).
    pub data: Vec<u8>,
}

impl TensorData {
    /// A tensor from a slice of plain values (`f32`, `u8`, `f16`, ...).
    pub fn from_slice<T: bytemuck::Pod>(dtype: Dtype, shape: Vec<usize>, values: &[T]) -> TensorData {
        TensorData { dtype, shape, data: bytemuck::cast_slice(values).to_vec() }
    }

    /// Copies a tensor view (e.g. one read from a [`SafetensorsFile`]).
    pub fn from_view(view: &safetensors::tensor::TensorView<'_>) -> TensorData {
        TensorData { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() }
    }
}

impl safetensors::View for &TensorData {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The lowbit [`DType`] for a floating safetensors dtype (`F32`, `F16`, `BF16`), or `None`.
pub fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The safetensors dtype for a lowbit [`DType`].
pub fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Decodes a floating tensor view (F32/F16/BF16, any alignment) to f32.
pub fn view_to_f32(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    source::bytes_to_f32(name, view.dtype(), view.data())
}

/// A memory-mapped safetensors file, parsed on demand ([`tensors`](Self::tensors) borrows the map). For
/// quantized layers that share the map, see [`Checkpoint`].
pub struct SafetensorsFile {
    path: PathBuf,
    // Declared before the map it borrows from is dropped (see `tensors`).
    map: memmap2::Mmap,
    limits: Limits,
}

impl SafetensorsFile {
    /// Maps `path` read-only and validates its header under [`Limits::DEFAULT`]. The file is never modified.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        SafetensorsFile::open_with_limits(path, Limits::DEFAULT)
    }

    /// [`open`](Self::open) with explicit limits (header JSON size and depth, largest tensor; see
    /// [`parse_safetensors_with_limits`]), kept for later calls to [`tensors`](Self::tensors).
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and lowbit never writes the file. Another process truncating or
        // rewriting the file while it is mapped would change or remove bytes under the borrowed slices (a
        // truncation makes reading the lost pages raise SIGBUS); that is outside what Rust can guard against and
        // is documented on `Checkpoint` ("Memory mapping"): do not modify a checkpoint file while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let f = SafetensorsFile { path, map, limits };
        f.tensors()?; // validate the header now
        Ok(f)
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits this file was opened with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The parsed file (header validated against the file length and the limits).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        parse_with_context(&self.map, &self.limits, &format!("safetensors file {}", self.path.display()))
    }

    /// The `__metadata__` string map of the header (empty if absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let ctx = format!("safetensors file {}", self.path.display());
        check_header(&self.map, &self.limits, &ctx)?;
        let (_, meta) = SafeTensors::read_metadata(&self.map).map_err(|e| Error::format(&ctx, e.to_string()))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }
}

/// Parses safetensors bytes already in memory under [`Limits::DEFAULT`] (see
/// [`parse_safetensors_with_limits`]).
pub fn parse_safetensors(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    parse_safetensors_with_limits(bytes, &Limits::DEFAULT)
}

/// Parses safetensors bytes already in memory. Before the header is parsed, its declared length is checked
/// against [`Limits::max_json_bytes`] and against the bytes actually present, and its nesting against
/// [`Limits::max_json_depth`]; the `safetensors` crate then checks every tensor's shape (overflow-checked)
/// and offsets against the buffer; finally every tensor is checked against [`Limits::max_tensor_bytes`].
/// Nothing is allocated in proportion to a declared size. Errors are [`Error::Format`].
pub fn parse_safetensors_with_limits<'a>(bytes: &'a [u8], limits: &Limits) -> Result<SafeTensors<'a>> {
    parse_with_context(bytes, limits, "safetensors buffer")
}

/// The 8-byte little-endian header length of the safetensors format.
const HEADER_LEN_BYTES: usize = 8;

/// Checks the header's declared length against the limits and the bytes present, and its JSON depth.
pub(crate) fn check_header(bytes: &[u8], limits: &Limits, ctx: &str) -> Result<()> {
    let Some(len) = bytes.get(..HEADER_LEN_BYTES) else {
        return Err(Error::format(ctx, format!("{} bytes, shorter than the 8-byte header length", bytes.len())));
    };
    let declared = u64::from_le_bytes(len.try_into().unwrap_or([0xff; 8]));
    let present = bytes.len() - HEADER_LEN_BYTES;
    if declared > limits.max_json_bytes as u64 {
        return Err(Error::format(
            ctx,
            format!(
                "header declares {declared} bytes of JSON, more than the limit of {} (Limits::max_json_bytes)",
                limits.max_json_bytes
            ),
        ));
    }
    if declared > present as u64 {
        return Err(Error::format(ctx, format!("header declares {declared} bytes but only {present} follow")));
    }
    // `declared <= present`, so it fits in usize.
    limits.check_json(&format!("{ctx} header"), &bytes[HEADER_LEN_BYTES..HEADER_LEN_BYTES + declared as usize])
}

pub(crate) fn parse_with_context<'a>(bytes: &'a [u8], limits: &Limits, ctx: &str) -> Result<SafeTensors<'a>> {
    check_header(bytes, limits, ctx)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(ctx, e.to_string()))?;
    for (name, view) in st.iter() {
        limits.check_tensor_bytes(&format!("{ctx}: tensor `{name}`"), view.data().len())?;
    }
    Ok(st)
}

/// The largest header the `safetensors` crate accepts when reading (its `MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Checks that a tensor's byte length matches its dtype and shape (what every safetensors writer checks
/// before writing it).
fn check_tensor_bytes(name: &str, t: &TensorData) -> Result<()> {
    let ctx = "safetensors output";
    let numel = crate::shape::numel(&t.shape).map_err(|e| Error::format(ctx, format!("`{name}`: {e}")))?;
    let expected = numel.checked_mul(t.dtype.bitsize()).map(|b| b.div_ceil(8));
    if expected != Some(t.data.len()) {
        return Err(Error::format(
            ctx,
            format!(
                "tensor `{name}` has {} bytes; expected {expected:?} for {:?} {:?}",
                t.data.len(),
                t.dtype,
                t.shape
            ),
        ));
    }
    Ok(())
}

/// The JSON header for `infos` (data offsets already assigned) and `metadata`, padded with spaces to a
/// multiple of 8; errors past [`MAX_HEADER_BYTES`].
fn header_json(
    metadata: Option<HashMap<String, String>>,
    infos: Vec<(String, safetensors::tensor::TensorInfo)>,
) -> Result<Vec<u8>> {
    let ctx = "safetensors output";
    let meta = safetensors::tensor::Metadata::new(None, infos).map_err(|e| Error::format(ctx, e.to_string()))?;
    let tensors = serde_json::to_string(&meta).map_err(|e| Error::format(ctx, e.to_string()))?;
    // `__metadata__` first, its keys sorted, so the same conversion always writes the same bytes (a HashMap
    // would serialize in a different order in every process).
    let mut json = match metadata.filter(|m| !m.is_empty()) {
        None => tensors.into_bytes(),
        Some(m) => {
            let sorted: std::collections::BTreeMap<String, String> = m.into_iter().collect();
            let m = serde_json::to_string(&sorted).map_err(|e| Error::format(ctx, e.to_string()))?;
            let rest = tensors.strip_prefix('{').unwrap_or(&tensors);
            let sep = if rest.starts_with('}') { "" } else { "," };
            format!("{{\"__metadata__\":{m}{sep}{rest}").into_bytes()
        }
    };
    json.resize(json.len().next_multiple_of(HEADER_LEN_BYTES), b' ');
    if json.len() > MAX_HEADER_BYTES {
        return Err(Error::format(
            ctx,
            format!("header of {} bytes; readers accept at most {MAX_HEADER_BYTES}", json.len()),
        ));
    }
    Ok(json)
}

/// The header of a safetensors file holding `tensors` (the 8-byte length, then the JSON padded with spaces to
/// a multiple of 8) and the order their data follows in: by descending dtype alignment, then by name, exactly
/// as the `safetensors` crate lays a file out.
fn safetensors_header(
    tensors: &[(String, TensorData)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[b].1.dtype.cmp(&tensors[a].1.dtype).then(tensors[a].0.cmp(&tensors[b].0)));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &i in &order {
        let (name, t) = &tensors[i];
        check_tensor_bytes(name, t)?;
        let end = offset + t.data.len();
        infos.push((
            name.clone(),
            safetensors::tensor::TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, end) },
        ));
        offset = end;
    }
    let json = header_json(metadata, infos)?;
    let mut header = Vec::with_capacity(HEADER_LEN_BYTES + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    Ok((header, order))
}

/// Serializes tensors and metadata to safetensors bytes (the layout [`write_safetensors`] writes).
pub fn serialize_safetensors(
    tensors: &[(String, TensorData)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let (header, order) = safetensors_header(tensors, metadata)?;
    let total = header.len() + tensors.iter().map(|(_, t)| t.data.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header);
    for i in order {
        out.extend_from_slice(&tensors[i].1.data);
    }
    Ok(out)
}

/// Writes tensors to `path` atomically ([`atomic::TempFile`]): a registered temporary file in the same directory
/// (`.NAME.lowbit-tmp.PID.N`), written, flushed to disk (`fsync`) and moved into place, so a failed write never
/// leaves a partial output. The file is created with the default permissions (`0o666` less the process umask),
/// like any file a tool creates, not `0o600`. Without `overwrite`, an existing `path` is refused, also when it
/// appears during the write (hard link + unlink, no replace); with `overwrite`, only a regular file is replaced.
/// I/O errors read `writing PATH: <os error>`.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorData)],
    metadata: Option<HashMap<String, String>>,
    overwrite: bool,
) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(_) if !overwrite => {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output exists; pass --force (overwrite) to replace it",
                ),
            ))
        }
        Ok(m) if !(m.file_type().is_file() || m.file_type().is_symlink()) => {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("is {}; --force replaces only regular files", atomic::describe_file_type(&m)),
                ),
            ))
        }
        _ => {}
    }
    let (header, order) = safetensors_header(tensors, metadata)?;
    let mut tmp = atomic::TempFile::create_for(path)?;
    let tmp_path = tmp.path().to_path_buf();
    let io = |e| atomic::write_error(&tmp_path, e);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.file());
    w.write_all(&header).map_err(io)?;
    for i in order {
        w.write_all(&tensors[i].1.data).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    tmp.persist(overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, TensorData)> {
        vec![
            ("b.codes".into(), TensorData::from_slice(Dtype::U8, vec![3, 1], &[1u8, 2, 3])),
            ("a.weight".into(), TensorData::from_slice(Dtype::F32, vec![2], &[0.5f32, -1.0])),
            ("c.half".into(), TensorData::from_slice(Dtype::BF16, vec![1, 2], &[7u16, 9])),
            ("d.ids".into(), TensorData::from_slice(Dtype::I64, vec![1], &[42i64])),
        ]
    }

    #[test]
    fn serialize_is_byte_identical_to_the_safetensors_crate() {
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
        for m in [None, Some(meta)] {
            let ours = serialize_safetensors(&tensors(), m.clone()).unwrap();
            let theirs = safetensors::serialize(tensors().iter().map(|(n, t)| (n.as_str(), t)), m).unwrap();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_tensor_whose_bytes_do_not_match_its_shape_is_an_error() {
        let mut t = tensors();
        t[1].1.shape = vec![3];
        let err = serialize_safetensors(&t, None).unwrap_err().to_string();
        assert!(err.contains("a.weight") && err.contains("8 bytes"), "{err}");
    }
}
