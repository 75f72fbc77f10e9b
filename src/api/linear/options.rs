//! What a forward call takes besides `x` and `y`: the options value and the reusable scratch.

use crate::cpu::linear::Scratch;
use crate::cpu::KernelPath;
use crate::element::{DType, Element};
use crate::format::layer::AdapterSelection;

/// What the base product multiplies: `x` as given (f32, exact up to f32 accumulation: the default), or `x`
/// quantized per row to symmetric int8 in blocks of 32 with integer dot products (faster, approximate; the
/// arithmetic and its error bound are in `docs/formats.md` §12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Activations {
    /// `x` in f32: the fused kernels agree with the f64 reference within f32 accumulation rounding.
    #[default]
    F32,
    /// `x` quantized per row to int8 (blocks of 32, one f32 scale each), 4-bit table values mapped to int8
    /// (`round(127·T[i])`), products as i8×i8→i32 (AVX-512 VNNI where the CPU has it), one f32 scale multiply
    /// per block. The LoRA terms and the bias stay f32.
    Int8,
}

impl Activations {
    /// `f32` or `int8` (the CLI's spelling).
    pub const fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
        }
    }
}

/// How a forward runs: the kernel path, which adapters apply to which rows, and the activation mode. One value
/// replaces the old `forward_batch` / `*_with` / `*_reference` variants.
///
/// ```
/// use lowbit::cpu::KernelPath;
/// use lowbit::linear::ForwardOptions;
/// let ids = [Some(0), None];
/// let opts = ForwardOptions::default().adapter_ids(&ids).path(KernelPath::REFERENCE);
/// # let _ = opts;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOptions<'a> {
    /// Instruction set and threading ([`KernelPath::best`] by default; [`KernelPath::REFERENCE`] runs the
    /// f64-accumulated reference, the oracle other paths are checked against).
    pub path: KernelPath,
    /// Which adapters apply ([`AdapterSelection::Enabled`] by default).
    pub adapters: AdapterSelection<'a>,
    /// f32 activations (default, exact) or int8 activations ([`Activations::Int8`], approximate and faster).
    pub activations: Activations,
}

impl Default for ForwardOptions<'_> {
    fn default() -> Self {
        ForwardOptions { path: KernelPath::best(), adapters: AdapterSelection::Enabled, activations: Activations::F32 }
    }
}

impl<'a> ForwardOptions<'a> {
    /// The reference forward (f64 accumulation, every enabled adapter, f32 activations).
    pub fn reference() -> Self {
        ForwardOptions { path: KernelPath::REFERENCE, ..Self::default() }
    }
    /// These options through `path`.
    pub fn path(self, path: KernelPath) -> Self {
        ForwardOptions { path, ..self }
    }
    /// These options with `activations` (with [`KernelPath::REFERENCE`] and [`Activations::Int8`] the reference
    /// computes the int8 products exactly in f64: the value the int8 kernels round).
    pub fn activations(self, activations: Activations) -> Self {
        ForwardOptions { activations, ..self }
    }
    /// These options as a multi-adapter batch: row `m` adds only adapter `ids[m]` (or none).
    pub fn adapter_ids(self, ids: &'a [Option<usize>]) -> ForwardOptions<'a> {
        ForwardOptions { adapters: AdapterSelection::PerRow(ids), ..self }
    }
}

/// Every scratch buffer a [`QuantLinear::forward_into`](super::QuantLinear::forward_into) call needs, owned by
/// the caller and reused across calls (and layers): after the first call with a given shape, a forward
/// allocates nothing proportional to M. It grows to the largest call's `[M, out]` f32 accumulators plus one
/// copy of `x` in the layout the kernels read (f32 at M ≥ 5 on AVX-512, int8 codes with int8 activations).
/// Not shared between threads at once (it is `&mut`); keep one per thread that runs forwards.
#[derive(Debug, Default)]
pub struct Workspace {
    /// `x` widened to f32 (unused when `x` already is f32).
    x: Vec<f32>,
    cpu: Scratch,
    backward: crate::cpu::linear_backward::BackwardScratch,
}

impl Workspace {
    /// The backward's scratch.
    pub(crate) fn backward(&mut self) -> &mut crate::cpu::linear_backward::BackwardScratch {
        &mut self.backward
    }

    /// `x` as f32 (borrowed when it is f32, else widened into this workspace) and the kernel scratch.
    pub(crate) fn split<'a, T: Element>(&'a mut self, x: &'a [T]) -> (&'a [f32], &'a mut Scratch) {
        if T::DTYPE == DType::F32 {
            return (bytemuck::cast_slice(x), &mut self.cpu);
        }
        self.x.clear();
        self.x.resize(x.len(), 0.0);
        T::widen_slice(x, &mut self.x);
        (&self.x, &mut self.cpu)
    }
}
