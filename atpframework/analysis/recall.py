"""Evaluation: the "cost of verified recall" of a node ranking, and its summary RelCost.

This module owns the evaluation metric of the AtP* paper (``docs`` method notes, section 4). A method
yields a ranking of nodes; the nodes are then verified one by one with exact activation patching, one
forward pass each, in that order. With the true effect ``c(n)`` of every node known (ground truth from
full activation patching), ``cost(k)`` is the method's own cost plus the number of verifications spent
until *all* true top-``k`` nodes have been verified. Costs are in forward-pass equivalents (a backward
pass counts as 2 forwards). An oracle that verifies in true order at no cost of its own has
``cost(k) = k``; every method has ``cost(k) >= k``.

Conventions:

* Nodes are the entries of a 1-D tensor (shape ``node``); flatten per-selection scores (e.g.
  ``layer *axes``) row-major, the same way for effects and scores.
* The true order is by ``|c|`` descending, ties broken by the lower node index first. A method's
  ranking from scores uses the same rule on ``|score|``.
* ``RelCost = exp(sum_k (1/k) log(cost(k)/k) / sum_k 1/k)`` over ``k = 1..K``: the inverse-rank-weighted
  geometric mean of ``cost(k)/k``, so the head of the ranking dominates.

Only torch is needed; tables are Markdown strings and ``curves_to_json`` gives plain lists of floats.
Plotting lives in ``atpframework.analysis.plots`` (optional matplotlib).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _real_vector(values: Any, arg: str) -> Tensor:
    """``values`` as a 1-D, finite float64 CPU tensor with at least one entry; ValueError naming ``arg``."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{arg}: expected a torch.Tensor (got {type(values).__name__})")
    if values.dim() != 1:
        raise ValueError(f"{arg}: expected a 1-D tensor of shape (node,) (got shape {tuple(values.shape)})")
    if values.numel() == 0:
        raise ValueError(f"{arg}: expected at least one node (got an empty tensor)")
    if values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{arg}: expected real numbers (got dtype {values.dtype})")
    out = values.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).nonzero()[0, 0])
        raise ValueError(f"{arg}: every entry must be finite (entry {bad} is {float(out[bad])})")
    return out


def _order_by_magnitude(values: Tensor) -> Tensor:
    """Indices of ``values`` (``node``) by ``|value|`` descending, ties by lower index (a stable sort)."""
    return torch.sort(values.abs(), descending=True, stable=True).indices


def true_top_order(true_effects: Tensor) -> Tensor:
    """Node indices by true importance: ``|c|`` descending, ties broken by the lower index.

    ``true_effects``: ``node``, the true effect of every node. Returns ``node`` int64 indices; entry
    ``k-1`` is the ``k``-th most important node.
    """
    return _order_by_magnitude(_real_vector(true_effects, "true_effects"))


def ranking_from_scores(scores: Tensor) -> Tensor:
    """A method's verification order from its scores: ``|score|`` descending, ties by the lower index.

    ``scores``: ``node`` (signed or non-negative). Returns ``node`` int64 indices, to verify first to last.
    """
    return _order_by_magnitude(_real_vector(scores, "scores"))


def _check_ranking(ranking: Any, n_nodes: int) -> Tensor:
    """``ranking`` as an int64 CPU tensor, checked to be a permutation of ``0..n_nodes-1``."""
    if not isinstance(ranking, Tensor):
        raise ValueError(f"ranking: expected a torch.Tensor of node indices (got {type(ranking).__name__})")
    if ranking.dim() != 1:
        raise ValueError(f"ranking: expected a 1-D tensor of shape (node,) (got shape {tuple(ranking.shape)})")
    if ranking.dtype == torch.bool or ranking.is_floating_point() or ranking.is_complex():
        raise ValueError(f"ranking: expected integer node indices (got dtype {ranking.dtype})")
    if ranking.numel() != n_nodes:
        raise ValueError(
            f"ranking: must list every node exactly once: expected length {n_nodes} (the number of true_effects), "
            f"got {ranking.numel()}"
        )
    ranking = ranking.detach().to("cpu", torch.int64)
    low, high = int(ranking.min()), int(ranking.max())
    if low < 0 or high >= n_nodes:
        bad = low if low < 0 else high
        raise ValueError(f"ranking: node index {bad} is out of range 0..{n_nodes - 1}")
    counts = torch.bincount(ranking, minlength=n_nodes)
    if bool((counts != 1).any()):
        dup = int((counts > 1).nonzero()[0, 0])
        raise ValueError(f"ranking: must be a permutation of 0..{n_nodes - 1}; node {dup} appears {int(counts[dup])} times")
    return ranking


def _check_method_cost(method_cost: Any) -> float:
    if isinstance(method_cost, bool) or not isinstance(method_cost, (int, float)):
        raise ValueError(f"method_cost: expected a number of forward passes (got {method_cost!r})")
    value = float(method_cost)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"method_cost: must be finite and >= 0 forward passes (got {method_cost!r})")
    return value


