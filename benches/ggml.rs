//! ggml / GGUF dequantization per type, scalar reference vs the best instruction set (one thread and
//! threaded), in bytes of f32 output per second (criterion's `thrpt`), against a plain copy of the same
//! number of output bytes in the same run.
//!
//! Size: 4096×4096 elements (64 MiB of f32 output) per type. Blocks are random bytes with a realistic f16
//! scale (0.01; and min 0.01 where the type has one) in every scale field, so no lane computes NaN or inf.
//! `cargo bench --bench ggml` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lowbit::cpu::{Isa, KernelPath};
use lowbit::ggml::{dequantize_into_with, GgmlType};
use std::hint::black_box;
use std::time::Duration;

const ROWS: usize = 4096;
const COLS: usize = 4096;

/// Byte offsets of the f16 scale fields in a block of each type (`docs/formats.md` §9).
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q8_0 | Q4_0 | Q5_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// Random blocks of `ty` for `n` elements, every scale set to f16 0.01; plain types get finite random values.
fn blocks(ty: GgmlType, n: usize) -> Vec<u8> {
    let mut rng = lowbit_testkit::Rng::new(0x6767_6d6c);
    let bytes = ty.bytes_for(n).expect("whole blocks");
    let mut data: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
    let d = lowbit::f16::from_f32(0.01).to_bits().to_le_bytes();
    match ty {
        GgmlType::F32 => {
            for (c, v) in data.chunks_exact_mut(4).zip(rng.vec(n, 1.0)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            for c in data.chunks_exact_mut(2) {
                c[1] &= 0x3b; // finite, moderate exponent in both encodings
            }
        }
        _ => {
            for blk in data.chunks_exact_mut(ty.block_bytes()) {
                for &o in scale_offsets(ty) {
                    blk[o..o + 2].copy_from_slice(&d);
                }
            }
        }
    }
    data
}

fn bench_types(c: &mut Criterion) {
    let n = ROWS * COLS;
    let best = Isa::best();
    let paths = [KernelPath::REFERENCE, KernelPath::single(best), KernelPath { isa: best, parallel: true }];
    let mut out = vec![0f32; n];
    let src = vec![1f32; n];
    let mut g = c.benchmark_group("ggml/4096x4096");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("copy_f32", |b| b.iter(|| out.copy_from_slice(black_box(&src))));
    for ty in GgmlType::all().filter(|t| t.can_dequantize()) {
        let data = blocks(ty, n);
        for path in paths {
            g.bench_function(BenchmarkId::new(ty.name(), path.name()), |b| {
                b.iter(|| dequantize_into_with(ty, black_box(&data), black_box(&mut out), path).expect("dequantize"))
            });
        }
    }
    g.finish();
}

criterion_group!(ggml, bench_types);
criterion_main!(ggml);
