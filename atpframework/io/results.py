"""Attribution results: the typed in-memory result and its safetensors file format.

File layout (spec in ``docs/result-format.md``): tensors ``scores.<name>`` (``pair layer *axes``,
float32, per-pair effects as ``atpf.sign_convention`` says; or sparse: ``scores.<name>.indices`` and
``scores.<name>.values`` in COO form), ``metric.clean`` and ``metric.noise`` (``pair``),
``tokens.clean`` and ``tokens.noise`` (``pair pos``, int64, right-padded with -1) and
``tokens.length`` (``pair``) with their decoded strings in ``atpf.token_strings``; optional ``extras.<name>.<statistic>`` (``pair layer *axes``, e.g.
standard errors) and, after ``atpf verify``, ``verified.<name>.index`` / ``.rank`` (``verified``,
int64 flat node indices and their place in the verification order) and ``verified.<name>.effects``
(``pair verified``, exact effects); string metadata under ``atpf.*`` keys. Files are written atomically
(a temporary file in the same directory, then ``os.replace``). ``load_result`` checks every size the metadata
claims against the stored tensors before allocating anything, and refuses malformed files with ``SchemaError``.
"""

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from html import escape
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from atpframework.errors import SchemaError, shorten
from atpframework.io.files import write_atomically
from atpframework.io.tables import render_table, text_table

if TYPE_CHECKING:  # types only: the analysis layer sits below this one
    from atpframework.analysis.figures import ResultPlots
    from atpframework.analysis.verify import Diagnosis

RESULT_SCHEMA = "atpf.result"
"""Schema id written to ``atpf.schema``."""
RESULT_SCHEMA_VERSION = 4
"""Schema version written to ``atpf.schema_version``; files with a newer version are refused.
2 added sparse score tensors (``scores.<name>.indices`` / ``.values``); 3 added ``extras.*``,
``verified.*`` and ``atpf.verification``; 4 added ``atpf.token_strings`` (each prompt token decoded) and
GradDrop's ``extras.<name>.signed``. Older files read unchanged (without token strings:
``AttributionResult.with_token_strings`` adds them from a tokenizer)."""
SIGN_CONVENTION = "effect = metric(clean run with node <- its noise-run value) - metric(clean run)"
"""What the per-pair scores of signed methods (``activation_patching``, ``atp``, ``atp_qkfix``) are."""
GRADDROP_CONVENTION = (
    "score = 1/(T-1) * sum over the T dropped residual-stream writes of |first-order estimate of the effect "
    "with that write stop-gradiented|, non-negative; effect = metric(clean run with node <- its noise-run value) - metric(clean run)"
)
"""What the per-pair scores of ``atp_graddrop`` and ``atp_star`` are."""

Aggregate = Literal["mean_abs", "mean"]
"""How per-pair scores combine: mean of absolute values (the paper's convention) or signed mean."""


@dataclass(frozen=True)
class NodeScores:
    """Scores of one plan node selection."""

    name: str
    """The selection's result name (the plan entry's ``name``, else its ``kind``)."""
    kind: str
    """The node type (``attn_head``, ``mlp_neuron``, ...)."""
    dims: tuple[str, ...]
    """Axis names of ``per_pair``: ``pair`` then ``layer`` then the node type's index axes."""
    index: dict[str, list[int] | str]
    """Per axis after ``pair``: the model index of each entry, or ``"all"`` (summed into one entry)."""
    per_pair: Tensor
    """Score per pair and node (``atpf.sign_convention``); a sparse COO tensor when the selection kept
    only its top entries (``keep_top``)."""

    def aggregate(self, how: Aggregate = "mean_abs") -> Tensor:
        """Combine pairs: ``mean_abs`` (default) or signed ``mean``; shape ``layer *axes``.

        Sparse scores (``keep_top``) count the entries that were not kept as 0. The result is dense: it
        materialises every node the labels describe (up to ``MAX_NODES`` floats, 8 GiB), however few entries a
        sparse selection stores; ``AttributionResult.top_k`` ranks sparse selections without it."""
        if how not in ("mean_abs", "mean"):
            raise ValueError(f"aggregate: allowed: 'mean_abs', 'mean' (got {how!r})")
        values = self.per_pair.abs() if how == "mean_abs" else self.per_pair
        if values.is_sparse:
            return torch.sparse.sum(values, dim=0).to_dense() / values.shape[0]
        return values.mean(dim=0)


@dataclass(frozen=True)
class VerifiedNodes:
    """Exact effects of some nodes of one selection, measured after the run (``atpf verify``)."""

    index: Tensor
    """``verified``: flat indices into the selection's ``layer *axes``."""
    rank: Tensor
    """``verified``: each node's place in the verification order (0 first, across all selections)."""
    effects: Tensor
    """``pair verified``: metric(clean with the node patched) - metric(clean)."""


@dataclass(frozen=True)
class TopNode:
    """One row of ``AttributionResult.top_k``."""

    name: str
    """The node's selection (result name)."""
    kind: str
    """The node type."""
    coords: dict[str, int | str]
    """Model index per axis (``"all"`` for summed axes)."""
    score: float
    """The aggregate score used for ranking."""
    signed_mean: float
    """Mean over pairs of the stored per-pair scores (for GradDrop methods, of magnitudes)."""
    signed_estimate: float = math.nan
    """Mean over pairs of the signed estimate: ``signed_mean`` for signed methods, the plain AtP or
    QK-fix value for GradDrop methods (``extras.<name>.signed``; NaN in files without it)."""
    token: str = ""
    """The prompt token at the node's position, quoted (``'" to"'``; several pairs' tokens joined by ``/``),
    empty when the node has no single position or the result has no token strings."""
    position: str = ""
    """The node's position as the label shows it (the absolute index when every prompt has the same length)."""
    writer: str = ""
    """Edges: the writer's name (``L3H1``, ``L3 MLP``, ``embed``), shown as ``L3H1 -> ...`` before the reader."""

    def label(self) -> str:
        """``attn_head L23 H3 @ " to" (pos 13)``; ``P13`` in place of the token when the result has no token strings.
        Edges: ``edge_q L3H1 -> L5 H2 @ " to" (pos 13)``."""
        parts = [f"{self.writer} ->"] if self.writer else []
        for dim, value in self.coords.items():
            if (dim == "pos" and self.token) or (dim == "writer" and self.writer):
                continue
            short = {"layer": "L", "head": "H", "pos": "P", "neuron": "N"}.get(dim, dim)
            parts.append(f"{short}{value}" if value != "all" else f"{short}*")
        text = f"{self.name} " + " ".join(parts)
        return f"{text} @ {self.token} (pos {self.position})" if self.token else text


