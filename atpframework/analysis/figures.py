"""Figures of one result's scores: layer × head heatmaps, per-position token strips, top-k bar charts and
the verified-vs-estimated scatter. ``result.plot`` (``ResultPlots``) is their accessor.

Every function returns a matplotlib ``Figure`` built without pyplot (nothing global to close, safe in
notebook loops) and, given ``path``, also writes it atomically as PNG, SVG or PDF by the suffix. What a
figure shows is chosen by ``how``:

* ``"signed"`` (default): the signed effect estimate, the mean over pairs of the per-pair scores; for the
  GradDrop methods (``atp_graddrop``, ``atp_star``), whose scores are magnitudes, the plain AtP or QK-fix
  estimate they store beside them (``extras.<name>.signed``). Diverging colours, symmetric around 0.
* ``"mean"``: the signed mean of the stored scores (for GradDrop methods, of the magnitudes).
* ``"mean_abs"``: the mean over pairs of ``|score|``, the ranking every method reports.

``pair=i`` shows prompt pair ``i`` alone instead of the mean over pairs. Rows and columns are labelled
with the model's layer, head and neuron indices, positions with the prompt's tokens (``" to"``).
The numbers come from ``figure_data``; drawing helpers from ``plots``.
"""

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from atpframework.analysis.figure_data import (
    Grid,
    How,
    layer_grid,
    method_name,
    node_values,
    pick_selection,
    position_strip,
    title_head,
    value_label,
)
from atpframework.analysis.plots import _new_figure, save_figure
from atpframework.io.results import AttributionResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = str | os.PathLike[str] | None
_RED, _BLUE, _GREY = "#b2182b", "#2166ac", "0.6"
"""Bar colours of positive and negative effects (the ends of RdBu_r) and of unknown signs."""


def _finish(fig: "Figure", path: PathLike) -> "Figure":
    if path is not None:
        save_figure(fig, path)
    return fig


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _set_ticks(ax: Any, axis: str, labels: list[str], rotate: bool = False, most: int = 48) -> None:
    """Tick every entry (every ``n``-th when there are more than ``most``) with its label."""
    step = max(1, math.ceil(len(labels) / most))
    where = list(range(0, len(labels), step))
    text = [labels[i] for i in where]
    if axis == "x":
        extra: dict[str, Any] = {"rotation": 60, "ha": "right", "rotation_mode": "anchor"} if rotate else {}
        ax.set_xticks(where, text, **extra)
    else:
        ax.set_yticks(where, text)


def _limit(values: Tensor) -> float:
    """The largest finite ``|value|``; 1 when there is none or it is 0 (colour limits must differ)."""
    finite = values[torch.isfinite(values)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    return top if top > 0 else 1.0


def _draw_grid(grid: Grid, how: How, title: str) -> "Figure":
    """A layer × column heatmap: diverging and symmetric around 0, or sequential from 0 for ``mean_abs``."""
    import matplotlib

    rows, cols = grid.values.shape
    fig = _new_figure(_clamp(2.6 + 0.34 * cols, 5.5, 16.0), _clamp(1.8 + 0.2 * rows, 3.4, 10.0))
    ax = fig.add_subplot()
    limit = _limit(grid.values)
    cmap = matplotlib.colormaps["Reds" if how == "mean_abs" else "RdBu_r"].with_extremes(bad="0.8")
    image = ax.imshow(grid.values.numpy(), cmap=cmap, vmin=0.0 if how == "mean_abs" else -limit, vmax=limit,
                      aspect="auto", interpolation="nearest")
    _set_ticks(ax, "x", grid.column_labels, rotate=grid.column_axis == "pos")
    _set_ticks(ax, "y", grid.row_labels)
    ax.set_xlabel(grid.column_title)
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=grid.value_label)
    ax.set_title(title, fontsize="medium")
    return fig


def heatmap(result: AttributionResult, name: str | None = None, position: int | str | None = None,
            pair: int | None = None, how: How = "signed", path: PathLike = None) -> "Figure":
    """Layer × head (or × neuron, latent, ...) heatmap of selection ``name`` (default: the first ``attn_head``
    selection, else the first selection).

    A selection with one axis besides ``layer`` and ``pos`` shows that axis at one position: ``position``
    picks it (a position label as the plan wrote it, or the same absolute position, e.g. ``-1`` for the
    last token of equal-length prompts) or ``"sum"`` adds all positions; it may be left out when the
    selection has a single position, and ValueError lists the positions otherwise. A selection whose only
    other axis is ``pos`` (``resid``) is drawn layer × position, columns labelled with tokens."""
    name = pick_selection(result, name, prefer="attn_head")
    values = node_values(result, name, how, pair)
    grid = layer_grid(result, name, values, how, pair, position)
    return _finish(_draw_grid(grid, how, title_head(result, name, pair) + grid.note), path)


