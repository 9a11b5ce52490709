"""Node types: what a node reads, how it is indexed, and how its score is formed.

A *node type* (a subclass of ``AbstractNode``, registered in the ``atpframework.nodes`` entry-point
group) binds one activation ``Site`` to index axes (``pos``, ``head``, ``neuron``...) and trailing
feature axes that a score contracts. Its pydantic *spec* (a subclass of ``NodeSpec``) is what a
plan writes: which layers and which entries of each index axis, each as ``"each"`` (one node per
entry), ``"all"`` (every entry summed into one node, patched jointly) or a list of indices.

Rules for implementations:
    * ``spec_type.kind`` is a ``Literal`` equal to ``kind`` and to the entry-point name.
    * ``spec_type`` declares one ``Selection`` field per index axis, named by ``SELECTION_FIELDS``.
    * ``elementwise_effect`` must be linear in ``delta`` for a fixed gradient (first-order scores
      of "all" nodes are sums of their entries).
"""

import math
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from atpframework.errors import PlanError, shorten
from atpframework.model.backend import ModelInfo
from atpframework.model.dims import DimName
from atpframework.model.sites import Site

Selection = Union[Literal["each", "all"], Annotated[list[int], Field(min_length=1)]]
"""``"each"``: one node per entry; ``"all"``: all entries summed into one node; or a list of indices (negative positions count from the end)."""

SELECTION_FIELDS: dict[str, str] = {"layer": "layers", "pos": "positions", "head": "heads", "neuron": "neurons", "latent": "latents"}
"""Index axis -> the spec field that selects along it."""


class NodeSpec(BaseModel):
    """Common fields of every node selection in a plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    """The node type (an entry-point name in ``atpframework.nodes``)."""
    name: str | None = None
    """Name of this selection's tensor in the result (default: ``kind``); must be unique in a plan."""
    layers: Selection = "each"
    """Layers (blocks; residual boundaries for ``resid``)."""

    @property
    def result_name(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True)
class AxisSelection:
    """One resolved axis of a node selection: the entries along it and what each entry covers."""

    dim: str
    size: int
    entries: tuple[tuple[int, ...], ...]
    """Per node entry, the indices it covers (one index, or every index for ``"all"``)."""
    labels: list[int] | str
    """What the result file records: the chosen indices, or ``"all"``."""

    def mask(self, entry: int, device: torch.device | None = None) -> Tensor:
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[list(self.entries[entry])] = True
        return m


class AbstractNode(ABC):
    """A family of nodes reading one activation site (see module docstring)."""

    kind: ClassVar[str]
    """Entry-point name, the spec's ``kind`` literal and the default result tensor name."""
    spec_type: ClassVar[type[NodeSpec]]
    site: ClassVar[str]
    """The ``Site`` name read at each selected layer."""
    index_dims: ClassVar[tuple[DimName, ...]]
    """Axes of the site tensor between ``batch`` and the feature axes, e.g. ``("pos", "head")``."""
    n_feature_dims: ClassVar[int] = 1
    """Trailing axes of the site tensor that a score contracts (0 for scalar nodes such as neurons)."""

    def layer_range(self, info: ModelInfo) -> range:
        """Valid layer indices for this node type."""
        return range(info.n_layers)

    def dim_size(self, dim: str, info: ModelInfo, seq_len: int) -> int:
        """Size of an index axis."""
        if dim == "pos":
            return seq_len
        if dim == "head":
            return info.n_heads
        if dim == "neuron":
            if info.d_mlp is None:
                raise PlanError(f"node kind {self.kind!r}: this model has no MLP layers")
            return info.d_mlp
        raise NotImplementedError(f"{type(self).__name__} must override dim_size for axis {dim!r}")

    def bind(self, spec: NodeSpec, info: ModelInfo, seq_len: int, where: str, attached: "Mapping[str, Any]") -> "BoundNodes | None":
        """Bind ``spec`` specially, or None for the generic binding of ``bind_nodes``.

        ``attached`` maps the plan's SAE names to their ``AttachedSae``; node types that read
        something other than a fixed backend site (SAE latents) override this.
        """
        return None

    def elementwise_effect(self, delta: Tensor, grad: Tensor) -> Tensor:
        """First-order effect per index entry: ``(noise - clean) . dMetric/dact`` over the feature axes.

        Args:
            delta: ``batch *index_dims *features``, noise minus clean activation.
            grad: same shape, the gradient of the per-pair metric on the clean run.
        Returns:
            ``batch *index_dims``.
        """
        product = delta * grad
        if self.n_feature_dims == 0:
            return product
        return product.sum(dim=tuple(range(-self.n_feature_dims, 0)))


