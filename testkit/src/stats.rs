//! Error statistics between an original tensor and its dequantized approximation.

/// How far a reconstruction `x_hat` is from the original `x`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorStats {
    /// max |x - x_hat|; NaN when any difference is NaN.
    pub max_abs: f64,
    /// mean |x - x_hat| (0 for empty tensors).
    pub mean_abs: f64,
    /// Signal-to-quantization-noise ratio `10 log10(sum x^2 / sum (x - x_hat)^2)` in dB; `+inf` when the
    /// reconstruction is exact, `NaN` when both sums are zero.
    pub sqnr_db: f64,
}

impl ErrorStats {
    /// Compares two equally long slices, accumulating in f64.
    pub fn compute(x: &[f32], x_hat: &[f32]) -> ErrorStats {
        debug_assert_eq!(x.len(), x_hat.len());
        let (mut max_abs, mut sum_abs, mut signal, mut noise) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in x.iter().zip(x_hat) {
            let (a, b) = (a as f64, b as f64);
            let d = a - b;
            // Not f64::max, which drops a NaN operand: a NaN anywhere makes the maximum NaN.
            max_abs = if d.is_nan() || max_abs.is_nan() { f64::NAN } else { max_abs.max(d.abs()) };
            sum_abs += d.abs();
            signal += a * a;
            noise += d * d;
        }
        let n = x.len().min(x_hat.len());
        let mean_abs = if n == 0 { 0.0 } else { sum_abs / n as f64 };
        let sqnr_db = if noise == 0.0 {
            if signal == 0.0 {
                f64::NAN
            } else {
                f64::INFINITY
            }
        } else {
            10.0 * (signal / noise).log10()
        };
        ErrorStats { max_abs, mean_abs, sqnr_db }
    }
}

/// Formats an SQNR for a table: `inf` for exact reconstructions, `-inf` for an infinite error, `-` when
/// undefined (NaN).
pub fn fmt_db(db: f64) -> String {
    if db.is_nan() {
        "-".to_string()
    } else if db == f64::NEG_INFINITY {
        "-inf".to_string()
    } else if db.is_infinite() {
        "inf".to_string()
    } else {
        format!("{db:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let s = ErrorStats::compute(&[1.0, -2.0, 0.0, 3.0], &[1.0, -1.5, 0.25, 3.0]);
        assert_eq!(s.max_abs, 0.5);
        assert_eq!(s.mean_abs, 0.75 / 4.0);
        let expected = 10.0 * (14.0f64 / (0.25 + 0.0625)).log10();
        assert!((s.sqnr_db - expected).abs() < 1e-12);
        assert_eq!(ErrorStats::compute(&[1.0], &[1.0]).sqnr_db, f64::INFINITY);
        assert!(ErrorStats::compute(&[], &[]).sqnr_db.is_nan());
        assert_eq!(fmt_db(f64::INFINITY), "inf");
        let inf = ErrorStats::compute(&[1.0, 2.0], &[f32::INFINITY, 2.0]);
        assert_eq!((inf.max_abs, inf.sqnr_db), (f64::INFINITY, f64::NEG_INFINITY));
        assert_eq!(fmt_db(inf.sqnr_db), "-inf");
        for x_hat in [[f32::NAN, 5.0], [5.0, f32::NAN]] {
            assert!(ErrorStats::compute(&[1.0, 2.0], &x_hat).max_abs.is_nan(), "{x_hat:?}");
        }
    }
}
