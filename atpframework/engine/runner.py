"""The engine: compile a plan against a loaded model, then execute it batch by batch.

``compile_plan`` is where every check that can fail before a pass runs lives: tokenization and
equal-length pairs, answer tokens, node selections bound to model sizes, sites the backend must
serve. The ``CompiledPlan`` it returns lists the passes each batch will run (``explain()``, which
``atpf PLAN --dry-run`` prints). ``run_batches`` runs the method on each batch (all, or one process's
share) and ``assemble`` turns the batch outputs into per-pair tensors.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from atpframework import plugins
from atpframework.engine.checks import check_metric, locate_nonfinite, nonfinite
from atpframework.errors import BackendError, NonFiniteError, PlanError, problem_list, shorten
from atpframework.methods.base import get_method
from atpframework.model.backend import AbstractBackend
from atpframework.model.edges import edge_writer_sites
from atpframework.model.node import BindingContext, BoundNodes, bind_nodes
from atpframework.model.sites import EDGE_SITES
from atpframework.plans.chunking import Chunking, choose_chunking, node_positions, parse_bytes
from atpframework.plans.compiled import Batch, BatchOutput, BatchRun, CompiledPlan, PreparedPair
from atpframework.plans.metrics import NEEDS_ANSWER, Metric
from atpframework.plans.plan import AttributionPlan


def compile_plan(plan: AttributionPlan, backend: AbstractBackend) -> CompiledPlan:
    """Validate ``plan`` against the loaded model and schedule its passes (no pass runs)."""
    info = backend.info
    pairs = _prepare_pairs(plan, backend)

    nodes = [plugins.load("nodes", spec.kind)() for spec in plan.nodes]
    attached = backend.attached_saes
    if plan.saes and not attached:
        raise PlanError("saes: the plan splices SAEs; compile it with atpframework.compile / run, which load them")

    lengths = sorted({len(p.clean) for p in pairs})
    bound_by_len: dict[int, tuple[BoundNodes, ...]] = {}
    for length in lengths:
        bound_by_len[length] = tuple(
            bind_nodes(spec, node, BindingContext(info, length, f"nodes[{i}]", attached))
            for i, (spec, node) in enumerate(zip(plan.nodes, nodes))
        )
    first = bound_by_len[lengths[0]]
    for i, b in enumerate(first):
        name = b.site_name or b.node.site
        if not b.view and name not in backend.supported_sites:
            why = " (its blocks run attention and MLP in parallel: no residual stream between them)" if info.parallel_blocks else ""
            if name in EDGE_SITES:
                why = " (edges need each reader's own input and each head's result; see docs/edges.md for the backends and models that serve them)"
            raise PlanError(
                f"nodes[{i}]: node kind {b.node.kind!r} reads site {name!r}, which the {backend.name} backend does not serve on this model{why}"
            )
    for length in lengths[1:]:
        for i, (a, b) in enumerate(zip(first, bound_by_len[length])):
            if a.shape != b.shape:
                raise PlanError(
                    f"nodes[{i}].positions: 'each' needs every prompt pair to have the same token length, "
                    f"got lengths {lengths}; select positions by a list (e.g. [-1]) or 'all'"
                )

    writers = edge_writer_sites(first, info)
    missing = sorted({s.name for s in writers} - backend.supported_sites)
    if missing:
        raise PlanError(
            f"nodes: the edge selections read the writer site(s) {missing}, which the {backend.name} backend does not serve on this model"
        )
    sites = tuple(sorted({b.site(layer) for b in first for entry in b.layers.entries for layer in entry} | set(writers)))
    method = get_method(plan.method.name)
    compiled = CompiledPlan(plan, method, info, pairs, _batches(pairs, lengths, bound_by_len, plan.batch_size), sites)
    method.validate(compiled, backend)
    chunking = Chunking()
    if plan.max_memory is not None:
        longest = lengths[-1]
        positions = node_positions(bound_by_len[longest])
        chunking = choose_chunking(
            parse_bytes(plan.max_memory), min(plan.batch_size, len(pairs)), len(positions or range(longest)),
            lambda n_pairs, n_positions: method.working_memory(compiled, n_pairs, longest, n_positions),
            method.chunks_positions and positions is not None,
            f"method {method.name} does not split positions" if not method.chunks_positions else "a node type has no position axis",
        )
        compiled = replace(compiled, batches=_batches(pairs, lengths, bound_by_len, chunking.pairs_per_pass or 1))
    compiled = replace(compiled, chunking=chunking)
    return replace(compiled, steps=tuple(method.schedule(compiled)))


def _batches(
    pairs: tuple[PreparedPair, ...], lengths: list[int], bound_by_len: dict[int, tuple[BoundNodes, ...]], size: int
) -> tuple[Batch, ...]:
    """Pairs grouped by token length, in batches of at most ``size``."""
    batches = []
    for length in lengths:
        members = [i for i, p in enumerate(pairs) if len(p.clean) == length]
        for start in range(0, len(members), size):
            batches.append(Batch(tuple(members[start : start + size]), length, bound_by_len[length]))
    return tuple(batches)


def report_problems(problems: Sequence[str], where: str) -> None:
    """Raise one ``PlanError`` if there are ``problems``: the first leads the message, the rest follow,
    listed (and cut short) by ``errors.problem_list`` under ``and N more problem(s) <where>``."""
    problems = list(dict.fromkeys(problems))
    if not problems:
        return
    if len(problems) == 1:
        raise PlanError(problems[0])
    rest = problems[1:]
    raise PlanError(problems[0] + "\n" + problem_list(rest, f"and {len(rest)} more problem(s) {where}"))


def _prepare_pairs(plan: AttributionPlan, backend: AbstractBackend) -> tuple[PreparedPair, ...]:
    """Every prompt pair as token ids, checked against the model and the metric; all problems reported together."""
    pairs, problems = [], []
    n_ctx, position = backend.info.n_ctx, plan.metric.position
    for i in range(len(plan.prompts)):
        try:
            pair = _prepare_pair(plan, backend, i)
        except PlanError as err:
            problems.append(str(err))
            continue
        length = len(pair.clean)
        if n_ctx is not None and length > n_ctx:
            problems.append(f"prompts[{i}]: {length} tokens, longer than the model's context of {n_ctx} tokens")
        if not -length <= position < length:
            problems.append(f"metric.position: {position} is outside prompts[{i}] ({length} tokens)")
        if plan.metric.name == "cross_entropy" and length < 2:
            problems.append(
                f"prompts[{i}]: cross_entropy needs at least 2 tokens (it scores each next token), got {length}"
            )
        pairs.append(pair)
    report_problems(problems, "with the plan's prompts on this model")
    return tuple(pairs)


def _prepare_pair(plan: AttributionPlan, backend: AbstractBackend, i: int) -> PreparedPair:
    pair = plan.prompts[i]
    where = f"prompts[{i}]"

    def ids(value: str | list[int], field_name: str) -> tuple[int, ...]:
        if isinstance(value, str):
            out = backend.tokenize(value, plan.prepend_bos)
        else:
            out = list(value)
        if not out:
            raise PlanError(f"{where}.{field_name}: " + ("tokenizes to no tokens" if isinstance(value, str) else "is an empty list"))
        bad = [t for t in out if not 0 <= t < backend.info.d_vocab]
        if bad:
            raise PlanError(f"{where}.{field_name}: token id {bad[0]} outside the vocabulary (0..{backend.info.d_vocab - 1})")
        return tuple(out)

    def single(value: str | int | None, field_name: str) -> int | None:
        if value is None:
            if field_name in NEEDS_ANSWER.get(plan.metric.name, ()):
                raise PlanError(f"{where}.{field_name}: required by metric {plan.metric.name!r}")
            return None
        if isinstance(value, int):
            if not 0 <= value < backend.info.d_vocab:
                raise PlanError(f"{where}.{field_name}: token id {value} outside the vocabulary (0..{backend.info.d_vocab - 1})")
            return value
        toks = backend.tokenize(value, prepend_bos=False)
        if len(toks) != 1:
            raise PlanError(
                f"{where}.{field_name}: {shorten(value)} is {len(toks)} tokens {shorten(toks)}; it must be exactly one token"
            )
        return toks[0]

    clean, noise = ids(pair.clean, "clean"), ids(pair.noise, "noise")
    if len(clean) != len(noise):
        raise PlanError(
            f"{where}: the clean prompt is {len(clean)} tokens and the noise prompt {len(noise)}; "
            "a pair must tokenize to the same length so positions align"
        )
    return PreparedPair(clean, noise, single(pair.answer, "answer"), single(pair.wrong_answer, "wrong_answer"))

def batch_runs(compiled: CompiledPlan, backend: AbstractBackend, metric: Metric) -> Iterator[BatchRun]:
    """The plan's batches, ready for ``AbstractMethod.run_batch``."""
    for batch in compiled.batches:
        idx = list(batch.pair_indices)
        yield BatchRun(
            compiled,
            batch,
            backend,
            metric,
            torch.tensor([compiled.pairs[i].clean for i in idx], device=backend.device),
            torch.tensor([compiled.pairs[i].noise for i in idx], device=backend.device),
        )


