"""SAE latents and error terms: the splice keeps logits, first-order completeness, exactness where linear,
both error-gradient semantics, loading from disk, and clear errors for SAEs that do not fit."""

import pytest
import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.engine.runner import batch_runs, compile_plan
from atpframework.methods.atp import AtpGradDrop
from atpframework.model.sites import Site
from atpframework.plans.metrics import resolve_metric

sae_lens = pytest.importorskip("sae_lens")
D_MODEL, D_SAE = 32, 40


def make_sae(arch: str, d_in: int = D_MODEL, hook_name: str = "blocks.1.hook_resid_pre", seed: int = 0, **extra):
    """A random sae_lens SAE of one architecture, recording where it attaches."""
    gen = torch.Generator().manual_seed(seed)
    common = dict(d_in=d_in, d_sae=D_SAE, **extra)
    if arch == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    elif arch == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=6, **common))
    elif arch == "transcoder":
        sae = sae_lens.Transcoder(sae_lens.TranscoderConfig(d_out=D_MODEL, apply_b_dec_to_input=False, **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sae.cfg.metadata.hook_name = hook_name
    if arch == "transcoder":
        sae.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    return sae.eval()


ARCHS = {
    "standard": {},
    "jumprelu": {},
    "topk": {},
    "transcoder": {"hook_name": "blocks.1.ln2.hook_normalized"},
}


def sae_plan(nodes, sae_name="s", error_gradient="pass_through", method="atp", **extra):
    return make_plan(nodes, method=method, saes=[{"name": sae_name, "error_gradient": error_gradient}], **extra)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("semantics", ["pass_through", "detached"])
def test_splice_keeps_the_logits(arch, semantics):
    model = tiny_model()
    sae = make_sae(arch, **ARCHS[arch])
    plan = af.as_plan(sae_plan([{"kind": "sae_latent", "sae": "s"}], error_gradient=semantics))
    backend = af.api.splice_saes(plan, af.load_backend(plan, model=model), {"s": sae})
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 2, 4, 5, 1]])
    site = backend.attached["s"].site
    seen = {}
    with torch.no_grad():
        spliced = backend.forward(tokens, {Site(site.name, site.layer, "sae_latents:s"): [lambda f: seen.setdefault("f", f)]})
        plain = model(tokens)
    assert seen["f"].shape == (2, 6, D_SAE) and seen["f"].abs().max() > 0, "the splice must have run"
    assert (spliced - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_latent_atp_equals_patching_when_the_path_after_the_decoder_is_linear(arch):
    """SAE on the final residual stream of a model without final normalization: logits are linear in the latents."""
    model = tiny_model(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None)
    sae = make_sae(arch, hook_name="blocks.0.hook_resid_post")
    nodes = [{"kind": "sae_latent", "sae": "s"}, {"kind": "sae_error", "sae": "s"}]
    exact = af.run(sae_plan(nodes, method={"name": "activation_patching", "nodes_per_pass": 64}), model=model, saes={"s": sae})
    atp = af.run(sae_plan(nodes), model=model, saes={"s": sae})
    for kind in ("sae_latent", "sae_error"):
        assert exact[kind].per_pair.abs().max() > 1e-3
        torch.testing.assert_close(atp[kind].per_pair, exact[kind].per_pair, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_latents_plus_error_sum_to_the_whole_site(arch):
    """First-order completeness: decode is affine, so sum_i df_i (W_dec_i . g) + de . g = dx . g."""
    model = tiny_model()
    sae = make_sae(arch, **ARCHS[arch])
    site = "mlp_out" if arch == "transcoder" else "resid"
    nodes = [{"kind": "sae_latent", "sae": "s"}, {"kind": "sae_error", "sae": "s"}]
    whole = [{"kind": "resid", "layers": [1]}] if site == "resid" else []
    result = af.run(sae_plan(nodes + whole), model=model, saes={"s": sae})
    parts = result["sae_latent"].per_pair.sum(-1) + result["sae_error"].per_pair  # pair layer pos
    if site == "resid":
        reference = result["resid"].per_pair
    else:  # AtP of the whole MLP output, computed with TransformerLens directly
        reference = _whole_site_atp(model, "blocks.1.hook_mlp_out")
    assert reference.abs().max() > 1e-2
    torch.testing.assert_close(parts, reference, rtol=0, atol=1e-5)


def _whole_site_atp(model, hook_name):
    out = []
    for pair in make_plan([])["prompts"]:
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])
        with torch.no_grad():
            _, noise_cache = model.run_with_cache(noise)
        kept = {}
        logits = model.run_with_hooks(clean, fwd_hooks=[(hook_name, lambda x, hook: kept.setdefault("x", x))])
        metric = logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong_answer"]]
        (grad,) = torch.autograd.grad(metric, [kept["x"]])
        out.append(((noise_cache[hook_name] - kept["x"].detach()) * grad).sum(-1))  # 1 pos
    return torch.stack(out)


