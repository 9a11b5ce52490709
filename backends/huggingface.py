"""The raw Hugging Face backend: ``transformers`` causal language models without TransformerLens.

This module owns the mapping from sites to plain PyTorch hooks on Hugging Face modules. Per-architecture
knowledge (module paths, which norm feeds the MLP, which modules write to the residual stream, head
size, scale, soft-capping, windows, parallel blocks) lives in small ``ArchitectureAdapter`` classes
registered by ``config.model_type`` under the ``atpframework.hf_architectures`` entry points: GPT-2,
Llama/Mistral/Qwen2, GPT-NeoX (Pythia) and Gemma-2 are built in.

How sites are served:
    * ``resid`` (boundary ``l < n_layers``): forward pre-hook on decoder layer ``l``'s hidden-states
      input; boundary ``n_layers``: pre-hook on the final norm.
    * ``mlp_post``: pre-hook on the MLP down projection; ``mlp_in``: forward hook on the norm feeding
      the MLP; ``attn_out`` / ``mlp_out``: forward hooks on the modules whose outputs the block adds
      to the residual stream (the attention module and the MLP, or Gemma-2's post-norms).
    * ``resid_mid`` (sequential blocks only): the block adds the attention write to its input itself,
      so the attention-write hook hands the hook ``block_input + attn_out`` and returns
      ``resid_mid - block_input``. The block's ``resid_mid`` then equals the hook's tensor up to one
      float rounding (exact gradients; values within an ulp of the residual stream).
    * ``attn_q``/``attn_k``/``attn_v``/``attn_z``: post-rotary queries and keys only exist inside the
      attention module, where it calls the attention function named by ``config._attn_implementation``
      (``AttentionInterface``). During one ``forward`` the model's configs name a wrapper registered
      under ``atpf_sites|<original>``, which runs the site hooks (layout ``batch pos head d_head``,
      keys and values with ``n_kv_heads`` heads), calls the original function (eager or sdpa), and
      runs the ``attn_z`` hooks on its output. The original names are restored in ``finally``.
    * Edge sites (``EDGE_SITES``; hooks installed only for the blocks and sites a pass hooks, so other
      passes run the model unchanged):
        - ``mlp_input``: forward pre-hook on the norm feeding the MLP; the hooks run on a clone of its
          input (the residual stream after attention, or the block input in parallel blocks) and the norm
          reads what they return. The skip connection keeps the original, so only the MLP sees a patch and
          the gradient there is the MLP's own.
        - ``attn_result``: forward hook on the attention output projection (``o_proj``, GPT-2's ``c_proj``,
          NeoX's ``dense``). It recomputes each head's result ``z_h @ W_O^h`` (no bias) from the
          projection's input and weight (``batch pos head d_model``), runs the hooks, and returns their
          sum over heads plus the bias in place of the projection's output.
        - ``attn_q_input`` / ``attn_k_input`` / ``attn_v_input``: a pre-hook on the attention input norm
          keeps the block input ``x``; a forward hook on each projection that computes queries, keys or
          values (``q_proj``/``k_proj``/``v_proj``, GPT-2's fused ``c_attn``, NeoX's fused, head-interleaved
          ``query_key_value``) builds one copy of ``x`` per head (``n_kv_heads`` copies for keys and
          values), runs the hooks on the copies, applies the norm to each copy (the norm's own ``forward``,
          not its hooks) and replaces that kind's output columns by each head's slice of the weight (and
          bias) applied to its own normalized copy. Replacing one head's copy therefore changes only that
          head's query (key, value).
      The recomputation matches the unhooked model to float rounding (logits within 1.3e-6 on the tiny test models).
      Projections must be exactly ``nn.Linear`` or ``Conv1D`` (quantized layers are not sliced); weights
      an accelerate hook offloaded are loaded for the recomputation through that hook. Adapters locate the
      modules (``attention_input_norm``, ``qkv_projections``, ``output_projection``) and say why a model
      cannot serve edges (``edges_unsupported``): Gemma-2 normalizes each sublayer's output, so a head's
      result is not its residual write and every edge site is left out (as in TransformerLens); an adapter
      that does not locate the modules leaves them out too. The backend's ``edges_unsupported`` holds the
      reason, and plans with edges are refused when they compile. ``reader_projection`` (the QK fix on
      edges) computes queries and keys from per-head inputs the same way, then applies the model's own
      rotary embedding (``rotary_embedding`` on the adapter) with its modeling file's ``apply_rotary_pos_emb``.

Multi-device models (accelerate ``device_map``) need nothing special here: each hook runs on the
device of its module, and input ids go to the input embedding's execution device.

Every hook is registered inside ``forward`` and removed in ``finally``; the user's model is not
otherwise modified. The only global change is the one-time registration of the wrapper names in
``AttentionInterface`` and ``AttentionMaskInterface``.
"""

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import einsum
from torch import Tensor, nn

