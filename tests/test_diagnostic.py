"""The diagnostic's statistics: Student-t quantiles against mpmath and closed forms, subset statistics
against a plain Python loop, the Subsampling estimator's unbiasedness for additive effects, and the
Welch bound's coverage of a planted effect, its shrinkage with the sample budget and its edge cases."""

import math
import statistics

import pytest
import torch

from atpframework.maths import diagnostic
from atpframework.maths.diagnostic import (
    Bound,
    SubsetStats,
    student_t_quantile,
    subsample,
    subsampling_estimates,
    welch_bound,
    welch_bounds,
)

F64 = torch.float64


def additive(c, noise=0.0, generator=None):
    """An evaluator whose joint effect is the sum of the included nodes' effects (plus optional noise)."""

    def evaluate(masks):
        effect = masks.to(F64) @ c
        if noise:
            effect = effect + noise * torch.randn(masks.shape[0], generator=generator, dtype=F64)
        return effect

    return evaluate


def stats_from_moments(mean_in, var_in, n_in, mean_out, var_out, n_out):
    """A SubsetStats holding exactly the given per-node group means, unbiased variances and counts."""

    def sums(mean, var, n):
        mean, var, n = (torch.tensor(v, dtype=F64) for v in (mean, var, n))
        return n * mean, (n - 1) * var + n * mean * mean, n

    s_in, q_in, c_in = sums(mean_in, var_in, n_in)
    s_out, q_out, c_out = sums(mean_out, var_out, n_out)
    return SubsetStats(s_in, q_in, c_in, s_out, q_out, c_out, n_samples=int(n_in[0] + n_out[0]))


# ------------------------------------------------------------------------------------------------
# Student-t quantile
# ------------------------------------------------------------------------------------------------

PROBS = [0.5, 0.9, 0.95, 0.99, 0.999, 0.01]
DFS = [1.0, 2.0, 3.5, 10.0, 57.3, 1000.0, 1e6]


