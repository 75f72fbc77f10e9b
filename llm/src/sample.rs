//! [`Sampler`]: picks the next token from logits — greedy (temperature 0) or temperature / top-p (nucleus)
//! sampling from a seeded generator, so that a run is reproducible.

use crate::{Error, Result};

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// 0 = greedy (argmax); otherwise the softmax temperature.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to at least `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// A sampler with its own generator state and scratch (no allocation per token after the first).
#[derive(Debug, Clone)]
pub struct Sampler {
    opts: SamplingOptions,
    state: u64,
    probs: Vec<(f32, u32)>,
}

impl Sampler {
    /// Checks `temperature` (finite, ≥ 0) and `top_p` (in (0, 1]).
    pub fn new(opts: SamplingOptions) -> Result<Sampler> {
        if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
            return Err(Error::Invalid(format!("temperature {}, expected a finite value ≥ 0", opts.temperature)));
        }
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top-p {}, expected a value in (0, 1]", opts.top_p)));
        }
        Ok(Sampler { opts, state: opts.seed ^ 0x9E37_79B9_7F4A_7C15, probs: Vec::new() })
    }

    /// The next token for `logits` (`[vocab]`, finite). Greedy picks the lowest index among equal maxima.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature == 0.0 || logits.len() <= 1 {
            return crate::ops::argmax(logits) as u32;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        let mut sum = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - max) / self.opts.temperature).exp();
            sum += p as f64;
            self.probs.push((p, i as u32));
        }
        // Most likely first, ties by id, so the nucleus is well defined.
        self.probs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let cut = self.opts.top_p as f64 * sum;
        let mut kept = 0.0f64;
        let mut n = 0;
        for &(p, _) in &self.probs {
            kept += p as f64;
            n += 1;
            if kept >= cut {
                break;
            }
        }
        let target = self.next_f64() * kept;
        let mut acc = 0.0f64;
        for &(p, id) in &self.probs[..n] {
            acc += p as f64;
            if acc > target {
                return id;
            }
        }
        self.probs[n - 1].1
    }

    /// SplitMix64, as a uniform f64 in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
