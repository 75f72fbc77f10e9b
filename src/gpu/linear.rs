//! `GpuLinear`: a `QuantLinear` uploaded once, run by the fused WGSL kernels.

use super::context::GpuContext;
use super::readback::{read_f32, read_u64};
use super::shader::{KernelKey, KernelOp, WeightKind, GEMM_TILE, MAXM};
use super::GpuError;
use crate::affine::Granularity;
use crate::linear::{QuantLinear, QuantWeight};
use crate::nf4::BlockScales;
use crate::Error;
use std::sync::Mutex;
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
    /// Falls back to f32 when `max|x|·max|w|` could overflow f16. `None`/`Some(false)`: f32.
    pub f16: Option<bool>,
}

/// Largest M for which the automatic choice picks GEMV.
const GEMV_MAX_M: usize = 16;
/// f16 products are used only when `max|x| · max|w|` stays below this (f16 max is 65504).
const F16_SAFE_PRODUCT: f32 = 16384.0;

/// `Chunk` uniform of the shaders (see `shaders/common.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct ChunkParams {
    n_in: u32,
    n_out: u32,
    row0: u32,
    rows: u32,
    word_base: u32,
    sblk_base: u32,
    zp_off: u32,
    log2_bs: u32,
    ngroups: u32,
    nested_log2: u32,
    nested_off: u32,
    dq_offset: f32,
    bias_off: u32,
    has_bias: u32,
    ad_off: u32,
    n_adapters: u32,
    r_total: u32,
    _p: [u32; 3],
}

/// `Call` uniform of the shaders.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct CallParams {
    m: u32,
    mask_words: u32,
    use_lora: u32,
    _p: u32,
}

/// One slice of the weight: whole output rows `[row0, row0 + rows)`.
#[derive(Debug)]
struct Chunk {
    codes: wgpu::Buffer,
    scales: wgpu::Buffer,
    params: wgpu::Buffer,
    rows: u32,
}

/// Per-call buffers, reused while M fits.
#[derive(Debug)]
struct Scratch {
    m_cap: usize,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    t: wgpu::Buffer,
    rowinfo: wgpu::Buffer,
    readback: wgpu::Buffer,
    call: wgpu::Buffer,
}

/// A [`QuantLinear`] resident on the GPU: packed codes, compressed scales, bias and LoRA adapters are uploaded
/// once by [`upload`](Self::upload); a forward only writes `x` (and a per-row adapter mask) and reads `y`.
/// Results are `y = x·dequant(W)ᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` with f32 accumulation, the same as the CPU paths
/// up to accumulation order.
#[derive(Debug)]
pub struct GpuLinear {
    n_in: usize,
    n_out: usize,
    kind: WeightKind,
    chunks: Vec<Chunk>,
    consts: wgpu::Buffer,
    lora: wgpu::Buffer,
    r_total: usize,
    adapter_names: Vec<String>,
    adapter_enabled: Vec<bool>,
    max_abs_w: f32,
    packed_bytes: u64,
    max_binding: u64,
    scratch: Mutex<Option<Scratch>>,
}

