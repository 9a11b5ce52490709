"""Attribution methods: how a batch of prompt pairs becomes per-pair node effects.

Sign convention (every method): the effect of node ``n`` is
``metric(clean run with n <- n(noise)) - metric(clean run)`` ("noising"), estimated or exact.

``activation_patching`` is the exact ground truth; ``atp`` is its first-order estimate
``(n(noise) - n(clean)) . dMetric/dn`` with the gradient on the clean run, from exactly one noise
forward, one clean forward and one backward per batch, capturing only the plan's sites.
"""

from abc import ABC, abstractmethod
from collections import defaultdict
from typing import ClassVar

import torch
from torch import Tensor

from .backend import SiteHook
from .engine import BatchRun, BatchScores, CompiledPlan, PassStep
from .errors import BackendError, PlanError
from .node import BoundNodes
from .sites import Site


class AbstractMethod(ABC):
    """One attribution method (see module docstring)."""

    name: ClassVar[str]
    exact: ClassVar[bool]

    @abstractmethod
    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        """The passes one batch runs."""

    @abstractmethod
    def run_batch(self, run: BatchRun) -> BatchScores:
        """Per-pair effects for one batch."""


def backward(metric_values: Tensor) -> None:
    """Backpropagate per-pair metrics: the sum, so each pair's gradient is its own (one backward pass)."""
    torch.autograd.backward(metric_values.sum())


def _capture(store: dict[Site, Tensor], site: Site) -> SiteHook:
    def hook(act: Tensor) -> None:
        store[site] = act.detach()

    return hook


def _noise_forward(run: BatchRun) -> tuple[dict[Site, Tensor], Tensor]:
    acts: dict[Site, Tensor] = {}
    with torch.no_grad():
        logits = run.backend.forward(run.noise_tokens, {s: [_capture(acts, s)] for s in run.compiled.sites})
        value = run.metric(logits, run.metric_inputs(run.noise_tokens))
    return acts, value


def _consumers(bound: tuple[BoundNodes, ...]) -> dict[Site, list[BoundNodes]]:
    out: dict[Site, list[BoundNodes]] = defaultdict(list)
    for b in bound:
        for layer in sorted({layer for entry in b.layers.entries for layer in entry}):
            out[Site(b.node.site, layer)].append(b)
    return out


class Atp(AbstractMethod):
    """Attribution patching (first-order), accumulated as gradients arrive: no gradient is cached."""

    name = "atp"
    exact = False

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        sites = compiled.sites
        return [
            PassStep("noise_forward", "forward", 1, "noise prompts", sites, "capture activations (no grad)"),
            PassStep("clean_forward", "forward", 1, "clean prompts", sites, "capture activations, keep graph"),
            PassStep("clean_backward", "backward", 1, "clean prompts", sites, "d(sum of per-pair metric)/d(site), scored on arrival"),
        ]

    def run_batch(self, run: BatchRun) -> BatchScores:
        noise_acts, metric_noise = _noise_forward(run)
        n_batch = run.clean_tokens.shape[0]
        bound = run.batch.bound
        scores = {b.name: torch.zeros((n_batch,) + b.shape, dtype=torch.float32, device=run.backend.device) for b in bound}
        consumers = _consumers(bound)
        arrived: set[Site] = set()

        def grad_hook(site: Site) -> SiteHook:
            def hook(act: Tensor) -> Tensor | None:
                replacement = None
                if not act.requires_grad:  # frozen weights upstream: make this site a leaf of the graph
                    act = replacement = act.detach().requires_grad_(True)
                delta = noise_acts[site] - act.detach()

                def on_grad(grad: Tensor) -> None:
                    arrived.add(site)
                    for b in consumers[site]:
                        effect = b.reduce(b.node.elementwise_effect(delta, grad)).float()
                        for entry in b.layer_entries(site.layer):
                            scores[b.name][:, entry] += effect

                act.register_hook(on_grad)
                return replacement

            return hook

        with torch.enable_grad():
            logits = run.backend.forward(run.clean_tokens, {s: [grad_hook(s)] for s in run.compiled.sites})
            metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
            if not metric_clean.requires_grad:
                raise BackendError("the metric does not depend on any hooked activation (no gradient path)")
            backward(metric_clean)
        missing = set(run.compiled.sites) - arrived
        if missing:
            raise BackendError(
                "no gradient arrived at site(s) " + ", ".join(str(s) for s in sorted(missing))
                + " (a later hook may have replaced the activation, or the metric does not depend on it)"
            )
        return BatchScores(scores, metric_clean.detach(), metric_noise)


