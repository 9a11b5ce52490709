"""Figures of a result (``result.plot``) and the evaluation plots: the data drawn is read back from each
Figure and compared with values computed here from the stored per-pair scores, exact effects and tokens."""

import dataclasses
import json
import math
import re

import pytest
import torch

pytest.importorskip("matplotlib")

from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.analysis.figures import ResultPlots, diagnostic_labels
from atpframework.analysis.plots import diagnostic_figure, recall_figure
from atpframework.analysis.recall import recall_curve
from atpframework.analysis.verify import verify

VOCAB = {i: f" w{i}" for i in range(64)} | {1: "When", 2: " Mary", 8: " John", 5: " gave", 6: " to"}
PROMPTS = [  # the clean prompts differ only at position 1 (" Mary" / " John"); every prompt ends in " to"
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [1, 8, 3, 4, 5, 6], "noise": [1, 8, 12, 4, 5, 13], "answer": 7, "wrong_answer": 2},
]
NODES = [{"kind": "attn_head"}, {"kind": "resid"}, {"kind": "mlp_neuron", "positions": [-1]},
         {"kind": "resid", "name": "resid_all", "positions": "all"}]
PLAIN = re.compile(r"^−?-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?$")


def _decode(ids):
    return [VOCAB[i] for i in ids]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def result(model):
    return af.run(make_plan(NODES, prompts=PROMPTS), model=model).with_token_strings(_decode)


@pytest.fixture(scope="module")
def star(model):
    return af.run(make_plan(NODES[:2], method="atp_star", prompts=PROMPTS), model=model).with_token_strings(_decode)


@pytest.fixture(scope="module")
def verified(result, model):
    return verify(result, budget=8, model=model)


def _array(fig):
    return torch.from_numpy(fig.axes[0].images[0].get_array().filled(math.nan)).double()


def _ticks(labels):
    return [t.get_text() for t in labels]


def _q(token):
    return json.dumps(token)


# --------------------------------------------------------------------------------------------- heatmaps
def test_heatmap_shows_layer_by_head_at_a_position(result):
    per_pair = result["attn_head"].per_pair.double()  # pair layer pos head
    expected = per_pair[:, :, 5, :].mean(0)
    assert isinstance(result.plot, ResultPlots)
    for position in (-1, 5):  # the plan's "each" labels 0..5; -1 is the same absolute position
        fig = result.plot.heatmap("attn_head", position=position)
        ax = fig.axes[0]
        assert torch.allclose(_array(fig), expected, atol=1e-6)
        top = float(expected.abs().max())
        low, high = ax.images[0].get_clim()
        assert low == pytest.approx(-top) and high == pytest.approx(top)
        assert _ticks(ax.get_xticklabels()) == ["0", "1", "2", "3"]
        assert _ticks(ax.get_yticklabels()) == ["0", "1"]
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
        assert ax.get_title() == 'attn_head: AtP on logit_diff, mean over 2 pairs\n@ " to" (pos 5)'
        assert fig.axes[1].get_ylabel() == "mean effect on logit_diff\n(AtP)"  # the colour bar
    one = result.plot.heatmap("attn_head", position=1, pair=1)
    assert torch.allclose(_array(one), per_pair[1, :, 1, :], atol=1e-6)
    assert one.axes[0].get_title().endswith(f"pair 1\n@ {_q(' John')} (pos 1)")
    both = result.plot.heatmap(position=1)  # default selection: attn_head; the pairs' tokens joined
    assert both.axes[0].get_title().endswith(f"@ {_q(' Mary')}/{_q(' John')} (pos 1)")
    summed = result.plot.heatmap("attn_head", position="sum")
    assert torch.allclose(_array(summed), per_pair.mean(0).sum(1), atol=1e-6)
    magnitude = result.plot.heatmap("attn_head", position=5, how="mean_abs")
    assert torch.allclose(_array(magnitude), per_pair[:, :, 5].abs().mean(0), atol=1e-6)
    assert magnitude.axes[0].images[0].get_clim() == pytest.approx((0.0, float(per_pair[:, :, 5].abs().mean(0).max())))


