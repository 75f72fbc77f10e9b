//! `GpuLinear`: a `QuantLinear` uploaded once, run by the fused WGSL kernels. The recording design (what is
//! cached, why nothing is rewritten through the queue) is documented in the `gpu` module docs.

use super::context::GpuContext;
use super::layout::{bind, BindingSet, CallParams, ChunkParams, GEMM_TILE, MAXM};
use super::readback::{read_f32, read_u64};
use super::shader::{KernelKey, KernelOp};
use crate::format::affine::Granularity;
use crate::format::four_bit::BlockScales;
use crate::format::layer::{LayerView, QuantWeight};
use crate::Error;
use crate::Scheme;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use wgpu::util::DeviceExt;

/// Upload settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct UploadOptions {
    /// Largest storage binding to use, in bytes (`None`: the device's `max_storage_buffer_binding_size`).
    /// Lower values force the weight to be split into more chunks (used by tests).
    pub max_binding_bytes: Option<u64>,
}

/// Which kernel variant a forward uses. `Default`: GEMV for M ≤ 16 else GEMM, subgroups when the device
/// has them, f32 tiles (f16 only when asked for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelChoice {
    /// Force [`KernelOp::Gemv`] or [`KernelOp::Gemm`] (`None`: by M).
    pub op: Option<KernelOp>,
    /// Use (`Some(true)`) or avoid subgroup reductions (`None`: use when available). GEMV only.
    pub subgroups: Option<bool>,
    /// Use f16 tiles and products in the GEMM (`Some(true)`; errors if the device lacks `shader-f16`).
    /// The host-slice forwards fall back to f32 when `max|x|·max|w|` could overflow f16; recording with
    /// [`GpuLinear::encode_forward_with`] cannot look at `x`, so there the caller vouches for the range.
    /// `None`/`Some(false)`: f32.
    pub f16: Option<bool>,
}

/// Largest M for which the automatic choice picks GEMV.
const GEMV_MAX_M: usize = 16;
/// f16 products are used only when `max|x| · max|w|` stays below this (f16 max is 65504).
pub const F16_SAFE_PRODUCT: f32 = 16384.0;
/// Entries of each per-layer cache (per-call uniforms and masks; bind groups).
pub const CACHE_ENTRIES: usize = 64;

/// One slice of the weight: whole output rows `[row0, row0 + rows)`.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) codes: wgpu::Buffer,
    pub(super) scales: wgpu::Buffer,
    pub(super) params: wgpu::Buffer,
    pub(super) rows: u32,
}

/// Buffers of the host-slice forwards (x upload, y, readback), reused while M fits.
#[derive(Debug)]
struct Scratch {
    m_cap: usize,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    readback: wgpu::Buffer,
}

/// Which adapters each row adds, as stored in the `rowinfo` buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Masks {
    /// Every row uses the same adapter mask, stored once (`mask_stride` 0).
    Shared(Vec<u32>),
    /// One mask per row (`mask_stride` = words per mask).
    PerRow(Vec<u32>),
}

/// A validated adapter selection for `m` rows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct CallKey {
    pub(super) m: u32,
    pub(super) masks: Masks,
}

/// The immutable per-call buffers of one [`CallKey`].
#[derive(Debug)]
pub(super) struct CallState {
    pub(super) call: wgpu::Buffer,
    pub(super) rowinfo: wgpu::Buffer,
    pub(super) use_lora: bool,
}

/// What a cached bind group binds besides the layer's own buffers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    t: wgpu::Buffer,
    call: wgpu::Buffer,
    m: u32,
}

/// A small least-recently-used map.
#[derive(Debug)]
pub(super) struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    tick: u64,
}

impl<K, V> Default for Lru<K, V> {
    fn default() -> Self {
        Lru { map: HashMap::new(), tick: 0 }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Lru<K, V> {
    pub(super) fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|(v, t)| {
            *t = tick;
            v.clone()
        })
    }

    pub(super) fn insert(&mut self, k: K, v: V) {
        if self.map.len() >= CACHE_ENTRIES {
            if let Some(old) = self.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) {
                self.map.remove(&old);
            }
        }
        self.tick += 1;
        self.map.insert(k, (v, self.tick));
    }
}

/// Per-layer caches of the recording path.
#[derive(Debug, Default)]
pub(super) struct Caches {
    pub(super) calls: Lru<CallKey, Arc<CallState>>,
    groups: Lru<GroupKey, Arc<Vec<wgpu::BindGroup>>>,
    /// The LoRA scratch `t`, grown (never shrunk) to the largest m·Σr recorded.
    t: Option<wgpu::Buffer>,
    bind_groups_created: u64,
}

/// Workgroup counts of one forward, validated against the device limits before anything is recorded.
#[derive(Clone, Copy, Debug)]
struct Dispatch {
    /// z (GEMV) or y (GEMM) groups: batches of rows of x.
    mgroups: u32,
    /// Shrink: (y, z) groups over the rows of x.
    shrink_yz: (u32, u32),
}

