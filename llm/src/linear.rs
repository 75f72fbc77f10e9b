//! [`Linear`]: one projection of the model, either a lowbit [`QuantLinear`] (int8 / NF4 / FP4, fused
//! dequantize-matmul-plus-LoRA) or dense f32 weights (the full-precision baseline) with optional LoRA adapters.

use crate::{Error, Result};
use lowbit::linear::{Activations, AdapterGrad, BackwardOptions, ForwardOptions, QuantLinear, QuantWeight, Workspace};
use lowbit::lora::LoraAdapter;
use rayon::prelude::*;
use wide::f32x8;

/// A linear layer `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` over rows of `x`.
#[derive(Debug)]
pub enum Linear {
    /// A lowbit quantized layer (its adapters live inside it).
    Quant(Box<QuantLinear>),
    /// Dense f32 weights.
    Dense(DenseLinear),
}

/// Dense f32 weights `[out, in]` (row-major), an optional bias and enabled LoRA adapters.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Vec<f32>,
    out_features: usize,
    in_features: usize,
    bias: Option<Vec<f32>>,
    adapters: Vec<LoraAdapter>,
}

impl DenseLinear {
    /// Checks `weight.len() == out·in`, the bias length and that every value is finite.
    pub fn new(weight: Vec<f32>, out_features: usize, in_features: usize, bias: Option<Vec<f32>>) -> Result<Self> {
        if out_features == 0 || in_features == 0 || weight.len() != out_features * in_features {
            return Err(Error::Model(format!(
                "dense weight of {} values for shape [{out_features}, {in_features}] (expected {})",
                weight.len(),
                out_features * in_features
            )));
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(Error::Model(format!("bias of {} values, expected {out_features}", b.len())));
            }
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&weight) || !bias.as_deref().is_none_or(finite) {
            return Err(Error::Model("a dense weight or bias holds inf or NaN".into()));
        }
        Ok(DenseLinear { weight, out_features, in_features, bias, adapters: Vec::new() })
    }

    /// The weight, `[out, in]` row-major.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
}

impl Linear {
    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            Linear::Quant(l) => l.out_features(),
            Linear::Dense(d) => d.out_features,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            Linear::Quant(l) => l.in_features(),
            Linear::Dense(d) => d.in_features,
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        match self {
            Linear::Quant(l) => l.bias(),
            Linear::Dense(d) => d.bias.as_deref(),
        }
    }

    /// The enabled LoRA adapters (the ones the forward applies).
    pub fn adapters(&self) -> Vec<&LoraAdapter> {
        match self {
            Linear::Quant(l) => l.adapters().iter().filter(|a| a.is_enabled()).collect(),
            Linear::Dense(d) => d.adapters.iter().collect(),
        }
    }

    /// Attaches a LoRA adapter (shapes checked by lowbit for quantized layers, here for dense ones).
    pub fn add_adapter(&mut self, adapter: LoraAdapter) -> Result<()> {
        match self {
            Linear::Quant(l) => {
                l.add_adapter(adapter)?;
            }
            Linear::Dense(d) => {
                if adapter.in_features() != d.in_features || adapter.out_features() != d.out_features {
                    return Err(Error::Model(format!(
                        "adapter `{}` is [{}, {}], the layer is [{}, {}]",
                        adapter.name(),
                        adapter.out_features(),
                        adapter.in_features(),
                        d.out_features,
                        d.in_features
                    )));
                }
                d.adapters.push(adapter);
            }
        }
        Ok(())
    }

    /// The weight as f32 `[out, in]`: dequantized by lowbit's scalar reference, or the dense values.
    pub fn dequantized_weight(&self) -> Vec<f32> {
        match self {
            Linear::Quant(l) => l.weight().dequantize_reference(),
            Linear::Dense(d) => d.weight.clone(),
        }
    }

    /// Bytes the weight occupies (what a forward streams from memory).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Quant(l) => {
                let n = (l.out_features() * l.in_features()) as f64;
                let bits = match l.weight() {
                    QuantWeight::Int8(t) => t.bits_per_weight(),
                    QuantWeight::FourBit(t) => t.bits_per_weight(),
                };
                (bits * n / 8.0) as usize
            }
            Linear::Dense(d) => d.weight.len() * 4,
        }
    }

    /// `y[m, out] = x[m, in]·Wᵀ + …` for `m = x.len() / in`. `ws` is reused across calls (no allocation per
    /// call after the first with a given m). Errors on lengths that do not match, or (quantized layers)
    /// a result that overflows f32.
    pub fn forward(&self, x: &[f32], y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        self.forward_with(x, y, ws, Activations::F32)
    }

    /// [`forward`](Self::forward) with the activation mode of a quantized layer ([`Activations::Int8`]:
    /// `x` quantized to int8 per block of 32, integer products; `docs/formats.md` §12). Dense layers
    /// always run in f32.
    pub fn forward_with(&self, x: &[f32], y: &mut [f32], ws: &mut Workspace, act: Activations) -> Result<()> {
        match self {
            Linear::Quant(l) => Ok(l.forward_into_with(x, y, ws, ForwardOptions::default().activations(act))?),
            Linear::Dense(d) => d.forward(x, y),
        }
    }
}

