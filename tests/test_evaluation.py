"""The evaluation harness (atpframework.analysis.evaluation, benchmarks/evaluation.py): its smoke run, and its
numbers held to independent computations: per-pair curves and RelCost recomputed by hand from the stored
per-pair scores, the exact method's curve (own cost + k), a planted cancellation that AtP misses and GradDrop
does not, and the reasons ``explain_miss`` gives."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from atpframework.analysis.evaluation import Spread, differing_positions, equal_length_pairs, evaluate, explain_miss
from atpframework.analysis.plots import recall_bands_figure
from atpframework.errors import PlanError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation.py"


def _harness():
    spec = importlib.util.spec_from_file_location("benchmarks_evaluation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _harness()


# ------------------------------------------------------------------------------------ independent references
def hand_order(values):
    """Node indices by |value| descending, ties by the lower index (plain Python)."""
    return sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))


def hand_costs(effects, scores, own, k_max):
    """Cost of verified recall by walking the method's order until all true top-k are seen."""
    truth, order = hand_order(effects), hand_order(scores)
    position = {node: step for step, node in enumerate(order)}
    out, furthest = [], -1
    for k in range(1, k_max + 1):
        furthest = max(furthest, position[truth[k - 1]])
        out.append(own + furthest + 1)
    return out


def hand_relcost(costs):
    weights = [1 / k for k in range(1, len(costs) + 1)]
    return math.exp(sum(w * math.log(c / k) for k, (w, c) in enumerate(zip(weights, costs), start=1)) / sum(weights))


# ------------------------------------------------------------------------------------ the smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "evaluation.json").read_text()), done.stdout, wall


def _group(data, task, group):
    ev = next(t for t in data["tasks"] if t["task"] == task)
    return next(g for g in ev["groups"] if g["group"] == group)


def _method(group, name):
    return next(m for m in group["methods"] if m["name"] == name)


def test_smoke_run_writes_every_table_plot_and_number(smoke):
    out, data, stdout, _ = smoke
    assert [t["task"] for t in data["tasks"]] == ["tiny_random", "planted_cancellation"]
    groups = [g["group"] for g in data["tasks"][0]["groups"]]
    assert groups == ["attn_head", "attn_q+attn_k", "attn_v", "mlp_neuron", "resid"]
    for group in groups:
        assert (out / f"recall_tiny_random_{group.replace('+', '_')}.png").stat().st_size > 10_000
        assert f"### tiny_random · {group}" in stdout
    md = (out / "evaluation.md").read_text()
    assert "| method | own cost (F) | RelCost single: median [IQR] |" in md
    names = [m["name"] for m in data["tasks"][0]["groups"][0]["methods"]]
    assert names == ["atp", "atp_qkfix", "atp_graddrop", "atp_star", "atp_ig", "activation_patching", "subsampling", "blocks", "hierarchical"]
    for task in data["tasks"]:
        for group in task["groups"]:
            for m in group["methods"]:
                single = m["single"]
                assert single["relcost"]["q1"] <= single["relcost"]["median"] <= single["relcost"]["q3"]
                assert single["relcost"]["median"] >= 1 and m["distributional"]["relcost"] >= 1
                assert len(single["relcost_per_pair"]) == group["n_pairs"]
                assert len(m["distributional"]["curve"]) == group["k_distributional"]


