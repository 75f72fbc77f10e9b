//! Conversion of one tensor in chunks: `quantize` and `dequantize` read, convert and write a large weight a
//! range of elements at a time (whole 4-bit blocks, whole int8 rows), so memory is bounded by the chunk size
//! (`--memory-budget`) plus the tensor's parameters (one f32 per 4-bit block, one scale per int8 row or group),
//! never by the tensor. While one chunk is written on a second thread the next one is converted
//! ([`write_chunks`]).
//!
//! Exactness: every scheme's codes and parameters depend only on the elements of their own block, row or group
//! (per-tensor int8 on the tensor's minimum and maximum, found first; double quantization on all block scales,
//! kept until the end), so the chunked results are the bytes whole-tensor conversion gives; `tests/chunked.rs`
//! compares them.

use crate::error::CliError;
use lowbit::affine::{AffineTensor, Granularity};
use lowbit::cpu::KernelPath;
use lowbit::linear::QuantWeight;
use lowbit::nf4::{BlockScales, FourBitFormat, FourBitTensor};
use lowbit::{DType, Element, Scheme};
use safetensors::Dtype;
use std::ops::Range;
use std::sync::mpsc;

/// Input bytes per chunk under a memory budget of `budget` bytes: a quarter of it (two chunks in flight,
/// their converted bytes, and a decoded copy of the input where it cannot be borrowed), at least 1 MiB.
pub fn chunk_bytes(budget: u64) -> usize {
    usize::try_from(budget / 4).unwrap_or(usize::MAX).max(1 << 20)
}

/// The element ranges of `n` elements in chunks of about `chunk_elems`, each a multiple of `align` elements
/// (but the last), at least `align`.
pub fn ranges(n: usize, chunk_elems: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let per = (chunk_elems / align).max(1) * align;
    (0..n.div_ceil(per)).map(|i| i * per..((i + 1) * per).min(n)).collect()
}

/// A floating tensor's elements in their stored type, read a range at a time.
pub enum Elems<'a, T> {
    /// Aligned bytes of the mapped file, used in place.
    Borrowed(&'a [T]),
    /// Little-endian bytes that are not aligned for `T`, decoded a range at a time.
    Unaligned(&'a [u8]),
    /// Decoded whole before conversion (GGUF tensors of quantized ggml types, or with llama.cpp's Q/K row
    /// permutation to undo).
    Owned(Vec<T>),
}

impl<T: bytemuck::Pod> Elems<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elems::Borrowed(v) => v.len(),
            Elems::Unaligned(b) => b.len() / std::mem::size_of::<T>(),
            Elems::Owned(v) => v.len(),
        }
    }

    /// All elements, when they are in memory already.
    pub fn whole(&self) -> Option<&[T]> {
        match self {
            Elems::Borrowed(v) => Some(v),
            Elems::Owned(v) => Some(v),
            Elems::Unaligned(_) => None,
        }
    }

    /// Elements `r`: borrowed, or decoded into `scratch`.
    pub fn range<'s>(&'s self, r: Range<usize>, scratch: &'s mut Vec<T>) -> Result<&'s [T], CliError> {
        match self {
            Elems::Borrowed(v) => Ok(&v[r]),
            Elems::Owned(v) => Ok(&v[r]),
            Elems::Unaligned(b) => {
                let size = std::mem::size_of::<T>();
                scratch.clear();
                reserve(scratch, r.len())?;
                scratch.extend(b[r.start * size..r.end * size].chunks_exact(size).map(read_le::<T>));
                Ok(scratch)
            }
        }
    }
}

/// One little-endian element from `bytes` (any alignment).
fn read_le<T: bytemuck::Pod>(bytes: &[u8]) -> T {
    if cfg!(target_endian = "little") {
        bytemuck::pod_read_unaligned(bytes)
    } else {
        let mut b = bytes.to_vec();
        b.reverse();
        bytemuck::pod_read_unaligned(&b)
    }
}

/// Reserves room for `additional` more elements, or an error instead of the allocation-failure abort.
pub fn reserve<T>(v: &mut Vec<T>, additional: usize) -> Result<(), CliError> {
    v.try_reserve_exact(additional).map_err(|_| {
        CliError::new(format!(
            "out of memory: could not allocate {} MiB (lower --memory-budget, or free memory)",
            additional.saturating_mul(std::mem::size_of::<T>()) >> 20
        ))
    })
}

