"""The QK fix: recomputed patterns equal the model's, closed forms equal brute force, exact where
everything after the pattern is linear, and the saturation case plain AtP gets wrong."""

import warnings

import pytest
import torch
from conftest import D_VOCAB, make_plan, tiny_model

import atpframework as af
from atpframework.maths import attention
from atpframework.maths.attention import (
    clean_attention,
    joint_key_delta_z,
    joint_key_effects,
    key_effects,
    key_patch,
    query_delta_z,
)
from atpframework.model.sites import Site

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]])

HT_LAYOUTS = {
    "learned": dict(),
    "rotary_gqa": dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2, normalization_type="RMS"),
    "rotary_partial": dict(positional_embedding_type="rotary", rotary_dim=4),
    "softcap": dict(attn_scores_soft_cap=2.0),
    "local_window": dict(attn_types=["local", "global"], window_size=3, use_local_attn=True),
    "alibi": dict(positional_embedding_type="alibi"),
    "inverse_layer_scale": dict(scale_attn_by_inverse_layer_idx=True),
    "no_attn_scale": dict(use_attn_scale=False),
}


def _patterns_and_recomputed(backend, model):
    """The model's own patterns (hook_pattern) and ours from the captured canonical q and k, per layer."""
    n = backend.info.n_layers
    acts, patterns = {}, {}
    handles = [
        model.hook_dict[f"blocks.{l}.attn.hook_pattern"].register_forward_hook(
            lambda mod, i, out, l=l: patterns.__setitem__(l, out.detach())
        )
        for l in range(n)
    ]
    try:
        hooks = {Site(name, l): [lambda a, key=(name, l): acts.__setitem__(key, a.detach())] for l in range(n) for name in ("attn_q", "attn_k")}
        with torch.no_grad():
            backend.forward(TOKENS, hooks)
            ours = {l: torch.softmax(backend.attention_logits(l, acts["attn_q", l], acts["attn_k", l]), -1) for l in range(n)}
    finally:
        for h in handles:
            h.remove()
    return patterns, ours


@pytest.mark.parametrize("layout", sorted(HT_LAYOUTS))
def test_recomputed_pattern_equals_hooked_transformer_pattern(layout):
    model = tiny_model(**HT_LAYOUTS[layout])
    backend = af.load_backend(af.as_plan(make_plan([{"kind": "attn_q"}])), model=model)
    assert backend.attention_unsupported(0) is None
    theirs, ours = _patterns_and_recomputed(backend, model)
    for layer in theirs:
        err = (ours[layer] - theirs[layer]).abs().max().item()
        assert err <= 1e-6, (layout, layer, err)
    if layout == "local_window":  # the window actually masks something
        assert theirs[0][0, :, 7, :5].abs().max() == 0 and theirs[1][0, :, 7, :5].abs().max() > 0


