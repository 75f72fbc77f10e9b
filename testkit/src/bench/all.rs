//! `lowbit bench --all`: a fixed suite of every kernel family on every path, held against the memory limits
//! measured in the same run, printed as one Markdown table (or JSON records with `--json`).
//!
//! Suite (default): quantize and dequantize (f32 out) of a 4096×4096 weight in int8 tensor / channel /
//! group:128, NF4 and NF4 + double quantization; GEMV (M = 1) and GEMM (M = 8, 64) of NF4, NF4 + DQ and int8
//! channel at 4096×4096 and 4096×14336 (out × in), without and with a rank-16 LoRA adapter. Paths: the scalar
//! Each GEMV / GEMM without LoRA also runs with int8 activations (kernels `gemv-act8`, `gemm-act8`,
//! `docs/formats.md` §12). Paths: the scalar
//! reference (quantize / dequantize, and GEMV M = 1 without LoRA at 4096×4096 only: the larger cases would take
//! minutes), the best instruction set on one thread, and the best instruction set on every thread of the pool.
//! `--quick`: 4096×4096 only, M = 1 and 8, no scalar path, shorter timing.
//!
//! Small layers (SmolLM2-135M's 576×576, 1536×576 and 576×1536, NF4+DQ, both activation modes): M = 1 and 8,
//! M = 1 with a rank-16 adapter, and `+pair` (two layers of the shape side by side with `lowbit::cpu::join`, as an
//! engine runs the layers that read the same input), called from a pool worker into caller-owned buffers, each
//! case cycling through 64 copies (read from the last-level cache). `--quick`: 576×576 at M = 1. The
//! `× 1 thread` column (`speedup_over_1_thread` in JSON) divides the one-thread median of the same case by the
//! row's: issue 16's target for small layers is ≥ 1.6 at two threads.
//!
//! Cold weights: a GEMV / GEMM case cycles through copies of its layer adding up to twice the last-level cache,
//! so every call reads its weight from memory, as a model's layer-after-layer forward does (a 4096×4096 NF4
//! weight is 9 MiB and would otherwise be timed from cache). Quantize / dequantize stream 64 MiB of f32.
//!
//! Units. `GB/s` = (bytes read + bytes written) / median time, where the bytes are the kernel's minimum traffic:
//! its input once and its output once (packed codes + scales, f32 activations, bias, LoRA factors). `GFLOP/s`
//! = 2·M·out·in (+ 2·M·r·(in + out) for LoRA) / time, for GEMV / GEMM only. `% of limit` divides GB/s by the
//! measured bandwidth of the same thread count in the kernel's dominant direction: read (GEMV, GEMM), write, or
//! copy (quantize, dequantize; a copy's figure counts its reads and writes). GEMM at M = 64 is compute-bound,
//! so its fraction of the memory limit is expected to be low; `% of compute` holds GEMV / GEMM against the compute
//! peaks measured in the same run ([`crate::compute`]: the f32 FMA peak, and for `-act8` kernels the int8 dot
//! peak where the CPU has one), records `compute-f32-fma` / `compute-int8-dot`.

use crate::compute::{self, ComputePeaks};
use crate::console;
use crate::error::{Context, Error};
use crate::membw::{self, Direction, Limits};
use crate::synthetic::{self, DEMO_SCHEMES};
use lowbit::affine::{self, Granularity};
use lowbit::cpu::{Isa, KernelPath};
use lowbit::linear::{Activations, ForwardOptions, QuantLinear, QuantWeight};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Options of `lowbit bench --all`.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// Print JSON records instead of the Markdown table.
    pub json: bool,
    /// The reduced suite.
    pub quick: bool,
}

