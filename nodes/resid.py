"""``resid``: the residual stream at a layer boundary, per position.

Boundary ``l`` is the input of block ``l``; boundary ``n_layers`` is the output of the last block
(before the final normalization).
"""

from typing import Literal

from atpframework.model.backend import ModelInfo
from atpframework.model.node import AbstractNode, NodeSpec, Selection


class ResidSpec(NodeSpec):
    """Select residual-stream positions at layer boundaries."""

    kind: Literal["resid"]
    positions: Selection = "each"


class Resid(AbstractNode):
    kind = "resid"
    spec_type = ResidSpec
    site = "resid"
    index_dims = ("pos",)

    def layer_range(self, info: ModelInfo) -> range:
        return range(info.n_layers + 1)
