"""Edges: one writer's output as read by one reader's input, the unit of circuits.

The residual stream a reader reads is a sum of writes. *Writers*, in residual-stream order, are the
embeddings (``resid[0]``: token plus positional embeddings), each attention head's result
(``attn_result``, ``z_h @ W_O^h``) and each MLP's output (``mlp_out``). *Readers* are each query head's
input, each key and value head's input (``attn_q_input``... one copy of the residual stream per head;
with grouped-query attention per key/value head), each MLP's input (``mlp_input``) and the unembedding's
input, the final residual stream ``resid[n_layers]``. A reader's input is the sum of the outputs of the
writers upstream of it plus constants (biases), so

    input_v = sum_{u upstream of v} u + c_v.

**Patching** the edge ``(u, v)`` gives ``v`` the noise value of ``u`` in place of its clean value, every
other path staying clean: ``input_v <- input_v + (u(noise) - u(clean))``. Its first-order estimate
(EAP, Syed et al. 2023) is ``(u(noise) - u(clean)) . dMetric/d input_v`` on the clean run, where the
gradient is the reader's own (the reader-input sites flow into that reader only).

**Writer numbering** (the ``writer`` axis of every edge node type): 0 is the embeddings, then per block
``l`` its heads ``0..H-1`` and then its MLP (absent in attention-only models). A writer is upstream of
a reader when it writes below the reader's input: heads and MLPs of lower blocks always; in sequential
blocks also the heads of the MLP's own block. The writers upstream of any reader are therefore a
prefix of this order (``upstream_count``); an edge to a writer outside the prefix does not exist, its
score is 0 and patching it changes nothing.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from einops import einsum
from pydantic import Field
from torch import Tensor

from atpframework.io.results import writer_name
from atpframework.model.backend import ModelInfo
from atpframework.model.node import SELECTION_FIELDS, AbstractNode, BindingContext, BoundNodes, NodeSpec, Selection, SparseOutput
from atpframework.model.sites import Site

READER_SITE = {"q": "attn_q_input", "k": "attn_k_input", "v": "attn_v_input", "mlp": "mlp_input", "logits": "resid"}
"""Reader kind -> the site holding its input."""


def writers_per_block(info: ModelInfo) -> int:
    """Heads plus the MLP (when the model has MLPs)."""
    return info.n_heads + (info.d_mlp is not None)


def writer_count(info: ModelInfo) -> int:
    """Every writer of the model: the embeddings, then each block's heads and MLP."""
    return 1 + info.n_layers * writers_per_block(info)


def upstream_count(info: ModelInfo, site: Site) -> int:
    """How many writers (a prefix of the writer order) are upstream of the reader input ``site``."""
    below = 1 + site.layer * writers_per_block(info)
    if site.name == "resid":
        return below if site.layer < info.n_layers else writer_count(info)
    if site.name == "mlp_input" and not info.parallel_blocks:
        return below + info.n_heads
    return below


def writer_sites(info: ModelInfo, count: int) -> tuple[Site, ...]:
    """The sites holding the first ``count`` writers (in writer order)."""
    sites = [Site("resid", 0)]
    for layer in range(info.n_layers):
        sites.append(Site("attn_result", layer))
        if info.d_mlp is not None:
            sites.append(Site("mlp_out", layer))
    needed, total = [], 0
    for site in sites:
        if total >= count:
            break
        needed.append(site)
        total += info.n_heads if site.name == "attn_result" else 1
    return tuple(needed)


def writers_held(info: ModelInfo, sites: Sequence[Site]) -> int:
    """How many writers the writer sites ``sites`` hold (a head-result site holds one per head)."""
    return sum(info.n_heads if s.name == "attn_result" else 1 for s in sites)


def stack_writers(info: ModelInfo, acts: Mapping[Site, Tensor], count: int) -> Tensor:
    """``batch pos writer d_model``: the first ``count`` writers' outputs, from activations at ``writer_sites``."""
    parts = [acts[s] if s.name == "attn_result" else acts[s][:, :, None] for s in writer_sites(info, count)]
    return torch.cat(parts, dim=2)[:, :, :count]


def writer_labels(info: ModelInfo) -> list[str]:
    """``writer_name`` of every writer, in writer order."""
    return [writer_name(i, info.n_heads, info.d_mlp is not None) for i in range(writer_count(info))]