/// One measured kernel (or one memory limit, kernel `memory-read` / `memory-write` / `memory-copy`).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `quantize`, `dequantize`, `gemv`, `gemm`, `gemv-act8`, `gemm-act8` (int8 activations), with `+lora16`
    /// when an adapter is attached and `+pair` for two small layers forwarded side by side.
    pub kernel: String,
    /// Weight format, e.g. `int8 group:128`, `nf4`, `nf4+dq`.
    pub format: String,
    /// `OUTxIN` of the weight.
    pub shape: String,
    /// Rows of x (1 for quantize / dequantize).
    pub batch: usize,
    /// KernelPath name (`scalar`, `avx2`, `avx2+threads`).
    pub path: String,
    /// Threads the kernel ran on.
    pub threads: usize,
    /// Median seconds per call.
    pub median_s: f64,
    /// (Bytes read + written) / median, in 10⁹ bytes per second.
    pub gb_s: f64,
    /// 10⁹ floating-point operations per second (GEMV / GEMM only).
    pub gflop_s: Option<f64>,
    /// `gb_s` over the limit named by `limit`.
    pub frac_of_limit: f64,
    /// The limit used: `read`, `write` or `copy`.
    pub limit: &'static str,
    /// GEMV / GEMM: `gflop_s` over the compute peak of the same thread count measured in the same run (the f32
    /// FMA peak; the int8 dot peak for `-act8` kernels where the CPU has one, else the f32 peak).
    pub frac_of_compute: Option<f64>,
    /// Bytes (read, written) per call.
    pub traffic: (f64, f64),
    /// On more than one thread: the same case's median on one thread (the best instruction set) over this
    /// median; `None` on one thread.
    pub speedup_over_1_thread: Option<f64>,
}

impl Record {
    /// The record as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let num = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null };
        serde_json::json!({
            "kernel": self.kernel,
            "format": self.format,
            "shape": self.shape,
            "batch": self.batch,
            "path": self.path,
            "threads": self.threads,
            "median_s": num(self.median_s),
            "gb_s": num(self.gb_s),
            "gflop_s": self.gflop_s.map_or(serde_json::Value::Null, num),
            "frac_of_limit": num(self.frac_of_limit),
            "limit": self.limit,
            "frac_of_compute": self.frac_of_compute.map_or(serde_json::Value::Null, num),
            "speedup_over_1_thread": self.speedup_over_1_thread.map_or(serde_json::Value::Null, num),
        })
    }
}

/// How long each case is timed.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// Keep calling until this much time has passed …
    time: Duration,
    /// … and at least this many timed calls (after one untimed call).
    min: usize,
    /// At most this many timed calls.
    max: usize,
}

/// Median seconds of `f` under `b`; stops at the first error.
fn median(b: Budget, mut f: impl FnMut() -> lowbit::Result<()>) -> lowbit::Result<f64> {
    f()?;
    let start = Instant::now();
    let mut t = Vec::new();
    while t.len() < b.min || (start.elapsed() < b.time && t.len() < b.max) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// A path and the pool it runs in.
struct Runner {
    path: KernelPath,
    pool: rayon::ThreadPool,
}

impl Runner {
    fn new(path: KernelPath, threads: usize) -> Result<Runner, Error> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::new(format!("starting a pool of {threads} threads: {e}")))?;
        Ok(Runner { path, pool })
    }

    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

/// Collects records, deriving the rates and the fraction of the limit.
struct Recorder {
    records: Vec<Record>,
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        kernel: String,
        format: &str,
        shape: (usize, usize),
        batch: usize,
        r: &Runner,
        median_s: f64,
        (read, written): (f64, f64),
        flops: Option<f64>,
    ) {
        let threads = r.threads();
        self.records.push(Record {
            kernel,
            format: format.to_string(),
            shape: format!("{}x{}", shape.0, shape.1),
            batch,
            path: r.path.name(),
            threads,
            median_s,
            gb_s: (read + written) / median_s / 1e9,
            gflop_s: flops.map(|f| f / median_s / 1e9),
            frac_of_limit: f64::NAN, // once the limits are known
            limit: Direction::of(read, written).name(),
            frac_of_compute: None, // once the peaks are known
            traffic: (read, written),
            speedup_over_1_thread: None, // once every case has run
        });
    }
}

