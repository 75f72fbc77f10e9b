//! The demo's quantization rows: one quantize + dequantize of a scheme through one CPU path, and the
//! bit-for-bit comparison of a path with the scalar reference.

use lowbit::cpu::KernelPath;
use lowbit::nf4::BlockScales;
use lowbit::Scheme;
use std::time::{Duration, Instant};

/// One quantize + dequantize through one path.
pub struct Run {
    /// Time to quantize (calibration included).
    pub quantize: Duration,
    /// Time to dequantize to f32 (into a preallocated buffer where the format allows).
    pub dequantize: Duration,
    /// Storage cost in bits per weight, parameters included.
    pub bits_per_weight: f64,
    /// Named buffers (codes, parameters) that must equal the reference path's byte for byte.
    pub parts: Vec<(&'static str, Vec<u8>)>,
}

/// Quantizes `x` (row-major, `shape`) with `scheme` through `path`, then dequantizes it into `out` through
/// `path`, timing both and keeping every stored buffer for the bit-for-bit comparison.
pub fn run_scheme(
    scheme: Scheme,
    x: &[f32],
    shape: &[usize],
    path: KernelPath,
    out: &mut [f32],
) -> lowbit::Result<Run> {
    match scheme.validate()? {
        Scheme::Int8(g) => {
            let t = Instant::now();
            let q = lowbit::affine::quantize_with(x, shape, g, path)?;
            let quantize = t.elapsed();
            let t = Instant::now();
            q.dequantize_into_with(out, path)?;
            let dequantize = t.elapsed();
            Ok(Run {
                quantize,
                dequantize,
                bits_per_weight: q.bits_per_weight(),
                parts: vec![
                    ("codes", q.codes().to_vec()),
                    ("scales", f32_bits(q.scales())),
                    ("zero points", q.zero_points().to_vec()),
                ],
            })
        }
        Scheme::FourBit { format, blocksize, double_quant } => {
            let t = Instant::now();
            let q = lowbit::nf4::quantize_4bit_with(format, x, shape, blocksize, double_quant, path)?;
            let quantize = t.elapsed();
            let t = Instant::now();
            q.dequantize_into_with(out, path)?;
            let dequantize = t.elapsed();
            let mut parts = vec![("packed codes", q.packed().to_vec()), ("absmax", f32_bits(&q.absmax()))];
            if let BlockScales::Double(d) = q.scales() {
                parts.push(("absmax codes", d.codes().to_vec()));
                parts.push(("nested absmax", f32_bits(d.nested_absmax())));
                parts.push(("nested offset", f32_bits(&[d.offset()])));
            }
            Ok(Run { quantize, dequantize, bits_per_weight: q.bits_per_weight(), parts })
        }
    }
}

fn f32_bits(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect()
}

/// Every scheme the demo shows, in table order.
pub fn formats() -> Vec<Scheme> {
    ["int8:tensor", "int8:channel", "int8:group:128", "int8:group:32", "nf4:64", "nf4:64+dq", "fp4:64"]
        .iter()
        .map(|s| s.parse().expect("a valid scheme"))
        .collect()
}

/// Where `run` (with dequantized values `out`) first differs from the reference, or `None`.
pub fn first_difference(reference: &Run, ref_out: &[f32], run: &Run, out: &[f32]) -> Option<String> {
    for ((name, a), (_, b)) in reference.parts.iter().zip(&run.parts) {
        if a.len() != b.len() {
            return Some(format!("{name}: length {} vs {}", b.len(), a.len()));
        }
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            return Some(format!("{name} byte {i}"));
        }
    }
    if let Some(i) = ref_out.iter().zip(out).position(|(x, y)| x.to_bits() != y.to_bits()) {
        return Some(format!("dequantized [{i}]: {} vs {}", out[i], ref_out[i]));
    }
    None
}