def test_error_gradient_semantics_differ_where_they_must():
    """An SAE whose encoder reads nothing reconstructs nothing: everything upstream flows through the error.
    pass_through keeps the unmodified model's gradients upstream; detached zeroes them; downstream agrees."""
    model = tiny_model()
    sae = make_sae("standard")
    with torch.no_grad():
        sae.W_enc.zero_()
    nodes = [{"kind": "attn_head"}, {"kind": "mlp_neuron"}, {"kind": "sae_error", "sae": "s"}]
    plain = af.run(make_plan([{"kind": "attn_head"}, {"kind": "mlp_neuron"}]), model=model)
    through = af.run(sae_plan(nodes, error_gradient="pass_through"), model=model, saes={"s": sae})
    detached = af.run(sae_plan(nodes, error_gradient="detached"), model=model, saes={"s": sae})
    upstream, downstream = (slice(None), 0), (slice(None), 1)  # layer 0 feeds the SAE at resid 1
    for kind in ("attn_head", "mlp_neuron"):
        assert plain[kind].per_pair[upstream].abs().max() > 1e-2
        torch.testing.assert_close(through[kind].per_pair, plain[kind].per_pair, rtol=1e-6, atol=1e-6)
        assert detached[kind].per_pair[upstream].abs().max() == 0
        torch.testing.assert_close(detached[kind].per_pair[downstream], plain[kind].per_pair[downstream])
    # the error node itself carries the same estimate either way
    torch.testing.assert_close(through["sae_error"].per_pair, detached["sae_error"].per_pair)


def test_graddrop_terms_stay_complete_for_latents():
    """Per GradDrop term, latents + error equal the whole residual site: GradDrop treats latents like the site."""
    model = tiny_model(n_layers=3)
    sae = make_sae("standard")
    plan = af.as_plan(sae_plan([{"kind": "sae_latent", "sae": "s"}, {"kind": "sae_error", "sae": "s"},
                                {"kind": "resid", "layers": [1]}], method="atp_graddrop"))
    backend = af.api.splice_saes(plan, af.load_backend(plan, model=model), {"s": sae})
    compiled = compile_plan(plan, backend)
    (run,) = list(batch_runs(compiled, backend, resolve_metric(plan.metric, None)))
    out = AtpGradDrop(keep_terms=True).run_batch(run)
    parts = out.terms["sae_latent"].sum(-1) + out.terms["sae_error"]  # term batch layer pos
    assert out.terms["resid"].abs().max() > 1e-2
    torch.testing.assert_close(parts, out.terms["resid"], rtol=0, atol=1e-5)
    atp_star = af.run(dict(plan.model_dump(by_alias=True), method={"name": "atp_star"}), model=model, saes={"s": sae})
    assert (atp_star["sae_latent"].per_pair >= 0).all() and atp_star["sae_latent"].per_pair.max() > 0


