#!/usr/bin/env bash
# Create .venv and install gguf-moe into it.
#   scripts/setup.sh        runtime only (convert / quantize / validate / demo)
#   scripts/setup.sh --dev  plus the test oracle: llama-cpp-python 0.3.36 built from its
#                           sdist (pip caches the wheel), CPU torch, transformers, pytest, Ray
#                           (the gguf-moe[ray] extra, for the farm's Ray tests),
#                           llama.cpp's own convert_hf_to_gguf.py unpacked from the sdist, and
#                           llama.cpp's tools (llama-gguf-split, llama-imatrix, llama-perplexity,
#                           llama-quantize) built from it by scripts/llama_tools.sh into
#                           ~/.cache/gguf-moe/ (first build ~10 min, shared by every clone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

stamp_of() { cat pyproject.toml scripts/setup.sh scripts/llama_tools.sh | sha256sum | cut -c1-16; }
HASH=$(stamp_of)
STAMP="$VENV/.setup-$HASH-$DEV"
# A dev set-up includes the runtime one.
if [ -f "$STAMP" ] || [ -f "$VENV/.setup-$HASH-1" ]; then
    # the tools live outside the venv: make sure they are still there (nothing to do when built)
    if [ "$DEV" = 1 ]; then exec scripts/llama_tools.sh; fi
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" -U pip wheel setuptools

if [ "$DEV" = 1 ]; then
    # CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
    "${PIP[@]}" "torch==2.13.0"
    # llama.cpp as the test oracle, compiled for this CPU (first build ~10 min; cached after).
    CMAKE_ARGS="-DGGML_NATIVE=ON" "${PIP[@]}" --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
    "${PIP[@]}" -e ".[dev,torch,ray]"
    # llama.cpp's converter (reference for BF16 output), from the same sdist.
    REF=$ROOT/.cache/llama.cpp
    if [ ! -f "$REF/convert_hf_to_gguf.py" ]; then
        mkdir -p "$ROOT/.cache/sdist" "$REF"
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: "llama-cpp-python==0.3.36" -d "$ROOT/.cache/sdist"
        tar xzf "$ROOT"/.cache/sdist/llama_cpp_python-0.3.36.tar.gz -C "$REF" --strip-components=3 \
            llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
            llama_cpp_python-0.3.36/vendor/llama.cpp/conversion \
            llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
    fi
    scripts/llama_tools.sh
else
    "${PIP[@]}" -e .
fi
rm -f "$VENV"/.setup-*
touch "$STAMP"