@dataclass
class Executed:
    """Everything ``assemble`` gathered from the batches, pairs first."""

    scores: dict[str, Tensor]
    """Result name -> ``pair layer *axes`` (sparse COO for selections with ``keep_top``)."""
    extras: dict[str, Tensor]
    """``"<result name>.<statistic>"`` -> ``pair layer *axes`` (see ``BatchScores.extras``)."""
    metric_clean: Tensor
    metric_noise: Tensor

def run_batches(
    compiled: CompiledPlan,
    backend: AbstractBackend,
    metric: Metric,
    progress: Callable[[int], None] | None = None,
    batches: Sequence[int] | None = None,
    finished: Mapping[int, BatchOutput] | None = None,
    on_batch: Callable[[int, BatchOutput], None] | None = None,
) -> list[BatchOutput]:
    """Run the plan's batches (all, or those numbered in ``batches``) and move their outputs to the CPU.

    ``finished``: outputs of batches already run (by batch number), taken instead of running them
    again; ``on_batch(number, output)`` is called after each batch this call runs (checkpointing).
    """
    method = compiled.method
    wanted = None if batches is None else set(batches)
    outputs: list[BatchOutput] = []
    probed = False
    for number, run in enumerate(batch_runs(compiled, backend, metric)):
        if wanted is not None and number not in wanted:
            continue
        idx = list(run.batch.pair_indices)
        if finished and number in finished:
            if finished[number].pair_indices != idx:
                raise PlanError(
                    f"output: checkpointed batch {number} holds prompt pairs {shorten(finished[number].pair_indices)}, not {shorten(idx)}; "
                    "delete the checkpoint folder beside the output to start over"
                )
            outputs.append(finished[number])
            if progress is not None:
                progress(len(idx))
            continue
        if not probed:
            check_metric(metric, run.metric_inputs(run.clean_tokens), compiled.info.d_vocab, getattr(torch, compiled.info.dtype))
            probed = True
        out = method.run_batch(run)
        dense, sparse = {}, {}
        for b in run.batch.bound:
            value = out.scores[b.name].detach().float().cpu()
            sparse_output = b.spec.sparse_output()
            if sparse_output is None:
                dense[b.name] = value
            else:
                sparse[b.name] = keep_top(value, idx, sparse_output.keep_top, sparse_output.per)
        outputs.append(BatchOutput(
            idx, dense, sparse, {k: v.detach().float().cpu() for k, v in (out.extras or {}).items()},
            out.metric_clean.detach().float().cpu(), out.metric_noise.detach().float().cpu(),
        ))
        check_finite(outputs[-1], run, scores=not method.nan_means_undefined)
        if on_batch is not None:
            on_batch(number, outputs[-1])
        if progress is not None:
            progress(len(idx))
    return outputs