def test_the_exact_method_costs_its_own_cost_plus_k(smoke):
    """activation_patching ranks by the ground truth itself: cost(k) = own cost + k in both settings, and its
    RelCost is the closed form of that curve (1 for the oracle, whose own cost is 0)."""
    _, data, _, _ = smoke
    for task in data["tasks"]:
        for group in task["groups"]:
            exact = _method(group, "activation_patching")
            own = exact["cost"]
            assert own == group["ground_truth_cost"]
            k_d, k_s = group["k_distributional"], group["k_single"]
            assert exact["distributional"]["curve"] == [own + k for k in range(1, k_d + 1)]
            assert exact["single"]["curve"]["median"] == [own + k for k in range(1, k_s + 1)]
            assert exact["distributional"]["relcost"] == pytest.approx(hand_relcost([own + k for k in range(1, k_d + 1)]), rel=1e-12)
            assert all(v == pytest.approx(hand_relcost([own + k for k in range(1, k_s + 1)]), rel=1e-12)
                       for v in exact["single"]["relcost_per_pair"])
            assert hand_relcost(list(range(1, k_d + 1))) == pytest.approx(1.0, abs=1e-12)
            assert exact["false_negatives"]["single_fn"] == 0 and exact["false_negatives"]["distributional_fn"] == 0


def test_the_planted_cancellation_is_atps_false_negative_and_not_graddrops(smoke):
    _, data, _, _ = smoke
    group = _group(data, "planted_cancellation", "attn_head+mlp_neuron")
    for name in ("atp", "atp_qkfix"):  # heads: the QK fix does not apply
        fns = _method(group, name)["false_negatives"]
        for fn in (fns["single"][0], fns["distributional"][0]):
            assert (fn["label"], fn["true_rank"], fn["reason"]) == ("attn_head L0 P1 H0", 1, "cancellation")
            assert fn["method_rank"] > 10 and fn["score"] == 0
            assert fn["estimates"]["atp_graddrop"] == pytest.approx(5.0, abs=1e-5)
        assert fns["single"][0]["effect"] == pytest.approx(-3.0, abs=1e-5)
        assert fns["single_by_reason"] == {"cancellation": 1} and fns["distributional_by_reason"] == {"cancellation": 1}
        # the diagnostic bound after verifying AtP's top 10 is above the missed node and points at it
        diagnosis = _method(group, name)["diagnosis"]
        assert diagnosis["false_negatives"][0]["covered"] == {"0.9": True, "0.99": True}
        assert diagnosis["false_negatives"][0]["is_worst_node"] == ["0.9", "0.99"]
    for name in ("atp_graddrop", "atp_star"):
        fns = _method(group, name)["false_negatives"]
        assert fns["single_fn"] == 0 and fns["distributional_fn"] == 0
        assert _method(group, name)["single"]["cost_at_k"]["1"]["median"] == _method(group, name)["cost"] + 1


# ------------------------------------------------------------------------------------ in-process, by hand
@pytest.fixture(scope="module")
def tiny_evaluation():
    backend = harness.in_memory_backend(harness.tiny_random_model())
    pairs = harness.tiny_random_pairs(5, seed=3)
    groups = {"heads": [{"kind": "attn_head"}], "qk": [{"kind": "attn_q"}, {"kind": "attn_k"}]}
    methods = ["atp", "atp_star", {"name": "hierarchical", "budget": 16}]
    return backend, pairs, evaluate("tiny", pairs, groups, methods, backend, k_max=30, fn_k=2, fn_factor=3)


def test_single_pair_curves_and_relcost_match_a_hand_computation(tiny_evaluation):
    _, pairs, ev = tiny_evaluation
    truth = ev.results["ground_truth"]
    for group, names in (("heads", ["attn_head"]), ("qk", ["attn_q", "attn_k"])):
        g = next(x for x in ev.groups if x.group == group)
        effects = torch.cat([truth[n].per_pair.flatten(1) for n in names], 1).double()
        for m in g.methods:
            result = ev.results[f"hierarchical:single ({group})" if m.name == "hierarchical" else m.name]
            scores = torch.cat([result[n].per_pair.flatten(1) for n in names], 1).double()
            rels = []
            for p in range(len(pairs)):
                costs = hand_costs(effects[p].tolist(), scores[p].tolist(), m.cost, g.k_single)
                assert m.single_costs[p].tolist() == costs
                rels.append(hand_relcost(costs))
            assert m.single_relcost.tolist() == pytest.approx(rels, rel=1e-12)
            q1, median, q3 = np.percentile(rels, [25, 50, 75])
            assert (m.relcost.q1, m.relcost.median, m.relcost.q3) == pytest.approx((q1, median, q3), rel=1e-12)
            # distributional: one ranking by mean |score| against mean |effect|
            dist = ev.results[f"hierarchical ({group})" if m.name == "hierarchical" else m.name]
            mean_scores = torch.cat([dist[n].per_pair.flatten(1) for n in names], 1).double().abs().mean(0)
            costs = hand_costs(effects.abs().mean(0).tolist(), mean_scores.tolist(), m.cost, g.k_distributional)
            assert m.distributional.costs.tolist() == costs
            # false negatives: true top-2 of each pair ranked below 6
            expected = set()
            for p in range(len(pairs)):
                order = hand_order(scores[p].tolist())
                for node in hand_order(effects[p].tolist())[:2]:
                    if order.index(node) + 1 > 6:
                        expected.add((p, node))
            assert {(fn.pair, fn.node) for fn in m.single_fn} == expected


