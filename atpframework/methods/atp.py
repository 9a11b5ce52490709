"""The first-order family: ``atp``, ``atp_qkfix``, ``atp_graddrop`` and ``atp_star``.

Every member runs one noise forward (no grad), one clean forward that keeps the graph, and one
backward pass of the sum of per-pair metrics, restricted to the part of the graph between the metric
and the lowest node layer (no weight gradients). Gradients are scored as they arrive at the hooked
sites and never cached.

* ``atp``: ``(n(noise) - n(clean)) . dMetric/dn`` for every node.
* QK fix (``atp_qkfix``, ``atp_star``): query and key nodes are scored by ``attention.py``'s exact
  softmax recomputation when the gradient at their layer's ``attn_z`` arrives; other nodes as ``atp``.
* GradDrop (``atp_graddrop``, ``atp_star``): after the plain backward, one backward pass restarted
  per dropped write that reaches a node (``graddrop.py``), from the write's input down to the lowest
  node layer only. Per pair, ``score = 1/(T-1) * sum_terms |estimate_term|`` with ``T`` terms; the
  terms a write leaves unchanged reuse the plain estimate, and ``atp_star`` reuses each layer's
  recomputed attention change for every term.
"""

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Literal, TypeVar

import torch
from einops import rearrange
from torch import Tensor

from atpframework.errors import BackendError, PlanError
from atpframework.io.progress import note_pass
from atpframework.io.results import GRADDROP_CONVENTION
from atpframework.maths.attention import (
    ROW_BLOCK,
    KeyPatch,
    clean_attention,
    joint_key_delta_z,
    joint_key_effects,
    key_effects,
    key_patch,
    query_delta_z,
)
from atpframework.maths.graddrop import DropTerm, drop_terms
from atpframework.methods.base import AbstractMethod, noise_forward
from atpframework.model.backend import AbstractBackend
from atpframework.model.edges import EdgeNode, edge_effects, edge_writer_sites, stack_writers, writer_count, writers_held
from atpframework.model.interventions import Intervention, Patch
from atpframework.model.node import BoundNodes
from atpframework.model.sites import Site
from atpframework.plans.chunking import ELEMENT_BYTES, graph_elements, node_positions, position_chunks, site_width, take_positions
from atpframework.plans.compiled import Batch, BatchRun, BatchScores, CompiledPlan, PassStep
from atpframework.plans.plan import MethodConfig

QK_SITES = ("attn_q", "attn_k")
WRITER_BLOCK = 32
"""Edges under the QK fix: writers whose recomputed queries (keys) share one batched attention recomputation."""
Mode = Literal["grad", "query", "key", "joint", "edge", "edge_query", "edge_key", "edge_joint"]
"""How a node selection is scored when the gradient at its site arrives: ``grad`` (delta . gradient), the
QK fix for queries, keys one at a time, and keys patched jointly (``positions: "all"``), ``edge`` (each
upstream writer's delta . the reader input's gradient, ``edges.edge_effects``), or the QK fix for edges
into queries, keys, and keys at every position at once (each writer's delta added to the reader's clean
input, its query or key recomputed, the softmax exact: ``_AttentionCache.edge_effect``)."""
EDGE_QK_MODES: dict[str, Mode] = {"q": "edge_query", "k": "edge_key"}


@dataclass(frozen=True)
class _Layout:
    """What one plan needs hooked and restarted, fixed at compile time."""

    contributors: dict[Site, list[tuple[BoundNodes, Mode]]]
    """Gradient site -> the node selections scored when its gradient arrives, and how."""
    qk_layers: tuple[int, ...]
    joint_layers: tuple[int, ...]
    """Layers with keys patched jointly: their noise keys are kept at every position."""
    value_sites: tuple[Site, ...]
    """Clean activations the QK fix reads (q, k, v at its layers)."""
    floor: tuple[Site, ...]
    """Gradient sites at the lowest layer: the backward passes stop there."""
    terms: tuple[DropTerm, ...]
    active: tuple[int, ...]
    """Indices of the terms whose restarted backward reaches a gradient site, top term first."""
    above_count: dict[Site, int] = field(default_factory=dict)
    """Gradient site -> number of terms that leave its gradient unchanged."""
    writers: tuple[Site, ...] = ()
    """Sites of the writers the edge selections read (their noise - clean outputs are kept per chunk)."""

    @property
    def restart_sites(self) -> tuple[Site, ...]:
        return tuple(sorted({s for t in self.active for s in (*self.terms[t].roots, self.terms[t].cotangent)}))


class AtpConfig(MethodConfig):
    """Attribution patching: (noise - clean) . dMetric/dact, one clean forward, one noise forward, one backward."""

    name: Literal["atp"]


class AtpQkfixConfig(MethodConfig):
    """AtP with the QK fix: query and key nodes get the attention softmax recomputed exactly under the patch."""

    name: Literal["atp_qkfix"]


