"""The benchmark suite: the engine's wall time and memory as ratios to bare passes of the same model.

    python benchmarks/suite.py [--models tiny,gpt2_small,pythia_160m,smollm2] [--only overhead,...]
                               [--repeats 5] [--json results/benchmarks.json]
    python benchmarks/suite.py --smoke          # tiny model, one repetition, seconds (run by the tests)

Every figure is a ratio of two medians measured in the same process and run (``--repeats`` rounds
after one warm-up round, cases interleaved within a round), so it holds on a noisy machine.

Measurements (``--only`` picks some):

* ``overhead``: ``atp`` over every node type at once (heads, q/k/v, neurons, residual) divided by
  the bare floor: a noise forward (no grad), a clean forward and one backward of the summed metric,
  without hooks. Two floors: the backward to the embeddings only (what the engine needs; the
  target ≤ 1.15 is judged against it) and ``loss.backward()`` with weight gradients (what a
  notebook runs).
* ``atp_star``: ``atp_star`` on the same nodes, divided by the floor and by the cost model
  ``2F + (1 + L/2)·B`` (F, B: measured bare forward and backward; target within 1.3×), next to a
  straightforward GradDrop that runs one full backward per dropped block (target: atp_star ≥ 1.6×
  faster). The straightforward one computes GradDrop scores independently (a gate on each block's
  residual write); their largest difference from ``atp_graddrop`` is printed.
* ``patching``: exact patching of head outputs and residual positions at three layers, one pair:
  ``activation_patching`` against ``transformer_lens.patching`` (target ≥ 5×), largest difference.
* ``memory``: peak resident memory above the loaded model during ``atp`` and ``atp_star``, divided
  by that of the bare forward + backward (target ≤ 1.5). Linux: the peak is reset through
  ``/proc/self/clear_refs`` before each case; on CUDA ``torch.cuda.max_memory_allocated``.
* ``scaling``: time and peak memory of ``atp`` and ``atp_star`` as sequence length, batch size and
  depth grow, on the ``scaling`` model, with the fitted exponent of each step (time ∝ size^e).

Models are TransformerLens models with random weights (``tiny``; ``gpt2_small``; ``pythia_160m``:
parallel attention and MLP, partial rotary) and the bundled SmolLM2-135M. Prompts are random token
ids (noise = clean with a quarter of the positions resampled). ``benchmarks/suite_gpu.py`` runs the
same suite on a GPU in bfloat16 with larger shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import atpframework as af
from atpframework.engine.runner import batch_runs, compile_plan
from atpframework.io.files import write_text_atomically
from atpframework.methods.base import get_method
from atpframework.plans.compiled import BatchRun
from atpframework.plans.metrics import resolve_metric

NODE_KINDS = ["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid"]
MEASUREMENTS = ["overhead", "atp_star", "patching", "memory", "scaling"]
TARGETS = {"overhead": 1.15, "atp_star_vs_naive": 1.6, "atp_star_vs_cost_model": 1.3, "patching": 5.0, "memory": 1.5}

_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=512, act_fn="gelu"),
    "scaling": dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=2048, act_fn="gelu"),
    "gpt2_small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, act_fn="gelu_new"),
    "pythia_160m": dict(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50304, act_fn="gelu",
        positional_embedding_type="rotary", rotary_dim=16, parallel_attn_mlp=True,
    ),
    # GPU shapes (suite_gpu.py)
    "pythia_1b": dict(
        n_layers=16, d_model=2048, n_heads=8, d_head=256, d_mlp=8192, d_vocab=50304, act_fn="gelu",
        positional_embedding_type="rotary", rotary_dim=64, parallel_attn_mlp=True,
    ),
    "pythia_6_9b": dict(
        n_layers=32, d_model=4096, n_heads=32, d_head=128, d_mlp=16384, d_vocab=50432, act_fn="gelu",
        positional_embedding_type="rotary", rotary_dim=32, parallel_attn_mlp=True,
    ),
}
BUNDLED = {"smollm2": "bundled:smollm2-135m-instruct"}


@dataclass
class Settings:
    repeats: int
    batch: int
    seq: int
    patch_seq: int
    device: str
    dtype: str
    scaling_seqs: list[int]
    scaling_batches: list[int]
    scaling_depths: list[int]
    scaling_model: str = "scaling"


# ---------------------------------------------------------------------------------------------- setup
def load_model(name: str, settings: Settings, n_layers: int | None = None) -> Any:
    """A TransformerLens ``HookedTransformer``: random weights of a named shape, or a bundled model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if name in BUNDLED:
        plan = af.as_plan({"model": {"source": BUNDLED[name], "dtype": settings.dtype, "device": settings.device},
                           "prompts": [{"clean": [1, 2], "noise": [1, 3], "answer": 1, "wrong_answer": 2}],
                           "nodes": [{"kind": "resid"}], "method": {"name": "atp"}})
        return af.load_backend(plan).model
    shape = dict(_SHAPES[name], n_ctx=max(1024, settings.seq, *settings.scaling_seqs), normalization_type="LN",
                 seed=0, device=settings.device, dtype=getattr(torch, settings.dtype))
    if n_layers is not None:
        shape["n_layers"] = n_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(HookedTransformerConfig(**shape)).eval()