/// Runs the suite and prints the table (or JSON).
pub fn run(s: Suite) -> Result<(), Error> {
    let all_threads = rayon::current_num_threads();
    let best = Isa::best();
    let mut runners = Vec::new();
    if !s.quick {
        runners.push(Runner::new(KernelPath::REFERENCE, 1)?);
    }
    runners.push(Runner::new(KernelPath::single(best), 1)?);
    runners.push(Runner::new(KernelPath::best(), all_threads)?);
    let budget = if s.quick {
        Budget { time: Duration::from_millis(60), min: 2, max: 50 }
    } else {
        Budget { time: Duration::from_millis(300), min: 3, max: 100 }
    };

    // Measured before and after the kernels, best of both: on a shared machine a single measurement can land
    // in a busy moment and make every fraction look better than it is.
    let all_pool = &runners[runners.len() - 1].pool;
    let before = all_pool.install(|| membw::measure(membw::DEFAULT_BYTES, 3));
    let peaks_before = all_pool.install(|| compute::measure(3));
    let mut rec = Recorder { records: Vec::new() };
    quant_dequant(&mut rec, &runners, budget, 4096, 4096)?;
    let shapes: &[(usize, usize)] = if s.quick { &[(4096, 4096)] } else { &[(4096, 4096), (4096, 14336)] };
    let batches: &[usize] = if s.quick { &[1, 8] } else { &[1, 8, 64] };
    for &(out, inp) in shapes {
        linear(&mut rec, &runners, budget, (out, inp), batches)?;
    }
    small_layers(&mut rec, &runners, Budget { max: 1_000_000, ..budget }, s.quick)?;
    let limits = before.max(&all_pool.install(|| membw::measure(membw::DEFAULT_BYTES, 3)));
    let peaks = best_peaks(peaks_before, all_pool.install(|| compute::measure(3)));
    for r in &mut rec.records {
        let (read, written) = r.traffic;
        r.frac_of_limit = limits.fraction(r.threads, read, written, r.median_s);
        let peak = if r.kernel.contains("-act8") { peaks.int8_for(r.threads) } else { None };
        r.frac_of_compute = r.gflop_s.map(|g| g / peak.unwrap_or_else(|| peaks.f32_for(r.threads)));
    }
    let one_thread = rec.records.clone();
    for r in rec.records.iter_mut().filter(|r| r.threads > 1) {
        r.speedup_over_1_thread = one_thread
            .iter()
            .find(|o| {
                o.threads == 1
                    && o.path != KernelPath::REFERENCE.name()
                    && (&o.kernel, &o.format, &o.shape, o.batch) == (&r.kernel, &r.format, &r.shape, r.batch)
            })
            .map(|o| o.median_s / r.median_s);
    }
    rec.records.splice(0..0, limit_records(&limits).into_iter().chain(peak_records(&peaks)));

    if s.json {
        let v: Vec<serde_json::Value> = rec.records.iter().map(Record::to_json).collect();
        return console::line(&serde_json::to_string_pretty(&v).map_err(|e| Error::new(e.to_string()))?);
    }
    console::out(&format!(
        "lowbit bench --all{}: best ISA {best}, {all_threads} thread(s), load average {}\n\
         memory limits: best of 3 passes over {} MiB buffers, before and after the kernels; GB/s = (bytes read + written) / median;\n\
         % of limit = GB/s / the measured read, write or copy bandwidth at the same thread count\n\n{}",
        if s.quick { " --quick" } else { "" },
        load_average(),
        limits.bytes >> 20,
        markdown(&rec.records)
    ))?;
    if s.quick {
        return Ok(());
    }
    console::line(
        "\nnot run: the scalar path for LoRA, GEMM and the 4096x14336 shape (minutes per case; \
         the scalar rows above show its speed)",
    )
}

