"""The raw Hugging Face backend, family by family: logits equal the model's own; every site's activation,
patched logits and metric gradient, and every node type's scores under every method (SAE latents and
errors included), agree with the TransformerLens backend on the same weights; recomputed patterns equal
the eager weights; sdpa equals eager; forward leaves no trace on the model; dispatched (device_map)
models with offloaded layers give the same scores."""

import warnings

import pytest
import torch
from conftest import D_VOCAB, make_plan
from test_sae import make_sae

import atpframework as af
from atpframework.backends.huggingface import _ACTIVE_ATTENTION_HOOKS, HuggingFaceBackend
from atpframework.backends.transformer_lens import TransformerLensBackend
from atpframework.errors import BackendError
from atpframework.model.sites import Site

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]])
NOISE = torch.tensor([[1, 9, 3, 4, 11, 6, 7, 12], [9, 8, 13, 6, 5, 14, 3, 2]])

_TINY = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=D_VOCAB, max_position_embeddings=64)
FAMILY_CONFIGS = {
    # family: (config class, model class, config fields, weight scale)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32), 6.0),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_TINY, hidden_size=32, intermediate_size=48, num_key_value_heads=2), 8.0),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_TINY, hidden_size=32, intermediate_size=48, num_key_value_heads=2), 8.0),
    "neox_parallel": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(_TINY, hidden_size=32, intermediate_size=48, rotary_pct=0.25, use_parallel_residual=True), 6.0,
    ),
    "neox_sequential": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(_TINY, hidden_size=32, intermediate_size=48, rotary_pct=0.25, use_parallel_residual=False), 6.0,
    ),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(
            _TINY, hidden_size=32, intermediate_size=48, num_key_value_heads=2, head_dim=8, sliding_window=4,
            query_pre_attn_scalar=8, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        ),
        6.0,
    ),
}
"""GPT-2; Llama-style (RMSNorm, RoPE, GQA, gated MLP; Qwen2 adds q/k/v biases); GPT-NeoX/Pythia (partial rotary, parallel and
sequential blocks); Gemma-2 (pre+post norms, soft-capping, alternating sliding windows, GQA)."""
FAMILIES = sorted(FAMILY_CONFIGS)
SDPA_FAMILIES = [f for f in FAMILIES if f != "gemma2"]  # sdpa cannot soft-cap (transformers refuses)


