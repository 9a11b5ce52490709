"""The TransformerLens backend: ``HookedTransformer`` (and sae_lens's ``HookedSAETransformer``) and
``TransformerBridge`` models of TransformerLens 3.9.

Sites map to TransformerLens hook points (``blocks.{l}.attn.hook_z`` ...). Hooks are PyTorch forward
hooks on those ``HookPoint`` modules, owned by one ``forward`` call and removed in ``finally``, so
hooks the user added through TransformerLens survive. Models loaded from a Hugging Face directory
get their TransformerLens config from the local ``config.json`` (never the hub) and keep their
weights unprocessed (no LayerNorm folding or centering), so activations equal the Hugging Face
model's.
"""

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import einsum, rearrange
from torch import Tensor

from atpframework.errors import BackendError, PlanError
from atpframework.model.backend import (
    AbstractBackend,
    ModelInfo,
    SiteHook,
    apply_site_hooks,
    resolve_options,
    start_hooks,
)
from atpframework.model.bundled import BUNDLED_PREFIX, bundled_model_dir
from atpframework.model.sites import EDGE_SITES, SITE_NAMES, Site

from .tl_hook_names import resolve_hook_names
from .tokenizers import decode_each, tokenize_text, tokenizer_adds_bos, usable_tokenizer

_OPTIONS = {"model_class": ("hooked_transformer", "bridge")}
"""Option -> allowed values, the first the default."""
_HEAD_SITES = {"attn_z", "attn_q", "attn_k", "attn_v"}
_EDGE_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")
"""TransformerLens config switches that make the edge sites exist; on only for passes hooking an edge site
(they cost memory), and then all of them, so every pass of a plan with edges computes the same numbers."""
_BRIDGE_QK_FIX_ATTENTION = {"GPT2Attention", "LlamaAttention"}
"""Hugging Face attention classes whose pattern the bridge path recomputes (tested against the bridge's own)."""
_RECORDED_HOOK_SITES = [
    (r"blocks\.(\d+)\.hook_resid_pre", "resid", 0),
    (r"blocks\.(\d+)\.hook_resid_post", "resid", 1),
    (r"blocks\.(\d+)\.hook_resid_mid", "resid_mid", 0),
    (r"blocks\.(\d+)\.hook_attn_out", "attn_out", 0),
    (r"blocks\.(\d+)\.hook_mlp_out", "mlp_out", 0),
    (r"blocks\.(\d+)\.attn\.hook_z", "attn_z", 0),
    (r"blocks\.(\d+)\.mlp\.hook_post", "mlp_post", 0),
    (r"blocks\.(\d+)\.ln2\.hook_normalized", "mlp_in", 0),
    (r"blocks\.(\d+)\.hook_mlp_in", "mlp_in", 0),
]
"""TransformerLens hook names sae_lens records where an SAE was trained: pattern, site, layer offset
(``hook_resid_post`` of block ``l`` is the residual boundary ``l + 1``)."""


def site_of_tl_hook_name(hook_name: str) -> Site | None:
    """The site of a TransformerLens hook name (``blocks.5.hook_resid_pre`` -> ``resid[layer=5]``), or None.

    sae_lens records these names whatever library runs the model, so other backends reuse this."""
    for pattern, name, offset in _RECORDED_HOOK_SITES:
        match = re.fullmatch(pattern, hook_name)
        if match:
            return Site(name, int(match.group(1)) + offset)
    return None


def _model_classes() -> tuple[Any, ...]:
    """The model classes this backend serves: ``HookedTransformer``, and ``TransformerBridge`` where TransformerLens has it."""
    from transformer_lens import HookedTransformer

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TL without the bridge
        return (HookedTransformer,)
    return (HookedTransformer, TransformerBridge)


