//! Loading a [`Model`] from anything lowbit's `Checkpoint::open` reads: a GGUF (weights dequantized to f32 as
//! `lowbit::ggml` defines, Q/K un-permuted to Hugging Face's layout), a Hugging Face directory or file (dense,
//! bitsandbytes 4-bit, lowbit int8), or a directory written by `lowbit quantize`; optionally quantizing the
//! decoder's linear layers on load, and attaching PEFT LoRA adapters.

use crate::linear::{DenseLinear, Linear};
use crate::model::{Block, LmHead};
use crate::{Config, Embedding, Error, Model, Result};
use lowbit::affine::{AffineParams, AffineTensor, Granularity};
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
    /// Store the token embedding int8-quantized with this scheme (`int8:channel`, `int8:group:N` or
    /// `int8:tensor`) instead of dense f32: a quarter of the memory, rows dequantized on lookup. A tied
    /// `lm_head` then runs on that same int8 matrix (so `lm_head` must stay `None`). The per-channel and
    /// per-group schemes are built a slice of rows at a time (no f32 copy of the whole embedding). `None`
    /// (the default): dense f32, as transformers runs it.
    pub embedding: Option<Scheme>,
}

impl Model {
    /// Loads the model at `path` (see the module notes). Errors name the tensor or file at fault: a missing
    /// `config.json` / GGUF metadata, an unsupported architecture, a missing or misshapen tensor, `--scheme` on
    /// an already quantized checkpoint, an adapter module that is not one of the model's linear layers.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let ck = Checkpoint::open(path)?;
        let loader = ModelLoader::new(&ck, opts, &path.display().to_string())?;
        // Layers in parallel (each quantizes its own weights); memory peaks at a few layers' f32 copies.
        let blocks: Vec<Block> =
            (0..loader.config().num_hidden_layers).into_par_iter().map(|i| loader.block(i)).collect::<Result<_>>()?;
        let mut model = loader.finish(blocks)?;
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
        self.attach_peft(&adapter, &name).map_err(|e| match e {
            Error::Model(m) => Error::Model(format!("adapter {}: {m}", dir.display())),
            e => e,
        })
    }

    /// Attaches an already parsed PEFT adapter (enabled, under `name`) to every module it has weights for;
    /// the model is unchanged when any module fails. Errors when a module is not one of this model's decoder
    /// linear layers or its shapes do not match the layer.
    pub fn attach_peft(&mut self, adapter: &PeftAdapter, name: &str) -> Result<()> {
        // Everything is checked and built first, so that a bad module leaves no adapter half attached.
        let mut pending = Vec::with_capacity(adapter.modules().len());
        for m in adapter.modules() {
            let lora = adapter.lora_adapter(&m.path, name)?;
            let (i, sub) = parse_module(&m.path)
                .filter(|(i, sub)| self.blocks.get(*i).is_some_and(|b| b.linears().iter().any(|(n, _)| n == sub)))
                .ok_or_else(|| {
                    Error::Model(format!(
                        "module `{}` is not a decoder linear layer of this model (expected model.layers.N.self_attn.{{q,k,v,o}}_proj or model.layers.N.mlp.{{gate,up,down}}_proj, N < {})",
                        m.path,
                        self.blocks.len()
                    ))
                })?;
            let layer = self.blocks[i].linears().into_iter().find(|(n, _)| *n == sub).map(|(_, l)| l);
            if let Some(layer) = layer {
                if lora.in_features() != layer.in_features() || lora.out_features() != layer.out_features() {
                    return Err(Error::Model(format!(
                        "module `{}`: the adapter is for a {}×{} layer (out × in), the model's is {}×{}",
                        m.path,
                        lora.out_features(),
                        lora.in_features(),
                        layer.out_features(),
                        layer.in_features()
                    )));
                }
            }
            pending.push((i, sub.to_string(), lora));
        }
        for (i, sub, lora) in pending {
            if let Some(target) = self.blocks[i].linear_mut(&sub) {
                target.add_adapter(lora)?;
            }
        }
        Ok(())
    }
}