def _mpmath_t_quantile(prob: float, df: float, start: float) -> float:
    """The Student-t quantile to 40 digits, independent of scipy (which the code under test uses): the root
    of ``0.5 * I_{df/(df+t^2)}(df/2, 1/2) = min(prob, 1 - prob)`` (the tail probability beyond ``|t|``),
    found by the secant method from ``start``; convergence is asserted, so the start only speeds it up."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        tail = mpmath.mpf(min(prob, 1 - prob))
        if tail == mpmath.mpf("0.5"):
            return 0.0
        a, half = mpmath.mpf(df) / 2, mpmath.mpf(1) / 2

        def excess(t):
            return mpmath.betainc(a, half, 0, df / (df + t * t), regularized=True) / 2 - tail

        t = mpmath.findroot(excess, mpmath.mpf(abs(start)) * (1 + mpmath.mpf("1e-3")) + mpmath.mpf("1e-6"))
        assert abs(excess(t)) <= tail * mpmath.mpf("1e-30")
        return float(t if prob > 0.5 else -t)


@pytest.mark.parametrize("prob", PROBS)
def test_t_quantile_matches_scipy(prob):
    """Named for its history (scipy was the reference); the reference is now mpmath, since the code uses scipy."""
    got = student_t_quantile(prob, torch.tensor(DFS, dtype=F64))
    assert got.dtype == F64 and got.shape == (len(DFS),)
    for df, value in zip(DFS, got.tolist()):
        ref = _mpmath_t_quantile(prob, df, value)
        assert abs(value - ref) <= 1e-9 * abs(ref) + 1e-15, (prob, df, value, ref)
        # the scalar path gives the same number
        assert float(student_t_quantile(prob, df)) == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_t_quantile_matches_closed_forms_in_the_tails():
    normal = statistics.NormalDist()
    dfs = torch.tensor([[1.0, 2.0], [math.inf, 1e5]], dtype=F64)
    for p in (1e-10, 1e-4, 0.3, 0.5 + 1e-6, 0.975, 1 - 1e-9):
        got = student_t_quantile(p, dfs)
        assert got.shape == (2, 2)
        cauchy = math.copysign(1 / math.tan(math.pi * min(p, 1 - p)), p - 0.5)  # tan(pi (p - 1/2)), accurately
        two = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        z = normal.inv_cdf(p)
        assert float(got[0, 0]) == pytest.approx(cauchy, rel=1e-9)
        assert float(got[0, 1]) == pytest.approx(two, rel=1e-9)
        assert float(got[1, 0]) == pytest.approx(z, rel=1e-9)
        # large df: within the first Cornish-Fisher correction of the normal quantile
        assert abs(float(got[1, 1]) - z) <= 1.01 * abs(z) * (z * z + 1) / (4 * 1e5) + 1e-12
        # the quantile decreases in magnitude as df grows
        assert abs(float(got[0, 0])) > abs(float(got[0, 1])) > abs(float(got[1, 1])) > abs(float(got[1, 0]))


def test_t_quantile_far_in_the_tail_matches_mpmath():
    """Where scipy's inverse fails (a finite cap near 1e152 for df far below 1, a wrong-signed +inf near
    prob = 1e-300), the tail's leading term takes over; reference values from mpmath (40 digits)."""
    cases = [
        (0.99, 0.01, 3.960440137152098e168),  # scipy: 6.7e152
        (0.001, 0.01, -3.960440137152422e268),
        (1e-100, 0.5, -1.02849115631634e199),
        (1e-300, 3.5, -6.106857031571263e85),  # scipy: +inf
        (1e-300, 6.0, -1.7976796252524602e50),
        (1e-300, 30.0, -50178575360.50508),
        (1e-300, 1.0, -3.1830988618379066e299),
        (1 - 1e-12, 0.2, 7.509116470700989e57),
    ]
    for prob, df, ref in cases:
        assert float(student_t_quantile(prob, df)) == pytest.approx(ref, rel=1e-12), (prob, df)
    # beyond the float range: inf, with the sign of the tail (scipy: 6703.9 for df=1e-300)
    got = student_t_quantile(0.9, torch.tensor([1e-300, 1e-20, 1e-5], dtype=F64))
    assert got.tolist() == [math.inf] * 3
    assert float(student_t_quantile(0.4, 1e-300)) == -math.inf
    # one call mixes the tail term and scipy
    mixed = student_t_quantile(1e-300, torch.tensor([3.5, math.inf], dtype=F64))
    assert float(mixed[0]) == pytest.approx(-6.106857031571263e85, rel=1e-12)
    assert float(mixed[1]) == pytest.approx(-37.0470962993612, rel=1e-12)


def test_t_quantile_near_the_median_keeps_its_relative_accuracy():
    """Within 0.01 of prob = 0.5 the quantile is near 0; scipy's t inverse is good only to ~1e-8 absolute
    there, so the inverse incomplete beta function gives it. Against the closed form for df = 2 and the
    density at 0 for df = 4 (3/8, so t = 8 (p - 1/2) / 3 to first order)."""
    for d in (1e-12, 1e-9, 1e-6, 1e-3, 9e-3):
        p = 0.5 + d
        two = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        got = student_t_quantile(p, torch.tensor([2.0, 4.0], dtype=F64))
        assert float(got[0]) == pytest.approx(two, rel=1e-12)
        assert float(student_t_quantile(1 - p, 2.0)) == -float(got[0])
        # df = 4 near 0: t = 8 d / 3 (1 + O(d^2)) from the density 3/8 at 0
        assert float(got[1]) == pytest.approx(8 * d / 3, rel=max(1e-12, 10 * d * d))


# ------------------------------------------------------------------------------------------------
# Subset statistics
# ------------------------------------------------------------------------------------------------


