//! Shared helpers of the GPU conformance tests (see `tests/gpu_kernels.rs` for the stated tolerances).
#![allow(dead_code)]

pub use lowbit::affine::{self, Granularity};
use lowbit::gpu::{block_on, read_f32, wgpu, ContextOptions, GpuContext, GpuLinear, KernelChoice, KernelKey, KernelOp};
use lowbit::linear::{Agreement, BoundTarget, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::nf4::{self, FourBitFormat};
use std::sync::OnceLock;

/// The one RNG of lowbit's harnesses (`lowbit-testkit`): `Rng::new(seed)`, `vec(n, scale)` uniform in ±scale.
pub use lowbit_testkit::Rng;

/// The preferred adapter (shared by all tests of this binary; testkit's skip / LOWBIT_REQUIRE_GPU rule).
pub fn ctx() -> Option<&'static GpuContext> {
    lowbit_testkit::gpu::test_context()
}

/// The GL backend's adapter, if any (never required).
pub fn gl_ctx() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    let c = CTX.get_or_init(|| {
        let opts = ContextOptions { backends: Some(wgpu::Backends::GL), ..Default::default() };
        match GpuContext::with_options_blocking(&opts) {
            Ok(c) => {
                eprintln!("GL adapter: {}, features {:?}", c.adapter_name(), c.features());
                Some(c)
            }
            Err(e) => {
                eprintln!("*** skipped: no GL adapter ({e}) ***");
                None
            }
        }
    });
    c.as_ref()
}

#[derive(Clone, Copy, Debug)]
pub enum Format {
    Int8(Granularity),
    FourBit { format: FourBitFormat, blocksize: usize, dq: bool },
}

pub const FORMATS: &[Format] = &[
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 64, dq: false },
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 32, dq: true },
    Format::FourBit { format: FourBitFormat::Fp4, blocksize: 32, dq: false },
    Format::Int8(Granularity::PerTensor),
    Format::Int8(Granularity::PerChannel),
    Format::Int8(Granularity::PerGroup(5)),
];

pub fn make_layer(format: Format, out: usize, inp: usize, bias: bool, ranks: &[usize], rng: &mut Rng) -> QuantLinear {
    let w = rng.vec(out * inp, 0.5);
    let weight = match format {
        Format::Int8(g) => QuantWeight::Int8(affine::quantize(&w, &[out, inp], g).unwrap()),
        Format::FourBit { format, blocksize, dq } => {
            QuantWeight::FourBit(nf4::quantize_4bit(format, &w, &[out, inp], blocksize, dq).unwrap())
        }
    };
    let bias = bias.then(|| rng.vec(out, 1.0));
    let mut layer = QuantLinear::new(weight, bias).unwrap();
    for (i, &r) in ranks.iter().enumerate() {
        let a = rng.vec(r * inp, 0.3);
        let b = rng.vec(out * r, 0.3);
        layer.add_adapter(LoraAdapter::new(format!("ad{i}"), r, a, b, 2.0 * r as f32, i % 2 == 1).unwrap()).unwrap();
    }
    layer
}

/// The library's stated GPU bound (`QuantLinear::error_bound` with `BoundTarget::Gpu`, or `GpuF16` for f16
/// tiles) for rows applying `rows_adapters[r]`: every enabled adapter on every row, or at most one per row.
pub fn bounds(layer: &QuantLinear, x: &[f32], rows_adapters: &[Vec<usize>], f16: bool) -> Vec<f64> {
    let enabled: Vec<usize> = (0..layer.adapters().len()).filter(|&a| layer.adapters()[a].is_enabled()).collect();
    let ids: Vec<Option<usize>> = rows_adapters
        .iter()
        .map(|r| {
            assert!(r.len() <= 1 || *r == enabled, "a row applies all enabled adapters or at most one");
            r.first().copied()
        })
        .collect();
    let opts = if rows_adapters.iter().all(|r| *r == enabled) {
        ForwardOptions::default()
    } else {
        ForwardOptions::default().adapter_ids(&ids)
    };
    layer.error_bound(x, opts, target(f16)).expect("a valid input")
}