def save_tiny(path, family):
    """A tiny random model of ``family`` saved as a Hugging Face directory, matrices scaled up for sharp attention."""
    import transformers

    config_cls, model_cls, fields, scale = FAMILY_CONFIGS[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(scale)
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {family: save_tiny(tmp_path_factory.mktemp(f"hf_{family}"), family) for family in FAMILIES}


def _load(path, implementation="eager", **options) -> HuggingFaceBackend:
    return HuggingFaceBackend.load(
        str(path), dtype="float32", device="cpu", options={"attn_implementation": implementation, **options}
    )


def _load_tl(path) -> TransformerLensBackend:
    return TransformerLensBackend.load(str(path), dtype="float32", device="cpu", options={})


def _hf_model(path, implementation="eager", **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=implementation, **kwargs).eval()


def _sites(backend):
    n = backend.info.n_layers
    return [Site(name, layer) for name in sorted(backend.supported_sites) for layer in range(n + 1 if name == "resid" else n)]


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
    info = {family: _load(model_dirs[family]).info for family in FAMILIES}
    described = {
        family: (i.architecture, i.n_layers, i.n_heads, i.n_kv_heads, i.d_head, i.d_mlp, i.d_vocab, i.positional_embedding,
                 i.normalization, i.parallel_blocks)
        for family, i in info.items()
    }
    assert described == {
        "gpt2": ("GPT2LMHeadModel", 2, 4, 4, 8, 128, D_VOCAB, "standard", "LN", False),
        "llama": ("LlamaForCausalLM", 2, 4, 2, 8, 48, D_VOCAB, "rotary", "RMS", False),
        "neox_parallel": ("GPTNeoXForCausalLM", 2, 4, 4, 8, 48, D_VOCAB, "rotary", "LN", True),
        "neox_sequential": ("GPTNeoXForCausalLM", 2, 4, 4, 8, 48, D_VOCAB, "rotary", "LN", False),
        "gemma2": ("Gemma2ForCausalLM", 2, 4, 2, 8, 48, D_VOCAB, "rotary", "RMS", False),
        "qwen2": ("Qwen2ForCausalLM", 2, 4, 2, 8, 48, D_VOCAB, "rotary", "RMS", False),
    }
    assert (info["llama"].dtype, info["llama"].device) == ("float32", "cpu")
    assert "resid_mid" not in _load(model_dirs["neox_parallel"]).supported_sites


# ------------------------------------------------------------------ parity with TransformerLens
@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_reads_and_patches_like_transformer_lens(family, model_dirs):
    """Each site's activation equals TransformerLens's; patching it with the noise run's value gives the same logits."""
    ours, theirs = _load(model_dirs[family]), _load_tl(model_dirs[family])
    assert ours.supported_sites == theirs.supported_sites
    sites = _sites(ours)
    clean, ours_clean = _capture(ours, TOKENS, sites)
    _, theirs_clean = _capture(theirs, TOKENS, sites)
    _, noise = _capture(ours, NOISE, sites)
    for site in sites:
        assert ours_clean[site].shape == theirs_clean[site].shape, site
        torch.testing.assert_close(ours_clean[site], theirs_clean[site], rtol=0, atol=1e-5, msg=str(site))
        patch = {site: [lambda a, value=noise[site]: value]}
        with torch.no_grad():
            patched_ours, patched_theirs = ours.forward(TOKENS, patch), theirs.forward(TOKENS, patch)
        assert (patched_ours - clean).abs().max() > 1e-4, f"patching {site} changed nothing"
        torch.testing.assert_close(patched_ours, patched_theirs, rtol=0, atol=1e-5, msg=str(site))


def _site_gradients(backend, sites):
    """d(logit diff at the last position, summed over the batch)/d(site), for every site in one pass."""
    acts = {}
    hooks = {site: [lambda a, site=site: acts.__setitem__(site, a)] for site in sites}
    logits = backend.forward(TOKENS, hooks)
    metric = (logits[:, -1, 3] - logits[:, -1, 4]).sum()
    grads = torch.autograd.grad(metric, [acts[site] for site in sites])
    return dict(zip(sites, grads))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_gradient_equals_transformer_lens(family, model_dirs):
    ours, theirs = _load(model_dirs[family]), _load_tl(model_dirs[family])
    sites = _sites(ours)
    a, b = _site_gradients(ours, sites), _site_gradients(theirs, sites)
    for site in sites:
        scale = b[site].abs().max().item()
        assert scale > 1e-3, f"no gradient reaches {site}"
        torch.testing.assert_close(a[site], b[site], rtol=0, atol=1e-5 * max(1.0, scale), msg=str(site))


NODES = [{"kind": kind} for kind in ("attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid")]
SAE_NODES = [{"kind": kind, "sae": name} for name in ("resid_sae", "z_sae", "transcoder") for kind in ("sae_latent", "sae_error")]
METHODS = {
    "activation_patching": {"name": "activation_patching"},
    "atp": {"name": "atp"},
    "atp_qkfix": {"name": "atp_qkfix"},
    "atp_graddrop": {"name": "atp_graddrop"},
    "atp_star": {"name": "atp_star"},
    "atp_star_sublayer": {"name": "atp_star", "granularity": "sublayer"},
}


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_saes")
    saes = {
        "resid_sae": make_sae("jumprelu", hook_name="blocks.1.hook_resid_pre", seed=1),
        "z_sae": make_sae("standard", hook_name="blocks.0.attn.hook_z", seed=2),
        "transcoder": make_sae("transcoder", hook_name="blocks.1.ln2.hook_normalized", seed=3),
    }
    for name, sae in saes.items():
        sae.save_model(root / name)
    return {name: str(root / name) for name in saes}


def _node_key(node):
    return node["kind"] + (f":{node['sae']}" if "sae" in node else "")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_transformer_lens_backend(family, method, model_dirs, sae_dirs):
    """Every node type, SAE latents and errors included: exact patching to 1e-5, first-order methods to 1e-4 relative."""
    nodes = [dict(n, name=_node_key(n)) for n in NODES + SAE_NODES]
    saes = [{"name": name, "path": path} for name, path in sae_dirs.items()]
    plan = make_plan(nodes, method=METHODS[method], model={"source": str(model_dirs[family])}, saes=saes)
    ours = af.run(plan, backend=_load(model_dirs[family]))
    theirs = af.run(plan)  # model.backend defaults to transformer_lens
    for node in nodes:
        a, b = ours[node["name"]].per_pair, theirs[node["name"]].per_pair
        assert a.abs().max() > 1e-3, node
        if method == "activation_patching":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=node["name"])
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item(), msg=node["name"])


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


@pytest.mark.parametrize("family", SDPA_FAMILIES)
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


