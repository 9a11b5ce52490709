"""Node plugins with axes of their own, the typed binding context, and plugins checked when they load:
a ``resid_channel`` node type (one node per residual-stream channel) against a brute-force loop written
here, and broken plugins refused at register/load time with a ``PluginError`` naming them."""

import re
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework import AbstractNode, NodeSpec, PluginError, Selection, plugins
from atpframework.methods.patching import ActivationPatching
from atpframework.model.backend import AbstractBackend, ModelInfo
from atpframework.model.node import SELECTION_FIELDS, AxisSelection, BindingContext, BoundNodes, SparseOutput
from atpframework.model.sites import Site

CHANNELS = [0, 5, 31]
POSITIONS = [1, -1]


class ResidChannelSpec(NodeSpec):
    """Select single channels of the residual stream."""

    kind: Literal["resid_channel"]
    positions: Selection = "each"
    channels: Selection = "each"


class ResidChannel(AbstractNode):
    """The residual stream at a boundary, one node per (position, channel): a new index axis ``channel``."""

    kind = "resid_channel"
    spec_type = ResidChannelSpec
    site = "resid"
    index_dims = ("pos", "channel")
    n_feature_dims = 0
    selection_fields = {**SELECTION_FIELDS, "channel": "channels"}
    axis_sizes = {"channel": lambda context: context.info.d_model}

    def layer_range(self, info: ModelInfo) -> range:
        return range(info.n_layers + 1)