fn too_big(what: &str, bytes: u64, limit: u64) -> GpuError {
    GpuError::Input(Error::Unsupported {
        what: format!("{what} of {bytes} bytes exceeds the GPU storage binding limit of {limit} bytes"),
    })
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
    /// Uploads `layer` (weight, scales, bias, every attached adapter with its enabled state) to the GPU.
    pub fn upload(ctx: &GpuContext, layer: &QuantLinear) -> Result<GpuLinear, GpuError> {
        Self::upload_with(ctx, layer, UploadOptions::default())
    }

    /// [`upload`](Self::upload) with options. Errors (never GPU faults) when a tensor cannot be indexed with
    /// 32-bit indices, or when one output row, the LoRA weights or the small per-layer constants exceed one
    /// storage binding. A weight larger than one binding is split into chunks of whole rows.
    pub fn upload_with(ctx: &GpuContext, layer: &QuantLinear, opts: UploadOptions) -> Result<GpuLinear, GpuError> {
        let limit = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let max_binding = opts.max_binding_bytes.map_or(limit, |b| b.min(limit)).max(16);
        let (n_out, n_in) = (layer.out_features(), layer.in_features());
        let numel = n_out as u64 * n_in as u64;
        if numel + 64 > u32::MAX as u64 {
            return Err(GpuError::Input(Error::Unsupported {
                what: format!("a GPU weight of {numel} elements (at most {} with 32-bit indices)", u32::MAX - 64),
            }));
        }
        let dev = &ctx.device;
        // Per-layer constants: [0,16) table, [16,272) DQ map, nested absmax, bias, adapter descriptors.
        let mut consts: Vec<u32> = vec![0; 272];
        let mut p = ChunkParams { n_in: n_in as u32, n_out: n_out as u32, ..Default::default() };
        let (kind, max_abs_w) = match layer.weight() {
            QuantWeight::FourBit(t) => {
                for (d, v) in consts.iter_mut().zip(t.table()) {
                    *d = v.to_bits();
                }
                p.log2_bs = log2_exact(t.blocksize());
                let tmax = t.table().iter().fold(0f32, |a, v| a.max(v.abs()));
                let smax = t.decoded_scales().iter().fold(0f32, |a, v| a.max(v.abs()));
                match t.scales() {
                    BlockScales::Plain(_) => (WeightKind::FourBit, tmax * smax),
                    BlockScales::Double(dq) => {
                        for (d, v) in consts[16..272].iter_mut().zip(dq.map().iter()) {
                            *d = v.to_bits();
                        }
                        p.nested_log2 = log2_exact(dq.nested_blocksize());
                        p.nested_off = consts.len() as u32;
                        p.dq_offset = dq.offset();
                        consts.extend(dq.nested_absmax().iter().map(|v| v.to_bits()));
                        (WeightKind::FourBitDq, tmax * smax)
                    }
                }
            }
            QuantWeight::Int8(t) => {
                let smax = t.scales().iter().fold(0f32, |a, v| a.max(v.abs()));
                let kind = match t.granularity() {
                    Granularity::PerTensor => WeightKind::Int8Tensor,
                    Granularity::PerChannel => WeightKind::Int8Channel,
                    Granularity::PerGroup(g) => {
                        p.log2_bs = g as u32;
                        p.ngroups = n_in.div_ceil(g) as u32;
                        WeightKind::Int8Group
                    }
                };
                (kind, 255.0 * smax)
            }
        };
        if let Some(b) = layer.bias() {
            p.bias_off = consts.len() as u32;
            p.has_bias = 1;
            consts.extend(b.iter().map(|v| v.to_bits()));
        }
        // Adapters: A rows concatenated, then each B.
        let ads = layer.adapters();
        let r_total: usize = ads.iter().map(|a| a.rank()).sum();
        let lora_len = r_total as u64 * n_in as u64 + r_total as u64 * n_out as u64;
        if lora_len * 4 > max_binding || lora_len + 64 > u32::MAX as u64 {
            return Err(too_big("the LoRA adapters' A and B", lora_len * 4, max_binding));
        }
        if r_total > 65535 {
            return Err(GpuError::Input(Error::Unsupported {
                what: format!("a total LoRA rank of {r_total} (max 65535)"),
            }));
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
            usage: storage,
        });

        // Chunks of whole rows, each within one binding.
        let chunk_bytes = |r0: usize, r1: usize| -> (u64, u64) {
            let (e0, e1) = ((r0 * n_in) as u64, (r1 * n_in) as u64);
            match layer.weight() {
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
            let (codes, scales): (Vec<u32>, Vec<u32>) = match layer.weight() {
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
            kind,
            chunks,
            consts: consts_buf,
            lora: lora_buf,
            r_total,
            adapter_names: ads.iter().map(|a| a.name().to_string()).collect(),
            adapter_enabled: ads.iter().map(|a| a.is_enabled()).collect(),
            max_abs_w,
            packed_bytes: layer.weight().packed_bytes() as u64,
            max_binding,
            scratch: Mutex::new(None),
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
    /// The weight format's kernel family.
    pub fn weight_kind(&self) -> WeightKind {
        self.kind
    }
    /// Number of row chunks the weight was split into (1 unless it exceeds one storage binding).
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }
    /// Bytes of packed weight and scales one forward reads (as [`QuantWeight::packed_bytes`]).
    pub fn packed_bytes(&self) -> u64 {
        self.packed_bytes
    }
    /// Names of the uploaded adapters; the index is the adapter id of [`forward_batch`](Self::forward_batch).
    pub fn adapter_names(&self) -> &[String] {
        &self.adapter_names
    }
    /// The id of the adapter named `name`.
    pub fn adapter_id(&self, name: &str) -> Option<usize> {
        self.adapter_names.iter().position(|n| n == name)
    }
    /// Enables or disables an adapter for [`forward`](Self::forward) (no upload needed).
    pub fn set_adapter_enabled(&mut self, name: &str, enabled: bool) -> Result<(), GpuError> {
        let id = self.adapter_id(name).ok_or_else(|| {
            Error::invalid("adapter name", format!("{name:?}"), format!("one of {:?}", self.adapter_names))
        })?;
        self.adapter_enabled[id] = enabled;
        Ok(())
    }

    /// The kernel variant `choice` resolves to for `m` rows on `ctx` (with f32 tiles if `x` might overflow f16).
    pub fn kernel_for(&self, ctx: &GpuContext, m: usize, choice: KernelChoice) -> Result<KernelKey, GpuError> {
        let op = choice.op.unwrap_or(if m <= GEMV_MAX_M { KernelOp::Gemv } else { KernelOp::Gemm });
        if op == KernelOp::Shrink {
            return Err(Error::invalid("KernelChoice::op", "Shrink", "Gemv, Gemm or None").into());
        }
        let f = ctx.features();
        let subgroups = op == KernelOp::Gemv && choice.subgroups.unwrap_or(f.subgroups);
        let f16 = op == KernelOp::Gemm && choice.f16.unwrap_or(false);
        if subgroups && !f.subgroups {
            return Err(Error::Unsupported { what: format!("subgroup kernels on {}", ctx.adapter_name()) }.into());
        }
        if f16 && !f.f16 {
            return Err(Error::Unsupported { what: format!("shader-f16 kernels on {}", ctx.adapter_name()) }.into());
        }
        Ok(KernelKey { op, weight: self.kind, subgroups, f16 })
    }

    /// `y = x·Wᵀ + bias + Σ_enabled s·(x·Aᵀ)·Bᵀ` for `x: [m, in]` row-major; returns `y: [m, out]`.
    pub async fn forward(&self, ctx: &GpuContext, x: &[f32], m: usize) -> Result<Vec<f32>, GpuError> {
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
    ) -> Result<Vec<f32>, GpuError> {
        self.forward_with(ctx, x, m, Some(adapter_ids), KernelChoice::default()).await
    }

    /// Blocking [`forward`](Self::forward) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_blocking(&self, ctx: &GpuContext, x: &[f32], m: usize) -> Result<Vec<f32>, GpuError> {
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
    ) -> Result<Vec<f32>, GpuError> {
        pollster::block_on(self.forward_batch(ctx, x, m, adapter_ids))
    }

    /// The general forward: `adapter_ids` `None` applies every enabled adapter to every row, `Some` is the
    /// multi-adapter batch; `choice` picks the kernel variant.
    pub async fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
        choice: KernelChoice,
    ) -> Result<Vec<f32>, GpuError> {
        let (scratch, _) = self.run(ctx, x, m, adapter_ids, choice, 1, false).await?;
        let y = read_f32(&ctx.device, &scratch.readback, m * self.n_out).await;
        self.put_scratch(scratch);
        y
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
    ) -> Result<(Vec<f32>, Option<f64>), GpuError> {
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
    ) -> Result<(Vec<f32>, Option<f64>), GpuError> {
        pollster::block_on(self.time_forward(ctx, x, m, choice, reps))
    }

    fn put_scratch(&self, s: Scratch) {
        let mut g = match self.scratch.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.as_ref().is_none_or(|old| old.m_cap <= s.m_cap) {
            *g = Some(s);
        }
    }

    fn take_scratch(&self, ctx: &GpuContext, m: usize) -> Scratch {
        let old = match self.scratch.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(s) = old {
            if s.m_cap >= m {
                return s;
            }
        }
        let cap = m.next_power_of_two().max(1);
        let mask_words = self.adapter_names.len().div_ceil(32).max(1);
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
            t: buf("lowbit lora t", cap * self.r_total, U::STORAGE),
            rowinfo: buf("lowbit rowinfo", cap * mask_words, U::STORAGE | U::COPY_DST),
            readback: buf("lowbit readback", cap * self.n_out, U::MAP_READ | U::COPY_DST),
            call: buf("lowbit call params", 4, U::UNIFORM | U::COPY_DST),
        }
    }

    /// Validates, uploads x and the row masks, encodes `reps` forwards (plus the copy of y into the readback
    /// buffer) and submits. Returns the scratch (y ready to map) and the resolved timestamp buffer.
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
    ) -> Result<(Scratch, Option<wgpu::Buffer>), GpuError> {
        // ---- validation: every bad input is an error before anything reaches the GPU ----
        if x.len() != m.saturating_mul(self.n_in) {
            return Err(Error::shape(
                format!("length of x for m = {m} rows of in = {}", self.n_in),
                x.len(),
                m.saturating_mul(self.n_in),
            )
            .into());
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { arg: "x".into(), index: i, value: x[i] }.into());
        }
        let n_ad = self.adapter_names.len();
        if let Some(ids) = adapter_ids {
            if ids.len() != m {
                return Err(Error::shape("length of adapter_ids (one per row of x)", ids.len(), m).into());
            }
            for (row, id) in ids.iter().enumerate() {
                if let Some(id) = *id {
                    if id >= n_ad {
                        return Err(Error::invalid(
                            "adapter_ids",
                            format!("{id} for row {row}"),
                            format!("an adapter id below {n_ad} or None"),
                        )
                        .into());
                    }
                    if !self.adapter_enabled[id] {
                        return Err(Error::invalid(
                            "adapter_ids",
                            format!("{id} (`{}`, disabled) for row {row}", self.adapter_names[id]),
                            "an enabled adapter",
                        )
                        .into());
                    }
                }
            }
        }
        let io_bytes = (m as u64) * (self.n_in.max(self.n_out).max(self.r_total) as u64) * 4;
        if io_bytes > self.max_binding || (m as u64) * (self.n_in.max(self.n_out) as u64) + 64 > u32::MAX as u64 {
            return Err(too_big(&format!("x or y for m = {m} rows"), io_bytes, self.max_binding));
        }
        let mut key = self.kernel_for(ctx, m, choice)?;
        if key.f16 {
            let xmax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            if xmax.max(self.max_abs_w) > F16_SAFE_PRODUCT || xmax * self.max_abs_w > F16_SAFE_PRODUCT {
                key.f16 = false; // documented fallback: f16 could overflow
            }
        }
        let groups = |n: usize| -> Result<u32, GpuError> {
            u32::try_from(n).ok().filter(|&g| g <= ctx.limits.max_compute_workgroups_per_dimension).ok_or_else(|| {
                GpuError::Input(Error::Unsupported { what: format!("a dispatch of {n} workgroups in one dimension") })
            })
        };
        let zgroups = match key.op {
            KernelOp::Gemv => groups(m.div_ceil(MAXM as usize))?,
            _ => groups(m.div_ceil(GEMM_TILE as usize))?,
        };
        if m == 0 {
            let s = self.take_scratch(ctx, 0);
            return Ok((s, None));
        }
        let pipe = ctx.pipeline(&key).await?;
        let shrink_key = KernelKey { op: KernelOp::Shrink, weight: WeightKind::FourBit, subgroups: false, f16: false };

        // ---- per-call data ----
        let mask_words = n_ad.div_ceil(32).max(1);
        let mut masks = vec![0u32; m * mask_words];
        let mut any = false;
        for row in 0..m {
            let mut set = |a: usize| {
                masks[row * mask_words + a / 32] |= 1 << (a % 32);
                any = true;
            };
            match adapter_ids {
                None => (0..n_ad).filter(|&a| self.adapter_enabled[a]).for_each(&mut set),
                Some(ids) => {
                    if let Some(a) = ids[row] {
                        set(a)
                    }
                }
            }
        }
        let use_lora = any && self.r_total > 0;
        let shrink = if use_lora { Some(ctx.pipeline(&shrink_key).await?) } else { None };
        let s = self.take_scratch(ctx, m);
        let q = &ctx.queue;
        q.write_buffer(&s.x, 0, bytemuck::cast_slice(x));
        q.write_buffer(&s.rowinfo, 0, bytemuck::cast_slice(&masks));
        let call = CallParams { m: m as u32, mask_words: mask_words as u32, use_lora: use_lora as u32, _p: 0 };
        q.write_buffer(&s.call, 0, bytemuck::bytes_of(&call));

        let dev = &ctx.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = pipe.get_bind_group_layout(0);
        let groups_out: Vec<wgpu::BindGroup> = self
            .chunks
            .iter()
            .map(|c| {
                dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("lowbit forward"),
                    layout: &layout,
                    entries: &[
                        entry(0, &c.codes),
                        entry(1, &c.scales),
                        entry(2, &self.consts),
                        entry(3, &s.x),
                        entry(4, &s.y),
                        entry(5, &s.t),
                        entry(6, &self.lora),
                        entry(7, &s.rowinfo),
                        entry(8, &c.params),
                        entry(9, &s.call),
                    ],
                })
            })
            .collect();
        let shrink_group = shrink.as_ref().map(|sp| {
            dev.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("lowbit shrink"),
                layout: &sp.get_bind_group_layout(0),
                entries: &[
                    entry(2, &self.consts),
                    entry(3, &s.x),
                    entry(5, &s.t),
                    entry(6, &self.lora),
                    entry(7, &s.rowinfo),
                    entry(8, &self.chunks[0].params),
                    entry(9, &s.call),
                ],
            })
        });
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
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("lowbit"), timestamp_writes: tw });
            if let (Some(sp), Some(bg)) = (&shrink, &shrink_group) {
                pass.set_pipeline(sp);
                pass.set_bind_group(0, bg, &[]);
                let yz = m.div_ceil(65535);
                pass.dispatch_workgroups(self.r_total as u32, m.min(65535) as u32, groups(yz)?);
            }
            pass.set_pipeline(&pipe);
            for (c, bg) in self.chunks.iter().zip(&groups_out) {
                pass.set_bind_group(0, bg, &[]);
                match key.op {
                    KernelOp::Gemv => {
                        let rows = c.rows as usize;
                        pass.dispatch_workgroups(rows.min(65535) as u32, groups(rows.div_ceil(65535))?, zgroups);
                    }
                    _ => pass.dispatch_workgroups(groups((c.rows as usize).div_ceil(GEMM_TILE as usize))?, zgroups, 1),
                }
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
        q.submit([enc.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(GpuError::Wgpu(format!("{} forward: {e}", key.name())));
        }
        Ok((s, ts_buf))
    }
}

fn entry(binding: u32, buf: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource: buf.as_entire_binding() }
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
