"""Evaluation of the methods over many prompt pairs: exact ground truth, the cost of verified recall in the
single-pair and the distributional setting, and the false negatives each method leaves, with their reasons.

This module owns the evaluation across prompt pairs and node types (docs/evaluation.md). One call of
``evaluate`` takes the prompt pairs of one task, named *groups* of node selections (one node type each, or
several evaluated as one set of nodes) and the methods; it runs exact activation patching of every selected
node once as ground truth and each method once over every selection (per-pair scores do not depend on the
other selections or on batching), then, per group:

* **single-pair setting**: each pair separately, its nodes ranked by the method's ``|score|`` on that pair
  against its exact ``|effect|``: one cost-of-verified-recall curve and RelCost per pair
  (``atpframework.analysis.recall``), summarised over pairs by the median and interquartile range;
* **distributional setting**: one ranking for all pairs, by mean ``|score|`` against mean ``|effect|``
  (what ``atpframework.analysis.compare`` measures);
* **false negatives**: the true top ``fn_k`` nodes a method ranks below ``fn_factor * fn_k``, each with the
  reasons that reference estimates can tell (``explain_miss``), and optionally what the diagnostic bound
  (``atpframework.analysis.verify.diagnose``) reports after verifying the method's top ``fn_factor * fn_k``.

The own cost of a method in a group is that of a run of the group's selections alone (``AbstractMethod.cost``,
forward passes per pair). The baselines that patch sets of nodes jointly (``JOINT_PATCHING``) run once per
group, on its selections alone, since their sets would otherwise mix the groups. ``hierarchical`` decides per
batch of pairs, so it runs twice: one pair per batch for the single-pair setting, all pairs in one batch for the
distributional one.
"""

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atpframework.analysis.recall import RecallCurve, ranking_from_scores, recall_curve, relative_cost, verified_recall_cost
from atpframework.api import as_plan, run
from atpframework.engine.runner import compile_plan
from atpframework.errors import PlanError, shorten
from atpframework.io.results import AttributionResult
from atpframework.model.backend import AbstractBackend
from atpframework.tasks import Task, get_task

GROUND_TRUTH = {"name": "activation_patching", "nodes_per_pass": 64}
"""The exact method every evaluation takes as ground truth."""

REFERENCES = ("atp", "atp_qkfix", "atp_graddrop", "atp_ig")
"""Methods whose estimates tell why a node was missed (run as references when not among the methods)."""

QK_KINDS = frozenset({"attn_q", "attn_k", "edge_q", "edge_k"})
"""Node kinds that act only through an attention softmax (where the QK fix applies)."""

BATCH_COUPLED = frozenset({"hierarchical"})
"""Methods whose per-pair scores depend on the other pairs of their batch."""

JOINT_PATCHING = frozenset({"subsampling", "blocks", "hierarchical"})
"""The exact-patching baselines: they score nodes from sets of nodes patched jointly."""

REASONS = ("attention_saturation", "cancellation", "nonlinearity", "atp_close", "joint_patching", "crowded_out", "unexplained")
"""The false-negative reasons ``explain_miss`` gives, in the order the first applicable one is reported."""

DEFAULT_KS = (1, 5, 10, 20, 50, 100)
"""The ``k`` at which tables report the cost of finding the true top ``k``."""


# ------------------------------------------------------------------------------------------ summaries
@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of values over prompt pairs (linear interpolation, as numpy's default)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Tensor) -> "Spread":
        """The spread of a 1-D tensor of at least one value."""
        v = values.detach().to(torch.float64).flatten()
        if v.numel() == 0:
            raise ValueError("values: expected at least one value")
        q = torch.quantile(v, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64))
        return cls(float(q[0]), float(q[1]), float(q[2]), int(v.numel()))

    def text(self, digits: int = 2) -> str:
        """``median [q1, q3]``."""
        return f"{self.median:.{digits}f} [{self.q1:.{digits}f}, {self.q3:.{digits}f}]"

    def as_json(self) -> dict[str, float | int]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "n": self.n}