def test_heatmap_of_neurons_and_of_the_residual_stream(result):
    neurons = result["mlp_neuron"].per_pair.double()  # pair layer pos(1) neuron
    fig = result.plot.heatmap("mlp_neuron")  # one position: no position needed
    assert torch.allclose(_array(fig), neurons.mean(0)[:, 0, :], atol=1e-6)
    assert fig.axes[0].get_xlabel() == "neuron" and fig.axes[0].get_title().endswith(f"@ {_q(' to')} (pos 5)")
    resid = result["resid"].per_pair.double()  # pair layer pos
    fig = result.plot.heatmap("resid")
    ax = fig.axes[0]
    assert torch.allclose(_array(fig), resid.mean(0), atol=1e-6)
    tokens = [_q("When"), f"{_q(' Mary')}/{_q(' John')}", _q(" w3"), _q(" w4"), _q(" gave"), _q(" to")]
    assert _ticks(ax.get_xticklabels()) == tokens
    assert _ticks(ax.get_yticklabels()) == ["0", "1", "2"]  # residual-stream boundaries 0..n_layers
    per_pair_ticks = _ticks(result.plot.heatmap("resid", pair=1).axes[0].get_xticklabels())
    assert per_pair_ticks[1] == _q(" John")
    merged = result.plot.heatmap("resid_all")
    assert torch.allclose(_array(merged), result["resid_all"].per_pair.double().mean(0), atol=1e-6)


def test_heatmap_errors_name_the_choices(result):
    with pytest.raises(ValueError, match=r"'attn_head' has 6 positions; pick one with position= \(0 \"When\", 1 \" Mary\"/\" John\", .*5 \" to\"\), or position='sum'"):
        result.plot.heatmap("attn_head")
    with pytest.raises(ValueError, match=r"position: 9 is not among the positions of 'attn_head'"):
        result.plot.heatmap("attn_head", position=9)
    with pytest.raises(ValueError, match="position: expected"):
        result.plot.heatmap("attn_head", position="last")
    with pytest.raises(ValueError, match="layer × position; leave position out"):
        result.plot.heatmap("resid", position=-1)
    with pytest.raises(ValueError, match="pair: expected a prompt pair index 0..1"):
        result.plot.heatmap("attn_head", position=0, pair=2)
    with pytest.raises(ValueError, match="how: allowed"):
        result.plot.heatmap("attn_head", position=0, how="max")
    with pytest.raises(KeyError, match="no node selection 'heads'"):
        result.plot.heatmap("heads")


def test_graddrop_results_show_their_signed_estimate(star):
    per_pair = star["attn_head"].per_pair.double()
    signed = star.extras["attn_head.signed"].double()
    assert bool((per_pair >= 0).all()) and bool((signed < 0).any())  # magnitudes, and a signed estimate beside them
    fig = star.plot.heatmap(position=-1)
    assert torch.allclose(_array(fig), signed[:, :, 5].mean(0), atol=1e-6)
    assert fig.axes[1].get_ylabel() == "mean effect on logit_diff\n(AtP*: signed QK-fix estimate)"
    one = star.plot.heatmap(position=-1, pair=0)
    assert torch.allclose(_array(one), signed[0, :, 5], atol=1e-6)
    scores = star.plot.heatmap(position=-1, how="mean_abs")
    assert torch.allclose(_array(scores), per_pair[:, :, 5].mean(0), atol=1e-6)
    old = dataclasses.replace(star, extras={})  # a file from before schema 4
    with pytest.raises(ValueError, match="no signed estimate of 'attn_head'.*use how='mean_abs'"):
        old.plot.heatmap(position=-1)
    assert torch.allclose(_array(old.plot.heatmap(position=-1, how="mean_abs")), per_pair[:, :, 5].mean(0), atol=1e-6)


# ------------------------------------------------------------------------------------------ token strips
def test_token_strip_sums_heads_per_position_and_draws_one_layer_as_bars(result):
    per_pair = result["attn_head"].per_pair.double()
    grid = per_pair.mean(0).sum(-1)  # layer pos
    fig = result.plot.token_strip("attn_head")
    ax = fig.axes[0]
    assert torch.allclose(_array(fig), grid, atol=1e-6)
    assert _ticks(ax.get_xticklabels())[0] == _q("When") and _ticks(ax.get_xticklabels())[-1] == _q(" to")
    assert ax.get_title().endswith("summed over 4 heads")
    strip = result.plot.token_strip("attn_head", layer=0)
    bars = strip.axes[0].containers[0]
    assert [b.get_height() for b in bars] == pytest.approx(grid[0].tolist(), abs=1e-6)
    assert min(grid[0].tolist()) < 0 < max(grid[0].tolist())
    red, blue, grey = (0.698, 0.094, 0.169), (0.129, 0.4, 0.675), (0.6, 0.6, 0.6)
    for b, v in zip(bars, grid[0].tolist()):  # position 0 is the same token in clean and noise: effect 0, grey
        assert b.get_facecolor()[:3] == pytest.approx(red if v > 0 else blue if v < 0 else grey, abs=2e-3)
    assert _ticks(strip.axes[0].get_xticklabels())[1] == f"{_q(' Mary')}/{_q(' John')}"
    assert strip.axes[0].get_title().endswith("\nlayer 0, summed over 4 heads")
    magnitude = result.plot.token_strip("attn_head", layer=0, how="mean_abs").axes[0].containers[0]
    assert [b.get_height() for b in magnitude] == pytest.approx(per_pair.abs().mean(0).sum(-1)[0].tolist(), abs=1e-6)
    for b, v in zip(magnitude, grid[0].tolist()):  # coloured by the sign of the signed estimate
        assert b.get_facecolor()[:3] == pytest.approx(red if v > 0 else blue if v < 0 else grey, abs=2e-3)
    default = result.plot.token_strip(layer=1)  # the first selection with several positions: attn_head
    assert [b.get_height() for b in default.axes[0].containers[0]] == pytest.approx(grid[1].tolist(), abs=1e-6)
    resid = result.plot.token_strip("resid", layer=2, pair=0)
    assert [b.get_height() for b in resid.axes[0].containers[0]] == pytest.approx(result["resid"].per_pair[0, 2].tolist(), abs=1e-6)
    assert _ticks(resid.axes[0].get_xticklabels())[1] == _q(" Mary")
    with pytest.raises(ValueError, match="layer: 5 is not among this selection's layers: 0, 1"):
        result.plot.token_strip("attn_head", layer=5)
    with pytest.raises(ValueError, match="merged its positions"):
        result.plot.token_strip("resid_all")


