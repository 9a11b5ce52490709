"""The first-order family: ``atp``, ``atp_qkfix``, ``atp_graddrop`` and ``atp_star``.

Every member runs one noise forward (no grad), one clean forward that keeps the graph, and one
backward pass of the sum of per-pair metrics, restricted to the part of the graph between the metric
and the lowest node layer (no weight gradients). Gradients are scored as they arrive at the hooked
sites and never cached.

* ``atp``: ``(n(noise) - n(clean)) . dMetric/dn`` for every node.
* QK fix (``atp_qkfix``, ``atp_star``): query and key nodes are scored by ``attention.py``'s exact
  softmax recomputation when the gradient at their layer's ``attn_z`` arrives; other nodes as ``atp``.
* GradDrop (``atp_graddrop``, ``atp_star``): after the plain backward, one backward pass restarted
  per dropped write that reaches a node (``graddrop.py``), from the write's input down to the lowest
  node layer only. Per pair, ``score = 1/(T-1) * sum_terms |estimate_term|`` with ``T`` terms; the
  terms a write leaves unchanged reuse the plain estimate, and ``atp_star`` reuses each layer's
  recomputed attention change for every term.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .attention import CleanAttention, clean_attention, joint_key_effects, key_effects, key_patch, query_delta_z
from .backend import AbstractBackend, SiteHook
from .engine import BatchRun, BatchScores, CompiledPlan, PassStep
from .errors import BackendError, PlanError
from .graddrop import DropTerm, drop_terms
from .methods import AbstractMethod, noise_forward
from .node import BoundNodes
from .results import GRADDROP_CONVENTION
from .sites import Site

QK_SITES = ("attn_q", "attn_k")
Mode = Literal["grad", "query", "key"]


@dataclass(frozen=True)
class _Layout:
    """What one plan needs hooked and restarted, fixed at compile time."""

    contributors: dict[Site, list[tuple[BoundNodes, Mode]]]
    """Gradient site -> the node selections scored when its gradient arrives, and how."""
    qk_layers: tuple[int, ...]
    value_sites: tuple[Site, ...]
    """Clean activations the QK fix reads (q, k, v at its layers)."""
    floor: tuple[Site, ...]
    """Gradient sites at the lowest layer: the backward passes stop there."""
    terms: tuple[DropTerm, ...]
    active: tuple[int, ...]
    """Indices of the terms whose restarted backward reaches a gradient site, top term first."""
    above_count: dict[Site, int] = field(default_factory=dict)
    """Gradient site -> number of terms that leave its gradient unchanged."""

    @property
    def restart_sites(self) -> tuple[Site, ...]:
        return tuple(sorted({s for t in self.active for s in (*self.terms[t].roots, self.terms[t].cotangent)}))


class FirstOrder(AbstractMethod):
    """Shared engine of the first-order methods (see module docstring)."""

    exact = False
    qk_fix: ClassVar[bool] = False
    graddrop: ClassVar[bool] = False

    def __init__(self, keep_terms: bool = False) -> None:
        self.keep_terms = keep_terms
        """GradDrop: also return every term's signed estimate (``BatchScores.terms``), for inspection and tests."""

    # ------------------------------------------------------------- compile time
    def layout(self, compiled: CompiledPlan) -> _Layout:
        contributors: dict[Site, list[tuple[BoundNodes, Mode]]] = defaultdict(list)
        qk_layers: set[int] = set()
        for b in compiled.bound:
            for layer in sorted({layer for entry in b.layers.entries for layer in entry}):
                site = b.site(layer)
                if self.qk_fix and site.name in QK_SITES and not site.view:
                    contributors[Site("attn_z", layer)].append((b, "query" if site.name == "attn_q" else "key"))
                    qk_layers.add(layer)
                else:
                    contributors[site].append((b, "grad"))
        grad_sites = sorted(contributors)
        low = min(s.layer for s in grad_sites)
        floor = tuple(s for s in grad_sites if s.layer == low)
        values = tuple(Site(name, layer) for layer in sorted(qk_layers) for name in ("attn_q", "attn_k", "attn_v"))
        terms = tuple(drop_terms(compiled.info, self.granularity(compiled))) if self.graddrop else ()
        active = tuple(
            i for i in reversed(range(len(terms))) if any(terms[i].relation(s) == "reached" for s in grad_sites)
        )
        above = {s: sum(t.relation(s) == "above" for t in terms) for s in grad_sites}
        return _Layout(dict(contributors), tuple(sorted(qk_layers)), values, floor, terms, active, above)

    @staticmethod
    def granularity(compiled: CompiledPlan) -> str:
        return getattr(compiled.plan.method, "granularity", "block")

    def validate(self, compiled: CompiledPlan, backend: AbstractBackend) -> None:
        layout = self.layout(compiled)
        needed = {s.name for s in (*layout.contributors, *layout.value_sites, *layout.restart_sites)}
        missing = needed - backend.supported_sites
        if missing:
            raise PlanError(f"method.name: {self.name} needs site(s) {sorted(missing)}, which the {backend.name} backend does not serve")
        for layer in layout.qk_layers:
            reason = backend.attention_unsupported(layer)
            if reason:
                raise PlanError(
                    f"method.name: {self.name} recomputes the attention pattern for the query/key nodes at layer {layer}, "
                    f"which is not supported here: {reason}. Use 'atp' or 'atp_graddrop' for these nodes."
                )
        if self.graddrop and len(layout.terms) < 2:
            raise PlanError(
                f"method.granularity: {self.name} needs at least two residual writes to drop; this model has "
                f"{len(layout.terms)} at granularity {self.granularity(compiled)!r}"
                + (" (use 'sublayer')" if compiled.info.d_mlp is not None else "")
            )

    def schedule(self, compiled: CompiledPlan) -> list[PassStep]:
        layout = self.layout(compiled)
        grad_sites = tuple(sorted(layout.contributors))
        steps = [
            PassStep("noise_forward", "forward", 1, "noise prompts", compiled.sites, "capture activations (no grad)"),
            PassStep(
                "clean_forward", "forward", 1, "clean prompts",
                tuple(sorted({*grad_sites, *layout.value_sites, *layout.restart_sites})), "capture activations, keep graph",
            ),
            PassStep(
                "clean_backward", "backward", 1, "clean prompts", grad_sites,
                f"d(sum of per-pair metric)/d(site) down to layer {layout.floor[0].layer}, scored on arrival",
            ),
        ]
        if layout.qk_layers:
            steps.append(
                PassStep(
                    "qk_recompute", "attention", len(layout.qk_layers), "clean prompts", layout.value_sites,
                    "attention softmax recomputed for query/key nodes (one QK^T-sized product per node type and layer)",
                )
            )
        if self.graddrop:
            n_layers = compiled.info.n_layers
            low = layout.floor[0].layer
            # a restart from block l's input runs back through blocks low..l-1; from mid-block, half a block more
            blocks = sum(
                layout.terms[t].layer - low + (0.5 if layout.terms[t].roots[-1].name != "resid" else 0)
                for t in layout.active
            )
            steps.append(
                PassStep(
                    "graddrop_backward", "partial_backward", len(layout.active), "clean prompts", layout.restart_sites,
                    f"one backward restarted below each dropped write that reaches a node ({len(layout.terms)} terms, "
                    f"{len(layout.active)} restarted): about {blocks:g} block-backwards, "
                    f"~{blocks / n_layers:.1f} full backward passes",
                    forward_equivalents=2.0 * blocks / n_layers,
                )
            )
        return steps

    # ------------------------------------------------------------------ run time
    def run_batch(self, run: BatchRun) -> BatchScores:
        layout = self.layout(run.compiled)
        noise_acts, metric_noise = noise_forward(run)
        scores = _Scores(run.batch.bound, run.clean_tokens.shape[0], run.backend.device, layout, self.keep_terms)
        tensors: dict[Site, Tensor] = {}
        values: dict[Site, Tensor] = {}
        deltas: dict[Site, Tensor] = {}
        plain_grads: dict[Site, Tensor] = {}
        leaves: list[Tensor] = []
        cotangents = {layout.terms[t].cotangent for t in layout.active}
        state: dict[str, object] = {"term": None, "fired": set()}
        attention = _AttentionCache(run, noise_acts, values, layout)

        def on_grad(site: Site, grad: Tensor) -> None:
            term = state["term"]
            state["fired"].add(site)  # type: ignore[attr-defined]
            for b, mode in layout.contributors[site]:
                if mode == "grad":
                    effect = b.node.elementwise_effect(deltas[site], grad)
                else:
                    effect = attention.effect(b, mode, site.layer, grad)
                scores.add(b, site, term, b.reduce(effect).float().to(scores.device))  # type: ignore[arg-type]

        def gradient_hook(site: Site) -> SiteHook:
            def hook(act: Tensor) -> Tensor | None:
                replacement = None
                if not act.requires_grad:  # frozen weights or a detached input: make this site a leaf of the graph
                    act = replacement = act.detach().requires_grad_(True)
                    leaves.append(act)  # not downstream of the floor: the backward passes must ask for it
                tensors[site] = act
                if any(mode == "grad" for _, mode in layout.contributors[site]):
                    deltas[site] = noise_acts[site] - act.detach()
                act.register_hook(lambda grad: on_grad(site, grad))
                return replacement

            return hook

        def keep_hook(site: Site) -> SiteHook:
            def keep_plain_grad(grad: Tensor) -> None:
                if state["term"] is None:
                    plain_grads[site] = grad

            def hook(act: Tensor) -> None:
                tensors[site] = act
                if site in cotangents:
                    act.register_hook(keep_plain_grad)

            return hook

        def value_hook(site: Site) -> SiteHook:
            def hook(act: Tensor) -> None:
                values[site] = act.detach()

            return hook

        hooks: dict[Site, list[SiteHook]] = defaultdict(list)
        for site in layout.contributors:
            hooks[site].append(gradient_hook(site))
        for site in layout.value_sites:
            hooks[site].append(value_hook(site))
        for site in layout.restart_sites:
            hooks[site].append(keep_hook(site))

        with torch.enable_grad():
            logits = run.backend.forward(run.clean_tokens, hooks)
            metric_clean = run.metric(logits, run.metric_inputs(run.clean_tokens))
            if not metric_clean.requires_grad:
                raise BackendError("the metric does not depend on any hooked activation (no gradient path)")
            floor = [tensors[s] for s in layout.floor]
            floor += [leaf for leaf in leaves if all(leaf is not t for t in floor)]
            torch.autograd.grad(metric_clean.sum(), floor, retain_graph=bool(layout.active), allow_unused=True)
            _check_arrivals(set(layout.contributors), state["fired"], "")  # type: ignore[arg-type]
            for n, t in enumerate(layout.active):
                term = layout.terms[t]
                if term.cotangent not in plain_grads:
                    raise BackendError(f"GradDrop: no gradient arrived at {term.cotangent}, needed to restart below {term.label}")
                state["term"], state["fired"] = t, set()
                roots = [tensors[s] for s in term.roots if tensors[s].requires_grad]  # frozen weights: some roots are constants
                grads = [plain_grads[term.cotangent].to(root.device) for root in roots]  # multi-device: a layer's own device
                last = n == len(layout.active) - 1
                torch.autograd.grad(roots, floor, grads, retain_graph=not last, allow_unused=True)
                expected = {s for s in layout.contributors if term.relation(s) == "reached"}
                _check_arrivals(expected, state["fired"], f" with {term.label} dropped")  # type: ignore[arg-type]
                attention.release_from(term.layer)  # later (lower) terms never reach this layer's attention
        return BatchScores(scores.result(), metric_clean.detach(), metric_noise, scores.per_term if self.keep_terms else None)


