//! The GPU backward (`GpuLinear::encode_backward` and its host-slice wrapper `backward`) against the f64
//! reference backward (`QuantLinear::backward_with(.., BackwardOptions::reference())`), on the preferred
//! adapter (lavapipe in CI). Skips loudly without an adapter unless `LOWBIT_REQUIRE_GPU=1` (see
//! `gpu_kernels.rs`).
//!
//! # Tolerance (stated, not tuned)
//! The library's bound `QuantLinear::backward_error_bound_for(x, dy, sel, BoundTarget::Gpu)`, judged by
//! `Agreement::ok(BoundTarget::Gpu)` (every element within `bound + ε/2·|g_ref|`, normalised squared error
//! ≤ 1e-10). Per element:
//! * `dx[m, i]`: `(out + 3)·ε·Σ_o |dy·W[o, i]|` (f32 sum of `out` products in any order, chunk partials
//!   included), per adapter `(out + r + 3)·ε·|s|·Σ_k (Σ_o |dy·B[o, k]|)·|A[k, i]|`, and for double-quantized
//!   weights `3ε·Σ_o |dy[m, o]|·|T[q_oi]|·(|map[c]·nested| + |offset|)` (the shader's block scale may be one
//!   FMA where the reference rounds twice);
//! * `dA[k, i]`: `(out + M + 3)·ε·|s|·Σ_m (Σ_o |dy[m, o]·B[o, k]|)·|x[m, i]|`;
//! * `dB[o, k]`: `(in + M + 3)·ε·|s|·Σ_m |dy[m, o]|·(Σ_i |x[m, i]·A[k, i]|)`;
//!
//! plus 1e-30 (derivation in `src/reference/linear_backward.rs`). Accumulation and determinism are checked
//! exactly (bit for bit): every sum runs in a fixed order, so a second backward into the same gradient
//! buffers adds exactly the same values (doubling is exact).
#![cfg(feature = "gpu")]

use lowbit::gpu::{block_on, wgpu, GpuAdapterGrad, GpuLinear, UploadOptions};
use lowbit::linear::{AdapterSelection, Agreement, BackwardOptions, BoundTarget, LinearGrads, QuantLinear};
use lowbit::nf4::FourBitFormat;
use proptest::prelude::{any, ProptestConfig};
use proptest::proptest;

mod common;
use common::*;

/// Every weight format the backward decodes: int8 per tensor / channel / group, NF4 and FP4 with and
/// without double-quantized scales.
const BW_FORMATS: &[Format] = &[
    Format::Int8(Granularity::PerTensor),
    Format::Int8(Granularity::PerChannel),
    Format::Int8(Granularity::PerGroup(5)),
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 64, dq: false },
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 64, dq: true },
    Format::FourBit { format: FourBitFormat::Fp4, blocksize: 32, dq: false },
    Format::FourBit { format: FourBitFormat::Fp4, blocksize: 128, dq: true },
];

/// Worst `|Δ| / allowed` seen, for the report.
#[derive(Default)]
struct Worst {
    ratio: f64,
    max_abs: f64,
}

/// Checks `got` against the reference backward within the GPU bound; returns the worst ratio.
fn check_grads(
    layer: &QuantLinear,
    x: &[f32],
    dy: &[f32],
    ids: Option<&[Option<usize>]>,
    got: &LinearGrads,
    what: &str,
) -> Worst {
    let (opts, sel) = match ids {
        None => (BackwardOptions::reference(), AdapterSelection::Enabled),
        Some(ids) => (BackwardOptions::reference().adapter_ids(ids), AdapterSelection::PerRow(ids)),
    };
    let want = layer.backward_with(x, dy, opts).unwrap();
    let bound = layer.backward_error_bound_for(x, dy, sel, BoundTarget::Gpu).unwrap();
    let mut worst = Worst::default();
    let mut one = |name: String, g: &[f32], w: &[f32], b: &[f64]| {
        assert_eq!(g.len(), w.len(), "{what}: length of {name}");
        let a = Agreement::compare(g, w, b);
        assert!(a.ok(BoundTarget::Gpu), "{what}: {name}: {a:?}");
        worst.ratio = worst.ratio.max(a.worst_ratio);
        worst.max_abs = worst.max_abs.max(a.max_abs_err);
    };
    one("dx".into(), &got.dx, &want.dx, &bound.dx);
    assert_eq!(got.adapters.len(), want.adapters.len(), "{what}: adapters");
    for (i, ((g, w), (ba, bb))) in got.adapters.iter().zip(&want.adapters).zip(&bound.adapters).enumerate() {
        one(format!("dA[{i}]"), &g.a, &w.a, ba);
        one(format!("dB[{i}]"), &g.b, &w.b, bb);
    }
    worst
}

