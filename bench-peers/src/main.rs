//! lowbit against its peers' quantized CPU kernels, same shapes, same data, same run: candle-core always, and
//! ggml (llama.cpp's kernels, with its load-time repacking) when `--ggml PATH` names the `ggml-kernels` binary
//! that `ggml/build.sh` builds outside the tracked tree.
//!
//! Pairs (nearest formats): lowbit int8 against candle `Q8_0` (int8 codes, one f16 scale per 32 weights), lowbit
//! NF4 (block 64, f32 absmax) against `Q4_0` (4-bit, one f16 scale per 32) and `Q4_1` (4-bit, f16 scale and min
//! per 32). Kernels are called at the level a library user would call them, into preallocated buffers where the
//! API allows: lowbit `quantize_*_with` / `dequantize_into_with` / `QuantLinear::forward_with`; candle
//! `GgmlType::from_float` / `to_float` / `k_quants::matmul` (what `QMatMul::forward` runs on the CPU, without
//! the tensor wrapping; it quantizes x to Q8_0 and calls `vec_dot` per output).
//!
//! ggml's rows use its nearest formats too (`q8_0`; `q4_0`, `q4_1` and `iq4_nl`, whose 16-entry non-linear table
//! is NF4's closest relative), once with plain weights and once per extra CPU buffer type the build has
//! (`CPU_REPACK`: Q4_0 / IQ4_NL interleaved 8×8 at load; `AMX` on CPUs with AMX-INT8), the weight set through it
//! as llama.cpp does when it loads a model; its mul_mat quantizes `x` to Q8_0 and runs integer dot products.
//! Each ggml figure comes from a child process that times the kernel itself (warm, median, the same budget).
//!
//! Quantize and dequantize run on one thread (candle's and ggml's are single-threaded); GEMV / GEMM run on one
//! thread and on all of them for every library. lowbit's GEMV / GEMM are timed with f32 activations (the
//! exact default) and with int8 activations (`Activations::Int8`, the peers' arithmetic). Rounds are interleaved
//! (every measurement once per round, in the same order); the tables give medians over rounds, and
//! `ratio` = lowbit's best time ÷ the best peer's time: below 1.0 lowbit is faster.
//!
//! `cargo run --release -- [--ggml PATH] [--rounds N] [--quick] [--only TEXT]` in this directory (its own
//! workspace: the lowbit workspace never compiles candle); `--quick` for the 4096×4096 shape only; `--only` keeps
//! the rows whose "op shape threads format" contains TEXT (e.g. `--only "gemv M=1 4096x4096 2"`).
//!
//! candle chooses its SIMD at compile time (`#[cfg(target_feature = "avx2")]` in `k_quants.rs`): a default
//! build runs its scalar code. For the fair comparison build with
//! `RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=../target-peers-native cargo run --release` (lowbit
//! dispatches at run time and is not changed by the flag). Report both.

use lowbit_testkit::membw;
use lowbit_testkit::synthetic::peers_data;

use candle_core::quantized::k_quants::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType};
use lowbit::affine::{self, Granularity};
use lowbit::cpu::{Isa, KernelPath};
use lowbit::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight, Workspace};
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
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

/// One measurement: seconds per call, or `None` when the kernel does not exist for that case (printed as `–`).
type Measure = Box<dyn FnMut(Duration) -> Option<f64>>;

/// One line of the table: lowbit's modes and the peers, each measured once per round.
struct Row {
    op: String,
    shape: String,
    threads: usize,
    lowbit_fmt: &'static str,
    lowbit: Vec<(&'static str, Measure)>,
    peers: Vec<(String, Measure)>,
}

fn candle_blocks<T: GgmlType>(w: &[f32]) -> Vec<T> {
    let mut b = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    T::from_float(w, &mut b);
    b
}

/// The `ggml-kernels` child process: one warm, median-of-calls measurement per call.
#[derive(Clone)]
struct Ggml {
    bin: PathBuf,
    bufts: Vec<String>,
}

impl Ggml {
    fn new(bin: PathBuf) -> Ggml {
        let out = Command::new(&bin).arg("bufts").output().unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        assert!(out.status.success(), "{} bufts failed", bin.display());
        let bufts = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        Ggml { bin, bufts }
    }

