"""The AtP* diagnostic: subsampling of the unverified remainder and a Welch upper bound on what it hides.

This module owns the statistics behind the diagnostic (method note §3 "Subsampling" and §5
"The diagnostic"); it never runs a model. A caller hands ``subsample`` an ``evaluate`` callback
that patches a batch of node subsets jointly and returns one scalar effect ``I(S)`` per subset.

* ``subsample`` draws Bernoulli(``p``) inclusion masks ``Bool[sample, node]`` over the remainder
  ``R`` and accumulates, per node, running sums of the effects of the samples that include it
  (``in``, the note's ``+``) and exclude it (``out``, ``-``) in a ``SubsetStats``.
* ``subsampling_estimates`` gives the Subsampling baseline's per-node scores: the difference of
  conditional means ``d_n = mean_in - mean_out`` (unbiased for additive effects) and its Welch
  standard error ``s_W = sqrt(s_in^2/N_in + s_out^2/N_out)``.
* ``welch_bound`` inverts the one-sided per-node Welch t-tests (combined by an intersection-union
  test) into the upper confidence bound
  ``theta* = max_n (|d_n| + s_W,n * t_{confidence, nu_n})`` with Welch-Satterthwaite degrees of
  freedom ``nu_n``: with that confidence no node of ``R`` has ``|c(n)| > theta*``.
* ``student_t_quantile`` is the Student-t quantile the bound needs (float64), from
  ``scipy.stats.t``.

Conventions for degenerate data (all per node):

* fewer than 2 samples in either group: mean/variance are NaN and the node's bound is ``+inf``
  (there is no variance estimate, so nothing can be excluded);
* zero sample variance in both groups (e.g. every effect identical): ``s_W = 0``, ``nu = +inf`` and
  the node's bound is exactly ``|d_n|``; a constant evaluator therefore gives ``theta* = 0``. This is
  the limit of the formula, not extra evidence: a finite sample with no spread cannot reveal a rare
  effect it never saw;
* zero variance in one group only is the ordinary Welch case (``nu = N - 1`` of the other group).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_PRUNE_FROM = 4096
"""Node count from which ``welch_bound`` prunes nodes that cannot attain the maximum before solving
for their t quantiles (below it one vectorized solve over all nodes is cheaper)."""
_FAR_TAIL_X = 1e-16
"""Where ``x = df/(df + t^2)`` is below this, the quantile comes from the t tail's leading term (exact there
to float precision), not from scipy, whose inverse (``stdtrit``) fails out there: it stops near 1e152 for
df far below 1 (a finite value where the quantile is far larger or beyond the float range), gives a
wrong-signed ``+inf`` for some probabilities near 1e-300 (scipy issue 25968), and before scipy 1.17 can
stop the process for df near 1e-300."""
_CENTRE = 0.01
"""Within this of ``prob = 0.5`` the quantile comes from scipy's inverse incomplete beta function: scipy's t
inverse is good only to about 1e-8 absolute there, so a quantile near 0 can be off by far more than itself."""


def _sqrt(x: Tensor) -> Tensor:
    # torch.sqrt on CPU goes through MKL's vector math library, which (once torch.set_num_threads(n > 1)
    # has been called) threads even a handful of elements and then waits a whole scheduler slice
    # (~10 ms) whenever the cores are busy; 1/rsqrt stays single-threaded.
    return torch.rsqrt(x).reciprocal()


# ----------------------------------------------------------------------------------------------
# Student-t quantile
# ----------------------------------------------------------------------------------------------


def _far_tail_quantile(q: float, df: np.ndarray) -> np.ndarray:
    """The ``t`` with ``P(T > t) = q`` from the tail's leading term, where that is exact in float precision; else NaN.

    With ``a = df/2`` and ``x = df/(df + t^2)``, ``P(T > t) = I_x(a, 1/2)/2 = x^a (1 + O(x)) / (2 a B(a, 1/2))``,
    so ``log x = (log 2q + log(a B(a, 1/2))) / a`` and ``t = sqrt(df (1 - x) / x)``, taken in logs (``inf``
    beyond the float range). NaN where ``x >= _FAR_TAIL_X``.
    """
    from scipy import special

    a = df / 2
    with np.errstate(all="ignore"):
        log_a_beta = special.gammaln(a + 1) + special.gammaln(0.5) - special.gammaln(a + 0.5)  # log(a B(a, 1/2))
        log_x = (math.log(2 * q) + log_a_beta) / a
        log_t = 0.5 * (np.log(df) - log_x + np.log(-np.expm1(log_x)))
        t = np.exp(log_t)
    return np.where(log_x < math.log(_FAR_TAIL_X), t, np.nan).reshape(df.shape)


def _central_quantile(q: float, df: np.ndarray) -> np.ndarray:
    """The ``t`` with ``P(T > t) = q`` near the median (``q`` close to 1/2), to about 1e-12 relative.

    With ``y = t^2/(df + t^2)``, ``P(0 < T <= t) = I_y(1/2, df/2)/2 = 1/2 - q`` (exact for ``q >= 1/4``), so
    ``y`` is scipy's ``betaincinv(1/2, df/2, 1 - 2q)`` and ``t = sqrt(df y / x)`` with ``x = 1 - y``, or where
    ``y > 1/2`` (small ``df``) ``x = betaincinv(df/2, 1/2, 2q)``, accurate when small. From ``df = 1e20`` on
    (where ``y`` would underflow for the largest ``df``) the normal quantile, equal to it in float precision.
    """
    from scipy import special

    with np.errstate(all="ignore"):
        y = special.betaincinv(0.5, df / 2, 1 - 2 * q)
        x = np.where(y > 0.5, special.betaincinv(df / 2, 0.5, 2 * q), 1 - y)
        t = np.sqrt(df * y / x)
    return np.where(df >= 1e20, -special.ndtri(q), t)


def student_t_quantile(prob: float, df: float | Tensor) -> Tensor:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom (float64; same shape and device as ``df``).

    ``0 < prob < 1``; ``df > 0``, a float or a tensor of them (``inf`` gives the normal quantile).
    ``scipy.stats.t`` computes it from the upper tail ``min(prob, 1 - prob)``, so ``prob`` and ``1 - prob``
    give opposite values; with scipy >= 1.17 to about 1e-13 relative (older scipy: about 1e-8, and not
    below probabilities of about 1e-150). Within 0.01 of ``prob = 0.5``, where scipy's t inverse is good
    only to about 1e-8 absolute, scipy's inverse incomplete beta function gives it. Far in the tail
    (``df/(df + t^2) < 1e-16``), where scipy's t inverse can fail, the tail's leading term gives it, and
    a quantile beyond the float range (``df`` far below 1) is ``inf``. Raises ``ValueError`` naming
    ``prob`` or ``df`` when out of range.
    """
    from scipy import stats  # imported on first use: about 1 s, and only the bound needs it

    prob = float(prob)
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must lie in the open interval (0, 1), got {prob}")
    df_t = torch.as_tensor(df, dtype=torch.float64)
    if bool(torch.isnan(df_t).any()) or bool((df_t <= 0).any()):
        raise ValueError("df must be > 0 (inf allowed)")
    if prob == 0.5:
        return torch.zeros_like(df_t)
    q = min(prob, 1.0 - prob)
    nu = df_t.detach().cpu().numpy()
    upper = _far_tail_quantile(q, nu)
    rest = np.isnan(upper)
    upper[rest] = _central_quantile(q, nu[rest]) if 0.5 - q < _CENTRE else stats.t.isf(q, nu[rest])
    sign = 1.0 if prob > 0.5 else -1.0
    return torch.from_numpy(np.asarray(sign * upper, dtype=np.float64)).reshape(df_t.shape).to(df_t.device)


# ----------------------------------------------------------------------------------------------
# Subset statistics
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SubsetStats:
    """Per-node running sums of subsampled effects, split by whether the sample included the node.

    Every tensor is float64 with shape ``(node,)``. ``in`` is the method note's ``+`` group (samples whose
    subset contains the node), ``out`` its ``-`` group. The sums are of ``effect - shift``: ``shift`` is
    fixed by the first ``update`` to the mean of its effects, so that the sums of squares do not
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
    def zeros(cls, n_nodes: int, device: torch.device | str | None = None) -> "SubsetStats":
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
        """Welch standard error ``sqrt(s_in^2/N_in + s_out^2/N_out)`` of ``difference``; NaN for invalid nodes."""
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
    device). The one place masks are drawn: the ``subsampling`` method, ``subsample`` and the
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

    Masks ``Bool[sample, node]`` come from ``subset_masks``; ``evaluate(masks)`` must return
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
    """``welch_bound`` at each confidence level (the per-node statistics are computed once)."""
    levels = [_check_confidence(c) for c in confidences]
    inputs = _welch_inputs(stats)
    return [_bound(*inputs, c, stats.n_samples) for c in levels]