def token_strip(result: AttributionResult, name: str | None = None, layer: int | None = None,
                pair: int | None = None, how: How = "signed", path: PathLike = None) -> "Figure":
    """Scores per token position of selection ``name`` (default: the first with several positions).

    Other axes (heads, neurons) are summed per position. Without ``layer``: a layer × position heatmap
    with the tokens as column labels; with ``layer`` (a model layer index): one bar per position,
    coloured by the sign of the effect."""
    name = pick_selection(result, name, prefer=None, need_positions=True)
    values = node_values(result, name, how, pair)
    strip = position_strip(result, name, values, how, pair)
    if layer is None:
        return _finish(_draw_grid(strip, how, title_head(result, name, pair) + strip.note), path)
    row = strip.row_of(layer)
    signs = _signs(how, lambda: position_strip(result, name, node_values(result, name, "signed", pair), "signed", pair).values[row])
    heights = strip.values[row]
    fig = _new_figure(_clamp(2.4 + 0.4 * len(heights), 5.0, 16.0), 4.0)
    ax = fig.add_subplot()
    ax.bar(range(len(heights)), heights.tolist(), color=_colours(signs if signs is not None else heights))
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    _set_ticks(ax, "x", strip.column_labels, rotate=True)
    ax.set_xlabel(strip.column_title)
    ax.set_ylabel(strip.value_label)
    note = f", {strip.note.strip()}" if strip.note else ""
    ax.set_title(f"{title_head(result, name, pair)}\nlayer {layer}{note}", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, path)


def _signs(how: How, signed: Callable[[], Tensor]) -> Tensor | None:
    """For ``mean_abs`` bars (all >= 0): ``signed()``, the signed estimate of the same bars, whose sign colours
    them; None for other ``how`` (the bars carry their own sign) or when the result has no signed estimate."""
    if how != "mean_abs":
        return None
    try:
        return signed()
    except ValueError:
        return None


def _colours(signs: Tensor) -> list[str]:
    return [_RED if v > 0 else _BLUE if v < 0 else _GREY for v in signs.tolist()]


def bar(result: AttributionResult, name: str | None = None, k: int = 20, how: How = "signed",
        pair: int | None = None, path: PathLike = None) -> "Figure":
    """Horizontal bars of the ``k`` nodes with the largest ``|value|`` (selection ``name``, or all
    selections), largest at the top, labelled like ``top_k`` (``attn_head L3 H1 @ " to" (pos 13)``) and
    coloured by the sign of the effect (``mean_abs`` bars: by the sign of the signed estimate). Ties keep
    the global node order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"bar: k must be a whole number >= 1 (got {k!r})")
    names = [pick_selection(result, name, prefer=None)] if name is not None else list(result.nodes)
    numbering = result.numbering
    offsets = dict(zip(numbering.names, numbering.offsets))
    values = torch.cat([node_values(result, n, how, pair).flatten() for n in names])
    nodes = torch.cat([torch.arange(result[n].per_pair[0].numel()) + offsets[n] for n in names])
    key = torch.where(torch.isnan(values), torch.tensor(-1.0, dtype=values.dtype), values.abs())
    top = torch.sort(key, descending=True, stable=True).indices[:k]
    signs = _signs(how, lambda: torch.cat([node_values(result, n, "signed", pair).flatten() for n in names])[top])
    heights = values[top]
    labels = [result.node_label(int(g)) for g in nodes[top]]
    fig = _new_figure(8.0, _clamp(1.4 + 0.3 * len(labels), 3.0, 16.0))
    ax = fig.add_subplot()
    colours = _colours(signs if signs is not None else heights)
    ax.barh(range(len(labels)), heights.tolist(), color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel(value_label(result, how, pair))
    ax.set_title(f"{title_head(result, name or 'all selections', pair)}\ntop {len(labels)} nodes, largest |value| first",
                 fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    _sign_legend(fig, colours, result.metric)
    return _finish(fig, path)


def _sign_legend(fig: "Figure", colours: list[str], metric: str) -> None:
    """What the bar colours mean, below the axes."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=text) for c, text in ((_RED, f"effect > 0: patching raises {metric}"),
                                                          (_BLUE, f"effect < 0: patching lowers {metric}")) if c in colours]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)