@dataclass(frozen=True)
class FalseNegative:
    """A true top node that a method ranks too low to be verified early."""

    pair: int | None
    """The prompt pair (single-pair setting), or None (distributional setting)."""
    node: int
    """Index within the group's nodes (its selections in plan order, each row-major over ``layer *axes``)."""
    label: str
    kind: str
    true_rank: int
    """1-based rank by exact |effect| (mean |effect| over pairs in the distributional setting)."""
    method_rank: int
    """1-based rank by the method's |score| (mean |score| over pairs in the distributional setting)."""
    effect: float
    """The exact effect (signed) on the pair; in the distributional setting the mean |effect| over pairs."""
    score: float
    """The method's score (signed for signed methods); in the distributional setting its mean |score|."""
    estimates: dict[str, float]
    """The reference methods' estimates of the node: signed on one pair, mean |estimate| over pairs."""
    reasons: tuple[str, ...]
    """Every reason that applies (``explain_miss``); the first is the one reported."""

    @property
    def reason(self) -> str:
        return self.reasons[0]

    def as_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair, "node": self.node, "label": self.label, "kind": self.kind, "true_rank": self.true_rank,
            "method_rank": self.method_rank, "effect": self.effect, "score": self.score, "estimates": self.estimates,
            "reason": self.reason, "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class MethodEvaluation:
    """One method on one group of nodes of one task."""

    name: str
    spec: dict[str, Any]
    cost: float
    """Own cost of a run of the group's nodes, forward passes per pair (a backward = 2)."""
    single_costs: Tensor
    """``pair k`` float64: cost(k) of verified recall on each pair separately, k = 1 .. ``k_single``."""
    single_relcost: Tensor
    """``pair``: RelCost of each pair's curve."""
    distributional: RecallCurve
    """The curve of one ranking (mean |score|) against mean |effect| over pairs."""
    single_fn: list[FalseNegative]
    distributional_fn: list[FalseNegative]
    diagnosis: dict[str, Any] | None = None
    """What the diagnostic bound reports after verifying the method's top ``fn_factor * fn_k`` (when asked)."""

    @property
    def relcost(self) -> Spread:
        """Median and IQR over pairs of the single-pair RelCost."""
        return Spread.of(self.single_relcost)

    def cost_at(self, k: int) -> Spread:
        """Median and IQR over pairs of the single-pair cost of verifying the true top ``k``."""
        return Spread.of(self.single_costs[:, k - 1])

    def fn_counts(self) -> dict[str, Any]:
        """How often the method misses: pairs with a false negative, false negatives, and by reason."""
        pairs = {fn.pair for fn in self.single_fn}
        return {
            "single_pairs_with_fn": len(pairs),
            "single_fn": len(self.single_fn),
            "single_by_reason": dict(Counter(fn.reason for fn in self.single_fn)),
            "distributional_fn": len(self.distributional_fn),
            "distributional_by_reason": dict(Counter(fn.reason for fn in self.distributional_fn)),
        }

    def as_json(self, ks: Sequence[int]) -> dict[str, Any]:
        band = self.band()
        k_single = self.single_costs.shape[1]
        return {
            "name": self.name, "method": self.spec, "cost": self.cost,
            "single": {
                "relcost": self.relcost.as_json(),
                "relcost_per_pair": [float(v) for v in self.single_relcost],
                "cost_at_k": {str(k): self.cost_at(k).as_json() for k in ks if k <= k_single},
                "curve": {"median": band[1].tolist(), "q1": band[2].tolist(), "q3": band[3].tolist()},
            },
            "distributional": {
                "relcost": self.distributional.relative,
                "cost_at_k": {str(k): float(self.distributional.costs[k - 1]) for k in ks if k <= self.distributional.k_max},
                "curve": [float(v) for v in self.distributional.costs],
            },
            "false_negatives": {
                **self.fn_counts(),
                "single": [fn.as_json() for fn in self.single_fn],
                "distributional": [fn.as_json() for fn in self.distributional_fn],
            },
            **({"diagnosis": self.diagnosis} if self.diagnosis is not None else {}),
        }

    def band(self) -> tuple[str, Tensor, Tensor, Tensor]:
        """``(name, median, q1, q3)`` of the single-pair cost(k) over pairs, per k (``plots.plot_recall_bands``)."""
        q = torch.quantile(self.single_costs, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64), dim=0)
        return self.name, q[0], q[1], q[2]


