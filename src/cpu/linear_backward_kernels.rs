//! The kernel of the backward's `dx = dy·W`: one chunk of input features, decoded tile by tile (generic over
//! the vector type and the 4-bit decoder, instantiated portable in `linear_kernels.rs` and per ISA in
//! `linear_x86.rs`). The driver is `linear_backward.rs`.

use super::linear_kernels::{decode_tile, Decoder, Vf};
use super::table::Job;

/// Input features per `dx` task (fixed: results never depend on the thread count). 64 keeps a 2-thread
/// split of SmolLM2's 576 columns within 10% of even.
pub(crate) const BACKWARD_COLS: usize = 64;
/// Rows of `W` decoded per panel (`PANEL_ROWS × BACKWARD_COLS` f32 = 32 KiB, L1-sized): every row of `dy`
/// runs over one panel before the next is decoded.
const PANEL_ROWS: usize = 128;
/// Rows of `dy` per micro-kernel call (register blocking: `MR × 2` vector accumulators).
const MR: usize = 4;

/// `out[r, c] = Σ_o dy[r, o]·W[o, k0 + c]` for the `m` rows and the `out.len() / m` columns from `k0`
/// (at most [`BACKWARD_COLS`]): the base part of `dx` for one chunk. `W[o0..o0+128, chunk]` is decoded into a
/// panel (the forward's decoder: the reference's values), then a register-blocked micro-kernel adds
/// `dy[r, o]·W[o, c]` for `MR` rows × two vectors of columns, `o` ascending. Every element sums `o` ascending
/// whatever the blocking, so the result does not depend on `m`'s split either.
#[inline(always)]
pub(crate) fn backward_cols<V: Vf, D: Decoder>(job: &Job<'_>, dy: &[f32], k0: usize, out: &mut [f32]) {
    let (n_out, m) = (job.layer.out_features, job.m);
    let kb = out.len() / m;
    assert!(kb <= BACKWARD_COLS && out.len() == m * kb && dy.len() == m * n_out);
    // 32 KiB on the stack: no allocation per task.
    let mut panel = [0.0f32; PANEL_ROWS * BACKWARD_COLS];
    out.fill(0.0);
    let wide = 2 * V::LANES;
    let full = kb / wide * wide;
    for o0 in (0..n_out).step_by(PANEL_ROWS) {
        let rows = PANEL_ROWS.min(n_out - o0);
        for j in 0..rows {
            decode_tile::<D>(job, o0 + j, 1, k0, kb, &mut panel[j * BACKWARD_COLS..]);
        }
        let panel = &panel[..rows * BACKWARD_COLS];
        let mut r0 = 0;
        while r0 < m {
            let rr = MR.min(m - r0);
            let d = |i: usize| &dy[(r0 + i) * n_out + o0..(r0 + i) * n_out + o0 + rows];
            let mut c = 0;
            while c < full {
                match rr {
                    4 => micro::<V, 4>(std::array::from_fn(d), panel, c, r0, kb, out),
                    3 => micro::<V, 3>(std::array::from_fn(d), panel, c, r0, kb, out),
                    2 => micro::<V, 2>(std::array::from_fn(d), panel, c, r0, kb, out),
                    _ => micro::<V, 1>(std::array::from_fn(d), panel, c, r0, kb, out),
                }
                c += wide;
            }
            // Columns past the last whole pair of vectors: plain loops, o ascending.
            for i in 0..rr {
                let di = d(i);
                let acc = &mut out[(r0 + i) * kb..(r0 + i + 1) * kb];
                for (cc, v) in acc.iter_mut().enumerate().skip(full) {
                    let mut a = *v;
                    for (j, &dj) in di.iter().enumerate() {
                        a += dj * panel[j * BACKWARD_COLS + cc];
                    }
                    *v = a;
                }
            }
            r0 += rr;
        }
    }
}

/// `out[r0 + i, c..c + 2·LANES] += Σ_j d[i][j]·panel[j][c..]` for `R` rows, accumulators in registers.
#[inline(always)]
fn micro<V: Vf, const R: usize>(d: [&[f32]; R], panel: &[f32], c: usize, r0: usize, kb: usize, out: &mut [f32]) {
    let rows = d[0].len();
    // Every slice is long enough: checked once here, so the loads below need no checks.
    assert!(
        panel.len() >= rows * BACKWARD_COLS && c + 2 * V::LANES <= BACKWARD_COLS && d.iter().all(|s| s.len() == rows)
    );
    assert!((r0 + R) * kb <= out.len() && c + 2 * V::LANES <= kb);
    // A loop, not `array::from_fn`: a closure is compiled without the caller's target features, so its loads
    // would be out-of-line calls.
    let mut acc: [[V; 2]; R] = [[V::splat(0.0); 2]; R];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = [V::load(&out[(r0 + i) * kb + c..]), V::load(&out[(r0 + i) * kb + c + V::LANES..])];
    }
    for j in 0..rows {
        let base = j * BACKWARD_COLS + c;
        // SAFETY: base + 2·LANES ≤ rows·BACKWARD_COLS ≤ panel.len() (asserted above).
        let w0 = V::load(unsafe { panel.get_unchecked(base..base + V::LANES) });
        // SAFETY: as above.
        let w1 = V::load(unsafe { panel.get_unchecked(base + V::LANES..base + 2 * V::LANES) });
        for i in 0..R {
            // SAFETY: j < rows = d[i].len() (asserted above).
            let dv = V::splat(unsafe { *d[i].get_unchecked(j) });
            acc[i][0] = V::fmadd(dv, w0, acc[i][0]);
            acc[i][1] = V::fmadd(dv, w1, acc[i][1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        a[0].store(&mut out[(r0 + i) * kb + c..]);
        a[1].store(&mut out[(r0 + i) * kb + c + V::LANES..]);
    }
}
