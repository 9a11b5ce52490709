"""Real-model checks on the bundled SmolLM2-135M-Instruct (Llama: RMSNorm, RoPE, GQA, gated MLP).

The first run dequantizes the bundled GGUF into the cache (about 40 s); later runs reuse it.
"""

import pytest
import torch

import atpframework as af

pytestmark = pytest.mark.smollm2

IOI = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "noise": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary",
    "wrong_answer": " John",
}


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("gguf")
    plan = af.as_plan({"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI],
                       "nodes": [{"kind": "attn_head"}], "method": {"name": "atp"}})
    return af.load_backend(plan)


def test_transformer_lens_logits_match_hugging_face(backend):
    from transformers import AutoModelForCausalLM

    from atpframework.model.bundled import bundled_model_dir

    hf = AutoModelForCausalLM.from_pretrained(bundled_model_dir("bundled:smollm2-135m-instruct"), dtype=torch.float32).eval()
    tokens = torch.tensor([backend.tokenize(IOI["clean"], None)])
    with torch.no_grad():
        diff = (hf(tokens).logits - backend.forward(tokens, {})).abs().max().item()
    assert diff <= 1e-4, diff


def test_ioi_top_heads_by_atp_agree_with_exact_patching(backend):
    nodes = [{"kind": "attn_head", "positions": [-1]}]
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI], "nodes": nodes}
    atp = af.run(dict(plan, method={"name": "atp"}), backend=backend)
    exact = af.run(dict(plan, method={"name": "activation_patching", "nodes_per_pass": 30}), backend=backend)
    assert atp.metric_clean[0] > 0, "the model should prefer ' Mary' on the clean IOI prompt"
    assert torch.equal(atp.metric_clean, exact.metric_clean)

    def top5(result):
        return {(r.coords["layer"], r.coords["head"]) for r in result.top_k(5)}

    overlap = top5(atp) & top5(exact)
    assert len(overlap) >= 3, (top5(atp), top5(exact))


RECALL_LAYERS = [17, 20, 23, 24]
"""Layers holding most of the IOI pair's largest query/key/value effects (whole-model sweep: 7 of the top 10)."""


def _recall_figures(estimate, truth):
    """Recall of the true top-20 within the estimate's top-40, and the largest true effect ranked 100 or lower."""
    order = estimate.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    top20 = set(truth.argsort(descending=True)[:20].tolist())
    recall = len(top20 & set(order[:40].tolist())) / 20
    missed = truth[rank >= 100].max().item()
    return recall, missed


def test_atp_star_recalls_ioi_queries_keys_values_at_least_as_well_as_atp(backend):
    """Exact patching of every q, k, v node at every position of RECALL_LAYERS is the ground truth."""
    nodes = [{"kind": k, "layers": RECALL_LAYERS} for k in ("attn_q", "attn_k", "attn_v")]
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI], "nodes": nodes}

    def flat(result):
        return torch.cat([result[k].aggregate("mean_abs").flatten() for k in ("attn_q", "attn_k", "attn_v")])

    truth = flat(af.run(dict(plan, method={"name": "activation_patching", "nodes_per_pass": 128}), backend=backend))
    figures = {m: _recall_figures(flat(af.run(dict(plan, method={"name": m}), backend=backend)), truth) for m in ("atp", "atp_star")}
    (atp_recall, atp_missed), (star_recall, star_missed) = figures["atp"], figures["atp_star"]
    print("recall of true top-20 in top-40, largest true effect ranked >= 100:", figures)  # shown with pytest -rP
    assert truth.max() > 1.0, "the sweep should contain the IOI pair's large effects"
    assert star_recall >= atp_recall, figures
    assert star_missed <= atp_missed, figures
    assert star_recall >= 0.8, figures


def test_hugging_face_backend_matches_transformer_lens_on_ioi_atp_star(backend):
    """The raw Hugging Face backend (no conversion) against the TransformerLens backend on the bundled model."""
    nodes = [{"kind": "attn_head", "positions": [-1]}, {"kind": "mlp_neuron", "positions": [-1]}]
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI], "nodes": nodes, "method": {"name": "atp_star"}}
    hf_plan = dict(plan, model={"source": "bundled:smollm2-135m-instruct", "backend": "huggingface"})
    tl = af.run(plan, backend=backend)
    hf = af.run(hf_plan)
    for name in ("attn_head", "mlp_neuron"):
        a, b = tl[name].per_pair, hf[name].per_pair
        assert a.abs().max() > 0.1
        assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item(), name


def test_results_store_decoded_tokens_and_label_positions_with_them(backend, tmp_path):
    """The decoded tokens put the prompt back together, and nodes are labelled with the token at their position."""
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"}, "prompts": [IOI], "method": {"name": "atp"},
            "nodes": [{"kind": "attn_head", "layers": [20], "positions": [-1]}, {"kind": "resid", "layers": [8]}]}
    result = af.load_result(af.run(plan, backend=backend, output=tmp_path / "r.safetensors").save(tmp_path / "r.safetensors"))
    clean, noise = result.clean_strings[0], result.noise_strings[0]
    assert len(clean) == len(result.clean_tokens[0]) and "".join(clean).endswith(IOI["clean"])
    assert "".join(noise).endswith(IOI["noise"])
    changed = [(c, n) for c, n in zip(clean, noise) if c != n]
    assert changed == [(" John", " Mary")]  # the one token IOI's noise prompt swaps
    last = len(clean) - 1
    head = result.top_k(1, names=["attn_head"])[0]
    assert head.label() == f'attn_head L20 H{head.coords["head"]} @ " to" (pos {last})'
    john = clean.index(" John", clean.index(" store"))
    resid = result.to_dataframe().query("name == 'resid'").set_index("pos")
    assert resid.loc[john, "token"] == '" John"' and resid.loc[last, "token"] == '" to"'


def test_the_converted_weights_cache_gives_the_tensors_of_a_fresh_conversion(backend):
    """Bundled models load through the TransformerLens backend's cache of converted weights (``backends/tl_cache.py``):
    a cached load holds exactly the tensors of a conversion from the Hugging Face model, and computes the same logits."""
    from atpframework.backends.transformer_lens import TransformerLensBackend
    from atpframework.model.bundled import bundled_model_dir

    path = bundled_model_dir("bundled:smollm2-135m-instruct")
    assert list((path / "transformer_lens").glob("*.safetensors")), "the fixture's load should have stored an entry"

    def load(cache):
        return TransformerLensBackend._from_hf_dir(path, "bundled:smollm2-135m-instruct", torch.float32, "cpu",
                                                   "hooked_transformer", prepend_bos=False, cache=cache)

    cached, fresh = load(True).model, load(False).model
    ours, theirs = cached.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = torch.tensor([backend.tokenize(IOI["clean"], None)])
    with torch.no_grad():
        assert torch.equal(cached(tokens), fresh(tokens))
