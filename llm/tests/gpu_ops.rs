//! `lowbit_llm::gpu::GpuOps` against f64 CPU references written here, on a real adapter (lavapipe in CI).
//! Skips loudly without an adapter unless `LOWBIT_REQUIRE_GPU=1`, which makes that a failure (the same
//! convention as lowbit's `tests/gpu_*.rs`; the testkit's `gpu::try_open` sits behind a testkit feature this
//! crate's dev-dependency does not enable, so the few lines are repeated here).
//!
//! # Tolerances
//! `u = 2⁻²⁴` is f32's unit roundoff; an ULP of a result is at most `2u` relative. Vulkan makes `+ − ×`
//! correctly rounded; WGSL allows `x / y` 2.5 ULP, `inverseSqrt` 2 ULP and `exp(x)` `3 + 2|x|` ULP.
//! * embed, kv_store, add, argmax: exact (copies, one correctly rounded add, comparisons).
//! * rope: `a·c − b·s` is two products and a difference: `|err| ≤ 2u·(|a·c| + |b·s|)` (less with an FMA).
//! * silu_mul: `e = exp(−|g|)` (≤ `(3 + 2|g|)·2u`), `1 + e`, one division (5u), two products: relative
//!   `≤ (20 + 8|g|)·u`, a few ULP for the SwiGLU range.
//! * rms_norm: the sum of squares is `⌈n/256⌉` sequential adds per thread plus an 8-level tree, so its
//!   relative error is `≤ (⌈n/256⌉ + 9)·u`; the mean (5u), `+ eps` (u), `inverseSqrt` (4u; the square root
//!   halves the input's error) and two products (2u) follow: `|err| ≤ (⌈n/256⌉ + 28)·u·|y|`.
//! * attention (per row, head, dim): a score's error is `δ ≤ γ_hd·scale·Σ_i|q_i·k_ji| + u·|s_j|`; a softmax
//!   weight `exp(s_j − M)` gets relative error `η ≤ 2δ_max + u·R + (3 + 2R)·2u + 2u·tiles` (R = the
//!   score range; the per-tile rescaling factors multiply numerator and denominator alike and cancel), so
//!   the normalised mix moves by `≤ 2η·A_d`, `A_d = Σ_j w_j·|v_jd| / Σ_j w_j`; the sequential sums over L
//!   keys add `(L + tiles + 10)·u·A_d` and the final division `5u·|o_d|`. The test also asserts the bound
//!   stays below `1e-3·max|v|`, far below what a wrong head, position or row would move.
#![cfg(feature = "gpu")]

use lowbit::gpu::{wgpu, GpuContext};
use lowbit_llm::gpu::{
    read_f32_blocking, read_u32_blocking, storage_f32, storage_u32, storage_zeroed, GpuOps, HeadShape, KvBuffers,
    RopeTable,
};
use lowbit_llm::Error;
use lowbit_testkit::Rng;
use std::sync::OnceLock;
use std::time::Instant;

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// SmolLM2-135M's shapes.
const HIDDEN: usize = 576;
const N_HEADS: usize = 9;
const N_KV: usize = 3;
const HEAD_DIM: usize = 64;
const INTER: usize = 1536;

/// The preferred adapter (testkit's, shared) and the ops compiled for it once.
fn env() -> Option<(&'static GpuContext, &'static GpuOps)> {
    static OPS: OnceLock<GpuOps> = OnceLock::new();
    let ctx = lowbit_testkit::gpu::test_context()?;
    Some((ctx, OPS.get_or_init(|| GpuOps::new(ctx).expect("compiling the kernels"))))
}

/// Records with `f` into one encoder and submits it.
fn run(ctx: &GpuContext, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    f(&mut enc);
    ctx.queue().submit([enc.finish()]);
}

fn read(ctx: &GpuContext, b: &wgpu::Buffer, n: usize) -> Vec<f32> {
    read_f32_blocking(ctx, b, n).expect("readback")
}

fn normal(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    rng.normal_vec(n, scale)
}

