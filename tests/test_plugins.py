"""Plugins: a third-party node type installed as a real distribution and run through the CLI, plus
in-process discovery, registration and contract checks."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Literal

import pytest
import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework import AbstractNode, NodeSpec, PlanError, PluginError, plugins
from atpframework.model.backend import ModelInfo

PLUGIN_DIST = os.path.join(os.path.dirname(__file__), "plugin_dist")
BUILTIN_KINDS = [
    "attn_head", "attn_k", "attn_q", "attn_v", "edge_k", "edge_logits", "edge_mlp", "edge_q", "edge_v", "mlp_neuron", "resid", "sae_error", "sae_latent",
]
PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]
PLUGIN_VS_BUILTIN = [{"kind": "mlp_neuron_sum"}, {"kind": "mlp_neuron", "positions": "each", "neurons": "all"}]


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin distribution pip-installed into a private directory (built from a copy,
    so the build leaves nothing in the source tree)."""
    root = tmp_path_factory.mktemp("plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(PLUGIN_DIST, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "atpf_example_plugin" / "__init__.py").is_file()
    return site




def load_plugin_module(site):
    """Import the installed plugin module by file, without putting its directory on sys.path."""
    spec = importlib.util.spec_from_file_location("_atpf_example_plugin_under_test", site / "atpf_example_plugin" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_plugin_matches_builtin(result):
    plugin, builtin = result["mlp_neuron_sum"], result["mlp_neuron"]
    assert plugin.kind == "mlp_neuron_sum" and builtin.kind == "mlp_neuron"
    assert plugin.dims == ("pair", "layer", "pos")
    assert builtin.dims == ("pair", "layer", "pos", "neuron") and builtin.index["neuron"] == "all"
    assert plugin.per_pair.shape == builtin.per_pair.shape[:-1] == (2, 2, 6)
    assert plugin.per_pair.abs().max() > 1e-4  # non-trivial effects, so the comparison means something
    torch.testing.assert_close(plugin.per_pair, builtin.per_pair[..., 0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- installed distribution
def test_installed_plugin_runs_through_the_cli(plugin_site, hf_dir, tmp_path):
    plan = {
        "model": {"source": str(hf_dir)},
        "prompts": PROMPTS,
        "nodes": PLUGIN_VS_BUILTIN,
        "method": {"name": "activation_patching", "nodes_per_pass": 5},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-m", "atpframework", "plan.json", "-o", "out.safetensors"],
        cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(plugin_site)), timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mlp_neuron_sum" in proc.stdout
    result = af.load_result(tmp_path / "out.safetensors")
    assert result.method == "activation_patching"
    assert json.loads(result.plan_json)["nodes"][0] == {"kind": "mlp_neuron_sum", "layers": "each", "name": None, "positions": "each"}
    assert_plugin_matches_builtin(result)


FAKE_ARCHITECTURE = """
import json, warnings
warnings.simplefilter("ignore")
import torch, transformers
import atpframework as af
from atpframework.backends.huggingface import HuggingFaceBackend
from atpframework.errors import BackendError

torch.manual_seed(0)
config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=61)
model = transformers.LlamaForCausalLM(config).eval()
plan = {"model": {"source": "in_memory", "backend": "huggingface"}, "prompts": PROMPTS,
        "nodes": [{"kind": "attn_q"}], "method": {"name": "atp_star"}}
as_llama = af.run(plan, backend=HuggingFaceBackend.from_model(model))["attn_q"].per_pair
model.config.model_type = "fake_llama"
try:
    fake = HuggingFaceBackend.from_model(model)
except BackendError as err:
    print(json.dumps({"error": str(err)}))
else:
    same = torch.equal(af.run(plan, backend=fake)["attn_q"].per_pair, as_llama)
    print(json.dumps({"adapter": type(fake.adapter).__name__, "same": same, "nonzero": bool(as_llama.abs().max() > 0)}))
"""


def test_a_third_party_architecture_adapter_registers_through_an_entry_point(plugin_site):
    """``atpf-example-plugin`` registers an adapter for model_type ``fake_llama``; without it the backend refuses."""
    code = f"PROMPTS = {PROMPTS!r}\n" + FAKE_ARCHITECTURE
    runs = {}
    for label, env in (("installed", subprocess_env(PYTHONPATH=str(plugin_site))), ("absent", subprocess_env())):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["installed"] == {"adapter": "FakeLlamaAdapter", "same": True, "nonzero": True}
    assert "does not support model_type 'fake_llama'" in runs["absent"]["error"]
    assert "atpframework.hf_architectures" in runs["absent"]["error"]


def test_discovery_lists_without_importing(plugin_site):
    """Listing reads entry points only; the installed plugin appears once its directory is on the path,
    and the JSON Schema picks it up. No model library (or plugin module) is imported along the way."""
    code = textwrap.dedent(
        f"""
        import json, sys
        import atpframework
        from atpframework import plugins
        before = plugins.available("nodes")
        imported = sorted(m for m in sys.modules if m.startswith("atpframework.nodes.") or m.startswith("atpf_example"))
        sys.path.insert(0, {str(plugin_site)!r})
        after = plugins.available("nodes")
        schema_kinds = sorted(atpframework.plan_json_schema()["properties"]["nodes"]["items"]["discriminator"]["mapping"])
        heavy = sorted(m for m in ("transformer_lens", "transformers", "sae_lens") if m in sys.modules)
        print(json.dumps(dict(before=before, imported=imported, after=after, schema=schema_kinds, heavy=heavy,
                              backends=plugins.available("backends"))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == BUILTIN_KINDS
    assert out["imported"] == []
    assert out["after"] == sorted(BUILTIN_KINDS + ["mlp_neuron_sum"])
    assert out["schema"] == out["after"]
    assert out["heavy"] == []
    assert out["backends"] == ["huggingface", "transformer_lens"]


def _zero_ablation_reference(model_dir, plan):
    """Zero ablation of every residual-stream node with plain transformers hooks: the input of block
    ``layer`` (of the final layer norm for the last layer) at ``pos`` set to zero; the logit difference at
    the last position, per prompt pair."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    n_layers = model.config.n_layer
    out = torch.zeros(len(plan["prompts"]), n_layers + 1, len(plan["prompts"][0]["clean"]))
    entry = [*model.transformer.h, model.transformer.ln_f]

    def logit_diff(tokens, pair, layer=None, pos=None):
        handle = None
        if layer is not None:
            def zero(module, args, kwargs):
                hidden = args[0].clone()
                hidden[:, pos] = 0
                return (hidden, *args[1:]), kwargs
            handle = entry[layer].register_forward_pre_hook(zero, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        return float(logits[pair["answer"]] - logits[pair["wrong_answer"]])

    for i, pair in enumerate(plan["prompts"]):
        base = logit_diff(pair["clean"], pair)
        for layer in range(n_layers + 1):
            for pos in range(len(pair["clean"])):
                out[i, layer, pos] = logit_diff(pair["clean"], pair, layer, pos) - base
    return out


def test_a_third_party_method_installs_appears_in_the_schema_and_runs_from_a_json_plan(plugin_site, hf_dir, tmp_path):
    """``atpf-example-plugin`` adds the method ``zero_ablation`` through an entry point, with no edit to the core."""
    env = subprocess_env(PYTHONPATH=str(plugin_site))
    schema = subprocess.run([sys.executable, "-m", "atpframework", "schema"], capture_output=True, text=True, env=env, timeout=120)
    assert schema.returncode == 0, schema.stderr
    methods = json.loads(schema.stdout)["properties"]["method"]["discriminator"]["mapping"]
    assert "zero_ablation" in methods and "atp_star" in methods
    plan = {"model": {"source": str(hf_dir), "backend": "huggingface"}, "prompts": PROMPTS,
            "nodes": [{"kind": "resid"}], "method": {"name": "zero_ablation", "nodes_per_pass": 5}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, "-m", "atpframework", "plan.json", "-o", "out.safetensors"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nodes by mean |score|" in proc.stdout and "GradDrop" not in proc.stdout  # named as its own scores
    result = af.load_result(tmp_path / "out.safetensors")
    assert result.method == "zero_ablation" and result.sign_convention.startswith("effect = metric(clean run with node <- 0)")
    reference = _zero_ablation_reference(hf_dir, plan)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(result["resid"].per_pair, reference, atol=1e-5, rtol=1e-5)
    # without the plugin on the path the method is unknown, and the message lists the installed ones
    absent = subprocess.run([sys.executable, "-m", "atpframework", "plan.json", "--dry-run"],
                            cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert absent.returncode == 2 and "unknown method 'zero_ablation'" in absent.stderr and "'atp_star'" in absent.stderr


def test_the_third_party_method_passes_the_conformance_kit(plugin_site):
    from atpframework.testing import check_method

    spec = importlib.util.spec_from_file_location("_atpf_zero_ablation", plugin_site / "atpf_example_plugin" / "zero_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugins.register("methods", "zero_ablation", module.ZeroAblation)
    try:
        report = check_method("zero_ablation", {"nodes_per_pass": 7})
    finally:
        plugins.unregister("methods", "zero_ablation")
    assert report["hooks"]["interrupted_runs"] >= 2 and report["round_trip"] == 6
    assert report["linear"].startswith("skipped")  # not activation patching: the kit holds it to no exactness claim


@pytest.mark.parametrize("name", ["atp", "atp_qkfix", "atp_graddrop", "atp_star", "activation_patching", "subsampling", "blocks", "hierarchical"])
def test_every_built_in_method_passes_the_conformance_kit(name):
    from atpframework.testing import check_method

    options = {"subsampling": {"samples": 8}, "hierarchical": {"budget": 8}, "blocks": {"block_size": 4}}.get(name)
    report = check_method(name, options)
    if name in ("atp", "atp_qkfix", "activation_patching"):
        assert report["linear"] < 1e-5  # held to exact patching where the metric is linear


@pytest.mark.parametrize("kind", ["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid"])
def test_every_built_in_node_type_passes_the_conformance_kit(kind):
    from atpframework.testing import check_node_type

    node = {"kind": kind, "positions": [-1]} if kind == "mlp_neuron" else {"kind": kind}
    assert check_node_type(node)["brute_force"] < 1e-4


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_both_built_in_backends_pass_the_conformance_kit(backend, hf_dir):
    from atpframework.testing import check_backend

    plan = af.as_plan({"model": {"source": str(hf_dir), "backend": backend}, "prompts": PROMPTS,
                       "nodes": [{"kind": "resid"}], "method": {"name": "atp"}})
    report = check_backend(lambda: af.load_backend(plan))
    assert report["brute_force"] < 1e-4 and report["hooks"]["interrupted_runs"] == 3


def test_the_conformance_kit_catches_a_method_that_leaks_hooks_or_tensors_or_miscounts_passes():
    """The kit can fail: a method whose forward hooks stay behind, one that runs a pass it does not declare,
    and one that keeps each batch's tensors alive."""
    from atpframework.methods.patching import ActivationPatching
    from atpframework.testing import check_method

    class Leaky(ActivationPatching):
        def run_batch(self, run):
            run.backend.model.blocks[0].register_forward_hook(lambda *args: None)
            return super().run_batch(run)

    class Miscounted(ActivationPatching):
        def run_batch(self, run):
            run.backend.forward(run.clean_tokens, {})  # an undeclared extra pass
            return super().run_batch(run)

    kept = []

    class Hoarding(ActivationPatching):
        def run_batch(self, run):
            scores = super().run_batch(run)
            kept.append(scores.metric_clean)  # every batch's tensors stay alive
            return scores

    for cls, message in ((Leaky, "hooks left on the model"), (Miscounted, "forward passes; the plan's steps declare"),
                         (Hoarding, "leaves 3 tensors alive after three batches")):
        plugins.unregister("methods", "activation_patching")
        plugins.register("methods", "activation_patching", cls)
        try:
            with pytest.raises(AssertionError, match=message):
                check_method("activation_patching", nodes=[{"kind": "attn_head", "positions": [-1]}])
        finally:
            plugins.unregister("methods", "activation_patching")


# ----------------------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def registered():
    """Register node classes for one test; always unregister."""
    names = []

    def register(cls):
        plugins.register("nodes", cls.kind, cls)
        names.append(cls.kind)
        return cls

    yield register
    for name in names:
        plugins.unregister("nodes", name)


def test_plugin_first_order_effect_matches_builtin(plugin_site, registered, model):
    """The plugin's own elementwise_effect (sum over neurons) under AtP equals mlp_neuron with neurons 'all'."""
    module = load_plugin_module(plugin_site)
    assert issubclass(module.MlpNeuronSum, AbstractNode) and module.MlpNeuronSum.spec_type.__name__ == "MlpNeuronSumSpec"
    registered(module.MlpNeuronSum)
    result = af.run(make_plan(PLUGIN_VS_BUILTIN), model=model)
    assert_plugin_matches_builtin(result)


class WholeResidSpec(NodeSpec):
    kind: Literal["test_whole_resid"]


class WholeResid(AbstractNode):
    """The residual stream at a boundary, every position and feature as one node (no index axes)."""

    kind = "test_whole_resid"
    spec_type = WholeResidSpec
    site = "resid"
    index_dims = ()
    n_feature_dims = 2

    def layer_range(self, info: ModelInfo) -> range:
        return range(info.n_layers + 1)


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
def test_register_a_node_class_defined_here(registered, model, method):
    with pytest.raises(PlanError, match=r"nodes\[0\]\.kind: unknown node 'test_whole_resid'"):
        af.parse_plan(make_plan([{"kind": "test_whole_resid"}]))
    registered(WholeResid)
    assert "test_whole_resid" in plugins.available("nodes")
    plan = make_plan([{"kind": "test_whole_resid", "layers": [1, 2]}, {"kind": "resid", "layers": [1, 2], "positions": "all"}], method=method)
    parsed = af.parse_plan(plan)
    assert type(parsed.nodes[0]) is WholeResidSpec
    with pytest.raises(PlanError, match=r"nodes\[0\]\.positions: unknown key"):
        af.parse_plan(make_plan([{"kind": "test_whole_resid", "positions": "all"}]))
    result = af.run(plan, model=model)
    mine, builtin = result["test_whole_resid"], result["resid"]
    assert mine.dims == ("pair", "layer") and mine.per_pair.shape == (2, 2)
    assert mine.per_pair.abs().min() > 1e-5
    torch.testing.assert_close(mine.per_pair, builtin.per_pair[:, :, 0], atol=1e-5, rtol=1e-5)


def test_unregister_removes_the_kind(registered):
    registered(WholeResid)
    assert af.parse_plan(make_plan([{"kind": "test_whole_resid"}])).nodes[0].kind == "test_whole_resid"
    plugins.unregister("nodes", "test_whole_resid")
    assert "test_whole_resid" not in plugins.available("nodes")
    with pytest.raises(PlanError, match="unknown node 'test_whole_resid'"):
        af.parse_plan(make_plan([{"kind": "test_whole_resid"}]))


def test_registering_a_non_node_class_raises_plugin_error():
    class NotANode:
        kind = "not_a_node"

    with pytest.raises(PluginError, match=r"node plugin 'not_a_node' is .*NotANode.*not a subclass of AbstractNode"):
        plugins.register("nodes", "not_a_node", NotANode)
    with pytest.raises(PluginError, match="not a subclass of AbstractNode"):
        plugins.register("nodes", "not_a_node", NotANode())  # an instance, not a class
    with pytest.raises(PluginError, match="not a subclass of AbstractBackend"):
        plugins.register("backends", "whole_resid", WholeResid)
    assert "not_a_node" not in plugins.available("nodes")


def test_registering_under_another_name_raises_plugin_error():
    with pytest.raises(PluginError, match=r"registered as 'other_name' declares the name 'test_whole_resid'"):
        plugins.register("nodes", "other_name", WholeResid)
    assert "other_name" not in plugins.available("nodes")


def test_plugin_errors_are_lookup_errors_and_atpf_errors():
    with pytest.raises(LookupError):
        plugins.load("nodes", "no_such_kind")
    with pytest.raises(af.AtpfError, match=r"installed: attn_head.*'atpframework\.nodes'"):
        plugins.load("nodes", "no_such_kind")
