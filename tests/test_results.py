"""Result files: lossless save/load, ranking, the DataFrame view, schema checks and atomic writes."""

import json
import os

import pytest
import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework import SchemaError
from atpframework.io.results import RESULT_SCHEMA_VERSION

NODES = [
    {"kind": "attn_head", "positions": [1, -1]},
    {"kind": "mlp_neuron", "neurons": [0, 3, 9, 17], "positions": "all"},
    {"kind": "resid", "layers": [0, 2], "positions": "each"},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "r.safetensors"
    result = af.run(make_plan(NODES), model=tiny_model(), output=path)
    return result, path


def test_saved_result_loads_back_identically(saved):
    result, path = saved
    assert path.is_file()
    loaded = af.load_result(path)
    assert list(loaded.nodes) == list(result.nodes) == ["attn_head", "mlp_neuron", "resid"]
    for name, ns in result.nodes.items():
        other = loaded[name]
        assert other.per_pair.dtype == torch.float32
        assert torch.equal(other.per_pair, ns.per_pair), name
        assert other.kind == ns.kind
        assert other.dims == ns.dims
        assert other.index == ns.index
    assert torch.equal(loaded.metric_clean, result.metric_clean)
    assert torch.equal(loaded.metric_noise, result.metric_noise)
    assert loaded.plan_json == result.plan_json == af.parse_plan(make_plan(NODES)).to_json()
    assert (loaded.method, loaded.metric) == (result.method, result.metric) == ("atp", "logit_diff")
    assert loaded.clean_tokens == result.clean_tokens == [[1, 2, 3, 4, 5, 6], [7, 8, 2, 4, 5, 1]]
    assert loaded.noise_tokens == result.noise_tokens == [[1, 9, 3, 4, 11, 6], [7, 8, 12, 4, 5, 13]]
    assert loaded.model == result.model and loaded.versions == result.versions and loaded.created == result.created


def test_result_axes_describe_the_selections(saved):
    result, _ = saved
    heads, neurons, resid = result["attn_head"], result["mlp_neuron"], result["resid"]
    assert heads.dims == ("pair", "layer", "pos", "head") and heads.per_pair.shape == (2, 2, 2, 4)
    assert heads.index == {"layer": [0, 1], "pos": [1, -1], "head": [0, 1, 2, 3]}
    assert neurons.dims == ("pair", "layer", "pos", "neuron") and neurons.per_pair.shape == (2, 2, 1, 4)
    assert neurons.index == {"layer": [0, 1], "pos": "all", "neuron": [0, 3, 9, 17]}
    assert resid.per_pair.shape == (2, 2, 6) and resid.index["layer"] == [0, 2]
    # a tiny random model still gives non-trivial effects, so the ranking tests below mean something
    assert all(ns.per_pair.abs().sum() > 0 for ns in result.nodes.values())
    with pytest.raises(KeyError, match="have: attn_head, mlp_neuron, resid"):
        result["nope"]


def _brute_force_ranking(result, how):
    """Every node as (score, name, coords), scores recomputed from per_pair, sorted by |score| descending."""
    rows = []
    for name, ns in result.nodes.items():
        agg = ns.per_pair.abs().mean(0) if how == "mean_abs" else ns.per_pair.mean(0)
        for flat, value in enumerate(agg.flatten().tolist()):
            coords, rest = [], flat
            for size in reversed(agg.shape):
                coords.append(rest % size)
                rest //= size
            coords.reverse()
            labels = {}
            for dim, c in zip(ns.dims[1:], coords):
                labels[dim] = "all" if ns.index[dim] == "all" else ns.index[dim][c]
            rows.append((value, name, labels))
    rows.sort(key=lambda r: -abs(r[0]))
    return rows


@pytest.mark.parametrize("how", ["mean_abs", "mean"])
def test_top_k_matches_a_brute_force_sort(saved, how):
    result = af.load_result(saved[1])
    expected = _brute_force_ranking(result, how)
    assert len(expected) == 2 * 2 * 4 + 2 * 1 * 4 + 2 * 6
    top = result.top_k(7, how=how)
    assert len(top) == 7
    # compare scores rank by rank (robust to exact ties), and node identity where scores are distinct
    assert [r.score for r in top] == pytest.approx([e[0] for e in expected[:7]], rel=1e-6, abs=0)
    scores = [abs(e[0]) for e in expected]
    for rank, row in enumerate(top):
        if scores.count(abs(row.score)) == 1:
            assert (row.name, row.coords) == (expected[rank][1], expected[rank][2])
    # the signed mean reported with each row is the node's own signed mean
    for row in top:
        ns = result[row.name]
        idx = tuple(
            0 if ns.index[d] == "all" else ns.index[d].index(row.coords[d]) for d in ns.dims[1:]
        )
        assert row.signed_mean == pytest.approx(float(ns.per_pair.mean(0)[idx]))
        assert row.kind == ns.kind
    # asking for more than exist returns them all, still sorted
    everything = result.top_k(10_000, how=how)
    assert len(everything) == len(expected)
    assert [abs(r.score) for r in everything] == sorted((abs(r.score) for r in everything), reverse=True)
    # restricting to one selection ranks only its nodes
    only = result.top_k(3, how=how, names=["resid"])
    assert {r.name for r in only} == {"resid"}
    assert [r.score for r in only] == pytest.approx([e[0] for e in expected if e[1] == "resid"][:3])


def test_scores_aggregate_over_pairs(saved):
    result, _ = saved
    ns = result["attn_head"]
    assert torch.allclose(result.scores("attn_head"), ns.per_pair.abs().mean(0))
    assert torch.allclose(result.scores("attn_head", how="mean"), ns.per_pair.mean(0))
    with pytest.raises(ValueError, match="allowed: 'mean_abs', 'mean'"):
        ns.aggregate("max")


def test_to_dataframe_has_one_row_per_node(saved):
    pytest.importorskip("pandas")
    result, _ = saved
    df = result.to_dataframe()
    n_nodes = sum(ns.per_pair[0].numel() for ns in result.nodes.values())
    assert len(df) == n_nodes == 16 + 8 + 12
    assert df.groupby("name").size().to_dict() == {"attn_head": 16, "mlp_neuron": 8, "resid": 12}
    assert {"name", "kind", "layer", "pos", "head", "neuron", "score", "signed_mean"} <= set(df.columns)
    assert not df.duplicated(subset=["name", "layer", "pos", "head", "neuron"]).any()
    assert set(df.loc[df["name"] == "mlp_neuron", "pos"]) == {"all"}
    assert df["score"].sum() == pytest.approx(sum(float(ns.per_pair.abs().mean(0).sum()) for ns in result.nodes.values()), rel=1e-5)
    row = df[(df["name"] == "attn_head") & (df["layer"] == 1) & (df["pos"] == -1) & (df["head"] == 2)].iloc[0]
    assert len(df[(df["name"] == "attn_head") & (df["layer"] == 1) & (df["pos"] == -1)]) == 4
    assert row.score == pytest.approx(float(result["attn_head"].per_pair[:, 1, 1, 2].abs().mean()))
    assert row.signed_mean == pytest.approx(float(result["attn_head"].per_pair[:, 1, 1, 2].mean()))


# ----------------------------------------------------------------------------------------- schema checks
def _rewrite_metadata(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata=change(meta))


def test_safetensors_without_atpf_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(SchemaError, match="not an atpframework result"):
        af.load_result(plain)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(SchemaError, match="not an atpframework result"):
        af.load_result(other)


def test_newer_schema_version_is_refused(saved, tmp_path):
    newer = tmp_path / "newer.safetensors"
    _rewrite_metadata(saved[1], newer, lambda m: {**m, "atpf.schema_version": "99"})
    with pytest.raises(SchemaError, match=rf"version 99, newer than this atpframework reads \({RESULT_SCHEMA_VERSION}\)"):
        af.load_result(newer)
    # the unchanged copy loads: the refusal is about the version alone
    same = tmp_path / "same.safetensors"
    _rewrite_metadata(saved[1], same, lambda m: m)
    assert torch.equal(af.load_result(same)["resid"].per_pair, saved[0]["resid"].per_pair)


def test_version_1_files_without_layouts_still_load(saved, tmp_path):
    def as_version_1(meta):
        nodes = {name: {k: v for k, v in m.items() if k not in ("layout", "shape")} for name, m in json.loads(meta["atpf.nodes"]).items()}
        return {**meta, "atpf.schema_version": "1", "atpf.nodes": json.dumps(nodes)}

    old = tmp_path / "v1.safetensors"
    _rewrite_metadata(saved[1], old, as_version_1)
    assert torch.equal(af.load_result(old)["resid"].per_pair, saved[0]["resid"].per_pair)


def test_unreadable_or_missing_files_raise_schema_error(tmp_path):
    with pytest.raises(SchemaError, match="no such file"):
        af.load_result(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SchemaError, match="not a safetensors file"):
        af.load_result(junk)


# ----------------------------------------------------------------------------------------- atomic writes
def test_failed_save_leaves_destination_unchanged_and_no_temp_file(saved, tmp_path, monkeypatch):
    import safetensors.torch

    result, _ = saved
    dest = tmp_path / "r.safetensors"
    result.save(dest)
    before = dest.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["r.safetensors"]
    written_to = []

    def failing_save_file(tensors, filename, metadata=None):
        written_to.append(str(filename))
        with open(filename, "wb") as f:
            f.write(b"half-written garbage")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        result.save(dest)
    assert written_to and os.path.dirname(written_to[0]) == str(tmp_path)
    assert written_to[0] != str(dest)  # it wrote a temporary file, not the destination
    assert dest.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.safetensors"]
    monkeypatch.undo()
    assert torch.equal(af.load_result(dest)["attn_head"].per_pair, result["attn_head"].per_pair)


def test_save_replaces_an_existing_file_and_creates_parent_dirs(saved, tmp_path):
    result, _ = saved
    dest = tmp_path / "nested" / "dir" / "r.safetensors"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old content")
    assert result.save(dest) == dest
    assert torch.equal(af.load_result(dest)["mlp_neuron"].per_pair, result["mlp_neuron"].per_pair)
    assert sorted(os.listdir(dest.parent)) == ["r.safetensors"]
    meta = json.loads(af.load_result(dest).plan_json)
    assert meta["method"]["name"] == "atp"


@pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")
def test_to_dataframe_equals_a_row_by_row_reading_of_the_result(saved):
    """Every row against the result read node by node here; verified effects where a verification stored them."""
    pytest.importorskip("pandas")
    import dataclasses

    from atpframework.io.results import VerifiedNodes

    result, _ = saved
    heads = result["attn_head"].per_pair
    picked = torch.tensor([3, 0, 11])
    effects = torch.randn(heads.shape[0], 3)
    result = dataclasses.replace(result, verified={"attn_head": VerifiedNodes(picked, torch.arange(3), effects)})
    df = result.to_dataframe()
    row = 0
    for name, ns in result.nodes.items():
        shape = ns.per_pair.shape[1:]
        for flat in range(ns.per_pair[0].numel()):
            coords = [int(c) for c in torch.unravel_index(torch.tensor(flat), shape)]
            got = df.iloc[row]
            assert got["name"] == name and got["kind"] == ns.kind
            for dim, c in zip(ns.dims[1:], coords):
                assert got[dim] == ("all" if ns.index[dim] == "all" else ns.index[dim][c])
            values = ns.per_pair[(slice(None), *coords)]
            assert got["score"] == pytest.approx(float(values.abs().mean()), rel=1e-6)
            assert got["signed_mean"] == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-9)
            if name == "attn_head" and flat in picked.tolist():
                expected = float(effects[:, picked.tolist().index(flat)].mean())
                assert got["verified_effect"] == pytest.approx(expected, rel=1e-6)
            else:
                assert got["verified_effect"] != got["verified_effect"]  # NaN: not verified
            row += 1
    assert row == len(df)
    indexed = result.to_dataframe(index=True)
    assert indexed.index.names[:2] == ["name", "layer"] and "score" in indexed.columns and len(indexed) == len(df)
    assert indexed.loc[("attn_head", 1, -1, 2), "score"].item() == pytest.approx(float(heads[:, 1, 1, 2].abs().mean()))


