//! Keeps one idle pool worker polling for a short while after a split forward, so that the next forward's
//! split finds it awake.
//!
//! A rayon worker with nothing to do yields ~32 times and then sleeps on a futex. Waking it when the next
//! forward pushes work costs 40–60 µs in a VM (an interrupt to a halted vCPU): 7% of a 4096×14336 int8-activation
//! GEMV at two threads (0.607 ms; 0.573 ms with a lingering worker, against 1.127 / 2 = 0.564 for a perfect
//! split). After a split forward, [`linger`] spawns one task that polls the pool with `rayon::yield_now`
//! (stealing and running whatever is pushed: lowbit's blocks or anyone's) until the linger time passes with
//! nothing to run. The task never delays the caller: it runs on a worker that would otherwise idle, and it
//! returns at once if it lands on the thread that spawned it. Off by default (the spawn allocates one small
//! rayon job per split, and a polling core is busy); [`set_thread_linger`] turns it on (the `lowbit` tool and the
//! benches set 300 µs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The linger time in nanoseconds (default 0: off).
static LINGER_NS: AtomicU64 = AtomicU64::new(0);

/// Sets how long a pool worker keeps polling for work after a split CPU forward (`QuantLinear::forward*`)
/// before it returns to rayon's sleep; `Duration::ZERO` (the default) turns lingering off. 300 µs keeps a second
/// thread awake across the layers of a decode step and saves rayon's wake-up (40–60 µs in a VM) at each split:
/// a 4096×14336 int8-activation GEMV at two threads 0.607 → 0.572 ms. The cost: one small allocation (rayon's
/// job) per split that finds no worker lingering, which breaks a forward's "allocates nothing after the first
/// call", and a core kept busy for the linger time after the last split. Applies to every pool; results never
/// depend on it.
pub fn set_thread_linger(time: Duration) {
    LINGER_NS.store(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// The time set by [`set_thread_linger`].
pub fn thread_linger() -> Duration {
    Duration::from_nanos(LINGER_NS.load(Ordering::Relaxed))
}

#[cfg(feature = "rayon")]
mod imp {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Lingering tasks spawned and not yet returned, over all pools.
    pub(super) static LINGERING: AtomicUsize = AtomicUsize::new(0);

    /// Called on a pool worker after it split a forward: keeps up to `threads − 1` other workers polling.
    pub(crate) fn linger() {
        let linger = super::thread_linger();
        let Some(me) = rayon::current_thread_index() else { return };
        if linger.is_zero() || LINGERING.load(Ordering::Relaxed) >= rayon::current_num_threads().saturating_sub(1) {
            return;
        }
        LINGERING.fetch_add(1, Ordering::Relaxed);
        rayon::spawn(move || {
            if rayon::current_thread_index() != Some(me) {
                let mut idle_since = Instant::now();
                loop {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle_since = Instant::now();
                    } else if idle_since.elapsed() >= linger {
                        break;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            LINGERING.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(feature = "rayon")]
pub(crate) use imp::linger;

/// Without threads there is nothing to keep awake.
#[cfg(not(feature = "rayon"))]
pub(crate) fn linger() {}

#[cfg(all(test, feature = "rayon"))]
mod tests {
    use super::imp::LINGERING;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    /// A split in a two-thread pool leaves a lingering task, which runs work pushed meanwhile (it does not hog
    /// its worker) and returns after the linger time. Other tests may linger in the global pool at the same
    /// time, so the count is only bounded, never compared with an exact value.
    #[test]
    fn a_lingering_worker_runs_new_work_and_then_returns() {
        // On for this test (other tests in this binary may then linger too: harmless, results never change).
        super::set_thread_linger(Duration::from_micros(300));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (spawner, runner) = pool.install(|| {
            super::linger();
            assert!(
                LINGERING.load(Ordering::Relaxed) >= 1,
                "a split in a two-thread pool should leave a lingering task"
            );
            // Push work only the other worker can run: the first half waits (bounded) until the second has
            // started, so a lingering task that hogged its worker would fail the test, not hang it.
            let started = std::sync::atomic::AtomicBool::new(false);
            let me = rayon::current_thread_index();
            let (_, other) = rayon::join(
                || {
                    let t = Instant::now();
                    while !started.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(30) {
                        std::thread::yield_now();
                    }
                },
                || {
                    started.store(true, Ordering::Release);
                    rayon::current_thread_index()
                },
            );
            (me, other)
        });
        assert_ne!(spawner, runner, "the other worker should have stolen the second half of the join");
        let start = Instant::now();
        while LINGERING.load(Ordering::Relaxed) > 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "a lingering task never returned");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