def check_finite(output: BatchOutput, run: BatchRun, scores: bool = True) -> None:
    """``NonFiniteError`` if a metric (or, with ``scores``, a score) of the batch is NaN or infinite,
    naming the pair and the first site and layer where a non-finite activation appears."""
    named = {"the metric on the clean prompt": output.metric_clean, "the metric on the noise prompt": output.metric_noise}
    if scores:
        named.update({f"a score of {name}": value for name, value in output.scores.items()})
        named.update({f"a score of {name}": values for name, (_, values) in output.sparse.items()})
    bad = nonfinite(named)
    if bad is None:
        where = locate_nonfinite(run.backend, run.clean_tokens) if scores and _all_zero(output) else None
        if where is not None:
            raise NonFiniteError(
                f"every score of prompt pairs {output.pair_indices} is exactly 0 and the clean forward pass's first "
                f"degenerate value is {where}: the model overflowed (weights too large for model.dtype "
                f"{run.compiled.info.dtype}?). Nothing was written for this batch"
            )
        return
    what, row = bad
    pair = f" of prompt pair {output.pair_indices[row]}" if row is not None else f" of prompt pairs {output.pair_indices}"
    origin = ""
    for label, tokens in (("clean", run.clean_tokens), ("noise", run.noise_tokens)):
        where = locate_nonfinite(run.backend, tokens)
        if where is not None:
            origin = f"; the first non-finite value of the {label} forward pass is {where}"
            break
    if not origin:
        origin = (
            "; every activation and logit of the clean and noise forward passes is finite, so it arose in the metric "
            "or in the gradients (an overflow: try model.dtype float32 or float64)"
        )
    raise NonFiniteError(f"{what}{pair} is NaN or infinite{origin}. Nothing was written for this batch")


