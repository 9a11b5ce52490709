"""SAEs and transcoders spliced into the model: loading, where they attach, and the splice.

An SAE attached at site ``S`` replaces the activation ``x`` there by

    out = decode(f) + e,   f = encode(x),   e = x - decode(encode(x))

so the forward pass is unchanged (to rounding). ``f`` is exposed as the view
``sae_latents:<name>`` of ``S`` (``batch pos latent``) and ``e`` as ``sae_error:<name>``
(``batch pos d_in``); node types ``sae_latent`` and ``sae_error`` read them, and every method
captures, patches and differentiates them like any other site. A transcoder reads ``x`` at one site
and replaces ``y`` at a later one: ``out = decode(encode(x)) + (y - decode(encode(x)))``.

Gradient semantics of the error term (``error_gradient``):

* ``pass_through`` (default, as in Marks et al. 2024): ``e`` is computed through its own copy of the
  reconstruction, so ``d out / d x`` is the identity and every node upstream of the SAE gets exactly
  the unmodified model's gradient; latents get ``W_dec . dMetric/dout``.
* ``detached`` (sae_lens's ``use_error_term``): ``e`` is a constant, so upstream gradient flows only
  through the SAE's encoder and decoder; an upstream node whose effect runs through the part of the
  activation the SAE does not reconstruct gets (nearly) zero gradient.

The splice runs on top of any backend's plain site hooks (``SplicedBackend``); SAEs are spliced only
into passes that read their views.
"""

import os
import re
import shlex
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from einops import rearrange
from torch import Tensor, nn

from atpframework.errors import MAX_SHOWN, BackendError, PlanError, shorten
from atpframework.model.backend import AbstractBackend, SiteHook, apply_site_hooks
from atpframework.model.interventions import Intervention, Patch
from atpframework.model.sites import Site


@dataclass(frozen=True)
class AttachedSae:
    """One SAE of a plan, loaded and placed."""

    name: str
    sae: Any
    """The sae_lens ``SAE`` (or any module with ``encode``/``decode`` and a ``cfg`` with ``d_in``/``d_sae``)."""
    site: Site
    """Where the splice writes (and the site its node views belong to)."""
    input_site: Site
    """Where it reads: ``site`` except for transcoders."""
    error_gradient: str
    d_sae: int
    source: str

    @property
    def latents_view(self) -> str:
        return f"sae_latents:{self.name}"

    @property
    def error_view(self) -> str:
        return f"sae_error:{self.name}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "architecture": _architecture(self.sae), "d_sae": self.d_sae,
            "site": str(self.site), "input_site": str(self.input_site), "error_gradient": self.error_gradient,
        }


def _architecture(sae: Any) -> str:
    cfg = getattr(sae, "cfg", None)
    arch = getattr(cfg, "architecture", None)
    return str(arch() if callable(arch) else arch or type(sae).__name__)


TRAINED_SAE_DIR = re.compile(r"smollm2-res(\d+)")
"""The folder name ``scripts/train_sae.py`` gives the SAE it trains (``results/saes/smollm2-res<layer>``)."""


def sae_path_problem(path: str, where: str) -> str | None:
    """Why ``path`` (a plan's ``saes[i].path``, relative to the working directory) is not a sae_lens directory,
    with how to get one; None when it holds a ``cfg.json``. Checked before the model loads."""
    folder = Path(path)
    if (folder / "cfg.json").is_file():
        return None
    if not folder.exists():
        what = "does not exist"
    elif not folder.is_dir():
        what = "is a file, not a directory"
    else:
        what = "is a directory without cfg.json"
    message = (
        f"{where}.path: {shorten(path)} {what} (relative paths start at the working directory {shorten(os.getcwd())}); "
        "allowed: a sae_lens directory holding cfg.json and sae_weights.safetensors (as SAE.save_model writes it)"
    )
    trained = TRAINED_SAE_DIR.fullmatch(folder.name)
    if trained:
        message += (
            f". This is where scripts/train_sae.py writes the SAE it trains on the bundled SmolLM2; create it by running, "
            f"from the repository root (about 3 minutes on 2 CPU cores): "
            f"python scripts/train_sae.py --layer {trained.group(1)} --out {shlex.quote(path) if len(path) <= MAX_SHOWN else shorten(path)}"
        )
    return message


def sae_path_problems(specs: Sequence[Any], in_memory: Collection[str] = ()) -> list[str]:
    """``sae_path_problem`` of every plan ``saes`` entry with a ``path`` (except those passed as objects by name)."""
    problems = []
    for i, spec in enumerate(specs):
        if spec.path is not None and spec.name not in in_memory:
            problem = sae_path_problem(spec.path, f"saes[{i}]")
            if problem:
                problems.append(problem)
    return problems