@dataclass(frozen=True)
class GroupEvaluation:
    """Every method on one group of nodes of one task."""

    task: str
    group: str
    kinds: tuple[str, ...]
    n_nodes: int
    n_pairs: int
    k_single: int
    """The largest k of the single-pair curves: at most ``k_max``, and no more than the nodes of nonzero effect on any pair."""
    k_distributional: int
    ground_truth_cost: float
    fn_k: int
    fn_factor: int
    methods: list[MethodEvaluation]

    @property
    def title(self) -> str:
        return f"{self.task} · {self.group}"

    def table(self, ks: Sequence[int] = (1, 10)) -> str:
        """Markdown: per method, own cost, single-pair RelCost and cost at ``ks`` (median [IQR]), distributional
        RelCost and cost at ``ks``, and the false negatives of both settings."""
        single_ks = [k for k in ks if k <= self.k_single]
        dist_ks = [k for k in ks if k <= self.k_distributional]
        head = (["method", "own cost (F)", "RelCost single: median [IQR]"] + [f"single cost @ k={k}" for k in single_ks]
                + ["RelCost distributional"] + [f"distr. cost @ k={k}" for k in dist_ks] + ["FN single (pairs)", "FN distributional"])
        rows = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 3) + [":---", ":---"]) + "|"]
        for m in self.methods:
            counts = m.fn_counts()
            cells = [m.name.replace("|", "\\|"), f"{m.cost:g}", m.relcost.text()]
            cells += [m.cost_at(k).text(0) for k in single_ks]
            cells.append(f"{m.distributional.relative:.2f}")
            cells += [f"{float(m.distributional.costs[k - 1]):,.0f}" for k in dist_ks]
            cells.append(f"{counts['single_pairs_with_fn']}/{self.n_pairs}{_by_reason(counts['single_by_reason'])}")
            cells.append(f"{counts['distributional_fn']}{_by_reason(counts['distributional_by_reason'])}")
            rows.append("| " + " | ".join(cells) + " |")
        note = (f"{self.n_nodes} nodes ({', '.join(self.kinds)}), {self.n_pairs} prompt pair(s); ground truth: exact patching, "
                f"{self.ground_truth_cost:g} forward passes per pair. Costs are forward passes per pair (backward = 2); "
                f"RelCost over k = 1..{self.k_single} (single) and 1..{self.k_distributional} (distributional). "
                f"FN: true top-{self.fn_k} nodes ranked below {self.fn_k * self.fn_factor}; single: pairs with at least one.")
        return "\n".join(rows) + "\n\n" + note + "\n"

    def as_json(self, ks: Sequence[int]) -> dict[str, Any]:
        return {
            "task": self.task, "group": self.group, "kinds": list(self.kinds), "n_nodes": self.n_nodes, "n_pairs": self.n_pairs,
            "k_single": self.k_single, "k_distributional": self.k_distributional, "ground_truth_cost": self.ground_truth_cost,
            "fn_k": self.fn_k, "fn_factor": self.fn_factor, "methods": [m.as_json(ks) for m in self.methods],
        }


def _by_reason(counts: Mapping[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: REASONS.index(kv[0]))) + ")"


@dataclass(frozen=True)
class TaskEvaluation:
    """One task's evaluation: its pairs, the runs and every group's numbers."""

    task: str
    pairs: list[dict[str, Any]]
    metric_clean: Tensor
    metric_noise: Tensor
    groups: list[GroupEvaluation]
    wall_s: dict[str, float]
    """Wall time of each run, by the labels of ``results``."""
    results: dict[str, AttributionResult] = field(repr=False)
    """The runs' results by label: ``ground_truth``, each method's label, ``reference:<name>``; for the joint-patching
    baselines one per group, ``<label> (<group>)``, and for ``hierarchical`` also ``<label>:single (<group>)``."""

    def as_json(self, ks: Sequence[int]) -> dict[str, Any]:
        return {
            "task": self.task,
            "pairs": self.pairs,
            "metric_clean": [float(v) for v in self.metric_clean],
            "metric_noise": [float(v) for v in self.metric_noise],
            "wall_s": self.wall_s,
            "groups": [g.as_json(ks) for g in self.groups],
        }


