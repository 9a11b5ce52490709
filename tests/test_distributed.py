"""Data parallelism over prompt pairs: a 2-process gloo run launched by torchrun equals a
single-process run of the same plan (scores, metrics, tokens and metadata apart from the time)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_plan, save_tiny_gpt2

import atpframework as af
from atpframework.engine.distributed import Group, device_for_rank, shard
from atpframework.io.results import load_result


def _pairs(n):
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        clean = torch.randint(1, 60, (6,), generator=gen)
        noise = clean.clone()
        noise[[1, 4]] = torch.randint(1, 60, (2,), generator=gen)
        answer, wrong = torch.randint(1, 60, (2,), generator=gen).tolist()
        pairs.append({"clean": clean.tolist(), "noise": noise.tolist(), "answer": answer, "wrong_answer": wrong})
    return pairs


@pytest.mark.parametrize("method", ["atp_star", "activation_patching"])
def test_two_gloo_processes_equal_one(tmp_path, method):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    nodes = [{"kind": "attn_head"}, {"kind": "mlp_neuron", "layers": [1], "positions": [-1]}, {"kind": "resid"}]
    plan = make_plan(nodes, method=method, prompts=_pairs(16), model={"source": str(model_dir)}, batch_size=3)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    single = af.run(plan, output=tmp_path / "single.safetensors", distributed=False)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "atpframework", "plan.json", "-o", "dist.safetensors"]
    done = subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote dist.safetensors") == 1  # rank 0 alone reports and writes
    assert "rank 0 of 2" in done.stderr

    dist = load_result(tmp_path / "dist.safetensors")
    for name in ("attn_head", "mlp_neuron", "resid"):
        ours, ref = dist[name].per_pair, single[name].per_pair
        if ref.is_sparse:
            ours, ref = ours.to_dense(), ref.to_dense()
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dist.metric_clean, single.metric_clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(dist.metric_noise, single.metric_noise, rtol=0, atol=1e-6)
    assert dist.clean_tokens == single.clean_tokens and dist.noise_tokens == single.noise_tokens
    assert (dist.plan_json, dist.method, dist.model, dist.sign_convention) == (
        single.plan_json, single.method, single.model, single.sign_convention)


def test_sharding_gives_each_batch_to_one_rank():
    groups = [Group(rank, 3, rank) for rank in range(3)]
    assert [shard(7, g) for g in groups] == [[0, 3, 6], [1, 4], [2, 5]]
    assert device_for_rank("cuda", Group(1, 2, 1)) == "cuda:1"
    assert device_for_rank("cpu", Group(1, 2, 1)) == "cpu" and device_for_rank("cuda:3", Group(1, 2, 1)) == "cuda:3"


def test_distributed_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(af.PlanError, match="torchrun"):
        af.run(make_plan([{"kind": "resid"}], model={"source": str(save_tiny_gpt2(tmp_path / "m"))}), distributed=True)
