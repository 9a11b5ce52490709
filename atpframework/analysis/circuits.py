"""Circuits: sets of a result's edges, and how much of the model's behaviour each keeps (faithfulness).

This module owns circuit extraction from an edge result, the faithfulness of circuits by exact patching,
faithfulness curves over circuit sizes with their areas, and the graph of one circuit (JSON and Graphviz DOT).

**The edges of a result.** Each node of an edge selection (``edge_q`` ... ``edge_logits``: one entry of
``layer pos [head] writer``, ``atpframework.model.edges``) is one unit of a circuit: in or out as a whole.
A node over an ``"all"`` axis groups several edges (e.g. ``positions: "all"``: the edge at every position),
which are kept or patched together. A node none of whose edges exists (its writers are not upstream of its
reader: ``upstream_count``) is no edge and never joins a circuit; ``n_edges`` counts the others.

**Ranking.** Edges are ranked by ``|mean over pairs of the stored score|``, largest first, ties by global
node order, NaN last: for signed methods the absolute signed mean (effects of opposite sign cancel over
the pairs, as in EAP's circuits); GradDrop methods store non-negative magnitudes, whose mean it then is.

* ``top-n``: the ``n`` first edges of the ranking.
* ``greedy``: the top edges with the dangling ones pruned: the smallest prefix of the ranking whose *pruned*
  set has at least ``n`` edges. Pruning keeps an edge when one of its edges lies on a path from the
  embeddings to the logits reader through kept edges. The path runs through components *at positions*:
  a writer ``u`` at position ``p`` feeds a reader at ``p``; the query input of head ``h`` at ``t`` (and its MLP
  input, for an MLP) feeds its output at ``t``; a key or value input at ``s`` feeds the output at every
  ``t >= s`` (attention moves information forward); with grouped-query attention a key/value head feeds
  every query head of its group; the embeddings hold at every position and the logits reader counts at
  every position. When the prompt pairs differ in length the positions are summed instead (one position;
  a grouped node then counts as one edge between components). Pruning a superset keeps a superset, so
  the prefix is found by bisection; one more edge can connect several, so a greedy circuit may be larger
  than ``n`` (``FaithfulnessCurve.sizes`` holds the sizes reached).

**Faithfulness** of a circuit ``C``, by exact patching: one forward of the clean prompts in which every
edge outside ``C`` carries its writer's noise-run value and every edge inside carries the writer's value
in this same forward. Every writer site is observed as the forward computes it (already affected by the
patches upstream), and every reader's input is corrected where it is read:
``input_v <- input_v + sum over upstream writers u with (u, v) not in C of (u(noise) - u(this forward))``,
per position for per-position edges, at every position for summed ones. Edges the result does not score
are outside every circuit (``unscored="noise"``, the default: the circuit is a subgraph of the model's
whole edge graph) or always kept (``unscored="clean"``: only the scored edges are in question). Many
circuits share one forward as row blocks of the repeated clean prompts. Per pair,
``f = (m(C) - m(noise)) / (m(clean) - m(noise))``; the reported *faithfulness* is the mean over pairs of the
numerators divided by the mean of the denominators (``per_pair`` keeps the per-pair ratios). The circuit of
every edge gives exactly 1 (nothing is corrected) and the empty circuit 0 (every reader reads the sum of
the noise writers plus its constants, which is its noise-run input), up to rounding; both are evaluated
with every curve (``full``, ``empty``).

**Areas** (MIB's CPR and CMD): the area under the faithfulness curve and under ``|1 - faithfulness|``, by the
trapezoid rule over the circuits evaluated, on two x axes normalised to [0, 1]: ``log``, ``x = ln(size) / ln(n_edges)``
(size 1 at 0), and ``fraction``, ``x = size / n_edges``. The circuit of every edge closes each curve at 1 and
the empty circuit opens it at 0 (on the log axis at size 1, unless a circuit of one edge was evaluated): below
its first circuit a method offers no smaller one than the empty circuit, so a greedy curve whose first
circuit has 150 edges is not credited for sizes it cannot reach. CPR: higher is better; CMD: lower is better.
"""

import csv
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import Tensor

from atpframework.api import as_plan, load_backend, splice_saes
from atpframework.engine.runner import batch_runs, compile_plan
from atpframework.errors import PlanError, SchemaError, shorten
from atpframework.io.files import write_text_atomically
from atpframework.io.progress import Bar, Progress
from atpframework.io.results import AttributionResult, load_result
from atpframework.model.backend import AbstractBackend, ModelInfo
from atpframework.model.edges import READER_SITE, stack_writers, upstream_count, writer_count, writer_labels, writer_sites
from atpframework.model.interventions import Intervention
from atpframework.model.sites import Site
from atpframework.plans.compiled import BatchRun
from atpframework.plans.metrics import resolve_metric

EDGE_READERS: Mapping[str, str] = {"edge_q": "q", "edge_k": "k", "edge_v": "v", "edge_mlp": "mlp", "edge_logits": "logits"}
"""Edge node kind -> its reader kind."""
Unscored = Literal["noise", "clean"]
"""What the edges a result does not score carry in a circuit forward: their noise value (outside every
circuit) or their own value (always kept)."""
ResultLike = AttributionResult | str | Path


# ------------------------------------------------------------------------------------------ the edge grid
@dataclass(frozen=True)
class _EdgeSelection:
    """One edge selection of a result, and where its nodes sit on the model's edge grid of its reader kind."""

    name: str
    reader: str
    offset: int
    """Global index of its first node."""
    shape: tuple[int, ...]
    """``layer pos [head] writer``, as stored."""
    labels: tuple[list[int] | str, ...]
    """Per stored axis, the model index of each entry (``layer`` as a grid row: 0 for the logits reader) or ``"all"``."""

    @property
    def n_nodes(self) -> int:
        return math.prod(self.shape)

    def grid_labels(self, seq_len: int) -> tuple[list[int] | str, ...]:
        """The labels on the grid axes ``layer pos head writer`` (positions modulo ``seq_len``; no head axis: ``[0]``)."""
        layer, pos, *rest = self.labels
        pos = pos if pos == "all" else [int(p) % seq_len for p in pos]
        head = rest[0] if len(rest) == 2 else [0]
        return layer, pos, head, rest[-1]


