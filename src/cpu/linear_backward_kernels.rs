//! The kernel of the backward's `dx = dy·W`: one chunk of input features, decoded tile by tile (generic over
//! the vector type and the 4-bit decoder, instantiated portable in `linear_kernels.rs` and per ISA in
//! `linear_x86.rs`). The driver is `linear_backward.rs`.

use super::linear_kernels::{decode_tile, Decoder, Vf};
use super::table::Job;

/// Input features per `dx` task (fixed: results never depend on the thread count). 64 keeps a 2-thread
/// split of SmolLM2's 576 columns within 10% of even.
pub(crate) const BACKWARD_COLS: usize = 64;
/// Rows of `W` decoded per tile: each accumulator load/store carries this many multiply-adds.
const BACKWARD_ROWS: usize = 8;

/// `out[r, c] = Σ_o dy[r, o]·W[o, k0 + c]` for the `m` rows and the `out.len() / m` columns from `k0`
/// (at most [`BACKWARD_COLS`]): the base part of `dx` for one chunk, `o` ascending.
#[inline(always)]
pub(crate) fn backward_cols<V: Vf, D: Decoder>(job: &Job<'_>, dy: &[f32], k0: usize, out: &mut [f32]) {
    let (n_out, m) = (job.layer.out_features, job.m);
    let kb = out.len() / m;
    assert!(kb <= BACKWARD_COLS && out.len() == m * kb && dy.len() == m * n_out);
    // 2 KiB on the stack: no allocation per task.
    let mut tile = [0.0f32; BACKWARD_ROWS * BACKWARD_COLS];
    out.fill(0.0);
    for o0 in (0..n_out).step_by(BACKWARD_ROWS) {
        let rows = BACKWARD_ROWS.min(n_out - o0);
        for j in 0..rows {
            decode_tile::<D>(job, o0 + j, 1, k0, kb, &mut tile[j * BACKWARD_COLS..]);
        }
        for r in 0..m {
            let d = &dy[r * n_out + o0..r * n_out + o0 + rows];
            let acc = &mut out[r * kb..(r + 1) * kb];
            if rows == BACKWARD_ROWS {
                axpy_rows::<V, BACKWARD_ROWS>(d, &tile, acc);
            } else {
                axpy_rows_dyn::<V>(d, &tile, acc);
            }
        }
    }
}

/// `acc[c] += Σ_j d[j]·tile[j][c]` (j ascending) for `R` decoded rows.
#[inline(always)]
fn axpy_rows<V: Vf, const R: usize>(d: &[f32], tile: &[f32; BACKWARD_ROWS * BACKWARD_COLS], acc: &mut [f32]) {
    let kb = acc.len();
    let full = kb / V::LANES * V::LANES;
    let dv: [V; R] = std::array::from_fn(|j| V::splat(d[j]));
    let mut c = 0;
    while c < full {
        let mut a = V::load(&acc[c..]);
        for (j, dj) in dv.iter().enumerate() {
            a = V::fmadd(*dj, V::load(&tile[j * BACKWARD_COLS + c..]), a);
        }
        a.store(&mut acc[c..]);
        c += V::LANES;
    }
    for (c, v) in acc.iter_mut().enumerate().skip(full) {
        let mut a = *v;
        for (j, &dj) in d.iter().enumerate().take(R) {
            a += dj * tile[j * BACKWARD_COLS + c];
        }
        *v = a;
    }
}

/// [`axpy_rows`] for the last, shorter tile (`d.len()` rows).
#[inline(always)]
fn axpy_rows_dyn<V: Vf>(d: &[f32], tile: &[f32; BACKWARD_ROWS * BACKWARD_COLS], acc: &mut [f32]) {
    let kb = acc.len();
    let full = kb / V::LANES * V::LANES;
    let mut c = 0;
    while c < full {
        let mut a = V::load(&acc[c..]);
        for (j, &dj) in d.iter().enumerate() {
            a = V::fmadd(V::splat(dj), V::load(&tile[j * BACKWARD_COLS + c..]), a);
        }
        a.store(&mut acc[c..]);
        c += V::LANES;
    }
    for (c, v) in acc.iter_mut().enumerate().skip(full) {
        let mut a = *v;
        for (j, &dj) in d.iter().enumerate() {
            a += dj * tile[j * BACKWARD_COLS + c];
        }
        *v = a;
    }
}
