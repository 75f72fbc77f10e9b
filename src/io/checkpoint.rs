//! [`Checkpoint`]: one safetensors file, a Hugging Face model directory, a sharded directory or a llama-family
//! GGUF, memory-mapped once, with quantized layers whose packed codes are views of the mapped pages.

use crate::format::ggml::GgmlType;
use crate::io::gguf::llama::HfMapping;
use crate::io::gguf::GgufFile;
use crate::io::source::{bias_f32, bytes_to_f32, Entry, Source};
use crate::io::{bnb, check_header, float_dtype, int8, Limits};
use crate::linear::{QuantLinear, QuantWeight};
use crate::storage::{Bytes, SharedBytes};
use crate::{Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// File name of the weights of an unsharded Hugging Face model directory.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the index of a sharded Hugging Face model directory (`weight_map`: tensor name → shard file).
pub const HF_INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a Hugging Face model configuration (read, size- and depth-checked, if present).
const HF_CONFIG_FILE: &str = "config.json";
/// The first four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Bytes of the safetensors header-length prefix.
const HEADER_LEN_BYTES: usize = 8;
/// How many names an error message lists.
const LIST_MAX: usize = 8;

/// How the linear-layer weights of a checkpoint are stored, detected once when it is opened.
#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// bitsandbytes 4-bit (NF4/FP4, plain or double-quantized scales, [`crate::io::bnb`]): some tensor is a
    /// `W.quant_state.bitsandbytes__*` quant state.
    Bnb4bit,
    /// lowbit's int8 layout ([`crate::io::int8`]): the metadata has `lowbit.scheme = int8`.
    Int8(int8::Int8Layout),
    /// No quantized weights: plain floating tensors ([`Checkpoint::tensor_f32`]).
    Dense,
}

impl Layout {
    /// Detects the layout from the `__metadata__` map and the tensor names: [`Layout::Int8`] when the metadata
    /// says `lowbit.scheme` (an error if its value or fields are malformed), else [`Layout::Bnb4bit`] when any
    /// name is a bitsandbytes quant-state key, else [`Layout::Dense`].
    pub fn detect<'a>(metadata: &HashMap<String, String>, names: impl IntoIterator<Item = &'a str>) -> Result<Layout> {
        if let Some(l) = int8::Int8Layout::from_metadata(metadata)? {
            return Ok(Layout::Int8(l));
        }
        Ok(if bnb::is_bnb_quantized(names) { Layout::Bnb4bit } else { Layout::Dense })
    }

    /// A short human name: `bitsandbytes 4-bit`, `lowbit int8`, `dense`.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Bnb4bit => "bitsandbytes 4-bit",
            Layout::Int8(_) => "lowbit int8",
            Layout::Dense => "dense",
        }
    }
}

/// The quantized weights of `src` under `layout`, sorted.
pub(crate) fn quantized_weights(layout: &Layout, src: &dyn Source) -> Vec<String> {
    match layout {
        Layout::Int8(l) => l.weights.keys().cloned().collect(),
        Layout::Bnb4bit => {
            let mut names: Vec<String> =
                src.names().into_iter().filter_map(bnb::weight_of_quant_state_key).map(str::to_string).collect();
            names.sort();
            names.dedup();
            names
        }
        Layout::Dense => Vec::new(),
    }
}

/// The module paths `P` of the quantized weights named `P.weight`, sorted.
pub(crate) fn layer_paths(weights: &[String]) -> Vec<String> {
    weights.iter().filter_map(|w| w.strip_suffix(".weight")).map(str::to_string).collect()
}

/// Builds the layer at module path `path` of `src`: the quantized weight `{path}.weight` of `layout` and the
/// optional bias `{path}.bias` (the bias rule of [`crate::io::source::bias_entry`]). The one place every
/// loader builds a [`QuantLinear`].
pub(crate) fn load_layer(src: &dyn Source, layout: &Layout, path: &str, limits: &Limits) -> Result<QuantLinear> {
    let weight_name = format!("{path}.weight");
    let weight = match layout {
        Layout::Int8(l) => QuantWeight::Int8(l.load_from(src, &weight_name, limits)?),
        Layout::Bnb4bit => QuantWeight::FourBit(bnb::load_weight_from(src, &weight_name, limits)?),
        Layout::Dense => {
            return Err(Error::Unsupported {
                what: format!("layer `{path}`: a dense checkpoint has no quantized layers (quantize it first)"),
            })
        }
    };
    let out = match *weight.shape() {
        [out, _] => out,
        ref s => {
            return Err(Error::format(
                format!("weight `{weight_name}`"),
                format!("shape {s:?}, expected 2-D [out, in] (a linear layer)"),
            ))
        }
    };
    let bias = bias_f32(src, &format!("{path}.bias"), out, limits)?;
    QuantLinear::new(weight, bias)
}

