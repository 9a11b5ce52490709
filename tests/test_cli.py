"""The ``atpf`` command line: exit codes, error messages without tracebacks, dry runs, a full run on a
local Hugging Face directory, ``show`` and ``schema``."""

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.cli import main

PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]
ROW = re.compile(r"^\s*(\d+)\s+(\S+ .+?)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)$")




def write_plan(path, source, nodes=None, method="atp", **extra):
    plan = {
        "model": {"source": str(source)},
        "prompts": PROMPTS,
        "nodes": nodes or [{"kind": "attn_head"}],
        "method": {"name": method},
        **extra,
    }
    path.write_text(json.dumps(plan))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert isinstance(result.exception, SystemExit), result.exception  # exited on purpose, not an escaped exception
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------------------------------- plan errors: exit 2
def test_bad_plan_exits_2_with_a_located_message(tmp_path):
    plan = write_plan(tmp_path / "plan.json", "in_memory", nodes=[{"kind": "attn_head", "heads": "some"}])
    result = invoke(plan, "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 2, "nodes[0].heads", "'each' or 'all'")
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_node_kind_exits_2_listing_kinds(tmp_path):
    plan = write_plan(tmp_path / "plan.json", "in_memory", nodes=[{"kind": "mlp_neurons"}])
    assert_clean_error(invoke(plan, "--dry-run"), 2, "nodes[0].kind", "mlp_neuron,", "atpframework.nodes")


def test_nonexistent_plan_path_exits_2(tmp_path):
    result = invoke(tmp_path / "missing.json", "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 2, "cannot read plan file", "missing.json")


def test_plan_without_output_exits_2(tmp_path, hf_dir):
    plan = write_plan(tmp_path / "plan.json", hf_dir)
    assert_clean_error(invoke(plan), 2, "output:", "-o OUT.safetensors")


def test_model_error_found_at_compile_time_exits_2(tmp_path, hf_dir):
    plan = write_plan(tmp_path / "plan.json", hf_dir, nodes=[{"kind": "attn_head", "layers": [5]}])
    assert_clean_error(invoke(plan, "--dry-run"), 2, "nodes[0].layers", "allowed 0..1")


def test_show_of_a_foreign_file_exits_2(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert_clean_error(invoke("show", junk), 2, "not a safetensors file")


# ----------------------------------------------------------------------------------------- runtime errors: exit 1
def test_runtime_failure_exits_1_without_traceback(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    plan = write_plan(tmp_path / "plan.json", empty)
    result = invoke(plan, "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 1, "model.source", "cannot load a Hugging Face model", str(empty))
    assert not (tmp_path / "out.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    plan = write_plan(tmp_path / "plan.json", empty)
    result = invoke(plan, "-o", tmp_path / "out.safetensors", "--debug")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "BackendError" in result.stderr
    bad = write_plan(tmp_path / "bad.json", empty, nodes=[{"kind": "attn_head", "heads": "some"}])
    result = invoke(bad, "--dry-run", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "PlanError" in result.stderr


# ----------------------------------------------------------------------------------------- schema
def test_schema_prints_the_plan_json_schema():
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema == af.plan_json_schema()
    assert {"attn_head", "mlp_neuron", "resid"} <= set(schema["properties"]["nodes"]["items"]["discriminator"]["mapping"])


# ----------------------------------------------------------------------------------------- dry run and full run
def test_dry_run_prints_the_passes_and_writes_nothing(tmp_path, hf_dir):
    plan = write_plan(tmp_path / "plan.json", hf_dir, nodes=[{"kind": "attn_head"}, {"kind": "resid", "positions": [-1]}])
    out = tmp_path / "out.safetensors"
    result = invoke(plan, "--dry-run", "-o", out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("noise_forward", "clean_forward", "clean_backward", "method: atp; metric: logit_diff"):
        assert expected in text
    assert "attn_head (attn_head on site attn_z): 48 nodes [layer=2 x pos=6 x head=4]" in text
    assert "resid (resid on site resid): 3 nodes [layer=3 x pos=1]" in text
    assert "patched_forward" not in text
    assert "total per batch: 2 forward, 1 backward" in text
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


def test_dry_run_of_activation_patching_lists_patched_passes(tmp_path, hf_dir):
    plan = write_plan(tmp_path / "plan.json", hf_dir, method="activation_patching", output=str(tmp_path / "o.safetensors"))
    result = invoke(plan, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "patched_forward" in result.stdout and "clean_backward" not in result.stdout
    assert "48 nodes in all" in result.stdout
    assert not (tmp_path / "o.safetensors").exists()


def test_full_run_writes_a_result_that_show_ranks(tmp_path, hf_dir):
    plan = write_plan(tmp_path / "plan.json", hf_dir, nodes=[{"kind": "attn_head"}, {"kind": "mlp_neuron", "positions": [-1]}])
    out = tmp_path / "out.safetensors"
    result = invoke(plan, "-o", out, "--top", "4")
    assert result.exit_code == 0, (result.output, result.stderr)
    assert f"wrote {out}" in result.stdout
    assert len([line for line in result.stdout.splitlines() if ROW.match(line)]) == 4

    loaded = af.load_result(out)
    assert loaded.method == "atp" and loaded.model["source"] == str(hf_dir)
    assert loaded["attn_head"].per_pair.shape == (2, 2, 6, 4)
    assert loaded["mlp_neuron"].per_pair.shape == (2, 2, 1, 128)  # GPT-2: d_mlp = 4 * n_embd
    assert loaded.clean_tokens == [p["clean"] for p in PROMPTS]
    assert json.loads(loaded.plan_json)["model"]["source"] == str(hf_dir)

    shown = invoke("show", out, "--top", "3")
    assert shown.exit_code == 0, shown.output
    rows = [ROW.match(line) for line in shown.stdout.splitlines()]
    rows = [r for r in rows if r]
    assert [int(r.group(1)) for r in rows] == [1, 2, 3]
    top = loaded.top_k(3)
    assert [r.group(2).strip() for r in rows] == [t.label() for t in top]
    assert [float(r.group(3)) for r in rows] == pytest.approx([t.score for t in top], abs=1e-5)
    scores = [float(r.group(3)) for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert "top 3 nodes by mean |effect|" in shown.stdout

    signed = invoke("show", out, "--top", "2", "--aggregate", "mean")
    assert signed.exit_code == 0 and "signed mean effect" in signed.stdout
    assert len([line for line in signed.stdout.splitlines() if ROW.match(line)]) == 2


# ----------------------------------------------------------------------------------------- real process
def test_python_dash_m_exit_codes(tmp_path):
    """The real entry point: exit codes and stderr as a shell sees them (no model library is imported here)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)

    def atpf(*args):
        return subprocess.run(
            [sys.executable, "-m", "atpframework", *map(str, args)], capture_output=True, text=True, env=env,
            cwd=tmp_path, timeout=120,
        )

    bad = write_plan(tmp_path / "bad.json", "in_memory", nodes=[{"kind": "attn_head", "neurons": "all"}])
    proc = atpf(bad, "-o", "out.safetensors")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "nodes[0].neurons: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""

    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    proc = atpf("show", "junk.safetensors")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr

    assert sorted(os.listdir(tmp_path)) == ["bad.json", "junk.safetensors"]


def test_show_names_graddrop_scores_for_what_they_are(tmp_path):
    af.run(make_plan([{"kind": "attn_head"}], method="atp_graddrop"), model=tiny_model(), output=tmp_path / "gd.safetensors")
    shown = invoke("show", tmp_path / "gd.safetensors", "--top", "2")
    assert shown.exit_code == 0, shown.output
    assert "top 2 nodes by mean GradDrop score" in shown.output
