//! [`Model`]: the Llama-family decoder on the CPU — embeddings, `num_hidden_layers` blocks of RMSNorm →
//! grouped-query attention with RoPE over a [`KvCache`] → residual → RMSNorm → SwiGLU MLP → residual, then
//! the final RMSNorm and `lm_head` — and [`State`], the per-sequence buffers a forward reuses.

use crate::linear::{matmul_t, Linear};
use crate::ops::{apply_rope, rms_norm, silu_mul, softmax, RopeTable};
use crate::{Config, Embedding, Error, KvCache, Result};
use lowbit::linear::{Activations, ForwardOptions, Workspace};
use rayon::prelude::*;

/// One decoder block.
#[derive(Debug)]
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Block {
    /// The block's linear layers with their Hugging Face module names (relative to `model.layers.N.`).
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }

    /// Every linear layer, mutable, in [`linears`](Self::linears) order.
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }

    /// Mutable access to the linear layer named as in [`linears`](Self::linears).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "self_attn.q_proj" => &mut self.q,
            "self_attn.k_proj" => &mut self.k,
            "self_attn.v_proj" => &mut self.v,
            "self_attn.o_proj" => &mut self.o,
            "mlp.gate_proj" => &mut self.gate,
            "mlp.up_proj" => &mut self.up,
            "mlp.down_proj" => &mut self.down,
            _ => return None,
        })
    }
}

/// The output projection: its own linear layer, or the embedding matrix (tied weights: dense f32, or the
/// same int8 matrix the embedding is stored as).
#[derive(Debug)]
pub enum LmHead {
    Tied,
    Own(Box<Linear>),
}

/// A loaded model: weights, config and the RoPE table. Immutable during forwards (shareable across threads);
/// per-sequence data lives in [`State`].
#[derive(Debug)]
pub struct Model {
    pub(crate) config: Config,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: LmHead,
    pub(crate) rope: RopeTable,
}

impl State {
    /// Runs the quantized layers (and a tied int8 lm_head) of later forwards with `activations`:
    /// [`Activations::Int8`] quantizes each layer's input to int8 per block of 32 and multiplies in integers
    /// (faster, approximate: `docs/formats.md` §12); [`Activations::F32`] (the default) is exact up to f32
    /// accumulation. Dense layers always run in f32.
    pub fn set_activations(&mut self, activations: Activations) {
        self.activations = activations;
    }

    /// The activation mode later forwards use.
    pub fn activations(&self) -> Activations {
        self.activations
    }
}

/// Which positions' logits a forward writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`[vocab]`): generation.
    Last,
    /// Every token's (`[m, vocab]`): perplexity, `--logits-out`.
    All,
}

/// Per-sequence state: the KV cache and every scratch buffer, grown on first use and reused, so that a
/// forward of as many tokens as before allocates nothing.
#[derive(Debug)]
pub struct State {
    pub cache: KvCache,
    /// The activation mode of the quantized layers ([`Activations::F32`] by default; see
    /// [`State::set_activations`]).
    activations: Activations,
    ws: Workspace,
    /// The second workspace of two layers run side by side (decode: `q` beside `k`, `v`; `gate` beside `up`).
    ws2: Workspace,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    last: Vec<f32>,
}

impl Model {
    /// Assembles a model from its parts (a dense f32 embedding), checking every shape against `config`.
    pub fn from_parts(
        config: Config,
        embed: Vec<f32>,
        blocks: Vec<Block>,
        norm: Vec<f32>,
        lm_head: LmHead,
    ) -> Result<Model> {
        Model::from_parts_with_embedding(config, Embedding::F32(embed), blocks, norm, lm_head)
    }

