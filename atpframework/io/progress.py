"""Progress reporting: one way for ``af.run``, verification, the diagnostic and comparisons to say how far they are.

Every long-running entry point takes ``progress: Progress``:

* ``True`` (the default): a ``tqdm.auto`` bar on stderr (a notebook widget in Jupyter) with a
  description of what is running, a count, a rate and an ETA; while a bar is open it also counts the
  passes run (``note_pass``: each forward pass of an ``Intervention``, each backward pass of the AtP
  family), so a long batch is visibly alive;
* ``False`` or ``None``: silent;
* a callable: called with the number of units (prompt pairs, nodes, samples) finished at each step,
  and no bar is drawn (what an outer bar passes to an inner stage, and what a caller with its own
  display uses).
"""

import time
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any

Progress = bool | Callable[[int], None] | None
"""``True``: a bar on stderr; ``False``/``None``: nothing; a callable: called with each step's count."""

_REFRESH_S = 0.5
"""Least time between two redraws of a bar for forward passes alone (between its own steps)."""

_ACTIVE: ContextVar["Bar | None"] = ContextVar("atpf_progress_bar", default=None)


def note_pass() -> None:
    """One forward or backward pass finished: the innermost open bar (if any) shows the count."""
    bar = _ACTIVE.get()
    if bar is not None:
        bar.count_pass()


class Bar:
    """A progress display for one stage: a ``tqdm.auto`` bar, a caller's callable, or nothing (see module docstring).

    Use as a context manager; ``update(n)`` after each step of ``n`` units.
    """

    def __init__(self, progress: Progress, total: int, desc: str, unit: str) -> None:
        progress = check_progress(progress)
        self._callback: Callable[[int], None] | None = progress if callable(progress) else None
        self._tqdm: Any = None
        self._passes = 0
        self._drawn = 0.0
        if progress is True:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)
        self._token: Any = None

    def __enter__(self) -> "Bar":
        if self._tqdm is not None:
            self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None
        if self._tqdm is not None:
            self._tqdm.close()

    def update(self, n: int) -> None:
        """``n`` more units are done."""
        if self._callback is not None:
            self._callback(n)
        if self._tqdm is not None:
            self._tqdm.update(n)

    def count_pass(self) -> None:
        """One more pass ran; redrawn at most every ``_REFRESH_S`` seconds."""
        self._passes += 1
        self._tqdm.set_postfix_str(f"{self._passes} pass{'' if self._passes == 1 else 'es'}", refresh=False)
        now = time.monotonic()
        if now - self._drawn >= _REFRESH_S:
            self._drawn = now
            self._tqdm.refresh()


def check_progress(progress: Any) -> Progress:
    """``progress`` if it is a ``Progress``, else a ``TypeError`` saying what is allowed."""
    if progress is None or isinstance(progress, bool) or callable(progress):
        return progress
    raise TypeError(f"progress: expected True, False or a callable taking a count, got {type(progress).__name__}")
