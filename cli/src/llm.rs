//! Shared by `lowbit generate` and `lowbit perplexity`: loading a model and its tokenizer with lowbit-llm,
//! and the device choice.

use crate::error::CliError;
use crate::gpu::Device;
use lowbit_llm::{LoadOptions, Model, Tokenizer, WeightMode};
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
pub fn load(
    path: &Path,
    scheme: Option<lowbit::Scheme>,
    adapters: &[PathBuf],
    device: Device,
) -> Result<Loaded, CliError> {
    if device == Device::Gpu {
        return Err(CliError::new(
            "--device gpu: the whole-model GPU runtime is not available in this build yet; use --device cpu",
        ));
    }
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
