// Browser test of lowbit-web: CPU (WASM SIMD) forward vs reference within the stated bound, NF4/FP4
// dequantization bit-exact vs values computed natively by bitsandbytes, PEFT adapters from the fixtures, errors as
// JS exceptions (the page keeps working), and the WebGPU path when the build and the browser have it.
import { init, lb, variant } from './lowbit.js';
import { fetchBytes, tensorF32, rng, compare, bitMismatches } from './common.js';

const out = document.getElementById('out');
const list = document.getElementById('list');
const q = new URLSearchParams(location.search);
const webgpuMode = q.get('webgpu') || 'auto'; // auto | require | skip
const results = [];
function record(name, status, detail = '') {
  results.push({ name, status, detail });
  const li = document.createElement('li');
  li.className = status === 'ok' ? 'ok' : status === 'skip' ? 'skip' : 'fail';
  li.textContent = `${status.toUpperCase()} ${name}${detail ? ' — ' + detail : ''}`;
  list.appendChild(li);
  console.log(li.textContent);
}
function expect(name, cond, detail = '') { record(name, cond ? 'ok' : 'fail', detail); return cond; }
function expectThrows(name, fn, pattern) {
  try { fn(); record(name, 'fail', 'did not throw'); }
  catch (e) {
    const msg = String(e && e.message || e);
    expect(name, e instanceof Error && pattern.test(msg), `throws Error: ${msg.slice(0, 160)}`);
  }
}
async function expectRejects(name, p, pattern) {
  try { await p; record(name, 'fail', 'did not reject'); }
  catch (e) {
    const msg = String(e && e.message || e);
    expect(name, e instanceof Error && pattern.test(msg), `rejects with Error: ${msg.slice(0, 160)}`);
  }
}
const fmt = (c) => `max|err| ${c.maxErr.toExponential(2)}, worst err/bound ${c.worstRatio.toFixed(3)}${c.firstBad ? ', ' + c.firstBad : ''}`;

/** forward and forwardBatch of `layer` on the CPU vs the reference, for each m. */
function checkCpu(name, layer, ms, r) {
  const nAd = layer.adapterNames().length;
  for (const m of ms) {
    const x = r.vec(m * layer.inFeatures, 1);
    const c = compare(layer.forward(x, m), layer.forwardReference(x, m), layer.errorBound(x, m, undefined, 'cpu'));
    expect(`${name} cpu forward m=${m}`, c.ok, fmt(c));
    if (nAd > 0) {
      const ids = Int32Array.from({ length: m }, (_, i) => (i % (nAd + 1)) - 1);
      const cb = compare(layer.forwardBatch(x, m, ids), layer.forwardBatchReference(x, m, ids), layer.errorBound(x, m, ids, 'cpu'));
      expect(`${name} cpu forwardBatch m=${m} ids=[${ids}]`, cb.ok, fmt(cb));
    }
  }
}

async function checkGpu(name, layer, ms, r) {
  const nAd = layer.adapterNames().length;
  for (const m of ms) {
    const x = r.vec(m * layer.inFeatures, 1);
    const c = compare(await layer.forwardAsync(x, m, 'webgpu'), layer.forwardReference(x, m), layer.errorBound(x, m, undefined, 'webgpu'));
    expect(`${name} webgpu forward m=${m}`, c.ok, fmt(c));
    if (nAd > 0) {
      const ids = Int32Array.from({ length: m }, (_, i) => (i % (nAd + 1)) - 1);
      const cb = compare(await layer.forwardBatchAsync(x, m, ids, 'webgpu'), layer.forwardBatchReference(x, m, ids), layer.errorBound(x, m, ids, 'webgpu'));
      expect(`${name} webgpu forwardBatch m=${m}`, cb.ok, fmt(cb));
    }
  }
}

/** Synthetic layers of every format, odd sizes, two LoRA adapters (plain and rsLoRA). */
function syntheticLayers() {
  const r = rng(42);
  const formats = [
    ['int8 tensor', (w, o, i, b) => lb.quantizeInt8(w, o, i, 'tensor', b)],
    ['int8 channel', (w, o, i, b) => lb.quantizeInt8(w, o, i, 'channel', b)],
    ['int8 group:7', (w, o, i, b) => lb.quantizeInt8(w, o, i, 'group:7', b)],
    ['nf4 bs64', (w, o, i, b) => lb.quantizeNf4(w, o, i, 64, false, b)],
    ['nf4+dq bs64', (w, o, i, b) => lb.quantizeNf4(w, o, i, 64, true, b)],
    ['nf4 bs32', (w, o, i, b) => lb.quantizeNf4(w, o, i, 32, false, b)],
    ['nf4+dq bs256', (w, o, i, b) => lb.quantizeNf4(w, o, i, 256, true, b)],
  ];
  // 67×256: rows of whole blocks for every block size (the register GEMV of M ≤ 4), an odd row count.
  const shapes = [[37, 67], [64, 128], [130, 72], [67, 256]];
  const layers = [];
  for (const [fname, make] of formats) {
    for (const [o, i] of shapes) {
      const layer = make(r.vec(o * i, 0.5), o, i, r.vec(o, 1));
      layer.addLora('a4', 4, r.vec(4 * i, 0.3), r.vec(o * 4, 0.3), 8, false);
      layer.addLora('a8rs', 8, r.vec(8 * i, 0.3), r.vec(o * 8, 0.3), 16, true);
      layers.push([`${fname} ${o}x${i}`, layer]);
    }
  }
  return layers;
}

