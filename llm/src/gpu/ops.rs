//! [`GpuOps`]: the small kernels of a whole-model-resident forward (embedding, RMSNorm, RoPE, KV-cache append,
//! attention, SwiGLU, residual add, argmax), each recorded into a caller's `wgpu::CommandEncoder`.
//!
//! See the [module docs](super) for the recording rules (what is cached, why nothing is written through the
//! queue). Every buffer is caller-owned, needs `STORAGE` usage, and is read from byte 0, row-major; f32 except
//! token ids and argmax results (u32).

use super::cache::Lru;
use super::rope::RopeTable;
use crate::{Error, Result};
use lowbit::gpu::{wgpu, GpuContext};
use std::sync::{Mutex, MutexGuard};
use wgpu::util::DeviceExt;

/// Entries of the uniform cache (one 32-byte uniform per distinct (op, parameters)).
pub const UNIFORM_CACHE_ENTRIES: usize = 256;
/// Entries of the bind group cache (one per distinct (op, buffers, parameters)).
pub const BIND_GROUP_CACHE_ENTRIES: usize = 1024;
/// Largest `head_dim` [`GpuOps::encode_attention`] supports (its per-thread accumulators are sized for it).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads per workgroup of every kernel except attention (also the reductions' width).
pub const WG: u32 = 256;
/// Threads per workgroup of attention (one workgroup per (row, head); keys in tiles of this many).
pub const ATTN_WG: u32 = 64;
/// The x extent of 2-D dispatch grids (the shaders compute the group index as `x + y · GRID_X`).
const GRID_X: u64 = 65535;

/// The kernels, in the order of [`GpuOps`]'s pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Op {
    Embed,
    RmsNorm,
    Rope,
    KvStore,
    Attention,
    SiluMul,
    Add,
    Argmax,
    MatmulDense,
    // Training (see `ops_backward.rs`).
    CrossEntropy,
    MatmulNn,
    RmsNormBackward,
    SiluMulBackward,
    AttentionBackwardQ,
    AttentionBackwardKv,
}

const OPS: [Op; 15] = [
    Op::Embed,
    Op::RmsNorm,
    Op::Rope,
    Op::KvStore,
    Op::Attention,
    Op::SiluMul,
    Op::Add,
    Op::Argmax,
    Op::MatmulDense,
    Op::CrossEntropy,
    Op::MatmulNn,
    Op::RmsNormBackward,
    Op::SiluMulBackward,
    Op::AttentionBackwardQ,
    Op::AttentionBackwardKv,
];

/// How a kernel binds a storage buffer (binding 0 is always the op's uniform).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}
use Access::{Read, Write};

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::RmsNorm => "rms_norm",
            Op::Rope => "rope",
            Op::KvStore => "kv_store",
            Op::Attention => "attention",
            Op::SiluMul => "silu_mul",
            Op::Add => "add",
            Op::Argmax => "argmax",
            Op::MatmulDense => "matmul_dense",
            Op::CrossEntropy => "cross_entropy",
            Op::MatmulNn => "matmul_nn",
            Op::RmsNormBackward => "rms_norm_backward",
            Op::SiluMulBackward => "silu_mul_backward",
            Op::AttentionBackwardQ => "attention_backward_q",
            Op::AttentionBackwardKv => "attention_backward_kv",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Op::Embed => include_str!("../../shaders/embed.wgsl"),
            Op::RmsNorm => include_str!("../../shaders/rms_norm.wgsl"),
            Op::Rope => include_str!("../../shaders/rope.wgsl"),
            Op::KvStore => include_str!("../../shaders/kv_store.wgsl"),
            Op::Attention => include_str!("../../shaders/attention.wgsl"),
            Op::SiluMul => include_str!("../../shaders/silu_mul.wgsl"),
            Op::Add => include_str!("../../shaders/add.wgsl"),
            Op::Argmax => include_str!("../../shaders/argmax.wgsl"),
            Op::MatmulDense => include_str!("../../shaders/matmul_dense.wgsl"),
            Op::CrossEntropy => include_str!("../../shaders/cross_entropy.wgsl"),
            Op::MatmulNn => include_str!("../../shaders/matmul_nn.wgsl"),
            Op::RmsNormBackward => include_str!("../../shaders/rms_norm_backward.wgsl"),
            Op::SiluMulBackward => include_str!("../../shaders/silu_mul_backward.wgsl"),
            Op::AttentionBackwardQ => include_str!("../../shaders/attention_backward_q.wgsl"),
            Op::AttentionBackwardKv => include_str!("../../shaders/attention_backward_kv.wgsl"),
        }
    }

    /// Bindings 1.. in the shader's order.
    fn bindings(self) -> &'static [Access] {
        match self {
            Op::Embed => &[Read, Read, Write],
            Op::RmsNorm => &[Read, Read, Write],
            Op::Rope => &[Write, Write, Read, Read],
            Op::KvStore => &[Read, Read, Write, Write],
            Op::Attention => &[Read, Read, Read, Write],
            Op::SiluMul => &[Read, Read, Write],
            Op::Add => &[Write, Read],
            Op::Argmax => &[Read, Write],
            Op::MatmulDense => &[Read, Read, Read, Write],
            Op::CrossEntropy => &[Write, Read, Write],
            Op::MatmulNn => &[Read, Read, Write],
            Op::RmsNormBackward => &[Read, Read, Read, Write],
            Op::SiluMulBackward => &[Read, Read, Read, Write, Write],
            Op::AttentionBackwardQ => &[Read, Read, Read, Read, Write, Write, Write],
            Op::AttentionBackwardKv => &[Read, Read, Read, Read, Write, Write],
        }
    }

    fn workgroup_size(self) -> u32 {
        if matches!(self, Op::Attention | Op::AttentionBackwardQ) {
            ATTN_WG
        } else {
            WG
        }
    }
}

