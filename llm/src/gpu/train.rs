//! Training on the GPU: [`GpuModel::loss_and_grads`] runs the training forward and backward of one whole
//! sequence (the math of the CPU's [`Model::loss_and_grads`], module [`crate::train`]) as ONE submission and
//! reads back the loss and the adapter gradients once; [`GpuModel::write_adapters`] uploads the host's
//! adapter weights after an optimizer step; [`Trainer::step_gpu`] chains the two around the host optimizer.
//!
//! Activations are **kept** on the GPU (per layer: the block input, both normed inputs, `q`/`k` after RoPE,
//! `v`, the attention output, the mid-block residual, gate, up and their product); attention probabilities
//! are **recomputed** in the backward (two `[heads, T, T]` scratch buffers shared by all layers). The
//! optimizer runs on the host over the read-back gradients: LoRA adapters are small (SmolLM2 with rank 8 on
//! q/v: 0.9 M parameters), so one readback and one upload per step cost little next to the model's passes,
//! and the host optimizer is the one whose updates are checked against PyTorch and bitsandbytes.
//!
//! The layer backward is lowbit's [`GpuLinear::encode_backward`](lowbit::gpu::GpuLinear::encode_backward)
//! (`W` decoded in the kernel); the other kernels are [`GpuOps`]' training kernels (`ops_backward.rs`);
//! RoPE's backward is the forward kernel over a table with negated sines (the inverse rotation).

use super::buffers::storage_zeroed;
use super::model::{GpuEmbed, GpuLin, GpuModel};
use super::ops::{GpuOps, HeadShape, KvBuffers};
use super::ops_backward::AttentionGradBuffers;
use crate::train::{LossSum, ModelGrads, Trainer};
use crate::{Error, Model, Result};
use lowbit::gpu::{wgpu, GpuAdapterGrad, GpuContext};

/// One block's saved activations, `[t, width]` each.
#[derive(Debug)]
struct LayerActs {
    x_in: wgpu::Buffer,
    xn1: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    x_mid: wgpu::Buffer,
    xn2: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    act: wgpu::Buffer,
}

/// The gradient buffers of one adapter and where they land in the staging buffer (in f32 words).
#[derive(Debug)]
struct GradSlot {
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    a_len: usize,
    b_len: usize,
    at: usize,
}

/// Every buffer of a training step for sequences of up to `t_max` tokens (grown when a longer one comes).
#[derive(Debug)]
pub(crate) struct TrainBuffers {
    t_max: usize,
    acts: Vec<LayerActs>,
    ids: wgpu::Buffer,
    targets: wgpu::Buffer,
    x: wgpu::Buffer,
    tmp: wgpu::Buffer,
    xnf: wgpu::Buffer,
    logits: wgpu::Buffer,
    loss: wgpu::Buffer,
    dx: wgpu::Buffer,
    da: wgpu::Buffer,
    db: wgpu::Buffer,
    dc: wgpu::Buffer,
    dq: wgpu::Buffer,
    dk: wgpu::Buffer,
    dv: wgpu::Buffer,
    dgate: wgpu::Buffer,
    dup: wgpu::Buffer,
    probs: wgpu::Buffer,
    ds: wgpu::Buffer,
    /// Per block, per linear (q, k, v, o, gate, up, down), per uploaded adapter.
    grads: Vec<Vec<Vec<GradSlot>>>,
    /// `MAP_READ | COPY_DST`: `t_max − 1` losses, then every gradient.
    staging: wgpu::Buffer,
    staging_words: usize,
}

impl GpuLin {
    /// Ranks of the adapters uploaded with the layer (none for dense layers).
    fn adapter_ranks(&self) -> &[usize] {
        match self {
            GpuLin::Quant(q) => q.adapter_ranks(),
            GpuLin::Dense { .. } => &[],
        }
    }

    fn shape(&self) -> (usize, usize) {
        match self {
            GpuLin::Quant(q) => (q.out_features(), q.in_features()),
            GpuLin::Dense { n_out, n_in, .. } => (*n_out, *n_in),
        }
    }

    /// Records `dx = dy·W (+ LoRA)` and adds the adapters' gradients into `grads` (frozen weight and bias).
    #[allow(clippy::too_many_arguments)]
    fn encode_backward(
        &self,
        ops: &GpuOps,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        grads: &[GradSlot],
        m: usize,
    ) -> Result<()> {
        match self {
            GpuLin::Quant(q) => {
                let g: Vec<GpuAdapterGrad<'_>> = grads.iter().map(|s| GpuAdapterGrad { a: &s.a, b: &s.b }).collect();
                Ok(q.encode_backward(ctx, enc, x, dy, Some(dx), &g, m)?)
            }
            GpuLin::Dense { w, n_out, n_in, .. } => ops.encode_matmul_nn(ctx, enc, dy, w, dx, m, *n_out, *n_in),
        }
    }
}