impl Linear {
    /// Zeroed gradients for every adapter of the layer (enabled or not), in the layer's order.
    pub fn zero_grads(&self) -> Vec<AdapterGrad> {
        match self {
            Linear::Quant(l) => l.zero_grads(),
            Linear::Dense(d) => d
                .adapters
                .iter()
                .map(|ad| AdapterGrad { a: vec![0.0; ad.a().len()], b: vec![0.0; ad.b().len()] })
                .collect(),
        }
    }

    /// Every adapter of the layer, enabled or not, in the layer's order (the order of
    /// [`zero_grads`](Self::zero_grads) and of a GPU upload).
    pub fn all_adapters(&self) -> Vec<&LoraAdapter> {
        match self {
            Linear::Quant(l) => l.adapters().iter().collect(),
            Linear::Dense(d) => d.adapters.iter().collect(),
        }
    }

    /// How many adapters the layer has (enabled or not).
    pub fn adapter_count(&self) -> usize {
        match self {
            Linear::Quant(l) => l.adapters().len(),
            Linear::Dense(d) => d.adapters.len(),
        }
    }

    /// Every adapter of the layer, mutable (values only: for an optimizer step).
    pub fn adapters_mut(&mut self) -> &mut [LoraAdapter] {
        match self {
            Linear::Quant(l) => l.adapters_mut(),
            Linear::Dense(d) => &mut d.adapters,
        }
    }

    /// The backward of [`forward`](Self::forward) for `x` `[m, in]` and `dy` `[m, out]`: writes
    /// `dx = dy·W + Σ s·(dy·B)·A` and ADDS each enabled adapter's `∂L/∂A`, `∂L/∂B` into `grads` (from
    /// [`zero_grads`](Self::zero_grads)). The weight and bias are frozen. Quantized layers run lowbit's fused
    /// backward (the weight is never built); dense ones plain f32 loops.
    pub fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        grads: &mut [AdapterGrad],
        ws: &mut Workspace,
    ) -> Result<()> {
        match self {
            Linear::Quant(l) => Ok(l.backward_into(x, dy, Some(dx), grads, ws, BackwardOptions::default())?),
            Linear::Dense(d) => d.backward(x, dy, dx, grads),
        }
    }
}

