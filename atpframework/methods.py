"""The method contract and registry: how a batch of prompt pairs becomes per-pair node effects.

Sign convention (every signed method): the effect of node ``n`` is
``metric(clean run with n <- n(noise)) - metric(clean run)`` ("noising"), estimated or exact.

Built-in methods: ``activation_patching`` (exact, ``patching.py``) and the first-order family
``atp``, ``atp_qkfix``, ``atp_graddrop``, ``atp_star`` (``atp.py``).
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from .backend import AbstractBackend, SiteHook
from .chunking import ELEMENT_BYTES, forward_elements, site_width
from .engine import BatchRun, BatchScores, CompiledPlan, PassStep
from .errors import PlanError
from .results import SIGN_CONVENTION
from .sites import Site


class AbstractMethod(ABC):
    """One attribution method (see module docstring)."""

    name: ClassVar[str]
    exact: ClassVar[bool]

    @abstractmethod
    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        """The passes one batch runs."""

    @abstractmethod
    def run_batch(self, run: BatchRun) -> BatchScores:
        """Per-pair effects for one batch."""

    def cost(self, compiled: CompiledPlan) -> float:
        """Forward-pass equivalents per prompt pair (a backward counts as two): the method's own cost in
        the cost of verified recall."""
        return sum(step.cost for step in self.schedule(compiled))

    chunks_positions: ClassVar[bool] = False
    """``max_memory`` may split node positions into chunks (first-order methods); otherwise only pairs per pass."""

    def working_memory(self, compiled: CompiledPlan, pairs: int, seq_len: int, positions: int) -> int:
        """Estimated bytes one pass needs for ``pairs`` prompt pairs of ``seq_len`` tokens and ``positions``
        node positions per chunk (``chunking.py``'s model). The default suits exact patching: patched
        forwards of ``pairs x sets per pass`` rows without gradients, the noise run's activations at the
        plan's sites, and the clean residual stream at every block boundary."""
        info = compiled.info
        per_pass = getattr(compiled.plan.method, "nodes_per_pass", None) or getattr(compiled.plan.method, "sets_per_pass", 1)
        noise = seq_len * sum(site_width(s, info, compiled.bound) for s in compiled.sites)
        stream = (info.n_layers + 1) * seq_len * info.d_model
        rows = pairs * per_pass
        return int(ELEMENT_BYTES[info.dtype] * (rows * forward_elements(info, seq_len) + pairs * (noise + stream + rows * info.d_model * seq_len)))

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        """Raise ``PlanError`` at compile time if this method cannot run the plan on this model."""

    sign_convention: ClassVar[str] = SIGN_CONVENTION
    """What the per-pair scores mean, stored in result files."""

    nan_means_undefined: ClassVar[bool] = False
    """A NaN score is a documented outcome ("no estimate for this node"), not a failure, so the engine's
    finite check skips this method's scores (its metrics are still checked)."""


def capture(store: dict[Site, Tensor], site: Site, positions: Tensor | None = None) -> SiteHook:
    """A site hook storing the detached activation in ``store[site]`` (only the ``positions`` along the
    axis after ``batch``, when given)."""

    def hook(act: Tensor) -> None:
        act = act.detach()
        store[site] = act if positions is None else act.index_select(1, positions.to(act.device))

    return hook


def noise_forward(
    run: BatchRun, sites: tuple[Site, ...] | None = None, positions: Tensor | None = None, full: tuple[Site, ...] = ()
) -> tuple[dict[Site, Tensor], Tensor]:
    """One no-grad pass on the noise prompts capturing ``sites`` (default: the plan's); returns them and the metric.

    ``positions``: keep only these positions of each site, except the sites in ``full``.
    """
    acts: dict[Site, Tensor] = {}
    sites = run.compiled.sites if sites is None else sites
    with torch.no_grad():
        hooks = {s: [capture(acts, s, None if s in full else positions)] for s in sites}
        logits = run.backend.forward(run.noise_tokens, hooks)
        value = run.metric(logits, run.metric_inputs(run.noise_tokens))
    return acts, value


def get_method(name: str) -> AbstractMethod:
    """The method a plan's ``method.name`` names."""
    available = methods()
    if name not in available:
        raise PlanError(f"method.name: unknown method {name!r}; allowed: {', '.join(available)}")
    return available[name]


def methods() -> dict[str, AbstractMethod]:
    """Every method this version runs, by plan ``method.name``."""
    from .atp import FIRST_ORDER_METHODS
    from .baselines import BASELINE_METHODS
    from .patching import ActivationPatching

    return {m.name: m for m in (*FIRST_ORDER_METHODS, ActivationPatching(), *BASELINE_METHODS)}
