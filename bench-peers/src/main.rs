//! lowbit against candle-core's quantized CPU kernels, same shapes, same data, same run.
//!
//! Pairs (nearest formats): lowbit int8 against candle `Q8_0` (int8 codes, one f16 scale per 32 weights), lowbit
//! NF4 (block 64, f32 absmax) against `Q4_0` (4-bit, one f16 scale per 32) and `Q4_1` (4-bit, f16 scale and min
//! per 32). Kernels are called at the level a library user would call them, into preallocated buffers where the
//! API allows: lowbit `quantize_*_with` / `dequantize_into_with` / `QuantLinear::forward_with`; candle
//! `GgmlType::from_float` / `to_float` / `k_quants::matmul` (what `QMatMul::forward` runs on the CPU, without
//! the tensor wrapping; it quantizes x to Q8_0 and calls `vec_dot` per output).
//!
//! Quantize and dequantize run on one thread (candle's are single-threaded); GEMV / GEMM run on one thread and on
//! the whole pool for both libraries. `ratio` = lowbit time / candle time: below 1.0 lowbit is faster.
//!
//! `cargo run --release` in this directory (its own workspace: the lowbit workspace never compiles candle);
//! `--quick` for the 4096×4096 shape only.
//!
//! candle chooses its SIMD at compile time (`#[cfg(target_feature = "avx2")]` in `k_quants.rs`): a default
//! build runs its scalar code. For the fair comparison build with
//! `RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=../target-peers-native cargo run --release` (lowbit
//! dispatches at run time and is not changed by the flag). Report both.

use lowbit_testkit::membw;

use candle_core::quantized::k_quants::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType};
use lowbit::affine::{self, Granularity};
use lowbit::cpu::{Isa, KernelPath};
use lowbit::linear::{QuantLinear, QuantWeight};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Median seconds of `f`: one warm-up call, then calls until `budget` has passed (at least 3, at most 200).
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut t = Vec::new();
    while t.len() < 3 || (start.elapsed() < budget && t.len() < 200) {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Deterministic LLM-like data: normal-ish values (sum of uniforms) with a per-row scale.
fn data(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|i| {
            let v = u() + u() + u() + u();
            v * 0.02 * (1.0 + (i / cols % 5) as f32 * 0.3)
        })
        .collect()
}

struct Row {
    op: String,
    shape: String,
    threads: String,
    lowbit_fmt: &'static str,
    lowbit_s: f64,
    candle_fmt: &'static str,
    candle_s: f64,
}

fn candle_blocks<T: GgmlType>(w: &[f32]) -> Vec<T> {
    let mut b = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    T::from_float(w, &mut b);
    b
}