/// Builds a [`Model`] from an open [`Checkpoint`] one piece at a time: [`block`](Self::block) for each
/// decoder layer (in any order, from any thread), then [`finish`](Self::finish) for the embedding, final
/// norm and output projection. [`Model::load`] runs the blocks in parallel; a caller that must stay
/// responsive (a browser page) runs them one by one and reports progress between them.
pub struct ModelLoader<'a> {
    ck: &'a Checkpoint,
    opts: &'a LoadOptions,
    source: String,
    config: Config,
    quantized: BTreeSet<String>,
}

impl<'a> ModelLoader<'a> {
    /// Reads the config (from `config.json` or the GGUF's metadata) and checks that `opts` fit the
    /// checkpoint; `source` names it in errors (a path, a file name). Adapters in `opts` are not attached
    /// here ([`Model::load`] does that after `finish`).
    pub fn new(ck: &'a Checkpoint, opts: &'a LoadOptions, source: &str) -> Result<ModelLoader<'a>> {
        let json = ck.config().ok_or_else(|| {
            Error::Model(format!(
                "{source}: no config (a model directory needs config.json; a GGUF needs llama-family metadata)"
            ))
        })?;
        let config = Config::from_json(json)?;
        let quantized: BTreeSet<String> = ck.layer_names().into_iter().collect();
        if !quantized.is_empty() && matches!(opts.weights, WeightMode::Quantize(_)) {
            return Err(Error::Invalid(format!(
                "{source} is already quantized ({} layers); --scheme applies to dense or GGUF models",
                quantized.len()
            )));
        }
        match opts.embedding {
            None | Some(Scheme::Int8(_)) => {}
            Some(s) => {
                return Err(Error::Invalid(format!(
                    "embedding scheme {s}: only int8 schemes (int8:channel, int8:group:N, int8:tensor) are supported for the embedding"
                )))
            }
        }
        if opts.embedding.is_some() && opts.lm_head.is_some() && config.tie_word_embeddings {
            return Err(Error::Invalid(format!(
                "{source}: the lm_head is tied to the embedding, so a quantized embedding is also the lm_head; give the embedding scheme or the lm_head scheme, not both"
            )));
        }
        Ok(ModelLoader { ck, opts, source: source.to_string(), config, quantized })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn has(&self, name: &str) -> bool {
        self.ck.tensor_info(name).is_ok()
    }

