"""The built-in tasks by name, and plans made from a task."""

from collections.abc import Mapping, Sequence
from typing import Any

from atpframework.errors import PlanError, shorten
from atpframework.model.backend import AbstractBackend
from atpframework.plans.plan import parse_plan
from atpframework.tasks.base import Task, check_count, check_seed
from atpframework.tasks.city import City
from atpframework.tasks.counting import Counting
from atpframework.tasks.greater_than import GreaterThan
from atpframework.tasks.ioi import Ioi
from atpframework.tasks.rand_pp import RandPP
from atpframework.tasks.report import performed_pairs

TASKS: dict[str, Task] = {task.name: task for task in (Ioi(), City(), GreaterThan(), Counting(), RandPP())}
"""Every built-in task, by name."""

BUNDLED_SOURCE = "bundled:smollm2-135m-instruct"
"""The model whose tokenizer the built-in word lists are checked against."""


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a ``Task`` is returned as is); a ``PlanError`` at ``task`` naming the known ones."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or name not in TASKS:
        raise PlanError(f"task: unknown task {shorten(name)}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_plan(task: str | Task, n_pairs: int, nodes: Sequence[Mapping[str, Any]], method: str | Mapping[str, Any] = "atp",
              seed: int = 0, *, model_source: str = BUNDLED_SOURCE, backend: AbstractBackend | None = None,
              only_performed: bool = False, **fields: Any) -> dict[str, Any]:
    """A plan dict scoring ``nodes`` with ``method`` on ``n_pairs`` pairs of ``task`` drawn with ``seed``, metric
    ``logit_diff``, for the model at ``model_source``; validated (``af.parse_plan``) before it is returned.

    ``backend`` (the loaded model of ``model_source``) checks every pair's token lengths and answers, and is
    needed by tasks that read the model (``rand_pp``) and by ``only_performed``: then the prompts are the
    first ``n_pairs`` pairs the model performs (``tasks.report``). ``fields`` are further top-level plan
    fields (``batch_size``, ``output``, ...); a ``model`` field replaces ``{"source": model_source}``."""
    task = get_task(task)
    n_pairs, seed = check_count(n_pairs, "n_pairs"), check_seed(seed)
    if only_performed:
        if backend is None:
            raise PlanError("only_performed: keeping the pairs the model performs needs the model; pass backend=")
        prompts = [p.prompt() for p in performed_pairs(task, backend, n_pairs, seed)]
    else:
        prompts = task.pairs(n_pairs, seed, backend=backend)
    plan: dict[str, Any] = {
        "model": {"source": model_source},
        "prompts": prompts,
        "metric": {"name": "logit_diff"},
        "nodes": [dict(node) for node in nodes],
        "method": {"name": method} if isinstance(method, str) else dict(method),
    }
    plan.update(fields)
    parse_plan(plan)
    return plan
