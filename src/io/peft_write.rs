//! Writing PEFT LoRA adapter directories ([`save_adapter`]), the inverse of
//! [`PeftAdapter::load`](super::peft::PeftAdapter::load). Re-exported from [`crate::io::peft`].

use super::atomic;
use super::peft::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
use super::{serialize_safetensors, TensorData};
use crate::element::check_finite;
use crate::lora::LoraAdapter;
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The PEFT version whose `save_pretrained` output [`save_adapter`] reproduces (field set of
/// `adapter_config.json`, key names of `adapter_model.safetensors`); written as `peft_version`.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Options of [`save_adapter`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSaveConfig {
    /// `base_model_name_or_path` (e.g. `"HuggingFaceTB/SmolLM2-135M-Instruct"`); `None` writes `null`.
    pub base_model_name_or_path: Option<String>,
    /// `task_type` (default `"CAUSAL_LM"`); `None` writes `null`.
    pub task_type: Option<String>,
    /// Replace an existing adapter directory (see [`save_adapter`]); default false.
    pub overwrite: bool,
}

impl Default for AdapterSaveConfig {
    fn default() -> Self {
        AdapterSaveConfig { base_model_name_or_path: None, task_type: Some("CAUSAL_LM".into()), overwrite: false }
    }
}

/// Writes `modules` — `(module path, adapter)`, e.g. `("model.layers.0.self_attn.q_proj", &adapter)` — as a
/// PEFT LoRA adapter directory `dir`, as PEFT 0.21's `save_pretrained` would:
///
/// * `adapter_config.json`: `peft_type` `"LORA"`, `r` and `lora_alpha` (the most common rank and alpha among
///   the modules; ties go to the smaller value), `rank_pattern` / `alpha_pattern` with the full path of every
///   module whose rank / alpha differ (empty otherwise), `use_rslora`, `target_modules` (the sorted distinct last
///   path components), `lora_dropout` 0, `bias` `"none"`, `fan_in_fan_out` false, `inference_mode` true,
///   `init_lora_weights` true, the options of `config`, and PEFT's other fields at their defaults (the same
///   field set as a PEFT-written directory);
/// * `adapter_model.safetensors`: `base_model.model.{path}.lora_A.weight` `[r, in]` and `.lora_B.weight`
///   `[out, r]` in f32, metadata `{"format": "pt"}`.
///
/// [`PeftAdapter::load`](super::peft::PeftAdapter::load) reads it back to adapters equal to the ones given
/// (bit-identical values, same rank, alpha and rsLoRA flag). Adapter names and enabled flags are not stored.
///
/// Errors, before anything is written: no modules; a path that is empty, has an empty dot-separated
/// component, or characters other than ASCII letters, digits, `_` and `-` (what PEFT's pattern keys and
/// lowbit's loader accept); a path given twice; adapters that mix rsLoRA and plain scaling (PEFT has one
/// `use_rslora` per adapter); non-finite values; `dir` existing without `overwrite`.
///
/// **Atomicity.** Both files are written into a temporary sibling directory (`.NAME.lowbit-tmp.PID.N`,
/// registered with [`atomic::register`] so an interrupted program can remove it), synced, and the directory is
/// renamed to `dir`: a crash leaves either no `dir` or a complete one (plus, at worst, the temporary). With
/// `overwrite`, an existing `dir` must be an adapter directory (a directory holding `adapter_config.json` and
/// no subdirectories) or empty; anything else is refused. It is first renamed to `.NAME.lowbit-old.PID.N`,
/// the new directory renamed into place, then the old one deleted (with any other files it held, e.g. a
/// `README.md`). A crash between those two renames leaves no `dir`, the old adapter in the `.lowbit-old`
/// sibling and the new one in the `.lowbit-tmp` sibling: nothing is lost, but `dir` must be restored by hand.
/// If the second rename fails, the old directory is moved back.
pub fn save_adapter(
    dir: impl AsRef<Path>,
    config: &AdapterSaveConfig,
    modules: &[(String, &LoraAdapter)],
) -> Result<()> {
    let dir = dir.as_ref();
    let (json, weights) = adapter_files(config, modules)?;
    let existing = check_destination(dir, config.overwrite)?;

    let tmp = atomic::temp_path_for(dir);
    let reg = atomic::register(&tmp, true);
    std::fs::create_dir(&tmp).map_err(|e| atomic::write_error(&tmp, e))?;
    write_synced(&tmp.join(CONFIG_FILE), json.as_bytes())?;
    write_synced(&tmp.join(WEIGHTS_FILE), &weights)?;
    atomic::sync_dir(&tmp);

    let parent = atomic::parent_dir(dir);
    if existing {
        let old = old_path_for(dir);
        std::fs::rename(dir, &old).map_err(|e| atomic::write_error(dir, e))?;
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(atomic::write_error(dir, e));
        }
        reg.keep();
        atomic::sync_dir(parent);
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        // `rename` refuses a non-empty directory that appeared meanwhile (an empty one would be replaced).
        std::fs::rename(&tmp, dir).map_err(|e| atomic::write_error(dir, e))?;
        reg.keep();
    }
    atomic::sync_dir(parent);
    Ok(())
}

