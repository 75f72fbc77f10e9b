//! WGSL sources and the tiny preprocessor that specialises them per kernel variant.
//!
//! The `.wgsl` files in `shaders/` are embedded with `include_str!`. The preprocessor understands only
//! `#include "file"` (one of the embedded files), `#if NAME` / `#if !NAME`, `#else` and `#endif` (nestable),
//! each on its own line; a set of defined names selects the branches. Every variant starts with
//! `enable f16;` (f16 variants only; naga 30 accepts subgroup builtins without an `enable`) and the prelude
//! generated from the Rust definitions in [`super::layout`]: the constants (`WG`, `MAXM`, `RED_LEN`,
//! `GEMM_*`), the uniform structs `Chunk` and `Call`, and the bindings. No size or layout is written twice.

use super::layout::{self, BindingSet};
use crate::format::affine::Granularity;
use crate::{Error, Scheme};

/// Embedded shader files, by the name used in `#include`.
const FILES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../shaders/common.wgsl")),
    ("gemv.wgsl", include_str!("../../shaders/gemv.wgsl")),
    ("gemm.wgsl", include_str!("../../shaders/gemm.wgsl")),
    ("shrink.wgsl", include_str!("../../shaders/shrink.wgsl")),
    ("backward_dx.wgsl", include_str!("../../shaders/backward_dx.wgsl")),
    ("lora_grads.wgsl", include_str!("../../shaders/lora_grads.wgsl")),
];

/// Which compute program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelOp {
    /// LoRA shrink `t = x·Aᵀ` (independent of the weight format).
    Shrink,
    /// Decode-shaped matrix–vector product (any M, batches of 8 rows).
    Gemv,
    /// Tiled matrix–matrix product.
    Gemm,
    /// Backward: `dx = dy·W (+ Σ s·u·A)`, decoding `W` in the kernel (one variant per scheme family).
    BackwardDx,
    /// Backward: the LoRA shrink `t = x·Aᵀ` (`shrink.wgsl` under the backward's LoRA bindings).
    BackwardShrink,
    /// Backward: `u = dy·B`.
    BackwardU,
    /// Backward: `dA += s·uᵀ·x` for one adapter.
    BackwardDa,
    /// Backward: `dB += s·dyᵀ·t` for one adapter.
    BackwardDb,
}

impl KernelOp {
    /// Whether the program decodes the weight (its key depends on the scheme family).
    fn decodes_weight(self) -> bool {
        matches!(self, KernelOp::Gemv | KernelOp::Gemm | KernelOp::BackwardDx)
    }

    /// The bind group layout the program is compiled against.
    pub(crate) fn binding_set(self) -> BindingSet {
        match self {
            KernelOp::Shrink | KernelOp::Gemv | KernelOp::Gemm => BindingSet::Forward,
            KernelOp::BackwardDx => BindingSet::BackwardDx,
            KernelOp::BackwardShrink | KernelOp::BackwardU | KernelOp::BackwardDa | KernelOp::BackwardDb => {
                BindingSet::BackwardLora
            }
        }
    }
}

/// A kernel variant: the program, the weight's [`Scheme`] and the optional features it uses.
///
/// Two keys are equal (and hash alike) when they select the same compiled kernel: the 4-bit format (NF4 or
/// FP4), the block size and the int8 group size are data (constants and uniforms), not code, so `nf4:64` and
/// `fp4:128` share one pipeline while plain and double-quantized scales do not. [`KernelKey::name`] names the
/// kernel, e.g. `gemv-4bit-dq-subgroup`.
#[derive(Clone, Copy, Debug)]
pub struct KernelKey {
    /// Program.
    pub op: KernelOp,
    /// The weight's scheme (ignored by the kernels that do not decode the weight: the shrinks and the
    /// backward's LoRA kernels).
    pub scheme: Scheme,
    /// Reduce with subgroup operations (GEMV only; needs `Features::SUBGROUP`).
    pub subgroups: bool,
    /// f16 workgroup tiles and products (GEMM only; needs `Features::SHADER_F16`).
    pub f16: bool,
}

