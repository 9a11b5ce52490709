"""The declarative ``AttributionPlan``: what to attribute, on which model, with which method.

Plans are pydantic models with ``extra="forbid"``: unknown keys are errors. Node selections are a
discriminated union over the installed node types, and ``method`` over the installed methods'
configs, both built when a plan is loaded, so a third-party node type or method validates exactly
like a built-in one. Loading is two-phase: read the raw JSON, import the
plugins it names, then validate the whole plan. Errors carry the JSON location (``nodes[1].heads``)
and the allowed values.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from atpframework import plugins
from atpframework.errors import MAX_PROBLEMS, PlanError, PluginError, problem_list, shorten
from atpframework.model.node import NodeSpec
from atpframework.plans.chunking import parse_bytes

PLAN_SCHEMA: Final = "atpf.plan/1"
"""Schema id of the plan format this version reads and writes."""
MAX_PLAN_BYTES = 64 * 2**20
"""Largest plan file ``load_plan`` reads (64 MiB; long token-id prompts take a few MiB)."""
MAX_DEPTH = 100
"""Deepest nesting of lists and objects a plan may have (plans need about five levels)."""
INT_RANGE = (-(2**63), 2**63 - 1)
"""Integers a plan may hold anywhere: the 64-bit range (token ids, indices, sizes and seeds all fit)."""
SHOWN_DEPTH = 8
"""Locations deeper than this are named by their first levels and ``...``."""
NODES_DESCRIPTION = (
    "Node selections, one result tensor each. A kind may also be written in the vocabulary of the plan's backend, "
    "resolved when the plan is parsed (the canonical plan holds the node kind): both built-in backends accept "
    "TransformerLens hook names where a node kind patches that activation (table: docs/nodes.md)."
)
DEFAULT_BACKEND = "transformer_lens"
"""``model.backend`` when a plan leaves it out (and no model object decides it)."""
DEVICE_FORMS = "allowed: a torch device string such as 'cpu', 'cuda', 'cuda:1', 'mps' or 'xpu' (not 'meta')"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which model, loaded by which backend."""

    source: str
    """``bundled:smollm2-135m-instruct``, a local Hugging Face directory, a hub name, or ``in_memory``
    (the Python API passes the model object)."""
    backend: str = DEFAULT_BACKEND
    """A backend entry-point name (``atpframework.backends`` group)."""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``...); ``meta`` is refused (no data to compute on)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific options (e.g. ``{"model_class": "bridge"}`` for the TransformerLens backend)."""

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, value: str) -> str:
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"not a device torch knows; {DEVICE_FORMS}") from None
        if device.type == "meta":
            raise ValueError(f"meta tensors hold no data, so nothing can be computed on them; {DEVICE_FORMS}")
        return value


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


class MethodConfig(_Strict):
    """Common field of every method's options. Each method plugin subclasses it with
    ``name: Literal["<its name>"]`` and its own fields (``methods.py``); a plan's ``method`` accepts the
    config of every installed method, told apart by ``name``."""

    name: str
    """The method (an entry-point name in ``atpframework.methods``)."""


class AttributionPlan(_Strict):
    """A complete attribution run. Subclassed at load time with the node types and method it names."""

    schema_: Literal["atpf.plan/1"] = Field(PLAN_SCHEMA, alias="schema")
    """Plan format id."""
    model: ModelSpec
    saes: list[SaeSpec] = Field(default_factory=list)
    """SAEs spliced into the model for ``sae_latent`` / ``sae_error`` nodes."""
    prompts: list[PromptPair] = Field(min_length=1)
    prepend_bos: bool | None = None
    """Prepend the BOS token to text prompts (None: the model's default)."""
    metric: MetricSpec = MetricSpec()
    nodes: list[NodeSpec] = Field(min_length=1, description=NODES_DESCRIPTION)
    method: MethodConfig
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

    @field_validator("max_memory", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read true as 1 byte
            raise ValueError("true/false is not a size; give bytes (an integer) or a number with a unit, e.g. '8GiB'")
        return value

    @field_validator("max_memory")
    @classmethod
    def _a_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @field_validator("output")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("must be a non-empty file path (.safetensors), or null to give it with -o / run(output=...)")
        if value is not None and "\x00" in value:
            raise ValueError("contains a NUL character, which no file path may hold")
        return value

    @model_validator(mode="after")
    def _unique_result_names(self) -> "AttributionPlan":
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.nodes):
            if spec.result_name in seen:
                raise ValueError(
                    f"nodes[{i}] and nodes[{seen[spec.result_name]}] both write the result tensor "
                    f"{shorten(spec.result_name)}; give one of them a distinct 'name'"
                )
            seen[spec.result_name] = i
        names = [s.name for s in self.saes]
        for i, sae_spec in enumerate(self.saes):
            if names.index(sae_spec.name) != i:
                raise ValueError(f"saes[{i}].name: {shorten(sae_spec.name)} is used twice")
        for i, spec in enumerate(self.nodes):
            for field_name, sae in spec.sae_references().items():
                if sae not in names:
                    known = shorten(names) if names else "none"
                    raise ValueError(f"nodes[{i}].{field_name}: unknown SAE {shorten(sae)}; the plan's saes: {known}")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, defaults included): what result files store."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)