fn timed(name: &str, t: Instant) {
    eprintln!("{name}: {:.2} s", t.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------------------
// embed

#[test]
fn embed_matches_table_rows() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(1);
    let (vocab, hidden) = (50, HIDDEN);
    let table = normal(&mut rng, vocab * hidden, 1.0);
    let tb = storage_f32(ctx, "table", &table);
    for ids in [vec![7u32], vec![0, 49, 3, 3, 50, 1000, 12]] {
        let m = ids.len();
        let idb = storage_u32(ctx, "ids", &ids);
        let out = storage_f32(ctx, "out", &vec![f32::NAN; m * hidden]);
        run(ctx, |e| ops.encode_embed(ctx, e, &tb, &idb, &out, m, vocab, hidden).unwrap());
        let got = read(ctx, &out, m * hidden);
        for (r, &id) in ids.iter().enumerate() {
            let want: Vec<f32> = if (id as usize) < vocab {
                table[id as usize * hidden..][..hidden].to_vec()
            } else {
                vec![0.0; hidden]
            };
            assert_eq!(&got[r * hidden..][..hidden], &want[..], "row {r} id {id}");
        }
    }
    // hidden not a multiple of the workgroup size and a thread count past one workgroup.
    let (vocab, hidden) = (5, 3);
    let table = normal(&mut rng, vocab * hidden, 1.0);
    let tb = storage_f32(ctx, "table", &table);
    let ids: Vec<u32> = (0..100).map(|i| (i * 7 % 5) as u32).collect();
    let idb = storage_u32(ctx, "ids", &ids);
    let out = storage_zeroed(ctx, "out", 300);
    run(ctx, |e| ops.encode_embed(ctx, e, &tb, &idb, &out, 100, vocab, hidden).unwrap());
    let got = read(ctx, &out, 300);
    for (r, &id) in ids.iter().enumerate() {
        assert_eq!(&got[r * 3..][..3], &table[id as usize * 3..][..3]);
    }
    timed("embed", t);
}

// ---------------------------------------------------------------------------------------------------------
// rms_norm

fn rms_ref(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(&v, &wv)| v as f64 * inv * wv as f64)
        })
        .collect()
}

/// Checks `got` against `want` element-wise under `(⌈n/256⌉ + 28)·u·|want|`; returns the worst err/bound.
fn check_rms(got: &[f32], want: &[f64], n: usize, what: &str) -> f64 {
    let rel = (n.div_ceil(256) + 28) as f64 * U;
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = rel * w.abs() + 1e-37;
        let err = (g as f64 - w).abs();
        assert!(err <= bound, "{what}: element {i}: got {g}, want {w}, err {err:e} > bound {bound:e}");
        worst = worst.max(err / bound);
    }
    worst
}

#[test]
fn rms_norm_matches_reference() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(2);
    for (m, n, eps) in
        [(1, HIDDEN, 1e-5f32), (7, HIDDEN, 1e-5), (3, 1000, 1e-6), (2, 8192, 1e-5), (5, 1, 0.25), (4, 300, 0.0)]
    {
        let mut x = normal(&mut rng, m * n, 1.0);
        // Rows of very different scales (the normalisation must remove it).
        for (r, row) in x.chunks_mut(n).enumerate() {
            let s = [1.0f32, 100.0, 0.01][r % 3];
            row.iter_mut().for_each(|v| *v *= s);
        }
        let w: Vec<f32> = (0..n).map(|_| 1.0 + rng.signed(0.5)).collect();
        let (xb, wb, yb) = (storage_f32(ctx, "x", &x), storage_f32(ctx, "w", &w), storage_zeroed(ctx, "y", m * n));
        run(ctx, |e| ops.encode_rms_norm(ctx, e, &xb, &wb, &yb, m, n, eps).unwrap());
        let worst = check_rms(&read(ctx, &yb, m * n), &rms_ref(&x, &w, n, eps), n, &format!("m {m} n {n}"));
        eprintln!("rms_norm m {m} n {n} eps {eps}: worst err/bound {worst:.3}");
    }
    timed("rms_norm", t);
}

// ---------------------------------------------------------------------------------------------------------
// rope

/// f64 rotate_half on `v` ([m, heads, hd]) at positions pos0 + r with the f32 tables; returns the result and
/// the per-element bound `2u·(|a·c| + |b·s|)`.
fn rope_ref(v: &[f32], heads: usize, hd: usize, pos0: usize, cos: &[f32], sin: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let half = hd / 2;
    let mut out = vec![0f64; v.len()];
    let mut bound = vec![0f64; v.len()];
    for (ri, row) in v.chunks(heads * hd).enumerate() {
        for h in 0..heads {
            let base = ri * heads * hd + h * hd;
            for i in 0..half {
                let (c, s) = (cos[(pos0 + ri) * half + i] as f64, sin[(pos0 + ri) * half + i] as f64);
                let (a, b) = (row[h * hd + i] as f64, row[h * hd + i + half] as f64);
                out[base + i] = a * c - b * s;
                out[base + i + half] = b * c + a * s;
                bound[base + i] = 2.0 * U * ((a * c).abs() + (b * s).abs()) + 1e-37;
                bound[base + i + half] = 2.0 * U * ((b * c).abs() + (a * s).abs()) + 1e-37;
            }
        }
    }
    (out, bound)
}

