"""One forward pass's work at its sites: observe or capture activations, patch values, receive gradients.

Everything that does something at a site goes through an ``Intervention``: the noise forward, the
exact patcher, the first-order family's clean pass, the run-time checks and the SAE splice. It alone
turns that work into the site hooks a backend installs, and only for the pass it runs
(``Intervention.run`` / ``run_from``); the backend removes every hook when the pass ends, after
success or an exception (the conformance kit checks it), so no method ever registers or removes a
hook.

At one site the work happens in a fixed order:

1. **patches** replace the activation, in the order they were added;
2. hooks of an outer layer (``site_hooks(inner=...)``: the SAE splice wraps the method's hooks this way);
3. a site that receives gradients becomes a leaf of the graph if nothing upstream requires a gradient
   (frozen weights), so that its gradient still arrives;
4. **observers** see the activation, and **captures** store it (detached, optionally only some
   positions; or in the graph, for a backward pass to start from or stop at);
5. **gradient receivers** are attached to the tensor that flows downstream: each is called with
   ``dMetric/dact`` when a backward pass reaches the site.
"""

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import Tensor

from atpframework.io.progress import note_pass
from atpframework.model.backend import AbstractBackend, SiteHook, apply_site_hooks
from atpframework.model.sites import Site

Patch = Callable[[Tensor], Tensor]
"""Called with the activation at a site; returns its same-shaped replacement."""

Receiver = Callable[[Tensor], None]
"""Called with an activation (an observer) or with the gradient arriving at a site (a gradient receiver)."""


class Intervention:
    """What one pass does at its sites (see module docstring); ``captured`` holds what it stored."""

    def __init__(self) -> None:
        self._patches: dict[Site, list[Patch]] = defaultdict(list)
        self._observers: dict[Site, list[Receiver]] = defaultdict(list)
        self._detached: dict[Site, Tensor | None] = {}
        """Sites captured detached -> the positions kept (None: all)."""
        self._in_graph: set[Site] = set()
        self._receivers: dict[Site, list[Receiver]] = defaultdict(list)
        self.captured: dict[Site, Tensor] = {}
        """Site -> its activation in the last pass run (``batch ...``)."""
        self.leaves: list[Tensor] = []
        """Activations made leaves of the graph in the last pass (sites receiving gradients that nothing
        upstream made require one): a backward pass that must reach them has to ask for them."""

    # ------------------------------------------------------------- what to do
    def patch(self, site: Site, replace: Patch) -> None:
        """Replace the activation at ``site`` by ``replace(act)``."""
        self._patches[site].append(replace)

    def observe(self, site: Site, observer: Receiver) -> None:
        """Call ``observer`` with the activation at ``site`` (after the patches), storing nothing."""
        self._observers[site].append(observer)

    def capture(self, sites: Iterable[Site], *, positions: Tensor | None = None, keep_graph: bool = False) -> dict[Site, Tensor]:
        """Store the activations at ``sites`` in ``captured`` (the dict returned, filled by the pass).

        ``positions``: keep only these positions (the axis after ``batch``) of a detached capture.
        ``keep_graph``: store the tensor itself, in the autograd graph, rather than a detached copy.
        """
        for site in sites:
            if keep_graph:
                if positions is not None:
                    raise ValueError("a capture in the graph keeps every position")
                self._in_graph.add(site)
            elif site not in self._in_graph:
                self._detached[site] = positions
        return self.captured

    def receive_gradient(self, site: Site, receiver: Receiver) -> None:
        """Call ``receiver`` with ``dMetric/dact`` at ``site`` whenever a backward pass reaches it; the
        activation is captured in the graph (``captured[site]`` is what backward passes start from or stop at)."""
        self._receivers[site].append(receiver)
        self.capture([site], keep_graph=True)

    # ------------------------------------------------------------- running it
    @property
    def sites(self) -> set[Site]:
        """Every site this intervention does something at."""
        return {*self._patches, *self._observers, *self._detached, *self._in_graph, *self._receivers}

    def site_hooks(self, inner: Mapping[Site, Sequence[SiteHook]] | None = None) -> dict[Site, list[SiteHook]]:
        """One site hook per site doing this intervention's work there; ``inner`` hooks (of an outer
        layer) run after the patches and before everything else."""
        inner = inner or {}
        self.captured.clear()
        self.leaves.clear()
        return {site: [self._hook(site, inner.get(site, ()))] for site in sorted(self.sites | {s for s, fns in inner.items() if fns})}

    def run(self, backend: AbstractBackend, tokens: Tensor) -> Tensor:
        """Logits ``batch pos vocab`` of one forward pass of ``tokens`` with this intervention applied."""
        logits = backend.forward(tokens, self.site_hooks())
        note_pass()
        return logits

    def run_from(self, backend: AbstractBackend, layer: int, resid: Tensor, tokens: Tensor) -> Tensor:
        """As ``run``, starting at block ``layer`` from the residual stream ``resid`` (``AbstractBackend.forward_from``)."""
        logits = backend.forward_from(layer, resid, tokens, self.site_hooks())
        note_pass()
        return logits

    def _hook(self, site: Site, inner: Sequence[SiteHook]) -> SiteHook:
        patches, observers, receivers = self._patches.get(site, ()), self._observers.get(site, ()), self._receivers.get(site, ())
        in_graph, detached = site in self._in_graph, site in self._detached
        positions = self._detached.get(site)

        def hook(act: Tensor) -> Tensor | None:
            original = act
            for replace in patches:
                act = replace(act)
            act = apply_site_hooks(act, inner)
            if receivers and not act.requires_grad:  # frozen weights or a detached input: make it a leaf
                act = act.detach().requires_grad_(True)
                self.leaves.append(act)
            for observer in observers:
                observer(act)
            if in_graph:
                self.captured[site] = act
            elif detached:
                kept = act.detach()
                self.captured[site] = kept if positions is None else kept.index_select(1, positions.to(kept.device))
            for receiver in receivers:
                act.register_hook(receiver)
            return None if act is original else act

        return hook
