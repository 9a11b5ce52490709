"""The AtP* diagnostic: subsampling of the unverified remainder and a Welch upper bound on what it hides.

This module owns the statistics behind the diagnostic (method note §3 "Subsampling" and §5
"The diagnostic"); it never runs a model. A caller hands :func:`subsample` an ``evaluate`` callback
that patches a batch of node subsets jointly and returns one scalar effect ``I(S)`` per subset.

* :func:`subsample` draws Bernoulli(``p``) inclusion masks ``Bool[sample, node]`` over the remainder
  ``R`` and accumulates, per node, running sums of the effects of the samples that include it
  (``in``, the note's ``+``) and exclude it (``out``, ``-``) in a :class:`SubsetStats`.
* :func:`subsampling_estimates` gives the Subsampling baseline's per-node scores: the difference of
  conditional means ``d_n = mean_in - mean_out`` (unbiased for additive effects) and its Welch
  standard error ``s_W = sqrt(s_in^2/N_in + s_out^2/N_out)``.
* :func:`welch_bound` inverts the one-sided per-node Welch t-tests (combined by an intersection-union
  test) into the upper confidence bound
  ``theta* = max_n (|d_n| + s_W,n * t_{confidence, nu_n})`` with Welch-Satterthwaite degrees of
  freedom ``nu_n``: with that confidence no node of ``R`` has ``|c(n)| > theta*``.
* :func:`student_t_quantile` is the Student-t quantile the bound needs, in pure torch (float64): the
  t CDF comes from the regularized incomplete beta function (a modified-Lentz continued fraction)
  and is inverted by bracketed Newton iterations.

Conventions for degenerate data (all per node):

* fewer than 2 samples in either group: mean/variance are NaN and the node's bound is ``+inf``
  (there is no variance estimate, so nothing can be excluded);
* zero sample variance in both groups (e.g. every effect identical): ``s_W = 0``, ``nu = +inf`` and
  the node's bound is exactly ``|d_n|``; a constant evaluator therefore gives ``theta* = 0``. This is
  the limit of the formula, not extra evidence: a finite sample with no spread cannot reveal a rare
  effect it never saw;
* zero variance in one group only is the ordinary Welch case (``nu = N - 1`` of the other group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Bound",
    "SubsetStats",
    "student_t_quantile",
    "subsample",
    "subset_masks",
    "subsampling_estimates",
    "welch_bound",
    "welch_bounds",
]

_TINY = 1e-300
_LOG2_E = 1.0 / math.log(2.0)
_CF_EPS = 1e-15
_CF_MAX_ITER = 50_000
_NEWTON_MAX_ITER = 200
_NEWTON_RTOL = 1e-12
_PRUNE_FROM = 4096
"""Node count from which :func:`welch_bound` prunes nodes that cannot attain the maximum before solving
for their t quantiles (below it one vectorized solve over all nodes is cheaper)."""
_DF_EXPANSION = 1e4
"""From this many degrees of freedom on, the quantile is the Cornish-Fisher series around the normal
quantile (Abramowitz & Stegun 26.7.5, terms up to ``1/df^4``): its error there is far below 1e-12
relative, while the continued fraction would need O(sqrt(df)) terms."""


# torch.log / exp / sqrt on CPU go through MKL's vector math library. Once
# torch.set_num_threads(n > 1) has been called, MKL threads them even for a handful of elements, and
# each call then waits a whole scheduler slice (~10 ms) whenever the cores are busy with other work.
# The quantile solver makes hundreds of such calls on small tensors, so it uses equivalents that stay
# single-threaded: xlogy(1, x) = log x, exp2(x / ln 2) = exp x (relative error ~1e-16 |x|), 1/rsqrt.


def _log(x: Tensor) -> Tensor:
    return torch.special.xlogy(1.0, x)


def _exp(x: Tensor) -> Tensor:
    return torch.exp2(x * _LOG2_E)


def _sqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(x).reciprocal()


# ----------------------------------------------------------------------------------------------
# Student-t quantile
# ----------------------------------------------------------------------------------------------


def _log_beta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _beta_continued_fraction(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``K = 1/(1 + d1/(1 + d2/(1 + ...)))`` of the incomplete beta function, by the modified Lentz method.

    ``I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * K`` with ``d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1))``
    and ``d_{2m} = m(b-m)x / ((a+2m-1)(a+2m))``; it converges quickly for ``x < (a+1)/(a+b+2)``
    (the caller swaps to ``I_{1-x}(b, a)`` otherwise). Lentz evaluates ``g = 1 + d1/(1 + d2/...)`` front
    to back as ``g = prod C_k D_k`` with ``D_k = 1/(1 + d_k D_{k-1})`` and ``C_k = 1 + d_k / C_{k-1}``.
    """
    ab = a + b
    g = torch.ones_like(x)
    c = torch.ones_like(x)
    d = torch.zeros_like(x)

    def step(coef: Tensor) -> Tensor:
        nonlocal c, d
        d = 1.0 + coef * d
        d = torch.where(d == 0, _TINY, d).reciprocal()
        c = 1.0 + coef / c
        c = torch.where(c == 0, _TINY, c)
        return c * d

    for m in range(1, _CF_MAX_ITER + 1):
        odd = -(a + (m - 1)) * (ab + (m - 1)) * x / ((a + (2 * m - 2)) * (a + (2 * m - 1)))
        even = m * (b - m) * x / ((a + (2 * m - 1)) * (a + 2 * m))
        delta = step(odd) * step(even)
        g = g * delta
        if bool(((delta - 1.0).abs() < _CF_EPS).all()):
            return g.reciprocal()
    raise RuntimeError("incomplete beta continued fraction did not converge")  # pragma: no cover


