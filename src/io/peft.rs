//! PEFT LoRA adapter directories (`docs/formats.md` §5): loading, validating and attaching them to
//! [`QuantLinear`] layers, plus [`load_quant_linears`] to build those layers from a quantized checkpoint, and
//! writing them ([`save_adapter`], e.g. after QLoRA training).
//!
//! A directory written by PEFT's `save_pretrained` holds
//! * `adapter_config.json`: `r`, `lora_alpha`, `use_rslora` (default false), `target_modules` (a list of
//!   names or a regex string), optional per-module `rank_pattern` / `alpha_pattern`, `fan_in_fan_out`,
//!   `bias`, ...;
//! * `adapter_model.safetensors`: for each adapted module path `P` (e.g. `model.layers.0.mlp.up_proj`)
//!   `base_model.model.P.lora_A.weight` `[r, in]` and `base_model.model.P.lora_B.weight` `[out, r]`
//!   (F32, F16 or BF16; keys may also carry an adapter-name segment, `P.lora_A.default.weight`).
//!
//! The weights file is the truth about which modules are adapted: `target_modules` only told PEFT where to
//! create them, and is kept for information ([`PeftConfig::target_modules`]).
//!
//! What is rejected, with an [`Error`] that says why (never a panic): a missing or unreadable file, bad JSON,
//! a `peft_type` other than `LORA`, `r` not a positive integer, a non-finite `lora_alpha`,
//! `fan_in_fan_out: true`, `bias` other than `"none"`, DoRA (`use_dora`), `lora_bias`, `modules_to_save`,
//! `target_parameters`, `layer_replication`, `trainable_token_indices`, rank/alpha patterns that are
//! regular expressions rather than module names, keys that are not LoRA `A`/`B` weights, a module with `A` but
//! no `B` (or the reverse), shapes that disagree with the module's rank, mixed adapter-name segments, NaN or
//! infinite values, and an adapter without any module.
//!
//! Semantics match PEFT 0.21: module `P` gets rank `rank_pattern[k]` and alpha `alpha_pattern[k]` for the
//! pattern key `k` that equals `P` or is a dot-separated suffix of it (PEFT's `(.*\.)?(k)$`), else `r` and
//! `lora_alpha`; its scaling is `alpha / rank`, or `alpha / √rank` with rsLoRA ([`LoraAdapter::scaling`]).
//!
//! ```no_run
//! use lowbit::io::{peft::{load_quant_linears, PeftAdapter}, SafetensorsFile};
//!
//! let mut layers = load_quant_linears(&SafetensorsFile::open("model.safetensors")?)?;
//! let adapter = PeftAdapter::load("my_adapter/")?;
//! let report = adapter.attach(&mut layers, "default")?;
//! assert!(report.unmatched_modules.is_empty(), "{report:?}");
//! # Ok::<(), lowbit::Error>(())
//! ```

pub use crate::io::peft_write::{adapter_files, save_adapter, AdapterSaveConfig, PEFT_FORMAT_VERSION};

use crate::io::checkpoint::{self, Layout};
use crate::io::source::Borrowed;
use crate::io::{view_to_f32, Limits, SafetensorsFile};
use crate::linear::QuantLinear;
use crate::lora::LoraAdapter;
use crate::{Error, Result};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// File name of the adapter configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every key of `adapter_model.safetensors` (PEFT's wrapper modules).
pub const KEY_PREFIX: &str = "base_model.model.";
/// Largest `adapter_config.json` accepted, in bytes (PEFT writes about 1 KB).
pub const MAX_CONFIG_LEN: u64 = 16 << 20;

/// `target_modules` of the configuration, as written.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// A list of module names (matching a module whose path equals or ends with `.name`). Empty when the
    /// field is absent or null.
    Names(Vec<String>),
    /// A regular expression PEFT matched against full module paths (or a special value like `all-linear`).
    Pattern(String),
}