class GradDropConfig(MethodConfig):
    """Options of the GradDrop methods."""

    granularity: Literal["block", "sublayer"] = "block"
    """``block``: drop each transformer block's write (attention + MLP); ``sublayer``: attention and MLP writes separately."""


class AtpGradDropConfig(GradDropConfig):
    """AtP with GradDrop: per pair, the mean over dropped residual writes of |AtP with that write stop-gradiented|."""

    name: Literal["atp_graddrop"]


class AtpStarConfig(GradDropConfig):
    """AtP*: the QK fix and GradDrop together."""

    name: Literal["atp_star"]


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class FirstOrder(AbstractMethod[ConfigT]):
    """Shared engine of the first-order methods (see module docstring)."""

    exact = False
    exact_where_linear = True
    qk_fix: ClassVar[bool] = False
    graddrop: ClassVar[bool] = False

    def __init__(self, keep_terms: bool = False) -> None:
        self.keep_terms = keep_terms
        """GradDrop: also return every term's signed estimate (``BatchScores.terms``), for inspection and tests."""

    # ------------------------------------------------------------- compile time
    def layout(self, compiled: CompiledPlan) -> _Layout:
        contributors: dict[Site, list[tuple[BoundNodes, Mode]]] = defaultdict(list)
        qk_layers: set[int] = set()
        joint_layers: set[int] = set()
        edge_inputs: set[Site] = set()
        for b in compiled.bound:
            for layer in sorted({layer for entry in b.layers.entries for layer in entry}):
                site = b.site(layer)
                if isinstance(b.node, EdgeNode) and self.qk_fix and b.node.reader in EDGE_QK_MODES:
                    edge_mode: Mode = "edge_joint" if b.node.reader == "k" and _all_positions(b) else EDGE_QK_MODES[b.node.reader]
                    contributors[Site("attn_z", layer)].append((b, edge_mode))
                    qk_layers.add(layer)
                    edge_inputs.add(site)
                elif isinstance(b.node, EdgeNode):
                    contributors[site].append((b, "edge"))
                elif self.qk_fix and site.name in QK_SITES and not site.view:
                    mode: Mode = "query" if site.name == "attn_q" else "joint" if _all_positions(b) else "key"
                    contributors[Site("attn_z", layer)].append((b, mode))
                    qk_layers.add(layer)
                    if mode == "joint":
                        joint_layers.add(layer)
                else:
                    contributors[site].append((b, "grad"))
        grad_sites = sorted(contributors)
        low = min(s.layer for s in grad_sites)
        floor = tuple(s for s in grad_sites if s.layer == low)
        values = tuple(Site(name, layer) for layer in sorted(qk_layers) for name in ("attn_q", "attn_k", "attn_v")) + tuple(sorted(edge_inputs))
        terms = tuple(drop_terms(compiled.info, self.granularity(compiled))) if self.graddrop else ()
        active = tuple(
            i for i in reversed(range(len(terms))) if any(terms[i].relation(s) == "reached" for s in grad_sites)
        )
        above = {s: sum(t.relation(s) == "above" for t in terms) for s in grad_sites}
        return _Layout(
            dict(contributors), tuple(sorted(qk_layers)), tuple(sorted(joint_layers)), values, floor, terms, active, above,
            edge_writer_sites(compiled.bound, compiled.info),
        )

    chunks_positions = True

    def working_memory(self, compiled: CompiledPlan, pairs: int, seq_len: int, positions: int) -> int:
        """The clean forward's autograd graph, plus per chunk of ``positions``: the noise activations and
        differences at the gradient sites, the QK-fix tables (``query chunk``-sized; one layer's
        ``query key`` tables transiently), GradDrop's kept gradients, and the score accumulators."""
        info, layout = compiled.info, self.layout(compiled)
        t, heads, d_head = seq_len, info.n_heads, info.d_head
        grad_sites = [s for s, entries in layout.contributors.items() if any(m == "grad" for _, m in entries)]
        cached = 2 * positions * sum(site_width(s, info, compiled.bound) for s in grad_sites)
        tables = 0.0
        for layer in layout.qk_layers:
            modes = {m for _, m in layout.contributors[Site("attn_z", layer)]}
            if "query" in modes:
                tables += 2 * positions * heads * d_head
            if "key" in modes:
                tables += 2.25 * heads * t * positions + 4 * t * heads * d_head
            if "joint" in modes:
                tables += t * heads * d_head
            # edges: per writer, the same tables (kept for every layer while GradDrop's terms reuse them;
            # without GradDrop one layer's at a time, in blocks of WRITER_BLOCK writers)
            writers = writer_count(info) if layout.active else min(WRITER_BLOCK, writer_count(info))
            if "edge_query" in modes:
                tables += writers * positions * heads * d_head
            if "edge_key" in modes:
                tables += writers * (5 * heads * t * positions + 2 * t * heads * d_head)
            if "edge_joint" in modes:
                tables += writers * t * heads * d_head
        transient = 4 * heads * t * t + 16 * heads * ROW_BLOCK * t if layout.qk_layers else 0
        kept_grads = len({layout.terms[i].cotangent for i in layout.active}) * t * info.d_model
        per_term = [
            b for b in compiled.bound if layout.terms and (any(len(e) > 1 for e in b.layers.entries) or _all_positions(b))
        ]
        accumulators = sum(b.n_nodes for b in compiled.bound) + len(layout.terms) * sum(b.n_nodes for b in per_term)
        cached += 2 * positions * writer_count(info) * info.d_model if layout.writers else 0  # noise and clean writer outputs
        model_bytes = ELEMENT_BYTES[info.dtype]
        table_bytes = max(model_bytes, 4)  # the QK fix recomputes in float32 at least
        per_pair = (
            model_bytes * (graph_elements(info, t) + cached + kept_grads) + table_bytes * (tables + transient) + 4 * accumulators
        )
        return int(pairs * per_pair)

    def granularity(self, compiled: CompiledPlan) -> Literal["block", "sublayer"]:
        """Which residual writes GradDrop drops (``block`` for the methods without GradDrop options)."""
        config = self.options(compiled)
        return config.granularity if isinstance(config, GradDropConfig) else "block"

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        layout = self.layout(compiled)
        needed = {s.name for s in (*layout.contributors, *layout.value_sites, *layout.restart_sites)}
        missing = needed - backend.supported_sites
        if missing:
            raise PlanError(f"method.name: {self.name} needs site(s) {sorted(missing)}, which the {backend.name} backend does not serve")
        for site, entries in layout.contributors.items():
            if any(mode in ("edge_query", "edge_key", "edge_joint") for _, mode in entries):
                reason = backend.reader_projection_unsupported(site.layer)
                if reason:
                    raise PlanError(
                        f"method.name: {self.name} recomputes the queries and keys of edges into layer {site.layer}, which is "
                        f"not supported here: {reason}. Use 'atp' or 'atp_graddrop' for these edges."
                    )
        for layer in layout.qk_layers:
            reason = backend.attention_unsupported(layer)
            if reason:
                raise PlanError(
                    f"method.name: {self.name} recomputes the attention pattern for the query/key nodes at layer {layer}, "
                    f"which is not supported here: {reason}. Use 'atp' or 'atp_graddrop' for these nodes."
                )
        if self.graddrop and len(layout.terms) < 2:
            raise PlanError(
                f"method.granularity: {self.name} needs at least two residual writes to drop; this model has "
                f"{len(layout.terms)} at granularity {self.granularity(compiled)!r}"
                + (" (use 'sublayer')" if compiled.info.d_mlp is not None else "")
            )

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        steps = self._steps(compiled)
        chunks = self.chunk_count(compiled)
        if chunks == 1:
            return steps
        return [
            PassStep(
                s.name, s.kind, s.count * chunks, s.rows, s.sites, f"{s.action} (x {chunks} position chunks)",
                None if s.forward_equivalents is None else s.forward_equivalents * chunks,
            )
            for s in steps
        ]

    def chunk_count(self, compiled: CompiledPlan) -> int:
        """Position chunks per batch of the longest prompts (1 without ``max_memory`` pressure)."""
        longest = max(compiled.batches, key=lambda b: b.seq_len)
        return len(self._chunks(self.layout(compiled), longest, compiled.chunking.positions_per_chunk))

    @staticmethod
    def _chunks(layout: _Layout, batch: Batch, per_chunk: int | None) -> list[Tensor | None]:
        """The position chunks ``batch`` runs; keys patched jointly are scored whole and add no positions."""
        modes = {mode for entries in layout.contributors.values() for _, mode in entries}
        if "edge_joint" in modes:  # an edge into keys at every position needs every writer's delta at once
            return [None]
        joint = {b.name for entries in layout.contributors.values() for b, mode in entries if mode == "joint"}
        positions = node_positions(tuple(b for b in batch.bound if b.name not in joint))
        return position_chunks(positions, batch.seq_len, per_chunk)

    def _steps(self, compiled: CompiledPlan) -> list[PassStep]:
        layout = self.layout(compiled)
        grad_sites = tuple(sorted(layout.contributors))
        steps = [
            PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "capture activations (no grad)"),
            PassStep(
                "clean_forward", "forward", 1, "clean prompts",
                tuple(sorted({*grad_sites, *layout.value_sites, *layout.restart_sites})), "capture activations, keep graph",
            ),
            PassStep(
                "clean_backward", "backward", 1, "clean prompts", grad_sites,
                f"d(sum of per-pair metric)/d(site) down to layer {layout.floor[0].layer}, scored on arrival",
            ),
        ]
        if layout.writers:
            steps.append(
                PassStep(
                    "edge_scores", "attention", 1, "clean prompts", layout.writers,
                    "no pass: at each reader input, its gradient dotted with the noise - clean output of every upstream "
                    "writer (one writer x d_model product per reader and position)",
                )
            )
        if layout.qk_layers:
            steps.append(
                PassStep(
                    "qk_recompute", "attention", len(layout.qk_layers), "clean prompts", layout.value_sites,
                    "attention softmax recomputed for query/key nodes (one QK^T-sized product per node type and layer)",
                )
            )
        if self.graddrop:
            n_layers = compiled.info.n_layers
            low = layout.floor[0].layer
            # a restart from block l's input runs back through blocks low..l-1; from mid-block, half a block more
            blocks = sum(
                layout.terms[t].layer - low + (0.5 if layout.terms[t].roots[-1].name != "resid" else 0)
                for t in layout.active
            )
            steps.append(
                PassStep(
                    "graddrop_backward", "partial_backward", len(layout.active), "clean prompts", layout.restart_sites,
                    f"one backward restarted below each dropped write that reaches a node ({len(layout.terms)} terms, "
                    f"{len(layout.active)} restarted): about {blocks:g} block-backwards, "
                    f"~{blocks / n_layers:.1f} full backward passes",
                    forward_equivalents=2.0 * blocks / n_layers,
                )
            )
        return steps

    # ------------------------------------------------------------------ run time
    def run_batch(self, run: BatchRun) -> BatchScores:
        layout = self.layout(run.compiled)
        chunks = self._chunks(layout, run.batch, run.compiled.chunking.positions_per_chunk)
        scores = _Scores(run.batch.bound, run.clean_tokens.shape[0], run.backend.device, layout, self.keep_terms, len(chunks) > 1)
        for i, positions in enumerate(chunks):
            metric_clean, metric_noise = self._run_chunk(run, layout, scores, positions, first=i == 0)
        return BatchScores(
            scores.result(), metric_clean, metric_noise, scores.per_term if self.keep_terms else None, extras=scores.signed_extras()
        )

    def _run_chunk(
        self, run: BatchRun, layout: _Layout, scores: "_Scores", positions: Tensor | None, first: bool
    ) -> tuple[Tensor, Tensor]:
        """The passes for the node entries at ``positions`` (None: every position): scores go to ``scores``.

        Cached noise activations, differences and QK-fix tables hold only these positions; keys patched
        jointly (``positions: "all"``) are scored in the first chunk.
        """
        full = tuple(Site("attn_k", layer) for layer in layout.joint_layers) if first else ()
        noise_acts, metric_noise = noise_forward(run, positions=positions, full=full)
        gradients = _GradientPass(run, layout, scores, positions, first, noise_acts)
        try:
            with torch.enable_grad():
                metric_clean = gradients.clean_forward()
                floor = gradients.plain_backward(metric_clean)
                for n in range(len(layout.active)):
                    gradients.restarted_backward(n, floor)
        finally:
            gradients.release()
        return metric_clean.detach(), metric_noise


