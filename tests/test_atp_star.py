"""AtP*, QK fix and GradDrop against brute-force references built from TransformerLens alone.

The reference below never touches the engine: it patches queries/keys with real forward passes to get
the patched pattern ``A'``, takes ``dMetric/dA`` from TransformerLens's ``hook_pattern``, and implements
each GradDrop term literally, by detaching the dropped write (``hook_attn_out`` / ``hook_mlp_out``) and
running a separate backward pass.
"""

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.engine.runner import batch_runs, compile_plan
from atpframework.methods.atp import AtpGradDrop, AtpStar
from atpframework.plans.metrics import resolve_metric

KINDS = ["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid"]
PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]


def _hook(model, kind: str, layer: int) -> str:
    n = model.cfg.n_layers
    if kind == "resid":
        return f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"
    rot = "rot_" if model.cfg.positional_embedding_type == "rotary" else ""
    name = {"attn_head": "attn.hook_z", "attn_q": f"attn.hook_{rot}q", "attn_k": f"attn.hook_{rot}k",
            "attn_v": "attn.hook_v", "mlp_neuron": "mlp.hook_post"}[kind]
    return f"blocks.{layer}.{name}"


def _layers(model, kind: str) -> range:
    return range(model.cfg.n_layers + 1) if kind == "resid" else range(model.cfg.n_layers)


def _drop_terms(model, granularity: str) -> list[list[str]]:
    """Per term, the write hooks to detach."""
    terms = []
    for layer in range(model.cfg.n_layers):
        writes = [f"blocks.{layer}.hook_attn_out"] + ([] if model.cfg.attn_only else [f"blocks.{layer}.hook_mlp_out"])
        terms.extend([writes] if granularity == "block" else [[w] for w in writes])
    return terms


def _patched_patterns(model, clean, noise_cache, kind, layer):
    """For every query (or key) entry of ``layer``, the layer's pattern with that entry patched, by real forwards."""
    name = _hook(model, kind, layer)
    noise = noise_cache[name]
    out = {}
    for pos in range(noise.shape[1]):
        for head in range(noise.shape[2]):
            seen = {}

            def patch(x, hook, pos=pos, head=head):
                x = x.clone()
                x[:, pos, head] = noise[:, pos, head]
                return x

            def keep(x, hook):
                seen["pattern"] = x.detach()

            with torch.no_grad():
                model.run_with_hooks(clean, fwd_hooks=[(name, patch), (f"blocks.{layer}.attn.hook_pattern", keep)])
            out[pos, head] = seen["pattern"][0]
    return out


def reference_scores(model, kinds, method: str, granularity: str = "block", prompts=PROMPTS):
    """Per-pair scores of ``atp`` / ``atp_qkfix`` / ``atp_graddrop`` / ``atp_star``, brute force."""
    qk_fix = method in ("atp_qkfix", "atp_star")
    graddrop = method in ("atp_graddrop", "atp_star")
    terms = _drop_terms(model, granularity) if graddrop else [[]]
    out = {}
    for p, pair in enumerate(prompts):
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
        with torch.no_grad():
            _, noise_cache = model.run_with_cache(noise)
            _, clean_cache = model.run_with_cache(clean)
        patched = {
            (kind, layer): _patched_patterns(model, clean, noise_cache, kind, layer)
            for kind in kinds if qk_fix and kind in ("attn_q", "attn_k") for layer in _layers(model, kind)
        }
        per_term = {kind: [] for kind in kinds}
        for detached in terms:
            captured = {}

            def keep(x, hook):
                captured[hook.name] = x
                return x

            names = {_hook(model, k, l) for k in kinds for l in _layers(model, k)}
            names |= {f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)}
            hooks = [(w, lambda x, hook: x.detach()) for w in detached] + [(n, keep) for n in sorted(names)]
            logits = model.run_with_hooks(clean, fwd_hooks=hooks)
            metric = logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong_answer"]]
            keys = sorted(captured)
            grads = torch.autograd.grad(metric, [captured[k] for k in keys], allow_unused=True)
            grad = {k: (g if g is not None else torch.zeros_like(captured[k])) for k, g in zip(keys, grads)}
            for kind in kinds:
                rows = []
                for layer in _layers(model, kind):
                    name = _hook(model, kind, layer)
                    if qk_fix and kind in ("attn_q", "attn_k"):
                        pattern = f"blocks.{layer}.attn.hook_pattern"
                        a, g = clean_cache[pattern][0], grad[pattern][0]
                        shape = noise_cache[name].shape[1:3]
                        est = torch.zeros(shape)
                        for (pos, head), a_patched in patched[kind, layer].items():
                            est[pos, head] = ((a_patched - a) * g).sum()
                    else:
                        delta = noise_cache[name][0] - clean_cache[name][0]
                        prod = delta * grad[name][0]
                        est = prod if kind == "mlp_neuron" else prod.sum(-1)
                    rows.append(est)
                per_term[kind].append(torch.stack(rows))
        for kind in kinds:
            stacked = torch.stack(per_term[kind])  # term layer ...
            score = stacked.abs().sum(0) / (len(terms) - 1) if graddrop else stacked[0]
            out.setdefault(kind, []).append(score)
    return {kind: torch.stack(v) for kind, v in out.items()}