# ------------------------------------------------------------------------------------------------ bars
def _top(values, k):
    """Indices of the k largest |values| (ties: lower index first), computed without the library."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    return order[:k]


def test_bar_shows_the_top_k_signed_values_over_all_selections(result):
    names = list(result.nodes)
    means = [result[n].per_pair.double().mean(0).flatten() for n in names]
    values = torch.cat(means).tolist()
    starts = [0]
    for m in means:
        starts.append(starts[-1] + len(m))
    top = _top(values, 12)
    assert any(values[i] < 0 for i in top) and any(values[i] > 0 for i in top)
    fig = result.plot.bar(k=12)
    ax = fig.axes[0]
    bars = ax.containers[0]
    assert [b.get_width() for b in bars] == pytest.approx([values[i] for i in top], abs=1e-6)
    assert _ticks(ax.get_yticklabels()) == [result.node_label(i) for i in top]
    assert ax.yaxis_inverted()  # the largest at the top
    red = (0.698, 0.094, 0.169)
    assert [b.get_facecolor()[:3] == pytest.approx(red, abs=2e-3) for b in bars] == [values[i] > 0 for i in top]
    assert ax.get_xlabel() == "mean effect on logit_diff\n(AtP)"


def test_bar_of_one_selection_by_magnitude_is_coloured_by_the_sign(result):
    per_pair = result["mlp_neuron"].per_pair.double()
    magnitude = per_pair.abs().mean(0).flatten().tolist()
    signed = per_pair.mean(0).flatten().tolist()
    top = _top(magnitude, 5)
    ax = result.plot.bar("mlp_neuron", k=5, how="mean_abs").axes[0]
    bars = ax.containers[0]
    assert [b.get_width() for b in bars] == pytest.approx([magnitude[i] for i in top], abs=1e-6)
    offset = result.numbering.offsets[list(result.nodes).index("mlp_neuron")]
    labels = _ticks(ax.get_yticklabels())
    assert labels == [result.node_label(offset + i) for i in top] and labels[0].startswith("mlp_neuron L")
    assert labels[0].endswith(f"@ {_q(' to')} (pos 5)")
    red = (0.698, 0.094, 0.169)
    assert [b.get_facecolor()[:3] == pytest.approx(red, abs=2e-3) for b in bars] == [signed[i] > 0 for i in top]
    one = result.plot.bar("attn_head", k=3, pair=1).axes[0].containers[0]
    row = result["attn_head"].per_pair[1].double().flatten().tolist()
    assert [b.get_width() for b in one] == pytest.approx([row[i] for i in _top(row, 3)], abs=1e-6)
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        result.plot.bar(k=0)


# --------------------------------------------------------------------------------------------- scatter
def test_scatter_plots_verified_effects_against_estimates(verified):
    fig = verified.plot.scatter()
    ax = fig.axes[0]
    names = [n for n in verified.nodes if n in verified.verified]
    assert len(ax.collections) == len(names) and sum(len(verified.verified[n].index) for n in names) == 8
    xs, ys = [], []
    for collection, name in zip(ax.collections, names):
        checked = verified.verified[name]
        x = checked.effects.double().mean(0)
        y = verified[name].per_pair.double().mean(0).flatten()[checked.index]
        offsets = torch.from_numpy(collection.get_offsets().data.copy()).double()
        assert torch.allclose(offsets[:, 0], x, atol=1e-6) and torch.allclose(offsets[:, 1], y, atol=1e-6)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert ax.get_title() == f"AtP estimate vs exact effect: 8 verified nodes, Pearson r = {r:.3f}"
    line = ax.lines[0]
    assert list(line.get_xdata()) == list(line.get_ydata())  # y = x
    biggest = sorted(range(len(x)), key=lambda i: -abs(float(x[i])))[:5]  # the five largest exact |effect|, named
    assert [t.get_text() for t in ax.texts] == [_labels_of(verified, names)[i] for i in biggest]
    with pytest.raises(ValueError, match="no verified nodes; verify the top nodes first: atpf verify"):
        dataclasses.replace(verified, verified={}).plot.scatter()


def _labels_of(result, names):
    numbering = result.numbering
    return [result.node_label(numbering.offsets[list(result.nodes).index(n)] + int(i)) for n in names for i in result.verified[n].index]


def test_diagnostic_labels_name_the_verified_top_in_diagnosis_order(verified):
    estimates = torch.cat([ns.per_pair.abs().mean(0).flatten() for ns in verified.nodes.values()])
    head = set(torch.sort(estimates, descending=True, stable=True).indices[:5].tolist())
    numbering = verified.numbering
    rows = []
    for name, checked in verified.verified.items():
        for i, effect in zip(checked.index.tolist(), checked.effects.abs().mean(0).tolist()):
            node = numbering.offsets[list(verified.nodes).index(name)] + i
            if node in head:
                rows.append((effect, verified.node_label(node)))
    assert len(rows) == 5
    assert diagnostic_labels(verified, 5) == [label for _, label in sorted(rows, key=lambda r: -r[0])]


# ------------------------------------------------------------------------------------ files and state
def test_figures_are_written_by_suffix_and_leave_no_global_state(result, tmp_path):
    from matplotlib import _pylab_helpers

    fig = result.plot.heatmap("resid", path=tmp_path / "resid.svg")
    assert fig.axes and (tmp_path / "resid.svg").read_text().lstrip().startswith("<?xml")
    result.plot.bar(k=3, path=tmp_path / "bar.pdf")
    assert (tmp_path / "bar.pdf").read_bytes().startswith(b"%PDF")
    result.plot.token_strip("resid", layer=0, path=tmp_path / "strip.png")
    assert (tmp_path / "strip.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        result.plot.heatmap("resid", path=tmp_path / "resid.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar.pdf", "resid.svg", "strip.png"]  # no temporary files
    assert _pylab_helpers.Gcf.get_num_fig_managers() == 0  # no pyplot figures to close


# --------------------------------------------------------------------------- the evaluation plots' ticks
def _all_tick_texts(ax):
    ax.figure.canvas.draw()
    texts = []
    for axis in (ax.xaxis, ax.yaxis):
        texts += [t.get_text() for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)]
    return [t for t in texts if t]


def test_diagnostic_figure_has_plain_ticks_integer_ranks_and_names_the_top_nodes():
    effects = torch.tensor([0.5, 2.0, 0.25, 1.0, 0.125, 0.9, 0.3])
    labels = [f"node {i}" for i in range(7)]
    narrow = {0.9: [(100, 1.94), (400, 2.0), (1600, 2.07)], 0.99: [(100, 2.01), (400, 2.03), (1600, 2.1)]}
    fig = diagnostic_figure(effects, narrow, labels=labels, n_labels=3)
    first, second = fig.axes
    for ax in (first, second):
        texts = _all_tick_texts(ax)
        assert texts and all(PLAIN.match(t) for t in texts), texts  # no 2.025×10⁰, no 10^-1
    assert "2" in _all_tick_texts(second)  # the narrow bound axis is labelled within its range
    ranks = [t.get_text() for t in first.get_xticklabels() if t.get_text()]
    assert all(re.match(r"^−?[0-9]+$", t) for t in ranks), ranks
    assert [t.get_text() for t in first.texts] == ["node 1", "node 3", "node 5"]  # the largest three, in order
    assert [tuple(t.xy) for t in first.texts] == [(1, 2.0), (2, 1.0), (3, pytest.approx(0.9))]
    assert "|effect|" in first.get_ylabel() and "patched" in first.get_ylabel()
    assert second.get_ylabel().startswith("θ*: upper bound")
    with pytest.raises(ValueError, match="one label per verified effect"):
        diagnostic_figure(effects, narrow, labels=labels[:2])


def test_recall_figure_has_plain_ticks():
    gen = torch.Generator().manual_seed(0)
    effects = torch.randn(300, generator=gen)
    curves = [recall_curve("atp", effects, effects + 0.5 * torch.randn(300, generator=gen), 4.0, 200)]
    ax = recall_figure(curves, "toy").axes[0]
    texts = _all_tick_texts(ax)
    assert {"1", "10", "100"} <= set(texts) and all(PLAIN.match(t) for t in texts), texts
    assert ax.lines[0].get_ydata().tolist() == pytest.approx(curves[0].costs.tolist())