/// The better of two measurements of each peak (a busy moment only lowers a figure).
fn best_peaks(a: ComputePeaks, b: ComputePeaks) -> ComputePeaks {
    let max_opt = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    ComputePeaks {
        f32_single: a.f32_single.max(b.f32_single),
        f32_all: a.f32_all.max(b.f32_all),
        int8_single: max_opt(a.int8_single, b.int8_single),
        int8_all: max_opt(a.int8_all, b.int8_all),
        ..a
    }
}

/// The compute peaks as records (`compute-f32-fma`, `compute-int8-dot`, at one thread and at all threads).
fn peak_records(p: &ComputePeaks) -> Vec<Record> {
    let mut v = Vec::new();
    for threads in [1, p.threads] {
        let path = if threads == 1 { "1 thread" } else { "all threads" };
        let peaks =
            [("compute-f32-fma", "f32", Some(p.f32_for(threads))), ("compute-int8-dot", "i8", p.int8_for(threads))];
        for (kernel, format, g) in peaks {
            let Some(g) = g else { continue };
            v.push(Record {
                kernel: kernel.into(),
                format: format.into(),
                shape: p.isa.into(),
                batch: 1,
                path: path.into(),
                threads,
                median_s: f64::NAN,
                gb_s: f64::NAN,
                gflop_s: Some(g),
                frac_of_limit: f64::NAN,
                limit: "compute",
                frac_of_compute: Some(1.0),
                traffic: (0.0, 0.0),
                speedup_over_1_thread: None,
            });
        }
    }
    v
}

/// The memory limits as records (`memory-read`, … at one thread and at all threads).
fn limit_records(l: &Limits) -> Vec<Record> {
    let mut v = Vec::new();
    for (threads, b) in [(1, &l.single), (l.threads, &l.all)] {
        for d in [Direction::Read, Direction::Write, Direction::Copy] {
            let bw = b.get(d);
            v.push(Record {
                kernel: format!("memory-{}", d.name()),
                format: "u64".into(),
                shape: format!("{}MiB", l.bytes >> 20),
                batch: 1,
                path: if threads == 1 { "1 thread".into() } else { "all threads".into() },
                threads,
                median_s: l.bytes as f64 * if d == Direction::Copy { 2.0 } else { 1.0 } / bw,
                gb_s: bw / 1e9,
                gflop_s: None,
                frac_of_limit: 1.0,
                limit: d.name(),
                frac_of_compute: None,
                traffic: (0.0, 0.0),
                speedup_over_1_thread: None,
            });
        }
    }
    v
}

fn quant_dequant(rec: &mut Recorder, runners: &[Runner], budget: Budget, out: usize, inp: usize) -> Result<(), Error> {
    let n = out * inp;
    let w = synthetic::synthetic_weight(out, inp, synthetic::SEED);
    let shape = [out, inp];
    let mut dst = vec![0.0f32; n];
    let f32_bytes = 4.0 * n as f64;
    for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(128)] {
        let format = format!("int8 {gran}");
        let q = affine::quantize(&w, &shape, gran).context(|| format!("quantizing to {format}"))?;
        let packed = QuantWeight::Int8(q.clone()).packed_bytes() as f64;
        // Into caller buffers (the engine's case, and what ggml's quantize does): the figure is the kernel's,
        // not the page faults of a fresh allocation per call.
        let mut codes = vec![0u8; n];
        let mut params = vec![affine::AffineParams::EMPTY; gran.num_params(out, inp)];
        for r in runners {
            let t = r.pool.install(|| {
                median(budget, || {
                    affine::quantize_into_with(black_box(&w), &shape, gran, &mut codes, &mut params, r.path)
                })
            })?;
            rec.push("quantize".into(), &format, (out, inp), 1, r, t, (f32_bytes, packed), None);
            let t = r.pool.install(|| median(budget, || q.dequantize_into_with(black_box(&mut dst[..]), r.path)))?;
            rec.push("dequantize".into(), &format, (out, inp), 1, r, t, (packed, f32_bytes), None);
        }
    }
    for dq in [false, true] {
        let format = if dq { "nf4+dq" } else { "nf4" };
        let q = lowbit::nf4::quantize_nf4(&w, &shape, 64, dq).context(|| format!("quantizing to {format}"))?;
        let packed = QuantWeight::FourBit(q.clone()).packed_bytes() as f64;
        for r in runners {
            let t = r.pool.install(|| {
                median(budget, || lowbit::nf4::quantize_nf4_with(black_box(&w), &shape, 64, dq, r.path).map(drop))
            })?;
            rec.push("quantize".into(), format, (out, inp), 1, r, t, (f32_bytes, packed), None);
            let t = r.pool.install(|| median(budget, || q.dequantize_into_with(black_box(&mut dst[..]), r.path)))?;
            rec.push("dequantize".into(), format, (out, inp), 1, r, t, (packed, f32_bytes), None);
        }
    }
    Ok(())
}

