//! Chaining layers on the GPU the way an engine does: `GpuLinear::encode_forward` on caller-owned buffers,
//! several layers (and the same layer several times) recorded into ONE encoder, ONE submit, no readback in
//! between. Skips without an adapter unless `LOWBIT_REQUIRE_GPU=1` (see `gpu_kernels.rs`).
//!
//! # What is checked, and the tolerances
//! The helpers (`run_chain`, `record_twice`) live in `tests/gpu_common` so that `gpu_gl.rs` runs them on the
//! GL backend too.
//!
//! * Per layer: after the single submit the test (only the test) reads every intermediate activation back
//!   and compares GPU layer i with the f64 reference of layer i applied to the GPU's own input of layer i,
//!   under the library's GPU bound `QuantLinear::error_bound(x, .., BoundTarget::Gpu)` (derived in
//!   `docs/formats.md` §8) through `Agreement` (every element inside, normalised squared error ≤ 1e-10).
//! * End to end: the last GPU output against the CPU chain (`QuantLinear::forward`, each CPU output fed to
//!   the next layer). Both chains start from the same x. Writing `a_i` for the GPU activations, `c_i` for
//!   the CPU ones and `L_i(v) = v·W_effᵀ + bias` for layer i's exact map (`W_eff = dequant(W) + Σ s·B·A`
//!   over the adapters in use, a linear map, so bias cancels in differences):
//!   `a_i − c_i = L_i(a_{i−1}) − L_i(c_{i−1}) + g_i − h_i = W_eff·(a_{i−1} − c_{i−1}) + g_i − h_i`,
//!   with `g_i` the GPU's error on its input (bounded by `G_i(a_{i−1}) = error_bound(a_{i−1}, .., Gpu)`)
//!   and `h_i` the CPU's error on its input (bounded by `H_i(c_{i−1}) = error_bound(c_{i−1}, .., Cpu)`).
//!   Hence, elementwise, `E_i = |W_eff|·E_{i−1} + G_i(a_{i−1}) + H_i(c_{i−1}) + ε·(|a_i| + |c_i|)`,
//!   `E_0 = 0`, where `|W_eff|` is the elementwise absolute value of the effective matrix (computed in f64)
//!   and the last term covers the final f32 rounding of both references. The test asserts
//!   `|a_L − c_L| ≤ E_L` and `max E_L < 1 % · max |c_L|`, so the bound is not vacuous: a real fault (a wrong
//!   weight, adapter, row or stale uniform) moves outputs by amounts of the order of `|y|`. `E_L` is a worst
//!   case (every rounding error aligned; `|W_eff|` grows it by `Σ_k |w_ok|` per layer), so the observed
//!   error is typically far below it; the test prints both.
#![cfg(feature = "gpu")]

use lowbit::gpu::{block_on, wgpu, GpuLinear, KernelChoice, UploadOptions};
use lowbit::linear::{Agreement, BoundTarget, ForwardOptions};

mod common;
use common::*;

#[test]
fn three_layer_chain_in_one_submission() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xc4a1_2026);
    for (ci, formats) in CHAINS.iter().enumerate() {
        for lora in [false, true] {
            let ranks: [&[usize]; 3] = if lora { [&[4], &[3, 2], &[5]] } else { [&[], &[], &[]] };
            // in 72 -> 56 -> 40 -> 24 (in = 72 with block 64: blocks cross rows).
            let layers = chain(*formats, [72, 56, 40, 24], ranks, &mut rng);
            for m in [1, 64] {
                let what = format!("chain {ci} lora {lora} m {m}");
                let r = run_chain(ctx, &layers, m, &mut rng, &what);
                eprintln!(
                    "{what}: worst per-layer err/bound {:.3e}; final max|err| {:.3e}, max bound {:.3e}, worst \
                     err/bound {:.3e}, max|y| {:.3e}",
                    r.worst_layer_ratio, r.final_max_err, r.final_max_bound, r.final_worst_ratio, r.final_max_abs
                );
            }
        }
    }
}

#[test]
fn bind_groups_are_reused() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(21);
    let layer = make_layer(FORMATS[1], 30, 40, true, &[3, 2], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let chunks = gl.num_chunks() as u64;
    let (x, y, y2) = (act(ctx, 64 * 40), act(ctx, 64 * 30), act(ctx, 64 * 30));
    let record = |y: &wgpu::Buffer, m: usize| {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        gl.encode_forward(ctx, &mut enc, &x, y, m).unwrap();
        ctx.queue().submit([enc.finish()]);
    };
    assert_eq!(gl.bind_groups_created(), 0);
    record(&y, 5);
    assert_eq!(gl.bind_groups_created(), chunks, "first call creates one group per chunk");
    record(&y, 5);
    record(&y, 5);
    assert_eq!(gl.bind_groups_created(), chunks, "identical calls create no new bind group");
    record(&y2, 5);
    assert_eq!(gl.bind_groups_created(), 2 * chunks, "another y buffer gets its own group");
    record(&y, 7);
    assert_eq!(gl.bind_groups_created(), 3 * chunks, "another m gets its own group");
    record(&y, 5);
    record(&y2, 5);
    assert_eq!(gl.bind_groups_created(), 3 * chunks, "earlier entries are still cached");
    assert_eq!(gl.bind_group_cache_len(), 3);
    // The host-slice forward reuses its scratch buffers and so its bind groups too.
    let xs = rng.vec(4 * 40, 1.0);
    let first = gl.forward_blocking(ctx, &xs, 4).unwrap();
    let after_first = gl.bind_groups_created();
    assert_eq!(after_first, 4 * chunks);
    let second = gl.forward_blocking(ctx, &xs, 4).unwrap();
    assert_eq!(gl.bind_groups_created(), after_first, "second identical forward creates no bind group");
    assert_eq!(first, second, "same input, same kernel: same bits");
    gl.clear_bind_groups();
    assert_eq!(gl.bind_group_cache_len(), 0);
    eprintln!("bind groups created: {} for {} distinct (x, y, m) over 9 calls", gl.bind_groups_created(), 4);
}

