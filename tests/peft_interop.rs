//! lowbit + PEFT adapters against PEFT 0.21 itself, and merging adapters into quantized weights.
//!
//! Fixtures come from `tests/data/gen_peft_fixture.py` (read its header): a bitsandbytes 4-bit base checkpoint
//! (`peft_base.safetensors`, three `Linear4bit` layers), two adapter directories written by PEFT's
//! `save_pretrained` (`peft_adapter/`: r = 8, alpha 16, f32; `peft_adapter_rslora/`: rsLoRA, rank/alpha
//! patterns, bf16), and `peft_io.safetensors` with inputs and PEFT's f32 outputs.
//!
//! # Tolerances
//! `u = 2⁻²⁴` is the f32 unit roundoff; we write `EPS = f32::EPSILON = 2u`, which also absorbs the
//! `1/(1 − n·u)` factors of the standard bound `|fl(Σ aᵢ) − Σ aᵢ| ≤ γₙ·Σ|aᵢ|`, `γₙ = n·u/(1 − n·u)`, valid for
//! any summation order, blocking or FMA use (so for torch's GEMM as for ours).
//!
//! **Forward vs PEFT.** Both sides compute, in f32 and from bit-identical operands (the f32 dequantized weight
//! equals PEFT's `W` bit for bit, checked below; the LoRA matrices are the same f32 values),
//! `y = (x·Wᵀ + b) + fl(s)·((x·Aᵀ)·Bᵀ)`. Per side, with `T_j = Σ_k |x_k|·|A_jk|`:
//! * base `x·Wᵀ + b`: at most `(K+1)·u·(Σ_k |x_k w_ok| + |b_o|)`;
//! * shrink `t = x·Aᵀ`: `|t̂_j − t_j| ≤ K·u·T_j`; expand `t̂·Bᵀ`: `≤ (K+r)·u·Σ_j T_j |B_oj|` to first order;
//! * scaling: PEFT rounds `alpha/√r` (f64) to f32 once, lowbit computes it in f32 (`√` then `/`, two
//!   roundings): `≤ 2u` relative, plus one rounding for the product and one for the final add.
//!
//! So each side is within `(K+r+4)·u·S` of the exact value, `S = Σ_k|x_k w_ok| + |b_o| + |s|·Σ_j T_j|B_oj|`,
//! and the two sides within `2·(K+r+4)·u·S ≤ (K+r+4)·EPS·S`. PEFT computes in f32 here, so there is no
//! dtype term.
//!
//! **Merged vs unmerged.** Exactly, `y_merged − y_unmerged = Σ_k x_k·E_ok` with
//! `E = dequant(W') − (W + s·B·A)` (computed in f64 from the f32 operands: exact to ~1e-16 relative). Adding
//! both forwards' rounding: `|Δy_o| ≤ Σ_k |x_k|·|E_ok| + (K+2)·EPS·(Σ_k|x_k w'_ok| + |b_o|) + (K+r+4)·EPS·S`.
#![cfg(feature = "io")]

use lowbit::affine::{quantize, Granularity};
use lowbit::io::peft::{load_quant_linears, quant_linears_from, PeftAdapter, TargetModules};
use lowbit::io::{int8, parse_safetensors, serialize_safetensors, view_to_f32, SafetensorsFile, TensorData};
use lowbit::linear::{QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::merge::{merge_adapter, merge_into_layer, MergeReport};
use lowbit::nf4::BlockScales;
use lowbit::DType;
use safetensors::Dtype;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const UP: &str = "model.layers.0.mlp.up_proj";
const DOWN: &str = "model.layers.0.mlp.down_proj";
const GATE: &str = "model.layers.0.mlp.gate_proj";
const EPS: f64 = f32::EPSILON as f64;

fn base_layers() -> Vec<(String, QuantLinear)> {
    load_quant_linears(&SafetensorsFile::open(format!("{DATA}/peft_base.safetensors")).unwrap()).unwrap()
}

fn io_tensor(key: &str) -> Vec<f32> {
    let f = SafetensorsFile::open(format!("{DATA}/peft_io.safetensors")).unwrap();
    let st = f.tensors().unwrap();
    let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    view_to_f32(key, &v).unwrap()
}

fn layer<'a>(layers: &'a [(String, QuantLinear)], path: &str) -> &'a QuantLinear {
    &layers.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no layer {path}")).1
}

