"""Plans: JSON round trip, and every kind of bad plan fails with a PlanError naming where and what is allowed."""

import copy
import json
import re
from pathlib import Path

import pytest
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework import PlanError, plugins

BUILTIN_KINDS = ("attn_head", "attn_k", "attn_q", "attn_v", "mlp_neuron", "resid")


def full_plan() -> dict:
    """A plan that sets many non-default fields, with two node kinds (a real union)."""
    return make_plan(
        [
            {"kind": "attn_head", "layers": [1], "heads": "all", "positions": [-1, 2]},
            {"kind": "mlp_neuron", "name": "neurons_last", "neurons": [0, 5, 7], "positions": [-1]},
            {"kind": "resid", "layers": "all"},
        ],
        method={"name": "activation_patching", "nodes_per_pass": 3},
        metric="logprob",
        batch_size=1,
        prepend_bos=False,
        output="out.safetensors",
    )


def with_changes(**changes) -> dict:
    plan = make_plan([{"kind": "attn_head"}])
    plan.update(copy.deepcopy(changes))
    return plan


# ----------------------------------------------------------------------------------------- round trip
def test_plan_json_round_trip_is_identical():
    plan = af.parse_plan(full_plan())
    text = plan.to_json()
    again = af.parse_plan(json.loads(text))
    assert again.to_json() == text
    assert again.model_dump() == plan.model_dump()
    data = json.loads(text)
    # the canonical JSON holds the defaults too, and keeps the node kinds and their selections
    assert data["schema"] == "atpf.plan/1"
    assert data["model"]["backend"] == "transformer_lens"
    assert data["method"] == {"name": "activation_patching", "nodes_per_pass": 3, "skip_layers": True}
    assert [n["kind"] for n in data["nodes"]] == ["attn_head", "mlp_neuron", "resid"]
    assert data["nodes"][0]["heads"] == "all" and data["nodes"][0]["positions"] == [-1, 2]
    assert data["nodes"][1]["name"] == "neurons_last" and data["nodes"][1]["neurons"] == [0, 5, 7]
    assert type(again.nodes[1]).__name__ == "MlpNeuronSpec"
    assert again.nodes[1].result_name == "neurons_last" and again.nodes[0].result_name == "attn_head"


def test_load_plan_from_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(full_plan(), indent=2))
    loaded = af.load_plan(path)
    assert loaded.to_json() == af.parse_plan(full_plan()).to_json()
    assert af.as_plan(str(path)).to_json() == loaded.to_json()


def test_parse_plan_accepts_a_plan_object():
    plan = af.parse_plan(full_plan())
    assert af.parse_plan(plan).to_json() == plan.to_json()


def test_load_plan_errors_for_missing_and_malformed_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        af.load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    with pytest.raises(PlanError, match=r"not valid JSON \(line 1"):
        af.load_plan(bad)
    with pytest.raises(PlanError, match="must be a JSON object, got list"):
        af.parse_plan([1, 2])


# ----------------------------------------------------------------------------------------- bad plans
@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"batch_size": "x"}, r"batch_size: .*valid integer.*got 'x'"),
        ({"batch_size": 0}, r"batch_size: .*greater than or equal to 1"),
        ({"bogus": 1}, r"bogus: unknown key"),
        ({"nodes": [{"kind": "attn_head", "neurons": [1]}]}, r"nodes\[0\]\.neurons: unknown key"),
        ({"nodes": [{"kind": "attn_head", "heads": "some"}]}, r"nodes\[0\]\.heads: allowed: 'each' or 'all' \(got 'some'\)"),
        ({"nodes": [{"kind": "resid"}, {"kind": "attn_head", "heads": []}]}, r"nodes\[1\]\.heads: .*\(got \[\]\)"),
        ({"nodes": []}, r"nodes: .*at least 1"),
        ({"prompts": []}, r"prompts: .*at least 1"),
        ({"metric": {"name": "nope"}}, r"metric\.name: allowed: 'logit_diff', .*'custom' \(got 'nope'\)"),
        ({"model": {"source": "in_memory", "dtype": "int8"}}, r"model\.dtype: allowed: 'float32'"),
        ({"model": {"backend": "transformer_lens"}}, r"model\.source: Field required"),
        ({"schema": "atpf.plan/2"}, r"schema: .*'atpf\.plan/1', got 'atpf\.plan/2'"),
    ],
)
def test_invalid_plans_name_location_and_allowed_values(changes, pattern):
    with pytest.raises(PlanError, match=pattern):
        af.parse_plan(with_changes(**changes))