class _GradientPass:
    """The clean forward and backward passes of one position chunk, in named steps.

    ``clean_forward`` runs the clean prompts under one ``Intervention``: the gradient sites receive
    their gradients (scored on arrival against the noise - clean difference), the QK fix's value
    sites and GradDrop's restart sites are captured in the graph, and each restart's cotangent site
    keeps the plain backward's gradient. ``plain_backward`` takes the gradient of the summed metric
    down to the lowest node layer; ``restarted_backward(n)`` restarts it below the ``n``-th active
    GradDrop term, with that write's gradient dropped. Each backward checks that a gradient arrived
    at exactly the sites it must reach. ``release`` drops the activations when the passes are done.
    """

    def __init__(
        self, run: BatchRun, layout: _Layout, scores: "_Scores", positions: Tensor | None, first: bool, noise_acts: dict[Site, Tensor],
        weight: float = 1.0, reuse: "_GradientPass | None" = None, patches: Mapping[Site, Patch] | None = None,
    ) -> None:
        """``weight`` scales every score; ``reuse``: take the noise - clean differences from that (clean) pass rather
        than from this pass's activations; ``patches``: site -> what replaces the activation there in the forward
        (integrated gradients run their interpolated points this way)."""
        self.run, self.layout, self.scores, self.positions, self.first = run, layout, scores, positions, first
        self.noise_acts = noise_acts
        self.weight, self.reuse, self.patches = weight, reuse, dict(patches or {})
        self.tensors: dict[Site, Tensor] = {}
        """Clean activations (in the graph) at every site of the pass, filled by ``clean_forward``."""
        self.leaves: list[Tensor] = []
        """Activations ``clean_forward`` made leaves of the graph (not downstream of the floor: the backward
        passes must ask for them)."""
        self.values: dict[Site, Tensor] = {}
        """Detached clean activations the QK fix reads."""
        self.deltas: dict[Site, Tensor] = {}
        """Noise minus clean activation at the gradient sites scored as ``delta . grad``."""
        self.plain_grads: dict[Site, Tensor] = {}
        """The plain backward's gradient at each GradDrop term's cotangent site."""
        self.writer_delta: Tensor | None = None
        """Edges: ``batch chunk writer d_model``, noise minus clean output of every writer the edges read."""
        self.term: int | None = None
        """The GradDrop term whose restarted backward is running (None: the plain backward)."""
        self.fired: set[Site] = set()
        """Sites whose gradient arrived in the running backward."""
        self.attention = _AttentionCache(run, noise_acts, self.values, layout, positions, first)

    # ------------------------------------------------------------- the steps
    def clean_forward(self) -> Tensor:
        """The clean forward; returns the per-pair metric, its graph kept."""
        run, layout = self.run, self.layout
        # built here and dropped on return: afterwards only the activations' own gradient hooks refer to this
        # object (through the receivers), a cycle that ``release`` breaks once the backward passes are done
        clean = Intervention()
        for site, replace in self.patches.items():
            clean.patch(site, replace)
        for site in layout.contributors:
            clean.receive_gradient(site, partial(self._on_grad, site))
        for site in {layout.terms[t].cotangent for t in layout.active}:
            clean.receive_gradient(site, partial(self._keep_plain_grad, site))
        self.tensors = clean.capture((*layout.value_sites, *layout.restart_sites), keep_graph=True)
        clean_writers: dict[Site, Tensor] = {}
        for site in layout.writers:
            clean.observe(site, partial(_keep_detached, clean_writers, site, self.positions))
        logits = clean.run(run.backend, run.clean_tokens)
        self.leaves = clean.leaves
        metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
        del logits
        if not metric_clean.requires_grad:
            raise BackendError("the metric does not depend on any hooked activation (no gradient path)")
        if self.reuse is not None:
            self.deltas, self.writer_delta = self.reuse.deltas, self.reuse.writer_delta
            return metric_clean
        for site, entries in self.layout.contributors.items():
            if any(mode == "grad" for _, mode in entries):
                self.deltas[site] = self.noise_acts[site] - take_positions(self.tensors[site].detach(), self.positions)
        self.values.update({site: self.tensors[site].detach() for site in self.layout.value_sites})
        if layout.writers:
            info, count = run.compiled.info, writers_held(run.compiled.info, layout.writers)
            self.writer_delta = stack_writers(info, self.noise_acts, count) - stack_writers(info, clean_writers, count)
        return metric_clean

    def plain_backward(self, metric_clean: Tensor) -> list[Tensor]:
        """d(sum of per-pair metric)/d(site) down to the floor, scored on arrival; returns the floor tensors."""
        layout = self.layout
        floor = [self.tensors[s] for s in layout.floor]
        floor += [leaf for leaf in self.leaves if all(leaf is not t for t in floor)]
        torch.autograd.grad(metric_clean.sum(), floor, retain_graph=bool(layout.active), allow_unused=True)
        note_pass()
        _check_arrivals(set(layout.contributors), self.fired, "")
        return floor

    def restarted_backward(self, n: int, floor: list[Tensor]) -> None:
        """GradDrop: the backward restarted below the ``n``-th active term's write, that write's gradient dropped."""
        layout = self.layout
        t = layout.active[n]
        term = layout.terms[t]
        if term.cotangent not in self.plain_grads:
            raise BackendError(f"GradDrop: no gradient arrived at {term.cotangent}, needed to restart below {term.label}")
        self.term, self.fired = t, set()
        roots = [self.tensors[s] for s in term.roots if self.tensors[s].requires_grad]  # frozen weights: some roots are constants
        grads = [self.plain_grads[term.cotangent].to(root.device) for root in roots]  # multi-device: a layer's own device
        last = n == len(layout.active) - 1
        torch.autograd.grad(roots, floor, grads, retain_graph=not last, allow_unused=True)
        note_pass()
        expected = {s for s in layout.contributors if term.relation(s) == "reached"}
        _check_arrivals(expected, self.fired, f" with {term.label} dropped")
        self.attention.release_from(term.layer)  # later (lower) terms never reach this layer's attention
        if all(layout.terms[later].cotangent != term.cotangent for later in layout.active[n + 1 :]):
            del self.plain_grads[term.cotangent]

    def release(self) -> None:
        """Drop every activation, gradient and table of the pass. The activations' gradient receivers
        refer to this object, so it and the graph would otherwise keep each other alive (through the
        autograd graph, where Python's garbage collector cannot see): every pass's activations would
        stay in memory."""
        if self.reuse is not None:  # the differences belong to the pass they came from
            self.deltas = {}
        self.tensors, self.leaves, self.writer_delta = {}, [], None
        self.deltas.clear()
        self.values.clear()
        self.plain_grads.clear()
        self.attention.release_from(0)

    # ------------------------------------------------------------- gradient arrival
    def _on_grad(self, site: Site, grad: Tensor) -> None:
        """Score every node selection read at ``site`` from its gradient, for the running term."""
        self.fired.add(site)
        positions, seq_len = self.positions, self.run.batch.seq_len
        for b, mode in self.layout.contributors[site]:
            if mode == "joint":
                if not self.first:
                    continue
                effect = self.attention.joint_effect(site.layer, grad)[:, None]  # batch pos=1 kv_head
            else:
                if mode.startswith("edge"):
                    assert self.writer_delta is not None and isinstance(b.node, EdgeNode), "kept by clean_forward"
                    n_writers = b.node.upstream(self.run.compiled.info, site.layer)
                    delta = self.writer_delta[:, :, :n_writers]
                    if mode == "edge":
                        effect = edge_effects(delta, take_positions(grad, positions), b.axes[-1].size)
                    else:
                        clean_input = self.values[Site(b.node.site, site.layer)]
                        effect = self.attention.edge_effect(mode, site.layer, grad, delta, clean_input, b.axes[-1].size)
                        if mode == "edge_joint":
                            self.scores.add(b, site, self.term, b.reduce(effect * self.weight).float().to(self.scores.device))
                            continue
                elif mode == "grad":
                    effect = b.node.elementwise_effect(self.deltas[site], take_positions(grad, positions))
                else:
                    effect = self.attention.effect(mode, site.layer, grad)
                effect = _expand_positions(effect, positions, seq_len)
            if self.weight != 1.0:
                effect = effect * self.weight
            self.scores.add(b, site, self.term, b.reduce(effect).float().to(self.scores.device))

    def _keep_plain_grad(self, site: Site, grad: Tensor) -> None:
        if self.term is None:
            self.plain_grads[site] = grad


