//! Loading a [`Model`] from anything lowbit's `Checkpoint::open` reads: a GGUF (weights dequantized to f32 as
//! `lowbit::ggml` defines, Q/K un-permuted to Hugging Face's layout), a Hugging Face directory or file (dense,
//! bitsandbytes 4-bit, lowbit int8), or a directory written by `lowbit quantize`; optionally quantizing the
//! decoder's linear layers on load, and attaching PEFT LoRA adapters.

use crate::linear::{DenseLinear, Linear};
use crate::model::{Block, LmHead};
use crate::{Config, Error, Model, Result};
use lowbit::io::peft::PeftAdapter;
use lowbit::io::Checkpoint;
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::Scheme;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// How the decoder's linear layers are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// As the checkpoint stores them: quantized layers stay quantized (bitsandbytes, lowbit int8); dense and
    /// GGUF weights are dense f32.
    #[default]
    AsStored,
    /// Quantized on load with this scheme (dense / GGUF sources only).
    Quantize(Scheme),
}

/// What [`Model::load`] does besides reading the weights.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub weights: WeightMode,
    /// PEFT adapter directories, attached under their directory names (all enabled).
    pub adapters: Vec<PathBuf>,
    /// Quantize the output projection (`lm_head`, or a copy of the embedding when they are tied) with this
    /// scheme. `None` (the default) keeps it as stored: dense f32 for tied weights, which is what
    /// transformers and bitsandbytes run, and the largest single read of a decode step (vocab × hidden × 4
    /// bytes). llama.cpp runs its GGUF's `token_embd` type here (Q8_0 in SmolLM2's Q4_1 file), so
    /// `int8:channel` is the comparable choice for speed.
    pub lm_head: Option<Scheme>,
}

