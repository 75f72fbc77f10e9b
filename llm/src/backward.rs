//! Backward passes of the model's non-linear operations, for fine-tuning (QLoRA): RMSNorm with a frozen
//! weight, RoPE (rotate-half), SiLU·mul, causal grouped-query attention over one whole sequence (with the
//! training forward that saves the softmax probabilities), cross-entropy over logits, and a dense
//! `C = A·B` for the tied `lm_head`'s input gradient.
//!
//! Everything is f32 in and out (cross-entropy's log-sum-exp and loss are f64). Every public function checks
//! its lengths and returns [`Error::Invalid`] naming what it expected; on an error nothing has been written
//! unless the function says otherwise. Threaded functions (rayon) give results independent of the number of
//! threads: every output element is computed by one task, in a fixed order of operations.
//!
//! Which outputs are overwritten and which are accumulated into: [`rms_norm_backward`] and
//! [`rms_norm_backward_rows`] ADD into `dx` (the trainer sums them into the residual stream's gradient);
//! every other function overwrites its outputs.

use crate::linear::dot;
use crate::ops::softmax;
use crate::{Config, Error, Result};
use rayon::prelude::*;

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{what} has {got} values, expected {want}")))
    }
}

/// `a · b` for lengths, or an error naming the shape (no silent overflow).
fn product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Invalid(format!("{what}: the shape {dims:?} overflows usize")))
}

/// The gradient of [`crate::ops::rms_norm`] for one row, ADDED into `dx`: with
/// `y = w·(x·r)`, `r = 1/sqrt(mean(x²) + eps)`,
/// `dx += r·(w⊙dy − x·r²·Σ(w⊙dy⊙x)/n)`.
///
/// `r` is recomputed exactly as the forward computes it (f32 sum of squares); the one reduction
/// `Σ(w⊙dy⊙x)` is summed in f64. The weight is frozen: there is no weight gradient. Errors unless
/// `x`, `w`, `dy` and `dx` have the same non-zero length and `eps` is finite and ≥ 0.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Err(Error::Invalid("rms_norm_backward of an empty row (expected at least one value)".into()));
    }
    expect_len("rms_norm_backward: w", w.len(), n)?;
    expect_len("rms_norm_backward: dy", dy.len(), n)?;
    expect_len("rms_norm_backward: dx", dx.len(), n)?;
    check_eps(eps)?;
    rms_norm_backward_row(x, w, eps, dy, dx);
    Ok(())
}

/// [`rms_norm_backward`] for `rows` rows of `w.len()` values (`x`, `dy`, `dx` all `[rows, w.len()]`), ADDED
/// into `dx`, threaded over rows (each row computed exactly as by [`rms_norm_backward`]). Errors unless
/// `w` is non-empty, `x.len()` is a multiple of `w.len()`, `dy` and `dx` are as long as `x`, and `eps` is
/// finite and ≥ 0.
pub fn rms_norm_backward_rows(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(Error::Invalid(format!(
            "rms_norm_backward_rows: x has {} values and w {d}, expected x = rows·{d} with a non-empty w",
            x.len()
        )));
    }
    expect_len("rms_norm_backward_rows: dy", dy.len(), x.len())?;
    expect_len("rms_norm_backward_rows: dx", dx.len(), x.len())?;
    check_eps(eps)?;
    dx.par_chunks_mut(d).zip(x.par_chunks(d)).zip(dy.par_chunks(d)).for_each(|((dxr, xr), dyr)| {
        rms_norm_backward_row(xr, w, eps, dyr, dxr);
    });
    Ok(())
}

fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("rms_norm_backward: eps is {eps}, expected a finite value ≥ 0")))
    }
}

fn rms_norm_backward_row(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let n = x.len();
    // Exactly the forward's r (ops::rms_norm).
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
    let r = 1.0 / (ss + eps).sqrt();
    let c: f64 = x.iter().zip(w).zip(dy).map(|((&x, &w), &g)| w as f64 * g as f64 * x as f64).sum();
    let k = (c * (r as f64) * (r as f64) / n as f64) as f32;
    for (((o, &xv), &wv), &g) in dx.iter_mut().zip(x).zip(w).zip(dy) {
        *o += r * (wv * g - xv * k);
    }
}

/// The gradient of [`crate::ops::apply_rope`] in place: `dv` (`[heads, head_dim]`, one position's row of
/// heads) holds the gradient with respect to the rotated values on entry and with respect to the values
/// before the rotation on return. The rotation is orthogonal, so this is the rotation by the opposite angle:
/// `(a, b) = (dv[i], dv[i + half])`, `dv[i] = a·cos + b·sin`, `dv[i + half] = b·cos − a·sin`, with `cos`,
/// `sin` the same `half = head_dim/2` values the forward used ([`crate::ops::RopeTable::row`]). Errors
/// unless `head_dim` is even and non-zero, `dv.len()` is a multiple of it and `cos`, `sin` hold `half`
/// values.
pub fn rope_backward(dv: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !dv.len().is_multiple_of(head_dim) {
        return Err(Error::Invalid(format!(
            "rope_backward: {} values with head_dim {head_dim}, expected an even non-zero head_dim dividing the length",
            dv.len()
        )));
    }
    let half = head_dim / 2;
    expect_len("rope_backward: cos", cos.len(), half)?;
    expect_len("rope_backward: sin", sin.len(), half)?;
    for head in dv.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] + b * sin[i];
            hi[i] = b * cos[i] - a * sin[i];
        }
    }
    Ok(())
}

/// Elements per task of the element-wise loops.
const ELEMENTWISE_CHUNK: usize = 4096;