fn check_bound(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= b, "{what}: element {i}: got {g}, want {w}, err {err:e} > bound {b:e}");
    }
}

#[test]
fn rope_matches_reference() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(3);
    // SmolLM2 (theta 1e5) and an odd small shape (pairs not a multiple of the workgroup size, n_kv 1).
    for (nh, nkv, hd, theta) in [(N_HEADS, N_KV, HEAD_DIM, 1e5), (5, 1, 6, 1e4)] {
        let max_pos = 64;
        let (cos, sin) = RopeTable::llama_tables(theta, hd, max_pos);
        let table = RopeTable::from_slices(ctx, &cos, &sin, max_pos, hd / 2).unwrap();
        for (m, pos0) in [(1, 0), (1, 63), (7, 0), (7, 37)] {
            let q = normal(&mut rng, m * nh * hd, 1.0);
            let k = normal(&mut rng, m * nkv * hd, 1.0);
            let (qb, kb) = (storage_f32(ctx, "q", &q), storage_f32(ctx, "k", &k));
            let s = HeadShape { m, n_heads: nh, n_kv_heads: nkv, head_dim: hd, pos0 };
            run(ctx, |e| ops.encode_rope(ctx, e, &qb, &kb, &table, s).unwrap());
            let what = format!("rope nh {nh} hd {hd} m {m} pos0 {pos0}");
            let (wq, bq) = rope_ref(&q, nh, hd, pos0, &cos, &sin);
            check_bound(&read(ctx, &qb, q.len()), &wq, &bq, &format!("{what} q"));
            let (wk, bk) = rope_ref(&k, nkv, hd, pos0, &cos, &sin);
            check_bound(&read(ctx, &kb, k.len()), &wk, &bk, &format!("{what} k"));
        }
    }
    timed("rope", t);
}

// ---------------------------------------------------------------------------------------------------------
// kv_store