def random_pairs(n_pairs: int, seq: int, d_vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Token-id prompt pairs: noise is clean with a quarter of the positions (never the first) resampled."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        clean = torch.randint(d_vocab, (seq,), generator=gen)
        noise = clean.clone()
        changed = 1 + torch.randperm(seq - 1, generator=gen)[: max(1, seq // 4)]
        noise[changed] = torch.randint(d_vocab, (len(changed),), generator=gen)
        answer, wrong = torch.randint(d_vocab, (2,), generator=gen).tolist()
        pairs.append({"clean": clean.tolist(), "noise": noise.tolist(), "answer": answer, "wrong_answer": wrong})
    return pairs


class Bench:
    """One model with a batch of pairs, compiled for several methods; callables for each case."""

    def __init__(self, model: Any, n_pairs: int, seq: int, nodes: Sequence[dict[str, Any]] | None = None) -> None:
        self.model = model
        self.plan_base = {
            "model": {"source": "in_memory"},
            "prompts": random_pairs(n_pairs, seq, model.cfg.d_vocab),
            "nodes": list(nodes) if nodes is not None else [{"kind": k} for k in NODE_KINDS],
            "batch_size": n_pairs,
        }
        plan = af.as_plan(dict(self.plan_base, method={"name": "atp"}))
        self.backend = af.load_backend(plan, model=model)
        self.metric = resolve_metric(plan.metric, None)
        self._runs: dict[str, BatchRun] = {}

    def run(self, method: dict[str, Any]) -> BatchRun:
        key = json.dumps(method, sort_keys=True)
        if key not in self._runs:
            compiled = compile_plan(af.as_plan(dict(self.plan_base, method=method)), self.backend)
            (self._runs[key],) = list(batch_runs(compiled, self.backend, self.metric))
        return self._runs[key]

    def method(self, name: str, **options: Any) -> Callable[[], Any]:
        run, impl = self.run({"name": name, **options}), get_method(name)
        return lambda: impl.run_batch(run)

    def clean_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A clean forward with grad, no hooks but one that keeps the residual stream entering block 0:
        (that tensor, the summed metric)."""
        run, model = self.run({"name": "atp"}), self.model
        kept: dict[str, torch.Tensor] = {}

        def keep(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            kept["x"] = out
            return out

        handle = model.hook_dict["blocks.0.hook_resid_pre"].register_forward_hook(keep)
        try:
            value = self.metric(model(run.clean_tokens), run.metric_inputs(run.clean_tokens)).sum()
        finally:
            handle.remove()
        return kept["x"], value

    def bare(self, weights: bool) -> Callable[[], None]:
        """Noise forward (no grad), clean forward, one backward of the summed metric: to the residual
        stream entering block 0 (``weights=False``) or ``backward()`` into the weights."""
        run, model = self.run({"name": "atp"}), self.model

        def once() -> None:
            with torch.no_grad():
                self.metric(model(run.noise_tokens), run.metric_inputs(run.noise_tokens))
            resid0, value = self.clean_forward()
            if weights:
                value.backward()
                model.zero_grad(set_to_none=True)
            else:
                torch.autograd.grad(value, [resid0])

        return once

    def forward_backward(self) -> None:
        resid0, value = self.clean_forward()
        torch.autograd.grad(value, [resid0])


# ---------------------------------------------------------------------------------------------- timing
def medians(cases: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each case over ``repeats`` interleaved rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], Any], device: str) -> int:
    """Bytes of peak memory above what was in use when ``fn`` started."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:  # give freed heap back so the baseline is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    fn()
    return _rss_bytes("VmHWM") - before


def exact_malloc_peaks() -> None:
    """Re-run this process with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), once.

    By default glibc raises the threshold as large blocks are freed, so later tensors come from the
    heap, and freed heap memory stays resident: peaks then depend on allocation history. With the
    threshold fixed at 64 KiB every tensor larger than that is its own mapping, returned on free, and
    peaks of the resident set repeat to within a few MiB between runs. It also makes every large
    allocation a system call: wall times about double, so only memory benchmarks use it.
    """
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def memory_supported(device: str) -> bool:
    return device.startswith("cuda") or (Path("/proc/self/clear_refs").exists() and os.access("/proc/self/clear_refs", os.W_OK))


# ---------------------------------------------------------------------------------------------- naive GradDrop
class _Gate(torch.autograd.Function):
    """Identity forward; backward passes the gradient while ``gate[layer]`` is open and zeros it when closed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: list[bool], layer: int) -> torch.Tensor:  # type: ignore[override]
        ctx.gate, ctx.layer = gate, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:  # type: ignore[override]
        return (grad if ctx.gate[ctx.layer] else torch.zeros_like(grad)), None, None


def naive_graddrop(bench: Bench) -> Callable[[], dict[str, torch.Tensor]]:
    """GradDrop the straightforward way: one clean forward, then one full backward per dropped block.

    Each block's residual write (its attention and MLP outputs) passes through a gate; term ``l``
    closes gate ``l`` and differentiates the metric with respect to every node activation. Scored as
    ``atp_graddrop`` (block granularity): ``1/(L-1) * sum_l |(a_noise - a_clean) . grad_l|`` per node.
    The returned callable gives ``{kind: batch layer *axes}`` for the bench's node kinds.
    """
    model, run = bench.model, bench.run({"name": "atp"})
    n_layers = model.cfg.n_layers
    kinds = [n["kind"] for n in bench.plan_base["nodes"]]

    def hook_name(kind: str, layer: int) -> str:
        if kind == "resid":
            return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
        return f"blocks.{layer}.{_NAIVE_HOOKS[kind]}"

    layers = {k: range(n_layers + 1) if k == "resid" else range(n_layers) for k in kinds}
    names = [hook_name(k, l) for k in kinds for l in layers[k]]

    def per_node(kind: str, product: torch.Tensor) -> torch.Tensor:
        return product if kind == "mlp_neuron" else product.sum(-1)  # d_head / d_model summed into the node

    def scores() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            _, noise_cache = model.run_with_cache(run.noise_tokens, names_filter=lambda n: n in names)
        gate = [True] * n_layers
        clean: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any) -> torch.Tensor:
            clean[hook.name] = act
            return act

        def gated(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return _Gate.apply(act, gate, int(hook.name.split(".")[1]))

        writes = [(f"blocks.{l}.{w}", gated) for l in range(n_layers) for w in ("hook_attn_out", "hook_mlp_out")]
        logits = model.run_with_hooks(run.clean_tokens, fwd_hooks=[(n, keep) for n in names] + writes)
        value = bench.metric(logits, run.metric_inputs(run.clean_tokens)).sum()
        totals: dict[str, torch.Tensor] = {}
        for dropped in range(n_layers):
            gate[dropped] = False
            grads = torch.autograd.grad(value, [clean[n] for n in names], retain_graph=True)
            gate[dropped] = True
            for (kind, name), grad in zip([(k, hook_name(k, l)) for k in kinds for l in layers[k]], grads):
                term = per_node(kind, (noise_cache[name] - clean[name].detach()) * grad).abs()
                totals[name] = totals[name] + term if name in totals else term
        return {k: torch.stack([totals[hook_name(k, l)] for l in layers[k]], 1) / (n_layers - 1) for k in kinds}

    return scores


_NAIVE_HOOKS = {
    "attn_head": "attn.hook_z", "attn_q": "attn.hook_q", "attn_k": "attn.hook_k", "attn_v": "attn.hook_v",
    "mlp_neuron": "mlp.hook_post",
}


# ---------------------------------------------------------------------------------------------- measurements
def _max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float().cpu() - reference.float().cpu()).abs().max())


def measure_overhead_and_atp_star(bench: Bench, settings: Settings, which: set[str]) -> dict[str, Any]:
    sync = _sync_for(settings.device)
    cases: dict[str, Callable[[], Any]] = {
        "bare": bench.bare(weights=False), "bare_weights": bench.bare(weights=True),
        "forward": bench.clean_forward, "forward_backward": bench.forward_backward,
        "atp": bench.method("atp"),
    }
    naive = None
    if "atp_star" in which:
        naive = naive_graddrop(bench)
        cases.update(atp_graddrop=bench.method("atp_graddrop"), atp_star=bench.method("atp_star"), naive_graddrop=naive)
    t = medians(cases, settings.repeats, sync)
    n_layers = bench.model.cfg.n_layers
    forward, backward = t["forward"], max(t["forward_backward"] - t["forward"], 1e-9)
    out: dict[str, Any] = {"seconds": t, "n_layers": n_layers}
    out["overhead"] = {"atp/bare": t["atp"] / t["bare"], "atp/bare_weights": t["atp"] / t["bare_weights"],
                       "target": TARGETS["overhead"]}
    if naive is not None:
        cost_model = 2 * forward + (1 + n_layers / 2) * backward
        reference = naive()
        ours = get_method("atp_graddrop").run_batch(bench.run({"name": "atp_graddrop"})).scores
        diffs = {k: _max_diff(ours[k], reference[k]) for k in reference if ours[k].shape == reference[k].shape}
        scale = max(float(reference[k].abs().max()) for k in diffs) if diffs else float("nan")
        out["atp_star"] = {
            "atp_star/bare": t["atp_star"] / t["bare"], "atp_star/cost_model": t["atp_star"] / cost_model,
            "naive/atp_star": t["naive_graddrop"] / t["atp_star"], "naive/atp_graddrop": t["naive_graddrop"] / t["atp_graddrop"],
            "cost_model_seconds": cost_model, "forward_seconds": forward, "backward_seconds": backward,
            "graddrop_max_diff": max(diffs.values()) if diffs else None, "graddrop_scale": scale,
            "graddrop_compared": sorted(diffs),
            "target_vs_naive": TARGETS["atp_star_vs_naive"], "target_vs_cost_model": TARGETS["atp_star_vs_cost_model"],
        }
    return out


def measure_patching(model: Any, settings: Settings) -> dict[str, Any]:
    """Head outputs by position and residual stream by position at layers 0, L/2, L-1: ours vs TL."""
    import pandas as pd
    from transformer_lens import patching

    n_layers = model.cfg.n_layers
    layers = sorted({0, n_layers // 2, n_layers - 1})
    nodes = [{"kind": "attn_head", "layers": layers}, {"kind": "resid", "layers": layers}]
    bench = Bench(model, 1, settings.patch_seq, nodes)
    run = bench.run({"name": "activation_patching", "nodes_per_pass": 64})
    clean, noise = run.clean_tokens, run.noise_tokens
    inputs = run.metric_inputs(clean)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return bench.metric(logits, inputs).sum()

    seq = clean.shape[1]
    heads = pd.DataFrame([(l, p, h) for l in layers for p in range(seq) for h in range(model.cfg.n_heads)],
                         columns=["layer", "pos", "head_index"])
    resid = pd.DataFrame([(l, p) for l in layers for p in range(seq)], columns=["layer", "pos"])
    reference: dict[str, torch.Tensor] = {}

    def transformer_lens_patching() -> None:
        with torch.no_grad():
            base = metric(model(clean))
            _, cache = model.run_with_cache(noise)
            kwargs = dict(index_axis_names=None)
            reference["attn_head"] = patching.get_act_patch_attn_head_out_by_pos(model, clean, cache, metric, index_df=heads, **kwargs) - base
            reference["resid"] = patching.get_act_patch_resid_pre(model, clean, cache, metric, index_df=resid, **kwargs) - base

    ours: dict[str, Any] = {}

    def atpframework_patching() -> None:
        ours["scores"] = get_method("activation_patching").run_batch(run).scores

    with contextlib.redirect_stderr(io.StringIO()):  # TL's progress bars
        t = medians({"transformer_lens.patching": transformer_lens_patching, "atpframework": atpframework_patching},
                    settings.repeats, _sync_for(settings.device))
    diff = max(_max_diff(ours["scores"][k][0].flatten(), reference[k].flatten()) for k in reference)
    return {"seconds": t, "layers": layers, "n_nodes": len(heads) + len(resid), "seq": seq,
            "speedup": t["transformer_lens.patching"] / t["atpframework"], "max_diff": diff,
            "scale": max(float(r.abs().max()) for r in reference.values()), "target": TARGETS["patching"]}


def measure_memory(bench: Bench, settings: Settings) -> dict[str, Any]:
    cases = {"bare": bench.bare(weights=False), "atp": bench.method("atp"), "atp_star": bench.method("atp_star")}
    for fn in cases.values():  # warm-up: allocator caches, lazy init
        fn()
    peaks = {name: statistics.median([peak_memory(fn, settings.device) for _ in range(max(1, min(settings.repeats, 3)))])
             for name, fn in cases.items()}
    return {"peak_bytes": peaks, "atp/bare": peaks["atp"] / max(peaks["bare"], 1),
            "atp_star/bare": peaks["atp_star"] / max(peaks["bare"], 1), "target": TARGETS["memory"]}


def _exponent(xs: Sequence[float], ys: Sequence[float]) -> list[float | None]:
    return [None] + [math.log(y1 / y0) / math.log(x1 / x0) if y0 > 0 and y1 > 0 else None
                     for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])]


def measure_scaling(settings: Settings) -> dict[str, Any]:
    """Time and peak memory of atp and atp_star while one of seq, batch, depth grows (the others fixed)."""
    base_seq, base_batch = settings.scaling_seqs[0] * 2, settings.scaling_batches[0]
    axes = {
        "seq": [(dict(seq=s, batch=1), s) for s in settings.scaling_seqs],
        "batch": [(dict(seq=base_seq, batch=b), b) for b in settings.scaling_batches],
        "depth": [(dict(seq=base_seq, batch=base_batch, n_layers=d), d) for d in settings.scaling_depths],
    }
    out: dict[str, Any] = {}
    models: dict[int | None, Any] = {}
    for axis, points in axes.items():
        rows = []
        for params, x in points:
            depth = params.get("n_layers")
            if depth not in models:
                models[depth] = load_model(settings.scaling_model, settings, n_layers=depth)
            bench = Bench(models[depth], params["batch"], params["seq"], [{"kind": k} for k in NODE_KINDS])
            t = medians({"atp": bench.method("atp"), "atp_star": bench.method("atp_star")}, settings.repeats,
                        _sync_for(settings.device))
            mem = ({name: peak_memory(bench.method(name), settings.device) for name in ("atp", "atp_star")}
                   if memory_supported(settings.device) else {})
            rows.append({"x": x, "seconds": t, "peak_bytes": mem})
        xs = [r["x"] for r in rows]
        for name in ("atp", "atp_star"):
            for r, e in zip(rows, _exponent(xs, [r["seconds"][name] for r in rows])):
                r.setdefault("time_exponent", {})[name] = e
            if rows[0]["peak_bytes"]:
                for r, e in zip(rows, _exponent(xs, [r["peak_bytes"][name] for r in rows])):
                    r.setdefault("memory_exponent", {})[name] = e
        out[axis] = rows
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "MISSES"


def _row(model: str, label: str, value: str, target: float | None = None, numeric: float | None = None,
         higher_is_better: bool = False) -> str:
    if target is None:
        return f"| {model} | {label} | {value} | | |"
    sign = "≥" if higher_is_better else "≤"
    return f"| {model} | {label} | {value} | {sign} {target} | {_verdict(numeric, target, higher_is_better)} |"


def report(results: dict[str, Any]) -> str:
    lines = [f"# atpframework benchmark suite ({results['machine']['device']}, {results['settings']['dtype']}, "
             f"torch threads {results['machine']['torch_threads']}, medians of {results['settings']['repeats']})", ""]
    lines += ["| model | measurement | value | target | |", "|---|---|---:|---:|---|"]
    for name, r in results["models"].items():
        if "overhead" in r:
            o = r["overhead"]
            lines.append(_row(name, "atp / bare (backward to inputs)", _fmt(o["atp/bare"]), o["target"], o["atp/bare"]))
            lines.append(_row(name, "atp / bare (backward into weights)", _fmt(o["atp/bare_weights"])))
        if "atp_star" in r:
            a = r["atp_star"]
            lines.append(_row(name, "atp_star / bare", _fmt(a["atp_star/bare"])))
            lines.append(_row(name, "atp_star / (2F + (1 + L/2)B)", _fmt(a["atp_star/cost_model"]),
                              a["target_vs_cost_model"], a["atp_star/cost_model"]))
            lines.append(_row(name, "naive GradDrop / atp_star", _fmt(a["naive/atp_star"]),
                              a["target_vs_naive"], a["naive/atp_star"], higher_is_better=True))
            lines.append(_row(name, "naive GradDrop / atp_graddrop", _fmt(a["naive/atp_graddrop"])))
            lines.append(_row(name, "GradDrop: max diff from naive (scale)",
                              f"{_fmt(a['graddrop_max_diff'], '.1e')} ({_fmt(a['graddrop_scale'], '.2g')})"))
        if "patching" in r:
            p = r["patching"]
            lines.append(_row(name, f"exact patching speed-up over transformer_lens.patching ({p['n_nodes']} nodes)",
                              _fmt(p["speedup"], ".1f"), p["target"], p["speedup"], higher_is_better=True))
            lines.append(_row(name, "exact patching: max diff from TL (scale)",
                              f"{_fmt(p['max_diff'], '.1e')} ({_fmt(p['scale'], '.2g')})"))
        if "memory" in r:
            m = r["memory"]
            lines.append(_row(name, "peak memory atp / bare", _fmt(m["atp/bare"])))
            lines.append(_row(name, "peak memory atp_star / bare", _fmt(m["atp_star/bare"]), m["target"], m["atp_star/bare"]))
    if "scaling" in results:
        lines += ["", f"Scaling (model `{results['settings']['scaling_model']}`; exponent e of each step: time ∝ size^e)", "",
                  "| grows | size | atp s | atp_star s | e(atp) | e(atp_star) | atp MB | atp_star MB | e_mem(atp_star) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for axis, rows in results["scaling"].items():
            for r in rows:
                mb = {k: v / 2**20 for k, v in r["peak_bytes"].items()}
                lines.append(
                    f"| {axis} | {r['x']} | {_fmt(r['seconds']['atp'], '.3f')} | {_fmt(r['seconds']['atp_star'], '.3f')} | "
                    f"{_fmt(r['time_exponent']['atp'])} | {_fmt(r['time_exponent']['atp_star'])} | "
                    f"{_fmt(mb.get('atp'), '.1f')} | {_fmt(mb.get('atp_star'), '.1f')} | "
                    f"{_fmt(r.get('memory_exponent', {}).get('atp_star'))} |")
    return "\n".join(lines)


def run_suite(models: Sequence[str], which: Sequence[str], settings: Settings) -> dict[str, Any]:
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "machine": {"device": settings.device if settings.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]},
        "settings": vars(settings) | {"models": list(models), "measurements": list(which)},
        "models": {},
    }
    wanted = set(which)
    for name in models:
        started = time.perf_counter()
        model = load_model(name, settings)
        r: dict[str, Any] = {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model}
        if wanted & {"overhead", "atp_star"}:
            r.update(measure_overhead_and_atp_star(Bench(model, settings.batch, settings.seq), settings, wanted))
        if "patching" in wanted:
            r["patching"] = measure_patching(model, settings)
        if "memory" in wanted and memory_supported(settings.device):
            r["memory"] = measure_memory(Bench(model, settings.batch, settings.seq), settings)
        r["wall_seconds"] = time.perf_counter() - started
        results["models"][name] = r
        print(f"  {name}: done in {r['wall_seconds']:.0f} s", file=sys.stderr)
        del model
        gc.collect()
    if "scaling" in wanted:
        results["scaling"] = measure_scaling(settings)
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None, defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gpt2_small,pythia_160m,smollm2",
                        help=f"comma-separated, from {', '.join([*_SHAPES, *BUNDLED])}")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated, from {', '.join(MEASUREMENTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="prompt pairs per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--patch-seq", type=int, default=8, help="tokens per prompt for the exact-patching comparison")
    parser.add_argument("--scaling-seqs", default="32,64,128,256,512")
    parser.add_argument("--scaling-batches", default="1,2,4,8")
    parser.add_argument("--scaling-depths", default="2,4,8")
    parser.add_argument("--scaling-model", default="scaling", help="a random-weight shape (scaling grows its depth)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition, small sizes: seconds")
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.repeats, args.seq, args.patch_seq = "tiny", 1, 8, 4
        args.scaling_seqs, args.scaling_batches, args.scaling_depths = "8,16", "1,2", "2,3"
    return args


def main(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    args = parse_args(argv, defaults)
    models = [m for m in args.models.split(",") if m]
    which = [m for m in args.only.split(",") if m]
    unknown = [m for m in models if m not in _SHAPES and m not in BUNDLED] + [m for m in [args.scaling_model] if m not in _SHAPES] + [m for m in which if m not in MEASUREMENTS]
    if unknown:
        raise SystemExit(f"unknown model or measurement: {', '.join(unknown)}")
    settings = Settings(args.repeats, args.batch, args.seq, args.patch_seq, args.device, args.dtype,
                        _ints(args.scaling_seqs), _ints(args.scaling_batches), _ints(args.scaling_depths), args.scaling_model)
    results = run_suite(models, which, settings)
    print(report(results))
    if args.json:
        write_text_atomically(Path(args.json), json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