/// The gradient of [`crate::ops::silu_mul`] (`act = silu(gate)·up`, `silu(g) = g/(1 + e^−g)`), overwriting
/// `dgate` and `dup`: with `s = 1/(1 + e^−g)`, `dgate = dact·up·s·(1 + g·(1 − s))` and
/// `dup = dact·silu(g)` (silu computed by the forward's expression). Finite for every finite `gate`
/// (`e^−g` overflowing to infinity gives `s = 0`). Threaded over chunks of elements. Errors unless all five
/// slices have the same length.
pub fn silu_mul_backward(gate: &[f32], up: &[f32], dact: &[f32], dgate: &mut [f32], dup: &mut [f32]) -> Result<()> {
    let n = gate.len();
    expect_len("silu_mul_backward: up", up.len(), n)?;
    expect_len("silu_mul_backward: dact", dact.len(), n)?;
    expect_len("silu_mul_backward: dgate", dgate.len(), n)?;
    expect_len("silu_mul_backward: dup", dup.len(), n)?;
    let c = ELEMENTWISE_CHUNK;
    dgate
        .par_chunks_mut(c)
        .zip(dup.par_chunks_mut(c))
        .zip(gate.par_chunks(c))
        .zip(up.par_chunks(c))
        .zip(dact.par_chunks(c))
        .for_each(|((((dg, du), g), u), da)| {
            for ((((dg, du), &g), &u), &da) in dg.iter_mut().zip(du).zip(g).zip(u).zip(da) {
                let e = (-g).exp();
                let s = 1.0 / (1.0 + e);
                *du = da * (g / (1.0 + e));
                *dg = da * u * (s * (1.0 + g * (1.0 - s)));
            }
        });
    Ok(())
}

/// The shape of grouped-query attention: `heads` query heads sharing `kv_heads` key / value heads
/// (query head `h` reads kv head `h / (heads / kv_heads)`), each `head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    /// The model's attention shape (`num_attention_heads`, `num_key_value_heads`, `head_dim`).
    pub fn from_config(c: &Config) -> AttentionDims {
        AttentionDims { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }

    /// `heads · head_dim`: the width of a row of queries or of the attention output.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `kv_heads · head_dim`: the width of a row of keys or values.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn check(&self, what: &str) -> Result<()> {
        let AttentionDims { heads, kv_heads, head_dim } = *self;
        if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::Invalid(format!(
                "{what}: {heads} heads, {kv_heads} kv heads, head_dim {head_dim}; expected non-zero sizes with heads a multiple of kv heads"
            )));
        }
        Ok(())
    }

    /// Checks `t` and the lengths shared by the forward and the backward.
    fn check_sequence(&self, what: &str, t: usize, q: &[f32], k: &[f32], v: &[f32], probs: usize) -> Result<()> {
        self.check(what)?;
        if t == 0 {
            return Err(Error::Invalid(format!("{what} of an empty sequence (expected t ≥ 1)")));
        }
        let qn = product(what, &[t, self.heads, self.head_dim])?;
        let kvn = product(what, &[t, self.kv_heads, self.head_dim])?;
        let pn = product(what, &[self.heads, t, t])?;
        expect_len(&format!("{what}: q [t, heads·head_dim]"), q.len(), qn)?;
        expect_len(&format!("{what}: k [t, kv_heads·head_dim]"), k.len(), kvn)?;
        expect_len(&format!("{what}: v [t, kv_heads·head_dim]"), v.len(), kvn)?;
        expect_len(&format!("{what}: probs [heads, t, t]"), probs, pn)
    }
}

/// Causal grouped-query attention of one whole sequence at positions `0..t` (no KV cache), for training:
/// `q` `[t, heads·head_dim]`, `k` and `v` `[t, kv_heads·head_dim]` (after RoPE) → `att`
/// `[t, heads·head_dim]`, and the softmax probabilities saved in `probs` `[heads, t, t]` (row `i` of head
/// `h` holds the weights of keys `0..=i`; the columns after `i` are zero) for
/// [`attention_backward`].
///
/// Computes exactly as the inference forward ([`crate::Model::forward`]'s attention) does — scores
/// `dot(q, k)·(1/sqrt(head_dim))` with [`crate::linear::dot`], [`crate::ops::softmax`] (max subtracted),
/// then `Σ_j p_j·v_j` in ascending `j` — so `att` is bit-for-bit the inference's for the same `q`, `k`, `v`.
/// Threaded over (head, row) then (row, head). Errors on `t = 0`, inconsistent dims or wrong lengths.
pub fn attention_train_forward(
    dims: AttentionDims,
    t: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &mut [f32],
    att: &mut [f32],
) -> Result<()> {
    const WHAT: &str = "attention_train_forward";
    dims.check_sequence(WHAT, t, q, k, v, probs.len())?;
    expect_len(&format!("{WHAT}: att [t, heads·head_dim]"), att.len(), q.len())?;
    let (nh, hd, group) = (dims.heads, dims.head_dim, dims.group());
    let (qw, kvw) = (dims.q_width(), dims.kv_width());
    let scale = 1.0 / (hd as f32).sqrt();
    probs.par_chunks_mut(t).enumerate().for_each(|(hi, row)| {
        let (h, i) = (hi / t, hi % t);
        let g = h / group;
        let qv = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
        let (sc, rest) = row.split_at_mut(i + 1);
        for (j, s) in sc.iter_mut().enumerate() {
            *s = dot(qv, &k[j * kvw + g * hd..j * kvw + (g + 1) * hd]) * scale;
        }
        softmax(sc);
        rest.fill(0.0);
    });
    let probs = &*probs;
    att.par_chunks_mut(hd).enumerate().for_each(|(ih, out)| {
        let (i, h) = (ih / nh, ih % nh);
        let g = h / group;
        let p = &probs[(h * t + i) * t..(h * t + i) * t + i + 1];
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            for (o, &vv) in out.iter_mut().zip(&v[j * kvw + g * hd..j * kvw + (g + 1) * hd]) {
                *o += pj * vv;
            }
        }
    });
    Ok(())
}

