"""Runs that survive interruption: a run killed after some batches resumes from its checkpoints and
writes the same result as an uninterrupted run; a changed plan refuses to resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_plan, save_tiny_gpt2

import atpframework as af
from atpframework.checkpoint import sidecar_path
from atpframework.results import load_result

NODES = [{"kind": "attn_head"}, {"kind": "mlp_neuron"}, {"kind": "resid"}]


def _plan(model_dir, n_pairs=24, **extra):
    gen = torch.Generator().manual_seed(1)
    prompts = []
    for _ in range(n_pairs):
        clean = torch.randint(1, 60, (6,), generator=gen)
        noise = clean.clone()
        noise[2] = (noise[2] + 7) % 60
        prompts.append({"clean": clean.tolist(), "noise": noise.tolist(), "answer": 3, "wrong_answer": 4})
    return make_plan(NODES, method="activation_patching", prompts=prompts, model={"source": str(model_dir)},
                     batch_size=1, **extra)


def _same(a, b):
    for name in a.nodes:
        torch.testing.assert_close(a[name].per_pair, b[name].per_pair, rtol=0, atol=0)
    torch.testing.assert_close(a.metric_clean, b.metric_clean, rtol=0, atol=0)
    torch.testing.assert_close(a.metric_noise, b.metric_noise, rtol=0, atol=0)
    assert (a.clean_tokens, a.noise_tokens, a.plan_json, a.method, a.model, a.versions) == (
        b.clean_tokens, b.noise_tokens, b.plan_json, b.method, b.model, b.versions)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "plan.json").write_text(json.dumps(_plan(model_dir)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "atpframework", "plan.json", "-o", "out.safetensors"]
    side = sidecar_path(tmp_path / "out.safetensors")

    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(side.glob("batch_*.safetensors"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(side.glob("batch_*.safetensors")))
    assert 3 <= finished < 24, "the run must be killed part-way"
    assert not (tmp_path / "out.safetensors").exists()

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not side.exists()  # removed once the result is written

    reference = af.run(_plan(model_dir), output=tmp_path / "reference.safetensors")
    _same(load_result(tmp_path / "out.safetensors"), reference)


def test_resume_takes_finished_batches_instead_of_running_them(tmp_path, monkeypatch):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan = _plan(model_dir, n_pairs=4)
    out = tmp_path / "r.safetensors"
    first = af.run(plan, output=out)
    # leave a checkpoint of batch 2 with a marked value behind, as a killed run would
    from atpframework.checkpoint import Checkpoint
    from atpframework.engine import BatchOutput

    ckpt = Checkpoint(out, af.as_plan(plan).to_json(), af.__version__)
    marked = {name: torch.full_like(first[name].per_pair[2:3], 42.0) for name in first.nodes}
    ckpt.save(2, BatchOutput([2], marked, {}, {}, first.metric_clean[2:3], first.metric_noise[2:3]))
    again = af.run(plan, output=out)
    assert all(bool((again[name].per_pair[2] == 42.0).all()) for name in again.nodes)
    assert all(torch.equal(again[name].per_pair[[0, 1, 3]], first[name].per_pair[[0, 1, 3]]) for name in again.nodes)
    assert not sidecar_path(out).exists()


def test_a_changed_plan_refuses_to_resume(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "r.safetensors"
    from atpframework.checkpoint import Checkpoint

    Checkpoint(out, af.as_plan(_plan(model_dir, n_pairs=4)).to_json(), af.__version__)  # an unfinished run
    changed = _plan(model_dir, n_pairs=5)
    with pytest.raises(af.PlanError, match="unfinished run of a different plan.*Delete that folder"):
        af.run(changed, output=out)
    (tmp_path / "plan.json").write_text(json.dumps(changed))
    done = subprocess.run([sys.executable, "-m", "atpframework", "plan.json", "-o", "r.safetensors"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "different plan" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_objects_passed_in_turn_checkpointing_off(tmp_path, monkeypatch):
    """The plan cannot describe an object passed in, so a later run could not tell it changed."""
    from atpframework.checkpoint import Checkpoint

    saved = []
    monkeypatch.setattr(Checkpoint, "save", lambda self, number, output: saved.append(number))
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan = _plan(model_dir, n_pairs=2)
    af.run(plan, backend=af.load_backend(af.as_plan(plan)), output=tmp_path / "a.safetensors")
    assert saved == []
    af.run(plan, output=tmp_path / "b.safetensors")  # the plan alone: checkpointed
    assert saved == [0, 1]
