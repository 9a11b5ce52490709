"""The HTML report without a browser: self-contained (no network references), its JSON document holds the stored
values (checked against numbers computed here from the per-pair scores), markup in prompts cannot break out,
caps keep a large result's page small, and ``atpf report`` with its errors. The page in a real browser:
test_report_browser.py."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import make_plan, tiny_model
from report_helpers import HOSTILE, report_inputs

import atpframework as af
from atpframework.analysis.report import MAX_CELLS, MAX_PAIRS, MAX_TOKENS, load_diagnosis, render_report, report_data
from atpframework.io.results import AttributionResult, NodeScores, load_result


def blob(page):
    """The JSON document of a page, read back the way a browser's JSON.parse would (\\u003c escapes are JSON)."""
    (text,) = re.findall(r'<script type="application/json" id="atpf-data">(.*?)</script>', page, flags=re.S)
    return json.loads(text)


@pytest.fixture(scope="module")
def inputs():
    return report_inputs()


@pytest.fixture(scope="module")
def page(inputs):
    result, _, diagnosis = inputs
    return render_report(result, diagnosis=diagnosis, title="a <b>test</b> report")


def test_the_page_references_nothing_on_the_network(page):
    assert "http://" not in page and "https://" not in page
    for pattern in (r"""\b(?:src|href|action|srcset|poster|data|xlink:href)\s*=\s*["']?\s*(?:[a-z]+:)?//""",
                    r"url\(\s*['\"]?\s*(?:[a-z]+:)?//", r"@import", r"<link\b", r"<iframe\b", r"<img\b", r"<script[^>]*\bsrc\b"):
        assert not re.search(pattern, page, flags=re.I), pattern
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the inline script, nothing else
    assert "<title>a &lt;b&gt;test&lt;/b&gt; report</title>" in page


