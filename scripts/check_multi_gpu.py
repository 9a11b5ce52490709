"""Check a model split across GPUs against the same model on one device (run where GPUs are).

    python scripts/check_multi_gpu.py [--plan examples/ioi_smollm2.json] [--device-map balanced]
    python scripts/check_multi_gpu.py --allow-cpu      # exercise the code path without GPUs

Runs the plan's method (default: the plan's) with the Hugging Face backend twice: once on one
device (``cuda:0``, or the CPU with ``--allow-cpu``) and once loaded with ``device_map`` across every
visible GPU, then prints where the layers landed and the largest score difference per selection,
and exits non-zero when a selection differs by more than ``--rtol`` of its largest score. Then run
the data-parallel check on the same machine with nccl:

    torchrun --standalone --nproc-per-node 2 -m atpframework PLAN_WITH_DEVICE_CUDA.json -o dist.safetensors
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

import atpframework as af


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="examples/ioi_smollm2.json")
    parser.add_argument("--device-map", default="balanced")
    parser.add_argument("--method", default=None, help="override the plan's method name")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--allow-cpu", action="store_true", help="run without GPUs (checks the code path only)")
    args = parser.parse_args()
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2 and not args.allow_cpu:
        print(f"needs at least 2 GPUs (found {n_gpus}); --allow-cpu runs the code path on the CPU", file=sys.stderr)
        return 2
    base = json.loads(Path(args.plan).read_text())
    base["output"] = None
    if args.method:
        base["method"] = {"name": args.method}
    single_device = "cuda:0" if n_gpus else "cpu"
    one = dict(base, model=dict(base["model"], backend="huggingface", device=single_device))
    split = dict(base, model=dict(base["model"], backend="huggingface", options={"device_map": args.device_map}))

    reference = af.run(one)
    backend = af.load_backend(af.as_plan(split))
    placement = Counter(str(p.device) for p in backend.model.parameters())
    print(f"device_map={args.device_map}: parameters per device {dict(placement)}")
    result = af.run(split, backend=backend)
    worst = 0.0
    for name in reference.nodes:
        ref, got = reference[name].per_pair.float().cpu(), result[name].per_pair.float().cpu()
        rel = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        worst = max(worst, rel)
        print(f"{name}: largest difference {float((got - ref).abs().max()):.3e} ({rel:.2e} of the largest score)")
    ok = worst <= args.rtol
    print("OK" if ok else f"FAILED: relative difference {worst:.2e} > {args.rtol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
