"""Memory saved by ``max_memory`` chunking on a long-context plan, and the cost in time.

    python benchmarks/chunking.py [--model smollm2] [--seq 512] [--method atp_star]
                                  [--budgets 0.5,0.25] [--json results/chunking.json]

One prompt pair of ``--seq`` tokens, every node type at every position. The plan runs once without a
budget, then once per budget: the engine's estimate for chunks of one position plus a fraction of
what the unchunked estimate needs beyond that. Per run: the estimate, the measured peak memory above the loaded model (``suite.peak_memory``),
the wall time, the chunking chosen, and the largest score difference from the unchunked run. Ratios
are of numbers measured in this one process. The script fixes glibc's mmap threshold
(``suite.exact_malloc_peaks``) so that peaks repeat; that makes absolute times about twice as long.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import (  # noqa: E402
    NODE_KINDS,
    Bench,
    Settings,
    exact_malloc_peaks,
    load_model,
    memory_supported,
    peak_memory,
    random_pairs,
)

import atpframework as af  # noqa: E402
from atpframework.io.files import write_text_atomically  # noqa: E402
from atpframework.methods.base import get_method  # noqa: E402
from atpframework.plans.chunking import format_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--method", default="atp_star")
    parser.add_argument("--budgets", default="0.5,0.25", help="budgets: the one-position minimum plus these fractions of the rest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not memory_supported(args.device):
        raise SystemExit("peak memory cannot be measured here (needs /proc/self/clear_refs or CUDA)")

    settings = Settings(1, 1, args.seq, 4, args.device, args.dtype, [args.seq], [1], [1])
    model = load_model(args.model, settings)
    plan = {
        "model": {"source": "in_memory"},
        "prompts": random_pairs(1, args.seq, model.cfg.d_vocab),
        "nodes": [{"kind": k} for k in NODE_KINDS],
        "method": {"name": args.method},
        "batch_size": 1,
    }
    compiled = af.compile(plan, model=model)
    full_estimate = get_method(args.method).working_memory(compiled, 1, args.seq, args.seq)
    minimum = get_method(args.method).working_memory(compiled, 1, args.seq, 1)

    floor = peak_memory(Bench(model, 1, args.seq).forward_backward, args.device)
    rows: list[dict[str, Any]] = []
    reference = None
    for fraction in [None, *(float(f) for f in args.budgets.split(","))]:
        budget = int(minimum + (full_estimate - minimum) * fraction) if fraction is not None else None
        run_plan = dict(plan) if budget is None else {**plan, "max_memory": budget}
        chunked = af.compile(run_plan, model=model)
        out: dict[str, Any] = {}
        start = time.perf_counter()
        peak = peak_memory(lambda: out.setdefault("result", af.run(run_plan, model=model)), args.device)
        seconds = time.perf_counter() - start
        result = out["result"]
        if reference is None:
            reference = result
        diff = max((result[k].per_pair - reference[k].per_pair).abs().max().item() for k in NODE_KINDS)
        scale = max(reference[k].per_pair.abs().max().item() for k in NODE_KINDS)
        rows.append({
            "budget": budget,
            "positions_per_chunk": chunked.chunking.positions_per_chunk,
            "chunks": getattr(get_method(args.method), "chunk_count", lambda c: 1)(chunked),
            "estimate": full_estimate if fraction is None else chunked.chunking.estimate,
            "peak": peak, "seconds": seconds, "max_diff": diff, "max_score": scale,
        })
        del out, result
    base = rows[0]
    print(f"{args.model}, {args.seq} tokens, {args.method}, {sum(b.n_nodes for b in compiled.bound):,} nodes, {args.device} {args.dtype}")
    print(f"estimated working memory: unchunked {format_bytes(full_estimate)}, chunks of one position {format_bytes(minimum)}")
    print(f"measured peak of a bare forward + backward (no hooks; the floor): {format_bytes(floor)}")
    print("| budget | positions/chunk | chunks | estimate | measured peak | peak vs unchunked | above floor | time vs unchunked | max |diff| (max |score|) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {'none' if r['budget'] is None else format_bytes(r['budget'])} | {r['positions_per_chunk'] or args.seq} | {r['chunks']} "
            f"| {format_bytes(r['estimate'])} | {format_bytes(r['peak'])} | {r['peak'] / base['peak']:.2f} "
            f"| {format_bytes(r['peak'] - floor)} "
            f"| {r['seconds'] / base['seconds']:.2f} | {r['max_diff']:.2e} ({r['max_score']:.2f}) |"
        )
    report = {"floor": floor, "model": args.model, "seq": args.seq, "method": args.method, "device": args.device, "dtype": args.dtype, "runs": rows}
    if args.json:
        write_text_atomically(Path(args.json), json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    exact_malloc_peaks()
    main()