def test_sae_from_a_local_directory_runs_from_a_json_plan(tmp_path):
    sae = make_sae("jumprelu")
    sae.save_model(tmp_path / "sae")
    model = tiny_model()
    plan = make_plan([{"kind": "sae_latent", "sae": "s", "positions": [-1]}], saes=[{"name": "s", "path": str(tmp_path / "sae")}])
    from_disk = af.run(plan, model=model, output=tmp_path / "r.safetensors")
    in_memory = af.run(sae_plan([{"kind": "sae_latent", "sae": "s", "positions": [-1]}]), model=model, saes={"s": sae})
    torch.testing.assert_close(from_disk["sae_latent"].per_pair, in_memory["sae_latent"].per_pair)
    loaded = af.load_result(tmp_path / "r.safetensors")
    assert loaded["sae_latent"].dims == ("pair", "layer", "pos", "latent")
    assert loaded["sae_latent"].index["layer"] == [1]
    assert loaded.model["saes"][0]["architecture"] == "jumprelu" and loaded.model["saes"][0]["site"] == "resid[layer=1]"
    torch.testing.assert_close(loaded["sae_latent"].per_pair, from_disk["sae_latent"].per_pair)


def test_saes_that_do_not_fit_are_refused():
    model = tiny_model()
    with pytest.raises(af.PlanError, match=r"saes\[0\]: the SAE's d_in is 16 but site resid\[layer=1\] of this model has width 32"):
        af.run(sae_plan([{"kind": "sae_latent", "sae": "s"}]), model=model, saes={"s": make_sae("standard", d_in=16)})
    with pytest.raises(af.PlanError, match=r"saes\[0\]\.site: the SAE does not record a recognised hook"):
        af.run(sae_plan([{"kind": "sae_latent", "sae": "s"}]), model=model, saes={"s": make_sae("standard", hook_name="blocks.1.weird")})
    with pytest.raises(af.PlanError, match=r"saes\[0\]\.site: layer 7 out of range"):
        af.run(sae_plan([{"kind": "sae_latent", "sae": "s"}]), model=model, saes={"s": make_sae("standard", hook_name="blocks.7.hook_resid_pre")})
    with pytest.raises(af.PlanError, match=r"nodes\[0\]\.sae: unknown SAE 'other'; the plan's saes: \['s'\]"):
        af.parse_plan(sae_plan([{"kind": "sae_latent", "sae": "other"}]))
    with pytest.raises(af.PlanError, match=r"nodes\[0\]\.latents: latent index 40 out of range"):
        af.run(sae_plan([{"kind": "sae_latent", "sae": "s", "latents": [40]}]), model=model, saes={"s": make_sae("standard")})
    with pytest.raises(af.PlanError, match=r"saes\[0\]: SAE 's' has no path or release"):
        af.run(sae_plan([{"kind": "sae_latent", "sae": "s"}]), model=model)


def test_pretrained_release_path_reports_the_hub_failure_clearly():
    model = tiny_model()
    plan = make_plan([{"kind": "sae_latent", "sae": "s"}], saes=[{"name": "s", "release": "gpt2-small-res-jb", "sae_id": "blocks.1.hook_resid_pre"}])
    with pytest.raises(af.BackendError, match=r"saes\[0\]: could not load pretrained SAE release='gpt2-small-res-jb'"):
        af.run(plan, model=model)


@pytest.mark.parametrize("per", ["position", "selection"])
def test_keep_top_stores_the_largest_latents_sparsely_and_round_trips(per, tmp_path):
    model = tiny_model()
    sae = make_sae("standard")
    dense = af.run(sae_plan([{"kind": "sae_latent", "sae": "s"}]), model=model, saes={"s": sae})["sae_latent"].per_pair
    node = {"kind": "sae_latent", "sae": "s", "keep_top": 3, "keep_top_per": per}
    result = af.run(sae_plan([node]), model=model, saes={"s": sae}, output=tmp_path / "sparse.safetensors")
    sparse = result["sae_latent"].per_pair
    assert sparse.is_sparse and sparse.shape == dense.shape
    kept = sparse.to_dense()
    # independent reference: per pair (and position), the 3 entries of largest |score| of the dense run
    groups = dense.reshape(dense.shape[0], -1, dense.shape[-1]) if per == "position" else dense.reshape(dense.shape[0], 1, -1)
    threshold = groups.abs().topk(3, dim=-1).values[..., -1:]
    expected = torch.where(groups.abs() >= threshold, groups, 0.0).reshape(dense.shape)
    torch.testing.assert_close(kept, expected)
    assert sparse._nnz() == dense.shape[0] * (3 * dense.shape[2] if per == "position" else 3)
    loaded = af.load_result(tmp_path / "sparse.safetensors")
    assert loaded["sae_latent"].per_pair.is_sparse
    torch.testing.assert_close(loaded["sae_latent"].per_pair.to_dense(), kept)
    torch.testing.assert_close(loaded["sae_latent"].aggregate(), expected.abs().mean(0))
    assert loaded.top_k(1)[0].score == pytest.approx(expected.abs().mean(0).max().item())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sparse.safetensors"), framework="pt") as f:
        assert {"scores.sae_latent.indices", "scores.sae_latent.values"} <= set(f.keys())
        assert "scores.sae_latent" not in set(f.keys())


