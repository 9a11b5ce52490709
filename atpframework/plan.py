"""The declarative ``AttributionPlan``: what to attribute, on which model, with which method.

Plans are pydantic models with ``extra="forbid"``: unknown keys are errors. Node selections are a
discriminated union over the installed node types, built when a plan is loaded, so a third-party
node type validates exactly like a built-in one. Loading is two-phase: read the raw JSON, import the
plugins it names, then validate the whole plan. Errors carry the JSON location (``nodes[1].heads``)
and the allowed values.
"""

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from . import plugins
from .chunking import parse_bytes
from .errors import PlanError, PluginError
from .node import NodeSpec

PLAN_SCHEMA = "atpf.plan/1"
"""Schema id of the plan format this version reads and writes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which model, loaded by which backend."""

    source: str
    """``bundled:smollm2-135m-instruct``, a local Hugging Face directory, a hub name, or ``in_memory``
    (the Python API passes the model object)."""
    backend: str = "transformer_lens"
    """A backend entry-point name (``atpframework.backends`` group)."""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific options (e.g. ``{"model_class": "bridge"}`` for the TransformerLens backend)."""


class SaeSpec(_Strict):
    """An SAE (or transcoder) spliced into the model; ``sae_latent`` / ``sae_error`` nodes name it."""

    name: str
    path: str | None = None
    """A local sae_lens directory (``cfg.json`` + ``sae_weights.safetensors``)."""
    release: str | None = None
    """A sae_lens pretrained release (with ``sae_id``), loaded from the hub."""
    sae_id: str | None = None
    site: str | None = None
    """Where it attaches (a site name such as ``resid``); default: from the SAE's recorded ``hook_name``."""
    site_layer: int | None = None
    output_site: str | None = None
    """Transcoders: where they write; default: from the recorded ``hook_name_out``."""
    output_site_layer: int | None = None
    error_gradient: Literal["pass_through", "detached"] = "pass_through"
    """``pass_through``: upstream gradients equal the unmodified model's; ``detached``: the error term is a constant."""

    @model_validator(mode="after")
    def _one_source(self) -> "SaeSpec":
        if self.path is not None and self.release is not None:
            raise ValueError("give either path or release/sae_id, not both")
        if (self.release is None) != (self.sae_id is None):
            raise ValueError("release and sae_id go together")
        return self


class PromptPair(_Strict):
    """One clean prompt and its noise counterfactual; both must tokenize to the same length."""

    clean: str | list[int]
    """Text, or token ids."""
    noise: str | list[int]
    answer: str | int | None = None
    """The correct next token (text of exactly one token, or an id); needed by answer metrics."""
    wrong_answer: str | int | None = None
    """The competing token for ``logit_diff``."""


class MetricSpec(_Strict):
    """The scalar, per pair, whose change we attribute."""

    name: Literal["logit_diff", "logprob", "prob", "cross_entropy", "custom"] = "logit_diff"
    """``logit_diff``: logit(answer) - logit(wrong_answer); ``logprob``/``prob``: of the answer;
    ``cross_entropy``: mean next-token loss over the prompt; ``custom``: a callable given to the Python API."""
    position: int = -1
    """Position whose logits the answer metrics read."""


class AtpMethod(_Strict):
    """Attribution patching: (noise - clean) . dMetric/dact, one clean forward, one noise forward, one backward."""

    name: Literal["atp"]


class AtpQkfixMethod(_Strict):
    """AtP with the QK fix: query and key nodes get the attention softmax recomputed exactly under the patch."""

    name: Literal["atp_qkfix"]


class AtpGradDropMethod(_Strict):
    """AtP with GradDrop: per pair, the mean over dropped residual writes of |AtP with that write stop-gradiented|."""

    name: Literal["atp_graddrop"]
    granularity: Literal["block", "sublayer"] = "block"
    """``block``: drop each transformer block's write (attention + MLP); ``sublayer``: attention and MLP writes separately."""


class AtpStarMethod(_Strict):
    """AtP*: the QK fix and GradDrop together."""

    name: Literal["atp_star"]
    granularity: Literal["block", "sublayer"] = "block"
    """As for ``atp_graddrop``."""


