"""Baselines, verification, the diagnostic and method comparison on tiny models: each against exact
patching or a closed form, plus the CLI commands' files and errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_plan, save_tiny_gpt2, tiny_model

import atpframework as af
from atpframework.analysis.compare import compare, write_comparison
from atpframework.analysis.verify import diagnose, verified_effects, verify
from atpframework.io.results import load_result
from atpframework.methods.base import get_method

NODES = [{"kind": "attn_head"}, {"kind": "resid"}]


# ------------------------------------------------------------------ baselines
def test_blocks_of_one_node_and_a_fully_split_hierarchy_equal_activation_patching():
    model = tiny_model()
    exact = af.run(make_plan(NODES, method="activation_patching"), model=model)
    singles = af.run(make_plan(NODES, method={"name": "blocks", "block_size": 1}), model=model)
    hierarchy = af.run(make_plan(NODES, method={"name": "hierarchical", "budget": 10_000, "branching": 3}), model=model)
    for kind in ("attn_head", "resid"):
        assert exact[kind].per_pair.abs().max() > 1e-3
        torch.testing.assert_close(singles[kind].per_pair, exact[kind].per_pair, rtol=0, atol=1e-6)
        torch.testing.assert_close(hierarchy[kind].per_pair, exact[kind].per_pair, rtol=0, atol=1e-6)


def test_a_block_scores_the_joint_patch_of_its_nodes():
    """Residual nodes flatten layer-major, so blocks of seq_len nodes are whole layers: equal to positions "all"."""
    model = tiny_model()
    blocks = af.run(make_plan([{"kind": "resid"}], method={"name": "blocks", "block_size": 6}), model=model)
    joint = af.run(make_plan([{"kind": "resid", "positions": "all"}], method="activation_patching"), model=model)
    expected = joint["resid"].per_pair.expand(-1, -1, 6)  # pair layer pos
    torch.testing.assert_close(blocks["resid"].per_pair, expected, rtol=0, atol=1e-6)


def test_hierarchical_stays_within_its_budget_and_finds_the_largest_node_first():
    model = tiny_model()
    rows = []
    model.blocks[0].hook_resid_pre.register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    plan = make_plan([{"kind": "attn_head"}], method={"name": "hierarchical", "budget": 20, "branching": 2, "sets_per_pass": 4})
    result = af.run(plan, model=model)
    n_pairs = 2
    patched_rows = sum(rows) - 2 * n_pairs  # noise and clean passes
    assert 16 * n_pairs < patched_rows <= 20 * n_pairs
    exact = af.run(make_plan([{"kind": "attn_head"}], method="activation_patching"), model=model)
    # best-first splitting resolved the largest node down to itself: its score is its exact effect
    top = int(exact["attn_head"].aggregate().flatten().argmax())
    assert int(result["attn_head"].aggregate().flatten().argmax()) == top
    torch.testing.assert_close(result["attn_head"].per_pair.flatten(1)[:, top], exact["attn_head"].per_pair.flatten(1)[:, top])


def _linear_model():
    """No final norm: the last layer's neuron values at the last position reach the logits linearly,
    so patching them has exactly additive effects (the metric is a known linear function)."""
    return tiny_model(normalization_type=None)


def test_subsampling_is_unbiased_for_additive_effects():
    model = _linear_model()
    nodes = [{"kind": "mlp_neuron", "layers": [1], "positions": [-1]}]
    exact = af.run(make_plan(nodes, method="activation_patching"), model=model)
    jointly = af.run(make_plan([{"kind": "mlp_neuron", "layers": [1], "positions": [-1], "neurons": "all"}], method="activation_patching"), model=model)
    # additivity check of the fixture: patching all neurons equals the sum of single effects
    torch.testing.assert_close(jointly["mlp_neuron"].per_pair.flatten(), exact["mlp_neuron"].per_pair.sum((1, 2, 3)), rtol=1e-4, atol=1e-5)
    plan = make_plan(nodes, method={"name": "subsampling", "samples": 600, "p": 0.5, "sets_per_pass": 64, "seed": 3})
    sub = af.run(plan, model=model)
    truth, estimate = exact["mlp_neuron"].per_pair, sub["mlp_neuron"].per_pair
    stderr = sub.extras["mlp_neuron.stderr"]
    z = ((estimate - truth) / stderr).flatten()
    assert z.abs().max() < 4.5
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3
    counts = sub.extras["mlp_neuron.count_in"] + sub.extras["mlp_neuron.count_out"]
    assert (counts == 600).all()


def test_method_costs_count_forward_passes_per_pair():
    model = tiny_model()
    plan = make_plan(NODES, method="atp")
    n_nodes = 2 * 6 * 4 + 3 * 6
    costs = {}
    for spec in ("atp", "atp_qkfix", "activation_patching", {"name": "subsampling", "samples": 40},
                 {"name": "blocks", "block_size": 10}, {"name": "hierarchical", "budget": 7}):
        name = spec if isinstance(spec, str) else spec["name"]
        compiled = af.compile(dict(plan, method=spec if isinstance(spec, dict) else {"name": spec}), model=model)
        costs[name] = get_method(name).cost(compiled)
    assert costs == {
        "atp": 4.0, "atp_qkfix": 4.0, "activation_patching": n_nodes + 2.0, "subsampling": 42.0,
        "blocks": 2.0 + -(-n_nodes // 10), "hierarchical": 9.0,
    }


# ------------------------------------------------------------------ verification
def test_verify_stores_exact_effects_of_the_top_estimated_nodes(tmp_path):
    model = tiny_model()
    estimate = af.run(make_plan(NODES, method="atp"), model=model)
    exact = af.run(make_plan(NODES, method="activation_patching"), model=model)
    flat_estimate = torch.cat([estimate[k].aggregate().flatten() for k in ("attn_head", "resid")])
    flat_exact = torch.cat([exact[k].per_pair.flatten(1) for k in ("attn_head", "resid")], 1)
    first = verify(estimate, budget=10, model=model)
    nodes, ranks, effects = verified_effects(first)
    assert nodes.tolist() == flat_estimate.argsort(descending=True, stable=True)[:10].tolist()
    assert ranks.tolist() == list(range(10))
    torch.testing.assert_close(effects, flat_exact[:, nodes], rtol=0, atol=1e-6)
    first.save(tmp_path / "r.safetensors")
    again = verify(tmp_path / "r.safetensors", budget=5, model=model)  # continues where it stopped
    nodes2, ranks2, effects2 = verified_effects(again)
    assert nodes2[:10].tolist() == nodes.tolist() and ranks2[10:].tolist() == list(range(10, 15))
    assert nodes2.tolist() == flat_estimate.argsort(descending=True, stable=True)[:15].tolist()
    torch.testing.assert_close(effects2, flat_exact[:, nodes2], rtol=0, atol=1e-6)
    assert again.verification["verified"] == 15 and again.verification["stopped"] == "budget of 5 nodes spent"
    loaded = load_result(again.save(tmp_path / "r2.safetensors"))
    torch.testing.assert_close(verified_effects(loaded)[2], effects2)


def test_verify_until_stable_stops_once_the_top_set_settles():
    model = tiny_model()
    estimate = af.run(make_plan(NODES, method="atp"), model=model)
    done = verify(estimate, until_stable=True, top=3, patience=8, nodes_per_pass=4, model=model)
    nodes, _, effects = verified_effects(done)
    strength = effects.abs().mean(0)
    top3 = set(strength.argsort(descending=True)[:3].tolist())
    n = len(nodes)
    assert n < 66 and "stable" in done.verification["stopped"]
    assert all(i < n - 8 for i in top3)  # the last 8 verified did not enter the top 3
    assert set(range(n)) - top3  # and the top set was found among the earlier ones


def test_verify_refuses_bad_requests():
    model = tiny_model()
    estimate = af.run(make_plan(NODES, method="atp"), model=model)
    with pytest.raises(af.PlanError, match="either budget"):
        verify(estimate, budget=3, until_stable=True, model=model)
    with pytest.raises(af.PlanError, match="budget: must be at least 1"):
        verify(estimate, budget=0, model=model)


# ------------------------------------------------------------------ the diagnostic on a model
def test_diagnose_bounds_a_planted_unverified_effect():
    """Hide the true largest node from the estimate: it stays unverified, and the bound must still cover it."""
    model = _linear_model()
    nodes = [{"kind": "mlp_neuron", "layers": [1], "positions": [-1]}]
    exact = af.run(make_plan(nodes, method="activation_patching", prompts=make_plan([])["prompts"][:1]), model=model)
    truth = exact["mlp_neuron"].per_pair.flatten()
    hidden = int(truth.abs().argmax())
    estimates = exact["mlp_neuron"].per_pair.clone()
    estimates.view(-1)[hidden] = 0.0
    disguised = type(exact)(**{**exact.__dict__, "nodes": {"mlp_neuron": type(exact["mlp_neuron"])(
        **{**exact["mlp_neuron"].__dict__, "per_pair": estimates})}})
    _, diagnosis = diagnose(disguised, verified_top=5, samples=[200], confidences=(0.99,), model=model)
    theta = diagnosis.bounds[0.99][-1][1]
    assert theta >= abs(float(truth[hidden]))
    assert diagnosis.remainder == truth.numel() - 5


def test_diagnose_bound_shrinks_with_samples_and_covers_the_remainder():
    model = _linear_model()
    nodes = [{"kind": "mlp_neuron", "layers": [1], "positions": [-1]}]
    plan = make_plan(nodes, method="activation_patching", prompts=make_plan([])["prompts"][:1])
    exact = af.run(plan, model=model)
    _, diagnosis = diagnose(exact, verified_top=10, samples=[50, 400], confidences=(0.9, 0.99), model=model)
    truth = exact["mlp_neuron"].per_pair.flatten().abs().sort(descending=True).values
    for confidence, bounds in diagnosis.bounds.items():
        assert bounds[1][1] < bounds[0][1], confidence
        assert bounds[1][1] >= truth[10]  # the largest unverified effect
    assert diagnosis.bounds[0.99][-1][1] > diagnosis.bounds[0.9][-1][1]


def test_diagnosis_warns_when_its_bound_says_little():
    """Each warning against bounds written here: infinite, not shrinking, above the verified effects; none
    for a bound that shrinks below every verified effect."""
    from atpframework.analysis.verify import Diagnosis

    def diagnosis(bounds, verified=(2.0, 1.0)):
        return Diagnosis(5, 100, 0.5, bounds, {c: 0 for c in bounds}, torch.tensor(verified), 1.0)

    assert diagnosis({0.9: [(50, 0.8), (400, 0.3)]}).warnings() == []
    (infinite,) = diagnosis({0.9: [(4, float("inf"))]}).warnings()
    assert infinite.startswith("bound@0.9 is infinite at 4 samples")
    (flat,) = diagnosis({0.9: [(50, 0.5), (400, 0.5)]}).warnings()
    assert "did not shrink with more samples (0.5 at 50 -> 0.5 at 400)" in flat
    grew, above = diagnosis({0.99: [(50, 1.94), (400, 2.07)]}).warnings()  # the case users met on SmolLM2
    assert grew.startswith("bound@0.99 did not shrink") and "2.07 is not below the largest verified mean |effect| 2" in above
    assert diagnosis({0.9: [(50, 0.8), (400, 0.3)]}).as_json()["warnings"] == []


# ------------------------------------------------------------------ comparison
def test_compare_curves_follow_the_rankings(tmp_path):
    model = tiny_model()
    plan = make_plan(NODES, method="atp")
    comparison = compare(plan, ["atp", {"name": "blocks", "block_size": 8}], model=model, k_max=5)
    truth = torch.cat([comparison.ground_truth.result[k].aggregate().flatten() for k in ("attn_head", "resid")])
    true_top = int(truth.abs().argmax())
    for run, curve in zip(comparison.runs, comparison.curves):
        scores = torch.cat([run.result[k].aggregate().flatten() for k in ("attn_head", "resid")])
        position = int((scores.abs().argsort(descending=True, stable=True) == true_top).nonzero())
        assert curve.costs[0] == run.cost + position + 1
    assert comparison.runs[0].cost == 4.0
    written = write_comparison(comparison, tmp_path)
    names = {p.name for p in written}
    assert {"compare.md", "compare.json", "compare.png", "atp.safetensors", "blocks.safetensors"} <= names
    table = (tmp_path / "compare.md").read_text()
    assert "atp" in table and "RelCost" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["n_nodes"] == 66 and len(data["curves"]) == 2


# ------------------------------------------------------------------ CLI
def _atpf(*args, cwd):
    checkout = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}  # a worktree under test
    return subprocess.run([sys.executable, "-m", "atpframework", *args], cwd=cwd, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd), **checkout})


def test_cli_verify_diagnose_and_compare(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    plan = make_plan([{"kind": "attn_head"}], method="atp_star", model={"source": str(model_dir)}, output="r.safetensors")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert _atpf("plan.json", cwd=tmp_path).returncode == 0
    before = (tmp_path / "r.safetensors").read_bytes()
    bad = _atpf("verify", "r.safetensors", "--budget", "3", "--until-stable", cwd=tmp_path)
    assert bad.returncode == 2 and "either budget" in bad.stderr and "Traceback" not in bad.stderr
    assert (tmp_path / "r.safetensors").read_bytes() == before  # nothing written on a refused request
    ok = _atpf("verify", "r.safetensors", "--budget", "12", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "verified 12 of 48 nodes" in ok.stdout
    assert len(verified_effects(load_result(tmp_path / "r.safetensors"))[0]) == 12
    diag = _atpf("diagnose", "r.safetensors", "--verified-top", "12", "--samples", "20,80", "--confidence", "0.9",
                 "--plot", "d.png", "--json", "d.json", cwd=tmp_path)
    assert diag.returncode == 0, diag.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    assert [n for n, _ in report["bounds"]["0.9"]] == [20, 80] and (tmp_path / "d.png").stat().st_size > 0
    bad = _atpf("diagnose", "r.safetensors", "--verified-top", "12", "--samples", "20,x", cwd=tmp_path)
    assert bad.returncode == 2 and "--samples" in bad.stderr
    cmp = _atpf("compare", "plan.json", "--methods", "atp,blocks", "--k-max", "5", "--out", "cmp", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stderr
    assert (tmp_path / "cmp" / "compare.png").exists() and "RelCost" in cmp.stdout
    bad = _atpf("compare", "plan.json", "--methods", "atp,nope", "--out", "cmp2", cwd=tmp_path)
    assert bad.returncode == 2 and "nope" in bad.stderr
