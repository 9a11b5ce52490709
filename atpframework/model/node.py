"""Node types: what a node reads, how it is indexed, and how its score is formed.

A *node type* (a subclass of ``AbstractNode``, registered in the ``atpframework.nodes`` entry-point
group) binds one activation ``Site`` to index axes (``pos``, ``head``, ``neuron``...) and trailing
feature axes that a score contracts. Its pydantic *spec* (a subclass of ``NodeSpec``) is what a
plan writes: which layers and which entries of each index axis, each as ``"each"`` (one node per
entry), ``"all"`` (every entry summed into one node, patched jointly) or a list of indices.

Binding a selection (``bind_nodes``) resolves it against a ``BindingContext``: the model's sizes,
the prompt length, the plan location used in errors and the SAEs the plan splices in.

Rules for implementations (``AbstractNode.plugin_problems`` checks them when the plugin loads):
    * ``spec_type.kind`` is a ``Literal`` equal to ``kind`` and to the entry-point name.
    * ``site`` is a site name (``sites.SITE_NAMES``); a node type that overrides ``bind`` chooses
      what it reads itself (a view such as an SAE's latents) and may name something else.
    * ``spec_type`` declares one ``Selection`` field per index axis, the field named by
      ``selection_fields`` (default ``SELECTION_FIELDS``: ``positions``, ``heads``, ``neurons``, ``latents``).
    * Every index axis has a size: the built-in ``pos``, ``head`` and ``neuron``, or one the node type
      declares in ``axis_sizes`` (or computes in an overridden ``dim_size`` or ``bind``). A node type
      may add axes of its own this way (e.g. ``channel``, sized ``d_model``).
    * ``elementwise_effect`` must be linear in ``delta`` for a fixed gradient (first-order scores
      of "all" nodes are sums of their entries).
"""

import math
from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from atpframework.errors import PlanError, PluginError, shorten
from atpframework.model.backend import ModelInfo
from atpframework.model.sites import SITE_NAMES, Site

if TYPE_CHECKING:
    from atpframework.model.sae import AttachedSae

Selection = Union[Literal["each", "all"], Annotated[list[int], Field(min_length=1)]]
"""``"each"``: one node per entry; ``"all"``: all entries summed into one node; or a list of indices (negative positions count from the end)."""

SELECTION_FIELDS: Mapping[str, str] = {"layer": "layers", "pos": "positions", "head": "heads", "neuron": "neurons", "latent": "latents"}
"""Built-in index axis -> the spec field that selects along it (a node type's default ``selection_fields``)."""
SIZED_AXES: tuple[str, ...] = ("pos", "head", "neuron")
"""Built-in axes ``AbstractNode.dim_size`` sizes for every node type (``latent`` is sized by the SAE nodes' own ``bind``)."""


@dataclass(frozen=True)
class SparseOutput:
    """A selection whose scores are stored sparsely: per prompt pair, only the ``keep_top`` entries with
    the largest ``|score|`` (``engine.runner.keep_top``)."""

    keep_top: int
    per: Literal["position", "selection"] = "selection"
    """Keep the top entries per position (along the last axis) or over the whole selection."""


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

    def sparse_output(self) -> SparseOutput | None:
        """How this selection's scores are stored: None (the default) keeps them dense; a spec with a
        ``keep_top``-style option returns a ``SparseOutput``."""
        return None

    def sae_references(self) -> Mapping[str, str]:
        """The plan SAEs this selection reads: spec field -> the ``name`` of one of the plan's ``saes``
        (the plan checks that each exists). Default: none."""
        return {}

    def selection_of(self, field_name: str) -> object:
        """The value of the selection field ``field_name`` (an index axis's field, ``AbstractNode.selection_fields``)."""
        if field_name not in type(self).model_fields:
            raise PluginError(f"node plugin {self.kind!r}: its spec {type(self).__name__} has no selection field {field_name!r}")
        return getattr(self, field_name)


