//! Every GPU kernel variant the adapter supports against the CPU f64 reference
//! (`forward_with(x, ForwardOptions::reference())`, with `.adapter_ids(ids)` for batches), on the preferred
//! adapter (lavapipe's Vulkan llvmpipe in CI) and on the GL backend where one exists (an adapter without f16
//! and subgroups).
//!
//! Without an adapter the tests print "skipped: no GPU adapter" and pass, unless `LOWBIT_REQUIRE_GPU=1`,
//! in which case a missing adapter fails. (The GL run is "where available": it never fails for lack of GL.)
//!
//! # Tolerances (stated, not tuned)
//! These are the library's bounds (`QuantLinear::error_bound` with `BoundTarget::Gpu` / `GpuF16`, judged by
//! `Agreement::ok`; `docs/formats.md` §8), restated here. f32 variants decode exactly the reference's weights (same f32 operations), except that the
//! double-quantized scale `map[q]·nested + offset` may be contracted into one FMA by the driver. The rest is
//! f32 accumulation in some order, with or without FMA. Per element we allow
//! * base product: (K+3)·ε·Σ_k|x_k·w_k|  (γ_K = K·u/(1−K·u) ≤ K·ε for any order, plus a few roundings);
//! * bias: 3·ε·|bias| (added into the epilogue sum, then to the dot product);
//! * each LoRA term: (K+r+3)·ε·|s|·Σ_j(Σ_k|x_k·A_jk|)·|B_oj| (shrink, expand, scaling);
//! * double quantization: ε·Σ_k|x_k|·|T[q_k]|·(|map[c_b]·nested_b| + |offset|) (the FMA-contracted scale
//!   differs from the two-rounding one by at most one rounding of that size);
//! * the reference's own final rounding: ε/2·|y_ref|.
//!
//! and the normalised squared error Σ(a−b)²/Σa² ≤ 1e-10.
//!
//! f16 variants (GEMM with f16 tiles and f16 products, f32 accumulation) additionally round x and w to f16
//! and round each product to f16. With u_h = 2⁻¹¹ and the f16 subnormal spacing 2⁻²⁴:
//! |fl16(fl16(x)·fl16(w)) − x·w| ≤ 3.01·u_h·|x·w| + 2⁻²⁴·(|x| + |w| + 1), summed over k, on top of the f32
//! bound (the LoRA path stays f32). The kernel only runs f16 when max|x|·max|w| ≤ 16384 (no overflow). The
//! normalised squared error must be ≤ 1e-5 (≈ 4·(3u_h)², the squared worst relative product error with margin).
#![cfg(feature = "gpu")]

use lowbit::affine::Granularity;
use lowbit::gpu::{GpuLinear, KernelChoice, UploadOptions};

mod common;
use common::*;

#[test]
fn every_variant_matches_reference() {
    let Some(ctx) = ctx() else { return };
    run_matrix(ctx, FORMATS, SHAPES, MS, 0x1234_5678_9abc_def1);
}

#[test]
fn larger_tiles_and_blocks_crossing_rows() {
    let Some(ctx) = ctx() else { return };
    // Several GEMM tiles in both directions; in = 72 with block 64: blocks cross row boundaries.
    run_matrix(ctx, &FORMATS[..2], &[(130, 72)], &[1, 70], 77);
    run_matrix(ctx, &FORMATS[4..], &[(70, 40)], &[2, 66], 78);
}

#[test]
fn split_weights_match_unsplit() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(99);
    for format in FORMATS {
        // Binding limit 2048 bytes: codes of 61x90 (2745 B at 4 bits, 5490 B at 8) need several chunks.
        let layer = make_layer(*format, 61, 90, true, &[2, 1], &mut rng);
        let split = GpuLinear::upload_with(ctx, &layer, UploadOptions { max_binding_bytes: Some(2048) }).unwrap();
        assert!(split.num_chunks() > 1, "{format:?}: expected several chunks, got {}", split.num_chunks());
        check_layer(ctx, &layer, &split, &[1, 3, 5], &mut rng, &format!("{format:?} split in {}", split.num_chunks()));
    }
}

