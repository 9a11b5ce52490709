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
| ``resid_mid`` | ``batch pos d_model``           | blocks; residual stream between attention and MLP (sequential blocks only) |
| ``attn_out`` | ``batch pos d_model``            | blocks; the attention sublayer's write to the residual stream |
| ``mlp_out``  | ``batch pos d_model``            | blocks; the MLP sublayer's write to the residual stream |
| ``mlp_in``   | ``batch pos d_model``            | blocks; the MLP's input after its normalization (where transcoders read) |

``resid_mid``, ``attn_out`` and ``mlp_out`` are where GradDrop restarts its backward passes; SAEs
attach to any site (``sae.py``).
"""

from dataclasses import dataclass
from typing import Literal, get_args

SiteName = Literal["resid", "attn_z", "attn_q", "attn_k", "attn_v", "mlp_post", "resid_mid", "attn_out", "mlp_out", "mlp_in"]
"""Names of every built-in activation site."""

SITE_NAMES: tuple[str, ...] = get_args(SiteName)


@dataclass(frozen=True, order=True)
class Site:
    """One activation tensor of the model: a site name at one layer (block or residual boundary).

    ``view`` names a tensor derived from the site rather than the site itself, e.g.
    ``"sae_latents:res12"``: the latents of the SAE ``res12`` spliced in at this site (see ``sae.py``).
    Backends only ever see sites with an empty view.
    """

    name: str
    layer: int
    view: str = ""

    def __str__(self) -> str:
        return f"{self.name}[layer={self.layer}]" + (f"<{self.view}>" if self.view else "")