const LORA_RANK: usize = 16;

/// SmolLM2-135M's layer shapes (out × in): attention 576×576, the MLP's gate / up 1536×576 and down 576×1536.
const SMALL_SHAPES: [(usize, usize); 3] = [(576, 576), (1536, 576), (576, 1536)];

/// Copies of a small layer that its cases cycle through: more than a core's L2 holds (64 NF4+DQ 576×576 layers
/// are 11 MiB), so each call reads its weight from the last-level cache, as the decode of a model that fits
/// there does.
const SMALL_COPIES: usize = 64;

/// Small layers as an engine runs them (NF4+DQ, the interleaved int8-activation layout built): from a pool
/// worker (inside `install`, as in an engine's `rayon::scope`), into caller-owned outputs and workspaces, both
/// activation modes; M = 1 and 8, M = 1 with a rank-16 adapter (`+lora16`), and `+pair`: two different layers of
/// the shape forwarded side by side with `lowbit::cpu::join`, as an engine runs the layers that read the same input
/// (lowbit-llm's `q` beside `k`, `gate` beside `up`), timed per pair. `--quick`: 576×576 at M = 1 only.
fn small_layers(rec: &mut Recorder, runners: &[Runner], budget: Budget, quick: bool) -> Result<(), Error> {
    let scheme = lowbit::Scheme::nf4(64, true);
    let name = scheme.to_string();
    let shapes = if quick { &SMALL_SHAPES[..1] } else { &SMALL_SHAPES[..] };
    for &(out, inp) in shapes {
        let w = synthetic::synthetic_weight(out, inp, synthetic::SEED);
        let weight = QuantWeight::quantize(&w, &[out, inp], scheme).context(|| format!("quantizing to {name}"))?;
        let packed = weight.packed_bytes() as f64;
        for rank in [None, Some(LORA_RANK)] {
            let mut layer =
                synthetic::layer_from(weight.clone(), rank).context(|| format!("building a {name} layer"))?;
            layer.build_act8_layout();
            let layers = vec![layer; SMALL_COPIES];
            let batches: &[usize] = if quick || rank.is_some() { &[1] } else { &[1, 8] };
            for &m in batches {
                let x = synthetic::input(m, inp);
                let (read, written, flops) = linear_traffic(packed, (out, inp), m, rank);
                for act in [Activations::F32, Activations::Int8] {
                    for pair in [false, true] {
                        if pair && (m > 1 || rank.is_some()) {
                            continue;
                        }
                        let kernel = linear_kernel_name(m, act, rank.is_some(), pair);
                        let calls = if pair { 2.0 } else { 1.0 };
                        for r in runners.iter().filter(|r| r.path.isa != Isa::Scalar) {
                            let opts = ForwardOptions::default().path(r.path).activations(act);
                            let t = r.pool.install(|| side_by_side(budget, &layers, &x, m * out, pair, opts))?;
                            let traffic = (calls * read, calls * written);
                            rec.push(kernel.clone(), &name, (out, inp), m, r, t, traffic, Some(calls * flops));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Median seconds of one forward of the next layer of `layers` (cycled), or with `pair` of the next two side
/// by side ([`lowbit::cpu::join`]), each into its own output (`y_len` values) and workspace.
fn side_by_side(
    budget: Budget,
    layers: &[QuantLinear],
    x: &[f32],
    y_len: usize,
    pair: bool,
    opts: ForwardOptions<'_>,
) -> lowbit::Result<f64> {
    let (mut y1, mut y2) = (vec![0.0f32; y_len], vec![0.0f32; y_len]);
    let (mut ws1, mut ws2) = (lowbit::linear::Workspace::default(), lowbit::linear::Workspace::default());
    let mut next = 0;
    median(budget, || {
        let (a, b) = (&layers[next], &layers[(next + 1) % layers.len()]);
        next = (next + if pair { 2 } else { 1 }) % layers.len();
        if !pair {
            return a.forward_into_with(black_box(x), &mut y1, &mut ws1, opts);
        }
        let (ra, rb) = lowbit::cpu::join(
            || a.forward_into_with(black_box(x), &mut y1, &mut ws1, opts),
            || b.forward_into_with(black_box(x), &mut y2, &mut ws2, opts),
        );
        ra.and(rb)
    })
}

fn linear(
    rec: &mut Recorder,
    runners: &[Runner],
    budget: Budget,
    (out, inp): (usize, usize),
    batches: &[usize],
) -> Result<(), Error> {
    let w = synthetic::synthetic_weight(out, inp, synthetic::SEED);
    for (format, name) in DEMO_SCHEMES.map(|s| (s, s.to_string())) {
        let weight = QuantWeight::quantize(&w, &[out, inp], format).context(|| format!("quantizing to {name}"))?;
        let packed = weight.packed_bytes() as f64;
        // Enough copies that each call reads its weight from memory, not from the last-level cache.
        let copies = (cold_bytes() as f64 / packed).ceil().clamp(1.0, 16.0) as usize;
        for rank in [None, Some(LORA_RANK)] {
            let layer = synthetic::layer_from(weight.clone(), rank).context(|| format!("building a {name} layer"))?;
            let layers = vec![layer; copies];
            // The int8-activation rows run on layers with the interleaved layout built (where the CPU's kernel
            // reads one), as an engine would at load.
            let layers_act8: Vec<QuantLinear> = match rank {
                None => layers.iter().cloned().map(|mut l| (l.build_act8_layout(), l).1).collect(),
                Some(_) => Vec::new(),
            };
            for &m in batches {
                let x = synthetic::input(m, inp);
                let (read, written, flops) = linear_traffic(packed, (out, inp), m, rank);
                // Int8 activations (`gemv-act8`, `gemm-act8`) beside the default f32 mode, without LoRA.
                let modes: &[Activations] =
                    if rank.is_none() { &[Activations::F32, Activations::Int8] } else { &[Activations::F32] };
                for &act in modes {
                    let kernel = linear_kernel_name(m, act, rank.is_some(), false);
                    for r in runners {
                        let scalar_skip =
                            rank.is_some() || m > 1 || (out, inp) != (4096, 4096) || act != Activations::F32;
                        if r.path.isa == Isa::Scalar && scalar_skip {
                            continue;
                        }
                        let mut next = 0;
                        let ls = if act == Activations::Int8 { &layers_act8 } else { &layers };
                        let t = r.pool.install(|| {
                            median(budget, || {
                                next = (next + 1) % copies;
                                forward(&ls[next], &x, r.path, act)
                            })
                        })?;
                        rec.push(kernel.clone(), &name, (out, inp), m, r, t, (read, written), Some(flops));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A forward's minimum traffic and work: (bytes read: packed weight, `x`, bias, LoRA factors; bytes written: `y`;
/// FLOPs: the base product and the adapter's two products).
fn linear_traffic(packed: f64, (out, inp): (usize, usize), m: usize, rank: Option<usize>) -> (f64, f64, f64) {
    let lora_elems = rank.map_or(0, |r| r * (inp + out));
    let read = packed + 4.0 * (m * inp + out + lora_elems) as f64;
    let written = 4.0 * (m * out) as f64;
    (read, written, 2.0 * (m * (out * inp + lora_elems)) as f64)
}

/// `gemv` / `gemm`, `-act8` with int8 activations, `+lora16` with the adapter, `+pair` for two side by side.
fn linear_kernel_name(m: usize, act: Activations, lora: bool, pair: bool) -> String {
    format!(
        "{}{}{}{}",
        if m == 1 { "gemv" } else { "gemm" },
        if act == Activations::Int8 { "-act8" } else { "" },
        if lora { "+lora16" } else { "" },
        if pair { "+pair" } else { "" },
    )
}

/// Bytes of weights a GEMV / GEMM case cycles through: twice the last-level cache (Linux sysfs; 32 MiB when
/// unknown), at least 64 MiB.
fn cold_bytes() -> usize {
    let llc = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .ok()
        .and_then(|s| s.trim().strip_suffix('K').and_then(|k| k.parse::<usize>().ok()))
        .map_or(32 << 20, |k| k << 10);
    (2 * llc).max(64 << 20)
}

fn forward(layer: &QuantLinear, x: &[f32], path: KernelPath, act: Activations) -> lowbit::Result<()> {
    black_box(layer.forward_with(black_box(x), ForwardOptions::default().path(path).activations(act))?);
    Ok(())
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), or `unknown`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// `v` with `digits` decimals, or `-` when it is not finite (the compute peaks have no time or bytes).
fn finite(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "-".into()
    }
}

/// The records as one Markdown table.
pub fn markdown(records: &[Record]) -> String {
    let mut s = String::from(
        "| kernel | format | shape | batch | path | threads | median ms | GB/s | GFLOP/s | % of limit | % of compute | × 1 thread |\n\
         |---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in records {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.kernel,
            r.format,
            r.shape,
            r.batch,
            r.path,
            r.threads,
            // Five decimals below 0.1 ms (small layers take µs).
            finite(r.median_s * 1e3, if r.median_s < 1e-4 { 5 } else { 3 }),
            finite(r.gb_s, 2),
            r.gflop_s.map_or_else(|| "-".to_string(), |g| format!("{g:.1}")),
            if r.frac_of_limit.is_finite() {
                format!("{:.0}% {}", r.frac_of_limit * 100.0, r.limit)
            } else {
                "-".into()
            },
            r.frac_of_compute.map_or_else(|| "-".to_string(), |f| format!("{:.0}%", f * 100.0)),
            r.speedup_over_1_thread.map_or_else(|| "-".to_string(), |x| format!("{x:.2}")),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            kernel: "gemv".into(),
            format: "nf4".into(),
            shape: "8x16".into(),
            batch: 1,
            path: "avx2".into(),
            threads: 1,
            median_s: 0.5,
            gb_s: 2.0,
            gflop_s: None,
            frac_of_limit: 0.25,
            limit: "read",
            frac_of_compute: None,
            traffic: (1.0, 0.0),
            speedup_over_1_thread: None,
        }
    }

    #[test]
    fn json_records_have_the_documented_fields() {
        let v = record().to_json();
        for k in [
            "kernel",
            "format",
            "shape",
            "batch",
            "threads",
            "median_s",
            "gb_s",
            "gflop_s",
            "frac_of_limit",
            "frac_of_compute",
            "speedup_over_1_thread",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert!(v["gflop_s"].is_null());
    }

    #[test]
    fn markdown_has_one_line_per_record() {
        let t = markdown(&[record(), record()]);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("| gemv | nf4 | 8x16 | 1 | avx2 | 1 | 500.000 | 2.00 | - | 25% read | - | - |"), "{t}");
        let two = Record { threads: 2, speedup_over_1_thread: Some(1.75), ..record() };
        assert!(markdown(&[two]).contains("| avx2 | 2 | 500.000 | 2.00 | - | 25% read | - | 1.75 |"));
    }

    #[test]
    fn median_runs_at_least_min_times() {
        let mut calls = 0;
        let b = Budget { time: Duration::ZERO, min: 3, max: 10 };
        median(b, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 4);
    }
}