def _check_arrivals(expected: set[Site], fired: set[Site], context: str) -> None:
    missing = expected - fired
    if missing:
        raise BackendError(
            "no gradient arrived at site(s) " + ", ".join(str(s) for s in sorted(missing)) + context
            + " (a later hook may have replaced the activation, or the metric does not depend on it)"
        )
    unexpected = fired - expected
    if unexpected:
        raise BackendError(
            "GradDrop: gradient arrived at site(s) " + ", ".join(str(s) for s in sorted(unexpected)) + context
            + ", which that term should leave unchanged; the backend's residual stream does not match the block structure"
        )


class _Scores:
    """Per-pair score accumulators: signed sums, or GradDrop's sum of per-term magnitudes."""

    def __init__(
        self, bound: tuple[BoundNodes, ...], n_batch: int, device: torch.device, layout: _Layout, keep_terms: bool
    ) -> None:
        self.layout = layout
        self.device = device
        self.terms = layout.terms
        self.totals = {b.name: torch.zeros((n_batch,) + b.shape, device=device) for b in bound}
        # a node spanning several layers sums several sites per term before the magnitude is taken
        self.per_term = {
            b.name: torch.zeros((len(self.terms), n_batch) + b.shape, device=device)
            for b in bound
            if self.terms and (keep_terms or any(len(e) > 1 for e in b.layers.entries))
        }

    def add(self, b: BoundNodes, site: Site, term: int | None, effect: Tensor) -> None:
        for entry in b.layer_entries(site.layer):
            if not self.terms:
                self.totals[b.name][:, entry] += effect
            elif b.name in self.per_term:
                targets = [term] if term is not None else [i for i, t in enumerate(self.terms) if t.relation(site) == "above"]
                for i in targets:
                    self.per_term[b.name][i, :, entry] += effect
            elif term is None:
                self.totals[b.name][:, entry] += self.layout.above_count[site] * effect.abs()
            else:
                self.totals[b.name][:, entry] += effect.abs()

    def result(self) -> dict[str, Tensor]:
        if not self.terms:
            return self.totals
        norm = len(self.terms) - 1
        out = {name: total / norm for name, total in self.totals.items()}
        out.update({name: terms.abs().sum(dim=0) / norm for name, terms in self.per_term.items()})
        return out