    /// [`from_parts`](Self::from_parts) with the embedding in any [`Embedding`] storage.
    pub fn from_parts_with_embedding(
        config: Config,
        embed: Embedding,
        blocks: Vec<Block>,
        norm: Vec<f32>,
        lm_head: LmHead,
    ) -> Result<Model> {
        let c = &config;
        let want = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::Model(format!("{what} has {got} values, expected {want} for this config")))
            }
        };
        let (rows, cols) = embed.dims(c.hidden_size);
        want("model.embed_tokens.weight", rows * cols, c.vocab_size * c.hidden_size)?;
        if cols != c.hidden_size {
            return Err(Error::Model(format!(
                "model.embed_tokens.weight has rows of {cols}, expected {}",
                c.hidden_size
            )));
        }
        want("model.norm.weight", norm.len(), c.hidden_size)?;
        if blocks.len() != c.num_hidden_layers {
            return Err(Error::Model(format!("{} layers, config says {}", blocks.len(), c.num_hidden_layers)));
        }
        for (i, b) in blocks.iter().enumerate() {
            want(&format!("model.layers.{i}.input_layernorm.weight"), b.attn_norm.len(), c.hidden_size)?;
            want(&format!("model.layers.{i}.post_attention_layernorm.weight"), b.mlp_norm.len(), c.hidden_size)?;
            let shapes = [
                (c.q_width(), c.hidden_size),
                (c.kv_width(), c.hidden_size),
                (c.kv_width(), c.hidden_size),
                (c.hidden_size, c.q_width()),
                (c.intermediate_size, c.hidden_size),
                (c.intermediate_size, c.hidden_size),
                (c.hidden_size, c.intermediate_size),
            ];
            for ((name, l), (o, inp)) in b.linears().into_iter().zip(shapes) {
                if (l.out_features(), l.in_features()) != (o, inp) {
                    return Err(Error::Model(format!(
                        "model.layers.{i}.{name} is [{}, {}], expected [{o}, {inp}]",
                        l.out_features(),
                        l.in_features()
                    )));
                }
            }
        }
        if let LmHead::Own(l) = &lm_head {
            if (l.out_features(), l.in_features()) != (c.vocab_size, c.hidden_size) {
                return Err(Error::Model(format!(
                    "lm_head is [{}, {}], expected [{}, {}]",
                    l.out_features(),
                    l.in_features(),
                    c.vocab_size,
                    c.hidden_size
                )));
            }
        }
        if !norm.iter().all(|v| v.is_finite()) || !embed.is_finite() {
            return Err(Error::Model("the embedding or final norm holds inf or NaN".into()));
        }
        let rope = RopeTable::new(c.head_dim, c.rope_theta, c.max_position_embeddings.min(1 << 16));
        Ok(Model { config, embed, blocks, norm, lm_head, rope })
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The decoder blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Builds the interleaved copy of every quantized layer that the AVX-512 VNNI int8-activation kernel reads
    /// ([`QuantLinear::build_act8_layout`](lowbit::linear::QuantLinear::build_act8_layout)), for a model run
    /// with [`Activations::Int8`]; the f32 mode is unchanged. Returns the bytes the copies hold (0 where the
    /// CPU has no VNNI or no layer fits).
    pub fn build_act8_layouts(&mut self) -> usize {
        let mut bytes = 0;
        let mut build = |l: &mut Linear| {
            if let Linear::Quant(q) = l {
                q.build_act8_layout();
                bytes += q.act8_layout_bytes();
            }
        };
        for b in &mut self.blocks {
            b.linears_mut().into_iter().for_each(&mut build);
        }
        if let LmHead::Own(l) = &mut self.lm_head {
            build(l);
        }
        bytes
    }

    /// Mutable blocks (to attach adapters).
    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// The embedding matrix `[vocab, hidden]`.
    pub fn embedding(&self) -> &Embedding {
        &self.embed
    }

    /// The final norm's weight.
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The output projection.
    pub fn lm_head(&self) -> &LmHead {
        &self.lm_head
    }

    /// The RoPE table.
    pub fn rope(&self) -> &RopeTable {
        &self.rope
    }

    /// Bytes of weights a decode step streams (every linear layer, the lm_head, norms; not the embedding).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().flat_map(|b| b.linears()).map(|(_, l)| l.weight_bytes()).sum();
        let head = match &self.lm_head {
            LmHead::Tied => self.embed.bytes(),
            LmHead::Own(l) => l.weight_bytes(),
        };
        blocks + head
    }

    /// A fresh state whose KV cache holds `capacity` positions (at most the RoPE table's,
    /// `min(max_position_embeddings, 65536)`).
    pub fn new_state(&self, capacity: usize) -> Result<State> {
        if capacity > self.rope.max_pos() {
            return Err(Error::Invalid(format!(
                "a context of {capacity} positions; this model's RoPE covers at most {}",
                self.rope.max_pos()
            )));
        }
        Ok(State {
            cache: KvCache::new(&self.config, capacity)?,
            activations: Activations::F32,
            ws: Workspace::default(),
            ws2: Workspace::default(),
            x: Vec::new(),
            xn: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            tmp: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            // Decode steps (one row) need heads · capacity scores at most: reserved once.
            scores: Vec::with_capacity(self.config.num_attention_heads * capacity),
            last: Vec::new(),
        })
    }

    /// Runs `tokens` at positions `state.cache.len()..` and appends them to the cache; writes the logits of
    /// the last token (`logits.len() == vocab`) or of every token (`m · vocab`). Errors (nothing appended) on
    /// an empty `tokens`, a token id ≥ vocab, a cache too small, a wrong `logits` length, or a layer whose
    /// output overflows f32.
    pub fn forward(&self, tokens: &[u32], state: &mut State, which: Logits, logits: &mut [f32]) -> Result<()> {
        // One entry into the thread pool per forward: the layers' parallel loops then start from a worker
        // (work-stealing deques) instead of each being injected from outside (which also allocates).
        rayon::scope(|_| self.forward_in_pool(tokens, state, which, logits))
    }

    fn forward_in_pool(&self, tokens: &[u32], state: &mut State, which: Logits, logits: &mut [f32]) -> Result<()> {
        let c = &self.config;
        let (m, d, pos0) = (tokens.len(), c.hidden_size, state.cache.len());
        if m == 0 {
            return Err(Error::Invalid("forward of no tokens (expected at least one)".into()));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!("token id {t}, expected < vocab size {}", c.vocab_size)));
        }
        if pos0 + m > state.cache.capacity() {
            return Err(Error::Invalid(format!(
                "{m} tokens after {pos0} cached positions exceed the context of {} (start a new state or use a longer --ctx)",
                state.cache.capacity()
            )));
        }
        let rows_out = if which == Logits::All { m } else { 1 };
        if logits.len() != rows_out * c.vocab_size {
            return Err(Error::Invalid(format!(
                "logits buffer of {} values, expected {rows_out}·{}",
                logits.len(),
                c.vocab_size
            )));
        }
        let s = state;
        let fit = |v: &mut Vec<f32>, n: usize| {
            if v.len() != n {
                v.resize(n, 0.0)
            }
        };
        fit(&mut s.x, m * d);
        fit(&mut s.xn, m * d);
        fit(&mut s.q, m * c.q_width());
        fit(&mut s.k, m * c.kv_width());
        fit(&mut s.v, m * c.kv_width());
        fit(&mut s.att, m * c.q_width());
        fit(&mut s.tmp, m * d);
        fit(&mut s.gate, m * c.intermediate_size);
        fit(&mut s.up, m * c.intermediate_size);
        fit(&mut s.scores, m * c.num_attention_heads * (pos0 + m));
        for (r, &t) in tokens.iter().enumerate() {
            self.embed.row_into(t as usize, &mut s.x[r * d..(r + 1) * d])?;
        }
        let act = s.activations;
        for (l, b) in self.blocks.iter().enumerate() {
            norm_rows(&s.x, &b.attn_norm, c.rms_norm_eps, &mut s.xn, d);
            let (xn, q, k, v) = (&s.xn, &mut s.q, &mut s.k, &mut s.v);
            pair(
                side_by_side(m),
                (&mut s.ws, &mut s.ws2),
                |ws| b.q.forward_with(xn, q, ws, act),
                |ws| b.k.forward_with(xn, k, ws, act).and_then(|_| b.v.forward_with(xn, v, ws, act)),
            )?;
            for r in 0..m {
                let (cos, sin) = self.rope.row(pos0 + r);
                apply_rope(&mut s.q[r * c.q_width()..(r + 1) * c.q_width()], c.head_dim, cos, sin);
                let kr = r * c.kv_width()..(r + 1) * c.kv_width();
                apply_rope(&mut s.k[kr.clone()], c.head_dim, cos, sin);
                s.cache.store(l, pos0 + r, &s.k[kr.clone()], &s.v[kr]);
            }
            attention(c, &s.cache, l, pos0, &s.q, &mut s.scores, &mut s.att);
            b.o.forward_with(&s.att, &mut s.tmp, &mut s.ws, act)?;
            add(&mut s.x, &s.tmp);
            norm_rows(&s.x, &b.mlp_norm, c.rms_norm_eps, &mut s.xn, d);
            let (xn, gate, up) = (&s.xn, &mut s.gate, &mut s.up);
            pair(
                side_by_side(m),
                (&mut s.ws, &mut s.ws2),
                |ws| b.gate.forward_with(xn, gate, ws, act),
                |ws| b.up.forward_with(xn, up, ws, act),
            )?;
            silu_mul(&mut s.gate, &s.up);
            b.down.forward_with(&s.gate, &mut s.tmp, &mut s.ws, act)?;
            add(&mut s.x, &s.tmp);
        }
        let first = m - rows_out;
        fit(&mut s.last, rows_out * d);
        norm_rows(&s.x[first * d..], &self.norm, c.rms_norm_eps, &mut s.last, d);
        match &self.lm_head {
            LmHead::Tied => match &self.embed {
                Embedding::F32(e) => matmul_t(e, c.vocab_size, d, &s.last, logits),
                Embedding::Int8(q) => {
                    q.forward_into_with(&s.last, logits, &mut s.ws, ForwardOptions::default().activations(act))?
                }
            },
            LmHead::Own(l) => l.forward_with(&s.last, logits, &mut s.ws, act)?,
        }
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(Error::Model(format!("logit {i} is {} (the forward overflowed f32)", logits[i])));
        }
        s.cache.set_len(pos0 + m);
        Ok(())
    }
}

