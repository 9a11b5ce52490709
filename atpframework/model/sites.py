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
| ``attn_result`` | ``batch pos head d_model``    | blocks; each head's write to the residual stream (``z @ W_O`` per head, no bias): an edge writer |
| ``attn_q_input`` | ``batch pos head d_model``   | blocks; each query head's own copy of the residual stream it reads, before normalization: an edge reader |
| ``attn_k_input`` | ``batch pos head d_model``   | blocks; as ``attn_q_input``, per key/value head |
| ``attn_v_input`` | ``batch pos head d_model``   | blocks; as ``attn_q_input``, per key/value head |
| ``mlp_input`` | ``batch pos d_model``           | blocks; the MLP's own copy of the residual stream it reads, before normalization: an edge reader |

``resid_mid``, ``attn_out`` and ``mlp_out`` are where GradDrop restarts its backward passes; SAEs
attach to any site (``sae.py``).

The *reader input* sites (``attn_q_input``, ``attn_k_input``, ``attn_v_input``, ``mlp_input``) are copies of
the residual stream that flow into one reader only, so the gradient there is the reader's own
``dMetric/d input``; patching one changes that reader alone. Edges (``edges.py``) are scored and patched
there, against the writers ``resid[0]`` (embeddings), ``attn_result`` and ``mlp_out``.
"""

from dataclasses import dataclass
from typing import Literal, get_args

SiteName = Literal[
    "resid", "attn_z", "attn_q", "attn_k", "attn_v", "mlp_post", "resid_mid", "attn_out", "mlp_out", "mlp_in",
    "attn_result", "attn_q_input", "attn_k_input", "attn_v_input", "mlp_input",
]
"""Names of every built-in activation site."""

SITE_NAMES: tuple[str, ...] = get_args(SiteName)
READER_INPUT_SITES: frozenset[str] = frozenset({"attn_q_input", "attn_k_input", "attn_v_input", "mlp_input"})
"""Sites that are one reader's own copy of the residual stream (edges are patched there)."""
EDGE_SITES: frozenset[str] = READER_INPUT_SITES | {"attn_result"}
"""Sites only edges use; a backend may leave them out of ``supported_sites`` (plans with edges are then refused)."""


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
