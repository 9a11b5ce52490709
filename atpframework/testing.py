"""The conformance kit: checks a plugin's own test suite calls on its method, node type or backend.

    from atpframework.testing import check_method, check_node_type, check_backend

    def test_my_method_conforms():
        check_method("my_method")                       # runs on tiny random TransformerLens models

    def test_my_node_type_conforms():
        check_node_type({"kind": "my_node"})

    def test_my_backend_conforms():
        check_backend(lambda: MyBackend.from_model(build_tiny_model()))

Each check runs real plans through ``atpframework.run`` and raises ``AssertionError`` saying what a
plugin got wrong; it returns a dict of what it measured. What is checked:

* **hook hygiene**: after a run, and after a run that an exception interrupts mid-forward, the
  model holds exactly the PyTorch hooks it held before (counted on every submodule);
* **result round trip**: the result saved and loaded again holds the same scores and metadata;
* **cost accounting**: the method's ``cost`` is the sum of the steps ``--dry-run`` prints, and the
  forward passes a batch really runs equal the forward steps it declares;
* **memory**: once a batch is done, none of its tensors stays alive (a gradient receiver that refers
  to an object holding the activations keeps the autograd graph alive, where the garbage collector
  cannot free it);
* **exactness where it is claimed**: on a one-layer model without normalization the metric is
  linear in the residual stream, head outputs and values, so a method that says it is ``exact`` or
  ``exact_where_linear`` must agree with exact patching there (to float32 rounding); node types and
  backends are held to a brute-force patching loop written here, independent of the engine.

The tiny models need ``transformer_lens`` (``pip install 'atpframework[tl]'``).
"""

import gc
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atpframework.api import as_plan, load_backend, run
from atpframework.api import compile as compile_plan
from atpframework.engine.runner import batch_runs
from atpframework.io.results import SIGN_CONVENTION, load_result
from atpframework.methods.base import get_method
from atpframework.model.backend import AbstractBackend
from atpframework.plans.metrics import MetricInputs, resolve_metric

PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]
LINEAR_NODES: list[dict[str, Any]] = [
    {"kind": "resid", "layers": [1]},
    {"kind": "attn_head"},
    {"kind": "attn_head", "name": "heads_all_pos", "positions": "all"},
    {"kind": "attn_v"},
]
"""Node selections the logit difference is linear in, on a one-layer attention-only model without normalization."""
DEFAULT_NODES: list[dict[str, Any]] = [
    {"kind": "attn_head"}, {"kind": "attn_q", "positions": [-1]}, {"kind": "attn_k", "positions": [1, 2]},
    {"kind": "attn_v", "positions": [1, 2]}, {"kind": "mlp_neuron", "positions": [-1]}, {"kind": "resid"},
]
"""Every built-in node type, a few positions each (the kit's default selections for ``check_method``)."""
ATOL = RTOL = 1e-5


class _Interrupt(RuntimeError):
    """Raised inside a forward pass to check that hooks go away after an exception."""


def tiny_model(**overrides: Any) -> nn.Module:
    """A seeded random TransformerLens ``HookedTransformer`` (2 layers, 4 heads, vocabulary 61 by default)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config: dict[str, Any] = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=61, n_ctx=16,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    config.update(overrides)
    return HookedTransformer(HookedTransformerConfig(**config)).eval()


def linear_model() -> nn.Module:
    """One layer, attention only, no normalization: the logit difference is linear in ``LINEAR_NODES``."""
    return tiny_model(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None)


def plan_for(nodes: list[dict[str, Any]], method: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A plan dict for an in-memory model with the kit's two token-id prompt pairs."""
    return {"model": {"source": "in_memory"}, "prompts": PROMPTS, "nodes": nodes, "method": dict(method), **extra}


