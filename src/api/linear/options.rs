//! What a forward call takes besides `x` and `y`: the options value and the reusable scratch.

use crate::cpu::linear::Scratch;
use crate::cpu::KernelPath;
use crate::element::{DType, Element};
use crate::format::layer::AdapterSelection;

/// How a forward runs: the kernel path and which adapters apply to which rows. One value replaces the old
/// `forward_batch` / `*_with` / `*_reference` variants.
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
}

impl Default for ForwardOptions<'_> {
    fn default() -> Self {
        ForwardOptions { path: KernelPath::best(), adapters: AdapterSelection::Enabled }
    }
}

impl<'a> ForwardOptions<'a> {
    /// The reference forward (f64 accumulation, every enabled adapter).
    pub fn reference() -> Self {
        ForwardOptions { path: KernelPath::REFERENCE, adapters: AdapterSelection::Enabled }
    }
    /// These options through `path`.
    pub fn path(self, path: KernelPath) -> Self {
        ForwardOptions { path, ..self }
    }
    /// These options as a multi-adapter batch: row `m` adds only adapter `ids[m]` (or none).
    pub fn adapter_ids(self, ids: &'a [Option<usize>]) -> ForwardOptions<'a> {
        ForwardOptions { adapters: AdapterSelection::PerRow(ids), ..self }
    }
}

/// Every scratch buffer a [`QuantLinear::forward_into`](super::QuantLinear::forward_into) call needs, owned by
/// the caller and reused across calls (and layers): after the first call with a given shape, a forward
/// allocates nothing proportional to M. Not shared between threads at once (it is `&mut`); keep one per
/// thread that runs forwards.
#[derive(Debug, Default)]
pub struct Workspace {
    /// `x` widened to f32 (unused when `x` already is f32).
    x: Vec<f32>,
    cpu: Scratch,
}

impl Workspace {
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