from atpframework import plugins
from atpframework.errors import BackendError, PlanError, PluginError
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
from .transformer_lens import site_of_tl_hook_name

_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_DEVICE_MAPS = ("none", "auto", "balanced", "balanced_low_0", "sequential")
_OPTIONS = {"attn_implementation": _ATTN_IMPLEMENTATIONS, "device_map": _DEVICE_MAPS}
"""Option -> allowed values, the first the default."""
_HOOKED_PREFIX = "atpf_sites|"
_ATTENTION_SITES = frozenset({"attn_q", "attn_k", "attn_v", "attn_z"})
_HEAD_INPUT_SITES = {"q": "attn_q_input", "k": "attn_k_input", "v": "attn_v_input"}
"""Query/key/value -> the site holding each of its heads' own copy of the block input."""


# ----------------------------------------------------------------- architecture adapters
class ArchitectureAdapter:
    """Where one architecture family keeps the modules the sites hook, and how its attention scores keys.

    A subclass names the decoder layers, the final norm, and per layer the attention module, the
    norm whose output feeds the MLP, the MLP's down projection, and the two modules whose outputs
    are *written* to the residual stream (the attention module, or a norm after it as in Gemma-2;
    the MLP, or a norm after it). Everything else has defaults read from the config.
    """

    positional_embedding: ClassVar[str]
    normalization: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model
        """A ``transformers`` model: its submodules are found by attribute, per architecture."""
        self.config: Any = model.config

    # modules
    def layers(self) -> Sequence[Any]:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def attention(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output is the MLP's input (site ``mlp_in``)."""
        raise NotImplementedError

    def down_projection(self, layer: int) -> nn.Module:
        """The MLP's output projection; its input is site ``mlp_post``."""
        raise NotImplementedError

    def attention_write(self, layer: int) -> nn.Module:
        """The module whose output (first element when a tuple) the block adds to the residual stream: ``attn_out``."""
        return self.attention(layer)

    def mlp_write(self, layer: int) -> nn.Module:
        """The module whose output the block adds to the residual stream: ``mlp_out``."""
        raise NotImplementedError

    # shapes and attention
    def d_mlp(self) -> int:
        return int(self.config.intermediate_size)

    def d_head(self) -> int:
        return int(getattr(self.attention(0), "head_dim"))

    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)

    def parallel_blocks(self) -> bool:
        """Attention and MLP both read the block input and write in parallel (no ``resid_mid``)."""
        return False

    def attention_scaling(self, layer: int) -> float:
        return float(getattr(self.attention(layer), "scaling"))

    def softcap(self, layer: int) -> float | None:
        """Attention-logit soft-capping ``c·tanh(logit/c)``, or None."""
        return getattr(self.config, "attn_logit_softcapping", None)

    def sliding_window(self, layer: int) -> int | None:
        """Keys visible to a query: ``key > query - window``; None: the full causal prefix."""
        return None

    def unsupported(self, implementation: str) -> str | None:
        """Why the backend cannot serve this model faithfully under ``implementation``, or None."""
        return None

    # edges: each head's own input and each head's result (module docstring)
    def attention_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output the query/key/value projections read; its input is the block input."""
        raise NotImplementedError

    def qkv_projections(self, layer: int) -> Sequence[tuple[nn.Module, Mapping[str, Tensor]]]:
        """The modules that project the attention input norm's output to queries, keys and values, each with
        the output columns it computes for them: ``"q"``/``"k"``/``"v"`` -> ``head d_head`` column indices
        (query heads; key/value heads, ``n_kv_heads`` of them)."""
        raise NotImplementedError

    def output_projection(self, layer: int) -> nn.Module:
        """The attention's output projection: its input is the heads' mixed values (``head d_head`` flattened)."""
        raise NotImplementedError

    def rotary_embedding(self) -> nn.Module | None:
        """The module computing the rotary ``(cos, sin)`` from ``(states, position_ids)``; None without rotary
        embeddings (``positional_embedding != "rotary"``). The backend recomputes queries and keys with it
        (``reader_projection``) through the modeling module's ``apply_rotary_pos_emb``."""
        if self.positional_embedding == "rotary":
            raise NotImplementedError
        return None

    def edges_unsupported(self) -> str | None:
        """Why this model cannot serve the edge sites (``EDGE_SITES``), or None.

        Default: they are served when the adapter locates the attention input norm and the projections
        above, and the projections are ``nn.Linear`` or transformers' ``Conv1D`` (whose weights the backend
        slices per head). An architecture where a head's result is not its write to the residual stream
        (a norm after the sublayer) must say so here."""
        try:
            for layer in range(len(self.layers())):
                self.attention_input_norm(layer)
                modules = [self.output_projection(layer), *(module for module, _ in self.qkv_projections(layer))]
                for module in modules:
                    if type(module) not in _sliceable_projections():
                        return f"{type(module).__name__} projections (edges slice nn.Linear or Conv1D weights per head)"
        except NotImplementedError:
            return f"{type(self).__name__} does not locate the attention input norm and projections that edges need"
        return None


