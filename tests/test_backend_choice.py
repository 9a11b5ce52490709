"""The backend follows the model object: ``af.run(plan, model=...)`` with no ``model.backend`` in the plan
uses the installed backend whose ``handles(model)`` is true (built-ins and registered plugins alike), gives
the same scores as naming that backend, and records it in the result; a named backend that does not handle
the object, while another does, is refused at ``model.backend``."""

import json
import warnings

import pytest
import torch
from conftest import D_VOCAB, make_plan, tiny_model

import atpframework as af
from atpframework import plugins
from atpframework.backends.huggingface import HuggingFaceBackend
from atpframework.backends.transformer_lens import TransformerLensBackend
from atpframework.errors import PlanError

NODES = [{"kind": "attn_head", "positions": [-1]}, {"kind": "mlp_neuron", "positions": [-1, 2]}, {"kind": "resid"}]


def _hf_gpt2():
    """A tiny random transformers GPT-2, matrices scaled up so effects are not tiny."""
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return model.eval()


def _plan(backend=None, method="activation_patching"):
    plan = make_plan(NODES, method=method)
    if backend is not None:
        plan["model"]["backend"] = backend
    return plan


def _recorded_backend(result):
    return json.loads(result.plan_json)["model"]["backend"]


def _assert_same_scores(a, b):
    assert set(a.nodes) == set(b.nodes)
    for name in a.nodes:
        assert a[name].per_pair.abs().max() > 1e-3, name
        assert torch.equal(a[name].per_pair, b[name].per_pair), name


@pytest.mark.parametrize("method", ["activation_patching", "atp_star"])
def test_huggingface_model_runs_through_the_huggingface_backend_unnamed(method):
    model = _hf_gpt2()
    picked = af.run(_plan(method=method), model=model)
    named = af.run(_plan("huggingface", method=method), model=model)
    _assert_same_scores(picked, named)
    assert _recorded_backend(picked) == _recorded_backend(named) == "huggingface"
    # a plan object whose backend was left out stays unnamed through as_plan / parse_plan
    plan_object = af.parse_plan(_plan(method=method))
    assert "backend" not in af.parse_plan(plan_object).model.model_fields_set
    _assert_same_scores(af.run(plan_object, model=model), named)


def test_huggingface_backend_really_ran_it():
    """Independent of the backend's own bookkeeping: the clean metric is the transformers model's own logit difference."""
    model = _hf_gpt2()
    result = af.run(_plan(), model=model)
    plan = _plan()
    with torch.no_grad():
        logits = model(torch.tensor([p["clean"] for p in plan["prompts"]])).logits[:, -1]
    expected = torch.stack([logits[i, p["answer"]] - logits[i, p["wrong_answer"]] for i, p in enumerate(plan["prompts"])])
    torch.testing.assert_close(result.metric_clean, expected, rtol=0, atol=1e-5)


def test_hooked_transformer_runs_through_the_transformer_lens_backend_unnamed():
    model = tiny_model()
    picked = af.run(_plan(), model=model)
    named = af.run(_plan("transformer_lens"), model=model)
    _assert_same_scores(picked, named)
    assert _recorded_backend(picked) == "transformer_lens"


def test_transformer_bridge_is_handled_by_the_transformer_lens_backend(hf_dir):
    bridge_backend = af.load_backend(af.as_plan(make_plan(NODES, model={"source": str(hf_dir), "options": {"model_class": "bridge"}})))
    bridge = bridge_backend.model
    assert TransformerLensBackend.handles(bridge) and not HuggingFaceBackend.handles(bridge)
    picked = af.load_backend(af.as_plan(_plan()), model=bridge)
    assert isinstance(picked, TransformerLensBackend) and picked.is_bridge


def test_built_in_handles_answer_by_type():
    hooked, hf = tiny_model(), _hf_gpt2()
    assert TransformerLensBackend.handles(hooked) and not TransformerLensBackend.handles(hf)
    assert HuggingFaceBackend.handles(hf) and not HuggingFaceBackend.handles(hooked)
    for thing in (object(), "gpt2", torch.nn.Linear(2, 2)):
        assert not TransformerLensBackend.handles(thing) and not HuggingFaceBackend.handles(thing)


def test_a_named_backend_that_does_not_handle_the_model_is_refused():
    with pytest.raises(PlanError, match=r"^model\.backend: the plan names 'transformer_lens', which does not handle a "
                       r"transformers\.models\.gpt2\.modeling_gpt2\.GPT2LMHeadModel object; the 'huggingface' backend does"):
        af.run(_plan("transformer_lens"), model=_hf_gpt2())
    with pytest.raises(PlanError, match=r"^model\.backend: the plan names 'huggingface', which does not handle a "
                       r"transformer_lens\.HookedTransformer\.HookedTransformer object; the 'transformer_lens' backend does"):
        af.run(_plan("huggingface"), model=tiny_model())


def test_an_object_no_backend_handles_is_refused_with_the_installed_backends():
    with pytest.raises(PlanError, match=r"^model\.backend: no installed backend handles a torch\.nn\.modules\.linear\.Linear "
                       r"object; installed: huggingface \(.*\); transformer_lens \(.*\)\. .*name a backend in model\.backend"):
        af.run(_plan(), model=torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ third-party backends take part alike
class Wrapped:
    """A model object of a third-party library: here, a HookedTransformer in a box."""

    def __init__(self, model):
        self.model = model


class WrappedBackend(TransformerLensBackend):
    """Serves Wrapped objects."""

    name = "wrapped"  # type: ignore[assignment]

    @classmethod
    def from_model(cls, model, *, tokenizer=None):
        return cls(model.model, tokenizer=tokenizer)

    @classmethod
    def handles(cls, model):
        return isinstance(model, Wrapped)


class GreedyBackend(TransformerLensBackend):
    """Claims HookedTransformers too."""

    name = "greedy"  # type: ignore[assignment]


@pytest.fixture
def registered():
    added = []

    def add(name, cls):
        plugins.register("backends", name, cls)
        added.append(name)

    yield add
    for name in added:
        plugins.unregister("backends", name)


def test_a_registered_backend_is_picked_for_the_objects_it_handles(registered):
    registered("wrapped", WrappedBackend)
    model = tiny_model()
    picked = af.run(_plan(), model=Wrapped(model))
    assert _recorded_backend(picked) == "wrapped"
    _assert_same_scores(picked, af.run(_plan("transformer_lens"), model=model))
    with pytest.raises(PlanError, match=r"names 'transformer_lens', which does not handle a test_backend_choice\.Wrapped object; the 'wrapped' backend does"):
        af.run(_plan("transformer_lens"), model=Wrapped(model))


def test_two_backends_handling_one_object_must_be_told_apart(registered):
    registered("greedy", GreedyBackend)
    model = tiny_model()
    with pytest.raises(PlanError, match=r"^model\.backend: several installed backends handle a .*HookedTransformer object \('greedy', 'transformer_lens'\); name one"):
        af.run(_plan(), model=model)
    assert _recorded_backend(af.run(_plan("greedy"), model=model)) == "greedy"


def test_a_passed_backend_object_is_what_the_result_records():
    model = tiny_model()
    backend = TransformerLensBackend.from_model(model)
    result = af.run(_plan(), backend=backend)
    assert _recorded_backend(result) == "transformer_lens"
    assert "backend" in af.parse_plan(json.loads(result.plan_json)).model.model_fields_set