class ResultEdges:
    """A result's edge selections laid onto the model's edges: which nodes are edges, their ranking, the
    masks a circuit puts on each reader, top-n and greedy circuits (see module docstring).

    Grids are per reader kind, ``layer pos head writer``: ``layer`` the reader's block (one row, the last
    residual stream, for ``logits``), ``head`` the query heads (``q``), the key/value heads (``k``, ``v``) or one
    entry (``mlp``, ``logits``), ``writer`` every writer of the model.
    """

    def __init__(self, result: AttributionResult, where: str = "result") -> None:
        self.info = result_model_info(result)
        info = self.info
        problem = edge_problem(result)
        if problem:
            raise PlanError(f"{where}: {problem}")
        self.n_writers = writer_count(info)
        offsets = result.numbering.offsets
        self.selections: list[_EdgeSelection] = []
        for i, (name, ns) in enumerate(result.nodes.items()):
            reader = EDGE_READERS[ns.kind]
            labels = []
            for dim in ns.dims[1:]:
                value = ns.index[dim]
                if dim == "layer" and reader == "logits" and value != "all":
                    value = [0 for _ in value]  # the one row of the logits grid
                labels.append(value)
            self.selections.append(_EdgeSelection(name, reader, offsets[i], tuple(ns.per_pair.shape[1:]), tuple(labels)))
        self.n_nodes = offsets[-1]
        self.kinds = ("q", "k", "v") + (("mlp",) if info.d_mlp is not None else ()) + ("logits",)
        """Every reader kind of the model (whether the result scores it or not)."""
        self.exists = {kind: self._existing(kind) for kind in self.kinds}
        """Reader kind -> ``layer writer`` booleans: the edge exists (the writer is upstream of the reader)."""
        self.is_edge = self._is_edge()
        """``node``: the node holds at least one existing edge."""
        self.n_edges = int(self.is_edge.sum())
        self.scores = torch.cat([ns.aggregate("mean").flatten().double().abs() for ns in result.nodes.values()])
        """``node``: the ranking score, ``|mean over pairs|``."""
        key = torch.where(self.is_edge, self.scores.nan_to_num(nan=-1.0), torch.full_like(self.scores, -2.0))
        self.ranking = torch.sort(key, descending=True, stable=True).indices[: self.n_edges]
        """Global indices of the edges, best first (NaN scores last)."""
        lengths = {len(t) for t in result.clean_tokens}
        self.prune_positions = lengths.pop() if len(lengths) == 1 else 1
        """Positions of the pruning graph: the prompt length, or 1 (positions summed) when pairs differ in length."""

    # -------------------------------------------------------------- grids
    def grid_shape(self, kind: str, seq_len: int) -> tuple[int, int, int, int]:
        info = self.info
        layers = 1 if kind == "logits" else info.n_layers
        heads = {"q": info.n_heads, "k": info.n_kv_heads, "v": info.n_kv_heads}.get(kind, 1)
        return layers, seq_len, heads, self.n_writers

    def reader_site(self, kind: str, row: int) -> Site:
        """The site of grid row ``row`` of reader kind ``kind``."""
        return Site(READER_SITE[kind], self.info.n_layers if kind == "logits" else row)

    def _existing(self, kind: str) -> Tensor:
        rows = self.grid_shape(kind, 1)[0]
        upstream = torch.tensor([upstream_count(self.info, self.reader_site(kind, r)) for r in range(rows)])
        return torch.arange(self.n_writers)[None, :] < upstream[:, None]

    def _is_edge(self) -> Tensor:
        out = torch.zeros(self.n_nodes, dtype=torch.bool)
        for sel in self.selections:
            exists = self.exists[sel.reader][None, :, None, None, :]
            out[sel.offset : sel.offset + sel.n_nodes] = _from_grid(sel, exists, 1)[0]
        return out

    def grids(self, keep: Tensor, seq_len: int) -> dict[str, Tensor]:
        """``keep`` (``set node`` booleans) on the grids: reader kind -> ``set layer pos head writer`` booleans, the
        existing edges some kept node covers (every kind of the model; all False where none is kept)."""
        n_sets = keep.shape[0]
        counts = {kind: torch.zeros(n_sets, *self.grid_shape(kind, seq_len)) for kind in self.kinds}
        for sel in self.selections:
            values = keep[:, sel.offset : sel.offset + sel.n_nodes].reshape(n_sets, *sel.shape)
            counts[sel.reader] += _to_grid(sel, values, self.grid_shape(sel.reader, seq_len))
        return {kind: (counts[kind] > 0) & self.exists[kind][None, :, None, None, :] for kind in self.kinds}

    def patch_grids(self, keep: Tensor, seq_len: int, unscored: Unscored) -> dict[str, Tensor]:
        """Reader kind -> ``set layer pos head writer``: the existing edges each circuit of ``keep`` patches."""
        kept = self.grids(keep, seq_len)
        if unscored == "clean":
            scored = self.grids(torch.ones(1, self.n_nodes, dtype=torch.bool), seq_len)
            return {kind: scored[kind] & ~kept[kind] for kind in self.kinds}
        return {kind: self.exists[kind][None, :, None, None, :] & ~kept[kind] for kind in self.kinds}

    # -------------------------------------------------------------- circuits
    def mask(self, nodes: Tensor) -> Tensor:
        """``node`` booleans of the global node indices ``nodes``."""
        out = torch.zeros(self.n_nodes, dtype=torch.bool)
        out[nodes] = True
        return out

    def top(self, n: int) -> Tensor:
        """Global indices of the ``n`` best-ranked edges (all of them if there are fewer)."""
        return self.ranking[:n]

    def prune(self, keep: Tensor) -> Tensor:
        """``keep`` (``node`` booleans) less the nodes none of whose edges lies on a path from the embeddings
        to the logits through kept edges (positions as the module docstring says)."""
        T = self.prune_positions
        grids = {kind: g[0] for kind, g in self.grids(keep[None], T).items()}
        on_path = _on_path(self.info, grids, T)
        out = torch.zeros_like(keep)
        for sel in self.selections:
            span = slice(sel.offset, sel.offset + sel.n_nodes)
            out[span] = keep[span] & _from_grid(sel, on_path[sel.reader][None], T)[0]
        return out

    def greedy(self, n: int) -> Tensor:
        """Global indices of the greedy circuit of at least ``n`` edges, best-ranked first (every edge on a path
        when fewer lie on one): the pruned smallest prefix of the ranking that keeps ``n``."""
        return self.greedy_many([n])[0]

    def greedy_many(self, sizes: Sequence[int]) -> list[Tensor]:
        """``greedy`` of each of ``sizes``; the prefix found for one size bounds the search for larger ones."""
        out: dict[int, Tensor] = {}
        lo = 0
        for n in sorted(set(sizes)):
            lo, kept = self._greedy_prefix(n, lo)
            out[n] = self._in_rank_order(kept)
        return [out[n] for n in sizes]

    def _greedy_prefix(self, n: int, lo: int) -> tuple[int, Tensor]:
        """The smallest prefix length ``k >= lo`` of the ranking whose pruned set keeps ``n`` edges (``n_edges`` if
        none does) and that set. Every prefix shorter than ``lo`` must keep fewer than ``n``; pruning a superset
        keeps a superset, so the kept count grows with ``k``: an exponential search, then bisection."""
        total = self.n_edges

        def pruned(k: int) -> Tensor:
            return self.prune(self.mask(self.ranking[:k]))

        lo = min(max(lo, n), total)  # a prefix of k edges keeps at most k
        best = pruned(lo)
        if int(best.sum()) >= n or lo == total:
            return lo, best
        short, step = lo, max(1, lo)  # pruned(short) keeps fewer than n
        while True:
            hi = min(total, short + step)
            best = pruned(hi)
            if int(best.sum()) >= n or hi == total:
                break
            short, step = hi, 2 * step
        if int(best.sum()) < n:
            return total, best
        while hi - short > 1:
            mid = (short + hi) // 2
            candidate = pruned(mid)
            if int(candidate.sum()) >= n:
                hi, best = mid, candidate
            else:
                short = mid
        return hi, best

    def _in_rank_order(self, keep: Tensor) -> Tensor:
        return self.ranking[keep[self.ranking]]