/// `Σ_k |x_k w_ok| + |b_o| + |s|·Σ_j T_j |B_oj|` for row `m`, output `o`, with `w` the f32 weight and the
/// layer's enabled adapters.
fn magnitude(l: &QuantLinear, w: &[f32], x: &[f32], m: usize, o: usize) -> f64 {
    let k = l.in_features();
    let xr = &x[m * k..(m + 1) * k];
    let mut s: f64 = xr.iter().zip(&w[o * k..(o + 1) * k]).map(|(a, b)| f64::from(a * b).abs()).sum();
    s += l.bias().map_or(0.0, |b| f64::from(b[o].abs()));
    for ad in l.adapters().iter().filter(|a| a.is_enabled()) {
        let r = ad.rank();
        for j in 0..r {
            let t: f64 = xr.iter().zip(&ad.a()[j * k..(j + 1) * k]).map(|(a, b)| f64::from(a.abs() * b.abs())).sum();
            s += f64::from(ad.scaling().abs()) * t * f64::from(ad.b()[o * r + j].abs());
        }
    }
    s
}

fn max_rank(l: &QuantLinear) -> usize {
    l.adapters().iter().map(LoraAdapter::rank).max().unwrap_or(0)
}

#[test]
fn base_checkpoint_gives_layers_with_bnb_reference_weights() {
    let layers = base_layers();
    let paths: Vec<&str> = layers.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, [DOWN, GATE, UP]);
    for path in [UP, DOWN] {
        let l = layer(&layers, path);
        let w = l.weight().dequantize_reference();
        let want = io_tensor(&format!("{path}.w_dequant"));
        assert!(w.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{path}: dequant differs from bnb");
        let QuantWeight::FourBit(t) = l.weight() else { panic!("4-bit expected") };
        assert!(matches!(t.scales(), BlockScales::Double(_)));
    }
    assert_eq!(layer(&layers, UP).bias().map(<[f32]>::len), Some(96));
    assert!(layer(&layers, DOWN).bias().is_none() && layer(&layers, GATE).bias().is_none());
    assert_eq!(layer(&layers, DOWN).weight().shape(), &[48, 128]);
}

#[test]
fn adapter_configs_are_read() {
    let a = PeftAdapter::load(format!("{DATA}/peft_adapter")).unwrap();
    let c = a.config();
    assert_eq!((c.r, c.lora_alpha, c.use_rslora), (8, 16.0, false));
    assert_eq!(c.target_modules, TargetModules::Names(vec!["down_proj".into(), "up_proj".into()]));
    assert_eq!(a.modules().iter().map(|m| m.path.as_str()).collect::<Vec<_>>(), [DOWN, UP]);
    assert_eq!(a.key_adapter_name(), None);
    let up = a.module(UP).unwrap();
    assert_eq!((up.rank, up.in_features, up.out_features), (8, 80, 96));
    assert!(up.b.iter().any(|v| *v != 0.0), "init_lora_weights=False gives a non-zero B");

    let r = PeftAdapter::load(format!("{DATA}/peft_adapter_rslora")).unwrap();
    assert!(r.config().use_rslora);
    assert_eq!(r.config().target_modules, TargetModules::Pattern(r".*\.(up|down)_proj".into()));
    let (up, down) = (r.module(UP).unwrap(), r.module(DOWN).unwrap());
    assert_eq!((up.rank, up.alpha), (4, 8.0));
    assert_eq!((down.rank, down.alpha), (2, 3.0), "rank_pattern / alpha_pattern for down_proj");
    assert_eq!(r.lora_adapter(UP, "x").unwrap().scaling(), 4.0);
    assert_eq!(r.lora_adapter(DOWN, "x").unwrap().scaling(), 3.0 / 2f32.sqrt());
}

