//! QLoRA training through the model: the forward of one whole sequence keeping every activation the backward
//! needs, the backward of every operation (RMSNorm, RoPE, causal attention, SwiGLU, residuals, the tied or own
//! `lm_head`, and each linear layer through lowbit's fused backward), the next-token cross-entropy, adapter
//! initialisation like PEFT's, and [`Trainer`], which runs optimizer steps over batches.
//!
//! Activations are **kept**, not recomputed: per layer the block input, both normed inputs, `q`/`k` (after
//! RoPE), `v`, the attention probabilities, the attention output, the mid-block residual and the MLP's gate,
//! up and product (about `T·(6·hidden + 3·intermediate + q + 2·kv) + heads·T²` floats per layer; SmolLM2 at
//! T = 128: about 5 MB per layer, 150 MB in all). The embedding, the norms and the quantized weights are
//! frozen; only LoRA adapters get gradients.

use crate::backward::{
    attention_backward, attention_train_forward, cross_entropy, matmul_nn, matmul_nt, rms_norm_backward_rows,
    rope_backward, silu_mul_backward, AttentionDims,
};
use crate::model::LmHead;
use crate::ops::{apply_rope, rms_norm, silu_mul};
use crate::{Embedding, Error, Model, Result};
use lowbit::linear::{AdapterGrad, Workspace};
use lowbit::lora::LoraAdapter;
use lowbit::optim::{Optimizer, OptimizerConfig, ParamSpec, StepStats};

/// Gradients of every adapter of the model: per block, per linear layer (in [`crate::model::Block::linears`]
/// order), one [`AdapterGrad`] per adapter of that layer.
#[derive(Debug, Clone, Default)]
pub struct ModelGrads {
    pub blocks: Vec<Vec<Vec<AdapterGrad>>>,
}

impl ModelGrads {
    /// Sets every gradient to zero.
    pub fn zero(&mut self) {
        self.blocks.iter_mut().flatten().flatten().for_each(AdapterGrad::zero);
    }

    /// The gradients of the layer `model.layers.{block}.{name}` (`name` as in `Block::linears`).
    pub fn layer(&self, block: usize, name: &str) -> Option<&[AdapterGrad]> {
        let i = LINEAR_NAMES.iter().position(|n| *n == name)?;
        self.blocks.get(block).map(|b| &b[i][..])
    }
}

