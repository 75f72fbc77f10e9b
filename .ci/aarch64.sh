#!/usr/bin/env bash
# The lowbit library's tests for aarch64 (the `neon` level's kernels and the portable `wide` paths as NEON),
# cross-built with Debian's rustc-web and -Zbuild-std and run under qemu user-mode emulation
# (../shared/docs/toolchain.md §3b). Linker and runner come from the environment, so no .cargo/config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in rustc-web cargo-web rust-web-src gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "apt-get install ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
export PATH="/usr/bin:/bin:$PATH"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=target/aarch64-cross
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
/usr/bin/cargo test -Zbuild-std --target aarch64-unknown-linux-gnu -p lowbit --tests