/// One mapped (or in-memory) safetensors file.
#[derive(Clone)]
struct MappedFile {
    path: PathBuf,
    bytes: SharedBytes,
    /// The map behind `bytes` when lowbit mapped the file itself (for access advice); `None` for bytes from
    /// the caller. Read only where `madvise` exists.
    #[cfg_attr(not(unix), allow(dead_code))]
    map: Option<Arc<memmap2::Mmap>>,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A GGUF opened as a checkpoint: the parsed file and its tensors under Hugging Face names.
struct GgufParts {
    file: GgufFile,
    map: HfMapping,
}

/// The safetensors dtype of a ggml type whose bytes are the same little-endian values.
fn plain_dtype(ty: GgmlType) -> Option<Dtype> {
    match ty {
        GgmlType::F32 => Some(Dtype::F32),
        GgmlType::F16 => Some(Dtype::F16),
        GgmlType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// How one tensor of a [`Checkpoint`] is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    /// A safetensors element type.
    Safetensors(Dtype),
    /// A ggml type (a GGUF checkpoint): read it with [`Checkpoint::tensor_f32`].
    Ggml(crate::format::ggml::GgmlType),
}

/// The type, shape and stored size of one tensor of a [`Checkpoint`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// How it is stored.
    pub stored: StoredType,
    /// Row-major shape, as Hugging Face names it (a GGUF's `ne` reversed).
    pub shape: Vec<usize>,
    /// Bytes in the file.
    pub bytes: usize,
}

/// A quantized (or dense) checkpoint, memory-mapped: the entry point of an inference engine.
///
/// [`open`](Self::open) accepts
/// * a safetensors file;
/// * a Hugging Face model directory holding `model.safetensors` (and usually `config.json`, which is read
///   under the limits and available as [`config`](Self::config));
/// * a sharded directory holding `model.safetensors.index.json` and no `model.safetensors` (its `weight_map`
///   names the shard of every tensor), or the index file itself. Shard names must stay inside the directory (no absolute paths, no
///   `..`, no symlink leading out); a missing shard, a tensor in two shards, or a `weight_map` entry its shard
///   lacks is an error;
/// * a GGUF file (recognised by its `GGUF` magic or a `.gguf` extension) of a llama-family model
///   ([`crate::io::gguf::llama`]: `llama`, `qwen2`). Its tensors appear under Hugging Face names
///   (`model.layers.0.self_attn.q_proj.weight`) with Hugging Face shapes and [`StoredType::Ggml`];
///   [`tensor_f32`](Self::tensor_f32) decodes one (Q/K rows un-permuted), bit-identical to transformers' GGUF
///   load; [`config`](Self::config) is the `config.json` built from the metadata; [`gguf`](Self::gguf) gives
///   the file itself (tokenizer, raw tensors). Its [`layout`](Self::layout) is [`Layout::Dense`] (no lowbit or
///   bitsandbytes layers), and nothing is decoded when it is opened. A tied embedding has no `lm_head.weight`
///   (the config says `tie_word_embeddings: true`), as in a Hugging Face checkpoint of the same model.
///
/// Each file is mapped once and shared (an [`Arc`]) by every layer built from it:
/// [`layer`](Self::layer) returns a [`QuantLinear`] whose packed codes (and int8 codes, double-quantized scale
/// codes) are views of the mapped pages, so opening a checkpoint and building all its layers costs only the
/// decoded f32 block scales (4 bytes per 64 weights at block 64) in memory; the codes are read from the page
/// cache when a forward pass touches them. The layers stay valid after the `Checkpoint` is dropped.
///
/// Layout detection ([`Layout`]), the bias rule (`{P}.bias`, F32/F16/BF16 with one value per output feature,
/// finite) and the [`Limits`] (header and JSON size and depth, tensor bytes) are applied here, before anything
/// proportional to a size declared by a file is allocated. Errors name the file, the tensor and what was
/// expected. Nothing is ever written to the files.
///
/// # Memory mapping
/// A mapped file must not be truncated or rewritten in place while a `Checkpoint` or any layer built from it
/// is alive: reading a page that a truncation removed raises `SIGBUS` (the process dies), and rewritten bytes
/// would be seen by the layers. lowbit cannot detect this; it never writes the files itself. Tools that
/// replace checkpoints by writing a new file and renaming it over the old one (as `lowbit` and the Hugging Face
/// hub client do) are safe: the mapping keeps the old file's pages. Where that guarantee is not available, read
/// the file into memory and use [`from_bytes`](Self::from_bytes).
///
/// ```
/// use lowbit::io::{bnb, write_safetensors, Checkpoint};
/// use lowbit::nf4::quantize_nf4;
///
/// let dir = std::env::temp_dir().join(format!("lowbit-checkpoint-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).map_err(|e| lowbit::Error::io(&dir, e))?;
/// let path = dir.join("model.safetensors");
/// let w: Vec<f32> = (0..32 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
/// let q = quantize_nf4(&w, &[32, 64], 64, true)?;
/// write_safetensors(&path, &bnb::to_tensors("model.layers.0.mlp.up_proj.weight", &q)?, None, true)?;
///
/// let ckpt = Checkpoint::open(&dir)?; // the directory, or the file itself
/// assert_eq!(ckpt.layer_names(), ["model.layers.0.mlp.up_proj"]);
/// let layer = ckpt.layer("model.layers.0.mlp.up_proj")?;
/// assert_eq!((layer.out_features(), layer.in_features()), (32, 64));
/// let y = layer.forward(&vec![0.5f32; 64])?;
/// assert_eq!(y.len(), 32);
/// assert!(ckpt.layer("model.layers.0.mlp.up_proj.weight").is_err()); // the error hints at the module path
/// # drop((ckpt, layer));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), lowbit::Error>(())
/// ```
#[derive(Clone)]
pub struct Checkpoint {
    path: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
    layout: Layout,
    weights: Vec<String>,
    config: Option<serde_json::Value>,
    limits: Limits,
    gguf: Option<Arc<GgufParts>>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .field("layout", &self.layout.name())
            .field("layers", &self.layer_names().len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a safetensors file, a Hugging Face model directory, a sharded directory or a llama-family GGUF
    /// (see the type docs) under [`Limits::DEFAULT`]. Maps every file read-only; validates every header and the
    /// layout.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        Checkpoint::open_with_limits(path, Limits::DEFAULT)
    }