fn target(f16: bool) -> BoundTarget {
    if f16 {
        BoundTarget::GpuF16
    } else {
        BoundTarget::Gpu
    }
}

/// Every element within its bound and the normalised squared error within the target's limit
/// (`Agreement::ok`).
pub fn check(got: &[f32], want: &[f32], bound: &[f64], f16: bool, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let a = Agreement::compare(got, want, bound);
    assert!(a.ok(target(f16)), "{what}: {a:?} (allowed: 0 outside, nse ≤ {:e})", target(f16).nse_limit());
}

/// The kernel choices `ctx` supports: GEMV (subgroups and plain), GEMM (f32 and f16).
pub fn choices(ctx: &GpuContext) -> Vec<KernelChoice> {
    let f = ctx.features();
    let mut v = vec![
        KernelChoice { op: Some(KernelOp::Gemv), subgroups: Some(false), f16: None },
        KernelChoice { op: Some(KernelOp::Gemm), subgroups: None, f16: Some(false) },
    ];
    if f.subgroups {
        v.push(KernelChoice { op: Some(KernelOp::Gemv), subgroups: Some(true), f16: None });
    }
    if f.f16 {
        v.push(KernelChoice { op: Some(KernelOp::Gemm), subgroups: None, f16: Some(true) });
    }
    v
}

/// Runs one layer through every supported variant and adapter selection, for each M.
pub fn check_layer(ctx: &GpuContext, layer: &QuantLinear, gl: &GpuLinear, ms: &[usize], rng: &mut Rng, what: &str) {
    let inp = layer.in_features();
    let n_ad = layer.adapters().len();
    for &m in ms {
        let x = rng.vec(m * inp, 1.0);
        // Selections: all enabled adapters; a mixed per-row batch (none, each adapter in turn).
        let mut sels: Vec<Option<Vec<Option<usize>>>> = vec![None];
        if n_ad > 0 {
            sels.push(Some((0..m).map(|r| if r % (n_ad + 1) == n_ad { None } else { Some(r % (n_ad + 1)) }).collect()));
        }
        for sel in &sels {
            let (want, rows): (Vec<f32>, Vec<Vec<usize>>) = match sel {
                None => (
                    layer.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap(),
                    vec![
                        layer.adapters().iter().enumerate().filter(|(_, a)| a.is_enabled()).map(|(i, _)| i).collect();
                        m
                    ],
                ),
                Some(ids) => (
                    layer.forward_with(&x, lowbit::linear::ForwardOptions::reference().adapter_ids(ids)).unwrap(),
                    ids.iter().map(|id| id.iter().copied().collect()).collect(),
                ),
            };
            for choice in choices(ctx) {
                let key: KernelKey = gl.kernel_for(ctx, m, choice).unwrap();
                let got = block_on(gl.forward_with(ctx, &x, m, sel.as_deref(), choice)).unwrap();
                let b = bounds(layer, &x, &rows, key.f16);
                check(&got, &want, &b, key.f16, &format!("{what} m={m} sel={:?} {}", sel.is_some(), key.name()));
            }
        }
    }
}

pub fn run_matrix(ctx: &GpuContext, formats: &[Format], shapes: &[(usize, usize)], ms: &[usize], seed: u64) {
    let mut rng = Rng::new(seed);
    for (fi, &format) in formats.iter().enumerate() {
        for (si, &(out, inp)) in shapes.iter().enumerate() {
            let ranks: &[usize] = match (fi + si) % 3 {
                0 => &[],
                1 => &[4],
                _ => &[3, 8, 1],
            };
            let layer = make_layer(format, out, inp, (fi + si) % 2 == 0, ranks, &mut rng);
            let gl = GpuLinear::upload(ctx, &layer).unwrap();
            check_layer(ctx, &layer, &gl, ms, &mut rng, &format!("{format:?} [{out}x{inp}] ranks {ranks:?}"));
        }
    }
}