def _t_tails(t: Tensor, df: Tensor) -> tuple[Tensor, Tensor]:
    """For ``t >= 0``: ``(P(T > t), P(0 < T <= t))``, each accurate in relative terms when it is small.

    With ``x = df/(df+t^2)`` and ``y = t^2/(df+t^2)``: ``P(T > t) = I_x(df/2, 1/2) / 2`` and
    ``P(0 < T <= t) = I_y(1/2, df/2) / 2``; whichever argument lies in the continued fraction's
    fast region is evaluated directly and the other tail is ``1/2`` minus it.
    """
    a = df / 2
    b = torch.full_like(df, 0.5)
    u = t / _sqrt(df)  # log x = -log(1 + u^2), log y = log(u^2) - log(1 + u^2), kept finite for huge u
    big = u > 1
    log_x = torch.where(big, -(2 * _log(u) + torch.log1p(u.pow(-2))), -torch.log1p(u * u))
    log_y = torch.where(big, -torch.log1p(u.pow(-2)), 2 * _log(u) - torch.log1p(u * u))
    x = _exp(log_x)
    y = _exp(log_y)
    log_front = a * log_x + b * log_y - _log_beta(a, b)
    upper_direct = x < (a + 1) / (a + b + 2)
    # one continued fraction for both cases: I_x(a, b) directly, or I_y(b, a) = 1 - I_x(a, b)
    first = torch.where(upper_direct, a, b)
    cf = _beta_continued_fraction(first, torch.where(upper_direct, b, a), torch.where(upper_direct, x, y)) / first
    half_ibeta = 0.5 * _exp(log_front) * cf
    upper = torch.where(upper_direct, half_ibeta, 0.5 - half_ibeta)
    central = torch.where(upper_direct, 0.5 - half_ibeta, half_ibeta)
    return upper, central


def _t_log_pdf(t: Tensor, df: Tensor) -> Tensor:
    return (
        torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - 0.5 * _log(df * math.pi)
        - (df + 1) / 2 * torch.log1p(t * t / df)
    )


def _cornish_fisher(z: Tensor, df: Tensor) -> Tensor:
    """Abramowitz & Stegun 26.7.5: the t quantile as a series in ``1/df`` around the normal quantile ``z``."""
    z2 = z * z
    g1 = z * (z2 + 1) / 4
    g2 = z * ((5 * z2 + 16) * z2 + 3) / 96
    g3 = z * (((3 * z2 + 19) * z2 + 17) * z2 - 15) / 384
    g4 = z * ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) / 92160
    inv = 1.0 / df
    return z + inv * (g1 + inv * (g2 + inv * (g3 + inv * g4)))