impl TrainBuffers {
    fn new(ctx: &GpuContext, gm: &GpuModel, t_max: usize) -> Result<TrainBuffers> {
        let c = &gm.config;
        let (d, qw, kvw, inter, vocab) = (c.hidden_size, c.q_width(), c.kv_width(), c.intermediate_size, c.vocab_size);
        let z = |label: &str, n: usize| storage_zeroed(ctx, label, n.max(1));
        let t = t_max;
        let acts = (0..gm.blocks.len())
            .map(|_| LayerActs {
                x_in: z("train x_in", t * d),
                xn1: z("train xn1", t * d),
                q: z("train q", t * qw),
                k: z("train k", t * kvw),
                v: z("train v", t * kvw),
                att: z("train att", t * qw),
                x_mid: z("train x_mid", t * d),
                xn2: z("train xn2", t * d),
                gate: z("train gate", t * inter),
                up: z("train up", t * inter),
                act: z("train act", t * inter),
            })
            .collect();
        let mut at = t - 1;
        let mut grads = Vec::with_capacity(gm.blocks.len());
        for b in &gm.blocks {
            let mut per_block = Vec::with_capacity(7);
            for l in b.linears() {
                let (n_out, n_in) = l.shape();
                let slots = l
                    .adapter_ranks()
                    .iter()
                    .map(|&r| {
                        let s = GradSlot {
                            a: z("grad A", r * n_in),
                            b: z("grad B", n_out * r),
                            a_len: r * n_in,
                            b_len: n_out * r,
                            at,
                        };
                        at += s.a_len + s.b_len;
                        s
                    })
                    .collect();
                per_block.push(slots);
            }
            grads.push(per_block);
        }
        let mid = t * d.max(inter).max(qw);
        Ok(TrainBuffers {
            t_max: t,
            acts,
            ids: z("train ids", t),
            targets: z("train targets", t),
            x: z("train x", t * d),
            tmp: z("train tmp", t * d),
            xnf: z("train xnf", t * d),
            logits: z("train logits", (t - 1) * vocab),
            loss: z("train loss", t),
            dx: z("train dx", t * d),
            da: z("train da", mid),
            db: z("train db", t * d),
            dc: z("train dc", t * d),
            dq: z("train dq", t * qw),
            dk: z("train dk", t * kvw),
            dv: z("train dv", t * kvw),
            dgate: z("train dgate", t * inter),
            dup: z("train dup", t * inter),
            probs: z("train probs", c.num_attention_heads * t * t),
            ds: z("train ds", c.num_attention_heads * t * t),
            grads,
            staging: ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("lowbit-llm training staging"),
                size: at.max(1) as u64 * 4,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            staging_words: at,
        })
    }
}

