"""The paper's exact-patching baselines, each producing node scores from a forward-pass budget.

All three patch *groups* of nodes jointly with ``ExactPatcher`` (nodes in global order: plan
selections in order, each flattened row-major over ``layer *axes``) and score nodes from the group
effects:

* ``subsampling``: ``samples`` random subsets, each node included with probability ``p``; a node's
  score is the difference of the mean effect of the subsets that include it and of those that
  exclude it (unbiased when effects add up). Standard errors (Welch) and counts go to the result's
  extras (``<name>.stderr``, ``<name>.count_in``, ``<name>.count_out``).
* ``blocks``: contiguous blocks of ``block_size`` nodes; each node scores its block's effect.
* ``hierarchical``: coarse to fine. The nodes are split into ``branching`` contiguous groups; the
  group with the largest mean ``|effect|`` over the batch's pairs is split again, and so on, until
  ``budget`` groups were patched or every remaining group is a single node. Each node scores the
  effect of the smallest group containing it that was patched.

Costs (``AbstractMethod.cost``, per pair): the noise and clean forwards plus one forward per subset,
block or group.
"""

import heapq
from typing import Literal, TypeVar

import torch
from pydantic import Field

from atpframework.maths.diagnostic import SubsetStats, subsampling_estimates, subset_masks
from atpframework.methods.base import AbstractMethod
from atpframework.methods.patching import ExactPatcher
from atpframework.plans.compiled import BatchRun, BatchScores, CompiledPlan, PassStep
from atpframework.plans.plan import MethodConfig


def _steps(compiled: CompiledPlan, n_sets: int, per_pass: int, rows: str, action: str, minimum: bool = False) -> list[PassStep]:
    return [
        PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "capture activations (no grad)"),
        PassStep("clean_forward", "forward", 1, "clean prompts", (), "baseline metric, residual stream cached (no grad)"),
        PassStep(
            "patched_forward", "forward", -(-n_sets // per_pass), f"clean prompts x up to {per_pass} {rows}", compiled.sites,
            action, count_is_minimum=minimum, forward_equivalents=float(n_sets),
        ),
    ]


class JointPatchingConfig(MethodConfig):
    """Options every baseline shares."""

    sets_per_pass: int = Field(16, ge=1)
    """How many node sets (subsets, blocks or groups) share one forward pass."""


class SubsamplingConfig(JointPatchingConfig):
    """Baseline: random subsets patched jointly; a node scores the difference of the mean effects of the
    subsets that include and exclude it."""

    name: Literal["subsampling"]
    samples: int = Field(256, ge=4)
    """Subsets per prompt pair (= forward passes per pair)."""
    p: float = Field(0.5, gt=0.0, lt=1.0)
    """Probability that a subset includes a node."""
    seed: int = 0


class BlocksConfig(JointPatchingConfig):
    """Baseline: contiguous blocks of nodes patched jointly; a node scores its block's effect."""

    name: Literal["blocks"]
    block_size: int = Field(16, ge=1)


class HierarchicalConfig(JointPatchingConfig):
    """Baseline: coarse-to-fine; the group with the largest effect is split until ``budget`` groups were patched."""

    name: Literal["hierarchical"]
    budget: int = Field(256, ge=1)
    """Groups patched per prompt pair (= forward passes per pair)."""
    branching: int = Field(4, ge=2)


def _n_nodes(compiled: CompiledPlan) -> int:
    return sum(b.n_nodes for b in compiled.bound)


ConfigT = TypeVar("ConfigT", bound=JointPatchingConfig)


class JointPatching(AbstractMethod[ConfigT]):
    """What the baselines share: node sets patched jointly by ``ExactPatcher``, ``sets_per_pass`` per forward."""

    exact = False

    def rows_per_pass(self, compiled: CompiledPlan) -> int:
        return self.options(compiled).sets_per_pass


