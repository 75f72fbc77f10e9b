//! Backward of [`QuantLinear`]: the gradients QLoRA training needs, with the quantized base frozen.
//!
//! For `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` and an upstream gradient `dy = ∂L/∂y`:
//! `dx = dy·W + Σ s·(dy·B)·A`, `dA = s·(dy·B)ᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)`. The kernels never build `W`: they
//! decode it tile by tile (the forward's decoder, bit-identical to the reference dequantization) and reuse each
//! tile for every row of `dy`. The shrink `x·Aᵀ` is recomputed (it costs `r/out` of the base product).
//! [`crate::reference::linear_backward`] is the f64 oracle; [`QuantLinear::backward_error_bound`] states the
//! tolerance. Results do not depend on the number of threads.

use super::{BoundTarget, QuantLinear, Workspace};
use crate::cpu::KernelPath;
use crate::element::check_finite;
use crate::format::layer::AdapterSelection;
use crate::{Error, Result};

/// The gradients of one adapter: `a` = ∂L/∂A (`[rank, in]`), `b` = ∂L/∂B (`[out, rank]`), row-major like the
/// adapter's own matrices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdapterGrad {
    /// ∂L/∂A, `[rank, in]`.
    pub a: Vec<f32>,
    /// ∂L/∂B, `[out, rank]`.
    pub b: Vec<f32>,
}

impl AdapterGrad {
    /// Sets every gradient to zero (keeps the allocation).
    pub fn zero(&mut self) {
        self.a.fill(0.0);
        self.b.fill(0.0);
    }
}

/// How a backward runs: the kernel path and which adapters apply to which rows (as in the forward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardOptions<'a> {
    /// Instruction set and threading ([`KernelPath::best`] by default; [`KernelPath::REFERENCE`] computes
    /// every sum in f64 and rounds once).
    pub path: KernelPath,
    /// Which adapters apply ([`AdapterSelection::Enabled`] by default); only those get gradients.
    pub adapters: AdapterSelection<'a>,
}

impl Default for BackwardOptions<'_> {
    fn default() -> Self {
        BackwardOptions { path: KernelPath::best(), adapters: AdapterSelection::Enabled }
    }
}

impl<'a> BackwardOptions<'a> {
    /// The reference backward (f64 accumulation, every enabled adapter).
    pub fn reference() -> Self {
        BackwardOptions { path: KernelPath::REFERENCE, ..Self::default() }
    }
    /// These options through `path`.
    pub fn path(self, path: KernelPath) -> Self {
        BackwardOptions { path, ..self }
    }
    /// These options as a multi-adapter batch: row `m` used only adapter `ids[m]` (or none).
    pub fn adapter_ids(self, ids: &'a [Option<usize>]) -> BackwardOptions<'a> {
        BackwardOptions { adapters: AdapterSelection::PerRow(ids), ..self }
    }
}

/// What [`QuantLinear::backward`] returns: `dx` (`[M, in]`) and one [`AdapterGrad`] per attached adapter
/// (zero for adapters no row used).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearGrads {
    /// ∂L/∂x, `[M, in]`.
    pub dx: Vec<f32>,
    /// One per attached adapter, in id order.
    pub adapters: Vec<AdapterGrad>,
}

/// Per-element bounds on `|g − g_ref|` of every CPU backward path ([`QuantLinear::backward_error_bound`]), in
/// the shapes of [`LinearGrads`] (all zero for an adapter no row used).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardBound {
    /// Bound per element of `dx`.
    pub dx: Vec<f64>,
    /// Bounds per element of `(dA, dB)`, one pair per attached adapter.
    pub adapters: Vec<(Vec<f64>, Vec<f64>)>,
}

impl QuantLinear {
    /// Zeroed gradients, one per attached adapter, sized for [`backward_into`](Self::backward_into).
    pub fn zero_grads(&self) -> Vec<AdapterGrad> {
        self.adapters.iter().map(|ad| AdapterGrad { a: vec![0.0; ad.a().len()], b: vec![0.0; ad.b().len()] }).collect()
    }

    /// Mutable access to the attached adapters (their values, for an optimizer step; shapes and names cannot
    /// change through it).
    pub fn adapters_mut(&mut self) -> &mut [crate::lora::LoraAdapter] {
        &mut self.adapters
    }