impl GpuModel {
    /// [`Model::loss_and_grads`] on the GPU: one training forward and backward of `tokens` (a whole sequence
    /// at positions `0..T`, `2 ≤ T ≤ capacity()`) recorded into ONE submission, with one readback of the
    /// per-position losses and every adapter gradient. Returns the summed next-token cross-entropy and ADDS
    /// `scale ·` its gradient into `grads` (host buffers from [`Model::zero_grads`] of the model this one was
    /// uploaded from), for every adapter enabled at upload or by `set_adapter_enabled`.
    ///
    /// The math is the CPU's in f32 on the GPU (cross-entropy's sums included), so results agree with
    /// [`Model::loss_and_grads`] up to summation order (`llm/tests/gpu_train.rs` states the tolerance). It
    /// uses the KV cache as the attention's key / value store: the cache is emptied ([`len`](Self::len)
    /// becomes 0). Training buffers (activations of every layer for `T` tokens: about `T·(6·hidden +
    /// 3·intermediate + 2·q + 2·kv)` floats per layer, plus `(T−1)·vocab` logits and two `heads·T²`
    /// scratches) are allocated on the first call and grown for a longer sequence.
    ///
    /// Errors (nothing added to `grads`): fewer than 2 tokens, more than `capacity()`, an id ≥ vocab, a
    /// non-finite `scale`, `grads` not shaped for this model's adapters, a `lm_head` with adapters, or a
    /// non-finite loss or gradient (the forward overflowed). Blocks until the GPU is done.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn loss_and_grads(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        scale: f32,
        grads: &mut ModelGrads,
    ) -> Result<LossSum> {
        lowbit::gpu::block_on(self.loss_and_grads_async(ctx, tokens, scale, grads))
    }

    /// [`loss_and_grads`](Self::loss_and_grads) awaiting the GPU instead of blocking.
    pub async fn loss_and_grads_async(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        scale: f32,
        grads: &mut ModelGrads,
    ) -> Result<LossSum> {
        let c = &self.config;
        let (t, vocab) = (tokens.len(), c.vocab_size);
        if t < 2 || t > self.capacity {
            return Err(Error::Invalid(format!(
                "a training sequence of {t} tokens (expected 2 ..= the GPU model's capacity {})",
                self.capacity
            )));
        }
        if let Some(id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {id}, expected < vocab size {vocab}")));
        }
        if !scale.is_finite() {
            return Err(Error::Invalid(format!("loss scale {scale}, expected a finite number")));
        }
        if !self.lm_head.adapter_ranks().is_empty() {
            return Err(Error::Model("training with LoRA adapters on lm_head is not supported".into()));
        }
        // Counts and lengths, all checked here: nothing is added to `grads` unless every buffer fits.
        let shape_ok = grads.blocks.len() == self.blocks.len()
            && grads.blocks.iter().zip(&self.blocks).all(|(g, b)| {
                g.len() == 7
                    && g.iter().zip(b.linears()).all(|(gl, l)| {
                        let (n_out, n_in) = l.shape();
                        gl.len() == l.adapter_ranks().len()
                            && gl
                                .iter()
                                .zip(l.adapter_ranks())
                                .all(|(ag, &r)| ag.a.len() == r * n_in && ag.b.len() == n_out * r)
                    })
            });
        if !shape_ok {
            return Err(Error::Invalid(
                "gradients not shaped for this model's adapters (use Model::zero_grads of the uploaded model)".into(),
            ));
        }
        if self.train.as_ref().is_none_or(|b| b.t_max < t) {
            self.train = None; // release the smaller set first
            self.train = Some(TrainBuffers::new(ctx, self, t)?);
        }
        self.len = 0;
        let mut enc = ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("train") });
        let words = self.record_train(ctx, &mut enc, t, scale)?;
        let tb = self.train.as_ref().expect("allocated above");
        self.write_host_embedding(ctx, tokens, &tb.x)?;
        ctx.queue().write_buffer(&tb.ids, 0, bytemuck::cast_slice(tokens));
        ctx.queue().write_buffer(&tb.targets, 0, bytemuck::cast_slice(&tokens[1..]));
        ctx.queue().submit([enc.finish()]);
        self.submissions += 1;
        let v = lowbit::gpu::read_f32(ctx.device(), &tb.staging, words).await?;
        self.readbacks += 1;
        let n = t - 1;
        let sum: f64 = v[..n].iter().map(|&l| l as f64).sum();
        if !sum.is_finite() {
            return Err(Error::Model(format!("the training loss is {sum} (the forward overflowed)")));
        }
        let g0 = tb.t_max - 1; // the gradients follow room for t_max - 1 losses
        if let Some(i) = v[g0..].iter().position(|g| !g.is_finite()) {
            return Err(Error::Model(format!("adapter gradient value {i} is {} (the backward overflowed)", v[g0 + i])));
        }
        for (gb, sb) in grads.blocks.iter_mut().zip(&tb.grads) {
            for (gl, sl) in gb.iter_mut().zip(sb) {
                for (g, s) in gl.iter_mut().zip(sl) {
                    for (d, &x) in g.a.iter_mut().zip(&v[s.at..s.at + s.a_len]) {
                        *d += x;
                    }
                    for (d, &x) in g.b.iter_mut().zip(&v[s.at + s.a_len..s.at + s.a_len + s.b_len]) {
                        *d += x;
                    }
                }
            }
        }
        Ok(LossSum { sum, count: n })
    }

    /// Uploads the weights of every adapter of `model` (the model this one was uploaded from, after an
    /// optimizer step on its host adapters) into the GPU layers. Takes effect at the next submission.
    /// Errors when the model's adapters do not match the uploaded ones (count, shape) or hold a non-finite
    /// value.
    pub fn write_adapters(&self, ctx: &GpuContext, model: &Model) -> Result<()> {
        if model.blocks().len() != self.blocks.len() {
            return Err(Error::Invalid("a model with another number of blocks than the uploaded one".into()));
        }
        for (hb, gb) in model.blocks().iter().zip(&self.blocks) {
            for ((name, hl), gl) in hb.linears().iter().zip(gb.linears()) {
                let ads = hl.all_adapters();
                match gl {
                    GpuLin::Quant(q) => {
                        if ads.len() != q.adapter_ranks().len() {
                            return Err(Error::Invalid(format!(
                                "{name}: {} adapters on the host, {} uploaded",
                                ads.len(),
                                q.adapter_ranks().len()
                            )));
                        }
                        for (id, ad) in ads.iter().enumerate() {
                            q.write_adapter_weights(ctx, id, ad.a(), ad.b())?;
                        }
                    }
                    GpuLin::Dense { .. } if !ads.is_empty() => {
                        return Err(Error::Model(format!("{name}: adapters on a dense layer are not on the GPU")));
                    }
                    GpuLin::Dense { .. } => {}
                }
            }
        }
        Ok(())
    }

    /// Records the training forward and backward of `t` tokens and the copies into the staging buffer;
    /// returns the words to read back.
    fn record_train(&self, ctx: &GpuContext, enc: &mut wgpu::CommandEncoder, t: usize, scale: f32) -> Result<usize> {
        let (c, ops) = (&self.config, &self.ops);
        let tb = self.train.as_ref().ok_or_else(|| Error::Invalid("training buffers missing".into()))?;
        let (d, vocab, inter, eps) = (c.hidden_size, c.vocab_size, c.intermediate_size, c.rms_norm_eps);
        let shape = HeadShape {
            m: t,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            pos0: 0,
        };
        let att_scale = 1.0 / (c.head_dim as f32).sqrt();
        let (row, n) = ((d * 4) as u64, t - 1);
        // Forward, keeping activations.
        if let GpuEmbed::Table(table) = &self.embed {
            ops.encode_embed(ctx, enc, table, &tb.ids, &tb.x, t, vocab, d)?;
        }
        for (b, a) in self.blocks.iter().zip(&tb.acts) {
            let kv = KvBuffers { k: &b.k_cache, v: &b.v_cache, max_seq: self.capacity };
            enc.copy_buffer_to_buffer(&tb.x, 0, &a.x_in, 0, t as u64 * row);
            ops.encode_rms_norm(ctx, enc, &tb.x, &b.attn_norm, &a.xn1, t, d, eps)?;
            b.q.encode(ops, ctx, enc, &a.xn1, &a.q, t)?;
            b.k.encode(ops, ctx, enc, &a.xn1, &a.k, t)?;
            b.v.encode(ops, ctx, enc, &a.xn1, &a.v, t)?;
            ops.encode_rope(ctx, enc, &a.q, &a.k, &self.rope, shape)?;
            ops.encode_kv_store(ctx, enc, &a.k, &a.v, kv, shape)?;
            ops.encode_attention(ctx, enc, &a.q, kv, &a.att, shape, att_scale)?;
            b.o.encode(ops, ctx, enc, &a.att, &tb.tmp, t)?;
            ops.encode_add(ctx, enc, &tb.x, &tb.tmp, t * d)?;
            enc.copy_buffer_to_buffer(&tb.x, 0, &a.x_mid, 0, t as u64 * row);
            ops.encode_rms_norm(ctx, enc, &tb.x, &b.mlp_norm, &a.xn2, t, d, eps)?;
            b.gate.encode(ops, ctx, enc, &a.xn2, &a.gate, t)?;
            b.up.encode(ops, ctx, enc, &a.xn2, &a.up, t)?;
            ops.encode_silu_mul(ctx, enc, &a.gate, &a.up, &a.act, t * inter)?;
            b.down.encode(ops, ctx, enc, &a.act, &tb.tmp, t)?;
            ops.encode_add(ctx, enc, &tb.x, &tb.tmp, t * d)?;
        }
        // Final norm, logits of the predicting rows 0..T-1, cross-entropy (logits become their gradient).
        ops.encode_rms_norm(ctx, enc, &tb.x, &self.norm, &tb.xnf, t, d, eps)?;
        self.lm_head.encode(ops, ctx, enc, &tb.xnf, &tb.logits, n)?;
        ops.encode_cross_entropy(ctx, enc, &tb.logits, &tb.targets, &tb.loss, n, vocab, scale)?;
        // Backward: lm_head (frozen; row T-1 predicts nothing: zero) → final norm.
        enc.clear_buffer(&tb.da, 0, None);
        self.lm_head.encode_backward(ops, ctx, enc, &tb.xnf, &tb.logits, &tb.da, &[], n)?;
        enc.clear_buffer(&tb.dx, 0, None);
        ops.encode_rms_norm_backward(ctx, enc, &tb.x, &self.norm, &tb.da, &tb.dx, t, d, eps)?;
        for slot in tb.grads.iter().flatten().flatten() {
            enc.clear_buffer(&slot.a, 0, None);
            enc.clear_buffer(&slot.b, 0, None);
        }
        for ((b, a), g) in self.blocks.iter().zip(&tb.acts).zip(&tb.grads).rev() {
            // MLP: x_out = x_mid + down(silu(gate(xn2))·up(xn2)).
            b.down.encode_backward(ops, ctx, enc, &a.act, &tb.dx, &tb.da, &g[6], t)?;
            ops.encode_silu_mul_backward(ctx, enc, &a.gate, &a.up, &tb.da, &tb.dgate, &tb.dup, t * inter)?;
            b.gate.encode_backward(ops, ctx, enc, &a.xn2, &tb.dgate, &tb.db, &g[4], t)?;
            b.up.encode_backward(ops, ctx, enc, &a.xn2, &tb.dup, &tb.dc, &g[5], t)?;
            ops.encode_add(ctx, enc, &tb.db, &tb.dc, t * d)?;
            ops.encode_rms_norm_backward(ctx, enc, &a.x_mid, &b.mlp_norm, &tb.db, &tb.dx, t, d, eps)?;
            // Attention: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            b.o.encode_backward(ops, ctx, enc, &a.att, &tb.dx, &tb.da, &g[3], t)?;
            let bufs = AttentionGradBuffers {
                q: &a.q,
                k: &a.k,
                v: &a.v,
                dout: &tb.da,
                probs: &tb.probs,
                ds: &tb.ds,
                dq: &tb.dq,
                dk: &tb.dk,
                dv: &tb.dv,
            };
            ops.encode_attention_backward(
                ctx,
                enc,
                bufs,
                t,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                att_scale,
            )?;
            ops.encode_rope(ctx, enc, &tb.dq, &tb.dk, &self.rope_inv, shape)?;
            b.q.encode_backward(ops, ctx, enc, &a.xn1, &tb.dq, &tb.db, &g[0], t)?;
            b.k.encode_backward(ops, ctx, enc, &a.xn1, &tb.dk, &tb.dc, &g[1], t)?;
            ops.encode_add(ctx, enc, &tb.db, &tb.dc, t * d)?;
            b.v.encode_backward(ops, ctx, enc, &a.xn1, &tb.dv, &tb.dc, &g[2], t)?;
            ops.encode_add(ctx, enc, &tb.db, &tb.dc, t * d)?;
            ops.encode_rms_norm_backward(ctx, enc, &a.x_in, &b.attn_norm, &tb.db, &tb.dx, t, d, eps)?;
        }
        // Readback: the losses, then every gradient.
        enc.copy_buffer_to_buffer(&tb.loss, 0, &tb.staging, 0, n as u64 * 4);
        for s in tb.grads.iter().flatten().flatten() {
            enc.copy_buffer_to_buffer(&s.a, 0, &tb.staging, s.at as u64 * 4, s.a_len as u64 * 4);
            enc.copy_buffer_to_buffer(&s.b, 0, &tb.staging, (s.at + s.a_len) as u64 * 4, s.b_len as u64 * 4);
        }
        Ok(tb.staging_words)
    }
}

impl Trainer {
    /// [`Trainer::step`] with the forward and backward on the GPU: each sequence of `batch` runs through
    /// [`GpuModel::loss_and_grads`] on `gpu` (uploaded from `model`, with the same adapters), the gradients
    /// accumulate on the host, the host optimizer updates `model`'s adapters, and
    /// [`GpuModel::write_adapters`] uploads them for the next step. Errors (the adapters unchanged) on a bad
    /// sequence or a non-finite gradient.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step_gpu(
        &mut self,
        ctx: &GpuContext,
        gpu: &mut GpuModel,
        model: &mut Model,
        batch: &[&[u32]],
    ) -> Result<crate::train::StepReport> {
        let report = self.accumulate(batch, |seq, scale, grads| gpu.loss_and_grads(ctx, seq, scale, grads))?;
        let stats = self.apply(model)?;
        gpu.write_adapters(ctx, model)?;
        Ok(crate::train::StepReport { stats, ..report })
    }
}
