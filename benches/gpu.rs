//! GPU kernel benchmark: GEMV (M = 1) at 4096×4096, 11008×4096 (out×in) and 8192×8192, GEMM at M = 16, 128, 512
//! (4096×4096), for NF4, NF4 + double quantization and int8 per-channel / per-group(128).
//!
//! Reports kernel time from timestamp queries around the compute pass (median of the repetitions; wall time
//! per forward including readback when the device has no timestamps), GB/s of packed weight bytes (codes +
//! scales, what a memory-bound GEMV must read) and GFLOP/s (2·M·in·out). A plain `harness = false` binary
//! (criterion's statistics add nothing to GPU timestamps).
//!
//! CPU adapters (lavapipe / llvmpipe) are correctness oracles only: their numbers mean nothing for speed.
//! Environment: `LOWBIT_BENCH_QUICK=1` runs only the smallest shapes (for smoke tests), `LOWBIT_BENCH_REPS`
//! sets repetitions (default 20), `LOWBIT_BENCH_F16=1` adds f16 GEMM rows where the device supports them.
//!
//! Last, the layers of the last (square) shape are chained the way an engine runs a token: every layer
//! recorded with `GpuLinear::encode_forward` into one encoder (activations ping-pong between two device
//! buffers), one submit, one readback; wall time per chain (and the host's share spent recording it) next to
//! the same layers as separate `forward`s. Then 64 small layers (576×576 NF4+DQ) chained the same way: the
//! fixed cost per recorded forward, which bounds a small model's decode.

use lowbit::gpu::{block_on, read_f32, wgpu, GpuContext, GpuLinear, KernelChoice};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::Scheme;
use std::time::Instant;

/// Uniform data in ±0.05 from the shared RNG.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    lowbit_testkit::Rng::new(seed).vec(n, 0.05)
}

fn main() {
    let ctx = match GpuContext::new_blocking() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: no GPU adapter ({e})");
            return;
        }
    };
    let info = ctx.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}, driver {} {}), features {:?}",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        ctx.features()
    );
    if ctx.is_cpu_adapter() {
        println!("NOTE: CPU adapter — numbers below are correctness smoke only, meaningless for speed");
    }
    let quick = std::env::var("LOWBIT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let reps: usize = std::env::var("LOWBIT_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let f16 = std::env::var("LOWBIT_BENCH_F16").is_ok_and(|v| v == "1") && ctx.features().f16;
    let mut cases: Vec<(usize, usize, usize)> = vec![(1, 4096, 4096), (1, 11008, 4096), (1, 8192, 8192)];
    cases.extend([16, 128, 512].map(|m| (m, 4096, 4096)));
    if quick {
        cases = vec![(1, 256, 256), (16, 256, 256)];
    }
    let formats: Vec<Scheme> =
        ["nf4:64", "nf4:64+dq", "int8:channel", "int8:group:128"].iter().map(|s| s.parse().unwrap()).collect();
    println!(
        "{:<14} {:>5} {:>6} {:>6} {:<24} {:>10} {:>9} {:>9}",
        "format", "M", "out", "in", "kernel", "time_us", "GB/s", "GFLOP/s"
    );
    let mut last_shape = (0, 0);
    let mut layers: Vec<(String, GpuLinear)> = Vec::new();
    for &(m, out, inp) in &cases {
        if (out, inp) != last_shape {
            let w = weights(out * inp, (out * 31 + inp) as u64);
            layers = formats.iter().map(|&scheme| upload(&ctx, &w, [out, inp], scheme)).collect();
            last_shape = (out, inp);
        }
        let x = weights(m * inp, 7);
        for (name, gl) in &layers {
            let mut choices = vec![KernelChoice::default()];
            if f16 && m > 16 {
                choices.push(KernelChoice { f16: Some(true), ..Default::default() });
            }
            for choice in choices {
                let key = gl.kernel_for(&ctx, m, choice).unwrap();
                // Warm-up (pipeline compile, buffer allocation).
                gl.time_forward_blocking(&ctx, &x, m, choice, 1).unwrap();
                let t = Instant::now();
                let (_, ns) = gl.time_forward_blocking(&ctx, &x, m, choice, reps).unwrap();
                let wall = t.elapsed().as_secs_f64() * 1e9 / reps as f64;
                let (ns, src) = match ns {
                    Some(ns) if ns > 0.0 => (ns, ""),
                    _ => (wall, " (wall)"),
                };
                let gbs = gl.packed_bytes() as f64 / ns;
                let gflops = 2.0 * (m * out * inp) as f64 / ns;
                println!(
                    "{name:<14} {m:>5} {out:>6} {inp:>6} {:<24} {:>10.1} {gbs:>9.1} {gflops:>9.1}{src}",
                    key.name(),
                    ns / 1e3
                );
            }
        }
    }
    chained(&ctx, &layers, reps);
    if !quick {
        // The fixed cost per recorded forward: 64 small layers (SmolLM2's 576×576, NF4+DQ) in one submission.
        let n = 576;
        let scheme: Scheme = "nf4:64+dq".parse().unwrap();
        let small: Vec<(String, GpuLinear)> =
            (0..64).map(|i| upload(&ctx, &weights(n * n, 1000 + i), [n, n], scheme)).collect();
        chained(&ctx, &small, reps);
    }
}

