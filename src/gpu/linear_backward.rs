//! The backward of [`GpuLinear`] on caller buffers: `dx = dy·W + Σ s·(dy·B)·A` with `W` decoded in the
//! kernel (never materialised), and the LoRA gradients `dA += s·(dy·B)ᵀ·x`, `dB += s·dyᵀ·(x·Aᵀ)` added into
//! caller-owned buffers. The same recording rules as the forward (module docs of [`crate::gpu`]): nothing is
//! written through the queue, per-call state is immutable and cached, bind groups are cached.
//!
//! One backward records one compute pass of at most `2 + chunks + 2·adapters` dispatches, in this order:
//! 1. (if a row uses an adapter) the LoRA shrink `t = x·Aᵀ` (`shrink.wgsl`, the forward's kernel) and
//!    `u = dy·B` (`lora_grads.wgsl`, `GRAD_U`) into a per-layer scratch `[t | u]` of `2·m·Σr` floats;
//! 2. (if `dx` is given) `backward_dx.wgsl` once per weight chunk, in row order: the first chunk writes `dx`,
//!    later chunks add to it, the last adds the LoRA term `s·u·A`;
//! 3. per adapter some row uses: `dA` then `dB` (`GRAD_DA`, `GRAD_DB`), each adding into the caller's buffer.
//!
//! Every output element is summed by one invocation (or, for `u` and `t`, one workgroup with a fixed tree)
//! in a fixed order, so the results are deterministic: the same inputs give the same bits on a device, and
//! two recorded backwards into the same gradient buffers give exactly twice one backward.

use super::context::GpuContext;
use super::layout::{bind_dx, bind_lora, BindingSet, GradParams, MAXM, WG};
use super::linear::{entry, groups, lock, sized, too_big, CallKey, GpuLinear, Lru, Masks};
use super::shader::KernelKey;
use crate::Error;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// The gradient buffers of one adapter for [`GpuLinear::encode_backward`]: `a` receives ∂L/∂A (`[rank, in]`
/// f32, row-major, at least `rank·in·4` bytes) and `b` receives ∂L/∂B (`[out, rank]`, at least `out·rank·4`
/// bytes), both with usage `STORAGE`. The backward ADDS into them (zero them to start a new accumulation).
#[derive(Clone, Copy, Debug)]
pub struct GpuAdapterGrad<'a> {
    /// ∂L/∂A, `[rank, in]`.
    pub a: &'a wgpu::Buffer,
    /// ∂L/∂B, `[out, rank]`.
    pub b: &'a wgpu::Buffer,
}

/// What a cached backward bind group set binds besides the layer's own buffers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BwdGroupKey {
    x: wgpu::Buffer,
    dy: wgpu::Buffer,
    dx: Option<wgpu::Buffer>,
    grads: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    scratch: wgpu::Buffer,
    call: wgpu::Buffer,
    m: u32,
}

/// The bind groups of one backward: one per weight chunk for `dx` (empty without `dx`), one per adapter for
/// the LoRA kernels (`None` for adapters no row uses).
#[derive(Debug)]
struct BwdGroups {
    dx: Vec<wgpu::BindGroup>,
    lora: Vec<Option<wgpu::BindGroup>>,
}

/// Per-layer caches of the backward's recording path.
#[derive(Debug, Default)]
pub(crate) struct BwdCaches {
    /// `[t | u]`, grown (never shrunk) to the largest `2·m·Σr` recorded.
    scratch: Option<wgpu::Buffer>,
    /// One immutable `Grad` uniform per adapter.
    grad_params: Vec<wgpu::Buffer>,
    groups: Lru<BwdGroupKey, Arc<BwdGroups>>,
    bind_groups_created: u64,
}

impl BwdCaches {
    /// Drops the cached bind groups (and with them the references to callers' buffers).
    pub(super) fn clear_groups(&mut self) {
        self.groups = Lru::default();
    }
}

