//! `lowbit generate`: text generation with lowbit-llm — prompt (or token ids) in, streamed text out, then the
//! prefill and decode speeds; `--logits-out` saves the logits of every prompt position.

use crate::console;
use crate::error::CliError;
use crate::gpu::Device;
use crate::output::check_output;
use lowbit::io::TensorData;
use lowbit_llm::{Logits, Sampler, SamplingOptions, Tokenizer};
use safetensors::Dtype;
use std::path::Path;
use std::time::Instant;

/// What `lowbit generate` was asked to do.
pub struct Generate<'a> {
    pub model: &'a crate::llm::ModelArgs,
    pub prompt: Option<&'a str>,
    pub tokens: Option<&'a [u32]>,
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    pub chat: bool,
    pub logits_out: Option<&'a Path>,
    pub ids_out: Option<&'a Path>,
    pub force: bool,
}

/// Runs the generation; the text goes to stdout as it is produced, then one line each for prefill and decode
/// speed. Stops after `max_tokens` new tokens or at an end-of-sequence token.
pub fn run(g: Generate) -> Result<(), CliError> {
    for out in [g.logits_out, g.ids_out].into_iter().flatten() {
        check_output(&g.model.model, out, g.force)?;
    }
    let sampler = Sampler::new(g.sampling)?;
    let loaded = crate::llm::load(g.model)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let prompt = prompt_ids(tok, &g)?;
    let vocab = model.config().vocab_size;
    let mut runner = crate::llm::Runner::new(model, g.model, prompt.len() + g.max_tokens.max(1), prompt.len())?;
    let t = Instant::now();
    let mut logits = vec![0.0f32; vocab];
    if let Some(out) = g.logits_out {
        let mut all = vec![0.0f32; prompt.len() * vocab];
        runner.forward(&prompt, Logits::All, &mut all)?;
        logits.copy_from_slice(&all[(prompt.len() - 1) * vocab..]);
        let tensors = [("logits".to_string(), TensorData::from_slice(Dtype::F32, vec![prompt.len(), vocab], &all))];
        lowbit::io::write_safetensors(out, &tensors, None, g.force)?;
    } else {
        runner.forward(&prompt, Logits::Last, &mut logits)?;
    }
    let prefill = t.elapsed().as_secs_f64();
    let mut sampler = sampler;
    let eos = tok.eos_ids();
    let mut stream = tok.stream();
    let t = Instant::now();
    let mut generated = 0usize;
    let mut decode_steps = 0usize;
    let mut ids = Vec::with_capacity(g.max_tokens);
    while generated < g.max_tokens {
        let id = sampler.sample(&logits);
        generated += 1;
        ids.push(id);
        if eos.contains(&id) {
            break;
        }
        let piece = stream.push(id)?;
        console::out_raw(&console::escape_text(&piece))?;
        if generated == g.max_tokens {
            break;
        }
        runner.forward(&[id], Logits::Last, &mut logits)?;
        decode_steps += 1;
    }
    let decode = t.elapsed().as_secs_f64();
    console::out_raw(&console::escape_text(&stream.finish()?))?;
    console::out_raw("\n")?;
    if let Some(out) = g.ids_out {
        let json = serde_json::json!({ "prompt": prompt, "generated": ids });
        write_text_atomically(out, &format!("{json}\n"), g.force)?;
    }
    console::line(&format!(
        "prefill: {} tokens in {:.3} s, {:.1} tokens/s",
        prompt.len(),
        prefill,
        prompt.len() as f64 / prefill.max(1e-9)
    ))?;
    console::line(&format!(
        "decode: {} tokens in {:.3} s, {:.1} tokens/s ({})",
        decode_steps,
        decode,
        decode_steps as f64 / decode.max(1e-9),
        match g.model.device {
            Device::Cpu => match rayon::current_num_threads() {
                1 => "CPU, 1 thread".to_string(),
                n => format!("CPU, {n} threads"),
            },
            Device::Gpu => "GPU".to_string(),
        }
    ))?;
    Ok(())
}

/// Writes `text` to `path` through a temporary in the same directory (never a half-written file).
fn write_text_atomically(path: &Path, text: &str, replace: bool) -> Result<(), CliError> {
    use std::io::Write;
    let mut tmp = lowbit::io::atomic::TempFile::create_for(path)?;
    tmp.file()
        .write_all(text.as_bytes())
        .map_err(|e| CliError::new(format!("writing {}: {e}", tmp.path().display())))?;
    tmp.persist(replace)?;
    Ok(())
}

/// The prompt's token ids: `--tokens` as given (checked against the vocabulary), or `--prompt` encoded (in the
/// ChatML template with `--chat`).
fn prompt_ids(tok: &Tokenizer, g: &Generate) -> Result<Vec<u32>, CliError> {
    let ids = match (g.tokens, g.prompt) {
        (Some(t), _) => t.to_vec(),
        (None, Some(p)) if g.chat => tok.encode(&Tokenizer::chat_prompt(&[("user", p)]), true)?,
        (None, Some(p)) => tok.encode(p, true)?,
        (None, None) => return Err(CliError::new("give --prompt TEXT or --tokens ID,ID,...")),
    };
    if ids.is_empty() {
        return Err(CliError::new("the prompt is empty (it encodes to no tokens); give at least one token"));
    }
    Ok(ids)
}