def _all_zero(output: BatchOutput) -> bool:
    dense = all(not bool(v.any()) for v in output.scores.values())
    return dense and all(not bool(values.any()) for _, values in output.sparse.values())


def assemble(compiled: CompiledPlan, outputs: Sequence[BatchOutput]) -> Executed:
    """Per-pair tensors from batch outputs (any order; every pair of the plan exactly once)."""
    n = len(compiled.pairs)
    covered = sorted(i for out in outputs for i in out.pair_indices)
    if covered != list(range(n)):
        raise BackendError(f"the batch outputs cover prompt pairs {shorten(covered)}, not each of the plan's {n} pairs once")
    scores = {
        b.name: torch.zeros((n,) + b.shape, dtype=torch.float32)
        for b in compiled.bound
        if b.spec.sparse_output() is None
    }
    sparse: dict[str, list[tuple[Tensor, Tensor]]] = {}
    metric_clean = torch.zeros(n, dtype=torch.float32)
    metric_noise = torch.zeros(n, dtype=torch.float32)
    extras: dict[str, Tensor] = {}
    for out in outputs:
        idx = out.pair_indices
        for name, value in out.scores.items():
            scores[name][idx] = value
        for name, part in out.sparse.items():
            sparse.setdefault(name, []).append(part)
        for key, value in out.extras.items():
            if key not in extras:
                extras[key] = torch.zeros((n,) + tuple(value.shape[1:]), dtype=torch.float32)
            extras[key][idx] = value
        metric_clean[idx] = out.metric_clean
        metric_noise[idx] = out.metric_noise
    for b in compiled.bound:
        if b.name in sparse:
            indices = torch.cat([part[0] for part in sparse[b.name]], dim=1)
            values = torch.cat([part[1] for part in sparse[b.name]])
            scores[b.name] = torch.sparse_coo_tensor(indices, values, (n,) + b.shape, check_invariants=True).coalesce()
    return Executed(scores, extras, metric_clean, metric_noise)


def keep_top(value: Tensor, pair_indices: list[int], k: int, per: str) -> tuple[Tensor, Tensor]:
    """COO indices (``1 + ndim, nnz``, the first row the pair) and values of the ``k`` largest ``|value|``
    entries of each batch row (``batch layer ... last``): per position (``per="position"``, along the last
    axis) or over the whole row."""
    shape = value.shape[1:]
    rows = value.reshape(value.shape[0], -1, shape[-1]) if per == "position" else value.reshape(value.shape[0], 1, -1)
    k = min(k, rows.shape[-1])
    top = rows.abs().topk(k, dim=-1).indices  # batch group k
    values = rows.gather(-1, top)
    flat = top + torch.arange(rows.shape[1]).view(1, -1, 1) * rows.shape[-1]
    coords = torch.stack(torch.unravel_index(flat.reshape(value.shape[0], -1), shape), dim=0)  # ndim batch kept
    pairs = torch.tensor(pair_indices).view(1, -1, 1).expand(1, value.shape[0], coords.shape[-1])
    indices = torch.cat([pairs, coords], dim=0).reshape(1 + len(shape), -1)
    return indices, values.reshape(-1)
