#!/usr/bin/env bash
# Set up gguf-moe, build a small mergekit-style MoE, convert it to several presets in one
# pass, validate the files against the source and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/gguf-moe demo "${@:-demo-out}"
