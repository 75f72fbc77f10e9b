//! What a `lowbit bench` run will cost, estimated from its arguments before anything is built, so that a
//! request for hours of work is refused at once (unless the user confirms it) instead of running silently.

use super::{Bench, REFERENCE_MAX_MACS, WARMUP};

/// Fused forward throughput assumed, in FLOP/s: a conservative figure for the CPU kernels on one slow core
/// (they reach tens of GFLOP/s on two cores); the GPU is assumed no faster.
pub const FLOP_RATE: f64 = 5e9;
/// Memory traffic assumed, in bytes/s (weight, x and y per forward).
pub const BYTE_RATE: f64 = 1e9;
/// Weights generated and quantized per second while the synthetic layer is built.
pub const BUILD_RATE: f64 = 2e7;
/// Multiply-adds per second of the single-threaded f64 reference forward.
pub const REFERENCE_RATE: f64 = 1e8;
/// Estimated seconds above which `bench` asks for `--yes`.
pub const MAX_SECONDS: f64 = 60.0;

/// The estimated work of one `bench` run; every figure is an upper-bound-minded estimate, not a measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Forwards run (warm-up and timed).
    pub forwards: f64,
    /// FLOPs of one forward: 2*M*out*in, plus 2*M*r*(in + out) with a LoRA adapter of rank r.
    pub flop: f64,
    /// Bytes one forward moves: the weight at one byte per element (the widest packed format, int8), x and y
    /// in f32, and the adapter in f32.
    pub bytes: f64,
    /// Weights built (generated and quantized) before timing: out*in.
    pub build: f64,
    /// Multiply-adds of the reference check (0 when it is skipped, above [`REFERENCE_MAX_MACS`]).
    pub reference_macs: f64,
}

impl Estimate {
    /// The work `b` asks for (all in f64, so no count can overflow).
    pub fn of(b: &Bench) -> Estimate {
        let (m, out, inp) = (b.batch as f64, b.out as f64, b.inp as f64);
        let r = b.lora_rank.unwrap_or(0) as f64;
        let flop = 2.0 * m * out * inp + 2.0 * m * r * (inp + out);
        let bytes = out * inp + 4.0 * m * (inp + out) + 4.0 * r * (inp + out);
        let macs = m * out * inp + m * r * (inp + out);
        Estimate {
            forwards: (WARMUP + b.iters) as f64,
            flop,
            bytes,
            build: out * inp,
            reference_macs: if m * out * inp > REFERENCE_MAX_MACS as f64 { 0.0 } else { macs },
        }
    }

    /// Seconds at the assumed rates ([`FLOP_RATE`], [`BYTE_RATE`], [`BUILD_RATE`], [`REFERENCE_RATE`]).
    pub fn seconds(&self) -> f64 {
        self.forwards * (self.flop / FLOP_RATE + self.bytes / BYTE_RATE)
            + self.build / BUILD_RATE
            + self.reference_macs / REFERENCE_RATE
    }

    /// One line: the total and its parts.
    pub fn describe(&self) -> String {
        format!(
            "about {:.0} s at conservative rates: {:.0} forward(s) of {:.3} GFLOP and {:.3} GB ({:.1} s at {} \
             GFLOP/s and {} GB/s), building {:.0} weights ({:.1} s), reference check {} ({:.1} s)",
            self.seconds(),
            self.forwards,
            self.flop / 1e9,
            self.bytes / 1e9,
            self.forwards * (self.flop / FLOP_RATE + self.bytes / BYTE_RATE),
            FLOP_RATE / 1e9,
            BYTE_RATE / 1e9,
            self.build,
            self.build / BUILD_RATE,
            if self.reference_macs == 0.0 {
                "skipped".to_string()
            } else {
                format!("{:.3e} MACs", self.reference_macs)
            },
            self.reference_macs / REFERENCE_RATE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Device;

    fn bench(out: usize, inp: usize, batch: usize, iters: usize) -> Bench {
        Bench {
            format: lowbit::Scheme::Int8(lowbit::affine::Granularity::PerChannel),
            out,
            inp,
            batch,
            lora_rank: None,
            threads: None,
            iters,
            device: Device::Cpu,
            yes: false,
        }
    }

    #[test]
    fn counts_the_work_of_each_part() {
        let e = Estimate::of(&bench(100, 50, 2, 8));
        assert_eq!(e.forwards, (WARMUP + 8) as f64);
        assert_eq!(e.flop, 2.0 * 2.0 * 100.0 * 50.0);
        assert_eq!(e.bytes, 5000.0 + 4.0 * 2.0 * 150.0);
        assert_eq!((e.build, e.reference_macs), (5000.0, 10_000.0));
        let want = e.forwards * (e.flop / FLOP_RATE + e.bytes / BYTE_RATE) + 5000.0 / BUILD_RATE + 1e4 / REFERENCE_RATE;
        assert_eq!(e.seconds(), want);
    }

    #[test]
    fn the_default_shape_passes_and_a_huge_one_does_not() {
        assert!(Estimate::of(&bench(4096, 4096, 1, 20)).seconds() < 5.0);
        assert!(Estimate::of(&bench(4096, 4096, 8, 20)).seconds() < MAX_SECONDS);
        let huge = Estimate::of(&bench(32768, 32768, 4096, 100_000));
        assert_eq!(huge.reference_macs, 0.0);
        assert!(huge.seconds() > 1e6, "{}", huge.describe());
    }
}
