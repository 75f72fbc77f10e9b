// lowbit demo page: builds layers, runs the fused forward on WASM SIMD and on WebGPU, shows time, throughput
// and the error against the reference, and a checkpoint with a PEFT adapter from tests/data.
import { init, lb, variant } from './lowbit.js';
import { fetchBytes, rng, compare, timeIt } from './common.js';

const q = new URLSearchParams(location.search);
const quick = q.has('quick');
const OUT = Number(q.get('out') || (quick ? 512 : 2048));
const IN = Number(q.get('in') || (quick ? 512 : 2048));
const RANK = Number(q.get('rank') || 16);
const MS = (q.get('m') || '1,8').split(',').map(Number);
const $ = (id) => document.getElementById(id);
const rows = [];
let allOk = true;

function addRow(r) {
  rows.push(r);
  const tr = document.createElement('tr');
  const cells = [r.layer, r.m, r.device, r.error ? '—' : `${r.ms.toFixed(3)} ms`, r.error ? '—' : r.gflops.toFixed(2),
    r.error ? '—' : r.gbs.toFixed(2), r.error ? r.error : r.maxErr.toExponential(2), r.error ? '' : r.worst.toExponential(1)];
  for (const c of cells) { const td = document.createElement('td'); td.textContent = c; tr.appendChild(td); }
  tr.className = r.error ? 'note' : (r.ok ? 'ok' : 'bad');
  $('tbl').tBodies[0].appendChild(tr);
  drawChart();
}

function drawChart() {
  const cv = $('chart'), g = cv.getContext('2d');
  g.clearRect(0, 0, cv.width, cv.height);
  const data = rows.filter(r => !r.error);
  if (!data.length) return;
  const max = Math.max(...data.map(r => r.gflops));
  const bw = Math.min(60, (cv.width - 60) / data.length - 6);
  g.font = '11px sans-serif'; g.fillStyle = '#000'; g.fillText('GFLOP/s (higher is better)', 4, 12);
  data.forEach((r, i) => {
    const h = (cv.height - 70) * r.gflops / max, x = 50 + i * (bw + 6), y = cv.height - 50 - h;
    g.fillStyle = r.device === 'webgpu' ? '#3b7dd8' : '#e08a2c';
    g.fillRect(x, y, bw, h);
    g.fillStyle = '#000'; g.fillText(r.gflops.toFixed(1), x, y - 3);
    g.save(); g.translate(x + 2, cv.height - 46); g.rotate(Math.PI / 6);
    g.fillText(`${r.layer.split(' ')[0]} M=${r.m} ${r.device === 'webgpu' ? 'GPU' : 'CPU'}`, 0, 0); g.restore();
  });
  g.fillStyle = '#e08a2c'; g.fillRect(cv.width - 220, 4, 10, 10); g.fillStyle = '#000'; g.fillText('WASM SIMD (CPU)', cv.width - 206, 13);
  g.fillStyle = '#3b7dd8'; g.fillRect(cv.width - 90, 4, 10, 10); g.fillStyle = '#000'; g.fillText('WebGPU', cv.width - 76, 13);
}

async function bench(name, layer, m, device, r) {
  const x = r.vec(m * layer.inFeatures, 1);
  try {
    const y = await layer.forwardAsync(x, m, device);
    const c = compare(y, layer.forwardReference(x, m), layer.errorBound(x, m, undefined, device));
    const ms = await timeIt(() => layer.forwardAsync(x, m, device), quick ? 60 : 300);
    const flops = 2 * m * layer.inFeatures * layer.outFeatures;
    allOk &&= c.ok;
    addRow({ layer: name, m, device, ms, gflops: flops / ms / 1e6, gbs: layer.packedBytes / ms / 1e6, maxErr: c.maxErr, worst: c.worstRatio, ok: c.ok });
  } catch (e) {
    addRow({ layer: name, m, device, error: String(e && e.message || e) });
  }
}