@pytest.mark.parametrize("family,implementation", [(f, "eager") for f in FAMILIES] + [(f, "sdpa") for f in SDPA_FAMILIES])
def test_forward_leaves_no_hooks_and_restores_the_attention_implementation(family, implementation, model_dirs):
    backend = _load(model_dirs[family], implementation)
    model = backend.model
    user_seen = []
    user_handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: user_seen.append(1))
    before = _hook_counts(model)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    sites = _sites(backend)

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


def test_unsupported_model_type_is_refused():
    import transformers

    config = transformers.OPTConfig(
        hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=D_VOCAB, word_embed_proj_dim=32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.OPTForCausalLM(config).eval()
    with pytest.raises(BackendError, match=r"model_type 'opt'.*supported: gemma2, gpt2, gpt_neox, llama, mistral, qwen2"):
        HuggingFaceBackend.from_model(model)


def test_gemma2_under_sdpa_is_refused_when_loading(model_dirs):
    """transformers itself refuses sdpa for Gemma-2 (it cannot soft-cap); the error reaches the user as a BackendError."""
    with pytest.raises(BackendError, match=r"Gemma2ForCausalLM does not support .*scaled_dot_product_attention.*eager"):
        _load(model_dirs["gemma2"], "sdpa")


def test_parallel_blocks_have_no_resid_mid(model_dirs):
    plan = make_plan([{"kind": "attn_head"}], method={"name": "atp_star", "granularity": "sublayer"},
                     model={"source": str(model_dirs["neox_parallel"])})
    backend = _load(model_dirs["neox_parallel"])
    af.run(plan, backend=backend)  # sublayer GradDrop restarts from attn_out / mlp_out, never resid_mid
    with pytest.raises(BackendError, match="cannot hook site 'resid_mid'"):
        backend.forward(TOKENS, {Site("resid_mid", 0): [lambda a: None]})


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


# ------------------------------------------------------------------ dispatched models (accelerate device_map)
def test_dispatched_model_with_a_disk_offloaded_layer_gives_the_same_scores(model_dirs, tmp_path):
    """accelerate's dispatch hooks and our hooks coexist: layer 1's weights live on disk (meta until its forward)."""
    path = model_dirs["llama"]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = _hf_model(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert dispatched.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    backend = HuggingFaceBackend.from_model(dispatched)
    assert backend.info.device == "cpu"
    nodes = NODES
    for method in ("activation_patching", "atp_star"):
        plan = make_plan(nodes, method=method, model={"source": str(path)})
        a, b = af.run(plan, backend=backend), af.run(plan, backend=_load(path))
        for node in nodes:
            torch.testing.assert_close(a[node["kind"]].per_pair, b[node["kind"]].per_pair, rtol=1e-5, atol=1e-6)
    assert dispatched.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # still offloaded


def test_device_map_option_reaches_from_pretrained(model_dirs, monkeypatch):
    """``model.options.device_map`` is handed to from_pretrained (which leaves placement to accelerate) and the
    model is not moved afterwards; on this CPU-only machine "auto" places everything on the CPU."""
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    backend = _load(model_dirs["llama"], device_map="auto")
    assert seen["device_map"] == "auto"
    plan = make_plan(NODES[:1], method="atp_star", model={"source": str(model_dirs["llama"])})
    a, b = af.run(plan, backend=backend), af.run(plan, backend=_load(model_dirs["llama"]))
    torch.testing.assert_close(a["attn_head"].per_pair, b["attn_head"].per_pair, rtol=1e-5, atol=1e-6)
    with pytest.raises(af.PlanError, match="model.options.device_map: allowed: none, auto, balanced"):
        _load(model_dirs["llama"], device_map="everywhere")


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_plan_dtype_is_honoured(dtype, model_dirs):
    path = str(model_dirs["llama"])
    plan = make_plan(NODES[:2], method="atp_star", model={"source": path, "backend": "huggingface", "dtype": dtype})
    backend = af.load_backend(af.as_plan(plan))
    assert backend.info.dtype == dtype and {p.dtype for p in backend.model.parameters()} == {getattr(torch, dtype)}
    ours = af.run(plan, backend=backend)["attn_head"].per_pair.double()
    reference = af.run(plan, backend=_load(path))["attn_head"].per_pair.double()
    if dtype == "float64":
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    else:  # bf16 keeps ~3 significant digits: the ranking signal survives, the values are rounded
        assert torch.corrcoef(torch.stack([ours.flatten(), reference.flatten()]))[0, 1] > 0.99
        assert not torch.allclose(ours, reference, rtol=1e-4, atol=1e-5)
