//! Training through the model on a tiny random Llama (no files): the gradients of `Model::loss_and_grads`
//! are the derivatives of the f64 reference loss, an SGD step moves the adapters by `−lr·grad` (B by LoRA+'s
//! `ratio·lr`), and 50 AdamW steps lower the loss and the perplexity of the text, faster with LoRA+. (AdamW's
//! update rule itself is checked against an f64 reference and torch in `lowbit`'s `optim` tests.)
//!
//! Tolerance of the gradient check (stated, not tuned): the directional derivative `⟨g, δ⟩` of the f32
//! trainer is compared with the central difference `(L(p + δ) − L(p − δ)) / 2` of the f64 reference loss
//! (`lowbit_llm::reference::forward_f64`, every sum in f64), with `δ` the exact half-difference of the two
//! f32 parameter vectors. The central difference's truncation error is `O(|δ|³·L''')`: with `|δ| ≈ 1e-3` of the
//! parameters' scale it is below 1e-6 of `Σ|g·δ|`. The f32 trainer's rounding (sums of at most a few hundred
//! terms, softmax and norms in f32) is below 1e-4 of `Σ|g·δ|` for this model; the bound allows 1e-3·Σ|g·δ|.

mod common;

use common::tiny_model;
use lowbit::optim::{OptimizerConfig, OptimizerKind};
use lowbit::Scheme;
use lowbit_llm::train::{init_adapters, LoraInit, ModelGrads, TrainState, Trainer};
use lowbit_llm::Model;
use lowbit_testkit::Rng;

const TOKENS: [u32; 13] = [5, 17, 250, 3, 99, 17, 5, 42, 280, 7, 7, 131, 64];

/// Mean next-token cross-entropy of `tokens` from the f64 reference forward.
fn loss_f64(model: &Model, tokens: &[u32]) -> f64 {
    let vocab = model.config().vocab_size;
    let logits = lowbit_llm::reference::forward_f64(model, tokens).unwrap();
    let n = tokens.len() - 1;
    let mut sum = 0.0;
    for (i, row) in logits.chunks_exact(vocab).take(n).enumerate() {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        sum += lse - row[tokens[i + 1] as usize];
    }
    sum / n as f64
}

fn grads_of(model: &Model, tokens: &[u32]) -> (f64, ModelGrads) {
    let mut g = model.zero_grads();
    let n = tokens.len() - 1;
    let l = model.loss_and_grads(tokens, 1.0 / n as f32, &mut g, &mut TrainState::default()).unwrap();
    (l.sum / n as f64, g)
}

/// Every adapter value of the model, in `ModelGrads` order (A then B per adapter).
fn params(model: &mut Model) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for b in model.blocks_mut() {
        for l in b.linears_mut() {
            for ad in l.adapters_mut() {
                let (a, bm) = ad.weights_mut();
                out.push(a);
                out.push(bm);
            }
        }
    }
    out
}

fn flat_grads(g: &ModelGrads) -> Vec<f32> {
    g.blocks.iter().flatten().flatten().flat_map(|ag| ag.a.iter().chain(&ag.b).copied()).collect()
}

fn flat_params(model: &mut Model) -> Vec<f32> {
    params(model).into_iter().flat_map(|p| p.to_vec()).collect()
}

fn set_params(model: &mut Model, values: &[f32]) {
    let mut i = 0;
    for p in params(model) {
        p.copy_from_slice(&values[i..i + p.len()]);
        i += p.len();
    }
}

#[test]
fn tiny_model_gradients_are_the_reference_loss_derivatives() {
    for (s, scheme) in [None, Some(Scheme::nf4(64, true)), Some(Scheme::Int8(lowbit::affine::Granularity::PerChannel))]
        .into_iter()
        .enumerate()
    {
        let mut model = tiny_model(scheme, true, 11 + s as u64);
        let (loss, g) = grads_of(&model, &TOKENS);
        let exact = loss_f64(&model, &TOKENS);
        assert!((loss - exact).abs() <= 1e-4 * exact.abs(), "{scheme:?}: loss {loss} vs f64 reference {exact}");
        let g = flat_grads(&g);
        let p0 = flat_params(&mut model);
        assert_eq!(g.len(), p0.len());
        assert!(g.iter().any(|v| *v != 0.0));
        let mut rng = Rng::new(99 + s as u64);
        // Element kind: 0 for A, 1 for B (tensors alternate A, B per adapter).
        let kind: Vec<usize> = tensor_lens(&mut model)
            .into_iter()
            .enumerate()
            .flat_map(|(t, len)| std::iter::repeat_n(t % 2, len))
            .collect();
        // Three random directions over every adapter at once, then one over the A matrices only and one over
        // the B matrices only.
        for trial in 0..5 {
            let d = rng.vec(p0.len(), 1.0);
            let mask: Vec<f32> = kind.iter().map(|&k| if trial < 3 || k == trial - 3 { 1.0 } else { 0.0 }).collect();
            let h = 1e-3f32;
            let plus: Vec<f32> =
                p0.iter().zip(&d).zip(&mask).map(|((p, d), m)| p + h * p.abs().max(0.05) * d * m).collect();
            let minus: Vec<f32> =
                p0.iter().zip(&d).zip(&mask).map(|((p, d), m)| p - h * p.abs().max(0.05) * d * m).collect();
            set_params(&mut model, &plus);
            let lp = loss_f64(&model, &TOKENS);
            set_params(&mut model, &minus);
            let lm = loss_f64(&model, &TOKENS);
            set_params(&mut model, &p0);
            let fd = (lp - lm) / 2.0;
            let (mut an, mut scale) = (0.0f64, 0.0f64);
            for ((&gi, &pp), &pm) in g.iter().zip(&plus).zip(&minus) {
                let delta = (pp as f64 - pm as f64) / 2.0;
                an += gi as f64 * delta;
                scale += (gi as f64 * delta).abs();
            }
            assert!(
                (fd - an).abs() <= 1e-3 * scale + 1e-12,
                "{scheme:?} direction {trial}: finite difference {fd:e}, analytic {an:e}, Σ|g·δ| {scale:e}"
            );
        }
    }
}

