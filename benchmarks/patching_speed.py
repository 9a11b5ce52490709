"""Exact patching speed: atpframework's engine against ``transformer_lens.patching`` on the same nodes.

    python benchmarks/patching_speed.py [--layers 0,10,20,29] [--nodes-per-pass 64]

One IOI pair on the bundled SmolLM2 (TransformerLens HookedTransformer, float32, CPU); nodes: the
query, key and value of every head at every position in ``--layers``. Timed in one process:

* ``transformer_lens.patching`` (``get_act_patch_attn_head_{q,k,v}_by_pos`` restricted to those
  layers through ``index_df``): one forward per node;
* our engine with one node per pass from the embeddings (``nodes_per_pass=1, skip_layers=False``);
* our engine batched (``nodes_per_pass``) from the embeddings;
* our engine batched and starting each pass at its lowest patched layer (the default).

The effects of every variant are checked against TransformerLens's (largest difference printed).
"""

import argparse
import time

import pandas as pd
import torch

import atpframework as af

IOI = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "noise": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary", "wrong_answer": " John",
}
KINDS = {"attn_q": "q", "attn_k": "k", "attn_v": "v"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--nodes-per-pass", type=int, default=64)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    torch.set_grad_enabled(False)

    nodes = [{"kind": kind, "layers": layers} for kind in KINDS]
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI], "nodes": nodes,
            "method": {"name": "activation_patching"}}
    backend = af.load_backend(af.as_plan(plan))
    model = backend.model
    compiled = af.compile(plan, backend=backend)
    pair = compiled.pairs[0]
    clean, noise = torch.tensor([pair.clean]), torch.tensor([pair.noise])
    n_nodes = sum(b.n_nodes for b in compiled.bound)
    print(f"SmolLM2-135M, {len(pair.clean)} tokens, layers {layers}: {n_nodes} query/key/value nodes")

    def metric(logits):
        return logits[0, -1, pair.answer] - logits[0, -1, pair.wrong_answer]

    base = metric(model(clean)).item()
    started = time.perf_counter()
    from transformer_lens import patching

    _, noise_cache = model.run_with_cache(noise)
    reference = {}
    functions = {"q": patching.get_act_patch_attn_head_q_by_pos, "k": patching.get_act_patch_attn_head_k_by_pos,
                 "v": patching.get_act_patch_attn_head_v_by_pos}
    for kind, short in KINDS.items():
        heads = model.cfg.n_heads if short == "q" else model.cfg.n_key_value_heads
        index = pd.DataFrame([(l, p, h) for l in layers for p in range(len(pair.clean)) for h in range(heads)],
                             columns=["layer", "pos", "head_index"])
        # TL patches from its cache into its prompt: our noise run is its cache, our clean prompt its prompt
        reference[kind] = functions[short](model, clean, noise_cache, metric, index_axis_names=None, index_df=index) - base
    timings = {"transformer_lens.patching": time.perf_counter() - started}
    scale = max(reference[k].abs().max().item() for k in KINDS)
    print(f"  transformer_lens.patching: largest |effect| {scale:.3f}")

    variants = {
        "atpframework, 1 node per pass, from embeddings": {"nodes_per_pass": 1, "skip_layers": False},
        f"atpframework, {args.nodes_per_pass} nodes per pass, from embeddings": {"nodes_per_pass": args.nodes_per_pass, "skip_layers": False},
        f"atpframework, {args.nodes_per_pass} nodes per pass, layer skipping": {"nodes_per_pass": args.nodes_per_pass, "skip_layers": True},
    }
    for label, options in variants.items():
        started = time.perf_counter()
        result = af.run(dict(plan, method={"name": "activation_patching", **options}), backend=backend)
        timings[label] = time.perf_counter() - started
        worst = max((result[k].per_pair[0].flatten() - reference[k].flatten()).abs().max().item() for k in KINDS)
        print(f"  {label}: largest difference from transformer_lens.patching {worst:.2e}")
    tl = timings["transformer_lens.patching"]
    for label, seconds in timings.items():
        print(f"  {label:55s} {seconds:8.1f} s   speed-up over transformer_lens.patching {tl / seconds:6.1f}x")


if __name__ == "__main__":
    main()
