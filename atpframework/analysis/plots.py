"""Evaluation figures (cost-of-verified-recall curves, the false-negative diagnostic, circuit faithfulness
curves) and the drawing helpers every figure of the package shares.

This module owns drawing only; the numbers come from ``atpframework.analysis.recall`` (curves),
``atpframework.analysis.circuits`` (faithfulness) and from the diagnostic's bound ``theta*`` (method notes,
section 5). Figures of a result's scores (heatmaps, token strips, bar charts, the verified-vs-estimated
scatter) are in ``atpframework.analysis.figures``.
matplotlib is optional (extra ``plot``): it is imported inside each function, so importing this module
never needs it, and a missing install raises ``PlotDependencyError`` (an ``ImportError``) that says what
to install.

Figures use matplotlib's object API (``Figure`` + the non-interactive Agg canvas), never pyplot's
global state, so plotting is safe in scripts, servers, threads and notebook loops (nothing to close).
Files are written atomically, as PNG, SVG or PDF by the path's suffix: a temporary file in the target
directory, then ``os.replace``; on any error the temporary file is removed and a file already at the
target path is left unchanged.
"""

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from atpframework.analysis.recall import RecallCurve
from atpframework.errors import AtpfError
from atpframework.io.files import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure


_DPI = 100
_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


class PlotDependencyError(AtpfError, ImportError):
    """matplotlib is not installed; plots need the ``plot`` extra."""


def _new_figure(width: float, height: float) -> "Figure":
    """A Figure on an Agg canvas (no pyplot, no GUI backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotDependencyError(
            f"plotting needs matplotlib, which is not installed ({err}); install it with: pip install 'atpframework[plot]'"
        ) from err
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; ValueError unless it ends in .png, .svg or .pdf."""
    out = Path(path)
    if out.suffix.lower() not in _FORMATS:
        raise ValueError(f"path: figures are written as PNG, SVG or PDF; expected a name ending in .png, .svg or .pdf (got {str(path)!r})")
    return out


def _save_atomically(fig: "Figure", path: Path) -> Path:
    """Write ``fig`` at ``path`` atomically, in the format its suffix names."""
    fmt = _FORMATS[path.suffix.lower()]
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=_DPI))


