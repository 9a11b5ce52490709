"""Verification: exact patching of a result's nodes in decreasing estimated score, and the diagnostic
bound on what the unverified rest could still hide.

``verify`` re-compiles the plan stored in a result, ranks its nodes by the estimate (mean ``|score|``
over pairs, ties by node order), exact-patches them in that order with ``ExactPatcher`` (all pairs,
``nodes_per_pass`` nodes per forward pass) and stores the verified effects in the result
(``AttributionResult.verified``). It stops after ``budget`` nodes, or with ``until_stable`` once the
last ``patience`` verified nodes left the verified top ``top`` unchanged.

``diagnose`` verifies the top ``verified_top`` nodes (reusing stored verifications), then runs the
Subsampling algorithm on the remainder (Bernoulli(``p``) subsets patched jointly; the effect of a
subset is its mean over the prompt pairs) and reports the Welch upper bound on any unverified node's
``|effect|`` at each confidence, after each sample budget.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atpframework.analysis.recall import ranking_from_scores
from atpframework.api import as_plan, load_backend, splice_saes
from atpframework.engine.runner import batch_runs, compile_plan
from atpframework.errors import PlanError, shorten
from atpframework.io.progress import Bar, Progress
from atpframework.io.results import AttributionResult, VerifiedNodes, load_result, now_utc
from atpframework.maths.diagnostic import SubsetStats, subsample, welch_bounds
from atpframework.methods.patching import ExactPatcher
from atpframework.model.backend import AbstractBackend
from atpframework.plans.compiled import CompiledPlan
from atpframework.plans.metrics import resolve_metric

ResultLike = AttributionResult | str | Path


class _Verifier:
    """A result's plan compiled against a backend, with one ``ExactPatcher`` per batch (caches kept)."""

    def __init__(self, result: AttributionResult, backend: AbstractBackend | None, model: Any, saes: Mapping[str, Any] | None,
                 nodes_per_pass: int) -> None:
        plan = as_plan(result.plan)
        if plan.metric.name == "custom":
            raise PlanError("metric.name: results of custom metrics cannot be verified from the file; the metric is not stored")
        backend = splice_saes(plan, backend or load_backend(plan, model), saes)
        self.compiled: CompiledPlan = compile_plan(plan, backend)
        metric = resolve_metric(plan.metric, None)
        self.patchers = [(list(run.batch.pair_indices), ExactPatcher(run, nodes_per_pass)) for run in batch_runs(self.compiled, backend, metric)]
        self.n_pairs = len(self.compiled.pairs)
        first = self.patchers[0][1]
        self.numbering = first.numbering
        self.n_nodes = first.n_nodes
        self.names = list(self.numbering.names)
        for name, ns in result.nodes.items():
            if name not in self.names or tuple(ns.per_pair.shape[1:]) != self.compiled.bound[self.names.index(name)].shape:
                raise PlanError(f"the result's node selection {name!r} does not match its own plan any more (edited file?)")
        check_same_model(result, backend.info.source, [(pairs, p.metric_clean, p.metric_noise) for pairs, p in self.patchers])

    def estimates(self, result: AttributionResult) -> Tensor:
        """``node``: mean |score| over pairs, in global node order."""
        return torch.cat([result[name].aggregate("mean_abs").flatten() for name in self.names])

    def single_effects(self, nodes: Tensor) -> Tensor:
        """``pair node``: exact effect of each global node patched alone."""
        out = torch.zeros(self.n_pairs, len(nodes))
        for pairs, patcher in self.patchers:
            out[pairs] = patcher.single_node_effects(nodes).T
        return out

    def joint_effects(self, masks: Tensor) -> Tensor:
        """``set``: mean over all pairs of the effect of patching each mask's global nodes jointly."""
        total = torch.zeros(len(masks), dtype=torch.float64)
        for pairs, patcher in self.patchers:
            effects = patcher.effects([patcher.node_set(m.nonzero().flatten()) for m in masks])  # set batch
            total += effects.double().sum(dim=1)
        return total / self.n_pairs

    def forward_equivalents(self) -> float:
        """Patched rows so far, per prompt pair."""
        return sum(p.counts.rows for _, p in self.patchers) / self.n_pairs

    def store(self, result: AttributionResult, nodes: Tensor, effects: Tensor, ranks: Tensor, info: dict[str, Any]) -> AttributionResult:
        """``result`` with ``nodes`` (global) verified as ``effects`` (``pair node``) added to what it had."""
        verified = dict(result.verified)
        offsets = self.numbering.offsets
        for i, name in enumerate(self.names):
            pick = (nodes >= offsets[i]) & (nodes < offsets[i + 1])
            if not pick.any():
                continue
            new = VerifiedNodes(nodes[pick] - offsets[i], ranks[pick], effects[:, pick])
            old = verified.get(name)
            if old is not None:
                new = VerifiedNodes(torch.cat([old.index, new.index]), torch.cat([old.rank, new.rank]), torch.cat([old.effects, new.effects], 1))
            verified[name] = new
        return dataclasses.replace(result, verified=verified, verification={**result.verification, **info})


