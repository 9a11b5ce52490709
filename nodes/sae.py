"""``sae_latent`` and ``sae_error``: the latents and the reconstruction error of an SAE the plan splices in.

Both read views of the SAE's site (``atpframework.model.sae``), at the SAE's layer: the result's ``layer``
axis has one entry, that layer. Latents are scalars per position (``pos latent``); the error is the
vector ``x - decode(encode(x))`` per position. Patching a latent writes its noise-run value and
decodes, keeping the clean error; patching the error writes the noise-run error.

For realistic dictionaries (tens of thousands of latents, hundreds of positions) ``keep_top`` keeps
the largest latents of each pair and the result stores them as a sparse tensor.
"""

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from atpframework.errors import PlanError
from atpframework.model.node import (
    AbstractNode,
    AxisSelection,
    BindingContext,
    BoundNodes,
    NodeSpec,
    Selection,
    SparseOutput,
    resolve_axis,
)


class SaeLatentSpec(NodeSpec):
    """Select SAE latents."""

    kind: Literal["sae_latent"]
    sae: str
    """The ``name`` of one of the plan's ``saes``."""
    layers: Literal["each"] = "each"
    """Fixed: the SAE's layer."""
    positions: Selection = "each"
    latents: Selection = "each"
    keep_top: int | None = Field(None, ge=1)
    """Keep only the ``keep_top`` latents with the largest ``|score|`` per pair (per position, or over the
    whole selection: ``keep_top_per``) and store them sparsely; None keeps every latent (dense)."""
    keep_top_per: Literal["position", "selection"] = "position"

    def sparse_output(self) -> SparseOutput | None:
        return None if self.keep_top is None else SparseOutput(self.keep_top, self.keep_top_per)

    def sae_references(self) -> Mapping[str, str]:
        return {"sae": self.sae}


class SaeErrorSpec(NodeSpec):
    """Select an SAE's reconstruction error."""

    kind: Literal["sae_error"]
    sae: str
    layers: Literal["each"] = "each"
    positions: Selection = "each"

    def sae_references(self) -> Mapping[str, str]:
        return {"sae": self.sae}


def _bind(node: AbstractNode, spec: NodeSpec, context: BindingContext) -> BoundNodes:
    if not isinstance(spec, (SaeLatentSpec, SaeErrorSpec)):
        raise TypeError(f"node kind {node.kind!r} binds {SaeLatentSpec.__name__} or {SaeErrorSpec.__name__}, got {type(spec).__name__}")
    if spec.sae not in context.saes:
        raise PlanError(
            f"{context.at('sae')}: SAE {spec.sae!r} is not spliced into this model; "
            "compile the plan with atpframework.compile / run, which load its saes"
        )
    sae = context.saes[spec.sae]
    layer = sae.site.layer
    axes = [resolve_axis(spec.positions, "pos", context.seq_len, context.at("positions"), allow_negative=True)]
    if isinstance(spec, SaeLatentSpec):
        axes.append(resolve_axis(spec.latents, "latent", sae.d_sae, context.at("latents"), allow_negative=False))
    layers = AxisSelection("layer", 1, ((layer,),), [layer])
    view = sae.latents_view if isinstance(spec, SaeLatentSpec) else sae.error_view
    return BoundNodes(spec, node, layers, tuple(axes), site_name=sae.site.name, view=view)


class SaeLatent(AbstractNode):
    kind = "sae_latent"
    spec_type = SaeLatentSpec
    site = "sae_latents"
    index_dims = ("pos", "latent")
    n_feature_dims = 0

    def bind(self, spec: NodeSpec, context: BindingContext) -> BoundNodes:
        return _bind(self, spec, context)


class SaeError(AbstractNode):
    kind = "sae_error"
    spec_type = SaeErrorSpec
    site = "sae_error"
    index_dims = ("pos",)

    def bind(self, spec: NodeSpec, context: BindingContext) -> BoundNodes:
        return _bind(self, spec, context)
