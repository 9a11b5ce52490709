"""Wall time of the first-order methods relative to a bare 2-forward + 1-backward of the same batch.

    python benchmarks/atp_star_cost.py [--model bundled:smollm2-135m-instruct] [--repeats 5] [--json OUT]

Everything is measured in one process, interleaved, as medians over ``--repeats`` rounds after a
warm-up round, so the ratios hold on a noisy machine. Two floors are reported:

* ``bare``: noise forward (no grad) + clean forward + ``backward()`` of the summed metric, with the
  model's weights requiring grad (what a hand-written AtP notebook runs);
* ``bare_inputs``: the same, but the backward computes gradients of the embeddings only (no weight
  gradients), which is what the engine's backward passes do.
"""

import argparse
import json
import statistics
import time

import torch

import atpframework as af
from atpframework.engine import batch_runs, compile_plan
from atpframework.methods import get_method
from atpframework.metrics import resolve_metric

IOI = [
    ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("When Tom and James went to the park, James gave a ball to", "When Tom and James went to the park, Tom gave a ball to", " Tom", " James"),
    ("When Anna and Sarah went to the office, Sarah gave a letter to", "When Anna and Sarah went to the office, Anna gave a letter to", " Anna", " Sarah"),
]
KINDS = ["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid"]
METHODS = ["atp", "atp_qkfix", "atp_graddrop", "atp_star"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    prompts = [{"clean": c, "noise": n, "answer": a, "wrong_answer": w} for c, n, a, w in IOI]
    base = {"model": {"source": args.model}, "prompts": prompts, "nodes": [{"kind": k} for k in KINDS]}
    backend = af.load_backend(af.as_plan(dict(base, method={"name": "atp"})))
    model = backend.model
    compiled = {m: compile_plan(af.as_plan(dict(base, method={"name": m})), backend) for m in METHODS}
    metric = resolve_metric(compiled["atp"].plan.metric, None)
    (run,) = list(batch_runs(compiled["atp"], backend, metric))

    def bare(inputs_only: bool) -> None:
        with torch.no_grad():
            metric(backend.forward(run.noise_tokens, {}), run.metric_inputs(run.noise_tokens))
        embedded: dict[str, torch.Tensor] = {}

        def keep(mod, inp, out):
            embedded["x"] = out
            return out

        handle = model.hook_dict["blocks.0.hook_resid_pre"].register_forward_hook(keep)
        try:
            value = metric(backend.forward(run.clean_tokens, {}), run.metric_inputs(run.clean_tokens)).sum()
        finally:
            handle.remove()
        if inputs_only:
            torch.autograd.grad(value, [embedded["x"]])
        else:
            value.backward()
            model.zero_grad(set_to_none=True)

    def method(name: str):
        impl = get_method(name)
        (batch,) = list(batch_runs(compiled[name], backend, metric))
        return lambda: impl.run_batch(batch)

    cases = {"bare": lambda: bare(False), "bare_inputs": lambda: bare(True)}
    cases.update({m: method(m) for m in METHODS})
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.repeats + 1):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    info = backend.info
    print(f"model {args.model}: {info.n_layers} layers, batch of {len(prompts)} IOI pairs, "
          f"{len(run.clean_tokens[0])} tokens, nodes: {', '.join(KINDS)} at every layer and position; "
          f"medians of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'case':14s} {'seconds':>8s} {'/ bare':>7s} {'/ bare_inputs':>13s}")
    for name, t in median.items():
        print(f"{name:14s} {t:8.3f} {t / median['bare']:7.2f} {t / median['bare_inputs']:13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "median_seconds": median, "repeats": args.repeats}, f, indent=2)


if __name__ == "__main__":
    main()
