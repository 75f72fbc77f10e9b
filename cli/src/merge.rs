//! `lowbit merge`: folds a PEFT LoRA adapter into the layers of a checkpoint and reports, per layer, how much
//! of the adapter's change survived. By default the merged weights are requantized in the base's own format
//! ([`lowbit::merge`]; bitsandbytes 4-bit or lowbit int8, every other tensor and the metadata copied); with
//! `--dtype` they are written dense (and so is every other quantized weight), with `--scheme` requantized to
//! another scheme (and so is every other quantized weight not already in it).

use crate::adapter;
use crate::console;
use crate::error::{CliError, Context, PathContext};
use crate::layer;
use crate::output::{check_output, protect_inputs};
use crate::progress::Progress;
use crate::quantized::{
    dequantize_weight, describe_weight, f32_to_bytes, is_in_scheme, load_from_checkpoint, quantize_f32, round_to,
    stored_name, weight_to_tensors, Layout, Quantized,
};
use crate::table::{Align, Table};
use lowbit::format::ggml::GgmlType;
use lowbit::io::{float_dtype, int8, safetensors_dtype, Checkpoint, SafetensorsWriter, StoredType, TensorData};
use lowbit::linear::QuantWeight;
use lowbit::lora::LoraAdapter;
use lowbit::{DType, Scheme};
use lowbit_testkit::stats::fmt_db;
use std::collections::{BTreeSet, HashSet};
use std::path::Path;

/// What the merged weights become.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Requantized in the base's own format (the default).
    Same,
    /// Written dense in this dtype, without requantization (`--dtype`).
    Dense(DType),
    /// Requantized to this scheme (`--scheme`).
    Scheme(Scheme),
}

/// What to merge.
pub struct Merge<'a> {
    /// The base checkpoint (file, model directory, sharded directory or GGUF).
    pub base: &'a Path,
    /// The PEFT adapter directory.
    pub adapter: &'a Path,
    /// The output safetensors file.
    pub output: &'a Path,
    /// Replace `output` if it exists (never an input).
    pub force: bool,
    /// What the merged weights become.
    pub target: Target,
}

/// How much of the adapter's change `Δ = s·B·A` a merged weight kept, with `Δ' = W' − dequant(W)`, and the
/// error the final rounding added against the target `dequant(W) + Δ`.
struct Survival {
    /// `<Δ', Δ> / ‖Δ‖²` (NaN for a zero adapter).
    kept: f64,
    /// `‖Δ' − Δ‖ / ‖Δ‖` (NaN for a zero adapter).
    ratio: f64,
    /// Whether `‖Δ' − Δ‖ ≥ ‖Δ‖ > 0`: the rounding error is at least the adapter's change.
    lost: bool,
    /// `max |Δ|`.
    delta_max: f32,
    /// `max |W' − target|`.
    max_abs: f32,
    /// `sqrt(mean((W' − target)²))`.
    rms: f64,
    /// `10·log10(Σ target² / Σ (W' − target)²)` in dB.
    sqnr_db: f64,
}

impl Survival {
    /// Compares `merged` (W') with `base` (dequant(W)) and `delta` (Δ), all `[out, in]`; the target is
    /// `base + delta` in f32, as [`lowbit::merge`] computes it. Sums in f64.
    fn compute(base: &[f32], delta: &[f32], merged: &[f32]) -> Survival {
        let (mut dot, mut dd, mut diff) = (0f64, 0f64, 0f64);
        let (mut max_abs, mut delta_max, mut err_sq, mut sig_sq) = (0f32, 0f32, 0f64, 0f64);
        for ((&w0, &d), &w1) in base.iter().zip(delta).zip(merged) {
            let t = w0 + d;
            let e = w1 - t;
            max_abs = max_abs.max(e.abs());
            delta_max = delta_max.max(d.abs());
            err_sq += f64::from(e) * f64::from(e);
            sig_sq += f64::from(t) * f64::from(t);
            let (dp, d) = (f64::from(w1) - f64::from(w0), f64::from(d));
            dot += dp * d;
            dd += d * d;
            diff += (dp - d) * (dp - d);
        }
        let n = base.len().max(1) as f64;
        Survival {
            kept: dot / dd,
            ratio: (diff / dd).sqrt(),
            lost: dd > 0.0 && diff >= dd,
            delta_max,
            max_abs,
            rms: (err_sq / n).sqrt(),
            sqnr_db: if err_sq == 0.0 { f64::INFINITY } else { 10.0 * (sig_sq / err_sq).log10() },
        }
    }
}

