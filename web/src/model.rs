//! [`Model`]: a whole Llama-family model (lowbit-llm: SmolLM2, Llama, Qwen2) in the page — load a GGUF or a
//! model directory's files, quantize its linear layers in the page (NF4 + double quantization by default),
//! attach PEFT LoRA adapters, generate text token by token on the WASM CPU path.
//!
//! Long work yields to the browser's event loop between layers (loading) and between tokens (generation),
//! so a page stays responsive and can draw progress; every error is a JS `Error` with lowbit's message.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use lowbit::io::gguf::{GgufFile, ReadAt};
use lowbit::io::Limits;
use lowbit::Scheme;
use lowbit_llm::{LoadOptions, Logits, ModelLoader, Sampler, SamplingOptions, Tokenizer, WeightMode};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

use crate::model_gpu::{GpuRunner, Runner};
use crate::{js_err, parse_peft};

#[wasm_bindgen(inline_js = "
export function lowbit_yield() { return new Promise((resolve) => setTimeout(resolve, 0)); }
export function lowbit_now() { return performance.now(); }
export async function lowbit_fetch(url, onProgress) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`fetching ${url}: HTTP ${r.status} ${r.statusText}`);
  const total = Number(r.headers.get('content-length')) || 0;
  if (!r.body || typeof onProgress !== 'function') return new Uint8Array(await r.arrayBuffer());
  const reader = r.body.getReader();
  const parts = [];
  let done = 0;
  for (;;) {
    const { done: end, value } = await reader.read();
    if (end) break;
    parts.push(value);
    done += value.length;
    onProgress({ phase: 'download', done, total });
  }
  const out = new Uint8Array(done);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
")]
extern "C" {
    fn lowbit_yield() -> Promise;
    fn lowbit_now() -> f64;
    fn lowbit_fetch(url: &str, on_progress: &JsValue) -> Promise;
}

/// The message of a JS exception (an `Error`'s `message`, or the value as text).
fn js_message(v: &JsValue) -> String {
    if let Some(e) = v.dyn_ref::<js_sys::Error>() {
        return String::from(e.message());
    }
    v.as_string().unwrap_or_else(|| format!("{v:?}"))
}

async fn next_tick() {
    let _ = JsFuture::from(lowbit_yield()).await;
}

/// Bytes of WebAssembly memory this module has (the heap; it only grows).
pub fn heap_bytes() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        (core::arch::wasm32::memory_size(0) * 65536) as f64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0.0
    }
}

/// Size of the WebAssembly memory (heap) in bytes: what the page's model, caches and scratch take.
#[wasm_bindgen(js_name = wasmHeapBytes)]
pub fn wasm_heap_bytes() -> f64 {
    heap_bytes()
}

/// `options[key]` when present and not `undefined` / `null`.
fn opt(options: &JsValue, key: &str) -> Result<Option<JsValue>, JsError> {
    if options.is_undefined() || options.is_null() {
        return Ok(None);
    }
    if !options.is_object() {
        return Err(JsError::new("options: expected an object (or undefined)"));
    }
    let v = Reflect::get(options, &JsValue::from_str(key)).map_err(|e| JsError::new(&js_message(&e)))?;
    Ok(if v.is_undefined() || v.is_null() { None } else { Some(v) })
}

fn opt_f64(options: &JsValue, key: &str) -> Result<Option<f64>, JsError> {
    match opt(options, key)? {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(JsError::new(&format!("options.{key}: expected a finite number"))),
        },
    }
}

fn opt_count(options: &JsValue, key: &str) -> Result<Option<usize>, JsError> {
    match opt_f64(options, key)? {
        None => Ok(None),
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => Ok(Some(x as usize)),
        Some(x) => Err(JsError::new(&format!("options.{key} = {x}: expected a whole number ≥ 0"))),
    }
}

fn opt_string(options: &JsValue, key: &str) -> Result<Option<String>, JsError> {
    match opt(options, key)? {
        None => Ok(None),
        Some(v) => v.as_string().map(Some).ok_or_else(|| JsError::new(&format!("options.{key}: expected a string"))),
    }
}

