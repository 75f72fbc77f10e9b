//! `lowbit_llm::gpu::GpuModel` against the CPU `Model::forward` and the f64 `reference::forward_f64`, on tiny
//! random models built here (no files), on a real adapter (lavapipe in CI). Skips loudly without an adapter
//! unless `LOWBIT_REQUIRE_GPU=1` (the convention of `gpu_ops.rs`).
//!
//! # Tolerances
//! Both forwards compute the same f32 operations on the same (dequantized) weights; they differ only in
//! summation order (GPU dot products are split across threads and tree-reduced, the CPU's are SIMD-chunked),
//! in the GPU's `exp` / `inverseSqrt` / division (a few ULP, see `gpu_ops.rs`) and in FMA contraction. Each
//! of these is a few `u = 2⁻²⁴` relative per operation; through two layers of norms, attention and a 96-wide
//! MLP the logits move by `O(100·u)·max|logit|`. The bound is stated relative to `max|logit|` of the compared
//! rows and set to ~10× the largest deviation measured over every case (printed by the tests), far below what
//! a wrong position, head, row or weight would cause (the logits' scale, `~1e-1` relative).
//! The f64 reference rounds nothing, so the GPU's distance to it is the f32 rounding of a whole forward: the
//! same order, measured and bounded the same way.
#![cfg(feature = "gpu")]

use lowbit::gpu::GpuContext;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit_llm::gpu::GpuModel;
use lowbit_llm::linear::DenseLinear;
use lowbit_llm::model::{Block, LmHead};
use lowbit_llm::{reference, Config, Embedding, Error, Linear, LoadOptions, Logits, Model, WeightMode};
use lowbit_testkit::Rng;
use std::time::Instant;

/// GPU vs CPU f32 forward: `max|Δ| ≤ BOUND_CPU · max|logit|` (measured on lavapipe: 2.9e-7 int8:channel,
/// 6.7e-7 nf4:64 + LoRA + dense lm_head, 2.5e-7 nf4:64+dq + dense v_proj; ~10× the worst).
const BOUND_CPU: f64 = 7e-6;
/// GPU vs the f64 reference: `max|Δ| ≤ BOUND_F64 · max|logit|` (measured 2.2e-7, 5.5e-7, 2.4e-7; ~10×).
const BOUND_F64: f64 = 6e-6;

const HIDDEN: usize = 64;
const N_HEADS: usize = 4;
const N_KV: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 96;
const LAYERS: usize = 2;
const VOCAB: usize = 300;
const PREFILL: [u32; 7] = [5, 299, 17, 0, 123, 17, 64];
const DECODE: [u32; 3] = [42, 7, 250];

fn ctx() -> Option<&'static GpuContext> {
    lowbit_testkit::gpu::test_context()
}

