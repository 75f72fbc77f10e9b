//! Shared by `lowbit generate` and `lowbit perplexity`: loading a model and its tokenizer with lowbit-llm,
//! and [`Runner`], the same forward on the CPU or with the whole model resident on the GPU.

use crate::error::CliError;
use crate::gpu::Device;
use lowbit_llm::{LoadOptions, Logits, Model, State, Tokenizer, WeightMode};
use std::path::{Path, PathBuf};
use std::time::Instant;

impl From<lowbit_llm::Error> for CliError {
    fn from(e: lowbit_llm::Error) -> CliError {
        CliError::new(e.to_string())
    }
}

/// A loaded model, its tokenizer and how long loading took.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
}

/// Loads `path` (GGUF, Hugging Face directory, lowbit / bitsandbytes quantized directory), quantizing the
/// decoder's linear layers with `scheme` when given, attaching `adapters`. Reports what it loaded on stderr.
pub fn load(path: &Path, scheme: Option<lowbit::Scheme>, adapters: &[PathBuf]) -> Result<Loaded, CliError> {
    let t = Instant::now();
    let weights = scheme.map_or(WeightMode::AsStored, WeightMode::Quantize);
    let model = Model::load(path, &LoadOptions { weights, adapters: adapters.to_vec() })?;
    let tokenizer = Tokenizer::for_model(path)?;
    let c = model.config();
    eprintln!(
        "loaded {} ({} layers, hidden {}, vocab {}; linear layers {}; {:.1} MiB of weights per token) in {:.2} s",
        crate::console::escape(&path.display().to_string()),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        scheme.map_or("as stored".to_string(), |s| s.to_string()),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(Loaded { model, tokenizer })
}

/// Runs forwards of one sequence: on the CPU (a [`State`]: KV cache and buffers) or on the GPU (every weight,
/// the KV cache and the activations resident; one submission and one readback per call).
pub enum Runner<'m> {
    Cpu {
        model: &'m Model,
        state: Box<State>,
    },
    #[cfg(feature = "gpu")]
    Gpu {
        ctx: Box<lowbit::gpu::GpuContext>,
        model: Box<lowbit_llm::gpu::GpuModel>,
    },
}

impl<'m> Runner<'m> {
    /// A runner for sequences of up to `capacity` positions, fed at most `max_batch` tokens per call.
    pub fn new(model: &'m Model, device: Device, capacity: usize, max_batch: usize) -> Result<Runner<'m>, CliError> {
        match device {
            Device::Cpu => Ok(Runner::Cpu { model, state: Box::new(model.new_state(capacity)?) }),
            #[cfg(feature = "gpu")]
            Device::Gpu => {
                let ctx = crate::gpu::open()?;
                let t = Instant::now();
                let gpu = lowbit_llm::gpu::GpuModel::upload(&ctx, model, capacity, max_batch)?;
                eprintln!(
                    "uploaded to {} in {:.2} s",
                    crate::console::escape(ctx.adapter_name()),
                    t.elapsed().as_secs_f64()
                );
                Ok(Runner::Gpu { ctx: Box::new(ctx), model: Box::new(gpu) })
            }
            #[cfg(not(feature = "gpu"))]
            Device::Gpu => {
                let _ = max_batch; // only the GPU runner sizes its buffers by it
                Err(crate::gpu::not_built())
            }
        }
    }

    /// Runs `tokens` after the positions already held; writes the last row's or every row's logits.
    pub fn forward(&mut self, tokens: &[u32], which: Logits, logits: &mut [f32]) -> Result<(), CliError> {
        match self {
            Runner::Cpu { model, state } => Ok(model.forward(tokens, state, which, logits)?),
            #[cfg(feature = "gpu")]
            Runner::Gpu { ctx, model } => Ok(model.forward(ctx, tokens, which, logits)?),
        }
    }

    /// Forgets every position (a new sequence).
    pub fn reset(&mut self) {
        match self {
            Runner::Cpu { state, .. } => state.cache.clear(),
            #[cfg(feature = "gpu")]
            Runner::Gpu { model, .. } => model.reset(),
        }
    }
}