impl PartialEq for KernelKey {
    fn eq(&self, other: &Self) -> bool {
        self.variant() == other.variant()
    }
}

impl Eq for KernelKey {}

impl std::hash::Hash for KernelKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.variant().hash(state)
    }
}

impl KernelKey {
    /// The LoRA shrink kernel (the one variant of [`KernelOp::Shrink`]).
    pub const SHRINK: KernelKey = Self::lora(KernelOp::Shrink);

    /// One scheme of each kernel family: 4-bit plain, 4-bit double-quantized, int8 per tensor / channel /
    /// group.
    pub const SCHEME_FAMILIES: [Scheme; 5] = [
        Scheme::nf4(64, false),
        Scheme::nf4(64, true),
        Scheme::Int8(Granularity::PerTensor),
        Scheme::Int8(Granularity::PerChannel),
        Scheme::Int8(Granularity::PerGroup(64)),
    ];

    /// A weight-independent kernel (`op` other than GEMV, GEMM and the backward `dx`).
    const fn lora(op: KernelOp) -> KernelKey {
        KernelKey { op, scheme: Scheme::nf4(64, false), subgroups: false, f16: false }
    }

    /// The backward kernels of a layer with scheme `scheme`: `dx` (per scheme family), then the LoRA shrink,
    /// `u = dy·B`, `dA` and `dB`.
    pub fn backward(scheme: Scheme) -> [KernelKey; 5] {
        [
            KernelKey { op: KernelOp::BackwardDx, scheme, subgroups: false, f16: false },
            Self::lora(KernelOp::BackwardShrink),
            Self::lora(KernelOp::BackwardU),
            Self::lora(KernelOp::BackwardDa),
            Self::lora(KernelOp::BackwardDb),
        ]
    }

    /// Every backward variant: `dx` of each scheme family and the four LoRA kernels (9 in all).
    pub fn all_backward() -> Vec<KernelKey> {
        let mut v: Vec<KernelKey> = Self::SCHEME_FAMILIES
            .iter()
            .map(|&scheme| KernelKey { op: KernelOp::BackwardDx, scheme, subgroups: false, f16: false })
            .collect();
        v.extend_from_slice(&Self::backward(Self::SCHEME_FAMILIES[0])[1..]);
        v
    }

    /// Every forward variant lowbit can request: the shrink kernel, GEMV of each scheme family with and
    /// without subgroups, GEMM of each family with f32 and f16 tiles (21 in all). The backward's are
    /// [`all_backward`](Self::all_backward).
    pub fn all() -> Vec<KernelKey> {
        let mut v = vec![Self::SHRINK];
        for scheme in Self::SCHEME_FAMILIES {
            for flag in [false, true] {
                v.push(KernelKey { op: KernelOp::Gemv, scheme, subgroups: flag, f16: false });
                v.push(KernelKey { op: KernelOp::Gemm, scheme, subgroups: false, f16: flag });
            }
        }
        v
    }