/// The gradient of [`attention_train_forward`], overwriting `dq`, `dk`, `dv` (shaped as `q`, `k`, `v`) from
/// `datt` (`[t, heads·head_dim]`, the gradient with respect to `att`) and the `probs` that forward saved.
/// Per head, with `P` the probabilities, `O = P·V` and `scale = 1/sqrt(head_dim)`:
/// `dP = dO·Vᵀ`, `dS = P⊙(dP − rowsum(dP⊙P))` (written to the scratch `ds`, `[heads, t, t]`, zero above the
/// diagonal; its contents are unspecified on entry), `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`.
/// A kv head's `dK` and `dV` are sums over its group of query heads, always in ascending head order then
/// ascending query row, so the results do not depend on the thread count. All sums are f32.
/// Threaded over (head, row), (row, head) then (row, kv head). Errors on `t = 0`, inconsistent dims or
/// wrong lengths.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dims: AttentionDims,
    t: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    datt: &[f32],
    ds: &mut [f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    const WHAT: &str = "attention_backward";
    dims.check_sequence(WHAT, t, q, k, v, probs.len())?;
    expect_len(&format!("{WHAT}: datt [t, heads·head_dim]"), datt.len(), q.len())?;
    expect_len(&format!("{WHAT}: ds [heads, t, t]"), ds.len(), probs.len())?;
    expect_len(&format!("{WHAT}: dq [t, heads·head_dim]"), dq.len(), q.len())?;
    expect_len(&format!("{WHAT}: dk [t, kv_heads·head_dim]"), dk.len(), k.len())?;
    expect_len(&format!("{WHAT}: dv [t, kv_heads·head_dim]"), dv.len(), v.len())?;
    let (nh, hd, group) = (dims.heads, dims.head_dim, dims.group());
    let (qw, kvw) = (dims.q_width(), dims.kv_width());
    let scale = 1.0 / (hd as f32).sqrt();
    // dS, one (head, query row) per task.
    ds.par_chunks_mut(t).enumerate().for_each(|(hi, row)| {
        let (h, i) = (hi / t, hi % t);
        let g = h / group;
        let d_out = &datt[i * qw + h * hd..i * qw + (h + 1) * hd];
        let p = &probs[hi * t..hi * t + i + 1];
        let (dsr, rest) = row.split_at_mut(i + 1);
        let mut rowsum = 0.0f32;
        for (j, (d, &pj)) in dsr.iter_mut().zip(p).enumerate() {
            *d = dot(d_out, &v[j * kvw + g * hd..j * kvw + (g + 1) * hd]);
            rowsum += *d * pj;
        }
        for (d, &pj) in dsr.iter_mut().zip(p) {
            *d = pj * (*d - rowsum);
        }
        rest.fill(0.0);
    });
    let ds = &*ds;
    // dQ, one (query row, head) per task: scale · Σ_{j ≤ i} dS[h, i, j]·k_j.
    dq.par_chunks_mut(hd).enumerate().for_each(|(ih, out)| {
        let (i, h) = (ih / nh, ih % nh);
        let g = h / group;
        let dsr = &ds[(h * t + i) * t..(h * t + i) * t + i + 1];
        out.fill(0.0);
        for (j, &s) in dsr.iter().enumerate() {
            for (o, &kv) in out.iter_mut().zip(&k[j * kvw + g * hd..j * kvw + (g + 1) * hd]) {
                *o += s * kv;
            }
        }
        for o in out.iter_mut() {
            *o *= scale;
        }
    });
    // dK and dV, one (key row, kv head) per task, summed over the group's heads then the rows i ≥ j.
    dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)).enumerate().for_each(|(jg, (dkr, dvr))| {
        let (j, g) = (jg / dims.kv_heads, jg % dims.kv_heads);
        dkr.fill(0.0);
        dvr.fill(0.0);
        for h in g * group..(g + 1) * group {
            for i in j..t {
                let at = (h * t + i) * t + j;
                let (s, p) = (ds[at], probs[at]);
                let row = i * qw + h * hd..i * qw + (h + 1) * hd;
                for ((a, b), (&qv, &gv)) in
                    dkr.iter_mut().zip(dvr.iter_mut()).zip(q[row.clone()].iter().zip(&datt[row]))
                {
                    *a += s * qv;
                    *b += p * gv;
                }
            }
        }
        for a in dkr.iter_mut() {
            *a *= scale;
        }
    });
    Ok(())
}

/// Cross-entropy of `n = targets.len()` rows of logits (`[n, vocab]`, `vocab = logits.len() / n`): returns
/// `Σ_i −log softmax(logits_i)[targets_i]` and overwrites `dlogits` with `scale·(softmax(logits_i) −
/// onehot(targets_i))` (pass `scale = 1/n` for the gradient of the mean loss).
///
/// Precision: the row maximum is subtracted, `exp` and the log-sum-exp are computed in f64 (from the f32 logits),
/// each row's loss is f64 and the rows are summed in f64 in ascending order; `dlogits` is computed in f64 and
/// rounded to f32 once. Threaded over rows; allocates one f64 per row. Errors on no targets, a logits length
/// that is not a non-zero multiple of `n`, a `dlogits` of another length, a target ≥ vocab, a non-finite
/// `scale`, or a row whose loss is not finite (logits holding inf or NaN; `dlogits` is then unspecified).
pub fn cross_entropy(logits: &[f32], targets: &[u32], scale: f32, dlogits: &mut [f32]) -> Result<f64> {
    let n = targets.len();
    if n == 0 || logits.is_empty() || !logits.len().is_multiple_of(n) {
        return Err(Error::Invalid(format!(
            "cross_entropy: {} logits for {n} targets, expected a non-zero multiple of the number of targets",
            logits.len()
        )));
    }
    let vocab = logits.len() / n;
    expect_len("cross_entropy: dlogits", dlogits.len(), logits.len())?;
    if let Some((i, &tg)) = targets.iter().enumerate().find(|(_, &tg)| tg as usize >= vocab) {
        return Err(Error::Invalid(format!("cross_entropy: target {i} is {tg}, expected < vocab size {vocab}")));
    }
    if !scale.is_finite() {
        return Err(Error::Invalid(format!("cross_entropy: scale is {scale}, expected a finite value")));
    }
    let sc = scale as f64;
    let losses: Vec<f64> = dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((d, l), &tg)| {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut sum = 0.0f64;
            for (d, &x) in d.iter_mut().zip(l) {
                let e = (x as f64 - max).exp();
                sum += e;
                *d = e as f32; // in [0, 1]: kept for the second pass
            }
            let lse = max + sum.ln();
            let tg = tg as usize;
            for d in d.iter_mut() {
                *d = (sc * (*d as f64 / sum)) as f32;
            }
            let p_target = (l[tg] as f64 - lse).exp();
            d[tg] = (sc * (p_target - 1.0)) as f32;
            lse - l[tg] as f64
        })
        .collect();
    if let Some(i) = losses.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "cross_entropy: the loss of row {i} is {} (its logits hold inf or NaN)",
            losses[i]
        )));
    }
    Ok(losses.iter().sum())
}