/// `Δ = s·B·A` in f32 (`[out, in]`), in PEFT's order, as [`lowbit::merge::merge_adapter`] forms it:
/// `(B·A)[o, k]` accumulated over `j` in increasing order, then multiplied by `s`.
fn lora_delta(a: &LoraAdapter) -> Vec<f32> {
    let (out, inp, r, s) = (a.out_features(), a.in_features(), a.rank(), a.scaling());
    let mut delta = vec![0f32; out * inp];
    for (o, row) in delta.chunks_exact_mut(inp).enumerate() {
        for j in 0..r {
            let bj = a.b()[o * r + j];
            for (dk, ak) in row.iter_mut().zip(&a.a()[j * inp..(j + 1) * inp]) {
                *dk += bj * ak;
            }
        }
        for dk in row.iter_mut() {
            *dk *= s;
        }
    }
    delta
}

/// The shape `[out, in]` and source dtype of the dense 2-D weight `{path}.weight` of `ck`, if it has one that
/// lowbit can decode to f32.
fn dense_weight(ck: &Checkpoint, path: &str) -> Option<([usize; 2], DType)> {
    let info = ck.tensor_info(&format!("{path}.weight")).ok()?;
    let dtype = match info.stored {
        StoredType::Safetensors(d) => float_dtype(d)?,
        StoredType::Ggml(t) if t.can_dequantize() => ggml_float(t).unwrap_or(DType::F32),
        StoredType::Ggml(_) => return None,
    };
    match info.shape[..] {
        [o, i] => Some(([o, i], dtype)),
        _ => None,
    }
}

