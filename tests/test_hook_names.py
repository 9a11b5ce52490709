"""TransformerLens hook names as node kinds: an alias plan parses to the canonical plan and gives the
same scores; every accepted hook name is checked against a hand-written TransformerLens hook loop that
patches (or differentiates) that very hook, and ``hook_z`` against ``transformer_lens.patching``;
hook names without a node kind are refused with the reason and the table."""

import re
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.backends.tl_hook_names import HOOK_ALIASES
from atpframework.errors import PlanError
from atpframework.plans.plan import plan_json_schema

ALIASED = [
    ({"kind": "blocks.1.attn.hook_z"}, {"kind": "attn_head", "layers": [1]}),
    ({"kind": "hook_z", "name": "z", "positions": [-1]}, {"kind": "attn_head", "name": "z", "positions": [-1]}),
    ({"kind": "attn.hook_result", "name": "result", "heads": [0, 2]}, {"kind": "attn_head", "name": "result", "heads": [0, 2]}),
    ({"kind": "blocks.0.attn.hook_q", "positions": [-1, 2]}, {"kind": "attn_q", "layers": [0], "positions": [-1, 2]}),
    ({"kind": "hook_k", "layers": [1]}, {"kind": "attn_k", "layers": [1]}),
    ({"kind": "blocks.1.attn.hook_v", "layers": [1], "heads": "all"}, {"kind": "attn_v", "layers": [1], "heads": "all"}),
    ({"kind": "mlp.hook_post", "positions": [-1]}, {"kind": "mlp_neuron", "positions": [-1]}),
    ({"kind": "blocks.1.hook_resid_pre", "name": "pre"}, {"kind": "resid", "layers": [1], "name": "pre"}),
    ({"kind": "blocks.1.hook_resid_post", "name": "post"}, {"kind": "resid", "layers": [2], "name": "post"}),
    ({"kind": "hook_resid_post", "name": "posts", "layers": [0, 1]}, {"kind": "resid", "layers": [1, 2], "name": "posts"}),
]


def test_an_alias_plan_parses_to_the_canonical_plan():
    aliases, canonical = [a for a, _ in ALIASED], [c for _, c in ALIASED]
    assert af.parse_plan(make_plan(aliases)).to_json() == af.parse_plan(make_plan(canonical)).to_json()
    assert "hook_" not in af.parse_plan(make_plan(aliases)).to_json()
    given = make_plan(aliases)
    af.parse_plan(given)
    assert given["nodes"][0] == {"kind": "blocks.1.attn.hook_z"}  # the caller's dict is left alone


@pytest.mark.parametrize("method", ["activation_patching", "atp_star"])
def test_an_alias_plan_gives_the_canonical_plans_scores(method):
    model = tiny_model()
    aliased = af.run(make_plan([a for a, _ in ALIASED], method=method), model=model)
    canonical = af.run(make_plan([c for _, c in ALIASED], method=method), model=model)
    assert aliased.plan_json == canonical.plan_json
    for name in canonical.nodes:
        assert canonical[name].per_pair.abs().max() > 1e-4, name
        assert torch.equal(aliased[name].per_pair, canonical[name].per_pair), name


# ------------------------------------------------------------------ against TransformerLens's own hooks
INDEX_AXES = {"attn_head": 2, "attn_q": 2, "attn_k": 2, "attn_v": 2, "mlp_neuron": 2, "resid": 1}
"""Node kind -> how many leading axes after batch index one node (pos, then head/neuron)."""
POSITIONS = [0, 3, 5]


def _indices(kind):
    """Heads, key/value heads (two in the grouped-query model) or neurons."""
    return [0, 1] if kind in ("attn_k", "attn_v") else [0, 1, 3]


def _tokens(plan):
    clean = torch.tensor([p["clean"] for p in plan["prompts"]])
    noise = torch.tensor([p["noise"] for p in plan["prompts"]])
    answer = torch.tensor([p["answer"] for p in plan["prompts"]])
    wrong = torch.tensor([p["wrong_answer"] for p in plan["prompts"]])
    return clean, noise, lambda logits: logits[torch.arange(len(answer)), -1, answer] - logits[torch.arange(len(answer)), -1, wrong]


def _nodes(kind):
    return [(p,) for p in POSITIONS] if INDEX_AXES[kind] == 1 else [(p, i) for p in POSITIONS for i in _indices(kind)]


def _selection(kind, block):
    spec = {"kind": f"blocks.{block}.{kind}", "positions": POSITIONS}
    alias = next(a for a in HOOK_ALIASES if a.hook == kind)
    if INDEX_AXES[alias.kind] == 2:
        spec["neurons" if alias.kind == "mlp_neuron" else "heads"] = _indices(alias.kind)
    return alias.kind, spec


