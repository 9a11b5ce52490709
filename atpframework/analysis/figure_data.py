"""The numbers behind ``figures``: which values a figure of a result shows, on which grid, with which
labels (model indices, tokens) and titles. No drawing here, and no matplotlib.

``node_values`` turns a selection's per-pair scores into one value per node (``how``: ``signed``,
``mean`` or ``mean_abs``; ``pair`` for one prompt pair); ``layer_grid`` and ``position_strip`` arrange
them as layer × column grids (``Grid``), picking or summing positions and naming tokens.
"""

import json
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from atpframework.io.results import GRADDROP_CONVENTION, AttributionResult, NodeScores

How = Literal["signed", "mean", "mean_abs"]
"""What a figure shows per node (module docstring of ``figures``)."""

_HOWS = ("signed", "mean", "mean_abs")
_METHOD_NAMES = {
    "atp": "AtP", "atp_qkfix": "AtP + QK fix", "atp_graddrop": "AtP + GradDrop", "atp_star": "AtP*",
    "activation_patching": "activation patching",
}
_AXIS_TITLES = {"head": "head", "neuron": "neuron", "latent": "SAE latent", "layer": "layer", "": ""}
_SHOWN_POSITIONS = 24


def method_name(method: str) -> str:
    """The method as figures name it: ``AtP*`` for ``atp_star``; other names unchanged."""
    return _METHOD_NAMES.get(method, method)


