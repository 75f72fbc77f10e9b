//! Training on the GPU (`GpuModel::loss_and_grads`, `Trainer::step_gpu`) against the CPU trainer
//! (`Model::loss_and_grads`, `Trainer::step`), on tiny random models (no files), on a real adapter (lavapipe in
//! CI). Skips loudly without an adapter unless `LOWBIT_REQUIRE_GPU=1`.
//!
//! # Tolerances
//! Both trainers compute the same f32 operations on the same dequantized weights; they differ in summation
//! order (the GPU's reductions are split across threads and tree-reduced, the CPU's are SIMD-chunked), in the
//! GPU's `exp` / `log` / `inverseSqrt` (a few ULP), in the cross-entropy's sums (f32 on the GPU, f64 on the
//! CPU) and in the attention probabilities (the GPU's backward recomputes them; the CPU saves the forward's).
//! Each is a few `u = 2⁻²⁴` relative per operation. The CPU trainer itself is checked against f64 finite
//! differences (`train.rs`) and PyTorch (`train_smollm2.rs`); here the bound is stated relative to the
//! compared tensor's largest element, `max|Δ| ≤ BOUND · max|g|`, set ~10× above the worst deviation measured
//! over every case (printed by the test), far below what a wrong row, head, sign or adapter offset gives
//! (order 1 relative).
#![cfg(feature = "gpu")]

mod common;

use common::tiny_model;
use lowbit::gpu::GpuContext;
use lowbit::optim::{OptimizerConfig, OptimizerKind};
use lowbit::Scheme;
use lowbit_llm::gpu::GpuModel;
use lowbit_llm::linear::DenseLinear;
use lowbit_llm::train::{ModelGrads, TrainState, Trainer};
use lowbit_llm::{Error, Linear, Logits, Model};

/// GPU vs CPU gradients and loss: `max|Δ| ≤ BOUND · max|g|` per tensor (measured on lavapipe: see the
/// test's output; the worst was 3.4e-6).
const BOUND: f64 = 3e-5;

const TOKENS: [u32; 13] = [5, 17, 250, 3, 99, 17, 5, 42, 280, 7, 7, 131, 64];

fn ctx() -> Option<&'static GpuContext> {
    lowbit_testkit::gpu::test_context()
}

/// The cases: nf4 + double quantization, int8 per channel, and nf4 with one dense layer (no adapter) in the
/// middle of the gradient's path (block 1's `o_proj`: its input gradient runs the dense `matmul_nn` kernel).
fn cases() -> Vec<(&'static str, Model)> {
    let mut mixed = tiny_model(Some(Scheme::nf4(32, false)), true, 23);
    let o = &mixed.blocks()[1].o;
    let (n_out, n_in) = (o.out_features(), o.in_features());
    let w = o.dequantized_weight();
    mixed.blocks_mut()[1].o = Linear::Dense(DenseLinear::new(w, n_out, n_in, None).unwrap());
    vec![
        ("nf4:32+dq", tiny_model(Some(Scheme::nf4(32, true)), true, 11)),
        ("int8:channel", tiny_model(Some(Scheme::Int8(lowbit::affine::Granularity::PerChannel)), true, 12)),
        ("nf4:32 + dense o_proj", mixed),
    ]
}

/// `max|a − b| / max|b|` over one tensor.
fn rel_dev(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let dev = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    dev / scale.max(1e-30)
}

fn worst_grad_dev(gpu: &ModelGrads, cpu: &ModelGrads) -> f64 {
    let mut worst = 0f64;
    for (gb, cb) in gpu.blocks.iter().zip(&cpu.blocks) {
        for (gl, cl) in gb.iter().zip(cb) {
            assert_eq!(gl.len(), cl.len());
            for (g, c) in gl.iter().zip(cl) {
                worst = worst.max(rel_dev(&g.a, &c.a)).max(rel_dev(&g.b, &c.b));
            }
        }
    }
    worst
}

