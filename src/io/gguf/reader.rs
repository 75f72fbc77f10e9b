//! The GGUF v2/v3 parser: header, metadata key/values, tensor infos, alignment and data offsets. Every count
//! and length is checked against the bytes that remain before anything is allocated for it, so what a file
//! makes the parser allocate is bounded by the file's size (a metadata value takes at most
//! `size_of::<GgufValue>()` = 32 bytes of memory per byte of file).

use super::value::{min_encoded_size, TYPE_ARRAY, TYPE_STRING};
use super::{GgufTensorInfo, GgufValue};
use crate::format::ggml::GgmlType;
use crate::io::Limits;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// The first four bytes of every GGUF file.
pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
/// `GGML_MAX_DIMS`: a tensor info has at most this many dimensions.
pub(crate) const MAX_DIMS: u32 = 4;
/// `GGUF_DEFAULT_ALIGNMENT`, used when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: usize = 32;
/// Deepest nesting of metadata arrays accepted (an array of arrays has depth 2). Real files use 1; the
/// bound keeps the recursive parser's stack small whatever the file holds.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Fewest bytes a metadata key/value takes: key length (8), key (≥ 0), type (4), value (≥ 1).
const MIN_KV_BYTES: usize = 13;
/// Fewest bytes a tensor info takes: name length (8), name (≥ 0), n_dims (4), ne (≥ 0), type (4), offset (8).
const MIN_INFO_BYTES: usize = 24;

/// What [`parse`] found.
pub(crate) struct Parsed {
    pub version: u32,
    pub alignment: usize,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

/// A read position in the file; every read checks the bytes that remain and names what it was reading.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    ctx: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err(&self, detail: String) -> Error {
        Error::format(self.ctx, detail)
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{} needs {n} bytes at offset {}, but the file ends {} bytes later (truncated?)",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8 (checked against the bytes present first).
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{} (at offset {at}) declares {len} bytes, but only {} remain in the file",
                what(),
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{} (at offset {at}) is not valid UTF-8: {e}", what())))
    }

    /// A count of `min_size`-byte items: at most what the remaining bytes can hold.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(&|| format!("the count of {}", what()))?;
        let fits = self.remaining() / min_size;
        if n > fits as u64 {
            return Err(self.err(format!(
                "{} (at offset {at}): {n} declared, but the {} bytes left hold at most {fits} (each takes at \
                 least {min_size} bytes)",
                what(),
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    /// One value of GGUF type `type_id`; arrays recurse up to [`MAX_ARRAY_DEPTH`].
    fn value(&mut self, type_id: u32, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(
                            self.err(format!("{} (at offset {at}) is a bool of byte {b}, expected 0 or 1", what()))
                        )
                    }
                }
            }
            TYPE_STRING => GgufValue::String(self.string(what)?),
            TYPE_ARRAY => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{} (at offset {at}) nests arrays deeper than {MAX_ARRAY_DEPTH} levels",
                        what()
                    )));
                }
                let elem = self.u32(&|| format!("the element type of {}", what()))?;
                let Some(min) = min_encoded_size(elem) else {
                    return Err(self.err(format!(
                        "{} (at offset {at}) is an array of value type id {elem}, which GGUF does not define \
                         (0..=12)",
                        what()
                    )));
                };
                let n = self.count(min, &|| format!("elements of {}", what()))?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(items)
            }
            other => {
                return Err(
                    self.err(format!("{} has value type id {other}, which GGUF does not define (0..=12)", what()))
                )
            }
        })
    }
}

/// Parses a whole GGUF file. `ctx` names it in errors (`GGUF file model.gguf`).
pub(crate) fn parse(buf: &[u8], limits: &Limits, ctx: &str) -> Result<Parsed> {
    parse_with_len(buf, buf.len(), limits, ctx)
}