def _hand_patched(model, hook, plan, kind):
    """metric(clean with the node's noise value at ``hook``) - metric(clean), one TransformerLens pass per node."""
    clean, noise, metric = _tokens(plan)
    _, noise_cache = model.run_with_cache(noise, names_filter=hook)
    with torch.no_grad():
        base = metric(model(clean))
        out = []
        for node in _nodes(kind):
            index = (slice(None),) + node

            def patch(act, hook, index=index):
                act = act.clone()
                act[index] = noise_cache[hook.name][index]
                return act

            out.append(metric(model.run_with_hooks(clean, fwd_hooks=[(hook, patch)])) - base)
    return torch.stack(out, dim=1)  # pair node


def _hand_first_order(model, hook, plan, kind):
    """(noise - clean activation at ``hook``) . d metric / d activation, per node, summed over feature axes."""
    clean, noise, metric = _tokens(plan)
    _, noise_cache = model.run_with_cache(noise, names_filter=hook)
    seen = {}

    def keep(act, hook):
        act.retain_grad()
        seen["act"] = act

    metric(model.run_with_hooks(clean, fwd_hooks=[(hook, keep)])).sum().backward()
    act = seen["act"]
    terms = (noise_cache[hook] - act.detach()) * act.grad
    return torch.stack([terms[(slice(None),) + node].reshape(terms.shape[0], -1).sum(-1) for node in _nodes(kind)], dim=1)


def _ours(result, name, kind):
    """The result's scores of ``_nodes(kind)``, in that order (result axes follow the selections' order)."""
    scores = result[name].per_pair[:, 0]  # the one layer
    assert result[name].per_pair.shape[2:] == (len(POSITIONS),) + ((len(_indices(kind)),) if INDEX_AXES[kind] == 2 else ())
    at = [(POSITIONS.index(node[0]),) + ((_indices(kind).index(node[1]),) if len(node) == 2 else ()) for node in _nodes(kind)]
    return torch.stack([scores[(slice(None),) + index] for index in at], dim=1)


HOOKS_BY_MODEL = {
    "ln_gelu_learned": ["attn.hook_z", "attn.hook_result", "attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp.hook_post",
                        "hook_resid_pre", "hook_resid_post"],
    "rms_rotary_gqa_gated": ["attn.hook_z", "attn.hook_q", "attn.hook_rot_q", "attn.hook_k", "attn.hook_rot_k", "attn.hook_v",
                             "mlp.hook_post", "hook_resid_pre", "hook_resid_post"],
}
"""Every accepted hook name, on a learned-position model and on a rotary, grouped-query, gated-MLP one
(where hook_q/hook_k are before the rotation and attn_q/attn_k after it)."""


def test_every_accepted_hook_name_is_checked_against_transformer_lens():
    assert {a.hook for a in HOOK_ALIASES} == {h for hooks in HOOKS_BY_MODEL.values() for h in hooks}


@pytest.mark.parametrize("arch", sorted(HOOKS_BY_MODEL))
@pytest.mark.parametrize("block", [0, 1])
def test_alias_scores_equal_a_hand_written_loop_on_that_hook(arch, block):
    """Exact patching equals patching the named hook node by node; atp equals its first-order term there."""
    overrides = dict(ARCHITECTURES[arch], use_attn_result=True)
    model = tiny_model(**overrides)
    hooks = HOOKS_BY_MODEL[arch]
    selections = {hook: _selection(hook, block) for hook in hooks}
    nodes = [dict(spec, name=hook) for hook, (_, spec) in selections.items()]
    for method, reference in (("activation_patching", _hand_patched), ("atp", _hand_first_order)):
        plan = make_plan(nodes, method=method)
        result = af.run(plan, model=model)
        for hook, (kind, _) in selections.items():
            ours, theirs = _ours(result, hook, kind), reference(model, f"blocks.{block}.{hook}", plan, kind)
            if not (block == 1 and hook == "hook_resid_post"):  # the last block's output reaches only its own position
                assert theirs.abs().max() > 1e-3, (method, hook)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"{arch} {method} blocks.{block}.{hook}")


def test_hook_z_alias_equals_transformer_lens_patching():
    """TransformerLens patches from its clean cache into its corrupted prompt: our noise run is its cache and
    our clean prompt its corrupted one (noising), so its patched metric minus our clean metric is our effect."""
    from transformer_lens import patching

    model = tiny_model()
    plan = make_plan([{"kind": "hook_z"}], method="activation_patching")
    result = af.run(plan, model=model)
    for pair_index, pair in enumerate(plan["prompts"]):
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
        _, noise_cache = model.run_with_cache(noise)

        def metric(logits, pair=pair):
            return logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong_answer"]]

        with torch.no_grad():
            base = metric(model(clean))
        theirs = patching.get_act_patch_attn_head_out_by_pos(model, clean, noise_cache, metric) - base  # layer pos head
        ours = result["attn_head"].per_pair[pair_index]
        assert theirs.abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ refused hook names
