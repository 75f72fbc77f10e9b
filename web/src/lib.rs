//! `lowbit-web`: lowbit's quantized linear layers in the browser, through wasm-bindgen.
//!
//! The JS API (TypeScript definitions come out of `wasm-bindgen` as `pkg/lowbit_web.d.ts`):
//!
//! * [`Checkpoint`] — a bitsandbytes 4-bit or lowbit int8 safetensors file loaded from a `Uint8Array`; list its
//!   layers, attach a PEFT LoRA adapter to all of them, take one [`Layer`] by path.
//! * [`Layer`] — a `QuantLinear`: `forward(x, m)` (WASM CPU, SIMD128), `forwardReference`, `forwardBatch` with
//!   one adapter id per row, `forwardAsync(x, m, device)` with `device` `"cpu"` or `"webgpu"`, the stated
//!   error bound of the fused kernels against the reference, dequantization.
//! * [`quantizeInt8`] / [`quantizeNf4`] — build a layer from f32 weights.
//! * [`Model`] — a whole Llama-family model (SmolLM2, ...) from a GGUF or a model directory's files, quantized
//!   in the page (NF4 + double quantization by default), PEFT adapters, streamed generation, logits.
//! * [`initWebGpu`], [`buildInfo`] — what this build and this browser can run.
//!
//! Every error is a JS `Error` whose message is lowbit's message; nothing panics on bad input.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::Promise;
use lowbit::affine::{self, Granularity};
use lowbit::cpu::Isa;
use lowbit::io::peft::PeftAdapter;
use lowbit::linear::{BoundTarget, ForwardOptions, QuantLinear, QuantWeight};
use lowbit::lora::LoraAdapter;
use lowbit::nf4;
use wasm_bindgen::prelude::*;

mod model;
mod model_gpu;
mod webgpu;

pub use model::{wasm_heap_bytes, Model};

/// A lowbit (or other) error as a JS `Error` carrying the message.
pub(crate) fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// `x` must hold `m` rows of `in_features` values.
fn check_rows(what: &str, len: usize, m: usize, in_features: usize) -> Result<(), JsError> {
    match m.checked_mul(in_features) {
        Some(n) if n == len => Ok(()),
        _ => Err(JsError::new(&format!(
            "{what}: length {len} does not match m × in_features = {m} × {in_features} (expected [m, in] row-major)"
        ))),
    }
}

/// JS adapter ids (`-1` = no adapter) to lowbit's `Option<usize>`.
fn adapter_ids(ids: &[i32], m: usize) -> Result<Vec<Option<usize>>, JsError> {
    if ids.len() != m {
        return Err(JsError::new(&format!("adapterIds: length {} does not match m = {m} (one id per row)", ids.len())));
    }
    ids.iter()
        .enumerate()
        .map(|(row, &id)| match id {
            -1 => Ok(None),
            id if id >= 0 => Ok(Some(id as usize)),
            id => Err(JsError::new(&format!("adapterIds[{row}] = {id}: expected an adapter id ≥ 0 or -1 for none"))),
        })
        .collect()
}

/// What this build can run: `{"version", "isa", "simd128", "webgpu_compiled"}` as a JSON string.
#[wasm_bindgen(js_name = buildInfo)]
pub fn build_info() -> String {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "isa": Isa::best().name(),
        "simd128": cfg!(target_feature = "simd128"),
        "relaxed_simd": cfg!(target_feature = "relaxed-simd"),
        "webgpu_compiled": cfg!(feature = "webgpu"),
    })
    .to_string()
}

// ------------------------------------------------------------------------------------------------ Checkpoint

/// A quantized checkpoint loaded from bytes: every `*.weight` of a bitsandbytes 4-bit file (NF4/FP4, plain or
/// double-quantized scales) or of a lowbit int8 file, as layers named by their module path.
#[wasm_bindgen]
pub struct Checkpoint {
    layers: Vec<(String, QuantLinear)>,
}

