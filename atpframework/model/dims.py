"""The closed vocabulary of axis names used in shapes, einops patterns and result files.

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

from typing import Literal

DimName = Literal["pair", "batch", "pos", "key_pos", "layer", "head", "d_head", "d_model", "neuron", "latent", "vocab"]
"""Every axis name atpframework writes into shapes and result metadata."""

DIM_NAMES: tuple[str, ...] = DimName.__args__  # type: ignore[attr-defined]
