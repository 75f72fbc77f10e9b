//! Opening the preferred GPU adapter and describing it (cargo feature `gpu`).

use crate::error::Error;
use lowbit::gpu::GpuContext;

/// The preferred adapter, or `Ok(Err(detail))` when there is none. Other failures (the adapter refused a
/// device, ...) are errors.
pub fn try_open() -> Result<Result<GpuContext, String>, Error> {
    match GpuContext::new_blocking() {
        Ok(c) => Ok(Ok(c)),
        Err(lowbit::Error::NoGpuAdapter { detail }) => Ok(Err(detail)),
        Err(e) => Err(Error::new(format!("opening the GPU: {e}"))),
    }
}

/// The preferred adapter for `--device gpu`; no adapter is an error.
pub fn open() -> Result<GpuContext, Error> {
    try_open()?.map_err(|detail| Error::new(format!("--device gpu: no GPU adapter found ({detail})")))
}

/// `name (backend, device type; optional features)`, plus the CPU-adapter caveat where it applies.
pub fn describe(ctx: &GpuContext) -> String {
    let info = ctx.adapter_info();
    let f = ctx.features();
    let feats: Vec<&str> = [(f.f16, "shader-f16"), (f.subgroups, "subgroups"), (f.timestamps, "timestamps")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
    let feats = if feats.is_empty() { "no optional features".to_string() } else { feats.join(", ") };
    let mut s = format!("{} ({:?}, {:?}; {feats})", ctx.adapter_name(), info.backend, info.device_type);
    if ctx.is_cpu_adapter() {
        s.push_str(" -- CPU adapter: correctness only, not a speed figure");
    }
    s
}