class GPT2Adapter(ArchitectureAdapter):
    """GPT-2: LayerNorm, learned positions, ``Conv1D`` projections, sequential blocks."""

    positional_embedding = "standard"
    normalization = "LN"

    def layers(self) -> Sequence[Any]:
        return self.model.transformer.h

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attn

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].ln_2

    def down_projection(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.c_proj

    def mlp_write(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp

    def attention_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].ln_1

    def qkv_projections(self, layer: int) -> Sequence[tuple[nn.Module, Mapping[str, Tensor]]]:
        n_heads, d_model = int(self.config.num_attention_heads), int(self.config.hidden_size)
        heads = torch.arange(d_model).view(n_heads, -1)  # c_attn's output splits into q | k | v, each head-major
        return [(getattr(self.attention(layer), "c_attn"), {"q": heads, "k": heads + d_model, "v": heads + 2 * d_model})]

    def output_projection(self, layer: int) -> nn.Module:
        return getattr(self.attention(layer), "c_proj")

    def d_mlp(self) -> int:
        return int(self.config.n_inner if self.config.n_inner is not None else 4 * self.config.hidden_size)

    def unsupported(self, implementation: str) -> str | None:
        if getattr(self.config, "reorder_and_upcast_attn", False):
            return "GPT-2 with reorder_and_upcast_attn (its eager path bypasses the attention interface)"
        if getattr(self.config, "add_cross_attention", False):
            return "GPT-2 with cross-attention"
        return None


class LlamaAdapter(ArchitectureAdapter):
    """Llama, Mistral, Qwen2: RMSNorm, rotary embeddings, grouped-query attention, gated MLP."""

    positional_embedding = "rotary"
    normalization = "RMS"

    def layers(self) -> Sequence[Any]:
        return self.model.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].self_attn

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].post_attention_layernorm

    def down_projection(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.down_proj

    def mlp_write(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp

    def attention_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].input_layernorm

    def qkv_projections(self, layer: int) -> Sequence[tuple[nn.Module, Mapping[str, Tensor]]]:
        attention: Any = self.attention(layer)
        d_head = self.d_head()
        return [
            (attention.q_proj, {"q": torch.arange(attention.q_proj.out_features).view(-1, d_head)}),
            (attention.k_proj, {"k": torch.arange(attention.k_proj.out_features).view(-1, d_head)}),
            (attention.v_proj, {"v": torch.arange(attention.v_proj.out_features).view(-1, d_head)}),
        ]

    def output_projection(self, layer: int) -> nn.Module:
        return getattr(self.attention(layer), "o_proj")

    def rotary_embedding(self) -> nn.Module | None:
        return self.model.model.rotary_emb

    def sliding_window(self, layer: int) -> int | None:
        attention: Any = self.attention(layer)
        if hasattr(attention, "sliding_window"):  # Qwen2, Gemma-2: per layer
            return attention.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral: every layer; Llama: none


class GPTNeoXAdapter(ArchitectureAdapter):
    """GPT-NeoX (Pythia): LayerNorm, partial rotary embeddings, fused QKV, parallel or sequential blocks."""

    positional_embedding = "rotary"
    normalization = "LN"

    def layers(self) -> Sequence[Any]:
        return self.model.gpt_neox.layers

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].post_attention_layernorm

    def down_projection(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.dense_4h_to_h

    def mlp_write(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp

    def attention_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].input_layernorm

    def qkv_projections(self, layer: int) -> Sequence[tuple[nn.Module, Mapping[str, Tensor]]]:
        d_head = self.d_head()
        # query_key_value's output is head-major, each head's q | k | v together
        base = torch.arange(int(self.config.num_attention_heads))[:, None] * 3 * d_head + torch.arange(d_head)
        module = getattr(self.attention(layer), "query_key_value")
        return [(module, {"q": base, "k": base + d_head, "v": base + 2 * d_head})]

    def output_projection(self, layer: int) -> nn.Module:
        return getattr(self.attention(layer), "dense")

    def rotary_embedding(self) -> nn.Module | None:
        return self.model.gpt_neox.rotary_emb

    def d_head(self) -> int:
        return int(getattr(self.attention(0), "head_size"))

    def parallel_blocks(self) -> bool:
        return bool(self.config.use_parallel_residual)


class Gemma2Adapter(LlamaAdapter):
    """Gemma-2: RMSNorm before *and after* each sublayer, attention soft-capping, alternating sliding windows."""

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].pre_feedforward_layernorm

    def attention_write(self, layer: int) -> nn.Module:
        return self.layers()[layer].post_attention_layernorm

    def mlp_write(self, layer: int) -> nn.Module:
        return self.layers()[layer].post_feedforward_layernorm

    def edges_unsupported(self) -> str | None:
        return "Gemma-2's norms after each sublayer (a head's result is not its write to the residual stream)"