/// The float dtype a ggml type stores exactly, if it is one (F32, F16, BF16).
fn ggml_float(t: GgmlType) -> Option<DType> {
    match t {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// One layer to merge: its module path and whether its weight is quantized (else dense).
struct Matched<'p> {
    path: &'p str,
    quantized: bool,
}

/// Merges the adapter into the base and writes the output (see the module docs).
pub fn run(m: Merge<'_>) -> Result<(), CliError> {
    let inputs = [(m.base, "the base checkpoint (or a file of it)"), (m.adapter, "a file of the adapter directory")];
    protect_inputs(&inputs, m.output)?;
    check_output(m.base, m.output, m.force)?;
    let ck = Checkpoint::open(m.base)?;
    let files: Vec<(&Path, &str)> = ck.files().into_iter().map(|f| (f, "a file of the base checkpoint")).collect();
    protect_inputs(&files, m.output)?;
    let file_name = m.base.display().to_string();
    let layout = Layout::of(&ck);
    if layout.is_none() && m.target == Target::Same {
        return Err(CliError::new(format!(
            "{file_name} holds no quantized layers (no `lowbit.scheme` metadata and no bitsandbytes quant_state \
             entries), so there is no format to requantize into; pass --dtype f16|bf16|f32 to write the merged \
             model dense, or --scheme SCHEME to quantize the merged layers"
        )));
    }
    let peft = adapter::load(m.adapter)?;
    let name = adapter::name(&peft);
    let is_gguf =
        ck.tensor_names().iter().any(|n| matches!(ck.tensor_info(n), Ok(i) if matches!(i.stored, StoredType::Ggml(_))));

    // Every adapter module with a quantized layer of the same path is merged; with --dtype or --scheme, so is
    // one with a dense 2-D weight. The rest are reported.
    let layer_paths = layout.as_ref().map(layer::paths).unwrap_or_default();
    let mut matched: Vec<Matched<'_>> = Vec::new();
    let mut unmatched: Vec<&str> = Vec::new();
    for module in peft.modules() {
        let p = module.path.as_str();
        if layer_paths.binary_search(&p).is_ok() {
            matched.push(Matched { path: p, quantized: true });
        } else if m.target != Target::Same && dense_weight(&ck, p).is_some() {
            matched.push(Matched { path: p, quantized: false });
        } else {
            unmatched.push(p);
        }
    }
    if matched.is_empty() {
        let modules: Vec<&str> = peft.modules().iter().map(|m| m.path.as_str()).collect();
        return Err(CliError::new(format!(
            "adapter {} matches no layer of {file_name}: its modules are {}; the quantized layers are {}",
            m.adapter.display(),
            layer::list(&modules),
            if layer_paths.is_empty() { "none".to_string() } else { layer::list(&layer_paths) }
        )));
    }

    let progress = Progress::new(matched.len() as u64, "merging");
    let mut table = Table::new(&[
        ("layer", Align::Left),
        ("format", Align::Left),
        ("shape", Align::Left),
        ("rank", Align::Right),
        ("scaling", Align::Right),
        ("max |s*B*A|", Align::Right),
        ("kept", Align::Right),
        ("|Δ'-Δ|/|Δ|", Align::Right),
        ("added max abs err", Align::Right),
        ("added RMS err", Align::Right),
        ("SQNR dB", Align::Right),
        ("", Align::Left),
    ]);
    // The output, written tensor by tensor as it is produced (memory stays at one layer, not the model).
    let meta_bytes = ck.metadata().iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>() + 4096;
    let mut writer =
        SafetensorsWriter::create(m.output, SafetensorsWriter::header_estimate(ck.tensor_names(), meta_bytes))?;
    // The merged weights (written already); source dtypes of int8 weights for the metadata.
    let mut merged: BTreeSet<String> = BTreeSet::new();
    let mut int8_dtypes: Vec<(String, DType)> = Vec::new();
    let (mut n_lost, mut formats) = (0usize, Vec::<String>::new());
    for mt in &matched {
        let path = mt.path;
        progress.set_message(path);
        let weight_name = format!("{path}.weight");
        let ctx = || format!("merging into layer `{path}`");
        // dequant(W), its shape and source dtype; the quantized layer when there is one.
        let (w0, shape, source, layer) = if mt.quantized {
            let layer = layer::load(&ck, path)?;
            let w0 = dequantize_weight(layer.weight()).context(ctx)?;
            let source = match (layer.weight(), &layout) {
                (QuantWeight::FourBit(t), _) => t.dtype(),
                (QuantWeight::Int8(_), Some(Layout::Int8(l))) => {
                    l.weights.get(&weight_name).copied().unwrap_or(DType::F32)
                }
                _ => DType::F32,
            };
            let shape = [layer.out_features(), layer.in_features()];
            (w0, shape, source, Some(layer))
        } else {
            let (shape, source) = dense_weight(&ck, path).ok_or_else(|| CliError::new("not a dense weight"))?;
            (ck.tensor_f32(&weight_name).context(ctx)?, shape, source, None)
        };
        let lora = peft.lora_adapter(path, &name).path_context(m.adapter, "adapter", "adapter").context(ctx)?;
        if (lora.out_features(), lora.in_features()) != (shape[0], shape[1]) {
            return Err(CliError::new(format!(
                "adapter {}: module `{path}` has A [{}, {}] and B [{}, {}], which do not fit the weight {shape:?} \
                 (expected A [r, {}], B [{}, r])",
                m.adapter.display(),
                lora.rank(),
                lora.in_features(),
                lora.out_features(),
                lora.rank(),
                shape[1],
                shape[0]
            )));
        }
        let delta = lora_delta(&lora);
        let (rank, scaling) = (lora.rank(), lora.scaling());
        let (entries, w1, format) = match (m.target, layer) {
            (Target::Same, Some(mut layer)) => {
                layer.add_adapter(lora).context(ctx)?;
                let (w, _) = lowbit::merge::merge_adapter(&layer, &name).context(ctx)?;
                let w1 = dequantize_weight(&w)?;
                if let QuantWeight::Int8(_) = w {
                    int8_dtypes.push((weight_name.clone(), source));
                }
                (weight_to_tensors(&weight_name, &w).context(ctx)?, w1, describe_weight(&w))
            }
            (Target::Scheme(s), _) => {
                let target = merged_target(&w0, &delta, path)?;
                let w = quantize_f32(&target, &shape, s, source).context(ctx)?;
                let w1 = dequantize_weight(&w)?;
                if let QuantWeight::Int8(_) = w {
                    int8_dtypes.push((weight_name.clone(), source));
                }
                (weight_to_tensors(&weight_name, &w).context(ctx)?, w1, describe_weight(&w))
            }
            (Target::Dense(dt), _) => {
                let target = merged_target(&w0, &delta, path)?;
                let data =
                    TensorData { dtype: safetensors_dtype(dt), shape: shape.to_vec(), data: f32_to_bytes(&target, dt) };
                (vec![(weight_name.clone(), data)], round_to(&target, dt), format!("{dt} (dense)"))
            }
            (Target::Same, None) => return Err(CliError::new(format!("layer `{path}` is not quantized"))),
        };
        let s = Survival::compute(&w0, &delta, &w1);
        n_lost += usize::from(s.lost);
        if !formats.contains(&format) {
            formats.push(format.clone());
        }
        table.push(vec![
            path.to_string(),
            format,
            format!("{shape:?}"),
            rank.to_string(),
            format!("{scaling}"),
            format!("{:.3e}", s.delta_max),
            if s.kept.is_nan() { "-".into() } else { format!("{:.1}%", 100.0 * s.kept) },
            if s.ratio.is_nan() { "-".into() } else { format!("{:.3}", s.ratio) },
            format!("{:.3e}", s.max_abs),
            format!("{:.3e}", s.rms),
            fmt_db(s.sqnr_db),
            if s.lost { "!".into() } else { String::new() },
        ]);
        for (name, t) in &entries {
            writer.push(name, t)?;
        }
        merged.insert(weight_name);
        progress.inc();
    }

    // Every other tensor: copied, or (with --dtype / --scheme) converted.
    progress.set_message("writing");
    let mut unchanged: HashSet<String> = HashSet::new();
    let (mut n_converted, mut n_kept) = (0usize, 0usize);
    // `out` holds the entries of one tensor at a time: written at the start of the next iteration.
    let mut out: Vec<(String, TensorData)> = Vec::new();
    for key in ck.tensor_names() {
        for (name, t) in out.drain(..) {
            writer.push(&name, &t)?;
        }
        if merged.contains(key) {
            continue;
        }
        if let Some(owner) = layout.as_ref().and_then(|l| l.owner_of_param_entry(key)) {
            let copy = !merged.contains(owner)
                && match m.target {
                    Target::Same => true,
                    Target::Dense(_) => false,
                    Target::Scheme(_) => unchanged.contains(owner),
                };
            if copy {
                out.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?)));
            }
            continue;
        }
        if let Some(l) = layout.as_ref().filter(|l| l.is_weight(key)) {
            let ctx = || format!("tensor `{key}`");
            match m.target {
                Target::Same => out.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?))),
                Target::Dense(dt) => {
                    let q = load_from_checkpoint(&ck, l, key).context(ctx)?;
                    let data = q.dequantize_to_bytes(dt).context(ctx)?;
                    out.push((
                        key.to_string(),
                        TensorData { dtype: safetensors_dtype(dt), shape: q.shape().to_vec(), data },
                    ));
                    n_converted += 1;
                }
                Target::Scheme(s) => {
                    let q = load_from_checkpoint(&ck, l, key).context(ctx)?;
                    let source = q.source_dtype();
                    let shape = q.shape().to_vec();
                    let is_int8 = matches!(q, Quantized::Int8(..));
                    let w = q.into_weight();
                    if is_in_scheme(&w, s) {
                        out.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?)));
                        unchanged.insert(key.to_string());
                        n_kept += 1;
                        if is_int8 {
                            int8_dtypes.push((key.to_string(), source));
                        }
                    } else {
                        let w = quantize_f32(&dequantize_weight(&w)?, &shape, s, source).context(ctx)?;
                        if let QuantWeight::Int8(_) = w {
                            int8_dtypes.push((key.to_string(), source));
                        }
                        out.extend(weight_to_tensors(key, &w).context(ctx)?);
                        n_converted += 1;
                    }
                }
            }
            continue;
        }
        let info = ck.tensor_info(key)?;
        match info.stored {
            StoredType::Safetensors(_) => out.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?))),
            StoredType::Ggml(t) => {
                let ctx = || format!("tensor `{key}` ({})", t.name());
                let values = ck.tensor_f32(key).context(ctx)?;
                match (ggml_float(t), m.target) {
                    (Some(dt), _) | (None, Target::Dense(dt)) => {
                        let data = f32_to_bytes(&values, dt);
                        out.push((
                            key.to_string(),
                            TensorData { dtype: safetensors_dtype(dt), shape: info.shape.clone(), data },
                        ));
                        n_converted += usize::from(ggml_float(t).is_none());
                    }
                    (None, Target::Scheme(s)) if info.shape.len() >= 2 => {
                        let w = quantize_f32(&values, &info.shape, s, DType::F32).context(ctx)?;
                        if let QuantWeight::Int8(_) = w {
                            int8_dtypes.push((key.to_string(), DType::F32));
                        }
                        out.extend(weight_to_tensors(key, &w).context(ctx)?);
                        n_converted += 1;
                    }
                    (None, _) => {
                        out.push((
                            key.to_string(),
                            TensorData::from_slice(safetensors::Dtype::F32, info.shape.clone(), &values),
                        ));
                        n_converted += 1;
                    }
                }
            }
        }
    }

    for (name, t) in out.drain(..) {
        writer.push(&name, &t)?;
    }

    let mut metadata = if is_gguf { Default::default() } else { ck.metadata().clone() };
    if m.target != Target::Same {
        metadata.retain(|k, _| !k.starts_with("lowbit."));
        if let Target::Scheme(Scheme::Int8(g)) = m.target {
            metadata.extend(int8::metadata(g, int8_dtypes.iter().map(|(n, d)| (n.as_str(), *d))));
        }
    }
    writer.extend_metadata(metadata);
    writer.finish(m.force)?;
    drop(progress);

    console::out(&table.render())?;
    let untouched = layer_paths.len() - matched.iter().filter(|mt| mt.quantized).count();
    let mut summary = match m.target {
        Target::Same => format!(
            "merged adapter {} into {} layer(s) of {file_name} and requantized them (kept: <Δ',Δ>/|Δ|² with Δ = \
             s*B*A and Δ' = requantized - dequant(W); added error: requantized weight vs dequant(W) + s*B*A); \
             {untouched} other quantized layer(s) and every other tensor copied unchanged; wrote {}",
            m.adapter.display(),
            matched.len(),
            m.output.display()
        ),
        Target::Dense(dt) => format!(
            "merged adapter {} into {} layer(s) of {file_name} and wrote them dense in {dt} (no requantization); \
             {n_converted} other quantized tensor(s) dequantized to {dt}, every other tensor copied unchanged; \
             wrote {}",
            m.adapter.display(),
            matched.len(),
            m.output.display()
        ),
        Target::Scheme(s) => format!(
            "merged adapter {} into {} layer(s) of {file_name} and quantized them to {s}; {n_converted} other \
             quantized tensor(s) requantized to {s}, {n_kept} already in it and every other tensor copied \
             unchanged; wrote {}",
            m.adapter.display(),
            matched.len(),
            m.output.display()
        ),
    };
    if !unmatched.is_empty() {
        summary.push_str(&format!(
            "\n{} adapter module(s) matched no {}layer and were not merged: {}",
            unmatched.len(),
            if m.target == Target::Same { "quantized " } else { "" },
            unmatched.iter().map(|p| unmatched_reason(&ck, p)).collect::<Vec<_>>().join(", ")
        ));
    }
    console::line(&summary)?;
    if n_lost > 0 {
        eprintln!(
            "warning: in {n_lost} of {} merged layer(s) (marked `!` above) the error of storing the merged weight \
             ({}) is at least as large as the adapter's change (|Δ'-Δ| >= |Δ|): the adapter's effect is lost in \
             rounding noise. Ways out: {}.",
            matched.len(),
            formats.join(", "),
            ways_out(m.target)
        );
    }
    Ok(())
}

