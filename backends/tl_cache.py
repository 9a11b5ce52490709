"""The converted-weights cache of the TransformerLens backend, for models whose directory atpframework owns
(the bundled models, dequantized into ``~/.cache/atpframework``).

Building a ``HookedTransformer`` from a Hugging Face directory loads the Hugging Face model and converts its
weights to TransformerLens's layout. The first load stores the converted parameters (safetensors) with the
TransformerLens config under ``<model dir>/transformer_lens/<key>.safetensors``; later loads build the
``HookedTransformer`` from that config and load the parameters, skipping the Hugging Face model and the
conversion. The key hashes everything the converted tensors depend on: the SHA-256 of the weights file and
of ``config.json``, the dtype, device and BOS setting, whether a tokenizer is present, and the versions of
atpframework, torch, transformers, transformer_lens and safetensors. The tensors are those the conversion
produced, so the model (and every score computed with it) is bit-identical to an uncached load. An entry
that cannot be read is ignored and rewritten; a cache that cannot be written is skipped.
"""

import contextlib
import dataclasses
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from atpframework.model.bundled import file_digest
from atpframework.version import __version__

FORMAT = 1
"""Bumped when what an entry holds changes."""
_LIBRARIES = ("torch", "transformers", "transformer_lens", "safetensors")


def _versions() -> dict[str, str]:
    out = {"atpframework": __version__}
    for dist in _LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def entry_path(hf_dir: Path, dtype: torch.dtype, device: str, prepend_bos: bool, has_tokenizer: bool) -> Path:
    """Where the converted model of ``hf_dir`` with these settings is (or would be) cached."""
    key = {
        "format": FORMAT, "weights": file_digest(hf_dir / "model.safetensors"),
        "config": hashlib.sha256((hf_dir / "config.json").read_bytes()).hexdigest(),
        "dtype": str(dtype), "device": device, "prepend_bos": prepend_bos, "tokenizer": has_tokenizer, "versions": _versions(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return hf_dir / "transformer_lens" / f"{digest}.safetensors"


def load(entry: Path, tokenizer: Any, dtype: torch.dtype, device: str) -> Any:
    """The ``HookedTransformer`` stored at ``entry``, or None when there is none or it cannot be read."""
    from safetensors import SafetensorError, safe_open
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if not entry.exists():
        return None
    try:
        with safe_open(str(entry), framework="pt") as f:
            fields = json.loads((f.metadata() or {})["cfg"])
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        cfg = HookedTransformerConfig(**fields, dtype=dtype)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return None
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    # on the CPU the read tensors become the parameters (no second copy of 650 MB); elsewhere they are copied over
    missing, unexpected = model.load_state_dict(state, strict=False, assign=torch.device(device).type == "cpu")
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or parameters & set(missing):
        return None
    return model.eval()


def store(entry: Path, model: Any, converted: set[str]) -> None:
    """Store ``model``'s config, its parameters and any other tensor the conversion set (``converted``) at ``entry``;
    the rest (attention masks, rotary tables) the ``HookedTransformer`` builds itself, as it did here."""
    from safetensors.torch import save_file

    from atpframework.io.files import write_atomically

    fields = {f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(model.cfg) if f.init and f.name != "dtype"}
    keep = converted | {name for name, _ in model.named_parameters()}
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in keep}
    with contextlib.suppress(OSError, TypeError, ValueError):  # not writable, or a config field JSON cannot hold
        metadata = {"cfg": json.dumps(fields), "format": str(FORMAT)}
        write_atomically(entry, lambda tmp: save_file(state, tmp, metadata=metadata))
