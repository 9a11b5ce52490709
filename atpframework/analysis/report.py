"""A self-contained HTML report of one result: summary, prompts with tokens, heatmaps, top nodes, verification.

``write_report(result, path)`` writes ONE HTML file that opens without network access: its style sheet and
its script are inlined, its figures are SVG drawn by that script, and its data is one JSON document in a
``<script type="application/json">`` tag (every ``<``, ``>`` and ``&`` in it escaped as ``\\u003c`` ...,
so no prompt text can end the tag). ``report_data`` builds that document; the page shows:

* the run: model, method, metric (clean and noise, per pair and mean), the prompts token by token (tokens
  that differ between clean and noise highlighted), creation time, versions and the plan;
* per node selection a layer x head heatmap where the selection has a ``head`` axis (one grid per entry of
  its other axes, e.g. each selected position, with a selector) and a layer x position grid where it has a
  ``pos`` axis (each cell the node with the largest score over the remaining axes, e.g. the heads or neurons
  at that layer and position); cells coloured by the signed estimate (diverging, symmetric limits) or the
  ranking score, a tooltip per cell with the node's label, tokens, score, signed estimate and verified effect;
* a sortable table of the top nodes across selections;
* with verified nodes: verified effect against estimate, and the number of confirmed nodes (verified mean
  ``|effect|`` at least the verification threshold) against the number verified in estimated order;
* with a ``Diagnosis``: the bound per confidence against samples, and its warnings.

Per-node data is capped (``MAX_CELLS`` heatmap cells, ``MAX_TABLE_ROWS`` table rows, ``MAX_POINTS`` verified
nodes, ``MAX_PAIRS`` prompts of at most ``MAX_TOKENS`` tokens, the plan's prompts beyond ``MAX_PAIRS`` when it
is long); the page says what was left out.
"""

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atpframework.analysis.verify import Diagnosis, default_threshold, verified_effects
from atpframework.errors import SchemaError, shorten
from atpframework.io.files import write_atomically
from atpframework.io.results import GRADDROP_CONVENTION, AttributionResult, NodeScores, TopNode

MAX_CELLS = 40_000
"""Most heatmap cells over all the report's grids; further grids (or their less important slices) are left out."""
MAX_TABLE_ROWS = 50
"""Rows of the top-nodes table."""
MAX_POINTS = 5_000
"""Most verified nodes in the verification figures (the first in verification order)."""
MAX_PAIRS = 20
"""Prompt pairs shown token by token."""
MAX_TOKENS = 512
"""Tokens shown per prompt."""
MAX_PLAN_CHARS = 100_000
"""A plan longer than this (as JSON) is shown with its first ``MAX_PAIRS`` prompts only."""
MAX_DENSE = 4_000_000
"""A sparse (``keep_top``) selection is drawn only when its dense shape has at most this many nodes."""
_DIGITS = 7
"""Significant digits kept for numbers in the page (float32 holds about 7)."""


def write_report(
    result: AttributionResult, path: str | os.PathLike[str], *, diagnosis: Diagnosis | None = None, title: str | None = None
) -> Path:
    """Write the HTML report of ``result`` (with ``diagnosis``'s bound when given) to ``path``, atomically;
    returns the path. ``title`` defaults to the method, metric and model."""
    page = render_report(result, diagnosis=diagnosis, title=title)

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")

    return write_atomically(path, write)


