"""Edges on the raw Hugging Face backend: the edge sites (each head's own input copy, each head's result, the
MLP's own input) read, patch and differentiate like TransformerLens's on the same weights; edge scores agree
between the backends; a head's own input copy reaches that head alone; models whose heads' results are not
their residual writes (Gemma-2), or whose projections the backend cannot slice, are refused with the site
named; offloaded (accelerate) layers give the same edge scores."""

import warnings

import pytest
import torch
from conftest import make_plan
from test_huggingface import NOISE, TOKENS, _capture, _hf_model, _load, _load_tl, save_tiny

import atpframework as af
from atpframework.backends.huggingface import ArchitectureAdapter, HuggingFaceBackend, LlamaAdapter
from atpframework.errors import BackendError
from atpframework.model.sites import EDGE_SITES, Site

EDGE_FAMILIES = ["gpt2", "llama", "neox_parallel", "neox_sequential", "qwen2"]
"""Families serving every edge site (Gemma-2 leaves them out: norms after each sublayer)."""
EDGE_KINDS = ("edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits")
EDGE_NODES = [{"kind": kind} for kind in EDGE_KINDS]
READER_SITE = {"edge_q": "attn_q_input", "edge_k": "attn_k_input", "edge_v": "attn_v_input", "edge_mlp": "mlp_input"}


def save_tiny_with_biases(path, family):
    """``save_tiny``'s model with every bias random (initialized to zero, they would hide a dropped or misplaced
    bias: GPT-2's and GPT-NeoX's projections, Qwen2's query/key/value biases, the LayerNorms')."""
    save_tiny(path, family)
    model = _hf_model(path)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    families = [*EDGE_FAMILIES, "gemma2"]
    return {family: save_tiny_with_biases(tmp_path_factory.mktemp(f"hf_edges_{family}"), family) for family in families}


@pytest.fixture(scope="module")
def backends(model_dirs):
    """(huggingface, transformer_lens) backends per family, loaded once."""
    return {family: (_load(path), _load_tl(path)) for family, path in model_dirs.items()}


def _edge_sites(backend):
    return [Site(name, layer) for name in sorted(EDGE_SITES) for layer in range(backend.info.n_layers)]


# ------------------------------------------------------------------ the sites
@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_edge_sites_are_served_read_like_transformer_lens_and_change_nothing_unpatched(family, backends):
    ours, theirs = backends[family]
    assert EDGE_SITES <= ours.supported_sites and ours.edges_unsupported is None
    if family != "llama":  # the projections' biases are part of what is checked
        biases = [m.bias for m, _ in ours.adapter.qkv_projections(1)]
        biases += [] if family == "qwen2" else [_output_bias(ours, 1)]  # Qwen2's o_proj has no bias
        assert all(b.abs().min() > 0 for b in biases)
    assert ours.supported_sites == theirs.supported_sites
    sites = _edge_sites(ours)
    with torch.no_grad():
        unhooked = ours.forward(TOKENS, {})
    hooked, acts = _capture(ours, TOKENS, sites)
    _, reference = _capture(theirs, TOKENS, sites)
    torch.testing.assert_close(hooked, unhooked, rtol=0, atol=1e-5)  # observing every edge site changes nothing
    info = ours.info
    for site in sites:
        heads = {"attn_result": info.n_heads, "attn_q_input": info.n_heads}.get(site.name, info.n_kv_heads)
        shape = (2, 8, info.d_model) if site.name == "mlp_input" else (2, 8, heads, info.d_model)
        assert acts[site].shape == shape, site
        torch.testing.assert_close(acts[site], reference[site], rtol=0, atol=1e-5, msg=str(site))
    for layer in range(info.n_layers):  # the heads' results plus the bias are the attention's write
        _, out = _capture(ours, TOKENS, [Site("attn_out", layer)])
        bias = _output_bias(ours, layer)
        written = acts[Site("attn_result", layer)].sum(2) + bias
        torch.testing.assert_close(written, out[Site("attn_out", layer)], rtol=0, atol=1e-5)