def test_unknown_node_kind_lists_installed_kinds_and_entry_point_group():
    with pytest.raises(PlanError, match=r"nodes\[1\]\.kind: unknown node 'nope'") as info:
        af.parse_plan(with_changes(nodes=[{"kind": "resid"}, {"kind": "nope"}]))
    message = str(info.value)
    assert "'atpframework.nodes'" in message
    for kind in BUILTIN_KINDS:
        assert kind in message


def test_missing_node_kind_lists_allowed_kinds():
    with pytest.raises(PlanError, match=r"nodes\[0\]\.kind: missing; allowed: attn_head, .*resid"):
        af.parse_plan(with_changes(nodes=[{"heads": [0]}]))


def test_unknown_backend_lists_installed_backends():
    with pytest.raises(
        PlanError, match=r"model\.backend: unknown backend 'nope'; installed: .*transformer_lens.*'atpframework\.backends'"
    ):
        af.parse_plan(with_changes(model={"source": "in_memory", "backend": "nope"}))


def test_unknown_method_lists_method_names():
    with pytest.raises(PlanError, match=r"method: .*'nope'.*'atp', 'atp_qkfix', 'atp_graddrop', 'atp_star', 'atp_ig', 'activation_patching'"):
        af.parse_plan(with_changes(method={"name": "nope"}))


@pytest.mark.parametrize(
    "method, pattern",
    [
        ({"name": "activation_patching", "nodes_per_pass": 0}, r"\n  method\.nodes_per_pass: .*greater than or equal to 1"),
        ({"name": "atp", "nodes_per_pass": 4}, r"\n  method\.nodes_per_pass: unknown key"),
    ],
)
def test_method_field_errors_drop_the_union_tag_from_the_location(method, pattern):
    with pytest.raises(PlanError, match=pattern) as info:
        af.parse_plan(with_changes(method=method))
    assert "method.atp" not in str(info.value) and "method.activation_patching" not in str(info.value)


def test_two_node_specs_with_the_same_result_name():
    with pytest.raises(PlanError, match=r"nodes\[1\] and nodes\[0\] both write the result tensor 'attn_head'.*'name'"):
        af.parse_plan(with_changes(nodes=[{"kind": "attn_head"}, {"kind": "attn_head", "heads": "all"}]))
    with pytest.raises(PlanError, match=r"nodes\[1\] and nodes\[0\] both write the result tensor 'x'"):
        af.parse_plan(with_changes(nodes=[{"kind": "attn_head", "name": "x"}, {"kind": "resid", "name": "x"}]))
    # distinct names make the same selections valid
    plan = af.parse_plan(with_changes(nodes=[{"kind": "attn_head"}, {"kind": "attn_head", "name": "heads_summed", "heads": "all"}]))
    assert [n.result_name for n in plan.nodes] == ["attn_head", "heads_summed"]


# ----------------------------------------------------------------------------------------- model-dependent errors
@pytest.fixture(scope="module")
def model():
    return tiny_model()  # n_layers=2, n_heads=4, d_vocab=61; make_plan prompts are 6 tokens