class TopNodes(list[TopNode]):
    """``AttributionResult.top_k``'s rows: a list of ``TopNode`` that prints as a table (and as an HTML table
    in a notebook)."""

    def __init__(self, rows: Iterable[TopNode] = (), score_name: str = "score") -> None:
        super().__init__(rows)
        self.score_name = score_name

    def _cells(self) -> list[tuple[str, str, str, str]]:
        return [(str(i), row.label(), f"{row.score:.5g}", f"{row.signed_estimate:.5g}") for i, row in enumerate(self, start=1)]

    def __repr__(self) -> str:
        if not self:
            return "(no nodes)"
        table = text_table("rank", "<node", self.score_name, "signed estimate")
        for cells in self._cells():
            table.add_row(*cells)
        return render_table(table)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{escape(h)}</th>" for h in ("rank", "node", self.score_name, "signed estimate"))
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in self._cells())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class NodeNumbering:
    """One number per node over several node selections, in order: the *global node index*.

    Selection ``i``'s node at flat index ``n`` (row-major over its shape ``layer *axes``) is node
    ``offsets[i] + n``. Verification, the exact patcher and the CLI's labels all count nodes this way.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        """``offsets[i]``: the global index of selection ``i``'s first node; the last entry is the node count."""
        out = [0]
        for shape in self.shapes:
            out.append(out[-1] + math.prod(shape))
        return tuple(out)

    @property
    def n_nodes(self) -> int:
        return self.offsets[-1]

    def global_index(self, selection: int, flat: Tensor) -> Tensor:
        """Global indices of selection ``selection``'s flat node indices ``flat``."""
        return flat + self.offsets[selection]

    def by_selection(self, nodes: Tensor) -> dict[int, Tensor]:
        """Global indices ``nodes`` -> selection index -> those nodes' flat indices in it (selections without any left out)."""
        offsets, out = self.offsets, {}
        for i in range(len(self.names)):
            pick = (nodes >= offsets[i]) & (nodes < offsets[i + 1])
            if bool(pick.any()):
                out[i] = (nodes[pick] - offsets[i]).long()
        return out

    def split(self, values: Tensor) -> dict[str, Tensor]:
        """``... node`` over global indices -> per selection name ``... layer *axes``."""
        offsets = self.offsets
        return {
            name: values[..., offsets[i] : offsets[i + 1]].reshape(values.shape[:-1] + shape)
            for i, (name, shape) in enumerate(zip(self.names, self.shapes))
        }

    def locate(self, node: int) -> tuple[str, tuple[int, ...]]:
        """The selection name and the coordinates (``layer *axes``) of global node ``node``."""
        offsets = self.offsets
        if not 0 <= node < offsets[-1]:
            raise IndexError(f"node {node} out of range (0..{offsets[-1] - 1})")
        i = max(j for j in range(len(self.names)) if offsets[j] <= node)
        coords = torch.unravel_index(torch.tensor(node - offsets[i]), self.shapes[i])
        return self.names[i], tuple(int(c) for c in coords)


