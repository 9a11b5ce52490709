"""The Python entry points: load a backend for a plan, compile it, run it, save the result."""

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from atpframework import plugins
from atpframework.engine import distributed as parallel
from atpframework.engine.checkpoint import Checkpoint, is_complete, run_fingerprint
from atpframework.engine.outputs import check_writable, resolve_output
from atpframework.engine.runner import assemble, compile_plan, report_problems, run_batches
from atpframework.errors import PlanError, PluginError, shorten
from atpframework.io.progress import Bar, Progress, check_progress
from atpframework.io.results import AttributionResult, NodeScores, now_utc, package_versions
from atpframework.model.backend import AbstractBackend
from atpframework.model.node import BoundNodes
from atpframework.model.sae import SplicedBackend, load_saes, sae_path_problems
from atpframework.plans.compiled import CompiledPlan
from atpframework.plans.metrics import Metric, resolve_metric
from atpframework.plans.plan import AttributionPlan, load_plan, parse_plan
from atpframework.version import __version__

PlanLike = AttributionPlan | dict[str, Any] | str | Path
"""A plan object, its dict form, or the path of a plan JSON file."""


def as_plan(plan: PlanLike) -> AttributionPlan:
    """Validate any ``PlanLike`` into an ``AttributionPlan`` (loading the node plugins it names)."""
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    return parse_plan(plan)


def load_backend(plan: AttributionPlan, model: Any = None, tokenizer: Any = None, device: str | None = None) -> AbstractBackend:
    """Instantiate the plan's backend, around ``model`` if given (the backend ``backend_for`` picks for
    the object), else from ``plan.model.source`` (on ``device`` instead of the plan's, when given)."""
    if model is not None:
        return _backend_class(backend_for(plan, model)).from_model(model, tokenizer=tokenizer)
    spec = plan.model
    return _backend_class(spec.backend).load(spec.source, dtype=spec.dtype, device=device or spec.device, options=spec.options)


def backend_for(plan: AttributionPlan, model: Any) -> str:
    """The backend that runs ``plan`` on the model object ``model``: the one the plan names in
    ``model.backend``, or, when the plan leaves it out, the installed backend whose ``handles(model)`` is
    true (``AbstractBackend.handles``; third-party backends take part alike).

    A ``PlanError`` at ``model.backend`` when the plan names a backend that does not handle the object
    while another does, when the plan names none and no backend or several handle it. When no
    backend claims the object, a named backend is still tried (its ``from_model`` says what it serves)."""
    named = plan.model.backend
    explicit = "backend" in plan.model.model_fields_set
    if explicit and _backend_class(named).handles(model):
        return named
    what = f"{type(model).__module__}.{type(model).__qualname__}"
    handlers = [name for name in plugins.available("backends") if _handles(name, model)]
    if explicit:
        if handlers:
            raise PlanError(
                f"model.backend: the plan names {shorten(named)}, which does not handle a {what} object; "
                f"the {handlers[0]!r} backend does: name it in model.backend, or leave model.backend out to "
                "pick the backend from the model object"
            )
        return named
    if len(handlers) == 1:
        return handlers[0]
    if handlers:
        raise PlanError(
            f"model.backend: several installed backends handle a {what} object ({', '.join(map(repr, handlers))}); "
            "name one in model.backend"
        )
    raise PlanError(
        f"model.backend: no installed backend handles a {what} object; installed: "
        f"{'; '.join(_described(name) for name in plugins.available('backends'))}. Pass a model one of them "
        "serves, or name a backend in model.backend"
    )


def _backend_class(name: str) -> type[AbstractBackend]:
    """The backend plugin ``name``; a ``PlanError`` at ``model.backend`` if it cannot be loaded."""
    try:
        cls: type[AbstractBackend] = plugins.load("backends", name)
    except PluginError as err:
        raise PlanError(f"model.backend: {err}") from err
    return cls


def _handles(name: str, model: Any) -> bool:
    """Whether the installed backend ``name`` handles ``model`` (a backend that fails to load handles nothing)."""
    try:
        cls = plugins.load("backends", name)
    except PluginError:
        return False
    try:
        return bool(cls.handles(model))
    except Exception as err:  # a third-party bug must not read as "not mine"
        raise PluginError(f"backend plugin {name!r}: handles() raised {type(err).__name__}: {err}") from err


def _described(name: str) -> str:
    """``name (first line of its class docstring)`` for messages, or just ``name``."""
    try:
        doc = (plugins.load("backends", name).__doc__ or "").strip().splitlines()
    except PluginError:
        return f"{name} (fails to load)"
    return f"{name} ({doc[0].rstrip('.')})" if doc else name