#[wasm_bindgen]
impl Checkpoint {
    /// Parses a safetensors file (`Uint8Array`) and builds its quantized layers through
    /// `lowbit::io::Checkpoint` (one copy of the bytes into wasm memory, shared by every layer's codes). Throws
    /// on a malformed, truncated or unsupported file.
    #[wasm_bindgen(js_name = fromBytes)]
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, JsError> {
        let ck = lowbit::io::Checkpoint::from_bytes(bytes.to_vec()).map_err(js_err)?;
        if *ck.layout() == lowbit::io::Layout::Dense {
            return Err(JsError::new(
                "unsupported: a checkpoint without quantized weights (neither bitsandbytes 4-bit `quant_state` keys \
                 nor lowbit int8 metadata `lowbit.scheme`)",
            ));
        }
        let layers = ck.layers().map_err(js_err)?;
        Ok(Checkpoint { layers })
    }

    /// Module paths of the layers, sorted (e.g. `model.layers.0.mlp.up_proj`).
    #[wasm_bindgen(js_name = layerNames)]
    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Attaches a PEFT LoRA adapter (`adapter_config.json` text and `adapter_model.safetensors` bytes) under
    /// `adapterName` to every layer it has weights for. All or nothing. Returns the attach report as JSON
    /// `{"attached": [...], "unmatched_modules": [...], "layers_without_adapter": [...]}`.
    #[wasm_bindgen(js_name = attachPeft)]
    pub fn attach_peft(
        &mut self,
        config_json: &str,
        adapter_bytes: &[u8],
        adapter_name: &str,
    ) -> Result<String, JsError> {
        let adapter = parse_peft(config_json, adapter_bytes)?;
        let r = adapter.attach(&mut self.layers, adapter_name).map_err(js_err)?;
        Ok(serde_json::json!({
            "attached": r.attached,
            "unmatched_modules": r.unmatched_modules,
            "layers_without_adapter": r.layers_without_adapter,
        })
        .to_string())
    }