fn opt_function(options: &JsValue, key: &str) -> Result<Option<Function>, JsError> {
    match opt(options, key)? {
        None => Ok(None),
        Some(v) => {
            v.dyn_into::<Function>().map(Some).map_err(|_| JsError::new(&format!("options.{key}: expected a function")))
        }
    }
}

fn opt_bool(options: &JsValue, key: &str) -> Result<Option<bool>, JsError> {
    match opt(options, key)? {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| JsError::new(&format!("options.{key}: expected true or false"))),
    }
}

/// A plain JS object from key/value pairs.
fn object(pairs: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    for (k, v) in pairs {
        let _ = Reflect::set(&o, &JsValue::from_str(k), v);
    }
    o.into()
}

fn progress(on_progress: &Option<Function>, phase: &str, done: f64, total: f64) {
    if let Some(f) = on_progress {
        let _ = f
            .call1(&JsValue::NULL, &object(&[("phase", phase.into()), ("done", done.into()), ("total", total.into())]));
    }
}

/// `Uint8Array` or `ArrayBuffer` → bytes in wasm memory (a copy).
fn bytes_of(v: &JsValue, what: &str) -> Result<Vec<u8>, JsError> {
    uint8_array(v, what).map(|a| a.to_vec())
}

/// The scheme option: `"none"` → as stored, a scheme → quantize with it, `undefined` → decided by the
/// checkpoint ([`default_weights`]).
fn weight_mode(options: &JsValue) -> Result<Option<WeightMode>, JsError> {
    match opt_string(options, "scheme")?.as_deref() {
        None => Ok(None),
        Some("none") | Some("as-stored") => Ok(Some(WeightMode::AsStored)),
        Some(s) => Ok(Some(WeightMode::Quantize(
            s.parse::<Scheme>().map_err(|e| JsError::new(&format!("options.scheme: {e}")))?,
        ))),
    }
}

/// Without a scheme option: an already quantized checkpoint (bitsandbytes, lowbit int8) as stored, anything
/// else quantized to NF4 + double quantization (block 64).
fn default_weights(ck: &lowbit::io::Checkpoint) -> WeightMode {
    if ck.layer_names().is_empty() {
        WeightMode::Quantize(Scheme::FourBit {
            format: lowbit::nf4::FourBitFormat::Nf4,
            blocksize: 64,
            double_quant: true,
        })
    } else {
        WeightMode::AsStored
    }
}

struct Loaded {
    model: lowbit_llm::Model,
    tokenizer: Tokenizer,
    source: String,
    scheme: String,
    lm_head: String,
    embedding: String,
    load_ms: f64,
    adapters: Vec<String>,
    /// The model uploaded to WebGPU by the first generation there; dropped when an adapter is attached.
    gpu: Option<GpuRunner>,
}

/// A language model loaded in the page. `Model.load(source, options)` → `Promise<Model>`; then
/// `generate(prompt, options)`, `logits(tokens)`, `attachPeft(config, weights, name)`, `encode` / `decode`,
/// `info()`.
#[wasm_bindgen]
pub struct Model {
    inner: Rc<RefCell<Loaded>>,
}

