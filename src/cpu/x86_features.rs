//! The x86 instruction-set levels lowbit has kernels for: the `target_feature` list of each in one place (the
//! `avx2_fn!` / `avx512_fn!` macros put it on every kernel), and a detection token per level that only
//! [`Avx2::detect`] / [`Avx512::detect`] can make. Kernel tables ([`super::dispatch`]) are built from a token,
//! so no `#[target_feature]` function can be reached before detection.

/// Proof that this CPU has AVX2, FMA and F16C (`avx2_fn!`'s feature list).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

/// Proof that this CPU has AVX-512 F/BW/VL/DQ plus AVX2, FMA and F16C (`avx512_fn!`'s feature list).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

/// Proof that this CPU has AVX-512 VNNI on top of [`Avx512`]'s features (`avx512vnni_fn!`'s feature list).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Vnni(());

/// Proof that this CPU has AVX-512 VBMI (byte permutes) on top of [`Avx512`]'s features (`avx512vbmi_fn!`'s
/// feature list).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Vbmi(());

/// Proof that this CPU has AVX-VNNI (the VEX-encoded 256-bit `vpdpbusd`) on top of [`Avx2`]'s features
/// (`avxvnni_fn!`'s feature list).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AvxVnni(());

impl AvxVnni {
    /// The token, if the CPU has every feature of `avxvnni_fn!`.
    pub fn detect() -> Option<AvxVnni> {
        (Avx2::detect().is_some() && std::arch::is_x86_feature_detected!("avxvnni")).then_some(AvxVnni(()))
    }
}

impl Avx2 {
    /// The token, if the CPU has every feature of `avx2_fn!`.
    pub fn detect() -> Option<Avx2> {
        (std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        .then_some(Avx2(()))
    }
}

impl Avx512 {
    /// The token, if the CPU has every feature of `avx512_fn!`.
    pub fn detect() -> Option<Avx512> {
        (Avx2::detect().is_some()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq"))
        .then_some(Avx512(()))
    }
}

impl Avx512Vbmi {
    /// The token, if the CPU has every feature of `avx512vbmi_fn!`.
    pub fn detect() -> Option<Avx512Vbmi> {
        (Avx512::detect().is_some() && std::arch::is_x86_feature_detected!("avx512vbmi")).then_some(Avx512Vbmi(()))
    }
}

impl Avx512Vnni {
    /// The token, if the CPU has every feature of `avx512vnni_fn!`.
    pub fn detect() -> Option<Avx512Vnni> {
        (Avx512::detect().is_some() && std::arch::is_x86_feature_detected!("avx512vnni")).then_some(Avx512Vnni(()))
    }
}

/// Compiles the wrapped functions for AVX2 + FMA + F16C (the one place this list is written).
macro_rules! avx2_fn {
    ($($item:item)*) => { $( #[target_feature(enable = "avx2,fma,f16c")] $item )* };
}
pub(crate) use avx2_fn;

/// Compiles the wrapped functions for AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C) (the one place this list is written).
macro_rules! avx512_fn {
    ($($item:item)*) => { $( #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")] $item )* };
}
pub(crate) use avx512_fn;

/// Compiles the wrapped functions for AVX-512 F/BW/VL/DQ + VNNI (+ AVX2, FMA, F16C).
macro_rules! avx512vnni_fn {
    ($($item:item)*) => {
        $( #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")] $item )*
    };
}
pub(crate) use avx512vnni_fn;

/// Compiles the wrapped functions for AVX-512 F/BW/VL/DQ + VBMI (+ AVX2, FMA, F16C).
macro_rules! avx512vbmi_fn {
    ($($item:item)*) => {
        $( #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c")] $item )*
    };
}
pub(crate) use avx512vbmi_fn;

/// Compiles the wrapped functions for AVX-VNNI (+ AVX2, FMA, F16C).
macro_rules! avxvnni_fn {
    ($($item:item)*) => { $( #[target_feature(enable = "avx2,fma,f16c,avxvnni")] $item )* };
}
pub(crate) use avxvnni_fn;
