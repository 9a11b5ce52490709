"""Resumable runs: each finished batch is checkpointed next to the output, and a re-run picks them up.

For output ``OUT.safetensors`` the sidecar is the folder ``.OUT.safetensors.partial/`` beside it:

* ``lock``: held (``flock``) by the run writing this output, so a second run on it stops at once.
* ``run.json``: the run's fingerprint (``run_fingerprint``): everything that determines the numbers.
  A re-run whose fingerprint differs in any part refuses to resume, naming the parts and the folder.
* ``batch_<number>.safetensors``: one finished batch (its CPU score tensors, pair indices and the
  fingerprint in the metadata), written atomically, so a run killed at any moment leaves only whole
  batches. A batch is adopted only if its own fingerprint is the run's.

A folder holding batches but no complete ``run.json`` (a run killed while it started, or written by
another version) is never adopted; nor is a folder holding files atpframework did not write. The
folder is removed once the result is written, file by known file (never a whole tree).

Batches are numbered as the compiled plan numbers them, so processes of a distributed run share one
sidecar: the main process locks it and writes ``run.json``, every process writes its own batches.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from atpframework.engine.outputs import OutputLock
from atpframework.errors import PlanError, shorten
from atpframework.io.files import write_atomically, write_text_atomically
from atpframework.plans.compiled import BatchOutput, PreparedPair

FINGERPRINT_PARTS = ("plan", "tokens", "weights", "dtype", "device", "atpframework", "torch")
"""What a run's fingerprint covers; a fingerprint missing any part is incomplete and never adopted."""
_OWN_FILE = ("lock", "run.json")


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """The checkpoint folder of a result path."""
    out = Path(output)
    return out.with_name(f".{out.name}.partial")


