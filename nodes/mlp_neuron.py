"""``mlp_neuron``: one MLP hidden unit after the nonlinearity (for gated MLPs, the input to the down projection)."""

from typing import Literal

from atpframework.model.node import AbstractNode, NodeSpec, Selection


class MlpNeuronSpec(NodeSpec):
    """Select MLP neurons."""

    kind: Literal["mlp_neuron"]
    neurons: Selection = "each"
    positions: Selection = "each"


class MlpNeuron(AbstractNode):
    kind = "mlp_neuron"
    spec_type = MlpNeuronSpec
    site = "mlp_post"
    index_dims = ("pos", "neuron")
    n_feature_dims = 0