def load_saes(specs: Sequence[Any], backend: AbstractBackend, in_memory: Mapping[str, Any]) -> dict[str, AttachedSae]:
    """Load and place the plan's ``saes`` entries; ``in_memory`` supplies SAE objects by name (Python API)."""
    out: dict[str, AttachedSae] = {}
    unknown = set(in_memory) - {s.name for s in specs}
    if unknown:
        raise PlanError(f"saes: SAE object(s) {sorted(unknown)} passed to run() are not named in the plan's saes")
    for i, spec in enumerate(specs):
        where = f"saes[{i}]"
        sae, source = _load_one(spec, in_memory, where)
        if str(next(sae.parameters()).device) != backend.info.device:
            sae = sae.to(backend.info.device)
        out[spec.name] = _place(spec, sae, source, backend, where)
    return out


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """``torch.load`` forced to ``weights_only=True`` while sae_lens loads an SAE.

    sae_lens's pretrained loaders call ``torch.load`` without ``weights_only``, which is safe only
    while torch's default says so (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns it off). A plan can come
    from someone else, so a pickled SAE file may load tensors and nothing else, whatever the caller
    or the environment asks."""
    import torch

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _load_one(spec: Any, in_memory: Mapping[str, Any], where: str) -> tuple[Any, str]:
    if spec.name in in_memory:
        return in_memory[spec.name].eval(), "in_memory"
    with weights_only_loading():
        return _load_from_files(spec, where)


def _load_from_files(spec: Any, where: str) -> tuple[Any, str]:
    if spec.path is not None:
        from sae_lens import SAE

        problem = sae_path_problem(spec.path, where)
        if problem:
            raise PlanError(problem)
        try:
            return SAE.load_from_disk(spec.path, device="cpu").eval(), spec.path
        except Exception as err:
            raise BackendError(f"{where}.path: sae_lens cannot load {shorten(spec.path)} ({type(err).__name__}: {shorten(str(err))})") from err
    if spec.release is not None:
        from sae_lens import SAE

        try:
            return SAE.from_pretrained(spec.release, spec.sae_id, device="cpu").eval(), f"{spec.release}/{spec.sae_id}"
        except Exception as err:
            raise BackendError(
                f"{where}: could not load pretrained SAE release={spec.release!r} sae_id={spec.sae_id!r} "
                f"({type(err).__name__}: {err})"
            ) from err
    raise PlanError(f"{where}: SAE {spec.name!r} has no path or release; pass the object through run(plan, saes={{...}})")


def _place(spec: Any, sae: Any, source: str, backend: AbstractBackend, where: str) -> AttachedSae:
    cfg = sae.cfg
    metadata = getattr(cfg, "metadata", None)
    transcoder = hasattr(cfg, "d_out")

    def site_of(explicit_name: str | None, explicit_layer: int | None, hook_key: str, field: str) -> Site:
        if explicit_name is not None:
            if explicit_layer is None:
                raise PlanError(f"{where}.{field}_layer: required with {field}")
            return Site(explicit_name, explicit_layer)
        hook_name = metadata.get(hook_key) if metadata is not None else None
        site = backend.site_of_hook_name(hook_name) if hook_name else None
        if site is None:
            raise PlanError(
                f"{where}.{field}: the SAE does not record a recognised hook ({hook_key}={hook_name!r}); "
                f"give {field} and {field}_layer"
            )
        return site

    input_site = site_of(spec.site, spec.site_layer, "hook_name", "site")
    site = site_of(spec.output_site, spec.output_site_layer, "hook_name_out", "output_site") if transcoder else input_site
    info = backend.info
    for s, field in ((input_site, "site"), (site, "output_site")):
        if s.name not in backend.supported_sites:
            raise PlanError(f"{where}.{field}: the {backend.name} backend does not serve site {s.name!r}")
        top = info.n_layers if s.name == "resid" else info.n_layers - 1
        if not 0 <= s.layer <= top:
            raise PlanError(f"{where}.{field}: layer {s.layer} out of range for this model (0..{top})")
    def width(s: Site) -> int | None:
        return {"attn_z": info.n_heads * info.d_head, "mlp_post": info.d_mlp}.get(s.name, info.d_model)

    if cfg.d_in != width(input_site):
        raise PlanError(f"{where}: the SAE's d_in is {cfg.d_in} but site {input_site} of this model has width {width(input_site)}")
    if transcoder:
        out_width = width(site)
        if cfg.d_out != out_width:
            raise PlanError(f"{where}: the transcoder's d_out is {cfg.d_out} but site {site} has width {out_width}")
        if site.layer < input_site.layer:
            raise PlanError(f"{where}.output_site: a transcoder must write after it reads ({input_site} -> {site})")
    return AttachedSae(spec.name, sae, site, input_site, spec.error_gradient, int(cfg.d_sae), source)


