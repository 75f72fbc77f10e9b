//! QuantLinear backward (QLoRA training) against the forward of the same layer: `dx = dy·W` through decoded
//! tiles plus a rank-16 LoRA's `dA`, `dB`, on SmolLM2-135M's shapes at a training batch (M = 128, 512 tokens)
//! and on a 7B shape.
//!
//! Throughput is `Throughput::Elements(2·M·out·in)`: criterion's "elements/s" reads as FLOP/s of the base
//! product. The f32 FMA peak of this machine (one thread and all threads) is measured first and printed, so
//! each figure reads as a fraction of it (`lowbit_testkit::compute`, the same probe as `lowbit bench --all`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lowbit::linear::{BackwardOptions, QuantLinear, QuantWeight, Workspace};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: u64) -> Vec<f32> {
    lowbit_testkit::Rng::new(seed).vec(n, 0.05)
}

fn layer(out: usize, inp: usize) -> QuantLinear {
    let w = data(out * inp, 1);
    let weight = QuantWeight::quantize(&w, &[out, inp], Scheme::nf4(64, true)).unwrap();
    let mut l = QuantLinear::new(weight, None).unwrap();
    let r = 16;
    l.add_adapter(LoraAdapter::new("a", r, data(r * inp, 3), data(out * r, 4), 32.0, false).unwrap()).unwrap();
    l
}

fn bench_backward(c: &mut Criterion) {
    let p = lowbit_testkit::compute::measure(3);
    eprintln!(
        "f32 FMA peak ({}): 1 thread {:.0} GFLOP/s, {} threads {:.0} GFLOP/s; a figure below over the peak is its \
         fraction of the compute limit",
        p.isa, p.f32_single, p.threads, p.f32_all
    );
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    for (out, inp, m) in [(1536usize, 576usize, 128usize), (576, 1536, 128), (576, 576, 512), (4096, 4096, 64)] {
        let mut g = c.benchmark_group(format!("backward/{out}x{inp}/M={m}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Elements((2 * m * out * inp) as u64));
        let l = layer(out, inp);
        let x = data(m * inp, 5);
        let dy = data(m * out, 6);
        let mut y = vec![0.0f32; m * out];
        let mut dx = vec![0.0f32; m * inp];
        let mut grads = l.zero_grads();
        let mut ws = Workspace::default();
        for (threads, pool) in [("threads=1", Some(&one)), ("threads=all", None)] {
            let run = |f: &mut (dyn FnMut() + Send)| match pool {
                Some(p) => p.install(f),
                None => f(),
            };
            g.bench_function(BenchmarkId::new("nf4+dq+lora16/forward", threads), |b| {
                b.iter(|| run(&mut || l.forward_into(black_box(&x), &mut y, &mut ws).unwrap()))
            });
            g.bench_function(BenchmarkId::new("nf4+dq+lora16/backward", threads), |b| {
                b.iter(|| {
                    run(&mut || {
                        l.backward_into(
                            &x,
                            black_box(&dy),
                            Some(&mut dx),
                            &mut grads,
                            &mut ws,
                            BackwardOptions::default(),
                        )
                        .unwrap()
                    })
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_backward);
criterion_main!(benches);
