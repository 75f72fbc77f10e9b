//! QuantLinear forward: fused kernels per format, with and without a rank-16 LoRA adapter, against
//! "dequantize, then f32 matmul", on 7B–8B model projection shapes.
//!
//! Throughput is reported in bytes of packed weight read (`Throughput::Bytes`); GFLOP/s = 2·M·out·in / time.
//! Single- and multi-threaded runs are separate entries (`threads=1` runs through a one-thread rayon pool).
//! The memory limits (read / write / copy bandwidth, one and all threads) are measured first and printed to
//! stderr, from the same code as `lowbit bench --all` (`lowbit_testkit::membw`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use lowbit_testkit::membw;
use lowbit_testkit::synthetic::DEMO_SCHEMES;
use std::hint::black_box;
use std::time::Duration;
use wide::f32x8;

/// Uniform data in ±0.05 from the shared RNG.
fn data(n: usize, seed: u64) -> Vec<f32> {
    lowbit_testkit::Rng::new(seed).vec(n, 0.05)
}

fn layer(scheme: Scheme, out: usize, inp: usize, rank: Option<usize>) -> QuantLinear {
    let w = data(out * inp, 1);
    let weight = QuantWeight::quantize(&w, &[out, inp], scheme).unwrap();
    let mut l = QuantLinear::new(weight, Some(data(out, 2))).unwrap();
    if let Some(r) = rank {
        l.add_adapter(LoraAdapter::new("a", r, data(r * inp, 3), data(out * r, 4), 32.0, false).unwrap()).unwrap();
    }
    l
}

/// The unfused baseline: dequantize the whole weight to f32, then a SIMD f32 matmul.
fn dequant_then_matmul(l: &QuantLinear, w: &mut [f32], x: &[f32], y: &mut [f32]) {
    match l.weight() {
        QuantWeight::FourBit(t) => t.dequantize_into(w).unwrap(),
        QuantWeight::Int8(t) => t.dequantize_into(w).unwrap(),
    }
    let (out, inp) = (l.out_features(), l.in_features());
    for (r, yr) in y.chunks_mut(out).enumerate() {
        let xr = &x[r * inp..(r + 1) * inp];
        for (o, yo) in yr.iter_mut().enumerate() {
            let wr = &w[o * inp..(o + 1) * inp];
            let mut acc = f32x8::ZERO;
            for (a, b) in xr.chunks_exact(8).zip(wr.chunks_exact(8)) {
                acc = f32x8::new(a.try_into().unwrap()).mul_add(f32x8::new(b.try_into().unwrap()), acc);
            }
            *yo = acc.reduce_add();
        }
    }
}

/// Measures the memory limits in this run and prints them, so that criterion's GB/s can be read as a fraction.
fn print_limits() {
    let l = membw::measure(membw::DEFAULT_BYTES, 3);
    let g = membw::gb_s;
    eprintln!(
        "memory limits ({} MiB buffers, GB/s): 1 thread read {:.1} write {:.1} copy {:.1}; \
         {} threads read {:.1} write {:.1} copy {:.1}. A GEMV's fraction of the limit is its GB/s over `read` \
         (criterion counts packed weight bytes only; `lowbit bench --all` prints the fractions).",
        l.bytes >> 20,
        g(l.single.read),
        g(l.single.write),
        g(l.single.copy),
        l.threads,
        g(l.all.read),
        g(l.all.write),
        g(l.all.copy)
    );
}

fn bench_linear(c: &mut Criterion) {
    print_limits();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let shapes = [(4096usize, 4096usize), (11008, 4096), (4096, 14336)];
    for (out, inp) in shapes {
        let mut g = c.benchmark_group(format!("linear/{out}x{inp}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        for format in DEMO_SCHEMES {
            for rank in [None, Some(16)] {
                let l = layer(format, out, inp, rank);
                g.throughput(Throughput::Bytes(l.weight().packed_bytes() as u64));
                let batches: &[usize] = if (out, inp) == (4096, 4096) { &[1, 8, 64, 512] } else { &[1] };
                for &m in batches {
                    let x = data(m * inp, 5);
                    let label = format!("{format}{}/M={m}", if rank.is_some() { "+lora16" } else { "" });
                    g.bench_function(BenchmarkId::new(label.clone(), "threads=all"), |b| {
                        b.iter(|| l.forward(black_box(&x)).unwrap())
                    });
                    if m == 1 {
                        g.bench_function(BenchmarkId::new(label.clone(), "threads=1"), |b| {
                            b.iter(|| one.install(|| l.forward(black_box(&x)).unwrap()))
                        });
                        if rank.is_none() {
                            let mut w = vec![0.0f32; out * inp];
                            let mut y = vec![0.0f32; out];
                            g.bench_function(
                                BenchmarkId::new(format!("{format}/dequantize-then-matmul/M=1"), "threads=all"),
                                |b| b.iter(|| dequant_then_matmul(&l, &mut w, black_box(&x), &mut y)),
                            );
                        }
                    }
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
