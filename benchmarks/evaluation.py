"""The evaluation of the methods over task suites: per task and group of node types, exact ground truth, each
method's cost of verified recall in the single-pair setting (median and interquartile range over pairs) and
the distributional setting (one ranking for all pairs), and the false negatives with their reasons.

    python benchmarks/evaluation.py --tasks ioi,city --nodes attn_head,attn_q,attn_k,attn_v,mlp_neuron \\
        --methods atp,atp_qkfix,atp_star,atp_ig --pairs 16 --out DIR
    python benchmarks/evaluation.py --smoke --out DIR      # tiny random models, seconds (run by the tests)

Writes ``DIR/evaluation.json`` (every number), ``DIR/evaluation.md`` (a table per task and group) and one
plot per task and group, ``DIR/recall_<task>_<group>.png`` (single-pair medians with IQR bands; the
distributional curves). The definitions are in docs/evaluation.md; the work is done by
``atpframework.analysis.evaluation``.

Options:

* ``--nodes``: groups separated by commas; ``+`` joins node kinds into one group ranked as one set of nodes
  (``attn_q+attn_k+attn_v``).
* ``--methods``: names separated by commas, options after colons: ``atp_ig:steps=10``, ``subsampling:samples=512``.
* Subsets of nodes where exact patching of all is unaffordable (stated in the output): ``--layers``
  (``each``, a list ``0,10,20`` or ``every:N`` from layer 0), ``--positions`` (``each``, ``all``, a list such as
  ``-1``, or ``differing``: from the first position where some pair's clean and noise tokens differ, since earlier
  nodes have effect 0 and gradient scores 0), for MLP neurons ``--neurons N`` (N neuron indices drawn with ``--seed``, the same in every layer) and
  ``--mlp-positions``. With ``positions`` ``each`` (the default), every pair of a task has the same token length:
  the pairs of the most common length among ``8 x --pairs`` drawn.
* ``--fn-k K --fn-factor F``: a false negative is a true top-K node ranked below F*K (defaults 10 and 10).
* ``--diagnose 100,400``: also the diagnostic bound after verifying each method's top F*K, at these sample budgets.
"""

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import atpframework as af
from atpframework.analysis.evaluation import (
    DEFAULT_KS,
    TaskEvaluation,
    differing_positions,
    equal_length_pairs,
    evaluate,
    markdown,
    plot_group,
)
from atpframework.analysis.plots import PlotDependencyError
from atpframework.io.files import write_text_atomically
from atpframework.model.backend import AbstractBackend
from atpframework.tasks import TASKS, get_task

BUNDLED = "bundled:smollm2-135m-instruct"
SMOKE_METHODS = "atp,atp_qkfix,atp_graddrop,atp_star,atp_ig,activation_patching:nodes_per_pass=64,subsampling:samples=64,blocks,hierarchical:budget=32"
SMOKE_NODES = "attn_head,attn_q+attn_k,attn_v,mlp_neuron,resid"


def parse_methods(text: str) -> list[dict[str, Any]]:
    """``atp,atp_ig:steps=10`` -> method specs; option values are JSON where they parse, else strings."""
    specs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, *options = entry.split(":")
        spec: dict[str, Any] = {"name": name}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not key:
                raise SystemExit(f"--methods: expected name:option=value, got {entry!r}")
            try:
                spec[key] = json.loads(value)
            except json.JSONDecodeError:
                spec[key] = value
        specs.append(spec)
    if not specs:
        raise SystemExit("--methods: expected at least one method")
    return specs


def parse_index_list(text: str, field: str, n_layers: int | None = None) -> str | list[int]:
    """``each`` / ``all`` / ``differing`` (positions only: resolved per task) / ``0,10,20`` / ``every:N`` (layers only)
    as a plan selection."""
    if text in ("each", "all") or (text == "differing" and n_layers is None):
        return text
    if text.startswith("every:"):
        if n_layers is None:
            raise SystemExit(f"--{field}: every:N applies to layers only")
        return list(range(0, n_layers, int(text.split(":", 1)[1])))
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--{field}: expected each, all, every:N or a list of integers, got {text!r}") from None


