//! Every GPU kernel variant the adapter supports against the CPU f64 reference (`forward_reference` /
//! `forward_batch_reference`), on the preferred adapter (lavapipe's Vulkan llvmpipe in CI) and on the GL
//! backend where one exists (an adapter without f16 and subgroups).
//!
//! Without an adapter the tests print "skipped: no GPU adapter" and pass, unless `LOWBIT_REQUIRE_GPU=1`,
//! in which case a missing adapter fails. (The GL run is "where available": it never fails for lack of GL.)
//!
//! # Tolerances (stated, not tuned)
//! f32 variants decode exactly the reference's weights (same f32 operations), except that the
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

use lowbit::affine::{self, Granularity};
use lowbit::gpu::{
    block_on, wgpu, ContextOptions, GpuContext, GpuLinear, KernelChoice, KernelKey, KernelOp, UploadOptions,
};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::nf4::{self, BlockScales, FourBitFormat};
use std::sync::OnceLock;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn require() -> bool {
    std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The preferred adapter (shared by all tests of this binary).
fn ctx() -> Option<&'static GpuContext> {
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
fn gl_ctx() -> Option<&'static GpuContext> {
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
enum Format {
    Int8(Granularity),
    FourBit { format: FourBitFormat, blocksize: usize, dq: bool },
}

const FORMATS: &[Format] = &[
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 64, dq: false },
    Format::FourBit { format: FourBitFormat::Nf4, blocksize: 32, dq: true },
    Format::FourBit { format: FourBitFormat::Fp4, blocksize: 32, dq: false },
    Format::Int8(Granularity::PerTensor),
    Format::Int8(Granularity::PerChannel),
    Format::Int8(Granularity::PerGroup(5)),
];

fn make_layer(format: Format, out: usize, inp: usize, bias: bool, ranks: &[usize], rng: &mut Rng) -> QuantLinear {
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

/// Per-element bounds as stated in the module docs; `f16` adds the f16 product term.
fn bounds(layer: &QuantLinear, x: &[f32], rows_adapters: &[Vec<usize>], f16: bool) -> Vec<f64> {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let w = layer.weight().dequantize_reference();
    let eps = f32::EPSILON as f64;
    let uh = 2f64.powi(-11);
    let sub = 2f64.powi(-24);
    // Double-quantization FMA allowance per weight: |T[q]|·(|map[c]·nested| + |offset|).
    let dq_term: Option<Vec<f64>> = match layer.weight() {
        QuantWeight::FourBit(t) => match t.scales() {
            BlockScales::Double(dq) => Some(
                (0..out * inp)
                    .map(|e| {
                        let byte = t.packed()[e / 2];
                        let q = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                        let b = e / t.blocksize();
                        let c = dq.codes()[b] as usize;
                        let s = (dq.map()[c] as f64 * dq.nested_absmax()[b / dq.nested_blocksize()] as f64).abs()
                            + (dq.offset() as f64).abs();
                        (t.table()[q as usize] as f64).abs() * s
                    })
                    .collect(),
            ),
            BlockScales::Plain(_) => None,
        },
        QuantWeight::Int8(_) => None,
    };
    let mut bnd = Vec::new();
    for (r, ads) in rows_adapters.iter().enumerate() {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            let s_base: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let mut bound = (inp as f64 + 3.0) * eps * s_base;
            if let Some(dq) = &dq_term {
                bound +=
                    eps * xr.iter().zip(&dq[o * inp..(o + 1) * inp]).map(|(&a, &d)| (a as f64).abs() * d).sum::<f64>();
            }
            if f16 {
                bound += xr
                    .iter()
                    .zip(wr)
                    .map(|(&a, &b)| {
                        let (a, b) = ((a as f64).abs(), (b as f64).abs());
                        3.01 * uh * a * b + sub * (a + b + 1.0)
                    })
                    .sum::<f64>();
            }
            if let Some(bias) = layer.bias() {
                bound += 3.0 * eps * (bias[o] as f64).abs();
            }
            for &a in ads {
                let ad = &layer.adapters()[a];
                let rank = ad.rank();
                let mut s_lora = 0.0;
                for k in 0..rank {
                    let t: f64 = xr
                        .iter()
                        .zip(&ad.a()[k * inp..(k + 1) * inp])
                        .map(|(&x, &a)| (x as f64 * a as f64).abs())
                        .sum();
                    s_lora += t * (ad.b()[o * rank + k] as f64).abs();
                }
                bound += (inp + rank + 3) as f64 * eps * (ad.scaling() as f64).abs() * s_lora;
            }
            bnd.push(bound + 1e-30);
        }
    }
    bnd
}