class TransformerLensBackend(AbstractBackend):
    """Runs plans on TransformerLens models."""

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any = None, source: str = "in_memory") -> None:
        from transformer_lens import HookedTransformer

        if not isinstance(model, _model_classes()):
            raise BackendError(
                f"the transformer_lens backend serves HookedTransformer or TransformerBridge models, got {type(model).__name__}"
            )
        if model.training:
            raise BackendError("the model is in training mode (dropout would make patching noisy); call model.eval() first")
        self.model = model
        self.is_bridge = not isinstance(model, HookedTransformer)
        self.tokenizer = usable_tokenizer(tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
        cfg = model.cfg
        rotary = getattr(cfg, "positional_embedding_type", "standard") == "rotary"
        self._qk_hook = "hook_rot_{}" if rotary else "hook_{}"
        # the bridge's rotary hooks use the Hugging Face layout, heads before positions
        self._heads_first = {"attn_q", "attn_k"} if rotary and self.is_bridge else set()
        ungrouped = bool(getattr(cfg, "ungroup_grouped_query_attention", False))
        param = next(model.parameters())
        parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.supported_sites = frozenset(SITE_NAMES) - ({"resid_mid"} if parallel else set()) - self._edge_sites_missing(cfg)
        self.info = ModelInfo(
            source=source,
            architecture=str(getattr(cfg, "original_architecture", None) or type(model).__name__),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=(None if ungrouped else getattr(cfg, "n_key_value_heads", None)) or cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=None if getattr(cfg, "attn_only", False) else cfg.d_mlp,
            d_vocab=cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab,
            dtype=str(param.dtype).removeprefix("torch."),
            device=str(param.device),
            positional_embedding=str(getattr(cfg, "positional_embedding_type", "standard")),
            normalization=str(getattr(cfg, "normalization_type", None) or "none"),
            parallel_blocks=parallel,
            n_ctx=getattr(cfg, "n_ctx", None),
        )

    def _edge_sites_missing(self, cfg: Any) -> frozenset[str]:
        """Edge sites this model cannot serve: all on a bridge and where a head's result is not its residual
        write (normalization after the sublayer, post-norm blocks); ``mlp_input`` without MLPs."""
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

        if self.is_bridge or getattr(cfg, "use_normalization_before_and_after", False) or getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES:
            return EDGE_SITES
        return frozenset({"mlp_input"}) if getattr(cfg, "attn_only", False) else frozenset()

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_model(cls, model: Any, *, tokenizer: Any = None) -> "TransformerLensBackend":
        return cls(model, tokenizer=tokenizer)

    @classmethod
    def handles(cls, model: Any) -> bool:
        """``HookedTransformer`` (sae_lens's ``HookedSAETransformer`` included) and ``TransformerBridge`` objects."""
        return "transformer_lens" in sys.modules and isinstance(model, _model_classes())

    @classmethod
    def load(cls, source: str, *, dtype: str, device: str, options: Mapping[str, Any]) -> "TransformerLensBackend":
        model_class = resolve_options(cls.name, options, _OPTIONS)["model_class"]
        if source == "in_memory":
            raise PlanError("model.source: 'in_memory' needs the model object, passed through the Python API (run(plan, model=...))")
        torch_dtype = getattr(torch, dtype)
        if source.startswith(BUNDLED_PREFIX):
            hf_dir = bundled_model_dir(source)
            return cls._from_hf_dir(hf_dir, source, torch_dtype, device, model_class, prepend_bos=False, cache=True)
        if Path(source).is_dir():
            return cls._from_hf_dir(Path(source), source, torch_dtype, device, model_class, prepend_bos=None)
        return cls._from_hub(source, torch_dtype, device, model_class)

    @classmethod
    def _from_hub(cls, name: str, dtype: torch.dtype, device: str, model_class: str) -> "TransformerLensBackend":
        model: Any
        try:
            if model_class == "bridge":
                from transformer_lens.model_bridge import TransformerBridge

                model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
            else:
                from transformer_lens import HookedTransformer

                model = HookedTransformer.from_pretrained(
                    name, device=device, dtype=dtype, fold_ln=False, center_writing_weights=False,
                    center_unembed=False, fold_value_biases=False,
                )
        except Exception as err:
            raise BackendError(
                f"model.source: could not load {name!r} from the model hub ({type(err).__name__}: {err}). "
                "It is neither a local directory nor a bundled model (bundled: smollm2-135m-instruct)."
            ) from err
        return cls(model.eval(), source=name)

    @classmethod
    def _from_hf_dir(
        cls, path: Path, source: str, dtype: torch.dtype, device: str, model_class: str, prepend_bos: bool | None,
        cache: bool = False,
    ) -> "TransformerLensBackend":
        """``cache``: the directory is atpframework's own (a bundled model): keep the converted ``HookedTransformer``
        weights in it and load them from there next time (``tl_cache``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import tl_cache

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:  # a weights-only directory: token-id prompts still work
            tokenizer = None
        if prepend_bos is None:
            prepend_bos = tokenizer_adds_bos(tokenizer)
        entry = tl_cache.entry_path(path, dtype, device, prepend_bos, tokenizer is not None) if cache and model_class != "bridge" else None
        cached = tl_cache.load(entry, tokenizer, dtype, device) if entry is not None else None
        if cached is not None:
            return cls(cached, tokenizer, source)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
        except Exception as err:
            raise BackendError(f"model.source: cannot load a Hugging Face model from {str(path)!r}: {err}") from err
        if model_class == "bridge":
            from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

            model = build_bridge_from_module(
                hf_model, hf_model.config.architectures[0], hf_config=hf_model.config, tokenizer=tokenizer
            )
            model.cfg.default_prepend_bos = prepend_bos
            return cls(model.to(device).eval(), tokenizer=tokenizer, source=source)
        hooked, converted = _hooked_transformer_from_hf(path, hf_model, tokenizer, dtype, device, prepend_bos)
        if entry is not None:
            tl_cache.store(entry, hooked, converted)
        return cls(hooked, tokenizer, source)

    # ----------------------------------------------------------------- running
    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        if prepend_bos is None:
            prepend_bos = bool(getattr(self.model.cfg, "default_prepend_bos", False))
        return tokenize_text(self.tokenizer, text, prepend_bos)

    @classmethod
    def resolve_node_kinds(cls, nodes: Any) -> Any:
        """TransformerLens hook names as node kinds (``tl_hook_names.py``)."""
        return resolve_hook_names(nodes)

    def token_strings(self, tokens: Sequence[int]) -> list[str] | None:
        return decode_each(self.tokenizer, tokens)

    def hook_name(self, site: Site) -> str:
        """The TransformerLens hook point serving ``site``."""
        n = self.info.n_layers
        if site.name == "resid":
            return f"blocks.{site.layer}.hook_resid_pre" if site.layer < n else f"blocks.{n - 1}.hook_resid_post"
        return {
            "attn_z": f"blocks.{site.layer}.attn.hook_z",
            "attn_q": f"blocks.{site.layer}.attn.{self._qk_hook.format('q')}",
            "attn_k": f"blocks.{site.layer}.attn.{self._qk_hook.format('k')}",
            "attn_v": f"blocks.{site.layer}.attn.hook_v",
            "mlp_post": f"blocks.{site.layer}.mlp.hook_post",
            "resid_mid": f"blocks.{site.layer}.hook_resid_mid",
            "attn_out": f"blocks.{site.layer}.hook_attn_out",
            "mlp_out": f"blocks.{site.layer}.hook_mlp_out",
            "mlp_in": f"blocks.{site.layer}.ln2.hook_normalized"
            if f"blocks.{site.layer}.ln2.hook_normalized" in self.model.hook_dict
            else f"blocks.{site.layer}.hook_resid_mid",
            "attn_result": f"blocks.{site.layer}.attn.hook_result",
            "attn_q_input": f"blocks.{site.layer}.hook_q_input",
            "attn_k_input": f"blocks.{site.layer}.hook_k_input",
            "attn_v_input": f"blocks.{site.layer}.hook_v_input",
            "mlp_input": f"blocks.{site.layer}.hook_mlp_in",
        }[site.name]

    def site_of_hook_name(self, hook_name: str) -> Site | None:
        return site_of_tl_hook_name(hook_name)

    def forward(self, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        return self._run(hooks, tokens.to(self.device))

    def forward_from(self, layer: int, resid: Tensor, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        if self.is_bridge:
            return super().forward_from(layer, resid, tokens, hooks)
        hooks = start_hooks(layer, resid, hooks)
        start = hooks.pop(Site("resid", layer))[0](resid)  # the boundary after its hooks ran
        assert start is not None, "start_hooks' boundary hook returns the residual stream"
        return self._run(hooks, start.to(self.device), start_at_layer=layer)  # HookedTransformer skips blocks < layer

    def _run(self, hooks: Mapping[Site, Sequence[SiteHook]], model_input: Tensor, **kwargs: Any) -> Tensor:
        handles = []
        cfg = self.model.cfg
        saved_flags = {flag: getattr(cfg, flag) for flag in _EDGE_FLAGS}
        edges = any(site.name in EDGE_SITES for site in hooks)
        try:
            if edges:
                for flag in _EDGE_FLAGS:
                    setattr(cfg, flag, flag != "use_hook_mlp_in" or not cfg.attn_only)
            for site, fns in hooks.items():
                point = self.model.hook_dict[self.hook_name(site)]
                handles.append(point.register_forward_hook(self._wrap(site, list(fns))))
            return self.model(model_input, return_type="logits", **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for flag, value in saved_flags.items():
                setattr(cfg, flag, value)

    def _wrap(self, site: Site, fns: list[SiteHook]):
        d_head = self.info.d_head
        heads_first = site.name in self._heads_first

        def hook(module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
            flat = site.name in _HEAD_SITES and output.dim() == 3  # bridges may expose heads flattened
            if flat:
                act = rearrange(output, "batch pos (head d_head) -> batch pos head d_head", d_head=d_head)
            elif heads_first:
                act = rearrange(output, "batch head pos d_head -> batch pos head d_head")
            else:
                act = output
            act = apply_site_hooks(act, fns)
            if flat:
                return rearrange(act, "batch pos head d_head -> batch pos (head d_head)")
            if heads_first:
                return rearrange(act, "batch pos head d_head -> batch head pos d_head")
            return act

        return hook

    # ----------------------------------------------------------------- attention
    def attention_unsupported(self, layer: int) -> str | None:
        cfg = self.model.cfg
        if self.is_bridge:
            hf_attention = type(self.model.blocks[layer].attn.original_component).__name__
            if hf_attention not in _BRIDGE_QK_FIX_ATTENTION:
                return (
                    f"the TransformerBridge path recomputes attention for {sorted(_BRIDGE_QK_FIX_ATTENTION)}, "
                    f"not {hf_attention}; use model.options.model_class = 'hooked_transformer'"
                )
            return None
        reasons = {
            "log-n query scaling (applied after the attn_q site)": getattr(cfg, "use_logn_attn", False),
            "attention sinks": getattr(cfg, "use_attention_sinks", False),
            "relative position biases": cfg.positional_embedding_type == "relative_positional_bias",
            "query/key normalization or clipping after the attn_q/attn_k sites": cfg.positional_embedding_type != "rotary"
            and (getattr(cfg, "use_qk_norm", False) or getattr(cfg, "clip_qkv", None) is not None
                 or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")),
        }
        found = [reason for reason, present in reasons.items() if present]
        return f"attention recomputation does not support {', '.join(found)}" if found else None

    def attention_logits(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        reason = self.attention_unsupported(layer)
        if reason:
            raise BackendError(reason)
        attn = self.model.blocks[layer].attn
        n_query, n_key = q.shape[1], k.shape[1]
        if self.is_bridge:
            logits = self._bridge_attention_logits(layer, q, k)
            window = getattr(attn.original_component, "sliding_window", None)
            causal = True
        else:
            from transformer_lens.components.abstract_attention import AbstractAttention

            logits = attn.calculate_attention_scores(q, k)  # scale, soft-capping, grouped heads
            if self.model.cfg.positional_embedding_type == "alibi":
                alibi = AbstractAttention.create_alibi_bias(self.model.cfg.n_heads, n_key, logits.device)
                logits = logits + alibi[:, -n_query:, :n_key].to(logits.dtype)
            window = self.model.cfg.window_size if attn.attn_type == "local" else None
            causal = self.model.cfg.attention_dir == "causal"
        query_pos = torch.arange(n_query, device=logits.device)[:, None] + (n_key - n_query)
        key_pos = torch.arange(n_key, device=logits.device)[None, :]
        visible = key_pos <= query_pos if causal else torch.ones_like(key_pos <= query_pos)
        if window is not None:
            visible = visible & (key_pos > query_pos - window)
        return logits.masked_fill(~visible, float("-inf"))

    def reader_projection_unsupported(self, layer: int) -> str | None:
        if "attn_q_input" not in self.supported_sites:
            return "this model has no per-head input sites"
        cfg = self.model.cfg
        reasons = {
            "query/key normalization": getattr(cfg, "use_qk_norm", False),
            "query/key clipping": getattr(cfg, "clip_qkv", None) is not None,
            "shortformer positional embeddings": cfg.positional_embedding_type == "shortformer",
            "dynamic NTK rotary scaling": getattr(cfg, "use_dynamic_ntk_rope", False),
        }
        found = [reason for reason, present in reasons.items() if present]
        return f"recomputing queries and keys from their inputs does not support {', '.join(found)}" if found else None

    def reader_projection(self, layer: int, reader: str, x: Tensor) -> Tensor:
        from transformer_lens.utilities.attention import complex_attn_linear

        reason = self.reader_projection_unsupported(layer)
        if reason:
            raise BackendError(reason)
        block = self.model.blocks[layer]
        attn = block.attn
        grouped = hasattr(attn, "_W_K") and not getattr(self.model.cfg, "ungroup_grouped_query_attention", False)
        if reader == "q":
            weight, bias = attn.W_Q, attn.b_Q
        elif reader == "k":
            weight, bias = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
        else:
            raise ValueError(f"reader must be 'q' or 'k', got {reader!r}")
        out = complex_attn_linear(block.ln1(x), weight, bias)
        if self.model.cfg.positional_embedding_type == "rotary":
            out = attn.apply_rotary(out, 0, None)
        return out

    def _bridge_attention_logits(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        """Logits as the bridge's own attention reconstruction computes them (GPT-2, Llama)."""
        hf_attention: Any = self.model.blocks[layer].attn.original_component
        group = q.shape[2] // k.shape[2]
        keys = torch.repeat_interleave(k, group, dim=2)
        logits = einsum(q, keys, "batch query head d_head, batch key head d_head -> batch head query key")
        if type(hf_attention).__name__ == "GPT2Attention":
            scale = self.info.d_head**-0.5
            if getattr(hf_attention.config, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(layer + 1)
            return logits * scale
        logits = logits * hf_attention.scaling
        softcap = getattr(hf_attention, "attn_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


def _config_for_transformer_lens(config_path: Path) -> dict[str, Any]:
    """The HF config with fields TransformerLens 3.9 reads but transformers 5 no longer writes (GPT-2's ``n_ctx``)."""
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        config["n_ctx"] = config["n_positions"]
    return config


def _gemma2_config(hf_config: Any) -> dict[str, Any]:
    """TransformerLens config fields of a Gemma-2 model, read from its Hugging Face config (as TL's hub table has them)."""
    layer_types = getattr(hf_config, "layer_types", None) or ["sliding_attention", "full_attention"] * hf_config.num_hidden_layers
    return dict(
        model_name="local-model", original_architecture="Gemma2ForCausalLM", init_weights=False,
        d_model=hf_config.hidden_size, d_head=hf_config.head_dim, n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads, d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers, n_ctx=hf_config.max_position_embeddings, eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_activation, normalization_type="RMS",
        rotary_base=float(hf_config.rope_parameters.get("rope_theta", 10000.0)), rotary_dim=hf_config.head_dim,
        positional_embedding_type="rotary", use_attn_scale=True, attn_scale=float(hf_config.query_pre_attn_scalar) ** 0.5,
        window_size=hf_config.sliding_window, use_local_attn=True,
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in layer_types[: hf_config.num_hidden_layers]],
        attn_scores_soft_cap=hf_config.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=hf_config.final_logit_softcapping or -1.0,
        gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _hooked_transformer_from_hf(
    path: Path, hf_model: Any, tokenizer: Any, dtype: torch.dtype, device: str, prepend_bos: bool
) -> tuple[Any, set[str]]:
    """Build a HookedTransformer from a local HF directory with TransformerLens's converters, offline; also
    returns the names of the tensors the conversion set."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens guesses the architecture from substrings such as "llama" in the name before
        # reading config.json; a neutral symlink makes it read the local config.
        neutral = Path(tmp) / "local-model"
        neutral.mkdir()
        for item in path.resolve().iterdir():
            if item.name != "config.json":
                os.symlink(item, neutral / item.name)
        (neutral / "config.json").write_text(json.dumps(_config_for_transformer_lens(path / "config.json")))
        try:
            if hf_model.config.model_type == "gemma2":  # TL 3.9 knows Gemma-2 only by official hub names
                from transformer_lens import HookedTransformerConfig

                cfg = HookedTransformerConfig(
                    **_gemma2_config(hf_model.config), device=device, dtype=dtype, default_prepend_bos=prepend_bos
                )
            else:
                cfg = loading.get_pretrained_model_config(
                    str(neutral), device=device, dtype=dtype, default_prepend_bos=prepend_bos
                )
            if tokenizer is None:
                cfg.tokenizer_name = None  # otherwise TransformerLens tries to load one from the path
            model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
            state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model=hf_model)
        except Exception as err:
            raise BackendError(
                f"model.source: TransformerLens cannot convert the architecture in {str(path)!r} "
                f"({type(err).__name__}: {err}); try model.options.model_class = 'bridge'"
            ) from err
    converted = set(state)
    _load_unprocessed(model, state)
    return model.eval(), converted


def _load_unprocessed(model: Any, state: dict[str, Tensor]) -> None:
    """What ``model.load_and_process_state_dict(state)`` does with every processing flag off (fill the keys the
    converter left out, the processing pass, ``load_state_dict``), in one ``load_state_dict`` call instead of
    one per key: each call walks the whole module tree (574 keys x 940 modules, 2 s for SmolLM2-135M).
    The loaded values are the same."""
    from transformer_lens.weight_processing import ProcessWeights

    state = ProcessWeights.process_weights(
        model.fill_missing_keys(state), model.cfg,
        fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
    )
    model.load_state_dict(state, strict=False)