impl Model {
    /// Loads the model at `path` (see the module notes). Errors name the tensor or file at fault: a missing
    /// `config.json` / GGUF metadata, an unsupported architecture, a missing or misshapen tensor, `--scheme` on
    /// an already quantized checkpoint, an adapter module that is not one of the model's linear layers.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let ck = Checkpoint::open(path)?;
        let json = ck.config().ok_or_else(|| {
            Error::Model(format!(
                "{}: no config (a model directory needs config.json; a GGUF needs llama-family metadata)",
                path.display()
            ))
        })?;
        let config = Config::from_json(json)?;
        let quantized: BTreeSet<String> = ck.layer_names().into_iter().collect();
        if !quantized.is_empty() && matches!(opts.weights, WeightMode::Quantize(_)) {
            return Err(Error::Invalid(format!(
                "{} is already quantized ({} layers); --scheme applies to dense or GGUF models",
                path.display(),
                quantized.len()
            )));
        }
        let has = |name: &str| ck.tensor_info(name).is_ok();
        let dense = |name: &str| -> Result<Vec<f32>> { Ok(ck.tensor_f32(name)?) };
        let linear = |name: &str| -> Result<Linear> {
            if quantized.contains(name) {
                return Ok(Linear::Quant(Box::new(ck.layer(name)?)));
            }
            let wname = format!("{name}.weight");
            let info = ck.tensor_info(&wname)?;
            let shape = info.shape.clone();
            if shape.len() != 2 {
                return Err(Error::Model(format!("{wname} has shape {shape:?}, expected 2 dimensions")));
            }
            let w = dense(&wname)?;
            let bname = format!("{name}.bias");
            let bias = if has(&bname) { Some(dense(&bname)?) } else { None };
            match opts.weights {
                WeightMode::AsStored => Ok(Linear::Dense(DenseLinear::new(w, shape[0], shape[1], bias)?)),
                WeightMode::Quantize(scheme) => {
                    let q = QuantWeight::quantize(&w, &shape, scheme)
                        .map_err(|e| Error::Model(format!("quantizing {wname} as {scheme}: {e}")))?;
                    Ok(Linear::Quant(Box::new(QuantLinear::new(q, bias)?)))
                }
            }
        };
        let block = |i: usize| -> Result<Block> {
            let p = format!("model.layers.{i}");
            Ok(Block {
                attn_norm: dense(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"))?,
                k: linear(&format!("{p}.self_attn.k_proj"))?,
                v: linear(&format!("{p}.self_attn.v_proj"))?,
                o: linear(&format!("{p}.self_attn.o_proj"))?,
                mlp_norm: dense(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"))?,
                up: linear(&format!("{p}.mlp.up_proj"))?,
                down: linear(&format!("{p}.mlp.down_proj"))?,
            })
        };
        // Layers in parallel (each quantizes its own weights); memory peaks at a few layers' f32 copies.
        let blocks: Vec<Block> = (0..config.num_hidden_layers).into_par_iter().map(block).collect::<Result<_>>()?;
        let embed = dense("model.embed_tokens.weight")?;
        let norm = dense("model.norm.weight")?;
        let own = !config.tie_word_embeddings && (has("lm_head.weight") || quantized.contains("lm_head"));
        // By default the output projection stays as stored (dense f32 or the checkpoint's quantization):
        // quantizing it costs the most quality per byte saved, as bitsandbytes' default skip list also assumes.
        let lm_head = match (own, opts.lm_head) {
            (true, None) => LmHead::Own(Box::new(load_as_stored(&ck, &quantized, "lm_head")?)),
            (false, None) => LmHead::Tied,
            (true, Some(_)) if quantized.contains("lm_head") => {
                return Err(Error::Invalid(format!(
                    "{}: lm_head is already quantized; --lm-head applies to a dense output projection",
                    path.display()
                )))
            }
            (own, Some(scheme)) => {
                // A tied head is quantized straight from the embedding (no copy of 28M floats).
                let (name, w): (&str, std::borrow::Cow<[f32]>) = if own {
                    ("lm_head.weight", dense("lm_head.weight")?.into())
                } else {
                    ("model.embed_tokens.weight (tied lm_head)", embed.as_slice().into())
                };
                let shape = [config.vocab_size, config.hidden_size];
                if w.len() != shape[0] * shape[1] {
                    return Err(Error::Model(format!(
                        "{name} has {} values, expected {}·{}",
                        w.len(),
                        shape[0],
                        shape[1]
                    )));
                }
                let q = QuantWeight::quantize(&w, &shape, scheme)
                    .map_err(|e| Error::Model(format!("quantizing {name} as {scheme}: {e}")))?;
                LmHead::Own(Box::new(Linear::Quant(Box::new(QuantLinear::new(q, None)?))))
            }
        };
        let mut model = Model::from_parts(config, embed, blocks, norm, lm_head)?;
        for dir in &opts.adapters {
            model.attach_adapter(dir)?;
        }
        Ok(model)
    }

    /// Loads the PEFT adapter in `dir` and attaches it (enabled, named after the directory) to every module
    /// it has weights for. Errors when a module is not one of this model's decoder linear layers.
    pub fn attach_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = PeftAdapter::load(dir)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        for m in adapter.modules() {
            let lora = adapter.lora_adapter(&m.path, &name)?;
            let target = parse_module(&m.path)
                .and_then(|(i, sub)| self.blocks.get_mut(i).and_then(|b| b.linear_mut(sub)))
                .ok_or_else(|| {
                    Error::Model(format!(
                        "adapter {}: module `{}` is not a decoder linear layer of this model (expected model.layers.N.self_attn.{{q,k,v,o}}_proj or model.layers.N.mlp.{{gate,up,down}}_proj)",
                        dir.display(),
                        m.path
                    ))
                })?;
            target.add_adapter(lora)?;
        }
        Ok(())
    }
}

fn load_as_stored(ck: &Checkpoint, quantized: &BTreeSet<String>, name: &str) -> Result<Linear> {
    if quantized.contains(name) {
        return Ok(Linear::Quant(Box::new(ck.layer(name)?)));
    }
    let wname = format!("{name}.weight");
    let info = ck.tensor_info(&wname)?;
    if info.shape.len() != 2 {
        return Err(Error::Model(format!("{wname} has shape {:?}, expected 2 dimensions", info.shape)));
    }
    Ok(Linear::Dense(DenseLinear::new(ck.tensor_f32(&wname)?, info.shape[0], info.shape[1], None)?))
}

/// `model.layers.N.SUB` → `(N, SUB)`.
fn parse_module(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (n, sub) = rest.split_once('.')?;
    Some((n.parse().ok()?, sub))
}