/// A [`QuantLinear`](crate::linear::QuantLinear) resident on the GPU: packed codes, compressed scales, bias
/// and LoRA adapters are uploaded once by [`upload`](Self::upload). [`encode_forward`](Self::encode_forward)
/// records a forward on buffers the caller owns (so an engine chains layers in one submission);
/// [`forward`](Self::forward) and friends are host-slice conveniences over the same recording path. Results are
/// `y = x·dequant(W)ᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` with f32 accumulation, the same as the CPU paths up to
/// accumulation order.
#[derive(Debug)]
pub struct GpuLinear {
    pub(super) n_in: usize,
    pub(super) n_out: usize,
    scheme: Scheme,
    pub(super) chunks: Vec<Chunk>,
    pub(super) consts: wgpu::Buffer,
    pub(super) lora: wgpu::Buffer,
    pub(super) r_total: usize,
    pub(super) adapter_names: Vec<String>,
    pub(super) adapter_enabled: Vec<bool>,
    pub(super) adapter_ranks: Vec<usize>,
    max_abs_w: f32,
    packed_bytes: u64,
    pub(super) max_binding: u64,
    scratch: Mutex<Option<Scratch>>,
    pub(super) caches: Mutex<Caches>,
    /// Caches of the backward's recording path.
    pub(super) bwd: Mutex<super::linear_backward::BwdCaches>,
}

