"""Run-time checks that keep wrong numbers out of results: the metric contract and finite values.

* ``check_metric`` probes a metric once, before the first batch, on random logits shaped like the
  batch's: it must return a floating tensor of shape ``(batch,)`` whose entry ``i`` depends on the
  logits of row ``i`` and of no other row. A batch mean (the TransformerLens habit) would divide
  every score by the batch size; a constant would make every score zero.
* ``nonfinite`` names the first NaN or infinite value among a batch's outputs; ``locate_nonfinite``
  then runs one extra forward pass, capturing every site the backend serves, and names the first
  site and layer (in execution order) where a non-finite activation appears, or logits that are
  constant over the vocabulary (an overflow inside a normalization leaves finite but constant
  activations: every score is then exactly 0). The extra pass runs only when a check has already
  failed, or when every score of a batch is exactly 0.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from atpframework.errors import PlanError, shorten
from atpframework.model.backend import AbstractBackend
from atpframework.model.interventions import Intervention
from atpframework.model.sites import Site
from atpframework.plans.metrics import Metric, MetricInputs


def check_metric(metric: Metric, inputs: MetricInputs, vocab: int, dtype: torch.dtype) -> None:
    """``PlanError`` unless ``metric`` honours the contract (module docstring) on ``inputs``'s shapes."""
    rows, length = inputs.tokens.shape
    logits = torch.randn(rows, length, vocab, generator=torch.Generator().manual_seed(0)).to(inputs.tokens.device, dtype)
    logits.requires_grad_(True)
    expected = f"a floating tensor of shape ({rows},): one value per prompt pair of the batch"
    with torch.enable_grad():
        try:
            value = metric(logits, inputs)
        except Exception as err:  # noqa: BLE001 - a failing user metric is a plan problem, reported plainly
            raise PlanError(
                f"metric: the metric failed on logits of shape ({rows}, {length}, {vocab}): "
                f"{type(err).__name__}: {shorten(str(err))}"
            ) from None
        if not isinstance(value, Tensor):
            raise PlanError(f"metric: the metric returned a {type(value).__name__} ({shorten(value)}); expected {expected}")
        if not value.is_floating_point():
            raise PlanError(f"metric: the metric returned a tensor of dtype {value.dtype}; expected {expected}")
        if tuple(value.shape) != (rows,):
            hint = " (a batch mean? the engine sums per-pair values itself, so a mean would divide every score by the batch size)"
            raise PlanError(
                f"metric: the metric returned shape {tuple(value.shape)}; expected {expected}"
                + (hint if value.dim() == 0 or rows == 1 else "")
            )
        if value.grad_fn is None:
            raise PlanError(
                f"metric: the metric's value does not depend on the logits (no gradient reaches them); expected {expected} "
                "computed from the logits, or every score would be zero"
            )
        if rows > 1:
            (grad,) = torch.autograd.grad(value[0], logits, allow_unused=True, retain_graph=True)
            if grad is not None and bool(grad[1:].abs().sum() > 0):
                raise PlanError(
                    "metric: the value of pair 0 depends on the logits of other pairs of the batch (a batch mean or sum?); "
                    f"expected {expected}, each computed from its own row of the logits"
                )


def nonfinite(named: Mapping[str, Tensor]) -> tuple[str, int | None] | None:
    """The name of the first tensor in ``named`` holding a NaN or infinite value, with the first batch
    row (leading axis) holding one (None for sparse or 0-d tensors); None if all are finite."""
    for name, tensor in named.items():
        values = tensor.coalesce().values() if tensor.is_sparse else tensor
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            if tensor.is_sparse or values.dim() == 0:
                return name, None
            return name, int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])
    return None


def locate_nonfinite(backend: AbstractBackend, tokens: Tensor) -> str | None:
    """Run ``tokens`` once, capturing every site the backend serves at every layer; describe the first
    non-finite activation (``"site attn_out at layer 1 (batch row 0)"``), non-finite or constant
    logits, or return None."""
    info = backend.info
    found: list[str] = []

    def watch(site: Site) -> Callable[[Tensor], None]:
        def look(act: Tensor) -> None:
            if not found:
                bad = nonfinite({f"site {site.name} at layer {site.layer}": act.detach()})
                if bad is not None:
                    found.append(_describe(bad))

        return look

    def run_watching(sites: set[Site]) -> Tensor:
        watched = Intervention()
        for site in sites:
            watched.observe(site, watch(site))
        return watched.run(backend, tokens)

    every = {Site(name, layer) for name in backend.supported_sites for layer in range(info.n_layers)}
    boundaries = {Site("resid", layer) for layer in range(info.n_layers + 1)}
    with torch.no_grad():
        try:
            logits = run_watching(every | boundaries)
        except Exception:  # noqa: BLE001 - a site this model lacks (e.g. no MLP): watch the residual stream only
            found.clear()
            logits = run_watching(boundaries)
    if not found:
        bad = nonfinite({"the logits": logits})
        if bad is not None:
            found.append(_describe(bad))
        elif bool((logits == logits[..., :1]).all()):
            found.append("the logits, which are equal for every token of the vocabulary (the output is constant)")
    return found[0] if found else None


def _describe(bad: tuple[str, int | None]) -> str:
    name, row = bad
    return name if row is None else f"{name} (batch row {row})"