#[wasm_bindgen]
impl Model {
    /// Loads a model. `source`: a GGUF file as `Uint8Array` / `ArrayBuffer`, a URL (string) to fetch one
    /// from, or `{files: {"config.json": bytes, "tokenizer.json": bytes, "model.safetensors": bytes, ...}}`
    /// for a Hugging Face model directory (dense, bitsandbytes 4-bit or lowbit int8; one safetensors file;
    /// `tokenizer_config.json` / `special_tokens_map.json` used when present).
    ///
    /// `options`: `scheme` — the linear layers are quantized in the page with this lowbit scheme
    /// (default: `"nf4:64+dq"`, or as stored for an already quantized checkpoint; `"none"` keeps them as
    /// stored: dense f32 for a GGUF, which needs about 4× the memory); `embedding` — `"int8:channel"` (the default: the embedding stored as int8, a quarter of
    /// its f32 size, with a tied lm_head run on the same int8 matrix) or `"f32"` (as transformers runs it);
    /// `lmHead` — a scheme for an untied output projection, or for a tied one with `embedding: "f32"`
    /// (default: as stored); `onProgress({phase, done, total})` with phase `"download"` (bytes), `"parse"`,
    /// `"quantize"` (layers).
    ///
    /// Rejects with lowbit's message for a corrupt or unsupported file, a failed download, bad options.
    pub async fn load(source: JsValue, options: JsValue) -> Result<Model, JsError> {
        let t0 = lowbit_now();
        let on_progress = opt_function(&options, "onProgress")?;
        let weights = weight_mode(&options)?;
        let lm_head = match opt_string(&options, "lmHead")? {
            None => None,
            Some(s) => Some(s.parse::<Scheme>().map_err(|e| JsError::new(&format!("options.lmHead: {e}")))?),
        };
        // The page's default keeps the 135M model's heap under 200 MB: the embedding (113 MB in f32) as
        // int8:channel (28 MB), which the tied lm_head then runs on. "f32" keeps it dense.
        let embedding = match opt_string(&options, "embedding")?.as_deref() {
            None if lm_head.is_none() => Some(Scheme::Int8(lowbit::affine::Granularity::PerChannel)),
            None | Some("f32") => None,
            Some(s) => Some(s.parse::<Scheme>().map_err(|e| JsError::new(&format!("options.embedding: {e}")))?),
        };
        // A GGUF stays where it is (a JS buffer, outside the WASM heap): the header is copied in, each tensor's
        // bytes only while it is decoded. A model directory's files are copied in (one safetensors file).
        let (checkpoint, tokenizer, name) = if let Some(url) = source.as_string() {
            let bytes = JsFuture::from(lowbit_fetch(&url, on_progress.as_ref().map_or(&JsValue::UNDEFINED, |f| f)))
                .await
                .map_err(|e| JsError::new(&js_message(&e)))?;
            progress(&on_progress, "parse", 0.0, 1.0);
            next_tick().await;
            let (ck, tok) = gguf_on_demand(uint8_array(&bytes, "downloaded body")?, &url)?;
            (ck, tok, url)
        } else if let Some(files) = opt(&source, "files")? {
            progress(&on_progress, "parse", 0.0, 1.0);
            next_tick().await;
            let (ck, tok) = from_directory_files(&files)?;
            (ck, tok, "model directory".to_string())
        } else {
            let bytes = uint8_array(&source, "source (a GGUF's bytes, a URL, or {files: {...}})")?;
            progress(&on_progress, "parse", 0.0, 1.0);
            next_tick().await;
            let (ck, tok) = gguf_on_demand(bytes, "GGUF bytes")?;
            (ck, tok, "GGUF bytes".to_string())
        };
        let weights = weights.unwrap_or_else(|| default_weights(&checkpoint));
        let scheme = match weights {
            WeightMode::AsStored => "as stored".to_string(),
            WeightMode::Quantize(s) => s.to_string(),
        };
        let load_opts = LoadOptions { weights, adapters: Vec::new(), lm_head, embedding };
        let loader = ModelLoader::new(&checkpoint, &load_opts, &name).map_err(js_err)?;
        let layers = loader.config().num_hidden_layers;
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            blocks.push(loader.block(i).map_err(js_err)?);
            progress(&on_progress, "quantize", (i + 1) as f64, layers as f64);
            next_tick().await;
        }
        let model = loader.finish(blocks).map_err(js_err)?;
        drop(checkpoint);
        Ok(Model {
            inner: Rc::new(RefCell::new(Loaded {
                model,
                tokenizer,
                source: name,
                scheme,
                lm_head: match embedding {
                    Some(e) => format!("{e} (the embedding, tied)"),
                    None => lm_head.map_or("as stored".to_string(), |s| s.to_string()),
                },
                embedding: embedding.map_or("f32".to_string(), |s| s.to_string()),
                load_ms: lowbit_now() - t0,
                adapters: Vec::new(),
                gpu: None,
            })),
        })
    }

    /// Attaches a PEFT LoRA adapter (`adapter_config.json` text, `adapter_model.safetensors` bytes) under
    /// `name` to every decoder linear layer it has weights for; enabled for every later generation. All or
    /// nothing: throws (and changes nothing) when a module is not a layer of this model or its shapes differ.
    #[wasm_bindgen(js_name = attachPeft)]
    pub fn attach_peft(&self, config_json: &str, weights: &[u8], name: &str) -> Result<(), JsError> {
        let adapter = parse_peft(config_json, weights)?;
        let mut m = self.inner.try_borrow_mut().map_err(|_| busy())?;
        if m.adapters.iter().any(|a| a == name) {
            return Err(JsError::new(&format!("an adapter named `{name}` is already attached; pick another name")));
        }
        m.model.attach_peft(&adapter, name).map_err(js_err)?;
        m.adapters.push(name.to_string());
        m.gpu = None; // the upload has the old adapters
        Ok(())
    }

    /// What was loaded, as a plain object: `source`, `layers`, `hidden`, `vocab`, `scheme`, `lmHead`,
    /// `weightBytes` (read per token), `loadMs`, `adapters`, `heapBytes`, `chatTemplate`.
    pub fn info(&self) -> Result<JsValue, JsError> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        let c = m.model.config();
        let adapters = Array::new();
        for a in &m.adapters {
            adapters.push(&JsValue::from_str(a));
        }
        Ok(object(&[
            ("source", m.source.as_str().into()),
            ("layers", (c.num_hidden_layers as f64).into()),
            ("hidden", (c.hidden_size as f64).into()),
            ("vocab", (c.vocab_size as f64).into()),
            ("scheme", m.scheme.as_str().into()),
            ("lmHead", m.lm_head.as_str().into()),
            ("embedding", m.embedding.as_str().into()),
            ("weightBytes", (m.model.weight_bytes() as f64).into()),
            ("loadMs", m.load_ms.into()),
            ("adapters", adapters.into()),
            ("heapBytes", heap_bytes().into()),
            ("chatTemplate", m.tokenizer.has_chat_template().into()),
        ]))
    }

    /// Token ids of `text` (`chat`: wrapped in the ChatML template as one user message, as `lowbit generate
    /// --chat`).
    pub fn encode(&self, text: &str, chat: Option<bool>) -> Result<Vec<u32>, JsError> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        prompt_ids(&m.tokenizer, text, chat.unwrap_or(false))
    }

    /// Text of token ids (special tokens kept). Throws for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, JsError> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        m.tokenizer.decode(ids, false).map_err(js_err)
    }

    /// Logits of every position of `tokens` (a fresh sequence): `Float32Array` of `tokens.length × vocab`,
    /// row-major. Throws for no tokens or an id outside the vocabulary.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, JsError> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        if tokens.is_empty() {
            return Err(JsError::new("logits: no tokens; give at least one token id"));
        }
        let vocab = m.model.config().vocab_size;
        let mut state = m.model.new_state(tokens.len()).map_err(js_err)?;
        let mut out = vec![0.0f32; tokens.len() * vocab];
        m.model.forward(tokens, &mut state, Logits::All, &mut out).map_err(js_err)?;
        Ok(out)
    }

    /// Generates from `prompt` (text) and resolves to `{text, tokens, promptTokens, prefillMs, decodeMs,
    /// prefillTokS, decodeTokS, heapBytes, device}`; `tokens` are the new token ids (an end-of-sequence
    /// token ends generation and is included).
    ///
    /// `options`: `maxTokens` (default 128), `temperature` (default 0: greedy), `topP` (default 1), `seed`
    /// (default 0), `chat` (wrap the prompt in the ChatML template; default false), `device` (`"wasm"`, the
    /// default, or `"webgpu"`: the whole model uploaded to the GPU on first use and kept there; greedy
    /// decoding reads back 4 bytes per token), `onToken(text, id)` — called with each new piece of text as
    /// it is decoded.
    ///
    /// One generation at a time per model: a second call while one runs rejects.
    pub fn generate(&self, prompt: String, options: JsValue) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move { generate(inner, prompt, options).await.map_err(JsValue::from) })
    }
}