def test_subset_stats_match_a_python_loop():
    gen = torch.Generator().manual_seed(0)
    n_samples, n_nodes = 61, 7
    masks = torch.rand(n_samples, n_nodes, generator=gen) < torch.linspace(0.2, 0.8, n_nodes)
    # a large common offset: the running sums of squares must not cancel it away
    effects = 1e4 + torch.randn(n_samples, generator=gen, dtype=F64) * torch.linspace(0.5, 2.0, n_samples, dtype=F64)
    stats = SubsetStats.zeros(n_nodes)
    for lo, hi in ((0, 5), (5, 40), (40, 61)):
        stats.update(masks[lo:hi], effects[lo:hi].float() if lo == 5 else effects[lo:hi])
    effects[5:40] = effects[5:40].float().double()  # the chunk handed over in float32

    assert stats.n_samples == n_samples and stats.n_nodes == n_nodes
    se, dof = stats.welch_se(), stats.welch_dof()
    d, se_est = subsampling_estimates(stats)
    for n in range(n_nodes):
        inc = [float(e) for e, m in zip(effects, masks[:, n]) if m]
        exc = [float(e) for e, m in zip(effects, masks[:, n]) if not m]
        assert float(stats.count_in[n]) == len(inc) and float(stats.count_out[n]) == len(exc)
        assert float(stats.mean_in()[n]) == pytest.approx(statistics.fmean(inc), rel=1e-13)
        assert float(stats.mean_out()[n]) == pytest.approx(statistics.fmean(exc), rel=1e-13)
        assert math.sqrt(float(stats.var_in()[n])) == pytest.approx(statistics.stdev(inc), rel=1e-7)
        assert math.sqrt(float(stats.var_out()[n])) == pytest.approx(statistics.stdev(exc), rel=1e-7)
        diff = statistics.fmean(inc) - statistics.fmean(exc)
        assert float(stats.difference()[n]) == pytest.approx(diff, rel=1e-9, abs=1e-9)
        assert float(d[n]) == float(stats.difference()[n])
        v_in, v_out = statistics.variance(inc) / len(inc), statistics.variance(exc) / len(exc)
        assert float(se[n]) == pytest.approx(math.sqrt(v_in + v_out), rel=1e-7)
        assert float(se_est[n]) == float(se[n])
        welch = (v_in + v_out) ** 2 / (v_in**2 / (len(inc) - 1) + v_out**2 / (len(exc) - 1))
        assert float(dof[n]) == pytest.approx(welch, rel=1e-7)
    assert bool(stats.valid().all())