@dataclass(frozen=True)
class AttributionResult:
    """Per-pair node effects with everything needed to reproduce and interpret them."""

    nodes: dict[str, NodeScores]
    """The scores of each node selection of the plan, by result name (``result["heads"]`` reads one)."""
    metric_clean: Tensor
    """``pair``: metric on the clean prompt."""
    metric_noise: Tensor
    """``pair``: metric on the noise prompt."""
    clean_tokens: list[list[int]]
    """Each clean prompt's token ids (padding removed)."""
    noise_tokens: list[list[int]]
    """Each noise prompt's token ids (padding removed)."""
    plan_json: str
    """Canonical plan JSON."""
    method: str
    """The method's name (``atp``, ``atp_star``, ``activation_patching``, ...)."""
    metric: str
    """The metric's name (``logit_diff``, ...)."""
    model: dict[str, Any]
    """The loaded model's description (source, architecture, sizes, dtype, device; the SAEs spliced in)."""
    versions: dict[str, str] = field(default_factory=dict)
    """Installed versions of atpframework, torch and the model libraries when the result was made."""
    created: str = ""
    """Creation time, ISO 8601 UTC (``2026-11-25T09:48:42Z``)."""
    sign_convention: str = SIGN_CONVENTION
    """What the per-pair scores mean (``SIGN_CONVENTION`` or ``GRADDROP_CONVENTION``)."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Per-node statistics beside the scores: ``"<name>.<statistic>"`` -> ``pair layer *axes``."""
    verified: dict[str, VerifiedNodes] = field(default_factory=dict)
    """Exact effects of verified nodes, by selection name."""
    verification: dict[str, Any] = field(default_factory=dict)
    """How the verification ran (order, budget, stop reason, threshold, passes)."""
    clean_strings: list[list[str]] = field(default_factory=list)
    """Each clean prompt's tokens decoded one by one (``" Mary"``); empty when unknown (no tokenizer, or a
    file older than schema 4; ``with_token_strings`` adds them)."""
    noise_strings: list[list[str]] = field(default_factory=list)
    """Each noise prompt's tokens decoded, like ``clean_strings``."""

    def with_token_strings(self, decode: Callable[[list[int]], list[str]]) -> "AttributionResult":
        """This result with ``clean_strings`` / ``noise_strings`` decoded by ``decode`` (token ids -> one string per
        id), e.g. for a file written before schema 4: ``result.with_token_strings(lambda ids: [tokenizer.decode([i]) for i in ids])``
        or ``lambda ids: model.to_str_tokens(torch.tensor(ids), prepend_bos=False)``."""
        clean = [list(decode(list(t))) for t in self.clean_tokens]
        noise = [list(decode(list(t))) for t in self.noise_tokens]
        for which, strings, tokens in (("clean", clean, self.clean_tokens), ("noise", noise, self.noise_tokens)):
            for i, (s, t) in enumerate(zip(strings, tokens)):
                if len(s) != len(t):
                    raise ValueError(f"with_token_strings: decode returned {len(s)} strings for the {len(t)} tokens of {which} prompt {i}")
        return replace(self, clean_strings=clean, noise_strings=noise)

    def position_text(self, pos: int | str) -> tuple[str, str]:
        """The quoted clean-prompt token at position label ``pos`` and the position as labels show it.

        ``pos`` is a position as the result's ``pos`` axis labels it (negative counts from the end). When the
        prompts differ there, up to two distinct tokens are joined by ``/`` (``'" Mary"/" John"/…'``). Returns
        ``("", str(pos))`` without token strings or for a merged position (``"all"``)."""
        if pos == "all" or not self.clean_strings:
            return "", str(pos)
        seen: list[str] = []
        absolute = set()
        for strings in self.clean_strings:
            at = int(pos) if int(pos) >= 0 else len(strings) + int(pos)
            absolute.add(at)
            if 0 <= at < len(strings) and strings[at] not in seen:
                seen.append(strings[at])
        quoted = "/".join(json.dumps(t, ensure_ascii=False) for t in seen[:2]) + ("/…" if len(seen) > 2 else "")
        return quoted, str(absolute.pop()) if len(absolute) == 1 else str(pos)

    @property
    def plan(self) -> dict[str, Any]:
        """The plan that produced this result, as a dict (canonical: every default filled in)."""
        return json.loads(self.plan_json)

    def scores(self, name: str, how: Aggregate = "mean_abs") -> Tensor:
        """Aggregated scores of one node selection, shape ``layer *axes``."""
        return self[name].aggregate(how)

    def __getitem__(self, name: str) -> NodeScores:
        if name not in self.nodes:
            raise KeyError(f"no node selection {name!r} in this result; have: {', '.join(self.nodes)}")
        return self.nodes[name]

    @property
    def numbering(self) -> NodeNumbering:
        """The global node index over this result's selections, in file order."""
        return NodeNumbering(tuple(self.nodes), tuple(tuple(ns.per_pair.shape[1:]) for ns in self.nodes.values()))

    def top_k(self, k: int = 10, how: Aggregate = "mean_abs", names: list[str] | None = None) -> TopNodes:
        """The ``k`` nodes with the largest ``|score|`` across the chosen selections (all by default).

        The order is fixed: nonzero scores by ``|score|`` descending, then zero scores, then NaN scores last of
        all; equal ``|score|`` (the zeros among themselves, the NaNs among themselves) in selection order
        (``names``, else the result's), then by ascending flat node index (row-major over ``layer *axes``).
        A sparse selection (``keep_top``) is ranked from its stored entries alone: the nodes it does not store
        score exactly 0 and are enumerated by flat index as needed, so memory and time grow with the stored
        entries and ``k``, never with the dense shape the labels describe."""
        if how not in ("mean_abs", "mean"):
            raise ValueError(f"top_k: allowed: 'mean_abs', 'mean' (got {how!r})")
        if k < 0:
            raise ValueError(f"top_k: k must be >= 0 (got {k})")
        rows: list[TopNode] = []
        for name in names or list(self.nodes):
            ns = self[name]
            flat, score, signed = _ranked(ns, k, how)
            estimate = signed if self.sign_convention != GRADDROP_CONVENTION else _graddrop_signed(self.extras, name, flat)
            for i, s, m, e in zip(flat.tolist(), score.tolist(), signed.tolist(), estimate.tolist()):
                rows.append(self._top_node(ns, i, s, m, e))
        rows.sort(key=lambda r: (math.isnan(r.score), -abs(r.score)))  # stable: ties keep the order above
        return TopNodes(rows[:k], "mean |score|" if how == "mean_abs" else "signed mean score")

    def _top_node(self, ns: NodeScores, flat: int, score: float, signed_mean: float, estimate: float) -> TopNode:
        coords = torch.unravel_index(torch.tensor(flat), tuple(ns.per_pair.shape[1:]))
        named = {dim: _label(ns.index[dim], int(c)) for dim, c in zip(ns.dims[1:], coords)}
        token, position = self.position_text(named["pos"]) if "pos" in named else ("", "")
        writer = ""
        if "writer" in named and named["writer"] != "all" and "n_heads" in self.model:
            writer = writer_name(int(named["writer"]), int(self.model["n_heads"]), self.model.get("d_mlp") is not None)
        return TopNode(ns.name, ns.kind, named, score, signed_mean, estimate, token, position, writer)

    def node_label(self, node: int) -> str:
        """The label of global node ``node`` (``numbering``), as ``top_k`` prints it."""
        numbering = self.numbering
        name, _ = numbering.locate(node)
        flat = node - numbering.offsets[numbering.names.index(name)]
        return self._top_node(self[name], flat, 0.0, 0.0, math.nan).label()

    def verified_effect(self, name: str) -> Tensor:
        """Mean over pairs of the exact effect of each node of selection ``name`` that ``atpf verify`` measured
        (``layer *axes``, float64), NaN for nodes not verified."""
        ns = self[name]
        out = torch.full((ns.per_pair[0].numel(),), math.nan, dtype=torch.float64)
        if name in self.verified:
            checked = self.verified[name]
            out[checked.index] = checked.effects.double().mean(0)
        return out.reshape(ns.per_pair.shape[1:])

    def signed_estimate(self, name: str) -> Tensor:
        """Mean over pairs of the signed per-pair estimate of selection ``name`` (``layer *axes``, float64): the
        scores themselves for signed methods; for GradDrop methods, whose scores are magnitudes, the plain AtP or
        QK-fix estimate stored as ``extras.<name>.signed`` (NaN when the file has none, or for ``keep_top``)."""
        ns = self[name]
        if self.sign_convention != GRADDROP_CONVENTION:
            return ns.aggregate("mean").double()
        return _graddrop_signed(self.extras, name, torch.arange(ns.per_pair[0].numel())).reshape(ns.per_pair.shape[1:])

    def __repr__(self) -> str:
        """One line: method, metric, model, pairs, selections with their shapes, and the mean metrics."""
        selections = ", ".join(f"{name} {'x'.join(map(str, ns.per_pair.shape[1:]))}" for name, ns in self.nodes.items())
        verified = sum(len(v.index) for v in self.verified.values())
        return (
            f"AttributionResult(method={self.method!r}, metric={self.metric!r}, model={self.model.get('source', '?')!r}, "
            f"pairs={len(self.metric_clean)}, nodes=[{selections}], clean={float(self.metric_clean.mean()):.4g}, "
            f"noise={float(self.metric_noise.mean()):.4g}" + (f", verified={verified}" if verified else "") + ")"
        )

    def _repr_html_(self) -> str:
        """A notebook summary: method, metric, model, the mean metrics and the top 10 nodes."""
        facts = {
            "method": self.method, "metric": self.metric, "model": str(self.model.get("source", "?")),
            "prompt pairs": str(len(self.metric_clean)),
            "metric (mean)": f"clean {float(self.metric_clean.mean()):.4g}, noise {float(self.metric_noise.mean()):.4g}",
            "nodes": ", ".join(f"{name} ({ns.per_pair[0].numel()})" for name, ns in self.nodes.items()),
        }
        rows = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts.items())
        return f"<div><b>AttributionResult</b><table>{rows}</table>{self.top_k(10)._repr_html_()}</div>"

    def to_dataframe(self, how: Aggregate = "mean_abs", index: bool = False) -> Any:
        """A pandas DataFrame with one row per node, in global node order: ``name``, ``kind``, one column per
        axis (model indices, ``"all"`` for a merged axis), ``token`` (the quoted token at the node's position,
        when a selection has a ``pos`` axis and the result has token strings), ``score`` (the ``how``
        aggregate), ``signed_mean`` (of the stored scores), ``signed_estimate`` (``signed_estimate``: for GradDrop
        methods the signed AtP or QK-fix value beside the magnitude), and ``verified_effect`` (mean over pairs of
        the exact effect, NaN where not verified).

        ``index=True``: the selection name and the axes (``name``, ``layer``, then every other axis in order of
        first appearance) form a MultiIndex instead of columns. Built column by column (no loop over nodes)."""
        import numpy as np
        import pandas as pd

        value_columns = ("name", "kind", "token", "score", "signed_mean", "signed_estimate", "verified_effect")
        has_tokens = bool(self.clean_strings) and any("pos" in ns.dims for ns in self.nodes.values())

        frames = []
        for name, ns in self.nodes.items():
            shape = tuple(ns.per_pair.shape[1:])
            n_nodes = math.prod(shape)
            coords = torch.unravel_index(torch.arange(n_nodes), shape)
            columns: dict[str, Any] = {"name": np.full(n_nodes, name, dtype=object), "kind": np.full(n_nodes, ns.kind, dtype=object)}
            for dim, coord in zip(ns.dims[1:], coords):
                labels = ns.index[dim]
                columns[dim] = np.full(n_nodes, "all", dtype=object) if labels == "all" else np.asarray(labels, dtype=np.int64)[coord.numpy()]
            if has_tokens:
                pos_labels = columns.get("pos", np.full(n_nodes, "all", dtype=object))
                text = {p: self.position_text(p)[0] for p in set(pos_labels.tolist())}
                columns["token"] = pd.Series(pos_labels).map(text).to_numpy(dtype=object)
            columns["score"] = ns.aggregate(how).flatten().double().numpy()
            columns["signed_mean"] = ns.aggregate("mean").flatten().double().numpy()
            columns["signed_estimate"] = self.signed_estimate(name).flatten().numpy()
            columns["verified_effect"] = self.verified_effect(name).flatten().numpy()
            frames.append(pd.DataFrame(columns))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if index and len(df):
            axes = [c for c in df.columns if c not in value_columns]
            df = df.set_index(["name", *axes])
        return df

    def to_xarray(self, name: str | None = None) -> Any:
        """Per-pair scores as xarray: the selection ``name`` as a ``DataArray`` (dims ``pair layer *axes``,
        coordinates the model indices, ``token`` on ``pos`` when known, ``clean``/``noise`` metrics on ``pair``);
        without ``name``, every selection in one ``Dataset`` with dims prefixed by the selection name
        (``attn_head/layer``), since two selections' ``layer`` axes need not hold the same layers. Needs
        ``pip install xarray``."""
        try:
            import xarray as xr
        except ImportError:
            raise ImportError("to_xarray needs xarray: pip install xarray (or atpframework[tables])") from None
        if name is not None:
            return self._data_array(xr, self[name], prefix="")
        return xr.Dataset({n: self._data_array(xr, ns, prefix=f"{n}/") for n, ns in self.nodes.items()},
                          attrs={"method": self.method, "metric": self.metric, "sign_convention": self.sign_convention})

    def _data_array(self, xr: Any, ns: NodeScores, prefix: str) -> Any:
        dims = [ns.dims[0]] + [prefix + d for d in ns.dims[1:]]
        coords: dict[str, Any] = {"pair": list(range(ns.per_pair.shape[0]))}
        for dim, full in zip(ns.dims[1:], dims[1:]):
            coords[full] = ["all"] if ns.index[dim] == "all" else list(ns.index[dim])
            if dim == "pos" and self.clean_strings:
                coords[f"{full}_token"] = (full, [self.position_text(p)[0] for p in coords[full]])
        coords[f"{prefix}metric_clean"] = ("pair", self.metric_clean.double().numpy())
        coords[f"{prefix}metric_noise"] = ("pair", self.metric_noise.double().numpy())
        values = ns.per_pair.to_dense() if ns.per_pair.is_sparse else ns.per_pair
        return xr.DataArray(values.double().numpy(), dims=dims, coords=coords, name=ns.name,
                            attrs={"kind": ns.kind, "method": self.method, "metric": self.metric})

    def report(self, path: str | Path, *, diagnosis: "Diagnosis | None" = None, title: str | None = None) -> Path:
        """Write a self-contained HTML report of this result to ``path`` (summary, prompts with tokens, heatmaps,
        top nodes, verification; ``diagnosis``: an ``analysis.verify.Diagnosis`` to show its bound); returns the
        path. See ``atpframework.analysis.report.write_report``."""
        # The report belongs to the analysis layer, below this one: it is found by name when called, so loading
        # a result never imports it (the layer rule of docs/architecture.md).
        report = import_module("atpframework.analysis.report")
        written: Path = report.write_report(self, path, diagnosis=diagnosis, title=title)
        return written

    @property
    def plot(self) -> "ResultPlots":
        """This result's figures (needs matplotlib: ``pip install 'atpframework[plot]'``), each returning a
        ``Figure``: ``result.plot.heatmap("attn_head", position=-1)``, ``.token_strip("resid")``,
        ``.bar("mlp_neuron", k=20)``, ``.scatter()`` (verified against estimated); ``path=`` writes PNG, SVG or PDF.
        See ``atpframework.analysis.figures``."""
        # Found by name when used, like ``report``: the figures belong to the analysis layer, below this one.
        figures = import_module("atpframework.analysis.figures")
        plots: ResultPlots = figures.ResultPlots(self)
        return plots

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the result as safetensors, atomically; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {}
        layouts: dict[str, dict[str, Any]] = {}
        for name, ns in self.nodes.items():
            per_pair = ns.per_pair.float().cpu()
            if per_pair.is_sparse:
                per_pair = per_pair.coalesce()
                tensors[f"scores.{name}.indices"] = per_pair.indices().contiguous()
                tensors[f"scores.{name}.values"] = per_pair.values().contiguous()
                layouts[name] = {"layout": "sparse_coo", "shape": list(per_pair.shape)}
            else:
                tensors[f"scores.{name}"] = per_pair.contiguous()
                layouts[name] = {"layout": "dense"}
        tensors["metric.clean"] = self.metric_clean.float().contiguous().cpu()
        tensors["metric.noise"] = self.metric_noise.float().contiguous().cpu()
        tensors["tokens.clean"] = _pad(self.clean_tokens)
        tensors["tokens.noise"] = _pad(self.noise_tokens)
        tensors["tokens.length"] = torch.tensor([len(t) for t in self.clean_tokens], dtype=torch.int64)
        for key, value in self.extras.items():
            tensors[f"extras.{key}"] = value.float().contiguous().cpu()
        for name, v in self.verified.items():
            tensors[f"verified.{name}.index"] = v.index.long().contiguous().cpu()
            tensors[f"verified.{name}.rank"] = v.rank.long().contiguous().cpu()
            tensors[f"verified.{name}.effects"] = v.effects.float().contiguous().cpu()
        metadata = {
            "atpf.schema": RESULT_SCHEMA,
            "atpf.schema_version": str(RESULT_SCHEMA_VERSION),
            "atpf.plan": self.plan_json,
            "atpf.method": self.method,
            "atpf.metric": self.metric,
            "atpf.sign_convention": self.sign_convention,
            "atpf.nodes": json.dumps(
                {n: {"kind": ns.kind, "dims": list(ns.dims), "index": ns.index, **layouts[n]} for n, ns in self.nodes.items()}
            ),
            "atpf.model": json.dumps(self.model, sort_keys=True),
            "atpf.versions": json.dumps(self.versions, sort_keys=True),
            "atpf.created": self.created,
            "atpf.verification": json.dumps(self.verification, sort_keys=True),
        }
        if self.clean_strings:
            metadata["atpf.token_strings"] = json.dumps({"clean": self.clean_strings, "noise": self.noise_strings}, ensure_ascii=False)
        return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_result(path: str | Path) -> AttributionResult:
    """Read a result file written by ``AttributionResult.save``.

    Every size the metadata claims is checked against the tensors actually stored before anything is
    allocated (the checks are listed in ``docs/result-format.md``, "What loading checks"); a foreign,
    newer or malformed file raises ``SchemaError`` naming the file and the offending field. Tensors and
    metadata keys this reader does not use are ignored."""
    path = Path(path)
    meta, tensors = _read_file(path)
    try:
        return _parse(meta, tensors)
    except _Invalid as bad:
        raise SchemaError(f"{path}: {bad}") from None