fn busy() -> JsError {
    JsError::new("this model is busy with a generation; wait for it to finish")
}

fn prompt_ids(tok: &Tokenizer, text: &str, chat: bool) -> Result<Vec<u32>, JsError> {
    let ids = if chat { tok.encode(&Tokenizer::chat_prompt(&[("user", text)]), true) } else { tok.encode(text, true) }
        .map_err(js_err)?;
    if ids.is_empty() {
        return Err(JsError::new("the prompt is empty (it encodes to no tokens)"));
    }
    Ok(ids)
}

// The mutable borrow is held across the awaits on purpose: it is the "one generation at a time" lock. Another
// call meanwhile fails `try_borrow(_mut)` with the "busy" error; nothing can panic on it.
#[allow(clippy::await_holding_refcell_ref)]
async fn generate(inner: Rc<RefCell<Loaded>>, prompt: String, options: JsValue) -> Result<JsValue, JsError> {
    let max_tokens = opt_count(&options, "maxTokens")?.unwrap_or(128);
    let sampling = SamplingOptions {
        temperature: opt_f64(&options, "temperature")?.unwrap_or(0.0) as f32,
        top_p: opt_f64(&options, "topP")?.unwrap_or(1.0) as f32,
        seed: opt_count(&options, "seed")?.unwrap_or(0) as u64,
    };
    let chat = opt_bool(&options, "chat")?.unwrap_or(false);
    let on_token = opt_function(&options, "onToken")?;
    let device = opt_string(&options, "device")?.unwrap_or_else(|| "wasm".to_string());
    if device != "wasm" && device != "webgpu" {
        return Err(JsError::new(&format!("options.device = {device:?}: expected \"wasm\" or \"webgpu\"")));
    }
    let greedy = sampling.temperature == 0.0;
    let mut sampler = Sampler::new(sampling).map_err(js_err)?;
    let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
    let m = &mut *guard;
    let ids = prompt_ids(&m.tokenizer, &prompt, chat)?;
    let capacity = ids.len() + max_tokens.max(1);
    let mut runner = if device == "webgpu" {
        Runner::Gpu(GpuRunner::prepare(&mut m.gpu, &m.model, capacity, ids.len()).await?)
    } else {
        let state = Box::new(m.model.new_state(capacity).map_err(js_err)?);
        Runner::Wasm { model: &m.model, state, logits: vec![0.0f32; m.model.config().vocab_size] }
    };
    let t = lowbit_now();
    let mut next = runner.next(&ids, &mut sampler, greedy).await?;
    let prefill_ms = lowbit_now() - t;
    let eos = m.tokenizer.eos_ids();
    let mut stream = m.tokenizer.stream();
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut decode_steps = 0usize;
    let t = lowbit_now();
    let emit = |piece: &str, id: u32| {
        if let Some(f) = &on_token {
            if !piece.is_empty() || id != u32::MAX {
                let _ = f.call2(&JsValue::NULL, &JsValue::from_str(piece), &JsValue::from(id));
            }
        }
    };
    while tokens.len() < max_tokens {
        let id = next;
        tokens.push(id);
        if eos.contains(&id) {
            break;
        }
        let piece = stream.push(id).map_err(js_err)?;
        text.push_str(&piece);
        emit(&piece, id);
        // Let the page draw the piece before the next forward.
        next_tick().await;
        if tokens.len() == max_tokens {
            break;
        }
        next = runner.next(&[id], &mut sampler, greedy).await?;
        decode_steps += 1;
    }
    let decode_ms = lowbit_now() - t;
    let tail = stream.finish().map_err(js_err)?;
    if !tail.is_empty() {
        text.push_str(&tail);
        emit(&tail, u32::MAX);
    }
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1000.0 / ms } else { 0.0 };
    let token_array = Array::new();
    for id in &tokens {
        token_array.push(&JsValue::from(*id));
    }
    Ok(object(&[
        ("text", text.as_str().into()),
        ("tokens", token_array.into()),
        ("promptTokens", (ids.len() as f64).into()),
        ("prefillMs", prefill_ms.into()),
        ("decodeMs", decode_ms.into()),
        ("decodeSteps", (decode_steps as f64).into()),
        ("prefillTokS", per_s(ids.len(), prefill_ms).into()),
        ("decodeTokS", per_s(decode_steps, decode_ms).into()),
        ("heapBytes", heap_bytes().into()),
        ("device", device.as_str().into()),
    ]))
}

