"""The built-in axis names used in shapes, einops patterns and result files.

Node plugins may add index axes of their own (``AbstractNode.selection_fields`` and ``axis_sizes``);
result files store axis names as strings, so those travel like the built-in ones.

Glossary:
    pair:    a (clean, noise) prompt pair; the leading axis of every per-pair result tensor.
    batch:   rows of one forward pass (pairs, or pairs x patched nodes).
    pos:     token position (query position for attention tensors).
    key_pos: key position of an attention pattern.
    layer:   transformer block index, or residual boundary index (0 = before block 0).
    head:    attention head (query head; key/value head for grouped ``attn_k``/``attn_v``).
    d_head:  per-head feature axis.
    d_model: residual stream feature axis.
    neuron:  MLP hidden unit (input to the down projection).
    latent:  SAE (or transcoder) latent.
    vocab:   output logit axis.
"""

from typing import Literal, get_args

DimName = Literal["pair", "batch", "pos", "key_pos", "layer", "head", "d_head", "d_model", "neuron", "latent", "vocab"]
"""Every axis name atpframework itself writes into shapes and result metadata (node plugins may add more)."""

DIM_NAMES: tuple[str, ...] = get_args(DimName)