fn quant_dequant<T: GgmlType>(rows: &mut Vec<Row>, budget: Duration, name: &'static str, w: &[f32], shape: &str) {
    let one = KernelPath::single(Isa::best());
    let (out, inp) = parse(shape);
    let mut dst = vec![0.0f32; w.len()];
    let mut blocks = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    let (lf, lq, ld) = if name == "Q8_0" {
        let q = affine::quantize_with(w, &[out, inp], Granularity::PerChannel, one).unwrap();
        let lq = time(budget, || {
            black_box(affine::quantize_with(black_box(w), &[out, inp], Granularity::PerChannel, one).unwrap());
        });
        let ld = time(budget, || q.dequantize_into_with(black_box(&mut dst[..]), one).unwrap());
        ("int8 channel", lq, ld)
    } else {
        let q = lowbit::nf4::quantize_nf4_with(w, &[out, inp], 64, false, one).unwrap();
        let lq = time(budget, || {
            black_box(lowbit::nf4::quantize_nf4_with(black_box(w), &[out, inp], 64, false, one).unwrap());
        });
        let ld = time(budget, || q.dequantize_into_with(black_box(&mut dst[..]), one).unwrap());
        ("nf4 b64", lq, ld)
    };
    let cq = time(budget, || T::from_float(black_box(w), &mut blocks));
    let cd = time(budget, || T::to_float(black_box(&blocks), &mut dst));
    for (op, l, c) in [("quantize", lq, cq), ("dequantize", ld, cd)] {
        rows.push(Row {
            op: op.into(),
            shape: shape.into(),
            threads: "1".into(),
            lowbit_fmt: lf,
            lowbit_s: l,
            candle_fmt: name,
            candle_s: c,
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm<T: GgmlType>(
    rows: &mut Vec<Row>,
    budget: Duration,
    name: &'static str,
    layer: &QuantLinear,
    lf: &'static str,
    w: &[f32],
    m: usize,
    pools: &[(String, rayon::ThreadPool)],
) {
    let (out, inp) = (layer.out_features(), layer.in_features());
    let blocks: Vec<T> = candle_blocks(w);
    let x = data(m * inp, inp, 9);
    let mut y = vec![0.0f32; m * out];
    for (threads, pool) in pools {
        let path = if threads == "1" { KernelPath::single(Isa::best()) } else { KernelPath::best() };
        let l = pool.install(|| {
            time(budget, || {
                drop(black_box(
                    layer.forward_with(black_box(&x), lowbit::linear::ForwardOptions::default().path(path)).unwrap(),
                ))
            })
        });
        let c =
            pool.install(|| time(budget, || k_quants::matmul((m, inp, out), black_box(&x), &blocks, &mut y).unwrap()));
        rows.push(Row {
            op: format!("{} M={m}", if m == 1 { "gemv" } else { "gemm" }),
            shape: format!("{out}x{inp}"),
            threads: threads.clone(),
            lowbit_fmt: lf,
            lowbit_s: l,
            candle_fmt: name,
            candle_s: c,
        });
    }
}

fn parse(shape: &str) -> (usize, usize) {
    let (o, i) = shape.split_once('x').unwrap();
    (o.parse().unwrap(), i.parse().unwrap())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 150 } else { 500 });
    let all = rayon::current_num_threads();
    let pools: Vec<(String, rayon::ThreadPool)> = [1, all]
        .iter()
        .map(|&n| (n.to_string(), rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()))
        .collect();
    let limits = membw::measure(membw::DEFAULT_BYTES, if quick { 2 } else { 4 });
    let shapes: &[&str] = if quick { &["4096x4096"] } else { &["4096x4096", "4096x14336"] };
    let mut rows = Vec::new();
    for &shape in shapes {
        let (out, inp) = parse(shape);
        let w = data(out * inp, inp, 1);
        if shape == "4096x4096" {
            quant_dequant::<BlockQ8_0>(&mut rows, budget, "Q8_0", &w, shape);
            quant_dequant::<BlockQ4_0>(&mut rows, budget, "Q4_0", &w, shape);
            quant_dequant::<BlockQ4_1>(&mut rows, budget, "Q4_1", &w, shape);
        }
        let int8 = QuantLinear::new(
            QuantWeight::Int8(affine::quantize(&w, &[out, inp], Granularity::PerChannel).unwrap()),
            None,
        )
        .unwrap();
        let nf4 = QuantLinear::new(
            QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], 64, false).unwrap()),
            None,
        )
        .unwrap();
        for m in [1, 8] {
            gemm::<BlockQ8_0>(&mut rows, budget, "Q8_0", &int8, "int8 channel", &w, m, &pools);
            gemm::<BlockQ4_0>(&mut rows, budget, "Q4_0", &nf4, "nf4 b64", &w, m, &pools);
            gemm::<BlockQ4_1>(&mut rows, budget, "Q4_1", &nf4, "nf4 b64", &w, m, &pools);
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "lowbit vs candle-core 0.9 (quantized CPU kernels), best ISA {}; {all} threads; load average {}",
        Isa::best(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "memory limits (GB/s, {} MiB buffers): 1 thread read {:.1} write {:.1} copy {:.1}; {} threads read {:.1} write {:.1} copy {:.1}\n",
        limits.bytes >> 20,
        membw::gb_s(limits.single.read),
        membw::gb_s(limits.single.write),
        membw::gb_s(limits.single.copy),
        limits.threads,
        membw::gb_s(limits.all.read),
        membw::gb_s(limits.all.write),
        membw::gb_s(limits.all.copy),
    );
    println!(
        "| op | shape | threads | lowbit format | lowbit ms | candle format | candle ms | ratio (lowbit/candle time) |"
    );
    println!("|---|---|---:|---|---:|---|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {} | {:.3} | {:.2} |",
            r.op,
            r.shape,
            r.threads,
            r.lowbit_fmt,
            r.lowbit_s * 1e3,
            r.candle_fmt,
            r.candle_s * 1e3,
            r.lowbit_s / r.candle_s
        );
    }
}
