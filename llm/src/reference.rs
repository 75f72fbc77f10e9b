//! An f64 reference forward for tests: the same model (every weight dequantized by lowbit's scalar
//! reference, adapters included) recomputed from scratch — no KV cache, no threads, every sum in f64 — so that
//! the f32 runtime's logits can be checked against it within a stated bound.

use crate::linear::Linear;
use crate::model::LmHead;
use crate::{Error, Model, Result};

/// Logits `[m, vocab]` of `tokens` at positions `0..m`, computed in f64.
pub fn forward_f64(model: &Model, tokens: &[u32]) -> Result<Vec<f64>> {
    let c = model.config();
    let (m, d, hd) = (tokens.len(), c.hidden_size, c.head_dim);
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::Invalid(format!("token id {t}, expected < vocab size {}", c.vocab_size)));
    }
    let emb = model.embedding().to_f32();
    let mut x: Vec<f64> =
        tokens.iter().flat_map(|&t| emb[t as usize * d..(t as usize + 1) * d].iter().map(|&v| v as f64)).collect();
    let eps = c.rms_norm_eps as f64;
    let half = hd / 2;
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    for b in model.blocks() {
        let xn = norm(&x, &b.attn_norm, eps, d);
        let mut q = linear(&b.q, &xn);
        let mut k = linear(&b.k, &xn);
        let v = linear(&b.v, &xn);
        for r in 0..m {
            let (cos, sin) = model.rope().row(r);
            for t in [&mut q[r * nh * hd..(r + 1) * nh * hd], &mut k[r * nkv * hd..(r + 1) * nkv * hd]] {
                for head in t.chunks_exact_mut(hd) {
                    for i in 0..half {
                        let (a, bb) = (head[i], head[i + half]);
                        let (cs, sn) = (cos[i] as f64, sin[i] as f64);
                        head[i] = a * cs - bb * sn;
                        head[i + half] = bb * cs + a * sn;
                    }
                }
            }
        }
        let mut att = vec![0.0f64; m * nh * hd];
        let scale = 1.0 / (hd as f64).sqrt();
        for r in 0..m {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qv = &q[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                let s: Vec<f64> = (0..=r)
                    .map(|j| {
                        let kv = &k[(j * nkv + kvh) * hd..(j * nkv + kvh + 1) * hd];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let out = &mut att[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                for (j, p) in e.iter().enumerate() {
                    let vv = &v[(j * nkv + kvh) * hd..(j * nkv + kvh + 1) * hd];
                    for (o, w) in out.iter_mut().zip(vv) {
                        *o += p / sum * w;
                    }
                }
            }
        }
        add(&mut x, &linear(&b.o, &att));
        let xn = norm(&x, &b.mlp_norm, eps, d);
        let g = linear(&b.gate, &xn);
        let u = linear(&b.up, &xn);
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        add(&mut x, &linear(&b.down, &a));
    }
    let xn = norm(&x, model.final_norm(), eps, d);
    Ok(match model.lm_head() {
        LmHead::Tied => matmul(&emb, c.vocab_size, d, &xn),
        LmHead::Own(l) => linear(l, &xn),
    })
}

fn norm(x: &[f64], w: &[f32], eps: f64, d: usize) -> Vec<f64> {
    x.chunks_exact(d)
        .flat_map(|r| {
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            r.iter().zip(w).map(move |(v, &w)| v * inv * w as f64)
        })
        .collect()
}

fn add(x: &mut [f64], y: &[f64]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn matmul(w: &[f32], n_out: usize, n_in: usize, x: &[f64]) -> Vec<f64> {
    x.chunks_exact(n_in)
        .flat_map(|xr| {
            (0..n_out).map(move |o| w[o * n_in..(o + 1) * n_in].iter().zip(xr).map(|(&w, x)| w as f64 * x).sum::<f64>())
        })
        .collect()
}

/// `x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ` in f64 over the dequantized weight.
fn linear(l: &Linear, x: &[f64]) -> Vec<f64> {
    let (n_out, n_in) = (l.out_features(), l.in_features());
    let mut y = matmul(&l.dequantized_weight(), n_out, n_in, x);
    if let Some(b) = l.bias() {
        for row in y.chunks_exact_mut(n_out) {
            for (v, &b) in row.iter_mut().zip(b) {
                *v += b as f64;
            }
        }
    }
    for ad in l.adapters() {
        let (rank, s) = (ad.rank(), ad.scaling() as f64);
        let t = matmul(ad.a(), rank, n_in, x);
        let u = matmul(ad.b(), n_out, rank, &t);
        for (v, u) in y.iter_mut().zip(u) {
            *v += s * u;
        }
    }
    y
}
