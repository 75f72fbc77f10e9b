//! The output checks of a forward: the size of an allocated `y` (before allocating) and that a result computed
//! from finite inputs is itself finite (after computing).

use crate::element::Element;
use crate::{Error, Result};

/// Largest `y` the allocating forwards ([`QuantLinear::forward`](super::QuantLinear::forward) and
/// [`forward_with`](super::QuantLinear::forward_with)) build, in bytes (`M × out × 4`): 32 GiB on 64-bit
/// targets, the same as [`Limits::DEFAULT`](crate::io::Limits)`.max_tensor_bytes`. Larger outputs are refused
/// before anything is allocated; callers that really want one pass their own buffer to
/// [`forward_into`](super::QuantLinear::forward_into).
pub const MAX_FORWARD_OUTPUT_BYTES: usize = if usize::BITS >= 64 { 32 << 30 } else { usize::MAX };

/// A zeroed `Vec<f32>` of `m × out` elements: errors (never aborts) when `m × out × 4` overflows, exceeds
/// [`MAX_FORWARD_OUTPUT_BYTES`], or the allocator refuses it.
pub(crate) fn alloc_output(m: usize, out: usize) -> Result<Vec<f32>> {
    let expected = format!("at most {MAX_FORWARD_OUTPUT_BYTES} bytes (MAX_FORWARD_OUTPUT_BYTES); pass a smaller x");
    let bytes = m.checked_mul(out).and_then(|n| n.checked_mul(4));
    let n = match bytes {
        Some(b) if b <= MAX_FORWARD_OUTPUT_BYTES => b / 4,
        _ => {
            return Err(Error::invalid(
                "x",
                format!("{m} rows, so y = [{m}, {out}] would take {m} × {out} × 4 bytes"),
                expected,
            ))
        }
    };
    let mut y = Vec::new();
    y.try_reserve_exact(n).map_err(|e| {
        Error::invalid(
            "x",
            format!("{m} rows, so y = [{m}, {out}] needs {} bytes ({e})", n * 4),
            "an output that fits in memory",
        )
    })?;
    y.resize(n, 0.0);
    Ok(y)
}

/// Errors with [`Error::NonFinite`] (`arg` starting with `"y"`) on the first inf/NaN of `y`, which the caller
/// computed from finite inputs: the result overflowed (f32, or the narrower output type). Cost: one
/// branch-free, vectorisable pass over `y` (`M × out` elements, about 1/`in` of the kernels' multiply-adds);
/// the index is searched only when the pass finds something.
pub(crate) fn check_output<O: Element>(y: &[O]) -> Result<()> {
    if all_finite(y) {
        return Ok(());
    }
    let index = y.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
    Err(Error::NonFinite {
        arg: "y (x, the weight, the bias and the adapters were all finite: the result overflowed the output type)"
            .to_string(),
        index,
        value: y[index].to_f32(),
    })
}

/// Whether every element of `y` is finite: one branch-free, vectorisable pass.
pub(crate) fn all_finite<O: Element>(y: &[O]) -> bool {
    y.iter().fold(true, |ok, v| ok & v.to_f32().is_finite())
}