_plan_models: dict[tuple[tuple[type, ...], tuple[type, ...]], type[AttributionPlan]] = {}


def plan_model(node_kinds: list[str], method_names: list[str]) -> type[AttributionPlan]:
    """The plan class whose ``nodes`` accept exactly the given node kinds and whose ``method`` accepts
    the given methods' configs (imports their plugins)."""
    specs = tuple(plugins.load("nodes", k).spec_type for k in dict.fromkeys(node_kinds))
    configs = tuple(plugins.load("methods", m).config_type for m in dict.fromkeys(method_names))
    key = (specs, configs)
    if key not in _plan_models:
        fields: dict[str, Any] = {}
        if specs:
            fields["nodes"] = (list[_tagged_union(specs, "kind")], Field(min_length=1, description=NODES_DESCRIPTION))  # type: ignore[misc]
        if configs:
            fields["method"] = (_tagged_union(configs, "name"), ...)
        _plan_models[key] = create_model("AttributionPlan", __base__=AttributionPlan, **fields)
    return _plan_models[key]


def _tagged_union(classes: tuple[type, ...], tag: str) -> Any:
    """One class, or a union of them told apart by the field ``tag``."""
    return classes[0] if len(classes) == 1 else Annotated[Union[classes], Field(discriminator=tag)]


