//! [`GpuModel`]: the whole [`Model`] resident on the GPU (see the struct's docs).

use super::buffers::{storage_f32, storage_zeroed};
use super::ops::{GpuOps, HeadShape, KvBuffers};
use super::rope::RopeTable;
use crate::linear::Linear;
use crate::model::{LmHead, Logits, Model};
use crate::{Config, Embedding, Error, Result};
use lowbit::gpu::{wgpu, GpuContext, GpuLinear};

/// One linear layer on the GPU.
#[derive(Debug)]
pub(super) enum GpuLin {
    /// A lowbit quantized layer (its adapters uploaded with it).
    Quant(Box<GpuLinear>),
    /// Dense f32 weights `[n_out, n_in]` and an optional bias (also the tied `lm_head`: the embedding buffer).
    Dense { w: wgpu::Buffer, bias: Option<wgpu::Buffer>, n_out: usize, n_in: usize },
}

impl GpuLin {
    fn upload(ctx: &GpuContext, name: &str, l: &Linear) -> Result<GpuLin> {
        match l {
            Linear::Quant(q) => Ok(GpuLin::Quant(Box::new(GpuLinear::upload(ctx, q)?))),
            Linear::Dense(d) => {
                if !l.adapters().is_empty() {
                    return Err(Error::Model(format!(
                        "{name}: adapters on dense layers need --scheme on the GPU (quantize the weights)"
                    )));
                }
                fits_one_binding(
                    ctx,
                    name,
                    d.weight().len(),
                    "quantize it (--scheme, or --lm-head for the output layer)",
                )?;
                Ok(GpuLin::Dense {
                    w: storage_f32(ctx, name, d.weight()),
                    bias: l.bias().map(|b| storage_f32(ctx, name, b)),
                    n_out: l.out_features(),
                    n_in: l.in_features(),
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode(
        &self,
        ops: &GpuOps,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<()> {
        match self {
            GpuLin::Quant(q) => Ok(q.encode_forward(ctx, enc, x, y, m)?),
            GpuLin::Dense { w, bias, n_out, n_in } => {
                ops.encode_dense_matmul(ctx, enc, x, w, bias.as_ref(), y, m, *n_out, *n_in)
            }
        }
    }
}

/// One decoder block's weights and its slice of the KV cache.
#[derive(Debug)]
pub(super) struct GpuBlock {
    pub(super) attn_norm: wgpu::Buffer,
    pub(super) mlp_norm: wgpu::Buffer,
    pub(super) q: GpuLin,
    pub(super) k: GpuLin,
    pub(super) v: GpuLin,
    pub(super) o: GpuLin,
    pub(super) gate: GpuLin,
    pub(super) up: GpuLin,
    pub(super) down: GpuLin,
    pub(super) k_cache: wgpu::Buffer,
    pub(super) v_cache: wgpu::Buffer,
}

impl GpuBlock {
    /// The seven linear layers in [`crate::model::Block::linears`] order (q, k, v, o, gate, up, down).
    pub(super) fn linears(&self) -> [&GpuLin; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }
}

/// Activation buffers for up to `max_batch` rows (each op writes a buffer none of its inputs is).
#[derive(Debug)]
struct Scratch {
    ids: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    tmp: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    act: wgpu::Buffer,
    last_x: wgpu::Buffer,
    last_xn: wgpu::Buffer,
    logits: wgpu::Buffer,
    argmax: wgpu::Buffer,
    /// `MAP_READ | COPY_DST`, `max_batch · vocab` words: the one readback of a forward.
    staging: wgpu::Buffer,
}

/// A [`Model`] resident on the GPU with its own KV cache (one sequence). Every weight is uploaded once; a forward of `m`
/// tokens records every layer's ops into ONE command encoder, submits it ONCE and reads back only what the
/// caller asked for (the last row's logits, every row's, or the 4-byte argmax of the last row).
///
/// The math is the CPU [`Model::forward`]'s: `x = embed[ids]`; per block `xn = rms_norm(x)`, `q, k, v`
/// projections, RoPE at positions `pos .. pos + m`, KV-cache append, causal grouped-query attention with
/// scale `1/sqrt(head_dim)`, `x += o(att)`, `xn = rms_norm(x)`, `x += down(silu(gate(xn)) · up(xn))`; then the
/// final RMSNorm of the rows whose logits are wanted and the `lm_head`. Quantized linears run lowbit's
/// [`GpuLinear`] kernels (adapters included); dense linears and a tied or dense `lm_head` run
/// [`GpuOps::encode_dense_matmul`].
///
/// Buffers: activations for up to `max_batch` rows, the KV cache for `capacity` positions (per layer,
/// `[n_kv_heads, capacity, head_dim]` for keys and for values), a logits buffer `[max_batch, vocab]` and one
/// mappable staging buffer are allocated by [`GpuModel::upload`] and reused: a forward allocates nothing on
/// the host proportional to the model (only the readback's `Vec` and, for new positions, a few cached
/// uniforms and bind groups). The token ids are the only upload per forward: one `queue.write_buffer`
/// issued after recording and just before the submit (so a recording error leaves nothing queued).
///
/// On lavapipe (2 shared CPU cores) SmolLM2-135M nf4:64+dq decodes at about 5 s per token, of which the
/// dense tied `lm_head` (`49152 × 576`, one thread per logit) is about 0.6 s; the rest is the 210 quantized
/// linears. Real GPUs are the target.
#[derive(Debug)]
pub struct GpuModel {
    pub(super) config: Config,
    pub(super) ops: GpuOps,
    pub(super) embed: GpuEmbed,
    pub(super) blocks: Vec<GpuBlock>,
    pub(super) norm: wgpu::Buffer,
    pub(super) lm_head: GpuLin,
    pub(super) rope: RopeTable,
    /// `rope` with negated sines: the inverse rotation.
    pub(super) rope_inv: RopeTable,
    pub(super) capacity: usize,
    pub(super) max_batch: usize,
    pub(super) len: usize,
    s: Scratch,
    /// Buffers of training ([`GpuModel::loss_and_grads`]), allocated on first use.
    pub(super) train: Option<super::train::TrainBuffers>,
    pub(super) submissions: u64,
    pub(super) readbacks: u64,
}

/// An f32 matrix of `floats` values must fit one storage buffer binding (a dense layer's kernel binds it
/// whole): else [`Error::Model`] naming the matrix, both sizes and `remedy`, instead of wgpu's validation panic.
fn fits_one_binding(ctx: &GpuContext, name: &str, floats: usize, remedy: &str) -> Result<()> {
    let limits = ctx.limits();
    let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let bytes = (floats as u64).saturating_mul(4);
    if bytes > max {
        return Err(Error::Model(format!(
            "{name}: the f32 matrix is {bytes} bytes, more than this device's largest storage buffer binding \
             ({max} bytes); {remedy}"
        )));
    }
    Ok(())
}

/// Where the embedding rows come from.
#[derive(Debug)]
pub(super) enum GpuEmbed {
    /// The dense f32 table on the GPU, gathered by the embed kernel.
    Table(wgpu::Buffer),
    /// An int8 embedding stays on the host (it is also the tied head, uploaded as a quantized layer): the
    /// forward's rows are dequantized there and written into `x` with the token ids.
    Host(std::sync::Arc<lowbit::linear::QuantLinear>),
}

/// What a recorded forward ends with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Logits(Logits),
    Greedy,
}

impl GpuModel {
    /// Uploads every weight once: quantized linears as [`GpuLinear`]s (with their adapters), dense linears and
    /// the tied (the embedding buffer itself) or dense `lm_head` as f32 matrices, the embedding, the norms and
    /// the RoPE tables for `capacity` positions; allocates the KV cache for `capacity` positions and scratch
    /// buffers for forwards of up to `max_batch` tokens. Compiles the small kernels ([`GpuOps`]).
    ///
    /// Errors: [`Error::Invalid`] for `capacity` or `max_batch` of 0 or a `capacity` past the model's RoPE
    /// table; [`Error::Model`] for LoRA adapters on a dense layer (quantize it to run adapters on the GPU) and
    /// for an f32 embedding or dense layer larger than one storage buffer binding of this device (128 MiB at
    /// the WebGPU default limits, e.g. Llama-3.2-1B's `128256 × 2048` embedding: keep it int8, quantize the
    /// layer); [`Error::Lowbit`] when a quantized layer cannot be uploaded.
    pub fn upload(ctx: &GpuContext, model: &Model, capacity: usize, max_batch: usize) -> Result<GpuModel> {
        let c = model.config().clone();
        if capacity == 0 || max_batch == 0 {
            return Err(Error::Invalid(format!(
                "GPU model with capacity {capacity} and max_batch {max_batch} (both must be at least 1)"
            )));
        }
        let host_rope = model.rope();
        if capacity > host_rope.max_pos() {
            return Err(Error::Invalid(format!(
                "a context of {capacity} positions; this model's RoPE covers at most {}",
                host_rope.max_pos()
            )));
        }
        let ops = GpuOps::new(ctx)?;
        let half = c.head_dim / 2;
        let rope = RopeTable::from_slices(
            ctx,
            &host_rope.cos()[..capacity * half],
            &host_rope.sin()[..capacity * half],
            capacity,
            half,
        )?;
        // The inverse rotation (RoPE's backward, for training): the same kernel with negated sines.
        let neg_sin: Vec<f32> = host_rope.sin()[..capacity * half].iter().map(|s| -s).collect();
        let rope_inv = RopeTable::from_slices(ctx, &host_rope.cos()[..capacity * half], &neg_sin, capacity, half)?;
        let embed = match model.embedding() {
            Embedding::F32(e) => {
                let remedy = "keep the embedding as int8 on the host (LoadOptions::embedding, --embedding int8; a \
                              tied lm_head then runs on that int8 matrix)";
                fits_one_binding(ctx, "embed_tokens", e.len(), remedy)?;
                GpuEmbed::Table(storage_f32(ctx, "embed_tokens", e))
            }
            Embedding::Int8(q) => GpuEmbed::Host(q.clone()),
        };
        let kv_len = c.num_key_value_heads * capacity * c.head_dim;
        let blocks = model
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let lin = |name: &str, l: &Linear| GpuLin::upload(ctx, &format!("model.layers.{i}.{name}"), l);
                Ok(GpuBlock {
                    attn_norm: storage_f32(ctx, "input_layernorm", &b.attn_norm),
                    mlp_norm: storage_f32(ctx, "post_attention_layernorm", &b.mlp_norm),
                    q: lin("self_attn.q_proj", &b.q)?,
                    k: lin("self_attn.k_proj", &b.k)?,
                    v: lin("self_attn.v_proj", &b.v)?,
                    o: lin("self_attn.o_proj", &b.o)?,
                    gate: lin("mlp.gate_proj", &b.gate)?,
                    up: lin("mlp.up_proj", &b.up)?,
                    down: lin("mlp.down_proj", &b.down)?,
                    k_cache: storage_zeroed(ctx, "k cache", kv_len),
                    v_cache: storage_zeroed(ctx, "v cache", kv_len),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match model.lm_head() {
            LmHead::Tied => match &embed {
                GpuEmbed::Table(w) => {
                    GpuLin::Dense { w: w.clone(), bias: None, n_out: c.vocab_size, n_in: c.hidden_size }
                }
                GpuEmbed::Host(q) => GpuLin::Quant(Box::new(GpuLinear::upload(ctx, q)?)),
            },
            LmHead::Own(l) => GpuLin::upload(ctx, "lm_head", l)?,
        };
        let (b, d) = (max_batch, c.hidden_size);
        let z = |label: &str, n: usize| storage_zeroed(ctx, label, n);
        let s = Scratch {
            ids: z("ids", b),
            x: z("x", b * d),
            xn: z("xn", b * d),
            q: z("q", b * c.q_width()),
            k: z("k", b * c.kv_width()),
            v: z("v", b * c.kv_width()),
            att: z("att", b * c.q_width()),
            tmp: z("tmp", b * d),
            gate: z("gate", b * c.intermediate_size),
            up: z("up", b * c.intermediate_size),
            act: z("act", b * c.intermediate_size),
            last_x: z("last_x", d),
            last_xn: z("last_xn", d),
            logits: z("logits", b * c.vocab_size),
            argmax: z("argmax", 1),
            staging: ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("lowbit-llm logits staging"),
                size: (b * c.vocab_size).max(1) as u64 * 4,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        Ok(GpuModel {
            norm: storage_f32(ctx, "norm", model.final_norm()),
            config: c,
            ops,
            embed,
            blocks,
            lm_head,
            rope,
            rope_inv,
            capacity,
            max_batch,
            len: 0,
            s,
            train: None,
            submissions: 0,
            readbacks: 0,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Positions in the GPU KV cache (the next forward's first position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the KV cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Most tokens one forward takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Empties the KV cache (a new sequence; the stale entries are overwritten before they are read).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Queue submissions since [`upload`](Self::upload) (one per forward).
    pub fn submissions(&self) -> u64 {
        self.submissions
    }

    /// Readbacks (buffer maps) since [`upload`](Self::upload) (one per forward).
    pub fn readbacks(&self) -> u64 {
        self.readbacks
    }

    /// Runs `tokens` at positions `len() .. len() + m` in one submission and appends them to the GPU KV
    /// cache; writes the last row's logits (`Logits::Last`, `logits.len() == vocab`) or every row's
    /// (`Logits::All`, `m · vocab`). Errors ([`Error::Invalid`], nothing appended) on an empty `tokens`, more
    /// than `max_batch` tokens, an id ≥ vocab, a full cache or a wrong `logits` length; ([`Error::Model`],
    /// nothing appended) on non-finite logits. Blocks until the GPU is done; in the browser, where nothing may
    /// block, use [`forward_async`](Self::forward_async).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward(&mut self, ctx: &GpuContext, tokens: &[u32], which: Logits, logits: &mut [f32]) -> Result<()> {
        lowbit::gpu::block_on(self.forward_async(ctx, tokens, which, logits))
    }

    /// [`forward`](Self::forward) awaiting the GPU instead of blocking (the same submission and results).
    pub async fn forward_async(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        which: Logits,
        logits: &mut [f32],
    ) -> Result<()> {
        let rows_out = if which == Logits::All { tokens.len() } else { 1 };
        if logits.len() != rows_out * self.config.vocab_size {
            return Err(Error::Invalid(format!(
                "logits buffer of {} values, expected {rows_out}·{}",
                logits.len(),
                self.config.vocab_size
            )));
        }
        let words = self.run(ctx, tokens, Output::Logits(which)).await?;
        if let Some(i) = words.iter().position(|v| !v.is_finite()) {
            return Err(Error::Model(format!("logit {i} is {} (the forward overflowed f32)", words[i])));
        }
        logits.copy_from_slice(&words);
        self.len += tokens.len();
        Ok(())
    }

    /// [`forward`](Self::forward) with greedy decoding on the GPU: returns the argmax of the last row's
    /// logits (the lowest index among equal maxima), reading back 4 bytes. The logits are not checked for
    /// finiteness (they stay on the GPU). Blocks; see [`forward_greedy_async`](Self::forward_greedy_async).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_greedy(&mut self, ctx: &GpuContext, tokens: &[u32]) -> Result<u32> {
        lowbit::gpu::block_on(self.forward_greedy_async(ctx, tokens))
    }

    /// [`forward_greedy`](Self::forward_greedy) awaiting the GPU instead of blocking.
    pub async fn forward_greedy_async(&mut self, ctx: &GpuContext, tokens: &[u32]) -> Result<u32> {
        let words = self.run(ctx, tokens, Output::Greedy).await?;
        self.len += tokens.len();
        Ok(words[0].to_bits())
    }

    /// Validates, records the whole forward into one encoder, writes the ids, submits once and reads the
    /// staging buffer back once. Does not advance `len`.
    async fn run(&mut self, ctx: &GpuContext, tokens: &[u32], out: Output) -> Result<Vec<f32>> {
        let c = &self.config;
        let (m, pos0) = (tokens.len(), self.len);
        if m == 0 || m > self.max_batch {
            return Err(Error::Invalid(format!("forward of {m} tokens (expected 1 ..= max_batch {})", self.max_batch)));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!("token id {t}, expected < vocab size {}", c.vocab_size)));
        }
        if pos0 + m > self.capacity {
            return Err(Error::Invalid(format!(
                "{m} tokens after {pos0} cached positions exceed the GPU context of {} (reset or upload with a larger capacity)",
                self.capacity
            )));
        }
        let mut enc = ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        let words = self.record(ctx, &mut enc, m, pos0, out)?;
        self.write_host_embedding(ctx, tokens, &self.s.x)?;
        ctx.queue().write_buffer(&self.s.ids, 0, bytemuck::cast_slice(tokens));
        ctx.queue().submit([enc.finish()]);
        self.submissions += 1;
        let v = lowbit::gpu::read_f32(ctx.device(), &self.s.staging, words).await?;
        self.readbacks += 1;
        Ok(v)
    }

    /// With an int8 embedding kept on the host ([`GpuEmbed::Host`]), dequantizes the rows of `tokens` there and
    /// writes them into `x` (taking effect at the next submission); with a GPU table, does nothing (the embed
    /// kernel gathers the rows).
    pub(super) fn write_host_embedding(&self, ctx: &GpuContext, tokens: &[u32], x: &wgpu::Buffer) -> Result<()> {
        if let GpuEmbed::Host(q) = &self.embed {
            let d = self.config.hidden_size;
            let mut rows = vec![0.0f32; tokens.len() * d];
            let emb = Embedding::Int8(q.clone());
            for (r, &t) in tokens.iter().enumerate() {
                emb.row_into(t as usize, &mut rows[r * d..(r + 1) * d])?;
            }
            ctx.queue().write_buffer(x, 0, bytemuck::cast_slice(&rows));
        }
        Ok(())
    }

    /// Records the forward of `m` rows at `pos0` and the copy of its result into the staging buffer; returns
    /// the number of 4-byte words that copy holds.
    fn record(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        m: usize,
        pos0: usize,
        out: Output,
    ) -> Result<usize> {
        let (c, s, ops) = (&self.config, &self.s, &self.ops);
        let (d, vocab, inter, eps) = (c.hidden_size, c.vocab_size, c.intermediate_size, c.rms_norm_eps);
        let shape = HeadShape {
            m,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            pos0,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        if let GpuEmbed::Table(table) = &self.embed {
            ops.encode_embed(ctx, enc, table, &s.ids, &s.x, m, vocab, d)?;
        }
        for b in &self.blocks {
            let kv = KvBuffers { k: &b.k_cache, v: &b.v_cache, max_seq: self.capacity };
            ops.encode_rms_norm(ctx, enc, &s.x, &b.attn_norm, &s.xn, m, d, eps)?;
            b.q.encode(ops, ctx, enc, &s.xn, &s.q, m)?;
            b.k.encode(ops, ctx, enc, &s.xn, &s.k, m)?;
            b.v.encode(ops, ctx, enc, &s.xn, &s.v, m)?;
            ops.encode_rope(ctx, enc, &s.q, &s.k, &self.rope, shape)?;
            ops.encode_kv_store(ctx, enc, &s.k, &s.v, kv, shape)?;
            ops.encode_attention(ctx, enc, &s.q, kv, &s.att, shape, scale)?;
            b.o.encode(ops, ctx, enc, &s.att, &s.tmp, m)?;
            ops.encode_add(ctx, enc, &s.x, &s.tmp, m * d)?;
            ops.encode_rms_norm(ctx, enc, &s.x, &b.mlp_norm, &s.xn, m, d, eps)?;
            b.gate.encode(ops, ctx, enc, &s.xn, &s.gate, m)?;
            b.up.encode(ops, ctx, enc, &s.xn, &s.up, m)?;
            ops.encode_silu_mul(ctx, enc, &s.gate, &s.up, &s.act, m * inter)?;
            b.down.encode(ops, ctx, enc, &s.act, &s.tmp, m)?;
            ops.encode_add(ctx, enc, &s.x, &s.tmp, m * d)?;
        }
        let rows_out = match out {
            Output::Logits(Logits::All) => {
                ops.encode_rms_norm(ctx, enc, &s.x, &self.norm, &s.xn, m, d, eps)?;
                self.lm_head.encode(ops, ctx, enc, &s.xn, &s.logits, m)?;
                m
            }
            Output::Logits(Logits::Last) | Output::Greedy => {
                // The linears read from byte 0: move the last row to a buffer of its own first.
                let row = (d * 4) as u64;
                enc.copy_buffer_to_buffer(&s.x, (m as u64 - 1) * row, &s.last_x, 0, row);
                ops.encode_rms_norm(ctx, enc, &s.last_x, &self.norm, &s.last_xn, 1, d, eps)?;
                self.lm_head.encode(ops, ctx, enc, &s.last_xn, &s.logits, 1)?;
                1
            }
        };
        if out == Output::Greedy {
            ops.encode_argmax(ctx, enc, &s.logits, &s.argmax, 1, vocab)?;
            enc.copy_buffer_to_buffer(&s.argmax, 0, &s.staging, 0, 4);
            Ok(1)
        } else {
            let words = rows_out * vocab;
            enc.copy_buffer_to_buffer(&s.logits, 0, &s.staging, 0, words as u64 * 4);
            Ok(words)
        }
    }
}
