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

/// Whether `LOWBIT_REQUIRE_GPU=1`: CI's rule that a GPU test finding no adapter fails instead of skipping.
pub fn require() -> bool {
    std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The preferred adapter for GPU tests, opened once per test binary and shared. Without an adapter it prints
/// `*** skipped: no GPU adapter ... ***` on every call and returns `None`, so the test can return; with
/// `LOWBIT_REQUIRE_GPU=1` a missing adapter panics (the test fails).
pub fn test_context() -> Option<&'static GpuContext> {
    static CTX: std::sync::OnceLock<Option<GpuContext>> = std::sync::OnceLock::new();
    let c = CTX.get_or_init(|| match GpuContext::new_blocking() {
        Ok(c) => {
            eprintln!("GPU adapter: {}", describe(&c));
            Some(c)
        }
        Err(e) => {
            assert!(!require(), "LOWBIT_REQUIRE_GPU=1 but no GPU adapter: {e}");
            None
        }
    });
    if c.is_none() {
        eprintln!("*** skipped: no GPU adapter (set LOWBIT_REQUIRE_GPU=1 to make this a failure) ***");
    }
    c.as_ref()
}
