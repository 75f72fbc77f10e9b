//! `lowbit merge`: folds a PEFT LoRA adapter into the quantized layers of a checkpoint and requantizes them
//! ([`lowbit::merge`]), writing the same format as the base: the bitsandbytes layout for 4-bit weights,
//! lowbit's int8 layout otherwise. Every other tensor and the metadata are copied unchanged.

use crate::adapter;
use crate::console;
use crate::error::{CliError, Context};
use crate::int8_layout;
use crate::layer;
use crate::output::check_output;
use crate::progress::Progress;
use crate::quantized::{describe_weight, Layout};
use crate::table::{Align, Table};
use lowbit::io::{bnb, Checkpoint, TensorData};
use lowbit::linear::QuantWeight;
use lowbit_testkit::stats::fmt_db;
use std::collections::BTreeMap;
use std::path::Path;

/// Merges the adapter in `adapter_dir` into `base` and writes `output`.
pub fn run(base: &Path, adapter_dir: &Path, output: &Path, force: bool) -> Result<(), CliError> {
    check_output(base, output, force)?;
    let ck = Checkpoint::open(base)?;
    let metadata = ck.metadata().clone();
    let file_name = base.display().to_string();
    let layout = Layout::of(&ck).ok_or_else(|| {
        CliError::new(format!(
            "{file_name} holds no quantized layers (no `lowbit.scheme` metadata and no bitsandbytes quant_state \
             entries); merge needs a quantized base"
        ))
    })?;
    let peft = adapter::load(adapter_dir)?;
    let name = adapter::name(&peft);

    // Every adapter module with a quantized layer of the same path is merged; the rest are reported.
    let layer_paths = layer::paths(&layout);
    let (matched, unmatched): (Vec<&str>, Vec<&str>) =
        peft.modules().iter().map(|m| m.path.as_str()).partition(|p| layer_paths.binary_search(p).is_ok());
    if matched.is_empty() {
        let modules: Vec<&str> = peft.modules().iter().map(|m| m.path.as_str()).collect();
        return Err(CliError::new(format!(
            "adapter {} matches no layer of {file_name}: its modules are {}; the quantized layers are {}",
            adapter_dir.display(),
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
        ("added max abs err", Align::Right),
        ("added RMS err", Align::Right),
        ("SQNR dB", Align::Right),
    ]);
    let mut merged: BTreeMap<String, QuantWeight> = BTreeMap::new();
    for path in &matched {
        progress.set_message(path);
        let ctx = || format!("merging adapter {} into layer `{path}`", adapter_dir.display());
        let mut layer = layer::load(&ck, path, &file_name)?;
        layer.add_adapter(peft.lora_adapter(path, &name).context(ctx)?).context(ctx)?;
        let (weight, r) = lowbit::merge::merge_adapter(&layer, &name).context(ctx)?;
        let a = &layer.adapters()[0];
        table.push(vec![
            path.to_string(),
            describe_weight(&weight),
            format!("{:?}", weight.shape()),
            a.rank().to_string(),
            format!("{}", r.scaling),
            format!("{:.3e}", r.delta_max_abs),
            format!("{:.3e}", r.max_abs_error),
            format!("{:.3e}", r.rms_error),
            fmt_db(r.sqnr_db),
        ]);
        merged.insert(format!("{path}.weight"), weight);
        progress.inc();
    }

    // Copy everything but the merged weights and their parameter entries, then add the requantized ones.
    progress.set_message("writing");
    let names = ck.tensor_names(); // sorted
    let mut out: Vec<(String, TensorData)> = Vec::with_capacity(names.len());
    for key in names {
        let owner = layout.owner_of_param_entry(key).unwrap_or(key);
        if !merged.contains_key(owner) {
            out.push((key.to_string(), TensorData::from_view(&ck.tensor(key)?)));
        }
    }
    for (weight_name, w) in &merged {
        match w {
            QuantWeight::FourBit(t) => out.extend(bnb::to_tensors(weight_name, t).context(|| weight_name.clone())?),
            QuantWeight::Int8(q) => out.extend(int8_layout::to_tensors(weight_name, q)),
        }
    }
    let metadata = if metadata.is_empty() { None } else { Some(metadata) };
    lowbit::io::write_safetensors(output, &out, metadata, force)?;
    drop(progress);

    console::out(&table.render())?;
    let untouched = layer_paths.len() - matched.len();
    let mut summary = format!(
        "merged adapter {} into {} layer(s) of {file_name} and requantized them (added error: requantized \
         weight vs dequant(W) + s*B*A); {untouched} other quantized layer(s) and every other tensor copied \
         unchanged; wrote {}",
        adapter_dir.display(),
        matched.len(),
        output.display()
    );
    if !unmatched.is_empty() {
        summary.push_str(&format!(
            "\n{} adapter module(s) matched no quantized layer and were not merged: {}",
            unmatched.len(),
            unmatched.iter().map(|p| unmatched_reason(&ck, p)).collect::<Vec<_>>().join(", ")
        ));
    }
    console::line(&summary)
}

/// `` `P` `` with why it matched nothing (a plain weight, or no weight at all).
fn unmatched_reason(ck: &Checkpoint, path: &str) -> String {
    match ck.tensor(&format!("{path}.weight")) {
        Ok(v) => format!("`{path}` (`{path}.weight` is a plain {:?} tensor)", v.dtype()),
        Err(_) => format!("`{path}` (no such layer)"),
    }
}