impl DenseLinear {
    fn backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32], grads: &mut [AdapterGrad]) -> Result<()> {
        let (n_in, n_out) = (self.in_features, self.out_features);
        let m = x.len() / n_in;
        if !x.len().is_multiple_of(n_in)
            || dy.len() != m * n_out
            || dx.len() != m * n_in
            || grads.len() != self.adapters.len()
        {
            return Err(Error::Invalid(format!(
                "dense backward: x {} / dy {} / dx {} values and {} gradient sets for a [{n_out}, {n_in}] layer with {} adapters",
                x.len(),
                dy.len(),
                dx.len(),
                grads.len(),
                self.adapters.len()
            )));
        }
        // dx[r, :] = Σ_o dy[r, o]·W[o, :], rows split over threads (each row whole: thread-independent).
        dx.par_chunks_mut(n_in).zip(dy.par_chunks(n_out)).for_each(|(dxr, dyr)| {
            dxr.fill(0.0);
            for (o, &d) in dyr.iter().enumerate() {
                for (v, &w) in dxr.iter_mut().zip(&self.weight[o * n_in..(o + 1) * n_in]) {
                    *v += d * w;
                }
            }
        });
        for (ad, g) in self.adapters.iter().zip(grads.iter_mut()) {
            let (rank, s) = (ad.rank(), ad.scaling());
            if g.a.len() != ad.a().len() || g.b.len() != ad.b().len() {
                return Err(Error::Invalid(format!("gradients of adapter `{}` have the wrong shape", ad.name())));
            }
            for r in 0..m {
                let (xr, dyr) = (&x[r * n_in..(r + 1) * n_in], &dy[r * n_out..(r + 1) * n_out]);
                let t: Vec<f32> = (0..rank).map(|k| dot(xr, &ad.a()[k * n_in..(k + 1) * n_in])).collect();
                let mut u = vec![0.0f32; rank];
                for (o, &d) in dyr.iter().enumerate() {
                    for (uk, &b) in u.iter_mut().zip(&ad.b()[o * rank..(o + 1) * rank]) {
                        *uk += d * b;
                    }
                }
                for (k, &uk) in u.iter().enumerate() {
                    let c = s * uk;
                    let ak = &ad.a()[k * n_in..(k + 1) * n_in];
                    for ((dxv, ga), (&av, &xv)) in dx[r * n_in..(r + 1) * n_in]
                        .iter_mut()
                        .zip(&mut g.a[k * n_in..(k + 1) * n_in])
                        .zip(ak.iter().zip(xr))
                    {
                        *dxv += c * av;
                        *ga += c * xv;
                    }
                }
                for (o, &d) in dyr.iter().enumerate() {
                    for (gb, &tk) in g.b[o * rank..(o + 1) * rank].iter_mut().zip(&t) {
                        *gb += s * d * tk;
                    }
                }
            }
        }
        Ok(())
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (n_in, n_out) = (self.in_features, self.out_features);
        if !x.len().is_multiple_of(n_in) || y.len() != x.len() / n_in * n_out {
            return Err(Error::Invalid(format!(
                "dense forward: x has {} values and y {} for a [{n_out}, {n_in}] layer (expected x = m·{n_in}, y = m·{n_out})",
                x.len(),
                y.len()
            )));
        }
        let m = x.len() / n_in;
        matmul_t(&self.weight, n_out, n_in, x, y);
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(n_out) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        // LoRA: t = x·Aᵀ in chunks of 64 ranks on the stack (no allocation per call), y += s·t·Bᵀ.
        const RANKS: usize = 64;
        let mut t = [0.0f32; RANKS];
        for ad in &self.adapters {
            let (rank, s) = (ad.rank(), ad.scaling());
            for r in 0..m {
                let xr = &x[r * n_in..(r + 1) * n_in];
                for k0 in (0..rank).step_by(RANKS) {
                    let k1 = (k0 + RANKS).min(rank);
                    for (k, tk) in (k0..k1).zip(t.iter_mut()) {
                        *tk = dot(xr, &ad.a()[k * n_in..(k + 1) * n_in]);
                    }
                    for (o, yo) in y[r * n_out..(r + 1) * n_out].iter_mut().enumerate() {
                        *yo += s * dot(&t[..k1 - k0], &ad.b()[o * rank + k0..o * rank + k1]);
                    }
                }
            }
        }
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(Error::Lowbit(lowbit::Error::NonFinite {
                arg: "y (a dense forward of finite values overflowed f32)".into(),
                index: i,
                value: y[i],
            }));
        }
        Ok(())
    }
}