def _output_bias(backend, layer):
    bias = getattr(backend.adapter.output_projection(layer), "bias", None)
    return 0.0 if bias is None else bias.detach()


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_patching_one_head_input_copy_changes_that_head_alone_and_the_logits_as_transformer_lens(family, backends):
    """Head 1's query (key/value head 1's key and value) input at block 1 replaced by the noise run's residual
    stream: only that head's attn_q (attn_k, attn_v) changes, and the logits equal TransformerLens's."""
    ours, theirs = backends[family]
    _, noise = _capture(ours, NOISE, [Site("resid", 1)])
    noise_resid = noise[Site("resid", 1)]

    def one_head(act, head=1):
        act = act.clone()
        act[:, :, head] = noise_resid
        return act

    read = [Site(name, 1) for name in ("attn_q", "attn_k", "attn_v")]
    for kind, changed in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
        site = Site(f"attn_{kind}_input", 1)
        base_logits, base = _capture_with(ours, {site: [lambda a: a.clone()]}, read)
        logits, patched = _capture_with(ours, {site: [one_head]}, read)
        for other in read:
            diff = (patched[other] - base[other]).abs().amax(dim=(0, 1, 3))  # per head
            if other.name == changed:
                assert diff[1] > 1e-3 and diff[[0, *range(2, len(diff))]].max() == 0, (site, other, diff)
            else:
                assert diff.max() == 0, (site, other, diff)  # queries, keys and values of other kinds untouched
        with torch.no_grad():
            reference = theirs.forward(TOKENS, {site: [one_head]})
        assert (logits - base_logits).abs().max() > 1e-3, site
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5, msg=str(site))


def _capture_with(backend, hooks, sites):
    acts = {}
    all_hooks = {site: list(fns) for site, fns in hooks.items()}
    for site in sites:
        all_hooks.setdefault(site, []).append(lambda a, site=site: acts.__setitem__(site, a.detach().clone()))
    with torch.no_grad():
        logits = backend.forward(TOKENS, all_hooks)
    return logits, acts


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_an_edge_patched_by_hand_gives_transformer_lens_logits(family, backends):
    """The edge from block 0 head 2 into block 1 query head 3 (into MLP 1, MLP 0) patched as its definition says:
    the reader's input gains the writer's noise - clean result (from our activations), applied on both backends."""
    ours, theirs = backends[family]
    writer = Site("attn_result", 0)
    _, clean = _capture(ours, TOKENS, [writer])
    _, noise = _capture(ours, NOISE, [writer])
    delta = noise[writer][:, :, 2] - clean[writer][:, :, 2]

    def add_to_head(act):
        act = act.clone()
        act[:, :, 3] += delta
        return act

    for hooks in ({Site("attn_q_input", 1): [add_to_head]}, {Site("mlp_input", 1): [lambda a: a + delta]},
                  {Site("mlp_input", 0): [lambda a: a + delta]}):
        with torch.no_grad():
            a, b, unpatched = ours.forward(TOKENS, hooks), theirs.forward(TOKENS, hooks), ours.forward(TOKENS, {})
        assert (a - unpatched).abs().max() > 1e-4, hooks
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_edge_site_gradients_equal_transformer_lens_and_split_the_block_inputs(family, backends):
    """d(logit diff)/d(site) at every edge site equals TransformerLens's; and the readers' own copies split the
    block input's gradient: d/d resid[l] = sum over heads of the q, k, v copies' + the MLP copy's + d/d resid[l+1]
    (the skip connection carries the stream to the MLP's copy and to the next boundary)."""
    ours, theirs = backends[family]
    sites = _edge_sites(ours)
    a, b = _gradients(ours, sites), _gradients(theirs, sites)
    for site in sites:
        scale = b[site].abs().max().item()
        assert scale > 1e-3, f"no gradient reaches {site}"
        torch.testing.assert_close(a[site], b[site], rtol=0, atol=1e-5 * max(1.0, scale), msg=str(site))
    for layer in range(ours.info.n_layers):
        readers = [Site(f"attn_{kind}_input", layer) for kind in "qkv"] + [Site("mlp_input", layer)]
        g = _gradients(ours, [Site("resid", layer), Site("resid", layer + 1), *readers])
        split = sum(g[site].sum(2) if site.name != "mlp_input" else g[site] for site in readers) + g[Site("resid", layer + 1)]
        whole = g[Site("resid", layer)]
        torch.testing.assert_close(split, whole, rtol=0, atol=1e-5 * whole.abs().max().item(), msg=f"block {layer}")


def _gradients(backend, sites):
    acts = {}
    hooks = {site: [lambda a, site=site: acts.__setitem__(site, a)] for site in sites}
    logits = backend.forward(TOKENS, hooks)
    metric = (logits[:, -1, 3] - logits[:, -1, 4]).sum()
    return dict(zip(sites, torch.autograd.grad(metric, [acts[site] for site in sites])))