def node_groups(text: str, layers: Any, positions: Any, mlp_positions: Any, neurons: list[int] | None) -> dict[str, list[dict[str, Any]]]:
    """``attn_head,attn_q+attn_k`` -> group name -> node selections."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for group in filter(None, (g.strip() for g in text.split(","))):
        selections = []
        for kind in group.split("+"):
            sel: dict[str, Any] = {"kind": kind, "layers": layers, "positions": positions}
            if kind == "mlp_neuron":
                sel["positions"] = mlp_positions
                if neurons is not None:
                    sel["neurons"] = neurons
            selections.append(sel)
        groups[group] = selections
    return groups


# ------------------------------------------------------------------------------------------ smoke models
def tiny_random_model() -> Any:
    """A tiny random Llama-like TransformerLens model (RMSNorm, rotary, grouped-query attention, gated MLP)."""
    from atpframework.testing import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(n_layers=2, normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                           n_key_value_heads=2, gated_mlp=True, act_fn="silu", final_rms=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # large enough that effects are not tiny
    return model


def tiny_random_pairs(n_pairs: int, seed: int, length: int = 8, vocab: int = 61) -> list[dict[str, Any]]:
    """Token-id pairs: random clean prompts, the noise resampled at two positions after the second."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        clean = [rng.randrange(vocab) for _ in range(length)]
        noise = list(clean)
        for pos in rng.sample(range(2, length), 2):
            noise[pos] = (clean[pos] + rng.randrange(1, vocab)) % vocab
        answer, wrong = rng.sample(range(vocab), 2)
        pairs.append({"clean": clean, "noise": noise, "answer": answer, "wrong_answer": wrong})
    return pairs


PLANTED_PAIR = {"clean": [0, 1], "noise": [0, 2], "answer": 3, "wrong_answer": 4}
"""The one pair of ``planted_cancellation_model``."""


def planted_cancellation_model(fillers: int = 24) -> Any:
    """Two layers, hand-set, where plain AtP misses the most important node by cancellation.

    Head L0H0 at position 1 writes ``d`` to residual direction 5 (``d = +2`` on the clean token 1, ``-3`` on the
    noise token 2). The answer logit reads direction 5 directly (+1 per unit) and the layer-1 MLP neuron 0 reads
    it through a ReLU and writes it back negated, so at the clean run the head's two paths cancel exactly: its AtP
    is 0. Patching it turns the ReLU off, and its exact effect is -3, the largest of all nodes (the layer-1 neuron's
    is +2). ``fillers`` layer-0 neurons, which read the token and stay on, write 0.01, 0.02, ... to direction 6,
    which the answer logit reads as well: their AtP is exact and nonzero, so AtP ranks the head behind all of them.
    Dropping layer 1's write removes the cancelling path: GradDrop scores the head 5, first."""
    from atpframework.testing import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(n_layers=2, n_heads=1, d_head=4, d_model=8, d_mlp=32, act_fn="relu", normalization_type=None)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:5] = torch.eye(8)[:5]
        attn = model.blocks[0].attn  # W_Q = 0: uniform attention over [bos, x]
        attn.W_V[0, 1, 0] = 4.0
        attn.W_V[0, 2, 0] = -6.0
        attn.W_O[0, 0, 5] = 1.0
        first, second = model.blocks[0].mlp, model.blocks[1].mlp
        for i in range(fillers):
            first.W_in[1, i], first.W_in[2, i], first.b_in[i] = 0.5, -0.5, 1.0
            first.W_out[i, 6] = 0.01 * (i + 1)
        second.W_in[5, 0] = 1.0
        second.W_out[0, 5] = -1.0
        model.unembed.W_U[5, 3] = 1.0
        model.unembed.W_U[6, 3] = 1.0
    return model.eval()


