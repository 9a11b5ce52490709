"""What a compiled plan is and what a method reads and returns per batch: the data both the engine
and the methods use, kept in this leaf module so neither imports the other.

Lifecycle of one batch: ``compile_plan`` (``engine/runner.py``) turns a plan into a ``CompiledPlan`` of
``Batch``es; ``batch_runs`` gives each as a ``BatchRun`` (tokens on the device, the metric); the
plan's method turns it into ``BatchScores`` (device tensors); ``run_batches`` moves those to the CPU
as a ``BatchOutput`` (what checkpoints and other processes exchange); ``assemble`` joins the outputs
into per-pair tensors (``runner.Executed``). The table in docs/architecture.md says who makes and
who consumes each.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from atpframework.model.backend import AbstractBackend, ModelInfo
from atpframework.model.edges import EdgeNode, real_edge_count
from atpframework.model.node import BoundNodes
from atpframework.model.sites import Site
from atpframework.plans.chunking import Chunking
from atpframework.plans.metrics import Metric, MetricInputs
from atpframework.plans.plan import AttributionPlan

if TYPE_CHECKING:  # the method contract refers back to these classes
    from atpframework.methods.base import AbstractMethod


@dataclass(frozen=True)
class PreparedPair:
    """A prompt pair as token ids, validated."""

    clean: tuple[int, ...]
    noise: tuple[int, ...]
    answer: int | None
    wrong_answer: int | None


@dataclass(frozen=True)
class PassStep:
    """One pass a method runs per batch (what ``--dry-run`` shows)."""

    name: str
    kind: str
    """``forward``, ``backward``, ``partial_backward`` (restarted below some layer) or ``attention`` (recomputation, no pass)."""
    count: int
    """How many such passes per batch."""
    rows: str
    """What the batch rows are."""
    sites: tuple[Site, ...] = ()
    """Sites captured, patched or receiving gradients."""
    action: str = ""
    forward_equivalents: float | None = None
    """Cost of this step per prompt pair in forward passes; None: ``count`` for forwards, ``2 * count``
    for backwards, 0 for attention recomputation."""
    count_is_minimum: bool = False
    """``count`` is the fewest passes the step can take; how many it takes depends on the data
    (``hierarchical``: which groups get split). Its cost in rows (``forward_equivalents``) is exact."""

    @property
    def cost(self) -> float:
        """Forward-pass equivalents per prompt pair (a backward pass counts as two forwards)."""
        if self.forward_equivalents is not None:
            return self.forward_equivalents
        return {"forward": 1.0, "backward": 2.0}.get(self.kind, 0.0) * self.count


@dataclass(frozen=True)
class Batch:
    """Pairs that share one pass: same token length, so positions align."""

    pair_indices: tuple[int, ...]
    seq_len: int
    bound: tuple[BoundNodes, ...]
    """The plan's node selections bound at this length (same result shapes for every batch)."""


