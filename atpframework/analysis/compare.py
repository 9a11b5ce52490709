"""Comparing methods by the cost of verified recall on one plan.

``compare`` runs exact activation patching as ground truth (or reads a stored one), runs each method
on the same plan and backend, and measures for every ``k`` how many forward passes per prompt pair
the method needs to verify the true top ``k`` nodes: its own cost (``AbstractMethod.cost``, a
backward counting as two forwards) plus one forward per node verified in its order. Nodes are
ranked by mean ``|score|`` over the plan's pairs and the ground truth is the mean ``|effect|``, so one
curve covers the whole prompt distribution. RelCost is the inverse-rank-weighted geometric mean of
``cost(k) / k`` (1 for the oracle; see ``atpframework.analysis.recall``).

On a plan of edges, ``faithfulness_sizes`` also compares the methods by the faithfulness of their top-n
(or greedy) circuits, measured by exact patching (``atpframework.analysis.circuits``), next to the
circuits ranked by the ground truth itself.
"""

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atpframework import plugins
from atpframework.analysis.circuits import FaithfulnessCurve, circuit_faithfulness
from atpframework.analysis.recall import RecallCurve, curves_to_json, format_table, recall_curve
from atpframework.api import as_plan, load_backend, run, splice_saes
from atpframework.engine.runner import compile_plan
from atpframework.errors import PlanError
from atpframework.io.files import write_text_atomically
from atpframework.io.progress import Bar, Progress
from atpframework.io.results import AttributionResult, load_result
from atpframework.model.backend import AbstractBackend
from atpframework.model.edges import EdgeNode
from atpframework.plans.plan import AttributionPlan

GROUND_TRUTH = {"name": "activation_patching", "nodes_per_pass": 64}


@dataclass(frozen=True)
class MethodRun:
    """One method's run in a comparison (or the ground truth's)."""

    name: str
    """The method's label in tables: its name, or its spec as JSON when one method appears twice."""
    spec: dict[str, Any]
    """The plan's ``method`` entry it ran with."""
    cost: float
    """Own cost, forward passes per pair."""
    wall_s: float
    """Wall time of the run in seconds (0 for a stored ground truth)."""
    result: AttributionResult


@dataclass(frozen=True)
class Comparison:
    """Ground truth, the methods' runs and their recall curves."""

    n_nodes: int
    n_pairs: int
    ground_truth: MethodRun
    runs: list[MethodRun]
    curves: list[RecallCurve]
    """Per method, the cost of verified recall for k = 1 .. k_max."""
    faithfulness: list[FaithfulnessCurve] = field(default_factory=list)
    """Edge plans asked for it: the ground truth's and each method's circuit faithfulness over circuit sizes."""

    def table(self, ks: Sequence[int] | None = None) -> str:
        """The Markdown table of each method's cost at ``ks`` (default 1, 5, 10, 20, 50, 100, 200) and RelCost,
        with the costs and wall times below (what ``compare.md`` holds)."""
        ks = [k for k in (ks or (1, 5, 10, 20, 50, 100, 200)) if k <= self.curves[0].costs.numel()]
        lines = [format_table(self.curves, ks), ""]
        lines.append(f"{self.n_nodes} nodes, {self.n_pairs} prompt pair(s); costs are forward passes per pair (a backward = 2).")
        gt = self.ground_truth
        lines.append(f"ground truth ({gt.name}): {gt.cost:g} forward passes per pair, {gt.wall_s:.1f} s wall")
        for r in self.runs:
            lines.append(f"{r.name}: own cost {r.cost:g} forward passes per pair, {r.wall_s:.1f} s wall")
        if self.faithfulness:
            lines += ["", faithfulness_table(self.faithfulness)]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """The comparison as JSON-ready data (what ``compare.json`` holds)."""
        return {
            "n_nodes": self.n_nodes,
            "n_pairs": self.n_pairs,
            "ground_truth": {"method": self.ground_truth.spec, "cost": self.ground_truth.cost, "wall_s": self.ground_truth.wall_s},
            "methods": [{"name": r.name, "method": r.spec, "cost": r.cost, "wall_s": r.wall_s} for r in self.runs],
            **curves_to_json(self.curves),
            **({"faithfulness": [c.as_json() for c in self.faithfulness]} if self.faithfulness else {}),
        }


def faithfulness_table(curves: Sequence[FaithfulnessCurve]) -> str:
    """Markdown: per method, faithfulness at each circuit size and the areas (CPR, CMD on the log-size axis)."""
    sizes = curves[0].requested
    head = "| method | " + " | ".join(f"f@{s}" for s in sizes) + " | CPR (log) | CMD (log) |"
    rows = [head, "|" + "---|" * (len(sizes) + 3)]
    for c in curves:
        areas = c.areas
        cells = " | ".join(f"{float(f):.3f}" for f in c.faithfulness)
        rows.append(f"| {c.label} | {cells} | {areas['cpr_log']:.3f} | {areas['cmd_log']:.3f} |")
    return "\n".join(rows) + f"\n\nfaithfulness of {'greedy' if curves[0].greedy else 'top-n'} circuits of {curves[0].n_edges} edges (exact patching)"


def _method_spec(entry: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"name": entry} if isinstance(entry, str) else dict(entry)


