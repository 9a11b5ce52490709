"""The QK fix: exact attention-softmax recomputation for query and key nodes, linearized after it.

For one attention layer with clean pattern ``A`` (``batch head query key``) and mixed values
``z_t = sum_s A_ts v_s``, the gradient of the metric with respect to the pattern is
``g_ts = v_s . dMetric/dz_t``; so every quantity below needs only the gradient at ``attn_z`` and the
clean values, never a gradient of the pattern itself.

* Query ``q_t`` (one head): row ``t`` recomputed with the noise query and clean keys,
  ``A'_t = softmax(S(q_t', K))``; effect ``sum_s (A'_ts - A_ts) g_ts = (A'_t V - z_t) . dMetric/dz_t``.
* Key ``k_s`` (one key/value head, one position): every row ``t`` changes only in logit ``(t, s)``,
  so ``A'_ts = sigmoid(logit(A_ts) + delta_ts)`` and the other entries of the row scale by
  ``(1 - A'_ts) / (1 - A_ts)``; the row's effect is
  ``(A'_ts - A_ts) / (1 - A_ts) * (g_ts - sum_j A_tj g_tj)``, summed over rows ``t`` and over the
  query heads of the key's group. ``O(T^2 d)`` per head, no per-key re-forward. It is evaluated as
  ``(A'_ts - A_ts) * (g_ts - mean_{j != s} g_tj)`` (weights ``A_tj``), with ``A'_ts - A_ts`` and the
  log-partition without key ``s`` computed so that saturated rows (``A_ts`` within rounding of 1)
  lose no precision.
* Keys selected jointly (``positions: "all"``): every row recomputed with all keys patched.

Memory: the ``query key`` tables of a layer are transient. What a layer keeps for a chunk ``C`` of
positions (``chunking.py``) is ``query C``-sized (key closed form) or ``C``-sized (queries), using
``sum_j w_tj g_tj = dMetric/dz_t . sum_j w_tj v_j`` (row weights ``w``), so row sums need no
``query key`` table.

Logits come from the backend (``AbstractBackend.attention_logits``), so the model's own scale, mask,
rotary handling, soft-capping and ALiBi apply. Log-partitions with one key excluded are computed
without cancellation even in saturated rows.
"""

from dataclasses import dataclass

import torch
from einops import einsum, rearrange, reduce, repeat
from torch import Tensor

from atpframework.plans.chunking import take_positions

NEG_INF = float("-inf")


@dataclass
class CleanAttention:
    """One layer's clean attention, recomputed from captured ``q``, ``k`` and ``v`` (transient: the
    ``query key`` tables live only while one layer's QK-fix tables are prepared)."""

    logits: Tensor
    """``batch head query key``, masked entries ``-inf``."""
    values: Tensor
    """``batch key head d_head``: values repeated to query heads."""
    mixed: Tensor
    """``batch query head d_head``: ``z``."""
    group: int
    """Query heads per key/value head."""

    @property
    def pattern(self) -> Tensor:
        """``batch head query key`` (computed on demand, not kept)."""
        return torch.softmax(self.logits, dim=-1)


def clean_attention(logits: Tensor, v: Tensor) -> CleanAttention:
    """Pattern and mixed values from logits (``batch head query key``) and values (``batch key kv_head d_head``)."""
    group = logits.shape[1] // v.shape[2]
    pattern = torch.softmax(logits, dim=-1)
    values = repeat(v, "batch key kv_head d_head -> batch key (kv_head group) d_head", group=group)
    mixed = einsum(pattern, values, "batch head query key, batch key head d_head -> batch query head d_head")
    return CleanAttention(logits, values, mixed, group)


def query_delta_z(clean: CleanAttention, noise_query_logits: Tensor, rows: Tensor | None = None) -> Tensor:
    """``z' - z`` per query node when the query at each (position, head) alone takes its noise value.

    Args:
        noise_query_logits: ``batch head row key``, logits of noise queries against clean keys, for the
            query positions ``rows`` (None: every position).
    Returns:
        ``batch row head d_head``; the effect for a gradient ``dz`` (at those rows) is ``(result * dz).sum(-1)``.
    """
    patched = torch.softmax(noise_query_logits, dim=-1)
    z_patched = einsum(patched, clean.values, "batch head query key, batch key head d_head -> batch query head d_head")
    return z_patched - take_positions(clean.mixed, rows, dim=1)


@dataclass
class KeyPatch:
    """What the key closed form keeps for one layer and a set of key positions ``C`` (gradient-independent).

    Only ``query C`` tables are kept, so memory grows with ``T * |C|``, not ``T^2``.
    """

    pattern_change: Tensor
    """``batch head query C``: ``A'_ts - A_ts`` with key ``s`` alone patched; 0 where masked or the only key."""
    weights: Tensor
    """``batch head query C``: ``exp(logit - row max)``, 0 where masked."""
    total: Tensor
    """``batch head query 1``: the row's sum of weights."""
    weighted_values: Tensor
    """``batch query head d_head``: ``sum_j weights_tj v_j``."""
    is_top: Tensor
    """``batch head query C``: key ``s`` holds the row's largest logit."""
    values_without_top: Tensor
    """``batch query head d_head``: the row's values averaged with the largest-logit key excluded."""
    values: Tensor
    """``batch C head d_head``: the values at the patched keys, repeated to query heads."""
    group: int


ROW_BLOCK = 64
"""Query rows prepared together by ``key_patch``: its temporaries are ``ROW_BLOCK x key``, not ``query x key``."""


