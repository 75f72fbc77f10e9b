//! `lowbit perplexity`: perplexity of a model over a text file, in non-overlapping windows of `--ctx` tokens.
//!
//! Method (stated in the output): the text is tokenized without special tokens and cut into consecutive
//! windows of `ctx` tokens (the last one may be shorter; one of a single token is dropped); each window starts
//! from an empty KV cache; every token of a window except its first is scored by the model's probability given
//! the window's earlier tokens; perplexity = exp(mean negative log-likelihood) over all scored tokens, with
//! the log-softmax in f64.

use crate::console;
use crate::error::CliError;
use lowbit_llm::Logits;
use std::path::Path;
use std::time::Instant;

/// Tokens run per forward inside a window (bounds the logits buffer to CHUNK · vocab floats).
const CHUNK: usize = 64;

/// What `lowbit perplexity` was asked to do.
pub struct Perplexity<'a> {
    pub model: &'a crate::llm::ModelArgs,
    pub text: &'a Path,
    pub ctx: usize,
}

/// Prints the method, `perplexity: X` and the tokens/s.
pub fn run(p: Perplexity) -> Result<(), CliError> {
    if p.ctx < 2 {
        return Err(CliError::new(format!("--ctx {}: a window needs at least 2 tokens", p.ctx)));
    }
    let text = read_text(p.text)?;
    let loaded = crate::llm::load(p.model)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let ids = tok.encode(&text, false)?;
    let vocab = model.config().vocab_size;
    let mut runner = crate::llm::Runner::new(model, p.model, p.ctx, CHUNK.min(p.ctx))?;
    let mut logits = vec![0.0f32; CHUNK * vocab];
    let (mut nll, mut scored, mut run) = (0.0f64, 0usize, 0usize);
    let t = Instant::now();
    for window in ids.chunks(p.ctx).filter(|w| w.len() >= 2) {
        runner.reset();
        for (c, chunk) in window.chunks(CHUNK).enumerate() {
            let out = &mut logits[..chunk.len() * vocab];
            runner.forward(chunk, Logits::All, out)?;
            run += chunk.len();
            for (r, row) in out.chunks_exact(vocab).enumerate() {
                let pos = c * CHUNK + r;
                if let Some(&next) = window.get(pos + 1) {
                    nll -= log_softmax_at(row, next as usize);
                    scored += 1;
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if scored == 0 {
        return Err(CliError::new("the text has fewer than 2 tokens: nothing to score"));
    }
    console::line(&format!(
        "{} tokens in windows of {} (non-overlapping, each from an empty cache; the first token of each window is not scored): {} scored",
        ids.len(),
        p.ctx,
        scored
    ))?;
    console::line(&format!("perplexity: {:.4}", (nll / scored as f64).exp()))?;
    console::line(&format!(
        "{:.1} tokens/s ({run} tokens in {secs:.2} s, {} threads)",
        run as f64 / secs.max(1e-9),
        rayon::current_num_threads()
    ))?;
    Ok(())
}

/// Reads a UTF-8 text file of at most 256 MiB (a regular file), with errors naming it.
pub fn read_text(path: &Path) -> Result<String, CliError> {
    let shown = || console::escape(&path.display().to_string());
    let io_err = |e: std::io::Error| CliError::new(format!("reading the text {}: {e}", shown()));
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if !meta.is_file() || meta.len() > 256 << 20 {
        return Err(CliError::new(format!("{}: expected a regular text file of at most 256 MiB", shown())));
    }
    let text = std::fs::read(path).map_err(io_err)?;
    String::from_utf8(text).map_err(|e| CliError::new(format!("{}: not UTF-8 text ({e})", shown())))
}

/// `log softmax(row)[i]` in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