def in_memory_backend(model: Any) -> AbstractBackend:
    plan = af.as_plan({"model": {"source": "in_memory"}, "prompts": [PLANTED_PAIR], "nodes": [{"kind": "resid"}],
                       "method": {"name": "atp"}})
    return af.load_backend(plan, model)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="ioi,city")
    parser.add_argument("--nodes", default="attn_head,attn_q,attn_k,attn_v")
    parser.add_argument("--methods", default="atp,atp_qkfix,atp_star,atp_ig")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default="each")
    parser.add_argument("--positions", default="each")
    parser.add_argument("--mlp-positions", default=None, help="positions of MLP neurons (default: --positions)")
    parser.add_argument("--neurons", type=int, default=None, help="a random subset of this many neurons per layer")
    parser.add_argument("--k-max", type=int, default=200)
    parser.add_argument("--ks", default=",".join(str(k) for k in DEFAULT_KS), help="k at which costs are reported in the JSON")
    parser.add_argument("--table-ks", default="1,10", help="k at which costs are shown in the tables")
    parser.add_argument("--fn-k", type=int, default=10)
    parser.add_argument("--fn-factor", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.5)
    parser.add_argument("--no-explain", action="store_true", help="do not run reference methods for the reasons")
    parser.add_argument("--diagnose", default=None, help="sample budgets of the diagnostic bound, e.g. 100,400")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny random models: a random-token task and a planted cancellation")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = Path(args.out)
    ks = [int(k) for k in args.ks.split(",")]
    table_ks = [int(k) for k in args.table_ks.split(",")]
    diagnose = [int(s) for s in args.diagnose.split(",")] if args.diagnose else None
    log = (lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr, flush=True))
    common: dict[str, Any] = dict(k_max=args.k_max, fn_k=args.fn_k, fn_factor=args.fn_factor, tolerance=args.tolerance,
                                  explain=not args.no_explain, diagnose_samples=diagnose, batch_size=args.batch_size, log=log,
                                  progress=args.progress)
    evaluations: list[TaskEvaluation] = []
    if args.smoke:
        methods = parse_methods(SMOKE_METHODS if args.methods == parser.get_default("methods") else args.methods)
        nodes = SMOKE_NODES if args.nodes == parser.get_default("nodes") else args.nodes
        pairs = args.pairs if args.pairs != parser.get_default("pairs") else 6
        smoke = {**common, "fn_k": 1, "fn_factor": 10, "diagnose_samples": diagnose or [32, 64]}
        backend = in_memory_backend(tiny_random_model())
        groups = node_groups(nodes, "each", "each", "each", None)
        evaluations.append(evaluate("tiny_random", tiny_random_pairs(pairs, args.seed), groups, methods, backend, **smoke))
        planted = in_memory_backend(planted_cancellation_model())
        evaluations.append(evaluate("planted_cancellation", [PLANTED_PAIR], {"attn_head+mlp_neuron": [{"kind": "attn_head"}, {"kind": "mlp_neuron"}]},
                                    methods, planted, **smoke))
        model_label = "tiny random TransformerLens models (smoke)"
    else:
        methods = parse_methods(args.methods)
        plan = af.as_plan({"model": {"source": args.model}, "prompts": [{"clean": "a", "noise": "b"}], "metric": {"name": "cross_entropy"},
                           "nodes": [{"kind": "resid"}], "method": {"name": "atp"}})
        load_started = time.perf_counter()
        backend = af.load_backend(plan)
        log(f"loaded {args.model} in {time.perf_counter() - load_started:.1f} s")
        n_layers = backend.info.n_layers
        layers = parse_index_list(args.layers, "layers", n_layers)
        positions = parse_index_list(args.positions, "positions")
        mlp_positions = parse_index_list(args.mlp_positions, "mlp-positions") if args.mlp_positions else positions
        neurons = sorted(random.Random(args.seed).sample(range(backend.info.d_mlp), args.neurons)) if args.neurons else None
        per_position = {"each", "differing"}
        every_position = positions in per_position or (mlp_positions in per_position and "mlp_neuron" in args.nodes)
        for name in args.tasks.split(","):
            if name not in TASKS:
                raise SystemExit(f"--tasks: unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
            drawn = time.perf_counter()
            pairs = (equal_length_pairs(name, args.pairs, args.seed, backend) if every_position
                     else get_task(name).pairs(args.pairs, args.seed, backend=backend))
            log(f"{name}: {len(pairs)} pairs drawn in {time.perf_counter() - drawn:.1f} s")
            differing = differing_positions(pairs, backend) if "differing" in (positions, mlp_positions) else None
            if differing is not None:
                log(f"{name}: positions {differing[0]}..{differing[-1]} (the first difference of clean and noise onwards)")
            groups = node_groups(args.nodes, layers, differing if positions == "differing" else positions,
                                 differing if mlp_positions == "differing" else mlp_positions, neurons)
            evaluations.append(evaluate(name, pairs, groups, methods, backend, model_source=args.model, **common))
        model_label = args.model

    wall = time.perf_counter() - started
    config = {key: value for key, value in vars(args).items() if key not in ("out", "progress")}
    data = {
        "command": "python benchmarks/evaluation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config, "model": model_label, "methods": methods,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "wall_s": wall,
        "tasks": [ev.as_json(ks) for ev in evaluations],
    }
    write_text_atomically(out / "evaluation.json", json.dumps(data, indent=1))
    header = [f"# Evaluation: {model_label}", "", f"`{data['command']}`: {wall:.0f} s wall, {torch.get_num_threads()} torch thread(s).", ""]
    write_text_atomically(out / "evaluation.md", "\n".join(header) + markdown(evaluations, table_ks))
    if not args.no_plots:
        try:
            for ev in evaluations:
                for group in ev.groups:
                    plot_group(group, out / f"recall_{ev.task}_{group.group.replace('+', '_')}.png")
        except PlotDependencyError as err:
            log(f"no plots: {err}")
    print(markdown(evaluations, table_ks))
    log(f"done in {wall:.1f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