def render_report(result: AttributionResult, *, diagnosis: Diagnosis | None = None, title: str | None = None) -> str:
    """The report as one HTML string (see ``write_report``)."""
    data = report_data(result, diagnosis=diagnosis, title=title)
    return _TEMPLATE.format(
        title=html.escape(data["title"]), style=_asset("report.css"), script=_asset("report.js"), data=embed_json(data),
    )


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` become ``\\u003c``,
    ``\\u003e``, ``\\u0026`` (so no string can close the tag or open a comment); ``JSON.parse`` restores them."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def report_data(result: AttributionResult, *, diagnosis: Diagnosis | None = None, title: str | None = None) -> dict[str, Any]:
    """The JSON document the page draws from (plain lists and numbers; NaN as ``null``, infinities as
    ``"inf"`` / ``"-inf"``)."""
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title: expected a string, got {type(title).__name__}")
    if diagnosis is not None and diagnosis.verified_top + diagnosis.remainder != result.numbering.n_nodes:
        raise ValueError(f"diagnosis: covers {diagnosis.verified_top + diagnosis.remainder} nodes (verified_top + remainder) but "
                         f"the result has {result.numbering.n_nodes}; it is the diagnosis of another result")
    notes: list[str] = []
    data: dict[str, Any] = {
        "title": title or f"{result.method} · {result.metric} · {result.model.get('source', '?')}",
        "summary": _summary(result, notes),
        "prompts": _prompts(result, notes),
        "selections": _selections(result, notes),
        "top": _top_rows(result),
        "verification": _verification(result, notes),
        "diagnosis": _diagnosis(result, diagnosis) if diagnosis is not None else None,
        "notes": notes,
    }
    return _plain(data)


# ----------------------------------------------------------------------------------------- summary
def _summary(result: AttributionResult, notes: list[str]) -> dict[str, Any]:
    clean, noise = result.metric_clean.double(), result.metric_noise.double()
    plan = result.plan
    prompts = plan.get("prompts")
    if len(result.plan_json) > MAX_PLAN_CHARS and isinstance(prompts, list) and len(prompts) > MAX_PAIRS:
        plan["prompts"] = prompts[:MAX_PAIRS]
        notes.append(f"Plan: its first {MAX_PAIRS} of {len(prompts)} prompts are shown.")
    return {
        "model": result.model,
        "method": result.method,
        "metric": result.metric,
        "sign_convention": result.sign_convention,
        "graddrop": result.sign_convention == GRADDROP_CONVENTION,
        "pairs": len(clean),
        "mean_clean": float(clean.mean()),
        "mean_noise": float(noise.mean()),
        "created": result.created,
        "versions": result.versions,
        "plan": plan,
        "selections": {n: {"kind": ns.kind, "dims": list(ns.dims), "shape": list(ns.per_pair.shape[1:]),
                           "sparse": bool(ns.per_pair.is_sparse)} for n, ns in result.nodes.items()},
    }


def _prompts(result: AttributionResult, notes: list[str]) -> dict[str, Any]:
    """Up to ``MAX_PAIRS`` pairs: tokens as strings (``#id`` without token strings), which differ, answers."""
    plan_prompts = result.plan.get("prompts")
    rows = []
    for i in range(min(len(result.clean_tokens), MAX_PAIRS)):
        ids_c, ids_n = result.clean_tokens[i], result.noise_tokens[i]
        text_c = result.clean_strings[i] if result.clean_strings else [f"#{t}" for t in ids_c]
        text_n = result.noise_strings[i] if result.noise_strings else [f"#{t}" for t in ids_n]
        spec = plan_prompts[i] if isinstance(plan_prompts, list) and i < len(plan_prompts) and isinstance(plan_prompts[i], dict) else {}
        rows.append({
            "clean": text_c[:MAX_TOKENS], "noise": text_n[:MAX_TOKENS],
            "differ": [a != b for a, b in zip(ids_c[:MAX_TOKENS], ids_n[:MAX_TOKENS])],
            "length": len(ids_c),
            "answer": _short_json(spec.get("answer")), "wrong_answer": _short_json(spec.get("wrong_answer")),
            "metric_clean": float(result.metric_clean[i]), "metric_noise": float(result.metric_noise[i]),
        })
    if len(result.clean_tokens) > MAX_PAIRS:
        notes.append(f"Prompts: the first {MAX_PAIRS} of {len(result.clean_tokens)} pairs are shown.")
    if any(r["length"] > MAX_TOKENS for r in rows):
        notes.append(f"Prompts: the first {MAX_TOKENS} tokens of each prompt are shown.")
    return {"decoded": bool(result.clean_strings), "pairs": rows}


def _short_json(value: Any) -> Any:
    """A plan value as is, or its JSON cut to 200 characters when longer."""
    text = json.dumps(value, ensure_ascii=False)
    return value if len(text) <= 200 else text[:199] + "…"


# ----------------------------------------------------------------------------------------- heatmaps
class _Labels:
    """Node labels of one selection as ``top_k`` prints them, with the position texts computed once."""

    def __init__(self, result: AttributionResult, ns: NodeScores) -> None:
        self.result, self.ns = result, ns
        self.shape = tuple(ns.per_pair.shape[1:])
        self._pos: dict[Any, tuple[str, str]] = {}

    def coords(self, flat: int) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for dim, size in zip(reversed(self.ns.dims[1:]), reversed(self.shape)):
            flat, at = divmod(flat, size)
            labels = self.ns.index[dim]
            out[dim] = "all" if labels == "all" else labels[at]
        return dict(reversed(list(out.items())))

    def position(self, pos: int | str) -> tuple[str, str]:
        if pos not in self._pos:
            self._pos[pos] = self.result.position_text(pos)
        return self._pos[pos]

    def label(self, flat: int) -> str:
        coords = self.coords(flat)
        token, position = self.position(coords["pos"]) if "pos" in coords else ("", "")
        return TopNode(self.ns.name, self.ns.kind, coords, 0.0, 0.0, math.nan, token, position).label()

    def tokens(self, pos: int | str) -> str:
        """``clean " to" · noise " to"`` at position label ``pos``: the quoted tokens of every pair (up to two)."""
        if pos == "all":
            return "all positions (summed)"
        texts = []
        for which, rows in (("clean", self.result.clean_strings), ("noise", self.result.noise_strings)):
            seen: list[str] = []
            for strings in rows:
                at = int(pos) if int(pos) >= 0 else len(strings) + int(pos)
                if 0 <= at < len(strings) and strings[at] not in seen:
                    seen.append(strings[at])
            if seen:
                texts.append(f"{which} " + "/".join(json.dumps(s, ensure_ascii=False) for s in seen[:2]) + ("/…" if len(seen) > 2 else ""))
        return " · ".join(texts) + f" (pos {self.position(pos)[1]})"


def _selections(result: AttributionResult, notes: list[str]) -> list[dict[str, Any]]:
    """Per selection its grids (``views``), within ``MAX_CELLS`` cells in all."""
    budget = MAX_CELLS
    out = []
    for name, ns in result.nodes.items():
        entry: dict[str, Any] = {"name": name, "kind": ns.kind, "views": []}
        n_nodes = math.prod(ns.per_pair.shape[1:])
        if ns.per_pair.is_sparse and n_nodes > MAX_DENSE:
            notes.append(f"{name}: a sparse selection of {n_nodes} nodes; its nodes appear in the table only.")
            out.append(entry)
            continue
        values = _node_values(result, name)
        labels = _Labels(result, ns)
        dims = list(ns.dims[1:])
        plans: list[tuple[str | None, list[str], list[str]]] = []
        if "head" in dims:
            plans.append(("head", [d for d in dims if d not in ("layer", "head")], []))
        if "pos" in dims and ("head" not in dims or len(_axis_labels(ns, "pos")) > 1):
            plans.append(("pos", [], [d for d in dims if d not in ("layer", "pos")]))
        if not plans:  # neither heads nor positions: one column, the largest node of each layer
            plans.append((None, [], [d for d in dims if d != "layer"]))
        for columns, sliced, reduced in plans:
            view, budget = _view(labels, values, columns, sliced, reduced, budget, notes)
            if view is not None:
                entry["views"].append(view)
        out.append(entry)
    return out


def _node_values(result: AttributionResult, name: str) -> dict[str, Tensor]:
    """``score`` (mean |score| over pairs: the ranking), ``signed`` (the signed estimate) and ``verified`` (mean
    exact effect; NaN where not verified) of every node, shape ``layer *axes``, float64."""
    score = result[name].aggregate("mean_abs").double()
    return {"score": score, "signed": result.signed_estimate(name).double(), "verified": result.verified_effect(name)}


def _axis_labels(ns: NodeScores, dim: str) -> list[int | str]:
    labels = ns.index[dim]
    return ["all"] if labels == "all" else list(labels)


def _view(labels: _Labels, values: dict[str, Tensor], columns: str | None, sliced: list[str], reduced: list[str],
          budget: int, notes: list[str]) -> tuple[dict[str, Any] | None, int]:
    """One grid: rows the layers, columns the ``columns`` axis (one column when None), one grid per entry of the
    ``sliced`` axes, each cell the node with the largest score over the ``reduced`` axes."""
    ns = labels.ns
    dims = list(ns.dims[1:])
    order = ["layer"] + ([columns] if columns else []) + sliced + reduced
    flat = torch.arange(math.prod(labels.shape)).reshape(labels.shape).permute([dims.index(d) for d in order])
    n_rows, n_cols = labels.shape[0], (labels.shape[dims.index(columns)] if columns else 1)
    slice_sizes = [labels.shape[dims.index(d)] for d in sliced]
    flat = flat.reshape(n_rows, n_cols, math.prod(slice_sizes), -1)  # layer, column, slice, reduced
    size = flat.shape[-1]
    score = values["score"].flatten()[flat]
    best = score.nan_to_num(nan=-1.0).argmax(-1, keepdim=True)
    node = flat.gather(-1, best).squeeze(-1).permute(2, 0, 1)  # slice, layer, column
    cells = n_rows * n_cols
    if cells > budget:
        notes.append(f"{ns.name}: grid of {n_rows} x {n_cols} cells left out (the report holds at most {MAX_CELLS} cells).")
        return None, budget
    keep = list(range(node.shape[0]))
    if cells * len(keep) > budget:  # keep the slices holding the largest scores
        strongest = values["score"].flatten()[node.flatten(1)].nan_to_num(nan=-1.0).amax(1)
        keep = sorted(strongest.argsort(descending=True)[: budget // cells].tolist())
        notes.append(f"{ns.name}: {len(keep)} of {node.shape[0]} grids by {' x '.join(sliced)} shown (those with the "
                     f"largest scores; the report holds at most {MAX_CELLS} cells).")
    grids = []
    for s in keep:
        at = dict(zip(sliced, _unravel(s, slice_sizes)))
        coords = {d: _axis_labels(ns, d)[i] for d, i in at.items()}
        nodes = node[s]
        grids.append({
            "label": ", ".join(_coord_text(d, v, labels) for d, v in coords.items()),
            "tokens": labels.tokens(coords["pos"]) if "pos" in coords and labels.result.clean_strings else "",
            "node": nodes.tolist(),
            "label_of": [[labels.label(int(n)) for n in row] for row in nodes.tolist()],
            **{key: _rounded(values[key].flatten()[nodes]) for key in ("score", "signed", "verified")},
        })
    col_labels = _axis_labels(ns, columns) if columns else ["max"]
    has_tokens = columns == "pos" and bool(labels.result.clean_strings)
    view = {
        "rows": {"axis": "layer", "labels": [f"L{x}" if x != "all" else "L*" for x in _axis_labels(ns, "layer")]},
        "cols": {
            "axis": columns or "",
            "labels": [_column_label(columns, x, labels) for x in col_labels],
            "tokens": [labels.tokens(x) for x in col_labels] if has_tokens else [],
        },
        "sliced": sliced,
        "reduced": {"axes": reduced, "size": size} if size > 1 else None,
        "has_verified": bool(torch.isfinite(values["verified"]).any()),
        "limits": {key: _limit(values[key], node[keep]) for key in ("score", "signed", "verified")},
        "grids": grids,
    }
    return view, budget - cells * len(keep)


def _column_label(columns: str | None, value: int | str, labels: _Labels) -> str:
    if columns == "head":
        return f"H{value}" if value != "all" else "H*"
    if columns == "pos":
        token, position = labels.position(value)
        return f"{token} {position}" if token else f"P{value}"
    return "max" if columns is None else str(value)


def _coord_text(dim: str, value: int | str, labels: _Labels) -> str:
    """``pos 13 " to"`` (the absolute position and its token), ``head 3``."""
    if dim != "pos":
        return f"{dim} {value}"
    token, position = labels.position(value)
    return f"pos {position} {token}".rstrip()


def _unravel(index: int, sizes: list[int]) -> list[int]:
    out = []
    for size in reversed(sizes):
        index, at = divmod(index, size)
        out.append(at)
    return out[::-1]


def _limit(values: Tensor, nodes: Tensor) -> float | None:
    """The largest finite |value| over the drawn nodes: symmetric colour limits (None: nothing finite)."""
    picked = values.flatten()[nodes.flatten()].abs()
    picked = picked[torch.isfinite(picked)]
    return float(picked.max()) if len(picked) else None


def _rounded(values: Tensor) -> list[Any]:
    return [[_round(float(v)) for v in row] for row in values.tolist()] if values.ndim == 2 else [_round(float(v)) for v in values.tolist()]


def _round(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}") if math.isfinite(value) else value


# ----------------------------------------------------------------------------------------- table
def _top_rows(result: AttributionResult) -> list[dict[str, Any]]:
    """``top_k(MAX_TABLE_ROWS)`` with each node's verified mean effect (None where not verified)."""
    rows = []
    verified = {name: dict(zip(v.index.tolist(), v.effects.double().mean(0).tolist())) for name, v in result.verified.items()}
    for rank, row in enumerate(result.top_k(MAX_TABLE_ROWS), start=1):
        flat = _flat_index(result[row.name], row.coords)
        rows.append({
            "rank": rank, "node": row.label(), "selection": row.name, "kind": row.kind, "score": _round(row.score),
            "signed": _round(row.signed_estimate), "verified": _round(verified.get(row.name, {}).get(flat, math.nan)),
        })
    return rows


def _flat_index(ns: NodeScores, coords: dict[str, int | str]) -> int:
    flat = 0
    for dim, size in zip(ns.dims[1:], ns.per_pair.shape[1:]):
        labels = ns.index[dim]
        flat = flat * size + (0 if labels == "all" else labels.index(coords[dim]))  # type: ignore[arg-type]
    return flat


# ----------------------------------------------------------------------------------------- verification
def _verification(result: AttributionResult, notes: list[str]) -> dict[str, Any] | None:
    """Verified nodes in verification order (at most ``MAX_POINTS``): label, estimate, score, mean effect and
    mean |effect|; the threshold and the cumulative count of confirmed nodes."""
    nodes, ranks, effects = verified_effects(result)
    if len(nodes) == 0:
        return None
    threshold = result.verification.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        threshold = default_threshold(result)
    strength = effects.double().abs().mean(0)
    confirmed = torch.cumsum((strength >= threshold).long(), 0)
    numbering = result.numbering
    offsets = numbering.offsets
    estimates: dict[str, dict[str, Tensor]] = {}
    points = []
    for i, node in enumerate(nodes[:MAX_POINTS].tolist()):
        at = max(j for j in range(len(numbering.names)) if offsets[j] <= node)
        name, flat = numbering.names[at], node - offsets[at]
        if name not in estimates:
            ns = result[name]
            dense_ok = not ns.per_pair.is_sparse or math.prod(ns.per_pair.shape[1:]) <= MAX_DENSE
            estimates[name] = ({"score": ns.aggregate("mean_abs").double().flatten(), "signed": result.signed_estimate(name).flatten()}
                               if dense_ok else {})
        est = estimates[name]
        points.append({
            "node": result.node_label(node), "selection": name, "flat": flat, "rank": int(ranks[i]),
            "score": _round(float(est["score"][flat])) if est else None,
            "signed": _round(float(est["signed"][flat])) if est else None,
            "effect": _round(float(effects[:, i].double().mean())), "strength": _round(float(strength[i])),
        })
    if len(nodes) > MAX_POINTS:
        notes.append(f"Verification: the first {MAX_POINTS} of {len(nodes)} verified nodes are drawn.")
    return {
        "info": result.verification, "threshold": float(threshold), "count": len(nodes),
        "confirmed": confirmed[:MAX_POINTS].tolist(), "points": points,
    }


def _diagnosis(result: AttributionResult, diagnosis: Diagnosis) -> dict[str, Any]:
    def label(node: int) -> str:
        try:
            return result.node_label(node)
        except IndexError:
            return f"node {node} (not in this result)"

    largest = float(diagnosis.verified_effects[0]) if len(diagnosis.verified_effects) else None
    return {
        "verified_top": diagnosis.verified_top, "remainder": diagnosis.remainder, "p": diagnosis.p,
        "bounds": [{"confidence": c, "samples": [n for n, _ in rows], "bound": [t for _, t in rows]} for c, rows in diagnosis.bounds.items()],
        "worst_node": {f"{c:g}": label(n) for c, n in diagnosis.worst_node.items()},
        "largest_verified": largest, "warnings": diagnosis.warnings(),
        "forward_equivalents_per_pair": diagnosis.forward_equivalents_per_pair,
    }


def load_diagnosis(path: str | os.PathLike[str]) -> Diagnosis:
    """A ``Diagnosis`` read back from ``atpf diagnose --json`` output (``Diagnosis.as_json``). That file keeps
    only the largest verified mean |effect|, so ``verified_effects`` holds that one value (all the report and
    ``warnings`` use). A file that is not such JSON raises ``SchemaError`` naming the file and the field."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: not valid JSON ({shorten(str(err), 80)})") from None

    def bad(field: str, expected: str, got: Any) -> SchemaError:
        return SchemaError(f"{path}: {field}: expected {expected} (the JSON of atpf diagnose --json), got {shorten(got, 80)}")

    if not isinstance(raw, dict):
        raise bad("(top level)", "a JSON object", raw)
    for key in ("verified_top", "remainder"):
        if type(raw.get(key)) is not int:
            raise bad(key, "a whole number", raw.get(key))
    for key in ("p", "forward_equivalents_per_pair"):
        if not _is_number(raw.get(key)):
            raise bad(key, "a number", raw.get(key))
    bounds_raw, worst_raw, largest = raw.get("bounds"), raw.get("worst_node", {}), raw.get("largest_verified_effect")
    if not isinstance(bounds_raw, dict) or not bounds_raw:
        raise bad("bounds", "an object: confidence -> [[samples, bound], ...]", bounds_raw)
    bounds: dict[float, list[tuple[int, float]]] = {}
    for key, rows in bounds_raw.items():
        try:
            confidence = float(key)
        except ValueError:
            raise bad("bounds", "confidences as keys", key) from None
        if (not isinstance(rows, list) or not rows
                or not all(isinstance(r, list) and len(r) == 2 and type(r[0]) is int and _is_number(r[1]) for r in rows)):
            raise bad(f"bounds.{key}", "a list of [samples, bound] pairs", rows)
        bounds[confidence] = [(int(n), float(t)) for n, t in rows]
    if not isinstance(worst_raw, dict) or not all(type(v) is int for v in worst_raw.values()):
        raise bad("worst_node", "an object: confidence -> node index", worst_raw)
    if largest is not None and not _is_number(largest):
        raise bad("largest_verified_effect", "a number or null", largest)
    return Diagnosis(
        verified_top=raw["verified_top"], remainder=raw["remainder"], p=float(raw["p"]), bounds=bounds,
        worst_node={float(k): v for k, v in worst_raw.items()},
        verified_effects=torch.tensor([] if largest is None else [float(largest)], dtype=torch.float64),
        forward_equivalents_per_pair=float(raw["forward_equivalents_per_pair"]),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """``value`` with NaN as None and infinities as ``"inf"`` / ``"-inf"`` (valid JSON), dict keys as strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- the page
_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="atpframework">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1><p class="sub">atpframework attribution report</p></header>
<main id="app"><noscript>This report draws its tables and figures with JavaScript; please enable it.</noscript></main>
<div id="tip" role="tooltip" hidden></div>
<script type="application/json" id="atpf-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""



def _asset(name: str) -> str:
    """``report.css`` / ``report.js``, which sit beside this module (package data)."""
    return Path(__file__).with_name(name).read_text(encoding="utf-8")