    /// The weight part of the kernel: its name and the preprocessor names it defines.
    fn family(&self) -> (&'static str, &'static [&'static str]) {
        match self.scheme {
            _ if !self.op.decodes_weight() => ("", &[]),
            Scheme::FourBit { double_quant: false, .. } => ("4bit", &["FOURBIT"]),
            Scheme::FourBit { double_quant: true, .. } => ("4bit-dq", &["FOURBIT", "DQ"]),
            Scheme::Int8(Granularity::PerTensor) => ("int8-tensor", &["GRAN_TENSOR"]),
            Scheme::Int8(Granularity::PerChannel) => ("int8-channel", &["GRAN_CHANNEL"]),
            Scheme::Int8(Granularity::PerGroup(_)) => ("int8-group", &["GRAN_GROUP"]),
        }
    }

    /// What makes two keys the same kernel.
    fn variant(&self) -> (KernelOp, &'static str, bool, bool) {
        (self.op, self.family().0, self.subgroups, self.f16)
    }

    /// The optional device features this variant needs (`SUBGROUP`, `SHADER_F16` or none).
    pub fn required_features(&self) -> wgpu::Features {
        let mut f = wgpu::Features::empty();
        if self.subgroups {
            f |= wgpu::Features::SUBGROUP;
        }
        if self.f16 {
            f |= wgpu::Features::SHADER_F16;
        }
        f
    }

    /// A short stable name, e.g. `gemv-4bit-dq-subgroup` or `gemm-int8-group-f16`.
    pub fn name(&self) -> String {
        let op = match self.op {
            KernelOp::Shrink => return "lora-shrink".into(),
            KernelOp::BackwardShrink => return "backward-lora-shrink".into(),
            KernelOp::BackwardU => return "backward-lora-u".into(),
            KernelOp::BackwardDa => return "backward-lora-da".into(),
            KernelOp::BackwardDb => return "backward-lora-db".into(),
            KernelOp::Gemv => "gemv",
            KernelOp::Gemm => "gemm",
            KernelOp::BackwardDx => "backward-dx",
        };
        let mut s = format!("{op}-{}", self.family().0);
        if self.subgroups {
            s.push_str("-subgroup");
        }
        if self.f16 {
            s.push_str("-f16");
        }
        s
    }

    /// The complete WGSL source of this variant: enables, the generated prelude (constants, uniform structs,
    /// bindings), then the preprocessed kernel file. Errors ([`Error::Gpu`]) only on a malformed embedded
    /// shader, i.e. a bug in lowbit.
    pub fn source(&self) -> Result<String, Error> {
        let mut defs: Vec<&str> = self.family().1.to_vec();
        if self.subgroups {
            defs.push("SUBGROUPS");
        }
        if self.f16 {
            defs.push("F16");
        }
        let file = match self.op {
            KernelOp::Shrink | KernelOp::BackwardShrink => "shrink.wgsl",
            KernelOp::Gemv => "gemv.wgsl",
            KernelOp::Gemm => "gemm.wgsl",
            KernelOp::BackwardDx => "backward_dx.wgsl",
            KernelOp::BackwardU | KernelOp::BackwardDa | KernelOp::BackwardDb => "lora_grads.wgsl",
        };
        match self.op {
            KernelOp::BackwardU => defs.push("GRAD_U"),
            KernelOp::BackwardDa => defs.push("GRAD_DA"),
            KernelOp::BackwardDb => defs.push("GRAD_DB"),
            _ => {}
        }
        let mut out = String::new();
        if self.f16 {
            out.push_str("enable f16;\n");
        }
        out.push_str(&layout::wgsl_prelude(self.op.binding_set()));
        preprocess(file, &defs, &mut out, 0)?;
        Ok(out)
    }
}

fn file(name: &str) -> Result<&'static str, Error> {
    FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::gpu(format!("preprocess shader {name}"), format!("no embedded shader file {name:?}")))
}

/// Expands `#include` and `#if`/`#else`/`#endif` of `name` into `out`.
pub(crate) fn preprocess(name: &str, defs: &[&str], out: &mut String, depth: usize) -> Result<(), Error> {
    let err = |detail: String| Error::gpu(format!("preprocess shader {name}"), detail);
    if depth > 8 {
        return Err(err("#include nested too deeply".into()));
    }
    // Stack of (this branch active, some branch of this #if taken, parent active).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.iter().all(|&(a, _)| a);
    for (ln, line) in file(name)?.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("#if ") {
            let rest = rest.trim();
            let (neg, sym) = match rest.strip_prefix('!') {
                Some(s) => (true, s.trim()),
                None => (false, rest),
            };
            let cond = defs.contains(&sym) != neg;
            stack.push((cond, cond));
        } else if trimmed.starts_with("#else") {
            let top = stack.last_mut().ok_or_else(|| err(format!("line {}: #else without #if", ln + 1)))?;
            *top = (!top.1, true);
        } else if trimmed.starts_with("#endif") {
            stack.pop().ok_or_else(|| err(format!("line {}: #endif without #if", ln + 1)))?;
        } else if let Some(rest) = trimmed.strip_prefix("#include ") {
            if active(&stack) {
                let inc = rest.trim().trim_matches('"');
                preprocess(inc, defs, out, depth + 1)?;
            }
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err("unterminated #if".into()));
    }
    Ok(())
}