ARCHITECTURE_GROUP = plugins.GROUPS["hf_architectures"]
"""Entry-point group of architecture adapters (plugin kind ``hf_architectures``): the entry name is a
``config.model_type``, the value an ``ArchitectureAdapter`` subclass. The built-in ones register here
exactly as a third party would."""


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter registered for ``model``'s ``config.model_type``, or a BackendError naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = plugins.available("hf_architectures")
    if not isinstance(model_type, str) or model_type not in supported:
        raise BackendError(
            f"the huggingface backend does not support model_type {model_type!r}; supported: {', '.join(supported)} "
            f"(adapters register under the entry-point group {ARCHITECTURE_GROUP!r}; the transformer_lens backend may serve it)"
        )
    try:
        adapter_cls = plugins.load("hf_architectures", model_type)
    except PluginError as err:
        raise BackendError(str(err)) from err
    return adapter_cls(model)


# ----------------------------------------------------------------- attention-function wrapper
@dataclass
class _AttentionSiteHooks:
    """The site hooks of one attention module during one ``forward``."""

    query: list[SiteHook] = field(default_factory=list)
    key: list[SiteHook] = field(default_factory=list)
    value: list[SiteHook] = field(default_factory=list)
    mixed_values: list[SiteHook] = field(default_factory=list)


_ACTIVE_ATTENTION_HOOKS: dict[nn.Module, _AttentionSiteHooks] = {}
"""Attention modules with site hooks, filled only inside ``HuggingFaceBackend.forward``."""

_REGISTERED_WRAPPERS: set[str] = set()


def _apply_heads_first(states: Tensor, fns: Sequence[SiteHook]) -> Tensor:
    """Run hooks on ``batch head pos d_head`` states in the canonical ``batch pos head d_head`` layout."""
    if not fns:
        return states
    return apply_site_hooks(states.transpose(1, 2), fns).transpose(1, 2)