# ------------------------------------------------------------- the shipped SAE example without its trained SAE
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SAE_EXAMPLE = REPO / "examples" / "ioi_smollm2_sae.json"


def _refuse_model_loads(monkeypatch):
    """Make every built-in backend's ``load`` record the call and fail: nothing may load a model."""
    from atpframework.backends.huggingface import HuggingFaceBackend
    from atpframework.backends.transformer_lens import TransformerLensBackend

    calls = []

    def load(cls, source, **options):
        calls.append(source)
        raise AssertionError(f"the model {source!r} was loaded before the SAE path was checked")

    for backend in (TransformerLensBackend, HuggingFaceBackend):
        monkeypatch.setattr(backend, "load", classmethod(load))
    return calls


def _train_sae_options():
    """The options scripts/train_sae.py takes and where it writes by default, read from the script itself."""
    import re

    text = (REPO / "scripts" / "train_sae.py").read_text()
    options = set(re.findall(r'add_argument\("(--[a-z-]+)"', text))
    default_out = re.search(r'Path\(f"(results/saes/smollm2-res)\{args\.layer\}"\)', text)
    return options, default_out.group(1) if default_out else None


def test_the_sae_example_without_its_sae_fails_before_the_model_loads_with_the_command_to_make_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from atpframework.cli import main

    calls = _refuse_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)  # SAE paths start at the working directory: no results/saes/ here
    sae_path = af.load_plan(SAE_EXAMPLE).saes[0].path
    options, default_out = _train_sae_options()
    assert {"--layer", "--out"} <= options and sae_path == f"{default_out}12", "the hint must match the script"
    command = f"python scripts/train_sae.py --layer 12 --out {sae_path}"

    result = CliRunner().invoke(main, [str(SAE_EXAMPLE)])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr
    assert message.startswith("error: saes[0].path: 'results/saes/smollm2-res12' does not exist"), message
    assert command in message and str(tmp_path) in message, message
    assert "Traceback" not in message

    with pytest.raises(af.PlanError) as err:  # the Python API, the same check
        af.run(SAE_EXAMPLE)
    assert str(err.value).startswith("saes[0].path: 'results/saes/smollm2-res12' does not exist") and command in str(err.value)
    assert calls == []


def test_an_sae_path_without_cfg_json_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    calls = _refuse_model_loads(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    plan = {"model": {"source": "bundled:smollm2-135m-instruct"},
            "prompts": [{"clean": "a b", "noise": "a c", "answer": " b", "wrong_answer": " c"}],
            "saes": [{"name": "a", "path": str(tmp_path / "empty")}, {"name": "b", "path": str(tmp_path / "weights.safetensors")},
                     {"name": "c", "path": str(tmp_path / "given")}],
            "nodes": [{"kind": "sae_latent", "sae": "a"}], "method": {"name": "atp"}}
    with pytest.raises(af.PlanError) as err:
        af.run(plan, saes={"c": make_sae("standard")})  # "c" is passed as an object: its path is not read
    message = str(err.value)
    assert message.startswith(f"saes[0].path: '{tmp_path / 'empty'}' is a directory without cfg.json"), message
    assert f"saes[1].path: '{tmp_path / 'weights.safetensors'}' is a file, not a directory" in message
    assert "saes[2]" not in message and "train_sae" not in message  # not a train_sae.py output: no such hint
    assert calls == []
