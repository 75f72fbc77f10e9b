//! Chaining layers on the GPU the way an engine does: `GpuLinear::encode_forward` on caller-owned buffers,
//! several layers (and the same layer several times) recorded into ONE encoder, ONE submit, no readback in
//! between. Skips without an adapter unless `LOWBIT_REQUIRE_GPU=1` (see `gpu_kernels.rs`).
//!
//! # What is checked, and the tolerances
//! * Per layer: after the single submit the test (only the test) reads every intermediate activation back
//!   and compares GPU layer i with the f64 reference of layer i applied to the GPU's own input of layer i,
//!   under the per-layer GPU bound of `tests/gpu_common` (stated and derived in `gpu_kernels.rs`).
//! * End to end: the last GPU output against the CPU chain (`QuantLinear::forward`, each CPU output fed to
//!   the next layer). Both chains start from the same x. Writing `a_i` for the GPU activations, `c_i` for
//!   the CPU ones and `L_i(v) = v·W_effᵀ + bias` for layer i's exact map (`W_eff = dequant(W) + Σ s·B·A`
//!   over the adapters in use, a linear map, so bias cancels in differences):
//!   `a_i − c_i = L_i(a_{i−1}) − L_i(c_{i−1}) + g_i − h_i = W_eff·(a_{i−1} − c_{i−1}) + g_i − h_i`,
//!   with `g_i` the GPU's error on its input (bounded by the GPU bound `G_i(a_{i−1})`) and `h_i` the CPU's
//!   error on its input (bounded by `QuantLinear::error_bound(c_{i−1})`). Hence, elementwise,
//!   `E_i = |W_eff|·E_{i−1} + G_i(a_{i−1}) + H_i(c_{i−1}) + ε·(|a_i| + |c_i|)`, `E_0 = 0`, where `|W_eff|` is
//!   the elementwise absolute value of the effective matrix (computed in f64) and the last term covers the
//!   final f32 rounding of both references. The test asserts `|a_L − c_L| ≤ E_L` and that `max E_L < 1 % · max |c_L|`, so the
//!   bound is not vacuous: a real fault (a wrong weight, adapter, row or stale uniform) moves outputs by
//!   amounts of the order of `|y|`. `E_L` is a worst case (every rounding error aligned, `|W_eff|` grows it
//!   by `Σ_k |w_ok|` per layer), so the observed error is typically far below it; the test prints both.
#![cfg(feature = "gpu")]

use lowbit::gpu::{block_on, read_f32, wgpu, GpuContext, GpuLinear, KernelChoice};
use lowbit::linear::{BoundTarget, ForwardOptions, QuantLinear};
use lowbit::nf4::FourBitFormat;

#[path = "gpu_common/mod.rs"]
mod common;
use common::*;

fn buffer(ctx: &GpuContext, floats: usize, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test"),
        size: (floats.max(1) * 4) as u64,
        usage,
        mapped_at_creation: false,
    })
}

fn act(ctx: &GpuContext, floats: usize) -> wgpu::Buffer {
    use wgpu::BufferUsages as U;
    buffer(ctx, floats, U::STORAGE | U::COPY_DST | U::COPY_SRC)
}

/// Copies `src` (first `n` floats) to a mappable buffer in a new submit and reads it.
fn read(ctx: &GpuContext, src: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let dst = buffer(ctx, n, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(src, 0, &dst, 0, (n * 4) as u64);
    ctx.queue().submit([enc.finish()]);
    block_on(read_f32(ctx.device(), &dst, n)).unwrap()
}

/// Indices of the adapters `forward` applies to every row.
fn enabled(layer: &QuantLinear) -> Vec<usize> {
    layer.adapters().iter().enumerate().filter(|(_, a)| a.is_enabled()).map(|(i, _)| i).collect()
}

/// `|W_eff|` elementwise, `W_eff = dequant(W) + Σ s·B·A` over the enabled adapters, computed in f64
/// (row-major [out, in]); its own rounding (~1e-16 relative) is negligible next to the f32 terms.
fn abs_weff(layer: &QuantLinear) -> Vec<f64> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let mut w: Vec<f64> = layer.weight().dequantize_reference().iter().map(|v| *v as f64).collect();
    for a in enabled(layer) {
        let ad = &layer.adapters()[a];
        let (r, s) = (ad.rank(), ad.scaling() as f64);
        for o in 0..out {
            for j in 0..r {
                let b = ad.b()[o * r + j] as f64 * s;
                for k in 0..inp {
                    w[o * inp + k] += b * ad.a()[j * inp + k] as f64;
                }
            }
        }
    }
    w.iter().map(|v| v.abs()).collect()
}