fn config() -> Config {
    Config {
        model_type: "llama".into(),
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTER,
        num_hidden_layers: LAYERS,
        num_attention_heads: N_HEADS,
        num_key_value_heads: N_KV,
        head_dim: HEAD_DIM,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// How a case builds its layers.
#[derive(Clone, Copy)]
struct Case {
    scheme: &'static str,
    /// LoRA adapters on q_proj and down_proj.
    lora: bool,
    /// `LmHead::Own(Dense)` instead of tied.
    dense_head: bool,
    /// v_proj dense f32 (with a bias) instead of quantized.
    dense_v: bool,
    /// The embedding stored as int8:channel (rows written from the host; the tied head runs on it).
    int8_embed: bool,
}

const CASES: [Case; 4] = [
    Case { scheme: "int8:channel", lora: false, dense_head: false, dense_v: false, int8_embed: false },
    Case { scheme: "nf4:64", lora: true, dense_head: true, dense_v: false, int8_embed: false },
    Case { scheme: "nf4:64+dq", lora: false, dense_head: false, dense_v: true, int8_embed: false },
    Case { scheme: "nf4:64+dq", lora: true, dense_head: false, dense_v: false, int8_embed: true },
];

fn build(case: Case, seed: u64) -> Model {
    let c = config();
    let mut rng = Rng::new(seed);
    let scheme: lowbit::Scheme = case.scheme.parse().unwrap();
    let quant = |rng: &mut Rng, o: usize, i: usize, bias: bool| {
        let w = rng.normal_vec(o * i, 1.0 / (i as f64).sqrt());
        let b = bias.then(|| rng.normal_vec(o, 0.1));
        Linear::Quant(Box::new(QuantLinear::new(QuantWeight::quantize(&w, &[o, i], scheme).unwrap(), b).unwrap()))
    };
    let norm = |rng: &mut Rng| rng.normal_vec(HIDDEN, 0.1).into_iter().map(|v| 1.0 + v).collect::<Vec<f32>>();
    let (qw, kvw) = (N_HEADS * HEAD_DIM, N_KV * HEAD_DIM);
    let blocks = (0..LAYERS)
        .map(|_| {
            let mut b = Block {
                attn_norm: norm(&mut rng),
                q: quant(&mut rng, qw, HIDDEN, true),
                k: quant(&mut rng, kvw, HIDDEN, false),
                v: if case.dense_v {
                    let w = rng.normal_vec(kvw * HIDDEN, 1.0 / (HIDDEN as f64).sqrt());
                    Linear::Dense(DenseLinear::new(w, kvw, HIDDEN, Some(rng.normal_vec(kvw, 0.1))).unwrap())
                } else {
                    quant(&mut rng, kvw, HIDDEN, false)
                },
                o: quant(&mut rng, HIDDEN, qw, false),
                mlp_norm: norm(&mut rng),
                gate: quant(&mut rng, INTER, HIDDEN, false),
                up: quant(&mut rng, INTER, HIDDEN, false),
                down: quant(&mut rng, HIDDEN, INTER, false),
            };
            if case.lora {
                let r = 4;
                for (l, o, i) in [(&mut b.q, qw, HIDDEN), (&mut b.down, HIDDEN, INTER)] {
                    let a = rng.normal_vec(r * i, 1.0 / (i as f64).sqrt());
                    let bb = rng.normal_vec(o * r, 0.3);
                    l.add_adapter(LoraAdapter::new("test", r, a, bb, 8.0, false).unwrap()).unwrap();
                }
            }
            b
        })
        .collect();
    let embed = rng.normal_vec(VOCAB * HIDDEN, 1.0);
    let final_norm = norm(&mut rng);
    let lm_head = if case.dense_head {
        let w = rng.normal_vec(VOCAB * HIDDEN, 1.0 / (HIDDEN as f64).sqrt());
        LmHead::Own(Box::new(Linear::Dense(
            DenseLinear::new(w, VOCAB, HIDDEN, Some(rng.normal_vec(VOCAB, 0.1))).unwrap(),
        )))
    } else {
        LmHead::Tied
    };
    if case.int8_embed {
        let q = QuantWeight::quantize(&embed, &[VOCAB, HIDDEN], "int8:channel".parse().unwrap()).unwrap();
        let embed = Embedding::int8(QuantLinear::new(q, None).unwrap()).unwrap();
        return Model::from_parts_with_embedding(c, embed, blocks, final_norm, lm_head).unwrap();
    }
    Model::from_parts(c, embed, blocks, final_norm, lm_head).unwrap()
}

/// `max|a − b| / max|b|` over the rows.
fn rel_dev(a: &[f32], b: impl Iterator<Item = f64> + Clone) -> f64 {
    let scale = b.clone().fold(0f64, |m, v| m.max(v.abs()));
    let d = a.iter().zip(b).fold(0f64, |m, (&x, y)| m.max((x as f64 - y).abs()));
    d / scale
}

/// Runs prefill (All) + 3 decode steps (Last) on the CPU and the GPU; returns (GPU vs CPU, GPU vs f64) worst
/// relative deviations, and the CPU logits of the prefill's last row and of each decode step.
fn compare(ctx: &GpuContext, model: &Model, name: &str) -> (f64, f64, Vec<Vec<f32>>) {
    let mut gpu = GpuModel::upload(ctx, model, 16, 8).unwrap();
    let mut state = model.new_state(16).unwrap();
    let all: Vec<u32> = PREFILL.iter().chain(&DECODE).copied().collect();
    let f64_logits = reference::forward_f64(model, &all).unwrap();
    let ref_rows = |r0: usize, n: usize| f64_logits[r0 * VOCAB..(r0 + n) * VOCAB].iter().copied();
    let (mut dc, mut df) = (0f64, 0f64);
    let mut cpu = vec![0f32; PREFILL.len() * VOCAB];
    let mut got = cpu.clone();
    model.forward(&PREFILL, &mut state, Logits::All, &mut cpu).unwrap();
    let (s0, r0) = (gpu.submissions(), gpu.readbacks());
    gpu.forward(ctx, &PREFILL, Logits::All, &mut got).unwrap();
    assert_eq!((gpu.submissions() - s0, gpu.readbacks() - r0), (1, 1), "{name}: prefill");
    assert_eq!(gpu.len(), PREFILL.len());
    dc = dc.max(rel_dev(&got, cpu.iter().map(|&v| v as f64)));
    df = df.max(rel_dev(&got, ref_rows(0, PREFILL.len())));
    let mut last = vec![cpu[(PREFILL.len() - 1) * VOCAB..].to_vec()];
    for (i, &t) in DECODE.iter().enumerate() {
        let mut cpu = vec![0f32; VOCAB];
        let mut got = cpu.clone();
        model.forward(&[t], &mut state, Logits::Last, &mut cpu).unwrap();
        let (s0, r0) = (gpu.submissions(), gpu.readbacks());
        gpu.forward(ctx, &[t], Logits::Last, &mut got).unwrap();
        assert_eq!((gpu.submissions() - s0, gpu.readbacks() - r0), (1, 1), "{name}: decode {i}");
        dc = dc.max(rel_dev(&got, cpu.iter().map(|&v| v as f64)));
        df = df.max(rel_dev(&got, ref_rows(PREFILL.len() + i, 1)));
        last.push(cpu);
    }
    assert_eq!(gpu.len(), all.len());
    eprintln!("{name}: GPU vs CPU {dc:.2e}, GPU vs f64 {df:.2e} (relative to max|logit|)");
    assert!(dc <= BOUND_CPU, "{name}: GPU vs CPU {dc:e} > {BOUND_CPU:e}");
    assert!(df <= BOUND_F64, "{name}: GPU vs f64 {df:e} > {BOUND_F64:e}");

    // Greedy: the same sequence again after reset, argmax on the GPU, 4 bytes per call.
    gpu.reset();
    let mut steps: Vec<&[u32]> = vec![&PREFILL];
    steps.extend(DECODE.iter().map(std::slice::from_ref));
    let mut checked = 0;
    for (step, row) in steps.into_iter().zip(&last) {
        let (s0, r0) = (gpu.submissions(), gpu.readbacks());
        let id = gpu.forward_greedy(ctx, step).unwrap() as usize;
        assert_eq!((gpu.submissions() - s0, gpu.readbacks() - r0), (1, 1), "{name}: greedy");
        let mut sorted: Vec<(f32, usize)> = row.iter().copied().zip(0..).collect();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
        let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        if (sorted[0].0 - sorted[1].0) as f64 > 2.0 * BOUND_CPU * scale {
            assert_eq!(id, sorted[0].1, "{name}: greedy token vs the CPU argmax");
            checked += 1;
        }
    }
    assert!(checked >= 3, "{name}: only {checked} greedy steps had a clear CPU margin");
    (dc, df, last)
}

#[test]
fn gpu_logits_match_cpu_and_f64() {
    let Some(ctx) = ctx() else { return };
    let t = Instant::now();
    for (i, case) in CASES.into_iter().enumerate() {
        let model = build(case, 10 + i as u64);
        let name = format!(
            "{}{}{}{}{}",
            case.scheme,
            if case.lora { " +lora" } else { "" },
            if case.dense_head { " dense lm_head" } else { " tied" },
            if case.dense_v { " dense v_proj" } else { "" },
            if case.int8_embed { " int8 embedding" } else { "" }
        );
        compare(ctx, &model, &name);
    }
    eprintln!("gpu_logits_match_cpu_and_f64: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn errors_leave_the_cache_alone() {
    let Some(ctx) = ctx() else { return };
    let model = build(CASES[0], 3);
    let mut gpu = GpuModel::upload(ctx, &model, 8, 4).unwrap();
    let mut logits = vec![0f32; VOCAB];
    let invalid = |r: lowbit_llm::Result<()>| assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    invalid(gpu.forward(ctx, &[], Logits::Last, &mut logits));
    invalid(gpu.forward(ctx, &[1; 5], Logits::Last, &mut logits)); // > max_batch
    invalid(gpu.forward(ctx, &[VOCAB as u32], Logits::Last, &mut logits));
    invalid(gpu.forward(ctx, &[1, 2], Logits::All, &mut logits)); // wrong logits length
    assert_eq!((gpu.len(), gpu.submissions(), gpu.readbacks()), (0, 0, 0));
    gpu.forward(ctx, &[1, 2, 3, 4], Logits::Last, &mut logits).unwrap();
    gpu.forward(ctx, &[1, 2, 3, 4], Logits::Last, &mut logits).unwrap();
    invalid(gpu.forward(ctx, &[1], Logits::Last, &mut logits)); // cache full
    assert_eq!(gpu.len(), 8);
    gpu.reset();
    assert_eq!(gpu.len(), 0);
    assert!(matches!(GpuModel::upload(ctx, &model, 65, 4), Err(Error::Invalid(_))));
    assert!(matches!(GpuModel::upload(ctx, &model, 8, 0), Err(Error::Invalid(_))));

    // A LoRA adapter on a dense layer is refused.
    let mut model = build(CASES[2], 4);
    let a = vec![0.1f32; HIDDEN];
    let b = vec![0.1f32; N_KV * HEAD_DIM];
    model.blocks_mut()[0].v.add_adapter(LoraAdapter::new("x", 1, a, b, 1.0, false).unwrap()).unwrap();
    let e = GpuModel::upload(ctx, &model, 8, 4).unwrap_err();
    assert!(matches!(&e, Error::Model(m) if m.contains("--scheme")), "{e}");
}

/// The real model at NF4+DQ with its tied head quantized to int8 (`LoadOptions::lm_head`: the head is then a
/// quantized layer on the GPU too; the tiny models above cover the tied f32 and own dense heads).
#[test]
fn smollm2_greedy_says_paris() {
    let Some(ctx) = ctx() else { return };
    let Some(path) = lowbit_testkit::model::smollm2_gguf("gpu smollm2") else { return };
    let t = Instant::now();
    let model = Model::load(
        &path,
        &LoadOptions {
            weights: WeightMode::Quantize("nf4:64+dq".parse().unwrap()),
            lm_head: Some("int8:channel".parse().unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    let t_load = t.elapsed().as_secs_f64();
    let mut gpu = GpuModel::upload(ctx, &model, 32, 8).unwrap();
    let t_up = t.elapsed().as_secs_f64();
    let mut out = vec![gpu.forward_greedy(ctx, &[504, 3575, 282, 4649, 314]).unwrap()];
    let mut steps = vec![t.elapsed().as_secs_f64() - t_up];
    for _ in 0..2 {
        let (next, t0) = (*out.last().unwrap(), t.elapsed().as_secs_f64());
        out.push(gpu.forward_greedy(ctx, &[next]).unwrap());
        steps.push(t.elapsed().as_secs_f64() - t0);
    }
    eprintln!("smollm2 GPU greedy {out:?}: load {t_load:.1} s, upload {:.1} s, forwards {steps:.2?} s", t_up - t_load);
    assert_eq!(out[0], 7042, "expected \" Paris\"");
    assert_eq!((gpu.submissions(), gpu.readbacks()), (3, 3));
}

/// A prefill split into two calls (rows at `pos0 > 0` with `m > 1`) gives the CPU's one-call logits.
#[test]
fn chunked_prefill_matches_cpu() {
    let Some(ctx) = ctx() else { return };
    let model = build(CASES[1], 21);
    let mut state = model.new_state(16).unwrap();
    let mut cpu = vec![0f32; PREFILL.len() * VOCAB];
    model.forward(&PREFILL, &mut state, Logits::All, &mut cpu).unwrap();
    let mut gpu = GpuModel::upload(ctx, &model, 16, 4).unwrap();
    let mut got = vec![0f32; PREFILL.len() * VOCAB];
    let (a, b) = got.split_at_mut(4 * VOCAB);
    gpu.forward(ctx, &PREFILL[..4], Logits::All, a).unwrap();
    gpu.forward(ctx, &PREFILL[4..], Logits::All, b).unwrap();
    let d = rel_dev(&got, cpu.iter().map(|&v| v as f64));
    eprintln!("chunked prefill: GPU vs CPU {d:.2e}");
    assert!(d <= BOUND_CPU, "chunked prefill: {d:e} > {BOUND_CPU:e}");
    assert_eq!((gpu.len(), gpu.submissions(), gpu.readbacks()), (7, 2, 2));
}

/// An f32 embedding (the tied head too) larger than one storage binding of the device is a typed error that
/// names the remedy, not wgpu's validation panic (found on a real GPU with Llama-3.2-1B's shapes: a 1 GB
/// table against the 128 MiB binding of the WebGPU default limits); with the embedding int8 on the host the
/// same model uploads.
#[test]
fn an_embedding_past_one_binding_is_an_error_not_a_panic() {
    let Some(ctx) = ctx() else { return };
    let limits = ctx.limits();
    let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let hidden = 1024;
    let vocab = (max / 4 / hidden as u64 + 1) as usize;
    let c = Config {
        vocab_size: vocab,
        hidden_size: hidden,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        intermediate_size: 8,
        ..config()
    };
    let dense = |o: usize, i: usize| Linear::Dense(DenseLinear::new(vec![0.01; o * i], o, i, None).unwrap());
    let block = || Block {
        attn_norm: vec![1.0; hidden],
        q: dense(HEAD_DIM, hidden),
        k: dense(HEAD_DIM, hidden),
        v: dense(HEAD_DIM, hidden),
        o: dense(hidden, HEAD_DIM),
        mlp_norm: vec![1.0; hidden],
        gate: dense(8, hidden),
        up: dense(8, hidden),
        down: dense(hidden, 8),
    };
    let model = Model::from_parts(c.clone(), vec![0.5; vocab * hidden], vec![block()], vec![1.0; hidden], LmHead::Tied)
        .unwrap();
    let e = GpuModel::upload(ctx, &model, 8, 2).unwrap_err();
    assert!(
        matches!(&e, Error::Model(m) if m.contains("embed_tokens") && m.contains(&max.to_string()) && m.contains("--embedding int8")),
        "{e}"
    );
    drop(model);
    // The remedy: an int8 embedding (the tied head runs on it) stays on the host and uploads.
    let w = vec![0.5f32; vocab * hidden];
    let q =
        QuantLinear::new(QuantWeight::quantize(&w, &[vocab, hidden], "int8:channel".parse().unwrap()).unwrap(), None)
            .unwrap();
    drop(w);
    let emb = Embedding::int8(q).unwrap();
    let model = Model::from_parts_with_embedding(c, emb, vec![block()], vec![1.0; hidden], LmHead::Tied).unwrap();
    let mut gpu = GpuModel::upload(ctx, &model, 8, 2).unwrap();
    let id = gpu.forward_greedy(ctx, &[1, 2]).unwrap();
    assert!((id as usize) < vocab);
}