    fn dense(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.ck.tensor_f32(name)?)
    }

    fn linear(&self, name: &str) -> Result<Linear> {
        if self.quantized.contains(name) {
            return Ok(Linear::Quant(Box::new(self.ck.layer(name)?)));
        }
        let wname = format!("{name}.weight");
        let info = self.ck.tensor_info(&wname)?;
        let shape = info.shape.clone();
        if shape.len() != 2 {
            return Err(Error::Model(format!("{wname} has shape {shape:?}, expected 2 dimensions")));
        }
        let w = self.dense(&wname)?;
        let bname = format!("{name}.bias");
        let bias = if self.has(&bname) { Some(self.dense(&bname)?) } else { None };
        match self.opts.weights {
            WeightMode::AsStored => Ok(Linear::Dense(DenseLinear::new(w, shape[0], shape[1], bias)?)),
            WeightMode::Quantize(scheme) => {
                let q = QuantWeight::quantize(&w, &shape, scheme)
                    .map_err(|e| Error::Model(format!("quantizing {wname} as {scheme}: {e}")))?;
                Ok(Linear::Quant(Box::new(QuantLinear::new(q, bias)?)))
            }
        }
    }

    /// Decoder layer `i` (`model.layers.i.*`), its linear layers quantized on load when the options say so.
    pub fn block(&self, i: usize) -> Result<Block> {
        if i >= self.config.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "layer {i} does not exist: the model has {} layers",
                self.config.num_hidden_layers
            )));
        }
        let p = format!("model.layers.{i}");
        Ok(Block {
            attn_norm: self.dense(&format!("{p}.input_layernorm.weight"))?,
            q: self.linear(&format!("{p}.self_attn.q_proj"))?,
            k: self.linear(&format!("{p}.self_attn.k_proj"))?,
            v: self.linear(&format!("{p}.self_attn.v_proj"))?,
            o: self.linear(&format!("{p}.self_attn.o_proj"))?,
            mlp_norm: self.dense(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: self.linear(&format!("{p}.mlp.gate_proj"))?,
            up: self.linear(&format!("{p}.mlp.up_proj"))?,
            down: self.linear(&format!("{p}.mlp.down_proj"))?,
        })
    }

    /// The model from its decoder layers (in order, as [`block`](Self::block) built them) plus the
    /// embedding, final norm and output projection read now.
    pub fn finish(self, blocks: Vec<Block>) -> Result<Model> {
        let (ck, opts, config) = (self.ck, self.opts, &self.config);
        if let Some(Scheme::Int8(g)) = opts.embedding {
            let embed = self.int8_embedding(g)?;
            let norm = self.dense("model.norm.weight")?;
            let own = !config.tie_word_embeddings && (self.has("lm_head.weight") || self.quantized.contains("lm_head"));
            let lm_head = match (own, opts.lm_head) {
                (false, _) => LmHead::Tied,
                (true, None) => LmHead::Own(Box::new(load_as_stored(ck, &self.quantized, "lm_head")?)),
                (true, Some(scheme)) => {
                    let w = self.dense("lm_head.weight")?;
                    let q = QuantWeight::quantize(&w, &[config.vocab_size, config.hidden_size], scheme)
                        .map_err(|e| Error::Model(format!("quantizing lm_head.weight as {scheme}: {e}")))?;
                    LmHead::Own(Box::new(Linear::Quant(Box::new(QuantLinear::new(q, None)?))))
                }
            };
            return Model::from_parts_with_embedding(self.config, embed, blocks, norm, lm_head);
        }
        let embed = self.dense("model.embed_tokens.weight")?;
        let norm = self.dense("model.norm.weight")?;
        let own = !config.tie_word_embeddings && (self.has("lm_head.weight") || self.quantized.contains("lm_head"));
        // By default the output projection stays as stored (dense f32 or the checkpoint's quantization):
        // quantizing it costs the most quality per byte saved, as bitsandbytes' default skip list also assumes.
        let lm_head = match (own, opts.lm_head) {
            (true, None) => LmHead::Own(Box::new(load_as_stored(ck, &self.quantized, "lm_head")?)),
            (false, None) => LmHead::Tied,
            (true, Some(_)) if self.quantized.contains("lm_head") => {
                return Err(Error::Invalid(format!(
                    "{}: lm_head is already quantized; --lm-head applies to a dense output projection",
                    self.source
                )))
            }
            (own, Some(scheme)) => {
                // A tied head is quantized straight from the embedding (no copy of 28M floats).
                let (name, w): (&str, std::borrow::Cow<[f32]>) = if own {
                    ("lm_head.weight", self.dense("lm_head.weight")?.into())
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
        Model::from_parts(self.config, embed, blocks, norm, lm_head)
    }
}

impl ModelLoader<'_> {
    /// The embedding quantized to int8 with granularity `g`; row-local granularities a slice of rows at a
    /// time (the codes equal the whole-tensor quantization's: each row's parameters depend on that row only).
    fn int8_embedding(&self, g: Granularity) -> Result<Embedding> {
        const NAME: &str = "model.embed_tokens.weight";
        let (vocab, d) = (self.config.vocab_size, self.config.hidden_size);
        let err = |e: lowbit::Error| Error::Model(format!("quantizing {NAME} as int8:{g}: {e}"));
        let t = if g == Granularity::PerTensor {
            let w = self.dense(NAME)?;
            lowbit::affine::quantize(&w, &[vocab, d], g).map_err(err)?
        } else {
            const ROWS: usize = 1024;
            let mut codes = vec![0u8; vocab * d];
            let per_row = g.num_params(1, d);
            let mut params = vec![AffineParams { scale: 1.0, zero_point: 0 }; vocab * per_row];
            for r0 in (0..vocab).step_by(ROWS) {
                let r1 = (r0 + ROWS).min(vocab);
                let w = self.ck.tensor_rows_f32(NAME, r0..r1)?;
                lowbit::affine::quantize_into(
                    &w,
                    &[r1 - r0, d],
                    g,
                    &mut codes[r0 * d..r1 * d],
                    &mut params[r0 * per_row..r1 * per_row],
                )
                .map_err(err)?;
            }
            let scales = params.iter().map(|p| p.scale).collect();
            let zero_points: Vec<u8> = params.iter().map(|p| p.zero_point).collect();
            AffineTensor::from_parts(vec![vocab, d], g, codes, scales, zero_points).map_err(err)?
        };
        Embedding::int8(QuantLinear::new(QuantWeight::Int8(t), None)?)
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