def _check_arrivals(expected: set[Site], fired: set[Site], context: str) -> None:
    missing = expected - fired
    if missing:
        raise BackendError(
            "no gradient arrived at site(s) " + ", ".join(str(s) for s in sorted(missing)) + context
            + " (a later hook may have replaced the activation, or the metric does not depend on it)"
        )
    unexpected = fired - expected
    if unexpected:
        raise BackendError(
            "GradDrop: gradient arrived at site(s) " + ", ".join(str(s) for s in sorted(unexpected)) + context
            + ", which that term should leave unchanged; the backend's residual stream does not match the block structure"
        )


class _Scores:
    """Per-pair score accumulators: signed sums, or GradDrop's sum of per-term magnitudes."""

    def __init__(
        self, bound: tuple[BoundNodes, ...], n_batch: int, device: torch.device, layout: _Layout, keep_terms: bool, chunked: bool
    ) -> None:
        self.layout = layout
        self.device = device
        self.terms = layout.terms
        self.totals = {b.name: torch.zeros((n_batch,) + b.shape, device=device) for b in bound}
        # GradDrop's scores are magnitudes; the plain backward's signed estimate (AtP, or the QK fix) is kept
        # beside them for dense selections (a keep_top selection would need it dense too)
        self.signed = {
            b.name: torch.zeros((n_batch,) + b.shape, device=device) for b in bound if self.terms and b.spec.sparse_output() is None
        }
        # a node spanning several layers (or, in chunks, several position chunks) sums several
        # contributions per term before the magnitude is taken
        self.per_term = {
            b.name: torch.zeros((len(self.terms), n_batch) + b.shape, device=device)
            for b in bound
            if self.terms and (keep_terms or any(len(e) > 1 for e in b.layers.entries) or (chunked and _all_positions(b)))
        }

    def add(self, b: BoundNodes, site: Site, term: int | None, effect: Tensor) -> None:
        for entry in b.layer_entries(site.layer):
            if term is None and b.name in self.signed:
                self.signed[b.name][:, entry] += effect
            if not self.terms:
                self.totals[b.name][:, entry] += effect
            elif b.name in self.per_term:
                targets = [term] if term is not None else [i for i, t in enumerate(self.terms) if t.relation(site) == "above"]
                for i in targets:
                    self.per_term[b.name][i, :, entry] += effect
            elif term is None:
                self.totals[b.name][:, entry] += self.layout.above_count[site] * effect.abs()
            else:
                self.totals[b.name][:, entry] += effect.abs()

    def signed_extras(self) -> dict[str, Tensor] | None:
        """GradDrop: ``"<name>.signed"``, the plain backward's signed estimate per pair and node (None for signed methods)."""
        return {f"{name}.signed": value for name, value in self.signed.items()} or None

    def result(self) -> dict[str, Tensor]:
        if not self.terms:
            return self.totals
        norm = len(self.terms) - 1
        out = {name: total / norm for name, total in self.totals.items()}
        out.update({name: terms.abs().sum(dim=0) / norm for name, terms in self.per_term.items()})
        return out