    fn run(&self, args: &[String]) -> Option<f64> {
        let out = Command::new(&self.bin).args(args).output().expect("ggml-kernels runs");
        let text = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => text.trim().strip_prefix("seconds ").and_then(|s| s.parse().ok()),
            Some(2) => None,
            // ggml's AMX kernels crash on some VMs (tile use without the kernel's permission): no figure.
            None => {
                eprintln!("ggml-kernels {args:?} was killed by a signal: no figure");
                None
            }
            _ => panic!("ggml-kernels {args:?} failed: {text}{}", String::from_utf8_lossy(&out.stderr)),
        }
    }

    fn measure(&self, args: Vec<String>) -> Measure {
        let me = self.clone();
        Box::new(move |budget| {
            let mut a = args.clone();
            a.push(budget.as_millis().to_string());
            me.run(&a)
        })
    }
}

fn strings(a: &[&dyn ToString]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The conversion rows of issue 16's table, on one thread (candle's and ggml's converters are single-threaded):
/// int8 calibrate + quantize per channel, int8 quantize with known parameters, int8 dequantize per tensor /
/// channel / group:128 (all against Q8_0, one f16 scale per 32 weights), and NF4 block 64 quantize and dequantize
/// (against the 4-bit formats). lowbit's int8 conversions and every dequantize write into buffers allocated
/// once; NF4 quantize returns a new tensor per call (its API has no `_into` form), while candle's and ggml's
/// write into preallocated blocks. Each row measures its peers itself (the same peer may appear in several rows).
fn convert_rows(rows: &mut Vec<Row>, w: &Arc<Vec<f32>>, shape: &str, ggml: Option<&Ggml>) {
    let one = KernelPath::single(Isa::best());
    let (out, inp) = parse(shape);
    let dims = [out, inp];
    let n = w.len();
    fn candle<T: GgmlType + 'static>(name: &str, w: &Arc<Vec<f32>>, quantize: bool, v: &mut Vec<(String, Measure)>) {
        let m: Measure = if quantize {
            let w = w.clone();
            let mut blocks = vec![T::zeros(); w.len() / T::BLCK_SIZE];
            Box::new(move |b| Some(time(b, || T::from_float(black_box(&w), &mut blocks))))
        } else {
            let blocks: Vec<T> = candle_blocks(w);
            let mut dst = vec![0.0f32; w.len()];
            Box::new(move |b| Some(time(b, || T::to_float(black_box(&blocks), &mut dst))))
        };
        v.push((format!("candle {name}"), m));
    }
    let peers = |quantize: bool, int8: bool| {
        let mut v: Vec<(String, Measure)> = Vec::new();
        let ggml_types: &[&str] = if int8 {
            candle::<BlockQ8_0>("Q8_0", w, quantize, &mut v);
            &["q8_0"]
        } else {
            candle::<BlockQ4_0>("Q4_0", w, quantize, &mut v);
            candle::<BlockQ4_1>("Q4_1", w, quantize, &mut v);
            &["q4_0", "q4_1", "iq4_nl"]
        };
        if let Some(g) = ggml {
            let op = if quantize { "quantize" } else { "dequantize" };
            for t in ggml_types {
                v.push((format!("ggml {t}"), g.measure(strings(&[&op, t, &out, &inp]))));
            }
        }
        v
    };
    let mut push = |op: &str, fmt: &'static str, lowbit: Measure, peers: Vec<(String, Measure)>| {
        rows.push(Row {
            op: op.into(),
            shape: shape.into(),
            threads: 1,
            lowbit_fmt: fmt,
            lowbit: vec![("f32", lowbit)],
            peers,
        })
    };

    // int8: calibrate + quantize, and quantize with the parameters known (the calibration done once).
    let channel = Granularity::PerChannel;
    let (w1, mut codes) = (w.clone(), vec![0u8; n]);
    let mut params = vec![affine::AffineParams::EMPTY; channel.num_params(out, inp)];
    let calibrate_and_quantize: Measure = Box::new(move |b| {
        Some(time(b, || {
            affine::quantize_into_with(black_box(&w1[..]), &dims, channel, &mut codes, &mut params, one).unwrap()
        }))
    });
    push("quantize", "int8 channel", calibrate_and_quantize, peers(true, true));
    let (w1, mut codes) = (w.clone(), vec![0u8; n]);
    let params = affine::calibrate(&w[..], &dims, channel).unwrap();
    let known_params: Measure = Box::new(move |b| {
        Some(time(b, || {
            affine::quantize_with_params_into(black_box(&w1[..]), &dims, channel, &params, &mut codes, one).unwrap()
        }))
    });
    push("quantize", "int8 channel, known params", known_params, peers(true, true));
    for (gran, fmt) in [
        (Granularity::PerTensor, "int8 tensor"),
        (channel, "int8 channel"),
        (Granularity::PerGroup(128), "int8 group:128"),
    ] {
        let (q, mut dst) = (affine::quantize(&w[..], &dims, gran).unwrap(), vec![0.0f32; n]);
        let d: Measure =
            Box::new(move |b| Some(time(b, || q.dequantize_into_with(black_box(&mut dst[..]), one).unwrap())));
        push("dequantize", fmt, d, peers(false, true));
    }

    // NF4, block 64, f32 absmax.
    let w1 = w.clone();
    let q: Measure = Box::new(move |b| {
        Some(time(b, || {
            black_box(lowbit::nf4::quantize_nf4_with(black_box(&w1[..]), &dims, 64, false, one).unwrap());
        }))
    });
    push("quantize", "nf4 b64", q, peers(true, false));
    let (q, mut dst) = (lowbit::nf4::quantize_nf4(&w[..], &dims, 64, false).unwrap(), vec![0.0f32; n]);
    let d: Measure = Box::new(move |b| Some(time(b, || q.dequantize_into_with(black_box(&mut dst[..]), one).unwrap())));
    push("dequantize", "nf4 b64", d, peers(false, false));
}

