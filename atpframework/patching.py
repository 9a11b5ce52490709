"""Exact activation patching: the ground truth every estimate is measured against.

Each node's noise value is patched into the clean run; ``nodes_per_pass`` nodes share one forward
pass, each as its own block of batch rows. No gradient is taken.
"""

from collections import defaultdict

import torch
from torch import Tensor

from .backend import SiteHook
from .engine import BatchRun, BatchScores, CompiledPlan, PassStep
from .methods import AbstractMethod, noise_forward
from .sites import Site


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
        noise_acts, metric_noise = noise_forward(run)
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
                    patches[b.site(layer)].append((row_block, mask))
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
                m = mask.reshape(mask.shape + (1,) * (noise.dim() - 1 - mask.dim())).to(act.device)
                blocks[row_block] = torch.where(m, noise, blocks[row_block])
            return out

        return hook
