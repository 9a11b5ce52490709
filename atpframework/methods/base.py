"""The method contract: how a batch of prompt pairs becomes per-pair node effects.

A method is a plugin of the ``atpframework.methods`` entry-point group, built-ins included
(``pyproject.toml``): a subclass of ``AbstractMethod`` whose ``name`` is its entry-point name and
whose ``config_type`` is the pydantic class of its plan options (a ``MethodConfig`` with
``name: Literal["<name>"]``). The plan's ``method`` field accepts the config of every installed
method; ``get_method(plan.method.name)`` gives the method object, which ``compile_plan`` stores in
the ``CompiledPlan`` (``compiled.method``). A method reads its options with ``self.options(compiled)``, typed.

Sign convention (every signed method): the effect of node ``n`` is
``metric(clean run with n <- n(noise)) - metric(clean run)`` ("noising"), estimated or exact.

Built-in methods: ``activation_patching`` (exact, ``patching.py``), the first-order family
``atp``, ``atp_qkfix``, ``atp_graddrop``, ``atp_star`` (``atp.py``) and the baselines
``subsampling``, ``blocks``, ``hierarchical`` (``baselines.py``).
"""

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, Literal, TypeVar, get_args, get_origin

import torch
from torch import Tensor

from atpframework import plugins
from atpframework.errors import PlanError, PluginError, shorten
from atpframework.io.results import SIGN_CONVENTION
from atpframework.model.backend import AbstractBackend
from atpframework.model.interventions import Intervention
from atpframework.model.sites import Site
from atpframework.plans.chunking import ELEMENT_BYTES, forward_elements, site_width
from atpframework.plans.compiled import BatchRun, BatchScores, CompiledPlan, PassStep
from atpframework.plans.plan import MethodConfig

ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class AbstractMethod(ABC, Generic[ConfigT]):
    """One attribution method (see module docstring)."""

    name: ClassVar[str]
    """The plan's ``method.name``; equal to the entry-point name."""
    config_type: type[ConfigT]
    """The pydantic class of this method's plan options."""
    exact: ClassVar[bool]
    """The scores are exact patching effects."""
    exact_where_linear: ClassVar[bool] = False
    """The scores equal exact patching wherever the metric is linear in each node (the first-order family);
    the conformance kit (``atpframework.testing``) holds the method to it."""

    def options(self, compiled: CompiledPlan) -> ConfigT:
        """The plan's method options, as this method's own config class."""
        config = compiled.plan.method
        if not isinstance(config, self.config_type):
            raise PlanError(f"method.name: the plan asks for {shorten(config.name)}, but this is the {self.name!r} method")
        return config

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

    def rows_per_pass(self, compiled: CompiledPlan) -> int:
        """How many patched copies of each prompt pair one forward pass holds (exact patching and the
        baselines batch node sets; 1 otherwise). Used by the default ``working_memory``."""
        return 1

    def working_memory(self, compiled: CompiledPlan, pairs: int, seq_len: int, positions: int) -> int:
        """Estimated bytes one pass needs for ``pairs`` prompt pairs of ``seq_len`` tokens and ``positions``
        node positions per chunk (``chunking.py``'s model). The default suits exact patching: patched
        forwards of ``pairs x rows_per_pass`` rows without gradients, the noise run's activations at the
        plan's sites, and the clean residual stream at every block boundary."""
        info = compiled.info
        noise = seq_len * sum(site_width(s, info, compiled.bound) for s in compiled.sites)
        stream = (info.n_layers + 1) * seq_len * info.d_model
        rows = pairs * self.rows_per_pass(compiled)
        return int(ELEMENT_BYTES[info.dtype] * (rows * forward_elements(info, seq_len) + pairs * (noise + stream + rows * info.d_model * seq_len)))

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        """Raise ``PlanError`` at compile time if this method cannot run the plan on this model."""

    sign_convention: ClassVar[str] = SIGN_CONVENTION
    """What the per-pair scores mean, stored in result files."""

    listing_rank: ClassVar[int] = 100
    """Where the method appears when methods are listed (error messages, the plan schema): the built-ins
    cheapest first (0-99), then third-party methods by name."""

    nan_means_undefined: ClassVar[bool] = False
    """A NaN score is a documented outcome ("no estimate for this node"), not a failure, so the engine's
    finite check skips this method's scores (its metrics are still checked)."""

    @classmethod
    def plugin_problems(cls, name: str) -> list[str]:
        """What is wrong with this class as the method plugin ``name`` (empty: nothing); ``plugins`` calls
        it when the plugin loads or is registered."""
        declared = getattr(cls, "config_type", None)
        if not (isinstance(declared, type) and issubclass(declared, MethodConfig)):
            return [f"config_type is {declared!r}, not a subclass of MethodConfig"]
        annotation = declared.model_fields["name"].annotation
        if get_origin(annotation) is not Literal or get_args(annotation) != (name,):
            shown = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
            return [f"{declared.__name__}.name is {shown}, not Literal[{name!r}] (the config's name must be the entry-point name)"]
        return []


def method_type(name: str) -> type[AbstractMethod[MethodConfig]]:
    """The installed method class named ``name`` (``PlanError`` listing the installed ones if there is none)."""
    try:
        cls = plugins.load("methods", name)
    except PluginError as err:
        if name in plugins.available("methods"):
            raise  # installed, but broken: the plugin error says why
        raise PlanError(f"method.name: {err}") from None
    return cls


def get_method(name: str) -> AbstractMethod[MethodConfig]:
    """The method named ``name`` (a plan's ``method.name``). Methods hold no options: they read them from the
    compiled plan they are given (``AbstractMethod.options``), so one object serves every plan."""
    return method_type(name)()


def noise_forward(
    run: BatchRun, sites: tuple[Site, ...] | None = None, positions: Tensor | None = None, full: tuple[Site, ...] = ()
) -> tuple[dict[Site, Tensor], Tensor]:
    """One no-grad pass on the noise prompts capturing ``sites`` (default: the plan's); returns them and the metric.

    ``positions``: keep only these positions of each site, except the sites in ``full``.
    """
    sites = run.compiled.sites if sites is None else sites
    noise = Intervention()
    noise.capture([s for s in sites if s not in full], positions=positions)
    noise.capture([s for s in sites if s in full])
    with torch.no_grad():
        logits = noise.run(run.backend, run.noise_tokens)
        value = run.metric(logits, run.metric_inputs(run.noise_tokens))
    return noise.captured, value