/// `e` with a non-finite element's index moved by `offset` (a chunk's position in its tensor).
fn at_offset(e: lowbit::Error, offset: usize) -> lowbit::Error {
    match e {
        lowbit::Error::NonFinite { arg, index, value } => {
            lowbit::Error::NonFinite { arg, index: index + offset, value }
        }
        e => e,
    }
}

/// Writes the bytes of `chunks` chunks to `w` (a tensor begun with [`SafetensorsWriter::begin`]): `produce(i,
/// buf)` fills buffer `buf` with chunk `i` on this thread while the previous chunk is written on another, with
/// two buffers in rotation. Stops at the first error of either side.
///
/// [`SafetensorsWriter::begin`]: lowbit::io::SafetensorsWriter::begin
pub fn write_chunks<B: Send + Default>(
    w: &mut lowbit::io::SafetensorsWriter,
    pool: &mut Vec<B>,
    chunks: usize,
    bytes: impl Fn(&B) -> &[u8] + Sync,
    mut produce: impl FnMut(usize, &mut B) -> Result<(), CliError>,
) -> Result<(), CliError> {
    pool.resize_with(pool.len().max(2), B::default);
    if chunks <= 1 {
        let b = &mut pool[0];
        for i in 0..chunks {
            produce(i, b)?;
            w.write(bytes(b))?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        let (full_tx, full_rx) = mpsc::sync_channel::<B>(1);
        let (empty_tx, empty_rx) = mpsc::channel::<B>();
        let bytes = &bytes;
        let writer = s.spawn(move || -> Result<(), CliError> {
            for b in full_rx {
                let wrote = w.write(bytes(&b));
                let _ = empty_tx.send(b);
                wrote?;
            }
            Ok(())
        });
        // Two buffers in rotation, kept by the caller across tensors: a fresh large buffer per tensor would
        // fault in every page of it again (measured: twice the page faults of the whole conversion).
        let mut spare: Vec<B> = pool.drain(..2).collect();
        let mut produced = Ok(());
        for i in 0..chunks {
            // A buffer back from the writer; none when it stopped on an error (reported by its join).
            let Some(mut b) = spare.pop().or_else(|| empty_rx.recv().ok()) else { break };
            if let Err(e) = produce(i, &mut b) {
                produced = Err(e);
                break;
            }
            if full_tx.send(b).is_err() {
                break;
            }
        }
        drop(full_tx);
        let written = writer.join().unwrap_or_else(|_| Err(CliError::new("the writing thread panicked")));
        pool.extend(spare);
        pool.extend(empty_rx.try_iter());
        produced.and(written)
    })
}

/// Conversion buffers reused from tensor to tensor ([`write_chunks`]'s pool).
#[derive(Default)]
pub struct Buffers {
    bytes: Vec<Vec<u8>>,
    /// Words holding elements of any type up to 4 bytes (aligned for each), with the byte length in use.
    words: Vec<(Vec<u32>, usize)>,
}

/// The elements of a buffer as little-endian bytes, in place (on a big-endian machine each element's bytes are
/// reversed first, once).
fn le_bytes<T: bytemuck::Pod>(v: &mut [T]) -> &[u8] {
    let bytes = bytemuck::cast_slice_mut::<T, u8>(v);
    if cfg!(target_endian = "big") {
        bytes.chunks_exact_mut(std::mem::size_of::<T>()).for_each(<[u8]>::reverse);
    }
    bytes
}

