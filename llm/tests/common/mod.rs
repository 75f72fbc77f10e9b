//! A tiny random Llama-family model for the runtime's tests (no files): 2 layers, hidden 64, 4 heads over 2
//! KV heads of 16, intermediate 96, vocab 300; every projection dense or quantized with a scheme, optionally
//! with a rank-4 LoRA adapter; tied embeddings.
#![allow(dead_code)] // each test file uses its own subset

use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::Scheme;
use lowbit_llm::linear::DenseLinear;
use lowbit_llm::model::{Block, LmHead};
use lowbit_llm::{Config, Linear, Model};
use lowbit_testkit::Rng;

pub fn values(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    rng.vec(n, scale)
}

pub fn tiny_config() -> Config {
    Config {
        model_type: "llama".into(),
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

pub fn tiny_model(scheme: Option<Scheme>, lora: bool, seed: u64) -> Model {
    let c = tiny_config();
    let mut rng = Rng::new(seed);
    let linear = |o: usize, i: usize, rng: &mut Rng| -> Linear {
        let w = values(rng, o * i, 0.5 / (i as f32).sqrt() * 3.0);
        let mut l = match scheme {
            None => Linear::Dense(DenseLinear::new(w, o, i, None).unwrap()),
            Some(s) => {
                Linear::Quant(Box::new(QuantLinear::new(QuantWeight::quantize(&w, &[o, i], s).unwrap(), None).unwrap()))
            }
        };
        if lora {
            let r = 4;
            let ad = LoraAdapter::new("t", r, values(rng, r * i, 0.2), values(rng, o * r, 0.2), 8.0, false).unwrap();
            l.add_adapter(ad).unwrap();
        }
        l
    };
    let (d, q, kv, f) = (c.hidden_size, c.q_width(), c.kv_width(), c.intermediate_size);
    let blocks = (0..c.num_hidden_layers)
        .map(|_| Block {
            attn_norm: (0..d).map(|j| 1.0 + 0.01 * j as f32).collect(),
            q: linear(q, d, &mut rng),
            k: linear(kv, d, &mut rng),
            v: linear(kv, d, &mut rng),
            o: linear(d, q, &mut rng),
            mlp_norm: vec![0.9; d],
            gate: linear(f, d, &mut rng),
            up: linear(f, d, &mut rng),
            down: linear(d, f, &mut rng),
        })
        .collect();
    let embed = values(&mut rng, c.vocab_size * d, 1.0);
    Model::from_parts(c, embed, blocks, vec![1.0; d], LmHead::Tied).unwrap()
}
