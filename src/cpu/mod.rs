//! Fast CPU kernels and the choice of instruction set.
//!
//! Every kernel exists once in portable form (plain Rust or `wide`) and optionally once per instruction set,
//! with the same name in a sibling file (`x86.rs`, ...). Dispatch is at run time: a default build (no
//! `-C target-cpu`) uses AVX2 or AVX-512 on a CPU that has them. An [`Isa`] a kernel has no special version for
//! falls back to the next lower one, so adding an instruction set never touches the callers.
//!
//! Every path gives the same codes and the same dequantized bits as [`crate::reference`].

pub(crate) mod affine;
#[cfg(target_arch = "x86_64")]
pub(crate) mod affine_x86;
pub(crate) mod linear;
#[cfg(target_arch = "x86_64")]
pub(crate) mod linear_x86;
pub(crate) mod nf4;
#[cfg(target_arch = "x86_64")]
pub(crate) mod nf4_x86;

/// An instruction-set level for CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Plain scalar Rust (the reference loops); always available.
    Scalar,
    /// Portable SIMD through `wide` (SSE2 on x86_64, NEON on aarch64, simd128 on wasm when enabled).
    Portable,
    /// x86_64 SSSE3 (byte shuffles), detected at run time.
    Ssse3,
    /// x86_64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
    /// x86_64 AVX-512 F/BW/VL/DQ, detected at run time.
    Avx512,
    /// aarch64 NEON (always present on aarch64).
    Neon,
    /// wasm32 simd128 (chosen at compile time with `-C target-feature=+simd128`).
    Simd128,
}

impl Isa {
    /// Short lowercase name, as printed by the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Ssse3 => "ssse3",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::Simd128 => "simd128",
        }
    }

    /// Whether this CPU (and this build) can run kernels of this level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Ssse3 => std::arch::is_x86_feature_detected!("ssse3"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU can run, lowest first (always starts with `Scalar`, `Portable`).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Portable, Isa::Ssse3, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::Simd128]
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