/// One compiled kernel.
#[derive(Debug)]
struct Kernel {
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
}

/// A cached bind group: the op, its uniform and every storage binding (buffer, bound size; 0 = whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    op: Op,
    uniform: wgpu::Buffer,
    buffers: Vec<(wgpu::Buffer, u64)>,
}

#[derive(Debug)]
struct Caches {
    uniforms: Lru<(Op, [u32; 8]), wgpu::Buffer>,
    groups: Lru<GroupKey, wgpu::BindGroup>,
    uniforms_created: u64,
    groups_created: u64,
}

/// One storage argument of a call: the buffer, the bytes the op touches, and its name for errors.
pub(super) struct Arg<'a> {
    buf: &'a wgpu::Buffer,
    bytes: u64,
    what: &'static str,
}

pub(super) fn arg<'a>(buf: &'a wgpu::Buffer, elems: usize, what: &'static str) -> Arg<'a> {
    Arg { buf, bytes: (elems as u64).saturating_mul(4), what }
}

pub(super) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// `a · b · …` as usize, or an error naming `what` when it overflows.
pub(super) fn product(factors: &[usize], what: &str) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| invalid(format!("{what}: the element count overflows")))
}

/// `v` as u32 (every index the shaders compute is u32), or an error.
pub(super) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v} exceeds the shaders' 32-bit indices")))
}

/// Shape of the attention-side ops ([`GpuOps::encode_rope`], [`GpuOps::encode_kv_store`],
/// [`GpuOps::encode_attention`]): `m` rows (tokens) at positions `pos0 .. pos0 + m`, `n_heads` query heads and
/// `n_kv_heads` key/value heads (grouped-query attention: `n_heads` a multiple of `n_kv_heads`) of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadShape {
    /// Rows (tokens) of this call.
    pub m: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key / value heads.
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Position of row 0.
    pub pos0: usize,
}

/// One layer's KV cache on the GPU: `k` and `v`, each `[n_kv_heads, max_seq, head_dim]` f32.
#[derive(Clone, Copy, Debug)]
pub struct KvBuffers<'a> {
    /// Keys, `[n_kv_heads, max_seq, head_dim]`.
    pub k: &'a wgpu::Buffer,
    /// Values, same layout.
    pub v: &'a wgpu::Buffer,
    /// Positions the cache holds.
    pub max_seq: usize,
}

/// The compiled pipelines of the small ops plus their uniform and bind group caches. Create one per
/// [`GpuContext`] ([`new`](Self::new)) and use it from any thread (`&self`; the caches are behind a mutex).
#[derive(Debug)]
pub struct GpuOps {
    kernels: Vec<Kernel>,
    caches: Mutex<Caches>,
}

