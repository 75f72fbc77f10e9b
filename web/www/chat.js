// The chat page: load a model (the served SmolLM2 GGUF, or a dropped file), quantize it in the page, chat with it
// on WASM or WebGPU, optionally with a PEFT adapter. `?test=1` runs the automated check that web/test.sh reads:
// 16 greedy tokens for a fixed prompt on each device, the error paths, tokens/s and heap size in #out.
import { init, lb, variant } from './lowbit.js';
import { fetchBytes } from './common.js';

// ?nogpu=1: the page as a browser without WebGPU sees it (the error path of device "webgpu").
if (new URLSearchParams(location.search).get('nogpu')) Object.defineProperty(navigator, 'gpu', { value: undefined });
const $ = (id) => document.getElementById(id);
const q = new URLSearchParams(location.search);
const state = { model: null, history: [], busy: false };

function showError(e) {
  const msg = String(e && e.message || e);
  $('error').textContent = msg;
  console.error(msg);
  return msg;
}

const heapTrace = [];
function onProgress(p) {
  if (p.phase !== 'download') heapTrace.push([p.phase, p.done, Math.round(lb.wasmHeapBytes() / 2 ** 20)]);
  const bar = $('bar');
  if (p.phase === 'download') { bar.max = p.total || 1; bar.value = p.done; $('modelinfo').textContent = `downloading ${(p.done / 1e6).toFixed(1)} MB${p.total ? ' of ' + (p.total / 1e6).toFixed(1) : ''}`; }
  else if (p.phase === 'parse') { bar.removeAttribute('value'); $('modelinfo').textContent = 'parsing…'; }
  else if (p.phase === 'quantize') { bar.max = p.total; bar.value = p.done; $('modelinfo').textContent = `quantizing layer ${p.done} of ${p.total}`; }
}

function describe(info) {
  return `${info.source}: ${info.layers} layers, hidden ${info.hidden}, vocab ${info.vocab}; linear layers ${info.scheme}, ` +
    `lm_head ${info.lmHead}; ${(info.weightBytes / 2 ** 20).toFixed(1)} MiB read per token; loaded in ${(info.loadMs / 1000).toFixed(1)} s; ` +
    `WASM heap ${(lb.wasmHeapBytes() / 2 ** 20).toFixed(1)} MiB; build ${variant}` + (info.adapters.length ? `; adapters ${info.adapters.join(', ')}` : '');
}

async function load(source, label) {
  $('error').textContent = '';
  state.model = null;
  for (const id of ['prompt', 'send', 'attach']) $(id).disabled = true;
  try {
    $('modelinfo').textContent = `loading ${label}…`;
    state.model = await lb.Model.load(source, { scheme: $('scheme').value || undefined, onProgress });
    $('bar').max = 1; $('bar').value = 1;
    $('modelinfo').textContent = describe(state.model.info());
    state.history = [];
    for (const id of ['prompt', 'send', 'attach']) $(id).disabled = false;
  } catch (e) {
    $('modelinfo').textContent = 'no model loaded';
    showError(e);
    throw e;
  }
}

/** Files picked or dropped: one .gguf, or a model directory's files. */
async function loadFiles(files) {
  const list = [...files];
  const gguf = list.find(f => f.name.endsWith('.gguf'));
  if (gguf) return load(new Uint8Array(await gguf.arrayBuffer()), gguf.name);
  const map = {};
  for (const f of list) map[f.name] = new Uint8Array(await f.arrayBuffer());
  return load({ files: map }, list.map(f => f.name).join(', '));
}

function chatPrompt(history) {
  // The ChatML template (SmolLM2-Instruct's), as lowbit generate --chat writes it.
  return history.map(([role, text]) => `<|im_start|>${role}\n${text}<|im_end|>\n`).join('') + '<|im_start|>assistant\n';
}

async function send(text, opts = {}) {
  if (!state.model || state.busy) return null;
  state.busy = true; $('send').disabled = true;
  $('error').textContent = '';
  const user = document.createElement('div'); user.className = 'user';
  const adapters = state.model.info().adapters;
  user.textContent = `> ${text}   [${opts.device || $('device').value}${adapters.length ? ', adapter ' + adapters.join(', ') : ''}]`;
  const bot = document.createElement('div'); bot.className = 'bot';
  $('log').append(user, bot);
  state.history.push(['user', text]);
  try {
    const r = await state.model.generate(chatPrompt(state.history), {
      maxTokens: Number($('maxTokens').value), temperature: Number($('temperature').value), topP: Number($('topP').value),
      seed: 0, device: $('device').value, ...opts,
      onToken: (piece) => { bot.textContent += piece; $('log').scrollTop = $('log').scrollHeight; },
    });
    state.history.push(['assistant', r.text]);
    $('stats').textContent = `${r.device}: prefill ${r.promptTokens} tokens at ${r.prefillTokS.toFixed(1)} tokens/s, ` +
      `decode ${r.decodeSteps} tokens at ${r.decodeTokS.toFixed(1)} tokens/s; WASM heap ${(r.heapBytes / 2 ** 20).toFixed(1)} MiB`;
    return r;
  } catch (e) {
    state.history.pop();
    bot.textContent += ' [error]';
    showError(e);
    throw e;
  } finally {
    state.busy = false; $('send').disabled = false;
  }
}

