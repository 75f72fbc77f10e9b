#!/usr/bin/env bash
# Builds lowbit-web and runs its tests in headless Chromium (Debian's, WebGPU on SwiftShader):
# web/www/test.html (every check against the reference; exit status 1 on FAIL or timeout), then the demo page
# (index.html?quick=1; its result must be OK too). Screenshots and JSON reports: target/web/{test,demo}.{png,json}.
# Installs only what is missing (apt: rustc-web…, chromium; cargo: wasm-bindgen-cli; npm: playwright-core).
#   WEBGPU=require web/test.sh   fail when the browser has no WebGPU adapter (default: auto, report it as skipped)
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

./build.sh

if ! [ -x /usr/bin/chromium ]; then
  step "apt-get install chromium (about 80 s)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
if ! [ -f node_modules/playwright-core/package.json ]; then
  step "npm install (playwright-core; drives /usr/bin/chromium, no browser download)"
  npm install --no-audit --no-fund
fi

step "browser test: web/www/test.html in headless Chromium"
node run.mjs test "webgpu=${WEBGPU:-auto}"

step "demo page: web/www/index.html?quick=1 in headless Chromium (screenshot: target/web/demo.png)"
node run.mjs demo quick=1

step "web tests passed in $(( $(date +%s) - t0 )) s"