    /// [`open`](Self::open) under explicit limits, which also apply to every later [`layer`](Self::layer)
    /// and [`tensor_f32`](Self::tensor_f32) call.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let config_path = path.join(HF_CONFIG_FILE);
            let config = if config_path.is_file() { Some(read_json_file(&config_path, &limits)?) } else { None };
            // The order `transformers` looks in: the single file first, then the index.
            let single = path.join(HF_WEIGHTS_FILE);
            if single.is_file() {
                let file = map_file(&single)?;
                return Checkpoint::build(path.to_path_buf(), vec![file], config, limits);
            }
            let index = path.join(HF_INDEX_FILE);
            if index.is_file() {
                return Checkpoint::open_sharded(path, &index, config, limits);
            }
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("a model directory holds {HF_WEIGHTS_FILE} or {HF_INDEX_FILE}; found neither"),
                ),
            ));
        }
        let is_index = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"));
        if is_index {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            return Checkpoint::open_sharded(&dir, path, None, limits);
        }
        if is_gguf_file(path)? {
            return Checkpoint::from_gguf(GgufFile::open_with_limits(path, limits)?, limits);
        }
        let file = map_file(path)?;
        Checkpoint::build(path.to_path_buf(), vec![file], None, limits)
    }

    /// A checkpoint over a parsed llama-family GGUF (see the type docs), under `limits` (which then apply to
    /// [`tensor_f32`](Self::tensor_f32)).
    ///
    /// Errors: an architecture lowbit does not map ([`Error::Unsupported`]), missing or inconsistent metadata
    /// ([`Error::Format`] naming the key), as [`HfMapping::from_parts`].
    pub fn from_gguf(file: GgufFile, limits: Limits) -> Result<Checkpoint> {
        let path = file.path().to_path_buf();
        let map = HfMapping::new(&file).map_err(|e| with_file_context(e, &path))?;
        let files = vec![MappedFile { path: path.clone(), bytes: file.bytes().clone(), map: None }];
        Ok(Checkpoint {
            path,
            files,
            tensors: BTreeMap::new(),
            metadata: HashMap::new(),
            layout: Layout::Dense,
            weights: Vec::new(),
            config: Some(map.config().clone()),
            limits,
            gguf: Some(Arc::new(GgufParts { file, map })),
        })
    }

    /// The GGUF file, when this checkpoint is one: its metadata (tokenizer: [`GgufFile::tokenizer`]) and its
    /// tensors under their GGUF names.
    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_deref().map(|g| &g.file)
    }

    /// The GGUF-to-Hugging-Face mapping, when this checkpoint is a GGUF: per tensor its GGUF name, ggml type
    /// and permutation, and the GGUF tensors left without a Hugging Face name ([`HfMapping::unmapped`]).
    pub fn gguf_mapping(&self) -> Option<&HfMapping> {
        self.gguf.as_deref().map(|g| &g.map)
    }

    /// A checkpoint from the bytes of one safetensors file already in memory (e.g. fetched by a browser),
    /// under [`Limits::DEFAULT`]. Layers share the buffer like they share a mapped file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Checkpoint> {
        Checkpoint::from_shared(Arc::new(bytes), Limits::DEFAULT)
    }

    /// A checkpoint over shared bytes of one safetensors file or GGUF (recognised by its magic) (a buffer, or a
    /// map the caller made), under `limits`.
    pub fn from_shared(bytes: SharedBytes, limits: Limits) -> Result<Checkpoint> {
        if (*bytes).as_ref().starts_with(GGUF_MAGIC) {
            return Checkpoint::from_gguf(GgufFile::from_shared(bytes, limits)?, limits);
        }
        let file = MappedFile { path: PathBuf::from("<memory>"), bytes, map: None };
        Checkpoint::build(PathBuf::from("<memory>"), vec![file], None, limits)
    }

    /// As [`from_shared`](Self::from_shared) for one safetensors file of a model directory whose
    /// `config.json` the caller read separately (a browser holds the directory's files, not the directory):
    /// [`config`](Self::config) returns `config`. A GGUF carries its own config; passing one is an error.
    pub fn from_shared_with_config(
        bytes: SharedBytes,
        config: serde_json::Value,
        limits: Limits,
    ) -> Result<Checkpoint> {
        if (*bytes).as_ref().starts_with(GGUF_MAGIC) {
            return Err(Error::invalid(
                "config",
                "a config.json for a GGUF file",
                "a GGUF without a separate config (its metadata is the config)",
            ));
        }
        if !config.is_object() {
            return Err(Error::invalid("config.json", "a JSON value that is not an object", "a JSON object"));
        }
        let file = MappedFile { path: PathBuf::from("<memory>"), bytes, map: None };
        Checkpoint::build(PathBuf::from("<memory>"), vec![file], Some(config), limits)
    }

    fn open_sharded(
        dir: &Path,
        index_path: &Path,
        config: Option<serde_json::Value>,
        limits: Limits,
    ) -> Result<Checkpoint> {
        let ctx = format!("shard index {}", index_path.display());
        let index = read_json_file(index_path, &limits)?;
        let weight_map = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| Error::format(&ctx, "no `weight_map` object (tensor name → shard file name)"))?;
        let mut shard_names: Vec<&str> = Vec::new();
        let mut placement: Vec<(&str, usize)> = Vec::with_capacity(weight_map.len());
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(&ctx, format!("`weight_map[{tensor:?}]` is {shard}, expected a shard file name"))
            })?;
            check_shard_name(&ctx, tensor, shard)?;
            let i = match shard_names.iter().position(|s| *s == shard) {
                Some(i) => i,
                None => {
                    shard_names.push(shard);
                    shard_names.len() - 1
                }
            };
            placement.push((tensor, i));
        }
        if shard_names.is_empty() {
            return Err(Error::format(&ctx, "`weight_map` is empty; expected at least one tensor and shard"));
        }
        let canonical_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let p = dir.join(shard);
            let canonical = p.canonicalize().map_err(|e| {
                Error::io(
                    &p,
                    std::io::Error::new(
                        e.kind(),
                        format!("shard named in the weight_map of {}: {e}", index_path.display()),
                    ),
                )
            })?;
            if !canonical.starts_with(&canonical_dir) {
                return Err(Error::format(
                    &ctx,
                    format!(
                        "shard `{shard}` resolves to {}, outside the directory {} (a symlink?)",
                        canonical.display(),
                        canonical_dir.display()
                    ),
                ));
            }
            files.push(map_file(&p)?);
        }
        let ck = Checkpoint::build(dir.to_path_buf(), files, config, limits)?;
        for (tensor, shard) in placement {
            if ck.tensors.get(tensor).map(|e| e.file) != Some(shard) {
                return Err(Error::format(
                    &ctx,
                    format!(
                        "`weight_map` puts tensor `{tensor}` in `{}`, but that file has no such tensor",
                        shard_names[shard]
                    ),
                ));
            }
        }
        Ok(ck)
    }

    fn build(
        path: PathBuf,
        files: Vec<MappedFile>,
        config: Option<serde_json::Value>,
        limits: Limits,
    ) -> Result<Checkpoint> {
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        let mut metadata: HashMap<String, String> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let data: &[u8] = (*f.bytes).as_ref();
            let ctx = format!("safetensors file {}", f.path.display());
            check_header(data, &limits, &ctx)?;
            let (n, meta) = SafeTensors::read_metadata(data).map_err(|e| Error::format(&ctx, e.to_string()))?;
            let base = HEADER_LEN_BYTES + n;
            for (name, info) in meta.tensors() {
                limits.check_tensor_bytes(
                    &format!("{ctx}: tensor `{name}`"),
                    info.data_offsets.1 - info.data_offsets.0,
                )?;
                // `read_metadata` checked that the offsets are ordered, contiguous and end at the buffer's end.
                let entry = TensorEntry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if let Some(prev) = tensors.insert(name.clone(), entry) {
                    return Err(Error::format(
                        &ctx,
                        format!(
                            "tensor `{name}` is also in {}; expected each tensor in one file",
                            files[prev.file].path.display()
                        ),
                    ));
                }
            }
            for (k, v) in meta.metadata().iter().flatten() {
                match metadata.get(k) {
                    Some(prev) if prev != v => {
                        return Err(Error::format(
                            &ctx,
                            format!(
                                "metadata `{k}` is {v:?} here but {prev:?} in another shard; expected the same value"
                            ),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        metadata.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let layout =
            Layout::detect(&metadata, tensors.keys().map(String::as_str)).map_err(|e| with_file_context(e, &path))?;
        let mut ck =
            Checkpoint { path, files, tensors, metadata, layout, weights: Vec::new(), config, limits, gguf: None };
        ck.weights = quantized_weights(&ck.layout, &ck);
        Ok(ck)
    }

    /// What was opened: the file, the directory, or `<memory>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files, in shard order: the safetensors files (one for an unsharded checkpoint), or the GGUF.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// The limits this checkpoint was opened with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The detected layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The `__metadata__` maps of the files, merged (shards must agree on shared keys).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The parsed `config.json` of a Hugging Face model directory, if it had one; for a GGUF, the config built
    /// from its metadata ([`HfMapping::config`]).
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// Every tensor name of every file, sorted (quantization parameters such as `W.absmax` included); for a
    /// GGUF, the Hugging Face names of its mapped tensors.
    pub fn tensor_names(&self) -> Vec<&str> {
        if let Some(g) = &self.gguf {
            return g.map.tensors().keys().map(String::as_str).collect();
        }
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The quantized weights (`P.weight` of each layer, and any other quantized tensor), sorted.
    pub fn quantized_weight_names(&self) -> &[String] {
        &self.weights
    }

    /// The module paths of the quantized linear layers, sorted: `model.layers.0.mlp.down_proj` for the
    /// quantized weight `model.layers.0.mlp.down_proj.weight`. Empty for a dense checkpoint.
    pub fn layer_names(&self) -> Vec<String> {
        layer_paths(&self.weights)
    }

    /// The quantized linear layer at module path `name` (see [`layer_names`](Self::layer_names)): its weight
    /// (packed codes are views of the mapped file, no copy) and its bias `{name}.bias` if present (F32/F16/BF16,
    /// one per output feature, widened to f32, finite).
    ///
    /// Errors: an unknown name ([`Error::InvalidArgument`] listing a few valid names, with a hint when `name`
    /// ends in `.weight`), a dense checkpoint ([`Error::Unsupported`]), or a malformed weight or bias
    /// ([`Error::Format`] naming the file and the tensor).
    pub fn layer(&self, name: &str) -> Result<QuantLinear> {
        let weight = format!("{name}.weight");
        if self.weights.binary_search(&weight).is_err() {
            return Err(self.unknown_layer(name));
        }
        let file = self.tensors.get(&weight).map(|e| self.files[e.file].path.clone()).unwrap_or_default();
        load_layer(self, &self.layout, name, &self.limits).map_err(|e| with_file_context(e, &file))
    }

    /// The quantized weight stored under tensor name `name` (e.g. `model.layers.0.mlp.up_proj.weight`, any
    /// name [`quantized_weight_names`](Self::quantized_weight_names) lists), with its parameter entries from
    /// whichever file holds them; the codes are views of the mapped files (no copy), validated as
    /// [`layer`](Self::layer) validates a layer's weight. Errors on a dense checkpoint or a malformed weight.
    pub fn quantized_weight(&self, name: &str) -> Result<QuantWeight> {
        let file = self.tensors.get(name).map(|e| self.files[e.file].path.clone()).unwrap_or_default();
        let w = match &self.layout {
            Layout::Int8(l) => l.load_from(self, name, &self.limits).map(QuantWeight::Int8),
            Layout::Bnb4bit => bnb::load_weight_from(self, name, &self.limits).map(QuantWeight::FourBit),
            Layout::Dense => Err(Error::Unsupported {
                what: format!("weight `{name}`: a dense checkpoint has no quantized weights"),
            }),
        };
        w.map_err(|e| with_file_context(e, &file))
    }

    /// Every quantized linear layer, `(module path, layer)`, sorted by path (the order of
    /// [`layer_names`](Self::layer_names)). Errors as [`layer`](Self::layer) on the first bad one.
    pub fn layers(&self) -> Result<Vec<(String, QuantLinear)>> {
        self.layer_names().into_iter().map(|n| self.layer(&n).map(|l| (n, l))).collect()
    }

    fn unknown_layer(&self, name: &str) -> Error {
        let names = self.layer_names();
        let mut expected = if names.is_empty() {
            format!("a quantized layer, but this {} checkpoint has none", self.layout.name())
        } else {
            let shown: Vec<String> = names.iter().take(LIST_MAX).map(|n| format!("`{n}`")).collect();
            let more = names.len().saturating_sub(LIST_MAX);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            format!("one of its {} layers: {}{more}", names.len(), shown.join(", "))
        };
        if let Some(p) = name.strip_suffix(".weight") {
            expected.push_str(&format!(" (a layer is named by its module path: `{p}`, not `{name}`)"));
        } else if self.tensors.contains_key(&format!("{name}.weight")) {
            expected.push_str(&format!(" (`{name}.weight` is a plain, not quantized, tensor)"));
        }
        Error::invalid("layer name", format!("{name:?} in {}", self.path.display()), expected)
    }

    /// The tensor `name` as stored (dtype, shape, bytes borrowed from the map), or an error naming a few
    /// tensors that exist.
    ///
    /// For a GGUF, only tensors whose stored bytes are exactly the Hugging Face tensor (F32, F16 or BF16 and
    /// not row-permuted) have a view; any other is an [`Error::Unsupported`] pointing to
    /// [`tensor_f32`](Self::tensor_f32).
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        if let Some(g) = &self.gguf {
            return self.gguf_view(g, name);
        }
        let e = self.tensors.get(name).ok_or_else(|| {
            let shown: Vec<&str> = self.tensors.keys().take(LIST_MAX).map(String::as_str).collect();
            Error::invalid(
                "tensor name",
                format!("{name:?} in {}", self.path.display()),
                format!("one of its {} tensors (e.g. {shown:?})", self.tensors.len()),
            )
        })?;
        TensorView::new(e.dtype, e.shape.clone(), self.data(e)).map_err(|err| {
            Error::format(format!("tensor `{name}` in {}", self.files[e.file].path.display()), err.to_string())
        })
    }

    /// Tells the operating system that the mapped files will be read once, front to back (a whole-checkpoint
    /// conversion): more read-ahead, and pages reclaimed sooner after use. Advice only: reading is unchanged,
    /// and it does nothing for bytes the caller provided or on platforms without `madvise`.
    pub fn advise_sequential(&self) {
        #[cfg(unix)]
        for f in &self.files {
            if let Some(map) = &f.map {
                let _ = map.advise(memmap2::Advice::Sequential);
            }
        }
    }

    /// Releases this process's mapping of the pages of tensor `name` once a conversion has consumed them, so
    /// resident memory stays flat in model size; the pages stay in the page cache and reading the tensor again
    /// maps them again, with the same bytes. Does nothing for an unknown name, bytes the caller provided,
    /// GGUF files, or on platforms without `madvise`.
    #[cfg_attr(not(unix), allow(unused_variables))]
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.tensors.get(name) {
            if let Some(map) = &self.files[e.file].map {
                // SAFETY: `map` is a read-only shared file mapping (`Mmap::map`, never written). MADV_DONTNEED on
                // such a mapping drops only this process's page-table entries; the next access faults the same
                // file bytes back in from the page cache, so every outstanding `&[u8]` into the map keeps
                // reading the file's contents (it is not the zero-fill behaviour of private anonymous memory).
                let _ =
                    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.start, e.end - e.start) };
            }
        }
    }

    /// The stored type, shape and size of tensor `name`; errors as [`tensor`](Self::tensor) (for a GGUF, only
    /// on an unknown name).
    pub fn tensor_info(&self, name: &str) -> Result<TensorInfo> {
        if let Some(g) = &self.gguf {
            let t = self.gguf_tensor(g, name)?;
            let bytes = g.file.tensor_info(&t.gguf_name).map_or(0, |i| i.len);
            return Ok(TensorInfo { stored: StoredType::Ggml(t.ggml_type), shape: t.shape.clone(), bytes });
        }
        let view = self.tensor(name)?;
        Ok(TensorInfo {
            stored: StoredType::Safetensors(view.dtype()),
            shape: view.shape().to_vec(),
            bytes: view.data().len(),
        })
    }

    /// A floating tensor (F32, F16 or BF16; e.g. an embedding or a norm weight) widened to f32 exactly.
    /// Errors on another dtype, or when `numel × 4` bytes exceed [`Limits::max_tensor_bytes`].
    ///
    /// For a GGUF: any tensor of a type [`GgmlType::can_dequantize`] accepts, decoded to f32 as gguf-py does
    /// and with llama.cpp's Q/K row permutation undone ([`HfMapping::tensor_f32`]).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(g) = &self.gguf {
            let t = self.gguf_tensor(g, name)?;
            let ctx = format!("tensor `{name}` (GGUF `{}`) in {}", t.gguf_name, self.path.display());
            let numel = crate::shape::numel(&t.shape).map_err(|e| Error::format(&ctx, e.to_string()))?;
            self.limits.check_elements(&format!("{ctx} decoded to f32"), numel, 4)?;
            // GgufFile's errors name the file already.
            return g.map.tensor_f32(&g.file, name);
        }
        let view = self.tensor(name)?;
        let file = &self.files[self.tensors[name].file].path;
        let ctx = format!("tensor `{name}` in {}", file.display());
        if float_dtype(view.dtype()).is_none() {
            return Err(Error::format(ctx, format!("dtype {:?}, expected F32, F16 or BF16", view.dtype())));
        }
        let numel = crate::shape::numel(view.shape()).map_err(|e| Error::format(&ctx, e.to_string()))?;
        self.limits.check_elements(&format!("{ctx} decoded to f32"), numel, 4)?;
        bytes_to_f32(name, view.dtype(), view.data())
    }

    /// Rows `rows` of the 2-D tensor `name` decoded to f32 (`rows.len() × cols` values): the same values as
    /// those rows of [`tensor_f32`](Self::tensor_f32), reading only their bytes, so that a large tensor can
    /// be converted a slice at a time (memory stays at one slice, not the whole f32 tensor).
    ///
    /// Errors: an unknown name, a tensor that is not 2-D, a range past its rows; for a GGUF, a row that does
    /// not hold whole ggml blocks or a tensor stored with permuted rows (llama's Q / K: use `tensor_f32`).
    pub fn tensor_rows_f32(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let check = |shape: &[usize], ctx: &str| -> Result<usize> {
            let [n_rows, cols] = shape else {
                return Err(Error::format(ctx, format!("shape {shape:?}, expected 2 dimensions for a row range")));
            };
            if rows.start > rows.end || rows.end > *n_rows {
                return Err(Error::invalid(
                    "rows",
                    format!("{rows:?} of {ctx}"),
                    format!("a range within 0..{n_rows}"),
                ));
            }
            Ok(*cols)
        };
        if let Some(g) = &self.gguf {
            let t = self.gguf_tensor(g, name)?;
            let ctx = format!("tensor `{name}` (GGUF `{}`) in {}", t.gguf_name, self.path.display());
            let cols = check(&t.shape, &ctx)?;
            if t.unpermute_heads.is_some() {
                return Err(Error::Unsupported {
                    what: format!("{ctx}: a row range of a tensor stored with permuted rows (read it whole)"),
                });
            }
            let row_bytes = t.ggml_type.bytes_for(cols).map_err(|e| Error::format(&ctx, e.to_string()))?;
            let bytes = g.file.tensor_bytes(&t.gguf_name, rows.start * row_bytes..rows.end * row_bytes)?;
            return crate::ggml::dequantize(t.ggml_type, &bytes, rows.len() * cols);
        }
        let view = self.tensor(name)?;
        let file = &self.files[self.tensors[name].file].path;
        let ctx = format!("tensor `{name}` in {}", file.display());
        let cols = check(view.shape(), &ctx)?;
        let Some(elem) = float_dtype(view.dtype()).map(|d| d.size()) else {
            return Err(Error::format(ctx, format!("dtype {:?}, expected F32, F16 or BF16", view.dtype())));
        };
        let row_bytes = cols * elem;
        bytes_to_f32(name, view.dtype(), &view.data()[rows.start * row_bytes..rows.end * row_bytes])
    }

    /// The mapped GGUF tensor with Hugging Face name `name`, or an error naming a few that exist (and saying so
    /// when `name` is a GGUF name).
    fn gguf_tensor<'a>(&self, g: &'a GgufParts, name: &str) -> Result<&'a crate::io::gguf::llama::HfTensor> {
        if let Some(t) = g.map.get(name) {
            return Ok(t);
        }
        let names = g.map.tensors();
        let shown: Vec<&str> = names.keys().take(LIST_MAX).map(String::as_str).collect();
        let mut expected = format!("one of its {} tensors, by Hugging Face name (e.g. {shown:?})", names.len());
        if let Some(t) = names.values().find(|t| t.gguf_name == name) {
            expected.push_str(&format!("; `{name}` is the GGUF name of `{}`", t.hf_name));
        } else if g.map.unmapped().iter().any(|u| u == name) {
            expected.push_str(&format!(
                "; GGUF tensor `{name}` has no Hugging Face name (not part of the model transformers builds); read \
                 it with Checkpoint::gguf()"
            ));
        }
        Err(Error::invalid("tensor name", format!("{name:?} in {}", self.path.display()), expected))
    }

    /// A view of a GGUF tensor whose bytes are exactly the Hugging Face tensor.
    fn gguf_view<'a>(&'a self, g: &'a GgufParts, name: &str) -> Result<TensorView<'a>> {
        let t = self.gguf_tensor(g, name)?;
        let ctx = format!("tensor `{name}` (GGUF `{}`) in {}", t.gguf_name, self.path.display());
        let dtype = match plain_dtype(t.ggml_type) {
            Some(d) if t.is_plain_view() => d,
            _ => {
                let why = if t.unpermute_heads.is_some() {
                    "its rows are stored in llama.cpp's permuted Q/K order".to_string()
                } else {
                    format!("it is stored as ggml {}", t.ggml_type)
                };
                return Err(Error::Unsupported {
                    what: format!("a view of {ctx}: {why}; Checkpoint::tensor_f32 returns it decoded as f32"),
                });
            }
        };
        let data = g.file.tensor_data(&t.gguf_name)?;
        TensorView::new(dtype, t.shape.clone(), data).map_err(|err| Error::format(ctx, err.to_string()))
    }

    fn data(&self, e: &TensorEntry) -> &[u8] {
        // Offsets were validated against this buffer by `read_metadata` when the checkpoint was built.
        &(*self.files[e.file].bytes).as_ref()[e.start..e.end]
    }
}

