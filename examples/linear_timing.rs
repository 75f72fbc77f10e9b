//! Times one fused forward per path (a quick look; the criterion bench `linear` is the real measurement).
use lowbit::cpu::KernelPath;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit_testkit::synthetic::peers_data;
use std::time::Instant;

fn main() -> lowbit::Result<()> {
    // LINGER_US=N: how long a worker polls after a split (`lowbit::cpu::set_thread_linger`; 300 as the tool).
    let linger_us = std::env::var("LINGER_US").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    lowbit::cpu::set_thread_linger(std::time::Duration::from_micros(linger_us));
    let m: usize = std::env::var("M").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    // SHAPE=OUTxIN (default 4096x14336).
    let shape = std::env::var("SHAPE").unwrap_or_else(|_| "4096x14336".into());
    let (out, inp) = shape
        .split_once('x')
        .and_then(|(o, i)| Some((o.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
        .unwrap_or((4096, 14336));
    // DATA=peers: bench-peers' generator (a sum of four xorshift uniforms, scaled per row) for `w` and `x`.
    let use_peers_data = std::env::var("DATA").is_ok_and(|v| v == "peers");
    let w: Vec<f32> = if use_peers_data {
        peers_data(out * inp, inp, 1)
    } else {
        (0..out * inp).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 5000.0).collect()
    };
    // BS=N: the 4-bit block size (default 64).
    let bs: usize = std::env::var("BS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let weight = match std::env::var("FORMAT").as_deref() {
        Ok("int8") => {
            QuantWeight::Int8(lowbit::affine::quantize(&w, &[out, inp], lowbit::affine::Granularity::PerChannel)?)
        }
        Ok("nf4-dq") => QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], bs, true)?),
        _ => QuantWeight::FourBit(lowbit::nf4::quantize_nf4(&w, &[out, inp], bs, false)?),
    };
    let mut layer = QuantLinear::new(weight, None)?;
    // LORA=R: one rank-R adapter.
    if let Some(r) = std::env::var("LORA").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&r| r > 0) {
        let a: Vec<f32> = (0..r * inp).map(|i| ((i % 13) as f32 - 6.0) / 100.0).collect();
        let b: Vec<f32> = (0..out * r).map(|i| ((i % 11) as f32 - 5.0) / 100.0).collect();
        layer.add_adapter(lowbit::lora::LoraAdapter::new("lora", r, a, b, 2.0 * r as f32, false)?)?;
    }
    // LAYOUT=1: the interleaved int8-activation layout (`QuantLinear::build_act8_layout`).
    if std::env::var("LAYOUT").is_ok_and(|v| v == "1") {
        eprintln!("act8 layout built: {}", layer.build_act8_layout());
    }
    // COPIES=N: cycle through N clones of the layer (weights read from memory rather than cache).
    let copies: usize = std::env::var("COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let layers: Vec<QuantLinear> = (0..copies).map(|_| layer.clone()).collect();
    let x: Vec<f32> = if use_peers_data {
        peers_data(m * inp, inp, 9)
    } else {
        (0..m * inp).map(|i| (i % 17) as f32 / 17.0).collect()
    };
    let only = std::env::var("ONLY").ok();
    // ACT8=1: int8 activations (`docs/formats.md` §12).
    let act = if std::env::var("ACT8").is_ok_and(|v| v == "1") {
        lowbit::linear::Activations::Int8
    } else {
        lowbit::linear::Activations::F32
    };
    for path in KernelPath::all_available()
        .into_iter()
        .filter(|p| *p != KernelPath::REFERENCE && only.as_deref().is_none_or(|o| o == p.name()))
    {
        let reps: usize = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
        // Caller-owned output and workspace, as an engine runs it; one warm-up call, then the median.
        let mut y = vec![0f32; m * out];
        let mut ws = lowbit::linear::Workspace::default();
        let opts = lowbit::linear::ForwardOptions::default().path(path).activations(act);
        layer.forward_into_with(&x, &mut y, &mut ws, opts)?;
        let mut times = Vec::with_capacity(reps);
        // IN_POOL=1: calls start on a pool worker, as inside an engine's `rayon::scope`.
        let in_pool = std::env::var("IN_POOL").is_ok_and(|v| v == "1");
        // ALLOC=1: `forward_with` (a fresh output and workspace per call) instead of caller-owned buffers.
        let alloc = std::env::var("ALLOC").is_ok_and(|v| v == "1");
        let mut run = || -> lowbit::Result<()> {
            for i in 0..reps {
                let t = Instant::now();
                if alloc {
                    std::hint::black_box(layers[i % copies].forward_with(std::hint::black_box(&x), opts)?);
                } else {
                    layers[i % copies].forward_into_with(std::hint::black_box(&x), &mut y, &mut ws, opts)?;
                }
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(())
        };
        if std::env::var("OWN_POOL").is_ok_and(|v| v == "1") {
            // OWN_POOL=1: a pool of RAYON_NUM_THREADS built for this measurement, entered with `install` (as
            // bench-peers measures).
            let pool = rayon::ThreadPoolBuilder::new().build().expect("a thread pool");
            pool.install(run)?;
        } else if in_pool {
            rayon::scope(|_| run())?;
        } else {
            run()?;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{path}: {:.5} ms (median of {reps}; min {:.5}, p10 {:.5}, p90 {:.5})",
            times[reps / 2] * 1e3,
            times[0] * 1e3,
            times[reps / 10] * 1e3,
            times[reps * 9 / 10] * 1e3
        );
    }
    // Memory proxy: one pass summing the packed bytes (what a memory-bound GEMV must read).
    if let QuantWeight::FourBit(t) = layer.weight() {
        let t0 = Instant::now();
        let reps = 20;
        for _ in 0..reps {
            let s: u64 =
                std::hint::black_box(t.packed()).chunks(64).map(|c| c.iter().map(|&b| b as u64).sum::<u64>()).sum();
            std::hint::black_box(s);
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "read packed ({} MB): {:.3} ms = {:.1} GB/s",
            t.packed().len() / 1_000_000,
            dt * 1e3,
            t.packed().len() as f64 / dt / 1e9
        );
    }
    Ok(())
}