struct ChainReport {
    worst_layer_ratio: f64,
    final_max_err: f64,
    final_max_bound: f64,
    final_worst_ratio: f64,
    final_max_abs: f64,
}

/// Runs `layers` as one chain on `m` rows: one encoder, one submit, reads back only the last output; then
/// checks every layer and the end-to-end result as described in the module docs.
fn run_chain(ctx: &GpuContext, layers: &[QuantLinear], m: usize, rng: &mut Rng, what: &str) -> ChainReport {
    let gpu: Vec<GpuLinear> = layers.iter().map(|l| GpuLinear::upload(ctx, l).unwrap()).collect();
    let x = rng.vec(m * layers[0].in_features(), 1.0);
    let mut acts = vec![act(ctx, m * layers[0].in_features())];
    acts.extend(layers.iter().map(|l| act(ctx, m * l.out_features())));
    ctx.queue().write_buffer(&acts[0], 0, lowbit::gpu::bytes_of_f32(&x));
    let n_last = m * layers[layers.len() - 1].out_features();
    let readback = buffer(ctx, n_last, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    for (i, g) in gpu.iter().enumerate() {
        g.encode_forward(ctx, &mut enc, &acts[i], &acts[i + 1], m).unwrap();
    }
    enc.copy_buffer_to_buffer(&acts[layers.len()], 0, &readback, 0, (n_last * 4) as u64);
    ctx.queue().submit([enc.finish()]);
    let last = block_on(read_f32(ctx.device(), &readback, n_last)).unwrap();

    // Per layer, on the GPU's own inputs (intermediates read back by the test only, after the submit).
    let mut a_prev = x.clone();
    let mut gpu_acts = Vec::new();
    let mut worst_layer_ratio = 0f64;
    for (i, l) in layers.iter().enumerate() {
        let got = if i + 1 == layers.len() { last.clone() } else { read(ctx, &acts[i + 1], m * l.out_features()) };
        let want = l.forward_with(&a_prev, ForwardOptions::reference()).unwrap();
        let b = bounds(l, &a_prev, &vec![enabled(l); m], false);
        check(&got, &want, &b, false, &format!("{what}: layer {i} on the GPU's own input"));
        for ((g, w), b) in got.iter().zip(&want).zip(&b) {
            worst_layer_ratio = worst_layer_ratio.max((*g as f64 - *w as f64).abs() / b);
        }
        gpu_acts.push(got.clone());
        a_prev = got;
    }

    // End to end against the CPU chain, with the propagated bound E_L.
    let eps = f32::EPSILON as f64;
    let mut c_prev = x.clone();
    let mut a_in = x.clone();
    let mut e_prev = vec![0f64; x.len()];
    let mut cpu = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (out, inp) = (l.out_features(), l.in_features());
        let c = l.forward(&c_prev).unwrap();
        let g_bound = bounds(l, &a_in, &vec![enabled(l); m], false);
        let h_bound = l.error_bound(&c_prev, ForwardOptions::default(), BoundTarget::Cpu).unwrap();
        let w = abs_weff(l);
        let a = &gpu_acts[i];
        let mut e = vec![0f64; m * out];
        for r in 0..m {
            for o in 0..out {
                let prop: f64 = (0..inp).map(|k| w[o * inp + k] * e_prev[r * inp + k]).sum();
                let idx = r * out + o;
                e[idx] = prop + g_bound[idx] + h_bound[idx] + eps * ((a[idx] as f64).abs() + (c[idx] as f64).abs());
            }
        }
        cpu = c.clone();
        c_prev = c;
        a_in = a.clone();
        e_prev = e;
    }
    let (mut final_max_err, mut final_worst_ratio, mut final_max_abs) = (0f64, 0f64, 0f64);
    for (i, ((&g, &c), &e)) in last.iter().zip(&cpu).zip(&e_prev).enumerate() {
        let err = (g as f64 - c as f64).abs();
        assert!(err <= e, "{what}: final element {i}: GPU {g}, CPU chain {c}, |err| {err:e} > propagated bound {e:e}");
        final_max_err = final_max_err.max(err);
        final_worst_ratio = final_worst_ratio.max(err / e);
        final_max_abs = final_max_abs.max((c as f64).abs());
    }
    let final_max_bound = e_prev.iter().cloned().fold(0f64, f64::max);
    assert!(
        final_max_bound < 1e-2 * final_max_abs,
        "{what}: propagated bound {final_max_bound:e} is not small next to the outputs (max |y| {final_max_abs:e})"
    );
    ChainReport { worst_layer_ratio, final_max_err, final_max_bound, final_worst_ratio, final_max_abs }
}