class ActivationPatchingMethod(_Strict):
    """Exact activation patching: one patched forward per node (``nodes_per_pass`` nodes batched per pass)."""

    name: Literal["activation_patching"]
    nodes_per_pass: int = Field(16, ge=1)
    """How many nodes share one forward pass (each as its own batch rows)."""
    skip_layers: bool = True
    """Start each pass from the clean run's cached residual stream at the lowest layer it patches
    (False: recompute every block from the embeddings; same results, slower)."""


class SubsamplingMethod(_Strict):
    """Baseline: random subsets patched jointly; a node scores the difference of the mean effects of the
    subsets that include and exclude it."""

    name: Literal["subsampling"]
    samples: int = Field(256, ge=4)
    """Subsets per prompt pair (= forward passes per pair)."""
    p: float = Field(0.5, gt=0.0, lt=1.0)
    """Probability that a subset includes a node."""
    seed: int = 0
    sets_per_pass: int = Field(16, ge=1)
    """How many subsets share one forward pass."""


class BlocksMethod(_Strict):
    """Baseline: contiguous blocks of nodes patched jointly; a node scores its block's effect."""

    name: Literal["blocks"]
    block_size: int = Field(16, ge=1)
    sets_per_pass: int = Field(16, ge=1)


class HierarchicalMethod(_Strict):
    """Baseline: coarse-to-fine; the group with the largest effect is split until ``budget`` groups were patched."""

    name: Literal["hierarchical"]
    budget: int = Field(256, ge=1)
    """Groups patched per prompt pair (= forward passes per pair)."""
    branching: int = Field(4, ge=2)
    sets_per_pass: int = Field(16, ge=1)


MethodSpec = Annotated[
    Union[
        AtpMethod, AtpQkfixMethod, AtpGradDropMethod, AtpStarMethod, ActivationPatchingMethod,
        SubsamplingMethod, BlocksMethod, HierarchicalMethod,
    ],
    Field(discriminator="name"),
]
METHOD_NAMES = ("atp", "atp_qkfix", "atp_graddrop", "atp_star", "activation_patching", "subsampling", "blocks", "hierarchical")


