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

mod backward;
mod bound;
mod finite;
#[cfg(feature = "gpu")]
mod gpu;
mod options;

pub use crate::format::layer::{AdapterSelection, QuantWeight};
pub use backward::{AdapterGrad, BackwardBound, BackwardOptions, LinearGrads};
pub use bound::{Agreement, BoundTarget};
pub use finite::MAX_FORWARD_OUTPUT_BYTES;
pub(crate) use finite::{all_finite, check_output};
pub use options::{Activations, ForwardOptions, Workspace};

use crate::cpu::KernelPath;
use crate::element::{check_finite, Element};
use crate::format::layer::LayerView;
use crate::lora::LoraAdapter;
use crate::{Error, Result, Scheme};

impl QuantWeight {
    /// Quantizes `w` (row-major, `shape`) with `scheme` through the fastest path: int8 calibrated from the
    /// data's min/max at the scheme's granularity, or NF4/FP4 blockwise (double-quantized scales for `+dq`).
    pub fn quantize<T: Element>(w: &[T], shape: &[usize], scheme: Scheme) -> Result<QuantWeight> {
        Ok(match scheme.validate()? {
            Scheme::Int8(g) => QuantWeight::Int8(crate::affine::quantize(w, shape, g)?),
            Scheme::FourBit { format, blocksize, double_quant } => {
                QuantWeight::FourBit(crate::nf4::quantize_4bit(format, w, shape, blocksize, double_quant)?)
            }
        })
    }

    /// Dequantizes through the reference module (f32, `[out, in]` row-major).
    pub fn dequantize_reference(&self) -> Vec<f32> {
        crate::reference::linear::dequantize_weight(self)
    }
}