@dataclass
class _LayerTables:
    """One layer's QK-fix tables for one chunk of positions (those its node modes need)."""

    group: int
    """Query heads per key/value head."""
    query_dz: Tensor | None = None
    key_patch: KeyPatch | None = None
    joint_dz: Tensor | None = None


class _AttentionCache:
    """Per layer, the QK-fix tables for one chunk of positions, prepared when the layer's gradient first
    arrives (the layer's ``query key`` tables are transient; only ``query chunk`` tables are kept)."""

    def __init__(
        self, run: BatchRun, noise: dict[Site, Tensor], values: dict[Site, Tensor], layout: _Layout,
        positions: Tensor | None, first: bool,
    ) -> None:
        self.run, self.noise, self.values, self.positions = run, noise, values, positions
        self.modes = {
            layer: {mode for _, mode in layout.contributors.get(Site("attn_z", layer), ())} for layer in layout.qk_layers
        }
        if not first:
            for modes in self.modes.values():
                modes.discard("joint")
        self.layers: dict[int, _LayerTables] = {}
        self.edge_tables: dict[tuple[str, int], list[tuple[int, Tensor | KeyPatch]]] = {}
        """QK fix for edges: per (mode, layer), the writer blocks' tables (``_edge_tables``)."""
        self.keep_edge_tables = bool(layout.active)

    def _layer(self, layer: int) -> _LayerTables:
        if layer in self.layers:
            return self.layers[layer]
        backend, positions, modes = self.run.backend, self.positions, self.modes[layer]
        q, k, v = (_upcast(self.values[Site(name, layer)]) for name in ("attn_q", "attn_k", "attn_v"))
        with torch.no_grad():
            clean = clean_attention(backend.attention_logits(layer, q, k), v)
            tables = _LayerTables(clean.group)
            if "query" in modes:  # rows of the chunk's positions, each with its noise query
                noise_q = _upcast(self.noise[Site("attn_q", layer)])
                logits = backend.attention_logits(layer, _with_positions(q, noise_q, positions), k)
                tables.query_dz = query_delta_z(clean, take_positions(logits, positions, dim=2), positions)
            noise_k = _upcast(self.noise[Site("attn_k", layer)]) if modes & {"key", "joint"} else None
            if "joint" in modes:  # noise keys kept at every position
                assert noise_k is not None
                tables.joint_dz = joint_key_delta_z(clean, backend.attention_logits(layer, q, noise_k))
                noise_k = take_positions(noise_k, positions)
            if "key" in modes:  # columns of the chunk's positions
                assert noise_k is not None
                logits = backend.attention_logits(layer, q, _with_positions(k, noise_k, positions))
                tables.key_patch = key_patch(clean, logits, positions)
        self.layers[layer] = tables
        return tables

    def effect(self, mode: Mode, layer: int, dz: Tensor) -> Tensor:
        """Effect per (chunk position, head) of the query or key nodes at ``layer`` for the gradient ``dz`` at ``z``."""
        dz = _upcast(dz)
        tables = self._layer(layer)
        if mode == "query":
            assert tables.query_dz is not None, "prepared for every layer with query nodes"
            return (tables.query_dz * take_positions(dz, self.positions)).sum(-1)
        assert tables.key_patch is not None, "prepared for every layer with key nodes"
        return key_effects(tables.key_patch, dz)

    def edge_effect(self, mode: Mode, layer: int, dz: Tensor, writer_delta: Tensor, clean_input: Tensor, n_writers: int) -> Tensor:
        """QK fix for edges into the queries or keys of ``layer``: each writer's delta added to the reader's clean
        input, its query (key) recomputed by the backend, the attention softmax recomputed exactly, then
        linearized after the pattern with the gradient ``dz`` at ``z``.

        Args:
            dz: ``batch query head d_head``, the gradient at ``z``.
            writer_delta: ``batch chunk writer d_model`` (every position for ``edge_joint``).
            clean_input: ``batch pos head d_model``, the reader's clean input (every position).
        Returns:
            ``batch chunk head writer`` (``batch 1 kv_head writer`` for ``edge_joint``), writers past the delta's padded with 0.
        """
        key = (mode, layer)
        tables = self.edge_tables.get(key)
        if tables is None:
            tables = self._edge_tables(mode, layer, writer_delta, clean_input)
            if self.keep_edge_tables:  # GradDrop: every term's gradient reuses them
                self.edge_tables[key] = tables
        dz = _upcast(dz)
        parts = []
        for n, table in tables:
            dz_rows = dz.repeat_interleave(n, dim=0)
            if isinstance(table, KeyPatch):
                effect = key_effects(table, dz_rows)  # (batch writer) chunk kv_head
            elif mode == "edge_joint":
                effect = joint_key_effects(table, dz_rows, self._group(layer))[:, None]
            else:
                effect = (table * take_positions(dz_rows, self.positions)).sum(-1)  # (batch writer) chunk head
            parts.append(rearrange(effect, "(batch writer) chunk head -> batch chunk head writer", batch=dz.shape[0]))
        return torch.nn.functional.pad(torch.cat(parts, dim=-1), (0, n_writers - writer_delta.shape[2]))

    def _group(self, layer: int) -> int:
        """Query heads per key/value head at ``layer``."""
        return self.values[Site("attn_q", layer)].shape[2] // self.values[Site("attn_k", layer)].shape[2]

    def _edge_tables(self, mode: Mode, layer: int, writer_delta: Tensor, clean_input: Tensor) -> list[tuple[int, Tensor | KeyPatch]]:
        """Per block of ``WRITER_BLOCK`` writers (rows ``(batch writer)``): ``z' - z`` of the recomputed query rows
        (``edge_query``), the key closed form's tables (``edge_key``) or ``z' - z`` with every key shifted
        (``edge_joint``): gradient-independent, so one layer's serve every GradDrop term."""
        backend, positions = self.run.backend, self.positions
        reader = "q" if mode == "edge_query" else "k"
        q, k, v = (_upcast(self.values[Site(name, layer)]) for name in ("attn_q", "attn_k", "attn_v"))
        out: list[tuple[int, Tensor | KeyPatch]] = []
        with torch.no_grad():
            for lo in range(0, writer_delta.shape[2], WRITER_BLOCK):
                block = writer_delta[:, :, lo : lo + WRITER_BLOCK]
                n = block.shape[2]

                def repeat(x: Tensor, n: int = n) -> Tensor:
                    return x.repeat_interleave(n, dim=0)

                shift = rearrange(block, "batch chunk writer d -> (batch writer) chunk 1 d")
                shifted = repeat(clean_input).clone()
                if positions is None:
                    shifted += shift.to(shifted.dtype)
                else:
                    shifted[:, positions.to(shifted.device)] += shift.to(shifted.dtype)
                moved = _upcast(backend.reader_projection(layer, reader, shifted))
                clean = clean_attention(backend.attention_logits(layer, repeat(q), repeat(k)), repeat(v))
                table: Tensor | KeyPatch
                if mode == "edge_query":
                    logits = backend.attention_logits(layer, _with_positions(repeat(q), take_positions(moved, positions), positions), repeat(k))
                    table = query_delta_z(clean, take_positions(logits, positions, dim=2), positions)
                elif mode == "edge_key":
                    logits = backend.attention_logits(layer, repeat(q), _with_positions(repeat(k), take_positions(moved, positions), positions))
                    table = key_patch(clean, logits, positions)
                else:
                    table = joint_key_delta_z(clean, backend.attention_logits(layer, repeat(q), moved))
                out.append((n, table))
        return out

    def joint_effect(self, layer: int, dz: Tensor) -> Tensor:
        """``batch kv_head``: effect of patching every key of each key/value head at once."""
        tables = self._layer(layer)
        assert tables.joint_dz is not None, "prepared for every layer with jointly patched keys"
        return joint_key_effects(tables.joint_dz, _upcast(dz), tables.group)

    def release_from(self, layer: int) -> None:
        """Forget the layers at or above ``layer``."""
        for cached in [l for l in self.layers if l >= layer]:
            del self.layers[cached]
        for key in [key for key in self.edge_tables if key[1] >= layer]:
            del self.edge_tables[key]