    /// A copy of the layer at `path` (a trailing `.`, `.weight` is accepted too), with its adapters.
    pub fn layer(&self, path: &str) -> Result<Layer, JsError> {
        let p = path.strip_suffix(".weight").or_else(|| path.strip_suffix('.')).unwrap_or(path);
        match self.layers.iter().find(|(n, _)| n == p) {
            Some((n, l)) => Ok(Layer::new(n.clone(), l.clone())),
            None => Err(JsError::new(&format!(
                "no quantized layer `{p}` in this checkpoint (layers: {})",
                self.layers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

pub(crate) fn parse_peft(config_json: &str, adapter_bytes: &[u8]) -> Result<PeftAdapter, JsError> {
    let st = lowbit::io::parse_safetensors(adapter_bytes).map_err(js_err)?;
    PeftAdapter::from_parts(config_json, &st).map_err(js_err)
}

// ------------------------------------------------------------------------------------------------ Layer

/// A quantized linear layer `y = x·Wᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ`, `W: [out, in]`.
#[wasm_bindgen]
pub struct Layer {
    path: String,
    linear: Rc<QuantLinear>,
    /// The layer uploaded to the GPU, dropped whenever the layer changes.
    gpu: Rc<RefCell<Option<webgpu::GpuLayer>>>,
}

impl Layer {
    fn new(path: String, linear: QuantLinear) -> Layer {
        Layer { path, linear: Rc::new(linear), gpu: Rc::new(RefCell::new(None)) }
    }
    /// Mutable access (copy-on-write if a pending GPU call still holds the old layer); drops the GPU copy.
    fn linear_mut(&mut self) -> &mut QuantLinear {
        self.gpu.replace(None);
        Rc::make_mut(&mut self.linear)
    }
}

#[wasm_bindgen]
impl Layer {
    /// The module path this layer came from (empty for layers built by `quantizeInt8` / `quantizeNf4`).
    #[wasm_bindgen(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// Input features (columns of `W`).
    #[wasm_bindgen(getter, js_name = inFeatures)]
    pub fn in_features(&self) -> usize {
        self.linear.in_features()
    }

    /// Output features (rows of `W`).
    #[wasm_bindgen(getter, js_name = outFeatures)]
    pub fn out_features(&self) -> usize {
        self.linear.out_features()
    }

    /// Bytes of packed weight and scales one forward reads.
    #[wasm_bindgen(getter, js_name = packedBytes)]
    pub fn packed_bytes(&self) -> usize {
        self.linear.weight().packed_bytes()
    }

    /// The layer as JSON: format, shape, block size / granularity, dtype, bias, adapters.
    pub fn describe(&self) -> String {
        let l = &*self.linear;
        let weight = match l.weight() {
            QuantWeight::Int8(t) => serde_json::json!({
                "format": "int8", "granularity": t.granularity().to_string(),
            }),
            QuantWeight::FourBit(t) => serde_json::json!({
                "format": t.format().to_string(), "blocksize": t.blocksize(),
                "double_quant": matches!(t.scales(), nf4::BlockScales::Double(_)),
                "dtype": format!("{:?}", t.dtype()).to_lowercase(),
            }),
        };
        let adapters: Vec<_> = l
            .adapters()
            .iter()
            .enumerate()
            .map(|(id, a)| {
                serde_json::json!({
                    "id": id, "name": a.name(), "rank": a.rank(), "alpha": a.alpha(), "scaling": a.scaling(),
                    "use_rslora": a.use_rslora(), "enabled": a.is_enabled(),
                })
            })
            .collect();
        serde_json::json!({
            "path": self.path, "out_features": l.out_features(), "in_features": l.in_features(),
            "weight": weight, "packed_bytes": l.weight().packed_bytes(), "bias": l.bias().is_some(),
            "adapters": adapters,
        })
        .to_string()
    }

    /// Adds a LoRA adapter from `a` (`[rank, in]`) and `b` (`[out, rank]`), row-major; returns its id.
    #[wasm_bindgen(js_name = addLora)]
    pub fn add_lora(
        &mut self,
        name: &str,
        rank: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        alpha: f32,
        use_rslora: bool,
    ) -> Result<usize, JsError> {
        let ad = LoraAdapter::new(name, rank, a, b, alpha, use_rslora).map_err(js_err)?;
        self.linear_mut().add_adapter(ad).map_err(js_err)
    }

    /// Adds this layer's module of a PEFT adapter (config JSON text + adapter safetensors bytes) under
    /// `adapterName`; returns its adapter id. Throws if the adapter has no module for this layer's path.
    #[wasm_bindgen(js_name = attachPeft)]
    pub fn attach_peft(
        &mut self,
        config_json: &str,
        adapter_bytes: &[u8],
        adapter_name: &str,
    ) -> Result<usize, JsError> {
        let adapter = parse_peft(config_json, adapter_bytes)?;
        let ad = adapter.lora_adapter(&self.path, adapter_name).map_err(js_err)?;
        self.linear_mut().add_adapter(ad).map_err(js_err)
    }

    /// Adapter names, in id order.
    #[wasm_bindgen(js_name = adapterNames)]
    pub fn adapter_names(&self) -> Vec<String> {
        self.linear.adapters().iter().map(|a| a.name().to_string()).collect()
    }

    /// The id of adapter `name`, or -1.
    #[wasm_bindgen(js_name = adapterId)]
    pub fn adapter_id(&self, name: &str) -> i32 {
        self.linear.adapter_id(name).map_or(-1, |i| i as i32)
    }

    /// Enables or disables adapter `name` for `forward` (disabled adapters cannot be named in `forwardBatch`).
    #[wasm_bindgen(js_name = setAdapterEnabled)]
    pub fn set_adapter_enabled(&mut self, name: &str, enabled: bool) -> Result<(), JsError> {
        self.linear_mut().set_adapter_enabled(name, enabled).map_err(js_err)
    }

    /// `y = x·Wᵀ + bias + every enabled adapter`, `x: [m, in]` → `y: [m, out]`, on the WASM CPU path.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>, JsError> {
        check_rows("x", x.len(), m, self.linear.in_features())?;
        self.linear.forward(x).map_err(js_err)
    }

    /// The reference forward (scalar, f64 accumulation, rounded once): the oracle for the fast paths.
    #[wasm_bindgen(js_name = forwardReference)]
    pub fn forward_reference(&self, x: &[f32], m: usize) -> Result<Vec<f32>, JsError> {
        check_rows("x", x.len(), m, self.linear.in_features())?;
        self.linear.forward_with(x, ForwardOptions::reference()).map_err(js_err)
    }

    /// Multi-adapter batch on the CPU: row `r` of `x` adds only adapter `adapterIds[r]` (-1: none).
    #[wasm_bindgen(js_name = forwardBatch)]
    pub fn forward_batch(&self, x: &[f32], m: usize, adapter_ids_: &[i32]) -> Result<Vec<f32>, JsError> {
        check_rows("x", x.len(), m, self.linear.in_features())?;
        let ids = adapter_ids(adapter_ids_, m)?;
        self.linear.forward_with(x, ForwardOptions::default().adapter_ids(&ids)).map_err(js_err)
    }

    /// The reference of `forwardBatch`.
    #[wasm_bindgen(js_name = forwardBatchReference)]
    pub fn forward_batch_reference(&self, x: &[f32], m: usize, adapter_ids_: &[i32]) -> Result<Vec<f32>, JsError> {
        check_rows("x", x.len(), m, self.linear.in_features())?;
        let ids = adapter_ids(adapter_ids_, m)?;
        self.linear.forward_with(x, ForwardOptions::reference().adapter_ids(&ids)).map_err(js_err)
    }

    /// Per-element bound on `|y − reference|` of the fused f32 kernels on `device` (`"cpu"`: the bound of
    /// `tests/linear_paths.rs`; `"webgpu"`: that of `tests/gpu_kernels.rs`; `QuantLinear::error_bound`), including
    /// the reference's own half-ulp rounding. `adapterIds` as in `forwardBatch`; `undefined` for `forward`
    /// (every enabled adapter).
    #[wasm_bindgen(js_name = errorBound)]
    pub fn error_bound(
        &self,
        x: &[f32],
        m: usize,
        adapter_ids_: Option<Vec<i32>>,
        device: &str,
    ) -> Result<Vec<f64>, JsError> {
        check_rows("x", x.len(), m, self.linear.in_features())?;
        let target = match device {
            "cpu" => BoundTarget::Cpu,
            "webgpu" => BoundTarget::Gpu,
            other => return Err(JsError::new(&format!("device {other:?}: expected \"cpu\" or \"webgpu\""))),
        };
        let ids = adapter_ids_.map(|ids| adapter_ids(&ids, m)).transpose()?;
        let opts = match &ids {
            None => ForwardOptions::reference(),
            Some(ids) => ForwardOptions::reference().adapter_ids(ids),
        };
        let want = self.linear.forward_with(x, opts).map_err(js_err)?;
        let bound = self.linear.error_bound(x, opts, target).map_err(js_err)?;
        // The library's bound is against the exact result; the reference output is rounded to f32 once.
        Ok(bound.iter().zip(&want).map(|(b, w)| b + (w.abs() as f64) * f32::EPSILON as f64 * 0.5).collect())
    }

    /// The weight dequantized to f32 (`[out, in]` row-major) through the fast path.
    pub fn dequantize(&self) -> Result<Vec<f32>, JsError> {
        match self.linear.weight() {
            QuantWeight::Int8(t) => t.dequantize::<f32>().map_err(js_err),
            QuantWeight::FourBit(t) => t.dequantize::<f32>().map_err(js_err),
        }
    }

    /// The weight dequantized through the scalar reference.
    #[wasm_bindgen(js_name = dequantizeReference)]
    pub fn dequantize_reference(&self) -> Vec<f32> {
        self.linear.weight().dequantize_reference()
    }

    /// `forward` on `device` (`"cpu"` or `"webgpu"`), as a Promise of a `Float32Array`. The first WebGPU call
    /// uploads the layer (after `initWebGpu()`); the promise rejects with the reason when WebGPU is not
    /// available (not compiled in, no `navigator.gpu`, no adapter).
    #[wasm_bindgen(js_name = forwardAsync)]
    pub fn forward_async(&self, x: Vec<f32>, m: usize, device: &str) -> Promise {
        self.run_async(x, m, None, device)
    }

    /// `forwardBatch` on `device` (`"cpu"` or `"webgpu"`), as a Promise of a `Float32Array`.
    #[wasm_bindgen(js_name = forwardBatchAsync)]
    pub fn forward_batch_async(&self, x: Vec<f32>, m: usize, adapter_ids_: Vec<i32>, device: &str) -> Promise {
        self.run_async(x, m, Some(adapter_ids_), device)
    }
}

impl Layer {
    fn run_async(&self, x: Vec<f32>, m: usize, ids: Option<Vec<i32>>, device: &str) -> Promise {
        let linear = self.linear.clone();
        let gpu = self.gpu.clone();
        let device = device.to_string();
        wasm_bindgen_futures::future_to_promise(async move {
            let r: Result<Vec<f32>, JsError> = async {
                check_rows("x", x.len(), m, linear.in_features())?;
                let ids = ids.map(|i| adapter_ids(&i, m)).transpose()?;
                match device.as_str() {
                    "cpu" => match &ids {
                        None => linear.forward(&x).map_err(js_err),
                        Some(ids) => {
                            linear.forward_with(&x, ForwardOptions::default().adapter_ids(ids)).map_err(js_err)
                        }
                    },
                    "webgpu" => webgpu::forward(&linear, &gpu, &x, m, ids.as_deref()).await,
                    other => Err(JsError::new(&format!("device {other:?}: expected \"cpu\" or \"webgpu\""))),
                }
            }
            .await;
            match r {
                Ok(y) => Ok(js_sys::Float32Array::from(&y[..]).into()),
                Err(e) => Err(e.into()),
            }
        })
    }
}

// ------------------------------------------------------------------------------------------------ quantize

/// Quantizes `w` (`[rows, cols]` row-major f32) to int8 with `granularity` (`"tensor"`, `"channel"` or
/// `"group:G"`) and returns it as a layer, with an optional bias of `rows` values.
#[wasm_bindgen(js_name = quantizeInt8)]
pub fn quantize_int8(
    w: &[f32],
    rows: usize,
    cols: usize,
    granularity: &str,
    bias: Option<Vec<f32>>,
) -> Result<Layer, JsError> {
    let g: Granularity = granularity.parse().map_err(js_err)?;
    let t = affine::quantize(w, &[rows, cols], g).map_err(js_err)?;
    let l = QuantLinear::new(QuantWeight::Int8(t), bias).map_err(js_err)?;
    Ok(Layer::new(String::new(), l))
}

/// Quantizes `w` (`[rows, cols]` row-major f32) to NF4 in blocks of `blocksize` (32…4096, a power of two),
/// optionally double-quantizing the block scales, and returns it as a layer with an optional bias.
#[wasm_bindgen(js_name = quantizeNf4)]
pub fn quantize_nf4(
    w: &[f32],
    rows: usize,
    cols: usize,
    blocksize: usize,
    double_quant: bool,
    bias: Option<Vec<f32>>,
) -> Result<Layer, JsError> {
    let t = nf4::quantize_nf4(w, &[rows, cols], blocksize, double_quant).map_err(js_err)?;
    let l = QuantLinear::new(QuantWeight::FourBit(t), bias).map_err(js_err)?;
    Ok(Layer::new(String::new(), l))
}

/// Requests a WebGPU adapter and device (once; later calls reuse them). Resolves to JSON
/// `{"name", "backend", "type", "driver"}`; rejects with the reason when WebGPU is unavailable.
#[wasm_bindgen(js_name = initWebGpu)]
pub async fn init_web_gpu() -> Result<String, JsError> {
    webgpu::init().await
}