def prompts(**fields_by_pair):
    """make_plan's two pairs, with ``{index: {field: value}}`` changes (None deletes the field)."""
    pairs = copy.deepcopy(make_plan([])["prompts"])
    for i, changes in fields_by_pair.items():
        for key, value in changes.items():
            if value is None:
                del pairs[int(i[1:])][key]
            else:
                pairs[int(i[1:])][key] = value
    return pairs


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"nodes": [{"kind": "attn_head", "layers": [2]}]}, r"^nodes\[0\]\.layers: layer index 2 out of range \(size 2, allowed 0\.\.1\)"),
        ({"nodes": [{"kind": "resid", "layers": [3]}]}, r"^nodes\[0\]\.layers: layer index 3 out of range \(size 3, allowed 0\.\.2\)"),
        ({"nodes": [{"kind": "resid"}, {"kind": "attn_head", "heads": [0, 4]}]}, r"^nodes\[1\]\.heads: head index 4 out of range \(size 4, allowed 0\.\.3\)"),
        ({"nodes": [{"kind": "attn_head", "positions": [6]}]}, r"^nodes\[0\]\.positions: pos index 6 out of range \(size 6, allowed -6\.\.5\)"),
        ({"nodes": [{"kind": "attn_head", "positions": [-7]}]}, r"^nodes\[0\]\.positions: pos index -7 out of range"),
        ({"nodes": [{"kind": "mlp_neuron", "neurons": [48]}]}, r"^nodes\[0\]\.neurons: neuron index 48 out of range \(size 48, allowed 0\.\.47\)"),
        ({"nodes": [{"kind": "attn_head", "positions": [1, -5]}]}, r"^nodes\[0\]\.positions: duplicate pos indices \[1, -5\]"),
        ({"prompts": prompts(p1={"noise": [7, 8, 12]})}, r"^prompts\[1\]: the clean prompt is 6 tokens and the noise prompt 3"),
        ({"prompts": prompts(p0={"answer": None})}, r"^prompts\[0\]\.answer: required by metric 'logit_diff'"),
        ({"prompts": prompts(p1={"wrong_answer": None})}, r"^prompts\[1\]\.wrong_answer: required by metric 'logit_diff'"),
        ({"prompts": prompts(p1={"clean": [7, 8, 61, 4, 5, 1]})}, r"^prompts\[1\]\.clean: token id 61 outside the vocabulary \(0\.\.60\)"),
        ({"prompts": prompts(p0={"noise": [1, -1, 3, 4, 11, 6]})}, r"^prompts\[0\]\.noise: token id -1 outside the vocabulary"),
        ({"prompts": prompts(p0={"answer": 99})}, r"^prompts\[0\]\.answer: token id 99 outside the vocabulary \(0\.\.60\)"),
        ({"prompts": prompts(p0={"clean": "hello", "noise": "world"})}, r"^prompts: this model has no tokenizer; give prompts as token ids"),
        ({"metric": {"name": "logit_diff", "position": 6}}, r"^metric\.position: 6 is outside prompts\[0\] \(6 tokens\)"),
        ({"metric": {"name": "logit_diff", "position": -7}}, r"^metric\.position: -7 is outside prompts\[0\]"),
    ],
)
def test_errors_found_when_compiling_against_the_model(model, changes, pattern):
    plan = with_changes(**changes)
    af.parse_plan(plan)  # valid as a document: only the model shows the problem
    with pytest.raises(PlanError, match=pattern):
        af.compile(plan, model=model)


def test_a_valid_plan_compiles_against_the_model(model):
    """The counterpart of the error cases: boundary indices are accepted."""
    plan = with_changes(
        nodes=[{"kind": "attn_head", "layers": [1], "heads": [3], "positions": [-6, 5]}, {"kind": "resid", "layers": [2]}],
        metric={"name": "logit_diff", "position": -6},
    )
    compiled = af.compile(plan, model=model)
    assert [b.shape for b in compiled.bound] == [(1, 2, 1), (1, 6)]


def test_metrics_without_answers_need_none(model):
    plan = with_changes(prompts=prompts(p0={"answer": None, "wrong_answer": None}), metric={"name": "cross_entropy"})
    assert af.compile(plan, model=model).pairs[0].answer is None


