"""``atp_ig``: attribution patching with integrated gradients (EAP-IG, Hanna et al. 2024), for nodes and edges.

AtP multiplies each node's change by the gradient at the clean run. Integrated gradients average the
gradient over ``S`` points on a path from the clean run towards the noise run (a left Riemann sum
starting at the clean end, ``alpha_k = k / S`` for ``k = 0 .. S-1``)::

    score(n) = (n(noise) - n(clean)) . (1/S) sum_k dMetric/dn |_(point alpha_k)

Two paths (``interpolate``):

* ``embeddings`` (EAP-IG's scheme): the point ``alpha`` is the clean prompts' forward with the input
  embeddings (``resid[0]``) set to ``clean + alpha (noise - clean)``; every node and edge is scored from
  the same ``S`` forward and backward passes. Completeness: the scores of the embeddings themselves
  (``resid`` nodes at layer 0, every position) sum to ``metric(noise) - metric(clean)`` up to the
  Riemann error, which falls like ``1/S``.
* ``activations``: the point ``alpha`` is the clean forward with one site's activation (every node read
  there, at one layer) set to ``clean + alpha (noise - clean)``; the gradient is taken at that site.
  One set of passes per node site, so ``S - 1`` extra forward and backward passes per site. Edges
  have no activation of their own to interpolate and are refused with this scheme.

With ``steps=1`` the only point is the clean run: both schemes equal ``atp``. The differences
``n(noise) - n(clean)`` always come from the real clean and noise runs.
"""

from dataclasses import replace
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from atpframework.errors import PlanError
from atpframework.methods.atp import FirstOrder, _GradientPass, _Layout, _Scores
from atpframework.methods.base import noise_forward
from atpframework.model.backend import AbstractBackend
from atpframework.model.edges import EdgeNode
from atpframework.model.sites import Site
from atpframework.plans.chunking import take_positions
from atpframework.plans.compiled import BatchRun, CompiledPlan, PassStep
from atpframework.plans.plan import MethodConfig

EMBEDDINGS = Site("resid", 0)


class AtpIgConfig(MethodConfig):
    """AtP with integrated gradients: the gradient averaged over ``steps`` points from the clean run towards the noise run."""

    name: Literal["atp_ig"]
    steps: int = Field(5, ge=1)
    """Points of the Riemann sum (1: plain AtP). Each adds one forward and one backward pass (per node site
    with ``interpolate: "activations"``)."""
    interpolate: Literal["embeddings", "activations"] = "embeddings"
    """The path: the input embeddings between clean and noise (every node at once), or each node site's own activation."""


class AtpIg(FirstOrder[AtpIgConfig]):
    name = "atp_ig"
    config_type = AtpIgConfig
    listing_rank = 4

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        super().validate(compiled, backend)
        if self.options(compiled).interpolate == "activations":
            for i, b in enumerate(compiled.bound):
                if isinstance(b.node, EdgeNode):
                    raise PlanError(
                        f"method.interpolate: 'activations' interpolates each node's own activation, and edges "
                        f"(nodes[{i}], {b.node.kind}) have none; use 'embeddings'"
                    )

    def _steps(self, compiled: CompiledPlan) -> list[PassStep]:
        steps = super()._steps(compiled)
        config = self.options(compiled)
        extra = config.steps - 1
        if not extra:
            return steps
        layout = self.layout(compiled)
        grad_sites = tuple(sorted(layout.contributors))
        if config.interpolate == "embeddings":
            return steps + [
                PassStep("ig_forward", "forward", extra, "clean prompts", (EMBEDDINGS, *grad_sites),
                         "input embeddings set to clean + k/S (noise - clean), k = 1..S-1; graph kept"),
                PassStep("ig_backward", "backward", extra, "clean prompts", grad_sites,
                         "gradients at the interpolated points, averaged into the scores"),
            ]
        n = extra * len(grad_sites)
        return steps + [
            PassStep("ig_forward", "forward", n, "clean prompts", grad_sites,
                     f"per node site ({len(grad_sites)}), its activation set to clean + k/S (noise - clean), k = 1..S-1"),
            PassStep("ig_backward", "partial_backward", n, "clean prompts", grad_sites,
                     "down to the interpolated site only", forward_equivalents=2.0 * n),
        ]

    def _run_chunk(self, run: BatchRun, layout: _Layout, scores: _Scores, positions: Tensor | None, first: bool) -> tuple[Tensor, Tensor]:
        config = self.options(run.compiled)
        on_embeddings = config.interpolate == "embeddings"
        # the interpolated sites move as a whole (every position), whatever the chunk scores
        moved = (EMBEDDINGS,) if on_embeddings else tuple(layout.contributors)
        sites = tuple(sorted({*run.compiled.sites, *moved}))
        noise_acts, metric_noise = noise_forward(run, sites=sites, positions=positions, full=moved)
        noise_whole = {site: noise_acts[site] for site in moved}
        noise_acts = {**noise_acts, **{site: take_positions(noise_whole[site], positions) for site in moved}}
        weight = 1.0 / config.steps
        clean = _GradientPass(run, layout, scores, positions, first, noise_acts, weight=weight)
        try:
            with torch.enable_grad():
                metric_clean = clean.clean_forward()
                whole_delta = {} if on_embeddings else {s: noise_whole[s] - clean.tensors[s].detach() for s in moved}
                clean.plain_backward(metric_clean)
                clean.tensors, clean.leaves = {}, []  # keep only the differences
                for k in range(1, config.steps):
                    alpha = k / config.steps
                    if on_embeddings:
                        patches = {EMBEDDINGS: partial(_toward, noise_whole[EMBEDDINGS], alpha)}
                        self._point(run, layout, scores, positions, first, noise_acts, weight, clean, patches)
                        continue
                    for site, entries in layout.contributors.items():
                        single = replace(layout, contributors={site: entries}, floor=(site,))
                        patches = {site: partial(_shifted, whole_delta[site], alpha)}
                        self._point(run, single, scores, positions, first, noise_acts, weight, clean, patches)
        finally:
            clean.release()
        return metric_clean.detach(), metric_noise

    @staticmethod
    def _point(
        run: BatchRun, layout: _Layout, scores: _Scores, positions: Tensor | None, first: bool, noise_acts: dict[Site, Tensor],
        weight: float, clean: _GradientPass, patches: dict[Site, partial[Tensor]],
    ) -> None:
        """One interpolated point: a forward with ``patches`` and a backward scored against the clean differences."""
        point = _GradientPass(run, layout, scores, positions, first, noise_acts, weight=weight, reuse=clean, patches=patches)
        try:
            point.plain_backward(point.clean_forward())
        finally:
            point.release()


def _toward(noise: Tensor, alpha: float, act: Tensor) -> Tensor:
    """``act + alpha (noise - act)``: the clean activation moved a fraction ``alpha`` towards ``noise``."""
    return act + alpha * (noise.to(act.device, act.dtype) - act)


def _shifted(delta: Tensor, alpha: float, act: Tensor) -> Tensor:
    """``act + alpha delta``."""
    return act + (alpha * delta).to(act.device, act.dtype)