fn ranks_for(i: usize) -> &'static [usize] {
    match i % 3 {
        0 => &[],
        1 => &[4],
        _ => &[3, 8], // the second adapter uses rsLoRA (make_layer)
    }
}

#[test]
fn every_format_matches_reference_within_gpu_bound() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0001);
    let mut worst = Worst::default();
    // (out, in): in = 100 and 33 are not multiples of any block size; (1, 1) is the smallest layer;
    // 70 rows span two GEMV-sized column groups of dx (WG = 64).
    let shapes = [(7, 33), (13, 100), (1, 1), (9, 70)];
    for (fi, &format) in BW_FORMATS.iter().enumerate() {
        for (si, &(out, inp)) in shapes.iter().enumerate() {
            let ranks = ranks_for(fi + si);
            let layer = make_layer(format, out, inp, si % 2 == 0, ranks, &mut rng);
            let gl = GpuLinear::upload(ctx, &layer).unwrap();
            for m in [1, 3, 17] {
                let x = rng.vec(m * inp, 1.0);
                let dy = rng.vec(m * out, 1.0);
                let got = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
                let w = check_grads(&layer, &x, &dy, None, &got, &format!("{format:?} [{out}x{inp}] {ranks:?} m={m}"));
                worst.ratio = worst.ratio.max(w.ratio);
                worst.max_abs = worst.max_abs.max(w.max_abs);
            }
        }
    }
    eprintln!("backward vs reference: worst |Δ|/allowed {:.3e}, max |Δ| {:.3e}", worst.ratio, worst.max_abs);
}

#[test]
fn per_row_adapters_and_disabled_adapters() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0002);
    let mut layer = make_layer(BW_FORMATS[4], 11, 72, true, &[2, 5, 3], &mut rng);
    layer.set_adapter_enabled("ad2", false).unwrap();
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    for m in [1, 5, 17] {
        let x = rng.vec(m * 72, 1.0);
        let dy = rng.vec(m * 11, 1.0);
        // Enabled: ad0 and ad1 get gradients, ad2 stays zero.
        let got = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
        check_grads(&layer, &x, &dy, None, &got, &format!("enabled m={m}"));
        assert!(got.adapters[2].a.iter().chain(&got.adapters[2].b).all(|&v| v == 0.0), "disabled adapter untouched");
        // Per row: none, ad0, ad1, ad0, ...; ad1 only from the third row on.
        let ids: Vec<Option<usize>> = (0..m).map(|r| [None, Some(0), Some(1)][r % 3]).collect();
        let got = block_on(gl.backward_with(ctx, &x, &dy, m, Some(&ids))).unwrap();
        check_grads(&layer, &x, &dy, Some(&ids), &got, &format!("per row m={m}"));
    }
    // A disabled adapter in the ids is an error, as in the forward.
    let x = rng.vec(2 * 72, 1.0);
    let dy = rng.vec(2 * 11, 1.0);
    assert!(block_on(gl.backward_with(ctx, &x, &dy, 2, Some(&[Some(2), None]))).is_err());
    assert!(block_on(gl.backward_with(ctx, &x, &dy, 2, Some(&[Some(3), None]))).is_err());
    assert!(block_on(gl.backward_with(ctx, &x, &dy, 2, Some(&[None]))).is_err());
}

#[test]
fn split_weights_match_reference() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0003);
    for &format in BW_FORMATS {
        // Binding limit 2048 bytes: the codes of 61x90 need several chunks, whose partials dx adds in order.
        let layer = make_layer(format, 61, 90, false, &[2], &mut rng);
        let gl = GpuLinear::upload_with(ctx, &layer, UploadOptions { max_binding_bytes: Some(2048) }).unwrap();
        assert!(gl.num_chunks() > 1, "{format:?}: {} chunks", gl.num_chunks());
        for m in [1, 3] {
            let x = rng.vec(m * 90, 1.0);
            let dy = rng.vec(m * 61, 1.0);
            let got = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
            check_grads(&layer, &x, &dy, None, &got, &format!("{format:?} split in {}", gl.num_chunks()));
        }
    }
}

/// Uploads `v` into a new STORAGE buffer.
fn upload(ctx: &lowbit::gpu::GpuContext, v: &[f32]) -> wgpu::Buffer {
    let b = act(ctx, v.len());
    ctx.queue().write_buffer(&b, 0, lowbit::gpu::bytes_of_f32(v));
    b
}

