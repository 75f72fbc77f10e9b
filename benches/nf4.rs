//! NF4 kernels per path, in GB/s of f32 processed (input for quantize, output for dequantize), against a plain
//! memory copy of the same bytes in the same run.
//!
//! Sizes: a 4096×4096 weight (64 MiB of f32, past the 32 MiB last-level cache of the machine this was tuned on)
//! and 1024×4096 (16 MiB, inside it). `cargo bench --bench nf4` prints criterion's throughput.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lowbit::bf16;
use lowbit::cpu::{Isa, KernelPath};
use lowbit::nf4::quantize_nf4_with;
use std::hint::black_box;
use std::time::Duration;

/// Uniform data whose range changes every 4096 elements (rows of different scale), from the shared RNG.
fn weights(n: usize) -> Vec<f32> {
    let mut rng = lowbit_testkit::Rng::new(0x9E37_79B9_7F4A_7C15);
    (0..n).map(|i| rng.signed(0.5) * (1.0 + (i / 4096 % 7) as f32)).collect()
}

/// Paths worth timing (every listed level has kernels of its own; the scalar reference only single-threaded).
fn paths() -> Vec<KernelPath> {
    KernelPath::all_available().into_iter().filter(|p| !matches!(p.isa, Isa::Scalar) || !p.parallel).collect()
}

fn bench_size(c: &mut Criterion, label: &str, rows: usize, cols: usize) {
    let n = rows * cols;
    let x = weights(n);
    let shape = [rows, cols];
    let mut g = c.benchmark_group(format!("nf4/{label}"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes((n * 4) as u64));

    let mut dst = vec![0.0f32; n];
    g.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&x))));

    let q = quantize_nf4_with(&x, &shape, 64, false, KernelPath::best()).expect("quantize");
    let mut out16 = vec![bf16::ZERO; n];
    for path in paths() {
        let name = path.name();
        g.bench_function(BenchmarkId::new("quantize", &name), |b| {
            b.iter(|| quantize_nf4_with(black_box(&x), &shape, 64, false, path).expect("quantize"))
        });
        g.bench_function(BenchmarkId::new("quantize+dq", &name), |b| {
            b.iter(|| quantize_nf4_with(black_box(&x), &shape, 64, true, path).expect("quantize"))
        });
        g.bench_function(BenchmarkId::new("dequantize_f32", &name), |b| {
            b.iter(|| q.dequantize_into_with(black_box(&mut dst), path).expect("dequantize"))
        });
        g.bench_function(BenchmarkId::new("dequantize_bf16", &name), |b| {
            b.iter(|| q.dequantize_into_with(black_box(&mut out16), path).expect("dequantize"))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_size(c, "4096x4096", 4096, 4096);
    bench_size(c, "1024x4096", 1024, 4096);
}

criterion_group!(nf4, benches);
criterion_main!(nf4);