/// lowbit's forward into caller buffers on `pool`, with `activations`. Each measurement times a fresh copy of
/// the layer (made before the clock starts): ggml's figures come from a new process per measurement, so each
/// round draws new memory for both libraries (one run kept a plain NF4 layer's placement for all of its rounds
/// at 1.12–1.19× ggml's time where other runs of the same code measured 0.99–1.02×).
fn lowbit_forward(layer: Arc<QuantLinear>, m: usize, threads: usize, activations: Activations) -> Measure {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let inp = layer.in_features();
    let x = peers_data(m * inp, inp, 9);
    let mut y = vec![0.0f32; m * layer.out_features()];
    let mut ws = Workspace::default();
    let path = if threads == 1 { KernelPath::single(Isa::best()) } else { KernelPath::best() };
    Box::new(move |b| {
        let opts = ForwardOptions::default().path(path).activations(activations);
        let fresh = QuantLinear::clone(&layer);
        Some(pool.install(|| time(b, || fresh.forward_into_with(black_box(&x[..]), &mut y, &mut ws, opts).unwrap())))
    })
}

fn candle_matmul<T: GgmlType + 'static>(w: &[f32], m: usize, out: usize, inp: usize, threads: usize) -> Measure {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let blocks: Vec<T> = candle_blocks(w);
    let x = peers_data(m * inp, inp, 9);
    let mut y = vec![0.0f32; m * out];
    Box::new(move |b| {
        Some(pool.install(|| time(b, || k_quants::matmul((m, inp, out), black_box(&x), &blocks, &mut y).unwrap())))
    })
}