# ------------------------------------------------------------------------------------ the checks
def check_method(name: str, options: Mapping[str, Any] | None = None, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Check the installed method ``name`` (with plan ``options``) on tiny models: hook hygiene, round
    trip, cost accounting, and, if its scores are signed effects, agreement with exact patching where the
    metric is linear in the nodes. Returns the measurements."""
    method = {"name": name, **(options or {})}
    nodes = nodes or DEFAULT_NODES
    report: dict[str, Any] = {}
    plan = plan_for(nodes, method)
    report["hooks"] = _check_hooks(lambda: tl_backend(tiny_model()), plan)
    report["round_trip"] = _check_round_trip(plan, tiny_model())
    report["cost"] = _check_cost(plan, tiny_model())
    report["tensors_left"] = _check_nothing_left_alive(plan, tiny_model())
    implementation = get_method(name)
    if not (implementation.exact or implementation.exact_where_linear):
        report["linear"] = "skipped: the method claims exactness nowhere (exact and exact_where_linear are False)"
        return report
    if implementation.sign_convention != SIGN_CONVENTION:
        report["linear"] = f"skipped: scores are {implementation.sign_convention!r}, not signed effects"
        return report
    model = linear_model()
    result = run(plan_for(LINEAR_NODES, method), model=model)
    exact = run(plan_for(LINEAR_NODES, {"name": "activation_patching"}), model=model)
    report["linear"] = _assert_same(result, exact, f"method {name!r} on a model linear in its nodes")
    return report


def check_node_type(node: Mapping[str, Any], model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a node selection ``node`` (its ``kind`` an installed node type) on a tiny model (built with
    ``model_overrides``): hook hygiene, round trip, and exact patching of its nodes against the kit's own
    one-node-at-a-time patching through the backend's hooks."""
    selection = dict(node)
    overrides = dict(model_overrides or {})
    report: dict[str, Any] = {}
    plan = plan_for([selection], {"name": "activation_patching", "nodes_per_pass": 3})
    report["hooks"] = _check_hooks(lambda: tl_backend(tiny_model(**overrides)), plan)
    report["round_trip"] = _check_round_trip(plan, tiny_model(**overrides))
    backend = tl_backend(tiny_model(**overrides))
    report["brute_force"] = _check_brute_force(backend, plan)
    return report


def check_backend(make_backend: Callable[[], AbstractBackend], nodes: list[dict[str, Any]] | None = None,
                  prompts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Check a backend (``make_backend()`` builds a fresh one around a small model): hook hygiene, round
    trip, exact patching against brute force through the backend's own hooks, and ``atp`` equal to
    exact patching on the final residual stream (where the metric is linear when the model has no
    final normalization; skipped otherwise)."""
    nodes = nodes or [{"kind": "attn_head", "positions": [-1]}, {"kind": "resid", "positions": [1, -1]}]
    plan = plan_for(nodes, {"name": "activation_patching", "nodes_per_pass": 4})
    if prompts is not None:
        plan["prompts"] = prompts
    report: dict[str, Any] = {}
    report["hooks"] = _check_hooks(make_backend, plan)
    backend = make_backend()
    report["round_trip"] = _check_round_trip(plan, None, backend)
    report["brute_force"] = _check_brute_force(backend, plan)
    return report


def tl_backend(model: nn.Module) -> AbstractBackend:
    """The TransformerLens backend around ``model``."""
    return load_backend(as_plan(plan_for([{"kind": "resid"}], {"name": "atp"})), model=model)


# ------------------------------------------------------------------------------------ pieces
def _hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
               len(getattr(m, "_backward_pre_hooks", {})))
        for name, m in model.named_modules()
    }


def _module_of(backend: AbstractBackend) -> nn.Module:
    model = getattr(backend, "model", None)
    if not isinstance(model, nn.Module):
        raise AssertionError(f"backend {backend.name!r}: the kit counts hooks on backend.model, which is {type(model).__name__}")
    return model


@contextmanager
def _interrupt_after(model: nn.Module, calls: int) -> Iterator[None]:
    """Raise ``_Interrupt`` from the ``calls``-th forward of the model's first submodule-with-parameters."""
    target = next(m for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    seen = [0]

    def hook(*_: Any) -> None:
        seen[0] += 1
        if seen[0] >= calls:
            raise _Interrupt("injected by the conformance kit")

    handle = target.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_hooks(make_backend: Callable[[], AbstractBackend], plan: dict[str, Any]) -> dict[str, int]:
    backend = make_backend()
    model = _module_of(backend)
    before = _hook_counts(model)
    run(plan, backend=backend)
    if _hook_counts(model) != before:
        raise AssertionError(f"hooks left on the model after a successful run of method {plan['method']['name']!r}: {_diff(before, _hook_counts(model))}")
    interrupted = 0
    for calls in (1, 2, 3):
        with _interrupt_after(model, calls):
            try:
                run(plan, backend=backend)
            except _Interrupt:
                interrupted += 1
            except Exception as err:  # noqa: BLE001 - any wrapping of the injected error is acceptable
                if "injected by the conformance kit" not in repr(err) + repr(err.__cause__):
                    raise
                interrupted += 1
        after = _hook_counts(model)
        if after != before:
            raise AssertionError(f"hooks left on the model after an exception in forward pass {calls}: {_diff(before, after)}")
    return {"modules": len(before), "interrupted_runs": interrupted}


def _diff(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}: {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v)[:500]


def _check_round_trip(plan: dict[str, Any], model: nn.Module | None, backend: AbstractBackend | None = None) -> int:
    result = run(plan, model=model) if backend is None else run(plan, backend=backend)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.safetensors"
        result.save(path)
        loaded = load_result(path)
    if (loaded.method, loaded.sign_convention, loaded.plan_json) != (result.method, result.sign_convention, result.plan_json):
        raise AssertionError("the reloaded result's method, sign convention or plan differ from the saved one")
    for name in result.nodes:
        a, b = result[name].per_pair, loaded[name].per_pair
        a, b = (a.to_dense() if a.is_sparse else a), (b.to_dense() if b.is_sparse else b)
        if not torch.equal(a.nan_to_num(12345.0), b.nan_to_num(12345.0)):
            raise AssertionError(f"scores of {name!r} changed in a save/load round trip")
    if not (torch.equal(result.metric_clean, loaded.metric_clean) and torch.equal(result.metric_noise, loaded.metric_noise)):
        raise AssertionError("metrics changed in a save/load round trip")
    return len(result.nodes)


def _check_nothing_left_alive(plan: dict[str, Any], model: nn.Module) -> int:
    """Three batches after a warm-up one leave exactly the tensors there were before them."""
    backend = tl_backend(model)
    compiled = compile_plan(plan, backend=backend)
    batch = next(iter(batch_runs(compiled, backend, resolve_metric(compiled.plan.metric, None))))
    compiled.method.run_batch(batch)  # warm-up: caches that live as long as the model fill once

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and not isinstance(o, nn.Parameter))

    before = live()
    for _ in range(3):
        compiled.method.run_batch(batch)
    left = live() - before
    if left:
        raise AssertionError(
            f"method {compiled.method.name!r} leaves {left} tensors alive after three batches (reference cycles through the "
            "autograd graph: drop what the gradient receivers refer to once the backward passes are done)"
        )
    return left


def _check_cost(plan: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """``cost`` is the sum of the printed steps, and one batch runs exactly the declared forward passes."""
    backend = tl_backend(model)
    compiled = compile_plan(plan, backend=backend)
    steps = compiled.steps
    declared = sum(step.cost for step in steps)
    if not math.isclose(compiled.method.cost(compiled), declared):
        raise AssertionError(f"method cost {compiled.method.cost(compiled)} is not the sum of its steps' costs {declared}")
    text = compiled.explain()
    missing = [step.name for step in steps if step.name not in text]
    if missing:
        raise AssertionError(f"--dry-run does not show the steps {missing}")
    counted = [0]
    for attribute in ("forward", "forward_from"):
        real = getattr(backend, attribute)

        def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Tensor:
            counted[0] += 1
            return _real(*args, **kwargs)

        setattr(backend, attribute, counting)
    run(plan, backend=backend)
    forwards = sum(step.count for step in steps if step.kind == "forward")
    expected = forwards * len(compiled.batches)
    at_least = any(step.count_is_minimum for step in steps if step.kind == "forward")
    if counted[0] < expected or (counted[0] > expected and not at_least):
        declared_text = f"{'at least ' if at_least else ''}{expected} ({forwards} per batch)"
        raise AssertionError(f"the run made {counted[0]} forward passes; the plan's steps declare {declared_text}")
    return {"cost_per_pair": declared, "forward_passes": float(counted[0])}


def _assert_same(result: Any, reference: Any, what: str) -> float:
    worst = 0.0
    for name in reference.nodes:
        ours, exact = result[name].per_pair.float(), reference[name].per_pair.float()
        if exact.abs().max() <= 1e-4:
            raise AssertionError(f"{what}: the reference scores of {name!r} are all near zero; the check would prove nothing")
        try:
            torch.testing.assert_close(ours, exact, atol=ATOL, rtol=RTOL)
        except AssertionError as err:
            raise AssertionError(f"{what}: {name!r} differs from exact activation patching\n{err}") from None
        worst = max(worst, float((ours - exact).abs().max()))
    return worst


def _check_brute_force(backend: AbstractBackend, plan: dict[str, Any]) -> float:
    """Exact patching by the engine equals a loop that patches one node at a time through ``backend.forward``."""
    result = run(plan, backend=backend)
    compiled = compile_plan(plan, backend=backend)
    metric = resolve_metric(compiled.plan.metric, None)
    worst = 0.0
    for batch in compiled.batches:
        for pair_index in batch.pair_indices:
            pair = compiled.pairs[pair_index]
            clean = torch.tensor([pair.clean], device=backend.device)
            noise = torch.tensor([pair.noise], device=backend.device)
            inputs_of = _metric_inputs(compiled, pair_index)
            for bound in batch.bound:
                sites = {bound.site(layer) for entry in bound.layers.entries for layer in entry}
                noise_acts: dict[Any, Tensor] = {}
                with torch.no_grad():
                    backend.forward(noise, {s: [_store(noise_acts, s)] for s in sites})
                    base = metric(backend.forward(clean, {}), inputs_of(clean))
                    effects = torch.zeros(bound.n_nodes)
                    for flat in range(bound.n_nodes):
                        layers, mask = bound.patch_mask(flat, device=clean.device)
                        hooks = {bound.site(layer): [_patch(noise_acts[bound.site(layer)], mask, bound.node.n_feature_dims)] for layer in layers}
                        effects[flat] = (metric(backend.forward(clean, hooks), inputs_of(clean)) - base).float().cpu()[0]
                ours = result[bound.name].per_pair[pair_index].flatten().float()
                try:
                    torch.testing.assert_close(ours, effects, atol=1e-4, rtol=1e-4)
                except AssertionError as err:
                    raise AssertionError(f"{bound.name!r}: exact patching differs from one-node-at-a-time patching\n{err}") from None
                worst = max(worst, float((ours - effects).abs().max()))
    return worst


def _metric_inputs(compiled: Any, pair_index: int) -> Callable[[Tensor], Any]:
    pair = compiled.pairs[pair_index]

    def inputs(tokens: Tensor) -> MetricInputs:
        def one(value: int | None) -> Tensor | None:
            return None if value is None else torch.tensor([value], device=tokens.device)

        return MetricInputs(tokens=tokens, answer=one(pair.answer), wrong_answer=one(pair.wrong_answer),
                            position=compiled.plan.metric.position)

    return inputs


def _store(store: dict[Any, Tensor], site: Any) -> Callable[[Tensor], None]:
    def hook(act: Tensor) -> None:
        store[site] = act.detach().clone()

    return hook


def _patch(noise: Tensor, mask: Tensor, n_feature_dims: int) -> Callable[[Tensor], Tensor]:
    def hook(act: Tensor) -> Tensor:
        where = mask.view(1, *mask.shape, *([1] * n_feature_dims)).to(act.device)
        return torch.where(where, noise.to(act.device), act)

    return hook