def _midpoint(lo: Tensor, hi: Tensor) -> Tensor:
    """Bisection point of ``0 <= lo < hi``: geometric for wide positive brackets, arithmetic otherwise."""
    geometric = _exp(0.5 * (_log(lo) + _log(hi)))
    return torch.where((lo > 0) & (hi > 4 * lo), geometric, 0.5 * lo + 0.5 * hi)


def _solve_upper_tail(q: float, df: Tensor) -> Tensor:
    """The ``t > 0`` with ``P(T > t) = q`` (``0 < q < 1/2``) for every entry of ``df``, by bracketed Newton.

    Bracket: the normal quantile is a lower bound (t quantiles fall towards it as ``df`` grows) and the
    Cauchy quantile ``cot(pi q)`` an upper one for ``df >= 1`` (grown by squaring below that). Newton
    runs on ``log q - log P(T > t)`` in the tail (``q < 1/4``) and on ``P(0 < T <= t) - (1/2 - q)``
    near the centre, both increasing in ``t``; a step leaving the bracket is replaced by bisection.
    """
    central_target = 0.5 - q
    tail = q < 0.25
    z = float(-torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
    lo = torch.full_like(df, z)
    hi = torch.full_like(df, max(1.0 / math.tan(math.pi * q), 2.0))
    beyond = torch.zeros_like(df, dtype=torch.bool)  # quantile past the float range (tiny df only)
    grow = (df < 1).nonzero().squeeze(1)
    while grow.numel():
        upper, _ = _t_tails(hi[grow], df[grow])
        grow = grow[upper > q]
        lo[grow] = hi[grow]
        hi[grow] = hi[grow] * hi[grow]
        overflow = torch.isinf(hi[grow])
        beyond[grow[overflow]] = True
        grow = grow[~overflow]

    t = _cornish_fisher(torch.full_like(df, z), df).clamp(min=0.0)
    t = torch.where((t > lo) & (t < hi), t, _midpoint(lo, hi))
    t[beyond] = math.inf
    active = ~beyond
    for _ in range(_NEWTON_MAX_ITER):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        ti, dfi, loi, hii = t[idx], df[idx], lo[idx], hi[idx]
        upper, central = _t_tails(ti, dfi)
        log_pdf = _t_log_pdf(ti, dfi)
        if tail:
            resid = math.log(q) - _log(upper)
            step = resid / _exp(log_pdf - _log(upper))
        else:
            resid = central - central_target
            step = resid / _exp(log_pdf)
        loi = torch.where(resid < 0, ti, loi)
        hii = torch.where(resid > 0, ti, hii)
        new = ti - step
        outside = ~((new > loi) & (new < hii)) | ~torch.isfinite(new)
        new = torch.where(outside, _midpoint(loi, hii), new)
        converged = ((new - ti).abs() <= _NEWTON_RTOL * new.abs()) | (resid == 0) | (hii - loi <= _NEWTON_RTOL * hii)
        t[idx], lo[idx], hi[idx] = new, loi, hii
        active[idx] = ~converged
    return t


def student_t_quantile(prob: float, df: float | Tensor) -> Tensor:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom (float64; same shape as ``df``).

    ``0 < prob < 1``; ``df > 0``, a float or a tensor of them (solved in one vectorized pass). Below
    ``1e4`` degrees of freedom the t CDF (regularized incomplete beta function) is inverted to about
    1e-12 relative; from ``1e4`` on (``inf`` included, giving the normal quantile) the Cornish-Fisher
    series is used, accurate there to about 1e-15. A quantile beyond the float range (``df`` far below 1)
    is ``inf``. Raises ``ValueError`` naming ``prob`` or ``df`` when out of range.
    """
    prob = float(prob)
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must lie in the open interval (0, 1), got {prob}")
    df_t = torch.as_tensor(df, dtype=torch.float64)
    if bool(torch.isnan(df_t).any()) or bool((df_t <= 0).any()):
        raise ValueError("df must be > 0 (inf allowed)")
    if prob == 0.5:
        return torch.zeros_like(df_t)
    q = min(prob, 1.0 - prob)
    sign = 1.0 if prob > 0.5 else -1.0
    flat = df_t.reshape(-1)
    out = torch.empty_like(flat)
    z = float(-torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
    large = flat >= _DF_EXPANSION
    out[large] = _cornish_fisher(torch.full_like(flat[large], z), flat[large])
    exact = ~large
    if bool(exact.any()):
        out[exact] = _solve_upper_tail(q, flat[exact])
    return (sign * out).reshape(df_t.shape)


# ----------------------------------------------------------------------------------------------
# Subset statistics
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SubsetStats:
    """Per-node running sums of subsampled effects, split by whether the sample included the node.

    Every tensor is float64 with shape ``(node,)``. ``in`` is the method note's ``+`` group (samples whose
    subset contains the node), ``out`` its ``-`` group. The sums are of ``effect - shift``: ``shift`` is
    fixed by the first :meth:`update` to the mean of its effects, so that the sums of squares do not
    cancel catastrophically when the effects share a large common offset; the derived means add it back.
    """

    sum_in: Tensor
    sumsq_in: Tensor
    count_in: Tensor
    sum_out: Tensor
    sumsq_out: Tensor
    count_out: Tensor
    n_samples: int = 0
    shift: float | None = None

    @classmethod
    def zeros(cls, n_nodes: int, device: torch.device | str | None = None) -> SubsetStats:
        """Empty statistics over ``n_nodes`` nodes."""
        if n_nodes < 0:
            raise ValueError(f"n_nodes must be >= 0, got {n_nodes}")

        def zero() -> Tensor:
            return torch.zeros(n_nodes, dtype=torch.float64, device=device)

        return cls(zero(), zero(), zero(), zero(), zero(), zero())

    @property
    def n_nodes(self) -> int:
        return int(self.sum_in.shape[0])

    def update(self, masks: Tensor, effects: Tensor) -> None:
        """Add samples: ``masks`` is ``Bool[sample, node]`` (node included in the patched subset), ``effects``
        is ``Float[sample]``, the joint patching effect of each row's subset. Moved to this object's device."""
        if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != self.n_nodes:
            got = f"{masks.dtype} {tuple(masks.shape)}"
            raise ValueError(f"masks must be a bool tensor of shape (sample, {self.n_nodes}), got {got}")
        effects = torch.as_tensor(effects)
        if effects.shape != (masks.shape[0],) or not effects.is_floating_point():
            got = f"{effects.dtype} {tuple(effects.shape)}"
            raise ValueError(f"effects must be a float tensor of shape ({masks.shape[0]},), got {got}")
        if masks.shape[0] == 0:
            return
        device = self.sum_in.device
        e = effects.detach().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(e).all()):
            raise ValueError("effects must be finite")
        if self.shift is None:
            self.shift = float(e.mean())
        e = e - self.shift
        m = masks.to(device=device, dtype=torch.float64)
        total, total_sq = e.sum(), (e * e).sum()
        s_in, sq_in = m.T @ e, m.T @ (e * e)
        c_in = m.sum(0)
        self.sum_in += s_in
        self.sumsq_in += sq_in
        self.count_in += c_in
        self.sum_out += total - s_in
        self.sumsq_out += total_sq - sq_in
        self.count_out += masks.shape[0] - c_in
        self.n_samples += int(masks.shape[0])

    def _shift(self) -> float:
        return 0.0 if self.shift is None else self.shift

    def mean_in(self) -> Tensor:
        """Mean effect of the samples including each node (NaN where there are none)."""
        return self._shift() + self.sum_in / self.count_in

    def mean_out(self) -> Tensor:
        """Mean effect of the samples excluding each node (NaN where there are none)."""
        return self._shift() + self.sum_out / self.count_out

    @staticmethod
    def _variance(total: Tensor, total_sq: Tensor, count: Tensor) -> Tensor:
        var = ((total_sq - total * total / count) / (count - 1)).clamp(min=0.0)
        return torch.where(count >= 2, var, torch.full_like(var, math.nan))

    def var_in(self) -> Tensor:
        """Unbiased (``n - 1``) sample variance of the including samples; NaN below 2 samples."""
        return self._variance(self.sum_in, self.sumsq_in, self.count_in)

    def var_out(self) -> Tensor:
        """Unbiased (``n - 1``) sample variance of the excluding samples; NaN below 2 samples."""
        return self._variance(self.sum_out, self.sumsq_out, self.count_out)

    def valid(self) -> Tensor:
        """Nodes with at least 2 samples in each group: the others have no Welch statistics (bound ``inf``)."""
        return (self.count_in >= 2) & (self.count_out >= 2)

    def difference(self) -> Tensor:
        """``mean_in - mean_out`` per node: the Subsampling estimate of the node's effect (NaN if a group is empty)."""
        return (self.sum_in / self.count_in) - (self.sum_out / self.count_out)

    def _welch_terms(self) -> tuple[Tensor, Tensor]:
        return self.var_in() / self.count_in, self.var_out() / self.count_out

    def welch_se(self) -> Tensor:
        """Welch standard error ``sqrt(s_in^2/N_in + s_out^2/N_out)`` of :meth:`difference`; NaN for invalid nodes."""
        v_in, v_out = self._welch_terms()
        return _sqrt(v_in + v_out)

    def welch_dof(self) -> Tensor:
        """Welch-Satterthwaite degrees of freedom; ``inf`` where both groups have zero variance, NaN for
        invalid nodes."""
        v_in, v_out = self._welch_terms()
        num = (v_in + v_out) ** 2
        den = v_in * v_in / (self.count_in - 1) + v_out * v_out / (self.count_out - 1)
        dof = num / den
        return torch.where(den == 0, torch.full_like(dof, math.inf), dof).where(self.valid(), torch.nan)