/// `w` (`[out, in]`) quantized with `scheme` and uploaded, named by the scheme.
fn upload(ctx: &GpuContext, w: &[f32], shape: [usize; 2], scheme: Scheme) -> (String, GpuLinear) {
    let layer = QuantLinear::new(QuantWeight::quantize(w, &shape, scheme).unwrap(), None).unwrap();
    (scheme.to_string(), GpuLinear::upload(ctx, &layer).unwrap())
}

/// Wall time of all `layers` (square, same size) chained in one submission vs run as separate forwards.
fn chained(ctx: &GpuContext, layers: &[(String, GpuLinear)], reps: usize) {
    let n = layers[0].1.in_features();
    if layers.iter().any(|(_, l)| l.in_features() != n || l.out_features() != n) {
        return;
    }
    use wgpu::BufferUsages as U;
    let buf = |floats: usize, usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench"),
            size: (floats * 4) as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    for m in [1, 16] {
        let x = weights(m * n, 11);
        let acts = [buf(m * n, U::STORAGE | U::COPY_DST | U::COPY_SRC), buf(m * n, U::STORAGE | U::COPY_SRC)];
        let read = buf(m * n, U::MAP_READ | U::COPY_DST);
        // Returns the host time spent recording (encode_forward calls and `finish`), in seconds.
        let chain = || {
            ctx.queue().write_buffer(&acts[0], 0, lowbit::gpu::bytes_of_f32(&x));
            let t = Instant::now();
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            for (i, (_, l)) in layers.iter().enumerate() {
                l.encode_forward(ctx, &mut enc, &acts[i % 2], &acts[(i + 1) % 2], m).unwrap();
            }
            enc.copy_buffer_to_buffer(&acts[layers.len() % 2], 0, &read, 0, (m * n * 4) as u64);
            let cmd = enc.finish();
            let rec = t.elapsed().as_secs_f64();
            ctx.queue().submit([cmd]);
            block_on(read_f32(ctx.device(), &read, m * n)).unwrap();
            rec
        };
        chain(); // warm-up: pipelines, bind groups
        let t = Instant::now();
        let mut record = 0.0;
        for _ in 0..reps {
            record += chain();
        }
        let one = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
        let record = record * 1e6 / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            let mut v = x.clone();
            for (_, l) in layers {
                v = l.forward_blocking(ctx, &v, m).unwrap();
            }
        }
        let separate = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
        println!(
            "chain of {} layers {n}x{n} M={m}: one submission {one:.1} us (of which recording {record:.1} us), \
             separate forwards {separate:.1} us (wall)",
            layers.len()
        );
    }
}
