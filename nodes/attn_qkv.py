"""``attn_q``, ``attn_k``, ``attn_v``: per-head queries, keys and values, per position (the paper's attention nodes).

Keys and values are indexed by key/value head: with grouped-query attention a key node is one of
``n_kv_heads`` heads and affects every query head of its group. Queries and keys are read after the
rotary embedding where the model has one (patching before or after rotation is the same intervention,
since clean and noise share positions).
"""

from typing import Literal

from atpframework.model.node import AbstractNode, NodeSpec, Selection


class AttnQuerySpec(NodeSpec):
    """Select query vectors."""

    kind: Literal["attn_q"]
    heads: Selection = "each"
    positions: Selection = "each"


class AttnKeySpec(NodeSpec):
    """Select key vectors (heads are key/value heads)."""

    kind: Literal["attn_k"]
    heads: Selection = "each"
    positions: Selection = "each"


class AttnValueSpec(NodeSpec):
    """Select value vectors (heads are key/value heads)."""

    kind: Literal["attn_v"]
    heads: Selection = "each"
    positions: Selection = "each"


class AttnQuery(AbstractNode):
    kind = "attn_q"
    spec_type = AttnQuerySpec
    site = "attn_q"
    index_dims = ("pos", "head")


class _KeyValueNode(AbstractNode):
    axis_sizes = {"head": lambda context: context.info.n_kv_heads}


class AttnKey(_KeyValueNode):
    kind = "attn_k"
    spec_type = AttnKeySpec
    site = "attn_k"
    index_dims = ("pos", "head")


class AttnValue(_KeyValueNode):
    kind = "attn_v"
    spec_type = AttnValueSpec
    site = "attn_v"
    index_dims = ("pos", "head")
