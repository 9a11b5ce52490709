"""PNG plots of the evaluation: cost-of-verified-recall curves and the false-negative diagnostic.

This module owns drawing only; the numbers come from ``atpframework.analysis.recall`` (curves) and from the
diagnostic's bound ``theta*`` (method notes, section 5). matplotlib is optional (extra ``plot``):
it is imported inside each function, so importing this module never needs it, and a missing install
raises ``PlotDependencyError`` (an ``ImportError``) that says what to install.

Figures use matplotlib's object API (``Figure`` + the non-interactive Agg canvas), never pyplot's
global state, so plotting is safe in scripts, servers and threads. PNGs are written atomically: a
temporary file in the target directory, then ``os.replace``; on any error the temporary file is
removed and a file already at the target path is left unchanged.
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


def _png_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path: plots are written as PNG; expected a name ending in .png (got {str(path)!r})")
    return out


def _save_atomically(fig: "Figure", path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))


def _vector(values: Any, arg: str) -> Tensor:
    """A 1-D finite float64 CPU tensor (may be empty); ValueError naming ``arg`` otherwise."""
    if not isinstance(values, Tensor) or values.dim() != 1 or values.is_complex():
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{arg}: expected a 1-D real tensor of shape (node,) (got {shape})")
    out = values.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{arg}: every entry must be finite")
    return out


def plot_recall_curves(curves: Sequence[RecallCurve], path: str | os.PathLike[str], title: str = "") -> Path:
    """Log-log plot of cost (forward passes, y) against ``k`` (true top nodes verified, x); returns the path.

    One line per curve through its points ``(k, cost(k))``, labelled with its RelCost; the oracle
    diagonal ``y = x`` is dashed. Every curve lies on or above it.
    """
    curves = list(curves)
    if not curves:
        raise ValueError("curves: expected at least one RecallCurve")
    for i, curve in enumerate(curves):
        if not isinstance(curve, RecallCurve):
            raise ValueError(f"curves[{i}]: expected a RecallCurve (got {type(curve).__name__})")
    out = _png_path(path)
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    k_top = max(c.k_max for c in curves)
    for curve in curves:
        ks = range(1, curve.k_max + 1)
        ax.plot(ks, curve.costs.tolist(), linewidth=1.6,
                label=f"{curve.name} (RelCost {curve.relative:.2f})")
    ax.plot([1, k_top], [1, k_top], linestyle="--", color="0.4", linewidth=1.0, label="oracle (y = x)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (true top-k nodes verified)")
    ax.set_ylabel("cost (forward passes)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    return _save_atomically(fig, out)


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


def plot_diagnostic(
    verified_effects: Tensor,
    bounds: Mapping[float, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    remainder_effects: Tensor | None = None,
    title: str = "",
) -> Path:
    """Plot the false-negative diagnostic as a PNG; returns the path.

    ``verified_effects``: ``node`` true effects of the verified top nodes. ``bounds``: confidence
    level (e.g. 0.95) -> ``[(n_samples, theta*), ...]``, the upper bound on ``|c|`` of every unverified
    node at each sample budget. ``remainder_effects``: ``node`` true effects of the unverified nodes,
    when known (e.g. from full patching on a small model).

    First panel: ``|verified effects|`` sorted descending against rank (log y), the remainder's ``|c|``
    sorted descending as points at the following ranks, and one horizontal line per confidence at
    ``theta*`` of its largest sample budget. When the bounds hold more than one budget, a second panel
    shows ``theta*`` against the number of samples (log-log), one line per confidence. ``theta*`` may
    be ``+inf`` (too few samples); it and other non-positive values cannot be drawn on a log axis and
    are left out (an undrawn line of the first panel stays in its legend, with its value).
    """
    verified = _vector(verified_effects, "verified_effects").abs().sort(descending=True).values
    remainder = None
    if remainder_effects is not None:
        remainder = _vector(remainder_effects, "remainder_effects").abs().sort(descending=True).values
    if verified.numel() == 0 and (remainder is None or remainder.numel() == 0):
        raise ValueError("verified_effects: nothing to plot (no verified and no remainder effects)")
    checked = _check_bounds(bounds)
    out = _png_path(path)
    budgets = {samples for rows in checked.values() for samples, _ in rows}
    two_panels = len(budgets) > 1
    fig = _new_figure(11.0 if two_panels else 6.4, 4.8)
    axes = fig.subplots(1, 2 if two_panels else 1, squeeze=False)[0]
    colors = {conf: f"C{i + 1}" for i, conf in enumerate(checked)}
    _draw_effects_and_bound(axes[0], verified, remainder, checked, colors)
    if two_panels:
        _draw_bound_against_samples(axes[1], checked, budgets, colors)
    if title:
        fig.suptitle(title)
    return _save_atomically(fig, out)


def _draw_effects_and_bound(
    ax: Any, verified: Tensor, remainder: Tensor | None, checked: dict[float, list[tuple[int, float]]], colors: dict[float, str]
) -> None:
    """``plot_diagnostic``'s first panel: |effects| against rank and one line per confidence at its last bound."""
    n_verified = verified.numel()
    if n_verified:
        ax.plot(range(1, n_verified + 1), verified.tolist(), marker="o", markersize=3, linewidth=1.2,
                color="C0", label="verified nodes |c|")
    if remainder is not None and remainder.numel():
        ax.scatter(range(n_verified + 1, n_verified + remainder.numel() + 1), remainder.tolist(), s=6,
                   color="0.5", label="unverified nodes |c| (true)")
    for conf, rows in checked.items():
        samples, theta = rows[-1]
        label = f"bound θ* at {conf:.0%} (m={samples})"
        if math.isfinite(theta) and theta > 0:
            ax.axhline(theta, linestyle="--", linewidth=1.2, color=colors[conf], label=label)
        else:  # not drawable on a log axis: keep it in the legend
            ax.plot([], [], linestyle="--", linewidth=1.2, color=colors[conf], label=f"{label} = {theta:g} (not drawn)")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("rank")
    ax.set_ylabel("|effect|")
    ax.set_title("verified effects and bound")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")


def _draw_bound_against_samples(ax: Any, checked: dict[float, list[tuple[int, float]]], budgets: set[int], colors: dict[float, str]) -> None:
    """``plot_diagnostic``'s second panel: the bound against the sample budget (log-log), one line per confidence."""
    from matplotlib.ticker import NullFormatter

    for conf, rows in checked.items():
        thetas = [t if math.isfinite(t) else math.nan for _, t in rows]
        ax.plot([m for m, _ in rows], thetas, marker="o", color=colors[conf], label=f"θ* at {conf:.0%}")
    ax.set_xscale("log")
    ax.set_yscale("log", nonpositive="mask")
    ticks = sorted(m for m in budgets if m > 0)
    if 0 < len(ticks) <= 8:  # label the budgets themselves, not crowded minor ticks
        ax.set_xticks(ticks, [str(m) for m in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("number of samples")
    ax.set_ylabel("bound θ* on unverified |c|")
    ax.set_title("bound against sample budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