fn tensor_lens(model: &mut Model) -> Vec<usize> {
    params(model).into_iter().map(|p| p.len()).collect()
}

#[test]
fn an_sgd_step_moves_every_adapter_by_minus_lr_times_its_gradient() {
    let mut model = tiny_model(Some(Scheme::nf4(32, true)), true, 5);
    let (_, g) = grads_of(&model, &TOKENS);
    let g = flat_grads(&g);
    let before = flat_params(&mut model);
    let (lr, ratio) = (0.05f64, 4.0f64);
    let mut cfg = OptimizerConfig::new(OptimizerKind::Sgd, lr);
    cfg.lora_plus_ratio = ratio;
    let mut trainer = Trainer::new(&model, cfg).unwrap();
    let report = trainer.step(&mut model, &[&TOKENS]).unwrap();
    let after = flat_params(&mut model);
    // The step's gradients are the same computation as above: bit-identical.
    assert_eq!(flat_grads(trainer.grads()), g);
    let lens = tensor_lens(&mut model);
    let mut i = 0;
    for (t, len) in lens.into_iter().enumerate() {
        let lr_t = if t % 2 == 1 { lr * ratio } else { lr } as f32;
        for j in i..i + len {
            let want = before[j] - lr_t * g[j];
            // One multiplication and one subtraction in f32: at most one rounding each.
            let tol = f32::EPSILON * (before[j].abs() + 2.0 * (lr_t * g[j]).abs());
            assert!((after[j] - want).abs() <= tol, "tensor {t} element {}: {} vs {want}", j - i, after[j]);
        }
        i += len;
    }
    assert!(report.loss > 0.0 && report.predicted == TOKENS.len() - 1);
}

#[test]
fn training_lowers_the_loss_and_lora_plus_trains_faster() {
    let run = |ratio: f64| -> (f64, f64) {
        let mut model = tiny_model(Some(Scheme::nf4(64, true)), false, 21);
        let init = LoraInit {
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
            seed: 3,
            name: "default".into(),
        };
        assert_eq!(init_adapters(&mut model, &init).unwrap(), 6);
        let before = loss_f64(&model, &TOKENS);
        let (n1, n2) = ((TOKENS.len() - 1) as f64, (TOKENS.len() - 4) as f64);
        let batch_before = (before * n1 + loss_f64(&model, &TOKENS[3..]) * n2) / (n1 + n2);
        let mut cfg = OptimizerConfig::new(OptimizerKind::AdamW, 5e-3);
        cfg.lora_plus_ratio = ratio;
        let mut trainer = Trainer::new(&model, cfg).unwrap();
        let mut first = None;
        for _ in 0..50 {
            let r = trainer.step(&mut model, &[&TOKENS, &TOKENS[3..]]).unwrap();
            first.get_or_insert(r.loss);
        }
        // B starts at zero: the first step's loss is the base model's (the mean over both sequences' positions).
        let first = first.unwrap();
        assert!((first - batch_before).abs() < 1e-4 * batch_before, "first step loss {first} vs base {batch_before}");
        (before, loss_f64(&model, &TOKENS))
    };
    let (before, lora) = run(1.0);
    let (_, lora_plus) = run(16.0);
    // 50 steps on the fixed text: its loss and its perplexity (exp of the mean next-token loss, from the f64
    // reference forward) fall.
    assert!(lora < 0.9 * before, "LoRA: loss {before} → {lora}");
    assert!(lora.exp() < before.exp(), "LoRA: perplexity {} → {}", before.exp(), lora.exp());
    assert!(lora_plus < lora, "LoRA+ (ratio 16) {lora_plus} vs LoRA {lora} after the same steps");
}

#[test]
fn bad_training_inputs_are_errors() {
    let model = tiny_model(Some(Scheme::nf4(64, false)), true, 1);
    let mut g = model.zero_grads();
    let mut st = TrainState::default();
    assert!(model.loss_and_grads(&[5], 1.0, &mut g, &mut st).is_err());
    assert!(model.loss_and_grads(&[5, 300], 1.0, &mut g, &mut st).is_err());
    assert!(model.loss_and_grads(&[5, 6], f32::NAN, &mut g, &mut st).is_err());
    let mut wrong = lowbit_llm::train::ModelGrads::default();
    assert!(model.loss_and_grads(&[5, 6], 1.0, &mut wrong, &mut st).is_err());
    let long: Vec<u32> = (0..65).collect();
    assert!(model.loss_and_grads(&long, 1.0, &mut g, &mut st).is_err());
    let bare = tiny_model(Some(Scheme::nf4(64, false)), false, 1);
    let e = Trainer::new(&bare, OptimizerConfig::new(OptimizerKind::AdamW, 1e-3)).unwrap_err();
    assert!(e.to_string().contains("no enabled LoRA adapters"), "{e}");
    let mut bare = bare;
    let init = |t: &str| LoraInit {
        targets: vec![t.into()],
        rank: 2,
        alpha: 4.0,
        use_rslora: false,
        seed: 0,
        name: "default".into(),
    };
    assert!(init_adapters(&mut bare, &init("qproj")).is_err());
    assert!(init_adapters(&mut bare, &LoraInit { rank: 0, ..init("q_proj") }).is_err());
}