#[test]
fn same_layer_twice_in_one_encoder() {
    let Some(ctx) = ctx() else { return };
    record_twice(ctx, &mut Rng::new(33));
}

#[test]
fn encode_forward_rejects_bad_buffers() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(5);
    let layer = make_layer(FORMATS[4], 6, 10, false, &[2], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let (x, y) = (act(ctx, 4 * 10), act(ctx, 4 * 6));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let err = |r: Result<(), lowbit::Error>| r.expect_err("must be an error").to_string();
    let e = err(gl.encode_forward(ctx, &mut enc, &x, &y, 5));
    assert!(e.contains("buffer x") && e.contains("at least 200"), "{e}");
    let small_y = act(ctx, 4 * 6 - 1);
    let e = err(gl.encode_forward(ctx, &mut enc, &x, &small_y, 4));
    assert!(e.contains("buffer y") && e.contains("at least 96"), "{e}");
    let e = err(gl.encode_forward(ctx, &mut enc, &x, &x, 1));
    assert!(e.contains("same buffer as x"), "{e}");
    let not_storage = buffer(ctx, 40, wgpu::BufferUsages::COPY_DST);
    let e = err(gl.encode_forward(ctx, &mut enc, &not_storage, &y, 1));
    assert!(e.contains("STORAGE"), "{e}");
    let e = err(gl.encode_forward_with(ctx, &mut enc, &x, &y, 2, Some(&[Some(3), None]), KernelChoice::default()));
    assert!(e.contains("adapter_ids"), "{e}");
    assert!(gl.encode_forward(ctx, &mut enc, &x, &y, usize::MAX).is_err(), "absurd m");
    assert_eq!(gl.bind_groups_created(), 0, "nothing was created for rejected calls");
    // The encoder is still usable: a valid forward recorded after the errors runs and is right.
    let xs = rng.vec(4 * 10, 1.0);
    ctx.queue().write_buffer(&x, 0, lowbit::gpu::bytes_of_f32(&xs));
    gl.encode_forward(ctx, &mut enc, &x, &y, 4).unwrap();
    gl.encode_forward(ctx, &mut enc, &x, &y, 0).unwrap(); // m = 0 records nothing
    ctx.queue().submit([enc.finish()]);
    let got = read(ctx, &y, 24);
    let want = layer.forward_with(&xs, ForwardOptions::reference()).unwrap();
    let ag =
        Agreement::compare(&got, &want, &layer.error_bound(&xs, ForwardOptions::default(), BoundTarget::Gpu).unwrap());
    assert!(ag.ok(BoundTarget::Gpu), "after rejected calls: {ag:?}");
}

#[test]
fn split_weight_and_prepare() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(77);
    // A weight split into several row chunks: one bind group per chunk, reused like the others.
    let layer = make_layer(FORMATS[3], 61, 90, true, &[2], &mut rng);
    let gl = GpuLinear::upload_with(ctx, &layer, UploadOptions { max_binding_bytes: Some(2048) }).unwrap();
    let chunks = gl.num_chunks() as u64;
    assert!(chunks > 1, "expected several chunks, got {chunks}");
    block_on(gl.prepare(ctx, 3, KernelChoice::default())).unwrap();
    let bad = KernelChoice { op: Some(lowbit::gpu::KernelOp::Shrink), ..Default::default() };
    let e = block_on(gl.prepare(ctx, 3, bad)).expect_err("Shrink is not an output kernel").to_string();
    assert!(e.contains("KernelChoice::op"), "{e}");
    let xs = rng.vec(3 * 90, 1.0);
    let (x, y) = (act(ctx, 3 * 90), act(ctx, 3 * 61));
    ctx.queue().write_buffer(&x, 0, lowbit::gpu::bytes_of_f32(&xs));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    gl.encode_forward(ctx, &mut enc, &x, &y, 3).unwrap();
    gl.encode_forward(ctx, &mut enc, &x, &y, 3).unwrap();
    assert_eq!(gl.bind_groups_created(), chunks, "one group per chunk, reused by the second call");
    ctx.queue().submit([enc.finish()]);
    let got = read(ctx, &y, 3 * 61);
    let want = layer.forward_with(&xs, ForwardOptions::reference()).unwrap();
    let ag =
        Agreement::compare(&got, &want, &layer.error_bound(&xs, ForwardOptions::default(), BoundTarget::Gpu).unwrap());
    assert!(ag.ok(BoundTarget::Gpu), "split weight: {ag:?}");
}
