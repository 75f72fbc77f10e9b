//! Decode speed of a random-weight model with a real model's shapes, on the CPU and (feature `gpu`) the GPU:
//! no files needed, so it runs where a checkpoint cannot be copied.
//!
//! ```sh
//! cargo run --release -p lowbit-llm --example decode_synthetic                 # SmolLM2-135M shapes
//! SHAPE=llama-1b SCHEME=nf4:64 TOKENS=64 cargo run --release -p lowbit-llm --example decode_synthetic
//! ```
//!
//! Environment: `SHAPE` (`smollm2-135m`, default, or `llama-1b`: Llama-3.2-1B's shapes; both tie the head
//! to the embedding), `SCHEME` (default `nf4:64+dq`), `EMBED` (`f32`, default for SmolLM2, or `int8`:
//! `int8:channel` on the host, the tied head then an int8 layer; Llama-1B's 1 GB f32 table exceeds a GPU
//! binding, so it is always int8), `LAYERS` (override the layer count), `TOKENS` decode steps after a 16-token
//! prefill (default 64), `DEVICES` (`cpu,gpu`, default both). Prints tokens/s per device and the packed bytes each decode step reads. The
//! tokens are not compared across devices (random weights give near-tied logits); `tests/gpu_model.rs` checks
//! the GPU's logits.

use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::Scheme;
use lowbit_llm::model::{Block, LmHead};
use lowbit_llm::{Config, Embedding, Linear, Logits, Model};
use lowbit_testkit::Rng;
use std::time::Instant;

fn config(shape: &str) -> Config {
    let (vocab, hidden, inter, layers, heads, kv) = match shape {
        "llama-1b" => (128_256, 2048, 8192, 16, 32, 8),
        _ => (49_152, 576, 1536, 30, 9, 3),
    };
    let layers = std::env::var("LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(layers);
    Config {
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn main() {
    let shape = std::env::var("SHAPE").unwrap_or_else(|_| "smollm2-135m".into());
    let scheme: Scheme = std::env::var("SCHEME").unwrap_or_else(|_| "nf4:64+dq".into()).parse().expect("SCHEME");
    let tokens: usize = std::env::var("TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let devices = std::env::var("DEVICES").unwrap_or_else(|_| "cpu,gpu".into());
    let c = config(&shape);
    let mut rng = Rng::new(1);
    let mut packed = 0usize;
    let mut linear = |o: usize, i: usize, rng: &mut Rng| -> Linear {
        let w = rng.vec(o * i, 1.5 / (i as f32).sqrt());
        let q = QuantLinear::new(QuantWeight::quantize(&w, &[o, i], scheme).unwrap(), None).unwrap();
        packed += q.weight().packed_bytes();
        Linear::Quant(Box::new(q))
    };
    let t = Instant::now();
    let (d, q, kv, f) = (c.hidden_size, c.q_width(), c.kv_width(), c.intermediate_size);
    let blocks: Vec<Block> = (0..c.num_hidden_layers)
        .map(|_| Block {
            attn_norm: vec![1.0; d],
            q: linear(q, d, &mut rng),
            k: linear(kv, d, &mut rng),
            v: linear(kv, d, &mut rng),
            o: linear(d, q, &mut rng),
            mlp_norm: vec![1.0; d],
            gate: linear(f, d, &mut rng),
            up: linear(f, d, &mut rng),
            down: linear(d, f, &mut rng),
        })
        .collect();
    let int8_embed = std::env::var("EMBED").is_ok_and(|v| v == "int8") || shape == "llama-1b";
    let vocab = c.vocab_size;
    let table = rng.vec(vocab * d, 1.0);
    let (embed, head) = if int8_embed {
        let q = QuantWeight::quantize(&table, &[vocab, d], "int8:channel".parse().unwrap()).unwrap();
        (Embedding::int8(QuantLinear::new(q, None).unwrap()).unwrap(), "int8")
    } else {
        (Embedding::F32(table), "f32")
    };
    let head_bytes = if int8_embed { vocab * (d + 5) } else { vocab * d * 4 };
    let model = Model::from_parts_with_embedding(c, embed, blocks, vec![1.0; d], LmHead::Tied).unwrap();
    println!(
        "{shape} {scheme}, {} layers: built in {:.1} s; a decode step reads {:.1} MB of packed weights + {:.1} MB \
         ({head} tied head)",
        model.config().num_hidden_layers,
        t.elapsed().as_secs_f64(),
        packed as f64 / 1e6,
        head_bytes as f64 / 1e6,
    );
    let prompt: Vec<u32> = (0..16).map(|i| (i * 97 + 5) % vocab as u32).collect();
    if devices.contains("cpu") {
        let mut state = model.new_state(prompt.len() + tokens).unwrap();
        let mut logits = vec![0f32; vocab];
        let t = Instant::now();
        model.forward(&prompt, &mut state, Logits::Last, &mut logits).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..tokens {
            model.forward(&[(i * 31 % vocab) as u32], &mut state, Logits::Last, &mut logits).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "cpu ({} threads): prefill 16 tokens {:.1} ms; decode {:.1} tokens/s ({:.2} ms/token)",
            rayon::current_num_threads(),
            prefill * 1e3,
            tokens as f64 / s,
            s * 1e3 / tokens as f64
        );
    }
    #[cfg(feature = "gpu")]
    if devices.contains("gpu") {
        gpu(&model, &prompt, tokens, vocab);
    }
}

#[cfg(feature = "gpu")]
fn gpu(model: &Model, prompt: &[u32], tokens: usize, vocab: usize) {
    use lowbit::gpu::GpuContext;
    use lowbit_llm::gpu::GpuModel;
    let ctx = match GpuContext::new_blocking() {
        Ok(c) => c,
        Err(e) => return println!("gpu: skipped: no GPU adapter ({e})"),
    };
    let info = ctx.adapter_info();
    let t = Instant::now();
    let mut gm = GpuModel::upload(&ctx, model, prompt.len() + tokens + 1, prompt.len()).unwrap();
    let upload = t.elapsed().as_secs_f64();
    let t = Instant::now();
    gm.forward_greedy(&ctx, prompt).unwrap();
    let prefill = t.elapsed().as_secs_f64();
    // One warm-up step (pipelines of the M = 1 kernels), then the timed steps.
    gm.forward_greedy(&ctx, &[1]).unwrap();
    let t = Instant::now();
    for i in 0..tokens.saturating_sub(1) {
        gm.forward_greedy(&ctx, &[(i * 31 % vocab) as u32]).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    let n = tokens.saturating_sub(1).max(1);
    println!(
        "gpu ({}, {:?}): upload {:.2} s; prefill 16 tokens {:.1} ms (first call: pipelines compiled); decode {:.1} \
         tokens/s ({:.2} ms/token, one submission and one readback each)",
        info.name,
        info.backend,
        upload,
        prefill * 1e3,
        n as f64 / s,
        s * 1e3 / n as f64
    );
}