ACCEPTED_TABLE = (
    r"TransformerLens hook names accepted as kinds \(blocks\.L\.<name> for block L, or <name> alone for every block\): "
    r"attn\.hook_z, attn\.hook_result -> attn_head; attn\.hook_q, attn\.hook_rot_q -> attn_q; attn\.hook_k, attn\.hook_rot_k -> "
    r"attn_k; attn\.hook_v -> attn_v; mlp\.hook_post -> mlp_neuron; hook_resid_pre \(boundary L\), hook_resid_post "
    r"\(boundary L\+1\) -> resid$"
)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("blocks.0.attn.hook_pattern", "an attention pattern; no node kind patches it"),
        ("hook_attn_scores", "pre-softmax attention scores; no node kind patches it"),
        ("blocks.1.mlp.hook_pre", "an MLP pre-activation; mlp_neuron reads neurons after the nonlinearity"),
        ("blocks.1.hook_attn_out", "the attention sublayer's whole write"),
        ("blocks.1.hook_resid_mid", "the residual stream between attention and MLP"),
        ("blocks.0.ln1.hook_normalized", "a normalization's output"),
        ("hook_embed", "a token embedding; resid boundary 0"),
        ("ln_final.hook_scale", "the final normalization's scale"),
        ("blocks.0.hook_resid_pre.hook_sae_acts_post", "an SAE's hook .* kind 'sae_latent'"),
        ("blocks.0.attn.hook_zz", "not a TransformerLens hook name that a node kind patches"),
        ("blocks.3", "not a TransformerLens hook name that a node kind patches"),
    ],
)
def test_a_hook_name_without_a_node_kind_is_refused_with_the_table(kind, why):
    nodes = [{"kind": "resid"}, {"kind": kind}]
    with pytest.raises(PlanError, match=rf"^nodes\[1\]\.kind: {re.escape(repr(kind))} is {why}.*; {ACCEPTED_TABLE}"):
        af.parse_plan(make_plan(nodes))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"kind": "blocks.1.attn.hook_z", "layers": [0]}, r"nodes\[0\]\.layers: \[0\] contradicts nodes\[0\]\.kind 'blocks\.1\.attn\.hook_z', which names block 1"),
        ({"kind": "blocks.1.attn.hook_z", "layers": "each"}, r"nodes\[0\]\.layers: 'each' contradicts"),
        ({"kind": "hook_resid_post"}, r"nodes\[0\]\.layers: 'hook_resid_post' without a block number needs layers as a list of blocks \(got none\)"),
        ({"kind": "hook_resid_pre", "layers": "each"}, r"nodes\[0\]\.layers: 'hook_resid_pre' without a block number needs layers as a list .*use kind 'resid'"),
        ({"kind": "hook_resid_post", "layers": [-1]}, r"nodes\[0\]\.layers: 'hook_resid_post' without a block number needs layers as a list"),
    ],
)
def test_layers_that_contradict_the_hook_name_are_refused(node, message):
    with pytest.raises(PlanError, match=f"^{message}"):
        af.parse_plan(make_plan([node]))


def test_redundant_layers_are_accepted():
    a = af.parse_plan(make_plan([{"kind": "blocks.1.hook_resid_post", "layers": [1]}]))
    assert a.nodes[0].kind == "resid" and a.nodes[0].layers == [2]


def test_the_schema_mentions_hook_names():
    """The schema says hook names are accepted and where the table is (the names themselves live in backends/)."""
    description = plan_json_schema()["properties"]["nodes"]["description"]
    assert "TransformerLens hook names" in description and "docs/nodes.md" in description
    table = (Path(__file__).parent.parent / "docs" / "nodes.md").read_text()
    assert "mlp.hook_post" in table and "hook_resid_post" in table


def test_with_query_key_norms_hook_q_is_the_same_patch_but_attn_q_is_after_the_norm():
    """The documented exception: with use_qk_norm a per-head norm lies between hook_q and hook_rot_q. Patching a
    head's query before it is still the same intervention, but first-order scores are of the normalized query
    (hook_rot_q), which is what attn_q reads."""
    model = tiny_model(**ARCHITECTURES["ln_rotary"], use_qk_norm=True)
    spec = {"kind": "blocks.1.attn.hook_q", "positions": POSITIONS, "heads": _indices("attn_q")}
    exact = make_plan([spec], method="activation_patching")
    torch.testing.assert_close(_ours(af.run(exact, model=model), "attn_q", "attn_q"),
                               _hand_patched(model, "blocks.1.attn.hook_q", exact, "attn_q"), rtol=1e-4, atol=1e-5)
    first_order = make_plan([spec], method="atp")
    ours = _ours(af.run(first_order, model=model), "attn_q", "attn_q")
    torch.testing.assert_close(ours, _hand_first_order(model, "blocks.1.attn.hook_rot_q", first_order, "attn_q"), rtol=1e-4, atol=1e-5)
    assert (ours - _hand_first_order(model, "blocks.1.attn.hook_q", first_order, "attn_q")).abs().max() > 1e-3