pub(super) fn too_big(what: &str, bytes: u64, limit: u64) -> Error {
    Error::Unsupported {
        what: format!("{what} of {bytes} bytes exceeds the GPU storage binding limit of {limit} bytes"),
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn words_of(bytes: &[u8]) -> Vec<u32> {
    let mut w = vec![0u32; bytes.len().div_ceil(4).max(1)];
    for (i, c) in bytes.chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        w[i] = u32::from_le_bytes(b);
    }
    w
}

fn log2_exact(v: usize) -> u32 {
    v.trailing_zeros()
}

impl GpuLinear {
    /// Uploads a layer view (the API's `GpuLinear::upload` / `upload_with` hand it over). Errors (never GPU
    /// faults) when a tensor cannot be indexed with 32-bit indices, or when one output row, the LoRA weights or
    /// the small per-layer constants exceed one storage binding. A weight larger than one binding is split into
    /// chunks of whole rows.
    pub(crate) fn upload_view(ctx: &GpuContext, layer: LayerView<'_>, opts: UploadOptions) -> Result<GpuLinear, Error> {
        let limit = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let max_binding = opts.max_binding_bytes.map_or(limit, |b| b.min(limit)).max(16);
        let (n_out, n_in) = (layer.out_features, layer.in_features);
        let numel = n_out as u64 * n_in as u64;
        if numel + 64 > u32::MAX as u64 {
            return Err(Error::Unsupported {
                what: format!("a GPU weight of {numel} elements (at most {} with 32-bit indices)", u32::MAX - 64),
            });
        }
        let dev = &ctx.device;
        // Per-layer constants: [0,16) table, [16,272) DQ map, nested absmax, bias, adapter descriptors.
        let mut consts: Vec<u32> = vec![0; 272];
        let mut p = ChunkParams { n_in: n_in as u32, n_out: n_out as u32, ..Default::default() };
        let max_abs_w = match layer.weight {
            QuantWeight::FourBit(t) => {
                for (d, v) in consts.iter_mut().zip(t.table()) {
                    *d = v.to_bits();
                }
                p.log2_bs = log2_exact(t.blocksize());
                let tmax = t.table().iter().fold(0f32, |a, v| a.max(v.abs()));
                let smax = t.decoded_scales().iter().fold(0f32, |a, v| a.max(v.abs()));
                match t.scales() {
                    BlockScales::Plain(_) => tmax * smax,
                    BlockScales::Double(dq) => {
                        for (d, v) in consts[16..272].iter_mut().zip(dq.map().iter()) {
                            *d = v.to_bits();
                        }
                        p.nested_log2 = log2_exact(dq.nested_blocksize());
                        p.nested_off = consts.len() as u32;
                        p.dq_offset = dq.offset();
                        consts.extend(dq.nested_absmax().iter().map(|v| v.to_bits()));
                        tmax * smax
                    }
                }
            }
            QuantWeight::Int8(t) => {
                let smax = t.scales().iter().fold(0f32, |a, v| a.max(v.abs()));
                if let Granularity::PerGroup(g) = t.granularity() {
                    p.group_size = g as u32;
                    p.ngroups = n_in.div_ceil(g) as u32;
                }
                255.0 * smax
            }
        };
        if let Some(b) = layer.bias {
            p.bias_off = consts.len() as u32;
            p.has_bias = 1;
            consts.extend(b.iter().map(|v| v.to_bits()));
        }
        // Adapters: A rows concatenated, then each B.
        let ads = layer.adapters;
        let r_total: usize = ads.iter().map(|a| a.rank()).sum();
        let lora_len = r_total as u64 * n_in as u64 + r_total as u64 * n_out as u64;
        if lora_len * 4 > max_binding || lora_len + 64 > u32::MAX as u64 {
            return Err(too_big("the LoRA adapters' A and B", lora_len * 4, max_binding));
        }
        if r_total > 65535 {
            return Err(Error::Unsupported { what: format!("a total LoRA rank of {r_total} (max 65535)") });
        }
        let mut lora: Vec<f32> = Vec::with_capacity(lora_len as usize);
        for a in ads {
            lora.extend_from_slice(a.a());
        }
        p.ad_off = consts.len() as u32;
        p.n_adapters = ads.len() as u32;
        p.r_total = r_total as u32;
        let (mut off, mut boff) = (0usize, r_total * n_in);
        for a in ads {
            consts.extend([off as u32, a.rank() as u32, a.scaling().to_bits(), boff as u32]);
            lora.extend_from_slice(a.b());
            off += a.rank();
            boff += a.b().len();
        }
        if lora.is_empty() {
            lora.push(0.0);
        }
        if consts.len() as u64 * 4 > max_binding {
            return Err(too_big(
                "the per-layer constants (table, nested scales, bias)",
                consts.len() as u64 * 4,
                max_binding,
            ));
        }
        let storage = wgpu::BufferUsages::STORAGE;
        let consts_buf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lowbit consts"),
            contents: bytemuck::cast_slice(&consts),
            usage: storage,
        });
        let lora_buf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lowbit lora"),
            contents: bytemuck::cast_slice(&lora),
            // COPY_DST: `write_adapter_weights` updates A and B in place (training).
            usage: storage | wgpu::BufferUsages::COPY_DST,
        });

        // Chunks of whole rows, each within one binding.
        let chunk_bytes = |r0: usize, r1: usize| -> (u64, u64) {
            let (e0, e1) = ((r0 * n_in) as u64, (r1 * n_in) as u64);
            match layer.weight {
                QuantWeight::FourBit(t) => {
                    let codes = (e1.div_ceil(8) - e0 / 8) * 4;
                    let l = log2_exact(t.blocksize());
                    let (b0, b1) = (e0 >> l, ((e1 - 1) >> l) + 1);
                    let sc = match t.scales() {
                        BlockScales::Plain(_) => (b1 - b0) * 4,
                        BlockScales::Double(_) => (b1.div_ceil(4) - b0 / 4) * 4,
                    };
                    (codes, sc)
                }
                QuantWeight::Int8(t) => {
                    let codes = (e1.div_ceil(4) - e0 / 4) * 4;
                    let (p0, p1) = int8_params(t.granularity(), r0, r1, n_in);
                    (codes, (p1 - p0) as u64 * 4 + (p1 - p0).div_ceil(4) as u64 * 4)
                }
            }
        };
        let mut chunks = Vec::new();
        let mut r0 = 0usize;
        while r0 < n_out {
            let fits = |r1: usize| {
                let (c, s) = chunk_bytes(r0, r1);
                c <= max_binding && s <= max_binding
            };
            if !fits(r0 + 1) {
                let (c, s) = chunk_bytes(r0, r0 + 1);
                return Err(too_big("one output row of the weight (codes or scales)", c.max(s), max_binding));
            }
            // Largest r1 that fits: exponential then binary search.
            let (mut lo, mut step) = (r0 + 1, 1usize);
            while lo + step <= n_out && fits(lo + step) {
                lo += step;
                step *= 2;
            }
            let mut hi = (lo + step).min(n_out + 1); // first candidate known or assumed not to fit
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let r1 = lo;
            let (e0, e1) = (r0 * n_in, r1 * n_in);
            let mut cp = p;
            cp.row0 = r0 as u32;
            cp.rows = (r1 - r0) as u32;
            let (codes, scales): (Vec<u32>, Vec<u32>) = match layer.weight {
                QuantWeight::FourBit(t) => {
                    let (w0, w1) = (e0 / 8, e1.div_ceil(8));
                    cp.word_base = w0 as u32;
                    let pk = t.packed();
                    let codes = words_of(&pk[(w0 * 4).min(pk.len())..(w1 * 4).min(pk.len())]);
                    let l = log2_exact(t.blocksize());
                    let (b0, b1) = (e0 >> l, ((e1 - 1) >> l) + 1);
                    let scales = match t.scales() {
                        BlockScales::Plain(v) => {
                            cp.sblk_base = b0 as u32;
                            v[b0..b1].iter().map(|f| f.to_bits()).collect()
                        }
                        BlockScales::Double(dq) => {
                            let base = b0 / 4 * 4;
                            cp.sblk_base = base as u32;
                            words_of(&dq.codes()[base..b1])
                        }
                    };
                    (codes, scales)
                }
                QuantWeight::Int8(t) => {
                    let (w0, w1) = (e0 / 4, e1.div_ceil(4));
                    cp.word_base = w0 as u32;
                    let c = t.codes();
                    let codes = words_of(&c[(w0 * 4).min(c.len())..(w1 * 4).min(c.len())]);
                    let (p0, p1) = int8_params(t.granularity(), r0, r1, n_in);
                    cp.sblk_base = p0 as u32;
                    cp.zp_off = (p1 - p0) as u32;
                    let mut s: Vec<u32> = t.scales()[p0..p1].iter().map(|f| f.to_bits()).collect();
                    s.extend(words_of(&t.zero_points()[p0..p1]));
                    (codes, s)
                }
            };
            let mk = |label: &str, data: &[u32], usage| {
                dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(data),
                    usage,
                })
            };
            chunks.push(Chunk {
                codes: mk("lowbit codes", &codes, storage),
                scales: mk("lowbit scales", &scales, storage),
                params: dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("lowbit chunk params"),
                    contents: bytemuck::bytes_of(&cp),
                    usage: wgpu::BufferUsages::UNIFORM,
                }),
                rows: cp.rows,
            });
            r0 = r1;
        }
        Ok(GpuLinear {
            n_in,
            n_out,
            scheme: layer.weight.scheme(),
            chunks,
            consts: consts_buf,
            lora: lora_buf,
            r_total,
            adapter_names: ads.iter().map(|a| a.name().to_string()).collect(),
            adapter_enabled: ads.iter().map(|a| a.is_enabled()).collect(),
            adapter_ranks: ads.iter().map(|a| a.rank()).collect(),
            max_abs_w,
            packed_bytes: layer.weight.packed_bytes() as u64,
            max_binding,
            scratch: Mutex::new(None),
            caches: Mutex::new(Caches::default()),
            bwd: Mutex::new(Default::default()),
        })
    }

    /// `in`.
    pub fn in_features(&self) -> usize {
        self.n_in
    }
    /// `out`.
    pub fn out_features(&self) -> usize {
        self.n_out
    }
    /// The weight's scheme (which kernel family runs it).
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }
    /// Number of row chunks the weight was split into (1 unless it exceeds one storage binding).
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }
    /// Bytes of packed weight and scales one forward reads (as
    /// [`QuantWeight::packed_bytes`](crate::linear::QuantWeight::packed_bytes)).
    pub fn packed_bytes(&self) -> u64 {
        self.packed_bytes
    }
    /// `max |w|` over the dequantized weight (an upper bound: table maximum × largest scale). With
    /// `max |x|` it decides whether f16 products are safe (see [`F16_SAFE_PRODUCT`]).
    pub fn max_abs_weight(&self) -> f32 {
        self.max_abs_w
    }
    /// Names of the uploaded adapters; the index is the adapter id of [`forward_batch`](Self::forward_batch).
    pub fn adapter_names(&self) -> &[String] {
        &self.adapter_names
    }
    /// The id of the adapter named `name`.
    pub fn adapter_id(&self, name: &str) -> Option<usize> {
        self.adapter_names.iter().position(|n| n == name)
    }
    /// Enables or disables an adapter for [`forward`](Self::forward) and
    /// [`encode_forward`](Self::encode_forward) (no upload needed). Forwards recorded before the change keep
    /// the selection they were recorded with.
    pub fn set_adapter_enabled(&mut self, name: &str, enabled: bool) -> Result<(), Error> {
        let id = self.adapter_id(name).ok_or_else(|| {
            Error::invalid("adapter name", format!("{name:?}"), format!("one of {:?}", self.adapter_names))
        })?;
        self.adapter_enabled[id] = enabled;
        Ok(())
    }

    /// Replaces the weights of adapter `id` on the GPU with `a` (`[rank, in]`) and `b` (`[out, rank]`), e.g.
    /// after an optimizer step on the host copies (training). The rank, scaling and name stay as uploaded.
    /// The write goes through `queue.write_buffer`, so it takes effect at the next submission, before any of
    /// its commands: work already submitted sees the old weights, every forward or backward submitted after
    /// the call sees the new ones. Errors, writing nothing, on an id out of range, wrong lengths or a
    /// non-finite value.
    pub fn write_adapter_weights(&self, ctx: &GpuContext, id: usize, a: &[f32], b: &[f32]) -> Result<(), Error> {
        let n = self.adapter_ranks.len();
        if id >= n {
            return Err(Error::invalid("adapter id", id.to_string(), format!("below {n}")));
        }
        let r = self.adapter_ranks[id];
        if a.len() != r * self.n_in {
            return Err(Error::shape("A of the adapter (rank · in)", a.len(), r * self.n_in));
        }
        if b.len() != self.n_out * r {
            return Err(Error::shape("B of the adapter (out · rank)", b.len(), self.n_out * r));
        }
        if let Some(i) = a.iter().chain(b).position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "adapter weights",
                format!("a non-finite value at index {i} of A then B"),
                "finite values",
            ));
        }
        // Layout of the upload: every adapter's A rows concatenated, then every B in id order.
        let r_before: usize = self.adapter_ranks[..id].iter().sum();
        let a_off = r_before * self.n_in;
        let b_off = self.r_total * self.n_in + r_before * self.n_out;
        let q = ctx.queue();
        if !a.is_empty() {
            q.write_buffer(&self.lora, a_off as u64 * 4, bytemuck::cast_slice(a));
            q.write_buffer(&self.lora, b_off as u64 * 4, bytemuck::cast_slice(b));
        }
        Ok(())
    }

    /// Bind groups this layer has created so far (each recorded forward on new (x, y, m, adapter selection)
    /// creates one per weight chunk; a repeated call reuses them and creates none).
    pub fn bind_groups_created(&self) -> u64 {
        lock(&self.caches).bind_groups_created
    }
    /// Entries in the bind group cache (at most [`CACHE_ENTRIES`]).
    pub fn bind_group_cache_len(&self) -> usize {
        lock(&self.caches).groups.map.len()
    }
    /// Empties the bind group and per-call caches (forward and backward), releasing this layer's references
    /// to callers' buffers. Forwards and backwards already recorded stay valid.
    pub fn clear_bind_groups(&self) {
        lock(&self.bwd).clear_groups();
        let mut c = lock(&self.caches);
        c.groups = Lru::default();
        c.calls = Lru::default();
    }

    /// The kernel variant `choice` resolves to for `m` rows on `ctx` (with f32 tiles if `x` might overflow f16).
    pub fn kernel_for(&self, ctx: &GpuContext, m: usize, choice: KernelChoice) -> Result<KernelKey, Error> {
        let op = choice.op.unwrap_or(if m <= GEMV_MAX_M { KernelOp::Gemv } else { KernelOp::Gemm });
        if !matches!(op, KernelOp::Gemv | KernelOp::Gemm) {
            return Err(Error::invalid("KernelChoice::op", format!("{op:?}"), "Gemv, Gemm or None"));
        }
        let f = ctx.features();
        let subgroups = op == KernelOp::Gemv && choice.subgroups.unwrap_or(f.subgroups);
        let f16 = op == KernelOp::Gemm && choice.f16.unwrap_or(false);
        if subgroups && !f.subgroups {
            return Err(Error::Unsupported { what: format!("subgroup kernels on {}", ctx.adapter_name()) });
        }
        if f16 && !f.f16 {
            return Err(Error::Unsupported { what: format!("shader-f16 kernels on {}", ctx.adapter_name()) });
        }
        Ok(KernelKey { op, scheme: self.scheme, subgroups, f16 })
    }

    /// Compiles (once per context) the pipelines a forward of `m` rows with `choice` uses, returning compile
    /// errors as [`Error::Gpu`]. Optional before [`encode_forward`](Self::encode_forward) on native backends,
    /// which compile on first use and report errors synchronously; in the browser, call it (and await it)
    /// once per (m class, choice) so that a shader error is returned instead of reaching the device's
    /// uncaptured-error handler.
    pub async fn prepare(&self, ctx: &GpuContext, m: usize, choice: KernelChoice) -> Result<(), Error> {
        let key = self.kernel_for(ctx, m, choice)?;
        ctx.pipeline(&key).await?;
        if self.r_total > 0 {
            ctx.pipeline(&KernelKey::SHRINK).await?;
        }
        Ok(())
    }

    /// Records `y = x·Wᵀ + bias + Σ_enabled s·(x·Aᵀ)·Bᵀ` into `encoder`: reads `x` (`[m, in]` f32, row-major,
    /// from byte 0) and writes `y` (`[m, out]` f32), both buffers owned by the caller with usage `STORAGE`.
    /// Every adapter enabled at the time of the call is applied to every row. Nothing is submitted and
    /// nothing is written through the queue, so any number of forwards (of this or other layers, the same
    /// layer several times with other buffers or m) can be recorded into one encoder and run by one submit,
    /// in recording order: the output of one forward may be the input of the next. See the module notes.
    ///
    /// Checked before anything is recorded (errors, never GPU faults): `x` and `y` have `STORAGE` usage, are
    /// at least `m·in·4` and `m·out·4` bytes, are not the same buffer, and `m` rows fit the storage binding
    /// and dispatch limits. Not checked (the contents are on the GPU): that `x` is finite, and that `y` is:
    /// non-finite inputs, or finite ones whose result overflows f32, give non-finite outputs, which callers
    /// that read `y` back must check (as [`forward`](Self::forward) does). `x` and `y` must belong to `ctx`'s device. `m == 0` records nothing.
    ///
    /// Pipelines are compiled on first use (see [`prepare`](Self::prepare) for the browser); bind groups and
    /// per-call uniforms are cached ([`bind_groups_created`](Self::bind_groups_created)).
    pub fn encode_forward(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<(), Error> {
        self.encode_forward_with(ctx, encoder, x, y, m, None, KernelChoice::default())
    }

    /// [`encode_forward`](Self::encode_forward) with a per-row adapter selection (`Some(ids)`: row `i` adds
    /// only adapter `ids[i]`, as [`forward_batch`](Self::forward_batch)) and an explicit kernel choice. With
    /// `choice.f16 == Some(true)` the caller guarantees `max|x| · max_abs_weight() ≤ F16_SAFE_PRODUCT`
    /// (`x` is on the GPU and is not inspected).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_forward_with(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
        choice: KernelChoice,
    ) -> Result<(), Error> {
        let key = self.kernel_for(ctx, m, choice)?;
        let dispatch = self.check_m(ctx, m, key)?;
        let masks = self.masks(m, adapter_ids)?;
        self.check_buffers(x, y, m)?;
        self.record(ctx, encoder, x, y, m, &masks, key, dispatch, None)
    }

    /// `y = x·Wᵀ + bias + Σ_enabled s·(x·Aᵀ)·Bᵀ` for `x: [m, in]` row-major; returns `y: [m, out]`.
    pub async fn forward(&self, ctx: &GpuContext, x: &[f32], m: usize) -> Result<Vec<f32>, Error> {
        self.forward_with(ctx, x, m, None, KernelChoice::default()).await
    }

    /// Multi-adapter batch: row `i` adds only adapter `adapter_ids[i]` (or none). Errors on an id out of
    /// range, a disabled adapter or `adapter_ids.len() != m`.
    pub async fn forward_batch(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        adapter_ids: &[Option<usize>],
    ) -> Result<Vec<f32>, Error> {
        self.forward_with(ctx, x, m, Some(adapter_ids), KernelChoice::default()).await
    }

    /// Blocking [`forward`](Self::forward) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_blocking(&self, ctx: &GpuContext, x: &[f32], m: usize) -> Result<Vec<f32>, Error> {
        pollster::block_on(self.forward(ctx, x, m))
    }

    /// Blocking [`forward_batch`](Self::forward_batch) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_batch_blocking(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        adapter_ids: &[Option<usize>],
    ) -> Result<Vec<f32>, Error> {
        pollster::block_on(self.forward_batch(ctx, x, m, adapter_ids))
    }

    /// The general host-slice forward: `adapter_ids` `None` applies every enabled adapter to every row,
    /// `Some` is the multi-adapter batch; `choice` picks the kernel variant. Validates `x` (length, finite)
    /// and the ids, uploads `x` into a scratch buffer, records [`encode_forward_with`](Self::encode_forward_with)'s
    /// commands plus a copy of `y` to a readback buffer, submits once and reads `y` back. A non-finite `y`
    /// (finite inputs whose result overflowed f32) is an [`Error::NonFinite`] for `y`, as on the CPU.
    pub async fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
        choice: KernelChoice,
    ) -> Result<Vec<f32>, Error> {
        let (scratch, _) = self.run(ctx, x, m, adapter_ids, choice, 1, false).await?;
        let y = read_f32(&ctx.device, &scratch.readback, m * self.n_out).await;
        self.put_scratch(scratch);
        let y = y?;
        // `x` and the layer were checked finite: an inf/NaN in `y` is an overflow, reported, never returned.
        crate::linear::check_output(&y)?;
        Ok(y)
    }

    /// Runs the forward `reps` times (x uploaded once) and returns the result of the last run together with
    /// the GPU kernel time per run in nanoseconds, measured with timestamp queries around each compute pass
    /// (`None` when the device has no timestamp queries). The median over the runs is returned.
    pub async fn time_forward(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        choice: KernelChoice,
        reps: usize,
    ) -> Result<(Vec<f32>, Option<f64>), Error> {
        let reps = reps.clamp(1, 2048);
        let (scratch, ts) = self.run(ctx, x, m, None, choice, reps, ctx.features().timestamps).await?;
        let y = read_f32(&ctx.device, &scratch.readback, m * self.n_out).await;
        self.put_scratch(scratch);
        let y = y?;
        let ns = match ts {
            Some(buf) => {
                let v = read_u64(&ctx.device, &buf, 2 * reps).await?;
                let period = ctx.queue.get_timestamp_period() as f64;
                let mut d: Vec<f64> = v.chunks_exact(2).map(|c| c[1].saturating_sub(c[0]) as f64 * period).collect();
                d.sort_by(|a, b| a.total_cmp(b));
                Some(d[d.len() / 2])
            }
            None => None,
        };
        Ok((y, ns))
    }

    /// Blocking [`time_forward`](Self::time_forward) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time_forward_blocking(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        choice: KernelChoice,
        reps: usize,
    ) -> Result<(Vec<f32>, Option<f64>), Error> {
        pollster::block_on(self.time_forward(ctx, x, m, choice, reps))
    }

    fn put_scratch(&self, s: Scratch) {
        let mut g = lock(&self.scratch);
        if g.as_ref().is_none_or(|old| old.m_cap <= s.m_cap) {
            *g = Some(s);
        }
    }

    fn take_scratch(&self, ctx: &GpuContext, m: usize) -> Scratch {
        if let Some(s) = lock(&self.scratch).take() {
            if s.m_cap >= m {
                return s;
            }
        }
        let cap = m.next_power_of_two().max(1);
        let buf = |label: &str, len: usize, usage: wgpu::BufferUsages| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (len.max(1) * 4) as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Scratch {
            m_cap: cap,
            x: buf("lowbit x", cap * self.n_in, U::STORAGE | U::COPY_DST),
            y: buf("lowbit y", cap * self.n_out, U::STORAGE | U::COPY_SRC),
            readback: buf("lowbit readback", cap * self.n_out, U::MAP_READ | U::COPY_DST),
        }
    }

    /// Checks that `m` rows fit the bindings, 32-bit indices and dispatch limits; returns the dispatch sizes.
    fn check_m(&self, ctx: &GpuContext, m: usize, key: KernelKey) -> Result<Dispatch, Error> {
        let widest = self.n_in.max(self.n_out).max(self.r_total) as u64;
        let io_bytes = (m as u64).saturating_mul(widest).saturating_mul(4);
        if io_bytes > self.max_binding
            || (m as u64).saturating_mul(self.n_in.max(self.n_out) as u64).saturating_add(64) > u32::MAX as u64
        {
            return Err(too_big(&format!("x, y or the LoRA scratch for m = {m} rows"), io_bytes, self.max_binding));
        }
        let mgroups = match key.op {
            KernelOp::Gemv => groups(ctx, m.div_ceil(MAXM as usize))?,
            _ => groups(ctx, m.div_ceil(GEMM_TILE as usize))?,
        };
        let shrink_yz = (m.min(65535) as u32, groups(ctx, m.div_ceil(65535))?);
        Ok(Dispatch { mgroups, shrink_yz })
    }

    /// Validates `adapter_ids` for `m` rows and builds the adapter masks.
    pub(super) fn masks(&self, m: usize, adapter_ids: Option<&[Option<usize>]>) -> Result<CallKey, Error> {
        let n_ad = self.adapter_names.len();
        let words = n_ad.div_ceil(32).max(1);
        let mk = m as u32; // check_m bounded m·in below u32::MAX
        let masks = match adapter_ids {
            None => {
                let mut mask = vec![0u32; words];
                for a in (0..n_ad).filter(|&a| self.adapter_enabled[a]) {
                    mask[a / 32] |= 1 << (a % 32);
                }
                Masks::Shared(mask)
            }
            Some(ids) => {
                if ids.len() != m {
                    return Err(Error::shape("length of adapter_ids (one per row of x)", ids.len(), m));
                }
                let mut masks = vec![0u32; m * words];
                for (row, id) in ids.iter().enumerate() {
                    if let Some(id) = *id {
                        if id >= n_ad {
                            return Err(Error::invalid(
                                "adapter_ids",
                                format!("{id} for row {row}"),
                                format!("an adapter id below {n_ad} or None"),
                            ));
                        }
                        if !self.adapter_enabled[id] {
                            return Err(Error::invalid(
                                "adapter_ids",
                                format!("{id} (`{}`, disabled) for row {row}", self.adapter_names[id]),
                                "an enabled adapter",
                            ));
                        }
                        masks[row * words + id / 32] |= 1 << (id % 32);
                    }
                }
                Masks::PerRow(masks)
            }
        };
        Ok(CallKey { m: mk, masks })
    }

    /// Checks the caller's buffers for `m` rows.
    fn check_buffers(&self, x: &wgpu::Buffer, y: &wgpu::Buffer, m: usize) -> Result<(), Error> {
        if x == y {
            return Err(Error::invalid(
                "y",
                "the same buffer as x",
                "a buffer distinct from x (the kernels read x while writing y)",
            ));
        }
        for (arg, buf, width, dim) in [("x", x, self.n_in, "in"), ("y", y, self.n_out, "out")] {
            if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::invalid(
                    arg,
                    format!("a buffer with usage {:?}", buf.usage()),
                    "usage including STORAGE",
                ));
            }
            let need = (m as u64) * (width as u64) * 4;
            if buf.size() < need {
                return Err(Error::ShapeMismatch {
                    what: format!("size in bytes of buffer {arg} for m = {m} rows of {dim} = {width} f32 values"),
                    got: buf.size().to_string(),
                    expected: format!("at least {need}"),
                });
            }
        }
        Ok(())
    }

    /// The cached immutable per-call buffers (`Call` uniform, adapter masks) of `call_key`, created on a miss.
    pub(super) fn call_state(&self, dev: &wgpu::Device, c: &mut Caches, call_key: &CallKey) -> Arc<CallState> {
        let m = call_key.m;
        match c.calls.get(call_key) {
            Some(s) => s,
            None => {
                let (words, stride, any) = match &call_key.masks {
                    Masks::Shared(w) => (w.as_slice(), 0, m > 0 && w.iter().any(|&v| v != 0)),
                    Masks::PerRow(w) => {
                        (w.as_slice(), self.adapter_names.len().div_ceil(32).max(1), w.iter().any(|&v| v != 0))
                    }
                };
                let use_lora = any && self.r_total > 0;
                let params = CallParams {
                    m,
                    mask_words: self.adapter_names.len().div_ceil(32).max(1) as u32,
                    mask_stride: stride as u32,
                    use_lora: use_lora as u32,
                };
                let init = |label, contents: &[u8], usage| {
                    dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage })
                };
                let s = Arc::new(CallState {
                    call: init("lowbit call params", bytemuck::bytes_of(&params), wgpu::BufferUsages::UNIFORM),
                    rowinfo: init("lowbit rowinfo", bytemuck::cast_slice(words), wgpu::BufferUsages::STORAGE),
                    use_lora,
                });
                c.calls.insert(call_key.clone(), s.clone());
                s
            }
        }
    }

    /// The cached per-call state and bind groups (one per chunk) for these buffers, created on a miss.
    fn bind_groups(
        &self,
        ctx: &GpuContext,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        call_key: &CallKey,
    ) -> Result<(Arc<CallState>, Arc<Vec<wgpu::BindGroup>>), Error> {
        let dev = &ctx.device;
        let m = call_key.m;
        let mut c = lock(&self.caches);
        #[cfg(not(target_arch = "wasm32"))]
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let t_need = (m as u64 * self.r_total as u64 * 4).max(4);
        let t = match &c.t {
            Some(t) if t.size() >= t_need => t.clone(),
            _ => {
                let cap = ((m as u64).next_power_of_two() * self.r_total as u64 * 4).max(t_need);
                let t = dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("lowbit lora t"),
                    size: cap.min(self.max_binding.max(t_need)),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                c.t = Some(t.clone());
                c.groups = Lru::default(); // the old groups bind the old t
                t
            }
        };
        let state = self.call_state(dev, &mut c, call_key);
        let gkey = GroupKey { x: x.clone(), y: y.clone(), t: t.clone(), call: state.call.clone(), m };
        let groups = match c.groups.get(&gkey) {
            Some(g) => g,
            None => {
                let g: Vec<wgpu::BindGroup> = self
                    .chunks
                    .iter()
                    .map(|ch| {
                        dev.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some("lowbit forward"),
                            layout: ctx.bind_layout(BindingSet::Forward),
                            entries: &[
                                entry(bind::CODES, ch.codes.as_entire_binding()),
                                entry(bind::SCALES, ch.scales.as_entire_binding()),
                                entry(bind::LCONST, self.consts.as_entire_binding()),
                                entry(bind::X, sized(x, m as u64 * self.n_in as u64 * 4)),
                                entry(bind::Y, sized(y, m as u64 * self.n_out as u64 * 4)),
                                entry(bind::T, t.as_entire_binding()),
                                entry(bind::LORA, self.lora.as_entire_binding()),
                                entry(bind::ROWINFO, state.rowinfo.as_entire_binding()),
                                entry(bind::CHUNK, ch.params.as_entire_binding()),
                                entry(bind::CALL, state.call.as_entire_binding()),
                            ],
                        })
                    })
                    .collect();
                c.bind_groups_created += g.len() as u64;
                let g = Arc::new(g);
                c.groups.insert(gkey, g.clone());
                g
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            // Drop what may hold invalid objects; the caller sees the error.
            c.groups = Lru::default();
            c.calls = Lru::default();
            c.t = None;
            return Err(Error::gpu("create the forward's bind groups", e));
        }
        Ok((state, groups))
    }

    /// Records one forward (shrink if any row uses LoRA, then the output pass over every chunk) into one
    /// compute pass of `enc`. Inputs are validated by the caller.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
        call_key: &CallKey,
        key: KernelKey,
        dispatch: Dispatch,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<(), Error> {
        if m == 0 {
            return Ok(());
        }
        let pipe = ctx.pipeline_now(&key)?;
        let (state, bind_groups) = self.bind_groups(ctx, x, y, call_key)?;
        let shrink = if state.use_lora { Some(ctx.pipeline_now(&KernelKey::SHRINK)?) } else { None };
        let mut row_groups = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            let rows = c.rows as usize;
            row_groups.push(match key.op {
                KernelOp::Gemv => (rows.min(65535) as u32, groups(ctx, rows.div_ceil(65535))?),
                _ => (groups(ctx, rows.div_ceil(GEMM_TILE as usize))?, 0),
            });
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("lowbit forward"),
            timestamp_writes: timestamps,
        });
        if let Some(sp) = &shrink {
            pass.set_pipeline(sp);
            pass.set_bind_group(0, &bind_groups[0], &[]);
            pass.dispatch_workgroups(self.r_total as u32, dispatch.shrink_yz.0, dispatch.shrink_yz.1);
        }
        pass.set_pipeline(&pipe);
        for (bg, (gx, gy)) in bind_groups.iter().zip(row_groups) {
            pass.set_bind_group(0, bg, &[]);
            match key.op {
                KernelOp::Gemv => pass.dispatch_workgroups(gx, gy, dispatch.mgroups),
                _ => pass.dispatch_workgroups(gx, dispatch.mgroups, 1),
            }
        }
        Ok(())
    }

    /// The host-slice path: validates, uploads x, records `reps` forwards (plus the copy of y into the
    /// readback buffer) and submits. Returns the scratch (y ready to map) and the resolved timestamp buffer.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
        choice: KernelChoice,
        reps: usize,
        timestamps: bool,
    ) -> Result<(Scratch, Option<wgpu::Buffer>), Error> {
        // ---- validation: every bad input is an error before anything reaches the GPU ----
        if x.len() != m.saturating_mul(self.n_in) {
            return Err(Error::shape(
                format!("length of x for m = {m} rows of in = {}", self.n_in),
                x.len(),
                m.saturating_mul(self.n_in),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { arg: "x".into(), index: i, value: x[i] });
        }
        let mut key = self.kernel_for(ctx, m, choice)?;
        let dispatch = self.check_m(ctx, m, key)?;
        let call_key = self.masks(m, adapter_ids)?;
        if key.f16 {
            let xmax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            if xmax.max(self.max_abs_w) > F16_SAFE_PRODUCT || xmax * self.max_abs_w > F16_SAFE_PRODUCT {
                key.f16 = false; // documented fallback: f16 could overflow
            }
        }
        if m == 0 {
            return Ok((self.take_scratch(ctx, 0), None));
        }
        // Compile with errors awaited (the browser cannot report them synchronously while recording).
        ctx.pipeline(&key).await?;
        if self.r_total > 0 {
            ctx.pipeline(&KernelKey::SHRINK).await?;
        }

        let s = self.take_scratch(ctx, m);
        let dev = &ctx.device;
        // The scratch is this call's alone (taken from the slot), so writing x through the queue is safe.
        ctx.queue.write_buffer(&s.x, 0, bytemuck::cast_slice(x));
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let qs = timestamps.then(|| {
            dev.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("lowbit timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: (2 * reps) as u32,
            })
        });
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("lowbit forward") });
        for rep in 0..reps {
            let tw = qs.as_ref().map(|qs| wgpu::ComputePassTimestampWrites {
                query_set: qs,
                beginning_of_pass_write_index: Some(2 * rep as u32),
                end_of_pass_write_index: Some(2 * rep as u32 + 1),
            });
            if let Err(e) = self.record(ctx, &mut enc, &s.x, &s.y, m, &call_key, key, dispatch, tw) {
                self.put_scratch(s);
                return Err(e);
            }
        }
        let out_bytes = (m * self.n_out * 4) as u64;
        enc.copy_buffer_to_buffer(&s.y, 0, &s.readback, 0, out_bytes);
        let ts_buf = qs.as_ref().map(|qs| {
            let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("lowbit ts resolve"),
                size: (16 * reps) as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("lowbit ts read"),
                size: (16 * reps) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.resolve_query_set(qs, 0..(2 * reps) as u32, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, (16 * reps) as u64);
            read
        });
        ctx.queue.submit([enc.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(Error::gpu(format!("{} forward", key.name()), e));
        }
        Ok((s, ts_buf))
    }
}

/// `n` workgroups in one dimension, or an error when the device cannot dispatch that many.
pub(super) fn groups(ctx: &GpuContext, n: usize) -> Result<u32, Error> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= ctx.limits.max_compute_workgroups_per_dimension)
        .ok_or_else(|| Error::Unsupported { what: format!("a dispatch of {n} workgroups in one dimension") })
}

/// The first `bytes` of `buf` (the caller's buffers may be larger than m rows, even larger than one binding).
pub(super) fn sized(buf: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: buf, offset: 0, size: wgpu::BufferSize::new(bytes) })
}

pub(super) fn entry(binding: u32, resource: wgpu::BindingResource<'_>) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource }
}

/// Parameter entries `[p0, p1)` of an int8 weight used by rows `[r0, r1)`.
fn int8_params(g: Granularity, r0: usize, r1: usize, n_in: usize) -> (usize, usize) {
    match g {
        Granularity::PerTensor => (0, 1),
        Granularity::PerChannel => (r0, r1),
        Granularity::PerGroup(g) => {
            let ng = n_in.div_ceil(g);
            (r0 * ng, r1 * ng)
        }
    }
}