def _assert_close(ours, ref, what):
    scale = ref.abs().max().item()
    assert scale > 1e-3, f"{what}: reference is ~0, the comparison would prove nothing"
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"{what}: max abs diff {err:.3g} (reference scale {scale:.3g})"


ARCHS_3_LAYERS = {**ARCHITECTURES, "parallel_rotary": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=8)}


@pytest.mark.parametrize("arch", sorted(ARCHS_3_LAYERS))
@pytest.mark.parametrize("method", ["atp_qkfix", "atp_graddrop", "atp_star"])
def test_methods_equal_brute_force_reference(arch, method):
    model = tiny_model(n_layers=3, **ARCHS_3_LAYERS[arch])
    kinds = [k for k in KINDS if not (k == "mlp_neuron" and model.cfg.attn_only)]
    result = af.run(make_plan([{"kind": k} for k in kinds], method=method), model=model)
    ref = reference_scores(model, kinds, method)
    for kind in kinds:
        _assert_close(result[kind].per_pair, ref[kind], f"{arch} {method} {kind}")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "parallel_rotary", "attn_only_nonorm"])
def test_sublayer_granularity_equals_brute_force_reference(arch):
    model = tiny_model(n_layers=3, **ARCHS_3_LAYERS[arch])
    kinds = [k for k in KINDS if not (k == "mlp_neuron" and model.cfg.attn_only)]
    method = {"name": "atp_star", "granularity": "sublayer"}
    result = af.run(make_plan([{"kind": k} for k in kinds], method=method), model=model)
    ref = reference_scores(model, kinds, "atp_star", granularity="sublayer")
    for kind in kinds:
        _assert_close(result[kind].per_pair, ref[kind], f"{arch} sublayer {kind}")


def _terms(model, nodes, method):
    plan = af.as_plan(make_plan(nodes, method=method))
    backend = af.load_backend(plan, model=model)
    compiled = compile_plan(plan, backend)
    impl = {"atp_graddrop": AtpGradDrop, "atp_star": AtpStar}[plan.method.name](keep_terms=True)
    (run,) = list(batch_runs(compiled, backend, resolve_metric(plan.metric, None)))
    return impl.layout(compiled).terms, impl.run_batch(run)


