"""``edge_q``, ``edge_k``, ``edge_v``, ``edge_mlp``, ``edge_logits``: edges from every upstream writer into one
kind of reader (``atpframework.model.edges``): query heads, key/value heads, MLPs, or the unembedding.

A plan selects the reader layers (and heads), the writers (by index: 0 the embeddings, then per block
its heads and its MLP) and the positions, per position or summed. Five selections cover every edge
of a model (``atpframework.edge_selections``).
"""

from dataclasses import replace
from typing import Literal

from atpframework.model.backend import ModelInfo
from atpframework.model.edges import EdgeNode, EdgeSpecBase
from atpframework.model.node import AxisSelection, BindingContext, BoundNodes, NodeSpec, Selection, bind_generic


class EdgeQuerySpec(EdgeSpecBase):
    """Edges into query heads."""

    kind: Literal["edge_q"]
    heads: Selection = "each"


class EdgeKeySpec(EdgeSpecBase):
    """Edges into key heads (key/value heads with grouped-query attention)."""

    kind: Literal["edge_k"]
    heads: Selection = "each"


class EdgeValueSpec(EdgeSpecBase):
    """Edges into value heads (key/value heads with grouped-query attention)."""

    kind: Literal["edge_v"]
    heads: Selection = "each"


class EdgeMlpSpec(EdgeSpecBase):
    """Edges into MLPs."""

    kind: Literal["edge_mlp"]


class EdgeLogitsSpec(EdgeSpecBase):
    """Edges into the unembedding (the final residual stream); it has one layer, ``n_layers``."""

    kind: Literal["edge_logits"]
    layers: Literal["each"] = "each"


class EdgeQuery(EdgeNode):
    kind = "edge_q"
    spec_type = EdgeQuerySpec
    site = "attn_q_input"
    reader = "q"
    index_dims = ("pos", "head", "writer")


class EdgeKey(EdgeNode):
    kind = "edge_k"
    spec_type = EdgeKeySpec
    site = "attn_k_input"
    reader = "k"
    index_dims = ("pos", "head", "writer")
    axis_sizes = {**EdgeNode.axis_sizes, "head": lambda context: context.info.n_kv_heads}


class EdgeValue(EdgeNode):
    kind = "edge_v"
    spec_type = EdgeValueSpec
    site = "attn_v_input"
    reader = "v"
    index_dims = ("pos", "head", "writer")
    axis_sizes = {**EdgeNode.axis_sizes, "head": lambda context: context.info.n_kv_heads}


class EdgeMlp(EdgeNode):
    kind = "edge_mlp"
    spec_type = EdgeMlpSpec
    site = "mlp_input"
    reader = "mlp"
    index_dims = ("pos", "writer")


class EdgeLogits(EdgeNode):
    kind = "edge_logits"
    spec_type = EdgeLogitsSpec
    site = "resid"
    reader = "logits"
    index_dims = ("pos", "writer")

    def layer_range(self, info: ModelInfo) -> range:
        return range(info.n_layers, info.n_layers + 1)

    def bind(self, spec: NodeSpec, context: BindingContext) -> BoundNodes:
        bound = bind_generic(spec, self, context)
        top = context.info.n_layers
        return replace(bound, layers=AxisSelection("layer", 1, ((top,),), [top]))
