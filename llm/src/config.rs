//! [`Config`]: a Llama-family model's hyper-parameters, read from a Hugging Face `config.json` value (the one
//! in a model directory, or the one lowbit builds from a GGUF's metadata).

use crate::{Error, Result};
use serde_json::Value;

/// The hyper-parameters the runtime needs. Every field is checked for consistency by [`Config::from_json`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `model_type`: `llama`, `qwen2` or `mistral` (the same forward here).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "mistral"];

impl Config {
    /// Reads a `config.json` value. Errors ([`Error::Model`], naming the field) on a missing or non-numeric
    /// size, an unsupported `model_type` or `hidden_act`, RoPE scaling (not implemented: it would silently
    /// change the positions), heads that do not divide the hidden size / each other, or a zero size.
    pub fn from_json(v: &Value) -> Result<Config> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        if !ARCHITECTURES.contains(&model_type.as_str()) {
            return Err(Error::Model(format!(
                "model_type `{model_type}` is not supported (expected one of {})",
                ARCHITECTURES.join(", ")
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::Model(format!("hidden_act `{act}` is not supported (expected `silu`)")));
            }
        }
        if let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("?");
            if kind != "default" {
                return Err(Error::Model(format!(
                    "rope_scaling of type `{kind}` is not implemented (expected none or `default`)"
                )));
            }
        }
        let size = |key: &str| -> Result<usize> {
            let n = v.get(key).and_then(Value::as_u64).ok_or_else(|| {
                Error::Model(format!("config field `{key}` is missing or not a non-negative integer"))
            })?;
            match usize::try_from(n) {
                Ok(n) if n > 0 && n <= 1 << 24 => Ok(n),
                _ => Err(Error::Model(format!("config field `{key}` is {n}, expected 1..=16777216"))),
            }
        };
        let hidden_size = size("hidden_size")?;
        let num_attention_heads = size("num_attention_heads")?;
        let num_key_value_heads = if v.get("num_key_value_heads").is_some_and(|x| !x.is_null()) {
            size("num_key_value_heads")?
        } else {
            num_attention_heads
        };
        let head_dim = match v.get("head_dim") {
            Some(x) if !x.is_null() => size("head_dim")?,
            _ => hidden_size / num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Model(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        if head_dim % 2 != 0 || head_dim == 0 {
            return Err(Error::Model(format!("head_dim {head_dim} must be even (RoPE rotates pairs)")));
        }
        let f = |key: &str, default: f64| -> Result<f64> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| Error::Model(format!("config field `{key}` is {x}, expected a positive number"))),
            }
        };
        let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(id).collect(),
            Some(x) => id(x).into_iter().collect(),
            None => Vec::new(),
        };
        Ok(Config {
            model_type,
            vocab_size: size("vocab_size")?,
            hidden_size,
            intermediate_size: size("intermediate_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f("rms_norm_eps", 1e-6)? as f32,
            rope_theta: f("rope_theta", 10000.0)?,
            max_position_embeddings: if v.get("max_position_embeddings").is_some() {
                size("max_position_embeddings")?
            } else {
                2048
            },
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: v.get("bos_token_id").and_then(id),
            eos_token_ids,
        })
    }

    /// Width of the query projection output, `num_attention_heads · head_dim`.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key / value projection outputs, `num_key_value_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}