@dataclass(frozen=True)
class BoundNodes:
    """One plan node selection resolved against a model: what the result tensor's axes mean."""

    spec: NodeSpec
    node: AbstractNode
    layers: AxisSelection
    axes: tuple[AxisSelection, ...]
    """The index axes, in ``node.index_dims`` order."""
    site_name: str = ""
    """The site read (default: ``node.site``)."""
    view: str = ""
    """The view of that site (``Site.view``), e.g. an SAE's latents."""

    def site(self, layer: int) -> Site:
        """The site this selection reads at ``layer``."""
        return Site(self.site_name or self.node.site, layer, self.view)

    @property
    def name(self) -> str:
        return self.spec.result_name

    @property
    def dims(self) -> tuple[str, ...]:
        return ("layer",) + tuple(a.dim for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers.entries),) + tuple(len(a.entries) for a in self.axes)

    @property
    def positions(self) -> AxisSelection | None:
        """The ``pos`` axis, or None for node types without one."""
        return self.axes[self.node.index_dims.index("pos")] if "pos" in self.node.index_dims else None

    @property
    def n_nodes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def reduce(self, effect: Tensor) -> Tensor:
        """Reduce a per-entry effect ``batch *index_dims`` to this selection's ``batch *axes``."""
        out = effect
        for i, axis in enumerate(self.axes, start=1):
            if axis.labels == "all":
                out = out.sum(dim=i, keepdim=True)
            else:
                idx = torch.tensor([e[0] for e in axis.entries], device=out.device)
                out = out.index_select(i, idx)
        return out

    def layer_entries(self, layer: int) -> list[int]:
        """Entries of the layer axis that cover ``layer``."""
        return [i for i, e in enumerate(self.layers.entries) if layer in e]

    @cached_property
    def coverage(self) -> "Coverage":
        """Where each node of this selection patches (computed once, vectorized)."""
        n = self.n_nodes
        coords = torch.unravel_index(torch.arange(n), self.shape)
        grid = tuple(a.size for a in self.axes)
        points = torch.zeros(n, 1, dtype=torch.long)
        stride = math.prod(grid)
        for axis, coord in zip(self.axes, coords[1:]):
            stride //= axis.size
            if axis.labels == "all":  # one entry covering the whole axis
                span = torch.arange(axis.size) * stride
                points = (points[:, :, None] + span[None, None, :]).reshape(n, -1)
            else:
                first = torch.tensor([e[0] for e in axis.entries], dtype=torch.long)
                points = points + (first[coord] * stride)[:, None]
        return Coverage(layer_entry=coords[0], points=points, grid=grid)

    def patch_mask(self, flat_index: int, device: torch.device | None = None) -> tuple[tuple[int, ...], Tensor]:
        """For one node (flat index over ``shape``): the layers it covers and its mask over ``index_dims``."""
        cov = self.coverage
        mask = torch.zeros(math.prod(cov.grid), dtype=torch.bool, device=device)
        mask[cov.points[flat_index].to(mask.device)] = True
        return self.layers.entries[int(cov.layer_entry[flat_index])], mask.view(cov.grid)


@dataclass(frozen=True)
class Coverage:
    """Per node of a selection: its layer entry and the points it covers in the site's index grid.

    Every node of one selection covers the same number of points ``P`` (the product of the sizes of
    its ``"all"`` axes), so ``points`` is rectangular.
    """

    layer_entry: Tensor
    """``node``: index into ``BoundNodes.layers.entries``."""
    points: Tensor
    """``node P``: flat indices into ``grid`` (the ``index_dims`` sizes, row-major)."""
    grid: tuple[int, ...]


def resolve_axis(selection: object, dim: str, size: int, where: str, allow_negative: bool) -> AxisSelection:
    """Turn a plan ``Selection`` into entries, raising ``PlanError`` at ``where`` for bad indices."""
    if selection == "each":
        return AxisSelection(dim, size, tuple((i,) for i in range(size)), list(range(size)))
    if selection == "all":
        return AxisSelection(dim, size, (tuple(range(size)),), "all")
    if not isinstance(selection, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in selection):
        raise PlanError(f"{where}: allowed: 'each', 'all' or a list of {dim} indices (got {shorten(selection)})")
    lo = -size if allow_negative else 0
    bad = [i for i in selection if not lo <= i < size]
    if bad:
        allowed = f"{lo}..{size - 1}" if size else "none (size 0)"
        raise PlanError(f"{where}: {dim} index {bad[0]} out of range (size {size}, allowed {allowed})")
    normalized = [i % size for i in selection]
    if len(set(normalized)) != len(normalized):
        raise PlanError(f"{where}: duplicate {dim} indices {selection}")
    return AxisSelection(dim, size, tuple((i,) for i in normalized), list(selection))


def bind_nodes(
    spec: NodeSpec, node: AbstractNode, info: ModelInfo, seq_len: int, where: str, attached: "Mapping[str, Any] | None" = None
) -> BoundNodes:
    """Resolve ``spec`` against the model; ``where`` is the plan location used in errors (``nodes[1]``)."""
    special = node.bind(spec, info, seq_len, where, attached or {})
    if special is not None:
        return special
    layer_range = node.layer_range(info)
    layers = resolve_axis(spec.layers, "layer", len(layer_range), f"{where}.layers", allow_negative=False)
    axes = []
    for dim in node.index_dims:
        field = SELECTION_FIELDS[dim]
        size = node.dim_size(dim, info, seq_len)
        axes.append(resolve_axis(getattr(spec, field), dim, size, f"{where}.{field}", allow_negative=dim == "pos"))
    bound = BoundNodes(spec, node, layers, tuple(axes))
    if bound.n_nodes == 0:
        raise PlanError(f"{where}: the selection matches no node")
    return bound
