"""Metrics: one scalar per prompt pair, computed from the logits of a pass.

Metrics are per pair (``batch``), never a batch mean: the engine backpropagates their *sum*, so each
pair's gradient is its own, unscaled. A custom metric is any callable with the ``Metric`` signature,
given to the Python API.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from atpframework.errors import PlanError
from atpframework.plans.plan import MetricSpec


@dataclass(frozen=True)
class MetricInputs:
    """What a metric may read besides the logits, one row per pair in the pass."""

    tokens: Tensor
    """``batch pos`` token ids of the prompts that produced the logits."""
    answer: Tensor | None
    """``batch`` answer token ids, or None when the plan gives none."""
    wrong_answer: Tensor | None
    """``batch`` competing token ids, or None."""
    position: int
    """Position whose logits answer metrics read."""


Metric = Callable[[Tensor, MetricInputs], Tensor]
"""``(logits: batch pos vocab, inputs) -> batch`` metric values."""


def logit_diff(logits: Tensor, inputs: MetricInputs) -> Tensor:
    """logit(answer) - logit(wrong_answer) at ``position``."""
    final = logits[:, inputs.position, :]
    if inputs.answer is None or inputs.wrong_answer is None:
        raise PlanError("metric: logit_diff needs an answer and a wrong_answer token for every prompt pair")
    return final.gather(1, inputs.answer[:, None])[:, 0] - final.gather(1, inputs.wrong_answer[:, None])[:, 0]


def logprob(logits: Tensor, inputs: MetricInputs) -> Tensor:
    """log p(answer) at ``position``."""
    if inputs.answer is None:
        raise PlanError("metric: logprob needs an answer token for every prompt pair")
    logp = torch.log_softmax(logits[:, inputs.position, :].float(), dim=-1)
    return logp.gather(1, inputs.answer[:, None])[:, 0]


def prob(logits: Tensor, inputs: MetricInputs) -> Tensor:
    """p(answer) at ``position``."""
    return logprob(logits, inputs).exp()


def cross_entropy(logits: Tensor, inputs: MetricInputs) -> Tensor:
    """Mean next-token cross-entropy over the prompt (the language-modelling loss), per pair."""
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    target = inputs.tokens[:, 1:].to(logits.device)
    return -logp.gather(2, target[:, :, None])[:, :, 0].mean(dim=1)


BUILTIN_METRICS: dict[str, Metric] = {
    "logit_diff": logit_diff,
    "logprob": logprob,
    "prob": prob,
    "cross_entropy": cross_entropy,
}

NEEDS_ANSWER = {"logit_diff": ("answer", "wrong_answer"), "logprob": ("answer",), "prob": ("answer",)}
"""Which prompt-pair fields each built-in metric reads."""


def resolve_metric(spec: MetricSpec, custom: Metric | None) -> Metric:
    """The callable for a plan's metric."""
    if spec.name == "custom":
        if custom is None:
            raise PlanError("metric.name: 'custom' needs a metric callable passed through the Python API (run(plan, metric=...))")
        return custom
    if custom is not None:
        raise PlanError(f"metric.name is {spec.name!r} but a custom metric callable was passed; set metric.name to 'custom'")
    return BUILTIN_METRICS[spec.name]