fn check(got: &[f32], want: &[f32], bound: &[f64], f16: bool, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den) = (0f64, 0f64);
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let allowed = b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5;
        assert!(err <= allowed, "{what}: element {i}: got {g}, reference {w}, |err| {err:e} > bound {allowed:e}");
        num += err * err;
        den += (w as f64) * (w as f64);
    }
    let nse = if den > 0.0 { num / den } else { num };
    let limit = if f16 { 1e-5 } else { 1e-10 };
    assert!(nse <= limit, "{what}: normalised squared error {nse:e} > {limit:e}");
}

/// The kernel choices `ctx` supports: GEMV (subgroups and plain), GEMM (f32 and f16).
fn choices(ctx: &GpuContext) -> Vec<KernelChoice> {
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
fn check_layer(ctx: &GpuContext, layer: &QuantLinear, gl: &GpuLinear, ms: &[usize], rng: &mut Rng, what: &str) {
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
                    layer.forward_reference(&x).unwrap(),
                    vec![
                        layer.adapters().iter().enumerate().filter(|(_, a)| a.is_enabled()).map(|(i, _)| i).collect();
                        m
                    ],
                ),
                Some(ids) => (
                    layer.forward_batch_reference(&x, ids).unwrap(),
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

fn run_matrix(ctx: &GpuContext, formats: &[Format], shapes: &[(usize, usize)], ms: &[usize], seed: u64) {
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

const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 33), (13, 100), (3, 65)];
const MS: &[usize] = &[1, 3, 4, 5, 17, 64];

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
    let mut rng = Rng(99);
    for format in FORMATS {
        // Binding limit 2048 bytes: codes of 61x90 (2745 B at 4 bits, 5490 B at 8) need several chunks.
        let layer = make_layer(*format, 61, 90, true, &[2, 1], &mut rng);
        let split = GpuLinear::upload_with(ctx, &layer, UploadOptions { max_binding_bytes: Some(2048) }).unwrap();
        assert!(split.num_chunks() > 1, "{format:?}: expected several chunks, got {}", split.num_chunks());
        check_layer(ctx, &layer, &split, &[1, 3, 5], &mut rng, &format!("{format:?} split in {}", split.num_chunks()));
    }
}

#[test]
fn gl_backend_variants() {
    let Some(ctx) = gl_ctx() else { return };
    run_matrix(ctx, FORMATS, &SHAPES[1..3], &[1, 5, 17], 4242);
    // Variants needing features GL lacks are errors, not faults.
    let mut rng = Rng(5);
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
fn default_forward_and_buffer_reuse() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(7);
    let mut layer = make_layer(FORMATS[1], 9, 70, true, &[2, 3], &mut rng);
    layer.set_adapter_enabled("ad1", false).unwrap();
    let mut gl = GpuLinear::upload(ctx, &layer).unwrap();
    assert_eq!(gl.adapter_names(), ["ad0", "ad1"]);
    for m in [3, 1, 20, 2, 0] {
        let x = rng.vec(m * 70, 1.0);
        let got = gl.forward_blocking(ctx, &x, m).unwrap();
        let want = layer.forward_reference(&x).unwrap();
        check(&got, &want, &bounds(&layer, &x, &vec![vec![0]; m], false), false, &format!("default m={m}"));
    }
    // Toggling on the GPU side matches toggling on the CPU side.
    gl.set_adapter_enabled("ad1", true).unwrap();
    layer.set_adapter_enabled("ad1", true).unwrap();
    let x = rng.vec(2 * 70, 1.0);
    let got = gl.forward_blocking(ctx, &x, 2).unwrap();
    let want = layer.forward_reference(&x).unwrap();
    check(&got, &want, &bounds(&layer, &x, &vec![vec![0, 1]; 2], false), false, "re-enabled");
    let ids = [Some(1), None];
    let got = gl.forward_batch_blocking(ctx, &x, 2, &ids).unwrap();
    let want = layer.forward_batch_reference(&x, &ids).unwrap();
    check(&got, &want, &bounds(&layer, &x, &[vec![1], vec![]], false), false, "batch");
    // Timing helper returns the same result.
    let (y, _ns) = gl.time_forward_blocking(ctx, &x, 2, KernelChoice::default(), 3).unwrap();
    assert_eq!(y.len(), 2 * 9);
    assert!(ctx.cached_pipelines() >= 1);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(11);
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
