"""Metrics against hand-written formulas on brute-force patched runs, custom metrics, and model sources."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_plan, tiny_model

import atpframework as af


def _by_hand(name, logits, tokens, answer, wrong):
    final = logits[0, -1]
    if name == "logit_diff":
        return final[answer] - final[wrong]
    if name == "logprob":
        return F.log_softmax(final, -1)[answer]
    if name == "prob":
        return F.softmax(final, -1)[answer]
    return F.cross_entropy(logits[0, :-1], tokens[0, 1:])


@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "prob", "cross_entropy"])
def test_patching_effects_match_hand_computed_metric(metric):
    model = tiny_model()
    plan = make_plan([{"kind": "resid", "layers": [1], "positions": [2, -1]}], method="activation_patching", metric=metric)
    result = af.run(plan, model=model)
    for p, pair in enumerate(plan["prompts"]):
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
        _, noise_cache = model.run_with_cache(noise)
        with torch.no_grad():
            base = _by_hand(metric, model(clean), clean, pair["answer"], pair["wrong_answer"])
            assert float(result.metric_clean[p]) == pytest.approx(float(base), abs=1e-5)
            for j, pos in enumerate((2, 5)):
                def patch(act, hook, pos=pos):
                    act[:, pos] = noise_cache["blocks.1.hook_resid_pre"][:, pos]
                    return act

                patched = model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])
                expected = _by_hand(metric, patched, clean, pair["answer"], pair["wrong_answer"]) - base
                assert float(result["resid"].per_pair[p, 0, j]) == pytest.approx(float(expected), abs=1e-5)


def test_custom_metric_through_the_python_api():
    model = tiny_model()
    nodes = [{"kind": "attn_head"}]

    def doubled_logit_diff(logits, inputs):
        final = logits[:, inputs.position]
        return 2 * (final.gather(1, inputs.answer[:, None]) - final.gather(1, inputs.wrong_answer[:, None]))[:, 0]

    custom = af.run(make_plan(nodes, metric="custom"), model=model, metric=doubled_logit_diff)
    builtin = af.run(make_plan(nodes), model=model)
    torch.testing.assert_close(custom["attn_head"].per_pair, 2 * builtin["attn_head"].per_pair)
    with pytest.raises(af.PlanError, match="metric.name: 'custom' needs a metric callable"):
        af.run(make_plan(nodes, metric="custom"), model=model)


def test_hooked_sae_transformer_is_served():
    sae_lens = pytest.importorskip("sae_lens")
    from conftest import tiny_config

    model = sae_lens.HookedSAETransformer(tiny_config()).eval()
    ref = tiny_model()
    model.load_state_dict(ref.state_dict())
    nodes = [{"kind": "attn_head"}, {"kind": "mlp_neuron", "positions": [-1]}]
    a = af.run(make_plan(nodes), model=model)
    b = af.run(make_plan(nodes), model=ref)
    for name in a.nodes:
        torch.testing.assert_close(a[name].per_pair, b[name].per_pair)


def test_unreachable_hub_name_is_a_clear_backend_error():
    plan = make_plan([{"kind": "attn_head"}])
    plan["model"] = {"source": "no-such-org/no-such-model"}
    with pytest.raises(af.BackendError, match="could not load 'no-such-org/no-such-model' from the model hub"):
        af.run(plan)
