"""A small verified result with hand-set token strings (some with markup in them), shared by the report tests."""

import functools

import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.analysis.verify import Diagnosis, verify

NODES = [
    {"kind": "attn_head"},                                        # pair layer pos head: a heatmap per position
    {"kind": "attn_head", "name": "heads_last", "positions": [-1]},
    {"kind": "resid"},                                            # pair layer pos: the layer x position grid
    {"kind": "mlp_neuron", "positions": [-1]},
]
MODEL = dict(n_layers=4, n_heads=8, d_head=4)
"""A tiny model with enough heads and layers that a heatmap has many cells (32 per grid)."""
HOSTILE = {9: "</script><script>window.__pwned = 1</script>", 11: " <!-- & \"quoted\" <b>bold</b>"}
"""Token strings that would break out of a script tag or inject markup if the page did not escape them."""


def decode(ids):
    return [HOSTILE.get(i, f" w{i}") for i in ids]


@functools.lru_cache(maxsize=None)
def report_inputs():
    """(result verified on its top 20 nodes, the exact activation-patching result of the same plan, a diagnosis)."""
    model = tiny_model(**MODEL)
    result = af.run(make_plan(NODES, method="atp"), model=model).with_token_strings(decode)
    verified = verify(result, budget=20, model=model)
    exact = af.run(make_plan(NODES, method="activation_patching"), model=model)
    n_nodes = verified.numbering.n_nodes
    diagnosis = Diagnosis(20, n_nodes - 20, 0.5, {0.9: [(50, 0.4), (400, 0.2)], 0.99: [(50, 0.6), (400, float("inf"))]},
                          {0.9: 25, 0.99: 30}, torch.tensor([1.5, 0.7]), 120.0)
    return verified, exact, diagnosis
