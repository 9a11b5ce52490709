"""Engine behaviour: gradients at every site against finite differences, pass counts, hook hygiene,
and the TransformerBridge path against HookedTransformer on the same weights."""

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.model.sites import Site

ALL_KINDS = ("attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated"])
def test_atp_scores_equal_finite_difference_directional_derivatives(arch):
    """AtP = delta . grad; a central difference of the metric along delta checks the gradient at every site."""
    model = tiny_model(**ARCHITECTURES[arch], dtype=torch.float64)
    plan = make_plan([{"kind": k, "positions": [1, -1]} for k in ALL_KINDS], prompts=make_plan([])["prompts"][:1])
    result = af.run(plan, model=model)
    compiled = af.compile(plan, model=model)
    backend = af.load_backend(compiled.plan, model=model)
    pair = compiled.pairs[0]
    clean, noise = torch.tensor([pair.clean]), torch.tensor([pair.noise])
    noise_acts = {}

    def capture(site):
        return lambda act: noise_acts.__setitem__(site, act.detach().clone())

    with torch.no_grad():
        backend.forward(noise, {s: [capture(s)] for s in compiled.sites})

    def metric_along(bound, flat, t):
        layers, mask = bound.patch_mask(flat)
        hooks = {}
        for layer in layers:
            site = Site(bound.node.site, layer)

            def hook(act, site=site):
                m = mask.reshape(mask.shape + (1,) * (act.dim() - 1 - mask.dim()))
                return act + t * torch.where(m, noise_acts[site] - act, torch.zeros_like(act))

            hooks[site] = [hook]
        with torch.no_grad():
            logits = backend.forward(clean, hooks)
        return float(logits[0, -1, pair.answer] - logits[0, -1, pair.wrong_answer])

    eps = 1e-5
    for bound in compiled.bound:
        atp = result[bound.name].per_pair[0].flatten()
        for flat in range(bound.n_nodes):
            fd = (metric_along(bound, flat, eps) - metric_along(bound, flat, -eps)) / (2 * eps)
            assert abs(fd - float(atp[flat])) <= 1e-5 * max(1.0, abs(fd)), (bound.name, flat, fd, float(atp[flat]))
        assert atp.abs().max() > 1e-3, bound.name


def test_atp_runs_two_forwards_and_one_backward_per_batch(monkeypatch):
    model = tiny_model()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    backwards = []
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

    def counting_backward(*args, **kwargs):
        backwards.append(1)
        return real_backward(*args, **kwargs)

    def counting_grad(*args, **kwargs):
        backwards.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: counting_backward(self, *a, **k))
    plan = make_plan([{"kind": k} for k in ALL_KINDS], batch_size=1)  # 2 pairs -> 2 batches
    af.run(plan, model=model)
    assert (len(forwards), len(backwards)) == (4, 2)


def test_only_the_plan_sites_are_hooked():
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head", "layers": [1]}])
    backend = af.load_backend(af.as_plan(plan), model=model)
    seen = []
    real = backend.forward
    backend.forward = lambda tokens, hooks: (seen.append(set(hooks)), real(tokens, hooks))[1]
    af.run(plan, backend=backend)
    assert seen == [{Site("attn_z", 1)}, {Site("attn_z", 1)}]


def _hook_counts(model):
    return {name: (len(hp._forward_hooks), len(hp._backward_hooks)) for name, hp in model.hook_dict.items()}


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
def test_hooks_are_removed_after_success_and_after_an_exception(method):
    model = tiny_model()
    calls = []
    state = {"raise": False}

    def user_hook(act, hook):
        calls.append(hook.name)
        if state["raise"]:
            raise RuntimeError("boom inside the forward pass")

    model.add_hook("blocks.1.attn.hook_z", user_hook)
    before = _hook_counts(model)
    plan = make_plan([{"kind": k} for k in ALL_KINDS], method=method)
    af.run(plan, model=model)
    assert _hook_counts(model) == before
    state["raise"] = True
    with pytest.raises(RuntimeError, match="boom"):
        af.run(plan, model=model)
    assert _hook_counts(model) == before
    state["raise"] = False
    calls.clear()
    model(torch.tensor([[1, 2, 3]]))
    assert calls == ["blocks.1.attn.hook_z"], "the user's own hook must survive"


def test_gradient_that_never_arrives_is_an_error():
    """A user hook that replaces the activation after ours cuts our gradient: say so instead of returning zeros."""
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head", "layers": [0]}])
    backend = af.load_backend(af.as_plan(plan), model=model)
    real = backend.forward

    def forward(tokens, hooks):
        return real(tokens, {s: fns + [lambda act: act.detach().clone()] for s, fns in hooks.items()})

    backend.forward = forward
    with pytest.raises(af.BackendError, match=r"no gradient arrived at site\(s\) attn_z\[layer=0\]"):
        af.run(plan, backend=backend)


def test_bridge_matches_hooked_transformer_on_the_same_weights(tmp_path):
    """A tiny Llama (GQA, RoPE, RMSNorm, gated MLP) saved as an HF directory, loaded both ways."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from atpframework.backends.transformer_lens import TransformerLensBackend

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0) if p.dim() >= 2 else None
    hf.save_pretrained(tmp_path)
    backends = {
        cls: TransformerLensBackend.load(str(tmp_path), dtype="float32", device="cpu", options={"model_class": cls})
        for cls in ("hooked_transformer", "bridge")
    }
    assert backends["bridge"].is_bridge and not backends["hooked_transformer"].is_bridge
    for method in ("atp", "activation_patching"):
        plan = make_plan([{"kind": k} for k in ALL_KINDS], method=method)
        results = {cls: af.run(plan, backend=b) for cls, b in backends.items()}
        for name in results["bridge"].nodes:
            a, b = results["bridge"][name].per_pair, results["hooked_transformer"][name].per_pair
            assert b.abs().max() > 1e-3, (method, name)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{method} {name}")


def test_atp_with_frozen_weights_equals_atp_with_trainable_weights():
    """Users often freeze parameters; gradients at the sites must still arrive and be the same."""
    plan = make_plan([{"kind": k} for k in ALL_KINDS])
    trainable = af.run(plan, model=tiny_model())
    frozen_model = tiny_model()
    frozen_model.requires_grad_(False)
    frozen = af.run(plan, model=frozen_model)
    for name in trainable.nodes:
        torch.testing.assert_close(frozen[name].per_pair, trainable[name].per_pair, msg=name)
