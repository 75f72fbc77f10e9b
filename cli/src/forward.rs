//! `lowbit forward`: runs one linear layer of a quantized checkpoint (optionally with a PEFT LoRA adapter) on
//! the tensor `x` of an input file and writes `y` as F32: the way to check a checkpoint and an adapter
//! against another implementation.

use crate::adapter;
use crate::console;
use crate::error::{CliError, Context, PathContext};
use crate::gpu::Device;
use crate::layer;
use crate::output::check_output;
use crate::quantized::describe_weight;
use lowbit::io::{float_dtype, Checkpoint, SafetensorsFile, TensorData};
use safetensors::tensor::TensorView;
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

/// Runs the layer on `x` (`[..., in]`, any rank ≥ 2: the leading dimensions are flattened into M rows) and
/// writes `y` `[..., out]` (F32) with the same leading dimensions.
pub fn run(f: Forward<'_>) -> Result<(), CliError> {
    check_output(f.checkpoint, f.output, f.force)?;
    check_output(f.input, f.output, f.force)?;
    let path = layer::normalize(f.layer);
    let ck = Checkpoint::open(f.checkpoint)?;
    // A quantized layer runs on the fused kernels; a dense one (float or GGUF weight) by the f64 loop.
    let quantized = ck.layer_names().binary_search_by(|n| n.as_str().cmp(path)).is_ok();
    let dense = if quantized { None } else { layer::load_dense(&ck, path)? };
    let mut quant = match dense {
        None => Some(layer::load(&ck, path)?),
        Some(_) => None,
    };

    let mut with = String::new();
    let mut lora = None;
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
        let a = peft.lora_adapter(path, &adapter::name(&peft)).path_context(dir, "adapter", "adapter")?;
        with = format!(" + adapter {} ({})", dir.display(), adapter::describe(&a));
        match &mut quant {
            Some(layer) => {
                layer.add_adapter(a).path_context(
                    dir,
                    &format!("attaching to layer `{path}` the adapter"),
                    &format!("attaching the adapter to layer `{path}`"),
                )?;
            }
            None => lora = Some(a),
        }
    }

    let (out, inp) = match (&quant, &dense) {
        (Some(l), _) => (l.out_features(), l.in_features()),
        (None, Some(d)) => (d.out, d.inp),
        (None, None) => return Err(CliError::new(format!("no layer `{path}`"))),
    };
    let input = SafetensorsFile::open(f.input)?;
    let ist = input.tensors().path_context(f.input, "input", "input")?;
    let view = ist.tensor(INPUT).map_err(|_| {
        let mut names: Vec<&str> = ist.names();
        names.sort();
        CliError::new(format!(
            "{} has no tensor `{INPUT}` (the layer input [..., {inp}]); it has: {}",
            f.input.display(),
            if names.is_empty() { "no tensors".to_string() } else { layer::list(&names) }
        ))
    })?;
    let x_ctx = || format!("tensor `{INPUT}` of {}", f.input.display());
    let lead = match view.shape() {
        [lead @ .., k] if !lead.is_empty() && *k == inp => lead.to_vec(),
        s => {
            return Err(CliError::new(format!(
                "shape {s:?}, but layer `{path}` takes [M, {inp}] or any rank above 2 ending in {inp} ([batch, \
                 tokens, {inp}], ...; its weight is [{out}, {inp}])"
            )))
            .context(x_ctx)
        }
    };
    let m: usize = lead.iter().product();
    let (x, x_dtype) = input_f32(&view).context(x_ctx)?;
    let t = Instant::now();
    let (y, elapsed, on) = match (&quant, &dense, f.device) {
        (Some(layer), _, Device::Cpu) => {
            let y = layer.forward(&x).context(|| format!("layer `{path}`"))?;
            (y, t.elapsed(), String::new())
        }
        (Some(layer), _, Device::Gpu) => gpu_forward(layer, &x, m).context(|| format!("layer `{path}` on the GPU"))?,
        (None, Some(d), Device::Cpu) => {
            let y = d.forward(&x, lora.as_ref()).context(|| format!("layer `{path}`"))?;
            (y, t.elapsed(), String::new())
        }
        (None, Some(d), Device::Gpu) => {
            return Err(CliError::new(format!(
                "layer `{path}` is dense ({} weight); --device gpu runs quantized layers (bitsandbytes 4-bit, \
                 lowbit int8) only: use --device cpu, or quantize the checkpoint first",
                d.stored
            )))
        }
        (None, None, _) => return Err(CliError::new(format!("no layer `{path}`"))),
    };

    let mut y_shape = lead.clone();
    y_shape.push(out);
    let x_shape: Vec<usize> = view.shape().to_vec();
    let tensors = [(OUTPUT.to_string(), TensorData::from_slice(Dtype::F32, y_shape.clone(), &y))];
    lowbit::io::write_safetensors(f.output, &tensors, None, f.force)?;
    let (bias, weight) = match (&quant, &dense) {
        (Some(l), _) => (l.bias().is_some(), describe_weight(l.weight())),
        (None, Some(d)) => (d.bias.is_some(), format!("dense {}, decoded to f32, f64 accumulation", d.stored)),
        (None, None) => (false, String::new()),
    };
    let bias = if bias { ", bias" } else { "" };
    let rows = if lead.len() > 1 { format!(" (as {m} rows)") } else { String::new() };
    console::line(&format!(
        "y {y_shape:?} f32 = layer `{path}` ({weight}, [{out}, {inp}]{bias}){with} on x {x_shape:?} ({x_dtype}){rows} in \
         {:.3} ms{on}; wrote {}",
        elapsed.as_secs_f64() * 1e3,
        f.output.display()
    ))
}

/// The input tensor's values as f32 and a description of its dtype: F32, F16 and BF16 widen exactly; F64 is
/// rounded to the nearest f32, and a value that is not finite or lies outside the f32 range is an error.
fn input_f32(view: &TensorView<'_>) -> Result<(Vec<f32>, String), CliError> {
    if let Some(d) = float_dtype(view.dtype()) {
        return Ok((lowbit::io::view_to_f32(INPUT, view)?, d.to_string()));
    }
    if view.dtype() != Dtype::F64 {
        return Err(CliError::new(format!("dtype {:?}; expected F32, F16, BF16 or F64", view.dtype())));
    }
    let mut x = Vec::with_capacity(view.data().len() / 8);
    for (i, c) in view.data().chunks_exact(8).enumerate() {
        let v = f64::from_le_bytes(std::array::from_fn(|j| c[j]));
        if !v.is_finite() {
            return Err(CliError::new(format!("element {i} is {v}; expected finite values")));
        }
        let r = v as f32;
        if !r.is_finite() {
            return Err(CliError::new(format!(
                "element {i} is {v:e}, outside the f32 range (|x| <= {:e}); the layer runs in f32",
                f32::MAX
            )));
        }
        x.push(r);
    }
    Ok((x, "f64, rounded to f32".to_string()))
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
