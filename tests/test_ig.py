"""``atp_ig``: integrated gradients against TransformerLens brute force, completeness, the AtP limit, chunks."""

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model
from test_chunking import _assert_same, _budget_for, _pairs
from test_edges import PROMPTS, _deltas, _Flags, _metric

import atpframework as af

NODES = [{"kind": "attn_head"}, {"kind": "mlp_neuron", "positions": [-1]}, {"kind": "resid", "layers": [0, 1]}]
HOOKS = {"attn_head": "attn.hook_z", "mlp_neuron": "mlp.hook_post", "resid": "hook_resid_pre"}


def _reference(model, pair, steps: int, interpolate: str) -> dict[str, torch.Tensor]:
    """``layer pos ...`` per node kind: delta . gradient averaged over alpha = k/steps, by TransformerLens hooks."""
    clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
    with torch.no_grad():
        _, noise_cache = model.run_with_cache(noise)
        _, clean_cache = model.run_with_cache(clean)
    layers = {"attn_head": [0, 1], "mlp_neuron": [0, 1], "resid": [0, 1]}
    out = {}
    for kind, hook in HOOKS.items():
        rows = []
        for layer in layers[kind]:
            name = f"blocks.{layer}.{hook}"
            delta = noise_cache[name][0] - clean_cache[name][0]
            mean_grad = torch.zeros_like(delta)
            for k in range(steps):
                alpha = k / steps
                captured = {}

                def keep(x, hook):
                    captured["x"] = x
                    return x

                if interpolate == "embeddings":
                    embed = "blocks.0.hook_resid_pre"
                    shift = [(embed, lambda x, hook: x + alpha * (noise_cache[embed] - x))]
                    hooks = shift + [(name, keep)] if name != embed else [(embed, lambda x, hook: keep(shift[0][1](x, hook), hook))]
                else:
                    hooks = [(name, lambda x, hook: keep(x + alpha * (noise_cache[name] - clean_cache[name]), hook))]
                logits = model.run_with_hooks(clean, fwd_hooks=hooks)
                x = captured["x"]
                if not x.requires_grad:
                    x.requires_grad_(True)
                (grad,) = torch.autograd.grad(_metric(logits, pair).sum(), [x])
                mean_grad += grad[0] / steps
            prod = delta * mean_grad
            rows.append(prod if kind == "mlp_neuron" else prod.sum(-1))
        out[kind] = torch.stack(rows)
    return out