/// Quantizes `x` (`shape`, rank ≥ 1) with `scheme` and writes its entries to `w`: the codes, in chunks of
/// about `chunk_bytes` of input, then the parameters (bitsandbytes layout for 4-bit, lowbit's int8 layout).
/// The bytes equal those of quantizing the whole tensor at once.
pub fn quantize_into<T: Element + bytemuck::Pod>(
    w: &mut lowbit::io::SafetensorsWriter,
    name: &str,
    x: &Elems<'_, T>,
    shape: &[usize],
    scheme: Scheme,
    chunk_bytes: usize,
    buffers: &mut Buffers,
) -> Result<(), CliError> {
    let n = lowbit::shape::numel(shape)?;
    if x.len() != n {
        return Err(CliError::new(format!("{} elements for shape {shape:?} ({n} elements)", x.len())));
    }
    let chunk_elems = chunk_bytes / std::mem::size_of::<T>();
    match scheme.validate()? {
        Scheme::FourBit { format, blocksize, double_quant } => {
            quantize_4bit(w, name, x, shape, (format, blocksize, double_quant), chunk_elems, &mut buffers.bytes)
        }
        Scheme::Int8(g) => quantize_int8(w, name, x, shape, g, chunk_elems, &mut buffers.bytes),
    }
}

fn quantize_4bit<T: Element + bytemuck::Pod>(
    w: &mut lowbit::io::SafetensorsWriter,
    name: &str,
    x: &Elems<'_, T>,
    shape: &[usize],
    (format, bs, double_quant): (FourBitFormat, usize, bool),
    chunk_elems: usize,
    pool: &mut Vec<Vec<u8>>,
) -> Result<(), CliError> {
    lowbit::io::bnb::check_writable(name, shape)?;
    let n = x.len();
    let mut absmax: Vec<f32> = Vec::new();
    reserve(&mut absmax, n.div_ceil(bs))?;
    let chunks = ranges(n, chunk_elems, bs);
    let mut scratch = Vec::new();
    w.begin(name, Dtype::U8, vec![n.div_ceil(2), 1])?;
    write_chunks(
        w,
        pool,
        chunks.len(),
        |b: &Vec<u8>| b,
        |i, buf| {
            let r = chunks[i].clone();
            let start = r.start;
            let xs = x.range(r, &mut scratch)?;
            let t = lowbit::nf4::quantize_4bit(format, xs, &[xs.len()], bs, false).map_err(|e| at_offset(e, start))?;
            buf.clear();
            reserve(buf, t.packed().len())?;
            buf.extend_from_slice(t.packed());
            absmax.extend_from_slice(t.decoded_scales());
            Ok(())
        },
    )?;
    w.end()?;
    let scales = if double_quant {
        // What `double_quantize` does (its checks hold: the scales are max |x| of finite values), with the f32
        // scales freed before the decoded copy `from_parts` keeps is made: for a 30 GiB tensor that is 0.5 GiB
        // less at the peak.
        use lowbit::double_quant::{DoubleQuantScales, DYNAMIC_MAP, NESTED_BLOCKSIZE};
        let (codes, nested, offset) =
            lowbit::reference::double_quant::quantize(&absmax, NESTED_BLOCKSIZE, &DYNAMIC_MAP);
        drop(absmax);
        BlockScales::Double(DoubleQuantScales::from_parts(
            codes,
            nested,
            offset,
            NESTED_BLOCKSIZE,
            Box::new(DYNAMIC_MAP),
        )?)
    } else {
        BlockScales::Plain(absmax)
    };
    let state = lowbit::io::bnb::quant_state(format, bs, T::DTYPE, shape.to_vec(), &scales);
    for (key, t) in lowbit::io::bnb::param_tensors(name, &state, &scales)? {
        w.push(&key, &t)?;
    }
    Ok(())
}

