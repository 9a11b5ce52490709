"""The benchmark suite on a GPU: bfloat16, Pythia-1B and 6.9B-shaped random models, long contexts.

    python benchmarks/suite_gpu.py [--json results/benchmarks_gpu.json] [any option of suite.py]

Same measurements and report as ``benchmarks/suite.py`` (ratios of medians in one run; peak memory
from ``torch.cuda.max_memory_allocated``), with GPU-sized defaults. Not part of CI: it needs a CUDA
device and refuses to start without one.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

GPU_DEFAULTS = {
    "models": "pythia_160m,pythia_1b,pythia_6_9b",
    "device": "cuda",
    "dtype": "bfloat16",
    "batch": 8,
    "seq": 512,
    "patch_seq": 16,
    "scaling_seqs": "512,1024,2048,4096,8192",
    "scaling_batches": "1,2,4,8,16",
    "scaling_depths": "4,8,16,32",
    "scaling_model": "pythia_1b",
}

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("suite_gpu.py needs a CUDA device; on a CPU run benchmarks/suite.py")
    suite.main(defaults=GPU_DEFAULTS)