# ----------------------------------------------------------------------------------------- JSON Schema
def test_plan_json_schema_lists_every_installed_node_kind():
    schema = af.plan_json_schema()
    assert isinstance(schema, dict)
    json.dumps(schema)  # serializable
    items = schema["properties"]["nodes"]["items"]
    mapping = items["discriminator"]["mapping"]
    assert items["discriminator"]["propertyName"] == "kind"
    assert set(BUILTIN_KINDS) <= set(mapping)
    assert set(mapping) == set(plugins.available("nodes"))
    assert len(items["oneOf"]) == len(mapping)
    for kind, ref in mapping.items():
        spec = schema["$defs"][ref.split("/")[-1]]
        assert spec["properties"]["kind"]["const"] == kind
        assert spec.get("additionalProperties") is False
    assert "schema" in schema["properties"] and "schema_" not in schema["properties"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*.json")), ids=lambda p: p.name)
def test_example_plans_validate(path):
    """The shipped examples stay valid as the schema evolves (loading their models is not needed)."""
    plan = af.load_plan(path)
    assert plan.nodes and plan.output


# ----------------------------------------------------------------------------------------- no raw exceptions (regressions)
def test_huge_and_boolean_sizes_are_plan_errors_naming_max_memory():
    from atpframework.plans.chunking import MAX_BYTES, parse_bytes

    for bad in (10**400, "9" * 400, "9" * 400 + "GiB", 2**63, "8388608TiB", True, False):
        with pytest.raises(PlanError, match=r"max_memory: ") as info:
            af.parse_plan(with_changes(max_memory=bad))
        assert "allowed" in str(info.value) or "true/false" in str(info.value)
        with pytest.raises(ValueError, match=r"too large; allowed: at most 2\*\*63-1 bytes|not a size"):
            parse_bytes(bad)
    assert parse_bytes(MAX_BYTES) == MAX_BYTES == 2**63 - 1 and parse_bytes("8388607.999999TiB") < MAX_BYTES
    assert parse_bytes("0.9999999999999999999999999999999999KiB") == 1023  # exact: no float rounding up to 1024
    with pytest.raises(ValueError, match=r"must be positive \(at least 1 byte\)"):
        parse_bytes("0.99999999999999999999999999999999")


def write_bytes(tmp_path, data: bytes) -> Path:
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    return path


def test_plan_files_that_are_not_utf8_nested_too_deeply_or_hold_huge_integers(tmp_path):
    text = json.dumps(full_plan()).encode()
    with pytest.raises(PlanError, match=r"plan\.json: not UTF-8 text \(byte 0xff at byte offset 12: invalid start byte\)"):
        af.load_plan(write_bytes(tmp_path, text[:12] + b"\xff" + text[12:]))
    with pytest.raises(PlanError, match=r"plan\.json: nested too deeply"):
        af.load_plan(write_bytes(tmp_path, b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(PlanError, match=r"^invalid plan:\n  nodes\[0\]\.layers\[0\]\[0\].*\.\.\.: nested deeper than 100 levels"):
        af.load_plan(write_bytes(tmp_path, text.replace(b"[1]", b"[" * 500 + b"1" + b"]" * 500, 1)))
    with pytest.raises(PlanError, match=r"^invalid plan:\n  batch_size: an integer of 5000 digits; allowed: integers from -2\*\*63"):
        af.load_plan(write_bytes(tmp_path, text.replace(b'"batch_size": 1', b'"batch_size": ' + b"7" * 5000)))
    # a byte order mark is allowed
    assert af.load_plan(write_bytes(tmp_path, b"\xef\xbb\xbf" + text)).to_json() == af.parse_plan(full_plan()).to_json()


def test_duplicate_keys_in_a_plan_file_are_refused_with_their_location(tmp_path):
    text = json.dumps(full_plan()).encode()
    with pytest.raises(PlanError, match=r"^invalid plan:\n  batch_size: this key is given more than once"):
        af.load_plan(write_bytes(tmp_path, b'{"batch_size": 4, ' + text[1:]))
    nested = text.replace(b'{"kind": "mlp_neuron", ', b'{"kind": "mlp_neuron", "kind": "resid", ', 1)
    with pytest.raises(PlanError, match=r"nodes\[1\]\.kind: this key is given more than once .*allowed: each key once"):
        af.load_plan(write_bytes(tmp_path, nested))


def test_lone_surrogates_are_refused_where_they_occur(tmp_path):
    text = json.dumps(full_plan()).replace('"neurons_last"', '"neurons\\ud800"').encode()
    assert b"\\ud800" in text  # valid JSON, but no UTF-8 text can hold it
    with pytest.raises(PlanError, match=r"nodes\[1\]\.name: contains a lone surrogate \('\\ud800' at character 7\)"):
        af.load_plan(write_bytes(tmp_path, text))
    with pytest.raises(PlanError, match=r"prompts\[0\]\.'\\udcff': the key contains a lone surrogate"):
        af.parse_plan(with_changes(prompts=[{**make_plan([])["prompts"][0], "\udcff": 1}]))


def test_plan_files_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    import atpframework.plans.plan as plan_module

    path = write_bytes(tmp_path, json.dumps(full_plan()).encode())
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", 100)
    with pytest.raises(PlanError, match=r"plan\.json: the plan file is larger than .* MiB"):
        af.load_plan(path)


def test_messages_are_cut_short_and_problems_counted():
    huge = "n" * 5_000_000
    with pytest.raises(PlanError) as info:
        af.parse_plan(with_changes(nodes=[{"kind": "resid", "name": huge}, {"kind": "attn_head", "name": huge}]))
    assert len(str(info.value)) < 1000 and "(5000002 characters)" in str(info.value)
    with pytest.raises(PlanError) as info:
        af.parse_plan(with_changes(**{f"bogus{i}": "x" * 10_000 for i in range(50)}))
    message = str(info.value)
    assert len(message) < 3000 and message.count("\n") <= 21
    assert re.search(r"\n  \.\.\. and \d+ more problem\(s\)$", message)
    with pytest.raises(PlanError) as info:
        af.parse_plan(with_changes(nodes=[{"kind": "x" * 100_000}]))
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"nodes": [{"kind": ["attn_head"]}]}, r"nodes\[0\]\.kind: must be a string, got \['attn_head'\]; allowed: attn_head"),
        ({"nodes": [{"kind": {"a": 1}}]}, r"nodes\[0\]\.kind: must be a string"),
        ({"nodes": ["attn_head"]}, r"nodes\[0\]: must be an object with a 'kind', got 'attn_head'"),
        ({"model": {"source": "in_memory", "backend": ["x"]}}, r"model\.backend: Input should be a valid string"),
        ({"model": {"source": "in_memory", "backend": {"x": 1}}}, r"model\.backend: Input should be a valid string"),
        ({"schema": {"a": [1]}}, r"schema: .*got \{'a': \[1\]\}"),
        ({"model": {"source": "in_memory", "options": {1: 2}}}, r"model\.options\.1: keys must be strings, got 1"),
    ],
)
def test_odd_types_are_plan_errors_not_type_errors(changes, pattern):
    with pytest.raises(PlanError, match=pattern):
        af.parse_plan(with_changes(**changes))


def test_output_must_be_a_non_empty_path_without_nul():
    with pytest.raises(PlanError, match=r"output: must be a non-empty file path"):
        af.parse_plan(with_changes(output=""))
    with pytest.raises(PlanError, match=r"output: contains a NUL character"):
        af.parse_plan(with_changes(output="out\x00.safetensors"))
    assert af.parse_plan(with_changes(output="results/out.safetensors")).output == "results/out.safetensors"


@pytest.mark.parametrize("device", ["meta", "meta:0", "gpu", "CPU", " cpu", "cuda:-1", "", "cuda:x"])
def test_devices_torch_rejects_or_cannot_compute_on_are_refused(device):
    with pytest.raises(PlanError, match=r"model\.device: .*allowed: a torch device string such as 'cpu', 'cuda', 'cuda:1'"):
        af.parse_plan(with_changes(model={"source": "in_memory", "device": device}))


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_device_strings_torch_accepts_pass_without_a_device(device):
    assert af.parse_plan(with_changes(model={"source": "in_memory", "device": device})).model.device == device
