"""Where a run's result goes, and what it may replace.

Three rules keep a received plan from touching files it should not:

* **Resolution.** A plan's ``output`` is a path relative to the plan file's folder (to the working
  directory for a plan given as a dict or object) and must resolve, symlinks followed, inside that
  folder or the working directory. An output given explicitly (``atpf -o``, ``run(output=...)``) is
  the user's own choice and is taken as given.
* **Replacement.** An existing file is replaced only when it is an atpframework result (its
  safetensors header says ``atpf.schema``), or when the caller says ``overwrite``. A folder never is.
* **Exclusion.** One run at a time per output: ``OutputLock`` holds an ``flock`` on a lock file in
  the output's checkpoint folder, so a second run on the same output stops with a clear message,
  and a killed run's lock goes with its process.
"""

import errno
import json
import os
import struct
from pathlib import Path

from atpframework.errors import PlanError, ResourceError, shorten
from atpframework.io.results import RESULT_SCHEMA

_MAX_HEADER = 100 * 2**20
"""Largest safetensors header we read to tell a result file from another file."""


def resolve_output(output: str | os.PathLike[str], plan_path: str | os.PathLike[str] | None) -> Path:
    """The path a plan's ``output`` names: relative to the plan file's folder (or the working directory),
    and inside that folder or the working directory (``PlanError`` naming ``output`` otherwise)."""
    text = os.fspath(output)
    if not text.strip():
        raise PlanError("output: an empty path; give a file name such as 'result.safetensors'")
    base = Path(plan_path).resolve().parent if plan_path is not None else Path.cwd().resolve()
    target = (base / text).resolve()
    allowed = {base, Path.cwd().resolve()}
    if not any(target == root or root in target.parents for root in allowed):
        roots = " or ".join(sorted(str(r) for r in allowed))
        raise PlanError(
            f"output: {shorten(text)} resolves to {shorten(str(target))}, outside {roots}; a plan may only write "
            "inside its own folder or the working directory (give the path on the command line with -o to write elsewhere)"
        )
    return target


def is_result_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file whose metadata marks it as an atpframework result (reads the header only)."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                return False
            (size,) = struct.unpack("<Q", size_bytes)
            if size > _MAX_HEADER:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("atpf.schema") == RESULT_SCHEMA


def check_writable(path: str | os.PathLike[str], overwrite: bool = False, field: str = "output") -> Path:
    """Refuse (``PlanError`` naming ``field``) a target that is a folder, sits below a file, or is an
    existing file other than an atpframework result (unless ``overwrite``)."""
    target = Path(path)
    if target.is_dir():
        raise PlanError(f"{field}: {shorten(str(target))} is a folder; give a file path such as 'result.safetensors'")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PlanError(f"{field}: {shorten(str(parent))} is a file, so nothing can be written below it")
            break
    if target.exists() and not overwrite and not is_result_file(target):
        raise PlanError(
            f"{field}: {shorten(str(target))} exists and is not an atpframework result; refusing to replace it "
            "(choose another path, or pass --overwrite / overwrite=True to replace it)"
        )
    return target


class OutputLock:
    """An exclusive lock on one output for the life of a run (``with OutputLock(folder, output):``).

    The lock file lives in ``folder`` (the output's checkpoint folder, created if missing). Without
    ``fcntl`` (Windows) no lock is taken.
    """

    def __init__(self, folder: Path, output: str | os.PathLike[str]) -> None:
        self.path = folder / "lock"
        self.output = output
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform
            return self
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ResourceError(
                        f"output: another run is writing {shorten(os.fspath(self.output))} right now (its lock is "
                        f"{shorten(str(self.path))}); wait for it to finish, or write to another output"
                    ) from None
                raise
            try:  # the run we waited on may have removed the lock file: lock the one on disk
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
