//! `lowbit forward`: runs one linear layer of a quantized checkpoint (optionally with a PEFT LoRA adapter) on
//! the tensor `x` of an input file and writes `y` as F32: the way to check a checkpoint and an adapter
//! against another implementation.

use crate::adapter;
use crate::console;
use crate::error::{CliError, Context};
use crate::gpu::Device;
use crate::layer;
use crate::output::check_output;
use crate::quantized::describe_weight;
use lowbit::io::{float_dtype, Checkpoint, SafetensorsFile, TensorData};
use safetensors::Dtype;
use std::path::Path;
use std::time::{Duration, Instant};

/// Name of the input tensor.
pub const INPUT: &str = "x";
/// Name of the output tensor.
pub const OUTPUT: &str = "y";

/// What to run.
pub struct Forward<'a> {
    /// The quantized checkpoint.
    pub checkpoint: &'a Path,
    /// Module path of the layer (`model.layers.0.mlp.up_proj`).
    pub layer: &'a str,
    /// PEFT adapter directory, if any.
    pub adapter: Option<&'a Path>,
    /// File holding `x`.
    pub input: &'a Path,
    /// File to write `y` to.
    pub output: &'a Path,
    /// Replace `output` if it exists.
    pub force: bool,
    /// Where to run the layer.
    pub device: Device,
}

/// Runs the layer on `x` and writes `y` `[M, out]` (F32).
pub fn run(f: Forward<'_>) -> Result<(), CliError> {
    check_output(f.checkpoint, f.output, f.force)?;
    check_output(f.input, f.output, f.force)?;
    let path = layer::normalize(f.layer);
    let ck = Checkpoint::open(f.checkpoint)?;
    let file_name = f.checkpoint.display().to_string();
    if *ck.layout() == lowbit::io::Layout::Dense {
        return Err(CliError::new(format!(
            "{file_name} holds no quantized layers (no `lowbit.scheme` metadata and no bitsandbytes quant_state \
             entries)"
        )));
    }
    let mut layer = layer::load(&ck, path, &file_name)?;

    let mut with = String::new();
    if let Some(dir) = f.adapter {
        let peft = adapter::load(dir)?;
        if peft.module(path).is_none() {
            let modules: Vec<&str> = peft.modules().iter().map(|m| m.path.as_str()).collect();
            return Err(CliError::new(format!(
                "adapter {} has no module for layer `{path}`; its modules: {}",
                dir.display(),
                layer::list(&modules)
            )));
        }
        let lora = peft.lora_adapter(path, &adapter::name(&peft))?;
        with = format!(" + adapter {} ({})", dir.display(), adapter::describe(&lora));
        layer.add_adapter(lora).context(|| format!("attaching adapter {} to layer `{path}`", dir.display()))?;
    }

    let (out, inp) = (layer.out_features(), layer.in_features());
    let input = SafetensorsFile::open(f.input)?;
    let ist = input.tensors()?;
    let view = ist.tensor(INPUT).map_err(|_| {
        let mut names: Vec<&str> = ist.names();
        names.sort();
        CliError::new(format!(
            "{} has no tensor `{INPUT}` (the layer input [M, {inp}]); it has: {}",
            f.input.display(),
            if names.is_empty() { "no tensors".to_string() } else { layer::list(&names) }
        ))
    })?;
    let x_ctx = || format!("tensor `{INPUT}` of {}", f.input.display());
    let x_dtype = float_dtype(view.dtype())
        .ok_or_else(|| CliError::new(format!("{}: dtype {:?}; expected F32, F16 or BF16", x_ctx(), view.dtype())))?;
    let m = match *view.shape() {
        [m, k] if k == inp => m,
        ref s => {
            return Err(CliError::new(format!(
                "shape {s:?}, but layer `{path}` takes [M, {inp}] (its weight is [{out}, {inp}])"
            )))
            .context(x_ctx)
        }
    };
    let x = lowbit::io::view_to_f32(INPUT, &view).context(x_ctx)?;
    let (y, elapsed, on) = match f.device {
        Device::Cpu => {
            let t = Instant::now();
            let y = layer.forward(&x).context(|| format!("layer `{path}`"))?;
            (y, t.elapsed(), String::new())
        }
        Device::Gpu => gpu_forward(&layer, &x, m).context(|| format!("layer `{path}` on the GPU"))?,
    };

    let tensors = [(OUTPUT.to_string(), TensorData::from_slice(Dtype::F32, vec![m, out], &y))];
    lowbit::io::write_safetensors(f.output, &tensors, None, f.force)?;
    let bias = if layer.bias().is_some() { ", bias" } else { "" };
    console::line(&format!(
        "y [{m}, {out}] f32 = layer `{path}` ({}, [{out}, {inp}]{bias}){with} on x [{m}, {inp}] ({x_dtype}) in \
         {:.3} ms{on}; wrote {}",
        describe_weight(layer.weight()),
        elapsed.as_secs_f64() * 1e3,
        f.output.display()
    ))
}

/// Uploads `layer` to the preferred GPU adapter and runs it on `x` (`[m, in]`): `y`, the time of the forward
/// (upload excluded) and ` on GPU <adapter>` for the message.
#[cfg(feature = "gpu")]
fn gpu_forward(
    layer: &lowbit::linear::QuantLinear,
    x: &[f32],
    m: usize,
) -> Result<(Vec<f32>, Duration, String), CliError> {
    let ctx = crate::gpu::open()?;
    let gpu_layer = lowbit::gpu::GpuLinear::upload(&ctx, layer)?;
    let t = Instant::now();
    let y = gpu_layer.forward_blocking(&ctx, x, m)?;
    Ok((y, t.elapsed(), format!(" on GPU {}", crate::gpu::describe(&ctx))))
}

#[cfg(not(feature = "gpu"))]
fn gpu_forward(
    _layer: &lowbit::linear::QuantLinear,
    _x: &[f32],
    _m: usize,
) -> Result<(Vec<f32>, Duration, String), CliError> {
    Err(crate::gpu::not_built())
}
