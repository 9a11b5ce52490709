"""Memory budgets: the plan's ``max_memory``, the working-memory model, and chunks of pairs and positions.

A plan's ``max_memory`` bounds one pass's *working memory*: the autograd graph of the clean forward,
the method's cached activations, differences and QK-fix tables, and transients (not the model's
weights). ``choose_chunking`` picks, under that budget, first the most prompt pairs per pass (up to
``batch_size``; fewer pairs cost no extra passes), then, if one pair still does not fit, the most
node positions per chunk: each chunk reruns the method's passes with caches holding only its
positions. Scores do not depend on the chunking (first-order scores are sums over positions, and
chunks partition the positions), so a chunked run equals an unchunked one to float rounding.

The estimates come from the model's shape (``ModelInfo``) and the node selections; they are a model,
not a measurement. ``docs/scaling.md`` reports measured peaks against them.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, localcontext

import torch
from pydantic import ByteSize
from torch import Tensor

from atpframework.errors import PlanError, shorten
from atpframework.model.backend import ModelInfo
from atpframework.model.node import BoundNodes
from atpframework.model.sites import Site

# pydantic's ByteSize unit table (IEC: kb = 1000, kib = 1024), limited to the units max_memory has always
# accepted. ByteSize's own parser is not used: it multiplies in floating point (0.99999...KiB -> 1024),
# reads floats, "1_000" and bit units, and ignores text after the unit; parse_bytes keeps exact arithmetic.
_UNITS = {"": 1} | {u: int(ByteSize.byte_sizes[u]) for u in ("b", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib")}
ELEMENT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


MAX_BYTES = 2**63 - 1
"""The largest ``max_memory`` accepted, in bytes: the largest 64-bit integer (8 EiB), far above any machine."""
_MAX_SIZE_TEXT = 1000
"""Longest size string read (a longer one is not a size anyone means)."""
_SIZE_FORMS = (
    "give bytes (an integer) or a number with a unit (" + ", ".join(u for u in _UNITS if u) + "), e.g. '8GiB'; "
    "allowed: 1 byte to 2**63-1 bytes"
)


def parse_bytes(value: int | str) -> int:
    """``"8GiB"``, ``"500 MB"``, ``"1.5GB"`` or an integer number of bytes -> bytes (``ValueError`` otherwise).

    Exact arithmetic (integers and ``Decimal``), so no size overflows; a fractional byte count is
    rounded down. Sizes must lie in ``1 .. MAX_BYTES``; ``True`` and ``False`` are not sizes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{shorten(value)} is not a size; {_SIZE_FORMS}")
    if isinstance(value, int):
        size = Decimal(min(max(value, -1), MAX_BYTES + 1))  # clamped: only the bounds matter beyond them
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value) if len(value) <= _MAX_SIZE_TEXT else None
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{shorten(value)} is not a size; {_SIZE_FORMS}")
        with localcontext(prec=2 * _MAX_SIZE_TEXT):  # exact: the digits given plus the unit's
            size = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    if size > MAX_BYTES:
        raise ValueError(f"{_describe(value)} is too large; allowed: at most 2**63-1 bytes (8 EiB)")
    if size < 1:
        raise ValueError(f"must be positive (at least 1 byte), got {_describe(value)}")
    return int(size)


def _describe(value: int | str) -> str:
    """A size as an error message shows it: huge integers by their digit count, strings cut short."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    return shorten(value)


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit it reaches (``"1.5 GiB"``), or ``"512 B"``.

    Not ``ByteSize.human_readable``: that takes whole bytes only, rounds below 1 KiB and goes on to PiB/EiB.
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Chunking:
    """How each batch is split so that one pass fits the plan's ``max_memory``."""

    pairs_per_pass: int | None = None
    """Prompt pairs per batch (None: the plan's ``batch_size``)."""
    positions_per_chunk: int | None = None
    """Node positions per chunk; None: all of a batch's node positions in one chunk."""
    estimate: int | None = None
    """Estimated working memory of one pass, in bytes (None: no budget given)."""
    budget: int | None = None

    def describe(self) -> str:
        if self.budget is None:
            return "no max_memory: one chunk of every node position per batch"
        positions = "every node position" if self.positions_per_chunk is None else f"{self.positions_per_chunk} node positions"
        return (
            f"max_memory {format_bytes(self.budget)}: {self.pairs_per_pass} pair(s) per pass, chunks of {positions}; "
            f"estimated working memory {format_bytes(self.estimate or 0)}"
        )