# ------------------------------------------------------------------------------------------ reasons
def explain_miss(kind: str, effect: Tensor, own: Tensor, references: Mapping[str, Tensor], tolerance: float = 0.5,
                 joint: bool = False) -> tuple[str, ...]:
    """Why a method missed a node, as far as reference estimates tell: every reason that applies, first the one to report.

    ``effect``: the node's exact effect on each pair (``pair``, signed; one entry in the single-pair setting).
    ``own``: the method's score of the node on each pair. ``references``: estimates per pair by reference method
    name (``atp``, ``atp_qkfix``, ``atp_ig`` signed; ``atp_graddrop`` its non-negative score); missing ones are
    not used. With ``size = mean |effect|``, an estimate ``x`` is *close* when ``mean |x - effect| <= tolerance * size``
    and *small* when ``mean |x| < (1 - tolerance) * size``:

    * ``crowded_out``: the method's own score is not small; other nodes were ranked above it by overestimates
      (reported alone);
    * ``joint_patching`` (``joint``: a baseline that patches sets of nodes jointly, ``JOINT_PATCHING``): its
      estimate is small: sampling noise, or members of a patched set that cancel or interact (reported alone;
      the gradient reasons below do not describe such a method);
    * ``attention_saturation``: a query or key node whose ``atp_qkfix`` estimate is close while ``atp``'s is not;
    * ``cancellation``: ``atp``'s estimate is small and ``atp_graddrop``'s score is not (dropping a residual write
      uncovers an effect that paths of opposite sign cancelled in the gradient);
    * ``nonlinearity``: ``atp_ig``'s estimate is close while ``atp``'s is not (saturation or a nonlinearity that
      switches between the clean and the noise run);
    * ``atp_close``: ``atp``'s own estimate is close: what the method changes (GradDrop's average over dropped
      writes, a sampled or grouped baseline) lost the node (reported only when none of the above applies);
    * ``unexplained``: none of these.
    """
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance: expected a number in (0, 1) (got {tolerance!r})")
    effect = effect.detach().double().flatten()
    size = float(effect.abs().mean())
    if float(own.detach().double().abs().mean()) >= (1 - tolerance) * size:
        return ("crowded_out",)
    if joint:
        return ("joint_patching",)

    def get(name: str) -> Tensor | None:
        x = references.get(name)
        return None if x is None else x.detach().double().flatten()

    def close(name: str) -> bool:
        x = get(name)
        return x is not None and float((x - effect).abs().mean()) <= tolerance * size

    def small(x: Tensor) -> bool:
        return float(x.abs().mean()) < (1 - tolerance) * size

    atp, graddrop = get("atp"), get("atp_graddrop")
    atp_off = not close("atp")
    reasons = []
    if kind in QK_KINDS and close("atp_qkfix") and atp_off:
        reasons.append("attention_saturation")
    if atp is not None and graddrop is not None and small(atp) and not small(graddrop):
        reasons.append("cancellation")
    if close("atp_ig") and atp_off:
        reasons.append("nonlinearity")
    if not reasons and atp is not None and not atp_off:
        reasons.append("atp_close")
    return tuple(reasons) or ("unexplained",)


# ------------------------------------------------------------------------------------------ pairs
def equal_length_pairs(task: str | Task, n_pairs: int, seed: int, backend: AbstractBackend, draw_factor: int = 8) -> list[dict[str, Any]]:
    """``n_pairs`` pairs of ``task`` that all have the same token length, for node selections over every position.

    Draws ``draw_factor * n_pairs`` pairs with ``seed`` (checked against the backend's tokenizer), keeps those of
    the most common length (the shorter of equally common ones) and returns the first ``n_pairs`` of them; a
    ``PlanError`` at ``n_pairs`` when fewer share a length."""
    task = get_task(task)
    drawn = task.pairs(n_pairs * draw_factor, seed, backend=backend)
    lengths = [len(backend.tokenize(p["clean"], None)) if isinstance(p["clean"], str) else len(p["clean"]) for p in drawn]
    counts = Counter(lengths)
    length = min(counts, key=lambda n: (-counts[n], n))
    kept = [p for p, n in zip(drawn, lengths) if n == length]
    if len(kept) < n_pairs:
        raise PlanError(f"n_pairs: task {task.name!r} gave only {len(kept)} pairs of one token length ({length}) among "
                        f"{len(drawn)} drawn; ask for fewer pairs, or select positions by a list or 'all'")
    return kept[:n_pairs]