#[test]
fn encode_backward_accumulates_and_is_deterministic() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0004);
    let (out, inp, m) = (13, 100, 17);
    let layer = make_layer(BW_FORMATS[4], out, inp, true, &[4, 3], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let x = rng.vec(m * inp, 1.0);
    let dy = rng.vec(m * out, 1.0);
    let once = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
    let again = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
    assert_eq!(once, again, "two backwards of the same inputs differ: not deterministic");

    // Two backwards recorded into one encoder, into the same (zeroed) gradient buffers: exactly twice.
    let (xb, dyb, dxb) = (upload(ctx, &x), upload(ctx, &dy), act(ctx, m * inp));
    let gbufs: Vec<(wgpu::Buffer, wgpu::Buffer)> =
        gl.adapter_ranks().iter().map(|&r| (act(ctx, r * inp), act(ctx, out * r))).collect();
    let grads: Vec<GpuAdapterGrad<'_>> = gbufs.iter().map(|(a, b)| GpuAdapterGrad { a, b }).collect();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    gl.encode_backward(ctx, &mut enc, &xb, &dyb, Some(&dxb), &grads, m).unwrap();
    let created = gl.backward_bind_groups_created();
    gl.encode_backward(ctx, &mut enc, &xb, &dyb, Some(&dxb), &grads, m).unwrap();
    assert_eq!(gl.backward_bind_groups_created(), created, "the second recording reuses the bind groups");
    ctx.queue().submit([enc.finish()]);
    assert_eq!(read(ctx, &dxb, m * inp), once.dx, "dx is overwritten, not accumulated");
    for (a, ((ga, gb), g1)) in gbufs.iter().zip(&once.adapters).enumerate() {
        let twice = |v: &[f32]| v.iter().map(|x| 2.0 * x).collect::<Vec<f32>>();
        assert_eq!(read(ctx, ga, g1.a.len()), twice(&g1.a), "dA of adapter {a} after two backwards");
        assert_eq!(read(ctx, gb, g1.b.len()), twice(&g1.b), "dB of adapter {a} after two backwards");
    }

    // dx = None: only the gradients (a third time: three times one backward).
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    gl.encode_backward(ctx, &mut enc, &xb, &dyb, None, &grads, m).unwrap();
    ctx.queue().submit([enc.finish()]);
    let thrice: Vec<f32> = once.adapters[0].b.iter().map(|&v| (2.0 * v) + v).collect();
    assert_eq!(read(ctx, &gbufs[0].1, thrice.len()), thrice, "dB after a third backward without dx");
    // m = 0 records nothing.
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    gl.encode_backward(ctx, &mut enc, &xb, &dyb, Some(&dxb), &grads, 0).unwrap();
    ctx.queue().submit([enc.finish()]);
    assert_eq!(read(ctx, &gbufs[0].1, thrice.len()), thrice, "m = 0 changed the gradients");
}

#[test]
fn forward_and_backward_in_one_submission() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0005);
    let (out, inp, m) = (9, 40, 3);
    let layer = make_layer(BW_FORMATS[2], out, inp, true, &[3], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let x = rng.vec(m * inp, 1.0);
    // The forward's output is the backward's dy (an arbitrary but GPU-resident upstream gradient).
    let (xb, yb, dxb) = (upload(ctx, &x), act(ctx, m * out), act(ctx, m * inp));
    let (ga, gb) = (act(ctx, 3 * inp), act(ctx, out * 3));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    gl.encode_forward(ctx, &mut enc, &xb, &yb, m).unwrap();
    gl.encode_backward(ctx, &mut enc, &xb, &yb, Some(&dxb), &[GpuAdapterGrad { a: &ga, b: &gb }], m).unwrap();
    ctx.queue().submit([enc.finish()]);
    let dy = read(ctx, &yb, m * out);
    let got = LinearGrads {
        dx: read(ctx, &dxb, m * inp),
        adapters: vec![lowbit::linear::AdapterGrad { a: read(ctx, &ga, 3 * inp), b: read(ctx, &gb, out * 3) }],
    };
    check_grads(&layer, &x, &dy, None, &got, "forward then backward");
}

