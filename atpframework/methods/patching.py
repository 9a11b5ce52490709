"""Exact activation patching: the fast engine behind ``activation_patching``, the subset baselines,
verification and the diagnostic.

A *patch set* is a group of nodes patched jointly (each to its noise-run value) in the clean run;
its *effect* is the metric change, per prompt pair. ``ExactPatcher`` evaluates many sets per forward
pass: the clean prompts are repeated, one block of batch rows per set, and one boolean mask per
site says which rows and entries take the noise value. A pass starts from the clean run's cached
residual stream at the lowest layer any of its sets touches (``AbstractBackend.forward_from``), so
the blocks below it are not recomputed; sets are sorted by that layer so that passes skip as much as
possible. No gradient is taken.
"""

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from atpframework.io.results import NodeNumbering
from atpframework.methods.base import AbstractMethod, noise_forward
from atpframework.model.edges import EdgeNode, edge_patch_delta, edge_writer_sites, stack_writers, upstream_count, writers_held
from atpframework.model.interventions import Intervention, Patch
from atpframework.model.node import BoundNodes
from atpframework.model.sites import Site
from atpframework.plans.compiled import BatchRun, BatchScores, CompiledPlan, PassStep
from atpframework.plans.plan import MethodConfig

NodeSet = dict[int, Tensor]
"""Nodes patched jointly: selection index (into ``BatchRun.batch.bound``) -> flat node indices (``LongTensor``)."""


@dataclass(frozen=True)
class PatchCounts:
    """What ``ExactPatcher`` ran, for cost accounting."""

    passes: int = 0
    rows: int = 0
    """Patched rows (sets x pairs)."""
    blocks_run: int = 0
    """Transformer blocks computed over all patched rows (a full forward of one row is ``n_layers``)."""


class ExactPatcher:
    """The clean and noise runs of one batch, and patched forward passes over them.

    Args:
        run: the batch.
        sets_per_pass: how many sets share one forward pass (each gets the batch's rows).
        skip_layers: start each pass from the cached clean residual stream (False: from the embeddings).
    """

    def __init__(self, run: BatchRun, sets_per_pass: int, skip_layers: bool = True) -> None:
        self.run, self.sets_per_pass, self.skip_layers = run, sets_per_pass, skip_layers
        self.bound = run.batch.bound
        self.n_batch = run.clean_tokens.shape[0]
        self.n_layers = run.backend.info.n_layers
        self.noise_acts, self.metric_noise = noise_forward(run)
        clean = Intervention()
        info = run.backend.info
        writers = edge_writer_sites(self.bound, info)
        self.clean_resid = clean.capture([Site("resid", layer) for layer in range(self.n_layers + 1)] if skip_layers else [])
        clean.capture(writers)
        with torch.no_grad():
            logits = clean.run(run.backend, run.clean_tokens)
            self.metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
        count = writers_held(info, writers)
        self.writer_delta = (
            stack_writers(info, self.noise_acts, count) - stack_writers(info, clean.captured, count) if writers else None
        )
        """Edges: ``batch pos writer d_model``, each writer's noise - clean output (an edge patch adds it to its reader's input)."""
        # the lowest model layer each node touches: where a pass patching it can start
        self._start = [self._node_start_layers(b) for b in self.bound]
        self.counts = PatchCounts()
        self.numbering = NodeNumbering(tuple(b.name for b in self.bound), tuple(b.shape for b in self.bound))
        """The global node index over the batch's selections (the result file's order)."""

    @property
    def n_nodes(self) -> int:
        """Nodes over all selections."""
        return self.numbering.n_nodes

    def node_set(self, nodes: Tensor) -> NodeSet:
        """The ``NodeSet`` of global node indices ``nodes``."""
        return self.numbering.by_selection(nodes)

    def split(self, values: Tensor) -> dict[str, Tensor]:
        """``... node`` over global node indices -> per selection name ``... layer *axes``."""
        return self.numbering.split(values)

    def _node_start_layers(self, b: BoundNodes) -> Tensor:
        entry_start = torch.tensor([min(b.site(layer).layer for layer in entry) for entry in b.layers.entries])
        return entry_start[b.coverage.layer_entry]

    def start_layer(self, node_set: NodeSet) -> int:
        if not self.skip_layers:
            return 0
        starts = [int(self._start[i][flat].min()) for i, flat in node_set.items() if flat.numel()]
        return min(starts, default=self.n_layers)

    def effects(self, sets: Sequence[NodeSet]) -> Tensor:
        """``set batch``: metric(clean with the set patched) - metric(clean), per pair."""
        out = torch.zeros(len(sets), self.n_batch, dtype=torch.float32)
        if not sets:
            return out
        starts = [self.start_layer(s) for s in sets]
        order = sorted(range(len(sets)), key=lambda i: starts[i])
        for lo in range(0, len(order), self.sets_per_pass):
            chunk = order[lo : lo + self.sets_per_pass]
            start = min(starts[i] for i in chunk)
            values = self._patched_metric([sets[i] for i in chunk], start)
            out[chunk] = (values - self.metric_clean.to(values.device)[None]).float().cpu()
        return out

    def single_node_effects(self, nodes: Tensor | None = None) -> Tensor:
        """``node batch``: each of ``nodes`` (global indices; default all) patched alone (exact activation patching)."""
        nodes = torch.arange(self.n_nodes) if nodes is None else nodes
        return self.effects([self.node_set(g.view(1)) for g in nodes])

    # ------------------------------------------------------------------ one pass
    def _patched_metric(self, sets: list[NodeSet], start: int) -> Tensor:
        n_blocks = len(sets)
        patched = Intervention()
        for (site, _, edge), mask in self._site_masks(sets).items():
            if edge:
                assert self.writer_delta is not None, "kept for plans with edges"
                added = edge_patch_delta(mask.to(self.writer_delta.device), self.writer_delta[:, :, : upstream_count(self.run.backend.info, site)])
                patched.patch(site, _row_block_add(added))
            else:
                patched.patch(site, _row_block_patch(self.noise_acts[site], mask))
        tokens = self.run.clean_tokens.repeat(n_blocks, 1)
        backend = self.run.backend
        with torch.no_grad():
            if start == 0:
                logits = patched.run(backend, tokens)
            else:
                clean = self.clean_resid[Site("resid", start)]
                logits = patched.run_from(backend, start, clean.repeat(n_blocks, *([1] * (clean.dim() - 1))), tokens)
            values = self.run.metric(logits, self.run.metric_inputs(tokens, repeat=n_blocks))
        self.counts = PatchCounts(
            self.counts.passes + 1,
            self.counts.rows + n_blocks * self.n_batch,
            self.counts.blocks_run + n_blocks * self.n_batch * (self.n_layers - start),
        )
        return values.view(n_blocks, self.n_batch)

    def _site_masks(self, sets: list[NodeSet]) -> dict[tuple[Site, tuple[int, ...], bool], Tensor]:
        """Per site, index grid (node types reading one site may index it differently) and whether the entries
        are edges (patched by adding writer deltas), ``set *grid`` booleans: which entries each row block patches."""
        masks: dict[tuple[Site, tuple[int, ...], bool], Tensor] = {}
        rows_by_selection: dict[int, list[Tensor]] = defaultdict(list)
        flats_by_selection: dict[int, list[Tensor]] = defaultdict(list)
        for row, node_set in enumerate(sets):
            for i, flat in node_set.items():
                rows_by_selection[i].append(torch.full_like(flat, row))
                flats_by_selection[i].append(flat)
        for i, rows_list in rows_by_selection.items():
            b = self.bound[i]
            cov = b.coverage
            rows, flats = torch.cat(rows_list), torch.cat(flats_by_selection[i])
            entries = cov.layer_entry[flats]
            points = cov.points[flats]
            for entry in entries.unique().tolist():
                pick = entries == entry
                r = rows[pick][:, None].expand(-1, points.shape[1])
                p = points[pick]
                for layer in b.layers.entries[entry]:
                    key = (b.site(layer), cov.grid, isinstance(b.node, EdgeNode))
                    if key not in masks:
                        masks[key] = torch.zeros((len(sets), *cov.grid), dtype=torch.bool)
                    masks[key].view(len(sets), -1)[r, p] = True
        return masks