impl Source for Checkpoint {
    fn names(&self) -> Vec<&str> {
        self.tensor_names()
    }
    fn entry(&self, name: &str) -> Option<Entry<'_>> {
        if let Some(g) = &self.gguf {
            // Only tensors whose bytes are the Hugging Face tensor (`tensor` serves the same views).
            let v = self.gguf_view(g, name).ok()?;
            return Some(Entry { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data() });
        }
        let e = self.tensors.get(name)?;
        Some(Entry { dtype: e.dtype, shape: e.shape.clone(), data: self.data(e) })
    }
    fn bytes(&self, name: &str, entry: &Entry<'_>) -> Bytes {
        if let Some(g) = &self.gguf {
            let info = g.map.get(name).and_then(|t| g.file.tensor_info(&t.gguf_name));
            return match info {
                Some(i) => Bytes::view(g.file.bytes().clone(), i.start..i.start + i.len)
                    .unwrap_or_else(|_| Bytes::from(entry.data)),
                None => Bytes::from(entry.data),
            };
        }
        match self.tensors.get(name) {
            Some(e) => Bytes::view(self.files[e.file].bytes.clone(), e.start..e.end)
                .unwrap_or_else(|_| Bytes::from(entry.data)),
            None => Bytes::from(entry.data),
        }
    }
}