def test_graddrop_identities():
    """Own-layer term exactly zero; earlier-layer terms equal plain AtP; a direct-only node scores |AtP|."""
    model = tiny_model(n_layers=3)
    nodes = [{"kind": k} for k in ("attn_head", "attn_q", "mlp_neuron")]
    terms, out = _terms(model, nodes, "atp_star")
    atp = af.run(make_plan(nodes, method="atp"), model=model)
    qkfix = af.run(make_plan(nodes, method="atp_qkfix"), model=model)
    for name in ("attn_head", "attn_q", "mlp_neuron"):
        per_term = out.terms[name]  # term batch layer ...
        plain = (qkfix if name == "attn_q" else atp)[name].per_pair
        for t, term in enumerate(terms):
            for layer in range(3):
                if term.layer == layer:
                    assert torch.equal(per_term[t, :, layer], torch.zeros_like(per_term[t, :, layer])), (name, term.label)
                elif term.layer < layer:
                    torch.testing.assert_close(per_term[t, :, layer], plain[:, layer], rtol=1e-6, atol=1e-7)
        # the last layer has only direct effects: GradDrop score == |plain estimate|
        torch.testing.assert_close(out.scores[name][:, 2], plain[:, 2].abs(), rtol=1e-6, atol=1e-7)
        assert plain[:, 2].abs().max() > 1e-3


def test_graddrop_needs_two_terms():
    model = tiny_model(n_layers=1)
    with pytest.raises(af.PlanError, match=r"method.granularity: atp_graddrop needs at least two .*'sublayer'"):
        af.compile(make_plan([{"kind": "attn_head"}], method="atp_graddrop"), model=model)
    # sublayer granularity has two writes in one block
    af.compile(make_plan([{"kind": "attn_head"}], method={"name": "atp_graddrop", "granularity": "sublayer"}), model=model)


def test_graddrop_restarts_only_where_nodes_are_reached():
    model = tiny_model(n_layers=4)
    compiled = af.compile(make_plan([{"kind": "attn_head", "layers": [2, 3]}], method="atp_graddrop"), model=model)
    text = compiled.explain()
    # block 3's restart reaches the layer-2 heads; blocks 0-2 reach no node
    assert "1 x partial_backward graddrop_backward" in text and "(4 terms, 1 restarted)" in text


def test_multi_layer_nodes_take_magnitudes_after_summing_layers():
    """``layers: all`` patches every layer jointly: per term, the signed layer contributions are summed first."""
    model = tiny_model(n_layers=3)
    joint = af.run(make_plan([{"kind": "attn_head", "layers": "all", "positions": "all"}], method="atp_graddrop"), model=model)
    _, out = _terms(model, [{"kind": "attn_head", "positions": "all"}], "atp_graddrop")
    per_layer_terms = out.terms["attn_head"]  # term batch layer pos head
    expected = per_layer_terms.sum(dim=2).abs().sum(0) / 2
    torch.testing.assert_close(joint["attn_head"].per_pair[:, 0], expected, rtol=1e-5, atol=1e-6)


def cancelling_model():
    """Two layers, hand-set: head L0H0 writes ``d`` (+2 clean, -2 noise) to a residual direction that the
    answer logit reads (direct effect +1 per unit) and that the layer-1 MLP reads through a ReLU and writes
    back negated (indirect effect -1 per unit while the ReLU is on). At the clean run the two cancel exactly,
    so plain AtP of the head is 0; patching it flips the ReLU off and moves the metric by -2."""
    model = tiny_model(n_layers=2, n_heads=1, d_head=4, d_model=8, d_mlp=4, act_fn="relu", normalization_type=None)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:5] = torch.eye(8)[:5]
        attn = model.blocks[0].attn  # W_Q = 0: uniform attention over [bos, x]
        attn.W_V[0, 1, 0] = 4.0  # clean token 1
        attn.W_V[0, 2, 0] = -4.0  # noise token 2
        attn.W_O[0, 0, 5] = 1.0  # writes d to direction 5
        mlp = model.blocks[1].mlp
        mlp.W_in[5, 0] = 1.0
        mlp.W_out[0, 5] = -1.0
        model.unembed.W_U[5, 3] = 1.0
    return model