@dataclass(frozen=True)
class CompiledPlan:
    """A plan bound to a model: validated inputs, node selections, sites and the pass schedule."""

    plan: AttributionPlan
    method: "AbstractMethod"
    """The plan's method (a plugin of the ``atpframework.methods`` group), configured by ``plan.method``."""
    info: ModelInfo
    pairs: tuple[PreparedPair, ...]
    batches: tuple[Batch, ...]
    sites: tuple[Site, ...]
    steps: tuple[PassStep, ...] = field(default=())
    chunking: Chunking = Chunking()
    """Pairs per pass and positions per chunk chosen under the plan's ``max_memory``."""

    @property
    def bound(self) -> tuple[BoundNodes, ...]:
        return self.batches[0].bound

    def explain(self) -> str:
        """A readable description of the compiled passes and sites."""
        info = self.info
        lines = [
            f"model: {info.source} ({info.architecture}, {info.n_layers} layers, {info.n_heads} heads"
            f" / {info.n_kv_heads} kv heads, d_model {info.d_model}, {info.dtype} on {info.device})",
            f"method: {self.plan.method.name}; metric: {self.plan.metric.name}",
            f"prompt pairs: {len(self.pairs)} in {len(self.batches)} batch(es) of up to "
            f"{self.chunking.pairs_per_pass or self.plan.batch_size} (token lengths: {sorted({b.seq_len for b in self.batches})})",
            f"memory: {self.chunking.describe()}",
            "node selections:",
        ]
        for b in self.bound:
            shape = " x ".join(f"{d}={n}" for d, n in zip(b.dims, b.shape))
            view = f" <{b.view}>" if b.view else ""
            real = f", {real_edge_count(b, info)} of them real edges" if isinstance(b.node, EdgeNode) else ""
            lines.append(f"  {b.name} ({b.node.kind} on site {b.site_name or b.node.site}{view}): {b.n_nodes} nodes{real} [{shape}]")
        by_name: dict[str, list[int]] = {}
        for site in self.sites:
            by_name.setdefault(site.name, []).append(site.layer)
        lines.append(
            f"sites captured ({len(self.sites)}): "
            + "; ".join(f"{name} at layers {_ranges(layers)}" for name, layers in by_name.items())
        )
        lines.append("passes per batch:")
        for step in self.steps:
            count = f">={step.count}" if step.count_is_minimum else str(step.count)
            lines.append(f"  {count} x {step.kind:8s} {step.name}: {step.rows}; {step.action}")
        totals: dict[str, int] = {}
        for step in self.steps:
            if step.kind != "attention":
                totals[step.kind] = totals.get(step.kind, 0) + step.count
        per_batch = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in totals.items())
        whole = ", ".join(f"{n * len(self.batches)} {kind.replace('_', ' ')}" for kind, n in totals.items())
        lines.append(f"total per batch: {per_batch}; whole plan: {whole}")
        return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out: list[str] = []
    for v in sorted(values):
        if out and v == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


@dataclass
class BatchRun:
    """What a method reads for one batch."""

    compiled: CompiledPlan
    batch: Batch
    backend: AbstractBackend
    metric: Metric
    clean_tokens: Tensor
    """``batch pos``"""
    noise_tokens: Tensor
    """``batch pos``"""

    def metric_inputs(self, tokens: Tensor, repeat: int = 1) -> MetricInputs:
        pairs = [self.compiled.pairs[i] for i in self.batch.pair_indices]
        device = tokens.device

        def column(values: list[int | None]) -> Tensor | None:
            if any(v is None for v in values):
                return None
            return torch.tensor(values, device=device).repeat(repeat)

        return MetricInputs(
            tokens=tokens,
            answer=column([p.answer for p in pairs]),
            wrong_answer=column([p.wrong_answer for p in pairs]),
            position=self.compiled.plan.metric.position,
        )


@dataclass
class BatchScores:
    """A method's output for one batch."""

    scores: dict[str, Tensor]
    """Result name -> ``batch layer *axes`` per-pair signed effects."""
    metric_clean: Tensor
    metric_noise: Tensor
    terms: dict[str, Tensor] | None = None
    """GradDrop methods asked to keep them: result name -> ``term batch layer *axes`` signed per-term estimates."""
    extras: dict[str, Tensor] | None = None
    """Per-node statistics stored next to the scores, ``"<result name>.<statistic>"`` -> ``batch layer *axes``
    (e.g. the subsampling baseline's standard errors and sample counts)."""


@dataclass
class BatchOutput:
    """One batch's finished scores on the CPU, ready to be assembled (or sent to another process)."""

    pair_indices: list[int]
    scores: dict[str, Tensor]
    """Result name -> ``batch layer *axes`` (dense selections)."""
    sparse: dict[str, tuple[Tensor, Tensor]]
    """Result name -> ``keep_top`` (indices, values) (selections with ``keep_top``)."""
    extras: dict[str, Tensor]
    metric_clean: Tensor
    metric_noise: Tensor