def check_same_model(result: AttributionResult, source: str, measured: Sequence[tuple[list[int], Tensor, Tensor]]) -> None:
    """Refuse a model whose clean or noise metric differs from the stored one: exact effects computed on another
    model (``--model``, or weights changed on disk) would be stored or reported beside scores they do not belong
    to. ``measured``: per batch, its pair indices and the clean and noise metrics measured now. Allowed drift:
    2% of the metric's scale (dtype and device rounding stay far below it)."""
    scale = max(float((result.metric_noise - result.metric_clean).abs().mean()), float(result.metric_clean.abs().mean()), 1e-3)
    for pairs, clean, noise in measured:
        for label, stored, now in (("clean", result.metric_clean, clean), ("noise", result.metric_noise, noise)):
            gap = (now.detach().float().cpu() - stored[pairs].float()).abs()
            if not bool((gap <= 0.02 * scale).all()):
                i = int(gap.argmax())
                raise PlanError(
                    f"model.source: {shorten(source)} is not the model this result was computed with: prompt pair "
                    f"{pairs[i]} has {label} metric {float(now[i]):.6g}, the file stored {float(stored[pairs[i]]):.6g}; "
                    "exact effects would not belong to the file's scores (give the right model with --model)"
                )


def _as_result(result: ResultLike) -> AttributionResult:
    return result if isinstance(result, AttributionResult) else load_result(result)


def verified_effects(result: AttributionResult) -> tuple[Tensor, Tensor, Tensor]:
    """Global node indices, ranks and ``pair node`` effects of every verified node, in verification order."""
    numbering = result.numbering
    parts = [(numbering.global_index(i, result.verified[n].index), result.verified[n].rank, result.verified[n].effects)
             for i, n in enumerate(numbering.names) if n in result.verified]
    if not parts:
        n_pairs = len(result.metric_clean)
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(n_pairs, 0)
    nodes, ranks, effects = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts], 1)
    order = ranks.argsort()
    return nodes[order], ranks[order], effects[:, order]


def default_threshold(result: AttributionResult) -> float:
    """5% of the mean |metric(noise) - metric(clean)|: what "confirmed" means unless told otherwise."""
    return 0.05 * float((result.metric_noise - result.metric_clean).abs().mean())


def verify(
    result: ResultLike,
    *,
    budget: int | None = None,
    until_stable: bool = False,
    top: int = 20,
    patience: int | None = None,
    threshold: float | None = None,
    nodes_per_pass: int = 64,
    backend: AbstractBackend | None = None,
    model: Any = None,
    saes: Mapping[str, Any] | None = None,
    progress: Progress = True,
) -> AttributionResult:
    """Exact-patch a result's nodes in decreasing estimated score; return the result with the effects stored.

    Args:
        result: a result or its file.
        budget: how many (not yet verified) nodes to verify.
        until_stable: instead, verify until the last ``patience`` verified nodes did not change the top ``top``
            nodes by verified mean |effect| (or every node is verified).
        top: the size of the top set ``until_stable`` watches, and of the report.
        patience: see ``until_stable``; defaults to ``max(top, nodes_per_pass)``.
        threshold: a verified node is *confirmed* when its mean |effect| is at least this (default
            ``default_threshold``: 5% of the mean |metric(noise) - metric(clean)|).
        nodes_per_pass: nodes patched per forward pass.
        backend: an already loaded backend to patch on (default: load the plan's model).
        model: a model object to patch on instead of loading the plan's ``model.source``.
        saes: SAE objects for the plan's ``saes`` entries without a path or release, by name.
        progress: ``True``: a progress bar on stderr, per forward pass of ``nodes_per_pass`` nodes; ``False``:
            none; a callable: called with the number of nodes verified after each chunk (``atpframework.io.progress``).
    """
    result = _as_result(result)
    return _verify_with(
        _Verifier(result, backend, model, saes, nodes_per_pass), result, budget, until_stable, top, patience, threshold,
        progress, "verify: patching nodes",
    )


