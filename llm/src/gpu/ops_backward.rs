//! The training kernels of [`GpuOps`]: next-token cross-entropy with its gradient, a dense `C = A·B` (the
//! input gradient of a dense layer or of the tied `lm_head`), and the backward of RMSNorm, SiLU·mul and
//! causal attention. The same recording rules and validation as the forward's kernels (module docs of
//! [`crate::gpu`]); the formulas are those of [`crate::backward`], in f32 on the GPU (see each method).

use super::ops::{arg, invalid, product, u32_of, GpuOps, Op, ATTN_WG, MAX_HEAD_DIM, WG};
use crate::Result;
use lowbit::gpu::{wgpu, GpuContext};

/// The buffers of [`GpuOps::encode_attention_backward`]: the saved forward inputs (after RoPE), the upstream
/// gradient, the outputs and two `[n_heads, t, t]` scratch buffers.
#[derive(Debug, Clone, Copy)]
pub struct AttentionGradBuffers<'a> {
    /// `[t, n_heads, head_dim]`.
    pub q: &'a wgpu::Buffer,
    /// `[t, n_kv_heads, head_dim]`.
    pub k: &'a wgpu::Buffer,
    /// `[t, n_kv_heads, head_dim]`.
    pub v: &'a wgpu::Buffer,
    /// ∂L/∂out, `[t, n_heads, head_dim]`.
    pub dout: &'a wgpu::Buffer,
    /// Scratch: the recomputed probabilities, `[n_heads, t, t]`.
    pub probs: &'a wgpu::Buffer,
    /// Scratch: ∂L/∂scores, `[n_heads, t, t]`.
    pub ds: &'a wgpu::Buffer,
    /// Output ∂L/∂q, shaped as `q`.
    pub dq: &'a wgpu::Buffer,
    /// Output ∂L/∂k, shaped as `k`.
    pub dk: &'a wgpu::Buffer,
    /// Output ∂L/∂v, shaped as `v`.
    pub dv: &'a wgpu::Buffer,
}