MAX_NODES = 2**31
"""Most nodes (entries per pair: the product of the axis sizes after ``pair``) one selection may have.
``aggregate`` densifies a sparse selection to this many floats, so a file claiming more is refused."""
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_READ_PREFIXES = ("scores.", "metric.", "tokens.", "extras.", "verified.")
_VERIFIED_PARTS = ("index", "rank", "effects")


class _Invalid(Exception):
    """A malformed field of a result file; ``load_result`` turns it into a ``SchemaError`` naming the file."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Open ``path``, check the schema id and version, and read the tensors under the keys results use."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except Exception as err:
        raise SchemaError(f"{path}: not a safetensors file ({shorten(str(err))})") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("atpf.schema") != RESULT_SCHEMA:
            raise SchemaError(f"{path}: not an atpframework result (no 'atpf.schema' = {RESULT_SCHEMA!r} in its metadata)")
        _check_version(path, meta.get("atpf.schema_version"))
        tensors = {}
        for key in f.keys():
            if key.startswith(_READ_PREFIXES):
                try:
                    tensors[key] = f.get_tensor(key)
                except Exception as err:  # noqa: BLE001 - e.g. a dtype torch cannot hold
                    raise SchemaError(f"{path}: tensor {shorten(key)}: unreadable ({shorten(str(err))})") from None
    return meta, tensors


def _check_version(path: Path, text: str | None) -> None:
    """``atpf.schema_version`` must be a whole number from 1 to ``RESULT_SCHEMA_VERSION``."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise SchemaError(f"{path}: unreadable atpf.schema_version {shorten(text)} (allowed: a whole number from 1 up)")
    if int(text) > RESULT_SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: written with result schema version {int(text)}, newer than this atpframework reads "
            f"({RESULT_SCHEMA_VERSION}); upgrade atpframework"
        )


