//! [`Scheme`]: the one descriptor of "which format", used by the library, the GPU kernel keys, the CLI,
//! tests, benches and fuzz targets.
//!
//! Text form (`Display` / `FromStr`, round-trips exactly):
//!
//! | scheme | meaning |
//! |---|---|
//! | `int8:tensor` | 8-bit affine, one scale + zero point for the whole tensor |
//! | `int8:channel` | 8-bit affine, one per output row |
//! | `int8:group:128` | 8-bit affine, one per run of 128 elements along a row |
//! | `nf4:64` | NF4, block 64, plain f32 block scales |
//! | `nf4:64+dq` | NF4, block 64, double-quantized block scales |
//! | `fp4:64`, `fp4:64+dq` | bitsandbytes FP4, likewise |
//!
//! `nf4` / `fp4` without a block size mean block 64 (bitsandbytes' default); `int8` alone means per channel.
//!
//! ```
//! use lowbit::Scheme;
//! let s: Scheme = "nf4:64+dq".parse()?;
//! assert_eq!(s.to_string(), "nf4:64+dq");
//! assert!(s.is_four_bit() && s.double_quant());
//! assert!("nf4:63".parse::<Scheme>().is_err()); // block sizes are powers of two from 32 to 4096
//! # Ok::<(), lowbit::Error>(())
//! ```

use super::affine::Granularity;
use super::block_size::check_blocksize;
use super::four_bit::FourBitFormat;
use crate::{Error, Result};
use std::fmt;

/// A quantization format with every parameter that changes the stored bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// 8-bit affine (PyTorch `quint8`), at a granularity.
    Int8(Granularity),
    /// NF4 or FP4 blockwise (bitsandbytes), plain or double-quantized block scales.
    FourBit {
        /// NF4 or FP4.
        format: FourBitFormat,
        /// Elements per block (one of [`crate::nf4::BLOCK_SIZES`]).
        blocksize: usize,
        /// Block scales double-quantized (bitsandbytes `compress_statistics=True`).
        double_quant: bool,
    },
}

impl Scheme {
    /// `nf4:BS` or `nf4:BS+dq`.
    pub const fn nf4(blocksize: usize, double_quant: bool) -> Scheme {
        Scheme::FourBit { format: FourBitFormat::Nf4, blocksize, double_quant }
    }
    /// `fp4:BS` or `fp4:BS+dq`.
    pub const fn fp4(blocksize: usize, double_quant: bool) -> Scheme {
        Scheme::FourBit { format: FourBitFormat::Fp4, blocksize, double_quant }
    }

    /// Checks the parameters (block size one of the allowed ones; group size in range).
    pub fn validate(self) -> Result<Scheme> {
        match self {
            Scheme::Int8(g) => g.validate()?,
            Scheme::FourBit { blocksize, .. } => check_blocksize(blocksize)?,
        }
        Ok(self)
    }

    /// Whether this is an NF4 / FP4 scheme.
    pub const fn is_four_bit(self) -> bool {
        matches!(self, Scheme::FourBit { .. })
    }
    /// Whether block scales are double-quantized (false for int8).
    pub const fn double_quant(self) -> bool {
        matches!(self, Scheme::FourBit { double_quant: true, .. })
    }

    /// A representative list covering every kernel family: int8 tensor / channel / group:64, and NF4 / FP4
    /// at block 64, plain and double-quantized. Tests, benches and the demo iterate over it.
    pub const fn representative() -> [Scheme; 7] {
        [
            Scheme::Int8(Granularity::PerTensor),
            Scheme::Int8(Granularity::PerChannel),
            Scheme::Int8(Granularity::PerGroup(64)),
            Scheme::nf4(64, false),
            Scheme::nf4(64, true),
            Scheme::fp4(64, false),
            Scheme::fp4(64, true),
        ]
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Int8(g) => write!(f, "int8:{g}"),
            Scheme::FourBit { format, blocksize, double_quant } => {
                write!(f, "{format}:{blocksize}{}", if *double_quant { "+dq" } else { "" })
            }
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = Error;
    /// Parses the text form in the module docs (case-sensitive, no spaces).
    fn from_str(s: &str) -> Result<Scheme> {
        let expected = "a scheme such as int8:tensor, int8:channel, int8:group:128, nf4:64, nf4:64+dq, fp4:64";
        let bad = || Error::invalid("scheme", format!("{s:?}"), expected);
        let (head, rest) = s.split_once(':').map_or((s, None), |(h, r)| (h, Some(r)));
        let scheme = match head {
            "int8" => Scheme::Int8(match rest {
                None => Granularity::PerChannel,
                Some(g) => g.parse().map_err(|_| bad())?,
            }),
            "nf4" | "fp4" | "nf4+dq" | "fp4+dq" => {
                let format = if head.starts_with("nf4") { FourBitFormat::Nf4 } else { FourBitFormat::Fp4 };
                let (bs_text, dq) = match rest {
                    None => ("64", head.ends_with("+dq")),
                    Some(_) if head.ends_with("+dq") => return Err(bad()),
                    Some(r) => r.strip_suffix("+dq").map_or((r, false), |b| (b, true)),
                };
                let blocksize: usize = bs_text.parse().map_err(|_| bad())?;
                Scheme::FourBit { format, blocksize, double_quant: dq }
            }
            _ => return Err(bad()),
        };
        scheme.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_bad_text_is_refused() {
        for s in Scheme::representative() {
            assert_eq!(s.to_string().parse::<Scheme>().unwrap(), s);
        }
        for (text, want) in [
            ("int8", Scheme::Int8(Granularity::PerChannel)),
            ("int8:group:128", Scheme::Int8(Granularity::PerGroup(128))),
            ("nf4", Scheme::nf4(64, false)),
            ("nf4+dq", Scheme::nf4(64, true)),
            ("fp4:256+dq", Scheme::fp4(256, true)),
        ] {
            assert_eq!(text.parse::<Scheme>().unwrap(), want, "{text}");
        }
        for bad in ["", "int4", "nf4:63", "nf4:64+dq+dq", "nf4+dq:64", "int8:group:0", "int8:row", "NF4:64"] {
            let e = bad.parse::<Scheme>().unwrap_err().to_string();
            assert!(e.contains("scheme") || e.contains("blocksize") || e.contains("group"), "{bad}: {e}");
        }
    }
}
