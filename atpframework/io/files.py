"""Atomic file writes: every file atpframework writes (results, tables, plots) appears whole or not at all."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The parent folder is created. On any error the temporary file is removed and an existing file at
    ``path`` is left untouched. The file gets the usual permissions (``0o666`` minus the umask).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return write_atomically(path, write)
