// Helpers shared by the demo page (index.html) and the browser test page (test.html).

/** Fetches a file served next to the page (the runner serves the repository root). */
export async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`fetch ${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

/** One tensor of a safetensors file as a Float32Array (F32 tensors only; used for reference values). */
export function tensorF32(bytes, name) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(dv.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const t = header[name];
  if (!t) throw new Error(`tensor ${name} not found`);
  if (t.dtype !== 'F32') throw new Error(`tensor ${name}: dtype ${t.dtype}, expected F32`);
  const [a, b] = t.data_offsets;
  return new Float32Array(bytes.slice(8 + n + a, 8 + n + b).buffer);
}

/** Deterministic uniform values in [-scale, scale) (xorshift). */
export function rng(seed) {
  let s = BigInt(seed) | 1n;
  const M = (1n << 64n) - 1n;
  const next = () => {
    s ^= (s << 13n) & M; s ^= s >> 7n; s ^= (s << 17n) & M;
    return Number(s >> 40n) / 2 ** 24 * 2 - 1;
  };
  return { next, vec: (n, scale = 1) => { const v = new Float32Array(n); for (let i = 0; i < n; i++) v[i] = next() * scale; return v; } };
}

/** got vs want under a per-element bound: {ok, maxErr, worstRatio (max |err|/bound), firstBad}. */
export function compare(got, want, bound) {
  if (got.length !== want.length || bound.length !== want.length) {
    return { ok: false, maxErr: Infinity, worstRatio: Infinity, firstBad: `length ${got.length} vs ${want.length} vs bound ${bound.length}` };
  }
  let maxErr = 0, worstRatio = 0, firstBad = null;
  for (let i = 0; i < got.length; i++) {
    const e = Math.abs(got[i] - want[i]);
    if (!(e <= bound[i])) { if (firstBad === null) firstBad = `element ${i}: got ${got[i]}, reference ${want[i]}, |err| ${e} > bound ${bound[i]}`; }
    maxErr = Math.max(maxErr, e); worstRatio = Math.max(worstRatio, e / bound[i]);
  }
  return { ok: firstBad === null, maxErr, worstRatio, firstBad };
}

/** Number of elements whose f32 bit patterns differ. */
export function bitMismatches(a, b) {
  if (a.length !== b.length) return Math.max(a.length, b.length);
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length), y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  let n = 0; for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) n++;
  return n;
}

/**
 * Median time (ms) of one call of `fn` (async or not), after one warm-up. Calls are timed in batches of at least
 * ~5 ms (browsers coarsen performance.now() to 0.1 ms or worse outside cross-origin isolation), filling about
 * `budgetMs` in all, at least 3 batches.
 */
export async function timeIt(fn, budgetMs = 150) {
  let t = performance.now(); await fn(); const first = performance.now() - t;
  const per = Math.max(1, Math.min(1000, Math.ceil(5 / Math.max(first, 0.01))));
  const ts = []; const t0 = performance.now();
  while (ts.length < 3 || (performance.now() - t0 < budgetMs && ts.length < 50)) {
    t = performance.now();
    for (let i = 0; i < per; i++) await fn();
    ts.push((performance.now() - t) / per);
  }
  ts.sort((a, b) => a - b);
  return ts[ts.length >> 1];
}
