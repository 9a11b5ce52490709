"""The fast exact-patching engine: equal to transformer_lens.patching node by node, equal to naive
one-node-per-pass patching from the embeddings for every node type on both backends, and the
blocks below a pass's start layer are really skipped."""

import pandas as pd
import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model
from test_huggingface import save_tiny
from test_sae import make_sae

import atpframework as af
from atpframework.backends.huggingface import HuggingFaceBackend
from atpframework.model.sites import Site

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 2, 4, 5, 1]])
NAIVE = {"name": "activation_patching", "nodes_per_pass": 1, "skip_layers": False}
FAST = {"name": "activation_patching", "nodes_per_pass": 7}
MIXED_NODES = [
    {"kind": "attn_head", "name": "heads"},
    {"kind": "attn_head", "name": "heads_all_pos", "positions": "all", "heads": [0, 3]},
    {"kind": "attn_q", "name": "q", "layers": [1], "positions": [-1, 2]},
    {"kind": "attn_k", "name": "k"},
    {"kind": "attn_v", "name": "v", "heads": "all"},
    {"kind": "mlp_neuron", "name": "neurons", "positions": [-1, 0]},
    {"kind": "mlp_neuron", "name": "neurons_all", "neurons": "all", "layers": "all"},
    {"kind": "resid", "name": "resid"},
]


# ------------------------------------------------------------------ against transformer_lens.patching
def _tl_reference(model, clean, noise, answer, wrong):
    """Per node, metric(clean run with the node's noise value) - metric(clean run), by transformer_lens.patching.

    TransformerLens patches *from* its ``clean_cache`` *into* ``corrupted_tokens``: our noise run is its
    cache and our clean prompt its corrupted prompt.
    """
    from transformer_lens import patching

    _, noise_cache = model.run_with_cache(noise)

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    with torch.no_grad():
        base = metric(model(clean)).item()
    out = {
        "attn_head": patching.get_act_patch_attn_head_out_by_pos(model, clean, noise_cache, metric),
        "attn_q": patching.get_act_patch_attn_head_q_by_pos(model, clean, noise_cache, metric),
        "attn_k": patching.get_act_patch_attn_head_k_by_pos(model, clean, noise_cache, metric),
        "attn_v": patching.get_act_patch_attn_head_v_by_pos(model, clean, noise_cache, metric),
        "resid": patching.get_act_patch_resid_pre(model, clean, noise_cache, metric),
    }

    def neuron_setter(act, index, noise_act):
        _, pos, neuron = index
        act[:, pos, neuron] = noise_act[:, pos, neuron]
        return act

    if not model.cfg.attn_only:  # a spread of neurons (all of them would take minutes through TL's loop)
        index = pd.DataFrame(NEURON_SAMPLE, columns=["layer", "pos", "neuron"])
        out["mlp_neuron"] = patching.generic_activation_patch(model, clean, noise_cache, metric, neuron_setter, "post", index_df=index)
    return {kind: value - base for kind, value in out.items()}


NEURON_SAMPLE = [(l, p, n) for l in range(2) for p in (0, 3, 5) for n in (0, 7, 19, 33, 47)]


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "attn_only_nonorm"])
def test_fast_engine_equals_transformer_lens_patching(arch):
    """Queries and keys are pre-rotary in TransformerLens's hook_q/hook_k: compared on learned positions."""
    model = tiny_model(**ARCHITECTURES[arch])
    kinds = ["attn_head", "attn_q", "attn_k", "attn_v", "resid"] + ([] if model.cfg.attn_only else ["mlp_neuron"])
    plan = make_plan([{"kind": k} for k in kinds], method=FAST)
    ours = af.run(plan, model=model)
    for pair_index, pair in enumerate(plan["prompts"]):
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
        reference = _tl_reference(model, clean, noise, pair["answer"], pair["wrong_answer"])
        for kind in kinds:
            a = ours[kind].per_pair[pair_index]
            if kind == "mlp_neuron":
                a = torch.stack([a[l, p, n] for l, p, n in NEURON_SAMPLE])
            b = reference[kind][: a.shape[0]]  # TL's resid_pre has no final boundary
            a = a[: b.shape[0]]
            assert a.abs().max() > 1e-3, kind
            torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=1e-5, msg=f"{arch} {kind} pair {pair_index}")


