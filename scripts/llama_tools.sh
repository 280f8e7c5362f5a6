#!/usr/bin/env bash
# Build llama.cpp's command-line tools used by the tests (llama-gguf-split, llama-imatrix,
# llama-perplexity, llama-quantize) from the llama-cpp-python 0.3.36 sdist, the same
# llama.cpp source as the test oracle.  CPU only, -DGGML_NATIVE=ON like the wheel (less AMX on
# x86-64, see below), static.
#
# The binaries go to a per-user cache that outlives the repository
#   ${GGUF_MOE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/gguf-moe}/llama.cpp-<version>-<key>/bin
# keyed by the sdist version, the build flags, the compiler and this CPU, so a fresh clone
# on the same machine reuses them.  .cache/llama-bin (in the repository) links to that
# folder; tests/oracle.py finds the tools there (or in $GGUF_MOE_LLAMA_BIN).
# First build about 10 minutes on 2 cores; afterwards this script costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON_FOR_DOWNLOAD:-$ROOT/.venv/bin/python}
VER=0.3.36
TARGETS=(llama-gguf-split llama-imatrix llama-perplexity llama-quantize)
FLAGS=(
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
)
# x86-64: without AMX.  -march=native turns ggml's AMX matrix kernels on where the CPU lists
# AMX, and in virtual machines that do not grant the AMX register state they stop with a
# general protection fault (ldtilecfg in ggml_backend_amx_mul_mat) on every quantized model.
if [ "$(uname -m)" = x86_64 ]; then
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    FLAGS+=("-DCMAKE_C_FLAGS=$NOAMX" "-DCMAKE_CXX_FLAGS=$NOAMX")
fi
CXX_ID=$(${CXX:-c++} --version 2>/dev/null | head -1 || echo none)
CPU_ID=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
KEY=$(printf '%s\n' "$VER" "${FLAGS[*]}" "${TARGETS[*]}" "$CXX_ID" "$CPU_ID" | sha256sum | cut -c1-12)
CACHE=${GGUF_MOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-moe}
DEST=$CACHE/llama.cpp-$VER-$KEY
LINK=$ROOT/.cache/llama-bin

have_all() { for t in "${TARGETS[@]}"; do [ -x "$DEST/bin/$t" ] || return 1; done; }

mkdir -p "$CACHE"
# one build at a time per cache (several clones may run their set-up together)
exec 9>"$CACHE/.lock"
flock 9
if ! have_all; then
    SDIST=$ROOT/.cache/sdist/llama_cpp_python-$VER.tar.gz
    if [ ! -f "$SDIST" ]; then
        mkdir -p "$ROOT/.cache/sdist"
        "$PY" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: "llama-cpp-python==$VER" -d "$ROOT/.cache/sdist"
    fi
    WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    echo "building ${TARGETS[*]} from llama-cpp-python $VER into $DEST (about 10 minutes)" >&2
    tar xzf "$SDIST" -C "$WORK" --strip-components=2 "llama_cpp_python-$VER/vendor/llama.cpp"
    GEN=()
    command -v ninja >/dev/null && GEN=(-G Ninja)
    CMAKE=cmake
    if ! command -v cmake >/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check cmake
        CMAKE=$(dirname "$PY")/cmake
    fi
    "$CMAKE" -S "$WORK/llama.cpp" -B "$WORK/build" "${GEN[@]}" "${FLAGS[@]}" >"$WORK/configure.log" 2>&1 \
        || { tail -40 "$WORK/configure.log" >&2; exit 1; }
    "$CMAKE" --build "$WORK/build" -j "${JOBS:-$(nproc)}" --target "${TARGETS[@]}" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; exit 1; }
    mkdir -p "$WORK/out/bin"
    for t in "${TARGETS[@]}"; do cp "$WORK/build/bin/$t" "$WORK/out/bin/"; done
    printf '%s\n' "llama-cpp-python $VER" "${FLAGS[*]}" "$CXX_ID" >"$WORK/out/BUILD-INFO"
    rm -rf "$DEST"
    mv "$WORK/out" "$DEST"
fi
mkdir -p "$ROOT/.cache"
ln -sfn "$DEST/bin" "$LINK"