impl GpuOps {
    /// Compiles every kernel on `ctx`'s device. On native backends a shader or pipeline error is returned
    /// ([`Error::Invalid`] with wgpu's message); in the browser it goes to the device's uncaptured-error handler.
    pub fn new(ctx: &GpuContext) -> Result<GpuOps> {
        let dev = ctx.device();
        #[cfg(not(target_arch = "wasm32"))]
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = OPS
            .iter()
            .map(|&op| {
                let storage = |read_only| wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                };
                let mut entries = vec![wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }];
                for (i, a) in op.bindings().iter().enumerate() {
                    entries.push(wgpu::BindGroupLayoutEntry {
                        binding: i as u32 + 1,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: storage(*a == Read),
                        count: None,
                    });
                }
                let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(op.name()),
                    entries: &entries,
                });
                let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(op.name()),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
                let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(op.name()),
                    source: wgpu::ShaderSource::Wgsl(op.source().into()),
                });
                let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(op.name()),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                Kernel { layout, pipeline }
            })
            .collect();
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(invalid(format!("compiling the lowbit-llm GPU kernels: {e}")));
        }
        Ok(GpuOps {
            kernels,
            caches: Mutex::new(Caches {
                uniforms: Lru::new(UNIFORM_CACHE_ENTRIES),
                groups: Lru::new(BIND_GROUP_CACHE_ENTRIES),
                uniforms_created: 0,
                groups_created: 0,
            }),
        })
    }

    /// Uniform buffers created so far (a repeated parameter set reuses its uniform).
    pub fn uniforms_created(&self) -> u64 {
        self.lock().uniforms_created
    }

    /// Bind groups created so far (a repeated call on the same buffers and parameters reuses its group).
    pub fn bind_groups_created(&self) -> u64 {
        self.lock().groups_created
    }

    /// Entries now in the bind group cache (at most [`BIND_GROUP_CACHE_ENTRIES`]).
    pub fn cached_bind_groups(&self) -> usize {
        self.lock().groups.len()
    }

    /// Empties both caches, releasing the references cached bind groups hold to callers' buffers. Work
    /// already recorded stays valid.
    pub fn clear_caches(&self) {
        let mut c = self.lock();
        c.uniforms.clear();
        c.groups.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Caches> {
        match self.caches.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records `out[r, :] = table[ids[r], :]` for `r < m` (an id `≥ vocab` writes a zero row; validate ids on
    /// the host before uploading them).
    ///
    /// * `table`: `[vocab, hidden]` f32; `ids`: `[m]` u32; `out`: `[m, hidden]` f32.
    ///
    /// One thread per output element. `m == 0` or `hidden == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_embed(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        table: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        out: &wgpu::Buffer,
        m: usize,
        vocab: usize,
        hidden: usize,
    ) -> Result<()> {
        if vocab == 0 {
            return Err(invalid("embed: vocab must be at least 1"));
        }
        let n_out = product(&[m, hidden], "embed output")?;
        let n_table = product(&[vocab, hidden], "embedding table")?;
        if n_out == 0 {
            return Ok(());
        }
        u32_of(n_table, "vocab · hidden")?;
        let threads = u32_of(n_out, "m · hidden")? as u64;
        let params = [u32_of(m, "m")?, vocab as u32, hidden as u32, 0, 0, 0, 0, 0];
        let args = [arg(table, n_table, "table"), arg(ids, m, "ids"), arg(out, n_out, "out")];
        self.record(ctx, encoder, Op::Embed, params, &args, threads.div_ceil(WG as u64))
    }

    /// Records RMSNorm (Hugging Face order: normalize, then multiply by the weight), all in f32:
    /// `y[r, :] = (x[r, :] · inverseSqrt(mean(x[r, :]²) + eps)) · w`.
    ///
    /// * `x`, `y`: `[m, n]` f32 (distinct buffers); `w`: `[n]` f32; `eps` finite and `≥ 0`.
    ///
    /// One workgroup of [`WG`] threads per row: strided f32 sums of squares, then a tree reduction in
    /// workgroup memory. `m == 0` or `n == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rms_norm(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(invalid(format!("rms_norm: eps = {eps} (must be finite and >= 0)")));
        }
        let len = product(&[m, n], "rms_norm input")?;
        if len == 0 {
            return Ok(());
        }
        u32_of(len, "m · n")?;
        if n >= 1 << 24 {
            return Err(invalid(format!("rms_norm: n = {n} (the mean divides by f32(n), exact below 2^24)")));
        }
        let params = [m as u32, n as u32, eps.to_bits(), 0, 0, 0, 0, 0];
        let args = [arg(x, len, "x"), arg(w, n, "w"), arg(y, len, "y")];
        self.record(ctx, encoder, Op::RmsNorm, params, &args, m as u64)
    }

    /// Records RoPE (Hugging Face `rotate_half`), in place on `q` and `k` at positions `pos0 + r`: for
    /// `i < half = head_dim / 2`, `(a, b) = (v[i], v[i + half])` becomes
    /// `(a·cos − b·sin, b·cos + a·sin)` with `cos` / `sin` at row `pos0 + r`, column `i` of `table`.
    ///
    /// * `q`: `[m, n_heads, head_dim]` f32; `k`: `[m, n_kv_heads, head_dim]` f32 (distinct buffers).
    /// * `table`: `[max_pos, half]` cos and sin with `table.half == head_dim / 2` and `pos0 + m ≤ max_pos`.
    ///
    /// One thread per rotated pair of q and k together. `m == 0` records nothing.
    pub fn encode_rope(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        table: &RopeTable,
        s: HeadShape,
    ) -> Result<()> {
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) || table.half * 2 != s.head_dim {
            return Err(invalid(format!(
                "rope: head_dim {} must be even, non-zero and twice the table's half {}",
                s.head_dim, table.half
            )));
        }
        check_positions("rope", s.pos0, s.m, table.max_pos, "the table's max_pos")?;
        let nq = product(&[s.m, s.n_heads, s.head_dim], "rope q")?;
        let nk = product(&[s.m, s.n_kv_heads, s.head_dim], "rope k")?;
        let pairs = product(&[s.m, s.n_heads + s.n_kv_heads, table.half], "rope pairs")?;
        if pairs == 0 {
            return Ok(());
        }
        let nt = product(&[table.max_pos, table.half], "rope table")?;
        for (v, what) in [(nq, "m · n_heads · head_dim"), (nk, "m · n_kv_heads · head_dim"), (pairs, "rope pairs")]
        {
            u32_of(v, what)?;
        }
        u32_of(nt, "max_pos · half")?;
        // The shader indexes q and k only for heads that exist; an empty one still needs a bindable word.
        let params = [s.m as u32, s.n_heads as u32, s.n_kv_heads as u32, table.half as u32, s.pos0 as u32, 0, 0, 0];
        let args =
            [arg(q, nq.max(1), "q"), arg(k, nk.max(1), "k"), arg(&table.cos, nt, "cos"), arg(&table.sin, nt, "sin")];
        self.record(ctx, encoder, Op::Rope, params, &args, (pairs as u64).div_ceil(WG as u64))
    }

    /// Records the KV-cache append: `cache.k[kvh, pos0 + r, :] = k[r, kvh, :]` and the same for `v`, for
    /// `r < m`.
    ///
    /// * `k`, `v`: `[m, n_kv_heads, head_dim]` f32; `cache.k`, `cache.v`: `[n_kv_heads, max_seq, head_dim]`
    ///   (four distinct buffers); `pos0 + m ≤ max_seq`. `n_heads` is not used.
    ///
    /// One thread per copied element. `m == 0` records nothing.
    pub fn encode_kv_store(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        cache: KvBuffers<'_>,
        s: HeadShape,
    ) -> Result<()> {
        check_positions("kv_store", s.pos0, s.m, cache.max_seq, "max_seq")?;
        let n = product(&[s.m, s.n_kv_heads, s.head_dim], "kv_store rows")?;
        if n == 0 {
            return Ok(());
        }
        let nc = product(&[s.n_kv_heads, cache.max_seq, s.head_dim], "kv cache")?;
        u32_of(nc, "n_kv_heads · max_seq · head_dim")?;
        let params = [s.m as u32, s.n_kv_heads as u32, s.head_dim as u32, s.pos0 as u32, cache.max_seq as u32, 0, 0, 0];
        let args = [arg(k, n, "k"), arg(v, n, "v"), arg(cache.k, nc, "k_cache"), arg(cache.v, nc, "v_cache")];
        self.record(ctx, encoder, Op::KvStore, params, &args, (n as u64).div_ceil(WG as u64))
    }

    /// Records causal grouped-query attention over the cache: for row `r` (position `p = pos0 + r`) and head
    /// `h` (kv head `h / (n_heads / n_kv_heads)`), `s_j = (q[r, h, :] · k[kvh, j, :]) · scale` for `j ≤ p`,
    /// `out[r, h, :] = Σ_j softmax(s)_j · v[kvh, j, :]` (softmax with max subtraction). The cache must already
    /// hold positions `0 ..= pos0 + m − 1` (record [`encode_kv_store`](Self::encode_kv_store) first).
    ///
    /// * `q`: `[m, n_heads, head_dim]` f32; `out`: `[m, n_heads · head_dim]` f32 (distinct from the others);
    ///   `cache.k`, `cache.v`: `[n_kv_heads, max_seq, head_dim]`; `pos0 + m ≤ max_seq`;
    ///   `1 ≤ head_dim ≤ MAX_HEAD_DIM`; `n_heads` a multiple of `n_kv_heads ≥ 1`; `scale` finite (usually
    ///   `1/sqrt(head_dim)`).
    ///
    /// One workgroup of [`ATTN_WG`] threads per (row, head), keys in tiles of [`ATTN_WG`] with an online
    /// softmax, so any length up to `max_seq` works. `m == 0` or `n_heads == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_attention(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        q: &wgpu::Buffer,
        cache: KvBuffers<'_>,
        out: &wgpu::Buffer,
        s: HeadShape,
        scale: f32,
    ) -> Result<()> {
        if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
            return Err(invalid(format!("attention: head_dim {} (must be 1 ..= {MAX_HEAD_DIM})", s.head_dim)));
        }
        if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(invalid(format!(
                "attention: n_heads {} must be a multiple of n_kv_heads {} >= 1",
                s.n_heads, s.n_kv_heads
            )));
        }
        if !scale.is_finite() {
            return Err(invalid(format!("attention: scale = {scale} (must be finite)")));
        }
        check_positions("attention", s.pos0, s.m, cache.max_seq, "max_seq")?;
        let nq = product(&[s.m, s.n_heads, s.head_dim], "attention q")?;
        if nq == 0 {
            return Ok(());
        }
        let nc = product(&[s.n_kv_heads, cache.max_seq, s.head_dim], "kv cache")?;
        u32_of(nq, "m · n_heads · head_dim")?;
        u32_of(nc, "n_kv_heads · max_seq · head_dim")?;
        let params = [
            s.m as u32,
            s.n_heads as u32,
            s.n_kv_heads as u32,
            s.head_dim as u32,
            s.pos0 as u32,
            cache.max_seq as u32,
            scale.to_bits(),
            0,
        ];
        let args = [arg(q, nq, "q"), arg(cache.k, nc, "k_cache"), arg(cache.v, nc, "v_cache"), arg(out, nq, "out")];
        self.record(ctx, encoder, Op::Attention, params, &args, (s.m * s.n_heads) as u64)
    }

    /// Records SwiGLU's elementwise part: `out[i] = gate[i] / (1 + exp(−gate[i])) · up[i]` for `i < n`
    /// (evaluated without overflow: a very negative gate gives `0 · up`, never NaN).
    ///
    /// * `gate`, `up`, `out`: `[n]` f32 (`out` distinct from the inputs).
    ///
    /// One thread per element. `n == 0` records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_silu_mul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let params = [u32_of(n, "n")?, 0, 0, 0, 0, 0, 0, 0];
        let args = [arg(gate, n, "gate"), arg(up, n, "up"), arg(out, n, "out")];
        self.record(ctx, encoder, Op::SiluMul, params, &args, (n as u64).div_ceil(WG as u64))
    }

    /// Records the residual add `x[i] += y[i]` for `i < n`.
    ///
    /// * `x`, `y`: `[n]` f32, distinct buffers.
    ///
    /// One thread per element. `n == 0` records nothing.
    pub fn encode_add(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let params = [u32_of(n, "n")?, 0, 0, 0, 0, 0, 0, 0];
        let args = [arg(x, n, "x"), arg(y, n, "y")];
        self.record(ctx, encoder, Op::Add, params, &args, (n as u64).div_ceil(WG as u64))
    }

    /// Records greedy decoding's argmax: `out[r]` = the index of the largest `logits[r, :]`, the lowest index
    /// among equal maxima (NaN logits give an unspecified index).
    ///
    /// * `logits`: `[m, vocab]` f32; `out`: `[m]` u32 (read back 4 bytes per row).
    ///
    /// One workgroup of [`WG`] threads per row: strided scans, then a tree reduction over (value, index).
    /// `m == 0` records nothing; `vocab == 0` is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_argmax(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        logits: &wgpu::Buffer,
        out: &wgpu::Buffer,
        m: usize,
        vocab: usize,
    ) -> Result<()> {
        if vocab == 0 {
            return Err(invalid("argmax: vocab must be at least 1"));
        }
        let len = product(&[m, vocab], "argmax logits")?;
        if m == 0 {
            return Ok(());
        }
        u32_of(len, "m · vocab")?;
        let params = [m as u32, vocab as u32, 0, 0, 0, 0, 0, 0];
        let args = [arg(logits, len, "logits"), arg(out, m, "out")];
        self.record(ctx, encoder, Op::Argmax, params, &args, m as u64)
    }

    /// Records a dense f32 linear layer: `y[r, o] = Σ_i x[r, i] · w[o, i] (+ bias[o])` for `r < m`, `o < n_out`
    /// (the CPU's dense layers and a tied or dense `lm_head`).
    ///
    /// * `x`: `[m, n_in]` f32; `w`: `[n_out, n_in]` f32 row-major; `bias`: `[n_out]` f32 or `None`;
    ///   `y`: `[m, n_out]` f32 (distinct from the inputs).
    ///
    /// One thread per output element, a sequential f32 sum over `i` (the order of a plain dot product).
    /// `m == 0` records nothing; `n_out == 0` or `n_in == 0` is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_dense_matmul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        y: &wgpu::Buffer,
        m: usize,
        n_out: usize,
        n_in: usize,
    ) -> Result<()> {
        if n_out == 0 || n_in == 0 {
            return Err(invalid(format!("matmul_dense: [{n_out}, {n_in}] weight (both must be at least 1)")));
        }
        let nx = product(&[m, n_in], "matmul_dense x")?;
        let ny = product(&[m, n_out], "matmul_dense y")?;
        let nw = product(&[n_out, n_in], "matmul_dense weight")?;
        if m == 0 {
            return Ok(());
        }
        for (v, what) in [(nx, "m · n_in"), (ny, "m · n_out"), (nw, "n_out · n_in")] {
            u32_of(v, what)?;
        }
        // Without a bias, the (unread) bias binding is `x` itself: a second read-only binding of one buffer.
        let (b, nb) = match bias {
            Some(b) => (b, n_out),
            None => (x, 1),
        };
        let params = [m as u32, n_out as u32, n_in as u32, bias.is_some() as u32, 0, 0, 0, 0];
        let args = [arg(x, nx, "x"), arg(w, nw, "w"), arg(b, nb, "bias"), arg(y, ny, "y")];
        self.record(ctx, encoder, Op::MatmulDense, params, &args, (ny as u64).div_ceil(WG as u64))
    }

    /// Validates the buffers and the grid, then records one compute pass of `op` over `groups` workgroups.
    pub(super) fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        op: Op,
        params: [u32; 8],
        args: &[Arg<'_>],
        groups: u64,
    ) -> Result<()> {
        let limits = ctx.limits();
        let max_binding = limits.max_storage_buffer_binding_size;
        let name = op.name();
        for (i, a) in args.iter().enumerate() {
            if !a.buf.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(invalid(format!("{name}: {} needs STORAGE usage, has {:?}", a.what, a.buf.usage())));
            }
            if a.buf.size() < a.bytes {
                return Err(invalid(format!(
                    "{name}: {} is {} bytes, the call needs {}",
                    a.what,
                    a.buf.size(),
                    a.bytes
                )));
            }
            if a.bytes > max_binding {
                return Err(invalid(format!(
                    "{name}: {} needs {} bytes, more than one storage binding ({max_binding} bytes)",
                    a.what, a.bytes
                )));
            }
            let access = op.bindings()[i];
            for (j, b) in args.iter().enumerate().skip(i + 1) {
                if a.buf == b.buf && (access == Write || op.bindings()[j] == Write) {
                    return Err(invalid(format!(
                        "{name}: {} and {} are the same buffer (one is written)",
                        a.what, b.what
                    )));
                }
            }
        }
        let max_dim = limits.max_compute_workgroups_per_dimension as u64;
        let (gx, gy) = (groups.min(GRID_X), groups.div_ceil(GRID_X));
        if gx > max_dim || gy > max_dim || groups.saturating_mul(op.workgroup_size() as u64) > u32::MAX as u64 {
            return Err(invalid(format!(
                "{name}: {groups} workgroups exceed the dispatch limits ({GRID_X} x {max_dim}, 32-bit thread ids)"
            )));
        }
        let bind_group = self.bind_group(ctx, op, params, args, max_binding)?;
        let mut pass =
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(name), timestamp_writes: None });
        pass.set_pipeline(&self.kernels[op as usize].pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(gx as u32, gy as u32, 1);
        Ok(())
    }

    /// The cached (or new) uniform and bind group of one call. Buffers larger than one storage binding are
    /// bound over the bytes the call needs (validated to fit), others whole.
    fn bind_group(
        &self,
        ctx: &GpuContext,
        op: Op,
        params: [u32; 8],
        args: &[Arg<'_>],
        max_binding: u64,
    ) -> Result<wgpu::BindGroup> {
        let dev = ctx.device();
        let mut c = self.lock();
        let uniform = match c.uniforms.get(&(op, params)) {
            Some(u) => u,
            None => {
                let u = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(op.name()),
                    contents: bytemuck::cast_slice(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
                c.uniforms.insert((op, params), u.clone());
                c.uniforms_created += 1;
                u
            }
        };
        let buffers: Vec<(wgpu::Buffer, u64)> = args
            .iter()
            .map(|a| (a.buf.clone(), if a.buf.size() <= max_binding { 0 } else { a.bytes.max(4) }))
            .collect();
        let key = GroupKey { op, uniform, buffers };
        if let Some(g) = c.groups.get(&key) {
            return Ok(g);
        }
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: key.uniform.as_entire_binding() }];
        for (i, (buf, size)) in key.buffers.iter().enumerate() {
            let resource = if *size == 0 {
                buf.as_entire_binding()
            } else {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: buf,
                    offset: 0,
                    size: wgpu::BufferSize::new(*size),
                })
            };
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource });
        }
        #[cfg(not(target_arch = "wasm32"))]
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(op.name()),
            layout: &self.kernels[op as usize].layout,
            entries: &entries,
        });
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(invalid(format!("{}: creating the bind group: {e}", op.name())));
        }
        c.groups.insert(key, group.clone());
        c.groups_created += 1;
        Ok(group)
    }
}

/// `pos0 + m ≤ limit`, or an error.
fn check_positions(op: &str, pos0: usize, m: usize, limit: usize, what: &str) -> Result<()> {
    match pos0.checked_add(m) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(invalid(format!("{op}: positions {pos0} .. {pos0} + {m} exceed {what} = {limit}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust constants match the shaders' (the shaders hard-code their workgroup sizes).
    #[test]
    fn shader_constants_match() {
        for op in OPS {
            let src = op.source();
            assert!(src.contains(&format!("const WG: u32 = {}u;", op.workgroup_size())), "{}", op.name());
            assert_eq!(src.matches("@binding(").count(), op.bindings().len() + 1, "{}", op.name());
        }
        let attn = Op::Attention.source();
        assert!(attn.contains(&format!("const MAX_HD: u32 = {MAX_HEAD_DIM}u;")));
        assert!(attn.contains(&format!("const PER: u32 = {}u;", MAX_HEAD_DIM as u32 / ATTN_WG)));
    }
}
