//! One table of kernel functions per instruction set, built once after detection (as ggml's
//! `type_traits_cpu`): the drivers look the table up by [`Isa`] and call through it, so no call site matches
//! on the instruction set, and adding one means adding one table.
//!
//! The x86 tables can only be built with a detection token ([`super::x86_features`]), so a `#[target_feature]`
//! kernel is unreachable before its instruction set was detected.

use super::table::Kernels;
use super::Isa;
use std::sync::OnceLock;

/// The table for `isa`. Callers pass only levels [`Isa::is_available`] reported (every public entry checks
/// its `KernelPath` first); an unavailable level falls back to the portable table, never to its kernels.
pub(crate) fn kernels(isa: Isa) -> &'static Kernels {
    static SCALAR: OnceLock<Kernels> = OnceLock::new();
    static PORTABLE: OnceLock<Kernels> = OnceLock::new();
    let portable = || PORTABLE.get_or_init(portable_kernels);
    match isa {
        Isa::Scalar => SCALAR.get_or_init(scalar_kernels),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            static AVX2: OnceLock<Option<Kernels>> = OnceLock::new();
            AVX2.get_or_init(|| super::x86_features::Avx2::detect().map(avx2_kernels)).as_ref().unwrap_or_else(portable)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            static AVX512: OnceLock<Option<Kernels>> = OnceLock::new();
            AVX512
                .get_or_init(|| super::x86_features::Avx512::detect().map(avx512_kernels))
                .as_ref()
                .unwrap_or_else(portable)
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            static NEON: OnceLock<Kernels> = OnceLock::new();
            NEON.get_or_init(neon_kernels)
        }
        _ => portable(),
    }
}

/// The portable kernels with the NEON 4-bit dequantize and linear kernels (NEON is in the aarch64 baseline: no
/// token).
#[cfg(target_arch = "aarch64")]
fn neon_kernels() -> Kernels {
    Kernels { four_bit: super::nf4_neon::NEON, linear: super::linear_neon::NEON, ..portable_kernels() }
}

fn scalar_kernels() -> Kernels {
    Kernels {
        affine: super::affine_portable::SCALAR,
        four_bit: super::nf4_portable::SCALAR,
        // The linear kernels have no scalar version of their own: the reference is the scalar path.
        linear: super::linear_kernels::PORTABLE,
        ggml: super::ggml_portable::SCALAR,
    }
}

fn portable_kernels() -> Kernels {
    Kernels {
        affine: super::affine_portable::PORTABLE,
        four_bit: super::nf4_portable::PORTABLE,
        // A wasm32 build with simd128 adds its register 4-bit GEMV to the portable kernels.
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        linear: super::linear_wasm::SIMD128,
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        linear: super::linear_kernels::PORTABLE,
        ggml: super::ggml_portable::PORTABLE,
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernels(t: super::x86_features::Avx2) -> Kernels {
    Kernels {
        affine: super::affine_x86::avx2(t),
        four_bit: super::nf4_x86::avx2(t),
        linear: super::linear_act8_avx2::avx2(t, super::x86_features::AvxVnni::detect(), super::linear_x86::avx2(t)),
        ggml: super::ggml_x86::avx2(t),
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_kernels(t: super::x86_features::Avx512) -> Kernels {
    Kernels {
        affine: super::affine_x86::avx512(t),
        four_bit: super::nf4_x86::avx512(t),
        linear: match super::x86_features::Avx512Vnni::detect() {
            Some(v) => super::linear_act8_x86::vnni(v, super::linear_x86::avx512(t)),
            // Without VNNI the AVX2 int8-activation kernel (AVX-512 implies AVX2).
            None => match super::x86_features::Avx2::detect() {
                Some(a) => super::linear_act8_avx2::avx2(
                    a,
                    super::x86_features::AvxVnni::detect(),
                    super::linear_x86::avx512(t),
                ),
                None => super::linear_x86::avx512(t),
            },
        },
        ggml: super::ggml_x86::avx512(t),
    }
}