#[test]
fn bad_buffers_and_inputs_are_errors() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng::new(0xbac4_0006);
    let (out, inp, m) = (6, 40, 3);
    let layer = make_layer(BW_FORMATS[3], out, inp, false, &[2], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let (x, dx, dy) = (act(ctx, m * inp), act(ctx, m * inp), act(ctx, m * out));
    let (ga, gb) = (act(ctx, 2 * inp), act(ctx, out * 2));
    let small = act(ctx, 5);
    let g = |a, b| [GpuAdapterGrad { a, b }];
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let mut run = |x: &wgpu::Buffer, dy: &wgpu::Buffer, dx: Option<&wgpu::Buffer>, grads: &[GpuAdapterGrad<'_>]| {
        gl.encode_backward(ctx, &mut enc, x, dy, dx, grads, m)
    };
    assert!(run(&x, &dy, Some(&dx), &g(&ga, &gb)).is_ok());
    assert!(run(&small, &dy, Some(&dx), &g(&ga, &gb)).is_err(), "x too small");
    assert!(run(&x, &small, Some(&dx), &g(&ga, &gb)).is_err(), "dy too small");
    assert!(run(&x, &dy, Some(&small), &g(&ga, &gb)).is_err(), "dx too small");
    assert!(run(&x, &dy, Some(&dx), &g(&small, &gb)).is_err(), "dA too small");
    assert!(run(&x, &dy, Some(&dx), &g(&ga, &small)).is_err(), "dB too small");
    assert!(run(&x, &dy, Some(&dx), &[]).is_err(), "grads count");
    assert!(run(&x, &dy, Some(&x), &g(&ga, &gb)).is_err(), "dx aliases x");
    assert!(run(&x, &dy, Some(&dx), &g(&ga, &ga)).is_err(), "dA aliases dB");
    let mapped = buffer(ctx, m * inp, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    assert!(run(&mapped, &dy, Some(&dx), &g(&ga, &gb)).is_err(), "x without STORAGE");
    assert!(gl.encode_backward(ctx, &mut enc, &x, &dy, Some(&dx), &g(&ga, &gb), usize::MAX).is_err(), "absurd m");
    ctx.queue().submit([enc.finish()]);
    // Host slices: lengths and finiteness.
    let xs = rng.vec(m * inp, 1.0);
    let dys = rng.vec(m * out, 1.0);
    assert!(gl.backward_blocking(ctx, &xs, &dys, m + 1).is_err(), "lengths vs m");
    assert!(gl.backward_blocking(ctx, &xs[1..], &dys, m).is_err(), "x length");
    assert!(gl.backward_blocking(ctx, &xs, &dys[1..], m).is_err(), "dy length");
    let mut bad = dys.clone();
    bad[4] = f32::INFINITY;
    assert!(gl.backward_blocking(ctx, &xs, &bad, m).is_err(), "non-finite dy");
    // The f16 target has no backward bound.
    assert!(layer.backward_error_bound_for(&xs, &dys, AdapterSelection::Enabled, BoundTarget::GpuF16).is_err());
    // The device still works.
    let got = gl.backward_blocking(ctx, &xs, &dys, m).unwrap();
    check_grads(&layer, &xs, &dys, None, &got, "after errors");
    assert!(gl.backward_blocking(ctx, &[], &[], 0).unwrap().dx.is_empty());
}

#[test]
fn gpu_bound_adds_only_the_double_quant_term() {
    let mut rng = Rng::new(0xbac4_0007);
    for &format in BW_FORMATS {
        let layer = make_layer(format, 5, 70, false, &[2], &mut rng);
        let x = rng.vec(2 * 70, 1.0);
        let dy = rng.vec(2 * 5, 1.0);
        let cpu = layer.backward_error_bound(&x, &dy, AdapterSelection::Enabled).unwrap();
        let gpu = layer.backward_error_bound_for(&x, &dy, AdapterSelection::Enabled, BoundTarget::Gpu).unwrap();
        assert_eq!(cpu.adapters, gpu.adapters, "{format:?}: LoRA gradients have the same bound");
        let dq = matches!(format, Format::FourBit { dq: true, .. });
        for (c, g) in cpu.dx.iter().zip(&gpu.dx) {
            assert!(if dq { g > c } else { g == c }, "{format:?}: dx bound {g} vs cpu {c}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn random_shapes_match_reference(
        fi in 0..BW_FORMATS.len(),
        out in 1usize..24,
        inp in 1usize..150,
        m in 1usize..20,
        ranks in proptest::collection::vec(1usize..9, 0..3),
        seed in any::<u64>(),
    ) {
        let Some(ctx) = ctx() else { return Ok(()) };
        let mut rng = Rng::new(seed);
        let layer = make_layer(BW_FORMATS[fi], out, inp, seed % 2 == 0, &ranks, &mut rng);
        let gl = GpuLinear::upload(ctx, &layer).unwrap();
        let x = rng.vec(m * inp, 2.0);
        let dy = rng.vec(m * out, 0.5);
        let got = gl.backward_blocking(ctx, &x, &dy, m).unwrap();
        check_grads(&layer, &x, &dy, None, &got, &format!("{:?} [{out}x{inp}] {ranks:?} m={m}", BW_FORMATS[fi]));
    }
}