def _keep_detached(store: dict[Site, Tensor], site: Site, positions: Tensor | None, act: Tensor) -> None:
    """Observer: store ``act`` detached (only ``positions``, if given)."""
    store[site] = take_positions(act.detach(), positions)


def _with_positions(clean: Tensor, noise: Tensor, positions: Tensor | None) -> Tensor:
    """``clean`` (``batch pos ...``) with the ``positions`` taken from ``noise`` (which holds only them)."""
    if positions is None:
        return noise
    out = clean.clone()
    out[:, positions.to(out.device)] = noise
    return out


def _expand_positions(effect: Tensor, positions: Tensor | None, seq_len: int) -> Tensor:
    """Per-entry effects at the chunk's positions (``batch chunk ...``) placed in ``batch pos ...`` (zeros elsewhere)."""
    if positions is None:
        return effect
    out = effect.new_zeros((effect.shape[0], seq_len) + effect.shape[2:])
    out[:, positions.to(out.device)] = effect
    return out


def _all_positions(b: BoundNodes) -> bool:
    """The selection sums every position into one node (``positions: "all"``)."""
    return b.positions is not None and b.positions.labels == "all"


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 models recompute attention in fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Atp(FirstOrder[AtpConfig]):
    name = "atp"
    config_type = AtpConfig
    listing_rank = 0


class AtpQkfix(FirstOrder[AtpQkfixConfig]):
    name = "atp_qkfix"
    config_type = AtpQkfixConfig
    listing_rank = 1
    qk_fix = True


class AtpGradDrop(FirstOrder[AtpGradDropConfig]):
    name = "atp_graddrop"
    config_type = AtpGradDropConfig
    listing_rank = 2
    graddrop = True
    sign_convention = GRADDROP_CONVENTION


class AtpStar(FirstOrder[AtpStarConfig]):
    name = "atp_star"
    config_type = AtpStarConfig
    listing_rank = 3
    qk_fix = True
    graddrop = True
    sign_convention = GRADDROP_CONVENTION