@pytest.mark.parametrize("interpolate", ["embeddings", "activations"])
def test_ig_equals_brute_force(interpolate):
    model = tiny_model()
    result = af.run(make_plan(NODES, {"name": "atp_ig", "steps": 3, "interpolate": interpolate}, prompts=PROMPTS), model=model, progress=False)
    for p, pair in enumerate(PROMPTS):
        ref = _reference(model, pair, 3, interpolate)
        torch.testing.assert_close(result["attn_head"].per_pair[p], ref["attn_head"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["mlp_neuron"].per_pair[p, :, 0], ref["mlp_neuron"][:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["resid"].per_pair[p], ref["resid"], rtol=1e-5, atol=1e-5)
    atp = af.run(make_plan(NODES, "atp", prompts=PROMPTS), model=model, progress=False)
    assert (result["attn_head"].per_pair - atp["attn_head"].per_pair).abs().max() > 1e-3  # the averaging changes something


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_step_at_the_clean_end_is_atp(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    nodes = [{"kind": "attn_head"}, {"kind": "attn_k"}, {"kind": "resid"}]
    atp = af.run(make_plan(nodes, "atp", prompts=PROMPTS), model=model, progress=False)
    for interpolate in ("embeddings", "activations"):
        ig = af.run(make_plan(nodes, {"name": "atp_ig", "steps": 1, "interpolate": interpolate}, prompts=PROMPTS), model=model, progress=False)
        for kind in ("attn_head", "attn_k", "resid"):
            torch.testing.assert_close(ig[kind].per_pair, atp[kind].per_pair, rtol=0, atol=0)
    edges = [{"kind": "edge_v"}, {"kind": "edge_logits"}]
    atp_edges = af.run(make_plan(edges, "atp", prompts=PROMPTS), model=model, progress=False)
    ig_edges = af.run(make_plan(edges, {"name": "atp_ig", "steps": 1}, prompts=PROMPTS), model=model, progress=False)
    torch.testing.assert_close(ig_edges["edge_v"].per_pair, atp_edges["edge_v"].per_pair, rtol=0, atol=0)


def test_completeness_along_the_embedding_path():
    """The embeddings' own IG scores sum to metric(noise) - metric(clean), with a Riemann error that falls with the steps."""
    model = tiny_model(**ARCHITECTURES["rms_rotary_gqa_gated"])
    errors = []
    for steps in (4, 16, 64):
        r = af.run(make_plan([{"kind": "resid", "layers": [0]}], {"name": "atp_ig", "steps": steps}, prompts=PROMPTS), model=model, progress=False)
        total = r["resid"].per_pair.sum(dim=(1, 2))
        errors.append((total - (r.metric_noise - r.metric_clean)).abs().max().item())
    scale = (r.metric_noise - r.metric_clean).abs().max().item()
    assert errors[2] < errors[1] < errors[0], errors
    assert errors[2] < 0.02 * scale, (errors, scale)
    # AtP (one step) is far from complete on this model: the check above is not vacuous
    atp = af.run(make_plan([{"kind": "resid", "layers": [0]}], "atp", prompts=PROMPTS), model=model, progress=False)
    assert (atp["resid"].per_pair.sum(dim=(1, 2)) - (atp.metric_noise - atp.metric_clean)).abs().max().item() > 5 * errors[2]


def test_edge_ig_equals_brute_force():
    model = tiny_model()
    pair = PROMPTS[0]
    steps = 3
    result = af.run(make_plan([{"kind": "edge_q", "layers": [1]}], {"name": "atp_ig", "steps": steps}, prompts=PROMPTS), model=model, progress=False)
    delta = _deltas(model, pair)  # pos writer d_model
    clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
    with torch.no_grad():
        _, noise_cache = model.run_with_cache(noise)
    embed = "blocks.0.hook_resid_pre"
    mean_grad = 0
    for k in range(steps):
        captured = {}

        def keep(x, hook):
            captured["x"] = x
            return x

        with _Flags(model):
            logits = model.run_with_hooks(
                clean, fwd_hooks=[(embed, lambda x, hook: x + k / steps * (noise_cache[embed] - x)), ("blocks.1.hook_q_input", keep)]
            )
        (grad,) = torch.autograd.grad(_metric(logits, pair).sum(), [captured["x"]])
        mean_grad = mean_grad + grad[0] / steps
    up = 1 + 5  # the embeddings and block 0's four heads and MLP
    ref = torch.einsum("pwd,phd->phw", delta[:, :up], mean_grad)
    torch.testing.assert_close(result["edge_q"].per_pair[0, 0, ..., :up], ref, rtol=1e-5, atol=1e-5)


def test_position_chunks_give_the_unchunked_ig_scores():
    model = tiny_model(n_layers=2)
    for interpolate in ("embeddings", "activations"):
        plan = make_plan(
            [{"kind": "attn_head"}, {"kind": "resid"}], {"name": "atp_ig", "steps": 3, "interpolate": interpolate},
            prompts=_pairs(3), batch_size=1,
        )
        unchunked = af.run(plan, model=model, progress=False)
        chunked_plan = {**plan, "max_memory": _budget_for(plan, model, 1, 3)}
        assert af.compile(chunked_plan, model=model).chunking.positions_per_chunk == 3
        _assert_same(af.run(chunked_plan, model=model, progress=False), unchunked, ["attn_head", "resid"], tol=1e-6)


def test_ig_cost_and_refusals():
    model = tiny_model()
    compiled = af.compile(make_plan(NODES, {"name": "atp_ig", "steps": 5}, prompts=PROMPTS), model=model)
    atp = af.compile(make_plan(NODES, "atp", prompts=PROMPTS), model=model)
    assert compiled.method.cost(compiled) == atp.method.cost(atp) + 4 * 3  # four more forward + backward passes
    text = compiled.explain()
    assert "4 x forward  ig_forward" in text and "4 x backward ig_backward" in text
    with pytest.raises(af.PlanError, match=r"method.interpolate: 'activations' .* edges"):
        af.compile(make_plan([{"kind": "edge_q"}], {"name": "atp_ig", "interpolate": "activations"}, prompts=PROMPTS), model=model)
    with pytest.raises(af.PlanError, match=r"method.steps"):
        af.compile(make_plan(NODES, {"name": "atp_ig", "steps": 0}, prompts=PROMPTS), model=model)
