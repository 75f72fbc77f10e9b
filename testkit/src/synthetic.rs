//! Synthetic, deterministic data: LLM-like weight matrices, activations and whole [`QuantLinear`] layers in any
//! [`Scheme`] (with bias and an optional LoRA adapter), and scheme matrices for tests and benches.

use crate::rng::Rng;
use lowbit::affine::Granularity;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;

/// Seed of the synthetic weight: the matrix is the same on every machine and every run.
pub const SEED: u64 = 0x6c6f_7762_6974_0001;

/// The schemes the demo and the benches show: NF4 and NF4 + double quantization at block 64 (QLoRA's
/// default), and int8 per channel.
pub const DEMO_SCHEMES: [Scheme; 3] =
    [Scheme::nf4(64, false), Scheme::nf4(64, true), Scheme::Int8(Granularity::PerChannel)];

/// Every kernel family with more than one parameter value: [`Scheme::representative`] plus small and large
/// blocks and groups (NF4 block 32 and 256 + dq, FP4 block 128, int8 group 32 and 128).
pub fn scheme_matrix() -> Vec<Scheme> {
    let mut v = Scheme::representative().to_vec();
    v.extend([
        Scheme::nf4(32, false),
        Scheme::nf4(256, true),
        Scheme::fp4(128, false),
        Scheme::Int8(Granularity::PerGroup(32)),
        Scheme::Int8(Granularity::PerGroup(128)),
    ]);
    v
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

/// [`layer_from`] the [`synthetic_weight`]`(out, inp, SEED)` quantized with `scheme`.
pub fn layer(scheme: Scheme, out: usize, inp: usize, lora_rank: Option<usize>) -> lowbit::Result<QuantLinear> {
    let w = synthetic_weight(out, inp, SEED);
    layer_from(QuantWeight::quantize(&w, &[out, inp], scheme)?, lora_rank)
}

/// bench-peers' data (`ggml/kernels.c` generates the same numbers in C): LLM-like, normal-ish values (a sum of
/// four xorshift uniforms) times 0.02, with a per-row scale of 1 to 2.2 (`n` values in rows of `cols`).
pub fn peers_data(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|i| {
            let v = u() + u() + u() + u();
            v * 0.02 * (1.0 + (i / cols % 5) as f32 * 0.3)
        })
        .collect()
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
    fn synthetic_layers_have_the_requested_shape_for_every_scheme() {
        for s in scheme_matrix() {
            let l = layer(s, 24, 256, Some(4)).unwrap();
            assert_eq!((l.out_features(), l.in_features(), l.adapters().len()), (24, 256, 1), "{s}");
            assert_eq!(l.weight().scheme(), s);
            assert_eq!(l.forward(&input(3, 256)).unwrap().len(), 3 * 24);
        }
    }
}
