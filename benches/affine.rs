//! Affine int8 kernels per path, in GB/s of f32 processed, against a plain memory copy of the same bytes.
//!
//! Sizes: a 4096×4096 weight (64 MiB of f32 … the same as the "past every cache" size on this class of
//! machine, whose last-level cache is 32 MiB) and 16 MiB of f32 (inside the last-level cache).
//! `cargo bench --bench affine` prints criterion's throughput; divide by the `copy` row of the same group for
//! the fraction of the memory limit (a copy reads and writes the bytes once, so it is the bandwidth limit).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lowbit::affine::{self, Granularity};
use lowbit::cpu::KernelPath;
use std::hint::black_box;
use std::time::Duration;

/// Uniform data whose range changes every 4096 elements (rows of different scale), from the shared RNG.
fn weights(n: usize) -> Vec<f32> {
    let mut rng = lowbit_testkit::Rng::new(0x9E37_79B9_7F4A_7C15);
    (0..n).map(|i| rng.signed(0.5) * (1.0 + (i / 4096 % 7) as f32)).collect()
}

/// Paths worth timing (every listed level has kernels of its own).
fn paths() -> Vec<KernelPath> {
    KernelPath::all_available()
}

fn bench_size(c: &mut Criterion, label: &str, rows: usize, cols: usize) {
    let n = rows * cols;
    let x = weights(n);
    let shape = [rows, cols];
    let mut g = c.benchmark_group(format!("affine/{label}"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes((n * 4) as u64));

    let mut dst = vec![0.0f32; n];
    g.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&x))));

    for path in paths() {
        let name = path.name();
        for gran in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(128)] {
            g.bench_with_input(BenchmarkId::new(format!("calibrate+quantize/{gran}"), &name), &path, |b, &p| {
                b.iter(|| affine::quantize_with(black_box(&x), &shape, gran, p).unwrap())
            });
        }
        let params = affine::calibrate(&x, &shape, Granularity::PerTensor).unwrap();
        let mut codes = vec![0u8; n];
        g.bench_with_input(BenchmarkId::new("quantize(params)/tensor", &name), &path, |b, &p| {
            b.iter(|| {
                affine::quantize_with_params_into(black_box(&x), &shape, Granularity::PerTensor, &params, &mut codes, p)
                    .unwrap()
            })
        });
        for gran in [Granularity::PerTensor, Granularity::PerGroup(128)] {
            let q = affine::quantize(&x, &shape, gran).unwrap();
            g.bench_with_input(BenchmarkId::new(format!("dequantize-f32/{gran}"), &name), &path, |b, &p| {
                b.iter(|| q.dequantize_into_with(black_box(&mut dst[..]), p).unwrap())
            });
        }
        let q = affine::quantize(&x, &shape, Granularity::PerTensor).unwrap();
        let mut dst16 = vec![lowbit::bf16::ZERO; n];
        g.bench_with_input(BenchmarkId::new("dequantize-bf16/tensor", &name), &path, |b, &p| {
            b.iter(|| q.dequantize_into_with(black_box(&mut dst16[..]), p).unwrap())
        });
    }
    g.finish();
}

fn affine_benches(c: &mut Criterion) {
    bench_size(c, "4096x4096", 4096, 4096);
    bench_size(c, "16MiB", 1024, 4096);
}

criterion_group!(benches, affine_benches);
criterion_main!(benches);
