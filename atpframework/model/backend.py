"""The backend contract: how the engine loads a model, tokenizes, and runs hooked passes.

A backend (a subclass of ``AbstractBackend`` in the ``atpframework.backends`` entry-point group)
adapts one model library. The engine never sees library hook names: it asks for ``Site``s, and
receives activations in the canonical layouts of ``atpframework.model.sites``.

Rules for implementations:
    * ``forward`` installs the given site hooks, runs one forward pass, and removes every hook it
      installed, after success and after an exception; hooks the user had installed survive.
    * A site hook receives the canonical activation and may return a replacement tensor of the same
      shape (patching) or ``None``; whatever tensor the hook saw or returned must be what flows
      downstream, so that a gradient hook registered on it receives ``dMetric/dact``.
    * Backends import their model library inside methods, never at module import time of the core.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from atpframework.errors import PlanError
from atpframework.model.sites import Site

if TYPE_CHECKING:
    from atpframework.model.sae import AttachedSae

SiteHook = Callable[[Tensor], Tensor | None]
"""Called with the canonical activation ``batch ...``; returns a same-shaped replacement or None."""


class ModelInfo(BaseModel):
    """Sizes and provenance of a loaded model, enough to compile a plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None
    """None for attention-only models."""
    d_vocab: int
    dtype: str
    device: str
    positional_embedding: str
    normalization: str
    parallel_blocks: bool = False
    """Attention and MLP read the same residual input and write together (GPT-NeoX/Pythia style)."""
    n_ctx: int | None = None
    """Longest prompt the model takes, in tokens (None: unknown, not checked)."""


