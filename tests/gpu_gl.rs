//! The GPU conformance tests on the GL backend (llvmpipe via EGL in CI): an adapter without f16 and
//! subgroups, so the fallback kernels run. "Where available": a missing GL adapter skips, even with
//! `LOWBIT_REQUIRE_GPU=1`. Runs in its own process (its own test binary). Tolerances: see `gpu_kernels.rs`.
#![cfg(feature = "gpu")]

use lowbit::gpu::{block_on, GpuLinear, KernelChoice, KernelOp};

mod common;
use common::*;

/// The two tests share one GL context and run one at a time: wgpu's GL backend holds a context lock around
/// every driver call and panics (aborting the test process) when a thread waits for it more than 6 s, which
/// llvmpipe's shader compiles on a loaded 2-core machine exceed when both tests compile at once.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn gl_backend_variants() {
    let _one_at_a_time = serial();
    let Some(ctx) = gl_ctx() else { return };
    run_matrix(ctx, FORMATS, SHAPES, MS, 4242);
    // Variants needing features GL lacks are errors, not faults.
    let mut rng = Rng::new(5);
    let layer = make_layer(FORMATS[0], 4, 8, false, &[], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let x = rng.vec(8, 1.0);
    if !ctx.features().f16 {
        let c = KernelChoice { op: Some(KernelOp::Gemm), subgroups: None, f16: Some(true) };
        assert!(block_on(gl.forward_with(ctx, &x, 1, None, c)).is_err());
    }
    if !ctx.features().subgroups {
        let c = KernelChoice { op: Some(KernelOp::Gemv), subgroups: Some(true), f16: None };
        assert!(block_on(gl.forward_with(ctx, &x, 1, None, c)).is_err());
    }
}

#[test]
fn gl_backend_encode_forward() {
    let _one_at_a_time = serial();
    let Some(ctx) = gl_ctx() else { return };
    // Layers chained in one submission, and one layer recorded several times into one encoder.
    let mut rng = Rng::new(4343);
    for lora in [false, true] {
        let ranks: [&[usize]; 3] = if lora { [&[4], &[3, 2], &[5]] } else { [&[], &[], &[]] };
        let layers = chain(CHAINS[0], [72, 56, 40, 24], ranks, &mut rng);
        for m in [1, 64] {
            run_chain(ctx, &layers, m, &mut rng, &format!("GL chain lora {lora} m {m}"));
        }
    }
    record_twice(ctx, &mut rng);
}