def parse_plan(data: Any) -> AttributionPlan:
    """Validate a plan given as a dict (or an ``AttributionPlan``), loading the node plugins it names."""
    if isinstance(data, AttributionPlan):
        backend_named = "backend" in data.model.model_fields_set
        data = data.model_dump(mode="json", by_alias=True)
        if not backend_named:  # left out, the backend follows a model object passed to af.run
            del data["model"]["backend"]
    if not isinstance(data, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
    found = document_problems(data)
    if found:
        raise PlanError(problem_list(found, "invalid plan"))
    schema = data.get("schema", PLAN_SCHEMA)
    if schema != PLAN_SCHEMA:
        raise PlanError(f"schema: this atpframework reads plans of schema {PLAN_SCHEMA!r}, got {shorten(schema)}")
    _check_backend(data.get("model"))
    nodes = _resolve_node_kinds(data)  # e.g. TransformerLens hook names -> node kinds and layers (the backend's vocabulary)
    if nodes is not data.get("nodes"):
        data = {**data, "nodes": nodes}
    kinds = _node_kinds(data.get("nodes"))
    methods = _method_names(data.get("method"))
    cls = plan_model(kinds, methods)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PlanError(format_validation_error(err, kinds)) from None


def _node_kinds(nodes: Any) -> list[str]:
    """The kind of every entry of ``nodes`` (their plugins imported); ``PlanError`` naming the entry otherwise."""
    if not isinstance(nodes, list):
        return []  # pydantic reports what nodes should be
    kinds: list[str] = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise PlanError(f"nodes[{i}]: must be an object with a 'kind', got {shorten(node)}; kinds: {_kinds()}")
        kinds.append(_plugin_named("nodes", node.get("kind"), f"nodes[{i}].kind", f"nodes[{i}].kind", _kinds))
    return kinds


def _method_names(method: Any) -> list[str]:
    """The method a plan names, its plugin imported (empty if ``method`` is not an object: pydantic reports it)."""
    if not isinstance(method, dict):
        return []
    return [_plugin_named("methods", method.get("name"), "method.name", "method", lambda: ", ".join(map(repr, method_names())))]


def _plugin_named(kind: str, name: Any, where: str, unknown_at: str, listed: Callable[[], str]) -> str:
    """``name`` if it names an installed plugin of ``kind`` (imported now); otherwise a ``PlanError`` at
    ``where`` (``unknown_at`` for a name nothing installed has) listing the installed ones."""
    if not isinstance(name, str):
        what = "missing" if name is None else f"must be a string, got {shorten(name)}"
        raise PlanError(f"{where}: {what}; allowed: {listed()}")
    try:
        plugins.load(kind, name)
    except PluginError as err:
        if name in plugins.available(kind):  # installed, but broken
            raise PlanError(f"{where}: {err}") from err
        raise PlanError(
            f"{unknown_at}: unknown {kind[:-1]} {shorten(name)}; installed: {listed()} "
            f"(third-party {kind} register under the entry-point group {plugins.GROUPS[kind]!r})"
        ) from None
    return name


def method_names() -> list[str]:
    """Every installed method's name in listing order (``AbstractMethod.listing_rank``, then the name);
    imports the methods, leaving out any that fail to import (a plan naming one is told why)."""
    ranked = []
    for name in plugins.available("methods"):
        try:
            ranked.append((plugins.load("methods", name).listing_rank, name))
        except PluginError:
            continue
    return [name for _, name in sorted(ranked)]


def _kinds() -> str:
    """The installed node kinds, comma-separated."""
    return ", ".join(plugins.available("nodes"))


_known_backends: set[str] = set()
"""Backend names seen installed (listing entry points takes milliseconds; a miss lists them again)."""


def _resolve_node_kinds(data: dict[str, Any]) -> Any:
    """The plan's ``nodes`` with kinds that are not installed node types offered to the plan's backend
    (``AbstractBackend.resolve_node_kinds``), which may rewrite them from its library's vocabulary."""
    nodes, model = data.get("nodes"), data.get("model")
    installed = set(plugins.available("nodes"))
    if not isinstance(nodes, list) or all(not isinstance(n, dict) or not isinstance(n.get("kind"), str) or n["kind"] in installed
                                          for n in nodes):
        return nodes
    backend = model.get("backend", DEFAULT_BACKEND) if isinstance(model, dict) else DEFAULT_BACKEND
    return plugins.load("backends", backend if isinstance(backend, str) else DEFAULT_BACKEND).resolve_node_kinds(nodes)


def _check_backend(model: Any) -> None:
    """``PlanError`` listing the installed backends if ``model.backend`` names none of them (other types: pydantic's)."""
    backend = model.get("backend", DEFAULT_BACKEND) if isinstance(model, dict) else None
    if not isinstance(backend, str) or backend in _known_backends:
        return
    installed = plugins.available("backends")
    _known_backends.update(installed)
    if backend not in installed:
        raise PlanError(
            f"model.backend: unknown backend {shorten(backend)}; installed: {', '.join(installed)} "
            f"(third-party backends register under the entry-point group {plugins.GROUPS['backends']!r})"
        )


def load_plan(path: str | Path) -> AttributionPlan:
    """Read and validate a plan JSON file (UTF-8, at most ``MAX_PLAN_BYTES``, no key given twice in one object)."""
    return parse_plan(_read_plan_json(path))


def _read_plan_json(path: str | Path) -> Any:
    """The JSON value in the file ``path``; ``PlanError`` naming the file if it is unreadable, too large,
    not UTF-8 or not JSON. Keys given twice stay marked for ``document_problems``."""
    label = _file_label(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_PLAN_BYTES + 1)
    except OSError as err:
        raise PlanError(f"cannot read plan file {shorten(str(path))}: {err.strerror or err}") from None
    except ValueError as err:  # NUL or unencodable characters in the path
        raise PlanError(f"cannot read plan file {shorten(str(path))}: {err}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"{label}: the plan file is larger than {MAX_PLAN_BYTES // 2**20} MiB; allowed: at most that")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PlanError(
            f"{label}: not UTF-8 text (byte {raw[err.start]:#04x} at byte offset {err.start}: {err.reason}); "
            "save the plan as UTF-8"
        ) from None
    return _parse_json(text.removeprefix("\ufeff"), label)


def _parse_json(text: str, label: str) -> Any:
    """``json.loads`` with duplicate keys marked and over-long integers kept as ``_LongInteger``."""
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int)
    except json.JSONDecodeError as err:
        raise PlanError(f"{label}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise PlanError(
            f"{label}: nested too deeply to read (plans need about five levels; allowed: at most {MAX_DEPTH})"
        ) from None


class _DuplicateKeys(dict):
    """A JSON object that gave some key more than once (JSON parsers keep the last value; plans refuse it)."""

    duplicates: list[str]


class _LongInteger:
    """A JSON integer too long for ``int`` to read (over 4300 digits); ``document_problems`` reports it."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a ``_DuplicateKeys`` listing the keys given twice, if any."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _DuplicateKeys(obj)
    seen: set[str] = set()
    marked.duplicates = []
    for key, _ in pairs:
        if key in seen:
            marked.duplicates.append(key)
        seen.add(key)
    return marked


def _json_int(text: str) -> int | _LongInteger:
    """A JSON integer; past 40 digits (far outside ``INT_RANGE``) only its length is kept."""
    return int(text) if len(text) <= 40 else _LongInteger(len(text.lstrip("-")))


def _file_label(path: str | Path) -> str:
    """The plan file as messages name it: the path, or its repr cut short if long or unprintable."""
    text = str(path)
    return text if len(text) <= 200 and text.isprintable() else shorten(text)


# ----------------------------------------------------------------------------------------- checks below the schema
def document_problems(data: Any) -> list[str]:
    """Problems no field type catches, one ``location: problem`` line each (at most ``MAX_PROBLEMS + 1``):
    keys given twice, non-string keys, strings UTF-8 cannot encode (lone surrogates), integers outside
    ``INT_RANGE``, nesting deeper than ``MAX_DEPTH`` (cycles included). Walks without recursion."""
    found: list[str] = []
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack and len(found) <= MAX_PROBLEMS:
        value, where, depth = stack.pop()
        problem = _value_problem(value, depth)
        if problem is not None:
            found.append(f"{where or 'plan'}: {problem}")
            continue
        children: list[tuple[Any, str, int]] = []
        if isinstance(value, dict):
            key_problems = [f"{_child(where, k)}: {p}" for k in value if (p := _key_problem(value, k)) is not None]
            found += key_problems
            if not key_problems:
                children = [(v, _child(where, k), depth + 1) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if depth >= SHOWN_DEPTH:
            children = [(v, where if where.endswith("...") else f"{where}...", d) for v, _, d in children]
        stack += reversed(children)
    return found


def _value_problem(value: Any, depth: int) -> str | None:
    """What is wrong with one value itself, or None."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels (or a value that contains itself); plans need about five"
    if isinstance(value, _LongInteger):
        return f"an integer of {value.digits} digits; allowed: integers from -2**63 to 2**63-1"
    if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"an integer of about {digits} digits; allowed: integers from -2**63 to 2**63-1"
    if isinstance(value, str):
        return _text_problem(value)
    return None


def _key_problem(obj: dict[Any, Any], key: Any) -> str | None:
    """What is wrong with one key of an object: not a string, given twice, or not encodable; or None."""
    if not isinstance(key, str):
        return f"keys must be strings, got {shorten(key)}"
    if isinstance(obj, _DuplicateKeys) and key in obj.duplicates:
        return "this key is given more than once in one JSON object (the last would silently win); allowed: each key once"
    problem = _text_problem(key)
    return f"the key {problem}" if problem else None


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, e.g. from a ``"\\ud800"`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"contains a lone surrogate ({text[err.start]!r} at character {err.start}), which UTF-8 cannot encode; "
            "allowed: valid Unicode text (surrogates only as pairs)"
        )
    return None


def _child(where: str, key: Any) -> str:
    """The location of ``key`` inside the object at ``where`` (``nodes[0].name``)."""
    name = key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else shorten(key, 60)
    return f"{where}.{name}" if where else name


def plan_json_schema() -> dict[str, Any]:
    """JSON Schema of plans accepting every installed node type."""
    return plan_model(plugins.available("nodes"), method_names()).model_json_schema(by_alias=True)


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
        name = part if isinstance(part, str) and len(part) <= 60 and part.isprintable() else shorten(part, 60)
        out += f".{name}" if out else name
        prev_index = out == "method"  # the method union's tag follows "method" as a node's follows "nodes[i]"
    return out or "plan"


def format_validation_error(err: ValidationError, kinds: list[str]) -> str:
    """One line per problem: location, what is wrong, the offending value (cut short; see ``problem_list``)."""
    tags = set(kinds) | set(plugins.available("methods"))
    lines: dict[str, str] = {}
    for e in err.errors():
        loc = format_location(tuple(e["loc"]), tags)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] in {"literal_error", "union_tag_invalid"}:
            msg = msg.replace("Input should be", "allowed:")
        value = e.get("input")
        got = shorten(value)
        shown = "" if isinstance(value, (dict, list)) and e["type"] != "literal_error" or got in msg else f" (got {got})"
        # a union reports every branch; keep the first message per location
        lines.setdefault(loc, f"{loc}: {msg}{shown}")
    return problem_list(list(lines.values()), "invalid plan")