#[test]
fn attach_report_lists_matches() {
    let mut layers = base_layers();
    let a = PeftAdapter::load(format!("{DATA}/peft_adapter")).unwrap();
    let rep = a.attach(&mut layers, "default").unwrap();
    assert_eq!(rep.attached, [DOWN, UP]);
    assert!(rep.unmatched_modules.is_empty() && rep.all_modules_attached());
    assert_eq!(rep.layers_without_adapter, [GATE]);
    assert!(layer(&layers, GATE).adapters().is_empty());
    assert_eq!(layer(&layers, UP).adapters()[0].name(), "default");

    // Same name again: an error, and nothing changes.
    let err = a.attach(&mut layers, "default").unwrap_err();
    assert!(err.to_string().contains("already attached"), "{err}");
    assert_eq!(layer(&layers, UP).adapters().len(), 1);

    // A subset of layers: down_proj's module is reported unmatched.
    let mut some: Vec<_> = base_layers().into_iter().filter(|(p, _)| p != DOWN).collect();
    let rep = a.attach(&mut some, "default").unwrap();
    assert_eq!(
        (rep.attached.as_slice(), rep.unmatched_modules.as_slice()),
        ([UP.to_string()].as_slice(), [DOWN.to_string()].as_slice())
    );
    assert!(!rep.all_modules_attached());

    // A layer of the right path but the wrong shape: an error, and no layer was modified (all-or-nothing).
    let mut wrong = base_layers();
    let gate = wrong.iter().position(|(p, _)| p == GATE).unwrap();
    wrong[gate].0 = DOWN.to_string(); // [96, 80] where the adapter expects [48, 128]
    wrong.retain(|(p, l)| p != DOWN || l.out_features() == 96);
    let err = a.attach(&mut wrong, "default").unwrap_err();
    assert!(err.to_string().contains("down_proj"), "{err}");
    assert!(wrong.iter().all(|(_, l)| l.adapters().is_empty()));
}

/// lowbit's forward with the adapter attached reproduces PEFT's output within the bound of the module docs.
#[test]
fn forward_matches_peft() {
    for adir in ["peft_adapter", "peft_adapter_rslora"] {
        let mut layers = base_layers();
        PeftAdapter::load(format!("{DATA}/{adir}")).unwrap().attach(&mut layers, "default").unwrap();
        for path in [UP, DOWN] {
            let l = layer(&layers, path);
            let x = io_tensor(&format!("{path}.x"));
            let want = io_tensor(&format!("{path}.y.{adir}"));
            let w = l.weight().dequantize_reference();
            let (k, n, r) = (l.in_features(), l.out_features(), max_rank(l));
            for (label, y) in [
                ("forward", l.forward(&x).unwrap()),
                ("forward_reference", l.forward_with(&x, lowbit::linear::ForwardOptions::reference()).unwrap()),
            ] {
                assert_eq!(y.len(), want.len());
                let (mut worst, mut worst_ratio) = (0.0f64, 0.0f64);
                for m in 0..x.len() / k {
                    for o in 0..n {
                        let i = m * n + o;
                        let err = (f64::from(y[i]) - f64::from(want[i])).abs();
                        let tol = (k + r + 4) as f64 * EPS * magnitude(l, &w, &x, m, o);
                        assert!(
                            err <= tol,
                            "{adir} {path} {label} [{m}, {o}]: {} vs PEFT {} (err {err:e} > {tol:e})",
                            y[i],
                            want[i]
                        );
                        worst = worst.max(err);
                        worst_ratio = worst_ratio.max(err / tol);
                    }
                }
                println!("{adir} {path} {label}: max |y − y_peft| = {worst:.3e}, max err/bound = {worst_ratio:.3}");
            }
        }
    }
}