/// Prefixes the context of a format error with the file it came from.
fn with_file_context(e: Error, file: &Path) -> Error {
    match e {
        Error::Format { context, detail } => {
            Error::Format { context: format!("{} ({context})", file.display()), detail }
        }
        Error::Unsupported { what } => Error::Unsupported { what: format!("{}: {what}", file.display()) },
        other => other,
    }
}

/// Whether `path` is a GGUF: a `.gguf` extension (any case) or the `GGUF` magic in its first four bytes.
fn is_gguf_file(path: &Path) -> Result<bool> {
    if path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(true);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = Vec::with_capacity(GGUF_MAGIC.len());
    file.take(GGUF_MAGIC.len() as u64).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
    Ok(head == GGUF_MAGIC)
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<MappedFile> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lowbit never writes the file. The borrowed slices stay valid while the
    // map (kept alive by the `Arc` every view holds) exists; what Rust cannot guard against is another process
    // truncating or rewriting the file in place meanwhile: a truncation makes reading the lost pages raise
    // SIGBUS and a rewrite changes bytes under the views. `Checkpoint`'s docs ("Memory mapping") tell callers
    // not to do that and to use `Checkpoint::from_bytes` where they cannot rule it out.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    Ok(MappedFile { path: path.to_path_buf(), bytes: map.clone(), map: Some(map) })
}

/// Reads and parses a small JSON file (a config or a shard index), refusing it before reading when it is
/// larger than [`Limits::max_json_bytes`], and before parsing when it is nested deeper than
/// [`Limits::max_json_depth`].
fn read_json_file(path: &Path, limits: &Limits) -> Result<serde_json::Value> {
    let bytes = crate::io::small_file::read_capped(path, limits.max_json_bytes, "a JSON file")?;
    limits.parse_json(&path.display().to_string(), &bytes)
}

/// A shard file name from a `weight_map` must be a relative path of plain components (no root, no `..`).
fn check_shard_name(ctx: &str, tensor: &str, shard: &str) -> Result<()> {
    let p = Path::new(shard);
    let plain = !shard.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Error::format(
            ctx,
            format!(
                "`weight_map[{tensor:?}]` names shard {shard:?}; expected a file name inside the directory (no \
                 absolute path, no `..`)"
            ),
        ));
    }
    Ok(())
}
