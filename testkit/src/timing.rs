//! Timing a repeated operation (warm-up, then timed iterations, median) and turning times into rates.

use std::time::{Duration, Instant};

/// Times of the timed iterations of [`measure`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// The median iteration.
    pub median: Duration,
    /// The fastest iteration.
    pub min: Duration,
    /// The slowest iteration.
    pub max: Duration,
    /// Number of timed iterations.
    pub iters: usize,
}

/// Runs `f` `warmup` times untimed, then `iters` (≥ 1) times timed. Stops at the first error.
pub fn measure<E>(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Timing, E> {
    for _ in 0..warmup {
        f()?;
    }
    let iters = iters.max(1);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(Timing { median: times[iters / 2], min: times[0], max: times[iters - 1], iters })
}

/// `x` per second in units of 10⁹, or `None` for a zero duration.
pub fn giga_per_s(x: f64, d: Duration) -> Option<f64> {
    let s = d.as_secs_f64();
    (s > 0.0).then(|| x / s / 1e9)
}

/// [`giga_per_s`] with two decimals, `-` for a zero duration.
pub fn fmt_rate(x: f64, d: Duration) -> String {
    giga_per_s(x, d).map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

/// Milliseconds with three decimals.
pub fn fmt_ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_the_timed_iterations() {
        let mut calls = 0;
        let t = measure::<()>(2, 5, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, t.iters), (7, 5));
        assert!(t.min <= t.median && t.median <= t.max);
        assert_eq!(measure(0, 3, || Err::<(), _>("boom")), Err("boom"));
        assert_eq!(giga_per_s(2e9, Duration::from_secs(1)), Some(2.0));
        assert_eq!(fmt_rate(1.0, Duration::ZERO), "-");
    }
}
