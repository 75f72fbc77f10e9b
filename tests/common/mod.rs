//! Shared helpers of the GPU conformance tests (see `tests/gpu_kernels.rs` for the stated tolerances).
#![allow(dead_code)]

pub use lowbit::affine::{self, Granularity};
use lowbit::gpu::{block_on, wgpu, ContextOptions, GpuContext, GpuLinear, KernelChoice, KernelKey, KernelOp};
use lowbit::linear::{Agreement, BoundTarget, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::nf4::{self, FourBitFormat};
use std::sync::OnceLock;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

pub fn require() -> bool {
    std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The preferred adapter (shared by all tests of this binary).
pub fn ctx() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    let c = CTX.get_or_init(|| match GpuContext::new_blocking() {
        Ok(c) => {
            eprintln!(
                "GPU adapter: {} ({:?}), features {:?}",
                c.adapter_name(),
                c.adapter_info().backend,
                c.features()
            );
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
    let mut rng = Rng(seed);
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