def test_results_and_their_top_nodes_print_short_readable_tables(saved):
    result, _ = saved
    text = repr(result)
    assert len(text) < 400 and "\n" not in text  # was a 10 kB dump of every tensor
    assert "method='atp'" in text and "metric='logit_diff'" in text and "attn_head 2x2x4" in text and "resid 2x6" in text and "pairs=2" in text
    assert f"clean={float(result.metric_clean.mean()):.4g}" in text

    top = result.top_k(4)
    assert isinstance(top, list) and len(top) == 4 and all(isinstance(r, type(top[0])) for r in top)
    lines = repr(top).splitlines()
    assert lines[0].split() == ["rank", "node", "mean", "|score|", "signed", "estimate"]
    expected = sorted(
        ((float(ns.per_pair[(slice(None), *idx)].abs().mean()), name) for name, ns in result.nodes.items()
         for idx in torch.cartesian_prod(*[torch.arange(s) for s in ns.per_pair.shape[1:]]).view(-1, ns.per_pair.dim() - 1).tolist()),
        key=lambda x: -x[0],
    )[:4]
    for line, row, (score, name) in zip(lines[1:], top, expected):
        assert line.split()[1] == name and float(line.split()[-2]) == pytest.approx(score, rel=1e-4)
        assert row.label() in line

    html = top._repr_html_()
    assert html.count("<tr>") == 1 + 4 and "<th>signed estimate</th>" in html
    page = result._repr_html_()
    assert "logit_diff" in page and page.count("<tr>") >= 10  # the facts, then the top 10 nodes


def test_to_xarray_holds_the_per_pair_scores_under_their_model_indices(saved):
    xr = pytest.importorskip("xarray")
    result, _ = saved
    heads = result.to_xarray("attn_head")
    ns = result["attn_head"]
    assert heads.dims == ns.dims and heads.attrs["method"] == "atp"
    for dim in ns.dims[1:]:
        assert list(heads[dim].values) == (["all"] if ns.index[dim] == "all" else ns.index[dim])
    # one entry, read by model index, against the tensor read by position
    layer, pos, head = ns.index["layer"][1], ns.index["pos"][1], ns.index["head"][2]
    for pair in range(ns.per_pair.shape[0]):
        assert float(heads.sel(pair=pair, layer=layer, pos=pos, head=head)) == float(ns.per_pair[pair, 1, 1, 2])
    assert list(heads["metric_clean"].values) == result.metric_clean.double().tolist()
    both = result.to_xarray()
    assert isinstance(both, xr.Dataset) and set(both.data_vars) == set(result.nodes)
    assert both["resid"].dims == ("pair", "resid/layer", "resid/pos")
    assert (both["resid"].values == result["resid"].per_pair.double().numpy()).all()