# ------------------------------------------------------------------ edge scores
METHODS = ["activation_patching", "atp", "atp_graddrop", "atp_qkfix", "atp_star"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_edge_scores_equal_the_transformer_lens_backend(family, method, model_dirs, backends):
    """Every edge kind: exact edge patching to 1e-5, first-order methods (the QK fix included) to 1e-4 relative."""
    ours, theirs = backends[family]
    nodes = [dict(n, name=n["kind"]) for n in EDGE_NODES]
    plan = make_plan(nodes, method=method, model={"source": str(model_dirs[family])})
    a_result, b_result = af.run(plan, backend=ours), af.run(plan, backend=theirs)
    for kind in EDGE_KINDS:
        a, b = a_result[kind].per_pair, b_result[kind].per_pair
        assert a.abs().max() > 1e-3, kind
        if method == "activation_patching":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=kind)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item(), msg=kind)


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_reader_projection_computes_the_models_queries_and_keys(family, backends):
    """From the clean per-head inputs: the queries and keys of an unhooked forward; from shifted inputs: those
    of a forward with the shifted inputs patched in (after rotary embeddings, grouped keys kept grouped)."""
    ours, theirs = backends[family]
    layer = 1
    inputs = [Site("attn_q_input", layer), Site("attn_k_input", layer)]
    outputs = [Site("attn_q", layer), Site("attn_k", layer)]
    _, x = _capture(ours, TOKENS, inputs)
    _, unhooked = _capture(ours, TOKENS, outputs)  # the model's own projection path
    shift = torch.randn(x[inputs[0]].shape[-1], generator=torch.Generator().manual_seed(3))
    for reader, site, out in zip("qk", inputs, outputs):
        assert ours.reader_projection_unsupported(layer) is None
        with torch.no_grad():
            clean = ours.reader_projection(layer, reader, x[site])
            moved_x = x[site].clone()
            moved_x[:, 2:5, 0] += shift
            moved = ours.reader_projection(layer, reader, moved_x)
            reference = theirs.reader_projection(layer, reader, moved_x)
        torch.testing.assert_close(clean, unhooked[out], rtol=0, atol=1e-5, msg=reader)
        _, patched = _capture_with(ours, {site: [lambda a, v=moved_x: v]}, [out])
        assert (moved - clean).abs().max() > 1e-2
        torch.testing.assert_close(moved, patched[out], rtol=0, atol=1e-5, msg=reader)
        torch.testing.assert_close(moved, reference, rtol=0, atol=1e-5, msg=reader)


def test_edge_scores_under_sdpa_equal_eager(model_dirs, backends):
    path = model_dirs["qwen2"]
    plan = make_plan(EDGE_NODES, method="atp", model={"source": str(path)})
    a, b = af.run(plan, backend=_load(path, "sdpa")), af.run(plan, backend=backends["qwen2"][0])
    for kind in EDGE_KINDS:
        torch.testing.assert_close(a[kind].per_pair, b[kind].per_pair, rtol=1e-4, atol=1e-5 * b[kind].per_pair.abs().max().item())