/// A quantized linear layer: weight `[out, in]`, optional bias `[out]`, and named LoRA adapters.
#[derive(Clone, Debug)]
pub struct QuantLinear {
    weight: QuantWeight,
    out_features: usize,
    in_features: usize,
    bias: Option<Vec<f32>>,
    pub(super) adapters: Vec<LoraAdapter>,
    /// Built by [`QuantLinear::build_act8_layout`].
    act8_interleaved: Option<Box<crate::cpu::linear_act8_interleaved::Act8Interleaved>>,
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
        Ok(QuantLinear { weight, out_features, in_features, bias, adapters: Vec::new(), act8_interleaved: None })
    }

    /// Builds the interleaved copy of the weight (4-bit or int8) that the x86 int8-activation kernels (AVX-512
    /// VNNI; without it AVX-VNNI, or AVX2's `vpmaddubsw`) read (16 rows per 64-byte load; `docs/formats.md` §12
    /// documents the layout), as an engine
    /// would at load time for a model it runs with [`Activations::Int8`](crate::linear::Activations). Forwards
    /// with int8 activations then use it; their results stay within the same bound. It costs the weight's
    /// packed bytes and its scales a second time (see [`QuantLinear::act8_layout_bytes`]; double-quantized scales
    /// stay 8-bit codes there, decoded by the kernel to the same bits); the f32 mode, the
    /// backward, `weight()` and every file are unchanged. Returns whether a copy was built: `false` (and
    /// nothing held) when this CPU has neither VNNI kernel, or the weight does not fit the
    /// layout (rows not a multiple of 64; 4-bit block sizes below 32, not powers of two, or not dividing the
    /// row; int8 groups not multiples of 32 dividing the row), where the default kernels run as before.
    ///
    /// ```
    /// # use lowbit::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight};
    /// # let w = vec![0.25f32; 32 * 128];
    /// let mut layer = QuantLinear::new(QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[32, 128], 64, true)?), None)?;
    /// let built = layer.build_act8_layout();
    /// assert_eq!(built, layer.act8_layout_bytes() > 0);
    /// let y = layer.forward_with(&vec![1.0f32; 128], ForwardOptions::default().activations(Activations::Int8))?;
    /// assert_eq!(y.len(), 32);
    /// # Ok::<(), lowbit::Error>(())
    /// ```
    pub fn build_act8_layout(&mut self) -> bool {
        use crate::cpu::linear_act8_interleaved::Act8Interleaved;
        let built = if Act8Interleaved::used_here() {
            let scales = self.view().block_scales();
            Act8Interleaved::build(&self.weight, self.out_features, self.in_features, scales).map(Box::new)
        } else {
            None
        };
        self.act8_interleaved = built;
        self.act8_interleaved.is_some()
    }

    /// Heap bytes held by the copy [`QuantLinear::build_act8_layout`] built (0 when none).
    pub fn act8_layout_bytes(&self) -> usize {
        self.act8_interleaved.as_ref().map_or(0, |l| l.bytes())
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
    /// [`AdapterSelection::PerRow`]).
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

    /// The borrowed view the reference and the kernels compute with.
    pub(crate) fn view(&self) -> LayerView<'_> {
        LayerView {
            weight: &self.weight,
            out_features: self.out_features,
            in_features: self.in_features,
            bias: self.bias.as_deref(),
            adapters: &self.adapters,
            act8_interleaved: self.act8_interleaved.as_deref(),
        }
    }

    /// `y = x·Wᵀ + bias + Σ_enabled s·(x·Aᵀ)·Bᵀ` for `x: [M, in]` row-major (M = `x.len() / in`, any M ≥ 0),
    /// written into the caller's `y: [M, out]` (f32, or rounded to nearest-even f16 / bf16 from the f32
    /// result), through the fastest path. `ws` holds every scratch buffer: after a first call with the same
    /// shape, a call allocates nothing proportional to M. Errors (and leaves `y` untouched) on a wrong length
    /// or a non-finite `x`. A result that is not finite although every input was (an overflow of f32, or of
    /// f16 / bf16 when narrowing) is an [`Error::NonFinite`] for `y` (then `y` holds the computed values); the
    /// check is one vectorisable pass over `y`.
    ///
    /// ```
    /// # use lowbit::linear::{QuantLinear, QuantWeight, Workspace};
    /// # let w = vec![0.25f32; 8 * 64];
    /// let layer = QuantLinear::new(QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[8, 64], 64, true)?), None)?;
    /// let mut ws = Workspace::default();
    /// let x = vec![1.0f32; 3 * 64];
    /// let mut y = vec![lowbit::f16::ZERO; 3 * 8]; // the engine's own buffer, here f16
    /// layer.forward_into(&x, &mut y, &mut ws)?;
    /// # Ok::<(), lowbit::Error>(())
    /// ```
    pub fn forward_into<T: Element, O: Element>(&self, x: &[T], y: &mut [O], ws: &mut Workspace) -> Result<()> {
        self.forward_into_with(x, y, ws, ForwardOptions::default())
    }

    /// [`forward_into`](Self::forward_into) with explicit options: the kernel path and which adapters apply to
    /// which rows ([`AdapterSelection::PerRow`] is the multi-adapter batch: the base product is shared by all
    /// rows). Errors on an adapter id out of range or naming a disabled adapter, or one id per row missing.
    pub fn forward_into_with<T: Element, O: Element>(
        &self,
        x: &[T],
        y: &mut [O],
        ws: &mut Workspace,
        opts: ForwardOptions<'_>,
    ) -> Result<()> {
        let m = self.check_input(x, opts.adapters)?;
        if y.len() != m * self.out_features {
            return Err(Error::shape(
                format!("length of y (expected [M, {}] row-major for M = {m} rows of x)", self.out_features),
                y.len(),
                m * self.out_features,
            ));
        }
        opts.path.check()?;
        let (xf, scratch) = ws.split(x);
        if opts.path == KernelPath::REFERENCE {
            let r = match opts.activations {
                Activations::F32 => crate::reference::linear::forward(self.view(), xf, opts.adapters),
                Activations::Int8 => crate::reference::act8::forward(self.view(), xf, opts.adapters),
            };
            O::narrow_slice(&r, y);
            return check_output(y);
        }
        // The CPU forward checks each block of `y` on the thread that wrote it (a pass here would read the
        // other threads' blocks from their caches); `check_output` then only finds the index.
        if crate::cpu::linear::forward_into(self.view(), xf, m, opts, scratch, y) {
            Ok(())
        } else {
            check_output(y)
        }
    }

    /// Convenience wrapper of [`forward_into`](Self::forward_into): returns a new `y: [M, out]` in f32.
    /// Errors as `forward_into`, and (before allocating) when `y` would be larger than
    /// [`MAX_FORWARD_OUTPUT_BYTES`] or cannot be allocated.
    pub fn forward<T: Element>(&self, x: &[T]) -> Result<Vec<f32>> {
        self.forward_with(x, ForwardOptions::default())
    }

    /// Convenience wrapper of [`forward_into_with`](Self::forward_into_with): returns a new `y: [M, out]`.
    /// Errors as [`forward`](Self::forward).
    pub fn forward_with<T: Element>(&self, x: &[T], opts: ForwardOptions<'_>) -> Result<Vec<f32>> {
        // `forward_into_with` validates `x` (and the selection) before it looks at `y`, so a bad `x` is
        // reported as such; `x` is scanned once. The size is checked before `y` is allocated.
        let mut y = finite::alloc_output(x.len() / self.in_features, self.out_features)?;
        self.forward_into_with(x, &mut y, &mut Workspace::default(), opts)?;
        Ok(y)
    }

    /// Validates `x` and the selection and returns `M`.
    fn check_input<T: Element>(&self, x: &[T], sel: AdapterSelection<'_>) -> Result<usize> {
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

    /// Per-element bound on `|y − y_ref|` for a forward of `x` under `opts.adapters` on `target`'s kernels,
    /// where `y_ref` is the exact (f64) result: the stated f32 accumulation bound
    /// `(K+3)·ε·Σ|x·w| + ε·|bias| + Σ_adapters (K+r+3)·ε·|s|·Σ_r(Σ_k|x·A|)·|B|`, plus for the GPU kernels the
    /// double-quant FMA and late-bias terms, plus the f16 product term for the f16 GEMM (derivation in
    /// `docs/formats.md` §8). Tests, the CLI, the web page and the benches compare against it through
    /// [`Agreement`]. `opts.path` is ignored (every CPU path is within the same bound). With
    /// [`Activations::Int8`] the bound adds the quantization of `x` and of the 4-bit table and the int8
    /// kernels' rounding (`docs/formats.md` §12; CPU kernels only: `target` must be [`BoundTarget::Cpu`]).
    pub fn error_bound<T: Element>(&self, x: &[T], opts: ForwardOptions<'_>, target: BoundTarget) -> Result<Vec<f64>> {
        self.check_input(x, opts.adapters)?;
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        match opts.activations {
            Activations::F32 => {
                Ok(crate::reference::linear::error_bound(self.view(), &xf, opts.adapters, target.terms()))
            }
            Activations::Int8 if target == BoundTarget::Cpu => {
                Ok(crate::reference::act8::error_bound(self.view(), &xf, opts.adapters))
            }
            Activations::Int8 => Err(Error::invalid(
                "error bound target",
                format!("{target:?} with int8 activations"),
                "BoundTarget::Cpu (int8 activations run on the CPU kernels only)",
            )),
        }
    }
}
