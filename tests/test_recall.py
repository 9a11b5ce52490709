"""Cost of verified recall, RelCost, the table/JSON outputs and the PNG plots (atpframework.analysis.recall, .plots)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from atpframework.analysis.recall import (
    RecallCurve,
    curves_to_json,
    format_table,
    ranking_from_scores,
    recall_curve,
    relative_cost,
    true_top_order,
    verified_recall_cost,
)


# ---------------------------------------------------------------- independent references
def brute_force_costs(effects, ranking, own):
    """Walk the ranking node by node until the true top-k set (|c| desc, ties by index) is all verified."""
    n = len(effects)
    true_order = sorted(range(n), key=lambda i: (-abs(effects[i]), i))
    out = []
    for k in range(1, n + 1):
        wanted = set(true_order[:k])
        seen = set()
        steps = 0
        for node in ranking:
            if wanted <= seen:
                break
            seen.add(node)
            steps += 1
        out.append(own + steps)
    return out


def loop_relcost(costs):
    num = sum(math.log(c / k) / k for k, c in enumerate(costs, start=1))
    den = sum(1 / k for k in range(1, len(costs) + 1))
    return math.exp(num / den)


# ---------------------------------------------------------------- verified_recall_cost
def test_oracle_costs_k():
    effects = torch.randn(40, generator=torch.Generator().manual_seed(0))
    oracle = sorted(range(40), key=lambda i: -abs(float(effects[i])))
    costs = verified_recall_cost(effects, torch.tensor(oracle))
    assert costs.dtype == torch.float64
    assert costs.tolist() == [float(k) for k in range(1, 41)]
    # true_top_order is that oracle order
    assert true_top_order(effects).tolist() == oracle


def test_top1_node_ranked_last_costs_n_for_every_k():
    n, own = 7, 4.5
    effects = torch.tensor([0.1, -0.3, 5.0, 0.2, -1.0, 0.05, 0.7])  # node 2 is the true top-1
    ranking = torch.tensor([4, 6, 1, 3, 0, 5, 2])
    costs = verified_recall_cost(effects, ranking, method_cost=own)
    assert costs.tolist() == [n + own] * n
    assert verified_recall_cost(effects, ranking).tolist() == [float(n)] * n


def test_hand_computed_example():
    # c = [0.5, -3.0, 1.0, 0.0, 2.0]: true order by |c| is node 1 (3.0), 4 (2.0), 2 (1.0), 0 (0.5), 3 (0.0).
    # ranking [4, 0, 1, 3, 2] verifies node 4 at step 1, 0 at 2, 1 at 3, 3 at 4, 2 at 5.
    # k=1 {1}: step 3.   k=2 {1,4}: max(3,1)=3.   k=3 {1,4,2}: 5.   k=4 +{0}: 5.   k=5 +{3}: 5.
    # plus own cost 3 -> [6, 6, 8, 8, 8].
    effects = torch.tensor([0.5, -3.0, 1.0, 0.0, 2.0])
    ranking = torch.tensor([4, 0, 1, 3, 2])
    assert verified_recall_cost(effects, ranking, method_cost=3).tolist() == [6.0, 6.0, 8.0, 8.0, 8.0]
    assert verified_recall_cost(effects, ranking, method_cost=3, k_max=2).tolist() == [6.0, 6.0]
    # RelCost by hand: ratios 6/1, 6/2, 8/3, 8/4, 8/5 weighted by 1, 1/2, 1/3, 1/4, 1/5
    num = math.log(6) + math.log(3) / 2 + math.log(8 / 3) / 3 + math.log(2) / 4 + math.log(1.6) / 5
    den = 1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5
    assert relative_cost(torch.tensor([6.0, 6.0, 8.0, 8.0, 8.0])) == pytest.approx(math.exp(num / den), rel=1e-12)


def test_ties_are_broken_by_lower_index():
    # |c| ties between nodes 0 and 1: node 0 is the true top-1, so k=1 waits for node 0 (step 3).
    effects = torch.tensor([1.0, -1.0, 0.5])
    assert true_top_order(effects).tolist() == [0, 1, 2]
    assert verified_recall_cost(effects, torch.tensor([1, 2, 0])).tolist() == [3.0, 3.0, 3.0]
    assert ranking_from_scores(torch.tensor([0.2, -0.7, 0.7, 0.0, -0.2])).tolist() == [1, 2, 0, 4, 3]


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (1,), generator=gen))
    # small integers with random signs: plenty of |c| ties, zeros included
    effects = torch.randint(-4, 5, (n,), generator=gen).double() * 0.25
    ranking = torch.randperm(n, generator=gen)
    own = float(torch.randint(0, 20, (1,), generator=gen)) / 2
    expected = brute_force_costs(effects.tolist(), ranking.tolist(), own)
    assert verified_recall_cost(effects, ranking, method_cost=own).tolist() == expected
    k_max = max(1, n // 2)
    assert verified_recall_cost(effects, ranking, method_cost=own, k_max=k_max).tolist() == expected[:k_max]
    # every curve is on or above the oracle and non-decreasing
    costs = torch.tensor(expected)
    assert bool((costs >= torch.arange(1, n + 1) + own).all())
    assert bool((costs[1:] >= costs[:-1]).all())


@pytest.mark.parametrize(
    "ranking, fragment",
    [
        (torch.tensor([0, 1, 1, 3]), "permutation"),  # duplicate
        (torch.tensor([0, 1, 2]), "length"),  # too short
        (torch.tensor([0, 1, 2, 3, 4]), "length"),  # too long
        (torch.tensor([0, 1, 2, 4]), "out of range"),
        (torch.tensor([0, 1, -1, 3]), "out of range"),
        (torch.tensor([[0, 1], [2, 3]]), "1-D"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer"),
        ([0, 1, 2, 3], "torch.Tensor"),
    ],
)
def test_invalid_ranking_raises(ranking, fragment):
    with pytest.raises(ValueError, match="ranking") as info:
        verified_recall_cost(torch.tensor([1.0, 2.0, 3.0, 4.0]), ranking)
    assert fragment in str(info.value)


def test_invalid_other_arguments_raise():
    effects, ranking = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2, 1, 0])
    for kwargs, name in [
        (dict(k_max=0), "k_max"), (dict(k_max=4), "k_max"), (dict(method_cost=-1.0), "method_cost"),
        (dict(method_cost=float("nan")), "method_cost"),
    ]:
        with pytest.raises(ValueError, match=name):
            verified_recall_cost(effects, ranking, **kwargs)
    with pytest.raises(ValueError, match="true_effects"):
        verified_recall_cost(torch.tensor([1.0, float("inf"), 3.0]), ranking)
    with pytest.raises(ValueError, match="scores"):
        recall_curve("m", effects, torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- RelCost
def test_relative_cost_oracle_factor_two_and_loop():
    k = torch.arange(1, 101, dtype=torch.float64)
    assert relative_cost(k) == pytest.approx(1.0, abs=1e-12)
    assert relative_cost(2 * k) == pytest.approx(2.0, rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        costs = k[:37] + torch.rand(37, generator=gen, dtype=torch.float64) * 50
        assert relative_cost(costs) == pytest.approx(loop_relcost(costs.tolist()), rel=1e-12)
    with pytest.raises(ValueError, match="costs"):
        relative_cost(torch.tensor([1.0, 0.0]))


def test_recall_curve_from_scores():
    effects = torch.tensor([0.5, -3.0, 1.0, 0.0, 2.0])
    perfect = recall_curve("exact", effects, effects, method_cost=0.0)
    assert perfect.costs.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and perfect.relative == pytest.approx(1.0)
    # scores rank 4, 0, 1, 3, 2 (the hand example) with own cost 3
    curve = recall_curve("est", effects, torch.tensor([0.8, 0.6, -0.1, 0.2, -0.9]), method_cost=3, k_max=3)
    assert curve.costs.tolist() == [6.0, 6.0, 8.0]
    assert curve.relative == pytest.approx(loop_relcost([6.0, 6.0, 8.0]))
    assert curve.k_max == 3 and curve.method_cost == 3.0


# ---------------------------------------------------------------- table and JSON
def _curves():
    effects = torch.tensor([0.5, -3.0, 1.0, 0.0, 2.0, 0.25])
    return [
        recall_curve("oracle", effects, effects),
        recall_curve("AtP*", effects, torch.tensor([0.8, 0.6, -0.1, 0.2, -0.9, 0.0]), method_cost=3),
        recall_curve("AtP|noisy", effects, torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]), method_cost=2.5, k_max=4),
    ]


def test_table_rows_and_relcost():
    curves = _curves()
    table = format_table(curves, ks=[1, 2, 5])
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(curves)
    assert lines[0] == "| method | own cost (F) | cost @ k=1 | cost @ k=2 | cost @ k=5 | RelCost |"
    assert lines[2].startswith("| oracle | 0 | 1 | 2 | 5 | 1.000 |")
    # true order 1, 4, 2, 0, 5, 3; AtP* ranks 4, 0, 1, 3, 2, 5 (steps 1..6): costs 3 + [3, 3, 5, 5, 6, 6]
    assert lines[3] == f"| AtP* | 3 | 6 | 6 | 9 | {curves[1].relative:.3f} |"
    assert f"{curves[1].relative:.3f}" == f"{loop_relcost([6, 6, 8, 8, 9, 9]):.3f}"
    # the '|' in a name is escaped, fractional own cost keeps a decimal, k beyond k_max shows a dash
    assert lines[4].startswith("| AtP\\|noisy | 2.5 |") and lines[4].split("|")[-3].strip() == "–"
    with pytest.raises(ValueError, match="ks"):
        format_table(curves, ks=[0])


def test_json_round_trip():
    curves = _curves()
    data = curves_to_json(curves)
    again = json.loads(json.dumps(data))
    assert again == data
    assert [c["name"] for c in again["curves"]] == ["oracle", "AtP*", "AtP|noisy"]
    assert again["curves"][1]["costs"] == curves[1].costs.tolist()
    assert again["curves"][1]["relative_cost"] == curves[1].relative
    assert again["curves"][2]["k_max"] == 4 and len(again["curves"][2]["costs"]) == 4


# ---------------------------------------------------------------- plots
def _read_png(path):
    image = pytest.importorskip("matplotlib.image").imread(str(path))
    return torch.from_numpy(image.copy()).double()


def _bounds(scale=1.0):
    return {0.9: [(16, 0.8 * scale), (64, 0.4 * scale), (256, 0.2 * scale)],
            0.99: [(16, 1.5 * scale), (64, 0.7 * scale), (256, 0.35 * scale)]}


def test_recall_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from atpframework.analysis.plots import plot_recall_curves

    first = plot_recall_curves(_curves(), tmp_path / "recall.png", title="toy")
    assert first == tmp_path / "recall.png"
    image = _read_png(first)
    assert image.dim() == 3 and image.shape[2] in (3, 4) and image.shape[0] > 200 and image.shape[1] > 200
    assert float(image[..., :3].std()) > 0
    effects = torch.randn(50, generator=torch.Generator().manual_seed(1))
    other = [recall_curve("random", effects, torch.randn(50, generator=torch.Generator().manual_seed(2)), 10)]
    second = _read_png(plot_recall_curves(other, tmp_path / "recall2.png"))
    assert second.shape == image.shape
    assert not torch.equal(second, image)
    # only the PNGs are left in the directory, no temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.png", "recall2.png"]


def test_diagnostic_plot_one_and_two_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from atpframework.analysis.plots import plot_diagnostic

    gen = torch.Generator().manual_seed(0)
    verified = torch.randn(30, generator=gen) * 3
    remainder = torch.randn(200, generator=gen) * 0.1
    two = _read_png(plot_diagnostic(verified, _bounds(), tmp_path / "diag.png", remainder_effects=remainder, title="t"))
    assert float(two[..., :3].std()) > 0
    other = _read_png(plot_diagnostic(verified * 0.5, _bounds(2.0), tmp_path / "diag2.png"))
    assert other.shape == two.shape and not torch.equal(other, two)
    single = _read_png(plot_diagnostic(verified, {0.95: [(128, 0.3)]}, tmp_path / "diag1.png"))
    assert float(single[..., :3].std()) > 0
    assert single.shape[1] < two.shape[1]  # one panel is narrower than two
    # the diagnostic reports theta* = inf while some node has < 2 samples in a group: drawn without it
    inf_bounds = {0.9: [(1, math.inf), (16, 0.8), (64, 0.4)], 0.99: [(1, math.inf), (16, 1.5), (64, math.inf)]}
    with_inf = _read_png(plot_diagnostic(verified, inf_bounds, tmp_path / "diag_inf.png"))
    assert float(with_inf[..., :3].std()) > 0
    for bad in ({1.5: [(16, 0.1)]}, {0.9: [(16, math.nan)]}, {0.9: [(-1, 0.1)]}, {0.9: []}):
        with pytest.raises(ValueError, match="bounds"):
            plot_diagnostic(verified, bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_failed_plot_leaves_no_partial_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from atpframework.analysis.plots import plot_diagnostic, plot_recall_curves

    target = tmp_path / "recall.png"
    target.write_bytes(b"previous contents")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:  # a partial write, then a failure
            fh.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_recall_curves(_curves(), target)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_diagnostic(torch.tensor([1.0, 0.5]), _bounds(), tmp_path / "diag.png")
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["recall.png"]


def test_plot_into_a_path_that_cannot_be_a_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from atpframework.analysis.plots import plot_recall_curves

    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"x")
    with pytest.raises(OSError):
        plot_recall_curves(_curves(), blocker / "recall.png")
    assert blocker.read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_dir"]
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        plot_recall_curves(_curves(), tmp_path / "recall.jpg")
    assert plot_recall_curves(_curves(), tmp_path / "recall.pdf").read_bytes().startswith(b"%PDF")


def test_plots_import_matplotlib_lazily_and_explain_a_missing_install(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import sys, atpframework.analysis.plots; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"

    from atpframework.analysis.plots import PlotDependencyError, plot_recall_curves

    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'atpframework\[plot\]'") as info:
        plot_recall_curves(_curves(), tmp_path / "recall.png")
    assert isinstance(info.value, PlotDependencyError)
    assert not (tmp_path / "recall.png").exists()


def test_recall_curve_is_frozen():
    curve = _curves()[0]
    assert isinstance(curve, RecallCurve)
    with pytest.raises(AttributeError):
        curve.name = "other"
