"""The quickstart pages run as written: each page's ```python blocks are executed in order, in one namespace,
in a fresh working directory. What they return is then checked against patching done here by hand, through
the model library's own hooks (TransformerLens hook points, PyTorch module hooks, the SAE's encode/decode),
not through atpframework's engine."""

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_page(page: str, tmp_path, monkeypatch) -> dict:
    """Execute every ```python block of docs/<page> in order; a block that raises fails the test, named."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 3, f"{page}: expected its code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/{page} (code block {number})", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"docs/{page}: code block {number} raised {type(err).__name__}: {err}\n{block}") from err
    return namespace


def needs_bundled_model() -> None:
    pytest.importorskip("gguf")
    from atpframework.errors import BackendError
    from atpframework.model.bundled import bundled_model_dir

    try:
        bundled_model_dir("bundled:smollm2-135m-instruct")
    except BackendError as err:
        pytest.skip(str(err))


def verified_nodes(result) -> list[tuple[str, dict, torch.Tensor]]:
    """(selection, model index per axis, exact effect per pair) of every node ``verify`` stored."""
    out = []
    for name, verified in result.verified.items():
        scores = result[name]
        shape = scores.per_pair.shape[1:]
        for i, flat in enumerate(verified.index.tolist()):
            at = [int(c) for c in torch.unravel_index(torch.tensor(flat), shape)]
            coords = {dim: scores.index[dim][c] for dim, c in zip(scores.dims[1:], at)}
            out.append((name, coords, verified.effects[:, i]))
    return out


def strongest(nodes):
    return max(nodes, key=lambda node: float(node[2].abs().mean()))


# -------------------------------------------------------------------------------------- TransformerLens
@pytest.mark.smollm2
def test_quickstart_transformerlens(tmp_path, monkeypatch, capsys):
    needs_bundled_model()
    ns = run_page("quickstart-transformerlens.md", tmp_path, monkeypatch)
    assert "HookedTransformer 30 layers, 9 heads" in capsys.readouterr().out
    model, estimate, verified, plan = ns["model"], ns["estimate"], ns["verified"], ns["plan"]
    nodes = verified_nodes(verified)
    assert len(nodes) == 10

    # The page's claim: AtP*'s top head is the strongest of the exactly verified ones.
    name, coords, effect = strongest(nodes)
    top = estimate.top_k(1)[0]
    assert (name, top.coords) == ("heads", coords)
    assert (coords["layer"], coords["head"]) == (23, 3)  # SmolLM2's IOI head, as in docs/cli.md's atpf show example

    # Its exact effect, patched here through the HookedTransformer's own hook point.
    pair = plan["prompts"][0]
    clean = model.to_tokens(pair["clean"], prepend_bos=False)
    noise = model.to_tokens(pair["noise"], prepend_bos=False)
    assert clean[0].tolist() == verified.clean_tokens[0]
    answer, wrong = model.to_single_token(pair["answer"]), model.to_single_token(pair["wrong_answer"])
    hook = f"blocks.{coords['layer']}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(noise, names_filter=hook)

        def patch(z, hook):
            z[:, -1, coords["head"]] = cache[hook.name][:, -1, coords["head"]]
            return z

        def logit_diff(logits):
            return float(logits[0, -1, answer] - logits[0, -1, wrong])

        base = logit_diff(model(clean))
        patched = logit_diff(model.run_with_hooks(clean, fwd_hooks=[(hook, patch)]))
    assert base == pytest.approx(float(verified.metric_clean[0]), abs=1e-3)
    assert float(effect[0]) == pytest.approx(patched - base, abs=1e-3)
    assert abs(patched - base) > 1.0


# ----------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.smollm2
def test_quickstart_huggingface(tmp_path, monkeypatch):
    needs_bundled_model()
    ns = run_page("quickstart-huggingface.md", tmp_path, monkeypatch)
    model, estimate, verified = ns["model"], ns["estimate"], ns["verified"]
    assert ns["again"].method == "atp" and ns["again"].model["architecture"] == "LlamaForCausalLM"
    assert verified.plan["model"]["backend"] == "huggingface", "the backend picked from the model object is recorded"
    nodes = verified_nodes(verified)
    assert len(nodes) == 20 and {name for name, _, _ in nodes} == {"heads", "neurons"}
    name, coords, _ = strongest(nodes)
    assert (name, estimate.top_k(1)[0].coords) == ("heads", coords), "the top estimate is the strongest verified node"

    clean = torch.tensor(verified.clean_tokens)
    noise = torch.tensor(verified.noise_tokens)
    tokenizer = ns["tokenizer"]
    prompts = ns["plan"]["prompts"]
    assert clean.tolist() == [tokenizer(p["clean"])["input_ids"] for p in prompts]
    answers = torch.tensor([tokenizer(p["answer"])["input_ids"] for p in prompts])[:, 0]
    wrongs = torch.tensor([tokenizer(p["wrong_answer"])["input_ids"] for p in prompts])[:, 0]
    d_head = model.config.hidden_size // model.config.num_attention_heads

    def logit_diff(logits):
        rows = torch.arange(len(logits))
        return logits[rows, -1, answers] - logits[rows, -1, wrongs]

    def module_and_slice(name, coords):
        """The module whose input holds the node, and the slice of that input: heads enter o_proj, neurons down_proj."""
        layer = model.model.layers[coords["layer"]]
        if name == "heads":
            h = coords["head"]
            return layer.self_attn.o_proj, (slice(None), coords["pos"], slice(h * d_head, (h + 1) * d_head))
        return layer.mlp.down_proj, (slice(None), coords["pos"], coords["neuron"])

    printed = sorted(nodes, key=lambda node: -float(node[2].abs().mean()))[:8]  # the rows the page prints
    assert "neurons" in {name for name, _, _ in printed}
    with torch.no_grad():
        base = logit_diff(model(clean).logits)
        torch.testing.assert_close(base, verified.metric_clean, atol=1e-3, rtol=0)
        noise_values: dict[int, torch.Tensor] = {}
        handles = []
        for i, (name, coords, _) in enumerate(printed):  # one noise pass records every node's noise-run value
            module, where = module_and_slice(name, coords)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, i=i, where=where: noise_values.__setitem__(i, args[0][where].clone())))  # None: input unchanged
        model(noise)
        for handle in handles:
            handle.remove()
        assert sorted(noise_values) == list(range(len(printed)))
        for i, (name, coords, effect) in enumerate(printed):
            module, where = module_and_slice(name, coords)
            value = noise_values[i]

            def patch(m, args, where=where, value=value):
                x = args[0].clone()
                x[where] = value
                return (x,)

            handle = module.register_forward_pre_hook(patch)
            patched = logit_diff(model(clean).logits)
            handle.remove()
            torch.testing.assert_close(effect, patched - base, atol=1e-3, rtol=1e-4, msg=f"{name} {coords}")


# ----------------------------------------------------------------------------------------------- sae_lens
def test_quickstart_sae(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sae_lens")
    ns = run_page("quickstart-sae.md", tmp_path, monkeypatch)
    assert capsys.readouterr().out.rstrip().endswith("True"), "the SAE loaded from disk gives the same scores"
    model, sae, plan, exact = ns["model"], ns["sae"], ns["plan"], ns["exact"]
    latents = exact["latents"]
    assert latents.dims == ("pair", "layer", "pos", "latent") and latents.per_pair.shape[-1] == sae.cfg.d_sae

    # Every latent at every position, patched here: encode both runs, swap one latent, decode, keep the clean error.
    hook = "blocks.1.hook_resid_pre"
    expected = []
    with torch.no_grad():
        for pair in plan["prompts"]:
            clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
            _, clean_cache = model.run_with_cache(clean, names_filter=hook)
            _, noise_cache = model.run_with_cache(noise, names_filter=hook)
            x = clean_cache[hook][0]
            f_clean, f_noise = sae.encode(x), sae.encode(noise_cache[hook][0])
            error = x - sae.decode(f_clean)
            n_pos, d_sae = f_clean.shape
            f = f_clean.repeat(n_pos * d_sae, 1, 1)
            rows = torch.arange(n_pos * d_sae)
            pos, latent = rows // d_sae, rows % d_sae
            f[rows, pos, latent] = f_noise[pos, latent]
            replaced = sae.decode(f) + error
            logits = model.run_with_hooks(clean.repeat(len(rows), 1), fwd_hooks=[(hook, lambda act, hook: replaced)])
            clean_logits = model(clean)
            metric = logits[:, -1, pair["answer"]] - logits[:, -1, pair["wrong_answer"]]
            base = clean_logits[0, -1, pair["answer"]] - clean_logits[0, -1, pair["wrong_answer"]]
            expected.append((metric - base).reshape(n_pos, d_sae))
    expected = torch.stack(expected)
    torch.testing.assert_close(latents.per_pair[:, 0], expected, atol=1e-4, rtol=1e-4)
    top = exact.top_k(1, names=["latents"])[0]
    flat = int(expected.abs().mean(0).argmax())
    assert (top.coords["pos"], top.coords["latent"]) == divmod(flat, sae.cfg.d_sae)
