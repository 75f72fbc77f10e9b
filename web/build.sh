#!/usr/bin/env bash
# Builds lowbit-web for the browser: web/pkg/ (wasm-bindgen --target web: lowbit_web.js, .wasm, .d.ts), and
# web/pkg-relaxed/, the same with relaxed SIMD (web/www/lowbit.js loads it where the browser has it).
# Installs what is missing on a fresh Debian 12 machine (as root): Debian's rustc-web 1.96 + std sources + lld
# (the wasm32 std is built with -Zbuild-std; rustup's wasm32 target is not needed), and wasm-bindgen-cli at
# exactly the version of the wasm-bindgen crate in web/Cargo.lock (about 5 minutes, once).
#
#   web/build.sh                 release build, features from $LOWBIT_WEB_FEATURES (default: webgpu)
#   LOWBIT_WEB_FEATURES= web/build.sh   CPU only (WebGPU calls then reject with "not available in this build")
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n==> %s\n' "$*"; }
features="${LOWBIT_WEB_FEATURES-webgpu}"

need=()
for p in rustc-web cargo-web rust-web-src rust-web-llvm lld-22; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]} (Debian's Rust 1.96 for wasm32, about 1 minute)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/"/,"",$3); print $3}' Cargo.lock)
wb="$HOME/.cargo/bin/wasm-bindgen"
have=$("$wb" --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  step "cargo install wasm-bindgen-cli --version $want (found '${have:-none}'; about 5 minutes, once)"
  # The host toolchain (rustup's cargo, or Debian's) builds the CLI; --locked fails with this registry, omit it.
  cargo install wasm-bindgen-cli --version "$want"
fi

step "cargo build --release --target wasm32-unknown-unknown (simd128, -Zbuild-std, features: '${features:-none}')"
# Debian's cargo/rustc by full path: rustup's proxies in ~/.cargo/bin shadow them on PATH. RUSTC_BOOTSTRAP only
# here, for -Zbuild-std. simd128 comes from web/.cargo/config.toml.
PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  /usr/bin/cargo build --locked --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort \
  ${features:+--features "$features"}

step "wasm-bindgen --target web --out-dir web/pkg"
"$wb" --target web --out-dir pkg target/wasm32-unknown-unknown/release/lowbit_web.wasm
ls -l pkg | awk 'NR>1{print "   ", $5, $9}'

# A second build with relaxed SIMD (f32x4.relaxed_madd in the 4-bit GEMV) for browsers that validate it;
# web/www/lowbit.js picks it by feature detection and falls back to web/pkg. LOWBIT_WEB_RELAXED=0 skips it.
if [ "${LOWBIT_WEB_RELAXED:-1}" != 0 ]; then
  step "cargo build (simd128 + relaxed-simd) -> web/pkg-relaxed"
  PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="-C target-feature=+simd128,+relaxed-simd" \
    /usr/bin/cargo build --locked --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort \
    --target-dir target/relaxed ${features:+--features "$features"}
  "$wb" --target web --out-dir pkg-relaxed target/relaxed/wasm32-unknown-unknown/release/lowbit_web.wasm
fi