def scatter(result: AttributionResult, name: str | None = None, how: How = "signed", pair: int | None = None,
            labels: int = 5, path: PathLike = None) -> "Figure":
    """Verified exact effect (x, ``atpf verify``) against the estimate (y) of every verified node (of
    selection ``name``, or all), one colour per selection, with the line y = x, the ``labels`` nodes of
    largest exact ``|effect|`` named, and the Pearson correlation in the title. ``how="mean_abs"``:
    mean ``|effect|`` against mean ``|score|``. ValueError when nothing is verified."""
    verified = [n for n in ([pick_selection(result, name, prefer=None)] if name is not None else result.nodes) if n in result.verified]
    if not verified:
        where = f"selection {name!r} of this result" if name is not None else "this result"
        raise ValueError(f"scatter: {where} has no verified nodes; verify the top nodes first: "
                         "atpf verify RESULT.safetensors --budget 50 (or atpframework.analysis.verify.verify)")
    fig = _new_figure(6.4, 6.4)
    ax = fig.add_subplot()
    xs, ys, nodes = [], [], []
    numbering = result.numbering
    for i, n in enumerate(verified):
        checked = result.verified[n]
        effects = checked.effects.double()
        effects = effects.abs() if how == "mean_abs" else effects
        x = effects.mean(0) if pair is None else effects[pair]
        y = node_values(result, n, how, pair).flatten()[checked.index]
        ax.scatter(x.tolist(), y.tolist(), s=18, color=f"C{i}", label=n, alpha=0.85)
        xs.append(x)
        ys.append(y)
        nodes.append(numbering.global_index(numbering.names.index(n), checked.index))
    x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(nodes)
    _diagonal(ax, x, y)
    _name_points(ax, result, x, y, g, labels)
    scope = "mean over pairs" if pair is None else f"pair {pair}"
    ax.set_xlabel(f"exact {'|effect|' if how == 'mean_abs' else 'effect'} on {result.metric} (activation patching, {scope})")
    ax.set_ylabel(value_label(result, how, pair))
    ax.set_title(f"{method_name(result.method)} estimate vs exact effect: {len(x)} verified nodes, {_pearson(x, y)}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def _name_points(ax: Any, result: AttributionResult, x: Tensor, y: Tensor, nodes: Tensor, count: int) -> None:
    """Label the ``count`` points of largest ``|x|``; a label near an earlier one moves down a line."""
    fig = ax.figure
    fig.canvas.draw()  # settle the layout, so data -> pixel positions are final
    placed: list[tuple[float, float]] = []
    for j in torch.sort(x.abs(), descending=True, stable=True).indices[: max(0, count)].tolist():
        px, py = ax.transData.transform((float(x[j]), float(y[j])))
        near = sum(1 for qx, qy in placed if abs(qx - px) < 160 and abs(qy - py) < 14)
        placed.append((px, py - 14 * near))
        ax.annotate(result.node_label(int(nodes[j])), (float(x[j]), float(y[j])), xytext=(5, 5 - 14 * near),
                    textcoords="offset pixels", fontsize="x-small")


def _diagonal(ax: Any, x: Tensor, y: Tensor) -> None:
    """The line y = x over a square range holding every finite point and 0."""
    both = torch.cat([x, y, torch.zeros(1, dtype=x.dtype)])
    both = both[torch.isfinite(both)]
    low, high = float(both.min()), float(both.max())
    pad = 0.06 * (high - low) or 1.0
    ax.plot([low - pad, high + pad], [low - pad, high + pad], linestyle="--", color="0.5", linewidth=1.0, label="y = x")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal", adjustable="box")


def _pearson(x: Tensor, y: Tensor) -> str:
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return "Pearson r undefined"
    return f"Pearson r = {float(torch.corrcoef(torch.stack([x, y]))[0, 1]):.3f}"


def diagnostic_labels(result: AttributionResult, verified_top: int) -> list[str]:
    """Node labels of the verified nodes ``atpf diagnose`` plots (the estimated top ``verified_top``), in the
    order of ``Diagnosis.verified_effects`` (mean ``|effect|`` descending): ``plot_diagnostic(labels=...)``."""
    from atpframework.analysis.recall import ranking_from_scores
    from atpframework.analysis.verify import verified_effects

    estimates = torch.cat([ns.aggregate("mean_abs").flatten() for ns in result.nodes.values()])
    head = ranking_from_scores(estimates)[:verified_top]
    nodes, _, effects = verified_effects(result)
    in_head = torch.isin(nodes, head)
    order = effects[:, in_head].abs().mean(0).sort(descending=True).indices
    return [result.node_label(int(n)) for n in nodes[in_head][order]]


class ResultPlots:
    """``result.plot``: the figures of one result. Each method returns the ``Figure`` (and writes it to
    ``path`` when given); see the module functions of the same names for the arguments."""

    def __init__(self, result: AttributionResult) -> None:
        self.result = result

    def heatmap(self, name: str | None = None, position: int | str | None = None, pair: int | None = None,
                how: How = "signed", path: PathLike = None) -> "Figure":
        """Layer × head (or other axis) heatmap; see ``figures.heatmap``."""
        return heatmap(self.result, name, position, pair, how, path)

    def token_strip(self, name: str | None = None, layer: int | None = None, pair: int | None = None,
                    how: How = "signed", path: PathLike = None) -> "Figure":
        """Scores per token position; see ``figures.token_strip``."""
        return token_strip(self.result, name, layer, pair, how, path)

    def bar(self, name: str | None = None, k: int = 20, how: How = "signed", pair: int | None = None,
            path: PathLike = None) -> "Figure":
        """Top-``k`` nodes as signed bars; see ``figures.bar``."""
        return bar(self.result, name, k, how, pair, path)

    def scatter(self, name: str | None = None, how: How = "signed", pair: int | None = None, labels: int = 5,
                path: PathLike = None) -> "Figure":
        """Verified exact effect against the estimate; see ``figures.scatter``."""
        return scatter(self.result, name, how, pair, labels, path)

    def __repr__(self) -> str:
        return "ResultPlots: heatmap(name, position=...), token_strip(name, layer=...), bar(name, k=20), scatter()"