/// Checks a merge: same format parameters, report consistent, merged output within the requantization bound.
fn check_merge(l: &QuantLinear, x: &[f32], name: &str) -> MergeReport {
    let (merged, rep) = merge_into_layer(l, name).unwrap();
    assert!(merged.adapter_id(name).is_none());
    match (l.weight(), merged.weight()) {
        (QuantWeight::FourBit(a), QuantWeight::FourBit(b)) => {
            assert_eq!((a.format(), a.blocksize(), a.dtype()), (b.format(), b.blocksize(), b.dtype()));
            assert_eq!(matches!(a.scales(), BlockScales::Double(_)), matches!(b.scales(), BlockScales::Double(_)));
        }
        (QuantWeight::Int8(a), QuantWeight::Int8(b)) => assert_eq!(a.granularity(), b.granularity()),
        _ => panic!("format changed"),
    }
    let ad = &l.adapters()[l.adapter_id(name).unwrap()];
    let (k, n, r, s) = (l.in_features(), l.out_features(), ad.rank(), f64::from(ad.scaling()));
    let w = l.weight().dequantize_reference();
    let w2 = merged.weight().dequantize_reference();
    // E = dequant(W') − (W + s·B·A), in f64.
    let mut e = vec![0.0f64; n * k];
    let mut max_e = 0.0f64;
    let mut target_mag = 0.0f64;
    for o in 0..n {
        for c in 0..k {
            let ba: f64 = (0..r).map(|j| f64::from(ad.b()[o * r + j]) * f64::from(ad.a()[j * k + c])).sum();
            let bam: f64 = (0..r).map(|j| f64::from((ad.b()[o * r + j] * ad.a()[j * k + c]).abs())).sum();
            e[o * k + c] = f64::from(w2[o * k + c]) - (f64::from(w[o * k + c]) + s * ba);
            max_e = max_e.max(e[o * k + c].abs());
            target_mag = target_mag.max(f64::from(w[o * k + c].abs()) + s.abs() * bam);
        }
    }
    // The report measures against the f32 target, which differs from the exact one by ≤ (r+2)·u·|target|.
    let slack = (r + 3) as f64 * EPS * target_mag;
    assert!((f64::from(rep.max_abs_error) - max_e).abs() <= slack, "{rep:?} vs max |E| {max_e:e}");
    assert!(rep.rms_error <= f64::from(rep.max_abs_error) && rep.sqnr_db.is_finite() && rep.sqnr_db > 0.0, "{rep:?}");
    assert_eq!((rep.numel, rep.scaling, rep.adapter.as_str()), (n * k, ad.scaling(), name));

    // Outputs: merged layer without the adapter vs the original layer with only this adapter enabled.
    let mut only = l.clone();
    for a in l.adapters() {
        only.set_adapter_enabled(a.name(), a.name() == name).unwrap();
    }
    let mut plain = merged.clone();
    for a in merged.adapters() {
        plain.set_adapter_enabled(a.name(), false).unwrap();
    }
    let y_u = only.forward(x).unwrap();
    let y_m = plain.forward(x).unwrap();
    let mut worst_ratio = 0.0f64;
    for m in 0..x.len() / k {
        let xr = &x[m * k..(m + 1) * k];
        for o in 0..n {
            let i = m * n + o;
            let req: f64 = xr.iter().zip(&e[o * k..(o + 1) * k]).map(|(a, b)| f64::from(a.abs()) * b.abs()).sum();
            let acc_m: f64 = xr.iter().zip(&w2[o * k..(o + 1) * k]).map(|(a, b)| f64::from(a * b).abs()).sum::<f64>()
                + l.bias().map_or(0.0, |b| f64::from(b[o].abs()));
            let tol = req + (k + 2) as f64 * EPS * acc_m + (k + r + 4) as f64 * EPS * magnitude(&only, &w, x, m, o);
            let err = (f64::from(y_m[i]) - f64::from(y_u[i])).abs();
            assert!(err <= tol, "[{m}, {o}]: merged {} vs unmerged {} (err {err:e} > bound {tol:e})", y_m[i], y_u[i]);
            worst_ratio = worst_ratio.max(err / tol);
        }
    }
    println!("  merged-vs-unmerged output: max err/bound = {worst_ratio:.3}");
    rep
}

#[test]
fn merge_into_bnb_layers_stays_within_requantization_bound() {
    for adir in ["peft_adapter", "peft_adapter_rslora"] {
        let mut layers = base_layers();
        PeftAdapter::load(format!("{DATA}/{adir}")).unwrap().attach(&mut layers, "default").unwrap();
        for path in [UP, DOWN] {
            let x = io_tensor(&format!("{path}.x"));
            let rep = check_merge(layer(&layers, path), &x, "default");
            println!(
                "{adir} {path}: |s·B·A| max {:.4} rms {:.4}; requantization error max {:.4} rms {:.5}, SQNR {:.2} dB",
                rep.delta_max_abs, rep.delta_rms, rep.max_abs_error, rep.rms_error, rep.sqnr_db
            );
        }
    }
}