/// Workgroup counts of one backward, validated before anything is recorded.
#[derive(Clone, Debug)]
struct BwdDispatch {
    /// `dx`: (column groups, row batches).
    dx: (u32, u32),
    /// Shrink and `u`: (y, z) groups over the rows.
    rows_yz: (u32, u32),
    /// `dA` per adapter: (column groups, rank).
    da: Vec<(u32, u32)>,
    /// `dB` per adapter: (x, y) groups over the `out·rank` elements.
    db: Vec<(u32, u32)>,
}

impl GpuLinear {
    /// Ranks of the uploaded adapters, in id order.
    pub fn adapter_ranks(&self) -> &[usize] {
        &self.adapter_ranks
    }

    /// Compiles (once per context) the pipelines of this layer's backward, returning compile errors as
    /// [`Error::Gpu`]. Optional on native backends; in the browser, await it once before
    /// [`encode_backward`](Self::encode_backward) so that a shader error is returned rather than reported to
    /// the device's uncaptured-error handler.
    pub async fn prepare_backward(&self, ctx: &GpuContext) -> Result<(), Error> {
        let keys = KernelKey::backward(self.scheme());
        let n = if self.r_total > 0 { keys.len() } else { 1 };
        for key in &keys[..n] {
            ctx.pipeline(key).await?;
        }
        Ok(())
    }