_REQUIRED_META = ("atpf.plan", "atpf.method", "atpf.metric", "atpf.nodes", "atpf.model", "atpf.versions")


def _parse(meta: dict[str, str], tensors: dict[str, Tensor]) -> AttributionResult:
    """The checked result, metadata first, then each tensor against it; ``_Invalid`` for the first wrong field."""
    for key in _REQUIRED_META:
        if key not in meta:
            raise _Invalid(key, "missing from the metadata (required)")
    _json_field(meta["atpf.plan"], "atpf.plan", dict)
    model = _json_field(meta["atpf.model"], "atpf.model", dict)
    versions = _json_field(meta["atpf.versions"], "atpf.versions", dict)
    verification = _json_field(meta.get("atpf.verification", "{}"), "atpf.verification", dict)
    selections = _check_nodes_meta(_json_field(meta["atpf.nodes"], "atpf.nodes", dict))
    metric_clean = _tensor(tensors, "metric.clean", _FLOAT_DTYPES, 1).float()
    n_pairs = len(metric_clean)
    if n_pairs == 0:
        raise _Invalid("metric.clean", "no pairs (a result has at least one)")
    metric_noise = _tensor(tensors, "metric.noise", _FLOAT_DTYPES, 1, n_pairs).float()
    clean_tokens, noise_tokens = _tokens(tensors, n_pairs)
    clean_strings, noise_strings = _token_strings(meta, clean_tokens, noise_tokens)
    nodes = {name: _node_scores(tensors, name, sel, n_pairs) for name, sel in selections.items()}
    return AttributionResult(
        nodes=nodes,
        metric_clean=metric_clean,
        metric_noise=metric_noise,
        clean_tokens=clean_tokens,
        noise_tokens=noise_tokens,
        plan_json=meta["atpf.plan"],
        method=meta["atpf.method"],
        metric=meta["atpf.metric"],
        model=model,
        versions=versions,
        created=meta.get("atpf.created", ""),
        sign_convention=meta.get("atpf.sign_convention", SIGN_CONVENTION),
        extras=_extras(tensors, n_pairs),
        verified=_verified(tensors, nodes, n_pairs),
        verification=verification,
        clean_strings=clean_strings,
        noise_strings=noise_strings,
    )


