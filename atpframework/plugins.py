"""Plugin discovery: one registry for every kind of plugin, found through entry points, built-ins included.

Kinds, their entry-point groups and the contract each plugin honours:

=================== ============================== ===================================================
kind                entry-point group              a plugin is
=================== ============================== ===================================================
``backends``        ``atpframework.backends``      a subclass of ``backend.AbstractBackend``; ``name`` = entry name
``nodes``           ``atpframework.nodes``         a subclass of ``node.AbstractNode``; ``kind`` = entry name
``methods``         ``atpframework.methods``       a subclass of ``methods.AbstractMethod``; ``name`` = entry name
``hf_architectures`` ``atpframework.hf_architectures`` a ``backends.huggingface.ArchitectureAdapter`` subclass;
                                                   the entry name is a ``config.model_type``
=================== ============================== ===================================================

Listing a group never imports a plugin; a plugin module is imported only when a plan names it.
``register()`` adds a class by hand (notebooks, tests) without an installed distribution. This module
sits below everything it loads: it names each contract's base class by its import path, so it imports
no other part of the package.

A plugin is checked when it loads or is registered: it must subclass its contract's base class and
declare its entry-point name, and a base class with a ``plugin_problems(name)`` classmethod (node
types, methods) lists what else is wrong with it (a spec whose ``kind`` is another name, an unknown
site or axis...). A broken plugin raises ``PluginError`` naming it, its class and every problem.
"""

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from atpframework.errors import PluginError


@dataclass(frozen=True)
class Contract:
    """What a plugin of one kind must be."""

    group: str
    """Entry-point group."""
    base: str
    """``module:Class`` that every plugin of the kind subclasses."""
    name_attribute: str | None
    """Class attribute that must equal the entry-point name (None: the kind has none)."""


CONTRACTS: dict[str, Contract] = {
    "backends": Contract("atpframework.backends", "atpframework.model.backend:AbstractBackend", "name"),
    "nodes": Contract("atpframework.nodes", "atpframework.model.node:AbstractNode", "kind"),
    "methods": Contract("atpframework.methods", "atpframework.methods.base:AbstractMethod", "name"),
    "hf_architectures": Contract("atpframework.hf_architectures", "atpframework.backends.huggingface:ArchitectureAdapter", None),
}
GROUPS: dict[str, str] = {kind: contract.group for kind, contract in CONTRACTS.items()}
"""Plugin kind -> entry-point group name."""

_registered: dict[str, dict[str, type]] = {kind: {} for kind in CONTRACTS}
_loaded: dict[str, dict[str, type]] = {kind: {} for kind in CONTRACTS}


def _entry_points(kind: str) -> dict[str, EntryPoint]:
    """The kind's entry points by name, first declaration first (the order a distribution lists them)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUPS[kind]):
        found.setdefault(ep.name, ep)
    return found


def available(kind: str) -> list[str]:
    """Names of every installed or registered plugin of ``kind``, without importing any: sorted for nodes,
    backends and architectures; for methods in the order their distributions declare them."""
    installed = _entry_points(kind)
    names = list(installed) + [n for n in _registered[kind] if n not in installed]
    return names if kind == "methods" else sorted(names)


def register(kind: str, name: str, cls: type) -> None:
    """Make ``cls`` available under ``name`` for this process (an alternative to an entry point);
    ``PluginError`` if it is not a valid plugin of ``kind``."""
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
                f"unknown {_singular(kind)} {name!r}; installed: {', '.join(available(kind)) or 'none'} "
                f"(third-party {kind} register under the entry-point group {GROUPS[kind]!r})"
            )
        try:
            cls = eps[name].load()
        except Exception as err:  # a broken plugin must not look like a missing one
            raise PluginError(f"{_singular(kind)} plugin {name!r} ({eps[name].value}) failed to import: {err}") from err
        _check_class(kind, name, cls, origin=eps[name].value)
    _loaded[kind][name] = cls
    return cls


def _singular(kind: str) -> str:
    return {"hf_architectures": "architecture adapter"}.get(kind, kind[:-1])


def _check_class(kind: str, name: str, cls: Any, origin: str | None = None) -> None:
    """``PluginError`` unless ``cls`` is a valid plugin ``name`` of ``kind``; ``origin`` is the entry
    point's value (``module:Class``), shown with the class in messages."""
    contract = CONTRACTS[kind]
    module, _, qualname = contract.base.partition(":")
    base = getattr(import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{_singular(kind)} plugin {name!r} is {cls!r}, not a subclass of {base.__qualname__}")
    where = origin or f"{cls.__module__}:{cls.__qualname__}"
    if contract.name_attribute is not None:
        declared = getattr(cls, contract.name_attribute, None)
        if declared is None:
            raise PluginError(
                f"{_singular(kind)} plugin {name!r} ({where}) declares no {contract.name_attribute!r}; "
                f"it must be the entry-point name {name!r}"
            )
        if declared != name:
            raise PluginError(
                f"{_singular(kind)} plugin registered as {name!r} declares the name {declared!r}; they must match ({where})"
            )
    plugin_problems: Callable[[str], list[str]] | None = getattr(cls, "plugin_problems", None)  # the contract's own checks
    if plugin_problems is not None:
        problems = plugin_problems(name)
        if problems:
            raise PluginError(f"{_singular(kind)} plugin {name!r} ({where}) is broken: " + "; ".join(problems))