def key_patch(clean: CleanAttention, noise_key_logits: Tensor, columns: Tensor | None = None) -> KeyPatch:
    """Prepare the key closed form for the key at each position ``s`` in ``columns`` patched alone.

    Rows are independent, so they are prepared in blocks of ``ROW_BLOCK``.

    Args:
        noise_key_logits: ``batch head query key``, logits of clean queries against the noise keys
            (entry ``(t, s)`` is the patched logit of row ``t`` when key ``s`` is patched; only the
            ``columns`` are read).
        columns: key positions (None: every position).
    """
    n_rows = clean.logits.shape[2]
    blocks = [
        _key_patch_rows(clean.logits[:, :, r : r + ROW_BLOCK], noise_key_logits[:, :, r : r + ROW_BLOCK], clean.values, columns)
        for r in range(0, n_rows, ROW_BLOCK)
    ]
    change, weights, total, weighted_values, is_top, values_without_top = (
        torch.cat([block[i] for block in blocks], dim=1 if i in (3, 5) else 2) for i in range(6)
    )
    return KeyPatch(
        change, weights, total, weighted_values, is_top, values_without_top,
        take_positions(clean.values, columns, dim=1), clean.group,
    )


def _key_patch_rows(logits: Tensor, noise_key_logits: Tensor, values: Tensor, columns: Tensor | None) -> tuple[Tensor, ...]:
    """``key_patch``'s fields for a block of query rows (``batch head rows key`` logits)."""
    visible = torch.isfinite(logits)
    row_max = logits.max(dim=-1, keepdim=True).values
    weights = torch.exp(logits - row_max)  # masked -> 0
    total = weights.sum(dim=-1, keepdim=True)  # >= 1
    # log-sum-exp of the row without key s: for s != argmax the remainder keeps the maximum's term
    # (>= 1), so no cancellation; for the argmax, a separate log-sum-exp over the other keys.
    top = logits.argmax(dim=-1, keepdim=True)
    without_top = logits.scatter(-1, top, NEG_INF)
    runner_up = without_top.max(dim=-1, keepdim=True).values
    weights_without_top = torch.exp(without_top - runner_up.clamp_min(torch.finfo(logits.dtype).min))
    weights_without_top = torch.where(torch.isfinite(without_top), weights_without_top, 0.0)
    norm = weights_without_top.sum(dim=-1, keepdim=True)
    mix = "batch head query key, batch key head d_head -> batch query head d_head"
    values_without_top = einsum(weights_without_top / torch.where(norm > 0, norm, 1.0), values, mix)
    weighted_values = einsum(weights, values, mix)
    others = row_max + torch.log((total - weights).clamp_min(0))
    others = others.scatter(-1, top, torch.logsumexp(without_top, dim=-1, keepdim=True))
    is_top = torch.zeros_like(visible).scatter(-1, top, True)
    logits, visible, weights, others, is_top = (take_positions(x, columns, dim=-1) for x in (logits, visible, weights, others, is_top))
    # A_ts = sigmoid(x), A'_ts = sigmoid(x'); their difference without cancellation near 1
    x = logits - others
    x_patched = take_positions(noise_key_logits, columns, dim=-1).masked_fill(~visible, NEG_INF) - others
    change = torch.where(
        x >= 0, torch.sigmoid(-x) - torch.sigmoid(-x_patched), torch.sigmoid(x_patched) - torch.sigmoid(x)
    )
    keep = visible & torch.isfinite(others)
    change = torch.where(keep, change, torch.zeros_like(change))
    return change, weights, total, weighted_values, is_top, values_without_top


def key_effects(patch: KeyPatch, dz: Tensor) -> Tensor:
    """Per key node effect for a gradient at ``z``, for the key positions ``C`` the patch was prepared for.

    Row ``t``'s change is ``(A'_ts - A_ts) * (g_ts - mean of g_tj over j != s weighted by A_tj)`` with
    ``g_ts = v_s . dMetric/dz_t``, which equals ``(A'_ts - A_ts) / (1 - A_ts) * (g_ts - sum_j A_tj g_tj)``
    but stays accurate when ``A_ts`` is within rounding of 1.

    Args:
        dz: ``batch query head d_head``, gradient of the metric at ``z`` (every query position).
    Returns:
        ``batch C kv_head``.
    """
    g = einsum(dz, patch.values, "batch query head d_head, batch key head d_head -> batch head query key")
    w = patch.weights
    weighted = rearrange((dz * patch.weighted_values).sum(-1), "batch query head -> batch head query 1")
    mean_without = (weighted - w * g) / (patch.total - w)  # accurate for s != top
    mean_without_top = rearrange((dz * patch.values_without_top).sum(-1), "batch query head -> batch head query 1")
    mean_without = torch.where(patch.is_top, mean_without_top, mean_without)
    rows = torch.where(patch.pattern_change != 0, patch.pattern_change * (g - mean_without), 0.0)
    per_head = rows.sum(dim=2)  # batch head C
    return reduce(per_head, "batch (kv_head group) key -> batch key kv_head", "sum", group=patch.group)


def joint_key_delta_z(clean: CleanAttention, noise_key_logits: Tensor) -> Tensor:
    """``z' - z`` when every key of a key/value head is patched at once (rows recomputed exactly).

    Returns:
        ``batch query head d_head``; see ``joint_key_effects``.
    """
    patched = torch.softmax(noise_key_logits, dim=-1)
    z_patched = einsum(patched, clean.values, "batch head query key, batch key head d_head -> batch query head d_head")
    return z_patched - clean.mixed


def joint_key_effects(delta_z: Tensor, dz: Tensor, group: int) -> Tensor:
    """Effect of patching every key of each key/value head at once, from ``joint_key_delta_z``.

    Returns:
        ``batch kv_head``.
    """
    per_head = (delta_z * dz).sum(dim=(1, 3))  # batch head
    return reduce(per_head, "batch (kv_head group) -> batch kv_head", "sum", group=group)
