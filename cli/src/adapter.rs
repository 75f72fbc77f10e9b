//! PEFT LoRA adapter directories on the command line ([`lowbit::io::peft`]): loading with the directory in
//! every error, and the name the adapter is attached under.

use crate::error::{CliError, PathContext};
use lowbit::io::peft::PeftAdapter;
use lowbit::lora::LoraAdapter;
use std::path::Path;

/// Loads and validates the adapter directory `dir` (`adapter_config.json` + `adapter_model.safetensors`).
pub fn load(dir: &Path) -> Result<PeftAdapter, CliError> {
    PeftAdapter::load(dir).path_context(dir, "adapter", "loading the adapter")
}

/// The name to attach `adapter` under: the adapter-name segment of its keys (`default` in
/// `P.lora_A.default.weight`), else `default`, PEFT's default name.
pub fn name(adapter: &PeftAdapter) -> String {
    adapter.key_adapter_name().unwrap_or("default").to_string()
}

/// `rank 8, alpha 16, scaling 2` (with ` (rsLoRA)` when the scaling is alpha/√rank).
pub fn describe(a: &LoraAdapter) -> String {
    format!(
        "rank {}, alpha {}, scaling {}{}",
        a.rank(),
        a.alpha(),
        a.scaling(),
        if a.use_rslora() { " (rsLoRA)" } else { "" }
    )
}
