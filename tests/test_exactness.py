"""Exact activation patching against ``transformer_lens.patching``, and AtP against exact patching
where the metric is linear in the node. The references are independent of atpframework's engine."""

from functools import partial

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af


def _tl_patch(model, plan, fn, **kwargs):
    """Noising with TransformerLens: run the clean tokens, patch in the noise cache (TL's 'corrupted' is our clean)."""
    out = []
    for pair in plan["prompts"]:
        clean = torch.tensor([pair["clean"]])
        noise = torch.tensor([pair["noise"]])
        _, noise_cache = model.run_with_cache(noise)

        def metric(logits, pair=pair):
            return logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong_answer"]]

        with torch.no_grad():
            baseline = metric(model(clean))
        out.append(fn(model, clean, noise_cache, metric, **kwargs) - baseline)
    return torch.stack(out)


def _neuron_setter(act, index, cached):
    _, pos, neuron = index
    act[:, pos, neuron] = cached[:, pos, neuron]
    return act


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_activation_patching_equals_transformer_lens_patching(arch):
    import pandas as pd
    from transformer_lens import patching

    model = tiny_model(**ARCHITECTURES[arch])
    has_mlp = ARCHITECTURES[arch].get("d_mlp", 48) is not None
    nodes = [
        {"kind": "attn_head"}, {"kind": "resid", "layers": [0, 1]},
        {"kind": "attn_q"}, {"kind": "attn_k"}, {"kind": "attn_v"},
    ]
    if has_mlp:
        nodes.append({"kind": "mlp_neuron", "neurons": [0, 5, 17], "positions": [1, -1]})
    plan = make_plan(nodes, method={"name": "activation_patching", "nodes_per_pass": 5})
    result = af.run(plan, model=model)

    refs = {
        "attn_head": (patching.get_act_patch_attn_head_out_by_pos, "pair layer pos head"),
        "resid": (patching.get_act_patch_resid_pre, "pair layer pos"),
        "attn_q": (patching.get_act_patch_attn_head_q_by_pos, "pair layer pos head"),
        "attn_k": (patching.get_act_patch_attn_head_k_by_pos, "pair layer pos head"),
        "attn_v": (patching.get_act_patch_attn_head_v_by_pos, "pair layer pos head"),
    }
    for name, (fn, dims) in refs.items():
        ours = result[name].per_pair
        ref = _tl_patch(model, plan, fn)
        assert ours.shape == ref.shape, name
        assert result[name].dims == tuple(dims.split()), name
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0, msg=name)
        assert ref.abs().max() > 1e-3, f"{name}: reference effects vanish; the comparison would be vacuous"
    if has_mlp:
        index_df = pd.DataFrame(
            [(layer, pos, n) for layer in range(2) for pos in (1, 5) for n in (0, 5, 17)], columns=["layer", "pos", "neuron"]
        )
        ref = _tl_patch(
            model, plan, partial(patching.generic_activation_patch, patch_setter=_neuron_setter, activation_name="post", index_df=index_df)
        ).view(2, 2, 2, 3)
        torch.testing.assert_close(result["mlp_neuron"].per_pair, ref.float(), atol=1e-5, rtol=0)


LINEAR = dict(n_layers=1, normalization_type=None)
"""One layer, no normalization: the logit difference is linear in the final residual, in MLP neurons, and (attention-only) in head outputs and values."""


@pytest.mark.parametrize("attn_only", [True, False])
def test_atp_equals_patching_where_metric_is_linear_in_node(attn_only):
    overrides = dict(LINEAR, attn_only=attn_only, d_mlp=None if attn_only else 48)
    model = tiny_model(**overrides)
    nodes: list[dict] = [{"kind": "resid", "layers": [1]}]
    if attn_only:  # with an MLP after attention, head outputs and values are no longer linear in the metric
        nodes += [{"kind": "attn_head"}, {"kind": "attn_head", "name": "heads_all_pos", "positions": "all"}, {"kind": "attn_v"}]
    else:
        nodes.append({"kind": "mlp_neuron", "positions": [2, -1]})
    atp = af.run(make_plan(nodes), model=model)
    exact = af.run(make_plan(nodes, method="activation_patching"), model=model)
    for name in atp.nodes:
        assert exact[name].per_pair.abs().max() > 1e-3, name
        torch.testing.assert_close(atp[name].per_pair, exact[name].per_pair, atol=1e-5, rtol=1e-5, msg=name)


def test_atp_differs_from_patching_where_nonlinear():
    """Sanity check that the linear test above can fail: queries act through the softmax."""
    model = tiny_model(**LINEAR, attn_only=True, d_mlp=None)
    nodes = [{"kind": "attn_q"}]
    atp = af.run(make_plan(nodes), model=model)
    exact = af.run(make_plan(nodes, method="activation_patching"), model=model)
    assert (atp["attn_q"].per_pair - exact["attn_q"].per_pair).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_identical_prompts_give_exactly_zero(arch, method):
    model = tiny_model(**ARCHITECTURES[arch])
    prompts = [{"clean": [3, 1, 4, 1, 5, 9], "noise": [3, 1, 4, 1, 5, 9], "answer": 2, "wrong_answer": 6}] * 2
    nodes = [{"kind": k} for k in ("attn_head", "attn_q", "attn_k", "attn_v", "resid")]
    if ARCHITECTURES[arch].get("d_mlp", 48) is not None:
        nodes.append({"kind": "mlp_neuron"})
    result = af.run(make_plan(nodes, method=method, prompts=prompts), model=model)
    for name, ns in result.nodes.items():
        assert torch.count_nonzero(ns.per_pair) == 0, name
    assert torch.equal(result.metric_clean, result.metric_noise)