/// Columns of `c` one task of [`matmul_nn`] computes.
const MATMUL_COLS: usize = 64;

/// `c[m, n] = a[m, k] · b[k, n]` (row-major, overwriting `c`), e.g. the tied `lm_head`'s input gradient
/// `dx[rows, hidden] = dlogits[rows, vocab] · E[vocab, hidden]`.
///
/// Each element is `Σ_p a[r, p]·b[p, col]` accumulated in f32 in ascending `p`, by one task, so the result
/// does not depend on the thread count. Tasks own blocks of 64 columns of `c` for every row (an `[m, 64]`
/// accumulator), so `b` is read from memory once per call whatever `m` (for the lm_head, `b` is the 113 MB
/// embedding: splitting by rows instead streamed it once per task). Allocates the accumulators (`m·n`
/// floats). Errors unless `a.len() = m·k`, `b.len() = k·n`, `c.len() = m·n`.
pub fn matmul_nn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    const WHAT: &str = "matmul_nn";
    expect_len("matmul_nn: a [m, k]", a.len(), product(WHAT, &[m, k])?)?;
    expect_len("matmul_nn: b [k, n]", b.len(), product(WHAT, &[k, n])?)?;
    expect_len("matmul_nn: c [m, n]", c.len(), product(WHAT, &[m, n])?)?;
    if c.is_empty() {
        return Ok(());
    }
    column_blocks(m, n, c, |c0, w, cb| {
        if w == MATMUL_COLS {
            nn_block_dispatch(m, k, n, a, b, c0, cb);
        } else {
            nn_block_generic(k, n, a, b, c0, w, cb);
        }
    });
    Ok(())
}

/// Runs `block(c0, w, acc)` for every block of [`MATMUL_COLS`] columns of `c` (`[m, n]`) over the thread
/// pool, each writing its `[m, w]` accumulator, then copies the accumulators into `c`'s rows. The shared
/// driver of [`matmul_nn`] and [`matmul_nt`].
fn column_blocks(m: usize, n: usize, c: &mut [f32], block: impl Fn(usize, usize, &mut [f32]) + Sync + Send) {
    // Column-chunk-major accumulators: chunk j (columns c0..c0+w) is `[m, w]` at offset c0·m.
    let mut acc = vec![0.0f32; m * n];
    acc.par_chunks_mut(m * MATMUL_COLS).enumerate().for_each(|(j, cb)| {
        let w = cb.len() / m;
        block(j * MATMUL_COLS, w, cb)
    });
    for (j, cb) in acc.chunks(m * MATMUL_COLS).enumerate() {
        let (c0, w) = (j * MATMUL_COLS, cb.len() / m);
        for r in 0..m {
            c[r * n + c0..r * n + c0 + w].copy_from_slice(&cb[r * w..(r + 1) * w]);
        }
    }
}

/// `c[m, n] = a[m, k] · b[n, k]ᵀ` (row-major, overwriting `c`): the tied `lm_head`'s logits in training,
/// `logits[rows, vocab] = x[rows, hidden] · E[vocab, hidden]ᵀ`. Each task transposes 64 rows of `b` into a
/// `[k, 64]` scratch and runs [`matmul_nn`]'s register-blocked block on it, so each element is
/// `Σ_p a[r, p]·b[col, p]` in f32, ascending `p`, by one task (thread-count independent). Not the inference
/// forward's summation order (`crate::linear::matmul_t`), so the logits can differ from it in the last bits.
/// Allocates the accumulators and one `k × 64` scratch per task. Errors unless `a.len() = m·k`,
/// `b.len() = n·k`, `c.len() = m·n`.
pub fn matmul_nt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    const WHAT: &str = "matmul_nt";
    expect_len("matmul_nt: a [m, k]", a.len(), product(WHAT, &[m, k])?)?;
    expect_len("matmul_nt: b [n, k]", b.len(), product(WHAT, &[n, k])?)?;
    expect_len("matmul_nt: c [m, n]", c.len(), product(WHAT, &[m, n])?)?;
    if c.is_empty() {
        return Ok(());
    }
    column_blocks(m, n, c, |c0, w, cb| {
        // bt[p, q] = b[c0 + q, p]: the block's columns as a [k, w] row-major matrix.
        let mut bt = vec![0.0f32; k * w];
        for q in 0..w {
            for (p, &v) in b[(c0 + q) * k..(c0 + q + 1) * k].iter().enumerate() {
                bt[p * w + q] = v;
            }
        }
        if w == MATMUL_COLS {
            nn_block_dispatch(m, k, w, a, &bt, 0, cb);
        } else {
            nn_block_generic(k, w, a, &bt, 0, w, cb);
        }
    });
    Ok(())
}