def differing_positions(pairs: Sequence[Mapping[str, Any]], backend: AbstractBackend) -> list[int]:
    """The positions from the first at which some pair's clean and noise tokens differ, to the end, for pairs of one
    token length (``equal_length_pairs``); tokenized as plans tokenize them (the model's default BOS).

    A causal model's activations at earlier positions are the same in the clean and the noise run, so their nodes
    have an exact effect of 0 and every gradient method scores them 0: leaving them out changes no ranking of
    the nodes that matter, and saves their exact patching. A ``PlanError`` at ``pairs`` for pairs of several lengths."""
    tokens = [[backend.tokenize(t, None) if isinstance(t, str) else list(t) for t in (p["clean"], p["noise"])] for p in pairs]
    lengths = {len(t) for both in tokens for t in both}
    if len(lengths) != 1:
        raise PlanError(f"pairs: positions from the first difference need pairs of one token length (got lengths {sorted(lengths)})")
    length = lengths.pop()
    first = min((next((i for i, (a, b) in enumerate(zip(clean, noise)) if a != b), length) for clean, noise in tokens), default=length)
    if first == length:
        raise PlanError("pairs: every pair's clean and noise tokens are the same; no node has an effect")
    return list(range(first, length))


# ------------------------------------------------------------------------------------------ evaluate
def _spec(entry: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"name": entry} if isinstance(entry, str) else dict(entry)


def _labels(methods: Sequence[str | Mapping[str, Any]]) -> list[str]:
    specs = [_spec(m) for m in methods]
    names = [s["name"] for s in specs]
    return [s["name"] if names.count(s["name"]) == 1 else json.dumps(s, sort_keys=True) for s in specs]


def _check_groups(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    if not groups:
        raise PlanError("groups: expected at least one group of node selections")
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, str] = {}
    for name, selections in groups.items():
        if not selections:
            raise PlanError(f"groups[{name!r}]: expected at least one node selection")
        out[name] = []
        for i, sel in enumerate(selections):
            sel = dict(sel)
            if "kind" not in sel:
                raise PlanError(f"groups[{name!r}][{i}]: a node selection needs a 'kind'")
            result_name = sel.get("name", sel["kind"])
            if result_name in seen:
                raise PlanError(f"groups[{name!r}][{i}]: result name {result_name!r} is already used in group {seen[result_name]!r}; "
                                "give the selection a 'name'")
            seen[result_name] = name
            out[name].append(sel)
    return out