/// The parts of `adapter_config.json` lowbit uses, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    /// Default rank `r` (≥ 1).
    pub r: usize,
    /// Default `lora_alpha` (finite).
    pub lora_alpha: f32,
    /// Whether the scaling is `alpha / √r` (rsLoRA).
    pub use_rslora: bool,
    /// Where PEFT created adapters (informational: the weights file decides).
    pub target_modules: TargetModules,
    /// Per-module rank overrides: (module name or dotted path suffix, rank), in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides: (module name or dotted path suffix, alpha), in file order.
    pub alpha_pattern: Vec<(String, f32)>,
}

impl PeftConfig {
    /// Parses and validates `adapter_config.json` text (see the module docs for what is rejected), under
    /// [`Limits::DEFAULT`].
    pub fn parse(json: &str) -> Result<PeftConfig> {
        PeftConfig::parse_with_limits(json, &Limits::DEFAULT)
    }

    /// [`parse`](Self::parse) under explicit limits: the text is refused before parsing when it is longer than
    /// [`Limits::max_json_bytes`] or nested deeper than [`Limits::max_json_depth`].
    pub fn parse_with_limits(json: &str, limits: &Limits) -> Result<PeftConfig> {
        let ctx = CONFIG_FILE;
        let v: Value = limits.parse_json(ctx, json.as_bytes())?;
        let obj = v.as_object().ok_or_else(|| Error::format(ctx, "expected a JSON object at the top level"))?;
        let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let truthy = |k: &str| -> Result<bool> {
            match field(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(Error::format(ctx, format!("`{k}` is {other}, expected true or false"))),
            }
        };
        let unsupported = |what: String| Err(Error::Unsupported { what: format!("{CONFIG_FILE}: {what}") });

        if let Some(t) = field("peft_type") {
            if t.as_str() != Some("LORA") {
                return unsupported(format!("`peft_type` {t}; lowbit loads LoRA adapters (\"LORA\") only"));
            }
        }
        let r = match field("r") {
            None => return Err(Error::format(ctx, "`r` (the LoRA rank) is missing")),
            Some(v) => {
                positive_int(v).ok_or_else(|| Error::format(ctx, format!("`r` is {v}, expected an integer ≥ 1")))?
            }
        };
        let lora_alpha = match field("lora_alpha") {
            None => return Err(Error::format(ctx, "`lora_alpha` is missing")),
            Some(v) => finite_f32(v)
                .ok_or_else(|| Error::format(ctx, format!("`lora_alpha` is {v}, expected a finite number")))?,
        };
        let use_rslora = truthy("use_rslora")?;
        if truthy("fan_in_fan_out")? {
            return unsupported(
                "`fan_in_fan_out: true` (weights stored [in, out], Conv1D-style); lowbit's layers are [out, in]".into(),
            );
        }
        match field("bias") {
            None => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(b) => {
                return unsupported(format!(
                    "`bias` {b}: trained biases (\"all\" / \"lora_only\") are not applied by lowbit; only \"none\""
                ))
            }
        }
        if truthy("use_dora")? {
            return unsupported("`use_dora: true` (DoRA rescales the weight; not plain LoRA)".into());
        }
        if truthy("lora_bias")? {
            return unsupported("`lora_bias: true` (a bias on lora_B)".into());
        }
        for k in ["modules_to_save", "target_parameters", "layer_replication", "trainable_token_indices"] {
            let empty = match field(k) {
                None => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                _ => false,
            };
            if !empty {
                return unsupported(format!("`{k}` = {} (only plain LoRA A/B weights are supported)", obj[k]));
            }
        }
        let target_modules = match field("target_modules") {
            None => TargetModules::Names(Vec::new()),
            Some(Value::String(s)) => TargetModules::Pattern(s.clone()),
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            Error::format(ctx, format!("`target_modules` holds {v}, expected module names (strings)"))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(Error::format(
                    ctx,
                    format!("`target_modules` is {other}, expected a list of names or a regex string"),
                ))
            }
        };
        let rank_pattern = pattern(field("rank_pattern"), "rank_pattern", positive_int, "an integer ≥ 1")?;
        let alpha_pattern = pattern(field("alpha_pattern"), "alpha_pattern", finite_f32, "a finite number")?;
        Ok(PeftConfig { r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern })
    }

    /// Rank and alpha of module `path`: the `rank_pattern` / `alpha_pattern` entry whose key equals `path` or
    /// is a dot-separated suffix of it, else `r` / `lora_alpha`. Errors if several keys match with different
    /// values (PEFT would take the first in dict order, which lowbit does not rely on).
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f32)> {
        let rank = lookup(&self.rank_pattern, path, "rank_pattern")?.unwrap_or(self.r);
        let alpha = lookup(&self.alpha_pattern, path, "alpha_pattern")?.unwrap_or(self.lora_alpha);
        Ok((rank, alpha))
    }
}