def _original_attention(implementation: str, module: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """The attention function the module would call under ``implementation``."""
    if implementation == "eager":  # each modeling file defines its own eager function
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise BackendError(f"{type(module).__name__}'s module defines no eager_attention_forward")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _hooked_attention_name(implementation: str) -> str:
    """Register (once) and name the site-hooking wrapper around ``implementation``."""
    name = _HOOKED_PREFIX + implementation
    if name in _REGISTERED_WRAPPERS:
        return name
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    def hooked_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> tuple[Tensor, Any]:
        original = _original_attention(implementation, module)
        hooks = _ACTIVE_ATTENTION_HOOKS.get(module)
        if hooks is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        query = _apply_heads_first(query, hooks.query)
        key = _apply_heads_first(key, hooks.key)
        value = _apply_heads_first(value, hooks.value)
        mixed, weights = original(module, query, key, value, attention_mask, **kwargs)  # batch pos head d_head
        return apply_site_hooks(mixed, hooks.mixed_values), weights

    AttentionInterface.register(name, hooked_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    _REGISTERED_WRAPPERS.add(name)
    return name


# ----------------------------------------------------------------- the backend
class HuggingFaceBackend(AbstractBackend):
    """Runs plans on Hugging Face ``transformers`` causal language models (the registered architectures)."""

    name = "huggingface"

    def __init__(self, model: Any, tokenizer: Any = None, source: str = "in_memory", prepend_bos: bool | None = None) -> None:
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise BackendError(f"the huggingface backend serves transformers PreTrainedModel objects, got {type(model).__name__}")
        if model.training:
            raise BackendError("the model is in training mode (dropout would make patching noisy); call model.eval() first")
        self.adapter = adapter_for(model)
        reason = self.adapter.unsupported(model.config._attn_implementation)
        if reason:
            raise BackendError(f"the huggingface backend does not support {reason}")
        if model.get_output_embeddings() is None:
            raise BackendError(f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM")
        self.model = model
        self.tokenizer = usable_tokenizer(tokenizer)
        self.default_prepend_bos = tokenizer_adds_bos(self.tokenizer) if prepend_bos is None else prepend_bos
        config = model.config
        param = next(model.parameters())
        parallel = self.adapter.parallel_blocks()
        self.edges_unsupported = self.adapter.edges_unsupported()
        """Why the edge sites are left out of ``supported_sites`` on this model, or None when they are served."""
        self.supported_sites = (
            frozenset(SITE_NAMES) - ({"resid_mid"} if parallel else set()) - (EDGE_SITES if self.edges_unsupported else set())
        )
        self.info = ModelInfo(
            source=source,
            architecture=str((getattr(config, "architectures", None) or [type(model).__name__])[0]),
            n_layers=int(config.num_hidden_layers),
            d_model=int(config.hidden_size),
            n_heads=int(config.num_attention_heads),
            n_kv_heads=self.adapter.n_kv_heads(),
            d_head=self.adapter.d_head(),
            d_mlp=self.adapter.d_mlp(),
            d_vocab=int(model.get_output_embeddings().weight.shape[0]),
            dtype=str(param.dtype).removeprefix("torch."),
            device=str(_input_device(model)),
            positional_embedding=self.adapter.positional_embedding,
            normalization=self.adapter.normalization,
            parallel_blocks=parallel,
            n_ctx=_context_length(config),
        )

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_model(cls, model: Any, *, tokenizer: Any = None) -> "HuggingFaceBackend":
        return cls(model, tokenizer=tokenizer)

    @classmethod
    def handles(cls, model: Any) -> bool:
        """``transformers`` ``PreTrainedModel`` objects (whether their architecture is registered is checked
        when the backend is built, with the reason)."""
        if "transformers" not in sys.modules:
            return False
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel)

    @classmethod
    def load(cls, source: str, *, dtype: str, device: str, options: Mapping[str, Any]) -> "HuggingFaceBackend":
        resolved = resolve_options(cls.name, options, _OPTIONS)
        implementation, device_map = resolved["attn_implementation"], resolved["device_map"]
        if source == "in_memory":
            raise PlanError("model.source: 'in_memory' needs the model object, passed through the Python API (run(plan, model=...))")
        torch_dtype = getattr(torch, dtype)
        placement = device if device_map == "none" else {"device_map": device_map}
        if source.startswith(BUNDLED_PREFIX):
            return cls._from_pretrained(bundled_model_dir(source), source, torch_dtype, placement, implementation, prepend_bos=False)
        location = Path(source) if Path(source).is_dir() else source
        return cls._from_pretrained(location, source, torch_dtype, placement, implementation, prepend_bos=None)

    @classmethod
    def _from_pretrained(
        cls,
        location: Path | str,
        source: str,
        dtype: torch.dtype,
        placement: str | dict[str, str],
        implementation: str,
        prepend_bos: bool | None,
    ) -> "HuggingFaceBackend":
        """``placement``: a device, or ``{"device_map": strategy}`` for accelerate to spread the model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        is_local = isinstance(location, Path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
        except Exception:  # a weights-only directory: token-id prompts still work
            tokenizer = None
        try:
            dispatch = placement if isinstance(placement, dict) else {}
            model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=implementation, **dispatch)
        except Exception as err:
            if is_local:
                raise BackendError(f"model.source: cannot load a Hugging Face model from {str(location)!r}: {err}") from err
            raise BackendError(
                f"model.source: could not load {source!r} from the model hub ({type(err).__name__}: {err}). "
                "It is neither a local directory nor a bundled model (bundled: smollm2-135m-instruct)."
            ) from err
        if isinstance(placement, str):
            model = model.to(placement)
        return cls(model.eval(), tokenizer=tokenizer, source=source, prepend_bos=prepend_bos)

    # ----------------------------------------------------------------- running
    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        return tokenize_text(self.tokenizer, text, self.default_prepend_bos if prepend_bos is None else prepend_bos)

    @classmethod
    def resolve_node_kinds(cls, nodes: Any) -> Any:
        """TransformerLens hook names as node kinds (``tl_hook_names.py``)."""
        return resolve_hook_names(nodes)

    def token_strings(self, tokens: Sequence[int]) -> list[str] | None:
        return decode_each(self.tokenizer, tokens)

    def site_of_hook_name(self, hook_name: str) -> Site | None:
        """sae_lens records TransformerLens hook names, also for SAEs used on Hugging Face models."""
        return site_of_tl_hook_name(hook_name)

    def forward(self, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        by_site = {site: list(fns) for site, fns in hooks.items() if fns}
        for site in by_site:
            self._check_site(site)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        hooked_attention: list[nn.Module] = []
        saved_implementations: list[tuple[Any, Any]] = []
        try:
            self._install_module_hooks(by_site, handles)
            attention_hooks = self._attention_site_hooks(by_site)
            if attention_hooks:
                saved_implementations = self._route_attention_through_wrapper()
                for module, site_hooks in attention_hooks.items():
                    _ACTIVE_ATTENTION_HOOKS[module] = site_hooks
                    hooked_attention.append(module)
            output = self.model(input_ids=tokens.to(self.device), use_cache=False)
            return output.logits
        finally:
            for module in hooked_attention:
                _ACTIVE_ATTENTION_HOOKS.pop(module, None)
            for config, implementation in reversed(saved_implementations):
                config._attn_implementation_internal = implementation
            for handle in handles:
                handle.remove()

    def forward_from(self, layer: int, resid: Tensor, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        skipped = self.adapter.layers()[:layer]
        saved = [module.__dict__.get("forward") for module in skipped]  # accelerate may have set one
        try:
            for module in skipped:  # blocks below the boundary pass their input through untouched
                module.forward = _pass_hidden_states_through
            return self.forward(tokens, start_hooks(layer, resid, hooks))
        finally:
            for module, forward in zip(skipped, saved):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def _check_site(self, site: Site) -> None:
        if site.name not in self.supported_sites:
            why = f" on this model: {self.edges_unsupported}" if site.name in EDGE_SITES and self.edges_unsupported else ""
            raise BackendError(f"the huggingface backend cannot hook site {site.name!r}{why}")
        top = self.info.n_layers if site.name == "resid" else self.info.n_layers - 1
        if not 0 <= site.layer <= top:
            raise BackendError(f"site {site}: layer out of range 0..{top}")

    def _install_module_hooks(self, by_site: Mapping[Site, list[SiteHook]], handles: list[Any]) -> None:
        """PyTorch module hooks for every site outside the attention function (handles appended as made)."""
        adapter, n_layers = self.adapter, self.info.n_layers

        def fns(name: str, layer: int) -> list[SiteHook]:
            return by_site.get(Site(name, layer), [])

        final_resid = fns("resid", n_layers)
        if final_resid:
            handles.append(adapter.final_norm().register_forward_pre_hook(_replace_first_input(final_resid)))
        for layer in range(n_layers):
            resid, resid_mid = fns("resid", layer), fns("resid_mid", layer)
            block_inputs: dict[str, Tensor] = {}
            if resid or resid_mid:
                handles.append(
                    adapter.layers()[layer].register_forward_pre_hook(
                        _block_input_hook(resid, block_inputs), with_kwargs=True
                    )
                )
            attn_out = fns("attn_out", layer)
            if attn_out or resid_mid:
                handles.append(
                    adapter.attention_write(layer).register_forward_hook(_residual_write_hook(attn_out, resid_mid, block_inputs))
                )
            if fns("mlp_in", layer):
                handles.append(adapter.mlp_input_norm(layer).register_forward_hook(_residual_write_hook(fns("mlp_in", layer))))
            if fns("mlp_post", layer):
                handles.append(adapter.down_projection(layer).register_forward_pre_hook(_replace_first_input(fns("mlp_post", layer))))
            if fns("mlp_out", layer):
                handles.append(adapter.mlp_write(layer).register_forward_hook(_residual_write_hook(fns("mlp_out", layer))))
            self._install_edge_hooks(layer, fns, handles)

    def _install_edge_hooks(self, layer: int, fns: Callable[[str, int], list[SiteHook]], handles: list[Any]) -> None:
        """Hooks for the edge sites of block ``layer`` (module docstring); nothing when none is hooked."""
        adapter = self.adapter
        if fns("mlp_input", layer):
            handles.append(adapter.mlp_input_norm(layer).register_forward_pre_hook(_own_copy_hook(fns("mlp_input", layer))))
        if fns("attn_result", layer):
            projection = adapter.output_projection(layer)
            handles.append(projection.register_forward_hook(_head_results_hook(fns("attn_result", layer), self.info.n_heads)))
        head_inputs = {kind: fns(site, layer) for kind, site in _HEAD_INPUT_SITES.items()}
        if not any(head_inputs.values()):
            return
        norm = adapter.attention_input_norm(layer)
        block_input: dict[str, Tensor] = {}
        handles.append(norm.register_forward_pre_hook(_keep_first_input(block_input)))
        for module, columns in adapter.qkv_projections(layer):
            hooked = {kind: (heads, head_inputs[kind]) for kind, heads in columns.items() if head_inputs[kind]}
            if hooked:
                handles.append(module.register_forward_hook(_per_head_input_hook(norm, block_input, hooked)))

    def _attention_site_hooks(self, by_site: Mapping[Site, list[SiteHook]]) -> dict[nn.Module, _AttentionSiteHooks]:
        result: dict[nn.Module, _AttentionSiteHooks] = {}
        field_of_site = {"attn_q": "query", "attn_k": "key", "attn_v": "value", "attn_z": "mixed_values"}
        for site, fns in by_site.items():
            if site.name in _ATTENTION_SITES:
                site_hooks = result.setdefault(self.adapter.attention(site.layer), _AttentionSiteHooks())
                getattr(site_hooks, field_of_site[site.name]).extend(fns)
        return result

    def _route_attention_through_wrapper(self) -> list[tuple[Any, Any]]:
        """Point every config of the model at the hooking wrapper; returns (config, original) pairs to restore."""
        from transformers import PretrainedConfig

        configs: dict[int, Any] = {id(self.model.config): self.model.config}
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig):
                configs.setdefault(id(config), config)
        saved: list[tuple[Any, Any]] = []
        for config in configs.values():
            implementation = config._attn_implementation_internal
            if implementation not in _ATTN_IMPLEMENTATIONS:
                raise BackendError(
                    f"attention sites need attn_implementation 'eager' or 'sdpa'; the model uses {implementation!r}"
                )
            name = _hooked_attention_name(implementation)
            saved.append((config, implementation))
            config._attn_implementation_internal = name
        return saved

    # ----------------------------------------------------------------- attention
    def attention_unsupported(self, layer: int) -> str | None:
        return None  # unsupported configurations are refused when the backend is built

    def attention_logits(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        group = q.shape[2] // k.shape[2]
        keys = torch.repeat_interleave(k, group, dim=2)  # as transformers' repeat_kv
        logits = einsum(q, keys, "batch query head d_head, batch key head d_head -> batch head query key")
        logits = logits * self.adapter.attention_scaling(layer)
        softcap = self.adapter.softcap(layer)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        n_query, n_key = q.shape[1], k.shape[1]
        query_pos = torch.arange(n_query, device=logits.device)[:, None] + (n_key - n_query)
        key_pos = torch.arange(n_key, device=logits.device)[None, :]
        visible = key_pos <= query_pos
        window = self.adapter.sliding_window(layer)
        if window is not None:
            visible = visible & (key_pos > query_pos - window)
        return logits.masked_fill(~visible, float("-inf"))

    def reader_projection_unsupported(self, layer: int) -> str | None:
        if self.edges_unsupported:
            return f"this model serves no edge sites ({self.edges_unsupported})"
        try:
            self.adapter.rotary_embedding()
        except NotImplementedError:
            return f"{type(self.adapter).__name__} does not locate the rotary embedding"
        return None

    def reader_projection(self, layer: int, reader: str, x: Tensor) -> Tensor:
        """Queries or keys from per-head inputs as the attention module computes them: the input norm on each
        head's copy, the head's slice of the projection, then the rotary embedding at positions ``0..pos-1``."""
        reason = self.reader_projection_unsupported(layer)
        if reason:
            raise BackendError(reason)
        if reader not in ("q", "k"):
            raise ValueError(f"reader must be 'q' or 'k', got {reader!r}")
        module, heads = next((m, columns[reader]) for m, columns in self.adapter.qkv_projections(layer) if reader in columns)
        norm = self.adapter.attention_input_norm(layer)
        states = _project_heads(module, heads, norm.forward(x))
        rotary = self.adapter.rotary_embedding()
        if rotary is None:
            return states
        positions = torch.arange(states.shape[1], device=states.device)[None]
        cos, sin = rotary(states, positions)
        apply_rotary = getattr(sys.modules[type(self.adapter.attention(layer)).__module__], "apply_rotary_pos_emb")
        rotated, _ = apply_rotary(states, states, cos.to(states.device), sin.to(states.device), unsqueeze_dim=2)
        return rotated


# ----------------------------------------------------------------- hook factories
def _replace_first_input(fns: list[SiteHook]) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (apply_site_hooks(args[0], fns), *args[1:])

    return hook


def _block_input_hook(
    resid: list[SiteHook], block_inputs: dict[str, Tensor]
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    """Pre-hook on a decoder layer: ``resid`` hooks on its hidden-states input, which is kept for ``resid_mid``."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            hidden = apply_site_hooks(args[0], resid)
            args = (hidden, *args[1:])
        else:
            hidden = apply_site_hooks(kwargs["hidden_states"], resid)
            kwargs = {**kwargs, "hidden_states": hidden}
        block_inputs["hidden"] = hidden
        return args, kwargs

    return hook


def _residual_write_hook(
    fns: list[SiteHook], resid_mid: Sequence[SiteHook] = (), block_inputs: Mapping[str, Tensor] | None = None
) -> Callable[[nn.Module, Any, Any], Any]:
    """Forward hook on a module whose output (a tensor, or a tuple led by one) the block uses.

    ``fns`` run on that output. With ``resid_mid`` hooks (attention writes only), they then run on
    ``block input + output`` and the module returns ``resid_mid - block input``, which the block adds
    back to its input.
    """

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        written = apply_site_hooks(first, fns)
        if resid_mid:
            block_input = block_inputs["hidden"]  # type: ignore[index]
            written = apply_site_hooks(block_input + written, resid_mid) - block_input
        return (written, *output[1:]) if isinstance(output, tuple) else written

    return hook


def _own_copy_hook(fns: list[SiteHook]) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """Pre-hook on a module that alone reads its input (the norm feeding the MLP): ``fns`` run on a copy of
    the input, so the gradient there is this reader's own, and the module reads what they return."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (apply_site_hooks(args[0].clone(), fns), *args[1:])

    return hook


def _keep_first_input(store: dict[str, Tensor]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """Pre-hook keeping the module's first input (the attention input norm's: the block input)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        store["input"] = args[0]

    return hook


def _per_head_input_hook(
    norm: nn.Module, block_input: Mapping[str, Tensor], hooked: Mapping[str, tuple[Tensor, list[SiteHook]]]
) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """Forward hook on a query/key/value projection: the output columns of each hooked kind are recomputed
    per head from that head's own copy of the block input (``batch pos head d_model``, after the site
    hooks), normalized by ``norm`` and projected by the head's rows of the weight (plus bias).

    ``hooked``: kind -> (``head d_head`` output columns, the site hooks of its ``attn_*_input`` site)."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        x = block_input["input"]
        for heads, fns in hooked.values():
            copies = x.unsqueeze(2).expand(*x.shape[:2], heads.shape[0], x.shape[-1]).contiguous()
            copies = apply_site_hooks(copies, fns)
            projected = _project_heads(module, heads, norm.forward(copies))  # the norm's own forward, not its hooks
            index = heads.flatten().to(output.device)
            output = output.index_copy(-1, index, projected.flatten(-2).to(output.device, output.dtype))
        return output

    return hook


def _project_heads(module: nn.Module, heads: Tensor, normed: Tensor) -> Tensor:
    """``batch pos head d_head``: each head's output columns ``heads`` (``head d_head``) of the projection
    ``module`` applied to that head's own normalized input ``normed`` (``batch pos head d_model``)."""
    with _weights_loaded(module, normed):
        weight, bias = _weight_and_bias(module)
        index = heads.to(weight.device)
        projected = einsum(normed, weight[index], "batch pos head d_model, head d_head d_model -> batch pos head d_head")
        return projected if bias is None else projected + bias[index]


def _head_results_hook(fns: list[SiteHook], n_heads: int) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """Forward hook on the attention output projection: ``fns`` run on each head's result (``batch pos head
    d_model``, its mixed values times its slice of the weight, no bias) and the projection returns their sum
    over heads plus the bias."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        mixed = args[0]
        with _weights_loaded(module, mixed):
            weight, bias = _weight_and_bias(module)  # d_model (head d_head)
            per_head = weight.view(weight.shape[0], n_heads, -1)
            heads = mixed.view(*mixed.shape[:-1], n_heads, -1)
            result = einsum(heads, per_head, "batch pos head d_head, d_model head d_head -> batch pos head d_model")
        written = apply_site_hooks(result, fns).sum(2)
        return written if bias is None else written + bias

    return hook


def _sliceable_projections() -> tuple[type, ...]:
    """Projection classes whose weights ``_weight_and_bias`` reads (exact types: quantized subclasses are not)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``out in`` weight and bias of a linear projection (transformers' ``Conv1D`` stores it ``in out``)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
    return (weight if isinstance(module, nn.Linear) else weight.T), bias


@contextmanager
def _weights_loaded(module: nn.Module, *args: Any) -> Iterator[None]:
    """Make ``module``'s weights usable in a hook after its forward: accelerate offloads them to the meta
    device between forwards (its hook loads them for a forward and puts them back after)."""
    dispatch = getattr(module, "_hf_hook", None)
    if dispatch is None or not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        yield
        return
    dispatch.pre_forward(module, *args)
    try:
        yield
    finally:
        dispatch.post_forward(module, None)


def _pass_hidden_states_through(hidden_states: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
    """Stands in for a skipped decoder layer's ``forward`` (every supported layer returns its hidden states)."""
    return hidden_states if hidden_states is not None else args[0]


def _context_length(config: Any) -> int | None:
    """The longest input the model's positions cover (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _input_device(model: Any) -> torch.device:
    """Where input ids go: the input embedding's execution device (accelerate dispatch) or its weight's device."""
    embedding = model.get_input_embeddings()
    dispatch = getattr(embedding, "_hf_hook", None)
    device = getattr(dispatch, "execution_device", None)
    return torch.device(device) if device is not None else embedding.weight.device