# ------------------------------------------------------------------ positions
def take_positions(x: Tensor, positions: Tensor | None, dim: int = 1) -> Tensor:
    """``x`` restricted to ``positions`` along ``dim`` (None: all of it, no copy)."""
    return x if positions is None else x.index_select(dim, positions.to(x.device))


def node_positions(bound: tuple[BoundNodes, ...]) -> list[int] | None:
    """Sorted positions the selections score per entry; None when some selection has no ``pos`` axis
    (it cannot be chunked) or there is none."""
    wanted: set[int] = set()
    for b in bound:
        axis = b.positions
        if axis is None:
            return None
        wanted.update(i for entry in axis.entries for i in entry)
    return sorted(wanted) or None


def position_chunks(positions: list[int] | None, seq_len: int, per_chunk: int | None) -> list[Tensor | None]:
    """The chunks one batch runs: index tensors over positions, or ``[None]`` for one chunk of every position."""
    if positions is None or (per_chunk is None and len(positions) == seq_len):
        return [None]
    step = len(positions) if per_chunk is None else per_chunk
    return [torch.tensor(positions[i : i + step]) for i in range(0, len(positions), step)]


# ------------------------------------------------------------------ the memory model (elements per batch row)
def _per_token_layer(info: ModelInfo) -> int:
    """Activations one block keeps per token for the backward (residual stream and norms, q/k/v/z, MLP)."""
    return 14 * info.d_model + 3 * (2 * info.n_heads + 2 * info.n_kv_heads) * info.d_head + 5 * (info.d_mlp or 0)


def graph_elements(info: ModelInfo, seq_len: int) -> float:
    """What a forward pass with gradients keeps for the backward, per batch row (eager attention: the
    ``head query key`` scores and pattern of every layer)."""
    attention = 2.5 * info.n_heads * seq_len * seq_len
    return info.n_layers * (seq_len * _per_token_layer(info) + attention) + 4 * seq_len * info.d_vocab


def forward_elements(info: ModelInfo, seq_len: int) -> float:
    """Peak of a forward pass without gradients, per batch row (one block's transients and the logits)."""
    return seq_len * _per_token_layer(info) + 2 * info.n_heads * seq_len * seq_len + 3 * seq_len * info.d_vocab


def site_width(site: Site, info: ModelInfo, bound: tuple[BoundNodes, ...]) -> int:
    """Elements per position of a site's activation."""
    heads = {"attn_z": info.n_heads, "attn_q": info.n_heads, "attn_k": info.n_kv_heads, "attn_v": info.n_kv_heads}
    if site.view:
        sizes = [math.prod(a.size for a in b.axes if a.dim != "pos") for b in bound if b.site(site.layer) == site]
        return max([info.d_model, *sizes])
    if site.name in heads:
        return heads[site.name] * info.d_head
    if site.name == "mlp_post":
        return info.d_mlp or info.d_model
    return info.d_model


def choose_chunking(
    budget: int, batch_size: int, max_positions: int, estimate: Callable[[int, int], int], can_chunk_positions: bool,
    why_not: str = "",
) -> Chunking:
    """The most pairs per pass, then the most positions per chunk, whose ``estimate(pairs, positions)`` fits.

    Raises ``PlanError`` (naming ``max_memory``) when one pair and one position do not fit.
    """
    for pairs in range(batch_size, 0, -1):
        need = estimate(pairs, max_positions)
        if need <= budget:
            return Chunking(pairs, None, need, budget)
    if can_chunk_positions:
        lo, hi = 1, max_positions - 1
        if estimate(1, lo) <= budget:
            while lo < hi:  # the largest chunk that fits
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if estimate(1, mid) <= budget else (lo, mid - 1)
            return Chunking(1, lo, estimate(1, lo), budget)
        minimum = estimate(1, 1)
    else:
        minimum = estimate(1, max_positions)
    raise PlanError(
        f"max_memory: {format_bytes(budget)} is below this plan's estimated minimum working memory of "
        f"{format_bytes(minimum)} (one prompt pair per pass"
        + (", one node position per chunk" if can_chunk_positions else f"; {why_not}" if why_not else "")
        + "); raise max_memory or use shorter prompts"
    )