fn positive_int(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&r| r >= 1).and_then(|r| usize::try_from(r).ok())
}

fn finite_f32(v: &Value) -> Option<f32> {
    v.as_f64().map(|a| a as f32).filter(|a| a.is_finite())
}

/// Whether a pattern key `k` matches module path `path` the way PEFT's `(.*\.)?(k)$` does for a literal `k`.
fn pattern_matches(k: &str, path: &str) -> bool {
    path == k || path.strip_suffix(k).is_some_and(|head| head.ends_with('.'))
}

fn pattern<T: Copy>(
    v: Option<&Value>,
    name: &str,
    parse: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Vec<(String, T)>> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(CONFIG_FILE, format!("`{name}` is {v}, expected an object (module → value)")))?;
    let mut out = Vec::with_capacity(obj.len());
    for (k, val) in obj {
        let literal = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !literal {
            return Err(Error::Unsupported {
                what: format!(
                    "{CONFIG_FILE}: `{name}` key {k:?} is a regular expression; lowbit supports module names and \
                     dotted path suffixes (letters, digits, `_`, `-`, `.`) only"
                ),
            });
        }
        let p = parse(val)
            .ok_or_else(|| Error::format(CONFIG_FILE, format!("`{name}[{k:?}]` is {val}, expected {expected}")))?;
        out.push((k.clone(), p));
    }
    Ok(out)
}

fn lookup<T: Copy + PartialEq + std::fmt::Debug>(pat: &[(String, T)], path: &str, name: &str) -> Result<Option<T>> {
    let hits: Vec<&(String, T)> = pat.iter().filter(|(k, _)| pattern_matches(k, path)).collect();
    match hits.as_slice() {
        [] => Ok(None),
        [(_, v), rest @ ..] if rest.iter().all(|(_, w)| w == v) => Ok(Some(*v)),
        many => Err(Error::format(
            CONFIG_FILE,
            format!(
                "`{name}` keys {:?} all match module `{path}` with different values; make them unambiguous",
                many.iter().map(|(k, _)| k).collect::<Vec<_>>()
            ),
        )),
    }
}

/// The LoRA weights of one adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftModule {
    /// Module path (key minus `base_model.model.` and minus `.lora_A.weight`), e.g. `model.layers.0.mlp.up_proj`.
    pub path: String,
    /// This module's rank (from `rank_pattern` or `r`), equal to the rows of `A` and columns of `B`.
    pub rank: usize,
    /// This module's alpha (from `alpha_pattern` or `lora_alpha`).
    pub alpha: f32,
    /// Input features (columns of `A`).
    pub in_features: usize,
    /// Output features (rows of `B`).
    pub out_features: usize,
    /// `A`, `[rank, in]` row-major, widened to f32 exactly, finite.
    pub a: Vec<f32>,
    /// `B`, `[out, rank]` row-major, widened to f32 exactly, finite.
    pub b: Vec<f32>,
}

/// A validated PEFT LoRA adapter: configuration and per-module weights.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    config: PeftConfig,
    modules: Vec<PeftModule>,
    /// The adapter-name segment of the keys (`default` in `P.lora_A.default.weight`), if any.
    key_adapter_name: Option<String>,
}

/// Which layers [`PeftAdapter::attach`] adapted, and what did not match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Module paths that got the adapter, sorted.
    pub attached: Vec<String>,
    /// Adapter modules for which no layer of that path was given (their weights were not used), sorted.
    pub unmatched_modules: Vec<String>,
    /// Given layers that the adapter has no weights for, sorted.
    pub layers_without_adapter: Vec<String>,
}