def test_markup_in_prompts_and_titles_stays_data(inputs, page):
    result = inputs[0]
    data = blob(page)
    noise = data["prompts"]["pairs"][0]["noise"]
    assert noise[1] == HOSTILE[9] and noise[4] == HOSTILE[11]  # round-trips exactly
    script_data = page.split('id="atpf-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in script_data and ">" not in script_data and "&" not in script_data
    assert data["title"] == "a <b>test</b> report"
    assert data["prompts"]["pairs"][0]["differ"] == [a != b for a, b in zip(result.clean_tokens[0], result.noise_tokens[0])]


def _cells(view):
    for grid in view["grids"]:
        for i, row in enumerate(grid["node"]):
            for j, node in enumerate(row):
                yield grid, i, j, node


def test_every_heatmap_cell_holds_its_nodes_stored_values(inputs, page):
    """Score, signed estimate and verified effect of each drawn node, against means computed here from the
    per-pair scores and from exact activation patching; labels as top_k prints them."""
    result, exact, _ = inputs
    data = blob(page)
    names = [s["name"] for s in data["selections"]]
    assert names == list(result.nodes)
    checked = 0
    for sel in data["selections"]:
        per_pair = result[sel["name"]].per_pair.flatten(1).double()
        truth = exact[sel["name"]].per_pair.flatten(1).double().mean(0)
        verified = result.verified.get(sel["name"])
        done = set(verified.index.tolist()) if verified is not None else set()
        for view in sel["views"]:
            for grid, i, j, node in _cells(view):
                assert grid["score"][i][j] == pytest.approx(float(per_pair[:, node].abs().mean()), rel=1e-6, abs=1e-9)
                assert grid["signed"][i][j] == pytest.approx(float(per_pair[:, node].mean()), rel=1e-6, abs=1e-9)
                if node in done:
                    assert grid["verified"][i][j] == pytest.approx(float(truth[node]), rel=1e-4, abs=1e-6)
                else:
                    assert grid["verified"][i][j] is None
                offset = result.numbering.offsets[names.index(sel["name"])]
                assert grid["label_of"][i][j] == result.node_label(offset + node)
                checked += 1
    # heads per position, best head per position, heads_last, resid (n_layers + 1 boundaries), neurons
    assert checked == 4 * 6 * 8 + 4 * 6 + 4 * 8 + 5 * 6 + 4


def test_the_grids_lay_out_layers_heads_and_positions(inputs, page):
    result = inputs[0]
    views = {s["name"]: s["views"] for s in blob(page)["selections"]}
    heads, by_pos = views["attn_head"]  # layer x head per position, then layer x position (best head)
    assert (heads["cols"]["axis"], heads["sliced"], len(heads["grids"])) == ("head", ["pos"], 6)
    assert heads["rows"]["labels"] == ["L0", "L1", "L2", "L3"] and heads["cols"]["labels"] == [f"H{h}" for h in range(8)]
    shape = result["attn_head"].per_pair.shape[1:]  # layer pos head
    for p, grid in enumerate(heads["grids"]):
        assert grid["node"] == [[(layer * shape[1] + p) * shape[2] + h for h in range(8)] for layer in range(4)]
        assert grid["label"].startswith(f"pos {p} ")
    assert by_pos["cols"]["axis"] == "pos" and by_pos["reduced"] == {"axes": ["head"], "size": 8}
    score = result["attn_head"].aggregate("mean_abs")  # each cell: the highest-scoring head there
    assert by_pos["grids"][0]["node"] == [[(layer * shape[1] + p) * shape[2] + int(score[layer, p].argmax()) for p in range(6)]
                                          for layer in range(4)]
    (resid,) = views["resid"]
    assert resid["reduced"] is None and len(resid["cols"]["labels"]) == 6
    assert resid["cols"]["labels"][1] == '" w2"/" w8" 1'  # the tokens of both pairs over each position column
    assert resid["cols"]["tokens"][1] == f'clean " w2"/" w8" · noise {json.dumps(HOSTILE[9])}/" w8" (pos 1)'
    (neurons,) = views["mlp_neuron"]
    assert neurons["reduced"]["size"] == 48 and len(neurons["cols"]["labels"]) == 1
    (last,) = views["heads_last"]  # one position: no position grid
    assert len(last["grids"]) == 1
    lim = max(abs(v) for g in heads["grids"] for row in g["signed"] for v in row)
    assert heads["limits"]["signed"] == pytest.approx(lim, rel=1e-6)


def test_the_table_and_the_verification_figures_hold_the_stored_numbers(inputs, page):
    result, exact, diagnosis = inputs
    data = blob(page)
    top = result.top_k(50)
    assert [r["node"] for r in data["top"]] == [row.label() for row in top]
    assert [r["rank"] for r in data["top"]] == list(range(1, len(top) + 1))
    for r, row in zip(data["top"], top):
        assert r["score"] == pytest.approx(row.score, rel=1e-6) and r["signed"] == pytest.approx(row.signed_estimate, rel=1e-6)
    verified_rows = [r for r in data["top"] if r["verified"] is not None]
    assert 0 < len(verified_rows) < len(data["top"])
    V = data["verification"]
    assert V["count"] == 20 and len(V["points"]) == 20 and V["threshold"] == pytest.approx(result.verification["threshold"])
    names = list(result.nodes)
    strengths = []
    for p in V["points"]:
        per_pair = exact[p["selection"]].per_pair.flatten(1)[:, p["flat"]].double()
        assert p["effect"] == pytest.approx(float(per_pair.mean()), rel=1e-4, abs=1e-6)
        assert p["strength"] == pytest.approx(float(per_pair.abs().mean()), rel=1e-4, abs=1e-6)
        assert p["node"] == result.node_label(result.numbering.offsets[names.index(p["selection"])] + p["flat"])
        strengths.append(float(per_pair.abs().mean()))
    assert V["confirmed"] == [sum(s >= V["threshold"] for s in strengths[: i + 1]) for i in range(20)]
    assert [p["rank"] for p in V["points"]] == list(range(20))
    D = data["diagnosis"]
    assert D["bounds"][1] == {"confidence": 0.99, "samples": [50, 400], "bound": [0.6, "inf"]}
    assert D["warnings"] == diagnosis.warnings() and len(D["warnings"]) == 1
    assert D["worst_node"]["0.9"] == result.node_label(25)


def test_graddrop_heatmaps_show_the_signed_estimate_beside_the_magnitude():
    model = tiny_model()
    result = af.run(make_plan([{"kind": "attn_head", "positions": [-1]}], method="atp_star"), model=model)
    (view,) = report_data(result)["selections"][0]["views"]
    signed = result.extras["attn_head.signed"].flatten(1).double().mean(0)
    magnitude = result["attn_head"].per_pair.flatten(1).double().mean(0)
    assert report_data(result)["summary"]["graddrop"] is True
    for grid, i, j, node in _cells(view):
        assert grid["signed"][i][j] == pytest.approx(float(signed[node]), rel=1e-6, abs=1e-9)
        assert grid["score"][i][j] == pytest.approx(float(magnitude[node]), rel=1e-6, abs=1e-9)
    assert any(v < 0 for row in view["grids"][0]["signed"] for v in row)  # the direction survives


def _synthetic(shapes, pairs=2, seed=0):
    """A result with random scores of the given selections (name -> (kind, dims, shape after pair))."""
    gen = torch.Generator().manual_seed(seed)
    nodes = {}
    for name, (kind, dims, shape) in shapes.items():
        index = {d: list(range(n)) for d, n in zip(dims[1:], shape)}
        nodes[name] = NodeScores(name, kind, tuple(dims), index, torch.randn((pairs, *shape), generator=gen))
    length = max((s[2][dims.index("pos") - 1] for s in shapes.values() for dims in [s[1]] if "pos" in dims), default=4)
    tokens = [list(range(length)) for _ in range(pairs)]
    return AttributionResult(nodes, torch.ones(pairs), torch.zeros(pairs), tokens, [list(t) for t in tokens],
                             json.dumps({"model": {"source": "synthetic"}}), "atp", "logit_diff", {"source": "synthetic"})


def test_a_large_result_is_capped_and_says_so():
    """46k neurons plus heads at 200 positions (192k head nodes): the page stays small and names what it left out."""
    result = _synthetic({
        "heads": ("attn_head", ["pair", "layer", "pos", "head"], (30, 200, 32)),
        "neurons": ("mlp_neuron", ["pair", "layer", "pos", "neuron"], (30, 1, 1536)),
    })
    page = render_report(result)
    data = blob(page)
    cells = sum(len(g["node"]) * len(g["node"][0]) for s in data["selections"] for v in s["views"] for g in v["grids"])
    assert cells <= MAX_CELLS
    assert any("grids by pos shown" in n for n in data["notes"])
    assert len(page) < 8_000_000
    heads = data["selections"][0]["views"][0]
    kept = [int(g["label"].split()[1]) for g in heads["grids"]]
    strongest = result["heads"].aggregate("mean_abs").amax(dim=(0, 2))  # per position
    assert set(kept) == set(strongest.argsort(descending=True)[: len(kept)].tolist())  # the strongest positions stay
    assert data["prompts"]["decoded"] is False and data["prompts"]["pairs"][0]["clean"][:2] == ["#0", "#1"]


def test_many_long_prompts_are_cut_and_the_page_says_so():
    pairs = 300
    result = _synthetic({"resid": ("resid", ["pair", "layer", "pos"], (2, 600))}, pairs=pairs)
    plan = {"model": {"source": "synthetic"}, "prompts": [{"clean": list(range(600)), "noise": list(range(600))}] * pairs}
    result = dataclasses.replace(result, plan_json=json.dumps(plan))
    data = blob(render_report(result))
    assert len(data["prompts"]["pairs"]) == MAX_PAIRS and all(len(p["clean"]) == MAX_TOKENS for p in data["prompts"]["pairs"])
    assert len(data["summary"]["plan"]["prompts"]) == MAX_PAIRS
    assert {"Prompts: the first 20 of 300 pairs are shown.", "Prompts: the first 512 tokens of each prompt are shown.",
            "Plan: its first 20 of 300 prompts are shown."} <= set(data["notes"])


def test_nan_and_infinity_become_valid_json():
    result = _synthetic({"heads": ("attn_head", ["pair", "layer", "pos", "head"], (2, 1, 3))})
    result.nodes["heads"].per_pair[:, 0, 0, 0] = math.nan
    data = blob(render_report(result))
    grid = data["selections"][0]["views"][0]["grids"][0]
    assert grid["signed"][0][0] is None and grid["score"][0][0] is None


def test_a_diagnosis_json_reads_back(inputs, tmp_path):
    diagnosis = inputs[2]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(diagnosis.as_json()))
    back = load_diagnosis(path)
    assert back.bounds == diagnosis.bounds and back.worst_node == diagnosis.worst_node
    assert back.warnings() == diagnosis.warnings()
    assert (back.verified_top, back.remainder, back.p) == (diagnosis.verified_top, diagnosis.remainder, diagnosis.p)
    path.write_text(json.dumps({**diagnosis.as_json(), "bounds": {"0.9": [[50, "x"]]}}))
    with pytest.raises(af.SchemaError, match=r"d\.json: bounds\.0\.9: expected a list of \[samples, bound\] pairs"):
        load_diagnosis(path)
    with pytest.raises(ValueError, match="diagnosis: covers 10 nodes"):
        report_data(inputs[0], diagnosis=type(diagnosis)(5, 5, 0.5, diagnosis.bounds, {}, torch.ones(1), 1.0))