def _token_strings(meta: dict[str, str], clean: list[list[int]], noise: list[list[int]]) -> tuple[list[list[str]], list[list[str]]]:
    """``atpf.token_strings`` (schema 4): ``{"clean": [[str]], "noise": [[str]]}``, one string per stored token;
    empty lists when absent."""
    if "atpf.token_strings" not in meta:
        return [], []
    raw = _json_field(meta["atpf.token_strings"], "atpf.token_strings", dict)
    out = []
    for which, tokens in (("clean", clean), ("noise", noise)):
        rows = raw.get(which)
        if (not isinstance(rows, list) or len(rows) != len(tokens)
                or not all(isinstance(r, list) and len(r) == len(t) and all(isinstance(x, str) for x in r) for r, t in zip(rows, tokens))):
            raise _Invalid(f"atpf.token_strings.{which}", f"expected one list of strings per pair with one string per token of "
                           f"tokens.{which} (lengths {shorten([len(t) for t in tokens])}), got {shorten(rows)}")
        out.append(rows)
    return out[0], out[1]


def _json_field(text: str, field: str, kind: type) -> Any:
    """``text`` parsed as JSON, which must be a ``kind`` (``dict``: a JSON object)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply to parse
        raise _Invalid(field, f"not valid JSON ({type(err).__name__}: {shorten(str(err), 80)})") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else kind.__name__
        raise _Invalid(field, f"expected {expected}, got {type(value).__name__} {shorten(value, 80)}")
    return value


def _tensor(tensors: dict[str, Tensor], key: str, dtypes: tuple[torch.dtype, ...], ndim: int | None,
            n_pairs: int | None = None) -> Tensor:
    """The stored tensor ``key``: present, of one of ``dtypes``, ``ndim`` axes (None: at least one) and,
    given ``n_pairs``, that many rows."""
    if key not in tensors:
        raise _Invalid(_key(key), "tensor missing (required)")
    value = tensors[key]
    allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    if value.dtype not in dtypes:
        raise _Invalid(_key(key), f"dtype {str(value.dtype).removeprefix('torch.')}, allowed: {allowed}")
    if (value.ndim != ndim) if ndim is not None else value.ndim < 1:
        expected = ndim if ndim is not None else "at least 1"
        raise _Invalid(_key(key), f"{value.ndim} axes {tuple(value.shape)}, expected {expected}")
    if n_pairs is not None and value.shape[0] != n_pairs:
        raise _Invalid(_key(key), f"{value.shape[0]} rows, expected one per pair ({n_pairs}, the length of metric.clean)")
    return value


def _tokens(tensors: dict[str, Tensor], n_pairs: int) -> tuple[list[list[int]], list[list[int]]]:
    """Clean and noise token lists, padding removed; ``tokens.length`` must fit both padded widths."""
    clean = _tensor(tensors, "tokens.clean", (torch.int64,), 2, n_pairs)
    noise = _tensor(tensors, "tokens.noise", (torch.int64,), 2, n_pairs)
    lengths = _tensor(tensors, "tokens.length", (torch.int64,), 1, n_pairs)
    width = min(clean.shape[1], noise.shape[1])
    if bool(((lengths < 0) | (lengths > width)).any()):
        raise _Invalid("tokens.length", f"{shorten(lengths.tolist())}: each must be from 0 to {width} "
                       "(the padded width of tokens.clean and tokens.noise)")
    n = lengths.tolist()
    return [row[:k] for row, k in zip(clean.tolist(), n)], [row[:k] for row, k in zip(noise.tolist(), n)]


def _key(name: str) -> str:
    """A tensor key or selection name as it appears in a message: as is, or shortened if long or odd."""
    return name if len(name) <= 80 and name.isprintable() else shorten(name, 80)


MAX_AXES = 16
"""Most axes (``pair`` and ``layer`` included) a selection's scores may have."""


@dataclass(frozen=True)
class _Selection:
    """One checked entry of ``atpf.nodes``."""

    kind: str
    dims: tuple[str, ...]
    index: dict[str, list[int] | str]
    sizes: tuple[int, ...]
    """Axis sizes after ``pair`` that the labels describe (1 for ``"all"``)."""
    layout: str
    shape: Any
    """The dense shape claimed by a ``sparse_coo`` layout (checked by ``_sparse_scores``)."""


def _check_nodes_meta(raw: dict[str, Any]) -> dict[str, _Selection]:
    """``atpf.nodes``: per selection name a JSON object with ``kind``, ``dims``, ``index`` and ``layout``."""
    out = {}
    for name, m in raw.items():
        if not isinstance(m, dict):
            raise _Invalid(f"atpf.nodes.{_key(name)}", f"expected a JSON object, got {type(m).__name__} {shorten(m, 80)}")
        out[name] = _check_selection(f"atpf.nodes.{_key(name)}", m)
    return out