def _verify_with(
    verifier: _Verifier,
    result: AttributionResult,
    budget: int | None,
    until_stable: bool,
    top: int,
    patience: int | None,
    threshold: float | None,
    progress: Progress,
    desc: str,
) -> AttributionResult:
    nodes_per_pass = verifier.patchers[0][1].sets_per_pass
    patience = _checked_verify_options(budget, until_stable, top, patience, nodes_per_pass)
    threshold = default_threshold(result) if threshold is None else threshold
    order = ranking_from_scores(verifier.estimates(result))
    done_nodes, done_ranks, done_effects = verified_effects(result)
    todo = order[~torch.isin(order, done_nodes)]
    target = len(todo) if budget is None else min(budget, len(todo))
    watch = _TopSetWatch(done_nodes, done_effects, top, patience) if until_stable else None
    with Bar(progress, target, desc, "node") as bar:
        nodes, effects, stopped = _verify_in_order(verifier, todo[:target], nodes_per_pass, watch, bar.update)
    if stopped is None:
        stopped = f"budget of {budget} nodes spent" if budget is not None and target == budget else "every node verified"
    next_rank = int(done_ranks.max()) + 1 if done_ranks.numel() else 0
    ranks = torch.arange(next_rank, next_rank + len(nodes))
    all_nodes, all_effects = torch.cat([done_nodes, nodes]), torch.cat([done_effects, effects], 1)
    info = {
        "order": "estimated mean |score| over pairs, descending (ties: plan order)",
        "verified": int(len(all_nodes)),
        "of_nodes": verifier.n_nodes,
        "stopped": stopped,
        "threshold": threshold,
        "confirmed": confirmed_counts(all_nodes, all_effects, order, threshold),
        "forward_equivalents_per_pair": verifier.forward_equivalents(),
        "created": now_utc(),
    }
    return verifier.store(result, nodes, effects, ranks, info)


def _checked_verify_options(budget: int | None, until_stable: bool, top: int, patience: int | None, nodes_per_pass: int) -> int:
    """Refuse inconsistent ``verify`` options (``PlanError`` naming the option); returns the patience to use."""
    if (budget is None) == (not until_stable):
        raise PlanError("verify: give either budget (a number of nodes) or until_stable, not both")
    if budget is not None and budget < 1:
        raise PlanError(f"verify budget: must be at least 1 (got {budget})")
    if top < 1:
        raise PlanError(f"verify top: must be at least 1 (got {top})")
    patience = max(top, nodes_per_pass) if patience is None else patience
    if patience < 1:
        raise PlanError(f"verify patience: must be at least 1 (got {patience})")
    return patience


class _TopSetWatch:
    """``until_stable``: the top ``top`` verified nodes by mean |effect|, and since when they have not changed."""

    def __init__(self, done_nodes: Tensor, done_effects: Tensor, top: int, patience: int) -> None:
        self.done_nodes, self.done_effects, self.top, self.patience = done_nodes, done_effects, top, patience
        self.top_set: frozenset[int] = frozenset()
        self.stable_since = 0
        """How many of this run's verified nodes came before the top set last changed."""

    def update(self, new_nodes: list[Tensor], new_effects: list[Tensor], at: int, chunk: int) -> str | None:
        """After verifying ``at`` nodes, the last ``chunk`` of them new: why to stop, or None to go on."""
        nodes = torch.cat([self.done_nodes, *new_nodes])
        effects = torch.cat([self.done_effects, *new_effects], 1)
        for j in range(at - chunk, at):  # position (in this run's order) at which each node entered the top set
            strength = effects[:, : len(self.done_nodes) + j + 1].abs().mean(0)
            current = frozenset(nodes[strength.argsort(descending=True)[: self.top]].tolist())
            if current != self.top_set:
                self.top_set, self.stable_since = current, j + 1
        if at - self.stable_since >= self.patience:
            return f"stable: the last {at - self.stable_since} verified nodes left the top {self.top} unchanged"
        return None