def test_hierarchical_runs_pair_by_pair_and_group_by_group(tiny_evaluation):
    """Its single-pair run equals a run of that pair alone, on the group's nodes alone (joint patches never mix groups)."""
    backend, pairs, ev = tiny_evaluation
    import atpframework as af

    alone = af.run({"model": {"source": "in_memory"}, "prompts": [pairs[2]], "metric": {"name": "logit_diff"},
                    "nodes": [{"kind": "attn_q"}, {"kind": "attn_k"}],
                    "method": {"name": "hierarchical", "budget": 16}}, backend=backend, progress=False)
    torch.testing.assert_close(ev.results["hierarchical:single (qk)"]["attn_q"].per_pair[2], alone["attn_q"].per_pair[0])
    assert set(ev.results["hierarchical:single (qk)"].nodes) == {"attn_q", "attn_k"}
    assert set(ev.results["hierarchical (heads)"].nodes) == {"attn_head"}
    assert len(ev.results["hierarchical (qk)"].metric_clean) == len(pairs)
    assert set(ev.results["atp"].nodes) == {"attn_head", "attn_q", "attn_k"} and "atp:single" not in ev.results


def test_own_costs_are_those_of_the_groups_nodes_alone(tiny_evaluation):
    _, _, ev = tiny_evaluation
    heads, qk = ev.groups
    assert (heads.ground_truth_cost, qk.ground_truth_cost) == (2 + heads.n_nodes, 2 + qk.n_nodes)  # one patched row per node
    assert heads.methods[0].cost == 4  # atp: 2 forwards + 1 backward


# ------------------------------------------------------------------------------------ reasons
def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_explain_miss_tells_the_reasons_apart():
    effect = _t(-2.0)
    # a saturated key: AtP nearly 0, the QK fix right; only for query and key nodes
    refs = {"atp": _t(-0.1), "atp_qkfix": _t(-1.8), "atp_graddrop": _t(0.1), "atp_ig": _t(-0.5)}
    assert explain_miss("attn_k", effect, _t(-0.1), refs) == ("attention_saturation",)
    assert explain_miss("attn_head", effect, _t(-0.1), refs) == ("unexplained",)
    # cancellation: AtP small, GradDrop not
    refs = {"atp": _t(0.0), "atp_graddrop": _t(2.5), "atp_ig": _t(-0.2)}
    assert explain_miss("attn_head", effect, _t(0.0), refs) == ("cancellation",)
    # another nonlinearity: integrated gradients right, AtP wrong
    refs = {"atp": _t(-0.3), "atp_graddrop": _t(0.3), "atp_ig": _t(-2.2)}
    assert explain_miss("mlp_neuron", effect, _t(-0.3), refs) == ("nonlinearity",)
    # AtP right, the method (here GradDrop's score) lost it
    refs = {"atp": _t(-1.9), "atp_graddrop": _t(0.05)}
    assert explain_miss("attn_v", effect, _t(0.05), refs) == ("atp_close",)
    # the method's own score is not small: crowded out by overestimates
    assert explain_miss("attn_v", effect, _t(1.5), refs) == ("crowded_out",)
    # a baseline that patches sets jointly: its underestimate is its own, whatever the gradients say
    assert explain_miss("attn_v", effect, _t(0.05), refs, joint=True) == ("joint_patching",)
    assert explain_miss("attn_v", effect, _t(1.5), refs, joint=True) == ("crowded_out",)
    # over pairs: closeness is mean |x - effect| against mean |effect|
    assert explain_miss("attn_q", _t(1.0, -1.0), _t(0.0, 0.0), {"atp": _t(0.0, 0.0), "atp_qkfix": _t(1.0, -0.2)}) == (
        "attention_saturation",)
    with pytest.raises(ValueError, match="tolerance"):
        explain_miss("attn_q", effect, effect, {}, tolerance=1.0)