const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One block's saved activations.
#[derive(Debug, Default)]
struct LayerActs {
    x_in: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// Buffers of one training forward + backward, reused across calls (grown on first use).
#[derive(Debug, Default)]
pub struct TrainState {
    acts: Vec<LayerActs>,
    x: Vec<f32>,
    xnf: Vec<f32>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    dx: Vec<f32>,
    d_a: Vec<f32>,
    d_b: Vec<f32>,
    d_c: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    ds: Vec<f32>,
    dgate: Vec<f32>,
    dup: Vec<f32>,
    tmp: Vec<f32>,
    ws: Workspace,
}

fn fit(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The summed next-token cross-entropy of one sequence and how many positions it covers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSum {
    /// `Σ −log p(tokens[i+1] | tokens[..=i])` over `i = 0..T−1` (f64).
    pub sum: f64,
    /// Predicted positions, `T − 1`.
    pub count: usize,
}

impl Model {
    /// Zeroed gradients for every adapter of every block (see [`ModelGrads`]).
    pub fn zero_grads(&self) -> ModelGrads {
        ModelGrads {
            blocks: self.blocks.iter().map(|b| b.linears().iter().map(|(_, l)| l.zero_grads()).collect()).collect(),
        }
    }

    /// One training forward and backward of `tokens` (a whole sequence at positions `0..T`, `T ≥ 2`, no KV
    /// cache): returns the summed next-token cross-entropy and ADDS `scale ·` its gradient into `grads` for
    /// every enabled adapter (pass `scale = 1 / predicted positions of the batch` for a mean loss). Errors on
    /// fewer than two tokens, an id ≥ vocab, a sequence longer than the RoPE table, `grads` not from
    /// [`zero_grads`](Self::zero_grads), or a non-finite value.
    pub fn loss_and_grads(
        &self,
        tokens: &[u32],
        scale: f32,
        grads: &mut ModelGrads,
        st: &mut TrainState,
    ) -> Result<LossSum> {
        rayon::scope(|_| self.loss_and_grads_in_pool(tokens, scale, grads, st))
    }

    fn loss_and_grads_in_pool(
        &self,
        tokens: &[u32],
        scale: f32,
        grads: &mut ModelGrads,
        st: &mut TrainState,
    ) -> Result<LossSum> {
        let c = &self.config;
        let (t, d, vocab) = (tokens.len(), c.hidden_size, c.vocab_size);
        if t < 2 {
            return Err(Error::Invalid(format!("a training sequence of {t} tokens (expected at least 2)")));
        }
        if let Some(id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {id}, expected < vocab size {vocab}")));
        }
        if t > self.rope.max_pos() {
            return Err(Error::Invalid(format!(
                "a training sequence of {t} tokens; this model's RoPE covers at most {}",
                self.rope.max_pos()
            )));
        }
        if !scale.is_finite() {
            return Err(Error::Invalid(format!("loss scale {scale}, expected a finite number")));
        }
        let shape_ok = grads.blocks.len() == self.blocks.len()
            && grads.blocks.iter().zip(&self.blocks).all(|(g, b)| {
                g.len() == 7 && g.iter().zip(b.linears()).all(|(gl, (_, l))| gl.len() == l.adapter_count())
            });
        if !shape_ok {
            return Err(Error::Invalid(
                "gradients not shaped for this model's adapters (use Model::zero_grads)".into(),
            ));
        }
        let dims =
            AttentionDims { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let (qw, kvw, inter) = (c.q_width(), c.kv_width(), c.intermediate_size);
        let eps = c.rms_norm_eps;
        let s = st;
        if s.acts.len() != self.blocks.len() {
            s.acts.resize_with(self.blocks.len(), LayerActs::default);
        }
        // Forward, keeping activations.
        fit(&mut s.x, t * d);
        for (r, &id) in tokens.iter().enumerate() {
            self.embed.row_into(id as usize, &mut s.x[r * d..(r + 1) * d])?;
        }
        for (b, a) in self.blocks.iter().zip(s.acts.iter_mut()) {
            a.x_in.clone_from(&s.x);
            fit(&mut a.xn1, t * d);
            norm_rows(&s.x, &b.attn_norm, eps, &mut a.xn1, d);
            fit(&mut a.q, t * qw);
            fit(&mut a.k, t * kvw);
            fit(&mut a.v, t * kvw);
            b.q.forward(&a.xn1, &mut a.q, &mut s.ws)?;
            b.k.forward(&a.xn1, &mut a.k, &mut s.ws)?;
            b.v.forward(&a.xn1, &mut a.v, &mut s.ws)?;
            for r in 0..t {
                let (cos, sin) = self.rope.row(r);
                apply_rope(&mut a.q[r * qw..(r + 1) * qw], c.head_dim, cos, sin);
                apply_rope(&mut a.k[r * kvw..(r + 1) * kvw], c.head_dim, cos, sin);
            }
            fit(&mut a.probs, dims.heads * t * t);
            fit(&mut a.att, t * qw);
            attention_train_forward(dims, t, &a.q, &a.k, &a.v, &mut a.probs, &mut a.att)?;
            fit(&mut s.tmp, t * d);
            b.o.forward(&a.att, &mut s.tmp, &mut s.ws)?;
            add(&mut s.x, &s.tmp);
            a.x_mid.clone_from(&s.x);
            fit(&mut a.xn2, t * d);
            norm_rows(&s.x, &b.mlp_norm, eps, &mut a.xn2, d);
            fit(&mut a.gate, t * inter);
            fit(&mut a.up, t * inter);
            b.gate.forward(&a.xn2, &mut a.gate, &mut s.ws)?;
            b.up.forward(&a.xn2, &mut a.up, &mut s.ws)?;
            a.act.clone_from(&a.gate);
            silu_mul(&mut a.act, &a.up);
            b.down.forward(&a.act, &mut s.tmp, &mut s.ws)?;
            add(&mut s.x, &s.tmp);
        }
        // Final norm, logits of the predicting positions 0..T-1, loss.
        let n = t - 1;
        fit(&mut s.xnf, t * d);
        norm_rows(&s.x, &self.norm, eps, &mut s.xnf, d);
        fit(&mut s.logits, n * vocab);
        let head_in = &s.xnf[..n * d];
        match &self.lm_head {
            LmHead::Tied => match &self.embed {
                Embedding::F32(e) => matmul_nt(n, d, vocab, head_in, e, &mut s.logits)?,
                Embedding::Int8(q) => q.forward_into(head_in, &mut s.logits, &mut s.ws)?,
            },
            LmHead::Own(l) => l.forward(head_in, &mut s.logits, &mut s.ws)?,
        }
        fit(&mut s.dlogits, n * vocab);
        let sum = cross_entropy(&s.logits, &tokens[1..], scale, &mut s.dlogits)?;
        if !sum.is_finite() {
            return Err(Error::Model(format!("the training loss is {sum} (the forward overflowed)")));
        }
        // Backward: lm_head (frozen) → final norm.
        fit(&mut s.d_a, t * d); // ∂L/∂xnf (row T-1 has no target: zero)
        match &self.lm_head {
            LmHead::Tied => match &self.embed {
                Embedding::F32(e) => matmul_nn(n, vocab, d, &s.dlogits, e, &mut s.d_a[..n * d])?,
                Embedding::Int8(q) => q.backward_into(
                    head_in,
                    &s.dlogits,
                    Some(&mut s.d_a[..n * d]),
                    &mut [],
                    &mut s.ws,
                    Default::default(),
                )?,
            },
            LmHead::Own(l) => {
                let mut none = l.zero_grads();
                l.backward(head_in, &s.dlogits, &mut s.d_a[..n * d], &mut none, &mut s.ws)?
            }
        }
        fit(&mut s.dx, t * d);
        rms_norm_backward_rows(&s.x, &self.norm, eps, &s.d_a, &mut s.dx)?;
        for ((b, a), g) in self.blocks.iter().zip(&s.acts).zip(grads.blocks.iter_mut()).rev() {
            // MLP: x_out = x_mid + down(silu(gate(xn2))·up(xn2)).
            fit(&mut s.d_a, t * inter);
            b.down.backward(&a.act, &s.dx, &mut s.d_a, &mut g[6], &mut s.ws)?;
            fit(&mut s.dgate, t * inter);
            fit(&mut s.dup, t * inter);
            silu_mul_backward(&a.gate, &a.up, &s.d_a, &mut s.dgate, &mut s.dup)?;
            fit(&mut s.d_b, t * d);
            fit(&mut s.d_c, t * d);
            b.gate.backward(&a.xn2, &s.dgate, &mut s.d_b, &mut g[4], &mut s.ws)?;
            b.up.backward(&a.xn2, &s.dup, &mut s.d_c, &mut g[5], &mut s.ws)?;
            add(&mut s.d_b, &s.d_c);
            rms_norm_backward_rows(&a.x_mid, &b.mlp_norm, eps, &s.d_b, &mut s.dx)?;
            // Attention: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            fit(&mut s.d_a, t * qw);
            b.o.backward(&a.att, &s.dx, &mut s.d_a, &mut g[3], &mut s.ws)?;
            fit(&mut s.dq, t * qw);
            fit(&mut s.dk, t * kvw);
            fit(&mut s.dv, t * kvw);
            fit(&mut s.ds, dims.heads * t * t);
            attention_backward(
                dims, t, &a.q, &a.k, &a.v, &a.probs, &s.d_a, &mut s.ds, &mut s.dq, &mut s.dk, &mut s.dv,
            )?;
            for r in 0..t {
                let (cos, sin) = self.rope.row(r);
                rope_backward(&mut s.dq[r * qw..(r + 1) * qw], c.head_dim, cos, sin)?;
                rope_backward(&mut s.dk[r * kvw..(r + 1) * kvw], c.head_dim, cos, sin)?;
            }
            fit(&mut s.d_b, t * d);
            fit(&mut s.d_c, t * d);
            b.q.backward(&a.xn1, &s.dq, &mut s.d_b, &mut g[0], &mut s.ws)?;
            b.k.backward(&a.xn1, &s.dk, &mut s.d_c, &mut g[1], &mut s.ws)?;
            add(&mut s.d_b, &s.d_c);
            b.v.backward(&a.xn1, &s.dv, &mut s.d_c, &mut g[2], &mut s.ws)?;
            add(&mut s.d_b, &s.d_c);
            rms_norm_backward_rows(&a.x_in, &b.attn_norm, eps, &s.d_b, &mut s.dx)?;
        }
        Ok(LossSum { sum, count: n })
    }

    /// The adapters of every block with their module paths (`model.layers.{i}.{name}`), in block then
    /// [`crate::model::Block::linears`] order: what [`lowbit::io::peft`] writes.
    pub fn adapter_modules(&self) -> Vec<(String, &LoraAdapter)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, l) in b.linears() {
                for ad in l.all_adapters() {
                    out.push((format!("model.layers.{i}.{name}"), ad));
                }
            }
        }
        out
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], d: usize) {
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        rms_norm(xr, w, eps, yr);
    }
}

