"""The raw Hugging Face backend: logits equal the model's own, every site and every method agree with
the TransformerLens backend on the same directory, recomputed patterns equal the eager weights, sdpa
equals eager, and forward leaves no trace on the model."""

import warnings

import pytest
import torch
from conftest import D_VOCAB, make_plan, save_tiny_gpt2
from test_attention import _save_tiny_llama

import atpframework as af
from atpframework.backends.huggingface import _ACTIVE_ATTENTION_HOOKS, HuggingFaceBackend
from atpframework.backends.transformer_lens import TransformerLensBackend
from atpframework.errors import BackendError
from atpframework.sites import SITE_NAMES, Site

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]])
NOISE = torch.tensor([[1, 9, 3, 4, 11, 6, 7, 12], [9, 8, 13, 6, 5, 14, 3, 2]])
FAMILIES = ["gpt2", "llama"]


def _save_sharp_tiny_gpt2(path):
    """conftest's tiny GPT-2 with its matrices scaled up, so that effects are far above float32 noise."""
    save_tiny_gpt2(path)
    model = _hf_model(path)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {
        "gpt2": _save_sharp_tiny_gpt2(tmp_path_factory.mktemp("hf_gpt2")),
        "llama": _save_tiny_llama(tmp_path_factory.mktemp("hf_llama")),
    }


def _load(path, implementation="eager") -> HuggingFaceBackend:
    return HuggingFaceBackend.load(str(path), dtype="float32", device="cpu", options={"attn_implementation": implementation})