def _check_selection(field: str, m: dict[str, Any]) -> _Selection:
    """One selection's metadata; its label lists bound the size of everything stored for it."""
    kind, dims, index, layout = m.get("kind"), m.get("dims"), m.get("index"), m.get("layout", "dense")
    if not isinstance(kind, str):
        raise _Invalid(f"{field}.kind", f"expected the node type name (a string), got {shorten(kind, 80)}")
    if (not isinstance(dims, list) or not 2 <= len(dims) <= MAX_AXES or dims[:2] != ["pair", "layer"]
            or not all(isinstance(d, str) for d in dims) or len(set(dims)) != len(dims)):
        raise _Invalid(f"{field}.dims", f"expected a list of 2 to {MAX_AXES} distinct axis names starting 'pair', 'layer', "
                       f"got {shorten(dims)}")
    if not isinstance(index, dict) or set(index) != set(dims[1:]):
        got = sorted(index) if isinstance(index, dict) else index
        raise _Invalid(f"{field}.index", f"expected a JSON object with one entry per axis after 'pair' in {field}.dims "
                       f"({shorten(', '.join(dims[1:]), 120)}), got {shorten(got)}")
    for dim in dims[1:]:
        labels = index[dim]
        if labels != "all" and not (isinstance(labels, list) and all(type(x) is int for x in labels)):
            raise _Invalid(f"{field}.index.{_key(dim)}", f'expected "all" or a list of whole numbers, got {shorten(labels)}')
    sizes = tuple(1 if index[d] == "all" else len(index[d]) for d in dims[1:])
    if math.prod(sizes) > MAX_NODES:
        raise _Invalid(f"{field}.index", f"describes {math.prod(sizes)} nodes per pair (axis sizes {sizes}); "
                       f"at most {MAX_NODES} are read")
    if layout not in ("dense", "sparse_coo"):
        raise _Invalid(f"{field}.layout", f'allowed: "dense", "sparse_coo" (got {shorten(layout, 80)})')
    return _Selection(kind, tuple(dims), index, sizes, layout, m.get("shape"))


def _node_scores(tensors: dict[str, Tensor], name: str, sel: _Selection, n_pairs: int) -> NodeScores:
    """The scores of one selection, dense or sparse, shaped ``n_pairs, *sel.sizes``."""
    scores = _sparse_scores if sel.layout == "sparse_coo" else _dense_scores
    return NodeScores(name, sel.kind, sel.dims, sel.index, scores(tensors, name, sel, n_pairs))


def _expected_shape(name: str, sel: _Selection, n_pairs: int) -> str:
    return (f"expected {[n_pairs, *sel.sizes]} (the number of pairs in metric.clean, then per axis the number of "
            f'labels in atpf.nodes.{_key(name)}.index, 1 for "all")')


def _dense_scores(tensors: dict[str, Tensor], name: str, sel: _Selection, n_pairs: int) -> Tensor:
    """``scores.<name>``: float, one axis per dim, one row per pair and one entry per label."""
    value = _tensor(tensors, f"scores.{name}", _FLOAT_DTYPES, None, n_pairs)
    if value.ndim != len(sel.dims):
        raise _Invalid(_key(f"scores.{name}"), f"{value.ndim} axes {list(value.shape)}, but atpf.nodes.{_key(name)}.dims "
                       f"names {len(sel.dims)}: {shorten(list(sel.dims))}")
    if tuple(value.shape[1:]) != sel.sizes:
        raise _Invalid(_key(f"scores.{name}"), f"shape {list(value.shape)}, {_expected_shape(name, sel, n_pairs)}")
    return value.float()


def _sparse_scores(tensors: dict[str, Tensor], name: str, sel: _Selection, n_pairs: int) -> Tensor:
    """``scores.<name>.indices`` / ``.values`` as a COO tensor of the claimed ``shape``, which must match the
    labels; every stored coordinate is checked in bounds before the tensor is built."""
    shape, field = sel.shape, f"atpf.nodes.{_key(name)}.shape"
    if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
        raise _Invalid(field, f"expected a list of sizes (whole numbers >= 0), got {shorten(shape)}")
    if shape != [n_pairs, *sel.sizes]:
        raise _Invalid(field, f"{shorten(shape)}, {_expected_shape(name, sel, n_pairs)}")
    indices = _tensor(tensors, f"scores.{name}.indices", (torch.int64,), 2)
    values = _tensor(tensors, f"scores.{name}.values", _FLOAT_DTYPES, 1)
    if indices.shape[0] != len(shape) or values.shape[0] != indices.shape[1]:
        raise _Invalid(_key(f"scores.{name}.indices"), f"shape {list(indices.shape)} with {values.shape[0]} values; expected "
                       f"[{len(shape)}, nnz] (one row per axis of {shape}) and nnz values")
    if indices.numel() and bool(((indices < 0) | (indices >= torch.tensor(shape).unsqueeze(1))).any()):
        raise _Invalid(_key(f"scores.{name}.indices"), f"a coordinate lies outside the shape {shape}")
    try:
        return torch.sparse_coo_tensor(indices, values.float(), tuple(shape), check_invariants=True).coalesce()
    except RuntimeError as err:
        raise _Invalid(_key(f"scores.{name}"), f"not a valid sparse tensor ({shorten(str(err), 80)})") from None


def _extras(tensors: dict[str, Tensor], n_pairs: int) -> dict[str, Tensor]:
    """``extras.*``: float tensors with one row per pair."""
    keys = [k for k in tensors if k.startswith("extras.")]
    return {k.removeprefix("extras."): _tensor(tensors, k, _FLOAT_DTYPES, None, n_pairs).float() for k in keys}