/// Three layers, out of layer i = in of layer i+1, each with a different format.
fn chain(formats: [Format; 3], dims: [usize; 4], ranks: [&[usize]; 3], rng: &mut Rng) -> Vec<QuantLinear> {
    (0..3)
        .map(|i| {
            let mut l = make_layer(formats[i], dims[i + 1], dims[i], i != 1, ranks[i], rng);
            // One disabled adapter in the middle layer: "every enabled adapter" is what runs.
            if i == 1 && l.adapters().len() > 1 {
                l.set_adapter_enabled("ad1", false).unwrap();
            }
            l
        })
        .collect()
}

const CHAINS: [[Format; 3]; 2] = [
    [
        Format::FourBit { format: FourBitFormat::Nf4, blocksize: 64, dq: true },
        Format::Int8(Granularity::PerChannel),
        Format::Int8(Granularity::PerGroup(8)),
    ],
    [
        Format::FourBit { format: FourBitFormat::Fp4, blocksize: 32, dq: false },
        Format::Int8(Granularity::PerTensor),
        Format::FourBit { format: FourBitFormat::Nf4, blocksize: 32, dq: false },
    ],
];

#[test]
fn three_layer_chain_in_one_submission() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(0xc4a1_2026);
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
    let mut rng = Rng(21);
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
    let mut rng = Rng(33);
    // LoRA on, so both forwards use the shared `t` scratch and their own per-call uniforms and masks.
    let layer = make_layer(FORMATS[0], 36, 50, true, &[4, 3], &mut rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    let all = enabled(&layer);
    // (m, per-row adapter ids or None for "every enabled adapter", kernel choice)
    let ids17: Vec<Option<usize>> = (0..17).map(|r| [Some(0), Some(1), None][r % 3]).collect();
    let ids3 = vec![Some(1), Some(1), Some(0)];
    let calls: Vec<(usize, Option<Vec<Option<usize>>>)> =
        vec![(3, None), (64, None), (3, Some(ids3)), (17, Some(ids17)), (1, None), (3, None)];
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let mut io = Vec::new();
    for (m, ids) in &calls {
        let x = rng.vec(m * 50, 1.0);
        let (xb, yb) = (act(ctx, m * 50), act(ctx, m * 36));
        ctx.queue().write_buffer(&xb, 0, lowbit::gpu::bytes_of_f32(&x));
        gl.encode_forward_with(ctx, &mut enc, &xb, &yb, *m, ids.as_deref(), KernelChoice::default()).unwrap();
        io.push((x, yb));
    }
    ctx.queue().submit([enc.finish()]);
    for ((m, ids), (x, yb)) in calls.iter().zip(&io) {
        let got = read(ctx, yb, m * 36);
        let (want, rows) = match ids {
            None => (layer.forward_with(x, ForwardOptions::reference()).unwrap(), vec![all.clone(); *m]),
            Some(ids) => (
                layer.forward_with(x, ForwardOptions::reference().adapter_ids(ids)).unwrap(),
                ids.iter().map(|id| id.iter().copied().collect()).collect(),
            ),
        };
        check(&got, &want, &bounds(&layer, x, &rows, false), false, &format!("recorded twice: m {m} ids {ids:?}"));
    }
}

#[test]
fn encode_forward_rejects_bad_buffers() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(5);
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
    check(&got, &want, &bounds(&layer, &xs, &vec![enabled(&layer); 4], false), false, "after rejected calls");
}
