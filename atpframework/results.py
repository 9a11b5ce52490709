"""Attribution results: the typed in-memory result and its safetensors file format.

File layout (spec in ``docs/result-format.md``): tensors ``scores.<name>`` (``pair layer *axes``,
float32, per-pair effects as ``atpf.sign_convention`` says; or sparse: ``scores.<name>.indices`` and
``scores.<name>.values`` in COO form), ``metric.clean`` and ``metric.noise`` (``pair``),
``tokens.clean`` and ``tokens.noise`` (``pair pos``, int64, right-padded with -1) and
``tokens.length`` (``pair``); optional ``extras.<name>.<statistic>`` (``pair layer *axes``, e.g.
standard errors) and, after ``atpf verify``, ``verified.<name>.index`` / ``.rank`` (``verified``,
int64 flat node indices and their place in the verification order) and ``verified.<name>.effects``
(``pair verified``, exact effects); string metadata under ``atpf.*`` keys. Files are written atomically
(a temporary file in the same directory, then ``os.replace``).
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import SchemaError
from .files import write_atomically

RESULT_SCHEMA = "atpf.result"
"""Schema id written to ``atpf.schema``."""
RESULT_SCHEMA_VERSION = 3
"""Schema version written to ``atpf.schema_version``; files with a newer version are refused.
2 added sparse score tensors (``scores.<name>.indices`` / ``.values``); 3 added ``extras.*``,
``verified.*`` and ``atpf.verification``. Older files read unchanged."""
SIGN_CONVENTION = "effect = metric(clean run with node <- its noise-run value) - metric(clean run)"
"""What the per-pair scores of signed methods (``activation_patching``, ``atp``, ``atp_qkfix``) are."""
GRADDROP_CONVENTION = (
    "score = 1/(T-1) * sum over the T dropped residual-stream writes of |first-order estimate of the effect "
    "with that write stop-gradiented|, non-negative; effect = metric(clean run with node <- its noise-run value) - metric(clean run)"
)
"""What the per-pair scores of ``atp_graddrop`` and ``atp_star`` are."""

Aggregate = Literal["mean_abs", "mean"]
"""How per-pair scores combine: mean of absolute values (the paper's convention) or signed mean."""


@dataclass(frozen=True)
class NodeScores:
    """Scores of one plan node selection."""

    name: str
    kind: str
    dims: tuple[str, ...]
    """Axis names of ``per_pair``: ``pair`` then ``layer`` then the node type's index axes."""
    index: dict[str, list[int] | str]
    """Per axis after ``pair``: the model index of each entry, or ``"all"`` (summed into one entry)."""
    per_pair: Tensor
    """Score per pair and node (``atpf.sign_convention``); a sparse COO tensor when the selection kept
    only its top entries (``keep_top``)."""

    def aggregate(self, how: Aggregate = "mean_abs") -> Tensor:
        """Combine pairs: ``mean_abs`` (default) or signed ``mean``; shape ``layer *axes``.

        Sparse scores (``keep_top``) count the entries that were not kept as 0."""
        if how not in ("mean_abs", "mean"):
            raise ValueError(f"aggregate: allowed: 'mean_abs', 'mean' (got {how!r})")
        values = self.per_pair.abs() if how == "mean_abs" else self.per_pair
        if values.is_sparse:
            return torch.sparse.sum(values, dim=0).to_dense() / values.shape[0]
        return values.mean(dim=0)


@dataclass(frozen=True)
class VerifiedNodes:
    """Exact effects of some nodes of one selection, measured after the run (``atpf verify``)."""

    index: Tensor
    """``verified``: flat indices into the selection's ``layer *axes``."""
    rank: Tensor
    """``verified``: each node's place in the verification order (0 first, across all selections)."""
    effects: Tensor
    """``pair verified``: metric(clean with the node patched) - metric(clean)."""


@dataclass(frozen=True)
class TopNode:
    """One row of ``AttributionResult.top_k``."""

    name: str
    kind: str
    coords: dict[str, int | str]
    """Model index per axis (``"all"`` for summed axes)."""
    score: float
    """The aggregate score used for ranking."""
    signed_mean: float

    def label(self) -> str:
        parts = []
        for dim, value in self.coords.items():
            short = {"layer": "L", "head": "H", "pos": "P", "neuron": "N"}.get(dim, dim)
            parts.append(f"{short}{value}" if value != "all" else f"{short}*")
        return f"{self.name} " + " ".join(parts)


@dataclass(frozen=True)
class AttributionResult:
    """Per-pair node effects with everything needed to reproduce and interpret them."""

    nodes: dict[str, NodeScores]
    metric_clean: Tensor
    """``pair``: metric on the clean prompt."""
    metric_noise: Tensor
    """``pair``: metric on the noise prompt."""
    clean_tokens: list[list[int]]
    noise_tokens: list[list[int]]
    plan_json: str
    """Canonical plan JSON."""
    method: str
    metric: str
    model: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    sign_convention: str = SIGN_CONVENTION
    """What the per-pair scores mean (``SIGN_CONVENTION`` or ``GRADDROP_CONVENTION``)."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Per-node statistics beside the scores: ``"<name>.<statistic>"`` -> ``pair layer *axes``."""
    verified: dict[str, VerifiedNodes] = field(default_factory=dict)
    """Exact effects of verified nodes, by selection name."""
    verification: dict[str, Any] = field(default_factory=dict)
    """How the verification ran (order, budget, stop reason, threshold, passes)."""

    @property
    def plan(self) -> dict[str, Any]:
        return json.loads(self.plan_json)

    def scores(self, name: str, how: Aggregate = "mean_abs") -> Tensor:
        """Aggregated scores of one node selection, shape ``layer *axes``."""
        return self[name].aggregate(how)

    def __getitem__(self, name: str) -> NodeScores:
        if name not in self.nodes:
            raise KeyError(f"no node selection {name!r} in this result; have: {', '.join(self.nodes)}")
        return self.nodes[name]

    def top_k(self, k: int = 10, how: Aggregate = "mean_abs", names: list[str] | None = None) -> list[TopNode]:
        """The ``k`` nodes with the largest ``|score|`` across the chosen selections (all by default)."""
        rows: list[TopNode] = []
        for name in names or list(self.nodes):
            ns = self[name]
            agg = ns.aggregate(how)
            signed = ns.aggregate("mean")
            flat = agg.flatten()
            order = flat.abs().argsort(descending=True)[:k]
            for i in order.tolist():
                coords = torch.unravel_index(torch.tensor(i), agg.shape)
                rows.append(
                    TopNode(
                        name,
                        ns.kind,
                        {dim: _label(ns.index[dim], int(c)) for dim, c in zip(ns.dims[1:], coords)},
                        float(flat[i]),
                        float(signed.flatten()[i]),
                    )
                )
        rows.sort(key=lambda r: -abs(r.score))
        return rows[:k]

    def to_dataframe(self, how: Aggregate = "mean_abs") -> Any:
        """A pandas DataFrame with one row per node: selection, kind, coordinates, score, signed mean."""
        import pandas as pd

        records = []
        for name, ns in self.nodes.items():
            agg = ns.aggregate(how).flatten()
            signed = ns.aggregate("mean").flatten()
            shape = ns.per_pair.shape[1:]
            for i in range(agg.numel()):
                coords = torch.unravel_index(torch.tensor(i), shape)
                row: dict[str, Any] = {"name": name, "kind": ns.kind}
                row.update({dim: _label(ns.index[dim], int(c)) for dim, c in zip(ns.dims[1:], coords)})
                row.update({"score": float(agg[i]), "signed_mean": float(signed[i])})
                records.append(row)
        return pd.DataFrame.from_records(records)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the result as safetensors, atomically; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {}
        layouts: dict[str, dict[str, Any]] = {}
        for name, ns in self.nodes.items():
            per_pair = ns.per_pair.float().cpu()
            if per_pair.is_sparse:
                per_pair = per_pair.coalesce()
                tensors[f"scores.{name}.indices"] = per_pair.indices().contiguous()
                tensors[f"scores.{name}.values"] = per_pair.values().contiguous()
                layouts[name] = {"layout": "sparse_coo", "shape": list(per_pair.shape)}
            else:
                tensors[f"scores.{name}"] = per_pair.contiguous()
                layouts[name] = {"layout": "dense"}
        tensors["metric.clean"] = self.metric_clean.float().contiguous().cpu()
        tensors["metric.noise"] = self.metric_noise.float().contiguous().cpu()
        tensors["tokens.clean"] = _pad(self.clean_tokens)
        tensors["tokens.noise"] = _pad(self.noise_tokens)
        tensors["tokens.length"] = torch.tensor([len(t) for t in self.clean_tokens], dtype=torch.int64)
        for key, value in self.extras.items():
            tensors[f"extras.{key}"] = value.float().contiguous().cpu()
        for name, v in self.verified.items():
            tensors[f"verified.{name}.index"] = v.index.long().contiguous().cpu()
            tensors[f"verified.{name}.rank"] = v.rank.long().contiguous().cpu()
            tensors[f"verified.{name}.effects"] = v.effects.float().contiguous().cpu()
        metadata = {
            "atpf.schema": RESULT_SCHEMA,
            "atpf.schema_version": str(RESULT_SCHEMA_VERSION),
            "atpf.plan": self.plan_json,
            "atpf.method": self.method,
            "atpf.metric": self.metric,
            "atpf.sign_convention": self.sign_convention,
            "atpf.nodes": json.dumps(
                {n: {"kind": ns.kind, "dims": list(ns.dims), "index": ns.index, **layouts[n]} for n, ns in self.nodes.items()}
            ),
            "atpf.model": json.dumps(self.model, sort_keys=True),
            "atpf.versions": json.dumps(self.versions, sort_keys=True),
            "atpf.created": self.created,
            "atpf.verification": json.dumps(self.verification, sort_keys=True),
        }
        return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_result(path: str | Path) -> AttributionResult:
    """Read a result file written by ``AttributionResult.save``; ``SchemaError`` for foreign or newer files."""
    from safetensors import safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except Exception as err:
        raise SchemaError(f"{path}: not a safetensors file ({err})") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("atpf.schema") != RESULT_SCHEMA:
            raise SchemaError(f"{path}: not an atpframework result (no 'atpf.schema' = {RESULT_SCHEMA!r} in its metadata)")
        try:
            file_version = int(meta.get("atpf.schema_version", ""))
        except ValueError:
            raise SchemaError(f"{path}: unreadable atpf.schema_version {meta.get('atpf.schema_version')!r}") from None
        if file_version > RESULT_SCHEMA_VERSION:
            raise SchemaError(
                f"{path}: written with result schema version {file_version}, newer than this atpframework reads "
                f"({RESULT_SCHEMA_VERSION}); upgrade atpframework"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    node_meta = json.loads(meta["atpf.nodes"])
    lengths = tensors["tokens.length"].tolist()
    try:
        nodes = {name: NodeScores(name, m["kind"], tuple(m["dims"]), m["index"], _scores(tensors, name, m)) for name, m in node_meta.items()}
    except (KeyError, RuntimeError) as err:
        raise SchemaError(f"{path}: inconsistent score tensors ({type(err).__name__}: {err})") from None
    return AttributionResult(
        nodes=nodes,
        metric_clean=tensors["metric.clean"],
        metric_noise=tensors["metric.noise"],
        clean_tokens=[row[:n] for row, n in zip(tensors["tokens.clean"].tolist(), lengths)],
        noise_tokens=[row[:n] for row, n in zip(tensors["tokens.noise"].tolist(), lengths)],
        plan_json=meta["atpf.plan"],
        method=meta["atpf.method"],
        metric=meta["atpf.metric"],
        model=json.loads(meta["atpf.model"]),
        versions=json.loads(meta["atpf.versions"]),
        created=meta.get("atpf.created", ""),
        sign_convention=meta.get("atpf.sign_convention", SIGN_CONVENTION),
        extras={k.removeprefix("extras."): v for k, v in tensors.items() if k.startswith("extras.")},
        verified={
            name: VerifiedNodes(tensors[f"verified.{name}.index"], tensors[f"verified.{name}.rank"], tensors[f"verified.{name}.effects"])
            for name in node_meta
            if f"verified.{name}.index" in tensors
        },
        verification=json.loads(meta.get("atpf.verification", "{}")),
    )


def _scores(tensors: dict[str, Tensor], name: str, meta: dict[str, Any]) -> Tensor:
    if meta.get("layout", "dense") == "sparse_coo":
        indices, values = tensors[f"scores.{name}.indices"], tensors[f"scores.{name}.values"]
        return torch.sparse_coo_tensor(indices, values, tuple(meta["shape"]), check_invariants=True).coalesce()
    return tensors[f"scores.{name}"]


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (read from metadata, nothing imported)."""
    out = {}
    for dist in ("atpframework", "torch", "transformer_lens", "transformers", "sae_lens", "safetensors", "pydantic"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _label(index: list[int] | str, position: int) -> int | str:
    return "all" if index == "all" else index[position]  # type: ignore[index]


def _pad(rows: list[list[int]]) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out