/// `Uint8Array` or `ArrayBuffer` → a `Uint8Array` over it (no copy).
fn uint8_array(v: &JsValue, what: &str) -> Result<Uint8Array, JsError> {
    if let Some(a) = v.dyn_ref::<Uint8Array>() {
        return Ok(a.clone());
    }
    if v.is_instance_of::<js_sys::ArrayBuffer>() {
        return Ok(Uint8Array::new(v));
    }
    Err(JsError::new(&format!("{what}: expected a Uint8Array or an ArrayBuffer")))
}

/// A JS buffer that stays outside the WASM heap, read a range at a time.
struct JsFile(Uint8Array);

// SAFETY: `ReadAt` requires `Send + Sync`, which a JS value is not. This crate is built for
// wasm32-unknown-unknown without the `atomics` feature: there is one thread, so the value is never sent to or
// shared with another thread.
unsafe impl Send for JsFile {}
// SAFETY: as for `Send` above: a single-threaded target.
unsafe impl Sync for JsFile {}

/// A GGUF's checkpoint and tokenizer, read on demand from a JS buffer: only its header is copied into wasm
/// memory (`GgufFile::from_reader`), each tensor's bytes while it is decoded.
fn gguf_on_demand(file: Uint8Array, what: &str) -> Result<(lowbit::io::Checkpoint, Tokenizer), JsError> {
    let len = file.length() as usize;
    let mut magic = [0u8; 4];
    if len >= 4 {
        file.subarray(0, 4).copy_to(&mut magic);
    }
    if &magic != b"GGUF" {
        return Err(JsError::new(&format!(
            "{what}: not a GGUF file (it does not start with the GGUF magic); give a .gguf file, or a model \
             directory's files as {{files: {{...}}}}"
        )));
    }
    let reader = JsFile(file);
    let read_at: ReadAt = Arc::new(move |offset, n| {
        let end =
            offset.checked_add(n).filter(|&e| e <= reader.0.length() as usize).ok_or("past the end of the buffer")?;
        Ok(reader.0.subarray(offset as u32, end as u32).to_vec())
    });
    let gguf =
        GgufFile::from_reader(len, read_at, Limits::DEFAULT).map_err(|e| JsError::new(&format!("{what}: {e}")))?;
    let tok = Tokenizer::from_gguf(&gguf.tokenizer().map_err(js_err)?).map_err(js_err)?;
    let ck = lowbit::io::Checkpoint::from_gguf(gguf, Limits::DEFAULT).map_err(js_err)?;
    Ok((ck, tok))
}