class AttributionPlan(_Strict):
    """A complete attribution run. Subclassed at load time with the installed node types."""

    schema_: Literal["atpf.plan/1"] = Field(PLAN_SCHEMA, alias="schema")
    """Plan format id."""
    model: ModelSpec
    saes: list[SaeSpec] = Field(default_factory=list)
    """SAEs spliced into the model for ``sae_latent`` / ``sae_error`` nodes."""
    prompts: list[PromptPair] = Field(min_length=1)
    prepend_bos: bool | None = None
    """Prepend the BOS token to text prompts (None: the model's default)."""
    metric: MetricSpec = MetricSpec()
    nodes: list[NodeSpec] = Field(min_length=1)
    method: MethodSpec
    batch_size: int = Field(8, ge=1)
    """Prompt pairs per pass (at most; ``max_memory`` may choose fewer)."""
    max_memory: int | str | None = None
    """Working-memory budget of one pass (activations, autograd graph, the method's caches; not the
    weights), in bytes or with a unit (``"8GiB"``, ``"500MB"``). The engine then runs fewer pairs per
    pass and, for the first-order methods, node positions in chunks, with unchanged scores
    (``chunking.py``). None: no budget."""
    output: str | None = None
    """Result path (``.safetensors``); the CLI's ``-o`` overrides it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("max_memory")
    @classmethod
    def _a_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _unique_result_names(self) -> "AttributionPlan":
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.nodes):
            if spec.result_name in seen:
                raise ValueError(
                    f"nodes[{i}] and nodes[{seen[spec.result_name]}] both write the result tensor "
                    f"{spec.result_name!r}; give one of them a distinct 'name'"
                )
            seen[spec.result_name] = i
        names = [s.name for s in self.saes]
        for i, spec in enumerate(self.saes):
            if names.index(spec.name) != i:
                raise ValueError(f"saes[{i}].name: {spec.name!r} is used twice")
        for i, spec in enumerate(self.nodes):
            sae = getattr(spec, "sae", None)
            if sae is not None and sae not in names:
                raise ValueError(f"nodes[{i}].sae: unknown SAE {sae!r}; the plan's saes: {names or 'none'}")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, defaults included): what result files store."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)


_plan_models: dict[tuple[type, ...], type[AttributionPlan]] = {}


def plan_model(node_kinds: list[str]) -> type[AttributionPlan]:
    """The plan class whose ``nodes`` accept exactly the given node kinds (imports their plugins)."""
    specs = tuple(plugins.load("nodes", k).spec_type for k in dict.fromkeys(node_kinds))
    if specs not in _plan_models:
        _plan_models[specs] = _build_plan_model(specs)
    return _plan_models[specs]


def _build_plan_model(specs: tuple[type, ...]) -> type[AttributionPlan]:
    if len(specs) == 1:
        node_type: Any = specs[0]
    else:
        node_type = Annotated[Union[tuple(specs)], Field(discriminator="kind")]
    return create_model(
        "AttributionPlan",
        __base__=AttributionPlan,
        nodes=(list[node_type], Field(min_length=1)),  # type: ignore[valid-type]
    )


def parse_plan(data: Any) -> AttributionPlan:
    """Validate a plan given as a dict (or an ``AttributionPlan``), loading the node plugins it names."""
    if isinstance(data, AttributionPlan):
        data = data.model_dump(mode="json", by_alias=True)
    if not isinstance(data, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
    schema = data.get("schema", PLAN_SCHEMA)
    if schema != PLAN_SCHEMA:
        raise PlanError(f"schema: this atpframework reads plans of schema {PLAN_SCHEMA!r}, got {schema!r}")
    nodes = data.get("nodes")
    kinds: list[str] = []
    if isinstance(nodes, list):
        for i, node in enumerate(nodes):
            kind = node.get("kind") if isinstance(node, dict) else None
            if not isinstance(kind, str):
                raise PlanError(f"nodes[{i}].kind: missing; allowed: {', '.join(plugins.available('nodes'))}")
            try:
                plugins.load("nodes", kind)
            except PluginError as err:
                raise PlanError(f"nodes[{i}].kind: {err}") from err
            kinds.append(kind)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("backend", "transformer_lens"), str):
        backend = model.get("backend", "transformer_lens")
        if backend not in plugins.available("backends"):
            raise PlanError(
                f"model.backend: unknown backend {backend!r}; installed: {', '.join(plugins.available('backends'))} "
                f"(third-party backends register under the entry-point group 'atpframework.backends')"
            )
    cls = plan_model(kinds) if kinds else AttributionPlan
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PlanError(format_validation_error(err, kinds)) from None


def load_plan(path: str | Path) -> AttributionPlan:
    """Read and validate a plan JSON file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PlanError(f"cannot read plan file {str(path)!r}: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return parse_plan(data)


def plan_json_schema() -> dict[str, Any]:
    """JSON Schema of plans accepting every installed node type."""
    return plan_model(plugins.available("nodes")).model_json_schema(by_alias=True)


def format_location(loc: tuple[Any, ...], tags: set[str]) -> str:
    """``('nodes', 1, 'attn_head', 'heads')`` -> ``nodes[1].heads`` (union tags dropped)."""
    out = ""
    prev_index = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            prev_index = True
            continue
        if prev_index and part in tags or part in {"function-after[_unique_result_names(), AttributionPlan]"}:
            prev_index = False
            continue
        if "[" in str(part) and "]" in str(part) and not str(part).isidentifier():
            # union branch names like "list[int]" or "literal['each','all']" add nothing for users
            continue
        out += f".{part}" if out else str(part)
        prev_index = out == "method"  # the method union's tag follows "method" as a node's follows "nodes[i]"
    return out or "plan"


def format_validation_error(err: ValidationError, kinds: list[str]) -> str:
    """One line per problem: location, what is wrong, the offending value."""
    tags = set(kinds) | set(METHOD_NAMES)
    lines: dict[str, str] = {}
    for e in err.errors():
        loc = format_location(tuple(e["loc"]), tags)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] in {"literal_error", "union_tag_invalid"}:
            msg = msg.replace("Input should be", "allowed:")
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) and e["type"] != "literal_error" else f" (got {value!r})"
        # a union reports every branch; keep the first message per location
        lines.setdefault(loc, f"{loc}: {msg}{shown}")
    return "invalid plan:\n  " + "\n  ".join(lines.values())
