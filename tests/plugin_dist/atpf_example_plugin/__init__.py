"""An example third-party node type: ``mlp_neuron_sum``, every MLP neuron at a position as one node.

It reads the built-in ``mlp_post`` site (``batch pos neuron``) but treats the neuron axis as a
feature axis: one node per (layer, position), whose first-order effect sums ``delta * grad`` over
the neurons. Patching it is the same intervention as the built-in ``mlp_neuron`` node with
``neurons: "all"``, which the tests use as an independent check.
"""

from typing import Literal

from torch import Tensor

from atpframework import AbstractNode, NodeSpec, Selection


class MlpNeuronSumSpec(NodeSpec):
    """Select (layer, position) MLP blocks, all neurons together."""

    kind: Literal["mlp_neuron_sum"]
    positions: Selection = "each"


class MlpNeuronSum(AbstractNode):
    kind = "mlp_neuron_sum"
    spec_type = MlpNeuronSumSpec
    site = "mlp_post"
    index_dims = ("pos",)
    n_feature_dims = 1

    def elementwise_effect(self, delta: Tensor, grad: Tensor) -> Tensor:
        # batch pos neuron -> batch pos
        return (delta * grad).sum(dim=-1)