def with_backend(plan: AttributionPlan, name: str) -> AttributionPlan:
    """``plan`` with ``model.backend`` set to ``name``: what a result records is the backend that ran."""
    if plan.model.backend == name and "backend" in plan.model.model_fields_set:
        return plan
    return plan.model_copy(update={"model": plan.model.model_copy(update={"backend": name})})


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
    backend = splice_saes(plan, backend or load_backend(plan, model, tokenizer), saes)
    return compile_plan(with_backend(plan, backend.name), backend)


def run(
    plan: PlanLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    metric: Metric | None = None,
    backend: AbstractBackend | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = True,
    saes: Mapping[str, Any] | None = None,
    distributed: bool | None = None,
    resume: bool | None = None,
) -> AttributionResult:
    """Run an attribution plan and return its result; save it if ``output`` or ``plan.output`` is set.

    Args:
        plan: the plan (object, dict, or JSON path).
        model: a model object (a ``HookedTransformer``, a ``transformers`` model...); overrides ``model.source``.
            The backend follows the object's type unless the plan names one (``backend_for``).
        tokenizer: tokenizer for ``model`` when it has none attached.
        metric: a custom metric ``(logits, MetricInputs) -> per-pair values``; the plan's metric name must be ``custom``.
        backend: an already-loaded backend (reused across runs).
        output: result path, taken as given; overrides ``plan.output``, which is resolved relative to
            the plan file (or the working directory) and must stay inside it (``outputs.py``).
        overwrite: replace an existing file at the output even if it is not an atpframework result.
        progress: ``True``: a progress bar on stderr (a widget in Jupyter) per batch of prompt pairs, with the
            passes run so far; ``False``: none; a callable: called with the number of pairs finished
            after each batch instead (``atpframework.io.progress``).
        saes: SAE objects (e.g. sae_lens ``SAE``) for plan ``saes`` entries without a path or release, by name.
        distributed: shard the batches over the processes of a ``torchrun`` launch (see
            ``atpframework.engine.distributed``); every rank returns the full result and rank 0 alone saves it.
            Default: when launched with more than one process.
        resume: checkpoint finished batches next to the output and pick them up when the same run is
            started again (``atpframework.engine.checkpoint``). Default: on when the plan alone describes the run
            (an output, and no ``model``, ``backend``, ``metric`` or ``saes`` objects passed in).
    """
    plan_path = plan if isinstance(plan, (str, Path)) else None
    plan = as_plan(plan)
    progress = check_progress(progress)
    metric_fn = resolve_metric(plan.metric, metric)
    target = preflight(
        plan, plan_path, output, overwrite, check_device=model is None and backend is None, metric_given=metric is not None,
        saes=saes,
    )
    backend_given = backend
    group = None
    if distributed or (distributed is None and parallel.launched()):
        group = parallel.join(plan.model.device)
    device = parallel.device_for_rank(plan.model.device, group) if group is not None else None
    backend = splice_saes(plan, backend or load_backend(plan, model, tokenizer, device), saes)
    compiled = compile_plan(with_backend(plan, backend.name), backend)
    if resume is None:
        resume = model is None and backend_given is None and metric is None and not saes
    return _run_compiled(compiled, backend, metric_fn, progress, group, target, overwrite, resume)


def _run_compiled(
    compiled: CompiledPlan, backend: AbstractBackend, metric_fn: Metric, progress: Progress,
    group: parallel.Group | None, target: Path | None, overwrite: bool, resume: bool,
) -> AttributionResult:
    """Run every batch (this process's shard, under a checkpoint when resuming), assemble the result, save it."""
    main = group is None or group.is_main
    mine = None if group is None else parallel.shard(len(compiled.batches), group)
    total = len(compiled.pairs) if mine is None else sum(len(compiled.batches[i].pair_indices) for i in mine)
    desc = f"{compiled.plan.method.name}: prompt pairs"
    if group is not None:
        desc += f" (rank {group.rank} of {group.world}; {len(compiled.pairs)} in all)"
    with ExitStack() as stack:
        bar = stack.enter_context(Bar(progress if main or progress is not True else False, total, desc, "pair"))  # one voice
        checkpoint = _checkpoint(compiled, backend, target, group) if resume and target is not None else None
        if checkpoint is not None:
            stack.enter_context(checkpoint)
        finished = checkpoint.finished() if checkpoint is not None else None
        on_batch = checkpoint.save if checkpoint is not None else None
        outputs = run_batches(compiled, backend, metric_fn, bar.update, mine, finished, on_batch)
        if group is None:
            executed = assemble(compiled, outputs)
        else:
            executed = assemble(compiled, parallel.all_outputs(outputs, group))
        result = _result(compiled, backend, executed)
        if target is not None and main:
            check_writable(target, overwrite)
            result.save(target)
            if checkpoint is not None:
                checkpoint.remove()
    return result


