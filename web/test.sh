#!/usr/bin/env bash
# Builds lowbit-web and runs its tests in headless Chromium (Debian's, WebGPU on SwiftShader): the
# wasm-bindgen-test suite web/tests/browser.rs (through chromedriver), then web/www/test.html (every check
# against the reference), then the demo page (index.html?quick=1; its result must be OK too). Exit status
# non-zero on any failure or timeout. Screenshots and JSON reports: target/web/{test,demo}.{png,json}.
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

step "browser test: web/www/test.html in headless Chromium"
node run.mjs test "webgpu=${WEBGPU:-auto}"

step "demo page: web/www/index.html?quick=1 in headless Chromium (screenshot: target/web/demo.png)"
node run.mjs demo quick=1

step "web tests passed in $(( $(date +%s) - t0 )) s"