    /// The backward of [`forward_into_with`](Self::forward_into_with) for `x: [M, in]` and the upstream
    /// gradient `dy: [M, out]` (both f32, row-major): writes `dx = ∂L/∂x` (`[M, in]`) when `dx` is given, and
    /// ADDS `∂L/∂A` and `∂L/∂B` into `grads[id]` for every adapter some row uses under `opts.adapters` (others
    /// are left as they are), so gradients accumulate over micro-batches. `grads` comes from
    /// [`zero_grads`](Self::zero_grads). The quantized weight and the bias are frozen. After a first call with a
    /// given shape, `ws` holds every scratch buffer (a call then allocates only one row-sized buffer per `dA` /
    /// `dB` task).
    ///
    /// Errors, before writing anything, on a wrong length of `x`, `dy`, `dx` or `grads` (and of each
    /// gradient), a non-finite `x` or `dy`, or a bad adapter selection. A gradient that is not finite although
    /// every input was (an f32 overflow) is an [`Error::NonFinite`] naming it (the values stay written).
    ///
    /// ```
    /// use lowbit::linear::{BackwardOptions, QuantLinear, QuantWeight, Workspace};
    /// use lowbit::lora::LoraAdapter;
    /// let (out, inp, m) = (8, 64, 2);
    /// let w: Vec<f32> = (0..out * inp).map(|i| ((i * 37 % 29) as f32 - 14.0) / 20.0).collect();
    /// let mut layer = QuantLinear::new(QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], 64, true)?), None)?;
    /// layer.add_adapter(LoraAdapter::new("default", 4, vec![0.01; 4 * inp], vec![0.02; out * 4], 8.0, false)?)?;
    /// let x = vec![0.5f32; m * inp];
    /// let dy = vec![1.0f32; m * out];
    /// let mut dx = vec![0.0f32; m * inp];
    /// let mut grads = layer.zero_grads();
    /// layer.backward_into(&x, &dy, Some(&mut dx), &mut grads, &mut Workspace::default(), BackwardOptions::default())?;
    /// assert_eq!(grads[0].a.len(), 4 * inp);
    /// # Ok::<(), lowbit::Error>(())
    /// ```
    pub fn backward_into(
        &self,
        x: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut [super::AdapterGrad],
        ws: &mut Workspace,
        opts: BackwardOptions<'_>,
    ) -> Result<()> {
        let m = self.check_backward(x, dy, opts.adapters)?;
        if let Some(dx) = &dx {
            if dx.len() != m * self.in_features {
                return Err(Error::shape(
                    format!("length of dx (expected [M, {}] row-major for M = {m} rows)", self.in_features),
                    dx.len(),
                    m * self.in_features,
                ));
            }
        }
        self.check_grads(grads)?;
        opts.path.check()?;
        let used: Vec<bool> =
            (0..self.adapters.len()).map(|a| (0..m).any(|r| self.view().uses(opts.adapters, r, a))).collect();
        if opts.path == KernelPath::REFERENCE {
            let g = crate::reference::linear_backward::backward_f64(self.view(), x, dy, opts.adapters);
            let dx = dx.map(|dx| {
                dx.iter_mut().zip(&g.dx).for_each(|(d, &v)| *d = v as f32);
                &*dx
            });
            for (gr, exact) in grads.iter_mut().zip(&g.adapters) {
                if let Some((da, db)) = exact {
                    gr.a.iter_mut().zip(da).for_each(|(d, &v)| *d += v as f32);
                    gr.b.iter_mut().zip(db).for_each(|(d, &v)| *d += v as f32);
                }
            }
            return check_grads_finite(dx, grads, &used);
        }
        let mut dx = dx;
        crate::cpu::linear_backward::backward_into(
            self.view(),
            x,
            dy,
            m,
            opts.adapters,
            opts.path,
            dx.as_deref_mut(),
            grads,
            ws.backward(),
        );
        check_grads_finite(dx.as_deref(), grads, &used)
    }

    /// Convenience wrapper of [`backward_into`](Self::backward_into): returns new `dx` and gradients.
    pub fn backward(&self, x: &[f32], dy: &[f32]) -> Result<LinearGrads> {
        self.backward_with(x, dy, BackwardOptions::default())
    }

    /// [`backward`](Self::backward) with explicit options.
    pub fn backward_with(&self, x: &[f32], dy: &[f32], opts: BackwardOptions<'_>) -> Result<LinearGrads> {
        let m = self.check_backward(x, dy, opts.adapters)?;
        let mut dx = super::finite::alloc_output(m, self.in_features)?;
        let mut adapters = self.zero_grads();
        self.backward_into(x, dy, Some(&mut dx), &mut adapters, &mut Workspace::default(), opts)?;
        Ok(LinearGrads { dx, adapters })
    }