fn quantize_int8<T: Element + bytemuck::Pod>(
    w: &mut lowbit::io::SafetensorsWriter,
    name: &str,
    x: &Elems<'_, T>,
    shape: &[usize],
    g: Granularity,
    chunk_elems: usize,
    pool: &mut Vec<Vec<u8>>,
) -> Result<(), CliError> {
    let (rows, cols) = lowbit::shape::as_matrix(shape)?;
    let chunks = ranges(x.len(), chunk_elems, cols);
    let mut scratch = Vec::new();
    let per_tensor = match g {
        Granularity::PerTensor => Some(calibrate_tensor(x, shape, &chunks, &mut scratch)?),
        _ => None,
    };
    let n_params = g.num_params(rows, cols);
    let (mut scales, mut zero_points) = (Vec::new(), Vec::new());
    let mut params = Vec::new();
    reserve(&mut scales, n_params)?;
    reserve(&mut zero_points, n_params)?;
    w.begin(name, Dtype::U8, shape.to_vec())?;
    write_chunks(
        w,
        pool,
        chunks.len(),
        |b: &Vec<u8>| b,
        |i, buf| {
            let r = chunks[i].clone();
            let start = r.start;
            let xs = x.range(r, &mut scratch)?;
            let chunk_shape = [xs.len() / cols.max(1), cols];
            buf.clear();
            if let Some(p) = &per_tensor {
                reserve(buf, xs.len())?;
                buf.resize(xs.len(), 0);
                lowbit::affine::quantize_with_params_into(xs, &chunk_shape, g, p, buf, KernelPath::best())
                    .map_err(|e| at_offset(e, start))?;
            } else {
                // Straight into the write buffer (one pass per row: min / max, parameters, codes).
                reserve(buf, xs.len())?;
                buf.resize(xs.len(), 0);
                params.clear();
                params.resize(g.num_params(chunk_shape[0], cols), lowbit::affine::AffineParams::EMPTY);
                lowbit::affine::quantize_into(xs, &chunk_shape, g, buf, &mut params)
                    .map_err(|e| at_offset(e, start))?;
                scales.extend(params.iter().map(|p| p.scale));
                zero_points.extend(params.iter().map(|p| p.zero_point));
            }
            Ok(())
        },
    )?;
    w.end()?;
    if let Some(p) = &per_tensor {
        scales.extend(p.iter().map(|p| p.scale));
        zero_points.extend(p.iter().map(|p| p.zero_point));
    }
    for (key, t) in lowbit::io::int8::param_tensors(name, &scales, &zero_points) {
        w.push(&key, &t)?;
    }
    Ok(())
}

/// The per-tensor int8 parameters of `x`: calibrated on the whole slice when it is in memory, else from its
/// minimum and maximum found chunk by chunk (PyTorch's min/max observer depends on nothing else, so
/// calibrating the pair `[min, max]` gives the same parameters).
fn calibrate_tensor<T: Element + bytemuck::Pod>(
    x: &Elems<'_, T>,
    shape: &[usize],
    chunks: &[Range<usize>],
    scratch: &mut Vec<T>,
) -> Result<Vec<lowbit::affine::AffineParams>, CliError> {
    if let Some(all) = x.whole() {
        return Ok(lowbit::affine::calibrate(all, shape, Granularity::PerTensor)?);
    }
    let mut lo: Option<(f32, T)> = None;
    let mut hi: Option<(f32, T)> = None;
    for r in chunks {
        let start = r.start;
        for (i, &v) in x.range(r.clone(), scratch)?.iter().enumerate() {
            let f = v.to_f32();
            if !f.is_finite() {
                return Err(lowbit::Error::NonFinite { arg: "x".to_string(), index: start + i, value: f }.into());
            }
            if lo.is_none_or(|(m, _)| f < m) {
                lo = Some((f, v));
            }
            if hi.is_none_or(|(m, _)| f > m) {
                hi = Some((f, v));
            }
        }
    }
    let pair: Vec<T> = lo.into_iter().chain(hi).map(|(_, v)| v).collect();
    Ok(lowbit::affine::calibrate(&pair, &[1, pair.len()], Granularity::PerTensor)?)
}

/// What [`dequantize_into`] calls for every chunk: its first element's index, its bytes as written, and a
/// function giving its f32 values (for the overflow check's message).
pub type ChunkCheck<'a> = dyn FnMut(usize, &[u8], &dyn Fn() -> Result<Vec<f32>, CliError>) -> Result<(), CliError> + 'a;

/// Dequantizes `q` to `dtype` and writes it to `w` as tensor `name`, in chunks of about `chunk_bytes` of
/// output; the bytes equal those of dequantizing the whole tensor. `check(offset, bytes, values)` sees every
/// chunk's bytes (element `offset` first) with a function giving its f32 values, for the overflow check.
pub fn dequantize_into(
    w: &mut lowbit::io::SafetensorsWriter,
    name: &str,
    q: &QuantWeight,
    dtype: DType,
    chunk_bytes: usize,
    buffers: &mut Buffers,
    check: &mut ChunkCheck<'_>,
) -> Result<(), CliError> {
    let pool = &mut buffers.words;
    match dtype {
        DType::F32 => dequantize_typed::<f32>(w, name, q, chunk_bytes, pool, check),
        DType::F16 => dequantize_typed::<lowbit::f16>(w, name, q, chunk_bytes, pool, check),
        DType::BF16 => dequantize_typed::<lowbit::bf16>(w, name, q, chunk_bytes, pool, check),
    }
}

