#!/usr/bin/env bash
# Set up everything the tests need (first run builds llama.cpp, ~10 min), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