/// The options that store a merged weight more finely than `target` does.
fn ways_out(target: Target) -> &'static str {
    match target {
        Target::Same | Target::Scheme(Scheme::FourBit { .. }) => {
            "`lowbit merge --dtype f16|bf16|f32` writes the merged weights dense, without requantization; \
             `lowbit merge --scheme int8:channel` (or another finer scheme) requantizes them to a finer format"
        }
        Target::Scheme(Scheme::Int8(_)) => {
            "`lowbit merge --dtype f16|bf16|f32` writes the merged weights dense, without requantization; \
             `--scheme int8:group:64` (smaller groups) requantizes them more finely"
        }
        Target::Dense(DType::BF16) => "`--dtype f16` (3 more mantissa bits) or `--dtype f32` (exact)",
        Target::Dense(DType::F16) => "`--dtype f32` (exact)",
        Target::Dense(DType::F32) => "none finer than f32; check the adapter's scaling",
    }
}

/// `dequant(W) + Δ` in f32, checked finite.
fn merged_target(w0: &[f32], delta: &[f32], path: &str) -> Result<Vec<f32>, CliError> {
    let t: Vec<f32> = w0.iter().zip(delta).map(|(w, d)| w + d).collect();
    if let Some(i) = t.iter().position(|v| !v.is_finite()) {
        return Err(CliError::new(format!(
            "merging into layer `{path}`: the merged weight is {} at flat index {i} (overflow); expected finite \
             values",
            t[i]
        )));
    }
    Ok(t)
}

/// `` `P` `` with why it matched nothing (a plain weight, or no weight at all).
fn unmatched_reason(ck: &Checkpoint, path: &str) -> String {
    match ck.tensor_info(&format!("{path}.weight")) {
        Ok(info) => format!("`{path}` (`{path}.weight` is a plain {} tensor)", stored_name(info.stored)),
        Err(_) => format!("`{path}` (no such layer)"),
    }
}