/// `y[m, out] = x[m, in] · wᵀ` for dense `w` `[out, in]` (f32 accumulation, [`dot`]'s order), threaded over
/// blocks of output features so that each block of `w` is read once for all `m` rows. Lengths must match
/// (`x.len() = m·n_in`, `y.len() = m·n_out`, `w.len() = n_out·n_in`): checked by the callers and asserted
/// here, since the writes below rely on them.
pub(crate) fn matmul_t(w: &[f32], n_out: usize, n_in: usize, x: &[f32], y: &mut [f32]) {
    let m = x.len() / n_in;
    assert!(y.len() == m * n_out && w.len() == n_out * n_in && x.len() == m * n_in, "matmul_t lengths");
    const BLOCK: usize = 16;
    let out = SharedOut(y.as_mut_ptr());
    (0..n_out.div_ceil(BLOCK)).into_par_iter().for_each(|b| {
        let out = &out;
        let o0 = b * BLOCK;
        let o1 = (o0 + BLOCK).min(n_out);
        for r in 0..m {
            let xr = &x[r * n_in..(r + 1) * n_in];
            for o in o0..o1 {
                let v = dot(xr, &w[o * n_in..(o + 1) * n_in]);
                // SAFETY: element (r, o) is written by exactly one task (the one owning block o / BLOCK),
                // r < m and o < n_out, so the index is inside y, which outlives the parallel loop.
                unsafe { *out.0.add(r * n_out + o) = v };
            }
        }
    });
}

/// The output pointer shared by the tasks of one dense forward (each writes disjoint elements).
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements (see the loop above) and the pointer outlives the loop.
unsafe impl Sync for SharedOut {}

/// `Σ a[i]·b[i]` in f32 with eight lanes and four accumulators (order fixed for a given length). The same
/// bits on every x86-64 CPU: with AVX each 8-lane product and sum is one 256-bit instruction instead of two
/// 128-bit ones (separately rounded, as the portable code's `mul_add` without FMA), and the final reduction is
/// the portable code's.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is available (detected at run time).
        return unsafe { dot_avx(a, b) };
    }
    dot_portable(a, b)
}

/// [`dot`]'s AVX form: the same lanes, accumulators, operations and order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    // SAFETY: i + 8 <= n at every call below, so the 8 floats are inside a and b.
    let load = |v: &[f32], i: usize| unsafe { _mm256_loadu_ps(v.as_ptr().add(i)) };
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, sk) in s.iter_mut().enumerate() {
            *sk = _mm256_add_ps(_mm256_mul_ps(load(a, i + 8 * k), load(b, i + 8 * k)), *sk);
        }
        i += 32;
    }
    while i + 8 <= n {
        s[0] = _mm256_add_ps(_mm256_mul_ps(load(a, i), load(b, i)), s[0]);
        i += 8;
    }
    let lanes = s.map(|v| {
        let mut out = [0f32; 8];
        // SAFETY: 8 writable floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        f32x8::from(out)
    });
    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])).reduce_add();
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

/// [`dot`] in portable `wide` code.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut s0, mut s1, mut s2, mut s3) = (f32x8::ZERO, f32x8::ZERO, f32x8::ZERO, f32x8::ZERO);
    let lanes = |v: &[f32], i: usize| f32x8::from(<[f32; 8]>::try_from(&v[i..i + 8]).unwrap_or([0.0; 8]));
    let mut i = 0;
    while i + 32 <= n {
        s0 = lanes(a, i).mul_add(lanes(b, i), s0);
        s1 = lanes(a, i + 8).mul_add(lanes(b, i + 8), s1);
        s2 = lanes(a, i + 16).mul_add(lanes(b, i + 16), s2);
        s3 = lanes(a, i + 24).mul_add(lanes(b, i + 24), s3);
        i += 32;
    }
    while i + 8 <= n {
        s0 = lanes(a, i).mul_add(lanes(b, i), s0);
        i += 8;
    }
    let mut s = ((s0 + s1) + (s2 + s3)).reduce_add();
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

#[cfg(test)]
mod tests {
    /// The AVX dot product gives the portable one's bits (same lanes, unfused products, same reduction), for
    /// every length through the 32-wide, 8-wide and scalar tails, on values whose sums round.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx_dot_equals_the_portable_dot_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx") {
            eprintln!("skipped: no AVX on this CPU");
            return;
        }
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32 - 0.5) * 1e3
        };
        for n in (0..140).chain([576, 1536, 4097]) {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n + 3).map(|_| next()).collect();
            // SAFETY: AVX detected above.
            let fast = unsafe { super::dot_avx(&a, &b) };
            assert_eq!(fast.to_bits(), super::dot_portable(&a, &b).to_bits(), "length {n}");
        }
    }
}