impl AttachReport {
    /// Whether every adapter module found its layer.
    pub fn all_modules_attached(&self) -> bool {
        self.unmatched_modules.is_empty()
    }
}

/// One key of the weights file, split.
struct LoraKey<'a> {
    path: &'a str,
    is_a: bool,
    adapter: Option<&'a str>,
}

fn split_key(key: &str) -> Result<LoraKey<'_>> {
    let ctx = || format!("{WEIGHTS_FILE} key `{key}`");
    let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
        Error::format(ctx(), format!("does not start with `{KEY_PREFIX}` (not a PEFT adapter weights file?)"))
    })?;
    let (pos, is_a) = match (rest.rfind(".lora_A."), rest.rfind(".lora_B.")) {
        (Some(a), Some(b)) => (a.max(b), a > b),
        (Some(a), None) => (a, true),
        (None, Some(b)) => (b, false),
        (None, None) => {
            let what = if rest.contains("lora_embedding_") {
                "a LoRA embedding weight (adapters on embedding layers are not supported)"
            } else if rest.contains("lora_magnitude_vector") {
                "a DoRA magnitude vector (DoRA is not supported)"
            } else {
                "neither `.lora_A.` nor `.lora_B.` weight (modules_to_save or other extra weights are not supported)"
            };
            return Err(Error::Unsupported { what: format!("{}: {what}", ctx()) });
        }
    };
    let path = &rest[..pos];
    let tail = &rest[pos + ".lora_A.".len()..];
    let adapter = match tail.strip_suffix("weight") {
        Some("") => None,
        Some(seg) => match seg.strip_suffix('.') {
            Some(name) if !name.is_empty() && !name.contains('.') => Some(name),
            _ => return Err(Error::format(ctx(), "expected `.lora_A.weight` or `.lora_A.<adapter name>.weight`")),
        },
        None => {
            return Err(Error::Unsupported {
                what: format!("{}: only `weight` tensors of lora_A / lora_B are supported (no bias)", ctx()),
            })
        }
    };
    if path.is_empty() {
        return Err(Error::format(ctx(), "empty module path"));
    }
    Ok(LoraKey { path, is_a, adapter })
}

impl PeftAdapter {
    /// Loads and validates an adapter directory (`adapter_config.json` + `adapter_model.safetensors`) under
    /// [`Limits::DEFAULT`]. Errors: [`Error::Io`] for a missing or unreadable file, otherwise as
    /// [`PeftAdapter::from_parts`].
    pub fn load(dir: impl AsRef<Path>) -> Result<PeftAdapter> {
        PeftAdapter::load_with_limits(dir, &Limits::DEFAULT)
    }