def subset_masks(
    n_nodes: int, n_samples: int, p: float, generator: torch.Generator, batch_size: int = 64
) -> Iterator[Tensor]:
    """Random subsets for Subsampling: ``Bool[sample, node]`` masks, each node included with probability ``p``.

    Yields ``n_samples`` rows in batches of at most ``batch_size``, drawn from ``generator`` (on its
    device). The one place masks are drawn: the ``subsampling`` method, :func:`subsample` and the
    diagnostic all use it, so one seed gives one sequence of subsets. Raises ``ValueError`` naming the
    parameter when ``p`` is not in (0, 1), ``n_samples < 0``, ``n_nodes < 1`` or ``batch_size < 1``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in the open interval (0, 1), got {p}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n_samples, batch_size):
        rows = min(batch_size, n_samples - start)
        yield torch.rand(rows, n_nodes, generator=generator, device=generator.device, dtype=torch.float64) < p


def subsample(
    evaluate: Callable[[Tensor], Tensor],
    n_nodes: int,
    n_samples: int,
    p: float,
    generator: torch.Generator,
    batch_size: int = 64,
    stats: SubsetStats | None = None,
) -> SubsetStats:
    """Run the Subsampling algorithm: ``n_samples`` random subsets, each node included with probability ``p``.

    Masks ``Bool[sample, node]`` come from :func:`subset_masks`; ``evaluate(masks)`` must return
    ``Float[sample]``, the effect of patching each row's nodes jointly. Statistics are accumulated in
    float64 on the generator's device, into ``stats`` when given (to continue sampling) or fresh ones.
    Raises ``ValueError`` naming the parameter when ``p`` is not in (0, 1), fewer than 4 samples would be
    accumulated in all, ``n_nodes < 1`` or ``batch_size < 1``.
    """
    stats = SubsetStats.zeros(n_nodes, device=generator.device) if stats is None else stats
    if stats.n_samples + n_samples < 4:
        raise ValueError(f"n_samples must be >= 4 (at least 2 per group and node), got {stats.n_samples + n_samples} in all")
    if stats.n_nodes != n_nodes:
        raise ValueError(f"stats cover {stats.n_nodes} nodes, not n_nodes={n_nodes}")
    for masks in subset_masks(n_nodes, n_samples, p, generator, batch_size):
        stats.update(masks, evaluate(masks))
    return stats


def subsampling_estimates(stats: SubsetStats) -> tuple[Tensor, Tensor]:
    """Per-node Subsampling scores: (``mean_in - mean_out``, its Welch standard error)."""
    return stats.difference(), stats.welch_se()


# ----------------------------------------------------------------------------------------------
# The bound
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """Upper confidence bound on the effect of every unverified node.

    With probability ``confidence`` (under the additive model), no node of the remainder has
    ``|c(n)| > theta``. ``node`` is the index (into the remainder) of the node attaining the maximum;
    when ``theta`` is ``inf`` because nodes lack 2 samples in a group, the first such node.
    """

    confidence: float
    theta: float
    node: int
    n_samples: int


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in the open interval (0, 1), got {confidence}")
    return confidence


def _bound(diff: Tensor, se: Tensor, dof: Tensor, valid: Tensor, confidence: float, n_samples: int) -> Bound:
    """``max_n |d_n| + se_n t_{confidence, dof_n}`` over nodes, ``inf`` at invalid nodes.

    From ``_PRUNE_FROM`` nodes on, quantiles are computed only for nodes that can still attain the
    maximum: ``t`` is monotone in the degrees of freedom, so each node's value lies between its value at
    the normal quantile and at the smallest ``dof``; nodes whose upper end is below the best lower end
    cannot be the argmax and are skipped (exact pruning, at the price of one extra scalar quantile).
    """
    if not bool(valid.all()):
        return Bound(confidence, math.inf, int((~valid).nonzero()[0, 0]), n_samples)
    absd = diff.abs()
    finite = torch.isfinite(dof)
    z = float(student_t_quantile(confidence, math.inf))
    values = absd + se * z  # exact where dof is inf (there se == 0 up to underflow)
    candidates = finite
    if int(finite.sum()) >= _PRUNE_FROM:
        t_min_dof = float(student_t_quantile(confidence, float(dof[finite].min())))
        t_lo, t_hi = min(z, t_min_dof), max(z, t_min_dof)
        lower = torch.where(finite, absd + se * t_lo, values)
        upper = torch.where(finite, absd + se * t_hi, values)
        best_lower = float(lower.max())
        candidates = finite & (upper >= best_lower - 1e-9 * abs(best_lower))
        values = torch.where(finite, torch.full_like(values, -math.inf), values)
    if bool(candidates.any()):
        values[candidates] = absd[candidates] + se[candidates] * student_t_quantile(confidence, dof[candidates])
    node = int(values.argmax())
    return Bound(confidence, float(values[node]), node, n_samples)


def _welch_inputs(stats: SubsetStats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if stats.n_nodes == 0:
        raise ValueError("stats must cover at least one node")
    cpu = torch.device("cpu")
    return (
        stats.difference().to(cpu),
        stats.welch_se().to(cpu),
        stats.welch_dof().to(cpu),
        stats.valid().to(cpu),
    )


def welch_bound(stats: SubsetStats, confidence: float) -> Bound:
    """The diagnostic's upper confidence bound ``theta* = max_n (|d_n| + s_W,n t_{confidence, nu_n})``.

    One-sided Welch tests per node, combined by an intersection-union test (no multiplicity correction).
    A node with fewer than 2 samples in either group makes ``theta`` infinite; nodes with zero spread
    contribute ``|d_n|``. Raises ``ValueError`` naming ``confidence`` unless it lies in (0, 1); levels
    below 0.5 are accepted but make the t quantile negative, so they bound nothing useful.
    """
    confidence = _check_confidence(confidence)
    return _bound(*_welch_inputs(stats), confidence, stats.n_samples)


def welch_bounds(stats: SubsetStats, confidences: Sequence[float]) -> list[Bound]:
    """:func:`welch_bound` at each confidence level (the per-node statistics are computed once)."""
    levels = [_check_confidence(c) for c in confidences]
    inputs = _welch_inputs(stats)
    return [_bound(*inputs, c, stats.n_samples) for c in levels]
