"""An example third-party method: ``zero_ablation``, each node's effect when it is set to zero.

``effect = metric(clean run with the node <- 0) - metric(clean run)``, exact, one patched row per
node. It reuses atpframework's ``ExactPatcher`` (which patches in noise-run values) by giving it
zeros as the values to patch in; the noise prompts are only run to report their metric.
"""

from typing import Literal

import torch
from pydantic import Field

from atpframework import AbstractMethod, BatchRun, BatchScores, CompiledPlan, MethodConfig, PassStep
from atpframework.methods.patching import ExactPatcher


class ZeroAblationConfig(MethodConfig):
    """Zero ablation: each node set to zero in the clean run, one patched row per node."""

    name: Literal["zero_ablation"]
    nodes_per_pass: int = Field(16, ge=1)
    """How many nodes share one forward pass."""


class ZeroAblation(AbstractMethod[ZeroAblationConfig]):
    name = "zero_ablation"
    config_type = ZeroAblationConfig
    exact = False  # exact, but for another intervention than activation patching
    sign_convention = "effect = metric(clean run with node <- 0) - metric(clean run)"

    def rows_per_pass(self, compiled: CompiledPlan) -> int:
        return self.options(compiled).nodes_per_pass

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        per_pass = self.options(compiled).nodes_per_pass
        n_nodes = sum(b.n_nodes for b in compiled.bound)
        return [
            PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "its metric only (no grad)"),
            PassStep("clean_forward", "forward", 1, "clean prompts", (), "baseline metric (no grad)"),
            PassStep("zeroed_forward", "forward", -(-n_nodes // per_pass), f"clean prompts x up to {per_pass} nodes",
                     compiled.sites, "each row block sets one node to zero", forward_equivalents=float(n_nodes)),
        ]

    def run_batch(self, run: BatchRun) -> BatchScores:
        patcher = ExactPatcher(run, self.options(run.compiled).nodes_per_pass)
        patcher.noise_acts = {site: torch.zeros_like(act) for site, act in patcher.noise_acts.items()}
        scores = patcher.split(patcher.single_node_effects().T)
        return BatchScores(scores, patcher.metric_clean, patcher.metric_noise)