def test_spread_is_numpys_percentiles():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    s = Spread.of(torch.tensor(values))
    assert (s.q1, s.median, s.q3) == pytest.approx(tuple(np.percentile(values, [25, 50, 75])))
    assert s.text() == f"{s.median:.2f} [{s.q1:.2f}, {s.q3:.2f}]"


# ------------------------------------------------------------------------------------ pairs and arguments
class WordBackend:
    """A stand-in backend whose tokens are words: IOI templates then have different lengths."""

    def tokenize(self, text, prepend_bos):
        return [sum(map(ord, w)) for w in text.split()]


def test_equal_length_pairs_keep_the_most_common_length():
    pairs = equal_length_pairs("ioi", 6, 0, WordBackend())
    lengths = {len(p["clean"].split()) for p in pairs} | {len(p["noise"].split()) for p in pairs}
    assert len(pairs) == 6 and len(lengths) == 1
    drawn = [len(p["clean"].split()) for p in __import__("atpframework").tasks.get_task("ioi").pairs(48, 0, tokenize=lambda t: t.split())]
    assert lengths == {max(set(drawn), key=lambda n: (drawn.count(n), -n))}
    with pytest.raises(PlanError, match="n_pairs: task 'ioi' gave only"):
        equal_length_pairs("ioi", 40, 0, WordBackend(), draw_factor=1)


def test_differing_positions_start_at_the_first_difference_of_any_pair():
    pairs = [{"clean": [1, 2, 3, 4, 5], "noise": [1, 2, 3, 9, 5]}, {"clean": [1, 2, 3, 4, 5], "noise": [1, 2, 7, 4, 5]}]
    assert differing_positions(pairs, WordBackend()) == [2, 3, 4]
    text = [{"clean": "a b c d", "noise": "a b x d"}]
    assert differing_positions(text, WordBackend()) == [2, 3]
    with pytest.raises(PlanError, match="pairs: positions from the first difference need pairs of one token length"):
        differing_positions([{"clean": [1, 2], "noise": [1, 3]}, {"clean": [1, 2, 3], "noise": [1, 2, 4]}], WordBackend())


def test_bad_arguments_are_refused_by_name(tiny_evaluation):
    backend, pairs, _ = tiny_evaluation
    with pytest.raises(PlanError, match="fn_k: expected an integer >= 1"):
        evaluate("t", pairs, {"h": [{"kind": "attn_head"}]}, ["atp"], backend, fn_k=0)
    with pytest.raises(PlanError, match=r"groups\['b'\]\[0\]: result name 'attn_head' is already used in group 'a'"):
        evaluate("t", pairs, {"a": [{"kind": "attn_head"}], "b": [{"kind": "attn_head"}]}, ["atp"], backend)
    with pytest.raises(PlanError, match="tolerance"):
        evaluate("t", pairs, {"h": [{"kind": "attn_head"}]}, ["atp"], backend, tolerance=0)
    with pytest.raises(ValueError, match=r"bands\[0\]: median, q1 and q3 need one value per k"):
        recall_bands_figure([("atp", _t(1, 2), _t(1), _t(1, 2))])
