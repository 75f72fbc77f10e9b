//! Fast CPU kernels and the choice of instruction set.
//!
//! Every kernel exists once in portable form (plain Rust or `wide`: `affine_portable.rs`, `nf4_portable.rs`,
//! `linear_kernels.rs`) and optionally once per instruction set in a sibling file with the same names
//! (`affine_x86.rs`, `nf4_x86.rs`, `linear_x86.rs`). Each instruction set has one table of kernel functions
//! (shapes in `table.rs`, built once after run-time detection in `dispatch.rs`; `x86_features.rs` holds the
//! feature lists and the detection tokens): a default build (no `-C target-cpu`) uses AVX2 or AVX-512 on a CPU
//! that has them, and adding an instruction set means adding one table. The drivers (`affine.rs`, `nf4.rs`,
//! `linear.rs`) split the work over rows, blocks and threads and call through the table; imports only go
//! drivers → dispatch → kernels → table.
//!
//! Every path gives the same codes and the same dequantized bits as [`crate::reference`].

// Kernels (leaves): portable and per-ISA files with the same names, filling the tables of `table.rs`.
pub(crate) mod affine_portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod affine_x86;
pub(crate) mod ggml_portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod ggml_x86;
pub(crate) mod linear_act8;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_coded_scales_x86;
pub(crate) mod linear_act8_interleaved;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_interleaved_256;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_interleaved_x86;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_quantize_x86;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) mod linear_act8_wasm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_act8_x86;
pub(crate) mod linear_backward_kernels;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_gemm_x86;
pub(crate) mod linear_kernels;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) mod linear_wasm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_x86;
pub(crate) mod nf4_portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod nf4_x86;
pub(crate) mod table;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_features;
// One table per instruction set, built once after detection.
pub(crate) mod dispatch;
// Drivers (what the API calls): split work over rows / blocks / threads and call through the tables.
pub(crate) mod affine;
pub(crate) mod ggml;
pub(crate) mod linear;
#[cfg(target_arch = "aarch64")]
pub(crate) mod linear_act8_neon;
pub(crate) mod linear_backward;
#[cfg(target_arch = "aarch64")]
pub(crate) mod linear_neon;
pub(crate) mod linear_shrink;
pub(crate) mod nf4;
mod pool_linger;
mod pool_split;
pub use pool_linger::{set_thread_linger, thread_linger};
pub use pool_split::join;
#[cfg(target_arch = "aarch64")]
pub(crate) mod nf4_neon;

/// An instruction-set level for CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Plain scalar Rust (the reference loops); always available.
    Scalar,
    /// Portable SIMD through `wide`: SSE2 on x86_64, NEON on aarch64, simd128 on wasm32 when built with
    /// `-C target-feature=+simd128` (the same kernels, compiled for the target; not listed separately).
    Portable,
    /// aarch64 Advanced SIMD (NEON, part of the aarch64 baseline): hand-written NEON kernels where they exist
    /// (the 4-bit GEMV), the portable ones elsewhere.
    Neon,
    /// x86_64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
    /// x86_64 AVX-512 F/BW/VL/DQ, detected at run time.
    Avx512,
}

impl Isa {
    /// Short lowercase name, as printed by the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU (and this build) can run kernels of this level (detected once, then cached).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86_features::Avx2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86_features::Avx512::detect().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU can run, lowest first (always starts with `Scalar`, `Portable`). Only levels
    /// with kernels of their own are listed, so no kernel is timed or labelled twice.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Portable, Isa::Neon, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    /// The fastest available level (cached after the first call).
    pub fn best() -> Isa {
        use std::sync::OnceLock;
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().unwrap_or(&Isa::Portable))
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a kernel runs: which instruction set, and whether it splits work over the `rayon` pool.
///
/// Results never depend on the path: only speed does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelPath {
    /// Instruction-set level; an unavailable level is an error when the kernel runs.
    pub isa: Isa,
    /// Split work over rayon's global pool (needs the `rayon` feature; ignored without it).
    pub parallel: bool,
}

impl KernelPath {
    /// The scalar reference, single-threaded.
    pub const REFERENCE: KernelPath = KernelPath { isa: Isa::Scalar, parallel: false };

    /// The fastest path: best instruction set, threaded when the `rayon` feature is on.
    pub fn best() -> KernelPath {
        KernelPath { isa: Isa::best(), parallel: cfg!(feature = "rayon") }
    }

    /// Single-threaded at the given level.
    pub const fn single(isa: Isa) -> KernelPath {
        KernelPath { isa, parallel: false }
    }

    /// Every path this machine can run: each available level, single-threaded, then threaded (with `rayon`).
    pub fn all_available() -> Vec<KernelPath> {
        let mut paths: Vec<KernelPath> = Isa::available().into_iter().map(KernelPath::single).collect();
        if cfg!(feature = "rayon") {
            paths.extend(Isa::available().into_iter().skip(1).map(|isa| KernelPath { isa, parallel: true }));
        }
        paths
    }

    /// Errors if this CPU cannot run `self.isa`.
    pub fn check(self) -> crate::Result<()> {
        if self.isa.is_available() {
            Ok(())
        } else {
            Err(crate::Error::Unsupported {
                what: format!("instruction set {} is not available on this CPU", self.isa),
            })
        }
    }

    /// A name such as `avx2` or `avx2+threads`.
    pub fn name(self) -> String {
        if self.parallel {
            format!("{}+threads", self.isa)
        } else {
            self.isa.name().to_string()
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Work items smaller than this many elements are not worth handing to another thread.
pub(crate) const PARALLEL_MIN_ELEMS: usize = 1 << 15;
