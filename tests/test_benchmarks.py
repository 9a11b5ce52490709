"""The benchmark suite's smoke run (tiny model, one repetition), so the suite cannot rot.

Beyond running, the suite cross-checks numbers against independent references, and this test holds
it to them: GradDrop scores equal a straightforward one-backward-per-dropped-block implementation,
and exact patching equals ``transformer_lens.patching``."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


def test_benchmark_suite_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--json", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | atp / bare (backward to inputs) |" in done.stdout
    results = json.loads(out.read_text())
    tiny = results["models"]["tiny"]

    graddrop = tiny["atp_star"]
    assert graddrop["graddrop_compared"] == sorted(["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid"])
    assert graddrop["graddrop_scale"] > 1e-2
    assert graddrop["graddrop_max_diff"] <= 1e-5 * graddrop["graddrop_scale"]

    patching = tiny["patching"]
    assert patching["scale"] > 1e-2 and patching["max_diff"] <= 1e-5
    assert patching["n_nodes"] == len(patching["layers"]) * patching["seq"] * (4 + 1)

    ratios = [tiny["overhead"]["atp/bare"], graddrop["atp_star/cost_model"], graddrop["naive/atp_star"], patching["speedup"]]
    if "memory" in tiny:
        ratios += [tiny["memory"]["atp/bare"], tiny["memory"]["atp_star/bare"]]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert {axis: [row["x"] for row in rows] for axis, rows in results["scaling"].items()} == {
        "seq": [8, 16], "batch": [1, 2], "depth": [2, 3]
    }


def test_benchmark_suite_refuses_unknown_names():
    done = subprocess.run([sys.executable, str(SUITE), "--models", "tiny,nope", "--only", "overhead"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "unknown model or measurement: nope" in done.stderr


def test_chunking_benchmark_smoke_run(tmp_path):
    """benchmarks/chunking.py on the tiny model: chunked runs give the unchunked scores and the budget's chunks."""
    out = tmp_path / "chunking.json"
    script = SUITE.parent / "chunking.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["--model", "tiny", "--seq", "48", "--budgets", "0.5,0.1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["chunks"] for r in runs][0] == 1 and runs[1]["chunks"] >= 2 and runs[2]["chunks"] > runs[1]["chunks"]
    for r in runs:
        assert r["max_diff"] <= 1e-5 * r["max_score"] and r["max_score"] > 1e-2
    assert runs[0]["estimate"] > runs[1]["estimate"] > runs[2]["estimate"]