    /// Records the backward of [`encode_forward`](Self::encode_forward) into `encoder`, for `x` (`[m, in]`
    /// f32, row-major, from byte 0) and the upstream gradient `dy = ∂L/∂y` (`[m, out]`): writes
    /// `dx = dy·W + Σ s·(dy·B)·A` (`[m, in]`) when `dx` is given, and ADDS `∂L/∂A = s·(dy·B)ᵀ·x` and
    /// `∂L/∂B = s·dyᵀ·(x·Aᵀ)` into `grads[id]` for every adapter enabled at the time of the call (the others'
    /// buffers are left as they are). `grads` has one entry per uploaded adapter, in id order. The weight and
    /// bias are frozen. Nothing is submitted or written through the queue (see the module notes), so a whole
    /// backward pass over many layers can be recorded into one encoder.
    ///
    /// Checked before anything is recorded (errors, never GPU faults): every buffer has `STORAGE` usage and is
    /// large enough (`x`, `dx`: `m·in·4` bytes, `dy`: `m·out·4`, `grads[id].a`: `rank·in·4`, `grads[id].b`:
    /// `out·rank·4`), no buffer is passed twice, `grads.len()` equals the number of adapters, and `m` rows fit
    /// the binding and dispatch limits. Not checked (the contents are on the GPU): that `x` and `dy` are
    /// finite; non-finite inputs, or results that overflow f32, give non-finite outputs. `m == 0` records
    /// nothing. Results are deterministic and within
    /// [`backward_error_bound_for`](crate::linear::QuantLinear::backward_error_bound_for) with
    /// [`BoundTarget::Gpu`](crate::linear::BoundTarget::Gpu) of the exact gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_backward(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        grads: &[GpuAdapterGrad<'_>],
        m: usize,
    ) -> Result<(), Error> {
        self.encode_backward_with(ctx, encoder, x, dy, dx, grads, m, None)
    }

    /// [`encode_backward`](Self::encode_backward) with a per-row adapter selection: `Some(ids)` means row `i`
    /// used only adapter `ids[i]` (or none) in the forward, as
    /// [`forward_batch`](Self::forward_batch); only adapters some row uses get gradients. Errors on an id out
    /// of range, a disabled adapter or `ids.len() != m`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_backward_with(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        grads: &[GpuAdapterGrad<'_>],
        m: usize,
        adapter_ids: Option<&[Option<usize>]>,
    ) -> Result<(), Error> {
        let dispatch = self.check_backward_m(ctx, m)?;
        let call_key = self.masks(m, adapter_ids)?;
        self.check_backward_buffers(x, dy, dx, grads, m)?;
        self.record_backward(ctx, encoder, x, dy, dx, grads, m, &call_key, &dispatch)
    }

    /// Bind groups the backward has created so far (a repeated call on the same buffers creates none).
    pub fn backward_bind_groups_created(&self) -> u64 {
        lock(&self.bwd).bind_groups_created
    }

    /// Which adapters some row uses under `call_key`.
    fn used_adapters(&self, call_key: &CallKey) -> Vec<bool> {
        let n = self.adapter_names.len();
        let bit = |w: &[u32], a: usize| (w[a / 32] >> (a % 32)) & 1 != 0;
        match &call_key.masks {
            Masks::Shared(w) => (0..n).map(|a| call_key.m > 0 && bit(w, a)).collect(),
            Masks::PerRow(w) => {
                let words = n.div_ceil(32).max(1);
                (0..n).map(|a| w.chunks(words).any(|row| bit(row, a))).collect()
            }
        }
    }

    /// Checks that `m` rows fit the bindings, 32-bit indices and dispatch limits; returns the dispatch sizes.
    fn check_backward_m(&self, ctx: &GpuContext, m: usize) -> Result<BwdDispatch, Error> {
        let wide = self.n_in.max(self.n_out) as u64;
        let m64 = m as u64;
        let io_bytes = m64.saturating_mul(wide).saturating_mul(4);
        let scratch_bytes = m64.saturating_mul(2 * self.r_total as u64).saturating_mul(4);
        if io_bytes.max(scratch_bytes) > self.max_binding
            || m64.saturating_mul(wide.max(2 * self.r_total as u64)).saturating_add(64) > u32::MAX as u64
        {
            return Err(too_big(
                &format!("x, dy, dx or the backward's LoRA scratch for m = {m} rows"),
                io_bytes.max(scratch_bytes),
                self.max_binding,
            ));
        }
        let cols = groups(ctx, self.n_in.div_ceil(WG as usize))?;
        let dx = (cols, groups(ctx, m.div_ceil(MAXM as usize))?);
        let rows_yz = (m.min(65535) as u32, groups(ctx, m.div_ceil(65535))?);
        let mut da = Vec::with_capacity(self.adapter_ranks.len());
        let mut db = Vec::with_capacity(self.adapter_ranks.len());
        for &r in &self.adapter_ranks {
            da.push((cols, groups(ctx, r)?));
            let n = (self.n_out * r).div_ceil(WG as usize);
            db.push((n.min(65535) as u32, groups(ctx, n.div_ceil(65535))?));
        }
        Ok(BwdDispatch { dx, rows_yz, da, db })
    }

    /// Checks the caller's buffers for `m` rows.
    fn check_backward_buffers(
        &self,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        grads: &[GpuAdapterGrad<'_>],
        m: usize,
    ) -> Result<(), Error> {
        if grads.len() != self.adapter_ranks.len() {
            return Err(Error::shape(
                "number of adapter gradient buffer pairs (one per uploaded adapter)",
                grads.len(),
                self.adapter_ranks.len(),
            ));
        }
        let (m64, n_in, n_out) = (m as u64, self.n_in as u64, self.n_out as u64);
        let mut all: Vec<(String, &wgpu::Buffer, u64)> =
            vec![("x".into(), x, m64 * n_in * 4), ("dy".into(), dy, m64 * n_out * 4)];
        if let Some(dx) = dx {
            all.push(("dx".into(), dx, m64 * n_in * 4));
        }
        for (a, (g, &r)) in grads.iter().zip(&self.adapter_ranks).enumerate() {
            all.push((format!("grads[{a}].a (dA of adapter `{}`)", self.adapter_names[a]), g.a, r as u64 * n_in * 4));
            all.push((format!("grads[{a}].b (dB of adapter `{}`)", self.adapter_names[a]), g.b, n_out * r as u64 * 4));
        }
        for (i, (name, buf, need)) in all.iter().enumerate() {
            if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::invalid(
                    "backward buffer",
                    format!("{name}: a buffer with usage {:?}", buf.usage()),
                    "usage including STORAGE",
                ));
            }
            if buf.size() < *need {
                return Err(Error::ShapeMismatch {
                    what: format!("size in bytes of buffer {name} for m = {m} rows (in = {n_in}, out = {n_out})"),
                    got: buf.size().to_string(),
                    expected: format!("at least {need}"),
                });
            }
            if let Some((other, _, _)) = all[..i].iter().find(|(_, b, _)| b == buf) {
                return Err(Error::invalid(
                    "backward buffer",
                    format!("{name} is the same buffer as {other}"),
                    "distinct buffers for x, dy, dx and every gradient (the kernels write some while reading others)",
                ));
            }
        }
        Ok(())
    }

    /// The cached bind groups (and the per-call state) of one backward, created on a miss.
    #[allow(clippy::too_many_arguments)]
    fn backward_groups(
        &self,
        ctx: &GpuContext,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        grads: &[GpuAdapterGrad<'_>],
        call_key: &CallKey,
        used: &[bool],
    ) -> Result<Arc<BwdGroups>, Error> {
        let dev = &ctx.device;
        let m = call_key.m;
        let mut c = lock(&self.bwd);
        #[cfg(not(target_arch = "wasm32"))]
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let state = {
            let mut fc = lock(&self.caches);
            self.call_state(dev, &mut fc, call_key)
        };
        let need = (2 * m as u64 * self.r_total as u64 * 4).max(4);
        let scratch = match &c.scratch {
            Some(s) if s.size() >= need => s.clone(),
            _ => {
                let cap = (2 * (m as u64).next_power_of_two() * self.r_total as u64 * 4).max(need);
                let s = dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("lowbit backward scratch"),
                    size: cap.min(self.max_binding.max(need)),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                c.scratch = Some(s.clone());
                c.groups = Lru::default(); // the old groups bind the old scratch
                s
            }
        };
        while c.grad_params.len() < self.adapter_ranks.len() {
            let p = GradParams { adapter: c.grad_params.len() as u32, ..Default::default() };
            let buf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("lowbit grad params"),
                contents: bytemuck::bytes_of(&p),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            c.grad_params.push(buf);
        }
        let key = BwdGroupKey {
            x: x.clone(),
            dy: dy.clone(),
            dx: dx.cloned(),
            grads: grads.iter().map(|g| (g.a.clone(), g.b.clone())).collect(),
            scratch: scratch.clone(),
            call: state.call.clone(),
            m,
        };
        let groups = match c.groups.get(&key) {
            Some(g) => g,
            None => {
                let (m64, n_in, n_out) = (m as u64, self.n_in as u64, self.n_out as u64);
                let dx_groups: Vec<wgpu::BindGroup> = match dx {
                    None => Vec::new(),
                    Some(dx) => self
                        .chunks
                        .iter()
                        .map(|ch| {
                            dev.create_bind_group(&wgpu::BindGroupDescriptor {
                                label: Some("lowbit backward dx"),
                                layout: ctx.bind_layout(BindingSet::BackwardDx),
                                entries: &[
                                    entry(bind_dx::CODES, ch.codes.as_entire_binding()),
                                    entry(bind_dx::SCALES, ch.scales.as_entire_binding()),
                                    entry(bind_dx::LCONST, self.consts.as_entire_binding()),
                                    entry(bind_dx::DY, sized(dy, m64 * n_out * 4)),
                                    entry(bind_dx::DX, sized(dx, m64 * n_in * 4)),
                                    entry(bind_dx::T, scratch.as_entire_binding()),
                                    entry(bind_dx::LORA, self.lora.as_entire_binding()),
                                    entry(bind_dx::ROWINFO, state.rowinfo.as_entire_binding()),
                                    entry(bind_dx::CHUNK, ch.params.as_entire_binding()),
                                    entry(bind_dx::CALL, state.call.as_entire_binding()),
                                ],
                            })
                        })
                        .collect(),
                };
                let lora_groups: Vec<Option<wgpu::BindGroup>> = (0..self.adapter_ranks.len())
                    .map(|a| {
                        let r = self.adapter_ranks[a] as u64;
                        used[a].then(|| {
                            dev.create_bind_group(&wgpu::BindGroupDescriptor {
                                label: Some("lowbit backward lora"),
                                layout: ctx.bind_layout(BindingSet::BackwardLora),
                                entries: &[
                                    entry(bind_lora::LCONST, self.consts.as_entire_binding()),
                                    entry(bind_lora::X, sized(x, m64 * n_in * 4)),
                                    entry(bind_lora::DY, sized(dy, m64 * n_out * 4)),
                                    entry(bind_lora::T, scratch.as_entire_binding()),
                                    entry(bind_lora::LORA, self.lora.as_entire_binding()),
                                    entry(bind_lora::ROWINFO, state.rowinfo.as_entire_binding()),
                                    entry(bind_lora::DA, sized(grads[a].a, r * n_in * 4)),
                                    entry(bind_lora::DB, sized(grads[a].b, n_out * r * 4)),
                                    entry(bind_lora::CHUNK, self.chunks[0].params.as_entire_binding()),
                                    entry(bind_lora::CALL, state.call.as_entire_binding()),
                                    entry(bind_lora::GRAD, c.grad_params[a].as_entire_binding()),
                                ],
                            })
                        })
                    })
                    .collect();
                c.bind_groups_created += (dx_groups.len() + lora_groups.iter().flatten().count()) as u64;
                let g = Arc::new(BwdGroups { dx: dx_groups, lora: lora_groups });
                c.groups.insert(key, g.clone());
                g
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(e) = pollster::block_on(scope.pop()) {
            c.groups = Lru::default();
            c.scratch = None;
            return Err(Error::gpu("create the backward's bind groups", e));
        }
        Ok(groups)
    }

    /// Records one validated backward (see the module docs for the dispatch order) into one compute pass.
    #[allow(clippy::too_many_arguments)]
    fn record_backward(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        grads: &[GpuAdapterGrad<'_>],
        m: usize,
        call_key: &CallKey,
        dispatch: &BwdDispatch,
    ) -> Result<(), Error> {
        if m == 0 {
            return Ok(());
        }
        let used = self.used_adapters(call_key);
        let lora = self.r_total > 0 && used.iter().any(|&u| u);
        if dx.is_none() && !lora {
            return Ok(());
        }
        let keys = KernelKey::backward(self.scheme());
        let dx_pipe = match dx {
            Some(_) => Some(ctx.pipeline_now(&keys[0])?),
            None => None,
        };
        let lora_pipes = if lora {
            Some([
                ctx.pipeline_now(&keys[1])?,
                ctx.pipeline_now(&keys[2])?,
                ctx.pipeline_now(&keys[3])?,
                ctx.pipeline_now(&keys[4])?,
            ])
        } else {
            None
        };
        let bgs = self.backward_groups(ctx, x, dy, dx, grads, call_key, &used)?;
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("lowbit backward"),
            timestamp_writes: None,
        });
        let first_lora = bgs.lora.iter().flatten().next();
        if let (Some([shrink, u, _, _]), Some(g0)) = (&lora_pipes, first_lora) {
            let (gy, gz) = dispatch.rows_yz;
            pass.set_bind_group(0, g0, &[]);
            pass.set_pipeline(shrink);
            pass.dispatch_workgroups(self.r_total as u32, gy, gz);
            pass.set_pipeline(u);
            pass.dispatch_workgroups(self.r_total as u32, gy, gz);
        }
        if let Some(p) = &dx_pipe {
            pass.set_pipeline(p);
            for g in &bgs.dx {
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(dispatch.dx.0, dispatch.dx.1, 1);
            }
        }
        if let Some([_, _, da, db]) = &lora_pipes {
            for (a, g) in bgs.lora.iter().enumerate() {
                let Some(g) = g else { continue };
                pass.set_bind_group(0, g, &[]);
                pass.set_pipeline(da);
                pass.dispatch_workgroups(dispatch.da[a].0, dispatch.da[a].1, 1);
                pass.set_pipeline(db);
                pass.dispatch_workgroups(dispatch.db[a].0, dispatch.db[a].1, 1);
            }
        }
        Ok(())
    }
}