def preflight(
    plan: AttributionPlan,
    plan_path: str | Path | None,
    output: str | Path | None,
    overwrite: bool,
    check_device: bool = True,
    metric_given: bool = False,
    saes: Mapping[str, Any] | None = None,
) -> Path | None:
    """What can be checked before a model loads: the output path (``outputs.py``), the device, that a
    ``custom`` metric has its callable (``metric_given``; the CLI never has one), and that every ``saes[i].path``
    is a sae_lens directory (unless the SAE object is in ``saes``).
    Returns the output path (None when there is none); every problem found is reported in one ``PlanError``."""
    problems = sae_path_problems(plan.saes, saes or {})
    if plan.metric.name == "custom" and not metric_given:
        problems.append(
            "metric.name: 'custom' needs a metric callable passed through the Python API (run(plan, metric=...)); "
            "the atpf command line cannot supply one"
        )
    target = None
    try:
        if output is not None:
            target = check_writable(Path(output), overwrite)
        elif plan.output is not None:
            target = check_writable(resolve_output(plan.output, plan_path), overwrite)
    except PlanError as err:
        problems.append(str(err))
    if check_device and plan.model.options.get("device_map", "none") == "none":
        problem = device_problem(plan.model.device)
        if problem:
            problems.append(problem)
    report_problems(problems, "before the run")
    return target


def device_problem(device: str) -> str | None:
    """Why ``model.device`` cannot be used on this machine, or None."""
    import torch

    try:
        where = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"model.device: {shorten(device)} is not a device; allowed: cpu, cuda, cuda:N, mps, xpu"
    if where.type == "cpu":
        return None
    module = getattr(torch, where.type, None)
    count = module.device_count() if module is not None and hasattr(module, "device_count") else 0
    available = module is not None and hasattr(module, "is_available") and module.is_available()
    if not available or (where.index is not None and where.index >= count):
        return (
            f"model.device: {shorten(device)} is not available on this machine (torch sees {count if available else 0} "
            f"{where.type} device(s)); use 'cpu'" + (f" or {where.type}:0..{count - 1}" if available and count else "")
        )
    return None


def _checkpoint(compiled: CompiledPlan, backend: AbstractBackend, target: Path, group: Any) -> Checkpoint | None:
    """The output's checkpoint (locked by the main process), or None when the backend cannot fingerprint its weights."""
    fingerprint = run_fingerprint(compiled.plan.to_json(), compiled.pairs, backend, __version__)
    if not is_complete(fingerprint):
        return None
    if group is None:
        return Checkpoint(target, fingerprint)
    return parallel.open_shared(lambda main: Checkpoint(target, fingerprint, main=main), group)


def _result(compiled: CompiledPlan, backend: AbstractBackend, executed: Any) -> AttributionResult:
    plan = compiled.plan
    return AttributionResult(
        nodes={b.name: _node_scores(b, executed.scores[b.name]) for b in compiled.bound},
        metric_clean=executed.metric_clean,
        metric_noise=executed.metric_noise,
        extras=executed.extras,
        clean_tokens=[list(p.clean) for p in compiled.pairs],
        noise_tokens=[list(p.noise) for p in compiled.pairs],
        plan_json=plan.to_json(),
        clean_strings=_token_strings(backend, [p.clean for p in compiled.pairs]),
        noise_strings=_token_strings(backend, [p.noise for p in compiled.pairs]),
        method=plan.method.name,
        sign_convention=compiled.method.sign_convention,
        metric=plan.metric.name,
        model=backend.describe(),
        versions=package_versions(),
        created=now_utc(),
    )


def _token_strings(backend: AbstractBackend, prompts: list[Any]) -> list[list[str]]:
    """Every prompt's tokens decoded, or ``[]`` when the backend cannot decode one of them."""
    out = []
    for tokens in prompts:
        strings = backend.token_strings(list(tokens))
        if strings is None:
            return []
        out.append(strings)
    return out


def _node_scores(bound: BoundNodes, per_pair: Any) -> NodeScores:
    index = {"layer": bound.layers.labels}
    index.update({a.dim: a.labels for a in bound.axes})
    return NodeScores(bound.name, bound.node.kind, ("pair",) + bound.dims, index, per_pair)
