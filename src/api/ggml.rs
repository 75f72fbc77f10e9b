//! Dequantization of ggml / GGUF tensor types (Q8_0, Q4_0/1, Q5_0/1, the K-quants, F16, BF16, F32) to f32,
//! bit-identical to gguf-py's `gguf.quants.dequantize`. The rule per type is `docs/formats.md` §9.
//!
//! Non-finite scales (an f16 `d` of inf or NaN in a file) are decoded faithfully, as gguf-py does: the
//! affected elements come out infinite or NaN and no error is raised; callers that need finite weights check
//! the output. NaN results are NaN on every path; their payload bits follow the hardware (x86 quiets them).

use crate::cpu::KernelPath;
pub use crate::format::ggml::GgmlType;
use crate::{Error, Result};

/// Decodes `data`, `numel` elements of type `ty` stored contiguously (whole blocks), to f32 on the fastest path.
///
/// Errors: a type lowbit cannot decode ([`Error::Unsupported`] naming it), `numel` not a whole number of
/// blocks, or `data.len()` not the size of `numel` elements. Validates before allocating, so a corrupt element
/// count cannot allocate more than `data` justifies.
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>> {
    check(ty, data, numel)?;
    let mut out = vec![0f32; numel];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into a caller-owned buffer of `numel` elements.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    dequantize_into_with(ty, data, out, KernelPath::best())
}

/// [`dequantize_into`] on an explicit path; every path gives the same bits (NaNs: see the module docs).
///
/// Errors as [`dequantize`], and [`Error::Unsupported`] when `path.isa` is not available on this CPU.
pub fn dequantize_into_with(ty: GgmlType, data: &[u8], out: &mut [f32], path: KernelPath) -> Result<()> {
    path.check()?;
    check(ty, data, out.len())?;
    crate::cpu::ggml::dequantize(ty, data, out, path);
    Ok(())
}

/// Type decodable, `numel` whole blocks, `data` exactly their size.
fn check(ty: GgmlType, data: &[u8], numel: usize) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported {
            what: format!(
                "dequantizing ggml type {ty} (id {}); lowbit decodes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, \
                 Q2_K, Q3_K, Q4_K, Q5_K and Q6_K",
                ty.id()
            ),
        });
    }
    let expected = ty.bytes_for(numel)?;
    if data.len() != expected {
        return Err(Error::invalid(
            "data",
            format!("{} bytes", data.len()),
            format!(
                "{expected} bytes ({numel} elements of {ty}, {} bytes per block of {})",
                ty.block_bytes(),
                ty.block_elements()
            ),
        ));
    }
    Ok(())
}
