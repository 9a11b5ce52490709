#!/usr/bin/env bash
# Set up, then run AtP on the bundled SmolLM2-135M-Instruct for IOI: prints the top heads and neurons
# and writes examples/results/ioi_smollm2_atp.safetensors (inspect it later with `atpf show`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh 2> >(grep -v "is ignored: it is neither" >&2)
export HF_HUB_OFFLINE=1
exec .venv/bin/atpf examples/ioi_smollm2.json "$@"