def weights_digest(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """SHA-256 over every tensor's name, dtype, shape and exact bytes (None if some tensor has no bytes, e.g. ``meta``).

    Exact bytes, not file names, sizes and times or a sample: a weight changed in place, in memory or
    in one element changes the digest. Cost: one read of the weights (0.71 s for SmolLM2-135M's 683 MB in
    float32 on one core, about 1 GB/s); tensors on an accelerator are copied to the host one at a time.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        if tensor.device.type == "meta":
            return None
        flat = tensor.detach().reshape(-1).contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(flat.cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def run_fingerprint(plan_json: str, pairs: Sequence[PreparedPair], backend: Any, version: str) -> dict[str, str | None]:
    """What determines a run's numbers: the canonical plan, the prompts' token ids, the model's (and
    spliced SAEs') weights, dtype and device, and the atpframework and torch versions."""
    weights = backend.weights()
    tokens = json.dumps([[p.clean, p.noise, p.answer, p.wrong_answer] for p in pairs])
    return {
        "plan": hashlib.sha256(plan_json.encode()).hexdigest(),
        "tokens": hashlib.sha256(tokens.encode()).hexdigest(),
        "weights": None if weights is None else weights_digest(weights),
        "dtype": backend.info.dtype,
        "device": backend.info.device,
        "atpframework": version,
        "torch": torch.__version__,
    }


def is_complete(fingerprint: Any) -> bool:
    """Whether a fingerprint names every part (``FINGERPRINT_PARTS``) with a value."""
    return isinstance(fingerprint, dict) and all(isinstance(fingerprint.get(part), str) for part in FINGERPRINT_PARTS)


class Checkpoint:
    """The sidecar of one output: finished batches by number, under the output's lock.

    ``main``: this process locks the folder and writes ``run.json`` (the others of a distributed run
    only check it). Call ``close()`` (or use ``with``) to release the lock.
    """

    def __init__(self, output: str | os.PathLike[str], fingerprint: dict[str, str | None], main: bool = True) -> None:
        if not is_complete(fingerprint):
            missing = [part for part in FINGERPRINT_PARTS if not isinstance(fingerprint.get(part), str)]
            raise ValueError(f"an incomplete fingerprint (no {', '.join(missing)}) cannot guard a checkpoint")
        self.output = output
        self.folder = sidecar_path(output)
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self._lock = OutputLock(self.folder, output) if main else None
        if self._lock is not None:
            self._lock.__enter__()
        try:
            self._check_folder(write=main)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the output's lock (the folder stays for a later resume)."""
        if self._lock is not None:
            self._lock.release()

    def _check_folder(self, write: bool) -> None:
        foreign = sorted(p.name for p in self.folder.iterdir() if not _ours(p.name)) if self.folder.is_dir() else []
        if foreign:
            raise PlanError(
                f"output: the checkpoint folder {shorten(str(self.folder))} holds files atpframework did not write "
                f"({shorten(', '.join(foreign))}); move them away, then run again"
            )
        stamp = self.folder / "run.json"
        found = _read_stamp(stamp)
        if is_complete(found):
            changed = [part for part in FINGERPRINT_PARTS if found[part] != self.fingerprint[part]]
            if changed:
                raise PlanError(
                    f"output: {shorten(os.fspath(self.output))} has an unfinished run of a different plan, model or version "
                    f"in {shorten(str(self.folder))} (its {', '.join(_PART_NAMES[p] for p in changed)} differ from this run's); "
                    "it cannot be resumed with this plan. Delete that folder to start over, or write to another output"
                )
            return
        if self._batch_files():
            raise PlanError(
                f"output: {shorten(str(self.folder))} holds batches of an unfinished run without a complete fingerprint "
                "(killed while it started, or written by another atpframework version); they cannot be checked, so "
                "they are not resumed. Delete that folder to start over"
            )
        if not write:
            raise PlanError(f"output: the main process wrote no run.json into {shorten(str(self.folder))}")
        write_text_atomically(stamp, json.dumps({"fingerprint": self.fingerprint, "output": os.fspath(self.output)}) + "\n")

    def _batch_files(self) -> list[Path]:
        return sorted(self.folder.glob("batch_*.safetensors")) if self.folder.is_dir() else []

    def _file(self, number: int) -> Path:
        return self.folder / f"batch_{number:06d}.safetensors"

    def finished(self) -> dict[int, BatchOutput]:
        """The batches a previous run of this fingerprint completed."""
        return {int(path.stem.split("_")[1]): self._read(path) for path in self._batch_files()}

    def save(self, number: int, output: BatchOutput) -> None:
        """Record a finished batch (atomically)."""
        tensors, metadata = _tensors(output)
        metadata["fingerprint"] = self.digest
        write_atomically(self._file(number), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def remove(self) -> None:
        """Delete the sidecar's own files, then the folder if nothing else is in it (the result is written)."""
        for path in self._batch_files():
            path.unlink(missing_ok=True)
        for name in _OWN_FILE:
            (self.folder / name).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def _read(self, path: Path) -> BatchOutput:
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            if metadata.get("fingerprint") != self.digest:
                raise PlanError(
                    f"output: checkpointed batch {shorten(str(path))} was written by another run (its fingerprint differs); "
                    f"delete {shorten(str(self.folder))} to start over"
                )
            return _batch_output(load_file(str(path)), metadata)
        except PlanError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable batch is reported the same way
            raise PlanError(
                f"output: checkpointed batch {shorten(str(path))} is unreadable ({shorten(str(err))}); "
                f"delete {shorten(str(self.folder))} to start over"
            ) from None


_PART_NAMES = {
    "plan": "plan", "tokens": "prompt token ids", "weights": "model (or SAE) weights", "dtype": "dtype",
    "device": "device", "atpframework": "atpframework version", "torch": "torch version",
}


def _ours(name: str) -> bool:
    """Files the sidecar writes: its lock, run.json, batches, and the temporary files of atomic writes."""
    return name in _OWN_FILE or (name.startswith("batch_") and name.endswith(".safetensors")) or (
        name.startswith(".") and name.endswith(".tmp")
    )


def _read_stamp(stamp: Path) -> Any:
    try:
        return json.loads(stamp.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _tensors(out: BatchOutput) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {"metric_clean": out.metric_clean.contiguous(), "metric_noise": out.metric_noise.contiguous()}
    names = {"scores": sorted(out.scores), "sparse": sorted(out.sparse), "extras": sorted(out.extras)}
    for i, name in enumerate(names["scores"]):
        tensors[f"scores.{i}"] = out.scores[name].contiguous()
    for i, name in enumerate(names["sparse"]):
        indices, values = out.sparse[name]
        tensors[f"sparse.{i}.indices"], tensors[f"sparse.{i}.values"] = indices.contiguous(), values.contiguous()
    for i, key in enumerate(names["extras"]):
        tensors[f"extras.{i}"] = out.extras[key].contiguous()
    return tensors, {"pair_indices": json.dumps(out.pair_indices), "names": json.dumps(names)}


def _batch_output(tensors: dict[str, Tensor], metadata: dict[str, str]) -> BatchOutput:
    names = json.loads(metadata["names"])
    return BatchOutput(
        pair_indices=json.loads(metadata["pair_indices"]),
        scores={name: tensors[f"scores.{i}"] for i, name in enumerate(names["scores"])},
        sparse={name: (tensors[f"sparse.{i}.indices"], tensors[f"sparse.{i}.values"]) for i, name in enumerate(names["sparse"])},
        extras={key: tensors[f"extras.{i}"] for i, key in enumerate(names["extras"])},
        metric_clean=tensors["metric_clean"],
        metric_noise=tensors["metric_noise"],
    )
