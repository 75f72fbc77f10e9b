//! How a CPU forward spreads its blocks over the rayon pool: one run of consecutive blocks per thread, and a
//! caller that waits for the other half by spinning briefly instead of in rayon's idle loop.
//!
//! Two costs of the plain `par_chunks_mut(..).for_each(..)` were measured on a 2-vCPU VM with the second worker
//! lingering ([`super::pool_linger`]):
//! - rayon's adaptive split cuts 18–64 blocks into at least twice as many tasks as threads, each a `join`, that
//!   the threads then steal back and forth: 0.8–2.3 µs per call against ~0.2 µs for one `join`;
//! - a worker that finishes its half first and waits in `join` polls with `sched_yield` system calls between
//!   looks at the latch; in a VM a yield costs µs, so the caller learns late that the other half is done (a
//!   profile of a 4096-row layer at two threads showed the caller yielding for about as long as it worked).
//!
//! The work function is `Copy` and each half of a split takes its own copy (with everything it captured, by
//! value): a stolen half then finds its whole context inside rayon's job, a few adjacent cache lines of the
//! caller's stack, where references from one closure to the next cost one cross-core miss each (~150 ns one way
//! on that VM). Int8 activations, NF4+DQ M = 1 from L3 inside the pool, two threads: 576×576 5.76 → 5.24 µs,
//! 1536×576 10.33 → 10.13 µs, 576×1536 11.66 → 11.46 µs; f32 576×576 10.45 → 10.29 µs.
//!
//! Fixed runs give up stealing between threads: a thread the host deschedules delays the forward, as it would
//! delay its own half anyway. The spin is bounded ([`SPIN_LIMIT`]), and only happens while the other half is
//! running on another worker. Which thread runs a block never changes a result: the blocks are fixed.

/// The longest [`join`]'s caller spins for the other half before falling back to rayon's wait (which also runs
/// other work meanwhile): a half that takes longer has been descheduled or is much larger than the caller's.
#[cfg(feature = "rayon")]
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(20);

/// `f(i, a_i, b_i)` for consecutive chunks of `a` (`ca` items each) zipped with those of `b` (`cb` items),
/// over the pool (one run of chunks per thread) when `parallel` and the `rayon` feature is on; in order on
/// the calling thread otherwise. Stops at the shorter of the two, as `zip` does.
pub(crate) fn for_each_chunk_zip<B: Send>(
    parallel: bool,
    a: &mut [f32],
    ca: usize,
    b: &mut [B],
    cb: usize,
    f: impl Fn(usize, &mut [f32], &mut [B]) + Sync + Send + Copy,
) {
    let (ca, cb) = (ca.max(1), cb.max(1));
    #[cfg(feature = "rayon")]
    if parallel {
        let chunks = a.len().div_ceil(ca).min(b.len().div_ceil(cb));
        let per_task = chunks.div_ceil(rayon::current_num_threads().max(1)).max(1);
        return split(a, ca, b, cb, 0, per_task, f);
    }
    let _ = parallel;
    a.chunks_mut(ca).zip(b.chunks_mut(cb)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
}

/// `f(i, chunk_i)` for consecutive chunks of `items` (`chunk` items each), as [`for_each_chunk_zip`].
pub(crate) fn for_each_chunk(
    parallel: bool,
    items: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send + Copy,
) {
    // One zero-sized partner per chunk (a `Vec<()>` allocates nothing).
    let mut units = vec![(); items.len().div_ceil(chunk.max(1))];
    for_each_chunk_zip(parallel, items, chunk, &mut units, 1, move |i, x, _| f(i, x));
}

/// Runs chunks `first..` of `a`/`b` in runs of at most `per_task` chunks: halves (by whole runs) until one
/// run is left, the left half on this thread.
#[cfg(feature = "rayon")]
fn split<B: Send>(
    a: &mut [f32],
    ca: usize,
    b: &mut [B],
    cb: usize,
    first: usize,
    per_task: usize,
    f: impl Fn(usize, &mut [f32], &mut [B]) + Sync + Send + Copy,
) {
    let chunks = a.len().div_ceil(ca).min(b.len().div_ceil(cb));
    let runs = chunks.div_ceil(per_task);
    if runs <= 1 {
        a.chunks_mut(ca).zip(b.chunks_mut(cb)).enumerate().for_each(|(i, (x, y))| f(first + i, x, y));
        return;
    }
    let left = runs.div_ceil(2) * per_task;
    let (al, ar) = a.split_at_mut(left * ca);
    let (bl, br) = b.split_at_mut(left * cb);
    // Each half takes its own copy of `f` (what the closure captured, by value: `move`), so the thread that
    // steals the right half finds everything it needs in rayon's job on this thread's stack, instead of
    // following references from one closure to the next across this thread's stack, one cache miss each.
    join(move || split(al, ca, bl, cb, first, per_task, f), move || split(ar, ca, br, cb, first + left, per_task, f));
}

/// Runs `a` and `b`, on two threads of the current rayon pool when one is free, and returns both results:
/// `rayon::join(a, b)`, except that when `b` was taken by another worker and is still running once `a` is done,
/// this thread spins for it (up to 20 µs) before entering rayon's wait, whose `sched_yield` calls cost µs each
/// in a VM. For an engine that runs independent forwards side by side (lowbit-llm runs the layers that read the
/// same input so: `q` beside `k`, `gate` beside `up`); forwards inside either branch still split over the pool.
/// Without the `rayon` feature: `a`, then `b`, on this thread.
///
/// ```
/// let x = vec![1.0f32; 8];
/// let (s, p) = lowbit::cpu::join(|| x.iter().sum::<f32>(), || x.iter().product::<f32>());
/// assert_eq!((s, p), (8.0, 1.0));
/// ```
pub fn join<RA: Send, RB: Send>(a: impl FnOnce() -> RA + Send, b: impl FnOnce() -> RB + Send) -> (RA, RB) {
    #[cfg(feature = "rayon")]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (started, done) = (AtomicBool::new(false), AtomicBool::new(false));
        rayon::join(
            || {
                let ra = a();
                // `started` is only set by a worker that runs `b` (this thread runs it after `a` returns when
                // nobody took it), so the spin waits for work in progress elsewhere.
                if started.load(Ordering::Acquire) {
                    let t0 = std::time::Instant::now();
                    let mut spins = 0u32;
                    while !done.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                        spins = spins.wrapping_add(1);
                        if spins.is_multiple_of(256) && t0.elapsed() >= SPIN_LIMIT {
                            break;
                        }
                    }
                }
                ra
            },
            || {
                started.store(true, Ordering::Release);
                let rb = b();
                done.store(true, Ordering::Release);
                rb
            },
        )
    }
    #[cfg(not(feature = "rayon"))]
    (a(), b())
}