#[test]
fn default_forward_and_buffer_reuse() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(7);
    let mut layer = make_layer(FORMATS[1], 9, 70, true, &[2, 3], &mut rng);
    layer.set_adapter_enabled("ad1", false).unwrap();
    let mut gl = GpuLinear::upload(ctx, &layer).unwrap();
    assert_eq!(gl.adapter_names(), ["ad0", "ad1"]);
    for m in [3, 1, 20, 2, 0] {
        let x = rng.vec(m * 70, 1.0);
        let got = gl.forward_blocking(ctx, &x, m).unwrap();
        let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
        check(&got, &want, &bounds(&layer, &x, &vec![vec![0]; m], false), false, &format!("default m={m}"));
    }
    // Toggling on the GPU side matches toggling on the CPU side.
    gl.set_adapter_enabled("ad1", true).unwrap();
    layer.set_adapter_enabled("ad1", true).unwrap();
    let x = rng.vec(2 * 70, 1.0);
    let got = gl.forward_blocking(ctx, &x, 2).unwrap();
    let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap();
    check(&got, &want, &bounds(&layer, &x, &vec![vec![0, 1]; 2], false), false, "re-enabled");
    let ids = [Some(1), None];
    let got = gl.forward_batch_blocking(ctx, &x, 2, &ids).unwrap();
    let want = layer.forward_with(&x, lowbit::linear::ForwardOptions::reference().adapter_ids(&ids)).unwrap();
    check(&got, &want, &bounds(&layer, &x, &[vec![1], vec![]], false), false, "batch");
    // Timing helper returns the same result.
    let (y, _ns) = gl.time_forward_blocking(ctx, &x, 2, KernelChoice::default(), 3).unwrap();
    assert_eq!(y.len(), 2 * 9);
    assert!(ctx.cached_pipelines() >= 1);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(11);
    let mut layer = make_layer(FORMATS[0], 6, 40, true, &[2, 2], &mut rng);
    layer.set_adapter_enabled("ad1", false).unwrap();
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let x = rng.vec(3 * 40, 1.0);
    assert!(gl.forward_blocking(ctx, &x, 2).is_err(), "x length vs m");
    assert!(gl.forward_blocking(ctx, &x[..39], 1).is_err(), "x length vs in");
    assert!(gl.forward_batch_blocking(ctx, &x, 3, &[Some(0), Some(2), None]).is_err(), "adapter id out of range");
    assert!(gl.forward_batch_blocking(ctx, &x, 3, &[Some(0), None]).is_err(), "ids length");
    assert!(gl.forward_batch_blocking(ctx, &x, 3, &[Some(1), None, None]).is_err(), "disabled adapter");
    let mut bad = x.clone();
    bad[7] = f32::NAN;
    assert!(gl.forward_blocking(ctx, &bad, 3).is_err(), "NaN input");
    // Oversized: x beyond the binding limit, and a weight row beyond it.
    let small = GpuLinear::upload_with(ctx, &layer, UploadOptions { max_binding_bytes: Some(2048) }).unwrap();
    let big_x = vec![0.5f32; 20 * 40];
    assert!(small.forward_blocking(ctx, &big_x, 20).is_err(), "x over the binding limit");
    let wide = make_layer(Format::Int8(Granularity::PerChannel), 2, 2000, false, &[], &mut rng);
    assert!(
        GpuLinear::upload_with(ctx, &wide, UploadOptions { max_binding_bytes: Some(1200) }).is_err(),
        "row too big"
    );
    let lora = make_layer(FORMATS[0], 2, 200, false, &[4], &mut rng);
    assert!(
        GpuLinear::upload_with(ctx, &lora, UploadOptions { max_binding_bytes: Some(2048) }).is_err(),
        "LoRA too big"
    );
    // The device still works after all of that.
    let y = gl.forward_blocking(ctx, &x, 3).unwrap();
    assert_eq!(y.len(), 18);
}

#[test]
fn absurd_m_is_an_error() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(3);
    let layer = make_layer(FORMATS[0], 2, 8, false, &[], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    assert!(gl.forward_blocking(ctx, &[0.0; 8], usize::MAX).is_err());
    assert!(gl.forward_blocking(ctx, &[], 0).unwrap().is_empty());
}
