//! `lowbit::io::peft::save_adapter`: round trips through `PeftAdapter::load`, the format against the
//! PEFT-written fixture directories (`tests/data/peft_adapter*`, from `gen_peft_fixture.py`), refusals, and
//! the directory replacement rules.
#![cfg(feature = "io")]

use lowbit::io::peft::{save_adapter, AdapterSaveConfig, PeftAdapter, PeftConfig, TargetModules};
use lowbit::io::SafetensorsFile;
use lowbit::lora::LoraAdapter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "lowbit-peft-write-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic, non-trivial values (distinct bit patterns, negative and tiny ones included).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 * 0.2 - 0.1).collect()
}

fn adapter(rank: usize, inp: usize, out: usize, alpha: f32, rslora: bool, seed: u32) -> LoraAdapter {
    LoraAdapter::new("default", rank, values(rank * inp, seed), values(out * rank, seed + 1), alpha, rslora).unwrap()
}

/// Saves, loads back and checks every module is the same adapter (bit-equal values, rank, alpha, rsLoRA).
fn round_trip(modules: &[(String, LoraAdapter)]) -> (PathBuf, PeftAdapter) {
    let dir = scratch().join("adapter");
    let refs: Vec<(String, &LoraAdapter)> = modules.iter().map(|(p, a)| (p.clone(), a)).collect();
    save_adapter(&dir, &AdapterSaveConfig::default(), &refs).unwrap();
    let loaded = PeftAdapter::load(&dir).unwrap();
    assert_eq!(loaded.modules().len(), modules.len());
    for (path, a) in modules {
        let back = loaded.lora_adapter(path, "default").unwrap();
        assert_eq!(&back, a, "{path}");
        assert!(back.a().iter().zip(a.a()).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(back.b().iter().zip(a.b()).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    (dir, loaded)
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".lowbit-"))
        .collect()
}

#[test]
fn uniform_adapters_round_trip_and_the_config_parses() {
    let modules: Vec<(String, LoraAdapter)> = (0..2)
        .flat_map(|l| {
            [
                (format!("model.layers.{l}.self_attn.q_proj"), adapter(8, 48, 48, 16.0, false, 10 * l)),
                (format!("model.layers.{l}.mlp.down_proj"), adapter(8, 96, 48, 16.0, false, 10 * l + 5)),
            ]
        })
        .collect();
    let (dir, loaded) = round_trip(&modules);
    let c = loaded.config();
    assert_eq!((c.r, c.lora_alpha, c.use_rslora), (8, 16.0, false));
    assert_eq!(c.target_modules, TargetModules::Names(vec!["down_proj".into(), "q_proj".into()]));
    assert!(c.rank_pattern.is_empty() && c.alpha_pattern.is_empty());
    let json = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert_eq!(PeftConfig::parse(&json).unwrap(), *c);
    assert!(json.contains("\"lora_alpha\": 16,"), "an integral alpha is written as PEFT writes it");
    assert!(leftovers(dir.parent().unwrap()).is_empty());
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn differing_ranks_and_alphas_become_patterns_and_rslora_is_kept() {
    let modules = vec![
        ("model.layers.0.mlp.up_proj".to_string(), adapter(4, 80, 96, 8.0, true, 1)),
        ("model.layers.0.mlp.gate_proj".to_string(), adapter(4, 80, 96, 8.0, true, 2)),
        ("model.layers.0.mlp.down_proj".to_string(), adapter(2, 96, 80, 3.0, true, 3)),
        ("model.layers.1.mlp.down_proj".to_string(), adapter(4, 96, 80, 0.1, true, 4)),
    ];
    let (dir, loaded) = round_trip(&modules);
    let c = loaded.config();
    assert_eq!((c.r, c.lora_alpha, c.use_rslora), (4, 8.0, true), "the most common rank and alpha");
    let json = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(json.contains("\"model.layers.1.mlp.down_proj\": 0.1\n"), "shortest decimal alpha: {json}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    assert_eq!(c.rank_pattern, vec![("model.layers.0.mlp.down_proj".to_string(), 2)]);
    let mut ap = c.alpha_pattern.clone();
    ap.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ap, vec![("model.layers.0.mlp.down_proj".into(), 3.0), ("model.layers.1.mlp.down_proj".into(), 0.1)]);
}

/// Same field set as the PEFT-written fixture's config, and the same weights layout: key names, f32, shapes
/// `[r, in]` / `[out, r]`, metadata `format: pt`. Reproduces `tests/data/peft_adapter` from its own weights.
#[test]
fn the_format_matches_a_peft_written_directory() {
    let peft_dir = format!("{DATA}/peft_adapter");
    let theirs = PeftAdapter::load(&peft_dir).unwrap();
    let modules: Vec<(String, LoraAdapter)> =
        theirs.modules().iter().map(|m| (m.path.clone(), theirs.lora_adapter(&m.path, "default").unwrap())).collect();
    let (dir, ours) = round_trip(&modules);
    assert_eq!(ours.config(), theirs.config());

    let keys = |p: &Path| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&dir.join("adapter_config.json")), keys(&Path::new(&peft_dir).join("adapter_config.json")));

    let a = SafetensorsFile::open(dir.join("adapter_model.safetensors")).unwrap();
    let b = SafetensorsFile::open(Path::new(&peft_dir).join("adapter_model.safetensors")).unwrap();
    assert_eq!(a.metadata().unwrap(), b.metadata().unwrap());
    let (sa, sb) = (a.tensors().unwrap(), b.tensors().unwrap());
    let mut na = sa.names();
    let mut nb = sb.names();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in na {
        let (ta, tb) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
        assert_eq!((ta.dtype(), ta.shape()), (tb.dtype(), tb.shape()), "{n}");
        assert_eq!(ta.data(), tb.data(), "{n}: f32 bytes");
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn invalid_inputs_are_refused_before_anything_is_written() {
    let parent = scratch();
    let dir = parent.join("adapter");
    let a = adapter(2, 4, 4, 4.0, false, 1);
    let r = adapter(2, 4, 4, 4.0, true, 2);
    let cfg = AdapterSaveConfig::default();
    let cases: Vec<(Vec<(String, &LoraAdapter)>, &str)> = vec![
        (vec![], "at least one"),
        (vec![("m.q".into(), &a), ("m.q".into(), &a)], "given twice"),
        (vec![("m.q".into(), &a), ("m.k".into(), &r)], "use_rslora"),
        (vec![("".into(), &a)], "module path"),
        (vec![("m..q".into(), &a)], "module path"),
        (vec![("m.q proj".into(), &a)], "module path"),
        (vec![("m.(q|k)".into(), &a)], "module path"),
    ];
    for (modules, want) in cases {
        let err = save_adapter(&dir, &cfg, &modules).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("expected"), "{want}: {err}");
        assert!(!dir.exists());
        assert!(leftovers(&parent).is_empty());
    }
    std::fs::remove_dir_all(parent).unwrap();
}

#[test]
fn an_existing_directory_is_replaced_only_when_asked_and_only_if_it_is_an_adapter() {
    let parent = scratch();
    let dir = parent.join("adapter");
    let one = adapter(2, 4, 4, 4.0, false, 1);
    let two = adapter(2, 4, 4, 4.0, false, 2);
    let mut cfg = AdapterSaveConfig::default();
    save_adapter(&dir, &cfg, &[("m.q".into(), &one)]).unwrap();
    std::fs::write(dir.join("README.md"), "model card").unwrap();

    let err = save_adapter(&dir, &cfg, &[("m.q".into(), &two)]).unwrap_err().to_string();
    assert!(err.contains("exists") && err.contains("overwrite"), "{err}");
    assert_eq!(PeftAdapter::load(&dir).unwrap().lora_adapter("m.q", "default").unwrap(), one, "untouched");

    cfg.overwrite = true;
    save_adapter(&dir, &cfg, &[("m.q".into(), &two)]).unwrap();
    assert_eq!(PeftAdapter::load(&dir).unwrap().lora_adapter("m.q", "default").unwrap(), two);
    assert!(!dir.join("README.md").exists(), "the old directory is replaced as a whole");
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));

    // Not adapter directories: refused even with overwrite, and left as they were.
    let other = parent.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let err = save_adapter(&other, &cfg, &[("m.q".into(), &two)]).unwrap_err().to_string();
    assert!(err.contains("not an adapter directory"), "{err}");
    assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "keep me");
    std::fs::create_dir(dir.join("sub")).unwrap();
    let err = save_adapter(&dir, &cfg, &[("m.q".into(), &one)]).unwrap_err().to_string();
    assert!(err.contains("subdirectory"), "{err}");
    let file = parent.join("file");
    std::fs::write(&file, "x").unwrap();
    let err = save_adapter(&file, &cfg, &[("m.q".into(), &one)]).unwrap_err().to_string();
    assert!(err.contains("regular file"), "{err}");
    assert!(leftovers(&parent).is_empty());

    // An empty directory may be replaced.
    let empty = parent.join("empty");
    std::fs::create_dir(&empty).unwrap();
    save_adapter(&empty, &cfg, &[("m.q".into(), &one)]).unwrap();
    assert!(PeftAdapter::load(&empty).is_ok());
    std::fs::remove_dir_all(parent).unwrap();
}