def _atpf(*args, cwd):
    return subprocess.run([sys.executable, "-m", "atpframework", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_atpf_report_writes_the_page_and_names_bad_options(inputs, tmp_path):
    result, _, diagnosis = inputs
    result.save(tmp_path / "r.safetensors")
    (tmp_path / "d.json").write_text(json.dumps(diagnosis.as_json()))
    done = _atpf("report", "r.safetensors", "--diagnosis", "d.json", "--title", "T", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote r.html (")
    data = blob((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert data["title"] == "T" and data["diagnosis"]["warnings"] == diagnosis.warnings()
    assert load_result(tmp_path / "r.safetensors").report(tmp_path / "api.html").exists()

    def fails(*args, code, message):
        out = _atpf("report", *args, cwd=tmp_path)
        assert out.returncode == code and message in out.stderr and "Traceback" not in out.stderr, out.stderr

    fails("missing.safetensors", "-o", "x.html", code=2, message="missing.safetensors: no such file")
    fails("r.safetensors", "-o", "r.safetensors", code=2, message="--output: 'r.safetensors' is the result file itself")
    (tmp_path / "notes.txt").write_text("keep me")
    fails("r.safetensors", "-o", "notes.txt", code=2, message="--output: 'notes.txt' exists and is not an .html or .htm file")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "bad.json").write_text("{")
    fails("r.safetensors", "--diagnosis", "bad.json", code=2, message="--diagnosis bad.json: not valid JSON")
    (tmp_path / "other.json").write_text(json.dumps({**diagnosis.as_json(), "remainder": 3}))
    fails("r.safetensors", "--diagnosis", "other.json", code=2, message="covers 23 nodes (verified_top + remainder) but RESULT has")
