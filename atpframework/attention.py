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

Logits come from the backend (``AbstractBackend.attention_logits``), so the model's own scale, mask,
rotary handling, soft-capping and ALiBi apply. Log-partitions with one key excluded are computed
without cancellation even in saturated rows.
"""

from dataclasses import dataclass

import torch
from einops import einsum, reduce, repeat
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class CleanAttention:
    """One layer's clean attention, recomputed from captured ``q``, ``k`` and ``v``."""

    logits: Tensor
    """``batch head query key``, masked entries ``-inf``."""
    pattern: Tensor
    """``batch head query key``."""
    values: Tensor
    """``batch key head d_head``: values repeated to query heads."""
    mixed: Tensor
    """``batch query head d_head``: ``z``."""
    group: int
    """Query heads per key/value head."""


def clean_attention(logits: Tensor, v: Tensor) -> CleanAttention:
    """Pattern and mixed values from logits (``batch head query key``) and values (``batch key kv_head d_head``)."""
    group = logits.shape[1] // v.shape[2]
    pattern = torch.softmax(logits, dim=-1)
    values = repeat(v, "batch key kv_head d_head -> batch key (kv_head group) d_head", group=group)
    mixed = einsum(pattern, values, "batch head query key, batch key head d_head -> batch query head d_head")
    return CleanAttention(logits, pattern, values, mixed, group)


def query_delta_z(clean: CleanAttention, noise_query_logits: Tensor) -> Tensor:
    """``z' - z`` per query node when the query at each (position, head) alone takes its noise value.

    Args:
        noise_query_logits: ``batch head query key``, logits of noise queries against clean keys.
    Returns:
        ``batch query head d_head``; the effect for a gradient ``dz`` is ``(result * dz).sum(-1)``.
    """
    patched = torch.softmax(noise_query_logits, dim=-1)
    z_patched = einsum(patched, clean.values, "batch head query key, batch key head d_head -> batch query head d_head")
    return z_patched - clean.mixed


@dataclass
class KeyPatch:
    """What the key closed form needs for one layer, independent of the gradient (computed once)."""

    pattern_change: Tensor
    """``batch head query key``: ``A'_ts - A_ts`` with key ``s`` alone patched; 0 where masked or the only key."""
    weights: Tensor
    """``batch head query key``: ``exp(logit - row max)``, 0 where masked."""
    top: Tensor
    """``batch head query 1``: each row's largest logit."""
    weights_without_top: Tensor
    """``batch head query key``: the row's weights with ``top`` excluded, rescaled by the runner-up."""


def key_patch(clean: CleanAttention, noise_key_logits: Tensor) -> KeyPatch:
    """Prepare the key closed form for the key at each position ``s`` patched alone.

    Args:
        noise_key_logits: ``batch head query key``, logits of clean queries against noise keys
            (entry ``(t, s)`` is the patched logit of row ``t`` when key ``s`` is patched).
    """
    logits = clean.logits
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
    others = row_max + torch.log((total - weights).clamp_min(0))
    others = others.scatter(-1, top, torch.logsumexp(without_top, dim=-1, keepdim=True))
    # A_ts = sigmoid(x), A'_ts = sigmoid(x'); their difference without cancellation near 1
    x = logits - others
    x_patched = noise_key_logits.masked_fill(~visible, NEG_INF) - others
    change = torch.where(
        x >= 0, torch.sigmoid(-x) - torch.sigmoid(-x_patched), torch.sigmoid(x_patched) - torch.sigmoid(x)
    )
    keep = visible & torch.isfinite(others)
    change = torch.where(keep, change, torch.zeros_like(change))
    return KeyPatch(change, weights, top, torch.where(torch.isfinite(without_top), weights_without_top, 0.0))


def key_effects(clean: CleanAttention, patch: KeyPatch, dz: Tensor) -> Tensor:
    """Per key node effect for a gradient at ``z``.

    Row ``t``'s change is ``(A'_ts - A_ts) * (g_ts - mean of g_tj over j != s weighted by A_tj)``,
    which equals ``(A'_ts - A_ts) / (1 - A_ts) * (g_ts - sum_j A_tj g_tj)`` but stays accurate when
    ``A_ts`` is within rounding of 1.

    Args:
        dz: ``batch query head d_head``, gradient of the metric at ``z``.
    Returns:
        ``batch key kv_head``.
    """
    g = einsum(dz, clean.values, "batch query head d_head, batch key head d_head -> batch head query key")
    w = patch.weights
    weighted = (w * g).sum(dim=-1, keepdim=True)
    mean_without = (weighted - w * g) / (w.sum(dim=-1, keepdim=True) - w)  # accurate for s != top
    w_top = patch.weights_without_top
    mean_without_top = (w_top * g).sum(dim=-1, keepdim=True) / w_top.sum(dim=-1, keepdim=True)
    mean_without = mean_without.scatter(-1, patch.top, mean_without_top)
    rows = torch.where(patch.pattern_change != 0, patch.pattern_change * (g - mean_without), 0.0)
    per_head = rows.sum(dim=2)  # batch head key
    return reduce(per_head, "batch (kv_head group) key -> batch key kv_head", "sum", group=clean.group)


def joint_key_effects(clean: CleanAttention, noise_key_logits: Tensor, dz: Tensor) -> Tensor:
    """Effect of patching every key of a key/value head at once (rows recomputed exactly).

    Returns:
        ``batch kv_head``.
    """
    patched = torch.softmax(noise_key_logits, dim=-1)
    z_patched = einsum(patched, clean.values, "batch head query key, batch key head d_head -> batch query head d_head")
    per_head = ((z_patched - clean.mixed) * dz).sum(dim=(1, 3))  # batch head
    return reduce(per_head, "batch (kv_head group) -> batch kv_head", "sum", group=clean.group)
