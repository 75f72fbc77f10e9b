//! `QuantLinear`: a quantized linear layer with bias and LoRA adapters, run by fused CPU kernels.
//!
//! `y = x·dequant(W)ᵀ + bias + Σ_adapters s·(x·Aᵀ)·Bᵀ` for `x: [M, in]`, `W: [out, in]`, `y: [M, out]`.
//! The kernels never build the f32 weight: they decode a small tile of `W` (bit-identical to the reference
//! dequantization) into L1/L2-resident scratch, reuse it for every row of `x`, and add the LoRA expand term in
//! the same output pass. Accumulation is in f32; [`crate::reference::linear`] is the f64 oracle, and
//! the tests bound the difference by the f32 accumulation error (`|y − y_ref| ≤ (K+3)·ε·Σ|x·w| + …`).
//!
//! Results do not depend on the number of threads (work is split by output features only).
//!
//! ```
//! use lowbit::linear::{QuantLinear, QuantWeight};
//! use lowbit::lora::LoraAdapter;
//!
//! let (out, inp) = (8, 64);
//! let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 113) as f32 - 56.0) / 100.0).collect();
//! let weight = lowbit::nf4::quantize_nf4(&w, &[out, inp], 64, true)?;
//! let mut layer = QuantLinear::new(QuantWeight::FourBit(weight), Some(vec![0.5; out]))?;
//! let a = vec![0.01f32; 4 * inp]; // rank 4
//! let b = vec![0.02f32; out * 4];
//! layer.add_adapter(LoraAdapter::new("default", 4, a, b, 8.0, false)?)?;
//! let x = vec![1.0f32; 2 * inp]; // M = 2
//! let y = layer.forward(&x)?;
//! assert_eq!(y.len(), 2 * out);
//! # Ok::<(), lowbit::Error>(())
//! ```

use crate::affine::AffineTensor;
use crate::cpu::KernelPath;
use crate::element::{check_finite, Element};
use crate::lora::LoraAdapter;
use crate::nf4::FourBitTensor;
use crate::{Error, Result};

/// The quantized weight of a [`QuantLinear`], shape `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantWeight {
    /// 8-bit affine, any granularity.
    Int8(AffineTensor),
    /// NF4 / FP4, with plain or double-quantized block scales.
    FourBit(FourBitTensor),
}

impl QuantWeight {
    /// The weight's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantWeight::Int8(t) => t.shape(),
            QuantWeight::FourBit(t) => t.shape(),
        }
    }
    /// Bytes of packed weight and scales a forward pass reads (what bounds a memory-bound GEMV).
    pub fn packed_bytes(&self) -> usize {
        match self {
            QuantWeight::Int8(t) => t.codes().len() + 5 * t.scales().len(),
            QuantWeight::FourBit(t) => t.packed().len() + (t.scales().storage_bits() / 8) as usize,
        }
    }
    /// Dequantizes through the reference module (f32, `[out, in]` row-major).
    pub fn dequantize_reference(&self) -> Vec<f32> {
        match self {
            QuantWeight::Int8(t) => {
                let (rows, cols) = t.matrix_dims();
                let params: Vec<_> = (0..t.scales().len()).map(|i| t.params(i)).collect();
                crate::reference::affine::dequantize(t.codes(), rows, cols, t.granularity(), &params)
            }
            QuantWeight::FourBit(t) => {
                crate::reference::nf4::dequantize(t.packed(), &t.absmax(), t.blocksize(), t.numel(), t.table())
            }
        }
    }
}

/// Which adapters apply to which rows of `x`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AdapterSelection<'a> {
    /// Every enabled adapter applies to every row.
    Enabled,
    /// Row `m` gets adapter `ids[m]` (an index into [`QuantLinear::adapters`]) or none.
    PerRow(&'a [Option<usize>]),
}

/// A quantized linear layer: weight `[out, in]`, optional bias `[out]`, and named LoRA adapters.
#[derive(Clone, Debug)]
pub struct QuantLinear {
    weight: QuantWeight,
    out_features: usize,
    in_features: usize,
    bias: Option<Vec<f32>>,
    adapters: Vec<LoraAdapter>,
    /// Decoded f32 block scales of a 4-bit weight (one per block; 1/16 of the packed size at block 64).
    pub(crate) block_scales: Vec<f32>,
}

