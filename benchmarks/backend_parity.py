"""The Hugging Face backend against the TransformerLens backend on one plan: largest score difference and wall-time ratio.

    python benchmarks/backend_parity.py [--plan examples/ioi_smollm2.json] [--method atp_star] [--repeats 3]

Both backends load the same model (the plan's ``model.source``); the plan runs on each, interleaved,
``--repeats`` times after a warm-up round, all in one process. Printed: per result tensor the largest
absolute difference and the largest score, then the median wall time of each backend and their ratio.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import atpframework as af


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=str(Path(__file__).parent.parent / "examples" / "ioi_smollm2.json"))
    parser.add_argument("--method", default="atp_star")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = json.loads(Path(args.plan).read_text())
    data.update(method={"name": args.method}, output=None)
    plans = {name: af.as_plan({**data, "model": {**data["model"], "backend": name}}) for name in ("transformer_lens", "huggingface")}
    backends = {name: af.load_backend(plan) for name, plan in plans.items()}
    print(f"plan {args.plan}, method {args.method}, model {data['model']['source']}")

    results, times = {}, {name: [] for name in backends}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, backend in backends.items():
            start = time.perf_counter()
            results[name] = af.run(plans[name], backend=backend)
            if round_:
                times[name].append(time.perf_counter() - start)

    tl, hf = results["transformer_lens"], results["huggingface"]
    for tensor in tl.nodes:
        diff = (hf[tensor].per_pair - tl[tensor].per_pair).abs().max().item()
        scale = tl[tensor].per_pair.abs().max().item()
        print(f"  {tensor:24s} largest |HF - TL| {diff:.2e}   largest |score| {scale:.3g}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:24s} median wall {median:.2f} s over {args.repeats} runs")
    print(f"  wall ratio huggingface / transformer_lens: {medians['huggingface'] / medians['transformer_lens']:.2f}")


if __name__ == "__main__":
    main()