    /// [`load`](Self::load) under explicit limits: the config is refused before it is read when it is larger
    /// than [`Limits::max_json_bytes`] (or [`MAX_CONFIG_LEN`]), the weights file's header as in
    /// [`SafetensorsFile::open_with_limits`], and every LoRA matrix as in
    /// [`from_parts_with_limits`](Self::from_parts_with_limits).
    pub fn load_with_limits(dir: impl AsRef<Path>, limits: &Limits) -> Result<PeftAdapter> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "PEFT adapter directory not found"),
            ));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let json = read_small_text(&cfg_path, limits)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                "only adapter_model.bin (a pickle) is present; re-save with safe_serialization=True"
            } else {
                "adapter weights file not found"
            };
            return Err(Error::io(&weights_path, std::io::Error::new(std::io::ErrorKind::NotFound, hint)));
        }
        let file = SafetensorsFile::open_with_limits(&weights_path, *limits)?;
        let st = file.tensors()?;
        Self::from_parts_with_limits(&json, &st, limits).map_err(|e| match e {
            Error::Format { context, detail } => {
                Error::Format { context: format!("{} ({context})", dir.display()), detail }
            }
            other => other,
        })
    }

    /// Builds an adapter from the text of `adapter_config.json` and the parsed weights file, validating
    /// everything listed in the module docs, under [`Limits::DEFAULT`]. Modules are sorted by path.
    pub fn from_parts(config_json: &str, weights: &SafeTensors<'_>) -> Result<PeftAdapter> {
        PeftAdapter::from_parts_with_limits(config_json, weights, &Limits::DEFAULT)
    }

    /// [`from_parts`](Self::from_parts) under explicit limits: the config as in
    /// [`PeftConfig::parse_with_limits`]; every LoRA matrix is refused before it is decoded when its stored
    /// bytes or its f32 size (`numel × 4`) exceed [`Limits::max_tensor_bytes`].
    pub fn from_parts_with_limits(
        config_json: &str,
        weights: &SafeTensors<'_>,
        limits: &Limits,
    ) -> Result<PeftAdapter> {
        let config = PeftConfig::parse_with_limits(config_json, limits)?;
        let mut names: Vec<&str> = weights.names();
        names.sort();
        let mut key_adapter_name: Option<Option<&str>> = None;
        let mut parts: BTreeMap<&str, [Option<&str>; 2]> = BTreeMap::new();
        for key in &names {
            let k = split_key(key)?;
            match key_adapter_name {
                None => key_adapter_name = Some(k.adapter),
                Some(prev) if prev != k.adapter => {
                    return Err(Error::format(
                        WEIGHTS_FILE,
                        format!(
                            "keys mix adapter-name segments {prev:?} and {:?} (`{key}`); expected one adapter per file",
                            k.adapter
                        ),
                    ))
                }
                Some(_) => {}
            }
            let slot = &mut parts.entry(k.path).or_default()[usize::from(!k.is_a)];
            if slot.is_some() {
                return Err(Error::format(WEIGHTS_FILE, format!("module `{}` has two {} weights", k.path, ab(k.is_a))));
            }
            *slot = Some(key);
        }
        if parts.is_empty() {
            return Err(Error::format(WEIGHTS_FILE, "holds no LoRA weights"));
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (path, [a_key, b_key]) in parts {
            let missing = |is_a: bool, other: &str| {
                Error::format(
                    WEIGHTS_FILE,
                    format!("module `{path}` has `{other}` but no lora_{} weight", if is_a { "A" } else { "B" }),
                )
            };
            let a_key = a_key.ok_or_else(|| missing(true, b_key.unwrap_or_default()))?;
            let b_key = b_key.ok_or_else(|| missing(false, a_key))?;
            let (rank, alpha) = config.rank_and_alpha(path)?;
            let (a, a_shape) = load_matrix(weights, a_key, limits)?;
            let (b, b_shape) = load_matrix(weights, b_key, limits)?;
            if a_shape[0] != rank || a_shape[1] == 0 {
                return Err(Error::shape(format!("`{a_key}` (lora_A: [r, in], r = {rank})"), a_shape, ["r", "in ≥ 1"]));
            }
            if b_shape[1] != rank || b_shape[0] == 0 {
                return Err(Error::shape(
                    format!("`{b_key}` (lora_B: [out, r], r = {rank})"),
                    b_shape,
                    ["out ≥ 1", "r"],
                ));
            }
            modules.push(PeftModule {
                path: path.to_string(),
                rank,
                alpha,
                in_features: a_shape[1],
                out_features: b_shape[0],
                a,
                b,
            });
        }
        let key_adapter_name = key_adapter_name.flatten().map(str::to_string);
        Ok(PeftAdapter { config, modules, key_adapter_name })
    }

    /// The validated configuration.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }
    /// Every adapted module, sorted by path.
    pub fn modules(&self) -> &[PeftModule] {
        &self.modules
    }
    /// The module with this path, if adapted.
    pub fn module(&self, path: &str) -> Option<&PeftModule> {
        self.modules.binary_search_by(|m| m.path.as_str().cmp(path)).ok().map(|i| &self.modules[i])
    }
    /// The adapter-name segment the keys carried (`Some("default")` for `P.lora_A.default.weight`), if any.
    pub fn key_adapter_name(&self) -> Option<&str> {
        self.key_adapter_name.as_deref()
    }

    /// A [`LoraAdapter`] named `adapter_name` for module `path` (its rank, alpha, `use_rslora` and weights).
    /// Errors if the adapter has no such module.
    pub fn lora_adapter(&self, path: &str, adapter_name: &str) -> Result<LoraAdapter> {
        let m = self.module(path).ok_or_else(|| {
            Error::invalid("module path", format!("{path:?}"), "a module of the adapter (see `modules()`)")
        })?;
        LoraAdapter::new(adapter_name, m.rank, m.a.clone(), m.b.clone(), m.alpha, self.config.use_rslora)
    }

    /// Attaches this adapter, named `adapter_name`, to every layer whose path equals an adapter module path.
    ///
    /// All-or-nothing: every match is checked first (shape `[out, in]` against `B`/`A`, name not already
    /// taken on the layer, unique layer paths), and on any error no layer is modified. Unmatched modules and
    /// layers are not errors; they are listed in the [`AttachReport`].
    pub fn attach(&self, layers: &mut [(String, QuantLinear)], adapter_name: &str) -> Result<AttachReport> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(layers.len());
        for (i, (path, _)) in layers.iter().enumerate() {
            if seen.insert(path.as_str(), i).is_some() {
                return Err(Error::invalid("layers", format!("path {path:?} given twice"), "unique layer paths"));
            }
        }
        let mut plan = Vec::new();
        let mut report = AttachReport::default();
        for m in &self.modules {
            let Some(&i) = seen.get(m.path.as_str()) else {
                report.unmatched_modules.push(m.path.clone());
                continue;
            };
            let layer = &layers[i].1;
            if (layer.out_features(), layer.in_features()) != (m.out_features, m.in_features) {
                return Err(Error::shape(
                    format!("adapter module `{}` (B·A: [out, in]) vs its layer [out, in]", m.path),
                    [m.out_features, m.in_features],
                    [layer.out_features(), layer.in_features()],
                ));
            }
            if layer.adapter_id(adapter_name).is_some() {
                return Err(Error::invalid(
                    "adapter_name",
                    format!("{adapter_name:?} (already attached to `{}`)", m.path),
                    "a name not yet attached to the layer",
                ));
            }
            plan.push((i, self.lora_adapter(&m.path, adapter_name)?));
            report.attached.push(m.path.clone());
        }
        for (i, adapter) in plan {
            layers[i].1.add_adapter(adapter)?; // checked above: cannot fail
        }
        report.layers_without_adapter =
            layers.iter().map(|(p, _)| p).filter(|p| self.module(p).is_none()).cloned().collect();
        report.layers_without_adapter.sort();
        Ok(report)
    }
}

