//! The model's element-wise and per-row operations on the CPU, in f32 and in the order Hugging Face's
//! Llama computes them: RMSNorm, RoPE (rotate-half), SiLU·mul, softmax, argmax.

/// RoPE's cos / sin for positions `0..max_pos` and frequencies `0..head_dim/2`, as Hugging Face builds them:
/// `inv_freq[i] = 1 / theta^(2i/head_dim)` (f32), `angle = (pos as f32) · inv_freq[i]` (an f32 product), then
/// cos and sin of that angle rounded to f32.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The table for `max_pos` positions of a `head_dim`-wide head (`head_dim` even) with base `theta`.
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> RopeTable {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32).collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, max_pos, cos, sin }
    }

    /// Positions covered.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// `(cos, sin)` rows of position `pos` (`half` values each). `pos < max_pos()`.
    pub fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }

    /// The whole cos table `[max_pos, half]` (for GPU upload).
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// The whole sin table `[max_pos, half]`.
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }
}

/// Rotates every head of `v` (`[heads, head_dim]`) in place for one position (rotate-half convention):
/// `(a, b) = (v[i], v[i + half])`, `v[i] = a·cos − b·sin`, `v[i + half] = b·cos + a·sin`.
pub fn apply_rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// `y = x · rsqrt(mean(x²) + eps) · w` for one row (normalise in f32, then scale by the weight).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for ((yo, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
        *yo = wv * (xv * r);
    }
}

/// `gate[i] = silu(gate[i]) · up[i]` in place, `silu(g) = g / (1 + e^−g)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place with max subtraction (an empty slice is left alone).
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Index of the largest value (the lowest index on ties; NaN never wins). 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}