class SplicedBackend(AbstractBackend):
    """A backend with SAEs spliced in: serves the SAEs' views on top of the wrapped backend's sites."""

    def __init__(self, inner: AbstractBackend, attached: Mapping[str, AttachedSae]) -> None:
        self.inner = inner
        self.attached = dict(attached)
        self.info = inner.info
        self.name = inner.name  # type: ignore[misc]
        self.supported_sites = inner.supported_sites

    @classmethod
    def load(cls, source: str, *, dtype: str, device: str, options: Mapping[str, Any]) -> "SplicedBackend":
        raise NotImplementedError("wrap a loaded backend instead")

    @classmethod
    def from_model(cls, model: Any, *, tokenizer: Any = None) -> "SplicedBackend":
        raise NotImplementedError("wrap a loaded backend instead")

    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        return self.inner.tokenize(text, prepend_bos)

    def token_strings(self, tokens: Sequence[int]) -> list[str] | None:
        return self.inner.token_strings(tokens)

    def attention_unsupported(self, layer: int) -> str | None:
        return self.inner.attention_unsupported(layer)

    def attention_logits(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        return self.inner.attention_logits(layer, q, k)

    def site_of_hook_name(self, hook_name: str) -> Site | None:
        return self.inner.site_of_hook_name(hook_name)

    @property
    def attached_saes(self) -> Mapping[str, AttachedSae]:
        return self.attached

    def describe(self) -> dict[str, Any]:
        out = self.inner.describe()
        out["saes"] = [a.describe() for a in self.attached.values()]
        return out

    def weights(self) -> Iterable[tuple[str, Tensor]] | None:
        inner = self.inner.weights()
        if inner is None or not all(isinstance(a.sae, nn.Module) for a in self.attached.values()):
            return None
        saes = [(f"sae.{a.name}.{key}", t) for a in self.attached.values() for key, t in a.sae.state_dict().items()]
        return [*inner, *saes]

    def forward(self, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        return self.inner.forward(tokens, self._plain_hooks(hooks))

    def forward_from(self, layer: int, resid: Tensor, tokens: Tensor, hooks: Mapping[Site, Sequence[SiteHook]]) -> Tensor:
        return self.inner.forward_from(layer, resid, tokens, self._plain_hooks(hooks))

    def _plain_hooks(self, hooks: Mapping[Site, Sequence[SiteHook]]) -> dict[Site, list[SiteHook]]:
        """The wrapped backend's hooks: each SAE whose views are hooked is spliced in at its site (an
        ``Intervention`` patching the site, with the given hooks inside it: they see the spliced output)."""
        splice = Intervention()
        for sae in self.attached.values():
            latent_hooks = list(hooks.get(Site(sae.site.name, sae.site.layer, sae.latents_view), ()))
            error_hooks = list(hooks.get(Site(sae.site.name, sae.site.layer, sae.error_view), ()))
            if not latent_hooks and not error_hooks:
                continue
            inputs = splice.capture([sae.input_site], keep_graph=True) if sae.input_site != sae.site else None
            splice.patch(sae.site, _splice(sae, latent_hooks, error_hooks, inputs))
        return splice.site_hooks(inner={s: fns for s, fns in hooks.items() if not s.view})


def _splice(sae: AttachedSae, latent_hooks: list[SiteHook], error_hooks: list[SiteHook], inputs: dict[Site, Tensor] | None) -> Patch:
    """The splice at ``sae.site``: ``decode(latents) + error``, the view hooks run on latents and error;
    a transcoder reads its input from ``inputs`` (captured earlier in the same pass)."""
    module = sae.sae

    def replace(act: Tensor) -> Tensor:
        heads = act.dim() == 4  # attn_z: batch pos head d_head, SAEs read the heads concatenated
        y = rearrange(act, "batch pos head d_head -> batch pos (head d_head)") if heads else act
        x = y if inputs is None else inputs[sae.input_site]
        param = next(module.parameters())  # its dtype and device; a multi-device model's site may sit elsewhere
        codes = module.encode(x.to(param))  # batch pos latent
        latents = apply_site_hooks(codes.clone(), latent_hooks)  # a node of its own: its gradient is W_dec . dMetric/dout
        error = y.to(param) - module.decode(codes)
        if sae.error_gradient == "detached":
            error = error.detach()
        error = apply_site_hooks(error, error_hooks)
        out = (module.decode(latents) + error).to(act)
        return rearrange(out, "batch pos (head d_head) -> batch pos head d_head", head=act.shape[2]) if heads else out

    return replace