def _save_tiny_llama(path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=D_VOCAB, max_position_embeddings=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(8.0)  # sharper attention than the default init
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recomputed_pattern_equals_bridge_pattern(family, hf_dir, llama_dir):
    source = str(hf_dir if family == "gpt2" else llama_dir)
    plan = af.as_plan(make_plan([{"kind": "attn_q"}], model={"source": source, "options": {"model_class": "bridge"}}))
    backend = af.load_backend(plan)
    assert backend.is_bridge and backend.attention_unsupported(0) is None
    theirs, ours = _patterns_and_recomputed(backend, backend.model)
    for layer in theirs:
        err = (ours[layer] - theirs[layer]).abs().max().item()
        assert err <= 1e-6, (family, layer, err)


def test_bridge_and_hooked_transformer_agree_on_rotary_gqa_queries_and_keys(llama_dir):
    """The bridge's q/k sites are post-rotary in the canonical layout: exact patching and AtP* match HookedTransformer."""
    nodes = [{"kind": k} for k in ("attn_q", "attn_k", "attn_head")]
    for method in ("activation_patching", "atp_star"):
        results = {
            cls: af.run(make_plan(nodes, method=method, model={"source": str(llama_dir), "options": {"model_class": cls}}))
            for cls in ("hooked_transformer", "bridge")
        }
        for name in ("attn_q", "attn_k", "attn_head"):
            a, b = results["bridge"][name].per_pair, results["hooked_transformer"][name].per_pair
            assert a.abs().max() > 1e-3
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", ["use_logn_attn", "use_attention_sinks"])
def test_unsupported_attention_is_refused_at_compile_time(option):
    overrides = {option: True}
    if option == "use_logn_attn":
        overrides.update(positional_embedding_type="rotary", rotary_dim=8)
    model = tiny_model(**overrides)
    with pytest.raises(af.PlanError, match=r"method.name: atp_star recomputes the attention pattern .* layer 0.*not supported"):
        af.compile(make_plan([{"kind": "attn_k"}], method="atp_star"), model=model)
    af.compile(make_plan([{"kind": "attn_k"}], method="atp_graddrop"), model=model)  # no recomputation: fine


# ------------------------------------------------------------------ closed forms
def _random_layer(group: int, saturate: float, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, t, kv, d = 2, 7, 2, 5
    h = kv * group

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k, k_noise, v = r(b, t, h, d) * saturate, r(b, t, kv, d), r(b, t, kv, d), r(b, t, kv, d)
    q_noise, dz = r(b, t, h, d) * saturate, r(b, t, h, d)

    def logits(q, k):
        keys = torch.repeat_interleave(k, group, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, keys) / d**0.5
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        return s.masked_fill(~mask, float("-inf"))

    return q, k, v, q_noise, k_noise, dz, logits


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("saturate", [1.0, 12.0])
@pytest.mark.parametrize("row_block", [64, 3])
def test_key_closed_form_equals_per_key_recomputation(group, saturate, row_block, monkeypatch):
    monkeypatch.setattr(attention, "ROW_BLOCK", row_block)  # 3: rows prepared in blocks of 3, 3 and 1
    q, k, v, _, k_noise, dz, logits = _random_layer(group, saturate)
    clean = clean_attention(logits(q, k), v)
    g = torch.einsum("bthd,bshd->bhts", dz, clean.values)  # dMetric/dA
    ours = key_effects(key_patch(clean, logits(q, k_noise)), dz)
    brute = torch.zeros_like(ours)
    for s in range(k.shape[1]):
        for head in range(k.shape[2]):
            patched = k.clone()
            patched[:, s, head] = k_noise[:, s, head]
            brute[:, s, head] = ((torch.softmax(logits(q, patched), -1) - clean.pattern) * g).sum(dim=(1, 2, 3))
    assert brute.abs().max() > 1e-3
    torch.testing.assert_close(ours, brute, rtol=0, atol=1e-6)
    # tables kept for a subset of key positions only (a position chunk)
    columns = torch.tensor([1, 4, 6])
    chunk = key_effects(key_patch(clean, logits(q, k_noise), columns), dz)
    torch.testing.assert_close(chunk, brute[:, columns], rtol=0, atol=1e-6)
    # patching every key of a head at once
    joint = joint_key_effects(joint_key_delta_z(clean, logits(q, k_noise)), dz, clean.group)
    for head in range(k.shape[2]):
        patched = k.clone()
        patched[:, :, head] = k_noise[:, :, head]
        expected = ((torch.softmax(logits(q, patched), -1) - clean.pattern) * g).sum(dim=(1, 2, 3))
        torch.testing.assert_close(joint[:, head], expected, rtol=0, atol=1e-6)


def test_key_closed_form_keeps_precision_in_saturated_float32_rows():
    """float32 with rows saturated to within rounding of 1: the float64 brute force is the reference."""
    q, k, v, _, k_noise, dz, logits = _random_layer(2, 30.0, seed=3)
    clean64 = clean_attention(logits(q, k), v)
    exact = key_effects(key_patch(clean64, logits(q, k_noise)), dz)
    f = [x.float() for x in (q, k, v, k_noise, dz)]
    clean32 = clean_attention(logits(f[0], f[1]), f[2])
    assert (clean32.pattern == 1).any(), "the fixture must saturate float32 rows"
    ours = key_effects(key_patch(clean32, logits(f[0], f[3])), f[4])
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-5)


def test_query_closed_form_equals_row_recomputation():
    q, k, v, q_noise, _, dz, logits = _random_layer(2, 3.0)
    clean = clean_attention(logits(q, k), v)
    g = torch.einsum("bthd,bshd->bhts", dz, clean.values)
    ours = (query_delta_z(clean, logits(q_noise, k)) * dz).sum(-1)  # batch query head
    rows = torch.tensor([0, 3, 5])
    chunk = (query_delta_z(clean, logits(q_noise, k)[:, :, rows], rows) * dz[:, rows]).sum(-1)
    torch.testing.assert_close(chunk, ours[:, rows], rtol=0, atol=1e-12)
    for t in range(q.shape[1]):
        for head in range(q.shape[2]):
            patched = q.clone()
            patched[:, t, head] = q_noise[:, t, head]
            expected = ((torch.softmax(logits(patched, k), -1) - clean.pattern) * g).sum(dim=(1, 2, 3))
            torch.testing.assert_close(ours[:, t, head], expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ exactness and saturation
LINEAR_AFTER_PATTERN = dict(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None)


@pytest.mark.parametrize(
    "extra", [dict(), dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)], ids=["learned", "rotary_gqa"]
)
def test_qk_fix_equals_patching_when_everything_after_the_pattern_is_linear(extra):
    model = tiny_model(**LINEAR_AFTER_PATTERN, **extra)
    nodes = [
        {"kind": "attn_q"},
        {"kind": "attn_k"},
        {"kind": "attn_k", "name": "keys_jointly", "positions": "all"},
        {"kind": "attn_q", "name": "queries_jointly", "positions": "all", "heads": "all"},
    ]
    exact = af.run(make_plan(nodes, method={"name": "activation_patching", "nodes_per_pass": 64}), model=model)
    fixed = af.run(make_plan(nodes, method="atp_qkfix"), model=model)
    plain = af.run(make_plan(nodes, method="atp"), model=model)
    for name in ("attn_q", "attn_k", "keys_jointly", "queries_jointly"):
        truth = exact[name].per_pair
        assert truth.abs().max() > 1e-2
        torch.testing.assert_close(fixed[name].per_pair, truth, rtol=0, atol=1e-5)
        assert (plain[name].per_pair - truth).abs().max() > 1e-3, "plain AtP should not already be exact here"


def saturated_attention_model():
    """One attention-only head: the last token's query matches token 1's key with a logit gap of 12.

    Clean ``[0, 1, 3]``: the head reads token 1's value with probability ~1 - 2e-6; noise ``[0, 2, 3]``
    gives token 2, whose key is 0, so patching key 1 drops that probability to 1/3.
    """
    model = tiny_model(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None, n_heads=1, d_head=4, d_model=8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:8] = torch.eye(8)
        attn = model.blocks[0].attn
        attn.W_Q[0, 3, 0] = 24.0  # query of token 3; the score scale is sqrt(4) = 2 -> logit 12
        attn.W_K[0, 1, 0] = 1.0  # key of token 1
        attn.W_V[0, 1, 0] = 1.0  # value of token 1
        attn.W_O[0, 0, 6] = 1.0
        model.unembed.W_U[6, 4] = 1.0  # logit of token 4 reads the head
    return model


def test_saturation_fixture_plain_atp_misses_the_key_and_the_qk_fix_does_not():
    model = saturated_attention_model()
    plan = dict(
        prompts=[{"clean": [0, 1, 3], "noise": [0, 2, 3], "answer": 4, "wrong_answer": 5}],
        nodes=[{"kind": "attn_k", "positions": [1]}],
    )
    scores = {
        method: af.run(make_plan(method=method, **plan), model=model)["attn_k"].per_pair[0, 0, 0, 0].item()
        for method in ("activation_patching", "atp", "atp_qkfix")
    }
    truth = scores["activation_patching"]
    assert truth == pytest.approx(1 / 3 - 1, abs=1e-3)
    assert abs(scores["atp"]) * 10 < abs(truth), scores
    assert scores["atp_qkfix"] == pytest.approx(truth, rel=0.1), scores
