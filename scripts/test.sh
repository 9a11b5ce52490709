#!/usr/bin/env bash
# Set up, then run the test suite (tiny random models plus a few tests on the bundled SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh 2> >(grep -v "is ignored: it is neither" >&2)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