pub const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 33), (13, 100), (3, 65)];
pub const MS: &[usize] = &[1, 3, 4, 5, 17, 64];

// ---- encode_forward helpers (tests/gpu_chain.rs and tests/gpu_gl.rs; the bounds are derived in
// tests/gpu_chain.rs's module docs) ----

pub fn buffer(ctx: &GpuContext, floats: usize, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test"),
        size: (floats.max(1) * 4) as u64,
        usage,
        mapped_at_creation: false,
    })
}

pub fn act(ctx: &GpuContext, floats: usize) -> wgpu::Buffer {
    use wgpu::BufferUsages as U;
    buffer(ctx, floats, U::STORAGE | U::COPY_DST | U::COPY_SRC)
}

/// Copies `src` (first `n` floats) to a mappable buffer in a new submit and reads it.
pub fn read(ctx: &GpuContext, src: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let dst = buffer(ctx, n, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(src, 0, &dst, 0, (n * 4) as u64);
    ctx.queue().submit([enc.finish()]);
    block_on(read_f32(ctx.device(), &dst, n)).unwrap()
}

/// Indices of the adapters `forward` applies to every row.
pub fn enabled(layer: &QuantLinear) -> Vec<usize> {
    layer.adapters().iter().enumerate().filter(|(_, a)| a.is_enabled()).map(|(i, _)| i).collect()
}

/// `|W_eff|` elementwise, `W_eff = dequant(W) + Σ s·B·A` over the enabled adapters, computed in f64
/// (row-major [out, in]); its own rounding (~1e-16 relative) is negligible next to the f32 terms.
pub fn abs_weff(layer: &QuantLinear) -> Vec<f64> {
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

pub struct ChainReport {
    pub worst_layer_ratio: f64,
    pub final_max_err: f64,
    pub final_max_bound: f64,
    pub final_worst_ratio: f64,
    pub final_max_abs: f64,
}

/// Runs `layers` as one chain on `m` rows: one encoder, one submit, reads back only the last output; then
/// checks every layer and the end-to-end result as described in the module docs.
pub fn run_chain(ctx: &GpuContext, layers: &[QuantLinear], m: usize, rng: &mut Rng, what: &str) -> ChainReport {
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
        let b = l.error_bound(&a_prev, ForwardOptions::default(), BoundTarget::Gpu).unwrap();
        let ag = Agreement::compare(&got, &want, &b);
        assert!(ag.ok(BoundTarget::Gpu), "{what}: layer {i} on the GPU's own input: {ag:?}");
        worst_layer_ratio = worst_layer_ratio.max(ag.worst_ratio);
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
        let g_bound = l.error_bound(&a_in, ForwardOptions::default(), BoundTarget::Gpu).unwrap();
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
pub fn chain(formats: [Format; 3], dims: [usize; 4], ranks: [&[usize]; 3], rng: &mut Rng) -> Vec<QuantLinear> {
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

pub const CHAINS: [[Format; 3]; 2] = [
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

/// Records the same layer (with LoRA) six times into one encoder, with different x / y / m and adapter
/// selections, submits once and checks every output against the reference.
pub fn record_twice(ctx: &GpuContext, rng: &mut Rng) {
    // LoRA on, so both forwards use the shared `t` scratch and their own per-call uniforms and masks.
    let layer = make_layer(FORMATS[0], 36, 50, true, &[4, 3], rng);
    let gl = GpuLinear::upload(ctx, &layer).unwrap();
    // (m, per-row adapter ids, or None for "every enabled adapter")
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
        let opts = match ids {
            None => ForwardOptions::default(),
            Some(ids) => ForwardOptions::default().adapter_ids(ids),
        };
        let want = layer.forward_with(x, opts.path(lowbit::cpu::KernelPath::REFERENCE)).unwrap();
        let ag = Agreement::compare(&got, &want, &layer.error_bound(x, opts, BoundTarget::Gpu).unwrap());
        assert!(ag.ok(BoundTarget::Gpu), "recorded together: m {m} ids {ids:?}: {ag:?}");
    }
}
