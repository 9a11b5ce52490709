"""Activation sites: the model-independent names of the tensors nodes read and patch.

A backend maps each ``Site`` to its own hook and hands the engine the activation in the
canonical layout below (after the leading ``batch`` axis). Backend-specific hook names never
leave ``backends/``.

| site       | canonical layout                 | layers                                   |
|------------|----------------------------------|------------------------------------------|
| ``resid``  | ``batch pos d_model``            | boundaries 0..n_layers (0: block 0 input, n_layers: last block output) |
| ``attn_z`` | ``batch pos head d_head``        | blocks 0..n_layers-1 (per-head mixed values, input of the output projection) |
| ``attn_q`` | ``batch pos head d_head``        | blocks; query heads, after rotary embedding if any |
| ``attn_k`` | ``batch pos head d_head``        | blocks; key/value heads (``n_kv_heads`` of them when grouped), after rotary |
| ``attn_v`` | ``batch pos head d_head``        | blocks; key/value heads |
| ``mlp_post`` | ``batch pos neuron``           | blocks; input of the MLP down projection (gated MLPs: act(gate) * up) |
"""

from dataclasses import dataclass
from typing import Literal

SiteName = Literal["resid", "attn_z", "attn_q", "attn_k", "attn_v", "mlp_post"]
"""Names of every built-in activation site."""

SITE_NAMES: tuple[str, ...] = SiteName.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True, order=True)
class Site:
    """One activation tensor of the model: a site name at one layer (block or residual boundary)."""

    name: str
    layer: int

    def __str__(self) -> str:
        return f"{self.name}[layer={self.layer}]"