fn dequantize_typed<T: Element + bytemuck::Pod>(
    w: &mut lowbit::io::SafetensorsWriter,
    name: &str,
    q: &QuantWeight,
    chunk_bytes: usize,
    pool: &mut Vec<(Vec<u32>, usize)>,
    check: &mut ChunkCheck<'_>,
) -> Result<(), CliError> {
    let shape = q.shape().to_vec();
    let n = lowbit::shape::numel(&shape)?;
    let (_, cols) = lowbit::shape::as_matrix(&shape)?;
    let align = match q {
        QuantWeight::FourBit(t) => t.blocksize(),
        QuantWeight::Int8(_) => cols,
    };
    let size = std::mem::size_of::<T>();
    let chunks = ranges(n, chunk_bytes / size, align);
    w.begin(name, lowbit::io::safetensors_dtype(T::DTYPE), shape)?;
    write_chunks(w, pool, chunks.len(), words_bytes, |i, (words, len)| {
        let r = chunks[i].clone();
        let part = part_of(q, r.clone(), cols)?;
        *len = r.len() * size;
        let need = len.div_ceil(4);
        if words.len() < need {
            reserve(words, need - words.len())?;
            words.resize(need, 0);
        }
        let out = &mut bytemuck::cast_slice_mut::<u32, T>(words)[..r.len()];
        match &part {
            QuantWeight::FourBit(t) => t.dequantize_into(out)?,
            QuantWeight::Int8(a) => a.dequantize_into(out)?,
        }
        let values = || -> Result<Vec<f32>, CliError> {
            Ok(match &part {
                QuantWeight::FourBit(t) => t.dequantize::<f32>()?,
                QuantWeight::Int8(a) => a.dequantize::<f32>()?,
            })
        };
        // The buffer now holds little-endian bytes (swapped in place on a big-endian machine), as written.
        check(r.start, le_bytes(out), &values)
    })?;
    w.end()?;
    Ok(())
}

/// The bytes in use of a words buffer.
fn words_bytes(b: &(Vec<u32>, usize)) -> &[u8] {
    &bytemuck::cast_slice::<u32, u8>(&b.0)[..b.1]
}

/// Elements `r` of `q` as a tensor of their own (`r` starts on a block boundary for 4-bit, a row boundary for
/// int8): a copy of their codes with their scales (double-quantized 4-bit scales decoded, as dequantization
/// uses them). Dequantizing it gives exactly those elements of `q`.
fn part_of(q: &QuantWeight, r: Range<usize>, cols: usize) -> Result<QuantWeight, CliError> {
    Ok(match q {
        QuantWeight::FourBit(t) => {
            let bs = t.blocksize();
            let packed = t.packed()[r.start / 2..r.end.div_ceil(2)].to_vec();
            let scales = t.decoded_scales()[r.start / bs..r.end.div_ceil(bs)].to_vec();
            QuantWeight::FourBit(FourBitTensor::from_parts(
                vec![r.len()],
                t.format(),
                bs,
                *t.table(),
                packed,
                BlockScales::Plain(scales),
                t.dtype(),
            )?)
        }
        QuantWeight::Int8(a) => {
            let cols = cols.max(1);
            let (r0, r1) = (r.start / cols, r.end / cols);
            let per_row = a.granularity().num_params(1, cols);
            let params = match a.granularity() {
                Granularity::PerTensor => 0..1,
                _ => r0 * per_row..r1 * per_row,
            };
            QuantWeight::Int8(AffineTensor::from_parts(
                vec![r1 - r0, cols],
                a.granularity(),
                a.codes()[r].to_vec(),
                a.scales()[params.clone()].to_vec(),
                a.zero_points()[params].to_vec(),
            )?)
        }
    })
}