def _hf_model(path, implementation="eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=implementation).eval()


def _site_layers(backend, name):
    return range(backend.info.n_layers + 1 if name == "resid" else backend.info.n_layers)


def _capture(backend, tokens, sites):
    acts = {}
    hooks = {site: [lambda a, site=site: acts.__setitem__(site, a.detach().clone())] for site in sites}
    with torch.no_grad():
        logits = backend.forward(tokens, hooks)
    return logits, acts


# ------------------------------------------------------------------ logits and model info
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_hugging_face_models_own(family, model_dirs):
    backend = _load(model_dirs[family])
    with torch.no_grad():
        ours = backend.forward(TOKENS, {})
        theirs = _hf_model(model_dirs[family])(TOKENS).logits
    assert ours.shape == (2, 8, D_VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_model_info(model_dirs):
    gpt2, llama = _load(model_dirs["gpt2"]).info, _load(model_dirs["llama"]).info
    assert (gpt2.architecture, gpt2.n_heads, gpt2.n_kv_heads, gpt2.d_head, gpt2.d_mlp, gpt2.d_vocab) == (
        "GPT2LMHeadModel", 4, 4, 8, 128, D_VOCAB,
    )
    assert (gpt2.positional_embedding, gpt2.normalization, gpt2.parallel_blocks) == ("standard", "LN", False)
    assert (llama.architecture, llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.d_mlp) == ("LlamaForCausalLM", 2, 4, 2, 48)
    assert (llama.positional_embedding, llama.normalization, llama.dtype, llama.device) == ("rotary", "RMS", "float32", "cpu")


# ------------------------------------------------------------------ parity with TransformerLens
@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_reads_and_patches_like_transformer_lens(family, model_dirs):
    """Each site's activation equals TransformerLens's; patching it with the noise run's value gives the same logits."""
    ours = _load(model_dirs[family])
    theirs = TransformerLensBackend.load(str(model_dirs[family]), dtype="float32", device="cpu", options={})
    sites = [Site(name, layer) for name in SITE_NAMES for layer in _site_layers(ours, name)]
    _, ours_clean = _capture(ours, TOKENS, sites)
    _, theirs_clean = _capture(theirs, TOKENS, sites)
    _, noise = _capture(ours, NOISE, sites)
    for site in sites:
        assert ours_clean[site].shape == theirs_clean[site].shape, site
        torch.testing.assert_close(ours_clean[site], theirs_clean[site], rtol=0, atol=1e-5, msg=str(site))
        patch = {site: [lambda a, value=noise[site]: value]}
        with torch.no_grad():
            patched_ours, patched_theirs = ours.forward(TOKENS, patch), theirs.forward(TOKENS, patch)
            clean = ours.forward(TOKENS, {})
        assert (patched_ours - clean).abs().max() > 1e-4, f"patching {site} changed nothing"
        torch.testing.assert_close(patched_ours, patched_theirs, rtol=0, atol=1e-5, msg=str(site))


NODES = [{"kind": kind} for kind in ("attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid")]


@pytest.mark.parametrize("method", ["activation_patching", "atp", "atp_star"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_transformer_lens_backend(family, method, model_dirs):
    plan = make_plan(NODES, method=method, model={"source": str(model_dirs[family])})
    ours = af.run(plan, backend=_load(model_dirs[family]))
    theirs = af.run(plan)  # model.backend defaults to transformer_lens
    assert ours.model["architecture"].endswith("ForCausalLM") or ours.model["architecture"].endswith("LMHeadModel")
    for node in NODES:
        a, b = ours[node["kind"]].per_pair, theirs[node["kind"]].per_pair
        assert a.abs().max() > 1e-3, node
        if method == "activation_patching":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=node["kind"])
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=node["kind"])


# ------------------------------------------------------------------ attention recomputation and sdpa
@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_pattern_equals_eager_attention_weights(family, model_dirs):
    backend = _load(model_dirs[family])
    n = backend.info.n_layers
    _, acts = _capture(backend, TOKENS, [Site(name, l) for l in range(n) for name in ("attn_q", "attn_k")])
    with torch.no_grad():
        weights = _hf_model(model_dirs[family])(TOKENS, output_attentions=True).attentions
    for layer in range(n):
        assert backend.attention_unsupported(layer) is None
        with torch.no_grad():
            ours = torch.softmax(backend.attention_logits(layer, acts[Site("attn_q", layer)], acts[Site("attn_k", layer)]), -1)
        assert ours.shape == weights[layer].shape
        assert (ours - weights[layer]).abs().max().item() <= 1e-6, (family, layer)
        assert weights[layer].amax(-1).min() < 0.99  # a real pattern, not one-hot rows


def test_recomputed_pattern_follows_gpt2_inverse_layer_scaling(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32, scale_attn_by_inverse_layer_idx=True,
        initializer_range=0.3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
    backend = _load(tmp_path)
    _, acts = _capture(backend, TOKENS, [Site("attn_q", 1), Site("attn_k", 1)])
    with torch.no_grad():
        weights = _hf_model(tmp_path)(TOKENS, output_attentions=True).attentions[1]
        ours = torch.softmax(backend.attention_logits(1, acts[Site("attn_q", 1)], acts[Site("attn_k", 1)]), -1)
        unscaled = torch.softmax(backend.attention_logits(1, acts[Site("attn_q", 1)], acts[Site("attn_k", 1)]) * 2, -1)
    assert (unscaled - weights).abs().max() > 1e-3  # the layer scale matters here
    assert (ours - weights).abs().max().item() <= 1e-6


def test_sliding_window_masks_old_keys(tmp_path):
    import transformers

    config = transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=D_VOCAB, max_position_embeddings=64, sliding_window=3,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.MistralForCausalLM(config).eval().save_pretrained(tmp_path)
    backend = _load(tmp_path)
    _, acts = _capture(backend, TOKENS, [Site("attn_q", 0), Site("attn_k", 0)])
    with torch.no_grad():
        weights = _hf_model(tmp_path)(TOKENS, output_attentions=True).attentions[0]
        ours = torch.softmax(backend.attention_logits(0, acts[Site("attn_q", 0)], acts[Site("attn_k", 0)]), -1)
    assert weights[0, :, 7, :5].abs().max() == 0
    assert (ours - weights).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_gives_the_same_logits_and_scores_as_eager(family, model_dirs):
    eager, sdpa = _load(model_dirs[family]), _load(model_dirs[family], "sdpa")
    assert sdpa.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(sdpa.forward(TOKENS, {}), eager.forward(TOKENS, {}), rtol=0, atol=1e-5)
    plan = make_plan(NODES, method="atp_star", model={"source": str(model_dirs[family])})
    a, b = af.run(plan, backend=sdpa), af.run(plan, backend=eager)
    for node in NODES:
        torch.testing.assert_close(a[node["kind"]].per_pair, b[node["kind"]].per_pair, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ hook hygiene and errors
def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_leaves_no_hooks_and_restores_the_attention_implementation(family, implementation, model_dirs):
    backend = _load(model_dirs[family], implementation)
    model = backend.model
    user_seen = []
    user_handle = model.lm_head.register_forward_hook(lambda m, i, o: user_seen.append(1))
    before = _hook_counts(model)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    sites = [Site(name, layer) for name in SITE_NAMES for layer in _site_layers(backend, name)]

    def check_clean():
        assert _hook_counts(model) == before
        assert all(c._attn_implementation == implementation for c in configs.values())
        assert not _ACTIVE_ATTENTION_HOOKS

    _capture(backend, TOKENS, sites)
    check_clean()

    def boom(act):
        raise RuntimeError("hook failed")

    for failing in (Site("attn_q", 1), Site("mlp_out", 0), Site("resid", 0)):
        hooks = {site: [lambda a: None] for site in sites}
        hooks[failing] = [boom]
        with pytest.raises(RuntimeError, match="hook failed"):
            backend.forward(TOKENS, hooks)
        check_clean()
    with torch.no_grad():  # the model still runs as the user configured it, user hook included
        torch.testing.assert_close(model(TOKENS).logits, _hf_model(model_dirs[family], implementation)(TOKENS).logits)
    assert user_seen
    user_handle.remove()


def test_gradient_hooks_receive_the_metric_gradient(model_dirs):
    """A gradient hook on the tensor a site hook saw receives dLogit/dact (checked against a finite difference)."""
    backend = _load(model_dirs["llama"])
    site = Site("attn_k", 1)
    seen, grads = {}, {}

    def keep(act):
        act.register_hook(lambda g: grads.__setitem__("k", g))
        seen["k"] = act

    logits = backend.forward(TOKENS, {site: [keep]})
    logits[0, -1, 3].backward()
    direction = torch.zeros_like(seen["k"])
    direction[0, 2, 1, 0] = 1.0
    eps = 1e-3
    with torch.no_grad():
        up = backend.forward(TOKENS, {site: [lambda a: a + eps * direction]})[0, -1, 3]
        down = backend.forward(TOKENS, {site: [lambda a: a - eps * direction]})[0, -1, 3]
    assert grads["k"][0, 2, 1, 0].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-2, abs=1e-4)
    assert grads["k"].abs().max() > 0


def test_unsupported_model_type_is_refused(tmp_path):
    import transformers

    config = transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=D_VOCAB,
        max_position_embeddings=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPTNeoXForCausalLM(config).eval()
    with pytest.raises(BackendError, match=r"model_type 'gpt_neox'.*supported: gpt2, llama, mistral, qwen2"):
        HuggingFaceBackend.from_model(model)


def test_refuses_training_mode_and_foreign_objects(model_dirs):
    model = _hf_model(model_dirs["gpt2"])
    with pytest.raises(BackendError, match="training mode"):
        HuggingFaceBackend.from_model(model.train())
    with pytest.raises(BackendError, match="PreTrainedModel"):
        HuggingFaceBackend.from_model(torch.nn.Linear(2, 2))
    backend = HuggingFaceBackend.from_model(model.eval())
    assert backend.info.source == "in_memory"
    with pytest.raises(af.PlanError, match="no tokenizer"):
        backend.tokenize("hello", None)


def test_unknown_hub_name_offline_is_a_backend_error():
    with pytest.raises(BackendError, match="could not load 'no-such-org/no-such-model' from the model hub"):
        HuggingFaceBackend.load("no-such-org/no-such-model", dtype="float32", device="cpu", options={})


def test_bad_options_are_plan_errors(model_dirs):
    with pytest.raises(af.PlanError, match="unknown option"):
        HuggingFaceBackend.load(str(model_dirs["gpt2"]), dtype="float32", device="cpu", options={"model_class": "bridge"})
    with pytest.raises(af.PlanError, match="attn_implementation"):
        _load(model_dirs["gpt2"], "flash_attention_2")
