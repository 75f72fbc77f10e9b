//! `lowbit-llm`: a small Llama-family runtime (Llama, SmolLM2, Qwen2) built only on lowbit's public API.
//!
//! - [`Config`]: the model's hyper-parameters from a Hugging Face `config.json` (or the one lowbit builds
//!   from a GGUF's metadata).
//! - [`Model`]: embeddings, RMSNorm, RoPE (Hugging Face convention), grouped-query attention over a
//!   [`KvCache`], SwiGLU MLP and `lm_head`; every linear layer a [`Linear`]: a lowbit `QuantLinear` of any
//!   scheme or dense f32 weights (the full-precision baseline).
//! - [`Tokenizer`]: the `tokenizers` crate, from `tokenizer.json` or built from a GGUF's vocabulary.
//! - [`Sampler`]: greedy or temperature / top-p sampling with a seed.
//! - [`backward`]: backward passes of the non-linear operations (RMSNorm, RoPE, SiLU·mul, attention,
//!   cross-entropy) for fine-tuning.
//! - `gpu` (feature `gpu`): the whole model resident on the GPU, one submission per token.

pub mod backward;
pub mod config;
pub mod embedding;
pub mod error;
pub mod kv_cache;
pub mod linear;
pub mod load;
pub mod model;
pub mod ops;
pub mod reference;
pub mod sample;
pub mod tokenizer;
pub mod train;

#[cfg(feature = "gpu")]
pub mod gpu;

pub use config::Config;
pub use embedding::Embedding;
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use load::{LoadOptions, ModelLoader, WeightMode};
pub use model::{Logits, Model, State};
pub use sample::{Sampler, SamplingOptions};
pub use tokenizer::Tokenizer;
