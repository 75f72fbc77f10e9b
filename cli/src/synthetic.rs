//! Synthetic, deterministic data for the demo and the benchmark: LLM-like weight matrices, activations and
//! whole [`QuantLinear`] layers (NF4, NF4 + double quantization, int8 per channel; optional LoRA adapter).

use lowbit::affine::Granularity;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;

/// Seed of the synthetic weight: the matrix is the same on every machine and every run.
pub const SEED: u64 = 0x6c6f_7762_6974_0001;

/// xorshift64* (Vigna): small, fast and deterministic; plenty for synthetic data.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by 1).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller, one value per call).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` normal values times `scale`, in f32.
    pub fn normal_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// A `[rows, cols]` weight that looks like an LLM linear layer: each row has its own scale (log-normal,
/// median 0.02, a spread of about ×1.8 per standard deviation), values are normal within a row, and about one
/// element in 16384 is an outlier of 10 to 30 row standard deviations.
pub fn synthetic_weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut w = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let row_scale = 0.02 * (0.6 * rng.normal()).exp();
        for _ in 0..cols {
            let v = if rng.next_u64().is_multiple_of(16384) {
                let mag = 10.0 + 20.0 * rng.uniform();
                if rng.next_u64() & 1 == 0 {
                    mag
                } else {
                    -mag
                }
            } else {
                rng.normal()
            };
            w.push((v * row_scale) as f32);
        }
    }
    w
}

/// The weight formats of a synthetic [`QuantLinear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFormat {
    /// NF4, block 64, f32 block scales.
    Nf4,
    /// NF4, block 64, double-quantized block scales (QLoRA's default).
    Nf4Dq,
    /// int8 affine, one scale and zero point per output row.
    Int8,
}

impl std::fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerFormat::Nf4 => "nf4 block:64",
            LayerFormat::Nf4Dq => "nf4 block:64 +dq",
            LayerFormat::Int8 => "int8 channel",
        })
    }
}

/// Quantizes `w` (`[out, inp]`, row-major) to `format`.
pub fn quantize(format: LayerFormat, w: &[f32], out: usize, inp: usize) -> lowbit::Result<QuantWeight> {
    Ok(match format {
        LayerFormat::Nf4 => QuantWeight::FourBit(lowbit::nf4::quantize_nf4(w, &[out, inp], 64, false)?),
        LayerFormat::Nf4Dq => QuantWeight::FourBit(lowbit::nf4::quantize_nf4(w, &[out, inp], 64, true)?),
        LayerFormat::Int8 => QuantWeight::Int8(lowbit::affine::quantize(w, &[out, inp], Granularity::PerChannel)?),
    })
}

/// A LoRA adapter named `lora` of rank `rank` for an `[out, inp]` layer, initialised like a trained one:
/// `A` normal with standard deviation `1/√inp`, `B` normal with standard deviation 0.01, `alpha = 2·rank`.
pub fn adapter(rank: usize, out: usize, inp: usize) -> lowbit::Result<LoraAdapter> {
    let mut rng = Rng::new(SEED ^ 0x4c6f_5241);
    let a = rng.normal_vec(rank * inp, 1.0 / (inp as f64).sqrt());
    let b = rng.normal_vec(out * rank, 0.01);
    LoraAdapter::new("lora", rank, a, b, 2.0 * rank as f32, false)
}

/// A layer around `weight` with a small bias and, with `lora_rank`, one [`adapter`].
pub fn layer_from(weight: QuantWeight, lora_rank: Option<usize>) -> lowbit::Result<QuantLinear> {
    let out = weight.shape().first().copied().unwrap_or(0);
    let bias = Rng::new(SEED ^ 0xb1a5).normal_vec(out, 0.01);
    let mut layer = QuantLinear::new(weight, Some(bias))?;
    if let Some(r) = lora_rank {
        layer.add_adapter(adapter(r, layer.out_features(), layer.in_features())?)?;
    }
    Ok(layer)
}

/// [`layer_from`] the [`synthetic_weight`]`(out, inp, SEED)` quantized to `format`.
pub fn layer(format: LayerFormat, out: usize, inp: usize, lora_rank: Option<usize>) -> lowbit::Result<QuantLinear> {
    layer_from(quantize(format, &synthetic_weight(out, inp, SEED), out, inp)?, lora_rank)
}

/// Activations `x: [m, inp]`, standard normal.
pub fn input(m: usize, inp: usize) -> Vec<f32> {
    Rng::new(SEED ^ 0x78).normal_vec(m * inp, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_weight_is_deterministic_and_plausible() {
        let a = synthetic_weight(64, 256, SEED);
        assert_eq!(a, synthetic_weight(64, 256, SEED));
        assert!(a.iter().all(|v| v.is_finite()));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
    }

    #[test]
    fn synthetic_layers_have_the_requested_shape() {
        for f in [LayerFormat::Nf4, LayerFormat::Nf4Dq, LayerFormat::Int8] {
            let l = layer(f, 24, 100, Some(4)).unwrap();
            assert_eq!((l.out_features(), l.in_features(), l.adapters().len()), (24, 100, 1));
            assert_eq!(l.forward(&input(3, 100)).unwrap().len(), 3 * 24);
        }
    }
}