def test_welch_bound_is_the_max_over_nodes_of_the_scipy_formula(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(30, generator=gen, dtype=F64) * torch.logspace(-3, 0, 30, dtype=F64)
    stats = subsample(additive(c, noise=0.05, generator=gen), 30, 40, 0.3, gen)
    d, se, dof = stats.difference(), stats.welch_se(), stats.welch_dof()
    confidences = [0.8, 0.95, 0.999]
    for prune_from in (diagnostic._PRUNE_FROM, 1):  # the direct solve and the pruned one
        monkeypatch.setattr(diagnostic, "_PRUNE_FROM", prune_from)
        bounds = welch_bounds(stats, confidences)
        for conf, bound in zip(confidences, bounds):
            t = [float(scipy_stats.t.ppf(conf, float(dof[n]))) for n in range(30)]
            values = [abs(float(d[n])) + float(se[n]) * t[n] for n in range(30)]
            assert isinstance(bound, Bound)
            assert bound.confidence == conf and bound.n_samples == 40
            assert bound.theta == pytest.approx(max(values), rel=1e-10)
            assert bound.node == max(range(30), key=values.__getitem__)
            assert welch_bound(stats, conf) == bound
        assert bounds[0].theta < bounds[1].theta < bounds[2].theta


def test_welch_bound_picks_a_low_dof_node_over_a_larger_difference(monkeypatch):
    # node 0: |d| = 1.0 with a tiny, well-estimated spread; node 1: |d| = 0.9 from 4 + 4 samples with a
    # large spread (dof ~ 6, t_0.99 ~ 3.1) -> node 1 bounds higher; node 2 is negligible.
    stats = stats_from_moments(
        mean_in=[1.0, -0.4, 0.01], var_in=[1e-4, 0.02, 1e-4], n_in=[500, 4, 500],
        mean_out=[0.0, 0.5, 0.0], var_out=[1e-4, 0.02, 1e-4], n_out=[500, 4, 500],
    )
    for prune_from in (diagnostic._PRUNE_FROM, 1):
        monkeypatch.setattr(diagnostic, "_PRUNE_FROM", prune_from)
        bound = welch_bound(stats, 0.99)
        se1 = math.sqrt(0.02 / 4 + 0.02 / 4)
        assert float(stats.welch_dof()[1]) == pytest.approx(6.0)
        assert bound.node == 1
        assert bound.theta == pytest.approx(0.9 + se1 * float(student_t_quantile(0.99, 6.0)), rel=1e-12)


def test_subsample_draws_bernoulli_masks_in_batches():
    calls = []

    def evaluate(masks):
        calls.append(masks.clone())
        return masks.to(torch.float32).sum(1) * 0.5 - 1.0

    stats = subsample(evaluate, n_nodes=50, n_samples=150, p=0.3, generator=torch.Generator().manual_seed(5))
    assert [m.shape for m in calls] == [(64, 50), (64, 50), (22, 50)]
    assert all(m.dtype == torch.bool for m in calls)
    masks = torch.cat(calls)
    assert abs(float(masks.double().mean()) - 0.3) < 0.025
    assert len({tuple(row.tolist()) for row in masks}) == 150  # fresh draws, not one batch repeated
    ref = SubsetStats.zeros(50)
    ref.update(masks, masks.to(F64).sum(1) * 0.5 - 1.0)
    assert stats.n_samples == ref.n_samples == 150
    for name in ("count_in", "count_out", "mean_in", "mean_out", "var_in", "var_out", "welch_dof"):
        got, want = getattr(stats, name), getattr(ref, name)
        got, want = (got, want) if isinstance(got, torch.Tensor) else (got(), want())
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
    again = subsample(evaluate, n_nodes=50, n_samples=150, p=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.difference(), stats.difference())


# ------------------------------------------------------------------------------------------------
# Statistical behaviour
# ------------------------------------------------------------------------------------------------


def test_subsampling_is_unbiased_for_additive_effects():
    c = 1e-3 * torch.randn(40, generator=torch.Generator().manual_seed(1234), dtype=F64)
    c[:5] = torch.tensor([3.0, -2.0, 1.5, -1.0, 2.5], dtype=F64)
    gen = torch.Generator().manual_seed(11)
    z = []
    for _ in range(5):
        stats = subsample(additive(c), 40, 2000, 0.5, gen, batch_size=500)
        d, se = subsampling_estimates(stats)
        assert bool(((d - c).abs() <= 4.5 * se).all())
        z.append((d - c) / se)
    z = torch.cat(z)  # 200 standardized errors: sd of their mean ~0.07, of their sd ~0.05
    assert abs(float(z.mean())) < 0.3
    assert 0.8 < float(z.std()) < 1.2


def test_bound_covers_a_planted_effect():
    gen = torch.Generator().manual_seed(7)
    covered, found, thetas = 0, 0, []
    for _ in range(100):
        c = (torch.rand(201, generator=gen, dtype=F64) * 2 - 1) * 0.02
        planted = int(torch.randint(201, (1,), generator=gen))
        c[planted] = 0.5 if planted % 2 else -0.5
        stats = subsample(additive(c, noise=0.01, generator=gen), 201, 200, 0.5, gen, batch_size=100)
        bound = welch_bound(stats, 0.99)
        covered += bound.theta >= 0.5
        found += bound.node == planted
        thetas.append(bound.theta)
    assert covered >= 95
    assert found >= 95
    assert statistics.median(thetas) < 0.6  # a real bound, not a vacuous one


def test_bound_shrinks_as_the_sample_budget_grows():
    averages = []
    for n_samples in (50, 200, 800):
        thetas = []
        for seed in range(10):
            gen = torch.Generator().manual_seed(seed)
            c = (torch.rand(100, generator=gen, dtype=F64) * 2 - 1) * 0.02
            stats = subsample(additive(c, noise=0.01, generator=gen), 100, n_samples, 0.5, gen, batch_size=200)
            thetas.append(welch_bound(stats, 0.95).theta)
        averages.append(statistics.fmean(thetas))
    assert averages[0] > averages[1] > averages[2] > 0
    assert averages[2] < 0.5 * averages[0]  # se ~ 1/sqrt(samples): a 16x budget should cut it well below half


@pytest.mark.parametrize("value", [0.0, 3.7, -1e6])
def test_constant_effects_give_a_zero_bound(value):
    gen = torch.Generator().manual_seed(0)
    stats = subsample(lambda m: torch.full((m.shape[0],), value, dtype=F64), 20, 50, 0.5, gen)
    assert bool((stats.welch_se() == 0).all())
    assert bool(torch.isinf(stats.welch_dof()).all())
    assert bool((stats.difference() == 0).all())
    for bound in welch_bounds(stats, [0.5, 0.9, 0.999]):
        assert bound.theta == 0.0 and 0 <= bound.node < 20


def test_zero_spread_in_one_group_is_the_ordinary_welch_case():
    stats = stats_from_moments([0.2], [0.0], [10], [0.0], [0.09], [5])
    assert float(stats.welch_dof()[0]) == pytest.approx(4.0)
    expected = 0.2 + math.sqrt(0.09 / 5) * float(student_t_quantile(0.9, 4.0))
    assert welch_bound(stats, 0.9).theta == pytest.approx(expected, rel=1e-12)


def test_a_node_without_two_samples_per_group_makes_the_bound_infinite():
    masks = torch.zeros(6, 3, dtype=torch.bool)
    masks[::2, 0] = True  # 3 in, 3 out
    masks[0, 1] = True  # node 1: only one sample in
    masks[:5, 2] = True  # node 2: only one sample out
    stats = SubsetStats.zeros(3)
    stats.update(masks, torch.arange(6, dtype=F64))
    assert stats.valid().tolist() == [True, False, False]
    assert math.isnan(float(stats.var_in()[1])) and math.isnan(float(stats.var_out()[2]))
    _, se = subsampling_estimates(stats)
    assert math.isfinite(float(se[0])) and math.isnan(float(se[1])) and math.isnan(float(se[2]))
    bound = welch_bound(stats, 0.9)
    assert bound.theta == math.inf and bound.node == 1


# ------------------------------------------------------------------------------------------------
# Parameter checks
# ------------------------------------------------------------------------------------------------


def _subsample(**overrides):
    kwargs = dict(evaluate=additive(torch.zeros(5, dtype=F64)), n_nodes=5, n_samples=10, p=0.5,
                  generator=torch.Generator().manual_seed(0))
    kwargs.update(overrides)
    return subsample(**kwargs)


_STATS = stats_from_moments([0.1], [1.0], [5], [0.0], [1.0], [5])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: _subsample(p=0.0), r"\bp\b.*\(0, 1\)"),
        (lambda: _subsample(p=1.0), r"\bp\b.*\(0, 1\)"),
        (lambda: _subsample(p=-0.2), r"\bp\b"),
        (lambda: _subsample(p=float("nan")), r"\bp\b"),
        (lambda: _subsample(n_samples=3), r"n_samples.*>= 4"),
        (lambda: _subsample(n_nodes=0), r"n_nodes.*>= 1"),
        (lambda: _subsample(batch_size=0), r"batch_size.*>= 1"),
        (lambda: student_t_quantile(0.0, 3.0), r"prob.*\(0, 1\)"),
        (lambda: student_t_quantile(1.0, 3.0), r"prob"),
        (lambda: student_t_quantile(0.9, 0.0), r"df.*> 0"),
        (lambda: student_t_quantile(0.9, torch.tensor([2.0, -1.0])), r"df"),
        (lambda: student_t_quantile(0.9, torch.tensor([float("nan")])), r"df"),
        (lambda: welch_bound(_STATS, 1.0), r"confidence.*\(0, 1\)"),
        (lambda: welch_bound(_STATS, 0.0), r"confidence"),
        (lambda: welch_bounds(_STATS, [0.9, 1.5]), r"confidence"),
        (lambda: welch_bound(SubsetStats.zeros(0), 0.9), r"stats"),
        (lambda: SubsetStats.zeros(2).update(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3)), r"masks"),
        (lambda: SubsetStats.zeros(2).update(torch.zeros(3, 2), torch.zeros(3)), r"masks"),
        (lambda: SubsetStats.zeros(2).update(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(4)), r"effects"),
        (lambda: SubsetStats.zeros(2).update(torch.zeros(3, 2, dtype=torch.bool), torch.tensor([0.0, math.inf, 1.0])),
         r"effects.*finite"),
        (lambda: _subsample(evaluate=lambda m: torch.zeros(m.shape[0], 2)), r"effects"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()
