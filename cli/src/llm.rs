//! Shared by `lowbit generate` and `lowbit perplexity`: loading a model and its tokenizer with lowbit-llm,
//! and [`Runner`], the same forward on the CPU or with the whole model resident on the GPU.

use crate::error::CliError;
use crate::gpu::Device;
use lowbit_llm::{LoadOptions, Logits, Model, State, Tokenizer, WeightMode};
use std::path::PathBuf;
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

/// The model options `generate` and `perplexity` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a .gguf file, a Hugging Face model directory (dense, bitsandbytes 4-bit, lowbit int8) or
    /// a directory written by `lowbit quantize`.
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Quantize the decoder's linear layers on load (same values as `quantize --scheme`; lm_head and the
    /// embedding stay as stored unless --lm-head). Without it a GGUF runs its weights as stored, dequantized
    /// to f32.
    #[arg(long, value_parser = crate::parse_scheme, value_name = "SCHEME")]
    pub scheme: Option<lowbit::Scheme>,
    /// Quantize the output projection too (a tied one: a quantized copy of the embedding) with this scheme,
    /// e.g. `int8:channel` (llama.cpp runs SmolLM2's Q8_0 embedding there). Default: as stored (f32 when
    /// tied), what transformers runs; it is the largest read of a decode step.
    #[arg(long = "lm-head", value_parser = crate::parse_scheme, value_name = "SCHEME")]
    pub lm_head: Option<lowbit::Scheme>,
    /// Store the token embedding int8-quantized (`int8:channel`, `int8:group:N`, `int8:tensor`) instead of
    /// f32: a quarter of its memory. A tied lm_head then runs on that same int8 matrix (do not also give
    /// --lm-head). Default: f32, as transformers runs it.
    #[arg(long, value_parser = crate::parse_scheme, value_name = "SCHEME")]
    pub embedding: Option<lowbit::Scheme>,
    /// PEFT LoRA adapter directory; repeatable (all enabled).
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<PathBuf>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Int8 activations in the quantized layers: each layer's input quantized to int8 per block of 32 and
    /// multiplied in integers (AVX-512 VNNI where the CPU has it). Faster, approximate (bound in
    /// docs/formats.md §12); CPU only. Default: f32 activations, exact up to f32 accumulation.
    #[arg(long)]
    pub act8: bool,
}

/// Loads `args.model` (GGUF, Hugging Face directory, lowbit / bitsandbytes quantized directory), quantizing
/// the decoder's linear layers with `--scheme` (and the output projection with `--lm-head`) when given,
/// attaching the adapters. Reports what it loaded on stderr.
pub fn load(args: &ModelArgs) -> Result<Loaded, CliError> {
    let t = Instant::now();
    let (path, scheme) = (args.model.as_path(), args.scheme);
    let weights = scheme.map_or(WeightMode::AsStored, WeightMode::Quantize);
    let opts =
        LoadOptions { weights, adapters: args.adapter.clone(), lm_head: args.lm_head, embedding: args.embedding };
    let mut model = Model::load(path, &opts)?;
    if args.act8 {
        let bytes = model.build_act8_layouts();
        if bytes > 0 {
            eprintln!("int8 activations: interleaved weight layout built ({:.1} MiB)", bytes as f64 / (1 << 20) as f64);
        }
    }
    let tokenizer = Tokenizer::for_model(path)?;
    let c = model.config();
    eprintln!(
        "loaded {} ({} layers, hidden {}, vocab {}; linear layers {}; lm_head {}; embedding {}; {:.1} MiB of weights per token) in {:.2} s",
        crate::console::escape(&path.display().to_string()),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        scheme.map_or("as stored".to_string(), |s| s.to_string()),
        match (args.embedding, c.tie_word_embeddings) {
            (Some(e), true) => format!("{e} (tied)"),
            _ => args.lm_head.map_or("as stored".to_string(), |s| s.to_string()),
        },
        args.embedding.map_or("f32".to_string(), |s| s.to_string()),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(Loaded { model, tokenizer })
}

/// Opens the preferred GPU adapter and uploads `model` to it (KV cache for `capacity` positions, scratch for
/// `max_batch` rows), printing the adapter and the upload time.
#[cfg(feature = "gpu")]
pub fn upload_gpu(
    model: &Model,
    capacity: usize,
    max_batch: usize,
) -> Result<(Box<lowbit::gpu::GpuContext>, Box<lowbit_llm::gpu::GpuModel>), CliError> {
    let ctx = crate::gpu::open()?;
    let t = Instant::now();
    let gpu = lowbit_llm::gpu::GpuModel::upload(&ctx, model, capacity, max_batch)?;
    eprintln!("uploaded to {} in {:.2} s", crate::console::escape(ctx.adapter_name()), t.elapsed().as_secs_f64());
    Ok((Box::new(ctx), Box::new(gpu)))
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
    /// Runs on `args.device`, with int8 activations when `args.act8` (CPU only).
    pub fn new(model: &'m Model, args: &ModelArgs, capacity: usize, max_batch: usize) -> Result<Runner<'m>, CliError> {
        if args.act8 && args.device != Device::Cpu {
            return Err(CliError::new("--act8 runs on the CPU kernels only (drop --act8 or use --device cpu)"));
        }
        match args.device {
            Device::Cpu => {
                let mut state = Box::new(model.new_state(capacity)?);
                if args.act8 {
                    state.set_activations(lowbit::linear::Activations::Int8);
                }
                Ok(Runner::Cpu { model, state })
            }
            #[cfg(feature = "gpu")]
            Device::Gpu => {
                let (ctx, model) = upload_gpu(model, capacity, max_batch)?;
                Ok(Runner::Gpu { ctx, model })
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
