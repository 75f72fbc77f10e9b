//! The stated error bound of the f32 kernels, once, for the CPU and GPU paths, and the comparison every test,
//! the CLI, the web page and the benches use.

use crate::reference::linear::GpuTerms;

/// Which kernels' rounding an [error bound](super::QuantLinear::error_bound) covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BoundTarget {
    /// Every CPU path (scalar, portable SIMD, AVX2, AVX-512, threaded): f32 accumulation only.
    #[default]
    Cpu,
    /// The GPU f32 kernels: the CPU bound plus the late bias and the double-quant FMA terms.
    Gpu,
    /// The GPU GEMM with f16 tiles: the GPU bound plus the f16 product term.
    GpuF16,
}

impl BoundTarget {
    pub(crate) fn terms(self) -> GpuTerms {
        match self {
            BoundTarget::Cpu => GpuTerms { gpu: false, f16: false },
            BoundTarget::Gpu => GpuTerms { gpu: true, f16: false },
            BoundTarget::GpuF16 => GpuTerms { gpu: true, f16: true },
        }
    }

    /// Largest normalised squared error `Σ(y − y_ref)² / Σy_ref²` accepted on top of the per-element bound:
    /// 1e-10 for f32 kernels (a typical f32 result is ~1e-14; a wrong kernel is ~1e-2), 1e-5 for f16 tiles.
    pub fn nse_limit(self) -> f64 {
        match self {
            BoundTarget::GpuF16 => 1e-5,
            _ => 1e-10,
        }
    }
}

/// How a result compares with the reference under a per-element bound.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    /// Number of elements compared.
    pub len: usize,
    /// Largest `|got − want|`.
    pub max_abs_err: f64,
    /// Largest `|got − want| / allowed` (≤ 1 inside the bound).
    pub worst_ratio: f64,
    /// Elements outside the bound (NaN counts as outside).
    pub outside: usize,
    /// `Σ(got − want)² / Σwant²` (or `Σ(got − want)²` when `want` is all zero).
    pub nse: f64,
}

impl Agreement {
    /// Compares `got` with the reference output `want` under `bound` (from
    /// [`QuantLinear::error_bound`](super::QuantLinear::error_bound)). The allowance per element is
    /// `bound + ε/2·|want|`: the reference itself is rounded to f32 once. Lengths must match; a length
    /// mismatch counts every missing element as outside.
    pub fn compare(got: &[f32], want: &[f32], bound: &[f64]) -> Agreement {
        let len = got.len().max(want.len()).max(bound.len());
        let mut a = Agreement { len, ..Agreement::default() };
        let (mut num, mut den) = (0f64, 0f64);
        for ((&g, &w), &b) in got.iter().zip(want).zip(bound) {
            let err = (g as f64 - w as f64).abs();
            let allowed = b + (w as f64).abs() * f32::EPSILON as f64 * 0.5;
            if err.is_nan() || err > allowed {
                a.outside += 1;
            }
            a.max_abs_err = if err.is_nan() { f64::NAN } else { a.max_abs_err.max(err) };
            a.worst_ratio = a.worst_ratio.max(if allowed > 0.0 { err / allowed } else { err });
            num += err * err;
            den += w as f64 * w as f64;
        }
        a.outside += len - got.len().min(want.len()).min(bound.len());
        a.nse = if den > 0.0 { num / den } else { num };
        a
    }

    /// Every element inside its bound and the normalised squared error within `target`'s limit.
    pub fn ok(&self, target: BoundTarget) -> bool {
        self.outside == 0 && self.nse <= target.nse_limit()
    }
}