/// Whether the layers that read the same input run side by side (`q` beside `k` then `v`, `gate` beside `up`:
/// two [`lowbit::cpu::join`] branches, each forward splitting further inside the pool) rather than one after another,
/// each split over every thread. At decode sizes a layer's split costs a fixed ~1.5 µs at two threads (quantizing
/// `x`, the second worker picking up its half, the join) against 5–10 µs of work on SmolLM2's layers, and `k` and
/// `v` (192×576) are too small to split with int8 activations; side by side, the two branches keep both threads
/// busy. SmolLM2-135M NF4+DQ decode at two threads, 200 tokens, builds alternated, 6 runs each: `--act8
/// --embedding int8:channel` 212–256 → 255–277 tokens/s (median 226 → 264), f32 activations 158–171 → 164–174
/// (164 → 168). The same bits either way. Prefill (many rows) keeps one layer at a time.
fn side_by_side(m: usize) -> bool {
    m <= 4
}

/// `first` then `second` on the first workspace, or side by side ([`lowbit::cpu::join`], one workspace each)
/// when `side_by_side`; the first error of the two.
fn pair(
    side_by_side: bool,
    (ws, ws2): (&mut Workspace, &mut Workspace),
    first: impl FnOnce(&mut Workspace) -> Result<()> + Send,
    second: impl FnOnce(&mut Workspace) -> Result<()> + Send,
) -> Result<()> {
    if side_by_side {
        let (a, b) = lowbit::cpu::join(|| first(ws), || second(ws2));
        a.and(b)
    } else {
        first(&mut *ws)?;
        second(ws)
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], d: usize) {
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        rms_norm(xr, w, eps, yr);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Causal grouped-query attention of the `m` query rows at positions `pos0..pos0+m` over layer `l`'s cache
/// (which already holds them), threaded over (row, head). `pub(crate)` so that the training forward
/// (`backward::attention_train_forward`) can be tested bit-for-bit against it.
pub(crate) fn attention(
    c: &Config,
    cache: &KvCache,
    l: usize,
    pos0: usize,
    q: &[f32],
    scores: &mut [f32],
    att: &mut [f32],
) {
    let (hd, nh) = (c.head_dim, c.num_attention_heads);
    let group = nh / c.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total = scores.len() / (att.len() / hd).max(1);
    att.par_chunks_mut(hd).zip(scores.par_chunks_mut(total)).enumerate().for_each(|(i, (out, sc))| {
        let (r, h) = (i / nh, i % nh);
        let n = pos0 + r + 1;
        let (keys, values) = cache.head(l, h / group, n);
        let qv = &q[i * hd..(i + 1) * hd];
        let sc = &mut sc[..n];
        for (j, s) in sc.iter_mut().enumerate() {
            *s = crate::linear::dot(qv, &keys[j * hd..(j + 1) * hd]) * scale;
        }
        softmax(sc);
        out.fill(0.0);
        for (j, &p) in sc.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                *o += p * v;
            }
        }
    });
}