/// `adapter_config.json` text and `adapter_model.safetensors` bytes for `modules`, validated (see
/// [`save_adapter`]).
pub fn adapter_files(config: &AdapterSaveConfig, modules: &[(String, &LoraAdapter)]) -> Result<(String, Vec<u8>)> {
    let Some((_, first)) = modules.first() else {
        return Err(Error::invalid("modules", "an empty list", "at least one (module path, adapter)"));
    };
    let mut seen = BTreeSet::new();
    for (path, a) in modules {
        check_path(path)?;
        if !seen.insert(path.as_str()) {
            return Err(Error::invalid("modules", format!("module path {path:?} given twice"), "unique module paths"));
        }
        if a.use_rslora() != first.use_rslora() {
            return Err(Error::invalid(
                "modules",
                format!(
                    "{path:?} has use_rslora = {} but {:?} has {}",
                    a.use_rslora(),
                    modules[0].0,
                    first.use_rslora()
                ),
                "the same use_rslora for every module (PEFT stores one flag per adapter)",
            ));
        }
        if !a.alpha().is_finite() {
            return Err(Error::invalid("lora_alpha", a.alpha(), "a finite number"));
        }
        check_finite(&format!("lora_A of module {path:?}"), a.a())?;
        check_finite(&format!("lora_B of module {path:?}"), a.b())?;
    }
    let ranks: Vec<usize> = modules.iter().map(|(_, a)| a.rank()).collect();
    let alphas: Vec<f32> = modules.iter().map(|(_, a)| a.alpha()).collect();
    let (Some(r), Some(alpha)) = (most_common(&ranks, |x| x as f64), most_common(&alphas, f64::from)) else {
        return Err(Error::invalid("modules", "an empty list", "at least one (module path, adapter)"));
    };
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    let mut targets = BTreeSet::new();
    for (path, a) in modules {
        if a.rank() != r {
            rank_pattern.insert(path.clone(), json!(a.rank()));
        }
        if a.alpha().to_bits() != alpha.to_bits() {
            alpha_pattern.insert(path.clone(), alpha_json(a.alpha()));
        }
        targets.insert(path.rsplit('.').next().unwrap_or(path).to_string());
    }
    let cfg = json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": alpha_pattern,
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha_json(alpha),
        "lora_bias": false,
        "lora_dropout": 0.0,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "target_parameters": null,
        "task_type": config.task_type,
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": first.use_rslora(),
        "velora_config": null
    });
    // serde_json's map is sorted (no `preserve_order`), as PEFT's `json.dumps(sort_keys=True)`.
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| Error::format(CONFIG_FILE, e.to_string()))?;

    let mut tensors = Vec::with_capacity(2 * modules.len());
    for (path, a) in modules {
        let key = |ab: &str| format!("{KEY_PREFIX}{path}.lora_{ab}.weight");
        let (r, inp, out) = (a.rank(), a.in_features(), a.out_features());
        tensors.push((key("A"), TensorData::from_slice(safetensors::Dtype::F32, vec![r, inp], a.a())));
        tensors.push((key("B"), TensorData::from_slice(safetensors::Dtype::F32, vec![out, r], a.b())));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let weights = serialize_safetensors(&tensors, Some(meta))?;
    Ok((json, weights))
}