#[test]
fn gpu_loss_and_gradients_match_the_cpu_trainer() {
    let Some(ctx) = ctx() else { return };
    let mut worst = 0f64;
    for (name, model) in cases() {
        let n = TOKENS.len() - 1;
        let scale = 1.0 / n as f32;
        let mut cpu = model.zero_grads();
        let lc = model.loss_and_grads(&TOKENS, scale, &mut cpu, &mut TrainState::default()).unwrap();
        let mut gpu_model = GpuModel::upload(ctx, &model, 32, 4).unwrap();
        let mut gpu = model.zero_grads();
        let lg = gpu_model.loss_and_grads(ctx, &TOKENS, scale, &mut gpu).unwrap();
        assert_eq!(lg.count, lc.count);
        let dl = (lg.sum - lc.sum).abs() / lc.sum.abs();
        let dg = worst_grad_dev(&gpu, &cpu);
        eprintln!(
            "{name}: loss {:.7} (GPU) vs {:.7} (CPU), rel {dl:.2e}; gradients max|Δ|/max|g| {dg:.2e}",
            lg.sum, lc.sum
        );
        assert!(dl <= BOUND, "{name}: loss {} vs {}", lg.sum, lc.sum);
        assert!(dg <= BOUND, "{name}: gradients deviate by {dg:e} of their scale");
        assert!(gpu.blocks.iter().flatten().flatten().any(|g| g.a.iter().chain(&g.b).any(|v| *v != 0.0)));
        // A second call ADDS: twice the gradients (the GPU buffers are zeroed per call, the host adds).
        let lg2 = gpu_model.loss_and_grads(ctx, &TOKENS, scale, &mut gpu).unwrap();
        assert_eq!(lg2.sum, lg.sum, "{name}: the GPU training pass is deterministic");
        let mut twice = model.zero_grads();
        gpu_model.loss_and_grads(ctx, &TOKENS, 2.0 * scale, &mut twice).unwrap();
        assert!(worst_grad_dev(&gpu, &twice) <= 1e-6, "{name}: accumulation");
        // A shorter sequence after a longer one reuses the buffers.
        let mut short = model.zero_grads();
        let mut short_cpu = model.zero_grads();
        let ls = gpu_model.loss_and_grads(ctx, &TOKENS[..5], 0.25, &mut short).unwrap();
        let lsc = model.loss_and_grads(&TOKENS[..5], 0.25, &mut short_cpu, &mut TrainState::default()).unwrap();
        assert!((ls.sum - lsc.sum).abs() <= BOUND * lsc.sum.abs());
        let ds = worst_grad_dev(&short, &short_cpu);
        assert!(ds <= BOUND, "{name}: short sequence gradients {ds:e}");
        worst = worst.max(dl).max(dg).max(ds);
    }
    eprintln!("worst GPU vs CPU deviation: {worst:.2e} (bound {BOUND:.0e})");
}