#[test]
fn merge_zero_adapter_into_plain_4bit_is_lossless() {
    let layers = base_layers();
    let mut gate = layer(&layers, GATE).clone(); // FP4, plain scales
    gate.add_adapter(LoraAdapter::new("z", 2, vec![0.5; 2 * 80], vec![0.0; 96 * 2], 4.0, false).unwrap()).unwrap();
    let (w, rep) = merge_adapter(&gate, "z").unwrap();
    // Values, not codes: FP4 has two codes for zero (0 and 8), and requantizing 0.0 picks code 0.
    let (before, after) = (gate.weight().dequantize_reference(), w.dequantize_reference());
    assert!(before.iter().zip(&after).all(|(a, b)| a == b), "zero adapter changed the dequantized weight");
    let (QuantWeight::FourBit(a), QuantWeight::FourBit(b)) = (gate.weight(), &w) else { panic!("4-bit expected") };
    assert!(a.absmax() == b.absmax(), "block scales changed");
    assert_eq!((rep.max_abs_error, rep.delta_max_abs), (0.0, 0.0));
    assert_eq!(rep.sqnr_db, f64::INFINITY);
}

#[test]
fn merge_unknown_adapter_is_an_error() {
    let layers = base_layers();
    let err = merge_adapter(layer(&layers, UP), "nope").unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

/// An int8 lowbit file built from the same weights: load, attach the PEFT adapter, merge.
#[test]
fn int8_checkpoint_attach_and_merge() {
    let base = base_layers();
    for gran in [Granularity::PerChannel, Granularity::PerGroup(32), Granularity::PerTensor] {
        let mut tensors = Vec::new();
        let mut names = Vec::new();
        for path in [UP, DOWN] {
            let l = layer(&base, path);
            let w = l.weight().dequantize_reference();
            let q = quantize(&w, l.weight().shape(), gran).unwrap();
            let name = format!("{path}.weight");
            tensors.extend(int8::to_tensors(&name, &q));
            if let Some(b) = l.bias() {
                tensors.push((format!("{path}.bias"), TensorData::from_slice(Dtype::F32, vec![b.len()], b)));
            }
            names.push(name);
        }
        tensors.push(("model.norm.weight".into(), TensorData::from_slice(Dtype::F32, vec![2], &[1.0f32, 1.0])));
        let meta = int8::metadata(gran, names.iter().map(|n| (n.as_str(), DType::F32)));
        let bytes = serialize_safetensors(&tensors, Some(meta)).unwrap();
        let st = parse_safetensors(&bytes).unwrap();
        let mut layers = quant_linears_from(&st, &int8::read_metadata(&bytes).unwrap()).unwrap();
        assert_eq!(layers.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), [DOWN, UP]);
        assert!(layer(&layers, UP).bias().is_some());
        let rep = PeftAdapter::load(format!("{DATA}/peft_adapter")).unwrap().attach(&mut layers, "default").unwrap();
        assert_eq!(rep.attached, [DOWN, UP]);
        assert!(rep.layers_without_adapter.is_empty());
        for path in [UP, DOWN] {
            let x = io_tensor(&format!("{path}.x"));
            let rep = check_merge(layer(&layers, path), &x, "default");
            println!(
                "int8 {gran} {path}: requantization error max {:.5} rms {:.6}, SQNR {:.2} dB",
                rep.max_abs_error, rep.rms_error, rep.sqnr_db
            );
        }
    }
}

#[test]
fn merge_keeps_other_adapters() {
    let mut layers = base_layers();
    PeftAdapter::load(format!("{DATA}/peft_adapter")).unwrap().attach(&mut layers, "a").unwrap();
    PeftAdapter::load(format!("{DATA}/peft_adapter_rslora")).unwrap().attach(&mut layers, "b").unwrap();
    let l = layer(&layers, UP);
    let x = io_tensor(&format!("{UP}.x"));
    check_merge(l, &x, "a");
    let (merged, _) = merge_into_layer(l, "a").unwrap();
    assert_eq!(merged.adapters().len(), 1);
    assert_eq!(merged.adapters()[0], l.adapters()[1]);
    assert_eq!(merged.bias(), l.bias());
}
