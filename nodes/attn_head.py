"""``attn_head``: an attention head's output (its mixed values ``z``, per position or summed).

Patching ``z`` of a head is the same intervention as patching the head's result ``z @ W_O`` in the
residual stream, and the AtP scores coincide (``dz . g_z = dz W_O . g_result``), so one site serves both.
"""

from typing import Literal

from atpframework.model.node import AbstractNode, NodeSpec, Selection


class AttnHeadSpec(NodeSpec):
    """Select attention heads."""

    kind: Literal["attn_head"]
    heads: Selection = "each"
    positions: Selection = "each"


class AttnHead(AbstractNode):
    kind = "attn_head"
    spec_type = AttnHeadSpec
    site = "attn_z"
    index_dims = ("pos", "head")