class ActivationPatching(AbstractMethod):
    """Exact activation patching: each node's noise value patched into the clean run, one node per batch rows."""

    name = "activation_patching"
    exact = True

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        per_pass = compiled.plan.method.nodes_per_pass  # type: ignore[union-attr]
        n_nodes = sum(b.n_nodes for b in compiled.bound)
        n_passes = -(-n_nodes // per_pass)
        return [
            PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "capture activations (no grad)"),
            PassStep("clean_forward", "forward", 1, "clean prompts", (), "baseline metric (no grad)"),
            PassStep(
                "patched_forward", "forward", n_passes,
                f"clean prompts x up to {per_pass} nodes ({n_nodes} nodes in all)", compiled.sites,
                "each row block patches one node's noise value (no grad)",
            ),
        ]

    def run_batch(self, run: BatchRun) -> BatchScores:
        noise_acts, metric_noise = _noise_forward(run)
        with torch.no_grad():
            logits = run.backend.forward(run.clean_tokens, {})
            metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
        n_batch = run.clean_tokens.shape[0]
        bound = run.batch.bound
        device = run.backend.device
        scores = {b.name: torch.zeros((n_batch, b.n_nodes), dtype=torch.float32, device=device) for b in bound}
        nodes = [(b, i) for b in bound for i in range(b.n_nodes)]
        per_pass = run.compiled.plan.method.nodes_per_pass  # type: ignore[union-attr]
        for start in range(0, len(nodes), per_pass):
            chunk = nodes[start : start + per_pass]
            patches: dict[Site, list[tuple[int, Tensor]]] = defaultdict(list)
            for row_block, (b, i) in enumerate(chunk):
                layers, mask = b.patch_mask(i, device)
                for layer in layers:
                    patches[Site(b.node.site, layer)].append((row_block, mask))
            hooks = {site: [self._patch_hook(noise_acts[site], entries, len(chunk))] for site, entries in patches.items()}
            tokens = run.clean_tokens.repeat(len(chunk), 1)
            with torch.no_grad():
                logits = run.backend.forward(tokens, hooks)
                values = run.metric(logits, run.metric_inputs(tokens, repeat=len(chunk))).view(len(chunk), n_batch)
            for row_block, (b, i) in enumerate(chunk):
                scores[b.name][:, i] = (values[row_block] - metric_clean).float()
        shaped = {b.name: scores[b.name].view((n_batch,) + b.shape) for b in bound}
        return BatchScores(shaped, metric_clean, metric_noise)

    @staticmethod
    def _patch_hook(noise: Tensor, entries: list[tuple[int, Tensor]], n_blocks: int) -> SiteHook:
        def hook(act: Tensor) -> Tensor:
            out = act.clone()
            blocks = out.view((n_blocks, noise.shape[0]) + tuple(act.shape[1:]))
            for row_block, mask in entries:
                m = mask.reshape(mask.shape + (1,) * (noise.dim() - 1 - mask.dim()))
                blocks[row_block] = torch.where(m, noise, blocks[row_block])
            return out

        return hook


METHODS: dict[str, AbstractMethod] = {m.name: m for m in (Atp(), ActivationPatching())}
"""Every method this version runs, by plan ``method.name``."""


def get_method(name: str) -> AbstractMethod:
    if name not in METHODS:
        raise PlanError(f"method.name: unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]