def save_figure(fig: "Figure", path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` atomically as PNG, SVG or PDF (by the suffix of ``path``); returns the path."""
    return _save_atomically(fig, _figure_path(path))


def _plain(value: float) -> str:
    """A tick value as plain text: ``2.025``, ``0.1``, ``1000``; ``1e-05`` only where plain text would be long."""
    return f"{value:.4g}" if value else "0"


def _plain_log_ticks(ax: Any, which: str = "both") -> None:
    """Label a log axis with plain numbers (``0.2``, ``2.05``, ``100``) instead of ``2×10⁻¹``; call it after plotting.

    Over a range of less than a factor 5 (a log locator would leave one or two ticks, or fall back to
    ``2.025×10⁰``) the ticks are evenly spaced round numbers; otherwise which ticks get a label stays
    matplotlib's choice (decades, and minor ticks only on short ranges) and only the text changes."""
    from matplotlib.ticker import (
        FuncFormatter,
        LogFormatterSciNotation,
        MaxNLocator,
        NullFormatter,
    )

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return _plain(x) if super().__call__(x, pos) else ""

    for name in ("x", "y") if which == "both" else (which,):
        axis = ax.xaxis if name == "x" else ax.yaxis
        low, high = sorted(ax.get_xlim() if name == "x" else ax.get_ylim())
        if 0 < low and high / low < 5:
            axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
            axis.set_major_formatter(FuncFormatter(lambda value, _: _plain(value)))
            axis.set_minor_formatter(NullFormatter())
        else:
            axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
            axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _vector(values: Any, arg: str) -> Tensor:
    """A 1-D finite float64 CPU tensor (may be empty); ValueError naming ``arg`` otherwise."""
    if not isinstance(values, Tensor) or values.dim() != 1 or values.is_complex():
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{arg}: expected a 1-D real tensor of shape (node,) (got {shape})")
    out = values.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{arg}: every entry must be finite")
    return out


# ------------------------------------------------------------------------------------- recall curves
def recall_figure(curves: Sequence[RecallCurve], title: str = "") -> "Figure":
    """Log-log figure of cost (forward passes, y) against ``k`` (true top nodes verified, x).

    One line per curve through its points ``(k, cost(k))``, labelled with its RelCost; the oracle
    diagonal ``y = x`` is dashed. Every curve lies on or above it. Ticks are plain numbers."""
    curves = list(curves)
    if not curves:
        raise ValueError("curves: expected at least one RecallCurve")
    for i, curve in enumerate(curves):
        if not isinstance(curve, RecallCurve):
            raise ValueError(f"curves[{i}]: expected a RecallCurve (got {type(curve).__name__})")
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    k_top = max(c.k_max for c in curves)
    for curve in curves:
        ks = range(1, curve.k_max + 1)
        ax.plot(ks, curve.costs.tolist(), linewidth=1.6, label=f"{curve.name} (RelCost {curve.relative:.2f})")
    ax.plot([1, k_top], [1, k_top], linestyle="--", color="0.4", linewidth=1.0, label="oracle (cost = k)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("k: the true top-k nodes (by exact |effect|)")
    ax.set_ylabel("cost: forward passes per prompt pair\n(method + verifications until all k are verified)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_recall_curves(curves: Sequence[RecallCurve], path: str | os.PathLike[str], title: str = "") -> Path:
    """``recall_figure(curves, title)`` written to ``path`` (PNG, SVG or PDF by suffix); returns the path."""
    out = _figure_path(path)
    return _save_atomically(recall_figure(curves, title), out)


RecallBand = tuple[str, Tensor, Tensor, Tensor]
"""One method's single-pair curves summarised over prompt pairs: its label and, per ``k`` (entry ``k-1``), the
median, first and third quartile of ``cost(k)`` (``atpframework.analysis.evaluation``)."""


def recall_bands_figure(bands: Sequence[RecallBand], curves: Sequence[RecallCurve] = (), title: str = "") -> "Figure":
    """Log-log figure of the cost of verified recall over many prompt pairs (see ``plot_recall_bands``)."""
    bands = list(bands)
    curves = list(curves)
    if not bands:
        raise ValueError("bands: expected at least one (label, median, q1, q3) band")
    checked = []
    for i, band in enumerate(bands):
        try:
            label, median, q1, q3 = band
        except (TypeError, ValueError):
            raise ValueError(f"bands[{i}]: expected (label, median, q1, q3) (got {type(band).__name__})") from None
        median, q1, q3 = (_vector(v, f"bands[{i}]") for v in (median, q1, q3))
        if not (median.numel() == q1.numel() == q3.numel() >= 1):
            raise ValueError(f"bands[{i}]: median, q1 and q3 need one value per k (got {median.numel()}, {q1.numel()}, {q3.numel()})")
        checked.append((str(label), median, q1, q3))
    for i, curve in enumerate(curves):
        if not isinstance(curve, RecallCurve):
            raise ValueError(f"curves[{i}]: expected a RecallCurve (got {type(curve).__name__})")
    fig = _new_figure(12.0 if curves else 6.4, 4.8)
    axes = fig.subplots(1, 2 if curves else 1, squeeze=False)[0]
    ax = axes[0]
    k_top = max(m.numel() for _, m, _, _ in checked)
    for i, (label, median, q1, q3) in enumerate(checked):
        ks = list(range(1, median.numel() + 1))
        ax.fill_between(ks, q1.tolist(), q3.tolist(), color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(ks, median.tolist(), color=f"C{i}", linewidth=1.6, label=f"{label} (median, IQR band)")
    ax.plot([1, k_top], [1, k_top], linestyle="--", color="0.4", linewidth=1.0, label="oracle (cost = k)")
    ax.set_title("single-pair setting: each pair separately")
    if curves:
        other = axes[1]
        for i, curve in enumerate(curves):
            other.plot(range(1, curve.k_max + 1), curve.costs.tolist(), color=f"C{i}", linewidth=1.6,
                       label=f"{curve.name} (RelCost {curve.relative:.2f})")
        top = max(c.k_max for c in curves)
        other.plot([1, top], [1, top], linestyle="--", color="0.4", linewidth=1.0, label="oracle (cost = k)")
        other.set_title("distributional setting: one ranking for all pairs")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_yscale("log")
        _plain_log_ticks(axis)
        axis.set_xlabel("k: the true top-k nodes (by exact |effect|)")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    axes[0].set_ylabel("cost: forward passes per prompt pair\n(method + verifications until all k are verified)")
    if title:
        fig.suptitle(title)
    return fig


def plot_recall_bands(bands: Sequence[RecallBand], curves: Sequence[RecallCurve], path: str | os.PathLike[str], title: str = "") -> Path:
    """Write the cost of verified recall over many prompt pairs to ``path`` (PNG, SVG or PDF by suffix); returns the path.

    First panel (the single-pair setting): per method, the median over pairs of ``cost(k)`` against ``k``, with
    its interquartile range as a band. Second panel (when ``curves`` are given; the distributional setting):
    each method's one curve (``recall_figure``'s lines). Log-log, the oracle ``cost = k`` dashed, plain ticks."""
    out = _figure_path(path)
    return _save_atomically(recall_bands_figure(bands, curves, title), out)


# ------------------------------------------------------------------------------------- the diagnostic
def _check_bounds(bounds: Mapping[float, Sequence[tuple[int, float]]]) -> dict[float, list[tuple[int, float]]]:
    """Validated bounds: confidence in (0, 1) -> ``(n_samples >= 0, theta)`` sorted by samples.

    ``theta`` may be ``+inf`` (the diagnostic's value when some node has fewer than 2 samples in a group);
    NaN and ``-inf`` are refused.
    """
    if not isinstance(bounds, Mapping):
        raise ValueError(f"bounds: expected a mapping confidence -> [(n_samples, theta), ...] (got {type(bounds).__name__})")
    checked: dict[float, list[tuple[int, float]]] = {}
    for conf, entries in bounds.items():
        if isinstance(conf, bool) or not isinstance(conf, numbers.Real) or not 0 < float(conf) < 1:
            raise ValueError(f"bounds: confidence levels must be in (0, 1) (got {conf!r})")
        rows = []
        for entry in entries:
            try:
                samples, theta = entry
            except (TypeError, ValueError):
                raise ValueError(f"bounds[{conf}]: expected (n_samples, theta) pairs (got {entry!r})") from None
            if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 0:
                raise ValueError(f"bounds[{conf}]: n_samples must be a non-negative integer (got {samples!r})")
            if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or math.isnan(theta) or theta == -math.inf:
                raise ValueError(f"bounds[{conf}]: theta must be a number or +inf (got {theta!r})")
            rows.append((int(samples), float(theta)))
        if not rows:
            raise ValueError(f"bounds[{conf}]: expected at least one (n_samples, theta) entry")
        checked[float(conf)] = sorted(rows)
    return dict(sorted(checked.items()))


def diagnostic_figure(
    verified_effects: Tensor,
    bounds: Mapping[float, Sequence[tuple[int, float]]],
    remainder_effects: Tensor | None = None,
    title: str = "",
    labels: Sequence[str] | None = None,
    n_labels: int = 5,
) -> "Figure":
    """The false-negative diagnostic as a figure (see ``plot_diagnostic`` for the arguments and panels)."""
    verified = _vector(verified_effects, "verified_effects").abs()
    if labels is not None and len(labels) != verified.numel():
        raise ValueError(f"labels: expected one label per verified effect ({verified.numel()}), got {len(labels)}")
    order = verified.sort(descending=True, stable=True).indices
    verified = verified[order]
    ordered_labels = [labels[int(i)] for i in order] if labels is not None else []
    remainder = None
    if remainder_effects is not None:
        remainder = _vector(remainder_effects, "remainder_effects").abs().sort(descending=True).values
    if verified.numel() == 0 and (remainder is None or remainder.numel() == 0):
        raise ValueError("verified_effects: nothing to plot (no verified and no remainder effects)")
    checked = _check_bounds(bounds)
    budgets = {samples for rows in checked.values() for samples, _ in rows}
    two_panels = len(budgets) > 1
    fig = _new_figure(12.0 if two_panels else 6.8, 5.4)
    axes = fig.subplots(1, 2 if two_panels else 1, squeeze=False)[0]
    colors = {conf: f"C{i + 1}" for i, conf in enumerate(checked)}
    _draw_effects_and_bound(axes[0], verified, remainder, checked, colors)
    _label_top(axes[0], verified, ordered_labels[: max(0, n_labels)])
    if two_panels:
        _draw_bound_against_samples(axes[1], checked, budgets, colors)
    if title:
        fig.suptitle(title)
    return fig


def plot_diagnostic(
    verified_effects: Tensor,
    bounds: Mapping[float, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    remainder_effects: Tensor | None = None,
    title: str = "",
    labels: Sequence[str] | None = None,
    n_labels: int = 5,
) -> Path:
    """Plot the false-negative diagnostic to ``path`` (PNG, SVG or PDF by suffix); returns the path.

    ``verified_effects``: ``node``, the exact effects (e.g. mean |effect| over prompt pairs) of the verified
    top nodes. ``bounds``: confidence level (e.g. 0.95) -> ``[(n_samples, theta*), ...]``, the upper bound
    on the |effect| of every unverified node after each sample budget. ``remainder_effects``: ``node`` true
    effects of the unverified nodes, when known (e.g. from full patching on a small model). ``labels``: one
    node label per verified effect (``AttributionResult.node_label``); the ``n_labels`` largest are named.

    First panel: ``|effect|`` of the verified nodes sorted descending against their rank (log y, integer
    ranks), the remainder's sorted descending as points at the following ranks, and one horizontal line
    per confidence at ``theta*`` of its largest sample budget. When the bounds hold more than one budget,
    a second panel shows ``theta*`` against the number of samples (log-log), one line per confidence.
    ``theta*`` may be ``+inf`` (too few samples); it and other non-positive values cannot be drawn on a
    log axis and are left out (an undrawn line of the first panel stays in its legend, with its value).
    """
    out = _figure_path(path)
    fig = diagnostic_figure(verified_effects, bounds, remainder_effects, title, labels, n_labels)
    return _save_atomically(fig, out)


def _draw_effects_and_bound(
    ax: Any, verified: Tensor, remainder: Tensor | None, checked: dict[float, list[tuple[int, float]]], colors: dict[float, str]
) -> None:
    """``plot_diagnostic``'s first panel: |effect| against rank and one line per confidence at its last bound."""
    from matplotlib.ticker import MaxNLocator

    n_verified = verified.numel()
    if n_verified:
        ax.plot(range(1, n_verified + 1), verified.tolist(), marker="o", markersize=3, linewidth=1.2,
                color="C0", label="verified nodes: exact |effect|")
    if remainder is not None and remainder.numel():
        ax.scatter(range(n_verified + 1, n_verified + remainder.numel() + 1), remainder.tolist(), s=6,
                   color="0.5", label="unverified nodes: true |effect|")
    for conf, rows in checked.items():
        samples, theta = rows[-1]
        label = f"θ* at {conf:.0%} confidence ({samples} samples)"
        if math.isfinite(theta) and theta > 0:
            ax.axhline(theta, linestyle="--", linewidth=1.2, color=colors[conf], label=label)
        else:  # not drawable on a log axis: keep it in the legend
            ax.plot([], [], linestyle="--", linewidth=1.2, color=colors[conf], label=f"{label} = {theta:g} (not drawn)")
    ax.set_yscale("log", nonpositive="mask")
    _plain_log_ticks(ax, "y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("rank (by exact |effect|)")
    ax.set_ylabel("|effect|: |metric change| when the node is patched\n(mean over prompt pairs)")
    ax.set_title("verified effects and θ*, the bound on every unverified node")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize="small", frameon=False)


def _label_top(ax: Any, verified: Tensor, labels: list[str]) -> None:
    """Name the largest verified nodes: one text per node in the panel's upper right, an arrow to its point."""
    for i, label in enumerate(labels):
        ax.annotate(label, xy=(i + 1, float(verified[i])), xytext=(0.97, 0.95 - 0.075 * i), textcoords="axes fraction",
                    ha="right", va="top", fontsize="small", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkA": 2, "shrinkB": 3})


def _draw_bound_against_samples(ax: Any, checked: dict[float, list[tuple[int, float]]], budgets: set[int], colors: dict[float, str]) -> None:
    """``plot_diagnostic``'s second panel: the bound against the sample budget (log-log), one line per confidence."""
    from matplotlib.ticker import NullFormatter

    for conf, rows in checked.items():
        thetas = [t if math.isfinite(t) else math.nan for _, t in rows]
        ax.plot([m for m, _ in rows], thetas, marker="o", color=colors[conf], label=f"θ* at {conf:.0%} confidence")
    ax.set_xscale("log")
    ax.set_yscale("log", nonpositive="mask")
    _plain_log_ticks(ax)
    ticks = sorted(m for m in budgets if m > 0)
    if 0 < len(ticks) <= 8:  # label the budgets themselves, not crowded minor ticks
        ax.set_xticks(ticks, [str(m) for m in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("samples: random subsets of unverified nodes patched together")
    ax.set_ylabel("θ*: upper bound on any unverified node's |effect|")
    ax.set_title("the bound against the number of samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")


# ------------------------------------------------------------------------------------- circuit faithfulness
FaithfulnessLine = tuple[str, Sequence[int], Any]
"""One curve of ``faithfulness_figure``: its label, the circuit sizes (edges) and the faithfulness at each."""


def faithfulness_figure(curves: Sequence[FaithfulnessLine], title: str = "") -> "Figure":
    """Faithfulness (y) against circuit size in edges (x, log scale), one line with markers per curve; dashed
    lines at 1 (the whole model) and 0 (the noise run). Ticks on x are plain numbers."""
    curves = list(curves)
    if not curves:
        raise ValueError("curves: expected at least one (label, sizes, faithfulness) curve")
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    for i, (label, sizes, values) in enumerate(curves):
        ys = [float(v) for v in values]
        if len(ys) != len(sizes) or any(int(s) < 1 for s in sizes):
            raise ValueError(f"curves[{i}]: expected one faithfulness per size, sizes >= 1 (got {len(sizes)} sizes, {len(ys)} values)")
        ax.plot([int(s) for s in sizes], ys, marker="o", markersize=3.5, linewidth=1.6, label=label)
    for level in (0.0, 1.0):
        ax.axhline(level, linestyle="--", color="0.4", linewidth=1.0)
    ax.set_xscale("log")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel("circuit size (edges)")
    ax.set_ylabel("faithfulness\n(m(circuit) - m(noise)) / (m(clean) - m(noise))")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_faithfulness(curves: Sequence[FaithfulnessLine], path: str | os.PathLike[str], title: str = "") -> Path:
    """``faithfulness_figure(curves, title)`` written to ``path`` (PNG, SVG or PDF by suffix); returns the path."""
    out = _figure_path(path)
    return _save_atomically(faithfulness_figure(curves, title), out)