async function expectRejects(checks, name, promiseOrFn, pattern) {
  try {
    await (typeof promiseOrFn === 'function' ? promiseOrFn() : promiseOrFn);
    checks.push({ name, ok: false, detail: 'did not throw' });
  } catch (e) {
    const msg = String(e && e.message || e);
    checks.push({ name, ok: e instanceof Error && pattern.test(msg), detail: msg.slice(0, 200) });
  }
}

/** The automated check (web/test.sh): see the header. */
async function runTest() {
  const tokens = Number(q.get('tokens') || 16);
  const prompt = q.get('prompt') || 'What is the capital of France?';
  const devices = (q.get('devices') || 'wasm,webgpu').split(',');
  const report = { prompt, max_tokens: tokens, checks: [] };
  const t0 = performance.now();
  await load('/models/smollm2.gguf', 'served SmolLM2');
  report.model = state.model.info();
  report.heap_mb_loaded = report.model.heapBytes / 2 ** 20;
  report.wasm_build = variant;
  report.heap_trace_mib = heapTrace.slice();
  report.load_s = (performance.now() - t0) / 1000;
  report.prompt_tokens = Array.from(state.model.encode(prompt, true));
  try {
    report.webgpu_adapter = JSON.parse(await lb.initWebGpu());
    report.webgpu_available = true;
  } catch (e) {
    report.webgpu_available = false;
    report.webgpu_unavailable = String(e && e.message || e);
  }
  for (const device of devices) {
    if (device === 'webgpu' && !report.webgpu_available) {
      report.tokens_webgpu = null;
      report.error_webgpu = report.webgpu_unavailable;
      continue;
    }
    $('device').value = device;
    state.history = [];
    try {
      const r = await send(prompt, { maxTokens: tokens, temperature: 0, device });
      report[`tokens_${device}`] = r.tokens;
      report[`text_${device}`] = r.text;
      report[`tok_s_${device}`] = r.decodeTokS;
      report[`prefill_tok_s_${device}`] = r.prefillTokS;
    } catch (e) {
      report[`tokens_${device}`] = null;
      report[`error_${device}`] = String(e && e.message || e);
    }
  }
  $('device').value = 'wasm';
  // Errors are exceptions with lowbit's messages, and the model keeps working after them.
  const c = report.checks;
  await expectRejects(c, 'bad model bytes', lb.Model.load(new Uint8Array([1, 2, 3, 4, 5])), /not a GGUF/);
  const head = (await fetchBytes('/models/smollm2.gguf')).subarray(0, 1 << 20);
  await expectRejects(c, 'truncated GGUF', lb.Model.load(head), /GGUF|truncat|beyond|end of/i);
  await expectRejects(c, 'missing URL', lb.Model.load('/models/missing.gguf'), /HTTP 404/);
  await expectRejects(c, 'bad scheme option', lb.Model.load(head, { scheme: 'nf5' }), /scheme/);
  const cfg = await (await fetch('../../tests/data/peft_adapter/adapter_config.json')).text();
  const adw = await fetchBytes('../../tests/data/peft_adapter/adapter_model.safetensors');
  await expectRejects(c, 'adapter for another model', () => state.model.attachPeft(cfg, adw, 'wrong'), /not a decoder linear layer|the adapter is for a/);
  await expectRejects(c, 'adapter with bad bytes', () => state.model.attachPeft(cfg, new Uint8Array(10), 'bad'), /safetensors|header|bytes/i);
  await expectRejects(c, 'unknown device', state.model.generate('hi', { device: 'tpu' }), /expected "wasm" or "webgpu"/);
  const again = await state.model.generate(prompt, { maxTokens: 2, chat: true });
  c.push({ name: 'model still works after the errors', ok: again.tokens.length === 2 && again.tokens[0] === report.tokens_wasm?.[0], detail: `tokens ${again.tokens}` });
  // logits(): every position's row; the last row's argmax is the first generated token.
  const ids = Uint32Array.from(report.prompt_tokens);
  const lg = state.model.logits(ids);
  const vocab = report.model.vocab, last = lg.subarray((ids.length - 1) * vocab);
  let arg = 0; for (let i = 1; i < vocab; i++) if (last[i] > last[arg]) arg = i;
  c.push({ name: 'logits: [T × vocab], argmax of the last row = first greedy token', ok: lg.length === ids.length * vocab && arg === report.tokens_wasm?.[0], detail: `length ${lg.length}, argmax ${arg}` });
  await expectRejects(c, 'logits of an id outside the vocabulary', () => state.model.logits(Uint32Array.of(vocab)), /vocab/);
  if (!report.webgpu_available) {
    await expectRejects(c, 'device "webgpu" without WebGPU', state.model.generate('hi', { device: 'webgpu', maxTokens: 1 }), /WebGPU is not available|no WebGPU/);
  }
  c.push({ name: 'a directory without weights', ok: await lb.Model.load({ files: { 'config.json': new Uint8Array(2) } }).then(() => false, (e) => /no \.safetensors file/.test(e.message)) });
  // With a PEFT adapter (served from llm/tests/data): the same greedy run on WASM, compared natively by test.sh.
  const adapter = q.get('adapter');
  if (adapter) {
    const acfg = await (await fetch(`${adapter}/adapter_config.json`)).text();
    state.model.attachPeft(acfg, await fetchBytes(`${adapter}/adapter_model.safetensors`), 'lora');
    report.model_with_adapter = state.model.info();
    $('device').value = 'wasm';
    state.history = [];
    const r = await send(prompt, { maxTokens: tokens, temperature: 0, device: 'wasm' });
    report.tokens_wasm_lora = r.tokens;
    report.text_wasm_lora = r.text;
  }
  report.heap_mb = lb.wasmHeapBytes() / 2 ** 20;
  // A model directory's files (written by `lowbit quantize --scheme nf4:64+dq`): loaded as stored.
  const dir = q.get('dir');
  if (dir) {
    const files = {};
    for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.safetensors']) files[f] = await fetchBytes(`${dir}/${f}`);
    await load({ files }, 'model directory');
    report.model_dir = state.model.info();
    state.history = [];
    const r = await send(prompt, { maxTokens: tokens, temperature: 0, device: 'wasm' });
    report.tokens_wasm_dir = r.tokens;
    report.heap_mb_after_dir = lb.wasmHeapBytes() / 2 ** 20;
  }
  report.total_s = (performance.now() - t0) / 1000;
  const wasmOk = Array.isArray(report.tokens_wasm) && report.tokens_wasm.length > 0;
  $('modelinfo').textContent = describe(state.model.info());
  report.ok = wasmOk && c.every(x => x.ok);
  $('out').textContent = JSON.stringify(report, null, 1);
  document.title = `${report.ok ? 'OK' : 'FAIL'} wasm ${wasmOk ? report.tok_s_wasm.toFixed(1) + ' tokens/s' : 'failed'}; ` +
    `webgpu ${report.tokens_webgpu ? report.tok_s_webgpu.toFixed(1) + ' tokens/s' : 'unavailable'}; ${c.filter(x => !x.ok).length} failed checks`;
}

