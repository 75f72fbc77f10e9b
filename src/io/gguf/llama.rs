//! llama-family GGUFs as Hugging Face sees them: tensor names (`blk.N.attn_q.weight` →
//! `model.layers.N.self_attn.q_proj.weight`), the Q/K row permutation llama.cpp's converter applies undone,
//! and a `config.json` built from the metadata.
//!
//! The rules are those of transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`,
//! `integrations/ggml.py`), so that [`HfMapping::tensor_f32`] equals, bit for bit, the tensor transformers
//! puts in the model's state dict when it loads the same GGUF (`from_pretrained(dir, gguf_file=…)`, float32).
//!
//! # Supported architectures ([`Family`])
//! * `llama` (Llama 1–3, SmolLM, TinyLlama, and Mistral 7B, which llama.cpp also writes as `llama`; its config
//!   here says `model_type: llama`, which loads the same weights): Q and K rows (and biases) are un-permuted.
//! * `qwen2`: the same tensor names, no permutation (llama.cpp's converter does not permute Qwen2), q/k/v biases.
//!
//! Any other `general.architecture` is [`Error::Unsupported`]; its tensors stay readable under their GGUF
//! names through [`GgufFile`].
//!
//! # Tensors without a Hugging Face name
//! Names outside the table (e.g. `rope_freqs.weight`, the Llama 3 RoPE frequency factors that Hugging Face
//! recomputes from the config instead of storing) are not served under any Hugging Face name, as transformers
//! drops them; [`HfMapping::unmapped`] lists them so that a caller can report them, and [`GgufFile`] still
//! reads them. A known name in a block past `block_count` is an error. Note that Llama 3.1+ files carry their
//! RoPE scaling only in `rope_freqs.weight`: the config built here has no `rope_scaling` (nor has
//! transformers' GGUF load), which matters only past the original context length.
//!
//! # The config ([`HfMapping::config`])
//! From `{arch}.*` (`arch` = `general.architecture`): `hidden_size` ← `embedding_length`, `num_hidden_layers`
//! ← `block_count`, `intermediate_size` ← `feed_forward_length`, `num_attention_heads` ←
//! `attention.head_count`, `max_position_embeddings` ← `context_length`, `rms_norm_eps` ←
//! `attention.layer_norm_rms_epsilon` (required: a missing one is an [`Error::Format`] naming the key);
//! `num_key_value_heads` ← `attention.head_count_kv` (default: the head count), `rope_theta` ← `rope.freq_base`
//! (default 10000), llama's `head_dim` ← `rope.dimension_count` (default hidden / heads). `vocab_size` is the
//! embedding's row count, which is what the model needs; `{arch}.vocab_size`, where present, must agree
//! (transformers takes `{arch}.vocab_size`, else the number of `tokenizer.ggml.tokens`: the same value in files
//! llama.cpp's converter writes, which pads the token list to the embedding). `tie_word_embeddings` is true when there is no `output.weight`;
//! `bos/eos/pad/unk_token_id` come from `tokenizer.ggml.*_token_id` when present; `hidden_act` is `silu`.
//! Floats stored as f32 are widened exactly (`1e-5f32` becomes `9.999999747378752e-06`, as in transformers).
//!
//! # Where this differs from transformers (documented, deliberate)
//! * A file without `{arch}.attention.head_count_kv` uses `head_count` (no grouped-query attention), as llama.cpp
//!   does; transformers then skips the un-permutation altogether, which gives wrong Q/K rows.
//! * `attention_bias` / `mlp_bias` (llama) are `true` when the file has such biases, so the biases are loaded
//!   rather than dropped.
//! * `architectures` is set (`["LlamaForCausalLM"]`); transformers' `AutoConfig` leaves it unset.
//! * `rope_theta` is written both at the top level and in `rope_parameters` (`rope_type: default`), which
//!   transformers 4.x and 5.x both read. RoPE scaling keys (`{arch}.rope.scaling.*`) are not translated (nor
//!   does transformers translate them for llama).

use crate::format::ggml::GgmlType;
use crate::io::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The llama-family layouts lowbit maps to Hugging Face names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `general.architecture = llama`: `LlamaForCausalLM`, Q/K rows permuted by llama.cpp's converter.
    Llama,
    /// `general.architecture = qwen2`: `Qwen2ForCausalLM`, no permutation.
    Qwen2,
}