def _verified(tensors: dict[str, Tensor], nodes: dict[str, NodeScores], n_pairs: int) -> dict[str, VerifiedNodes]:
    """``verified.<name>.index`` / ``.rank`` / ``.effects`` of selections in ``atpf.nodes``, with consistent sizes."""
    named = {k.removeprefix("verified.").rpartition(".")[0] for k in tensors
             if k.startswith("verified.") and k.rpartition(".")[2] in _VERIFIED_PARTS}
    unknown = sorted(named - set(nodes))
    if unknown:
        have = shorten(", ".join(nodes), 120) if nodes else "(none)"
        raise _Invalid(_key(f"verified.{unknown[0]}"), f"no selection {shorten(unknown[0], 80)} in atpf.nodes; verified "
                       f"tensors must belong to one of: {have}")
    return {name: _verified_nodes(tensors, name, nodes[name], n_pairs) for name in nodes if name in named}


def _verified_nodes(tensors: dict[str, Tensor], name: str, ns: NodeScores, n_pairs: int) -> VerifiedNodes:
    """One selection's verified nodes: ``V`` flat indices within the selection, ``V`` ranks, ``pair V`` effects."""
    index = _tensor(tensors, f"verified.{name}.index", (torch.int64,), 1)
    rank = _tensor(tensors, f"verified.{name}.rank", (torch.int64,), 1)
    effects = _tensor(tensors, f"verified.{name}.effects", _FLOAT_DTYPES, 2, n_pairs)
    if len(rank) != len(index) or effects.shape[1] != len(index):
        raise _Invalid(_key(f"verified.{name}"), f"{len(index)} indices, {len(rank)} ranks and effects of shape "
                       f"{list(effects.shape)}; expected V, V and [{n_pairs}, V]")
    n_nodes = math.prod(ns.per_pair.shape[1:])
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_nodes):
        raise _Invalid(_key(f"verified.{name}.index"), f"values from {int(index.min())} to {int(index.max())}; allowed: 0 to "
                       f"{n_nodes - 1} (flat indices into the selection's {n_nodes} nodes)")
    return VerifiedNodes(index, rank, effects.float())


# ----------------------------------------------------------------------------------------- ranking
def _ranked(ns: NodeScores, k: int, how: Aggregate) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``k`` nodes of one selection in ``top_k``'s order: flat indices, scores, signed means."""
    if ns.per_pair.is_sparse and ns.per_pair.dense_dim() == 0:
        return _ranked_sparse(ns.per_pair, k, how)
    score = ns.aggregate(how).flatten()
    signed = score if how == "mean" else ns.aggregate("mean").flatten()
    order = _order(score)[:k]
    return order, score[order], signed[order]


def _order(score: Tensor) -> Tensor:
    """Positions of ``score`` by ``|score|`` descending, NaN last, ties by ascending position."""
    key = score.abs().nan_to_num(nan=-1.0, posinf=math.inf)
    return torch.sort(key, descending=True, stable=True).indices


def _ranked_sparse(per_pair: Tensor, k: int, how: Aggregate) -> tuple[Tensor, Tensor, Tensor]:
    """``_ranked`` for a sparse COO selection, touching only its stored entries: the stored nonzero scores
    ranked, then the first zero-score nodes by flat index (stored or not), then the stored NaN scores."""
    per_pair = per_pair.cpu()  # only the stored entries move
    flat, score = _stored_means(per_pair, how)
    flat_s, signed = (flat, score) if how == "mean" else _stored_means(per_pair, "mean")
    is_nan = score.isnan()
    nonzero = ~is_nan & (score != 0)
    top = flat[nonzero][_order(score[nonzero])][:k]
    n_nodes = math.prod(per_pair.shape[1:])
    zeros = _first_free(flat[score != 0], k - len(top), n_nodes)
    order = torch.cat([top, zeros, flat[is_nan]])[:k]
    return order, _lookup(flat, score, order), _lookup(flat_s, signed, order)


def _stored_means(per_pair: Tensor, how: Aggregate) -> tuple[Tensor, Tensor]:
    """Per node with a stored entry: its flat index (ascending) and its aggregate over pairs, computed
    exactly as ``NodeScores.aggregate`` does but without densifying."""
    values = per_pair.abs() if how == "mean_abs" else per_pair
    sums = torch.sparse.sum(values, dim=0).coalesce()  # coalesced: indices in row-major (flat) order
    shape = sums.shape
    strides = torch.tensor([math.prod(shape[d + 1:]) for d in range(len(shape))], dtype=torch.int64)
    flat = (sums.indices() * strides.unsqueeze(1)).sum(dim=0)
    return flat, sums.values() / per_pair.shape[0]


def _first_free(taken: Tensor, count: int, total: int) -> Tensor:
    """The ``count`` smallest of ``0 .. total - 1`` not in ``taken`` (fewer if there are not that many)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64)
    candidates = torch.arange(min(total, count + len(taken)), dtype=torch.int64)
    return candidates[~torch.isin(candidates, taken)][:count]


def _lookup(flat: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """``values`` at the nodes ``query`` (``flat``: their ascending flat indices), 0 for nodes not in ``flat``."""
    if len(flat) == 0:
        return torch.zeros(len(query), dtype=values.dtype)
    at = torch.searchsorted(flat, query).clamp(max=len(flat) - 1)
    return torch.where(flat[at] == query, values[at], torch.zeros((), dtype=values.dtype))


def _graddrop_signed(extras: dict[str, Tensor], name: str, flat: Tensor) -> Tensor:
    """Mean over pairs of GradDrop's stored signed estimate at flat nodes ``flat`` (float64; NaN without ``extras.<name>.signed``)."""
    signed = extras.get(f"{name}.signed")
    if signed is None:
        return torch.full((len(flat),), math.nan, dtype=torch.float64)
    return signed.flatten(1)[:, flat].double().mean(0)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (read from metadata, nothing imported)."""
    out = {}
    for dist in ("atpframework", "torch", "transformer_lens", "transformers", "sae_lens", "safetensors", "pydantic"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def writer_name(index: int, n_heads: int, has_mlp: bool) -> str:
    """The short name of edge writer ``index`` (``atpframework.model.edges``'s order): ``embed``, ``L3H1``, ``L3 MLP``."""
    if index == 0:
        return "embed"
    layer, slot = divmod(index - 1, n_heads + has_mlp)
    return f"L{layer}H{slot}" if slot < n_heads else f"L{layer} MLP"


def _label(index: list[int] | str, position: int) -> int | str:
    return "all" if index == "all" else index[position]


def _pad(rows: list[list[int]]) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out