/// An alpha as PEFT writes it: an integer when it is one (`16`), else the shortest decimal that reads back as
/// the same f32 (`0.1`, not `0.10000000149011612`), so that PEFT's f64 arithmetic sees the intended number.
fn alpha_json(alpha: f32) -> Value {
    if alpha.fract() == 0.0 && alpha.abs() < 2f32.powi(53) {
        return json!(alpha as i64);
    }
    // Rust's `Display` for f32 is the shortest round-tripping decimal; as an f64 it still rounds back to `alpha`.
    json!(alpha.to_string().parse::<f64>().unwrap_or(f64::from(alpha)))
}

/// The most frequent value (compared bit for bit through `key`); ties go to the smaller one. `None` when empty.
fn most_common<T: Copy>(values: &[T], key: impl Fn(T) -> f64) -> Option<T> {
    let mut best: Option<(usize, T)> = None;
    for &v in values {
        let n = values.iter().filter(|&&w| key(w).to_bits() == key(v).to_bits()).count();
        match best {
            Some((bn, bv)) if n < bn || (n == bn && key(v) >= key(bv)) => {}
            _ => best = Some((n, v)),
        }
    }
    best.map(|(_, v)| v)
}

fn check_path(path: &str) -> Result<()> {
    let ok_chars = path.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if path.is_empty() || !ok_chars || path.split('.').any(str::is_empty) {
        return Err(Error::invalid(
            "module path",
            format!("{path:?}"),
            "a dotted module path like \"model.layers.0.self_attn.q_proj\" (ASCII letters, digits, `_`, `-`; no \
             empty component)",
        ));
    }
    Ok(())
}

/// Whether `dir` exists (and may be replaced); errors when it exists and must not or cannot be replaced.
fn check_destination(dir: &Path, overwrite: bool) -> Result<bool> {
    let m = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) => m,
    };
    let refuse = |why: String| Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::AlreadyExists, why)));
    if !overwrite {
        return refuse("exists; pass overwrite: true to replace an adapter directory".into());
    }
    if !m.is_dir() {
        return refuse(format!("is {}; overwrite replaces only adapter directories", atomic::describe_file_type(&m)));
    }
    let mut has_config = false;
    let mut empty = true;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        empty = false;
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        if ft.is_dir() {
            return refuse(format!(
                "holds the subdirectory {:?}: not an adapter directory, refusing to replace it",
                entry.file_name()
            ));
        }
        has_config |= entry.file_name() == CONFIG_FILE;
    }
    if !(has_config || empty) {
        return refuse(format!("has no {CONFIG_FILE}: not an adapter directory, refusing to replace it"));
    }
    Ok(true)
}

/// `.NAME.lowbit-old.PID.N` next to `dir`.
fn old_path_for(dir: &Path) -> PathBuf {
    let t = atomic::temp_path_for(dir);
    let name = t.file_name().map(|n| n.to_string_lossy().replace(".lowbit-tmp.", ".lowbit-old.")).unwrap_or_default();
    atomic::parent_dir(dir).join(name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| atomic::write_error(path, e))?;
    f.write_all(bytes).map_err(|e| atomic::write_error(path, e))?;
    f.sync_all().map_err(|e| atomic::write_error(path, e))
}
