//! The machine's memory limits, measured: read, write and copy bandwidth over buffers larger than any cache,
//! on one thread and on every thread of the current rayon pool.
//!
//! Library-independent (std and rayon only) so that every harness measures the same way: `lowbit bench --all`,
//! the criterion benches and `bench-peers/` all call it from this crate.
//!
//! Units: bytes moved per second, where a copy of `n` bytes moves `2n` (it reads `n` and writes `n`; the
//! write-allocate reads a CPU may add are not counted, the same convention as the kernel figures).

use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Default buffer size: 256 MiB, several times the last-level cache of common desktop and server CPUs.
pub const DEFAULT_BYTES: usize = 256 << 20;

/// One bandwidth figure per direction, in bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bandwidth {
    /// Reading a buffer (summing its 64-bit words).
    pub read: f64,
    /// Writing a buffer (filling it with a value).
    pub write: f64,
    /// Copying one buffer into another, counting the bytes read plus the bytes written.
    pub copy: f64,
}

/// Bandwidth on one thread and on all threads of the pool it was measured in.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// One thread.
    pub single: Bandwidth,
    /// Every thread of the rayon pool (`threads` of them).
    pub all: Bandwidth,
    /// Number of threads of the `all` figures.
    pub threads: usize,
    /// Size of each buffer, in bytes.
    pub bytes: usize,
}

/// Which limit a kernel is held against, chosen by the direction of its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Mostly reads (writes under 10% of the bytes moved): GEMV, GEMM.
    Read,
    /// Mostly writes (reads under 10%).
    Write,
    /// Both (quantize, dequantize): held against the copy bandwidth, which counts both.
    Copy,
}

impl Direction {
    /// The direction of a kernel that reads `read` and writes `written` bytes.
    pub fn of(read: f64, written: f64) -> Direction {
        let total = read + written;
        if written < 0.1 * total {
            Direction::Read
        } else if read < 0.1 * total {
            Direction::Write
        } else {
            Direction::Copy
        }
    }

    /// `read`, `write` or `copy`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
            Direction::Copy => "copy",
        }
    }
}

impl Bandwidth {
    /// The figure for `d`, in bytes per second.
    pub fn get(&self, d: Direction) -> f64 {
        match d {
            Direction::Read => self.read,
            Direction::Write => self.write,
            Direction::Copy => self.copy,
        }
    }
}

impl Limits {
    /// The better of two measurements, figure by figure (a loaded machine can only make a figure lower).
    pub fn max(&self, other: &Limits) -> Limits {
        let m = |a: &Bandwidth, b: &Bandwidth| Bandwidth {
            read: a.read.max(b.read),
            write: a.write.max(b.write),
            copy: a.copy.max(b.copy),
        };
        Limits { single: m(&self.single, &other.single), all: m(&self.all, &other.all), ..*self }
    }

    /// The limits for a kernel on `threads` threads: the single-thread figures for 1, else the all-thread ones.
    pub fn for_threads(&self, threads: usize) -> &Bandwidth {
        if threads <= 1 {
            &self.single
        } else {
            &self.all
        }
    }

    /// The fraction of its limit a kernel reached: `(read + written) / seconds / limit`.
    pub fn fraction(&self, threads: usize, read: f64, written: f64, seconds: f64) -> f64 {
        let limit = self.for_threads(threads).get(Direction::of(read, written));
        if seconds > 0.0 && limit > 0.0 {
            (read + written) / seconds / limit
        } else {
            f64::NAN
        }
    }
}

/// Measures the limits with two buffers of `bytes` bytes each (rounded up to a multiple of 4 KiB), taking the
/// best of `reps` timed passes per figure after one untimed pass. "All threads" is the current rayon pool.
/// A buffer under 64 MiB (one that may stay in a last-level cache) is swept several times per timed pass, each
/// thread repeating its own part, so that waking the pool's workers (tens of µs) does not count as bandwidth lost.
pub fn measure(bytes: usize, reps: usize) -> Limits {
    let words = bytes.div_ceil(4096) * 512;
    // Written element by element so that every page is really mapped before timing.
    let mut src: Vec<u64> = (0..words as u64).collect();
    let mut dst: Vec<u64> = vec![1; words];
    let threads = rayon::current_num_threads().max(1);
    let chunk = words.div_ceil(threads).next_multiple_of(512);
    let sweeps = ((64 << 20) / (words * 8).max(1)).max(1);
    let n = (words * 8 * sweeps) as f64;
    let reps = reps.max(1);
    let read = |x: &[u64]| (0..sweeps).fold(0u64, |a, _| a.wrapping_add(sum(black_box(x))));
    let write = |x: &mut [u64]| (0..sweeps).for_each(|i| fill(x, 7 + i as u64));
    let copy = |d: &mut [u64], s: &[u64]| (0..sweeps).for_each(|_| d.copy_from_slice(black_box(s)));

    let single = Bandwidth {
        read: n / best(reps, || {
            black_box(read(&src));
        }),
        write: n / best(reps, || write(&mut dst)),
        copy: 2.0 * n / best(reps, || copy(&mut dst, &src)),
    };
    let all = Bandwidth {
        read: n / best(reps, || {
            black_box(src.par_chunks(chunk).map(read).reduce(|| 0, u64::wrapping_add));
        }),
        write: n / best(reps, || dst.par_chunks_mut(chunk).for_each(write)),
        copy: 2.0 * n
            / best(reps, || dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| copy(d, s))),
    };
    src[0] = black_box(dst[words - 1]);
    black_box(&src);
    Limits { single, all, threads, bytes: words * 8 }
}

/// Seconds of the fastest of `reps` timed runs of `f`, after one untimed run.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Sum of the words. A plain fold: LLVM vectorises it into interleaved vector adds for every target. (A
/// hand-made eight-lane array accumulator was compiled for `-C target-cpu=znver4` into strided gathers and
/// read at 4.5 GB/s instead of ~30: the probe then understated the limit six-fold in `target-cpu=native`
/// builds such as bench-peers'.)
fn sum(x: &[u64]) -> u64 {
    x.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

/// Plain stores (`fill` compiles to `memset`, which may use streaming stores for large buffers, as a kernel
/// writing its output could).
fn fill(x: &mut [u64], v: u64) {
    x.fill(black_box(v));
}

/// GB/s (10⁹ bytes per second) of a figure in bytes per second.
pub fn gb_s(bytes_per_s: f64) -> f64 {
    bytes_per_s / 1e9
}

#[cfg(test)]
mod tests {

    #[test]
    fn direction_follows_the_traffic() {
        use super::Direction;
        assert_eq!(Direction::of(100.0, 1.0), Direction::Read);
        assert_eq!(Direction::of(1.0, 100.0), Direction::Write);
        assert_eq!(Direction::of(4.0, 1.0), Direction::Copy);
    }

    #[test]
    fn small_measurement_gives_positive_figures() {
        use super::measure;
        let l = measure(1 << 20, 1);
        assert_eq!(l.bytes, 1 << 20);
        for b in [l.single, l.all] {
            assert!(b.read > 0.0 && b.write > 0.0 && b.copy > 0.0, "{b:?}");
        }
        let f = l.fraction(1, 1e6, 0.0, 1.0);
        assert!((f - 1e6 / l.single.read).abs() < 1e-12);
    }
}