@dataclass(frozen=True)
class BindingContext:
    """Everything a node type may bind a plan selection against (``AbstractNode.bind``, ``dim_size``)."""

    info: ModelInfo
    """Sizes and provenance of the model."""
    seq_len: int
    """Token length of the prompt pairs being bound (a plan's selections are bound once per length)."""
    where: str
    """The selection's plan location, for errors (``nodes[1]``)."""
    saes: "Mapping[str, AttachedSae]" = field(default_factory=dict)
    """The SAEs the plan splices into the model, by name (empty when it splices none)."""

    def at(self, field_name: str) -> str:
        """The plan location of one field of the selection (``nodes[1].heads``)."""
        return f"{self.where}.{field_name}"


@dataclass(frozen=True)
class AxisSelection:
    """One resolved axis of a node selection: the entries along it and what each entry covers."""

    dim: str
    size: int
    entries: tuple[tuple[int, ...], ...]
    """Per node entry, the indices it covers (one index, or every index for ``"all"``)."""
    labels: list[int] | str
    """What the result file records: the chosen indices, or ``"all"``."""


class AbstractNode(ABC):
    """A family of nodes reading one activation site (see module docstring)."""

    kind: ClassVar[str]
    """Entry-point name, the spec's ``kind`` literal and the default result tensor name."""
    spec_type: ClassVar[type[NodeSpec]]
    site: ClassVar[str]
    """The ``Site`` name read at each selected layer."""
    index_dims: ClassVar[tuple[str, ...]]
    """Axes of the site tensor between ``batch`` and the feature axes, e.g. ``("pos", "head")``: built-in
    axes (``dims.DimName``) or axes of the node type's own (declared in ``selection_fields`` and ``axis_sizes``)."""
    n_feature_dims: ClassVar[int] = 1
    """Trailing axes of the site tensor that a score contracts (0 for scalar nodes such as neurons)."""
    selection_fields: ClassVar[Mapping[str, str]] = SELECTION_FIELDS
    """Index axis -> the spec field that selects along it. A node type with an axis of its own adds it:
    ``{**SELECTION_FIELDS, "channel": "channels"}``."""
    axis_sizes: ClassVar[Mapping[str, Callable[[BindingContext], int]]] = {}
    """Index axis -> its size in a binding context, for axes the node type adds (or sizes differently:
    ``attn_k`` counts key/value heads). Checked before the built-in sizes of ``dim_size``."""

    def layer_range(self, info: ModelInfo) -> range:
        """Valid layer indices for this node type."""
        return range(info.n_layers)

    def dim_size(self, dim: str, context: BindingContext) -> int:
        """Size of an index axis: ``axis_sizes[dim]`` if declared, else the built-in size of ``pos``
        (the prompt length), ``head`` (``n_heads``) or ``neuron`` (``d_mlp``)."""
        if dim in self.axis_sizes:
            return self.axis_sizes[dim](context)
        info = context.info
        if dim == "pos":
            return context.seq_len
        if dim == "head":
            return info.n_heads
        if dim == "neuron":
            if info.d_mlp is None:
                raise PlanError(f"{context.where}: node kind {self.kind!r}: this model has no MLP layers")
            return info.d_mlp
        raise PluginError(f"node plugin {self.kind!r}: no size for its index axis {dim!r}; declare it in axis_sizes")

    def bind(self, spec: NodeSpec, context: BindingContext) -> "BoundNodes | None":
        """Bind ``spec`` specially, or None (the default) for the generic binding of ``bind_nodes``.

        Node types that read something other than a fixed backend site (SAE latents, from
        ``context.saes``) override this."""
        return None

    @classmethod
    def plugin_problems(cls, name: str) -> list[str]:
        """What is wrong with this class as the node plugin ``name`` (empty: nothing). ``plugins`` calls
        it when the plugin loads or is registered, so a broken node type fails there, named."""
        problems: list[str] = []
        declared = getattr(cls, "spec_type", None)
        spec_type = declared if isinstance(declared, type) and issubclass(declared, NodeSpec) else None
        if spec_type is None:
            problems.append(f"spec_type is {declared!r}, not a subclass of NodeSpec")
        else:
            annotation = spec_type.model_fields["kind"].annotation
            if get_origin(annotation) is not Literal or get_args(annotation) != (name,):
                shown = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
                problems.append(f"{spec_type.__name__}.kind is {shown}, not Literal[{name!r}] (the spec's kind must be the entry-point name)")
        binds_itself = cls.bind is not AbstractNode.bind
        site = getattr(cls, "site", None)
        if site not in SITE_NAMES and not binds_itself:
            problems.append(
                f"site {site!r} is not a site name (allowed: {', '.join(SITE_NAMES)}); only a node type that "
                "overrides bind may read something else"
            )
        n_feature_dims = getattr(cls, "n_feature_dims", None)
        if not isinstance(n_feature_dims, int) or isinstance(n_feature_dims, bool) or n_feature_dims < 0:
            problems.append(f"n_feature_dims is {n_feature_dims!r}, not an integer >= 0")
        index_dims = getattr(cls, "index_dims", None)
        if not (isinstance(index_dims, tuple) and all(isinstance(d, str) for d in index_dims)):
            problems.append(f"index_dims is {index_dims!r}, not a tuple of axis names")
            return problems
        if len(set(index_dims)) != len(index_dims) or "layer" in index_dims:
            problems.append(f"index_dims {index_dims!r} must name distinct axes other than 'layer' (always the first axis)")
        sized_by_node = binds_itself or cls.dim_size is not AbstractNode.dim_size
        for dim in index_dims:
            plan_field = cls.selection_fields.get(dim)
            if plan_field is None:
                problems.append(
                    f"index axis {dim!r} has no plan field: add one to selection_fields "
                    f"(e.g. {{**SELECTION_FIELDS, {dim!r}: {dim + 's'!r}}}) and to the spec"
                )
            elif spec_type is not None and plan_field not in spec_type.model_fields:
                problems.append(f"index axis {dim!r} is selected by the plan field {plan_field!r}, which {spec_type.__name__} does not declare")
            if dim not in SIZED_AXES and dim not in cls.axis_sizes and not sized_by_node:
                problems.append(
                    f"index axis {dim!r} is unknown: not a built-in axis with a size ({', '.join(SIZED_AXES)}) "
                    "and not sized by the node type (declare it in axis_sizes)"
                )
        return problems

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


