"""The capture/patch/gradient primitive (``Intervention``) against TransformerLens's own hooks.

References are computed with ``HookedTransformer.run_with_hooks`` / plain autograd on the model,
never through atpframework's hooks.
"""

import pytest
import torch
from conftest import tiny_model

from atpframework import Intervention, Site
from atpframework.backends.transformer_lens import TransformerLensBackend

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 6, 2]])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def backend(model):
    return TransformerLensBackend.from_model(model)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_capture_returns_the_activations_transformer_lens_caches(model, backend):
    _, cache = model.run_with_cache(TOKENS)
    run = Intervention()
    acts = run.capture([Site("resid", 1), Site("attn_z", 0)])
    positions = torch.tensor([1, 4])
    some = run.capture([Site("mlp_post", 1)], positions=positions)
    run.run(backend, TOKENS)
    torch.testing.assert_close(acts[Site("resid", 1)], cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(acts[Site("attn_z", 0)], cache["blocks.0.attn.hook_z"], rtol=0, atol=0)
    torch.testing.assert_close(some[Site("mlp_post", 1)], cache["blocks.1.mlp.hook_post"][:, positions], rtol=0, atol=0)
    assert not acts[Site("resid", 1)].requires_grad  # detached


def test_patch_equals_the_same_edit_through_transformer_lens_hooks(model, backend):
    def scale(act):
        out = act.clone()
        out[:, 2] *= -3.0
        return out

    expected = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: scale(act))])
    run = Intervention()
    run.patch(Site("resid", 1), scale)
    seen = run.capture([Site("resid", 1)])
    logits = run.run(backend, TOKENS)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, model(TOKENS))  # the patch changed something
    _, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(seen[Site("resid", 1)], scale(cache["blocks.1.hook_resid_pre"]))  # captures see the patch


def test_received_gradients_equal_autograd_on_the_model(model, backend):
    stored = {}

    def keep(act, hook):
        act.retain_grad()
        stored[hook.name] = act

    logits = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", keep), ("blocks.1.hook_resid_pre", keep)])
    logits[:, -1, 3].sum().backward()
    model.zero_grad(set_to_none=True)

    received = {}
    run = Intervention()
    for site in (Site("attn_z", 0), Site("resid", 1)):
        run.receive_gradient(site, lambda grad, site=site: received.__setitem__(site, grad))
    with torch.enable_grad():
        out = run.run(backend, TOKENS)
        torch.autograd.grad(out[:, -1, 3].sum(), list(run.captured.values()))
    torch.testing.assert_close(received[Site("attn_z", 0)], stored["blocks.0.attn.hook_z"].grad)
    torch.testing.assert_close(received[Site("resid", 1)], stored["blocks.1.hook_resid_pre"].grad)


def test_frozen_weights_still_deliver_gradients_through_leaves():
    model = tiny_model()
    backend = TransformerLensBackend.from_model(model)
    reference = {}
    run = Intervention()
    run.receive_gradient(Site("resid", 1), lambda grad: reference.__setitem__("g", grad))
    with torch.enable_grad():
        out = run.run(backend, TOKENS)
        torch.autograd.grad(out[:, -1, 3].sum(), list(run.captured.values()))
    assert run.leaves == []  # trainable weights: the activation is already in the graph

    for p in model.parameters():
        p.requires_grad_(False)
    frozen = {}
    run = Intervention()
    run.receive_gradient(Site("resid", 1), lambda grad: frozen.__setitem__("g", grad))
    with torch.enable_grad():
        out = run.run(backend, TOKENS)
        torch.autograd.grad(out[:, -1, 3].sum(), [*run.captured.values()])
    assert len(run.leaves) == 1 and run.leaves[0] is run.captured[Site("resid", 1)]
    torch.testing.assert_close(frozen["g"], reference["g"])


def test_no_hook_survives_a_pass_or_an_error_inside_it(model, backend):
    before = _hook_count(model)
    run = Intervention()
    run.capture([Site("resid", 0), Site("attn_z", 1)])
    run.receive_gradient(Site("mlp_post", 0), lambda grad: None)
    run.run(backend, TOKENS)
    assert _hook_count(model) == before

    def fail(act):
        raise RuntimeError("boom")

    broken = Intervention()
    broken.capture([Site("resid", 0)])
    broken.patch(Site("attn_z", 1), fail)
    with pytest.raises(RuntimeError, match="boom"):
        broken.run(backend, TOKENS)
    assert _hook_count(model) == before
    torch.testing.assert_close(model(TOKENS), model(TOKENS))  # and the model runs plainly again


def test_run_from_a_cached_residual_stream_equals_the_full_pass(model, backend):
    full = Intervention()
    resid = full.capture([Site("resid", 1)])
    logits = full.run(backend, TOKENS)
    later = Intervention()
    torch.testing.assert_close(later.run_from(backend, 1, resid[Site("resid", 1)], TOKENS), logits, rtol=1e-5, atol=1e-5)