def test_edge_scores_of_a_disk_offloaded_layer_equal_the_undispatched_models(model_dirs, tmp_path):
    """Layer 1's weights live on disk (meta between forwards): the head results and per-head inputs are
    recomputed from weights accelerate loads for the recomputation, and put back afterwards."""
    path = model_dirs["llama"]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = _hf_model(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    attention = dispatched.model.layers[1].self_attn
    assert attention.o_proj.weight.device.type == "meta"
    for method in ("atp", "atp_qkfix"):  # the QK fix recomputes queries and keys from the offloaded weights too
        plan = make_plan(EDGE_NODES, method=method, model={"source": str(path)})
        a, b = af.run(plan, backend=HuggingFaceBackend.from_model(dispatched)), af.run(plan, backend=_load(path))
        for kind in EDGE_KINDS:
            torch.testing.assert_close(a[kind].per_pair, b[kind].per_pair, rtol=1e-5, atol=1e-6, msg=kind)
    assert {attention.o_proj.weight.device.type, attention.q_proj.weight.device.type} == {"meta"}  # still offloaded


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kind", EDGE_KINDS)
def test_gemma2_plans_with_edges_are_refused_naming_the_site(kind, model_dirs, backends):
    ours, theirs = backends["gemma2"]
    assert not EDGE_SITES & ours.supported_sites
    assert ours.supported_sites == theirs.supported_sites
    assert "Gemma-2" in ours.edges_unsupported
    plan = make_plan([{"kind": kind}], method="atp", model={"source": str(model_dirs["gemma2"])})
    site = READER_SITE.get(kind, "attn_result")  # edges into the logits read a served site, but need the heads' results
    with pytest.raises(af.PlanError, match=site):
        af.run(plan, backend=ours)
    with pytest.raises(BackendError, match=r"cannot hook site 'attn_result' on this model: Gemma-2's norms"):
        ours.forward(TOKENS, {Site("attn_result", 0): [lambda a: None]})


def test_reader_projection_is_refused_without_edges_or_without_the_rotary_embedding(model_dirs, backends):
    gemma2 = backends["gemma2"][0]
    assert "no edge sites" in gemma2.reader_projection_unsupported(0)
    with pytest.raises(BackendError, match="Gemma-2"):
        gemma2.reader_projection(0, "q", torch.zeros(1, 2, 4, 32))

    class RotaryNotLocated(LlamaAdapter):
        rotary_embedding = ArchitectureAdapter.rotary_embedding

    backend = _load(model_dirs["llama"])
    backend.adapter = RotaryNotLocated(backend.model)
    assert "RotaryNotLocated does not locate the rotary embedding" in backend.reader_projection_unsupported(0)
    plan = make_plan([{"kind": "edge_q", "layers": [1]}], method="atp_qkfix")
    with pytest.raises(af.PlanError, match="recomputes the queries and keys of edges into layer 1"):
        af.run(plan, backend=backend)
    assert af.run(dict(plan, method={"name": "atp"}), backend=backend)["edge_q"].per_pair.abs().max() > 0


def test_projections_the_backend_cannot_slice_leave_the_edge_sites_out(model_dirs):
    """A projection of another class (here a subclass of nn.Linear, as quantized layers are) is not sliced."""

    class QuantizedLinear(torch.nn.Linear):
        pass

    model = _hf_model(model_dirs["llama"])
    model.model.layers[1].self_attn.k_proj.__class__ = QuantizedLinear
    backend = HuggingFaceBackend.from_model(model)
    assert not EDGE_SITES & backend.supported_sites
    assert "QuantizedLinear" in backend.edges_unsupported
    plan = make_plan([{"kind": "edge_v", "layers": [0]}], method="atp")
    with pytest.raises(af.PlanError, match="attn_v_input"):
        af.run(plan, backend=backend)
    plan = make_plan([{"kind": "attn_head"}], method="atp")  # everything else still runs
    assert af.run(plan, backend=backend)["attn_head"].per_pair.abs().max() > 0


def test_an_adapter_that_does_not_locate_the_attention_modules_serves_no_edges(model_dirs):
    """Third-party adapters written before edges (no attention_input_norm / qkv_projections / output_projection)."""

    class Minimal(ArchitectureAdapter):
        positional_embedding = "rotary"
        normalization = "RMS"

        def layers(self):
            return self.model.model.layers

    model = _hf_model(model_dirs["llama"])
    assert "Minimal does not locate the attention input norm" in Minimal(model).edges_unsupported()
    assert LlamaAdapter(model).edges_unsupported() is None


# ------------------------------------------------------------------ the bundled model
@pytest.mark.smollm2
def test_bundled_smollm2_edge_scores_equal_the_transformer_lens_backend():
    """SmolLM2-135M (Llama, grouped-query attention) on one IOI pair, ``atp`` and ``atp_qkfix`` (the QK fix through
    ``reader_projection``): edges into queries of two layers, keys and values of one, an MLP and the logits,
    at the last position."""
    pytest.importorskip("gguf")
    from test_smollm2 import IOI

    source = "bundled:smollm2-135m-instruct"
    nodes = [
        {"kind": "edge_q", "name": "q", "layers": [10, 20], "positions": [-1]},
        {"kind": "edge_k", "name": "k", "layers": [20], "positions": [-1]},
        {"kind": "edge_v", "name": "v", "layers": [20], "positions": [-1]},
        {"kind": "edge_mlp", "name": "mlp", "layers": [25], "positions": [-1]},
        {"kind": "edge_logits", "name": "logits", "positions": [-1]},
    ]
    plan = {"model": {"source": source}, "prompts": [IOI], "nodes": nodes, "method": {"name": "atp"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = af.load_backend(af.as_plan(plan))
        hf = af.load_backend(af.as_plan(dict(plan, model={"source": source, "backend": "huggingface"})))
    for method in ("atp", "atp_qkfix"):
        method_plan = dict(plan, method={"name": method})
        ours, theirs = af.run(method_plan, backend=hf), af.run(method_plan, backend=tl)
        for name in ("q", "k", "v", "mlp", "logits"):
            a, b = theirs[name].per_pair, ours[name].per_pair
            assert a.abs().max() > 1e-3, name
            diff = (a - b).abs().max().item()
            print(f"{method} {name}: max |score| {a.abs().max().item():.4g}, max abs diff {diff:.3g}")  # pytest -rP shows it
            assert diff <= 1e-4 * a.abs().max().item(), (method, name)