def evaluate(
    task: str,
    pairs: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[Mapping[str, Any]]],
    methods: Sequence[str | Mapping[str, Any]],
    backend: AbstractBackend,
    *,
    model_source: str = "in_memory",
    k_max: int = 200,
    fn_k: int = 10,
    fn_factor: int = 10,
    tolerance: float = 0.5,
    explain: bool = True,
    diagnose_samples: Sequence[int] | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> TaskEvaluation:
    """Evaluate ``methods`` on ``pairs`` of ``task`` over each group of node selections (module docstring).

    Args:
        task: the task's name (a label in tables).
        pairs: prompt dicts for the ``logit_diff`` metric.
        groups: group name -> node selections (plan ``nodes`` entries); each group is ranked as one set of nodes.
        methods: method names or specs (``{"name": "atp_ig", "steps": 10}``).
        backend: the loaded model.
        model_source: the plans' ``model.source`` (a label; the backend is what runs).
        k_max: the largest k of the recall curves (fewer where fewer nodes have a nonzero effect).
        fn_k: a false negative is a true top-``fn_k`` node ranked below ``fn_factor * fn_k``.
        fn_factor: see ``fn_k``.
        tolerance: what *close* and *small* mean in ``explain_miss``.
        explain: run the reference methods (``REFERENCES``) that are not among ``methods``, for the reasons.
        diagnose_samples: sample budgets of the diagnostic bound run on each method's distributional ranking
            after verifying its top ``fn_factor * fn_k`` (None: not run; it costs exact patching).
        batch_size: prompt pairs per pass.
        log: called with a line before each run.
        progress: progress bars on stderr.
    """
    groups = _check_groups(groups)
    prompts = [dict(p) for p in pairs]
    if not prompts:
        raise PlanError("pairs: expected at least one prompt pair")
    for value, name, low in ((k_max, "k_max", 1), (fn_k, "fn_k", 1), (fn_factor, "fn_factor", 1), (batch_size, "batch_size", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PlanError(f"{name}: expected an integer >= {low}, got {shorten(value)}")
    if not 0 < tolerance < 1:
        raise PlanError(f"tolerance: expected a number in (0, 1), got {shorten(tolerance)}")
    if not methods:
        raise PlanError("methods: expected at least one method")
    say = log or (lambda line: None)
    selections = [sel for sels in groups.values() for sel in sels]
    base = {"model": {"source": model_source}, "prompts": prompts, "metric": {"name": "logit_diff"}, "nodes": selections,
            "batch_size": batch_size}

    def plan_for(spec: Mapping[str, Any], nodes: list[dict[str, Any]] | None = None, batch: int | None = None) -> dict[str, Any]:
        return {**base, "method": dict(spec), "nodes": nodes if nodes is not None else selections, "batch_size": batch or batch_size}

    wall: dict[str, float] = {}
    results: dict[str, AttributionResult] = {}

    def timed(label: str, plan: dict[str, Any]) -> AttributionResult:
        say(f"{task}: {label}")
        started = time.perf_counter()
        results[label] = run(plan, backend=backend, progress=progress)
        wall[label] = time.perf_counter() - started
        return results[label]

    truth = timed("ground_truth", plan_for(GROUND_TRUTH))
    labels = _labels(methods)
    specs = [_spec(m) for m in methods]

    def method_runs(label: str, spec: dict[str, Any], nodes: list[dict[str, Any]] | None = None,
                    where: str = "") -> tuple[AttributionResult, AttributionResult]:
        """The runs of the single-pair and the distributional setting (the same run unless batches couple pairs)."""
        if spec["name"] in BATCH_COUPLED:
            return (timed(f"{label}:single{where}", plan_for(spec, nodes, batch=1)),
                    timed(f"{label}{where}", plan_for(spec, nodes, batch=len(pairs))))
        shared = timed(f"{label}{where}", plan_for(spec, nodes))
        return shared, shared

    # one run over every selection, except for the baselines that patch sets jointly: their sets would mix groups
    runs = {label: method_runs(label, spec) for label, spec in zip(labels, specs) if spec["name"] not in JOINT_PATCHING}
    references: dict[str, AttributionResult] = {}
    if explain:
        has_qk = any(sel["kind"] in QK_KINDS for sel in selections)
        for name in REFERENCES:
            if name == "atp_qkfix" and not has_qk:
                continue
            mine = next((lab for lab, s in zip(labels, specs) if s["name"] == name), None)
            references[name] = runs[mine][1] if mine is not None else timed(f"reference:{name}", plan_for({"name": name}))

    evaluations = []
    for group, sels in groups.items():
        names = [sel.get("name", sel["kind"]) for sel in sels]
        kinds = tuple(dict.fromkeys(sel["kind"] for sel in sels))
        gt_cost = _own_cost(plan_for(GROUND_TRUTH, sels), backend)
        effects = _per_pair(truth, names)
        nonzero = _nonzero_counts(effects)
        k_single = min(k_max, int(nonzero.min()))
        k_dist = min(k_max, int(_nonzero_counts(effects.abs().mean(0, keepdim=True))[0]))
        if k_single < 1 or k_dist < 1:
            raise PlanError(f"groups[{group!r}]: no node has a nonzero exact effect on some pair; nothing to recall")
        node_kind, node_label = _node_info(truth, names)
        ref_scores = {name: _per_pair(r, names) for name, r in references.items()}
        method_evals = []
        for label, spec in zip(labels, specs):
            cost = _own_cost(plan_for(spec, sels, batch=1 if spec["name"] in BATCH_COUPLED else None), backend)
            joint = spec["name"] in JOINT_PATCHING
            single, dist = method_runs(label, spec, sels, f" ({group})") if joint else runs[label]
            s_single, s_dist = _per_pair(single, names), _per_pair(dist, names)
            costs = torch.stack([verified_recall_cost(effects[p], ranking_from_scores(s_single[p]), cost, k_single)
                                 for p in range(len(pairs))])
            rel = torch.tensor([relative_cost(c) for c in costs], dtype=torch.float64)
            curve = recall_curve(label, effects.abs().mean(0), s_dist.abs().mean(0), cost, k_dist)
            fn_single = _single_fns(effects, s_single, ref_scores, node_kind, node_label, fn_k, fn_factor, tolerance, joint)
            fn_dist = _distributional_fns(effects, s_dist, ref_scores, node_kind, node_label, fn_k, fn_factor, tolerance, joint)
            diagnosis = None
            if diagnose_samples is not None:
                say(f"{task}: diagnose {label} on {group}")
                diagnosis = _diagnosis(dist if joint else plan_for(spec, sels), backend, fn_k * fn_factor, diagnose_samples, fn_dist, effects)
            method_evals.append(MethodEvaluation(label, spec, cost, costs, rel, curve, fn_single, fn_dist, diagnosis))
        evaluations.append(GroupEvaluation(task, group, kinds, effects.shape[1], len(pairs), k_single, k_dist, gt_cost,
                                           fn_k, fn_factor, method_evals))
    return TaskEvaluation(task, prompts, truth.metric_clean, truth.metric_noise, evaluations, wall, results)


def _own_cost(plan: dict[str, Any], backend: AbstractBackend) -> float:
    compiled = compile_plan(as_plan(plan), backend)
    return float(compiled.method.cost(compiled))


def _per_pair(result: AttributionResult, names: Sequence[str]) -> Tensor:
    """``pair node`` float64: the selections' per-pair scores, flattened row-major and concatenated in order."""
    parts = []
    for name in names:
        per_pair = result[name].per_pair
        parts.append((per_pair.to_dense() if per_pair.is_sparse else per_pair).flatten(1))
    return torch.cat(parts, dim=1).to(torch.float64)


def _nonzero_counts(effects: Tensor) -> Tensor:
    """Per row, the nodes whose |effect| exceeds 1e-6 of the row's largest (patching positions the noise leaves
    unchanged gives zero up to rounding)."""
    size = effects.abs()
    return (size > 1e-6 * size.max(dim=1, keepdim=True).values.clamp_min(1e-30)).sum(dim=1)


def _node_info(result: AttributionResult, names: Sequence[str]) -> tuple[Callable[[int], str], Callable[[int], str]]:
    """Functions of a group node index: its kind and its label (``AttributionResult.node_label``)."""
    numbering = result.numbering
    starts, offset = [], 0
    for name in names:
        size = result[name].per_pair[0].numel()
        starts.append((offset, offset + size, name, numbering.offsets[numbering.names.index(name)]))
        offset += size

    def where(node: int) -> tuple[str, int]:
        for low, high, name, global_start in starts:
            if low <= node < high:
                return name, global_start + node - low
        raise IndexError(f"node {node} out of range (0..{offset - 1})")

    return (lambda node: result[where(node)[0]].kind), (lambda node: result.node_label(where(node)[1]))


def _ranks(values: Tensor) -> Tensor:
    """1-based rank of each node by |value| descending (ties: lower index first)."""
    order = ranking_from_scores(values)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


def _misses(effects: Tensor, scores: Tensor, fn_k: int, fn_factor: int) -> list[tuple[int, int, int]]:
    """``(node, true rank, method rank)`` of the true top ``fn_k`` nodes (nonzero ones) ranked below ``fn_k * fn_factor``."""
    true_ranks, method_ranks = _ranks(effects), _ranks(scores)
    top = ranking_from_scores(effects)[: min(fn_k, int(_nonzero_counts(effects[None])[0]))]
    return [(int(n), int(true_ranks[n]), int(method_ranks[n])) for n in top if int(method_ranks[n]) > fn_k * fn_factor]


def _single_fns(effects: Tensor, scores: Tensor, refs: Mapping[str, Tensor], kind: Callable[[int], str],
                label: Callable[[int], str], fn_k: int, fn_factor: int, tolerance: float, joint: bool) -> list[FalseNegative]:
    out = []
    for p in range(effects.shape[0]):
        for node, true_rank, method_rank in _misses(effects[p], scores[p], fn_k, fn_factor):
            estimates = {name: float(r[p, node]) for name, r in refs.items()}
            reasons = explain_miss(kind(node), effects[p, node : node + 1], scores[p, node : node + 1],
                                   {name: r[p, node : node + 1] for name, r in refs.items()}, tolerance, joint)
            out.append(FalseNegative(p, node, label(node), kind(node), true_rank, method_rank, float(effects[p, node]),
                                     float(scores[p, node]), estimates, reasons))
    return out


def _distributional_fns(effects: Tensor, scores: Tensor, refs: Mapping[str, Tensor], kind: Callable[[int], str],
                        label: Callable[[int], str], fn_k: int, fn_factor: int, tolerance: float, joint: bool) -> list[FalseNegative]:
    out = []
    for node, true_rank, method_rank in _misses(effects.abs().mean(0), scores.abs().mean(0), fn_k, fn_factor):
        estimates = {name: float(r[:, node].abs().mean()) for name, r in refs.items()}
        reasons = explain_miss(kind(node), effects[:, node], scores[:, node], {name: r[:, node] for name, r in refs.items()},
                               tolerance, joint)
        out.append(FalseNegative(None, node, label(node), kind(node), true_rank, method_rank, float(effects[:, node].abs().mean()),
                                 float(scores[:, node].abs().mean()), estimates, reasons))
    return out


def _diagnosis(run_of_group: AttributionResult | dict[str, Any], backend: AbstractBackend, verified_top: int, samples: Sequence[int],
               misses: Sequence[FalseNegative], effects: Tensor) -> dict[str, Any]:
    """The diagnostic bound on the method's ranking of the group's nodes alone (its run of the group's selections, or
    the plan to make one), and whether it covers each false negative of that ranking."""
    from atpframework.analysis.verify import diagnose

    n_nodes = effects.shape[1]
    if verified_top >= n_nodes:
        return {"skipped": f"verified_top {verified_top} is not below the {n_nodes} nodes"}
    result = run_of_group if isinstance(run_of_group, AttributionResult) else run(run_of_group, backend=backend, progress=False)
    _, diagnosis = diagnose(result, verified_top=verified_top, samples=list(samples), backend=backend, progress=False)
    final = {c: rows[-1][1] for c, rows in diagnosis.bounds.items()}
    worst = {str(c): int(n) for c, n in diagnosis.worst_node.items()}
    return {
        **diagnosis.as_json(),
        "false_negatives": [
            {"node": fn.node, "label": fn.label, "mean_effect": float(effects[:, fn.node].mean()),
             "covered": {str(c): bool(theta >= abs(float(effects[:, fn.node].mean()))) for c, theta in final.items()},
             "is_worst_node": [c for c, n in worst.items() if n == fn.node]}
            for fn in misses
        ],
    }


# ------------------------------------------------------------------------------------------ reports
def markdown(evaluations: Sequence[TaskEvaluation], ks: Sequence[int] = (1, 10)) -> str:
    """One Markdown section per task and group: the table of ``GroupEvaluation.table`` and the false negatives
    of the distributional setting."""
    lines = []
    for ev in evaluations:
        walls = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in ev.wall_s.items())
        summary = (f"{len(ev.pairs)} pair(s); clean logit diff {_mean_std(ev.metric_clean)}, noise "
                   f"{_mean_std(ev.metric_noise)}. Wall time: {walls}.")
        lines += [f"## {ev.task}", "", summary, ""]
        for g in ev.groups:
            lines += [f"### {g.title}", "", g.table(ks)]
            missed = [(m.name, fn) for m in g.methods for fn in m.distributional_fn]
            if missed:
                lines += ["Distributional false negatives:", ""]
                lines += [f"* {name}: {fn.label} (true rank {fn.true_rank}, ranked {fn.method_rank}; mean |effect| {fn.effect:.3g}, "
                          f"score {fn.score:.3g}; {', '.join(f'{k} {v:.3g}' for k, v in fn.estimates.items())}): {', '.join(fn.reasons)}"
                          for name, fn in missed]
                lines.append("")
    return "\n".join(lines)


def _mean_std(values: Tensor) -> str:
    v = values.double()
    std = float(v.std()) if v.numel() > 1 else 0.0
    return f"{float(v.mean()):+.2f} ± {std:.2f}"


def plot_group(group: GroupEvaluation, path: str | Path) -> Path:
    """The group's recall curves: single-pair medians with IQR bands, and the distributional curves
    (``plots.plot_recall_bands``); returns the path."""
    from atpframework.analysis.plots import plot_recall_bands

    return plot_recall_bands([m.band() for m in group.methods], [m.distributional for m in group.methods], path,
                             title=f"{group.title} ({group.n_pairs} pairs, {group.n_nodes} nodes)")