def _row_block_patch(noise: Tensor, mask: Tensor) -> Patch:
    """Rows of block ``r`` take ``noise`` where ``mask[r]`` is set (``mask``: ``set *grid``)."""
    n_sets, n_batch = mask.shape[0], noise.shape[0]
    n_features = noise.dim() - 1 - (mask.dim() - 1)
    full = mask.reshape(n_sets, 1, *mask.shape[1:], *([1] * n_features)).to(noise.device)

    def replace(act: Tensor) -> Tensor:
        blocks = act.view(n_sets, n_batch, *act.shape[1:])
        return torch.where(full.to(act.device), noise.to(act.device)[None], blocks).view(act.shape)

    return replace


def _row_block_add(added: Tensor) -> Patch:
    """Rows of block ``r`` get ``added[r]`` added (``added``: ``set batch ...``, the activation's shape per block)."""

    def replace(act: Tensor) -> Tensor:
        blocks = act.view(added.shape[0], added.shape[1], *act.shape[1:])
        return (blocks + added.to(act.device, act.dtype)).view(act.shape)

    return replace


class ActivationPatchingConfig(MethodConfig):
    """Exact activation patching: one patched forward per node (``nodes_per_pass`` nodes batched per pass)."""

    name: Literal["activation_patching"]
    nodes_per_pass: int = Field(16, ge=1)
    """How many nodes share one forward pass (each as its own batch rows)."""
    skip_layers: bool = True
    """Start each pass from the clean run's cached residual stream at the lowest layer it patches
    (False: recompute every block from the embeddings; same results, slower)."""


class ActivationPatching(AbstractMethod[ActivationPatchingConfig]):
    """Exact activation patching: each node's noise value patched into the clean run, one node per row block."""

    name = "activation_patching"
    config_type = ActivationPatchingConfig
    exact = True
    listing_rank = 10

    def rows_per_pass(self, compiled: CompiledPlan) -> int:
        return self.options(compiled).nodes_per_pass

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        spec = self.options(compiled)
        per_pass = spec.nodes_per_pass
        n_nodes = sum(b.n_nodes for b in compiled.bound)
        n_passes = -(-n_nodes // per_pass)
        start = "cached clean residual stream at the lowest layer patched" if spec.skip_layers else "embeddings"
        return [
            PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "capture activations (no grad)"),
            PassStep("clean_forward", "forward", 1, "clean prompts", (), "baseline metric, residual stream cached (no grad)"),
            PassStep(
                "patched_forward", "forward", n_passes,
                f"clean prompts x up to {per_pass} nodes ({n_nodes} nodes in all)", compiled.sites,
                f"each row block patches one node's noise value; starts from the {start} (no grad)",
                forward_equivalents=float(n_nodes),
            ),
        ]

    def run_batch(self, run: BatchRun) -> BatchScores:
        spec = self.options(run.compiled)
        patcher = ExactPatcher(run, spec.nodes_per_pass, spec.skip_layers)
        scores = patcher.split(patcher.single_node_effects().T)
        return BatchScores(scores, patcher.metric_clean, patcher.metric_noise)
