//! How closely a fused [`QuantLinear`] forward agrees with the f64 reference: the library's stated bound
//! ([`QuantLinear::error_bound`]) and comparison ([`Agreement`]), with every enabled adapter on every row, as
//! [`QuantLinear::forward`] and `GpuLinear::forward` apply them. The demo, `bench` and the tests all judge
//! the kernels by this one rule.

use lowbit::linear::{Agreement, BoundTarget, ForwardOptions, QuantLinear};

/// `got` (a forward of `layer` on `x` through kernels of `target`) against the reference output `want`.
pub fn compare(
    layer: &QuantLinear,
    x: &[f32],
    got: &[f32],
    want: &[f32],
    target: BoundTarget,
) -> lowbit::Result<Agreement> {
    let bound = layer.error_bound(x, ForwardOptions::default(), target)?;
    Ok(Agreement::compare(got, want, &bound))
}