#[test]
fn kv_store_writes_only_its_positions() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(4);
    let (nkv, hd, max_seq) = (N_KV, HEAD_DIM, 40);
    let k0 = normal(&mut rng, nkv * max_seq * hd, 1.0);
    let v0 = normal(&mut rng, nkv * max_seq * hd, 1.0);
    let (kc, vc) = (storage_f32(ctx, "k_cache", &k0), storage_f32(ctx, "v_cache", &v0));
    let (mut kw, mut vw) = (k0.clone(), v0.clone());
    for (m, pos0) in [(7, 0), (1, 7), (7, 33)] {
        let k = normal(&mut rng, m * nkv * hd, 1.0);
        let v = normal(&mut rng, m * nkv * hd, 1.0);
        let (kb, vb) = (storage_f32(ctx, "k", &k), storage_f32(ctx, "v", &v));
        let s = HeadShape { m, n_heads: N_HEADS, n_kv_heads: nkv, head_dim: hd, pos0 };
        run(ctx, |e| ops.encode_kv_store(ctx, e, &kb, &vb, KvBuffers { k: &kc, v: &vc, max_seq }, s).unwrap());
        for r in 0..m {
            for h in 0..nkv {
                let dst = (h * max_seq + pos0 + r) * hd;
                let src = (r * nkv + h) * hd;
                kw[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                vw[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        assert_eq!(read(ctx, &kc, kw.len()), kw, "k cache after m {m} pos0 {pos0}");
        assert_eq!(read(ctx, &vc, vw.len()), vw, "v cache after m {m} pos0 {pos0}");
    }
    timed("kv_store", t);
}

// ---------------------------------------------------------------------------------------------------------
// attention

struct AttnRef {
    out: Vec<f64>,
    bound: Vec<f64>,
}

/// f64 causal GQA over caches [n_kv, max_seq, hd], with the per-element bound of the module docs.
fn attn_ref(q: &[f32], kc: &[f32], vc: &[f32], s: HeadShape, max_seq: usize, scale: f32) -> AttnRef {
    let (nh, hd) = (s.n_heads, s.head_dim);
    let group = nh / s.n_kv_heads;
    let mut out = vec![0f64; s.m * nh * hd];
    let mut bound = vec![0f64; s.m * nh * hd];
    let gamma = |n: usize| n as f64 * U / (1.0 - n as f64 * U);
    for r in 0..s.m {
        let len = s.pos0 + r + 1;
        let tiles = len.div_ceil(64);
        for h in 0..nh {
            let kvh = h / group;
            let qv = &q[(r * nh + h) * hd..][..hd];
            let mut sc = Vec::with_capacity(len);
            let mut delta: f64 = 0.0;
            for j in 0..len {
                let kr = &kc[(kvh * max_seq + j) * hd..][..hd];
                let dot: f64 = qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let abs: f64 = qv.iter().zip(kr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let sj = dot * scale as f64;
                sc.push(sj);
                delta = delta.max(gamma(hd) * abs * (scale as f64).abs() + U * sj.abs());
            }
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mn = sc.iter().cloned().fold(f64::INFINITY, f64::min);
            let range = mx - mn;
            let w: Vec<f64> = sc.iter().map(|&x| (x - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            let eta = 2.0 * delta + U * range + (3.0 + 2.0 * range) * 2.0 * U + 2.0 * U * tiles as f64;
            for d in 0..hd {
                let mut o = 0f64;
                let mut a = 0f64;
                for j in 0..len {
                    let v = vc[(kvh * max_seq + j) * hd + d] as f64;
                    o += w[j] * v;
                    a += w[j] * v.abs();
                }
                let (o, a) = (o / sum, a / sum);
                let i = (r * nh + h) * hd + d;
                out[i] = o;
                bound[i] = (2.0 * eta + (len + tiles + 10) as f64 * U) * a + 5.0 * U * o.abs() + 1e-30;
            }
        }
    }
    AttnRef { out, bound }
}

/// Runs attention on freshly uploaded q and caches and checks it; returns (max err, max bound).
fn attn_case(ctx: &GpuContext, ops: &GpuOps, rng: &mut Rng, s: HeadShape, max_seq: usize, q_scale: f64) -> (f64, f64) {
    let (nh, hd) = (s.n_heads, s.head_dim);
    let q = normal(rng, s.m * nh * hd, q_scale);
    let kc = normal(rng, s.n_kv_heads * max_seq * hd, 1.0);
    let vc = normal(rng, s.n_kv_heads * max_seq * hd, 1.0);
    let (qb, kb, vb) = (storage_f32(ctx, "q", &q), storage_f32(ctx, "kc", &kc), storage_f32(ctx, "vc", &vc));
    let out = storage_f32(ctx, "out", &vec![f32::NAN; s.m * nh * hd]);
    let scale = 1.0 / (hd as f32).sqrt();
    let cache = KvBuffers { k: &kb, v: &vb, max_seq };
    run(ctx, |e| ops.encode_attention(ctx, e, &qb, cache, &out, s, scale).unwrap());
    let got = read(ctx, &out, s.m * nh * hd);
    let want = attn_ref(&q, &kc, &vc, s, max_seq, scale);
    let what = format!("attention {s:?} q_scale {q_scale}");
    check_bound(&got, &want.out, &want.bound, &what);
    let max_err = got.iter().zip(&want.out).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    let max_bound = want.bound.iter().cloned().fold(0.0, f64::max);
    let max_v = vc.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
    assert!(max_bound < 1e-3 * max_v, "{what}: the bound {max_bound:e} is too loose to mean anything");
    eprintln!("{what}: max err {max_err:.2e}, max bound {max_bound:.2e}");
    (max_err, max_bound)
}

#[test]
fn attention_matches_reference() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(5);
    let smol = |m, pos0| HeadShape { m, n_heads: N_HEADS, n_kv_heads: N_KV, head_dim: HEAD_DIM, pos0 };
    // Sequence lengths 1 and 300 (one and five key tiles), m 1 and 7 with pos0 > 0.
    for (m, pos0) in [(1, 0), (1, 299), (7, 0), (7, 293)] {
        attn_case(ctx, ops, &mut rng, smol(m, pos0), 320, 1.0);
    }
    // Peaky scores (range ~100: the max subtraction matters; most weights underflow).
    attn_case(ctx, ops, &mut rng, smol(3, 90), 100, 8.0);
    // Multi-head (n_kv = n_heads), head_dim 80 (not a multiple of the 64-thread workgroup), the maximum 256.
    attn_case(ctx, ops, &mut rng, HeadShape { m: 3, n_heads: 4, n_kv_heads: 4, head_dim: 80, pos0: 70 }, 80, 1.0);
    attn_case(ctx, ops, &mut rng, HeadShape { m: 2, n_heads: 2, n_kv_heads: 1, head_dim: 256, pos0: 5 }, 8, 1.0);
    timed("attention", t);
}

// ---------------------------------------------------------------------------------------------------------
// silu_mul, add

fn silu_ref(g: f32, u: f32) -> f64 {
    let g = g as f64;
    g / (1.0 + (-g).exp()) * u as f64
}

#[test]
fn silu_mul_matches_reference_and_never_nans() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(6);
    for n in [INTER, 7 * INTER, 1000] {
        let gate = rng.vec(n, 8.0);
        let up = normal(&mut rng, n, 1.0);
        let (gb, ub, ob) = (storage_f32(ctx, "g", &gate), storage_f32(ctx, "u", &up), storage_zeroed(ctx, "o", n));
        run(ctx, |e| ops.encode_silu_mul(ctx, e, &gb, &ub, &ob, n).unwrap());
        let got = read(ctx, &ob, n);
        for i in 0..n {
            let want = silu_ref(gate[i], up[i]);
            let bound = (20.0 + 8.0 * gate[i].abs() as f64) * U * want.abs() + 1e-37;
            let err = (got[i] as f64 - want).abs();
            assert!(
                err <= bound,
                "n {n} i {i}: silu({})·{} = {} want {want} (err {err:e} > {bound:e})",
                gate[i],
                up[i],
                got[i]
            );
        }
    }
    // Extremes: exp(−g) would overflow for very negative g; the result must be (close to) 0·up, not NaN.
    let gate = [-1e30f32, -1000.0, -100.0, -88.8, -80.0, 80.0, 100.0, 1000.0, 3e38, 0.0, -0.0];
    let up = [3.0f32, -2.0, 1.5, 1e10, -7.0, 2.0, -3.0, 0.5, 1.0, 5.0, 5.0];
    let n = gate.len();
    let (gb, ub, ob) = (storage_f32(ctx, "g", &gate), storage_f32(ctx, "u", &up), storage_zeroed(ctx, "o", n));
    run(ctx, |e| ops.encode_silu_mul(ctx, e, &gb, &ub, &ob, n).unwrap());
    let got = read(ctx, &ob, n);
    for i in 0..n {
        assert!(got[i].is_finite(), "silu({})·{} = {}", gate[i], up[i], got[i]);
        if gate[i] < -50.0 {
            assert!(got[i].abs() <= 1e-12, "silu({})·{} = {}", gate[i], up[i], got[i]);
        } else if gate[i] > 50.0 {
            let want = gate[i] as f64 * up[i] as f64;
            assert!((got[i] as f64 - want).abs() <= 4.0 * U * want.abs(), "silu({})·{} = {}", gate[i], up[i], got[i]);
        } else {
            assert_eq!(got[i], 0.0);
        }
    }
    timed("silu_mul", t);
}

#[test]
fn add_in_place_is_exact() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(7);
    for n in [HIDDEN, 7 * HIDDEN, 1] {
        let x = normal(&mut rng, n, 10.0);
        let y = normal(&mut rng, n, 1.0);
        let (xb, yb) = (storage_f32(ctx, "x", &x), storage_f32(ctx, "y", &y));
        run(ctx, |e| ops.encode_add(ctx, e, &xb, &yb, n).unwrap());
        let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        assert_eq!(read(ctx, &xb, n), want, "n {n}");
    }
    timed("add", t);
}

// ---------------------------------------------------------------------------------------------------------
// argmax

fn argmax_ref(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn argmax_picks_lowest_index_of_the_max() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let mut rng = Rng::new(8);
    for vocab in [49152usize, 1000, 1] {
        let m = 7;
        let mut l = normal(&mut rng, m * vocab, 3.0);
        if vocab > 1 {
            // Row 1: a tie between two columns of different threads (lowest wins); row 2: the max at the end;
            // row 3: all equal (index 0); row 4: -inf everywhere but one column; row 5: a tie in one thread's
            // columns (c and c + 256).
            l[vocab + 5] = 50.0;
            l[vocab + vocab - 3] = 50.0;
            l[2 * vocab + vocab - 1] = 60.0;
            l[3 * vocab..4 * vocab].iter_mut().for_each(|v| *v = 1.25);
            l[4 * vocab..5 * vocab].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            l[4 * vocab + vocab / 2] = -1e30;
            if vocab > 300 {
                l[5 * vocab + 17] = 40.0;
                l[5 * vocab + 17 + 256] = 40.0;
            }
        }
        let lb = storage_f32(ctx, "logits", &l);
        let ob = storage_u32(ctx, "out", &[u32::MAX; 7]);
        run(ctx, |e| ops.encode_argmax(ctx, e, &lb, &ob, m, vocab).unwrap());
        let got = read_u32_blocking(ctx, &ob, m).unwrap();
        let want: Vec<u32> = l.chunks(vocab).map(argmax_ref).collect();
        assert_eq!(got, want, "vocab {vocab}");
        if vocab > 1 {
            assert_eq!(&got[1..5], &[5, (vocab - 1) as u32, 0, (vocab / 2) as u32]);
        }
    }
    timed("argmax", t);
}

// ---------------------------------------------------------------------------------------------------------
// Many ops, one encoder, one submit

#[test]
fn many_ops_in_one_submission_keep_their_parameters() {
    let Some((ctx, _)) = env() else { return };
    // Its own GpuOps: the cache counters checked below are not shared with the tests running in parallel.
    let ops = &GpuOps::new(ctx).unwrap();
    let t = Instant::now();
    let mut rng = Rng::new(9);
    // Two rms_norms with different eps and shapes reading the same x, plus the same (x, w, y1) again with a
    // third eps into another output, all in one encoder.
    let (m1, n1, m2, n2) = (7, HIDDEN, 3, 100);
    let x = normal(&mut rng, m1 * n1, 0.3);
    let w = normal(&mut rng, n1, 1.0);
    let (xb, wb) = (storage_f32(ctx, "x", &x), storage_f32(ctx, "w", &w));
    let (y1, y2, y3) =
        (storage_zeroed(ctx, "y1", m1 * n1), storage_zeroed(ctx, "y2", m2 * n2), storage_zeroed(ctx, "y3", m1 * n1));
    // A decode-like chain: five steps of kv_store + attention at pos0 = 0..5 (m = 1), each reading the cache
    // the previous steps filled, with their own uniforms.
    let (nh, nkv, hd, max_seq, steps) = (N_HEADS, N_KV, HEAD_DIM, 8, 5);
    let kc = storage_zeroed(ctx, "kc", nkv * max_seq * hd);
    let vc = storage_zeroed(ctx, "vc", nkv * max_seq * hd);
    let ks: Vec<Vec<f32>> = (0..steps).map(|_| normal(&mut rng, nkv * hd, 1.0)).collect();
    let vs: Vec<Vec<f32>> = (0..steps).map(|_| normal(&mut rng, nkv * hd, 1.0)).collect();
    let qs: Vec<Vec<f32>> = (0..steps).map(|_| normal(&mut rng, nh * hd, 1.0)).collect();
    let kbs: Vec<_> = ks.iter().map(|k| storage_f32(ctx, "k", k)).collect();
    let vbs: Vec<_> = vs.iter().map(|v| storage_f32(ctx, "v", v)).collect();
    let qbs: Vec<_> = qs.iter().map(|q| storage_f32(ctx, "q", q)).collect();
    let outs: Vec<_> = (0..steps).map(|_| storage_zeroed(ctx, "att", nh * hd)).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let (u0, g0) = (ops.uniforms_created(), ops.bind_groups_created());
    let record = |e: &mut wgpu::CommandEncoder| {
        ops.encode_rms_norm(ctx, e, &xb, &wb, &y1, m1, n1, 1e-5).unwrap();
        ops.encode_rms_norm(ctx, e, &xb, &wb, &y2, m2, n2, 0.5).unwrap();
        ops.encode_rms_norm(ctx, e, &xb, &wb, &y3, m1, n1, 2.0).unwrap();
        for p in 0..steps {
            let s = HeadShape { m: 1, n_heads: nh, n_kv_heads: nkv, head_dim: hd, pos0: p };
            let cache = KvBuffers { k: &kc, v: &vc, max_seq };
            ops.encode_kv_store(ctx, e, &kbs[p], &vbs[p], cache, s).unwrap();
            ops.encode_attention(ctx, e, &qbs[p], cache, &outs[p], s, scale).unwrap();
        }
    };
    run(ctx, record);
    let (u1, g1) = (ops.uniforms_created(), ops.bind_groups_created());
    let x2: Vec<f32> = x.chunks(n2).take(m2).flatten().copied().collect();
    check_rms(&read(ctx, &y1, m1 * n1), &rms_ref(&x, &w, n1, 1e-5), n1, "rms 1");
    check_rms(&read(ctx, &y2, m2 * n2), &rms_ref(&x2, &w[..n2], n2, 0.5), n2, "rms 2");
    check_rms(&read(ctx, &y3, m1 * n1), &rms_ref(&x, &w, n1, 2.0), n1, "rms 3");
    // The reference cache as the host would hold it after all steps (attention at step p sees 0..=p only).
    let mut kh = vec![0f32; nkv * max_seq * hd];
    let mut vh = kh.clone();
    for p in 0..steps {
        for h in 0..nkv {
            kh[(h * max_seq + p) * hd..][..hd].copy_from_slice(&ks[p][h * hd..][..hd]);
            vh[(h * max_seq + p) * hd..][..hd].copy_from_slice(&vs[p][h * hd..][..hd]);
        }
    }
    for p in 0..steps {
        let s = HeadShape { m: 1, n_heads: nh, n_kv_heads: nkv, head_dim: hd, pos0: p };
        let want = attn_ref(&qs[p], &kh, &vh, s, max_seq, scale);
        check_bound(&read(ctx, &outs[p], nh * hd), &want.out, &want.bound, &format!("decode step {p}"));
    }
    // Recording the same calls again reuses every uniform and bind group.
    run(ctx, record);
    assert_eq!((ops.uniforms_created(), ops.bind_groups_created()), (u1, g1), "second recording created new state");
    eprintln!("one submission: {} uniforms and {} bind groups created, none on the repeat", u1 - u0, g1 - g0);
    timed("one submission", t);
}

// ---------------------------------------------------------------------------------------------------------
// Errors, not GPU validation panics

fn invalid(r: lowbit_llm::Result<()>, what: &str) {
    match r {
        Err(Error::Invalid(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected Error::Invalid, got {other:?}"),
    }
}

#[test]
fn bad_buffers_and_parameters_are_errors() {
    let Some((ctx, ops)) = env() else { return };
    let t = Instant::now();
    let big = storage_zeroed(ctx, "big", 4096);
    let small = storage_zeroed(ctx, "small", 10);
    let ids = storage_u32(ctx, "ids", &[0, 1, 2]);
    let not_storage = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096 * 4,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e = &mut enc;
    invalid(ops.encode_embed(ctx, e, &small, &ids, &big, 3, 4, 8), "embed: table too small");
    invalid(ops.encode_embed(ctx, e, &big, &ids, &big, 4, 4, 8), "embed: ids too small");
    invalid(ops.encode_embed(ctx, e, &big, &ids, &small, 3, 4, 8), "embed: out too small");
    invalid(ops.encode_embed(ctx, e, &big, &ids, &big, 3, 4, 8), "embed: out aliases table");
    invalid(ops.encode_rms_norm(ctx, e, &big, &small, &not_storage, 2, 8, 1e-5), "rms: w too small");
    invalid(ops.encode_rms_norm(ctx, e, &big, &big, &not_storage, 2, 8, 1e-5), "rms: y not STORAGE");
    invalid(ops.encode_rms_norm(ctx, e, &big, &big, &big, 2, 8, 1e-5), "rms: in place");
    let (x, w, y) = (storage_zeroed(ctx, "x", 16), storage_zeroed(ctx, "w", 8), storage_zeroed(ctx, "y", 16));
    invalid(ops.encode_rms_norm(ctx, e, &x, &w, &y, 2, 8, f32::NAN), "rms: eps NaN");
    invalid(ops.encode_rms_norm(ctx, e, &x, &w, &y, 2, 8, -1.0), "rms: eps < 0");
    invalid(ops.encode_rms_norm(ctx, e, &x, &w, &y, 3, 8, 1e-5), "rms: x too small for m");
    let (cos, sin) = RopeTable::llama_tables(1e4, 8, 4);
    let table = RopeTable::from_slices(ctx, &cos, &sin, 4, 4).unwrap();
    assert!(RopeTable::from_slices(ctx, &cos, &sin[1..], 4, 4).is_err());
    let s = HeadShape { m: 2, n_heads: 2, n_kv_heads: 1, head_dim: 8, pos0: 2 };
    let (q, k) = (storage_zeroed(ctx, "q", 32), storage_zeroed(ctx, "k", 16));
    invalid(ops.encode_rope(ctx, e, &q, &k, &table, HeadShape { pos0: 3, ..s }), "rope: past the table");
    invalid(ops.encode_rope(ctx, e, &q, &k, &table, HeadShape { head_dim: 6, ..s }), "rope: head_dim vs table");
    invalid(ops.encode_rope(ctx, e, &q, &k, &table, HeadShape { n_heads: 3, ..s }), "rope: q too small");
    invalid(ops.encode_rope(ctx, e, &q, &q, &table, s), "rope: q is k");
    let cache = KvBuffers { k: &big, v: &x, max_seq: 4 };
    invalid(ops.encode_kv_store(ctx, e, &k, &k, KvBuffers { v: &big, ..cache }, s), "kv_store: k cache is v cache");
    invalid(ops.encode_kv_store(ctx, e, &k, &k, cache, s), "kv_store: v cache too small");
    let vc = storage_zeroed(ctx, "vc", 32);
    let cache = KvBuffers { k: &big, v: &vc, max_seq: 4 };
    invalid(ops.encode_kv_store(ctx, e, &k, &k, cache, HeadShape { pos0: 3, ..s }), "kv_store: past max_seq");
    let out = storage_zeroed(ctx, "out", 32);
    invalid(ops.encode_attention(ctx, e, &q, cache, &out, HeadShape { n_kv_heads: 3, ..s }, 0.3), "attention: 2 % 3");
    invalid(ops.encode_attention(ctx, e, &q, cache, &out, HeadShape { n_kv_heads: 0, ..s }, 0.3), "attention: no kv");
    invalid(
        ops.encode_attention(ctx, e, &q, cache, &out, HeadShape { head_dim: 300, ..s }, 0.3),
        "attention: head_dim",
    );
    invalid(ops.encode_attention(ctx, e, &q, cache, &out, s, f32::INFINITY), "attention: scale");
    invalid(ops.encode_attention(ctx, e, &q, cache, &small, s, 0.3), "attention: out too small");
    invalid(ops.encode_attention(ctx, e, &q, cache, &q, s, 0.3), "attention: out is q");
    invalid(ops.encode_attention(ctx, e, &q, cache, &out, HeadShape { pos0: 3, ..s }, 0.3), "attention: past max_seq");
    invalid(ops.encode_silu_mul(ctx, e, &big, &small, &out, 20), "silu: up too small");
    invalid(ops.encode_silu_mul(ctx, e, &big, &big, &big, 20), "silu: out is gate");
    invalid(ops.encode_add(ctx, e, &big, &big, 20), "add: x is y");
    invalid(ops.encode_add(ctx, e, &small, &big, 20), "add: x too small");
    invalid(ops.encode_argmax(ctx, e, &big, &small, 11, 8), "argmax: out too small");
    invalid(ops.encode_argmax(ctx, e, &small, &big, 2, 8), "argmax: logits too small");
    invalid(ops.encode_argmax(ctx, e, &big, &ids, 2, 0), "argmax: vocab 0");
    // Zero-sized work records nothing and is fine.
    ops.encode_add(ctx, e, &small, &big, 0).unwrap();
    ops.encode_argmax(ctx, e, &big, &ids, 0, 8).unwrap();
    // Nothing invalid was recorded: the encoder still finishes and runs a valid op.
    let (a, b) = (storage_f32(ctx, "a", &[1.0, 2.0]), storage_f32(ctx, "b", &[0.5, 0.25]));
    ops.encode_add(ctx, e, &a, &b, 2).unwrap();
    ctx.queue().submit([enc.finish()]);
    assert_eq!(read(ctx, &a, 2), [1.5, 2.25]);
    assert!(read_f32_blocking(ctx, &not_storage, 1).is_err(), "readback without COPY_SRC");
    assert!(read_f32_blocking(ctx, &small, 11).is_err(), "readback past the end");
    timed("errors", t);
}