fn ab(is_a: bool) -> &'static str {
    if is_a {
        "lora_A"
    } else {
        "lora_B"
    }
}

fn read_small_text(path: &Path, limits: &Limits) -> Result<String> {
    let max = (MAX_CONFIG_LEN as usize).min(limits.max_json_bytes);
    let bytes = crate::io::small_file::read_capped(path, max, "the adapter config")?;
    String::from_utf8(bytes).map_err(|e| Error::format(path.display().to_string(), format!("not UTF-8: {e}")))
}

fn load_matrix(st: &SafeTensors<'_>, key: &str, limits: &Limits) -> Result<(Vec<f32>, [usize; 2])> {
    let view = st.tensor(key).map_err(|e| Error::format(format!("tensor `{key}`"), e.to_string()))?;
    let shape = match *view.shape() {
        [r, c] => [r, c],
        ref s => return Err(Error::shape(format!("`{key}` (a 2-D LoRA matrix)"), s, "[rows, cols]")),
    };
    let ctx = format!("{WEIGHTS_FILE}: tensor `{key}`");
    limits.check_tensor_bytes(&ctx, view.data().len())?;
    limits.check_elements(&format!("{ctx} decoded to f32"), shape[0].saturating_mul(shape[1]), 4)?;
    let v = view_to_f32(key, &view)?;
    if let Some(index) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { arg: format!("tensor `{key}`"), index, value: v[index] });
    }
    Ok((v, shape))
}