def bind_nodes(spec: NodeSpec, node: AbstractNode, context: BindingContext) -> BoundNodes:
    """Resolve ``spec`` against the model (``context``: sizes, prompt length, plan location for errors, SAEs)."""
    special = node.bind(spec, context)
    if special is not None:
        return special
    return bind_generic(spec, node, context)


def bind_generic(spec: NodeSpec, node: AbstractNode, context: BindingContext) -> BoundNodes:
    """The generic binding of ``bind_nodes`` (layers from ``node.layer_range``, one axis per index axis), for
    node types whose ``bind`` adjusts it."""
    layer_range = node.layer_range(context.info)
    layers = resolve_axis(spec.layers, "layer", len(layer_range), context.at("layers"), allow_negative=False)
    axes = []
    for dim in node.index_dims:
        if dim not in node.selection_fields:
            raise PluginError(f"node plugin {node.kind!r}: its index axis {dim!r} has no plan field in selection_fields")
        plan_field = node.selection_fields[dim]
        size = node.dim_size(dim, context)
        axes.append(resolve_axis(spec.selection_of(plan_field), dim, size, context.at(plan_field), allow_negative=dim == "pos"))
    bound = BoundNodes(spec, node, layers, tuple(axes))
    if bound.n_nodes == 0:
        raise PlanError(f"{context.where}: the selection matches no node")
    return bound