/// A model directory's files (`{name: bytes}`): its one safetensors file, `config.json`, `tokenizer.json`.
fn from_directory_files(files: &JsValue) -> Result<(lowbit::io::Checkpoint, Tokenizer), JsError> {
    if !files.is_object() {
        return Err(JsError::new("source.files: expected an object {fileName: Uint8Array, ...}"));
    }
    let names: Vec<String> =
        Object::keys(files.unchecked_ref::<Object>()).iter().filter_map(|k| k.as_string()).collect();
    let get = |name: &str| -> Result<Option<Vec<u8>>, JsError> {
        match opt(files, name)? {
            None => Ok(None),
            Some(v) => bytes_of(&v, &format!("source.files[{name:?}]")).map(Some),
        }
    };
    let weights: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    let weights = match weights.as_slice() {
        [one] => one.as_str(),
        [] => return Err(JsError::new(&format!("source.files: no .safetensors file among {names:?}"))),
        more => {
            return Err(JsError::new(&format!(
                "source.files: {} safetensors files ({more:?}); a sharded model is not supported in the page, \
                 give one file (e.g. written by `lowbit quantize`)",
                more.len()
            )))
        }
    };
    let config = get("config.json")?.ok_or_else(|| JsError::new("source.files: config.json is missing"))?;
    let config: serde_json::Value =
        serde_json::from_slice(&config).map_err(|e| JsError::new(&format!("config.json: expected JSON: {e}")))?;
    let tok_json = get("tokenizer.json")?.ok_or_else(|| JsError::new("source.files: tokenizer.json is missing"))?;
    let tok_config = get("tokenizer_config.json")?;
    let special = get("special_tokens_map.json")?;
    let tok = Tokenizer::from_json(&tok_json, tok_config.as_deref(), special.as_deref()).map_err(js_err)?;
    let bytes = get(weights)?.unwrap_or_default();
    let ck =
        lowbit::io::Checkpoint::from_shared_with_config(Arc::new(bytes), config, Limits::DEFAULT).map_err(js_err)?;
    Ok((ck, tok))
}