/// Builds one [`QuantLinear`] per quantized 2-D `P.weight` of a checkpoint, with its bias `P.bias` if
/// present, returned as `(P, layer)` sorted by `P` (the module path PEFT keys use).
///
/// * A bitsandbytes 4-bit checkpoint (any `*.quant_state.bitsandbytes__*` key; [`crate::io::bnb::load_layer`]).
/// * A lowbit int8 file (metadata `lowbit.scheme = int8`; [`crate::io::int8::Int8Layout::load`]).
///
/// The layout detection and the bias rule (F32/F16/BF16, `out` elements, finite) are those of
/// [`Checkpoint`](crate::io::Checkpoint) (which builds the same layers without copying the codes); the limits
/// are `file`'s. Quantized tensors whose name does not end in `.weight` are skipped. Errors: a file that is
/// neither format ([`Error::Unsupported`]), or any malformed weight or bias ([`Error::Format`]).
pub fn load_quant_linears(file: &SafetensorsFile) -> Result<Vec<(String, QuantLinear)>> {
    let st = file.tensors()?;
    let meta = file.metadata()?;
    quant_linears_from_with_limits(&st, &meta, file.limits()).map_err(|e| match e {
        Error::Unsupported { what } => Error::Unsupported { what: format!("{}: {what}", file.path().display()) },
        other => other,
    })
}

/// [`load_quant_linears`] on an already parsed file and its `__metadata__` map, under [`Limits::DEFAULT`].
pub fn quant_linears_from(st: &SafeTensors<'_>, meta: &HashMap<String, String>) -> Result<Vec<(String, QuantLinear)>> {
    quant_linears_from_with_limits(st, meta, &Limits::DEFAULT)
}

/// [`quant_linears_from`] under explicit limits: every weight, scale and bias tensor is checked against
/// [`Limits::max_tensor_bytes`] (and the decoded weight, `numel × 4` bytes) before it is copied.
pub fn quant_linears_from_with_limits(
    st: &SafeTensors<'_>,
    meta: &HashMap<String, String>,
    limits: &Limits,
) -> Result<Vec<(String, QuantLinear)>> {
    let src = Borrowed(st);
    let layout = Layout::detect(meta, st.names())?;
    if layout == Layout::Dense {
        return Err(Error::Unsupported {
            what: "a checkpoint without quantized weights (neither bitsandbytes 4-bit `quant_state` keys nor \
                   lowbit int8 metadata `lowbit.scheme`)"
                .into(),
        });
    }
    let paths = checkpoint::layer_paths(&checkpoint::quantized_weights(&layout, &src));
    paths.into_iter().map(|p| checkpoint::load_layer(&src, &layout, &p, limits).map(|l| (p, l))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_splitting() {
        let k = split_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight").unwrap();
        assert_eq!((k.path, k.is_a, k.adapter), ("model.layers.0.mlp.up_proj", true, None));
        let k = split_key("base_model.model.a.b.lora_B.default.weight").unwrap();
        assert_eq!((k.path, k.is_a, k.adapter), ("a.b", false, Some("default")));
        assert!(split_key("model.a.lora_A.weight").is_err());
        assert!(split_key("base_model.model.a.lora_A.bias").is_err());
        assert!(split_key("base_model.model.a.lora_A.x.y.weight").is_err());
        assert!(split_key("base_model.model.a.weight").is_err());
        assert!(split_key("base_model.model.lora_A.weight").is_err());
    }

    #[test]
    fn patterns_match_like_peft_for_literal_keys() {
        assert!(pattern_matches("down_proj", "model.layers.0.mlp.down_proj"));
        assert!(pattern_matches("mlp.down_proj", "model.layers.0.mlp.down_proj"));
        assert!(pattern_matches("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"));
        assert!(!pattern_matches("own_proj", "model.layers.0.mlp.down_proj"));
        assert!(!pattern_matches("up_proj", "model.layers.0.mlp.down_proj"));
    }
}