async function main() {
  await init();
  const info = JSON.parse(lb.buildInfo());
  let gpu;
  try {
    gpu = { ok: true, adapter: JSON.parse(await lb.initWebGpu()) };
    // wgpu's browser backend leaves the adapter name empty: ask the browser for its description.
    const a = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    const i = a && a.info || {};
    gpu.adapter.name ||= [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(' ') || 'unnamed adapter';
    gpu.adapter.fallback = i.isFallbackAdapter ?? a?.isFallbackAdapter;
  } catch (e) { gpu = { ok: false, why: String(e && e.message || e) }; }
  $('env').textContent = `lowbit-web ${info.version}; CPU kernels: ${info.isa} (WASM SIMD ${info.simd128 ? 'on' : 'off'}, build ${variant}), single thread\n` +
    (gpu.ok ? `WebGPU: ${gpu.adapter.name}${gpu.adapter.fallback ? ' (fallback adapter)' : ''} — ${gpu.adapter.type === 'Cpu' ? 'a CPU (software) adapter, ' : ''}${gpu.adapter.backend}${gpu.adapter.driver ? ', ' + gpu.adapter.driver : ''}; f16 ${gpu.adapter.f16}, subgroups ${gpu.adapter.subgroups}`
      : `WebGPU unavailable: ${gpu.why}`);

  const r = rng(1);
  const w = r.vec(OUT * IN, 0.5);
  const makers = [
    [`nf4+dq bs64 ${OUT}x${IN} +LoRA r${RANK}`, () => lb.quantizeNf4(w, OUT, IN, 64, true, r.vec(OUT, 0.1))],
    [`int8 channel ${OUT}x${IN} +LoRA r${RANK}`, () => lb.quantizeInt8(w, OUT, IN, 'channel', r.vec(OUT, 0.1))],
  ];
  const layers = makers.map(([name, make]) => {
    const layer = make();
    layer.addLora('demo', RANK, r.vec(RANK * IN, 0.05), r.vec(OUT * RANK, 0.05), 2 * RANK, false);
    return [name, layer];
  });
  // Warm-up: the browser first runs WASM through its baseline compiler and tiers hot functions up in the
  // background; without this the first rows measured the baseline code (up to 20× slower).
  const warm = performance.now();
  while (performance.now() - warm < (quick ? 600 : 1500)) {
    for (const [, layer] of layers) for (const m of MS) layer.forward(r.vec(m * layer.inFeatures, 1), m);
  }
  for (const [name, layer] of layers) {
    for (const m of MS) {
      await bench(name, layer, m, 'cpu', r);
      if (gpu.ok) await bench(name, layer, m, 'webgpu', r);
    }
  }

  // A real bitsandbytes checkpoint with a PEFT adapter, served from tests/data.
  try {
    const ck = lb.Checkpoint.fromBytes(await fetchBytes('../../tests/data/peft_base.safetensors'));
    const cfg = await (await fetch('../../tests/data/peft_adapter/adapter_config.json')).text();
    const rep = JSON.parse(ck.attachPeft(cfg, await fetchBytes('../../tests/data/peft_adapter/adapter_model.safetensors'), 'default'));
    const lines = [`layers: ${ck.layerNames().join(', ')}`, `adapter "default" from tests/data/peft_adapter (r=${JSON.parse(cfg).r}, lora_alpha=${JSON.parse(cfg).lora_alpha}): attached to ${rep.attached.join(', ')}` +
      (rep.layers_without_adapter.length ? `; no adapter weights for ${rep.layers_without_adapter.join(', ')}` : '')];
    for (const p of ck.layerNames()) {
      const layer = ck.layer(p);
      const d = JSON.parse(layer.describe());
      const x = r.vec(4 * layer.inFeatures, 1);
      for (const dev of gpu.ok ? ['cpu', 'webgpu'] : ['cpu']) {
        const c = compare(await layer.forwardAsync(x, 4, dev), layer.forwardReference(x, 4), layer.errorBound(x, 4, undefined, dev));
        allOk &&= c.ok;
        lines.push(`${p} [${d.out_features}x${d.in_features} ${d.weight.format}${d.weight.double_quant ? '+dq' : ''} bs${d.weight.blocksize}, adapters: ${layer.adapterNames().join(', ') || 'none'}] ${dev}: ` +
          `max |err| ${c.maxErr.toExponential(2)}, err/bound ${c.worstRatio.toFixed(3)} ${c.ok ? 'OK' : 'FAIL'}`);
      }
    }
    $('peft').textContent = lines.join('\n');
  } catch (e) {
    allOk = false;
    $('peft').textContent = `failed: ${e && e.message || e}`;
  }
  $('out').textContent = JSON.stringify({ ok: allOk, info, webgpu: gpu, rows });
  document.title = `${allOk ? 'OK' : 'FAIL'} lowbit demo (WebGPU ${gpu.ok ? 'on ' + gpu.adapter.name : 'unavailable'})`;
}

main().catch(e => {
  $('env').textContent += `\nerror: ${e && e.stack || e}`;
  $('out').textContent = JSON.stringify({ ok: false, error: String(e && e.message || e), rows });
  document.title = 'FAIL ' + String(e && e.message || e).slice(0, 200);
});
