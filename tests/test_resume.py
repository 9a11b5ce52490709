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
from atpframework.engine.checkpoint import Checkpoint, sidecar_path
from atpframework.io.results import load_result

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


def _fingerprint(plan):
    """The fingerprint a run of ``plan`` (a dict naming a model directory) checkpoints under."""
    from atpframework.engine.checkpoint import run_fingerprint

    plan = af.as_plan(plan)
    backend = af.load_backend(plan)
    return run_fingerprint(plan.to_json(), af.compile(plan, backend=backend).pairs, backend, af.__version__)


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
    from atpframework.engine.checkpoint import Checkpoint
    from atpframework.plans.compiled import BatchOutput

    with Checkpoint(out, _fingerprint(plan)) as ckpt:
        marked = {name: torch.full_like(first[name].per_pair[2:3], 42.0) for name in first.nodes}
        ckpt.save(2, BatchOutput([2], marked, {}, {}, first.metric_clean[2:3], first.metric_noise[2:3]))
    again = af.run(plan, output=out)
    assert all(bool((again[name].per_pair[2] == 42.0).all()) for name in again.nodes)
    assert all(torch.equal(again[name].per_pair[[0, 1, 3]], first[name].per_pair[[0, 1, 3]]) for name in again.nodes)
    assert not sidecar_path(out).exists()


def test_a_changed_plan_refuses_to_resume(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "r.safetensors"
    from atpframework.engine.checkpoint import Checkpoint

    Checkpoint(out, _fingerprint(_plan(model_dir, n_pairs=4))).close()  # an unfinished run
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
    from atpframework.engine.checkpoint import Checkpoint

    saved = []
    monkeypatch.setattr(Checkpoint, "save", lambda self, number, output: saved.append(number))
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan = _plan(model_dir, n_pairs=2)
    af.run(plan, backend=af.load_backend(af.as_plan(plan)), output=tmp_path / "a.safetensors")
    assert saved == []
    af.run(plan, output=tmp_path / "b.safetensors")  # the plan alone: checkpointed
    assert saved == [0, 1]


# ------------------------------------------------------------------ the fingerprint and the lock
def _start_and_kill(command, cwd, side, batches=3):
    """Start ``command``, kill it (SIGKILL) once ``batches`` batches are checkpointed; the number finished."""
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(side.glob("batch_*.safetensors"))) < batches and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(side.glob("batch_*.safetensors")))


def test_a_resume_with_changed_weights_refuses_instead_of_mixing_runs(tmp_path):
    """The old fingerprint covered the plan JSON only: rewriting the weights between a kill and the rerun
    gave exit 0 and a result whose first pairs came from the old weights."""
    import transformers

    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "plan.json").write_text(json.dumps(_plan(model_dir)))
    command = [sys.executable, "-m", "atpframework", "plan.json", "-o", "out.safetensors"]
    side = sidecar_path(tmp_path / "out.safetensors")
    assert 3 <= _start_and_kill(command, tmp_path, side) < 24

    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.5  # one weight changed
    model.save_pretrained(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "model (or SAE) weights differ" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out.safetensors").exists()

    import shutil

    shutil.rmtree(side)  # the user's way out, as the message says
    fresh = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    _same(load_result(tmp_path / "out.safetensors"), af.run(_plan(model_dir), output=tmp_path / "reference.safetensors"))


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "plan.json").write_text(json.dumps(_plan(model_dir, n_pairs=48)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "atpframework", "plan.json", "-o", "out.safetensors"]
    side = sidecar_path(tmp_path / "out.safetensors")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(side.glob("batch_*.safetensors")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    other = _plan(model_dir, n_pairs=48)
    other["method"] = {"name": "atp"}  # another method on the same output: the old code adopted the first run's batches
    (tmp_path / "other.json").write_text(json.dumps(other))
    second = subprocess.run([sys.executable, "-m", "atpframework", "other.json", "-o", "out.safetensors"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.poll() is None, "the first run must still be running"
    assert second.returncode == 1 and "another run is writing" in second.stderr, second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    _same(load_result(tmp_path / "out.safetensors"), af.run(_plan(model_dir, n_pairs=48), output=tmp_path / "ref.safetensors"))
    assert not side.exists()


def test_batches_without_a_complete_fingerprint_are_never_adopted(tmp_path):
    """A run killed before its run.json was written left batches that a later plan adopted."""
    from atpframework.plans.compiled import BatchOutput

    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan = _plan(model_dir, n_pairs=4)
    out = tmp_path / "r.safetensors"
    with Checkpoint(out, _fingerprint(plan)) as ckpt:
        marked = {name: torch.full((1, 2, 4), 42.0) for name in ("attn_head",)}
        ckpt.save(1, BatchOutput([1], marked, {}, {}, torch.zeros(1), torch.zeros(1)))
    (sidecar_path(out) / "run.json").unlink()
    with pytest.raises(af.PlanError, match="without a complete fingerprint"):
        af.run(plan, output=out)
    assert (sidecar_path(out) / "batch_000001.safetensors").exists() and not out.exists()


def test_a_batch_from_another_run_is_refused(tmp_path):
    from atpframework.plans.compiled import BatchOutput

    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan, other = _plan(model_dir, n_pairs=4), _plan(model_dir, n_pairs=5)
    out, elsewhere = tmp_path / "r.safetensors", tmp_path / "s.safetensors"
    with Checkpoint(elsewhere, _fingerprint(other)) as ckpt:
        ckpt.save(1, BatchOutput([1], {"attn_head": torch.zeros(1, 2, 4)}, {}, {}, torch.zeros(1), torch.zeros(1)))
    Checkpoint(out, _fingerprint(plan)).close()
    os.replace(sidecar_path(elsewhere) / "batch_000001.safetensors", sidecar_path(out) / "batch_000001.safetensors")
    with pytest.raises(af.PlanError, match="written by another run"):
        af.run(plan, output=out)


def test_the_fingerprint_covers_every_weight_the_tokens_and_the_environment(tmp_path):
    from atpframework.engine.checkpoint import FINGERPRINT_PARTS, weights_digest

    model = torch.nn.Linear(3, 2)
    before = weights_digest(model.state_dict().items())
    with torch.no_grad():
        model.weight[1, 2] = torch.nextafter(model.weight[1, 2], torch.tensor(9.0))  # one ulp of one weight
    assert weights_digest(model.state_dict().items()) != before
    assert weights_digest(model.to(torch.bfloat16).state_dict().items()) not in (before, None)
    assert weights_digest([("w", torch.empty(2, device="meta"))]) is None  # no bytes: incomplete, never adopted
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    base = _fingerprint(_plan(model_dir, n_pairs=2))
    assert set(base) == set(FINGERPRINT_PARTS) and all(isinstance(v, str) for v in base.values())
    changed_tokens = _plan(model_dir, n_pairs=2)
    changed_tokens["prompts"][0]["clean"][0] += 1
    assert _fingerprint(changed_tokens)["tokens"] != base["tokens"]
