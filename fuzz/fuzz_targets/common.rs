//! Helpers shared by the fuzz targets (included with `mod common;`; not every target uses every item).
#![allow(dead_code)]

use lowbit::affine::Granularity;
use lowbit::cpu::KernelPath;
use lowbit::io::Limits;
use lowbit::nf4::{FourBitFormat, FourBitTensor, BLOCK_SIZES};
use lowbit::Scheme;

/// Limits small enough that a fuzz run never allocates more than a few hundred MiB, even when an input
/// reaches every limit at once.
pub fn limits() -> Limits {
    Limits { max_tensor_bytes: 16 << 20, max_json_bytes: 1 << 20, max_json_depth: 32 }
}

/// Writes a safetensors buffer by hand, so that headers can also be inconsistent (shape vs bytes, dtype
/// names, offsets) in the ways a hostile file can be. `entries`: (name, dtype name, shape, bytes).
pub fn write_safetensors(entries: &[(String, String, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape, data) in entries {
        let end = offset + data.len() as u64;
        header
            .insert(name.clone(), serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    for (_, _, _, data) in entries {
        out.extend_from_slice(data);
    }
    out
}

/// Checks everything a successfully loaded 4-bit tensor must satisfy: every path dequantizes to the
/// reference bits, and writing it back in the bitsandbytes layout and reading that gives the same tensor.
pub fn check_four_bit(name: &str, t: &FourBitTensor) {
    let want: Vec<f32> = t.dequantize_with(KernelPath::REFERENCE).expect("reference dequantize of a loaded tensor");
    assert!(want.iter().all(|v| v.is_finite()), "a loaded tensor dequantizes to non-finite values");
    for path in KernelPath::all_available() {
        let got: Vec<f32> = t.dequantize_with(path).expect("dequantize of a loaded tensor");
        assert!(bits_eq(&got, &want), "path {path} differs from the reference");
    }
    let tensors = lowbit::io::bnb::to_tensors(name, t).expect("a loaded tensor can be written back");
    let bytes = lowbit::io::serialize_safetensors(&tensors, None).expect("serialize");
    let st = lowbit::io::parse_safetensors(&bytes).expect("our own output parses");
    let back = lowbit::io::bnb::load_weight(&st, name).expect("our own output loads");
    assert_eq!(&back, t, "bitsandbytes round trip changed the tensor");
}

/// Bitwise equality of two f32 slices (NaN payloads and signed zeros included).
pub fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A deterministic stream that stretches a few fuzzer bytes to any length (xorshift over a seed), so that
/// small inputs can still reach large shapes (and the threaded paths, which start at 32k elements).
pub struct Stretch {
    state: u64,
}

impl Stretch {
    /// A stream seeded from `seed` (0 is remapped).
    pub fn new(seed: u64) -> Stretch {
        Stretch { state: seed | 1 }
    }
    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

/// How f32 values are made from the fuzzer's bytes.
#[derive(arbitrary::Arbitrary, Debug, Clone, Copy)]
pub enum Fill {
    /// The raw bytes as f32 bit patterns (NaN, ±Inf, subnormals, -0.0 all reachable), repeated cyclically.
    Raw,
    /// Raw bit patterns with the exponent forced finite (every finite f32, subnormals included).
    RawFinite,
    /// Pseudo-random values in `[-scale, scale]` with `scale` from the bit pattern `scale_bits`.
    Uniform { scale_bits: u32 },
    /// Mostly pseudo-random small values with rare specials taken from `specials` (index by the stream).
    Sparse { specials: [u32; 4] },
}

/// `n` values from `raw` (bit patterns) and `fill`.
pub fn make_values(n: usize, raw: &[u32], fill: Fill, seed: u64) -> Vec<f32> {
    let mut s = Stretch::new(seed);
    let raw_at = |i: usize| if raw.is_empty() { 0 } else { raw[i % raw.len()] };
    (0..n)
        .map(|i| match fill {
            Fill::Raw => f32::from_bits(raw_at(i)),
            Fill::RawFinite => {
                let b = raw_at(i);
                let b = if b & 0x7f80_0000 == 0x7f80_0000 { b & !0x4000_0000 } else { b };
                f32::from_bits(b)
            }
            Fill::Uniform { scale_bits } => {
                let u = (s.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * f32::from_bits(scale_bits)
            }
            Fill::Sparse { specials } => {
                let r = s.next_u64();
                if r.is_multiple_of(97) {
                    f32::from_bits(specials[(r >> 8) as usize % 4])
                } else {
                    (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                }
            }
        })
        .collect()
}

/// A shape of at most 4 dimensions with at most `max_numel` elements (each dimension reduced modulo what
/// is left of the budget; zero-sized dimensions are allowed).
pub fn make_shape(dims: &[u16], max_numel: usize) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut n = 1usize;
    for &d in dims.iter().take(4) {
        let cap = max_numel.checked_div(n).unwrap_or(7);
        let d = d as usize % (cap + 1);
        shape.push(d);
        n *= d;
    }
    shape
}

/// A [`Scheme`] from the fuzzer's bytes: mostly valid parameters, sometimes raw ones the library must refuse
/// (group 0, block size 33), and sometimes text through `Scheme`'s parser (which must round-trip).
#[derive(arbitrary::Arbitrary, Debug, Clone)]
pub enum FuzzScheme {
    /// `int8:tensor`, `int8:channel` or `int8:group:G` (any G).
    Int8 { granularity: u8, group: u32 },
    /// NF4 / FP4: an allowed block size by index, or (high bit set) any size.
    FourBit { fp4: bool, blocksize: u16, double_quant: bool },
    /// Scheme text.
    Text(String),
}

impl FuzzScheme {
    /// The scheme as built (not validated), or `None` when the text does not parse.
    pub fn scheme(&self) -> Option<Scheme> {
        match self {
            FuzzScheme::Int8 { granularity, group } => Some(Scheme::Int8(match granularity % 3 {
                0 => Granularity::PerTensor,
                1 => Granularity::PerChannel,
                _ => Granularity::PerGroup(*group as usize),
            })),
            FuzzScheme::FourBit { fp4, blocksize, double_quant } => Some(Scheme::FourBit {
                format: if *fp4 { FourBitFormat::Fp4 } else { FourBitFormat::Nf4 },
                blocksize: if blocksize & 0x8000 == 0 {
                    BLOCK_SIZES[*blocksize as usize % BLOCK_SIZES.len()]
                } else {
                    (blocksize & 0x7fff) as usize
                },
                double_quant: *double_quant,
            }),
            FuzzScheme::Text(t) => {
                let s = t.parse::<Scheme>().ok()?;
                assert_eq!(s.to_string().parse::<Scheme>().ok(), Some(s), "scheme text {t:?} does not round-trip");
                Some(s)
            }
        }
    }
}
