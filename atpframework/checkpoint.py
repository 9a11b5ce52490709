"""Resumable runs: each finished batch is checkpointed next to the output, and a re-run picks them up.

For output ``OUT.safetensors`` the sidecar is the folder ``.OUT.safetensors.partial/`` beside it:

* ``run.json``: the fingerprint of the run (canonical plan JSON and atpframework version). A re-run
  with a different plan or version refuses to resume, naming the folder to delete.
* ``batch_<number>.safetensors``: one finished batch (its CPU score tensors, pair indices in the
  metadata), written atomically, so a run killed at any moment leaves only whole batches.

A re-run of the same plan loads the finished batches, runs the rest, writes the result and removes
the folder. Batches are numbered as the compiled plan numbers them, so processes of a distributed
run can share one sidecar (each writes its own batches).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from .engine import BatchOutput
from .errors import PlanError
from .files import write_atomically, write_text_atomically

__all__ = ["Checkpoint", "sidecar_path"]


def sidecar_path(output: str | Path) -> Path:
    """The checkpoint folder of a result path."""
    out = Path(output)
    return out.with_name(f".{out.name}.partial")


def _fingerprint(plan_json: str, version: str) -> str:
    return hashlib.sha256(json.dumps({"plan": plan_json, "atpframework": version}).encode()).hexdigest()


class Checkpoint:
    """The sidecar of one output: finished batches by number."""

    def __init__(self, output: str | Path, plan_json: str, version: str) -> None:
        self.folder = sidecar_path(output)
        self.fingerprint = _fingerprint(plan_json, version)
        stamp = self.folder / "run.json"
        if stamp.exists():
            found = json.loads(stamp.read_text()).get("fingerprint")
            if found != self.fingerprint:
                raise PlanError(
                    f"output: {output} has an unfinished run of a different plan (or atpframework version) in "
                    f"{self.folder}; it cannot be resumed with this plan. Delete that folder to start over, "
                    f"or write to another output"
                )
        else:
            write_text_atomically(stamp, json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def _file(self, number: int) -> Path:
        return self.folder / f"batch_{number:06d}.safetensors"

    def finished(self) -> dict[int, BatchOutput]:
        """The batches a previous run completed."""
        done = {}
        for path in sorted(self.folder.glob("batch_*.safetensors")):
            done[int(path.stem.split("_")[1])] = _read(path)
        return done

    def save(self, number: int, output: BatchOutput) -> None:
        """Record a finished batch (atomically)."""
        tensors, metadata = _tensors(output)
        write_atomically(self._file(number), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def remove(self) -> None:
        """Delete the sidecar (the result is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _tensors(out: BatchOutput) -> tuple[dict, dict[str, str]]:
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


def _read(path: Path) -> BatchOutput:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    names = json.loads(metadata["names"])
    return BatchOutput(
        pair_indices=json.loads(metadata["pair_indices"]),
        scores={name: tensors[f"scores.{i}"] for i, name in enumerate(names["scores"])},
        sparse={name: (tensors[f"sparse.{i}.indices"], tensors[f"sparse.{i}.values"]) for i, name in enumerate(names["sparse"])},
        extras={key: tensors[f"extras.{i}"] for i, key in enumerate(names["extras"])},
        metric_clean=tensors["metric_clean"],
        metric_noise=tensors["metric_noise"],
    )