/// Parses the header in `buf` (the whole file, or a prefix holding at least its header) of a GGUF file of
/// `file_len` bytes: tensor data are checked against `file_len`, and only the header is read.
pub(crate) fn parse_with_len(buf: &[u8], file_len: usize, limits: &Limits, ctx: &str) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, ctx };
    let magic = c.take(4, &|| "the magic".into())?;
    if magic != MAGIC {
        return Err(c.err(format!(
            "starts with {:?}, expected the GGUF magic \"GGUF\" (is this a GGUF file?)",
            String::from_utf8_lossy(magic)
        )));
    }
    let version = c.u32(&|| "the version".into())?;
    if version & 0xffff == 0 && (1..=3).contains(&version.swap_bytes()) {
        return Err(c.err(format!(
            "is a big-endian GGUF (version {} stored big-endian); lowbit reads little-endian GGUF only (convert \
             it with gguf-py's gguf_convert_endian.py)",
            version.swap_bytes()
        )));
    }
    match version {
        2 | 3 => {}
        1 => {
            return Err(c.err(
                "is GGUF version 1 (32-bit counts, 2023); lowbit reads versions 2 and 3: re-convert the model \
                 with a current llama.cpp"
                    .into(),
            ))
        }
        v => return Err(c.err(format!("is GGUF version {v}; lowbit reads versions 2 and 3"))),
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata key/value count".into())?;
    let left = c.remaining() as u64;
    if n_kv > left / MIN_KV_BYTES as u64 {
        return Err(c.err(format!(
            "declares {n_kv} metadata key/values, but the {left} bytes after the header hold at most {} (each \
             takes at least {MIN_KV_BYTES} bytes)",
            left / MIN_KV_BYTES as u64
        )));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.u32(&|| format!("the value type of metadata key `{key}`"))?;
        let value = c.value(ty, 0, &|| format!("metadata value `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(
                c.err(format!("metadata key `{key}` appears twice (again at offset {at}); keys must be unique"))
            );
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(v) => {
            return Err(c.err(format!(
                "`general.alignment` is {} {v}, expected a u32 power of two (default {DEFAULT_ALIGNMENT})",
                v.type_description()
            )))
        }
    };
    let left = c.remaining() as u64;
    if n_tensors > left / MIN_INFO_BYTES as u64 {
        return Err(c.err(format!(
            "declares {n_tensors} tensors, but the {left} bytes after the metadata hold at most {} tensor infos \
             (each takes at least {MIN_INFO_BYTES} bytes)",
            left / MIN_INFO_BYTES as u64
        )));
    }
    struct RawInfo {
        name: String,
        ne: Vec<u64>,
        ty: GgmlType,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut index: HashMap<String, usize> = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        if index.insert(name.clone(), raw.len()).is_some() {
            return Err(c.err(format!("tensor `{name}` appears twice; tensor names must be unique")));
        }
        let n_dims = c.u32(&|| format!("n_dims of tensor `{name}`"))?;
        if n_dims > MAX_DIMS {
            return Err(
                c.err(format!("tensor `{name}` has n_dims {n_dims}, more than ggml's GGML_MAX_DIMS = {MAX_DIMS}"))
            );
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(c.u64(&|| format!("ne[{d}] of tensor `{name}`"))?);
        }
        let id = c.u32(&|| format!("the type of tensor `{name}`"))?;
        let ty = GgmlType::from_id(id)
            .ok_or_else(|| c.err(format!("tensor `{name}` has ggml type id {id}, which ggml does not define")))?;
        let offset = c.u64(&|| format!("the data offset of tensor `{name}`"))?;
        raw.push(RawInfo { name, ne, ty, offset });
    }
    let infos_end = c.pos;
    let data_start = infos_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.err(format!("the data section start overflows (alignment {alignment})")))?;
    let mut tensors = Vec::with_capacity(raw.len());
    for RawInfo { name, ne, ty, offset } in raw {
        let tctx = || format!("tensor `{name}` ({ty}, ne {ne:?})");
        // The product of the non-zero extents must fit (ggml's strides are those products even when another
        // extent is 0), so every caller can multiply the shape out without overflow.
        let mut nonzero_product: u64 = 1;
        for (d, &n) in ne.iter().enumerate() {
            if n > i64::MAX as u64 {
                return Err(c.err(format!("{}: ne[{d}] = {n} exceeds ggml's int64 range", tctx())));
            }
            nonzero_product = nonzero_product
                .checked_mul(n.max(1))
                .ok_or_else(|| c.err(format!("{}: the element count overflows u64", tctx())))?;
        }
        let nonzero_product = usize::try_from(nonzero_product)
            .map_err(|_| c.err(format!("{}: {nonzero_product} elements do not fit in usize", tctx())))?;
        let numel = if ne.contains(&0) { 0 } else { nonzero_product };
        let row = ne.first().copied().unwrap_or(1);
        let be = ty.block_elements() as u64;
        if row % be != 0 {
            return Err(c.err(format!(
                "{}: rows of ne[0] = {row} elements are not whole {ty} blocks of {be} elements",
                tctx()
            )));
        }
        let len = ty.bytes_for(numel).map_err(|e| c.err(format!("{}: {e}", tctx())))?;
        let lctx = format!("{ctx}: {}", tctx());
        limits.check_tensor_bytes(&lctx, len)?;
        limits.check_elements(&format!("{lctx} as f32"), numel, 4)?;
        if offset % alignment as u64 != 0 {
            return Err(
                c.err(format!("{}: data offset {offset} is not a multiple of the alignment {alignment}", tctx()))
            );
        }
        let past = || {
            c.err(format!(
                "{}: its {len} bytes at data offset {offset} (data section at {data_start}) lie past the end of \
                 the file ({file_len} bytes)",
                tctx()
            ))
        };
        let start = usize::try_from(offset).ok().and_then(|o| data_start.checked_add(o)).ok_or_else(past)?;
        match start.checked_add(len) {
            Some(end) if end <= file_len => {}
            _ => return Err(past()),
        }
        let shape = ne.iter().rev().map(|&n| n as usize).collect();
        tensors.push(GgufTensorInfo { name, shape, ggml_type: ty, start, len });
    }
    check_overlaps(&tensors, &c)?;
    Ok(Parsed { version, alignment, metadata, tensors })
}

/// Refuses tensors whose data overlap: ggml's writers place each tensor after the previous one, so an
/// overlap only comes from a corrupt or crafted file (and would alias two tensors' bytes).
fn check_overlaps(tensors: &[GgufTensorInfo], c: &Cursor<'_>) -> Result<()> {
    let mut spans: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    spans.sort_by_key(|t| t.start);
    for w in spans.windows(2) {
        if w[1].start < w[0].start + w[0].len {
            return Err(c.err(format!(
                "the data of tensors `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap",
                w[0].name,
                w[0].start,
                w[0].start + w[0].len,
                w[1].name,
                w[1].start,
                w[1].start + w[1].len
            )));
        }
    }
    Ok(())
}