await init();
$('served').onclick = () => load('/models/smollm2.gguf', 'served SmolLM2').catch(() => {});
$('file').onchange = (e) => loadFiles(e.target.files).catch(() => {});
const drop = $('drop');
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove('over'); loadFiles(e.dataTransfer.files).catch(() => {}); };
$('attach').onclick = async () => {
  try {
    const [c, w] = [$('adcfg').files[0], $('adw').files[0]];
    if (!c || !w) throw new Error('pick both adapter_config.json and adapter_model.safetensors');
    const name = c.name.replace(/\.json$/, '') === 'adapter_config' ? `adapter${state.model.info().adapters.length + 1}` : c.name;
    state.model.attachPeft(await c.text(), new Uint8Array(await w.arrayBuffer()), name);
    $('adinfo').textContent = `attached as ${name}`;
    $('modelinfo').textContent = describe(state.model.info());
  } catch (e) { showError(e); }
};
const submit = () => { const t = $('prompt').value.trim(); if (t) { $('prompt').value = ''; send(t).catch(() => {}); } };
$('send').onclick = submit;
$('prompt').onkeydown = (e) => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); submit(); } };

if (q.get('test')) {
  runTest().catch((e) => {
    $('out').textContent = JSON.stringify({ ok: false, error: String(e && e.stack || e) });
    document.title = 'FAIL ' + String(e && e.message || e).slice(0, 200);
  });
} else {
  document.title = 'lowbit chat';
}