/// How new adapters are created: PEFT's LoRA defaults (A Kaiming-uniform with `a = √5`, i.e.
/// `U(−1/√in, 1/√in)`; B zeros), from a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInit {
    /// Module names to adapt, matched against the last path component (`q_proj`, `v_proj`, …).
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f32,
    pub use_rslora: bool,
    pub seed: u64,
    /// The adapter name (PEFT's `default`).
    pub name: String,
}

/// SplitMix64: the seeded generator of adapter initialisation (not PyTorch's: the same seed gives the same
/// adapter in lowbit on every platform, not the same numbers as PEFT).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [−1, 1) with 24 random bits.
    fn signed(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Attaches a new adapter named `init.name` to every targeted linear layer of every block and returns how
/// many were attached. Errors on an empty or unknown target list (a name that matches no layer), rank 0, a
/// non-finite alpha, or a layer that already has an adapter of that name.
pub fn init_adapters(model: &mut Model, init: &LoraInit) -> Result<usize> {
    if init.targets.is_empty() {
        return Err(Error::Invalid("no target modules (expected e.g. q_proj,v_proj)".into()));
    }
    for t in &init.targets {
        if !LINEAR_NAMES.iter().any(|n| n.rsplit('.').next() == Some(t.as_str())) {
            return Err(Error::Invalid(format!(
                "target module `{t}`, expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
            )));
        }
    }
    if init.rank == 0 || !init.alpha.is_finite() {
        return Err(Error::Invalid(format!(
            "LoRA rank {} and alpha {} (expected rank ≥ 1 and a finite alpha)",
            init.rank, init.alpha
        )));
    }
    let mut rng = SplitMix(init.seed);
    let mut count = 0;
    for b in model.blocks_mut() {
        for name in LINEAR_NAMES {
            let short = name.rsplit('.').next().unwrap_or(name);
            if !init.targets.iter().any(|t| t == short) {
                continue;
            }
            let l = b.linear_mut(name).ok_or_else(|| Error::Invalid(format!("no layer {name}")))?;
            let (n_out, n_in) = (l.out_features(), l.in_features());
            let bound = 1.0 / (n_in as f32).sqrt();
            let a: Vec<f32> = (0..init.rank * n_in).map(|_| rng.signed() * bound).collect();
            let bm = vec![0.0f32; n_out * init.rank];
            l.add_adapter(LoraAdapter::new(init.name.clone(), init.rank, a, bm, init.alpha, init.use_rslora)?)?;
            count += 1;
        }
    }
    Ok(count)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean next-token cross-entropy of the batch before the update.
    pub loss: f64,
    /// Predicted positions in the batch.
    pub predicted: usize,
    /// Tokens run (forward + backward).
    pub tokens: usize,
    /// The optimizer's statistics (global gradient norm before clipping, clip coefficient, step).
    pub stats: StepStats,
}

/// Runs optimizer steps on the enabled adapters of a model: a batch of sequences is run one sequence at a
/// time, its gradients accumulate (scaled so the loss is the mean over every predicted position of the
/// batch), then one [`Optimizer`] step updates every `A` (learning rate `lr`) and `B` (`lr ×
/// lora_plus_ratio`, LoRA+).
#[derive(Debug)]
pub struct Trainer {
    opt: Optimizer,
    grads: ModelGrads,
    state: TrainState,
}

impl Trainer {
    /// A trainer for `model`'s adapters as attached now (attach before, and do not add or remove adapters
    /// between steps). Errors on an invalid config or a model without adapters.
    pub fn new(model: &Model, config: OptimizerConfig) -> Result<Trainer> {
        let mut specs = Vec::new();
        for b in &model.blocks {
            for (_, l) in b.linears() {
                for ad in l.adapters() {
                    specs.push(ParamSpec { len: ad.a().len(), lora_b: false });
                    specs.push(ParamSpec { len: ad.b().len(), lora_b: true });
                }
            }
        }
        if specs.is_empty() {
            return Err(Error::Invalid("the model has no enabled LoRA adapters to train".into()));
        }
        let opt = Optimizer::new(config, &specs)?;
        Ok(Trainer { opt, grads: model.zero_grads(), state: TrainState::default() })
    }

    /// The gradients of the last step (before its update; after clipping, if any).
    pub fn grads(&self) -> &ModelGrads {
        &self.grads
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
    }

    /// Mutable optimizer (learning-rate schedules).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.opt
    }

    /// One step on `batch` (each sequence ≥ 2 tokens): loss and gradients, then the update. Errors (the
    /// adapters unchanged) on a bad sequence or a non-finite gradient.
    pub fn step(&mut self, model: &mut Model, batch: &[&[u32]]) -> Result<StepReport> {
        let mut state = std::mem::take(&mut self.state);
        let report = self.accumulate(batch, |seq, scale, grads| model.loss_and_grads(seq, scale, grads, &mut state));
        self.state = state;
        let report = report?;
        let stats = self.apply(model)?;
        Ok(StepReport { stats, ..report })
    }

    /// Zeroes the gradients and runs `loss_and_grads(sequence, scale, grads)` over `batch` with the scale of
    /// a mean over every predicted position; returns the report without optimizer statistics.
    pub(crate) fn accumulate(
        &mut self,
        batch: &[&[u32]],
        mut loss_and_grads: impl FnMut(&[u32], f32, &mut ModelGrads) -> Result<LossSum>,
    ) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::Invalid("an empty batch (expected at least one sequence)".into()));
        }
        let predicted: usize = batch.iter().map(|s| s.len().saturating_sub(1)).sum();
        let tokens: usize = batch.iter().map(|s| s.len()).sum();
        let scale = 1.0 / predicted.max(1) as f32;
        self.grads.zero();
        let mut sum = 0.0;
        for seq in batch {
            sum += loss_and_grads(seq, scale, &mut self.grads)?.sum;
        }
        let stats = StepStats { grad_norm: 0.0, clip_coef: 1.0, step: 0 };
        Ok(StepReport { loss: sum / predicted as f64, predicted, tokens, stats })
    }

    /// The optimizer update with the accumulated gradients.
    pub(crate) fn apply(&mut self, model: &mut Model) -> Result<StepStats> {
        let mut params: Vec<&mut [f32]> = Vec::new();
        let mut grads: Vec<&mut [f32]> = Vec::new();
        for (b, gb) in model.blocks.iter_mut().zip(self.grads.blocks.iter_mut()) {
            for (l, gl) in b.linears_mut().into_iter().zip(gb.iter_mut()) {
                for (ad, g) in l.adapters_mut().iter_mut().zip(gl.iter_mut()) {
                    if !ad.is_enabled() {
                        continue;
                    }
                    let (a, bm) = ad.weights_mut();
                    params.push(a);
                    params.push(bm);
                    grads.push(&mut g.a);
                    grads.push(&mut g.b);
                }
            }
        }
        Ok(self.opt.step(&mut params, &mut grads)?)
    }
}