impl Family {
    /// The family of a `general.architecture` value, or `None` when lowbit does not map it.
    pub fn from_architecture(arch: &str) -> Option<Family> {
        match arch {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }

    /// The GGUF architecture name, which is also the prefix of its metadata keys (`llama.block_count`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }

    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        self.architecture()
    }

    /// Hugging Face's model class (`architectures[0]` of the config).
    pub fn model_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether llama.cpp's converter permuted the Q and K rows of this family.
    pub fn permutes_qk(self) -> bool {
        self == Family::Llama
    }
}

/// The architectures [`Family::from_architecture`] accepts, for messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2";

/// Per-block tensors: GGUF base name → Hugging Face module path under `model.layers.N.`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Whole-model tensors: GGUF base name → Hugging Face module path.
const MODEL_NAMES: &[(&str, &str)] =
    &[("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// Which row permutation a tensor's rows carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permuted {
    No,
    /// Query rows: permuted per attention head.
    Q,
    /// Key rows: permuted per key/value head.
    K,
}

/// The Hugging Face name of GGUF tensor `gguf_name` (`.weight` or `.bias` of a name in the table above), with
/// its block index if it is a per-block tensor; `None` for a name outside the table.
pub fn hf_name(gguf_name: &str) -> Option<(String, Option<usize>)> {
    hf_name_inner(gguf_name).map(|(n, b, _)| (n, b))
}

fn hf_name_inner(gguf_name: &str) -> Option<(String, Option<usize>, Permuted)> {
    let (base, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some(rest) = base.strip_prefix("blk.") {
        let (n, part) = rest.split_once('.')?;
        // Canonical decimal only (`blk.01` is not a name the converter writes).
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
            return None;
        }
        let block: usize = n.parse().ok()?;
        let (_, hf) = BLOCK_NAMES.iter().find(|(g, _)| *g == part)?;
        let permuted = match part {
            "attn_q" => Permuted::Q,
            "attn_k" => Permuted::K,
            _ => Permuted::No,
        };
        return Some((format!("model.layers.{block}.{hf}.{suffix}"), Some(block), permuted));
    }
    let (_, hf) = MODEL_NAMES.iter().find(|(g, _)| *g == base)?;
    Some((format!("{hf}.{suffix}"), None, Permuted::No))
}

/// Undoes llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py`'s `permute(w, n_head, n_head_kv)`) on
/// `data`, a row-major tensor of rows of `row_len` elements (a weight `[rows, in]`, or a bias with
/// `row_len = 1`), as transformers' `_reverse_permute_weights` does: viewing the rows as
/// `[n_head, 2, rows / n_head / 2]`, Hugging Face row `h·2d + i·d + j` is stored row `h·2d + 2j + i`
/// (`d = rows / n_head / 2`, `i ∈ {0, 1}`). Pass the query head count for Q and the key/value head count for K.
///
/// Errors: `n_head` or `row_len` zero, `data.len()` not a multiple of `row_len`, or the row count not a
/// multiple of `2·n_head`.
pub fn unpermute_rows<T: Copy>(data: &[T], row_len: usize, n_head: usize) -> Result<Vec<T>> {
    if n_head == 0 {
        return Err(Error::invalid("n_head", 0, "at least one attention head"));
    }
    if row_len == 0 || !data.len().is_multiple_of(row_len) {
        return Err(Error::invalid(
            "row_len",
            row_len,
            format!("a positive divisor of the data length {}", data.len()),
        ));
    }
    let rows = data.len() / row_len;
    // `n_head` may come from a file: no overflow (a product past usize divides no row count anyway).
    if !n_head.checked_mul(2).is_some_and(|pair| rows.is_multiple_of(pair)) {
        return Err(Error::invalid(
            "rows",
            rows,
            format!("a multiple of 2 × n_head = 2 × {n_head} (pairs of rows per head)"),
        ));
    }
    let d = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d {
                let src = h * 2 * d + 2 * j + i;
                out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

/// One tensor of a llama-family GGUF under its Hugging Face name.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// The Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub hf_name: String,
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub gguf_name: String,
    /// Row-major shape, the same in both (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// How it is stored.
    pub ggml_type: GgmlType,
    /// `Some(heads)` when its rows are stored permuted (llama Q: attention heads, K: key/value heads) and
    /// [`HfMapping::tensor_f32`] un-permutes them; `None` when the stored order is Hugging Face's.
    pub unpermute_heads: Option<usize>,
}

impl HfTensor {
    /// Whether the stored bytes are exactly the Hugging Face tensor (F32, F16 or BF16, not permuted), so a
    /// view of them can be served without decoding.
    pub fn is_plain_view(&self) -> bool {
        self.unpermute_heads.is_none() && matches!(self.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

/// A llama-family GGUF's tensors under Hugging Face names, and its Hugging Face `config.json`. Built from the
/// header only (nothing is decoded); [`tensor_f32`](Self::tensor_f32) decodes one tensor on demand.
#[derive(Clone, Debug, PartialEq)]
pub struct HfMapping {
    family: Family,
    tensors: BTreeMap<String, HfTensor>,
    unmapped: Vec<String>,
    config: Value,
}

impl HfMapping {
    /// The mapping of `gguf` (see [`from_parts`](Self::from_parts)).
    pub fn new(gguf: &GgufFile) -> Result<HfMapping> {
        HfMapping::from_parts(gguf.metadata(), gguf.tensors())
    }

    /// The mapping of a GGUF with these metadata and tensor infos.
    ///
    /// Errors: no `general.architecture` or a required `{arch}.*` key missing or of the wrong type
    /// ([`Error::Format`] naming the key); an architecture outside [`SUPPORTED_ARCHITECTURES`]
    /// ([`Error::Unsupported`]); inconsistent values (zero heads, heads not a multiple of key/value heads, a
    /// Q/K row count not a multiple of twice its heads, a block index past `block_count`, no `token_embd.weight`
    /// of shape `[vocab, embedding_length]`, an `{arch}.vocab_size` other than its row count).
    pub fn from_parts(metadata: &BTreeMap<String, GgufValue>, tensors: &[GgufTensorInfo]) -> Result<HfMapping> {
        let arch = match metadata.get("general.architecture") {
            Some(GgufValue::String(s)) => s.as_str(),
            Some(other) => {
                return Err(Error::format(
                    "GGUF metadata `general.architecture`",
                    format!("{}, expected a string such as \"llama\"", type_name(other)),
                ))
            }
            None => {
                return Err(Error::format(
                    "GGUF metadata",
                    "no `general.architecture` key; expected the model architecture (e.g. \"llama\")",
                ))
            }
        };
        let family = Family::from_architecture(arch).ok_or_else(|| Error::Unsupported {
            what: format!(
                "GGUF architecture `{arch}` as a Hugging Face checkpoint (lowbit maps {SUPPORTED_ARCHITECTURES}); \
                 its tensors can still be read by their GGUF names with lowbit::io::gguf::GgufFile"
            ),
        })?;
        let params = Params::read(family, metadata)?;

        let mut mapped = BTreeMap::new();
        let mut unmapped = Vec::new();
        for t in tensors {
            let Some((hf, block, permuted)) = hf_name_inner(&t.name) else {
                unmapped.push(t.name.clone());
                continue;
            };
            let ctx = || format!("GGUF tensor `{}`", t.name);
            if let Some(b) = block {
                if b >= params.block_count {
                    return Err(Error::format(
                        ctx(),
                        format!(
                            "block {b}, expected below {}.block_count = {}",
                            family.architecture(),
                            params.block_count
                        ),
                    ));
                }
            }
            let heads = match (family.permutes_qk(), permuted) {
                (true, Permuted::Q) => Some(params.n_head),
                (true, Permuted::K) => Some(params.n_head_kv),
                _ => None,
            };
            if let Some(h) = heads {
                let rows = t.shape.first().copied().unwrap_or(0);
                if t.shape.is_empty()
                    || t.shape.len() > 2
                    || !h.checked_mul(2).is_some_and(|pair| rows.is_multiple_of(pair))
                {
                    return Err(Error::format(
                        ctx(),
                        format!(
                            "shape {:?}, expected [rows] or [rows, in] with rows a multiple of 2 × {h} heads (to undo \
                             llama.cpp's Q/K row permutation)",
                            t.shape
                        ),
                    ));
                }
            }
            let entry = HfTensor {
                hf_name: hf.clone(),
                gguf_name: t.name.clone(),
                shape: t.shape.clone(),
                ggml_type: t.ggml_type,
                unpermute_heads: heads,
            };
            if let Some(prev) = mapped.insert(hf.clone(), entry) {
                return Err(Error::format(
                    ctx(),
                    format!("maps to `{hf}`, as does `{}`; expected each tensor once", prev.gguf_name),
                ));
            }
        }

        let embed = mapped.get("model.embed_tokens.weight").ok_or_else(|| {
            Error::format(
                "GGUF tensors",
                "no `token_embd.weight`; expected the token embedding of a llama-family model",
            )
        })?;
        let embed_rows = match embed.shape.as_slice() {
            [rows, cols] if *cols == params.hidden => *rows,
            s => {
                return Err(Error::format(
                    "GGUF tensor `token_embd.weight`",
                    format!(
                        "shape {s:?}, expected [vocab, {}] ({}.embedding_length)",
                        params.hidden,
                        family.architecture()
                    ),
                ))
            }
        };
        let vocab_key = format!("{}.vocab_size", family.architecture());
        if let Some(v) = uint(metadata, &vocab_key)? {
            if v != embed_rows as u64 {
                return Err(Error::format(
                    format!("GGUF metadata `{vocab_key}`"),
                    format!("{v}, but `token_embd.weight` has {embed_rows} rows; expected the same"),
                ));
            }
        }
        let vocab = embed_rows;
        let tied = !mapped.contains_key("lm_head.weight");
        let has_bias = |prefix: &str| mapped.keys().any(|k| k.contains(prefix) && k.ends_with(".bias"));
        let config = params.config(family, metadata, vocab, tied, has_bias(".self_attn."), has_bias(".mlp."))?;
        Ok(HfMapping { family, tensors: mapped, unmapped, config })
    }

    /// The architecture family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The Hugging Face `config.json` (see the module docs for the fields).
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Every mapped tensor, by Hugging Face name (sorted).
    pub fn tensors(&self) -> &BTreeMap<String, HfTensor> {
        &self.tensors
    }

    /// The tensor with Hugging Face name `hf_name`.
    pub fn get(&self, hf_name: &str) -> Option<&HfTensor> {
        self.tensors.get(hf_name)
    }

    /// GGUF tensors with no Hugging Face name (not served; see the module docs), in file order.
    pub fn unmapped(&self) -> &[String] {
        &self.unmapped
    }

    /// Tensor `hf_name` of `gguf` (the file this mapping was built from) decoded to f32, rows un-permuted where
    /// llama.cpp permuted them: the tensor transformers loads, bit for bit.
    ///
    /// Errors: an unknown name ([`Error::InvalidArgument`]), or what [`GgufFile::tensor_f32`] reports.
    pub fn tensor_f32(&self, gguf: &GgufFile, hf_name: &str) -> Result<Vec<f32>> {
        let t = self.get(hf_name).ok_or_else(|| {
            Error::invalid("tensor name", format!("{hf_name:?}"), "a Hugging Face name of a mapped GGUF tensor")
        })?;
        let data = gguf.tensor_f32(&t.gguf_name)?;
        match t.unpermute_heads {
            None => Ok(data),
            Some(heads) => {
                let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                unpermute_rows(&data, row_len, heads)
                    .map_err(|e| Error::format(format!("GGUF tensor `{}`", t.gguf_name), e.to_string()))
            }
        }
    }
}

/// The model hyper-parameters read from `{arch}.*`.
struct Params {
    block_count: usize,
    hidden: usize,
    n_head: usize,
    n_head_kv: usize,
}

impl Params {
    fn read(family: Family, meta: &BTreeMap<String, GgufValue>) -> Result<Params> {
        let arch = family.architecture();
        let hidden = positive(meta, &format!("{arch}.embedding_length"))?;
        let block_count = positive(meta, &format!("{arch}.block_count"))?;
        let n_head = positive(meta, &format!("{arch}.attention.head_count"))?;
        let kv_key = format!("{arch}.attention.head_count_kv");
        let n_head_kv = match uint(meta, &kv_key)? {
            None => n_head,
            Some(0) => return Err(Error::format(format!("GGUF metadata `{kv_key}`"), "0, expected at least 1")),
            Some(v) => to_usize(&kv_key, v)?,
        };
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(Error::format(
                format!("GGUF metadata `{kv_key}`"),
                format!("{n_head_kv}, expected a divisor of {arch}.attention.head_count = {n_head}"),
            ));
        }
        Ok(Params { block_count, hidden, n_head, n_head_kv })
    }

    fn config(
        &self,
        family: Family,
        meta: &BTreeMap<String, GgufValue>,
        vocab: usize,
        tied: bool,
        attention_bias: bool,
        mlp_bias: bool,
    ) -> Result<Value> {
        let arch = family.architecture();
        let key = |k: &str| format!("{arch}.{k}");
        let intermediate = positive(meta, &key("feed_forward_length"))?;
        let context = positive(meta, &key("context_length"))?;
        let eps = float(meta, &key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| missing(&key("attention.layer_norm_rms_epsilon")))?;
        check_positive_float(&key("attention.layer_norm_rms_epsilon"), eps)?;
        // llama.cpp's and transformers' default base.
        let theta = float(meta, &key("rope.freq_base"))?.unwrap_or(10000.0);
        check_positive_float(&key("rope.freq_base"), theta)?;

        let mut c = Map::new();
        c.insert("architectures".into(), json!([family.model_class()]));
        c.insert("model_type".into(), json!(family.model_type()));
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("hidden_size".into(), json!(self.hidden));
        c.insert("intermediate_size".into(), json!(intermediate));
        c.insert("num_hidden_layers".into(), json!(self.block_count));
        c.insert("num_attention_heads".into(), json!(self.n_head));
        c.insert("num_key_value_heads".into(), json!(self.n_head_kv));
        c.insert("max_position_embeddings".into(), json!(context));
        c.insert("rms_norm_eps".into(), json!(eps));
        c.insert("rope_theta".into(), json!(theta));
        c.insert("rope_parameters".into(), json!({"rope_theta": theta, "rope_type": "default"}));
        c.insert("tie_word_embeddings".into(), json!(tied));
        c.insert("hidden_act".into(), json!("silu"));
        if family == Family::Llama {
            // transformers reads llama's head_dim from rope.dimension_count (llama and mistral only).
            let head_dim = match uint(meta, &key("rope.dimension_count"))? {
                Some(0) => {
                    return Err(Error::format(
                        format!("GGUF metadata `{}`", key("rope.dimension_count")),
                        "0, expected the head dimension",
                    ))
                }
                Some(v) => to_usize(&key("rope.dimension_count"), v)?,
                None => self.hidden / self.n_head,
            };
            c.insert("head_dim".into(), json!(head_dim));
            c.insert("attention_bias".into(), json!(attention_bias));
            c.insert("mlp_bias".into(), json!(mlp_bias));
        }
        for (gguf, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
            ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
        ] {
            if let Some(id) = uint(meta, gguf)? {
                c.insert(hf.into(), json!(id));
            }
        }
        Ok(Value::Object(c))
    }
}

fn missing(key: &str) -> Error {
    Error::format("GGUF metadata", format!("no `{key}` key; expected it in a llama-family GGUF"))
}

/// A metadata integer (any integer type, non-negative), `None` when absent.
fn uint(meta: &BTreeMap<String, GgufValue>, key: &str) -> Result<Option<u64>> {
    let v = match meta.get(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let signed = match *v {
        GgufValue::U8(x) => Some(i128::from(x)),
        GgufValue::I8(x) => Some(i128::from(x)),
        GgufValue::U16(x) => Some(i128::from(x)),
        GgufValue::I16(x) => Some(i128::from(x)),
        GgufValue::U32(x) => Some(i128::from(x)),
        GgufValue::I32(x) => Some(i128::from(x)),
        GgufValue::U64(x) => Some(i128::from(x)),
        GgufValue::I64(x) => Some(i128::from(x)),
        _ => None,
    };
    match signed {
        Some(x) if x >= 0 => Ok(Some(x as u64)),
        Some(x) => {
            Err(Error::format(format!("GGUF metadata `{key}`"), format!("{x}, expected a non-negative integer")))
        }
        None => Err(Error::format(
            format!("GGUF metadata `{key}`"),
            format!("{}, expected an unsigned integer", type_name(v)),
        )),
    }
}

fn to_usize(key: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        Error::format(format!("GGUF metadata `{key}`"), format!("{v}, expected a value that fits in usize"))
    })
}

/// A required positive integer.
fn positive(meta: &BTreeMap<String, GgufValue>, key: &str) -> Result<usize> {
    match uint(meta, key)? {
        None => Err(missing(key)),
        Some(0) => Err(Error::format(format!("GGUF metadata `{key}`"), "0, expected a positive integer")),
        Some(v) => to_usize(key, v),
    }
}

/// A metadata float (F32 widened exactly, F64, or an integer), `None` when absent.
fn float(meta: &BTreeMap<String, GgufValue>, key: &str) -> Result<Option<f64>> {
    match meta.get(key) {
        None => Ok(None),
        Some(GgufValue::F32(x)) => Ok(Some(f64::from(*x))),
        Some(GgufValue::F64(x)) => Ok(Some(*x)),
        Some(_) => uint(meta, key).map(|v| v.map(|v| v as f64)).map_err(|_| {
            Error::format(
                format!("GGUF metadata `{key}`"),
                format!("{}, expected a floating-point number", type_name(&meta[key])),
            )
        }),
    }
}

fn check_positive_float(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::format(format!("GGUF metadata `{key}`"), format!("{v}, expected a finite positive number")))
    }
}

fn type_name(v: &GgufValue) -> &'static str {
    match v {
        GgufValue::U8(_) => "a u8",
        GgufValue::I8(_) => "an i8",
        GgufValue::U16(_) => "a u16",
        GgufValue::I16(_) => "an i16",
        GgufValue::U32(_) => "a u32",
        GgufValue::I32(_) => "an i32",
        GgufValue::U64(_) => "a u64",
        GgufValue::I64(_) => "an i64",
        GgufValue::F32(_) => "an f32",
        GgufValue::F64(_) => "an f64",
        GgufValue::Bool(_) => "a bool",
        GgufValue::String(_) => "a string",
        GgufValue::Array(_) => "an array",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, shape: &[usize], ty: GgmlType) -> GgufTensorInfo {
        GgufTensorInfo { name: name.into(), shape: shape.to_vec(), ggml_type: ty, start: 0, len: 0 }
    }

    fn meta(arch: &str) -> BTreeMap<String, GgufValue> {
        let mut m = BTreeMap::new();
        m.insert("general.architecture".into(), GgufValue::String(arch.into()));
        for (k, v) in [
            ("embedding_length", 8u32),
            ("block_count", 1),
            ("feed_forward_length", 16),
            ("context_length", 64),
            ("attention.head_count", 2),
            ("attention.head_count_kv", 1),
        ] {
            m.insert(format!("{arch}.{k}"), GgufValue::U32(v));
        }
        m.insert(format!("{arch}.attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5));
        m.insert("tokenizer.ggml.tokens".into(), GgufValue::Array(vec![GgufValue::String("a".into()); 5]));
        m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
        m
    }

    fn tensors() -> Vec<GgufTensorInfo> {
        vec![
            info("token_embd.weight", &[5, 8], GgmlType::F32),
            info("blk.0.attn_q.weight", &[8, 8], GgmlType::F32),
            info("blk.0.attn_k.weight", &[4, 8], GgmlType::F32),
            info("blk.0.attn_norm.weight", &[8], GgmlType::F32),
            info("rope_freqs.weight", &[2], GgmlType::F32),
        ]
    }

    #[test]
    fn names_map_as_transformers_does() {
        assert_eq!(hf_name("token_embd.weight"), Some(("model.embed_tokens.weight".into(), None)));
        assert_eq!(hf_name("output.weight"), Some(("lm_head.weight".into(), None)));
        assert_eq!(hf_name("output_norm.weight"), Some(("model.norm.weight".into(), None)));
        assert_eq!(
            hf_name("blk.12.attn_output.weight"),
            Some(("model.layers.12.self_attn.o_proj.weight".into(), Some(12)))
        );
        assert_eq!(hf_name("blk.3.attn_q.bias"), Some(("model.layers.3.self_attn.q_proj.bias".into(), Some(3))));
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight"),
            Some(("model.layers.0.post_attention_layernorm.weight".into(), Some(0)))
        );
        for bad in
            ["rope_freqs.weight", "blk.01.attn_q.weight", "blk.x.attn_q.weight", "blk.0.attn_q", "blk..attn_q.weight"]
        {
            assert_eq!(hf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // llama.cpp: w.reshape(n_head, 2, d, cols).swapaxes(1, 2): stored row h·2d + 2j + i holds HF row
        // h·2d + i·d + j. Rows are tagged with their HF index.
        let (n_head, d, cols) = (3usize, 4usize, 2usize);
        let rows = n_head * 2 * d;
        let hf: Vec<u32> = (0..rows * cols).map(|x| x as u32).collect();
        let mut stored = vec![0u32; hf.len()];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..d {
                    let (src, dst) = (h * 2 * d + i * d + j, h * 2 * d + 2 * j + i);
                    stored[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(stored, hf);
        assert_eq!(unpermute_rows(&stored, cols, n_head).unwrap(), hf);
        assert!(unpermute_rows(&stored, cols, 5).is_err());
        assert!(unpermute_rows(&stored, 0, 1).is_err());
        assert!(unpermute_rows(&stored, cols, 0).is_err());
        assert!(unpermute_rows(&stored, cols, usize::MAX).is_err());
    }

    #[test]
    fn mapping_and_config_from_metadata() {
        let m = HfMapping::from_parts(&meta("llama"), &tensors()).unwrap();
        assert_eq!(m.unmapped(), ["rope_freqs.weight"]);
        assert_eq!(m.get("model.layers.0.self_attn.q_proj.weight").unwrap().unpermute_heads, Some(2));
        assert_eq!(m.get("model.layers.0.self_attn.k_proj.weight").unwrap().unpermute_heads, Some(1));
        assert!(m.get("model.layers.0.input_layernorm.weight").unwrap().is_plain_view());
        let c = m.config();
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["vocab_size"], json!(5));
        assert_eq!(c["head_dim"], json!(4));
        assert_eq!(c["num_key_value_heads"], json!(1));
        assert_eq!(c["rms_norm_eps"], json!(f64::from(1e-5f32)));
        assert_eq!(c["rope_theta"], json!(10000.0));
        assert_eq!(c["tie_word_embeddings"], json!(true));
        assert_eq!(c["bos_token_id"], json!(1));
        assert!(c.get("eos_token_id").is_none());

        let q = HfMapping::from_parts(&meta("qwen2"), &tensors()).unwrap();
        assert_eq!(q.get("model.layers.0.self_attn.q_proj.weight").unwrap().unpermute_heads, None);
        assert_eq!(q.config()["architectures"], json!(["Qwen2ForCausalLM"]));
    }

    #[test]
    fn bad_metadata_is_a_clear_error() {
        for key in ["llama.embedding_length", "llama.attention.head_count", "llama.context_length"] {
            let mut m = meta("llama");
            m.remove(key);
            let e = HfMapping::from_parts(&m, &tensors()).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let mut m = meta("llama");
        m.insert("llama.attention.head_count".into(), GgufValue::String("two".into()));
        let e = HfMapping::from_parts(&m, &tensors()).unwrap_err().to_string();
        assert!(e.contains("llama.attention.head_count") && e.contains("a string"), "{e}");
        let mut m = meta("llama");
        for k in ["llama.attention.head_count", "llama.attention.head_count_kv"] {
            m.insert(k.into(), GgufValue::U64(u64::MAX));
        }
        assert!(HfMapping::from_parts(&m, &tensors()).is_err(), "huge head counts: an error, no overflow");
        let e = HfMapping::from_parts(&meta("gpt2"), &tensors()).unwrap_err().to_string();
        assert!(e.contains("gpt2") && e.contains("llama, qwen2"), "{e}");
        let mut t = tensors();
        t.push(info("blk.1.attn_v.weight", &[4, 8], GgmlType::F32));
        let e = HfMapping::from_parts(&meta("llama"), &t).unwrap_err().to_string();
        assert!(e.contains("blk.1.attn_v.weight") && e.contains("block_count"), "{e}");
        let mut t = tensors();
        t[2] = info("blk.0.attn_k.weight", &[3, 8], GgmlType::F32);
        let e = HfMapping::from_parts(&meta("llama"), &t).unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_k.weight"), "{e}");
        let mut m = meta("llama");
        m.insert("llama.vocab_size".into(), GgufValue::U32(6));
        let e = HfMapping::from_parts(&m, &tensors()).unwrap_err().to_string();
        assert!(e.contains("llama.vocab_size") && e.contains("5 rows"), "{e}");
    }
}