class AbstractBackend(ABC):
    """Adapter from one model library to the engine (see module docstring)."""

    name: ClassVar[str]
    """Entry-point name, used as ``model.backend`` in plans."""
    supported_sites: frozenset[str]
    """Site names this backend can hook on this model (set per instance: parallel blocks have no ``resid_mid``)."""

    info: ModelInfo

    @classmethod
    @abstractmethod
    def load(cls, source: str, *, dtype: str, device: str, options: Mapping[str, Any]) -> "AbstractBackend":
        """Load the model named by a plan's ``model.source`` (bundled name, local directory or hub name)."""

    @classmethod
    @abstractmethod
    def from_model(cls, model: Any, *, tokenizer: Any = None) -> "AbstractBackend":
        """Wrap a model object the user already holds (Python API)."""

    @classmethod
    def handles(cls, model: Any) -> bool:
        """Whether ``from_model`` serves this model object. When a plan leaves ``model.backend`` out,
        ``af.run(plan, model=...)`` uses the installed backend that handles the object; a plan that names
        a backend which does not handle it, while another does, is refused. Answer from the object's type
        alone, without importing a model library the caller has not imported (no object of its classes
        can exist then). Default: False (such a backend is used only when a plan names it)."""
        return False

    @abstractmethod
    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        """Token ids of ``text`` (``prepend_bos=None``: the model's default)."""

    @abstractmethod
    def forward(self, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        """Logits ``batch pos vocab`` of ``tokens`` (``batch pos``) with ``hooks`` installed for this pass only."""

    def forward_from(self, layer: int, resid: Tensor, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        """Logits of running blocks ``layer..`` on ``resid`` (``batch pos d_model``), the residual stream at boundary ``layer``.

        ``tokens`` are the prompts ``resid`` came from (for backends that need positions or masks).
        Hooks on sites below ``layer`` never fire; hooks on ``Site("resid", layer)`` run on ``resid``
        itself. This default runs the whole model and replaces the boundary with ``resid``, which is
        exact but skips nothing; backends that can start mid-model override it.
        """
        return self.forward(tokens, start_hooks(layer, resid, hooks))

    def attention_unsupported(self, layer: int) -> str | None:
        """Why ``attention_logits`` cannot reproduce this layer's attention, or None if it can.

        Methods with the QK fix call this at plan compile time and refuse the plan with the reason.
        """
        return f"the {self.name} backend does not recompute attention patterns"

    def attention_logits(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        """The layer's pre-softmax attention logits from canonical ``q`` and ``k``.

        Args:
            q: ``batch query head d_head`` (after rotary embedding, as the ``attn_q`` site).
            k: ``batch key kv_head d_head`` (as the ``attn_k`` site).
        Returns:
            ``batch head query key`` with the model's scale, soft-capping and position biases applied and
            masked entries ``-inf``; ``softmax(-1)`` of it must equal the model's pattern. Entry
            ``(t, s)`` may depend only on ``q[:, t]`` and ``k[:, s]`` (the key closed form relies on it).
        """
        raise NotImplementedError(self.attention_unsupported(layer))

    def reader_projection_unsupported(self, layer: int) -> str | None:
        """Why ``reader_projection`` cannot reproduce this layer's queries and keys from their inputs, or None if it can.

        The QK fix for edges into queries and keys calls this at plan compile time."""
        return f"the {self.name} backend does not recompute queries and keys from their inputs"

    def reader_projection(self, layer: int, reader: str, x: Tensor) -> Tensor:
        """The layer's queries (``reader="q"``) or keys (``"k"``) computed from per-head inputs, as the model does.

        Args:
            x: ``batch pos head d_model``, each head's input before normalization (as the ``attn_q_input`` /
                ``attn_k_input`` sites; key/value heads for keys).
        Returns:
            ``batch pos head d_head``, equal to the ``attn_q`` / ``attn_k`` sites (after any rotary embedding) when
            ``x`` is the clean input.
        """
        raise NotImplementedError(self.reader_projection_unsupported(layer))

    @classmethod
    def resolve_node_kinds(cls, nodes: Any) -> Any:
        """A plan's ``nodes`` (as parsed JSON, before validation) with node kinds written in this backend's
        library vocabulary rewritten to node kinds and layers (e.g. TransformerLens hook names,
        ``backends/tl_hook_names.py``); ``nodes`` itself when nothing changes. Raise ``PlanError`` naming
        ``nodes[i].kind`` for a name it knows but cannot map. Default: ``nodes`` unchanged."""
        return nodes

    def token_strings(self, tokens: Sequence[int]) -> list[str] | None:
        """Each token id decoded on its own (``" Mary"``), stored in results to label positions; None when the
        backend cannot decode (no tokenizer). Default: None."""
        return None

    def site_of_hook_name(self, hook_name: str) -> Site | None:
        """The site of a hook name as sae_lens records where an SAE was trained (``cfg.metadata.hook_name``),
        or None if it names none. sae_lens records TransformerLens hook names whatever library runs the
        model; the TransformerLens backend owns those names (``transformer_lens.site_of_tl_hook_name``) and
        the Hugging Face backend reuses them. Default: None, so a plan places its SAEs with ``site`` and
        ``site_layer``."""
        return None

    @property
    def attached_saes(self) -> "Mapping[str, AttachedSae]":
        """The SAEs spliced into this backend, by name (``model.sae.SplicedBackend``); a plain backend has none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Model description stored in result metadata."""
        return self.info.model_dump()

    def weights(self) -> Iterable[tuple[str, Tensor]] | None:
        """The named tensors that determine the model's outputs (the resume fingerprint hashes them);
        None when the backend cannot list them, which turns resuming off. Default: the state dict of
        ``self.model`` when that is a torch module."""
        model = getattr(self, "model", None)
        return model.state_dict().items() if isinstance(model, torch.nn.Module) else None

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)


# ----------------------------------------------------------------- helpers for backend authors
def apply_site_hooks(act: Tensor, hooks: Sequence[SiteHook]) -> Tensor:
    """Run ``hooks`` on ``act`` in order, each on what the previous one returned (or left): the activation
    that flows downstream. Every backend applies the hooks at a site with this."""
    for hook in hooks:
        replaced = hook(act)
        if replaced is not None:
            act = replaced
    return act


def start_hooks(layer: int, resid: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> dict[Site, list[SiteHook]]:
    """``hooks`` with ``Site("resid", layer)`` replaced by one hook returning ``resid`` after its own hooks ran on it."""
    boundary = Site("resid", layer)
    start = apply_site_hooks(resid, hooks.get(boundary, ()))
    out = {site: list(fns) for site, fns in hooks.items() if site != boundary}
    out[boundary] = [lambda act: start]
    return out


def resolve_options(backend: str, options: Mapping[str, Any], choices: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Validate ``model.options`` against ``choices`` (option -> allowed values, the first the default)."""
    unknown = set(options) - set(choices)
    if unknown:
        raise PlanError(f"model.options: unknown option(s) {sorted(unknown)} for the {backend} backend; allowed: {sorted(choices)}")
    resolved = {}
    for name, allowed in choices.items():
        value = options.get(name, allowed[0])
        if value not in allowed:
            raise PlanError(f"model.options.{name}: allowed: {', '.join(allowed)} (got {value!r})")
        resolved[name] = value
    return resolved