    /// Per-element bound on `|g − g_ref|` for every CPU backward path, where `g_ref` is the exact (f64)
    /// gradient: `(out+3)·ε·Σ_o|dy·W|` for the base part of `dx`, plus per adapter the f32 accumulation of the
    /// `dy·B`, `x·Aᵀ` and M-row sums (derivation in `crate::reference::linear_backward` and
    /// `docs/formats.md` §13). Errors as [`backward_into`](Self::backward_into) on bad inputs. The same as
    /// [`backward_error_bound_for`](Self::backward_error_bound_for) with [`BoundTarget::Cpu`].
    pub fn backward_error_bound(&self, x: &[f32], dy: &[f32], sel: AdapterSelection<'_>) -> Result<BackwardBound> {
        self.backward_error_bound_for(x, dy, sel, BoundTarget::Cpu)
    }

    /// [`backward_error_bound`](Self::backward_error_bound) for the kernels of `target`:
    /// [`BoundTarget::Cpu`] (every CPU path) or [`BoundTarget::Gpu`] (the GPU backward,
    /// `GpuLinear::encode_backward`), which adds, for double-quantized 4-bit weights, the allowance of a
    /// block scale decoded with an FMA: `3ε·Σ_o |dy[m, o]|·|T[q_oi]|·(|map[c]·nested| + |offset|)` per element
    /// of `dx` (derived in `crate::reference::linear_backward::error_bound`). [`BoundTarget::GpuF16`] is an
    /// error: the backward has no f16 kernels.
    pub fn backward_error_bound_for(
        &self,
        x: &[f32],
        dy: &[f32],
        sel: AdapterSelection<'_>,
        target: BoundTarget,
    ) -> Result<BackwardBound> {
        let gpu = match target {
            BoundTarget::Cpu => false,
            BoundTarget::Gpu => true,
            other => {
                return Err(Error::invalid(
                    "target",
                    format!("{other:?}"),
                    "BoundTarget::Cpu or BoundTarget::Gpu (the backward has no f16 kernels)",
                ))
            }
        };
        self.check_backward(x, dy, sel)?;
        let b = crate::reference::linear_backward::error_bound(self.view(), x, dy, sel, gpu);
        let adapters = b
            .adapters
            .into_iter()
            .zip(&self.adapters)
            .map(|(g, ad)| g.unwrap_or_else(|| (vec![0.0; ad.a().len()], vec![0.0; ad.b().len()])))
            .collect();
        Ok(BackwardBound { dx: b.dx, adapters })
    }

    /// Validates `x`, `dy` and the selection; returns `M`.
    fn check_backward(&self, x: &[f32], dy: &[f32], sel: AdapterSelection<'_>) -> Result<usize> {
        let m = self.check_input(x, sel)?;
        if dy.len() != m * self.out_features {
            return Err(Error::shape(
                format!("length of dy (expected [M, {}] row-major for M = {m} rows of x)", self.out_features),
                dy.len(),
                m * self.out_features,
            ));
        }
        check_finite("dy", dy)?;
        Ok(m)
    }

    fn check_grads(&self, grads: &[AdapterGrad]) -> Result<()> {
        if grads.len() != self.adapters.len() {
            return Err(Error::shape(
                "number of adapter gradients (one per attached adapter)",
                grads.len(),
                self.adapters.len(),
            ));
        }
        for (g, ad) in grads.iter().zip(&self.adapters) {
            if g.a.len() != ad.a().len() || g.b.len() != ad.b().len() {
                return Err(Error::shape(
                    format!("gradients of adapter `{}` (dA: [r, in], dB: [out, r])", ad.name()),
                    [g.a.len(), g.b.len()],
                    [ad.a().len(), ad.b().len()],
                ));
            }
        }
        Ok(())
    }
}

/// [`Error::NonFinite`] for the first non-finite value of `dx` or of a gradient this call added to.
fn check_grads_finite(dx: Option<&[f32]>, grads: &[AdapterGrad], used: &[bool]) -> Result<()> {
    let first_bad = |what: String, v: &[f32]| -> Result<()> {
        match v.iter().position(|x| !x.is_finite()) {
            Some(index) => Err(Error::NonFinite { arg: what, index, value: v[index] }),
            None => Ok(()),
        }
    };
    if let Some(dx) = dx {
        first_bad("dx (a backward of finite values overflowed f32)".into(), dx)?;
    }
    for (a, g) in grads.iter().enumerate().filter(|(a, _)| used[*a]) {
        first_bad(format!("dA of adapter {a} (overflowed f32)"), &g.a)?;
        first_bad(format!("dB of adapter {a} (overflowed f32)"), &g.b)?;
    }
    Ok(())
}