def edge_effects(writer_delta: Tensor, grad: Tensor, n_writers: int) -> Tensor:
    """First-order edge effects ``(u(noise) - u(clean)) . dMetric/d input_v``.

    Args:
        writer_delta: ``batch pos upstream d_model``, noise minus clean output of each upstream writer.
        grad: ``batch pos [head] d_model``, the gradient at the reader's input (per reader head or not).
        n_writers: size of the writer axis; writers past ``upstream`` get 0.
    Returns:
        ``batch pos [head] writer``.
    """
    if grad.dim() == 4:
        effect = einsum(writer_delta, grad, "batch pos writer d, batch pos head d -> batch pos head writer")
    else:
        effect = einsum(writer_delta, grad, "batch pos writer d, batch pos d -> batch pos writer")
    return torch.nn.functional.pad(effect, (0, n_writers - effect.shape[-1]))


def edge_patch_delta(mask: Tensor, writer_delta: Tensor) -> Tensor:
    """What patching the edges in ``mask`` adds to the reader input, per row block.

    Args:
        mask: ``set pos [head] writer`` booleans (which edges each row block patches).
        writer_delta: ``batch pos upstream d_model``.
    Returns:
        ``set batch pos [head] d_model``.
    """
    weights = mask[..., : writer_delta.shape[2]].to(writer_delta.dtype)
    if weights.dim() == 4:
        return einsum(weights, writer_delta, "set pos head writer, batch pos writer d -> set batch pos head d")
    return einsum(weights, writer_delta, "set pos writer, batch pos writer d -> set batch pos d")


class EdgeSpecBase(NodeSpec):
    """Common fields of the edge selections (one reader kind per selection)."""

    positions: Selection = "each"
    writers: Selection = "each"
    """Writer indices (0: embeddings; then per block its heads, then its MLP: ``writer_labels``)."""
    keep_top: int | None = Field(None, ge=1)
    """Keep only the ``keep_top`` edges with the largest ``|score|`` per pair (over the whole selection) and store
    them sparsely; None keeps every edge (dense)."""

    def sparse_output(self) -> SparseOutput | None:
        return None if self.keep_top is None else SparseOutput(self.keep_top, "selection")


class EdgeNode(AbstractNode):
    """Edges into one kind of reader (see module docstring): a node type whose nodes are (writer, reader) pairs.

    ``site`` is the reader's input site; the index axes end with ``writer``. The engine scores these
    selections with ``edge_effects`` against the writers' noise - clean outputs and patches them with
    ``edge_patch_delta`` instead of replacing the reader's input."""

    reader: ClassVar[str]
    """The reader kind: ``q``, ``k``, ``v``, ``mlp`` or ``logits``."""
    selection_fields = {**SELECTION_FIELDS, "writer": "writers"}
    axis_sizes: ClassVar[Mapping[str, Callable[[BindingContext], int]]] = {"writer": lambda context: writer_count(context.info)}

    def upstream(self, info: ModelInfo, layer: int) -> int:
        """Writers upstream of this reader at ``layer``."""
        return upstream_count(info, Site(self.site, layer))


def edge_writer_sites(bound: Sequence[BoundNodes], info: ModelInfo) -> tuple[Site, ...]:
    """The writer sites the edge selections among ``bound`` read (empty without edges)."""
    count = max(
        (b.node.upstream(info, layer) for b in bound if isinstance(b.node, EdgeNode) for e in b.layers.entries for layer in e),
        default=0,
    )
    return writer_sites(info, count) if count else ()


def real_edge_count(b: BoundNodes, info: ModelInfo) -> int:
    """How many nodes of an edge selection are edges that exist (writer upstream of reader); the rest score 0."""
    assert isinstance(b.node, EdgeNode)
    writers = b.axes[-1]
    others = b.n_nodes // (len(b.layers.entries) * len(writers.entries))
    count = 0
    for entry in b.layers.entries:
        upstream = max(b.node.upstream(info, layer) for layer in entry)
        count += sum(1 for covered in writers.entries if min(covered) < upstream)
    return count * others


def edge_selections(positions: Selection = "all", keep_top: int | None = None) -> list[dict[str, Any]]:
    """Plan ``nodes`` covering every edge of a model: one selection per reader kind (queries, keys, values, MLPs,
    logits), per position or summed over positions (``"all"``, the default: a circuit over components).
    Drop ``edge_mlp`` for attention-only models."""
    extra: dict[str, Any] = {"positions": positions} | ({"keep_top": keep_top} if keep_top is not None else {})
    return [{"kind": kind, **extra} for kind in ("edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits")]
