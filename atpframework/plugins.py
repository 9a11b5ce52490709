"""Plugin discovery: backends and node types are found through entry points, built-ins included.

Groups:
    ``atpframework.backends``: subclasses of ``atpframework.backend.AbstractBackend``.
    ``atpframework.nodes``:    subclasses of ``atpframework.node.AbstractNode``.

Listing a group never imports a plugin; a plugin module is imported only when a plan names it.
``register()`` adds a class by hand (notebooks, tests) without an installed distribution.
"""

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PluginError

GROUPS: dict[str, str] = {"backends": "atpframework.backends", "nodes": "atpframework.nodes"}
"""Plugin kind -> entry-point group name."""

_registered: dict[str, dict[str, type]] = {kind: {} for kind in GROUPS}
_loaded: dict[str, dict[str, type]] = {kind: {} for kind in GROUPS}


def _entry_points(kind: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def available(kind: str) -> list[str]:
    """Names of every installed or registered plugin of ``kind`` ("backends" or "nodes"), without importing any."""
    return sorted(set(_entry_points(kind)) | set(_registered[kind]))


def register(kind: str, name: str, cls: type) -> None:
    """Make ``cls`` available under ``name`` for this process (an alternative to an entry point)."""
    _check_class(kind, name, cls)
    _registered[kind][name] = cls
    _loaded[kind].pop(name, None)


def unregister(kind: str, name: str) -> None:
    """Undo ``register``."""
    _registered[kind].pop(name, None)
    _loaded[kind].pop(name, None)


def load(kind: str, name: str) -> Any:
    """Import and validate the plugin ``name`` of ``kind``; raise ``PluginError`` listing what is installed."""
    if name in _loaded[kind]:
        return _loaded[kind][name]
    if name in _registered[kind]:
        cls = _registered[kind][name]
    else:
        eps = _entry_points(kind)
        if name not in eps:
            raise PluginError(
                f"unknown {kind[:-1]} {name!r}; installed: {', '.join(available(kind)) or 'none'} "
                f"(third-party {kind} register under the entry-point group {GROUPS[kind]!r})"
            )
        try:
            cls = eps[name].load()
        except Exception as err:  # a broken plugin must not look like a missing one
            raise PluginError(f"{kind[:-1]} plugin {name!r} ({eps[name].value}) failed to import: {err}") from err
        _check_class(kind, name, cls)
    _loaded[kind][name] = cls
    return cls


def _check_class(kind: str, name: str, cls: type) -> None:
    from .backend import AbstractBackend
    from .node import AbstractNode

    base = AbstractBackend if kind == "backends" else AbstractNode
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{kind[:-1]} plugin {name!r} is {cls!r}, not a subclass of {base.__qualname__}")
    declared = cls.name if kind == "backends" else cls.kind
    if declared != name:
        raise PluginError(f"{kind[:-1]} plugin registered as {name!r} declares the name {declared!r}; they must match")