def _verify_in_order(
    verifier: _Verifier, todo: Tensor, nodes_per_pass: int, watch: _TopSetWatch | None, progress: Callable[[int], None]
) -> tuple[Tensor, Tensor, str | None]:
    """Exact effects (``pair node``) of ``todo`` in order, ``nodes_per_pass`` at a time, until ``watch`` says stop;
    returns the nodes verified, their effects and why it stopped early (None: it did not)."""
    new_nodes: list[Tensor] = []
    new_effects: list[Tensor] = []
    stopped = None
    at = 0
    while at < len(todo) and stopped is None:
        chunk = todo[at : at + nodes_per_pass]
        new_nodes.append(chunk)
        new_effects.append(verifier.single_effects(chunk))
        at += len(chunk)
        progress(len(chunk))
        if watch is not None:
            stopped = watch.update(new_nodes, new_effects, at, len(chunk))
    nodes = torch.cat(new_nodes) if new_nodes else torch.zeros(0, dtype=torch.long)
    effects = torch.cat(new_effects, 1) if new_effects else torch.zeros(verifier.n_pairs, 0)
    return nodes, effects, stopped


def confirmed_counts(nodes: Tensor, effects: Tensor, order: Tensor, threshold: float) -> dict[str, int]:
    """For n = 10, 20, 50, 100, ... up to the number verified: how many of the top n estimated nodes have a
    verified mean |effect| >= threshold (only when all top n are verified)."""
    strength = dict(zip(nodes.tolist(), effects.abs().mean(0).tolist()))
    out = {}
    for n in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        head = order[:n].tolist()
        if len(head) < n and n > 10 or not all(g in strength for g in head):
            break
        out[f"top_{n}"] = sum(strength[g] >= threshold for g in head)
    return out


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose`` found."""

    verified_top: int
    """How many top estimated nodes were verified before sampling."""
    remainder: int
    """Unverified nodes the bound covers."""
    p: float
    """Probability that a random subset includes a node."""
    bounds: dict[float, list[tuple[int, float]]]
    """Confidence -> (samples so far, upper bound on any unverified node's |effect|) after each budget."""
    worst_node: dict[float, int]
    """Confidence -> the global node index attaining the final bound."""
    verified_effects: Tensor
    """``verified``: mean |effect| of the verified nodes, descending."""
    forward_equivalents_per_pair: float
    """What the diagnosis cost, in forward passes per prompt pair."""

    def warnings(self) -> list[str]:
        """Why a bound says little, per confidence: infinite (too few samples), not shrinking between the
        smallest and the largest sample budget, or above the largest verified effect (so it does not show
        that the unverified nodes matter less than the verified ones). Empty: none of these."""
        out = []
        largest = float(self.verified_effects[0]) if len(self.verified_effects) else None
        for confidence, rows in self.bounds.items():
            (first_n, first), (last_n, last) = rows[0], rows[-1]
            at = f"bound@{confidence:g}"
            if math.isinf(last):
                out.append(f"{at} is infinite at {last_n} samples: too few samples per node; raise --samples")
                continue
            if len(rows) > 1 and last >= first:
                out.append(f"{at} did not shrink with more samples ({first:.5g} at {first_n} -> {last:.5g} at {last_n}): "
                           "more samples will not make it informative; verify more nodes (--verified-top) instead")
            if largest is not None and last >= largest:
                out.append(f"{at} = {last:.5g} is not below the largest verified mean |effect| {largest:.5g}: it does not "
                           "show that the unverified nodes matter less than the verified ones")
        return out

    def as_json(self) -> dict[str, Any]:
        """The diagnosis as JSON-ready data (what ``atpf diagnose --json`` writes)."""
        return {
            "verified_top": self.verified_top, "remainder": self.remainder, "p": self.p, "warnings": self.warnings(),
            "bounds": {str(c): [[n, t] for n, t in b] for c, b in self.bounds.items()},
            "worst_node": {str(c): n for c, n in self.worst_node.items()},
            "largest_verified_effect": float(self.verified_effects[0]) if len(self.verified_effects) else None,
            "forward_equivalents_per_pair": self.forward_equivalents_per_pair,
        }


def diagnose(
    result: ResultLike,
    *,
    verified_top: int,
    samples: Sequence[int],
    confidences: Sequence[float] = (0.9, 0.99),
    p: float = 0.5,
    seed: int = 0,
    nodes_per_pass: int = 64,
    backend: AbstractBackend | None = None,
    model: Any = None,
    saes: Mapping[str, Any] | None = None,
    progress: Progress = True,
) -> tuple[AttributionResult, Diagnosis]:
    """Bound the effect of every node outside the estimated top ``verified_top``.

    The top ``verified_top`` nodes are verified (reusing stored verifications); then random subsets of
    the rest are patched jointly and a Welch upper bound on any unverified node's ``|effect|`` is
    reported at each confidence, after each sample budget ([verification](verification.md#the-diagnostic-bound)).

    Args:
        result: a result or its file.
        verified_top: how many top estimated nodes are (or get) verified.
        samples: increasing sample budgets; the bound is reported after each (sampling continues).
        confidences: confidence levels of the bound, each in (0, 1).
        p: probability that a random subset includes a node.
        seed: seed of the random subsets.
        nodes_per_pass: subsets (or nodes) patched per forward pass.
        backend: an already loaded backend to patch on (default: load the plan's model).
        model: a model object to patch on instead of loading the plan's ``model.source``.
        saes: SAE objects for the plan's ``saes`` entries without a path or release, by name.
        progress: ``True``: progress bars on stderr (verifying the top nodes not yet verified, then the
            random subsets); ``False``: none; a callable: called with the nodes verified, then the subsets
            evaluated, at each step (``atpframework.io.progress``).

    Returns:
        The result (with any newly verified nodes stored) and the diagnosis.
    """
    result = _as_result(result)
    samples = _checked_diagnose_options(samples, p, confidences)
    verifier = _Verifier(result, backend, model, saes, nodes_per_pass)
    if not 0 <= verified_top < verifier.n_nodes:
        raise PlanError(f"diagnose verified_top: must be in 0..{verifier.n_nodes - 1}, fewer than the {verifier.n_nodes} nodes")
    order = ranking_from_scores(verifier.estimates(result))
    head, remainder = order[:verified_top], order[verified_top:]
    done, _, _ = verified_effects(result)
    missing = int((~torch.isin(head, done)).sum())
    if missing:
        result = _verify_with(verifier, result, missing, False, 20, None, None, progress, f"diagnose: verifying the top {verified_top}")
    nodes, _, effects = verified_effects(result)
    in_head = torch.isin(nodes, head)
    head_effects = effects[:, in_head].abs().mean(0).sort(descending=True).values
    cost_before = verifier.forward_equivalents()

    generator = torch.Generator().manual_seed(seed)
    stats = SubsetStats.zeros(len(remainder))
    bounds: dict[float, list[tuple[int, float]]] = {c: [] for c in confidences}
    worst: dict[float, int] = {}

    with Bar(progress, samples[-1], f"diagnose: random subsets (M={samples[-1]})", "subset") as bar:

        def evaluate(local: Tensor) -> Tensor:  # sample remainder -> sample
            masks = torch.zeros(len(local), verifier.n_nodes, dtype=torch.bool)
            masks[:, remainder] = local
            effects = verifier.joint_effects(masks)
            bar.update(len(local))
            return effects

        for budget in samples:
            subsample(evaluate, len(remainder), budget - stats.n_samples, p, generator, nodes_per_pass, stats)
            for bound in welch_bounds(stats, confidences):
                bounds[bound.confidence].append((stats.n_samples, bound.theta))
                worst[bound.confidence] = int(remainder[bound.node])
    diagnosis = Diagnosis(
        verified_top, len(remainder), p, bounds, worst, head_effects,
        verifier.forward_equivalents() - cost_before,
    )
    return result, diagnosis


def _checked_diagnose_options(samples: Sequence[int], p: float, confidences: Sequence[float]) -> list[int]:
    """Refuse bad ``diagnose`` options (``PlanError`` naming the option); returns the budgets, increasing."""
    budgets = sorted(set(samples))
    if not budgets or budgets[0] < 4:
        raise PlanError(f"diagnose samples: each budget must be at least 4 (got {budgets})")
    if not 0 < p < 1:
        raise PlanError(f"diagnose p: must lie strictly between 0 and 1 (got {p})")
    bad = [c for c in confidences if not 0 < c < 1]
    if bad or not confidences:
        raise PlanError(f"diagnose confidence: each must lie strictly between 0 and 1 (got {list(confidences)})")
    return budgets