async function main() {
  const t0 = performance.now();
  await init();
  const info = JSON.parse(lb.buildInfo());
  expect('build uses WASM SIMD (simd128)', info.simd128 === true && info.isa === 'portable', JSON.stringify(info));
  expect(`loaded build: ${variant}`, info.relaxed_simd === (variant === 'relaxed-simd'), JSON.stringify(info));

  // 1. Every format on the CPU path vs the reference.
  const synth = syntheticLayers();
  const r = rng(7);
  for (const [name, layer] of synth) {
    checkCpu(name, layer, [1, 2, 3, 4, 8], r);
    expect(`${name} dequantize fast == reference (bits)`, bitMismatches(layer.dequantize(), layer.dequantizeReference()) === 0);
  }

  // 2. NF4/FP4 dequantization bit-exact vs bitsandbytes (values computed natively, stored in the fixture).
  const refs = await fetchBytes('../../tests/data/bnb_4bit.safetensors');
  const bnb = lb.Checkpoint.fromBytes(await fetchBytes('../../tests/data/bnb_linear4bit.safetensors'));
  expect('bnb Linear4bit checkpoint layers', JSON.stringify(bnb.layerNames()) === '["model.layers.0.mlp.down_proj","model.layers.0.mlp.up_proj"]', JSON.stringify(bnb.layerNames()));
  for (const p of ['model.layers.0.mlp.up_proj', 'model.layers.0.mlp.down_proj']) {
    const layer = bnb.layer(p);
    const want = tensorF32(refs, `linear4bit.${p}.dequant_f32`);
    const got = layer.dequantize();
    const bad = bitMismatches(got, want);
    expect(`bnb ${p} (${JSON.parse(layer.describe()).weight.format}) dequantize bit-exact vs bitsandbytes`, bad === 0, `${bad} of ${want.length} differ`);
    checkCpu(`bnb ${p}`, layer, [1, 5], r);
  }
  // (Not double-quantized cases: lowbit's DQ codes may differ from bitsandbytes' by one where both round
  // near a tie (tests/nf4_bnb.rs); DQ decoding is checked bit-exact on the up_proj checkpoint above.)
  for (const [name, bs, dq] of [['nf4_bs64_f32', 64, false], ['nf4_bs32_f32', 32, false], ['nf4_odd_7x9', 64, false], ['nf4_zero_tail', 64, false]]) {
    const x = tensorF32(refs, `${name}.x`);
    const want = tensorF32(refs, `${name}.dequant`);
    const hdr = JSON.parse(new TextDecoder().decode(refs.subarray(8, 8 + Number(new DataView(refs.buffer).getBigUint64(0, true)))));
    const [rows, cols] = hdr[`${name}.x`].shape;
    const bad = bitMismatches(lb.quantizeNf4(x, rows, cols, bs, dq).dequantize(), want);
    expect(`quantizeNf4 ${name} → dequantize bit-exact vs bitsandbytes`, bad === 0, `${bad} of ${want.length} differ`);
  }

  // 3. PEFT adapter from the fixtures on a bitsandbytes base.
  const baseBytes = await fetchBytes('../../tests/data/peft_base.safetensors');
  const cfg = await (await fetch('../../tests/data/peft_adapter/adapter_config.json')).text();
  const adBytes = await fetchBytes('../../tests/data/peft_adapter/adapter_model.safetensors');
  const ck = lb.Checkpoint.fromBytes(baseBytes);
  const report = JSON.parse(ck.attachPeft(cfg, adBytes, 'default'));
  expect('PEFT attach report', report.attached.length === 2 && report.unmatched_modules.length === 0, JSON.stringify(report));
  for (const p of ck.layerNames()) {
    const layer = ck.layer(p);
    const d = JSON.parse(layer.describe());
    checkCpu(`peft ${p} [${d.weight.format}${d.weight.double_quant ? '+dq' : ''}, adapters ${layer.adapterNames()}]`, layer, [1, 4], r);
  }
  {
    const viaCk = ck.layer('model.layers.0.mlp.up_proj');
    const single = lb.Checkpoint.fromBytes(baseBytes).layer('model.layers.0.mlp.up_proj.weight');
    const id = single.attachPeft(cfg, adBytes, 'default');
    const x = r.vec(3 * single.inFeatures);
    expect('Layer.attachPeft == Checkpoint.attachPeft', id === 0 && bitMismatches(single.forward(x, 3), viaCk.forward(x, 3)) === 0);
    const y0 = viaCk.forward(x, 3);
    viaCk.setAdapterEnabled('default', false);
    const c = compare(viaCk.forward(x, 3), lb.Checkpoint.fromBytes(baseBytes).layer('model.layers.0.mlp.up_proj').forwardReference(x, 3), viaCk.errorBound(x, 3, undefined, 'cpu'));
    expect('disabled adapter == base layer', c.ok && bitMismatches(viaCk.forward(x, 3), y0) > 0, fmt(c));
  }

  // 4. Bad input: JS exceptions with lowbit's messages, and the page keeps working.
  const good = synth[4][1];
  const corrupt = baseBytes.slice(); corrupt[9] ^= 0x55; corrupt[20] = 0x7b;
  expectThrows('corrupt checkpoint throws', () => lb.Checkpoint.fromBytes(corrupt), /safetensors|header|JSON/i);
  expectThrows('truncated checkpoint throws', () => lb.Checkpoint.fromBytes(baseBytes.subarray(0, baseBytes.length - 100)), /safetensors|bytes|offset|buffer/i);
  expectThrows('empty bytes throw', () => lb.Checkpoint.fromBytes(new Uint8Array(0)), /shorter than the 8-byte header/);
  expectThrows('header length beyond the file throws', () => { const b = new Uint8Array(16); b[0] = 0xff; b[1] = 0xff; lb.Checkpoint.fromBytes(b); }, /header declares/);
  expectThrows('file without quantized weights throws', () => lb.Checkpoint.fromBytes(adBytes), /neither bitsandbytes|Unsupported|without quantized weights/i);
  expectThrows('unknown layer throws', () => ck.layer('nope'), /no quantized layer `nope`/);
  expectThrows('bad PEFT config throws', () => lb.Checkpoint.fromBytes(baseBytes).attachPeft('{"r": ', adBytes, 'default'), /adapter_config|JSON|config/i);
  expectThrows('x of wrong length throws', () => good.forward(new Float32Array(5), 1), /does not match m × in_features/);
  expectThrows('NaN in x throws', () => { const x = new Float32Array(good.inFeatures); x[3] = NaN; good.forward(x, 1); }, /NaN|finite/i);
  expectThrows('adapter id out of range throws', () => good.forwardBatch(new Float32Array(good.inFeatures), 1, Int32Array.of(9)), /adapter_ids/);
  expectThrows('bad block size throws', () => lb.quantizeNf4(new Float32Array(64), 1, 64, 48, false), /block/i);
  expectThrows('bad granularity throws', () => lb.quantizeInt8(new Float32Array(64), 1, 64, 'rows'), /granularity/);
  expectThrows('duplicate adapter name throws', () => good.addLora('a4', 1, new Float32Array(good.inFeatures), new Float32Array(good.outFeatures), 1, false), /a4|adapter/);
  await expectRejects('unknown device rejects', good.forwardAsync(new Float32Array(good.inFeatures), 1, 'tpu'), /expected "cpu" or "webgpu"/);
  {
    const x = r.vec(2 * good.inFeatures);
    const c = compare(await good.forwardAsync(x, 2, 'cpu'), good.forwardReference(x, 2), good.errorBound(x, 2, undefined, 'cpu'));
    expect('still working after the errors (forwardAsync cpu)', c.ok, fmt(c));
  }

  // 5. WebGPU.
  let webgpu = { status: 'skipped' };
  if (webgpuMode !== 'skip') {
    try {
      webgpu = { status: 'available', adapter: JSON.parse(await lb.initWebGpu()) };
    } catch (e) {
      webgpu = { status: 'unavailable', reason: String(e && e.message || e) };
    }
    if (webgpu.status === 'available') {
      record('WebGPU adapter', 'ok', JSON.stringify(webgpu.adapter));
      for (const [name, layer] of synth) await checkGpu(name, layer, [1, 3, 8], r);
      for (const p of ck.layerNames()) await checkGpu(`peft ${p}`, ck.layer(p), [1, 4], r);
    } else {
      record('WebGPU', webgpuMode === 'require' ? 'fail' : 'skip', webgpu.reason);
    }
  }
  return { info, webgpu, ms: Math.round(performance.now() - t0) };
}

try {
  const extra = await main();
  const failed = results.filter(r => r.status === 'fail');
  const passed = results.filter(r => r.status === 'ok').length;
  const skipped = results.filter(r => r.status === 'skip').length;
  const res = { ok: failed.length === 0, passed, failed: failed.length, skipped, ...extra, failures: failed, results };
  out.textContent = JSON.stringify(res, null, 1);
  document.title = `${res.ok ? 'OK' : 'FAIL'} ${passed} passed, ${failed.length} failed, ${skipped} skipped; webgpu ${extra.webgpu.status}`;
} catch (e) {
  out.textContent = JSON.stringify({ ok: false, error: String(e && e.stack || e), results }, null, 1);
  document.title = 'FAIL ' + String(e && e.message || e).slice(0, 200);
}
