#!/usr/bin/env bash
# Builds ggml (from the llama.cpp sources vendored in the llama-cpp-python source package on PyPI) and
# `ggml-kernels` (kernels.c) outside the tracked tree, for `bench-peers --ggml PATH`.
#
#   bench-peers/ggml/build.sh [DIR]      DIR defaults to $HOME/.cache/lowbit/peers; prints the binary's path
#
# Needs cmake and ninja (`pip install cmake ninja` if missing), gcc/g++ and network access to PyPI.
# ggml is configured as llama.cpp's release builds for the machine they run on: GGML_NATIVE=ON (-march=native),
# CPU_REPACK on (Q4_0 / IQ4_NL weights repacked to the 8×8-interleaved layout at load), AMX where the CPU
# has it, no OpenMP (ggml's own thread pool).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$HOME/.cache/lowbit/peers}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$dir"
cd "$dir"
src="llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$src/ggml" ]; then
  # `pip download --no-binary :all:` would build the package's metadata (and cmake from source) first; the
  # sdist is all that is needed, so take its address from the index.
  python3 - "$version" <<'PY'
import re, sys, urllib.parse, urllib.request
v = sys.argv[1]
# The simple index (PEP 503), which every PyPI mirror serves (the JSON API is missing on some).
index = "https://pypi.org/simple/llama-cpp-python/"
page = urllib.request.urlopen(index).read().decode()
url = next(urllib.parse.urljoin(index, h) for h in re.findall(r'href="([^"]+)"', page)
           if urllib.parse.urlparse(h).path.endswith(f"/llama_cpp_python-{v}.tar.gz"))
name = urllib.parse.urlparse(url).path.rsplit("/", 1)[1]
print("downloading", url, file=sys.stderr)
urllib.request.urlretrieve(url, name)
PY
  tar xzf "llama_cpp_python-$version.tar.gz" "$src"
fi
if [ ! -f ggml-build/ggml/src/libggml-cpu.a ]; then
  cmake -S "$src" -B ggml-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CPU_REPACK=ON \
    -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >&2
  cmake --build ggml-build --target ggml >&2
fi
lib=ggml-build/ggml/src
g++ -O2 -march=native -x c "$here/kernels.c" -x none -I "$src/ggml/include" \
  "$lib/libggml.a" "$lib/libggml-cpu.a" "$lib/libggml-base.a" -lpthread -lm -o ggml-kernels
echo "$dir/ggml-kernels"
