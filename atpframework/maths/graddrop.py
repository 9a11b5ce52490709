"""GradDrop terms: which residual-stream write each term stop-gradients and how each site relates to it.

A term drops one write to the residual stream: a whole block's (``granularity="block"``, the
default: attention + MLP, parallel blocks included) or one sublayer's (``"sublayer"``). Gradients
of sites *above* the write are the plain ones, sites *inside* it get zero, and sites *reached* by it
(upstream of the write's input) get the gradient of a backward pass restarted at ``roots`` with the
plain gradient of ``cotangent`` -- the gradient that flows past the write along the skip connection.

| term                 | roots                  | cotangent       | inside (at the term's layer)   | also reached at that layer |
|----------------------|------------------------|-----------------|--------------------------------|----------------------------|
| block                | resid ℓ                | resid ℓ+1       | every attention and MLP site   | --                         |
| attention, sequential| resid ℓ                | resid_mid ℓ     | attention sites                | --                         |
| MLP, sequential      | resid_mid ℓ            | resid ℓ+1       | MLP sites                      | attention sites, resid_mid |
| attention, parallel  | resid ℓ, mlp_out ℓ     | resid ℓ+1       | attention sites                | MLP sites                  |
| MLP, parallel        | resid ℓ, attn_out ℓ    | resid ℓ+1       | MLP sites                      | attention sites            |

Every site at a lower layer, and the residual boundary ``ℓ`` itself, is reached; later layers are above.
"""

from dataclasses import dataclass
from typing import Literal

from atpframework.model.backend import ModelInfo
from atpframework.model.sites import Site

Granularity = Literal["block", "sublayer"]
Relation = Literal["above", "inside", "reached"]

ATTENTION_SITES = frozenset({"attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "attn_result", "attn_q_input", "attn_k_input", "attn_v_input"})
MLP_SITES = frozenset({"mlp_post", "mlp_out", "mlp_in", "mlp_input"})


@dataclass(frozen=True)
class DropTerm:
    """One stop-gradiented write and how to restart the backward pass past it."""

    label: str
    layer: int
    roots: tuple[Site, ...]
    cotangent: Site
    inside: frozenset[str]
    """Site names at ``layer`` inside the dropped write."""
    reached_at_layer: frozenset[str]
    """Site names at ``layer`` (besides ``resid``) that the restarted backward pass reaches."""

    def relation(self, site: Site) -> Relation:
        if site.name == "resid":
            return "reached" if site.layer <= self.layer else "above"
        if site.layer < self.layer:
            return "reached"
        if site.layer > self.layer:
            return "above"
        if site.name in self.inside:
            return "inside"
        return "reached" if site.name in self.reached_at_layer else "above"


def drop_terms(info: ModelInfo, granularity: Granularity) -> list[DropTerm]:
    """The model's GradDrop terms, bottom to top."""
    has_mlp = info.d_mlp is not None
    terms: list[DropTerm] = []
    for layer in range(info.n_layers):
        resid, after = Site("resid", layer), Site("resid", layer + 1)
        if granularity == "block":
            terms.append(DropTerm(f"block {layer}", layer, (resid,), after, ATTENTION_SITES | MLP_SITES | {"resid_mid"}, frozenset()))
            continue
        if info.parallel_blocks:
            attn_roots = (resid, Site("mlp_out", layer)) if has_mlp else (resid,)
            terms.append(DropTerm(f"attention {layer}", layer, attn_roots, after, ATTENTION_SITES, MLP_SITES))
            if has_mlp:
                terms.append(
                    DropTerm(f"mlp {layer}", layer, (resid, Site("attn_out", layer)), after, MLP_SITES, ATTENTION_SITES)
                )
        elif has_mlp:
            mid = Site("resid_mid", layer)
            terms.append(DropTerm(f"attention {layer}", layer, (resid,), mid, ATTENTION_SITES, frozenset()))
            terms.append(DropTerm(f"mlp {layer}", layer, (mid,), after, MLP_SITES, ATTENTION_SITES | {"resid_mid"}))
        else:
            terms.append(DropTerm(f"attention {layer}", layer, (resid,), after, ATTENTION_SITES, frozenset()))
    return terms