class _AttentionCache:
    """Per layer, the clean attention and the patched changes of the QK fix, computed once per batch."""

    def __init__(self, run: BatchRun, noise_acts: dict[Site, Tensor], values: dict[Site, Tensor], layout: _Layout) -> None:
        self.run, self.noise, self.values = run, noise_acts, values
        self.layers: dict[int, dict[str, object]] = {}

    def _layer(self, layer: int) -> dict[str, object]:
        if layer not in self.layers:
            q, k, v = (_upcast(self.values[Site(name, layer)]) for name in ("attn_q", "attn_k", "attn_v"))
            with torch.no_grad():
                logits = self.run.backend.attention_logits(layer, q, k)
            self.layers[layer] = {"clean": clean_attention(logits, v), "q": q, "k": k}
        return self.layers[layer]

    def _derived(self, layer: int, key: str) -> Tensor:
        cache = self._layer(layer)
        if key not in cache:
            clean: CleanAttention = cache["clean"]  # type: ignore[assignment]
            backend, q, k = self.run.backend, cache["q"], cache["k"]
            with torch.no_grad():
                if key == "query_dz":
                    noise_q = _upcast(self.noise[Site("attn_q", layer)])
                    cache[key] = query_delta_z(clean, backend.attention_logits(layer, noise_q, k))
                else:
                    noise_k = _upcast(self.noise[Site("attn_k", layer)])
                    cache["key_logits"] = logits = backend.attention_logits(layer, q, noise_k)
                    cache["key_patch"] = key_patch(clean, logits)
        return cache[key]  # type: ignore[return-value]

    def effect(self, b: BoundNodes, mode: Mode, layer: int, dz: Tensor) -> Tensor:
        """Effect per (position, head) entry of a query or key node selection at ``layer`` for gradient ``dz``."""
        dz = _upcast(dz)
        if mode == "query":
            return (self._derived(layer, "query_dz") * dz).sum(-1)
        clean: CleanAttention = self._layer(layer)["clean"]  # type: ignore[assignment]
        patch = self._derived(layer, "key_patch")
        pos_axis = b.axes[b.node.index_dims.index("pos")]
        if pos_axis.labels == "all":  # keys patched jointly: rows recomputed with every key patched
            joint = joint_key_effects(clean, self._layer(layer)["key_logits"], dz)  # type: ignore[arg-type]
            out = torch.zeros(dz.shape[0], dz.shape[1], joint.shape[-1], device=dz.device)
            out[:, 0] = joint
            return out
        return key_effects(clean, patch, dz)  # type: ignore[arg-type]

    def release_from(self, layer: int) -> None:
        """Forget the layers at or above ``layer``."""
        for cached in [l for l in self.layers if l >= layer]:
            del self.layers[cached]


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 models recompute attention in fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Atp(FirstOrder):
    name = "atp"


class AtpQkfix(FirstOrder):
    name = "atp_qkfix"
    qk_fix = True


class AtpGradDrop(FirstOrder):
    name = "atp_graddrop"
    graddrop = True
    sign_convention = GRADDROP_CONVENTION


class AtpStar(FirstOrder):
    name = "atp_star"
    qk_fix = True
    graddrop = True
    sign_convention = GRADDROP_CONVENTION


FIRST_ORDER_METHODS: tuple[FirstOrder, ...] = (Atp(), AtpQkfix(), AtpGradDrop(), AtpStar())
