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

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        """Raise ``PlanError`` at compile time if this method cannot run the plan on this model."""

    sign_convention: ClassVar[str] = SIGN_CONVENTION
    """What the per-pair scores mean, stored in result files."""


def capture(store: dict[Site, Tensor], site: Site) -> SiteHook:
    """A site hook storing the detached activation in ``store[site]``."""

    def hook(act: Tensor) -> None:
        store[site] = act.detach()

    return hook


def noise_forward(run: BatchRun, sites: tuple[Site, ...] | None = None) -> tuple[dict[Site, Tensor], Tensor]:
    """One no-grad pass on the noise prompts capturing ``sites`` (default: the plan's); returns them and the metric."""
    acts: dict[Site, Tensor] = {}
    sites = run.compiled.sites if sites is None else sites
    with torch.no_grad():
        logits = run.backend.forward(run.noise_tokens, {s: [capture(acts, s)] for s in sites})
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