/// One task of [`matmul_nn`] for a partial column block (`w < 64` columns): plain loops, `p` ascending.
fn nn_block_generic(k: usize, n: usize, a: &[f32], b: &[f32], c0: usize, w: usize, cb: &mut [f32]) {
    for p in 0..k {
        let bseg = &b[p * n + c0..p * n + c0 + w];
        for (rr, crow) in cb.chunks_exact_mut(w).enumerate() {
            let av = a[rr * k + p];
            for (cv, &bv) in crow.iter_mut().zip(bseg) {
                *cv += av * bv;
            }
        }
    }
}

/// One task of [`matmul_nn`] for a whole block of 64 columns: rows in groups of 4 whose `4 × 64`
/// accumulators stay in registers over all of `k` (the same additions in the same order as
/// [`nn_block_generic`], so the same bits). Runs the AVX-512 or AVX2 compilation of the same code where the
/// CPU has it (measured: the tied lm_head's `dlogits·E` of a 64-token SmolLM2 training step took 28% of the
/// step with the plain loops).
fn nn_block_dispatch(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c0: usize, cb: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected on this CPU just above.
            return unsafe { nn_block_avx512(m, k, n, a, b, c0, cb) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU just above.
            return unsafe { nn_block_avx2(m, k, n, a, b, c0, cb) };
        }
    }
    nn_block_64(m, k, n, a, b, c0, cb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn nn_block_avx512(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c0: usize, cb: &mut [f32]) {
    nn_block_64(m, k, n, a, b, c0, cb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nn_block_avx2(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c0: usize, cb: &mut [f32]) {
    nn_block_64(m, k, n, a, b, c0, cb)
}

#[inline(always)]
fn nn_block_64(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c0: usize, cb: &mut [f32]) {
    const W: usize = MATMUL_COLS;
    // `k` in chunks of 512 (a 128 KiB slice of `b`, L2-resident) so that every group of rows reuses it: `b` is
    // read from memory once, not once per row group.
    const KC: usize = 512;
    cb.fill(0.0);
    for k0 in (0..k).step_by(KC) {
        let k1 = (k0 + KC).min(k);
        let mut r0 = 0;
        while r0 < m {
            let rr = 4.min(m - r0);
            let mut acc = [[0.0f32; W]; 4];
            for (i, ai) in acc.iter_mut().enumerate().take(rr) {
                ai.copy_from_slice(&cb[(r0 + i) * W..(r0 + i + 1) * W]);
            }
            for p in k0..k1 {
                let bseg: &[f32; W] = b[p * n + c0..p * n + c0 + W].try_into().expect("64 columns");
                for (i, ai) in acc.iter_mut().enumerate().take(rr) {
                    let av = a[(r0 + i) * k + p];
                    for (cv, &bv) in ai.iter_mut().zip(bseg) {
                        *cv += av * bv;
                    }
                }
            }
            for (i, ai) in acc.iter().enumerate().take(rr) {
                cb[(r0 + i) * W..(r0 + i + 1) * W].copy_from_slice(ai);
            }
            r0 += rr;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every backward against central finite differences of an f64 re-implementation of its forward.
    //!
    //! Step and tolerance: the differences use `H = 1e-5` on the f64 forward, whose truncation error
    //! (`H²·f'''`, about 1e-10 here) and cancellation error (`1e-16·|L|/H`, about 1e-10) are far below the
    //! f32 rounding of the functions under test (a few ulp per term over at most a few dozen terms, about
    //! 1e-6 of the gradient's scale). Each component must agree within `TOL = 1e-4` of the largest
    //! gradient component (absolute for tiny components, so they are not compared in relative terms):
    //! a 100× margin over f32 rounding, while a wrong sign or a missing term is an error of order 1 on that
    //! scale. Shapes are small and odd (t = 5, 3 heads over 1 kv head, head_dim 8, vocab 37) so that every
    //! check runs in milliseconds.

    use super::*;
    use crate::kv_cache::KvCache;
    use crate::ops::{apply_rope, RopeTable};
    use lowbit_testkit::rng::Rng;

    const H: f64 = 1e-5;
    const TOL: f64 = 1e-4;

    /// Central differences of `f` at `x`.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..xs.len())
            .map(|i| {
                let x0 = xs[i];
                xs[i] = x0 + H;
                let fp = f(&xs);
                xs[i] = x0 - H;
                let fm = f(&xs);
                xs[i] = x0;
                (fp - fm) / (2.0 * H)
            })
            .collect()
    }

    fn assert_grad(what: &str, analytic: &[f32], numeric: &[f64]) {
        assert_eq!(analytic.len(), numeric.len(), "{what}: lengths");
        let big = numeric.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(big > 1e-3, "{what}: the gradient vanishes ({big:e}), the check could not fail");
        for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
            let err = (a as f64 - n).abs() / big;
            assert!(err <= TOL, "{what}[{i}]: analytic {a}, numeric {n} (error {err:e} of the largest {big:e})");
        }
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn dotf(a: &[f64], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(a, &b)| a * b as f64).sum()
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let d = 37;
        let eps = 1e-5f32;
        let w: Vec<f32> = rng.vec(d, 0.5).iter().map(|v| v + 1.0).collect();
        let dy = rng.vec(d, 1.0);
        // 2.0: eps negligible; 1e-3: mean(x²) ≈ 3e-7 < eps, so the eps term matters.
        for scale in [2.0f32, 1e-3] {
            let x = rng.vec(d, scale);
            let norm = |x: &[f64]| {
                let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps as f64).sqrt();
                x.iter().zip(&w).map(|(v, &w)| v * r * w as f64).collect::<Vec<f64>>()
            };
            let numeric = numeric_grad(&x, |x| dotf(&norm(x), &dy));
            // dx starts non-zero: the backward adds into it.
            let base = rng.vec(d, 1.0);
            let mut dx = base.clone();
            rms_norm_backward(&x, &w, eps, &dy, &mut dx).unwrap();
            let added: Vec<f32> = dx.iter().zip(&base).map(|(a, b)| a - b).collect();
            assert_grad(&format!("rms_norm dx (x scale {scale})"), &added, &numeric);
        }
        // The rows helper computes each row exactly as the one-row function.
        let rows = 3;
        let x = rng.vec(rows * d, 1.5);
        let dy = rng.vec(rows * d, 1.0);
        let base = rng.vec(rows * d, 1.0);
        let mut want = base.clone();
        for r in 0..rows {
            let s = r * d..(r + 1) * d;
            rms_norm_backward(&x[s.clone()], &w, eps, &dy[s.clone()], &mut want[s]).unwrap();
        }
        let mut got = base;
        rms_norm_backward_rows(&x, &w, eps, &dy, &mut got).unwrap();
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let mut rng = Rng::new(12);
        let (hd, heads, pos) = (8, 3, 7);
        let table = RopeTable::new(hd, 10000.0, 16);
        let (cos, sin) = table.row(pos);
        let v = rng.vec(heads * hd, 1.0);
        let c = rng.vec(heads * hd, 1.0);
        let rope = |v: &[f64]| {
            let mut out = v.to_vec();
            for head in out.chunks_exact_mut(hd) {
                for i in 0..hd / 2 {
                    let (a, b) = (head[i], head[i + hd / 2]);
                    let (cs, sn) = (cos[i] as f64, sin[i] as f64);
                    head[i] = a * cs - b * sn;
                    head[i + hd / 2] = b * cs + a * sn;
                }
            }
            out
        };
        // The f64 forward is the runtime's rotation.
        let mut fwd = v.clone();
        apply_rope(&mut fwd, hd, cos, sin);
        for (a, b) in fwd.iter().zip(rope(&f64s(&v))) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
        let numeric = numeric_grad(&v, |v| dotf(&rope(v), &c));
        let mut dv = c.clone();
        rope_backward(&mut dv, hd, cos, sin).unwrap();
        assert_grad("rope dv", &dv, &numeric);
    }

    #[test]
    fn silu_mul_backward_matches_finite_differences() {
        let mut rng = Rng::new(13);
        let n = 41;
        let mut gate = rng.vec(n, 12.0);
        gate[0] = -100.0; // e^−g overflows f32
        gate[1] = 100.0;
        gate[2] = 0.0;
        let up = rng.vec(n, 2.0);
        let dact = rng.vec(n, 1.0);
        let act = |g: &[f64], u: &[f64]| -> f64 {
            g.iter().zip(u).zip(&dact).map(|((g, u), &d)| g / (1.0 + (-g).exp()) * u * d as f64).sum()
        };
        let (mut dgate, mut dup) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        silu_mul_backward(&gate, &up, &dact, &mut dgate, &mut dup).unwrap();
        assert!(dgate.iter().chain(&dup).all(|v| v.is_finite()));
        assert_grad("silu_mul dgate", &dgate, &numeric_grad(&gate, |g| act(g, &f64s(&up))));
        assert_grad("silu_mul dup", &dup, &numeric_grad(&up, |u| act(&f64s(&gate), u)));
    }

    /// Causal GQA over positions 0..t in f64 (as `reference::forward_f64`).
    fn attention_f64(d: AttentionDims, t: usize, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
        let (nh, nkv, hd) = (d.heads, d.kv_heads, d.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = vec![0.0f64; t * nh * hd];
        for r in 0..t {
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qv = &q[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                let s: Vec<f64> = (0..=r)
                    .map(|j| {
                        let kv = &k[(j * nkv + g) * hd..(j * nkv + g + 1) * hd];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let out = &mut att[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                for (j, p) in e.iter().enumerate() {
                    for (o, w) in out.iter_mut().zip(&v[(j * nkv + g) * hd..(j * nkv + g + 1) * hd]) {
                        *o += p / sum * w;
                    }
                }
            }
        }
        att
    }

    const SHAPES: [(usize, AttentionDims); 3] = [
        (5, AttentionDims { heads: 3, kv_heads: 1, head_dim: 8 }),
        (4, AttentionDims { heads: 4, kv_heads: 2, head_dim: 6 }),
        (3, AttentionDims { heads: 2, kv_heads: 2, head_dim: 4 }),
    ];

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = Rng::new(14);
        for (t, d) in SHAPES {
            let q = rng.vec(t * d.q_width(), 2.0); // scores of a few units: far from a uniform softmax
            let k = rng.vec(t * d.kv_width(), 2.0);
            let v = rng.vec(t * d.kv_width(), 1.0);
            let datt = rng.vec(t * d.q_width(), 1.0);
            let mut probs = vec![f32::NAN; d.heads * t * t];
            let mut att = vec![f32::NAN; t * d.q_width()];
            attention_train_forward(d, t, &q, &k, &v, &mut probs, &mut att).unwrap();
            let want = attention_f64(d, t, &f64s(&q), &f64s(&k), &f64s(&v));
            for (a, b) in att.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{d:?}: forward {a} vs f64 {b}");
            }
            for (hi, row) in probs.chunks_exact(t).enumerate() {
                let i = hi % t;
                assert!((row[..=i].iter().sum::<f32>() - 1.0).abs() < 1e-6);
                assert!(row[i + 1..].iter().all(|&p| p == 0.0), "{d:?}: probs above the diagonal");
            }
            let mut ds = vec![f32::NAN; probs.len()];
            let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
            attention_backward(d, t, &q, &k, &v, &probs, &datt, &mut ds, &mut dq, &mut dk, &mut dv).unwrap();
            let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
            let loss = |q: &[f64], k: &[f64], v: &[f64]| dotf(&attention_f64(d, t, q, k, v), &datt);
            assert_grad(&format!("{d:?} dq"), &dq, &numeric_grad(&q, |x| loss(x, &k64, &v64)));
            assert_grad(&format!("{d:?} dk"), &dk, &numeric_grad(&k, |x| loss(&q64, x, &v64)));
            assert_grad(&format!("{d:?} dv"), &dv, &numeric_grad(&v, |x| loss(&q64, &k64, x)));
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn config(t: usize, d: AttentionDims) -> Config {
        Config {
            model_type: "llama".into(),
            vocab_size: 37,
            hidden_size: d.q_width(),
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: d.heads,
            num_key_value_heads: d.kv_heads,
            head_dim: d.head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: t,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    #[test]
    fn attention_train_forward_equals_inference_attention() {
        let mut rng = Rng::new(15);
        let extra = (33, AttentionDims { heads: 9, kv_heads: 3, head_dim: 64 }); // SmolLM2-135M's heads
        for (t, d) in SHAPES.into_iter().chain([extra]) {
            let c = config(t, d);
            assert_eq!(AttentionDims::from_config(&c), d);
            let q = rng.vec(t * d.q_width(), 2.0);
            let k = rng.vec(t * d.kv_width(), 2.0);
            let v = rng.vec(t * d.kv_width(), 1.0);
            let mut cache = KvCache::new(&c, t).unwrap();
            let kvw = d.kv_width();
            for r in 0..t {
                cache.store(0, r, &k[r * kvw..(r + 1) * kvw], &v[r * kvw..(r + 1) * kvw]);
            }
            let mut scores = vec![0.0; t * d.heads * t];
            let mut inf_att = vec![0.0; t * d.q_width()];
            crate::model::attention(&c, &cache, 0, 0, &q, &mut scores, &mut inf_att);
            let mut probs = vec![f32::NAN; d.heads * t * t];
            let mut att = vec![f32::NAN; t * d.q_width()];
            attention_train_forward(d, t, &q, &k, &v, &mut probs, &mut att).unwrap();
            assert_eq!(bits(&att), bits(&inf_att), "{d:?}: att differs from the inference attention");
            for i in 0..t {
                for h in 0..d.heads {
                    let ours = &probs[(h * t + i) * t..(h * t + i) * t + i + 1];
                    let theirs = &scores[(i * d.heads + h) * t..(i * d.heads + h) * t + i + 1];
                    assert_eq!(bits(ours), bits(theirs), "{d:?}: probabilities of row {i}, head {h}");
                }
            }
        }
    }

    #[test]
    fn cross_entropy_matches_f64_and_finite_differences() {
        let mut rng = Rng::new(16);
        let (n, vocab) = (4, 37);
        let logits = rng.vec(n * vocab, 4.0);
        let targets = [0u32, 36, 17, 5];
        let scale = 1.0 / n as f32;
        let loss_f64 = |l: &[f64]| -> f64 {
            l.chunks_exact(vocab)
                .zip(&targets)
                .map(|(row, &tg)| {
                    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - row[tg as usize]
                })
                .sum()
        };
        let mut dlogits = vec![f32::NAN; n * vocab];
        let loss = cross_entropy(&logits, &targets, scale, &mut dlogits).unwrap();
        let want = loss_f64(&f64s(&logits));
        assert!((loss - want).abs() <= 1e-12 * want.abs(), "loss {loss} vs f64 {want}");
        let numeric = numeric_grad(&logits, |l| scale as f64 * loss_f64(l));
        assert_grad("cross_entropy dlogits", &dlogits, &numeric);
        // A large shift of every logit changes nothing (max subtraction), and the rows still sum to 0.
        let shifted: Vec<f32> = logits.iter().map(|v| v + 1000.0).collect();
        let mut d2 = vec![0.0; n * vocab];
        let l2 = cross_entropy(&shifted, &targets, scale, &mut d2).unwrap();
        assert!((l2 - loss).abs() < 1e-3 * loss, "shifted loss {l2} vs {loss}");
        for row in d2.chunks_exact(vocab) {
            assert!(row.iter().map(|&v| v as f64).sum::<f64>().abs() < 1e-6);
        }
    }

    #[test]
    fn matmul_nn_matches_f64() {
        let mut rng = Rng::new(17);
        let (m, k, n) = (7, 37, 13);
        let a = rng.vec(m * k, 1.0);
        let b = rng.vec(k * n, 1.0);
        let mut c = vec![f32::NAN; m * n];
        matmul_nn(m, k, n, &a, &b, &mut c).unwrap();
        for r in 0..m {
            for col in 0..n {
                let terms = (0..k).map(|p| a[r * k + p] as f64 * b[p * n + col] as f64);
                let want: f64 = terms.clone().sum();
                let bound: f64 = terms.map(f64::abs).sum::<f64>() * 1e-5; // k·ε_f32 ≈ 2e-6 of Σ|a·b|
                let got = c[r * n + col] as f64;
                assert!((got - want).abs() <= bound, "c[{r}, {col}] = {got}, f64 {want}");
            }
        }
    }

    /// Every threaded function run in pools of 1 and 3 threads: the same bits.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = |threads: usize| -> Vec<Vec<u32>> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut rng = Rng::new(18);
                let (t, d) = (33, AttentionDims { heads: 6, kv_heads: 2, head_dim: 16 });
                let q = rng.vec(t * d.q_width(), 2.0);
                let k = rng.vec(t * d.kv_width(), 2.0);
                let v = rng.vec(t * d.kv_width(), 1.0);
                let datt = rng.vec(t * d.q_width(), 1.0);
                let mut probs = vec![0.0; d.heads * t * t];
                let mut att = vec![0.0; q.len()];
                attention_train_forward(d, t, &q, &k, &v, &mut probs, &mut att).unwrap();
                let mut ds = vec![0.0; probs.len()];
                let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
                attention_backward(d, t, &q, &k, &v, &probs, &datt, &mut ds, &mut dq, &mut dk, &mut dv).unwrap();
                let (m, kk, n) = (70, 50, 40);
                let a = rng.vec(m * kk, 1.0);
                let b = rng.vec(kk * n, 1.0);
                let mut c = vec![0.0; m * n];
                matmul_nn(m, kk, n, &a, &b, &mut c).unwrap();
                let (rows, vocab) = (9, 301);
                let logits = rng.vec(rows * vocab, 5.0);
                let targets: Vec<u32> = (0..rows as u32).map(|i| i * 31 % vocab as u32).collect();
                let mut dl = vec![0.0; logits.len()];
                let loss = cross_entropy(&logits, &targets, 0.1, &mut dl).unwrap();
                let g = rng.vec(10_000, 8.0);
                let u = rng.vec(10_000, 1.0);
                let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
                silu_mul_backward(&g, &u, &u, &mut dg, &mut du).unwrap();
                let w = rng.vec(64, 1.0);
                let x = rng.vec(20 * 64, 1.0);
                let mut dx = vec![0.0; x.len()];
                rms_norm_backward_rows(&x, &w, 1e-5, &x, &mut dx).unwrap();
                let loss = [(loss.to_bits() >> 32) as u32, loss.to_bits() as u32];
                [&att[..], &probs, &ds, &dq, &dk, &dv, &c, &dl, &dg, &du, &dx]
                    .iter()
                    .map(|v| bits(v))
                    .chain([loss.to_vec()])
                    .collect()
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let invalid = |r: Result<()>, what: &str| match r {
            Err(Error::Invalid(msg)) => assert!(!msg.is_empty()),
            other => panic!("{what}: expected Error::Invalid, got {other:?}"),
        };
        let z = |n| vec![0.5f32; n];
        invalid(rms_norm_backward(&z(4), &z(3), 1e-5, &z(4), &mut z(4)), "rms w");
        invalid(rms_norm_backward(&[], &[], 1e-5, &[], &mut []), "rms empty");
        invalid(rms_norm_backward(&z(4), &z(4), f32::NAN, &z(4), &mut z(4)), "rms eps");
        invalid(rms_norm_backward_rows(&z(10), &z(4), 1e-5, &z(10), &mut z(10)), "rms rows");
        invalid(rope_backward(&mut z(12), 6, &z(3), &z(2)), "rope sin");
        invalid(rope_backward(&mut z(12), 3, &z(1), &z(1)), "rope odd head_dim");
        invalid(silu_mul_backward(&z(5), &z(5), &z(4), &mut z(5), &mut z(5)), "silu dact");
        let d = AttentionDims { heads: 3, kv_heads: 1, head_dim: 4 };
        let t = 2;
        let (q, kv, p) = (z(24), z(8), z(18));
        invalid(attention_train_forward(d, t, &q, &kv, &kv, &mut z(18), &mut z(23)), "att");
        invalid(attention_train_forward(d, 0, &[], &[], &[], &mut [], &mut []), "t = 0");
        let bad = AttentionDims { heads: 3, kv_heads: 2, head_dim: 4 };
        invalid(attention_train_forward(bad, t, &q, &kv, &kv, &mut z(18), &mut z(24)), "group");
        invalid(attention_backward(d, t, &q, &kv, &kv, &p, &q, &mut z(18), &mut z(24), &mut z(8), &mut z(7)), "dv");
        invalid(attention_backward(d, t, &q, &kv, &kv, &p, &q, &mut z(17), &mut z(24), &mut z(8), &mut z(8)), "ds");
        invalid(matmul_nn(2, 3, 4, &z(6), &z(12), &mut z(7)), "matmul c");
        let ce = |l: &[f32], tg: &[u32], s: f32, d: &mut [f32]| cross_entropy(l, tg, s, d).map(|_| ());
        invalid(ce(&z(10), &[0, 5], 1.0, &mut z(10)), "target = vocab");
        invalid(ce(&z(10), &[0, 1, 2], 1.0, &mut z(10)), "not a multiple");
        invalid(ce(&z(10), &[], 1.0, &mut z(10)), "no targets");
        invalid(ce(&z(10), &[0, 1], 1.0, &mut z(9)), "dlogits");
        invalid(ce(&[0.0, f32::NAN], &[0], 1.0, &mut z(2)), "NaN logit");
        invalid(ce(&z(10), &[0, 1], f32::INFINITY, &mut z(10)), "scale");
    }

    /// Whole 64-column blocks (register-blocked, possibly AVX-512 / AVX2) give the same bits as the plain
    /// loops: same additions in the same order.
    #[test]
    fn matmul_nn_blocks_equal_the_plain_loops() {
        let (m, k, n) = (7, 53, 150);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
        let mut c = vec![0.0f32; m * n];
        matmul_nn(m, k, n, &a, &b, &mut c).unwrap();
        for c0 in [0, 64, 128] {
            let w = 64.min(n - c0);
            let mut cb = vec![0.0f32; m * w];
            nn_block_generic(k, n, &a, &b, c0, w, &mut cb);
            for r in 0..m {
                assert_eq!(&c[r * n + c0..r * n + c0 + w], &cb[r * w..(r + 1) * w], "block {c0} row {r}");
            }
        }
        let exact: f64 = (0..k).map(|p| a[2 * k + p] as f64 * b[p * n + 70] as f64).sum();
        assert!((c[2 * n + 70] as f64 - exact).abs() < 1e-4 * exact.abs().max(1.0));
    }

    #[test]
    fn matmul_nt_is_matmul_nn_of_the_transpose() {
        let (m, k, n) = (6, 41, 140);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 29 % 83) as f32 - 41.0) / 30.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 71 % 89) as f32 - 44.0) / 40.0).collect();
        let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect();
        let (mut c1, mut c2) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        matmul_nt(m, k, n, &a, &b, &mut c1).unwrap();
        matmul_nn(m, k, n, &a, &bt, &mut c2).unwrap();
        assert_eq!(c1, c2);
        assert!(matmul_nt(m, k, n, &a, &b[1..], &mut c1).is_err());
    }
}
