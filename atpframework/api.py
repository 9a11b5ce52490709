"""The Python entry points: load a backend for a plan, compile it, run it, save the result."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import plugins
from .backend import AbstractBackend
from .engine import CompiledPlan, compile_plan, execute
from .errors import PlanError, PluginError
from .methods import get_method
from .metrics import Metric, resolve_metric
from .node import BoundNodes
from .plan import AttributionPlan, load_plan, parse_plan
from .results import AttributionResult, NodeScores, now_utc, package_versions
from .sae import SplicedBackend, load_saes

PlanLike = AttributionPlan | dict[str, Any] | str | Path
"""A plan object, its dict form, or the path of a plan JSON file."""


def as_plan(plan: PlanLike) -> AttributionPlan:
    """Validate any ``PlanLike`` into an ``AttributionPlan`` (loading the node plugins it names)."""
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    return parse_plan(plan)


def load_backend(plan: AttributionPlan, model: Any = None, tokenizer: Any = None) -> AbstractBackend:
    """Instantiate the plan's backend, around ``model`` if given, else from ``plan.model.source``."""
    try:
        backend_cls = plugins.load("backends", plan.model.backend)
    except PluginError as err:
        raise PlanError(f"model.backend: {err}") from err
    if model is not None:
        return backend_cls.from_model(model, tokenizer=tokenizer)
    spec = plan.model
    return backend_cls.load(spec.source, dtype=spec.dtype, device=spec.device, options=spec.options)


def splice_saes(plan: AttributionPlan, backend: AbstractBackend, saes: Mapping[str, Any] | None = None) -> AbstractBackend:
    """The backend with the plan's SAEs spliced in (``saes``: SAE objects by plan name), or ``backend`` if it names none."""
    if not plan.saes:
        if saes:
            raise PlanError(f"saes: SAE object(s) {sorted(saes)} were passed but the plan's saes list is empty")
        return backend
    if isinstance(backend, SplicedBackend):
        backend = backend.inner
    return SplicedBackend(backend, load_saes(plan.saes, backend, saes or {}))


def compile(
    plan: PlanLike, *, model: Any = None, tokenizer: Any = None, backend: AbstractBackend | None = None,
    saes: Mapping[str, Any] | None = None,
) -> CompiledPlan:
    """Load the model (unless ``backend`` is given) and compile the plan without running any pass."""
    plan = as_plan(plan)
    return compile_plan(plan, splice_saes(plan, backend or load_backend(plan, model, tokenizer), saes))


def run(
    plan: PlanLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    metric: Metric | None = None,
    backend: AbstractBackend | None = None,
    output: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    saes: Mapping[str, Any] | None = None,
) -> AttributionResult:
    """Run an attribution plan and return its result; save it if ``output`` or ``plan.output`` is set.

    Args:
        plan: the plan (object, dict, or JSON path).
        model: a model object for the plan's backend (e.g. a ``HookedTransformer``); overrides ``model.source``.
        tokenizer: tokenizer for ``model`` when it has none attached.
        metric: a custom metric ``(logits, MetricInputs) -> per-pair values``; the plan's metric name must be ``custom``.
        backend: an already-loaded backend (reused across runs).
        output: result path; overrides ``plan.output``.
        progress: called with the number of pairs finished after each batch.
        saes: SAE objects (e.g. sae_lens ``SAE``) for plan ``saes`` entries without a path or release, by name.
    """
    plan = as_plan(plan)
    metric_fn = resolve_metric(plan.metric, metric)
    backend = splice_saes(plan, backend or load_backend(plan, model, tokenizer), saes)
    compiled = compile_plan(plan, backend)
    executed = execute(compiled, backend, metric_fn, progress)
    result = AttributionResult(
        nodes={b.name: _node_scores(b, executed.scores[b.name]) for b in compiled.bound},
        metric_clean=executed.metric_clean,
        metric_noise=executed.metric_noise,
        extras=executed.extras,
        clean_tokens=[list(p.clean) for p in compiled.pairs],
        noise_tokens=[list(p.noise) for p in compiled.pairs],
        plan_json=plan.to_json(),
        method=plan.method.name,
        sign_convention=get_method(plan.method.name).sign_convention,
        metric=plan.metric.name,
        model=backend.describe(),
        versions=package_versions(),
        created=now_utc(),
    )
    target = output if output is not None else plan.output
    if target is not None:
        result.save(target)
    return result


def _node_scores(bound: BoundNodes, per_pair: Any) -> NodeScores:
    index = {"layer": bound.layers.labels}
    index.update({a.dim: a.labels for a in bound.axes})
    return NodeScores(bound.name, bound.node.kind, ("pair",) + bound.dims, index, per_pair)