#[test]
fn gpu_steps_match_cpu_steps_and_the_gpu_forward_sees_the_update() {
    let Some(ctx) = ctx() else { return };
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        let mut cpu_model = tiny_model(Some(Scheme::nf4(32, true)), true, 5);
        let mut gpu_host = tiny_model(Some(Scheme::nf4(32, true)), true, 5);
        let mut cfg = OptimizerConfig::new(kind, 0.01);
        cfg.lora_plus_ratio = 4.0;
        let mut cpu_tr = Trainer::new(&cpu_model, cfg).unwrap();
        let mut gpu_tr = Trainer::new(&gpu_host, cfg).unwrap();
        let mut gpu = GpuModel::upload(ctx, &gpu_host, 32, 13).unwrap();
        let batch: [&[u32]; 2] = [&TOKENS[..9], &TOKENS[4..]];
        for step in 0..3 {
            let rc = cpu_tr.step(&mut cpu_model, &batch).unwrap();
            let rg = gpu_tr.step_gpu(ctx, &mut gpu, &mut gpu_host, &batch).unwrap();
            assert_eq!((rg.predicted, rg.tokens, rg.stats.step), (rc.predicted, rc.tokens, rc.stats.step));
            assert!((rg.loss - rc.loss).abs() <= BOUND * rc.loss, "{kind:?} step {step}: {} vs {}", rg.loss, rc.loss);
            let dg = worst_grad_dev(gpu_tr.grads(), cpu_tr.grads());
            assert!(dg <= BOUND, "{kind:?} step {step}: gradients {dg:e}");
        }
        // The adapters moved alike (AdamW normalises the step: compare with its learning rate's scale).
        let (hc, hg) = (cpu_model.adapter_modules(), gpu_host.adapter_modules());
        let mut dev = 0f32;
        for ((_, a), (_, b)) in hc.iter().zip(&hg) {
            for (x, y) in a.a().iter().chain(a.b()).zip(b.a().iter().chain(b.b())) {
                dev = dev.max((x - y).abs());
            }
        }
        eprintln!("{kind:?}: adapters after 3 steps differ by {dev:.2e}");
        assert!(dev <= 1e-4, "{kind:?}: adapters after 3 steps differ by {dev}");
        // The GPU layers hold the updated adapters: its forward equals the CPU forward of the host model.
        let mut cpu_logits = vec![0.0; TOKENS.len() * 300];
        let mut st = gpu_host.new_state(32).unwrap();
        gpu_host.forward(&TOKENS, &mut st, Logits::All, &mut cpu_logits).unwrap();
        let mut gpu_logits = vec![0.0; TOKENS.len() * 300];
        gpu.reset();
        gpu.forward(ctx, &TOKENS, Logits::All, &mut gpu_logits).unwrap();
        let d = rel_dev(&gpu_logits, &cpu_logits);
        assert!(d <= BOUND, "{kind:?}: GPU forward after write_adapters deviates by {d:e}");
    }
}

#[test]
fn gpu_training_lowers_the_loss() {
    let Some(ctx) = ctx() else { return };
    let mut model = tiny_model(Some(Scheme::nf4(32, true)), true, 8);
    let mut trainer = Trainer::new(&model, OptimizerConfig::new(OptimizerKind::AdamW, 0.01)).unwrap();
    let mut gpu = GpuModel::upload(ctx, &model, 16, 1).unwrap();
    let batch: [&[u32]; 1] = [&TOKENS];
    let first = trainer.step_gpu(ctx, &mut gpu, &mut model, &batch).unwrap().loss;
    let mut last = first;
    for _ in 0..20 {
        last = trainer.step_gpu(ctx, &mut gpu, &mut model, &batch).unwrap().loss;
    }
    eprintln!("GPU AdamW, 21 steps: loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn gpu_training_errors_change_nothing() {
    let Some(ctx) = ctx() else { return };
    let model = tiny_model(Some(Scheme::nf4(32, true)), true, 3);
    let mut gpu = GpuModel::upload(ctx, &model, 8, 2).unwrap();
    let mut g = model.zero_grads();
    let too_long = [1u32; 9];
    for (tokens, what) in [(&[1u32][..], "one token"), (&too_long[..], "past capacity"), (&[1, 300][..], "id ≥ vocab")]
    {
        let e = gpu.loss_and_grads(ctx, tokens, 1.0, &mut g).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{what}: {e}");
    }
    assert!(matches!(gpu.loss_and_grads(ctx, &[1, 2], f32::NAN, &mut g), Err(Error::Invalid(_))));
    let mut wrong = model.zero_grads();
    wrong.blocks.pop();
    assert!(matches!(gpu.loss_and_grads(ctx, &[1, 2, 3], 1.0, &mut wrong), Err(Error::Invalid(_))));
    assert!(g.blocks.iter().flatten().flatten().all(|a| a.a.iter().chain(&a.b).all(|v| *v == 0.0)));
    // A model with other adapters cannot be written into this one.
    let bare = tiny_model(Some(Scheme::nf4(32, true)), false, 3);
    assert!(gpu.write_adapters(ctx, &bare).is_err());
}
