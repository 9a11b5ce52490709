"""TransformerLens hook names as node kinds: ``{"kind": "blocks.3.attn.hook_z"}`` is
``{"kind": "attn_head", "layers": [3]}``, and ``{"kind": "hook_z"}`` (no block) is every layer.

A hook name is accepted only where a node kind patches that very activation, or one that is the same
intervention with the same first-order scores (``HOOK_ALIASES``: a head's ``hook_result`` is its ``z``
times the fixed ``W_O``; ``hook_q``/``hook_k`` differ from the rotary ``hook_rot_q``/``hook_rot_k`` by a
rotation fixed per position, which clean and noise share; block ``L``'s ``hook_resid_post`` is the
input of block ``L + 1``). Other hook names (patterns, pre-activations, norms, embeddings...) are refused
with the reason and the table (``UNSUPPORTED``).

Aliases are resolved when a plan is parsed: ``plan.parse_plan`` asks the plan's backend
(``AbstractBackend.resolve_node_kinds``), and both built-in backends answer with ``resolve_hook_names`` (sae_lens
records TransformerLens hook names whatever library runs the model). The plan object, its canonical JSON and every
result hold the node kind and its layers, never the hook name. Library hook names live in ``backends/`` only.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from atpframework import plugins
from atpframework.errors import PlanError, shorten


@dataclass(frozen=True)
class HookAlias:
    """One TransformerLens hook (its name inside block ``L``) that a node kind patches."""

    hook: str
    """The name after ``blocks.L.``, e.g. ``attn.hook_z``."""
    kind: str
    """The node kind that patches it."""
    layer_offset: int
    """The node layer of block ``L``'s hook is ``L + layer_offset`` (``resid`` counts boundaries)."""
    note: str
    """Why the two are the same (docs and the error table)."""


HOOK_ALIASES: tuple[HookAlias, ...] = (
    HookAlias("attn.hook_z", "attn_head", 0, "the heads' mixed values, what attn_head reads"),
    HookAlias("attn.hook_result", "attn_head", 0, "a head's result is its z times W_O: the same intervention and scores"),
    HookAlias(
        "attn.hook_q", "attn_q", 0,
        "queries; in rotary models attn_q reads hook_rot_q, the same intervention with the same first-order scores, "
        "unless the model normalizes or clamps queries between the two (TransformerLens use_qk_norm, OLMo): there "
        "attn_q is the query after that step",
    ),
    HookAlias("attn.hook_rot_q", "attn_q", 0, "queries after the rotary embedding, what attn_q reads in rotary models"),
    HookAlias(
        "attn.hook_k", "attn_k", 0,
        "keys (key/value heads); in rotary models attn_k reads hook_rot_k, the same intervention with the same "
        "first-order scores, unless the model normalizes or clamps keys between the two (as for hook_q)",
    ),
    HookAlias("attn.hook_rot_k", "attn_k", 0, "keys after the rotary embedding, what attn_k reads in rotary models"),
    HookAlias("attn.hook_v", "attn_v", 0, "values (key/value heads), what attn_v reads"),
    HookAlias("mlp.hook_post", "mlp_neuron", 0, "neurons after the nonlinearity (gated: act(gate) * up), what mlp_neuron reads"),
    HookAlias("hook_resid_pre", "resid", 0, "the residual stream entering block L: resid boundary L"),
    HookAlias("hook_resid_post", "resid", 1, "the residual stream leaving block L, which enters block L+1: resid boundary L+1"),
)
"""Every TransformerLens hook name a node kind stands for."""

_NO_KIND = "no node kind patches it"
UNSUPPORTED: Mapping[str, str] = {
    "attn.hook_pattern": f"an attention pattern; {_NO_KIND}: patch the queries and keys that form it (attn.hook_q, attn.hook_k), "
    "which atp_qkfix and atp_star score with the pattern recomputed exactly",
    "attn.hook_attn_scores": f"pre-softmax attention scores; {_NO_KIND}: patch the queries and keys that form them (attn.hook_q, attn.hook_k)",
    "mlp.hook_pre": "an MLP pre-activation; mlp_neuron reads neurons after the nonlinearity (mlp.hook_post), and first-order "
    "scores differ between the two",
    "mlp.hook_pre_linear": "the linear half of a gated MLP; mlp_neuron reads the product that enters the down projection (mlp.hook_post)",
    "mlp.hook_mid": "an MLP activation before its normalization (SoLU); mlp_neuron reads mlp.hook_post",
    "hook_attn_out": f"the attention sublayer's whole write; {_NO_KIND} as one activation (attn.hook_z selects its heads)",
    "hook_mlp_out": f"the MLP sublayer's whole write; {_NO_KIND} as one activation (mlp.hook_post selects its neurons)",
    "hook_resid_mid": f"the residual stream between attention and MLP; {_NO_KIND} (resid is read at block boundaries: "
    "hook_resid_pre, hook_resid_post)",
    "hook_attn_in": f"the attention input split per head; {_NO_KIND}",
    "hook_q_input": f"the query input split per head; {_NO_KIND}",
    "hook_k_input": f"the key input split per head; {_NO_KIND}",
    "hook_v_input": f"the value input split per head; {_NO_KIND}",
    "hook_mlp_in": f"the MLP input; {_NO_KIND}",
    "ln1.hook_scale": f"a normalization's scale; {_NO_KIND}",
    "ln1.hook_normalized": f"a normalization's output; {_NO_KIND}",
    "ln2.hook_scale": f"a normalization's scale; {_NO_KIND}",
    "ln2.hook_normalized": f"a normalization's output; {_NO_KIND}",
}
"""Hook names inside a block that no node kind stands for, and why."""