class Subsampling(JointPatching[SubsamplingConfig]):
    """Random subsets patched jointly; difference of conditional means per node."""

    name = "subsampling"
    config_type = SubsamplingConfig
    listing_rank = 20
    nan_means_undefined = True  # a node that no subset (or every subset) held has no estimate

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        spec = self.options(compiled)
        return _steps(
            compiled, spec.samples, spec.sets_per_pass, "random subsets",
            f"each row block patches a Bernoulli(p={spec.p}) subset of the {_n_nodes(compiled)} nodes jointly",
        )

    def run_batch(self, run: BatchRun) -> BatchScores:
        spec = self.options(run.compiled)
        patcher = ExactPatcher(run, spec.sets_per_pass)
        generator = torch.Generator().manual_seed(spec.seed + run.batch.pair_indices[0])
        stats = [SubsetStats.zeros(patcher.n_nodes) for _ in range(patcher.n_batch)]
        for masks in subset_masks(patcher.n_nodes, spec.samples, spec.p, generator, spec.sets_per_pass):
            effects = patcher.effects([patcher.node_set(m.nonzero().flatten()) for m in masks])  # set batch
            for pair, pair_stats in enumerate(stats):
                pair_stats.update(masks, effects[:, pair])
        estimates = [subsampling_estimates(s) for s in stats]
        scores = patcher.split(torch.stack([e[0] for e in estimates]).float())
        extras: dict[str, torch.Tensor] = {}
        for statistic, values in (
            ("stderr", torch.stack([e[1] for e in estimates])),
            ("count_in", torch.stack([s.count_in for s in stats])),
            ("count_out", torch.stack([s.count_out for s in stats])),
        ):
            extras.update({f"{name}.{statistic}": v.float() for name, v in patcher.split(values).items()})
        return BatchScores(scores, patcher.metric_clean, patcher.metric_noise, extras=extras)


class Blocks(JointPatching[BlocksConfig]):
    """Contiguous blocks of nodes patched jointly; each node scores its block's effect."""

    name = "blocks"
    config_type = BlocksConfig
    listing_rank = 21

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        spec = self.options(compiled)
        n_blocks = -(-_n_nodes(compiled) // spec.block_size)
        return _steps(
            compiled, n_blocks, spec.sets_per_pass, "blocks",
            f"each row block patches {spec.block_size} consecutive nodes jointly",
        )

    def run_batch(self, run: BatchRun) -> BatchScores:
        spec = self.options(run.compiled)
        patcher = ExactPatcher(run, spec.sets_per_pass)
        starts = range(0, patcher.n_nodes, spec.block_size)
        groups = [torch.arange(lo, min(lo + spec.block_size, patcher.n_nodes)) for lo in starts]
        effects = patcher.effects([patcher.node_set(g) for g in groups])  # block batch
        per_node = torch.repeat_interleave(effects, torch.tensor([len(g) for g in groups]), dim=0)  # node batch
        return BatchScores(patcher.split(per_node.T), patcher.metric_clean, patcher.metric_noise)


class Hierarchical(JointPatching[HierarchicalConfig]):
    """Coarse-to-fine search: split the group with the largest effect until the budget is spent."""

    name = "hierarchical"
    config_type = HierarchicalConfig
    listing_rank = 22

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        spec = self.options(compiled)
        n_groups = min(spec.budget, _full_tree_size(0, _n_nodes(compiled), spec.branching))
        return _steps(
            compiled, n_groups, spec.sets_per_pass, "groups",
            f"groups patched jointly, the largest |effect| split {spec.branching} ways, up to {spec.budget} groups",
            minimum=True,  # a round's groups do not always fill whole passes
        )

    def run_batch(self, run: BatchRun) -> BatchScores:
        spec = self.options(run.compiled)
        patcher = ExactPatcher(run, spec.sets_per_pass)
        budget, branching = spec.budget, spec.branching
        scores = torch.zeros(patcher.n_nodes, patcher.n_batch)
        frontier: list[tuple[float, int, int, int]] = []  # (-mean |effect|, tie-break, lo, hi)
        spent, counter = 0, 0

        def evaluate(groups: list[tuple[int, int]]) -> None:
            nonlocal spent, counter
            effects = patcher.effects([patcher.node_set(torch.arange(lo, hi)) for lo, hi in groups])
            spent += len(groups)
            for (lo, hi), effect in zip(groups, effects):
                scores[lo:hi] = effect  # finer groups overwrite coarser ones
                if hi - lo > 1:
                    counter += 1
                    heapq.heappush(frontier, (-float(effect.abs().mean()), counter, lo, hi))

        evaluate(_split(0, patcher.n_nodes, branching)[:budget])
        while frontier and spent < budget:
            # split as many of the largest groups as fill one pass, within the budget
            batch: list[tuple[int, int]] = []
            while frontier and len(batch) < max(spec.sets_per_pass, branching):
                _, _, lo, hi = heapq.heappop(frontier)
                batch.extend(_split(lo, hi, branching))
            evaluate(batch[: budget - spent])
        return BatchScores(patcher.split(scores.T), patcher.metric_clean, patcher.metric_noise)


def _split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into at most ``parts`` contiguous, non-empty, near-equal ranges."""
    bounds = torch.linspace(lo, hi, min(parts, hi - lo) + 1).round().long().tolist()
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _full_tree_size(lo: int, hi: int, parts: int) -> int:
    """Groups patched when every group is split down to single nodes."""
    children = _split(lo, hi, parts)
    return len(children) + sum(_full_tree_size(a, b, parts) for a, b in children if b - a > 1)