impl GpuOps {
    /// Records next-token cross-entropy over `logits` (`[n, vocab]` f32), IN PLACE: `loss[r] = lse_r −
    /// logits[r, t_r]` (`[n]` f32) and `logits` becomes `scale · (softmax(logits_r) − onehot(t_r))` (pass
    /// `scale = 1/predicted positions` for the gradient of the mean). `targets`: `[n]` u32, each `< vocab`
    /// (validate on the host before uploading). Max-subtracted, f32 sums (the CPU's
    /// [`cross_entropy`](crate::backward::cross_entropy) sums in f64).
    ///
    /// One workgroup of [`WG`] threads per row. `n == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_cross_entropy(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        loss: &wgpu::Buffer,
        n: usize,
        vocab: usize,
        scale: f32,
    ) -> Result<()> {
        if vocab == 0 || !scale.is_finite() {
            return Err(invalid(format!("cross_entropy: vocab {vocab} (>= 1) and scale {scale} (finite)")));
        }
        let len = product(&[n, vocab], "cross_entropy logits")?;
        if n == 0 {
            return Ok(());
        }
        u32_of(len, "n · vocab")?;
        let params = [n as u32, vocab as u32, scale.to_bits(), 0, 0, 0, 0, 0];
        let args = [arg(logits, len, "logits"), arg(targets, n, "targets"), arg(loss, n, "loss")];
        self.record(ctx, encoder, Op::CrossEntropy, params, &args, n as u64)
    }

    /// Records `c[m, n] = a[m, k] · b[k, n]` (row-major f32, overwriting `c`, distinct from the inputs), e.g.
    /// `dx[rows, n_in] = dy[rows, n_out] · W[n_out, n_in]` for a dense layer or the tied `lm_head`.
    ///
    /// Tiles of 16 × 16 outputs per workgroup of [`WG`] threads, `k` staged through workgroup memory in
    /// steps of 16; each output is one thread's f32 sum in ascending `k` (deterministic). `m == 0` or
    /// `n == 0` records nothing; `k == 0` is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_matmul_nn(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        c: &wgpu::Buffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if k == 0 {
            return Err(invalid("matmul_nn: k must be at least 1"));
        }
        let (na, nb, nc) = (product(&[m, k], "matmul_nn a")?, product(&[k, n], "matmul_nn b")?, product(&[m, n], "c")?);
        if nc == 0 {
            return Ok(());
        }
        for (v, what) in [(na, "m · k"), (nb, "k · n"), (nc, "m · n")] {
            u32_of(v, what)?;
        }
        let tiles = (m.div_ceil(16) as u64) * (n.div_ceil(16) as u64);
        let params = [m as u32, k as u32, n as u32, 0, 0, 0, 0, 0];
        let args = [arg(a, na, "a"), arg(b, nb, "b"), arg(c, nc, "c")];
        self.record(ctx, encoder, Op::MatmulNn, params, &args, tiles)
    }

    /// Records the gradient of [`encode_rms_norm`](Self::encode_rms_norm) (weight frozen), ADDED into `dx`:
    /// `dx[r, :] += rr·(w⊙dy[r, :] − x[r, :]·rr²·Σ(w⊙dy⊙x)/n)` with `rr` recomputed exactly as the forward
    /// computes it. `x`, `dy`, `dx`: `[m, n]` f32 (`dx` distinct from the others); `w`: `[n]`.
    ///
    /// One workgroup of [`WG`] threads per row. `m == 0` or `n == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rms_norm_backward(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        m: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if !(eps.is_finite() && eps >= 0.0) || n >= 1 << 24 {
            return Err(invalid(format!("rms_norm_backward: eps = {eps} (finite, >= 0) and n = {n} (< 2^24)")));
        }
        let len = product(&[m, n], "rms_norm_backward input")?;
        if len == 0 {
            return Ok(());
        }
        u32_of(len, "m · n")?;
        let params = [m as u32, n as u32, eps.to_bits(), 0, 0, 0, 0, 0];
        let args = [arg(x, len, "x"), arg(w, n, "w"), arg(dy, len, "dy"), arg(dx, len, "dx")];
        self.record(ctx, encoder, Op::RmsNormBackward, params, &args, m as u64)
    }

    /// Records the gradient of [`encode_silu_mul`](Self::encode_silu_mul), overwriting `dgate` and `dup`:
    /// with `s = sigmoid(gate)`, `dup = dact·gate·s` and `dgate = dact·up·s·(1 + gate·(1 − s))` (finite for
    /// every finite gate). All `[n]` f32, the outputs distinct from the inputs and each other.
    ///
    /// One thread per element. `n == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_silu_mul_backward(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        dact: &wgpu::Buffer,
        dgate: &wgpu::Buffer,
        dup: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let params = [u32_of(n, "n")?, 0, 0, 0, 0, 0, 0, 0];
        let args =
            [arg(gate, n, "gate"), arg(up, n, "up"), arg(dact, n, "dact"), arg(dgate, n, "dgate"), arg(dup, n, "dup")];
        self.record(ctx, encoder, Op::SiluMulBackward, params, &args, (n as u64).div_ceil(WG as u64))
    }

    /// Records the backward of causal grouped-query attention over one whole sequence of `t` rows at
    /// positions `0 .. t` (the forward of [`encode_attention`](Self::encode_attention) with `pos0 = 0` over
    /// these `k`, `v`), overwriting `dq`, `dk`, `dv`. The probabilities are recomputed from `q` and `k`. With
    /// `P` the probabilities: `dP = dO·Vᵀ`, `dS = P⊙(dP − rowsum(dP⊙P))`, `dQ = scale·dS·K`,
    /// `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`; a kv head's `dK` and `dV` sum its group's heads in ascending order,
    /// then the rows — the CPU's [`attention_backward`](crate::backward::attention_backward) order. f32.
    ///
    /// Two passes: one thread per (head, query row) for `P`, `dS` and `dQ`, then one thread per element of
    /// `dK` / `dV`. `t == 0` records nothing; `1 ≤ head_dim ≤ MAX_HEAD_DIM`, `n_heads` a multiple of
    /// `n_kv_heads ≥ 1`, `scale` finite.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_attention_backward(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        b: AttentionGradBuffers<'_>,
        t: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<()> {
        if head_dim == 0 || head_dim > MAX_HEAD_DIM || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(invalid(format!(
                "attention_backward: head_dim {head_dim} (1 ..= {MAX_HEAD_DIM}), n_heads {n_heads} a multiple of n_kv_heads {n_kv_heads} >= 1"
            )));
        }
        if !scale.is_finite() {
            return Err(invalid(format!("attention_backward: scale = {scale} (must be finite)")));
        }
        let nq = product(&[t, n_heads, head_dim], "attention_backward q")?;
        let nk = product(&[t, n_kv_heads, head_dim], "attention_backward k")?;
        let np = product(&[n_heads, t, t], "attention_backward probs")?;
        if nq == 0 {
            return Ok(());
        }
        for (v, what) in [(nq, "t · n_heads · head_dim"), (nk, "t · n_kv_heads · head_dim"), (np, "n_heads · t²")]
        {
            u32_of(v, what)?;
        }
        let params = [t as u32, n_heads as u32, n_kv_heads as u32, head_dim as u32, scale.to_bits(), 0, 0, 0];
        let rows = [
            arg(b.q, nq, "q"),
            arg(b.k, nk, "k"),
            arg(b.v, nk, "v"),
            arg(b.dout, nq, "dout"),
            arg(b.probs, np, "probs"),
            arg(b.ds, np, "ds"),
            arg(b.dq, nq, "dq"),
        ];
        let items = (n_heads * t) as u64;
        self.record(ctx, encoder, Op::AttentionBackwardQ, params, &rows, items.div_ceil(ATTN_WG as u64))?;
        let kv = [
            arg(b.q, nq, "q"),
            arg(b.dout, nq, "dout"),
            arg(b.probs, np, "probs"),
            arg(b.ds, np, "ds"),
            arg(b.dk, nk, "dk"),
            arg(b.dv, nk, "dv"),
        ];
        self.record(ctx, encoder, Op::AttentionBackwardKv, params, &kv, (nk as u64).div_ceil(WG as u64))
    }
}