UNSUPPORTED_OUTSIDE_BLOCKS: Mapping[str, str] = {
    "hook_embed": "a token embedding; resid boundary 0 (blocks.0.hook_resid_pre) is the embedding the blocks read",
    "hook_pos_embed": "a positional embedding; resid boundary 0 (blocks.0.hook_resid_pre) is the embedding the blocks read",
    "hook_tokens": "token ids, not an activation",
    "ln_final.hook_scale": f"the final normalization's scale; {_NO_KIND}",
    "ln_final.hook_normalized": f"the final normalization's output; {_NO_KIND} (resid boundary n_layers is its input)",
}
"""Hook names outside the blocks that no node kind stands for, and why."""

_SAE_HOOK = re.compile(r"(^|\.)hook_sae_\w+$")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_LOOKS_LIKE_A_HOOK = re.compile(r"(blocks\.\d+\.)?([A-Za-z0-9_]+\.)*hook_[A-Za-z0-9_]+|blocks\.\d+(\..*)?")


def alias_table() -> str:
    """The accepted hook names and their node kinds, one line (for error messages)."""
    by_kind: dict[str, list[str]] = {}
    for alias in HOOK_ALIASES:
        boundary = f" (boundary L{f'+{alias.layer_offset}' if alias.layer_offset else ''})" if alias.kind == "resid" else ""
        by_kind.setdefault(alias.kind, []).append(alias.hook + boundary)
    return "; ".join(f"{', '.join(hooks)} -> {kind}" for kind, hooks in by_kind.items())


def is_hook_name(kind: Any) -> bool:
    """Whether a node ``kind`` is written as a TransformerLens hook name (``blocks.3.attn.hook_z``, ``hook_z``)."""
    return isinstance(kind, str) and _LOOKS_LIKE_A_HOOK.fullmatch(kind) is not None


def resolve_hook_names(nodes: Any) -> Any:
    """``nodes`` with every entry whose ``kind`` is a TransformerLens hook name rewritten to its node kind
    and layers (the input is not modified; ``nodes`` itself is returned when no entry uses one). A hook
    name no node kind stands for, or ``layers`` that contradict the hook name, is a ``PlanError`` naming
    ``nodes[i].kind`` or ``nodes[i].layers``, why, and the accepted names."""
    if not isinstance(nodes, list) or not any(isinstance(n, dict) and is_hook_name(n.get("kind")) for n in nodes):
        return nodes
    installed = set(plugins.available("nodes"))  # a node plugin's own name is never read as a hook name
    return [
        _resolve(node, f"nodes[{i}]") if isinstance(node, dict) and is_hook_name(node.get("kind")) and node["kind"] not in installed
        else node
        for i, node in enumerate(nodes)
    ]


def _resolve(node: dict[str, Any], where: str) -> dict[str, Any]:
    name: str = node["kind"]
    match = _BLOCK.fullmatch(name)
    block, hook = (int(match.group(1)), match.group(2)) if match else (None, name)
    alias = _alias_of(hook)
    if alias is None:
        raise PlanError(f"{where}.kind: {shorten(name)} {_why_not(hook, in_block=block is not None)}; {_accepted()}")
    resolved = {key: value for key, value in node.items() if key != "kind"}
    resolved["kind"] = alias.kind
    given = node.get("layers")
    if block is not None:
        if "layers" in node and given != [block]:
            raise PlanError(
                f"{where}.layers: {shorten(given)} contradicts {where}.kind {shorten(name)}, which names block {block}; "
                f"leave layers out (or give [{block}]), or write the hook name without its block ({alias.hook!r}) "
                "to select blocks with layers"
            )
        resolved["layers"] = [block + alias.layer_offset]
    elif alias.kind == "resid":
        resolved["layers"] = _resid_layers(given, alias, where, name)
    return resolved


def _alias_of(hook: str) -> HookAlias | None:
    """The alias of a hook name inside a block, written in full (``attn.hook_z``) or by its last part (``hook_z``)."""
    for alias in HOOK_ALIASES:
        if hook in (alias.hook, alias.hook.rpartition(".")[2]):
            return alias
    return None


def _resid_layers(given: Any, alias: HookAlias, where: str, name: str) -> list[int]:
    """Boundaries of a residual hook name without a block: ``layers`` must list blocks, shifted by the offset.

    ``"each"`` would not be exact: ``resid`` boundaries run over ``0 .. n_layers``, one more than either hook has."""
    if not (isinstance(given, list) and given and all(isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in given)):
        raise PlanError(
            f"{where}.layers: {shorten(name)} without a block number needs layers as a list of blocks (got "
            f"{shorten(given) if given is not None else 'none'}); {alias.note}. For every boundary 0 .. n_layers (each "
            "block's hook_resid_pre and the last block's hook_resid_post) use kind 'resid' with layers 'each'"
        )
    return [layer + alias.layer_offset for layer in given]


def _why_not(hook: str, in_block: bool) -> str:
    """Why a hook name has no node kind."""
    if _SAE_HOOK.search(hook):
        return ("is an SAE's hook (sae_lens HookedSAETransformer); select SAE latents with kind 'sae_latent' and the "
                "SAE's name from the plan's saes (docs/sae.md)")
    for table in ((UNSUPPORTED,) if in_block else (UNSUPPORTED, UNSUPPORTED_OUTSIDE_BLOCKS)):
        for known, reason in table.items():
            if hook in (known, known.rpartition(".")[2]):
                return f"is {reason}"
    return "is not a TransformerLens hook name that a node kind patches"


def _accepted() -> str:
    return (f"TransformerLens hook names accepted as kinds (blocks.L.<name> for block L, or <name> alone for every block): "
            f"{alias_table()}")