#[allow(clippy::too_many_arguments)]
fn matmul_rows(
    rows: &mut Vec<Row>,
    w: &[f32],
    shape: &str,
    ms: &[usize],
    threads: &[usize],
    int8: &Arc<QuantLinear>,
    nf4: &Arc<QuantLinear>,
    nf4_dq: &Arc<QuantLinear>,
    ggml: Option<&Ggml>,
) {
    let (out, inp) = parse(shape);
    for &m in ms {
        for &t in threads {
            // NF4 with double-quantized scales (QLoRA's default) at M = 1, where the bytes read set the time.
            let formats: &[(&'static str, &Arc<QuantLinear>)] = if m == 1 {
                &[("int8 channel", int8), ("nf4 b64", nf4), ("nf4 b64+dq", nf4_dq)]
            } else {
                &[("int8 channel", int8), ("nf4 b64", nf4)]
            };
            for &(fmt, layer) in formats {
                let is_int8 = fmt.starts_with("int8");
                // The int8-activation rows with the interleaved layout built, as an engine would at load.
                let act8_layer = Arc::new({
                    let mut l = QuantLinear::clone(layer);
                    l.build_act8_layout();
                    l
                });
                let mut peers: Vec<(String, Measure)> = Vec::new();
                let ggml_types: &[&str] = if is_int8 {
                    peers.push(("candle Q8_0".into(), candle_matmul::<BlockQ8_0>(w, m, out, inp, t)));
                    &["q8_0"]
                } else {
                    peers.push(("candle Q4_0".into(), candle_matmul::<BlockQ4_0>(w, m, out, inp, t)));
                    peers.push(("candle Q4_1".into(), candle_matmul::<BlockQ4_1>(w, m, out, inp, t)));
                    &["q4_0", "q4_1", "iq4_nl"]
                };
                if let Some(g) = ggml {
                    for ty in ggml_types {
                        for buft in std::iter::once("CPU").chain(g.bufts.iter().map(String::as_str)) {
                            let label = if buft == "CPU" { format!("ggml {ty}") } else { format!("ggml {ty} {buft}") };
                            peers.push((label, g.measure(strings(&[&"mul_mat", ty, &out, &inp, &m, &t, &buft]))));
                        }
                    }
                }
                rows.push(Row {
                    op: format!("{} M={m}", if m == 1 { "gemv" } else { "gemm" }),
                    shape: shape.into(),
                    threads: t,
                    lowbit_fmt: fmt,
                    lowbit: vec![
                        ("f32", lowbit_forward(layer.clone(), m, t, Activations::F32)),
                        ("act8", lowbit_forward(act8_layer.clone(), m, t, Activations::Int8)),
                    ],
                    peers,
                });
            }
        }
    }
}

fn parse(shape: &str) -> (usize, usize) {
    let (o, i) = shape.split_once('x').unwrap();
    (o.parse().unwrap(), i.parse().unwrap())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    // As the `lowbit` tool runs: the second thread stays awake between splits.
    lowbit::cpu::set_thread_linger(std::time::Duration::from_micros(300));
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = arg_value(&args, "--rounds").map_or(3, |r| r.parse().expect("--rounds N"));
    let ggml = arg_value(&args, "--ggml").map(|p| Ggml::new(PathBuf::from(p)));
    let budget = Duration::from_millis(if quick { 150 } else { 400 });
    let all = rayon::current_num_threads();
    let threads: Vec<usize> = if all > 1 { vec![1, all] } else { vec![1] };
    let limits = membw::measure(membw::DEFAULT_BYTES, if quick { 2 } else { 4 });
    let shapes: &[&str] = if quick { &["4096x4096"] } else { &["4096x4096", "4096x14336"] };
    // The read limit of a buffer the size of each shape's 4-bit weight: where the weight stays in a large
    // last-level cache (as 9–33 MB do on many servers), this, not the 256 MiB figure, bounds a GEMV. Measured
    // again after every round, keeping the best figures (see `best_limits`).
    let measure_weight_limits = || -> Vec<(&str, membw::Limits)> {
        shapes
            .iter()
            .map(|&s| {
                let (o, i) = parse(s);
                (s, membw::measure(format_bytes("nf4 b64", o * i) as usize, if quick { 4 } else { 8 }))
            })
            .collect()
    };
    let mut weight_limits = measure_weight_limits();
    let mut rows = Vec::new();
    for &shape in shapes {
        let (out, inp) = parse(shape);
        let w = Arc::new(peers_data(out * inp, inp, 1));
        convert_rows(&mut rows, &w, shape, ggml.as_ref());
        let int8 = Arc::new(
            QuantLinear::new(
                QuantWeight::Int8(affine::quantize(&w[..], &[out, inp], Granularity::PerChannel).unwrap()),
                None,
            )
            .unwrap(),
        );
        let nf4 = Arc::new(
            QuantLinear::new(
                QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w[..], &[out, inp], 64, false).unwrap()),
                None,
            )
            .unwrap(),
        );
        let nf4_dq = Arc::new(
            QuantLinear::new(
                QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w[..], &[out, inp], 64, true).unwrap()),
                None,
            )
            .unwrap(),
        );
        let ms: &[usize] = if shape == "4096x14336" || quick { &[1, 8, 64] } else { &[1, 8] };
        matmul_rows(&mut rows, &w, shape, ms, &threads, &int8, &nf4, &nf4_dq, ggml.as_ref());
    }

    // --only TEXT: keep the rows whose "op shape threads format" contains TEXT (e.g. "gemv M=1 4096x4096 2").
    if let Some(only) = arg_value(&args, "--only") {
        rows.retain(|r| format!("{} {} {} {}", r.op, r.shape, r.threads, r.lowbit_fmt).contains(&only));
    }

    // Interleaved rounds: every measurement once per round, in the same order.
    let mut lowbit_t: Vec<Vec<Vec<Option<f64>>>> = rows.iter().map(|r| vec![Vec::new(); r.lowbit.len()]).collect();
    let mut peer_t: Vec<Vec<Vec<Option<f64>>>> = rows.iter().map(|r| vec![Vec::new(); r.peers.len()]).collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (i, r) in rows.iter_mut().enumerate() {
            for (j, (_, f)) in r.lowbit.iter_mut().enumerate() {
                lowbit_t[i][j].push(f(budget));
            }
            for (j, (_, f)) in r.peers.iter_mut().enumerate() {
                peer_t[i][j].push(f(budget));
            }
        }
        for (kept, (_, new)) in weight_limits.iter_mut().zip(measure_weight_limits()) {
            kept.1 = best_limits(kept.1, new);
        }
    }
    let med = |v: &Vec<Option<f64>>| -> Option<f64> {
        let t: Vec<f64> = v.iter().flatten().copied().collect();
        (!t.is_empty()).then(|| median(&t))
    };

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "lowbit vs candle-core 0.9{} (quantized CPU kernels), best ISA {}; {all} threads; {rounds} interleaved rounds; load average {}",
        if ggml.is_some() { " and ggml" } else { "" },
        Isa::best(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    if let Some(g) = &ggml {
        println!(
            "ggml extra CPU buffer types in this build: {}",
            if g.bufts.is_empty() { "none".into() } else { g.bufts.join(", ") }
        );
    }
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
    let ms = |t: Option<f64>| t.map_or("–".to_string(), |t| format!("{:.3}", t * 1e3));
    println!("| op | shape | threads | lowbit format | lowbit f32 ms | lowbit act8 ms | best candle ms | best ggml ms | ratio (lowbit best ÷ best peer) | per-round ratios (min–max) |");
    println!("|---|---|---:|---|---:|---:|---|---|---:|---|");
    let mut details = Vec::new();
    // Per GEMV M=1 row: its index, lowbit's act8 time and the best ggml peer (for the read-limit table).
    let mut gemv_rows = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let lb: Vec<Option<f64>> = lowbit_t[i].iter().map(med).collect();
        let peers: Vec<(String, Option<f64>)> =
            r.peers.iter().zip(&peer_t[i]).map(|((name, _), t)| (name.clone(), med(t))).collect();
        let best_of = |prefix: &str| {
            peers
                .iter()
                .filter(|(n, t)| n.starts_with(prefix) && t.is_some())
                .min_by(|a, b| a.1.unwrap().total_cmp(&b.1.unwrap()))
                .map(|(n, t)| (n.clone(), t.unwrap()))
        };
        let show = |b: &Option<(String, f64)>, prefix: &str| {
            b.as_ref().map_or("–".into(), |(n, t)| format!("{:.3} ({})", t * 1e3, n.trim_start_matches(prefix)))
        };
        let (candle, gg) = (best_of("candle "), best_of("ggml "));
        let lowbit_best = lb.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let peer_best = [&candle, &gg].iter().filter_map(|b| b.as_ref().map(|x| x.1)).fold(f64::INFINITY, f64::min);
        // The same ratio within each round (lowbit's best mode and the best peer of that round, measured minutes
        // apart rather than a whole run apart): its spread says how much of a ratio near 1.0 is the host's noise.
        let per_round: Vec<f64> = (0..rounds)
            .filter_map(|k| {
                let best = |ts: &[Vec<Option<f64>>]| {
                    ts.iter().filter_map(|t| t.get(k).copied().flatten()).fold(f64::INFINITY, f64::min)
                };
                let (l, p) = (best(&lowbit_t[i]), best(&peer_t[i]));
                (l.is_finite() && p.is_finite()).then(|| l / p)
            })
            .collect();
        let spread = if per_round.is_empty() {
            "–".to_string()
        } else {
            let (lo, hi) = per_round.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            format!("{lo:.2}–{hi:.2}")
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {spread} |",
            r.op,
            r.shape,
            r.threads,
            r.lowbit_fmt,
            ms(lb[0]),
            ms(lb.get(1).copied().flatten()),
            show(&candle, "candle "),
            show(&gg, "ggml "),
            lowbit_best / peer_best
        );
        for (n, t) in &peers {
            details.push(format!("| {} | {} | {} | {n} | {} |", r.op, r.shape, r.threads, ms(*t)));
        }
        if r.op == "gemv M=1" {
            gemv_rows.push((i, lb.get(1).copied().flatten(), gg));
        }
    }
    println!("\nEvery peer measurement (median over rounds; – where the build has no kernel for it):\n");
    println!("| op | shape | threads | peer | ms |");
    println!("|---|---|---:|---|---:|");
    for d in details {
        println!("{d}");
    }
    println!(
        "\nGEMV M=1 against the read limit of a buffer the size of the 4-bit weight (the same probe as the memory \
         limits above; GB/s = the format's bytes ÷ time):\n"
    );
    println!("| shape | threads | read limit GB/s (buffer MB) | lowbit format | lowbit act8 GB/s (% of limit) | best ggml GB/s (% of limit) |");
    println!("|---|---:|---|---|---|---|");
    for (i, act8, ggml_best) in gemv_rows {
        let r = &rows[i];
        let Some((_, lim)) = weight_limits.iter().find(|(s, _)| *s == r.shape) else { continue };
        let (o, inp) = parse(&r.shape);
        let limit = lim.for_threads(r.threads).read;
        let rate = |bytes: f64, t: f64| format!("{:.1} ({:.0}%)", bytes / t / 1e9, 100.0 * bytes / t / limit);
        println!(
            "| {} | {} | {:.1} ({:.1}) | {} | {} | {} |",
            r.shape,
            r.threads,
            limit / 1e9,
            lim.bytes as f64 / 1e6,
            r.lowbit_fmt,
            act8.map_or("–".into(), |t| rate(format_bytes(r.lowbit_fmt, o * inp), t)),
            ggml_best.map_or("–".into(), |(n, t)| {
                let n = n.trim_start_matches("ggml ");
                let ty = n.split_whitespace().next().unwrap_or(n);
                format!("{} {n}", rate(format_bytes(ty, o * inp), t))
            }),
        );
    }
}

