//! The floating-point element types lowbit reads and writes: `f32`, [`f16`](struct@half::f16) and [`bf16`].
//!
//! Inputs are widened to f32 exactly; outputs are produced in f32 and then rounded to the target type with
//! round-to-nearest-even (what `half` and PyTorch's `.to(dtype)` do), so every path gives the same bits.

use half::{bf16, f16};

/// Runtime tag for an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name PyTorch uses (`"float32"`, `"float16"`, `"bfloat16"`), as bitsandbytes records it.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parses a PyTorch dtype name, with or without the `torch.` prefix.
    pub fn from_torch_name(name: &str) -> Option<DType> {
        match name.strip_prefix("torch.").unwrap_or(name) {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<DType> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => DType::from_torch_name(other)
                .ok_or_else(|| crate::Error::invalid("dtype", format!("{other:?}"), "one of f32, f16, bf16")),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point element lowbit can quantize from and dequantize to.
///
/// Sealed: implemented for `f32`, [`f16`](struct@half::f16) and [`bf16`] only.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + bytemuck::Pod + sealed::Sealed {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type, to nearest, ties to even.
    fn from_f32(x: f32) -> Self;

    /// Widens a slice into `out` (same length). Uses the hardware conversion where `half` has one.
    fn widen_slice(src: &[Self], out: &mut [f32]) {
        for (o, s) in out.iter_mut().zip(src) {
            *o = s.to_f32();
        }
    }

    /// Rounds a slice of f32 into `out` (same length), to nearest, ties to even.
    fn narrow_slice(src: &[f32], out: &mut [Self]) {
        for (o, s) in out.iter_mut().zip(src) {
            *o = Self::from_f32(*s);
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn widen_slice(src: &[Self], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    fn narrow_slice(src: &[f32], out: &mut [Self]) {
        out.copy_from_slice(src);
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn widen_slice(src: &[Self], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(out);
    }
    fn narrow_slice(src: &[f32], out: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        out.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Returns an error naming `arg` if any element is NaN or infinite.
pub fn check_finite<T: Element>(arg: &str, data: &[T]) -> crate::Result<()> {
    // Chunks checked without an early exit (the fold vectorises; a per-element `position` does not), then
    // the first bad chunk searched for its index.
    const CHUNK: usize = 1024;
    for (c, chunk) in data.chunks(CHUNK).enumerate() {
        if !chunk.iter().fold(true, |ok, v| ok & v.to_f32().is_finite()) {
            let i = chunk.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
            let index = c * CHUNK + i;
            return Err(crate::Error::NonFinite { arg: arg.to_string(), index, value: data[index].to_f32() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_rounds_ties_to_even_like_half() {
        // 1 + 2^-11 is exactly halfway between two f16 values; ties go to the even mantissa (1.0).
        let x = 1.0f32 + f32::powi(2.0, -11);
        let mut out = [f16::ZERO; 1];
        f16::narrow_slice(&[x], &mut out);
        assert_eq!(out[0], f16::from_f32(1.0));
        let mut outb = [bf16::ZERO; 1];
        bf16::narrow_slice(&[1.0f32 + f32::powi(2.0, -8)], &mut outb);
        assert_eq!(outb[0], bf16::from_f32(1.0));
    }

    #[test]
    fn check_finite_names_first_bad_index() {
        let e = check_finite("x", &[1.0f32, f32::NAN, f32::INFINITY]).unwrap_err();
        assert!(e.to_string().contains("index 1"), "{e}");
    }
}