@pytest.fixture
def resid_channel():
    plugins.register("nodes", "resid_channel", ResidChannel)
    yield ResidChannel
    plugins.unregister("nodes", "resid_channel")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _brute_force(model, plan, layers, positions, channels):
    """Per pair, layer, position and channel: the logit difference at the last position with that one
    residual-stream entry set to its noise-run value, minus the clean one (plain TransformerLens hooks)."""
    n = model.cfg.n_layers

    def hook_name(layer):
        return f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"

    out = torch.zeros(len(plan["prompts"]), len(layers), len(positions), len(channels))
    for i, pair in enumerate(plan["prompts"]):
        clean, noise = torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]])

        def logit_diff(logits, pair=pair):
            return float(logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong_answer"]])

        with torch.no_grad():
            _, cache = model.run_with_cache(noise)
            base = logit_diff(model(clean))
            for a, layer in enumerate(layers):
                for b, pos in enumerate(positions):
                    for c, channel in enumerate(channels):
                        value = cache[hook_name(layer)][0, pos, channel]

                        def patch(act, hook, pos=pos, channel=channel, value=value):
                            act = act.clone()
                            act[:, pos, channel] = value
                            return act

                        patched = model.run_with_hooks(clean, fwd_hooks=[(hook_name(layer), patch)])
                        out[i, a, b, c] = logit_diff(patched) - base
    return out


def test_a_node_type_with_a_new_axis_equals_brute_force_patching(resid_channel, model, tmp_path):
    layers = [0, 2]
    node = {"kind": "resid_channel", "layers": layers, "positions": POSITIONS, "channels": CHANNELS}
    plan = make_plan([node], method={"name": "activation_patching", "nodes_per_pass": 4})
    result = af.run(plan, model=model)
    scores = result["resid_channel"]
    assert scores.dims == ("pair", "layer", "pos", "channel")
    assert scores.index["channel"] == CHANNELS and scores.index["pos"] == POSITIONS
    reference = _brute_force(model, plan, layers, POSITIONS, CHANNELS)
    assert reference.abs().max() > 1e-3  # effects large enough for the comparison to mean something
    torch.testing.assert_close(scores.per_pair, reference, atol=1e-5, rtol=1e-5)
    # result files store the new axis by name, and read it back
    result.save(tmp_path / "r.safetensors")
    loaded = af.load_result(tmp_path / "r.safetensors")["resid_channel"]
    assert loaded.dims == scores.dims and loaded.index["channel"] == CHANNELS
    torch.testing.assert_close(loaded.per_pair, scores.per_pair, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
def test_all_channels_is_the_built_in_resid_node(resid_channel, model, method):
    """``channels: "all"`` patches the whole residual vector at a position: the built-in ``resid`` node.
    Under AtP the per-channel scores also sum to it (first-order scores are linear)."""
    plan = make_plan([
        {"kind": "resid_channel", "name": "merged", "channels": "all"},
        {"kind": "resid_channel", "name": "each"},
        {"kind": "resid"},
    ], method=method)
    result = af.run(plan, model=model)
    merged, each, builtin = result["merged"].per_pair, result["each"].per_pair, result["resid"].per_pair
    assert merged.shape == (2, 3, 6, 1) and each.shape == (2, 3, 6, 32)
    assert builtin.abs().max() > 1e-3
    torch.testing.assert_close(merged[..., 0], builtin, atol=1e-5, rtol=1e-5)
    if method == "atp":
        torch.testing.assert_close(each.sum(-1), builtin, atol=1e-4, rtol=1e-4)


def test_the_new_axis_is_checked_against_its_size(resid_channel, model):
    plan = make_plan([{"kind": "resid_channel", "channels": [3, 32]}])
    with pytest.raises(af.PlanError, match=r"nodes\[0\]\.channels: channel index 32 out of range \(size 32, allowed 0\.\.31\)"):
        af.compile(plan, model=model)


def test_the_node_type_with_a_new_axis_passes_the_conformance_kit(resid_channel):
    from atpframework.testing import check_node_type

    report = check_node_type({"kind": "resid_channel", "positions": [-1], "channels": [0, 3, 17]})
    assert report["brute_force"] < 1e-4 and report["round_trip"] == 1 and report["hooks"]["interrupted_runs"] == 3


# ----------------------------------------------------------------------------------------- binding context
class ContextSpec(NodeSpec):
    kind: Literal["test_context"]


class RecordsContext(AbstractNode):
    """Binds specially (the whole residual stream at the last boundary) and records the context it got."""

    kind = "test_context"
    spec_type = ContextSpec
    site = "resid"
    index_dims = ()
    n_feature_dims = 2  # pos, d_model
    seen: list[BindingContext] = []

    def bind(self, spec: NodeSpec, context: BindingContext) -> BoundNodes:
        RecordsContext.seen.append(context)
        last = context.info.n_layers
        return BoundNodes(spec, self, AxisSelection("layer", 1, ((last,),), [last]), ())


def test_nodes_bind_against_a_typed_context_with_the_plans_saes(model):
    pytest.importorskip("sae_lens")
    from test_sae import make_sae

    plugins.register("nodes", "test_context", RecordsContext)
    RecordsContext.seen.clear()
    try:
        plan = make_plan([{"kind": "sae_latent", "sae": "s"}, {"kind": "test_context"}], saes=[{"name": "s"}])
        compiled = af.compile(plan, model=model, saes={"s": make_sae("standard")})
    finally:
        plugins.unregister("nodes", "test_context")
    context = RecordsContext.seen[-1]
    assert (context.where, context.seq_len, context.at("layers")) == ("nodes[1]", 6, "nodes[1].layers")
    assert context.info.d_model == 32 and context.info.n_layers == 2
    assert list(context.saes) == ["s"] and context.saes["s"].site == Site("resid", 1) and context.saes["s"].d_sae == 40
    with pytest.raises(AttributeError):
        context.seq_len = 7  # frozen
    assert compiled.bound[1].layers.entries == ((2,),)


def test_sparse_output_and_sae_references_are_declared_by_the_spec():
    pytest.importorskip("sae_lens")
    plan = af.parse_plan(make_plan(
        [{"kind": "sae_latent", "sae": "s", "keep_top": 3}, {"kind": "sae_error", "sae": "s"}, {"kind": "resid"}],
        saes=[{"name": "s"}],
    ))
    latent, error, resid = plan.nodes
    assert latent.sparse_output() == SparseOutput(3, "position")
    assert error.sparse_output() is None and resid.sparse_output() is None
    assert latent.sae_references() == {"sae": "s"} == error.sae_references() and resid.sae_references() == {}


# ----------------------------------------------------------------------------------------- hook names live in backends/
def test_the_backends_own_the_hook_names_sae_lens_records(hf_dir):
    from atpframework.backends.transformer_lens import site_of_tl_hook_name

    assert site_of_tl_hook_name("blocks.5.hook_resid_pre") == Site("resid", 5)
    assert site_of_tl_hook_name("blocks.0.hook_resid_post") == Site("resid", 1)
    assert site_of_tl_hook_name("blocks.1.ln2.hook_normalized") == Site("mlp_in", 1)
    assert site_of_tl_hook_name("blocks.1.attn.hook_z") == Site("attn_z", 1)
    assert site_of_tl_hook_name("blocks.1.weird") is None
    for backend in ("transformer_lens", "huggingface"):
        loaded = af.load_backend(af.as_plan({"model": {"source": str(hf_dir), "backend": backend}, "prompts": [{"clean": [1], "noise": [2]}],
                                             "nodes": [{"kind": "resid"}], "method": {"name": "atp"}}))
        assert loaded.site_of_hook_name("blocks.1.hook_mlp_out") == Site("mlp_out", 1)
        assert loaded.attached_saes == {}
    assert AbstractBackend.site_of_hook_name(loaded, "blocks.1.hook_mlp_out") is None  # the documented default


def test_core_modules_name_no_library_hook_points():
    """``model/sites.py``: library hook names never leave ``backends/``."""
    core = Path(af.__file__).parent
    pattern = re.compile(r"blocks\.|hook_(resid|attn|mlp|z\b|q\b|k\b|v\b|post|normalized|rot)")
    found = [f"{path.relative_to(core)}:{n}" for path in core.rglob("*.py") if path.parts[len(core.parts)] not in ("backends", "nodes")
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


# ----------------------------------------------------------------------------------------- broken plugins
def _variant(name, **attributes):
    """A subclass of ``ResidChannel`` with some class attributes changed."""
    return type(name, (ResidChannel,), attributes)


class NoChannelFieldSpec(NodeSpec):
    kind: Literal["resid_channel"]
    positions: Selection = "each"


BROKEN = {
    "the kind is another name": (
        "resid_channel_v2", ResidChannel, r"registered as 'resid_channel_v2' declares the name 'resid_channel'; they must match",
    ),
    "the spec's kind literal is another name": (
        "resid_chan", _variant("WrongSpecKind", kind="resid_chan"),
        r"ResidChannelSpec\.kind is Literal\['resid_channel'\], not Literal\['resid_chan'\]",
    ),
    "a misspelled site": (
        "resid_channel", _variant("MisspelledSite", site="resid_pre"), r"site 'resid_pre' is not a site name \(allowed: resid, attn_z",
    ),
    "an axis with no plan field": (
        "resid_channel", _variant("NoPlanField", selection_fields=SELECTION_FIELDS),
        r"index axis 'channel' has no plan field: add one to selection_fields",
    ),
    "an axis whose plan field the spec lacks": (
        "resid_channel", _variant("SpecLacksField", spec_type=NoChannelFieldSpec),
        r"index axis 'channel' is selected by the plan field 'channels', which NoChannelFieldSpec does not declare",
    ),
    "an unknown axis with no size": (
        "resid_channel", _variant("Unsized", axis_sizes={}), r"index axis 'channel' is unknown: not a built-in axis with a size",
    ),
    "a scalar node with a negative feature count": (
        "resid_channel", _variant("NegativeFeatures", n_feature_dims=-1), r"n_feature_dims is -1, not an integer >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_node_plugin_is_refused_when_registered(case):
    name, cls, problem = BROKEN[case]
    with pytest.raises(PluginError) as caught:
        plugins.register("nodes", name, cls)
    message = str(caught.value)
    assert re.search(problem, message), message
    assert f"'{name}'" in message  # the plugin's entry-point name
    assert f"{cls.__module__}:{cls.__qualname__}" in message  # and its class
    assert name not in plugins.available("nodes")


def test_a_node_plugin_without_a_kind_is_refused():
    class NoKind(AbstractNode):
        spec_type = ResidChannelSpec
        site = "resid"
        index_dims = ("pos",)

    with pytest.raises(PluginError, match=r"node plugin 'resid_channel' \(.*NoKind\) declares no 'kind'; it must be the entry-point name"):
        plugins.register("nodes", "resid_channel", NoKind)


def test_every_problem_is_named_at_once():
    cls = _variant("ManyProblems", kind="many", site="resid_pre", axis_sizes={})
    with pytest.raises(PluginError) as caught:
        plugins.register("nodes", "many", cls)
    message = str(caught.value)
    for problem in ("ResidChannelSpec.kind is", "site 'resid_pre'", "index axis 'channel' is unknown"):
        assert problem in message, message


def test_a_broken_method_plugin_is_refused_when_registered():
    class Renamed(ActivationPatching):
        name = "patching_copy"  # but its config still says activation_patching

    with pytest.raises(PluginError, match=r"method plugin 'patching_copy' \(.*Renamed\) is broken: ActivationPatchingConfig\.name is "
                                          r"Literal\['activation_patching'\], not Literal\['patching_copy'\]"):
        plugins.register("methods", "patching_copy", Renamed)
    assert "patching_copy" not in plugins.available("methods")


BROKEN_DIST = {
    "broken_nodes.py": """
        from typing import Literal
        from atpframework import AbstractNode, NodeSpec, Selection

        class BadSpec(NodeSpec):
            kind: Literal["bad_site"]
            positions: Selection = "each"

        class BadSite(AbstractNode):
            kind = "bad_site"
            spec_type = BadSpec
            site = "residual"
            index_dims = ("pos",)
        """,
    "broken_nodes-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: broken-nodes\nVersion: 0.1\n",
    "broken_nodes-0.1.dist-info/entry_points.txt": "[atpframework.nodes]\nbad_site = broken_nodes:BadSite\n",
}


def test_a_broken_node_plugin_is_refused_when_its_entry_point_loads(tmp_path, monkeypatch):
    for relative, text in BROKEN_DIST.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "bad_site" in plugins.available("nodes")  # listed without importing
    with pytest.raises(PluginError, match=r"node plugin 'bad_site' \(broken_nodes:BadSite\) is broken: site 'residual' is not a site name"):
        plugins.load("nodes", "bad_site")
    # a plan naming it reports the plugin's problem where it names the plugin, not "backend does not serve"
    with pytest.raises(af.PlanError, match=r"nodes\[0\]\.kind: node plugin 'bad_site' .* site 'residual' is not a site name"):
        af.parse_plan(make_plan([{"kind": "bad_site"}]))


def test_every_built_in_node_type_and_method_passes_the_load_checks():
    for name in plugins.available("nodes"):
        cls = plugins.load("nodes", name)
        assert cls.plugin_problems(name) == [], name
        assert cls.plugin_problems(name + "_x"), name  # the check can fail: the spec's kind is another name
    for name in plugins.available("methods"):
        cls = plugins.load("methods", name)
        assert cls.plugin_problems(name) == [] and cls.plugin_problems(name + "_x"), name