# ------------------------------------------------------------------ against naive patching, both backends
def _assert_same(fast, naive, names):
    for name in names:
        a, b = fast[name].per_pair, naive[name].per_pair
        assert b.abs().max() > 1e-3, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_layer_skipping_equals_naive_patching_transformer_lens(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    nodes = [n for n in MIXED_NODES if not model.cfg.attn_only or "neuron" not in n["kind"]]
    fast = af.run(make_plan(nodes, method=FAST), model=model)
    naive = af.run(make_plan(nodes, method=NAIVE), model=model)
    _assert_same(fast, naive, [n["name"] for n in nodes])


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox_parallel", "gemma2"])
def test_batched_layer_skipping_equals_naive_patching_hugging_face(family, tmp_path):
    path = save_tiny(tmp_path / family, family)
    backend = HuggingFaceBackend.load(str(path), dtype="float32", device="cpu", options={})
    fast = af.run(make_plan(MIXED_NODES, method=FAST, model={"source": str(path)}), backend=backend)
    naive = af.run(make_plan(MIXED_NODES, method=NAIVE, model={"source": str(path)}), backend=backend)
    _assert_same(fast, naive, [n["name"] for n in MIXED_NODES])


def test_batched_layer_skipping_equals_naive_patching_for_sae_nodes(tmp_path):
    model = tiny_model()
    saes = {"s": make_sae("jumprelu", hook_name="blocks.1.hook_resid_pre"), "t": make_sae("transcoder", hook_name="blocks.1.ln2.hook_normalized")}
    nodes = [{"kind": kind, "sae": name, "name": f"{kind}:{name}"} for name in saes for kind in ("sae_latent", "sae_error")]
    nodes.append({"kind": "attn_head", "name": "heads"})
    spec = [{"name": name} for name in saes]
    fast = af.run(make_plan(nodes, method=FAST, saes=spec), model=model, saes=saes)
    naive = af.run(make_plan(nodes, method=NAIVE, saes=spec), model=model, saes=saes)
    _assert_same(fast, naive, [n["name"] for n in nodes])


# ------------------------------------------------------------------ forward_from itself
def _backends(tmp_path):
    model = tiny_model(**ARCHITECTURES["rms_rotary_gqa_gated"])
    plan = af.as_plan(make_plan([{"kind": "resid"}]))
    yield "hooked_transformer", af.load_backend(plan, model=model)
    for family in ("gpt2", "gemma2"):
        path = save_tiny(tmp_path / family, family)
        yield family, HuggingFaceBackend.load(str(path), dtype="float32", device="cpu", options={})
        bridge = af.as_plan(make_plan([{"kind": "resid"}], model={"source": str(path), "options": {"model_class": "bridge"}}))
        yield f"{family}_bridge", af.load_backend(bridge)


def test_forward_from_each_boundary_reproduces_the_full_forward(tmp_path):
    for name, backend in _backends(tmp_path):
        n = backend.info.n_layers
        resid = {}
        hooks = {Site("resid", l): [lambda a, l=l: resid.__setitem__(l, a.detach().clone())] for l in range(n + 1)}
        with torch.no_grad():
            full = backend.forward(TOKENS, hooks)
            for layer in range(n + 1):
                seen = []
                later = {Site("resid", n): [lambda a: seen.append(a.clone())]}
                restarted = backend.forward_from(layer, resid[layer], TOKENS, later)
                torch.testing.assert_close(restarted, full, rtol=0, atol=1e-5, msg=f"{name} from layer {layer}")
                torch.testing.assert_close(seen[0], resid[n], rtol=0, atol=1e-5, msg=f"{name} final boundary")
                # not a constant shift: LayerNorm models cannot see one
                bump = torch.linspace(-1.0, 1.0, backend.info.d_model)
                bumped = backend.forward_from(layer, resid[layer], TOKENS, {Site("resid", layer): [lambda a: a + bump]})
                assert (bumped - full).abs().max() > 1e-3, f"{name}: hooks on the start boundary must act on it"


def test_layer_skipping_skips_the_blocks_below_the_start(tmp_path):
    path = save_tiny(tmp_path / "llama", "llama")
    backend = HuggingFaceBackend.load(str(path), dtype="float32", device="cpu", options={})
    calls = {0: 0, 1: 0}
    for layer in calls:
        backend.model.model.layers[layer].mlp.register_forward_hook(lambda *a, layer=layer: calls.__setitem__(layer, calls[layer] + 1))
    plan = make_plan([{"kind": "mlp_neuron", "layers": [1], "positions": [-1], "neurons": [0, 1, 2]}], method=FAST,
                     model={"source": str(path)})
    af.run(plan, backend=backend)
    assert calls == {0: 2, 1: 3}  # noise + clean passes run everything; the patched pass starts at layer 1