#[cfg(test)]
mod tests {
    use super::{for_each_chunk, for_each_chunk_zip, join};

    /// `join` returns both results, in order, from outside a pool and inside pools of 1–3 threads, nested too.
    #[test]
    fn join_returns_both_results() {
        let check = || {
            let v: Vec<u64> = (1..=1000).collect();
            let (s, (mx, n)) = join(|| v.iter().sum::<u64>(), || join(|| v.iter().max().copied(), || v.len()));
            assert_eq!((s, mx, n), (500_500, Some(1000), 1000));
        };
        check();
        #[cfg(feature = "rayon")]
        for threads in [1, 2, 3] {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(check);
        }
    }

    /// Every chunk is visited once with its index, its own piece of both slices, on one thread or many, for
    /// chunk counts that do and do not divide evenly over the threads, with a shorter partner slice.
    #[test]
    fn every_chunk_runs_once_with_its_index_and_pieces() {
        let check = || {
            for n in [0usize, 1, 5, 17, 18, 64, 65] {
                for parallel in [false, true] {
                    let mut a: Vec<f32> = vec![0.0; n * 3 + 1];
                    let mut b: Vec<u32> = vec![0; n.div_ceil(3) * 2];
                    for_each_chunk_zip(parallel, &mut a, 3, &mut b, 2, |i, x, y| {
                        x.iter_mut().for_each(|v| *v += 1.0 + i as f32);
                        y.iter_mut().for_each(|v| *v += 1 + i as u32);
                    });
                    let zipped = (n * 3 + 1).div_ceil(3).min(n.div_ceil(3));
                    for (k, v) in a.iter().enumerate() {
                        let want = if k / 3 < zipped { 1.0 + (k / 3) as f32 } else { 0.0 };
                        assert_eq!(*v, want, "a[{k}] n {n} parallel {parallel}");
                    }
                    for (k, v) in b.iter().enumerate() {
                        assert_eq!(*v, 1 + (k / 2) as u32, "b[{k}] n {n} parallel {parallel}");
                    }
                    let mut c = vec![0.0f32; n * 4];
                    for_each_chunk(parallel, &mut c, 4, |i, x| x.iter_mut().for_each(|v| *v += i as f32));
                    assert!(c.iter().enumerate().all(|(k, v)| *v == (k / 4) as f32), "n {n} parallel {parallel}");
                }
            }
        };
        check();
        #[cfg(feature = "rayon")]
        for threads in [2, 3, 4] {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(check);
        }
    }
}
