//! The small GPU kernels of a whole-model-resident forward, next to lowbit's [`GpuLinear`](lowbit::gpu::GpuLinear)
//! (which runs the quantized matmuls): [`GpuOps`] records embedding lookup, RMSNorm, RoPE, the KV-cache append,
//! causal grouped-query attention, SwiGLU, the residual add and argmax into a caller's
//! `wgpu::CommandEncoder`. Shaders live in `llm/shaders/*.wgsl`. All math is f32, with Hugging Face Llama
//! conventions (see each `encode_*` method for the exact formula and buffer shapes).
//!
//! # Recording many ops into one submission
//! A token's forward records every layer's ops (30 layers × several ops, each with its own parameters) into
//! ONE encoder and submits once. Nothing per call is written through `queue.write_buffer`: such writes all
//! run at the next submit, before any of its commands, so a uniform rewritten per call would leave every
//! recorded op seeing the last call's parameters. Instead, as in `GpuLinear`:
//! * each distinct (op, parameters) gets its own small uniform buffer, created with its contents and cached
//!   ([`UNIFORM_CACHE_ENTRIES`], least recently used evicted) — never rewritten;
//! * bind groups are cached per (op, uniform, buffers) ([`BIND_GROUP_CACHE_ENTRIES`]), so a decode loop that
//!   reuses its activation buffers creates new groups only for ops whose parameters change per token (the
//!   position `pos0` of RoPE, KV append and attention);
//! * every op is its own compute pass, and commands run in recording order with wgpu's barriers between
//!   passes, so one op's output may be the next op's input.
//!
//! Evicting a cache entry is always safe (recorded commands keep what they use alive). A cached bind group
//! keeps the caller's buffers alive until it is evicted or [`GpuOps::clear_caches`] is called.
//!
//! # Validation
//! Before recording, every call checks (returning [`Error::Invalid`](crate::Error::Invalid), never a GPU
//! validation panic): `STORAGE` usage and sizes of every buffer, that no written buffer is also bound as
//! another argument, parameter ranges (positions inside the cache / RoPE table, head counts, `eps`, `scale`),
//! 32-bit index ranges, and the binding and dispatch limits. Buffer *contents* (ids < vocab, finite values)
//! are the caller's business.
//!
//! # The whole model
//! [`GpuModel`] uploads a [`Model`](crate::Model) once and runs each forward (every layer, the `lm_head` and,
//! for greedy decoding, the argmax) as one submission with one readback.
//!
//! # Training
//! [`GpuModel::loss_and_grads`] runs a training forward and backward of one sequence (activations kept on the
//! GPU, attention probabilities recomputed) in one submission and reads back the loss and the adapter
//! gradients; the training kernels ([`GpuOps::encode_cross_entropy`], [`GpuOps::encode_matmul_nn`] and the
//! backward of RMSNorm, SiLU·mul and attention) live in `ops_backward.rs`, the layers' backward is lowbit's
//! `GpuLinear::encode_backward`. The optimizer runs on the host ([`Trainer::step_gpu`](crate::train::Trainer::step_gpu)),
//! then [`GpuModel::write_adapters`] uploads the updated adapters.
//!
//! # Helpers
//! [`storage_f32`], [`storage_u32`], [`storage_zeroed`] make storage buffers; [`read_f32_blocking`] /
//! [`read_u32_blocking`] read them back (native only). [`RopeTable`] holds the cos / sin tables.

mod buffers;
mod cache;
mod model;
mod ops;
mod ops_backward;
mod rope;
mod train;

#[cfg(not(target_arch = "wasm32"))]
pub use buffers::{read_f32_blocking, read_u32_blocking};
pub use buffers::{storage_f32, storage_u32, storage_zeroed, STORAGE_USAGE};
pub use model::GpuModel;
pub use ops::{
    GpuOps, HeadShape, KvBuffers, ATTN_WG, BIND_GROUP_CACHE_ENTRIES, MAX_HEAD_DIM, UNIFORM_CACHE_ENTRIES, WG,
};
pub use ops_backward::AttentionGradBuffers;
pub use rope::RopeTable;