def verified_recall_cost(
    true_effects: Tensor, ranking: Tensor, method_cost: float = 0.0, k_max: int | None = None
) -> Tensor:
    """Cost of verified recall: ``cost[k-1]`` for ``k = 1..k_max``, in forward passes.

    ``true_effects``: ``node`` true effects ``c(n)``. ``ranking``: ``node`` int indices, a permutation:
    the order in which nodes are verified (one forward pass each). ``method_cost``: the method's own
    cost in forward-pass equivalents (backward = 2F), added to every ``k``. ``k_max``: largest ``k``
    (default: the number of nodes). Returns ``k_max`` float64: ``method_cost`` plus the number of
    verifications until all true top-``k`` nodes (see ``true_top_order``) are verified.

    Raises ValueError (naming the argument) for a ranking that is not a 1-D permutation of the node
    indices, non-finite effects, a negative or non-finite ``method_cost``, or ``k_max`` outside ``1..node``.
    """
    effects = _real_vector(true_effects, "true_effects")
    n_nodes = effects.numel()
    order = _check_ranking(ranking, n_nodes)
    own = _check_method_cost(method_cost)
    if k_max is None:
        k_max = n_nodes
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= n_nodes:
        raise ValueError(f"k_max: expected an integer in 1..{n_nodes} (the number of nodes), got {k_max!r}")
    position = torch.empty(n_nodes, dtype=torch.int64)
    position[order] = torch.arange(n_nodes, dtype=torch.int64)  # 0-based verification step of each node
    needed = position[_order_by_magnitude(effects)[:k_max]]
    steps = torch.cummax(needed, dim=0).values + 1  # verifications until the true top-k are all verified
    return steps.to(torch.float64) + own


def relative_cost(costs: Tensor) -> float:
    """RelCost of a curve: the inverse-rank-weighted geometric mean of ``cost(k)/k``.

    ``costs``: ``k`` with ``costs[k-1] = cost(k)`` for ``k = 1..K`` (all > 0). Returns
    ``exp(sum_k (1/k) log(cost(k)/k) / sum_k 1/k)``; 1 for the oracle, ``>= 1`` for any real curve.
    """
    values = _real_vector(costs, "costs")
    if bool((values <= 0).any()):
        bad = int((values <= 0).nonzero()[0, 0])
        raise ValueError(f"costs: every cost must be > 0 (cost at k={bad + 1} is {float(values[bad])})")
    k = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    weights = 1.0 / k
    return float(torch.exp((weights * torch.log(values / k)).sum() / weights.sum()))


@dataclass(frozen=True)
class RecallCurve:
    """One method's cost-of-verified-recall curve."""

    name: str
    """Method label (table row, plot legend)."""
    method_cost: float
    """The method's own cost in forward passes (backward = 2F), included in ``costs``."""
    costs: Tensor
    """``k`` float64: ``costs[k-1]`` = cost to have verified all true top-``k`` nodes."""
    relative: float
    """RelCost of ``costs`` against the oracle (``relative_cost``)."""

    @property
    def k_max(self) -> int:
        """The largest ``k`` evaluated."""
        return int(self.costs.numel())


def recall_curve(
    name: str, true_effects: Tensor, scores: Tensor, method_cost: float = 0.0, k_max: int | None = None
) -> RecallCurve:
    """The recall curve of a method that verifies nodes by ``|scores|`` (``ranking_from_scores``).

    ``true_effects`` and ``scores``: ``node``, same length. ``method_cost``, ``k_max``: as in
    ``verified_recall_cost``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty method label (got {name!r})")
    score_vec = _real_vector(scores, "scores")
    effects = _real_vector(true_effects, "true_effects")
    if score_vec.numel() != effects.numel():
        raise ValueError(
            f"scores: expected one score per node, {effects.numel()} (the number of true_effects), got {score_vec.numel()}"
        )
    costs = verified_recall_cost(effects, _order_by_magnitude(score_vec), method_cost, k_max)
    return RecallCurve(name, _check_method_cost(method_cost), costs, relative_cost(costs))


def _fmt_cost(value: float) -> str:
    """A cost in forward passes: integers as integers (with thousands separators), else 1 decimal."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _check_curves(curves: Sequence[RecallCurve]) -> list[RecallCurve]:
    curves = list(curves)
    for i, curve in enumerate(curves):
        if not isinstance(curve, RecallCurve):
            raise ValueError(f"curves[{i}]: expected a RecallCurve (got {type(curve).__name__})")
    return curves


def format_table(curves: Sequence[RecallCurve], ks: Sequence[int]) -> str:
    """A Markdown table, one row per curve: method | own cost (F) | cost at each ``k`` in ``ks`` | RelCost.

    Costs are in forward passes; a ``k`` beyond a curve's ``k_max`` shows ``–``. RelCost has 3 decimals.
    Written by hand, not with rich: this is GitHub Markdown (``compare.md``) with unpadded cells, which
    rich's Markdown box would pad to the column widths.
    """
    curves = _check_curves(curves)
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks: expected positive integers (got {k!r})")
    header = ["method", "own cost (F)"] + [f"cost @ k={k}" for k in ks] + ["RelCost"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for curve in curves:
        cells = [curve.name.replace("|", "\\|"), _fmt_cost(curve.method_cost)]
        cells += [_fmt_cost(float(curve.costs[k - 1])) if k <= curve.k_max else "–" for k in ks]
        cells.append(f"{curve.relative:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_to_json(curves: Sequence[RecallCurve]) -> dict[str, Any]:
    """Machine-readable curves: plain dicts, lists of floats, ready for ``json.dumps``.

    ``{"metric", "unit", "curves": [{"name", "method_cost", "k_max", "costs", "relative_cost"}]}``,
    where ``costs[k-1]`` is the cost at ``k``.
    """
    curves = _check_curves(curves)
    return {
        "metric": "cost_of_verified_recall",
        "unit": "forward passes (backward = 2)",
        "curves": [
            {
                "name": c.name,
                "method_cost": float(c.method_cost),
                "k_max": c.k_max,
                "costs": [float(v) for v in c.costs.tolist()],
                "relative_cost": float(c.relative),
            }
            for c in curves
        ],
    }