def _to_grid(sel: _EdgeSelection, values: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """``set *sel.shape`` booleans -> ``set layer pos head writer`` float counts of the nodes covering each point (>0: covered)."""
    n_sets = values.shape[0]
    out = values.reshape(n_sets, *sel.shape[:2], sel.shape[2] if len(sel.shape) == 4 else 1, sel.shape[-1]).to(torch.float32)
    for dim, (labels, size) in enumerate(zip(sel.grid_labels(shape[1]), shape), start=1):
        if labels == "all":
            out = out.expand(*out.shape[:dim], size, *out.shape[dim + 1:])
        else:
            full = torch.zeros(*out.shape[:dim], size, *out.shape[dim + 1:])
            out = full.index_add_(dim, torch.tensor(labels, dtype=torch.long), out)
    return out


def _from_grid(sel: _EdgeSelection, grid: Tensor, seq_len: int) -> Tensor:
    """``set layer pos head writer`` booleans (broadcastable) -> ``set node``: some point the node covers is set.
    (Reductions run on floats: torch's boolean ``any`` along an axis is far slower.)"""
    out = grid.to(torch.float32)
    for dim, labels in enumerate(sel.grid_labels(seq_len), start=1):
        if labels == "all":
            out = out.sum(dim=dim, keepdim=True)
        else:
            index = torch.tensor(labels, dtype=torch.long)
            out = out.index_select(dim, index) if out.shape[dim] > 1 else out.expand(*out.shape[:dim], len(labels), *out.shape[dim + 1:])
    return out.expand(out.shape[0], *sel.shape[:2], -1, sel.shape[-1]).reshape(out.shape[0], -1) > 0


def _on_path(info: ModelInfo, grids: Mapping[str, Tensor], T: int) -> dict[str, Tensor]:
    """Reader kind -> ``layer pos head writer``: the kept edges of ``grids`` on an embeddings -> logits path.

    ``reached[w, p]``: writer ``w`` at position ``p`` is reached from the embeddings through kept edges;
    ``live[w, p]``: it reaches the logits. An edge ``(u, p) -> reader r`` lies on a path iff ``reached[u, p]``
    and ``r`` at ``p`` reaches the logits (``reader_live``). Sets are 0/1 floats (contractions are fast; torch's
    boolean ``any`` along an axis is not)."""
    n_heads, group = info.n_heads, info.n_heads // info.n_kv_heads
    per_block = n_heads + (info.d_mlp is not None)
    W = 1 + info.n_layers * per_block
    edges = {kind: g.to(torch.float32) for kind, g in grids.items()}
    reached = torch.zeros(W, T)
    reached[0] = 1
    for layer in range(info.n_layers):
        base = 1 + layer * per_block
        heads = torch.zeros(T, n_heads)
        for kind in ("q", "k", "v"):
            hit = (torch.einsum("thw,wt->th", edges[kind][layer], reached) > 0).float()  # pos head
            if kind != "q":  # a key/value at s feeds the outputs at t >= s, of every query head of its group
                hit = (hit.cumsum(0) > 0).float().repeat_interleave(group, dim=1)
            heads += hit
        reached[base : base + n_heads] = (heads.T > 0).float()
        if info.d_mlp is not None:
            reached[base + n_heads] = (torch.einsum("tw,wt->t", edges["mlp"][layer, :, 0], reached) > 0).float()

    live = edges["logits"][0, :, 0, :].T.clone()  # writer pos
    reader_live = {kind: torch.zeros(g.shape[:3]) for kind, g in edges.items()}
    reader_live["logits"][:] = 1

    def feed(kind: str, layer: int) -> None:
        live.add_(torch.einsum("thw,th->wt", edges[kind][layer], reader_live[kind][layer]))

    for layer in reversed(range(info.n_layers)):
        base = 1 + layer * per_block
        if info.d_mlp is not None:
            reader_live["mlp"][layer, :, 0] = (live[base + n_heads] > 0).float()
            feed("mlp", layer)
        out_live = (live[base : base + n_heads].T > 0).float()  # pos head
        reader_live["q"][layer] = out_live
        kv = out_live.reshape(T, info.n_kv_heads, group).sum(-1)
        later = (kv.flip(0).cumsum(0).flip(0) > 0).float()  # some t >= s
        reader_live["k"][layer] = later
        reader_live["v"][layer] = later
        for kind in ("q", "k", "v"):
            feed(kind, layer)
    return {kind: grids[kind] & (reached.T > 0)[None, :, None, :] & (reader_live[kind] > 0)[..., None] for kind in grids}


def result_model_info(result: AttributionResult) -> ModelInfo:
    """The sizes of the model a result was computed on (``AttributionResult.model``)."""
    try:
        return ModelInfo(**{k: v for k, v in result.model.items() if k in ModelInfo.model_fields})
    except ValidationError as err:
        raise SchemaError(f"atpf.model: not a model description ({shorten(str(err).splitlines()[0], 120)})") from None


def edge_problem(result: AttributionResult) -> str | None:
    """Why ``result`` cannot give circuits (it has a selection that is not of edges, or none), or None."""
    if not result.nodes:
        return "it has no node selection"
    for name, ns in result.nodes.items():
        if ns.kind not in EDGE_READERS:
            return (f"selection {shorten(name, 80)} holds {shorten(ns.kind, 80)} nodes, not edges; circuits need a result "
                    f"whose selections are all edges ({', '.join(EDGE_READERS)})")
    return None


# ------------------------------------------------------------------------------------------ extraction
@dataclass(frozen=True)
class Circuit:
    """A set of a result's edges."""

    nodes: Tensor
    """Global node indices (``AttributionResult.numbering``), best-ranked first."""
    requested: int
    """The size asked for."""
    greedy: bool
    """Pruned greedily (else the top edges)."""

    @property
    def size(self) -> int:
        return len(self.nodes)


def extract_circuit(result: ResultLike | ResultEdges, size: int, *, greedy: bool = False) -> Circuit:
    """The circuit of ``size`` edges of an edge result: its top ``size`` edges, or with ``greedy`` the pruned top
    edges (at least ``size`` of them; see the module docstring)."""
    edges = result if isinstance(result, ResultEdges) else ResultEdges(_as_result(result))
    _check_sizes([size], "size")
    if greedy:
        _check_greedy(edges)
    nodes = edges.greedy(size) if greedy else edges.top(size)
    return Circuit(nodes, size, greedy)


def _check_sizes(sizes: Sequence[Any], option: str) -> list[int]:
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad or not sizes:
        raise PlanError(f"{option}: circuit sizes must be whole numbers of edges >= 1 (got {shorten(list(sizes))})")
    return list(sizes)


def _check_greedy(edges: ResultEdges) -> None:
    if not any(sel.reader == "logits" for sel in edges.selections):
        raise PlanError("greedy: the result has no edge_logits selection, so no edge can reach the logits and pruning keeps "
                        "nothing; score the edges into the logits too (a plan node {\"kind\": \"edge_logits\"})")


def default_sizes(n_edges: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below ``n_edges``, then ``n_edges``."""
    out, step = [], 1
    while step < n_edges:
        out += [s for s in (step, 2 * step, 5 * step) if s < n_edges]
        step *= 10
    return out + [n_edges]


# ------------------------------------------------------------------------------------------ faithfulness
class CircuitEvaluator:
    """A result's plan compiled against a backend, ready to evaluate circuits of its edges by exact patching
    (module docstring). ``metric_clean`` / ``metric_noise``: ``pair``, measured here.

    Args:
        result: an edge result (or its file).
        backend: an already loaded backend (default: load the plan's model).
        model: a model object to patch on instead of loading the plan's ``model.source``.
        saes: SAE objects for the plan's ``saes`` entries without a path or release, by name.
        circuits_per_pass: circuits sharing one forward (each as its own row block); memory grows with
            ``circuits_per_pass x pairs per batch x positions x writers x d_model``.
        unscored: what the edges the result does not score carry (``Unscored``).
    """

    def __init__(self, result: ResultLike, *, backend: AbstractBackend | None = None, model: Any = None,
                 saes: Mapping[str, Any] | None = None, circuits_per_pass: int = 8, unscored: Unscored = "noise") -> None:
        from atpframework.analysis.verify import check_same_model

        self.result = _as_result(result)
        self.edges = ResultEdges(self.result)
        if circuits_per_pass < 1:
            raise PlanError(f"circuits_per_pass: must be at least 1 (got {circuits_per_pass})")
        if unscored not in ("noise", "clean"):
            raise PlanError(f"unscored: allowed: 'noise', 'clean' (got {shorten(unscored)})")
        self.unscored: Unscored = unscored
        self.circuits_per_pass = circuits_per_pass
        plan = as_plan(self.result.plan)
        if plan.metric.name == "custom":
            raise PlanError("metric.name: circuits of results of custom metrics cannot be evaluated from the file; the metric is not stored")
        if backend is None and model is None and plan.model.source == "in_memory":
            raise PlanError("model: the result was computed on a model passed in memory (model.source 'in_memory'); pass model= or backend=")
        backend = splice_saes(plan, backend or load_backend(plan, model), saes)
        self._check_model(backend)
        compiled = compile_plan(plan, backend)
        metric = resolve_metric(plan.metric, None)
        self.batches = [(list(run.batch.pair_indices), _CircuitBatch(run, self.edges, unscored))
                        for run in batch_runs(compiled, backend, metric)]
        self.n_pairs = len(compiled.pairs)
        self.metric_clean = torch.zeros(self.n_pairs, dtype=torch.float64)
        self.metric_noise = torch.zeros(self.n_pairs, dtype=torch.float64)
        for pairs, batch in self.batches:
            self.metric_clean[pairs] = batch.metric_clean.double().cpu()
            self.metric_noise[pairs] = batch.metric_noise.double().cpu()
        check_same_model(self.result, backend.info.source,
                         [(pairs, b.metric_clean, b.metric_noise) for pairs, b in self.batches])
        self.passes = 0

    def _check_model(self, backend: AbstractBackend) -> None:
        info, mine = backend.info, self.edges.info
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_mlp", "parallel_blocks"):
            if getattr(info, name) != getattr(mine, name):
                raise PlanError(f"model: {shorten(info.source)} has {name} = {getattr(info, name)}, but the result's model had "
                                f"{getattr(mine, name)}; its edges are not this model's")
        needed = {READER_SITE[k] for k in self.edges.kinds} | {"attn_result"} | ({"mlp_out"} if info.d_mlp is not None else set())
        missing = sorted(needed - backend.supported_sites)
        if missing:
            raise PlanError(f"model: the {backend.name} backend does not serve the site(s) {missing} on this model; "
                            "circuits patch every reader's input and observe every writer")

    def metrics(self, keep: Tensor, progress: Progress = False) -> Tensor:
        """``set pair`` (float64): the metric of each circuit of ``keep`` (``set node`` booleans)."""
        keep = keep.to(torch.bool).cpu()
        if keep.dim() != 2 or keep.shape[1] != self.edges.n_nodes:
            raise ValueError(f"keep: expected set x {self.edges.n_nodes} booleans, got shape {tuple(keep.shape)}")
        out = torch.zeros(len(keep), self.n_pairs, dtype=torch.float64)
        with Bar(progress, len(keep), "circuits: patching", "circuit") as bar:
            for lo in range(0, len(keep), self.circuits_per_pass):
                chunk = keep[lo : lo + self.circuits_per_pass]
                for pairs, batch in self.batches:
                    out[lo : lo + len(chunk), pairs] = batch.patched_metric(chunk).double().cpu()
                    self.passes += 1
                bar.update(len(chunk))
        return out

    def faithfulness(self, keep: Tensor, progress: Progress = False) -> tuple[Tensor, Tensor]:
        """For each circuit of ``keep`` (``set node`` booleans): the faithfulness (``set``, mean numerator over
        mean denominator) and the per-pair ratios (``set pair``)."""
        values = self.metrics(keep, progress)
        return faithfulness_of(values, self.metric_clean, self.metric_noise)

    def keep(self, circuits: Sequence[Circuit | Tensor]) -> Tensor:
        """``set node`` booleans of circuits (or tensors of global node indices)."""
        out = torch.zeros(len(circuits), self.edges.n_nodes, dtype=torch.bool)
        for i, c in enumerate(circuits):
            out[i, c.nodes if isinstance(c, Circuit) else c] = True
        return out


def faithfulness_of(values: Tensor, metric_clean: Tensor, metric_noise: Tensor) -> tuple[Tensor, Tensor]:
    """From circuit metrics ``set pair``: faithfulness ``set`` (mean of ``m(C) - m(noise)`` over the mean of
    ``m(clean) - m(noise)``) and the per-pair ratios ``set pair``."""
    numerators = values - metric_noise[None]
    denominators = (metric_clean - metric_noise)[None]
    return numerators.mean(1) / denominators.mean(1), numerators / denominators


class _CircuitBatch:
    """The noise writers and the clean metric of one batch, and circuit forwards over it."""

    def __init__(self, run: BatchRun, edges: ResultEdges, unscored: Unscored) -> None:
        self.run, self.edges, self.unscored = run, edges, unscored
        info = run.backend.info
        self.n_writers = writer_count(info)
        self.writer_sites = writer_sites(info, self.n_writers)
        self.n_batch, self.seq_len = run.clean_tokens.shape
        noise = Intervention()
        captured = noise.capture(self.writer_sites)
        with torch.no_grad():
            logits = noise.run(run.backend, run.noise_tokens)
            self.metric_noise = run.metric(logits, run.metric_inputs(run.noise_tokens))
        self.noise_writers = stack_writers(info, captured, self.n_writers).permute(1, 2, 0, 3)  # pos writer batch d_model
        clean = Intervention()
        for site in self.writer_sites:  # observed as in the circuit forwards, so the same model configuration runs
            clean.observe(site, _ignore)
        with torch.no_grad():
            logits = clean.run(run.backend, run.clean_tokens)
            self.metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
        self._first = {}
        at = 0
        for site in self.writer_sites:
            self._first[site] = at
            at += info.n_heads if site.name == "attn_result" else 1

    def patched_metric(self, keep: Tensor) -> Tensor:
        """``set batch``: the metric of each circuit of ``keep`` (``set node``)."""
        n_sets = keep.shape[0]
        patch = self.edges.patch_grids(keep, self.seq_len, self.unscored)
        noise = self.noise_writers
        delta = torch.zeros(n_sets, self.seq_len, self.n_writers, self.n_batch, noise.shape[-1], dtype=noise.dtype, device=noise.device)
        """``set pos writer batch d_model``: u(noise) - u(this forward), filled as the writers are computed."""
        forward = Intervention()
        for site in self.writer_sites:
            forward.observe(site, partial(self._keep_delta, delta, site))
        for kind, grid in patch.items():
            for row in range(grid.shape[1]):
                site = self.edges.reader_site(kind, row)
                upstream = upstream_count(self.edges.info, site)
                mask = grid[:, row, :, :, :upstream]  # set pos head upstream
                if bool(mask.any()):
                    forward.patch(site, partial(_correct, mask.to(device=noise.device, dtype=noise.dtype), delta, upstream))
        tokens = self.run.clean_tokens.repeat(n_sets, 1)
        with torch.no_grad():
            logits = forward.run(self.run.backend, tokens)
            values = self.run.metric(logits, self.run.metric_inputs(tokens, repeat=n_sets))
        return values.view(n_sets, self.n_batch)

    def _keep_delta(self, delta: Tensor, site: Site, act: Tensor) -> None:
        """Observer at a writer site: store ``u(noise) - act`` for its writers."""
        n_sets = delta.shape[0]
        acts = act.detach() if site.name == "attn_result" else act.detach()[:, :, None]  # rows pos writers d_model
        first = self._first[site]
        count = acts.shape[2]
        blocks = acts.reshape(n_sets, self.n_batch, self.seq_len, count, -1).permute(0, 2, 3, 1, 4)  # set pos writers batch d
        delta[:, :, first : first + count] = self.noise_writers[None, :, first : first + count] - blocks


def _ignore(act: Tensor) -> None:
    """An observer that keeps nothing (it makes the backend serve the site)."""


def _correct(mask: Tensor, delta: Tensor, upstream: int, act: Tensor) -> Tensor:
    """Patch at a reader input: ``act + sum over the patched writers of delta`` per row block.

    ``mask``: ``set pos head upstream`` (0/1); ``delta``: ``set pos writer batch d_model``; ``act``: ``(set batch) pos
    [head] d_model``."""
    n_sets, seq_len, heads, _ = mask.shape
    moved = delta[:, :, :upstream].reshape(n_sets * seq_len, upstream, -1)  # (set pos) upstream (batch d)
    added = torch.bmm(mask.reshape(n_sets * seq_len, heads, upstream), moved)  # (set pos) head (batch d)
    n_batch = delta.shape[3]
    added = added.view(n_sets, seq_len, heads, n_batch, -1).permute(0, 3, 1, 2, 4).reshape(n_sets * n_batch, seq_len, heads, -1)
    return act + (added if act.dim() == 4 else added[:, :, 0]).to(act.dtype)


# ------------------------------------------------------------------------------------------ curves
@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of one result's circuits over circuit sizes."""

    label: str
    """The result's name in tables and plots (its method, or method and file when methods repeat)."""
    method: str
    n_edges: int
    greedy: bool
    unscored: str
    requested: list[int]
    """The sizes asked for (each at most ``n_edges``)."""
    sizes: list[int]
    """The sizes of the circuits evaluated (greedy circuits may be larger than asked)."""
    faithfulness: Tensor
    """``size``: mean numerator over mean denominator (module docstring)."""
    per_pair: Tensor
    """``size pair``: the per-pair ratios."""
    empty: float
    """Faithfulness of the empty circuit (0 up to rounding)."""
    full: float
    """Faithfulness of the circuit of every edge (1 up to rounding)."""
    circuits: list[Tensor] = field(repr=False)
    """Per size, the circuit's global node indices (best-ranked first)."""
    wall_s: float = 0.0
    """Wall time of extraction and patching."""
    passes: int = 0
    """Patched forward passes run (each over up to ``circuits_per_pass`` circuits of one batch)."""

    @property
    def areas(self) -> dict[str, float]:
        """MIB's areas on both x axes: ``cpr_log``, ``cmd_log``, ``cpr_fraction``, ``cmd_fraction`` (module docstring)."""
        return curve_areas(self.sizes, self.faithfulness, self.n_edges, self.empty, self.full)

    def rows(self) -> list[dict[str, Any]]:
        """One row per size: what ``circuit.csv`` holds."""
        rows = []
        for i, (asked, size) in enumerate(zip(self.requested, self.sizes)):
            ratios = self.per_pair[i]
            finite = ratios[ratios.isfinite()]
            rows.append({
                "method": self.label, "size": size, "requested": asked, "fraction": size / self.n_edges,
                "greedy": self.greedy, "faithfulness": float(self.faithfulness[i]),
                "pair_mean": _stat(finite, "mean"), "pair_std": _stat(finite, "std"),
                "pair_min": _stat(finite, "min"), "pair_max": _stat(finite, "max"),
            })
        return rows

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.label, "result_method": self.method, "n_edges": self.n_edges, "greedy": self.greedy,
            "unscored": self.unscored, "empty": self.empty, "full": self.full, "areas": self.areas,
            "wall_s": self.wall_s, "passes": self.passes, "points": self.rows(),
        }


def _stat(values: Tensor, how: str) -> float:
    if values.numel() == 0:
        return math.nan
    if how == "std":
        return float(values.std(unbiased=False))
    return float(getattr(values, how)())


def curve_areas(sizes: Sequence[int], faithfulness: Tensor, n_edges: int, empty: float, full: float) -> dict[str, float]:
    """CPR (area under faithfulness) and CMD (area under ``|1 - faithfulness|``) by the trapezoid rule over x in
    [0, 1]: ``x = ln(size) / ln(n_edges)`` (``*_log``) and ``x = size / n_edges`` (``*_fraction``). The circuit of
    every edge closes each curve at x = 1; the empty circuit opens it at x = 0 (on the log axis: at size 1, when no
    circuit of one edge was evaluated: below its first circuit a method offers none smaller than the empty one)."""
    points = dict(zip((int(s) for s in sizes), (float(f) for f in faithfulness)))
    points[n_edges] = full
    out = {}
    for axis, start, x in (("fraction", 0, lambda s: s / n_edges), ("log", 1, lambda s: math.log(s) / math.log(n_edges))):
        curve = sorted({start: empty, **points}.items()) if n_edges > 1 else [(0, empty), (1, full)]
        xs = [x(s) for s, _ in curve] if n_edges > 1 else [0.0, 1.0]
        ys = [f for _, f in curve]
        out[f"cpr_{axis}"], out[f"cmd_{axis}"] = _trapezoid(xs, ys), _trapezoid(xs, [abs(1 - y) for y in ys])
    return {k: out[k] for k in ("cpr_log", "cmd_log", "cpr_fraction", "cmd_fraction")}


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


def circuit_faithfulness(
    result: ResultLike,
    sizes: Sequence[int] | None = None,
    *,
    greedy: bool = False,
    unscored: Unscored = "noise",
    circuits_per_pass: int = 8,
    label: str | None = None,
    backend: AbstractBackend | None = None,
    model: Any = None,
    saes: Mapping[str, Any] | None = None,
    evaluator: CircuitEvaluator | None = None,
    progress: Progress = True,
) -> FaithfulnessCurve:
    """Faithfulness of an edge result's circuits over ``sizes`` (default ``default_sizes``: 1, 2, 5, ... all edges).

    Args:
        result: an edge result (every selection of edges) or its file.
        sizes: circuit sizes in edges, each >= 1; sizes above the result's edge count mean every edge.
        greedy: prune dangling edges (greedy circuits) instead of taking the top edges.
        unscored: what edges the result does not score carry (``"noise"``: outside every circuit; ``"clean"``: kept).
        circuits_per_pass: circuits sharing one forward pass.
        label: the curve's name (default: the result's method).
        backend: an already loaded backend to patch on (default: load the plan's model).
        model: a model object to patch on instead of loading the plan's ``model.source``.
        saes: SAE objects for the plan's ``saes`` entries without a path or release, by name.
        evaluator: a ``CircuitEvaluator`` to reuse (its backend and options win), of this result or of another result
            of the same edges and prompts (another method's): the circuits are ``result``'s, the patching the evaluator's.
        progress: ``True``: a progress bar on stderr; ``False``: none; a callable: called with the circuits done.
    """
    started = time.perf_counter()
    result = _as_result(result)
    if evaluator is None:
        evaluator = CircuitEvaluator(result, backend=backend, model=model, saes=saes, circuits_per_pass=circuits_per_pass,
                                     unscored=unscored)
    edges = evaluator.edges if evaluator.result is result else ResultEdges(result)
    if edges.n_nodes != evaluator.edges.n_nodes or result.plan["prompts"] != evaluator.result.plan["prompts"]:
        raise PlanError("evaluator: it patches another plan's edges or prompts than this result's")
    asked = sorted(set(_check_sizes(list(sizes), "sizes"))) if sizes is not None else default_sizes(edges.n_edges)
    asked = sorted({min(s, edges.n_edges) for s in asked})
    if greedy:
        _check_greedy(edges)
    circuits = edges.greedy_many(asked) if greedy else [edges.top(n) for n in asked]
    passes_before = evaluator.passes
    keep = evaluator.keep([torch.zeros(0, dtype=torch.long), edges.ranking, *circuits])
    values, per_pair = evaluator.faithfulness(keep, progress)
    return FaithfulnessCurve(
        label or result.method, result.method, edges.n_edges, greedy, evaluator.unscored, asked, [len(c) for c in circuits],
        values[2:], per_pair[2:], float(values[0]), float(values[1]), circuits, time.perf_counter() - started,
        evaluator.passes - passes_before,
    )


def _as_result(result: ResultLike) -> AttributionResult:
    return result if isinstance(result, AttributionResult) else load_result(result)


# ------------------------------------------------------------------------------------------ the graph
def circuit_graph(result: AttributionResult, nodes: Tensor, *, edges: ResultEdges | None = None) -> dict[str, Any]:
    """The circuit of global node indices ``nodes`` as a graph between components: ``nodes`` (``id`` such as
    ``embed``, ``L3H1``, ``L5 MLP``, ``L2 KV0`` (a key/value head shared by a group of query heads), ``logits``;
    ``kind``, ``layer``, ``head``) and ``edges`` (``source``, ``target``, ``reader`` (q, k, v, mlp, logits),
    ``positions`` (position labels, or ``"all"``), ``score`` (summed signed mean over pairs), ``magnitude``
    (summed ranking score), ``nodes`` (how many result nodes it merges)). A node over several writers or
    reader heads gives one graph edge per pair of them; graph edges differing only in position are merged."""
    edges = edges or ResultEdges(result)
    info = edges.info
    writers = writer_labels(info)
    signed = torch.cat([ns.aggregate("mean").flatten().double() for ns in result.nodes.values()])
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    components: dict[str, dict[str, Any]] = {}
    for node in nodes.tolist():
        sel = next(s for s in edges.selections if s.offset <= node < s.offset + s.n_nodes)
        coords = torch.unravel_index(torch.tensor(node - sel.offset), sel.shape)
        entry = [int(c) for c in coords]
        layers, positions, *rest = sel.labels
        layer_list = _covered(layers, entry[0], 1 if sel.reader == "logits" else info.n_layers)
        heads_all = {"q": info.n_heads, "k": info.n_kv_heads, "v": info.n_kv_heads}.get(sel.reader, 1)
        head_list = _covered(rest[0], entry[2], heads_all) if len(rest) == 2 else [0]
        writer_list = _covered(rest[-1], entry[-1], edges.n_writers)
        position: Any = "all" if positions == "all" else positions[entry[1]]
        for row in layer_list:
            up = upstream_count(info, edges.reader_site(sel.reader, row))
            for head in head_list:
                target = _component(components, info, sel.reader, row, head)
                for w in writer_list:
                    if w >= up:
                        continue
                    source = _writer_component(components, info, writers, w)
                    key = (source, target, sel.reader)
                    item = merged.setdefault(key, {"source": source, "target": target, "reader": sel.reader,
                                                   "positions": [], "score": 0.0, "magnitude": 0.0, "nodes": 0})
                    if position == "all" or item["positions"] == "all":
                        item["positions"] = "all"
                    elif position not in item["positions"]:
                        item["positions"].append(position)
                    item["score"] += float(signed[node])
                    item["magnitude"] += float(edges.scores[node])
                    item["nodes"] += 1
    order = {name: i for i, name in enumerate(["embed", *writers[1:], "logits"])}
    listed = sorted(components.values(), key=lambda c: (c.get("layer", -1) if c["kind"] != "logits" else math.inf,
                                                        order.get(c["id"], 0.5), c["id"]))
    return {"nodes": listed, "edges": sorted(merged.values(), key=lambda e: -e["magnitude"])}


def _covered(labels: list[int] | str, entry: int, size: int) -> list[int]:
    return [labels[entry]] if isinstance(labels, list) else list(range(size))


def _writer_component(components: dict[str, dict[str, Any]], info: ModelInfo, writers: list[str], w: int) -> str:
    name = writers[w]
    if name not in components:
        if w == 0:
            components[name] = {"id": name, "kind": "embed"}
        else:
            per_block = info.n_heads + (info.d_mlp is not None)
            layer, slot = divmod(w - 1, per_block)
            components[name] = ({"id": name, "kind": "mlp", "layer": layer} if slot == info.n_heads
                                else {"id": name, "kind": "head", "layer": layer, "head": slot})
    return name


def _component(components: dict[str, dict[str, Any]], info: ModelInfo, reader: str, layer: int, head: int) -> str:
    if reader == "logits":
        components.setdefault("logits", {"id": "logits", "kind": "logits"})
        return "logits"
    if reader == "mlp":
        name = f"L{layer} MLP"
        components.setdefault(name, {"id": name, "kind": "mlp", "layer": layer})
        return name
    if reader == "q" or info.n_kv_heads == info.n_heads:
        name = f"L{layer}H{head}"
        components.setdefault(name, {"id": name, "kind": "head", "layer": layer, "head": head})
        return name
    group = info.n_heads // info.n_kv_heads
    name = f"L{layer} KV{head}"
    components.setdefault(name, {"id": name, "kind": "kv_head", "layer": layer, "kv_head": head,
                                 "heads": [f"L{layer}H{h}" for h in range(head * group, (head + 1) * group)]})
    return name


def graph_dot(graph: Mapping[str, Any], title: str = "circuit") -> str:
    """Graphviz DOT text of a ``circuit_graph``: components bottom (embeddings) to top (logits), one arrow per
    edge labelled with its reader (q, k, v, mlp, logits), width by magnitude, blue for a positive signed mean
    and red for a negative one; a key/value head shared by a group has dashed lines to its query heads (dotted
    when no edge of the circuit touches them)."""
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quoted(title)} {{", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
    shapes = {"embed": "invhouse", "logits": "house", "mlp": "box", "head": "ellipse", "kv_head": "diamond"}
    listed = {node["id"] for node in graph["nodes"]}
    for node in graph["nodes"]:
        lines.append(f"  {quoted(node['id'])} [shape={shapes.get(node['kind'], 'box')}];")
        for head in node.get("heads", []):
            if head not in listed:
                lines.append(f"  {quoted(head)} [shape=ellipse, style=dotted];")
                listed.add(head)
            lines.append(f"  {quoted(node['id'])} -> {quoted(head)} [style=dashed, arrowhead=none];")
    largest = max((e["magnitude"] for e in graph["edges"]), default=0.0) or 1.0
    for e in graph["edges"]:
        width = 0.5 + 3.5 * e["magnitude"] / largest
        color = "#1f77b4" if e["score"] >= 0 else "#d62728"
        lines.append(f"  {quoted(e['source'])} -> {quoted(e['target'])} [label={quoted(e['reader'])}, penwidth={width:.2f}, "
                     f"color={quoted(color)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ files
def write_circuit_outputs(curves: Sequence[FaithfulnessCurve], out_dir: str | Path, *, graph: Mapping[str, Any] | None = None,
                          title: str = "") -> list[Path]:
    """Write ``circuit.csv`` (a row per curve and size), ``circuit.json`` (the curves, their areas and the
    definitions), ``faithfulness.png`` and, given ``graph`` (``circuit_graph`` plus ``method``/``size``/
    ``faithfulness`` entries), ``circuit_graph.json`` and ``circuit.dot``, atomically; returns the paths."""
    from atpframework.analysis.plots import plot_faithfulness

    out = Path(out_dir)
    written = []
    text = io.StringIO()
    columns = ["method", "size", "requested", "fraction", "greedy", "faithfulness", "pair_mean", "pair_std", "pair_min", "pair_max"]
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for curve in curves:
        for row in curve.rows():
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    written.append(write_text_atomically(out / "circuit.csv", text.getvalue()))
    document = {"definitions": DEFINITIONS, "curves": [c.as_json() for c in curves]}
    written.append(write_text_atomically(out / "circuit.json", json.dumps(document, indent=2, allow_nan=True)))
    written.append(plot_faithfulness([(c.label, c.sizes, c.faithfulness) for c in curves], out / "faithfulness.png", title=title))
    if graph is not None:
        written.append(write_text_atomically(out / "circuit_graph.json", json.dumps(graph, indent=2)))
        written.append(write_text_atomically(out / "circuit.dot", graph_dot(graph)))
    return written


DEFINITIONS = {
    "ranking": "edges by |mean over pairs of the stored score|, descending; ties by global node order",
    "top-n": "the n best-ranked edges",
    "greedy": ("the smallest prefix of the ranking whose pruned set holds >= n edges; pruning keeps an edge on a path "
               "embeddings -> logits through kept edges, components at positions (key/value at s feeds outputs at t >= s)"),
    "faithfulness": "mean over pairs of (m(circuit) - m(noise)) divided by mean over pairs of (m(clean) - m(noise))",
    "circuit forward": ("edges outside the circuit carry their writer's noise-run value, edges inside the writer's value in the "
                        "same forward"),
    "cpr": "area under the faithfulness curve (trapezoid); higher is better",
    "cmd": "area under |1 - faithfulness| (trapezoid); lower is better",
    "x axes": ("log: ln(size)/ln(n_edges); fraction: size/n_edges; both from 0 (the empty circuit; on the log axis at size 1 "
               "unless a 1-edge circuit was evaluated) to 1 (every edge)"),
}
"""What ``circuit.json`` says its numbers mean."""


def describe_graph(curve: FaithfulnessCurve, index: int, result: AttributionResult, edges: ResultEdges | None = None) -> dict[str, Any]:
    """``circuit_graph`` of the curve's circuit ``index``, with the method, sizes and faithfulness beside it."""
    graph = circuit_graph(result, curve.circuits[index], edges=edges)
    return {"method": curve.label, "size": curve.sizes[index], "requested": curve.requested[index], "greedy": curve.greedy,
            "faithfulness": float(curve.faithfulness[index]), **graph}


def curve_labels(results: Sequence[AttributionResult], names: Sequence[str]) -> list[str]:
    """A label per result: its method, or ``method (name)`` where several results share a method."""
    methods = [r.method for r in results]
    return [m if methods.count(m) == 1 else f"{m} ({n})" for m, n in zip(methods, names)]

