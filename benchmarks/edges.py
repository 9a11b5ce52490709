"""Edges and integrated gradients on the bundled SmolLM2 IOI task.

Prints, in one run:

* the number of edges (writers upstream of readers) of SmolLM2-135M, over components (positions summed);
* wall time of edge ``atp``, ``atp_qkfix``, ``atp_star`` and ``atp_ig`` over every edge, as ratios to the
  bare floor (noise forward without grad, clean forward, one backward of the summed metric: 2F + 1B),
  and node ``atp`` over every head for comparison (medians of interleaved repeats);
* for attention heads (positions summed): how ``atp``, ``atp_star`` and ``atp_ig`` rank the heads against
  exact activation patching: top-10 overlap with the exact top 10, and the exact top-10 heads each method
  ranks below 10, with their rank under every method;
* faithfulness of each edge method's top-n circuits (every edge, positions summed) by exact patching, and
  the exact-patching ground truth where verification covers it: the top ``--verify`` edges of each
  method are exact-patched, and circuits ranked by their exact effects (up to the number verified)
  give the ground-truth curve.

Usage: ``python benchmarks/edges.py [--pairs 3] [--repeats 3] [--steps 5] [--verify 100] [--json out.json]``
(``--skip cost,heads,faithfulness`` leaves parts out).
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import BUNDLED, Bench, Settings, _sync_for, load_model, medians  # noqa: E402

import atpframework as af  # noqa: E402
from atpframework.model.edges import EdgeNode, real_edge_count  # noqa: E402

IOI = json.loads((Path(__file__).resolve().parents[1] / "examples" / "ioi_smollm2.json").read_text())["prompts"]


def cost(model: Any, pairs: list[dict[str, Any]], steps: int, repeats: int) -> dict[str, Any]:
    bench = Bench(model, 1, 8)
    bench.plan_base = {**bench.plan_base, "prompts": pairs, "nodes": af.edge_selections(), "batch_size": len(pairs)}
    compiled = bench.run({"name": "atp"}).compiled
    edges = sum(real_edge_count(b, compiled.info) for b in compiled.bound if isinstance(b.node, EdgeNode))
    cases = {
        "bare": bench.bare(weights=False),
        "edge_atp": bench.method("atp"),
        "edge_atp_qkfix": bench.method("atp_qkfix"),
        "edge_atp_star": bench.method("atp_star"),
        f"edge_atp_ig_{steps}": bench.method("atp_ig", steps=steps),
    }
    heads = Bench(model, 1, 8)
    heads.plan_base = {**heads.plan_base, "prompts": pairs, "nodes": [{"kind": "attn_head", "positions": "all"}], "batch_size": len(pairs)}
    cases["node_atp_heads"] = heads.method("atp")
    times = medians(cases, repeats, _sync_for("cpu"))
    return {
        "edges": edges,
        "seconds": times,
        "ratio_to_bare": {name: t / times["bare"] for name, t in times.items() if name != "bare"},
    }


def head_ranking(model: Any, pairs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    base = {"model": {"source": "in_memory"}, "prompts": pairs, "nodes": [{"kind": "attn_head", "positions": "all"}], "batch_size": len(pairs)}
    methods = {"atp": {"name": "atp"}, "atp_star": {"name": "atp_star"}, f"atp_ig_{steps}": {"name": "atp_ig", "steps": steps}}
    scores, seconds = {}, {}
    for name, method in {**methods, "exact": {"name": "activation_patching", "nodes_per_pass": 32}}.items():
        start = time.perf_counter()
        result = af.run({**base, "method": method}, model=model, progress=False)
        seconds[name] = time.perf_counter() - start
        per_pair = result["attn_head"].per_pair.flatten(1)  # pair head (layer-major)
        scores[name] = per_pair.mean(0).abs()  # GradDrop stores magnitudes; signed methods: |mean effect|
    n_heads = model.cfg.n_heads

    def label(i: int) -> str:
        return f"L{i // n_heads}H{i % n_heads}"

    ranks = {name: torch.empty_like(s, dtype=torch.long).scatter_(0, s.argsort(descending=True), torch.arange(len(s))) for name, s in scores.items()}
    true_top = scores["exact"].argsort(descending=True)[:10].tolist()
    out: dict[str, Any] = {"exact_top10": [(label(i), round(float(scores["exact"][i]), 4)) for i in true_top], "seconds": seconds, "methods": {}}
    for name in methods:
        top = set(scores[name].argsort(descending=True)[:10].tolist())
        missed = [i for i in true_top if i not in top]
        out["methods"][name] = {
            "top10_overlap": len(top & set(true_top)),
            "missed": [
                {"head": label(i), "exact_effect": round(float(scores["exact"][i]), 4), **{f"rank_{m}": int(ranks[m][i]) + 1 for m in methods}}
                for i in missed
            ],
            "largest_true_effect_ranked_below_10": max((float(scores["exact"][i]) for i in missed), default=0.0),
        }
    return out


SIZES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]


def faithfulness(model: Any, pairs: list[dict[str, Any]], steps: int, verify_top: int) -> dict[str, Any]:
    from atpframework.analysis.circuits import CircuitEvaluator, circuit_faithfulness
    from atpframework.analysis.verify import verify

    base = {"model": {"source": "in_memory"}, "prompts": pairs, "nodes": af.edge_selections(), "batch_size": len(pairs)}
    methods = {"atp": {"name": "atp"}, "atp_star": {"name": "atp_star"}, f"atp_ig_{steps}": {"name": "atp_ig", "steps": steps}}
    out: dict[str, Any] = {"curves": {}, "seconds": {}}
    verified: dict[int, torch.Tensor] = {}
    evaluator = None
    for name, method in methods.items():
        start = time.perf_counter()
        result = af.run({**base, "method": method}, model=model, progress=False)
        out["seconds"][f"run_{name}"] = time.perf_counter() - start
        if evaluator is None:
            evaluator = CircuitEvaluator(result, model=model)
        start = time.perf_counter()
        curve = circuit_faithfulness(result, SIZES, label=name, evaluator=evaluator, progress=False)
        out["seconds"][f"curve_{name}"] = time.perf_counter() - start
        out["curves"][name] = {"sizes": curve.sizes, "faithfulness": [round(float(f), 4) for f in curve.faithfulness],
                               "areas": {k: round(v, 4) for k, v in curve.areas.items()}, "empty": curve.empty, "full": curve.full}
        out["n_edges"] = curve.n_edges
        start = time.perf_counter()
        checked = verify(result, budget=verify_top, model=model, progress=False)
        out["seconds"][f"verify_{name}"] = time.perf_counter() - start
        numbering = checked.numbering
        for sel, v in checked.verified.items():
            offset = numbering.offsets[numbering.names.index(sel)]
            for flat, effect in zip(v.index.tolist(), v.effects.double().mean(0).tolist()):
                verified[offset + flat] = torch.tensor(effect)
    assert evaluator is not None
    nodes = torch.tensor(sorted(verified))
    effects = torch.stack([verified[int(n)] for n in nodes])
    ranking = nodes[effects.abs().argsort(descending=True)]
    sizes = [s for s in SIZES if s <= len(ranking)]
    values, _ = evaluator.faithfulness(evaluator.keep([ranking[:s] for s in sizes]))
    out["curves"]["exact (verified edges)"] = {"sizes": sizes, "faithfulness": [round(float(f), 4) for f in values]}
    out["verified_edges"] = len(ranking)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--verify", type=int, default=100, help="edges of each method's ranking to exact-patch")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: cost, heads, faithfulness")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = Settings(repeats=args.repeats, batch=1, seq=8, patch_seq=8, device="cpu", dtype="float32",
                        scaling_seqs=[8], scaling_batches=[1], scaling_depths=[1])
    model = load_model("smollm2", settings)
    pairs = IOI[: args.pairs]
    skip = set(args.skip.split(","))
    report: dict[str, Any] = {"model": BUNDLED["smollm2"], "pairs": len(pairs), "threads": torch.get_num_threads()}
    if "cost" not in skip:
        report["cost"] = cost(model, pairs, args.steps, args.repeats)
    if "heads" not in skip:
        report["heads"] = head_ranking(model, pairs, args.steps)
    if "faithfulness" not in skip:
        report["faithfulness"] = faithfulness(model, pairs, args.steps, args.verify)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