impl QuantLinear {
    /// A layer from a 2-D weight `[out, in]` (both ≥ 1) and an optional bias of length `out`.
    pub fn new(weight: QuantWeight, bias: Option<Vec<f32>>) -> Result<QuantLinear> {
        let (out_features, in_features) = match *weight.shape() {
            [o, i] if o > 0 && i > 0 => (o, i),
            ref s => {
                return Err(Error::invalid("weight shape", format!("{s:?}"), "a 2-D shape [out, in] with out, in ≥ 1"))
            }
        };
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(Error::shape("length of bias", b.len(), out_features));
            }
            check_finite("bias", b)?;
        }
        let block_scales = match &weight {
            QuantWeight::FourBit(t) => t.absmax(),
            QuantWeight::Int8(_) => Vec::new(),
        };
        Ok(QuantLinear { weight, out_features, in_features, bias, adapters: Vec::new(), block_scales })
    }

    /// The quantized weight.
    pub fn weight(&self) -> &QuantWeight {
        &self.weight
    }
    /// `out`: length of each output row.
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    /// `in`: length of each input row.
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// Attached adapters, in the order they were added (their index is the adapter id of
    /// [`forward_batch`](Self::forward_batch)).
    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }

    /// Attaches an adapter and returns its id. Errors if its shape does not fit `[out, in]` or its name is
    /// already taken.
    pub fn add_adapter(&mut self, adapter: LoraAdapter) -> Result<usize> {
        if adapter.in_features() != self.in_features || adapter.out_features() != self.out_features {
            return Err(Error::shape(
                format!("adapter `{}` (A: [r, in], B: [out, r]) vs layer [out, in]", adapter.name()),
                [adapter.out_features(), adapter.in_features()],
                [self.out_features, self.in_features],
            ));
        }
        if self.adapter_id(adapter.name()).is_some() {
            return Err(Error::invalid("adapter name", format!("{:?}", adapter.name()), "a name not already attached"));
        }
        self.adapters.push(adapter);
        Ok(self.adapters.len() - 1)
    }

    /// Detaches the adapter named `name` and returns it (ids of later adapters shift down by one).
    pub fn remove_adapter(&mut self, name: &str) -> Result<LoraAdapter> {
        let id = self.adapter_id(name).ok_or_else(|| self.unknown_adapter(name))?;
        Ok(self.adapters.remove(id))
    }

    /// The id of the adapter named `name`.
    pub fn adapter_id(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name() == name)
    }

    /// Enables or disables the adapter named `name` for [`forward`](Self::forward).
    pub fn set_adapter_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let id = self.adapter_id(name).ok_or_else(|| self.unknown_adapter(name))?;
        self.adapters[id].set_enabled(enabled);
        Ok(())
    }

    fn unknown_adapter(&self, name: &str) -> Error {
        let names: Vec<&str> = self.adapters.iter().map(|a| a.name()).collect();
        Error::invalid("adapter name", format!("{name:?}"), format!("one of {names:?}"))
    }

    /// `y = x·Wᵀ + bias + Σ_enabled s·(x·Aᵀ)·Bᵀ` for `x: [M, in]` row-major (M = `x.len() / in`, any M ≥ 0),
    /// returning `y: [M, out]` in f32, through the fastest path.
    pub fn forward<T: Element>(&self, x: &[T]) -> Result<Vec<f32>> {
        self.forward_with(x, KernelPath::best())
    }

    /// [`forward`](Self::forward) through an explicit path.
    pub fn forward_with<T: Element>(&self, x: &[T], path: KernelPath) -> Result<Vec<f32>> {
        self.run(x, AdapterSelection::Enabled, path)
    }

    /// Multi-adapter batch: row `m` of `x` adds only adapter `adapter_ids[m]` (an id from
    /// [`add_adapter`](Self::add_adapter)), or no adapter for `None`. The base product is shared by all rows.
    /// Errors on an id out of range or naming a disabled adapter, or `adapter_ids.len() != M`.
    pub fn forward_batch<T: Element>(&self, x: &[T], adapter_ids: &[Option<usize>]) -> Result<Vec<f32>> {
        self.forward_batch_with(x, adapter_ids, KernelPath::best())
    }

    /// [`forward_batch`](Self::forward_batch) through an explicit path.
    pub fn forward_batch_with<T: Element>(
        &self,
        x: &[T],
        adapter_ids: &[Option<usize>],
        path: KernelPath,
    ) -> Result<Vec<f32>> {
        self.run(x, AdapterSelection::PerRow(adapter_ids), path)
    }

    /// Validates `x` and the selection and returns `M`.
    pub(crate) fn check_input<T: Element>(&self, x: &[T], sel: AdapterSelection<'_>) -> Result<usize> {
        if !x.len().is_multiple_of(self.in_features) {
            return Err(Error::shape(
                format!("length of x (expected [M, {}] row-major)", self.in_features),
                x.len(),
                format!("a multiple of in = {}", self.in_features),
            ));
        }
        check_finite("x", x)?;
        let m = x.len() / self.in_features;
        if let AdapterSelection::PerRow(ids) = sel {
            if ids.len() != m {
                return Err(Error::shape("length of adapter_ids (one per row of x)", ids.len(), m));
            }
            for (row, id) in ids.iter().enumerate() {
                match id {
                    Some(id) if *id >= self.adapters.len() => {
                        return Err(Error::invalid(
                            "adapter_ids",
                            format!("{id} for row {row}"),
                            format!("an adapter id below {} or None", self.adapters.len()),
                        ))
                    }
                    Some(id) if !self.adapters[*id].is_enabled() => {
                        return Err(Error::invalid(
                            "adapter_ids",
                            format!("{id} (`{}`, disabled) for row {row}", self.adapters[*id].name()),
                            "an enabled adapter",
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(m)
    }

    /// Which adapters apply to row `m` under `sel`.
    pub(crate) fn adapters_for_row<'a>(
        &'a self,
        sel: AdapterSelection<'a>,
        m: usize,
    ) -> impl Iterator<Item = usize> + 'a {
        let n = self.adapters.len();
        (0..n).filter(move |&a| match sel {
            AdapterSelection::Enabled => self.adapters[a].is_enabled(),
            AdapterSelection::PerRow(ids) => ids[m] == Some(a),
        })
    }

    fn run<T: Element>(&self, x: &[T], sel: AdapterSelection<'_>, path: KernelPath) -> Result<Vec<f32>> {
        let m = self.check_input(x, sel)?;
        path.check()?;
        let mut xf = vec![0.0f32; x.len()];
        T::widen_slice(x, &mut xf);
        if path == KernelPath::REFERENCE {
            return Ok(crate::reference::linear::forward(self, &xf, sel));
        }
        Ok(crate::cpu::linear::forward(self, &xf, m, sel, path))
    }

    /// Per-element bound on `|y − y_ref|` for any f32 path of [`forward`](Self::forward) on `x`, where `y_ref`
    /// is the exact (f64) result: `(K+3)·ε·Σ|x·w| + ε·|bias| + Σ_adapters (K+r+3)·ε·|s|·Σ_r(Σ_k|x·A|)·|B|`
    /// (derivation in `reference::linear`). Tests, the demo and the GPU checks compare against it.
    pub fn error_bound<T: Element>(&self, x: &[T]) -> Result<Vec<f64>> {
        self.check_input(x, AdapterSelection::Enabled)?;
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        Ok(crate::reference::linear::error_bound(self, &xf, AdapterSelection::Enabled))
    }

    /// [`error_bound`](Self::error_bound) for [`forward_batch`](Self::forward_batch).
    pub fn error_bound_batch<T: Element>(&self, x: &[T], adapter_ids: &[Option<usize>]) -> Result<Vec<f64>> {
        let sel = AdapterSelection::PerRow(adapter_ids);
        self.check_input(x, sel)?;
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        Ok(crate::reference::linear::error_bound(self, &xf, sel))
    }

    /// The reference (f64-accumulated) forward of [`forward`](Self::forward), for checking other paths.
    pub fn forward_reference<T: Element>(&self, x: &[T]) -> Result<Vec<f32>> {
        self.forward_with(x, KernelPath::REFERENCE)
    }

    /// The reference forward of [`forward_batch`](Self::forward_batch).
    pub fn forward_batch_reference<T: Element>(&self, x: &[T], adapter_ids: &[Option<usize>]) -> Result<Vec<f32>> {
        self.forward_batch_with(x, adapter_ids, KernelPath::REFERENCE)
    }
}
