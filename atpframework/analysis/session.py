"""One loaded model for a whole workflow: run, verify, diagnose, compare and circuits without reloading it.

``af.run``, ``verify``, ``diagnose`` and ``compare`` each load the plan's model unless handed a backend;
a ``Session`` loads it once (lazily, at the first call that needs it) and hands the same backend to
each. Every plan and result it is given must name the same model (``model``: source, backend, dtype,
device and options), else a ``PlanError`` says which: a backend loaded for one model never computes
another's numbers. The numbers are those of the separate calls.

    s = af.Session("plan.json")                    # or af.Session(plan, model=my_hooked_transformer)
    result = s.run(output="out.safetensors")       # the session's plan (or s.run(other_plan))
    result = s.verify(result, budget=50)
    result, diagnosis = s.diagnose(result, verified_top=50, samples=[400])
    comparison = s.compare(["atp", "atp_star"])
    curve = s.circuit_faithfulness(edge_result, sizes=[1, 10, 100])   # a result of edge selections
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from atpframework import api
from atpframework.analysis.circuits import FaithfulnessCurve, Unscored, circuit_faithfulness
from atpframework.analysis.compare import Comparison, compare
from atpframework.analysis.verify import Diagnosis, ResultLike, diagnose, verify
from atpframework.errors import PlanError, shorten
from atpframework.io.progress import Progress, check_progress
from atpframework.io.results import AttributionResult, load_result
from atpframework.model.backend import AbstractBackend
from atpframework.plans.metrics import Metric
from atpframework.plans.plan import AttributionPlan


def _model_spec(plan: AttributionPlan) -> dict[str, Any]:
    return plan.model.model_dump()


class Session:
    """A model loaded once and reused by ``run``, ``verify``, ``diagnose``, ``compare`` and ``circuit_faithfulness``
    (see module docstring).

    Args:
        plan: the session's plan (object, dict or JSON path): its model is the one loaded, and it is the
            plan ``run()`` and ``compare()`` use when given none. Optional: the first call's plan then decides.
        model: a model object (e.g. a ``HookedTransformer``) for the plan's backend, instead of loading
            ``model.source``.
        tokenizer: a tokenizer for ``model``, when it has none attached.
        backend: an already-loaded backend to use.
        saes: SAE objects for plan ``saes`` entries without a path or release, by name (every call).
        device: load the model on this device instead of the plan's ``model.device``.
        progress: the default of every call's ``progress`` (``True``: bars on stderr; ``False``: none); a call's
            own ``progress`` (``None``: this default) overrides it.
    """

    def __init__(
        self,
        plan: api.PlanLike | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        backend: AbstractBackend | None = None,
        saes: Mapping[str, Any] | None = None,
        device: str | None = None,
        progress: Progress = True,
    ) -> None:
        if model is not None and backend is not None:
            raise PlanError("Session: give a model object or a backend, not both")
        self._plan_like = plan
        self.plan: AttributionPlan | None = api.as_plan(plan) if plan is not None else None
        self._model, self._tokenizer, self._backend = model, tokenizer, backend
        self._given = model is not None or backend is not None
        self._saes = dict(saes or {})
        self._device = device
        self.progress = check_progress(progress)
        self._spec: dict[str, Any] | None = self._spec_of(self.plan) if self.plan is not None else None
        self.loads = 0
        """How many times this session built its backend (loaded the model, or wrapped the model object given):
        0 until a call needs the model, then 1."""

    # ------------------------------------------------------------- the model
    @property
    def backend(self) -> AbstractBackend:
        """The loaded backend (loaded now from the session's plan if it was not yet)."""
        if self.plan is None and self._backend is None:
            raise PlanError("Session: no plan yet, so no model to load; pass a plan to Session(...) or to run()")
        return self._backend_for(self.plan) if self.plan is not None else self._loaded()

    def _loaded(self) -> AbstractBackend:
        assert self._backend is not None
        return self._backend

    def _spec_of(self, plan: AttributionPlan) -> dict[str, Any]:
        """The model ``plan`` names, with the backend that runs it in this session: a plan may leave
        ``model.backend`` out and let the model object pick it (``api.backend_for``), and its results record
        the backend that ran, so the plan and its results name the same model."""
        spec = _model_spec(plan)
        if self._model is not None:
            spec["backend"] = api.backend_for(plan, self._model)
        elif self._backend is not None and self._given:
            spec["backend"] = self._backend.name
        return spec

    def _backend_for(self, plan: AttributionPlan) -> AbstractBackend:
        """The session's backend, after checking that ``plan`` names the session's model; loads it on first use."""
        spec = self._spec_of(plan)
        if self._spec is None:
            self._spec = spec
        elif spec != self._spec:
            raise PlanError(f"model: this Session holds {_describe(self._spec)}, but the plan names {_describe(spec)}; "
                            "one Session serves one model (start another Session for this plan)")
        if self._backend is None:
            if self._model is None and plan.model.options.get("device_map", "none") == "none":
                problem = api.device_problem(self._device or plan.model.device)
                if problem:
                    raise PlanError(problem)
            self._backend = api.load_backend(plan, self._model, self._tokenizer, device=self._device)
            self.loads += 1
        return self._backend

    def _plan(self, plan: api.PlanLike | None) -> tuple[AttributionPlan, api.PlanLike]:
        """The plan of a call (the session's own when ``plan`` is None) and what it was given as."""
        if plan is None:
            if self.plan is None:
                raise PlanError("Session: no plan; pass one to Session(...) or to this call")
            assert self._plan_like is not None
            return self.plan, self._plan_like
        parsed = api.as_plan(plan)
        if self.plan is None:
            self.plan, self._plan_like = parsed, plan
        return parsed, plan

    def _progress(self, progress: Progress | None) -> Progress:
        return self.progress if progress is None else check_progress(progress)

    # ------------------------------------------------------------- the workflow
    def run(
        self,
        plan: api.PlanLike | None = None,
        *,
        output: str | Path | None = None,
        overwrite: bool = False,
        metric: Metric | None = None,
        progress: Progress | None = None,
        distributed: bool | None = None,
        resume: bool | None = None,
    ) -> AttributionResult:
        """``af.run`` on the session's model (``plan``: the session's plan when None). ``resume`` defaults to on
        when the plan alone describes the run (the model loaded from its source, no metric or SAE objects)."""
        parsed, given = self._plan(plan)
        backend = self._backend_for(parsed)
        if resume is None:
            resume = not self._given and metric is None and not self._saes
        path_or_plan = given if isinstance(given, (str, Path)) else parsed
        return api.run(path_or_plan, backend=backend, metric=metric, output=output, overwrite=overwrite,
                       progress=self._progress(progress), saes=self._saes or None, distributed=distributed, resume=resume)

    def verify(self, result: ResultLike, *, budget: int | None = None, until_stable: bool = False, top: int = 20,
               patience: int | None = None, threshold: float | None = None, nodes_per_pass: int = 64,
               progress: Progress | None = None) -> AttributionResult:
        """``atpframework.analysis.verify.verify`` on the session's model: the result with its verified effects."""
        result = self._result(result)
        return verify(result, budget=budget, until_stable=until_stable, top=top, patience=patience, threshold=threshold,
                      nodes_per_pass=nodes_per_pass, backend=self._backend_for(api.as_plan(result.plan)),
                      saes=self._saes or None, progress=self._progress(progress))

    def diagnose(self, result: ResultLike, *, verified_top: int, samples: Sequence[int],
                 confidences: Sequence[float] = (0.9, 0.99), p: float = 0.5, seed: int = 0, nodes_per_pass: int = 64,
                 progress: Progress | None = None) -> tuple[AttributionResult, Diagnosis]:
        """``atpframework.analysis.verify.diagnose`` on the session's model: the result (with any newly
        verified nodes) and the diagnosis."""
        result = self._result(result)
        return diagnose(result, verified_top=verified_top, samples=samples, confidences=confidences, p=p, seed=seed,
                        nodes_per_pass=nodes_per_pass, backend=self._backend_for(api.as_plan(result.plan)),
                        saes=self._saes or None, progress=self._progress(progress))

    def circuit_faithfulness(self, result: ResultLike, sizes: Sequence[int] | None = None, *, greedy: bool = False,
                             unscored: Unscored = "noise", circuits_per_pass: int = 8, label: str | None = None,
                             progress: Progress | None = None) -> FaithfulnessCurve:
        """``atpframework.analysis.circuits.circuit_faithfulness`` on the session's model: the faithfulness of an edge
        result's circuits over ``sizes``."""
        result = self._result(result)
        return circuit_faithfulness(result, sizes, greedy=greedy, unscored=unscored, circuits_per_pass=circuits_per_pass,
                                    label=label, backend=self._backend_for(api.as_plan(result.plan)), saes=self._saes or None,
                                    progress=self._progress(progress))

    def compare(self, methods: Sequence[str | Mapping[str, Any]], *, plan: api.PlanLike | None = None,
                ground_truth: AttributionResult | str | Path | None = None, k_max: int | None = None,
                log: Callable[[str], None] | None = None, progress: Progress | None = None) -> Comparison:
        """``atpframework.analysis.compare.compare`` of ``methods`` on the session's model (``plan``: the
        session's plan when None)."""
        parsed, _ = self._plan(plan)
        return compare(parsed, methods, ground_truth=ground_truth, k_max=k_max, backend=self._backend_for(parsed),
                       saes=self._saes or None, log=log, progress=self._progress(progress))

    def _result(self, result: ResultLike) -> AttributionResult:
        return result if isinstance(result, AttributionResult) else load_result(result)

    def __repr__(self) -> str:
        held = _describe(self._spec) if self._spec is not None else "no model yet"
        return f"Session({held}, {'loaded' if self._backend is not None else 'not loaded'})"


def _describe(spec: Mapping[str, Any]) -> str:
    options = f", options {spec['options']}" if spec.get("options") else ""
    return (f"model {shorten(str(spec['source']))} ({spec['backend']} backend, {spec['dtype']} on {spec['device']}{options})")