/// The larger of two measurements of the same limits, figure by figure: a limit is what the machine reaches at
/// best, and a pass the host slowed (or one in which a pool thread was not scheduled: a run here measured the
/// two-thread read of 33 MB at the one-thread figure) understates it.
fn best_limits(a: membw::Limits, b: membw::Limits) -> membw::Limits {
    let best = |x: membw::Bandwidth, y: membw::Bandwidth| membw::Bandwidth {
        read: x.read.max(y.read),
        write: x.write.max(y.write),
        copy: x.copy.max(y.copy),
    };
    membw::Limits { single: best(a.single, b.single), all: best(a.all, b.all), ..a }
}

/// Bytes a GEMV reads for `n` weights in `format` (a lowbit format of the tables, or a ggml type): codes plus
/// scales (nf4 b64: f32 per 64; b64+dq: the act8 layout's 8-bit code per 64, its 256-block f32 scales
/// negligible; int8 channel: codes only at this size; q4_0 / iq4_nl 18 bytes per 32, q4_1 20, q8_0 34).
fn format_bytes(format: &str, n: usize) -> f64 {
    let n = n as f64;
    match format {
        "nf4 b64" => n / 2.0 + n / 64.0 * 4.0,
        "nf4 b64+dq" => n / 2.0 + n / 64.0,
        "int8 channel" => n,
        "q4_0" | "iq4_nl" => n / 32.0 * 18.0,
        "q4_1" => n / 32.0 * 20.0,
        "q8_0" => n / 32.0 * 34.0,
        _ => f64::NAN,
    }
}
