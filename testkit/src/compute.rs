//! The machine's compute limits, measured like the memory limits ([`crate::membw`]): the f32 fused
//! multiply-add peak and, where the ISA has an int8 dot-product instruction (AVX-512 VNNI `vpdpbusd`), its
//! peak, on one thread and on every thread of the rayon pool. `lowbit bench --all` holds its GEMMs against them.
//!
//! Each probe runs independent accumulator chains (more than the FMA latency × throughput, so the units never
//! wait) for a fixed number of iterations; the result is summed and black-boxed so nothing is optimised out.
//! Counting: an f32 FMA is 2 FLOP per lane; a `vpdpbusd` lane is 4 multiply-adds = 8 integer ops.

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Peaks in 10⁹ operations per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ComputePeaks {
    /// f32 FMA, one thread (GFLOP/s).
    pub f32_single: f64,
    /// f32 FMA, every thread of the pool.
    pub f32_all: f64,
    /// int8 dot (GOP/s, a multiply-add counted as 2), one thread; `None` without VNNI.
    pub int8_single: Option<f64>,
    /// int8 dot, every thread.
    pub int8_all: Option<f64>,
    /// Threads of the `_all` figures.
    pub threads: usize,
    /// Which instructions the probes ran (`avx512`, `avx2`, `portable`; `+vnni`).
    pub isa: &'static str,
}

impl ComputePeaks {
    /// The f32 peak at `threads` threads (one or all).
    pub fn f32_for(&self, threads: usize) -> f64 {
        if threads <= 1 {
            self.f32_single
        } else {
            self.f32_all
        }
    }

    /// The int8 peak at `threads` threads, where measured.
    pub fn int8_for(&self, threads: usize) -> Option<f64> {
        if threads <= 1 {
            self.int8_single
        } else {
            self.int8_all
        }
    }
}

/// Iterations per probe call (each iteration: one FMA per accumulator).
const ITERS: usize = 2_000_000;

/// Measures the peaks: best of `passes` runs of each probe, on one thread and on every thread of the current
/// rayon pool.
pub fn measure(passes: usize) -> ComputePeaks {
    let threads = rayon::current_num_threads();
    let f32_probe = f32_probe();
    let int8_probe = int8_probe();
    let best = |ops_per_call: f64, f: fn(usize) -> f32, all: bool| -> f64 {
        (0..passes.max(1))
            .map(|_| {
                let t = Instant::now();
                let n = if all {
                    (0..threads).into_par_iter().map(|_| f(black_box(ITERS))).sum::<f32>()
                } else {
                    f(black_box(ITERS))
                };
                black_box(n);
                ops_per_call * if all { threads as f64 } else { 1.0 } / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let (f32_ops, f32_fn) = f32_probe.1;
    ComputePeaks {
        f32_single: best(f32_ops, f32_fn, false),
        f32_all: best(f32_ops, f32_fn, true),
        int8_single: int8_probe.map(|(ops, f)| best(ops, f, false)),
        int8_all: int8_probe.map(|(ops, f)| best(ops, f, true)),
        threads,
        isa: match (f32_probe.0, int8_probe.is_some()) {
            ("avx512", true) => "avx512+vnni",
            (isa, _) => isa,
        },
    }
}

type Probe = (f64, fn(usize) -> f32);

/// The best f32 FMA probe for this CPU: (name, (ops per call, probe)).
fn f32_probe() -> (&'static str, Probe) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F was detected just above.
            return ("avx512", ((ITERS * 16 * 16 * 2) as f64, |n| unsafe { x86::fma512(n) }));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected just above.
            return ("avx2", ((ITERS * 12 * 8 * 2) as f64, |n| unsafe { x86::fma256(n) }));
        }
    }
    ("portable", ((ITERS * 8 * 8 * 2) as f64, portable_fma))
}

/// The int8 dot probe, where the CPU has one.
fn int8_probe() -> Option<Probe> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F and VNNI were detected just above.
            return Some(((ITERS * 16 * 64 * 2) as f64, |n| unsafe { x86::dpbusd512(n) }));
        }
    }
    None
}

/// 8 independent `f32x8` multiply-add chains (`wide`'s portable vectors).
fn portable_fma(n: usize) -> f32 {
    let mut acc = [wide::f32x8::splat(0.0); 8];
    let a = wide::f32x8::splat(black_box(0.999_999));
    let b = wide::f32x8::splat(black_box(1e-7));
    for _ in 0..n {
        for v in &mut acc {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().map(|v| v.reduce_add()).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// 16 independent `vfmadd` chains of 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(n: usize) -> f32 {
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..n {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    /// 12 independent `vfmadd` chains of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(n: usize) -> f32 {
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); 12];
        for _ in 0..n {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        acc.iter()
            .map(|&v| {
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                lanes.iter().sum::<f32>()
            })
            .sum()
    }

    /// 16 independent `vpdpbusd` chains of 16 lanes (64 byte products each).
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn dpbusd512(n: usize) -> f32 {
        let a = _mm512_set1_epi8(black_box(3));
        let b = _mm512_set1_epi8(black_box(-2));
        let mut acc = [_mm512_setzero_si512(); 16];
        for _ in 0..n {
            for v in &mut acc {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_epi32(v) as f32).sum()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peaks_are_positive_and_ordered() {
        let p = super::measure(1);
        assert!(p.f32_single > 0.1 && p.f32_all >= p.f32_single * 0.5, "{p:?}");
        if let Some(i) = p.int8_single {
            assert!(i > 0.1, "{p:?}");
        }
    }
}