@dataclass(frozen=True)
class Grid:
    """Values on a layer × column grid, with what a figure needs to label them."""

    values: Tensor
    """``row column`` float64: one row per layer of the selection."""
    layers: list[int | str]
    """The model layer of each row."""
    column_axis: str
    """The axis along the columns (``head``, ``pos``, ...; ``""`` for a single unnamed column)."""
    column_labels: list[str]
    """Model indices, or quoted tokens for ``pos``."""
    column_title: str
    value_label: str
    """What a value is, e.g. ``mean effect on logit_diff (AtP)``."""
    note: str = ""
    """A second title line (``\\n@ " to" (pos 13)``), or empty."""

    @property
    def row_labels(self) -> list[str]:
        return [str(layer) for layer in self.layers]

    def row_of(self, layer: int) -> int:
        """The row of model layer ``layer``; ValueError listing the layers otherwise."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer in self.layers:
            return self.layers.index(layer)
        raise ValueError(f"layer: {layer!r} is not among this selection's layers: {', '.join(self.row_labels)}")


def pick_selection(result: AttributionResult, name: str | None, prefer: str | None, need_positions: bool = False) -> str:
    """``name`` if the result has it (KeyError listing them otherwise); without a name, the first selection of kind
    ``prefer``, else (with ``need_positions``) the first with several positions, else the first selection."""
    if name is not None:
        ns = result[name]
        if need_positions:
            _need_positions(ns)
        return name
    if not result.nodes:
        raise ValueError("this result has no node selections")
    for ns in result.nodes.values():
        if prefer is not None and ns.kind == prefer:
            return ns.name
    if need_positions:
        with_pos = [ns for ns in result.nodes.values() if "pos" in ns.dims and ns.index["pos"] != "all"]
        if not with_pos:
            raise ValueError(f"token_strip: no selection of this result has per-position scores (selections: {', '.join(result.nodes)})")
        return next((ns.name for ns in with_pos if len(ns.index["pos"]) > 1), with_pos[0].name)
    return next(iter(result.nodes))


def _need_positions(ns: NodeScores) -> None:
    if "pos" not in ns.dims:
        raise ValueError(f"token_strip: selection {ns.name!r} ({ns.kind}) has no pos axis (its axes: {', '.join(ns.dims[1:])})")
    if ns.index["pos"] == "all":
        raise ValueError(f"token_strip: selection {ns.name!r} merged its positions (positions: \"all\"); nothing per position to show")


def _check_pair(result: AttributionResult, pair: int | None) -> None:
    n_pairs = len(result.metric_clean)
    if pair is not None and (isinstance(pair, bool) or not isinstance(pair, int) or not 0 <= pair < n_pairs):
        raise ValueError(f"pair: expected a prompt pair index 0..{n_pairs - 1} or None for the mean over pairs (got {pair!r})")


def node_values(result: AttributionResult, name: str, how: How = "signed", pair: int | None = None) -> Tensor:
    """One value per node of selection ``name``, shape ``layer *axes``, float64 (see ``figures`` for ``how``).

    ValueError for a GradDrop result with ``how="signed"`` that stores no signed estimate (a file older than
    schema 4, or a ``keep_top`` selection): its scores are magnitudes, so only ``mean_abs`` can be shown."""
    if how not in _HOWS:
        raise ValueError(f"how: allowed: {', '.join(map(repr, _HOWS))} (got {how!r})")
    _check_pair(result, pair)
    ns = result[name]
    if how == "signed" and result.sign_convention == GRADDROP_CONVENTION:
        signed = result.extras.get(f"{name}.signed")
        if signed is None:
            raise ValueError(f"how='signed': this {result.method} result stores no signed estimate of {name!r} (a file older "
                             "than schema 4, or a keep_top selection) and its scores are magnitudes; use how='mean_abs'")
        return result.signed_estimate(name) if pair is None else signed[pair].double()
    if pair is None:
        return ns.aggregate("mean_abs" if how == "mean_abs" else "mean").double()
    row = ns.per_pair[pair]
    row = row.to_dense() if row.is_sparse else row
    return (row.abs() if how == "mean_abs" else row).double()


def value_label(result: AttributionResult, how: How, pair: int | None) -> str:
    """What a value is, for a colour bar or an axis, on two lines: ``mean effect on logit_diff\\n(AtP)``."""
    method, metric = method_name(result.method), result.metric
    scope, where = ("mean ", "") if pair is None else ("", f", pair {pair}")
    graddrop = result.sign_convention == GRADDROP_CONVENTION
    if how == "signed" and graddrop:
        base = "QK-fix" if result.method == "atp_star" else "AtP"
        return f"{scope}effect on {metric}{where}\n({method}: signed {base} estimate)"
    if graddrop:
        return f"{scope}{method} score{where}\n(a magnitude: |effect| on {metric})"
    if how == "mean_abs":
        return f"{scope}|effect| on {metric}{where}\n({method})"
    return f"{scope}effect on {metric}{where}\n({method})"


def title_head(result: AttributionResult, name: str, pair: int | None) -> str:
    """The first title line: selection, method, metric and pairs."""
    ns = result.nodes.get(name)
    what = f"{name} ({ns.kind})" if ns is not None and ns.kind != name else name
    n_pairs = len(result.metric_clean)
    pairs = f"pair {pair}" if pair is not None else f"mean over {n_pairs} pair{'s' if n_pairs != 1 else ''}"
    return f"{what}: {method_name(result.method)} on {result.metric}, {pairs}"


def token_at(result: AttributionResult, label: int | str, pair: int | None) -> tuple[str, str]:
    """The quoted clean token at position label ``label`` and the position as labels show it: of every pair
    (``AttributionResult.position_text``), or of pair ``pair`` alone (its absolute position)."""
    if pair is None or label == "all":
        return result.position_text(label)
    tokens = result.clean_tokens[pair]
    at = int(label) if int(label) >= 0 else len(tokens) + int(label)
    strings = result.clean_strings[pair] if result.clean_strings else []
    token = json.dumps(strings[at], ensure_ascii=False) if 0 <= at < len(strings) else ""
    return token, str(at)


def _at(token: str, pos: str) -> str:
    return f"@ {token} (pos {pos})" if token else f"@ pos {pos}"


def _absolute(result: AttributionResult, label: int) -> int | None:
    """The absolute position of a position label, when it is the same in every prompt."""
    if label >= 0:
        return label
    lengths = {len(t) for t in result.clean_tokens}
    return next(iter(lengths)) + label if len(lengths) == 1 else None


def _listing(result: AttributionResult, labels: list[int]) -> str:
    shown = [f"{p} {token}".rstrip() for p in labels[:_SHOWN_POSITIONS] for token in [result.position_text(p)[0]]]
    more = f", … ({len(labels)} in all)" if len(labels) > _SHOWN_POSITIONS else ""
    return ", ".join(shown) + more


def _position_index(result: AttributionResult, ns: NodeScores, labels: list[int], position: int) -> int:
    """The entry of the ``pos`` axis that ``position`` names: the same label, else the same absolute position."""
    if position in labels:
        return labels.index(position)
    target = _absolute(result, position)
    for i, label in enumerate(labels):
        if target is not None and _absolute(result, label) == target:
            return i
    raise ValueError(f"position: {position} is not among the positions of {ns.name!r}: {_listing(result, labels)}")


def _pick_position(result: AttributionResult, ns: NodeScores, values: Tensor, dim: int, position: int | str | None,
                   pair: int | None) -> tuple[Tensor, str]:
    """``values`` at one position of axis ``dim`` (or summed over positions) and the title line saying which."""
    if position is not None and position != "sum" and (isinstance(position, bool) or not isinstance(position, int)):
        raise ValueError(f"position: expected a position (an int, as the plan wrote it or absolute), 'sum' or None (got {position!r})")
    labels = ns.index["pos"]
    if position == "sum":
        return values.sum(dim), "\nsummed over positions"
    if isinstance(labels, str):  # "all"
        if position is not None:
            raise ValueError(f"position: selection {ns.name!r} merged its positions (positions: \"all\"); leave position out")
        return values.select(dim, 0), "\nall positions (merged)"
    if position is None:
        if len(labels) != 1:
            raise ValueError(f"position: selection {ns.name!r} has {len(labels)} positions; pick one with position= "
                             f"({_listing(result, labels)}), or position='sum' to add them")
        index = 0
    else:
        index = _position_index(result, ns, labels, int(position))
    return values.select(dim, index), "\n" + _at(*token_at(result, labels[index], pair))


def _labels(ns: NodeScores, dim: str) -> list[int | str]:
    index = ns.index[dim]
    return ["all"] if index == "all" else list(index)


def _columns(result: AttributionResult, ns: NodeScores, axis: str, pair: int | None) -> tuple[list[str], str]:
    """Column labels and the column axis title: tokens for ``pos`` (positions without token strings)."""
    if axis == "":
        return [""], ""
    if axis != "pos":
        return [str(label) for label in _labels(ns, axis)], _AXIS_TITLES.get(axis, axis)
    texts = [token_at(result, label, pair) for label in _labels(ns, "pos")]
    if all(token for token, _ in texts):
        return [token for token, _ in texts], "token"
    return [pos for _, pos in texts], "position"


def layer_grid(result: AttributionResult, name: str, values: Tensor, how: How, pair: int | None,
               position: int | str | None) -> Grid:
    """``values`` (``layer *axes``) of selection ``name`` as a layer × column grid: the one axis besides
    ``layer`` and ``pos`` at ``position`` (see ``figures.heatmap``), or ``pos`` when it is the only other axis."""
    ns = result[name]
    axes = list(ns.dims[2:])
    note = ""
    if axes == ["pos"]:
        if position is not None:
            raise ValueError(f"position: selection {name!r} ({ns.kind}) has no axis besides layer and pos, so its heatmap is "
                             "layer × position; leave position out (or use bar)")
    else:
        if "pos" in axes:
            values, note = _pick_position(result, ns, values, axes.index("pos") + 1, position, pair)
            axes.remove("pos")
        elif position is not None:
            raise ValueError(f"position: selection {name!r} ({ns.kind}) has no pos axis")
        if len(axes) > 1:
            raise ValueError(f"heatmap: selection {name!r} has the axes {', '.join(axes)} besides layer and pos; a heatmap "
                             "shows layer × one of them: use bar")
        if not axes:
            values, axes = values.unsqueeze(1), [""]
    columns, title = _columns(result, ns, axes[0], pair)
    return Grid(values.reshape(len(_labels(ns, "layer")), len(columns)), _labels(ns, "layer"), axes[0], columns, title,
                value_label(result, how, pair), note)


def position_strip(result: AttributionResult, name: str, values: Tensor, how: How, pair: int | None) -> Grid:
    """``values`` (``layer *axes``) of selection ``name`` as a layer × position grid, other axes summed."""
    ns = result[name]
    _need_positions(ns)
    axes = list(ns.dims[2:])
    rest = [a for a in axes if a != "pos"]
    values = values.movedim(axes.index("pos") + 1, 1)
    notes = []
    for axis in rest:
        labels = _labels(ns, axis)
        notes.append(f"summed over {len(labels)} {axis}s" if len(labels) > 1 else f"{axis} {labels[0]}")
    if rest:
        values = values.flatten(2).sum(2)
    columns, title = _columns(result, ns, "pos", pair)
    return Grid(values, _labels(ns, "layer"), "pos", columns, title, value_label(result, how, pair),
                ("\n" + ", ".join(notes)) if notes else "")