def test_cancellation_fixture_graddrop_ranks_the_cancelled_node_first():
    model = cancelling_model()
    plan = dict(prompts=[{"clean": [0, 1], "noise": [0, 2], "answer": 3, "wrong_answer": 4}],
                nodes=[{"kind": "attn_head"}, {"kind": "mlp_neuron"}])
    exact = af.run(make_plan(method="activation_patching", **plan), model=model)
    plain = af.run(make_plan(method="atp", **plan), model=model)
    dropped = af.run(make_plan(method="atp_graddrop", **plan), model=model)
    head = (0, 0, 1, 0)  # pair, layer 0, position 1, head 0
    assert exact["attn_head"].per_pair[head].item() == pytest.approx(-2.0, abs=1e-5)
    assert abs(plain["attn_head"].per_pair[head].item()) < 1e-6
    top = dropped.top_k(1)[0]
    assert (top.name, top.coords) == ("attn_head", {"layer": 0, "pos": 1, "head": 0}), dropped.top_k(3)
    assert top.score == pytest.approx(4.0, abs=1e-5)  # (|own layer| 0 + |layer 1 dropped| 4) / (2 - 1)
    # plain AtP ranks the MLP neuron (effect +2) first and the head nowhere near it
    assert plain.top_k(1)[0].name == "mlp_neuron"


def test_graddrop_results_say_what_their_scores_mean(tmp_path):
    model = tiny_model(n_layers=2)
    result = af.run(make_plan([{"kind": "attn_head"}], method="atp_star"), model=model, output=tmp_path / "r.safetensors")
    loaded = af.load_result(tmp_path / "r.safetensors")
    assert loaded.sign_convention.startswith("score = 1/(T-1) * sum over the T dropped residual-stream writes")
    assert (loaded["attn_head"].per_pair >= 0).all()
    torch.testing.assert_close(loaded["attn_head"].per_pair, result["attn_head"].per_pair)
    signed = af.run(make_plan([{"kind": "attn_head"}], method="atp_qkfix"), model=model)
    assert signed.sign_convention.startswith("effect = metric(clean run with node <- its noise-run value)")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "parallel_rotary"])
def test_frozen_weights_give_the_same_scores(arch):
    """Models with requires_grad=False everywhere (a common inference setup) restart GradDrop from leaf sites."""
    nodes = [{"kind": k} for k in ("attn_q", "attn_k", "mlp_neuron")]
    method = {"name": "atp_star", "granularity": "sublayer"}
    trainable = af.run(make_plan(nodes, method=method), model=tiny_model(n_layers=3, **ARCHS_3_LAYERS[arch]))
    frozen_model = tiny_model(n_layers=3, **ARCHS_3_LAYERS[arch]).requires_grad_(False)
    frozen = af.run(make_plan(nodes, method=method), model=frozen_model)
    for name in ("attn_q", "attn_k", "mlp_neuron"):
        torch.testing.assert_close(frozen[name].per_pair, trainable[name].per_pair, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "parallel_rotary"])
@pytest.mark.parametrize("method", ["atp_graddrop", "atp_star"])
def test_graddrop_stores_the_signed_plain_estimate(arch, method):
    """GradDrop scores are magnitudes; ``extras['<name>.signed']`` keeps the direction: it equals the brute-force
    AtP (``atp_graddrop``) or QK-fix (``atp_star``) estimate, per pair and node, signs included."""
    model = tiny_model(n_layers=3, **ARCHS_3_LAYERS[arch])
    kinds = ["attn_head", "attn_q", "attn_k", "mlp_neuron", "resid"]
    result = af.run(make_plan([{"kind": k} for k in kinds], method=method), model=model)
    ref = reference_scores(model, kinds, "atp_qkfix" if method == "atp_star" else "atp")
    for kind in kinds:
        signed = result.extras[f"{kind}.signed"]
        _assert_close(signed, ref[kind], f"{arch} {method} {kind} signed")
        assert (signed < 0).any() and (result[kind].per_pair >= 0).all()
    df = result.to_dataframe()
    heads = df[df.name == "attn_head"]
    torch.testing.assert_close(torch.tensor(heads.signed_estimate.to_numpy()), ref["attn_head"].mean(0).flatten().double(),
                               rtol=1e-5, atol=1e-6)