def _timed_run(plan: AttributionPlan, spec: dict[str, Any], backend: AbstractBackend, label: str, progress: Progress,
               desc: str) -> MethodRun:
    data = json.loads(plan.to_json())
    data.update(method=spec, output=None)
    method_plan = as_plan(data)
    compiled = compile_plan(method_plan, backend)
    cost = compiled.method.cost(compiled)
    started = time.perf_counter()
    with Bar(progress, len(compiled.pairs), desc, "pair") as bar:
        result = run(method_plan, backend=backend, progress=bar.update)
    return MethodRun(label, spec, cost, time.perf_counter() - started, result)


def _flat(result: AttributionResult) -> torch.Tensor:
    return torch.cat([ns.aggregate("mean_abs").flatten() for ns in result.nodes.values()])


def compare(
    plan: Any,
    methods: Sequence[str | Mapping[str, Any]],
    *,
    ground_truth: AttributionResult | str | Path | None = None,
    k_max: int | None = None,
    backend: AbstractBackend | None = None,
    model: Any = None,
    saes: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Progress = True,
    faithfulness_sizes: Sequence[int] | None = None,
    greedy: bool = False,
) -> Comparison:
    """Run ``methods`` (names or method specs) on ``plan`` and measure their cost of verified recall.

    ``ground_truth``: a stored exact-patching result of the same plan (else it is computed).
    ``k_max``: the largest k (default: min(nodes, 200)).
    ``log``: called with a line before each run starts.
    ``progress``: ``True``: a progress bar on stderr per method (``compare: atp_star``), per batch of prompt
    pairs with the passes run so far; ``False``: none; a callable: called with the pairs finished
    after each batch of each run (``atpframework.io.progress``).
    ``faithfulness_sizes``: on a plan of edges, also the faithfulness of each method's circuits of these sizes
    (``greedy``: greedy circuits), and of the ground truth's.
    """
    plan = as_plan(plan)
    if faithfulness_sizes is not None:
        not_edges = [f"nodes[{i}] ({spec.kind})" for i, spec in enumerate(plan.nodes) if not issubclass(plugins.load("nodes", spec.kind), EdgeNode)]
        if not_edges:
            raise PlanError(f"compare faithfulness: circuits need a plan of edges only; not edges: {', '.join(not_edges)}")
    backend = splice_saes(plan, backend or load_backend(plan, model), saes)
    say = log or (lambda message: None)
    if ground_truth is None:
        say("ground truth: exact activation patching of every node")
        truth = _timed_run(plan, dict(GROUND_TRUTH), backend, "activation_patching", progress,
                           "compare: activation_patching (ground truth)")
    else:
        stored = ground_truth if isinstance(ground_truth, AttributionResult) else load_result(ground_truth)
        if stored.method != "activation_patching":
            raise PlanError(f"ground truth: the result was made by {stored.method!r}, not activation_patching")
        if set(stored.nodes) != {n.result_name for n in plan.nodes}:
            raise PlanError("ground truth: its node selections differ from the plan's")
        spec = json.loads(stored.plan_json)["method"]
        compiled = compile_plan(as_plan(stored.plan), backend)
        truth = MethodRun("activation_patching", spec, compiled.method.cost(compiled), 0.0, stored)
    true_effects = _flat(truth.result)
    n_nodes = true_effects.numel()
    k_max = min(n_nodes, 200) if k_max is None else k_max
    if not 1 <= k_max <= n_nodes:
        raise PlanError(f"compare k_max: must be in 1..{n_nodes} (got {k_max})")
    runs, curves = [], []
    for entry in methods:
        spec = _method_spec(entry)
        label = spec["name"] if sum(_method_spec(e)["name"] == spec["name"] for e in methods) == 1 else json.dumps(spec, sort_keys=True)
        say(f"running {label}")
        method_run = _timed_run(plan, spec, backend, label, progress, f"compare: {label}")
        runs.append(method_run)
        curves.append(recall_curve(label, true_effects, _flat(method_run.result), method_run.cost, k_max))
    faithfulness = []
    if faithfulness_sizes is not None:
        for r in (truth, *runs):
            say(f"faithfulness: {r.name}")
            faithfulness.append(circuit_faithfulness(
                r.result, faithfulness_sizes, greedy=greedy, label=r.name, backend=backend, progress=progress,
            ))
    return Comparison(n_nodes, len(truth.result.metric_clean), truth, runs, curves, faithfulness)


def write_comparison(comparison: Comparison, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``compare.md``, ``compare.json``, each method's result and (with matplotlib) ``compare.png``."""
    from atpframework.analysis.plots import PlotDependencyError, plot_faithfulness, plot_recall_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_text_atomically(out / "compare.md", comparison.table() + "\n"),
        write_text_atomically(out / "compare.json", json.dumps(comparison.as_json(), indent=2)),
    ]
    if comparison.ground_truth.wall_s > 0:
        written.append(comparison.ground_truth.result.save(out / "ground_truth.safetensors"))
    for r in comparison.runs:
        written.append(r.result.save(out / f"{r.spec['name']}{'' if r.name == r.spec['name'] else '_' + str(comparison.runs.index(r))}.safetensors"))
    try:
        written.append(plot_recall_curves(comparison.curves, out / "compare.png", title=title))
        if comparison.faithfulness:
            lines = [(c.label, c.sizes, c.faithfulness) for c in comparison.faithfulness]
            written.append(plot_faithfulness(lines, out / "faithfulness.png", title=title))
    except PlotDependencyError:
        pass
    return written

