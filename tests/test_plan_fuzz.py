"""Fuzzing plans: every bad plan gives a ``PlanError`` with a short message, never a raw exception.

Three layers, each from a seeded generator (``random.Random``; no hypothesis):

* ``parse_plan`` on mutated plan dicts (dropped and unknown keys, swapped types, huge integers and
  strings, lone surrogates, deep nesting, duplicate node names, unknown kinds, methods and backends);
* ``load_plan`` on mutated plan *files* (byte flips, truncation, non-UTF-8, nesting, duplicate keys);
* the CLI (``atpf PLAN --dry-run``) on plans for a tiny Hugging Face GPT-2, all in one subprocess,
  plus three real ``python -m atpframework`` runs.

``python tests/test_plan_fuzz.py`` prints the outcome counts of the first two without pytest.
"""

import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest

import atpframework as af
from atpframework import PlanError

SEED = 20240611
N_PLANS = 1200
N_FILES = 300
MAX_MESSAGE = 3000
"""Longest PlanError message allowed (a plan with many problems lists about 20, then a count)."""

HUGE_INT = 10**400
HUGE_STR = "x" * 100_000


# ----------------------------------------------------------------------------------------- base plans
PAIRS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]


def base_plans() -> list[dict[str, Any]]:
    """Valid plans covering the optional fields, several node kinds, SAEs, max_memory and method options."""
    return [
        {
            "model": {"source": "in_memory"},
            "prompts": copy.deepcopy(PAIRS),
            "metric": {"name": "logprob"},
            "nodes": [
                {"kind": "attn_head", "layers": [1], "heads": "all", "positions": [-1, 2]},
                {"kind": "mlp_neuron", "name": "neurons_last", "neurons": [0, 5, 7], "positions": [-1]},
                {"kind": "resid", "layers": "all"},
            ],
            "method": {"name": "activation_patching", "nodes_per_pass": 3, "skip_layers": False},
            "batch_size": 1,
            "prepend_bos": False,
            "output": "out.safetensors",
        },
        {
            "schema": "atpf.plan/1",
            "model": {"source": "bundled:smollm2-135m-instruct", "dtype": "bfloat16", "device": "cpu"},
            "saes": [{"name": "res0", "path": "saes/res0", "site": "resid", "site_layer": 0, "error_gradient": "detached"}],
            "prompts": [
                {"clean": "When Mary and John went", "noise": "When John and Mary went", "answer": " Mary", "wrong_answer": " John"}
            ],
            "metric": {"name": "logit_diff", "position": -1},
            "nodes": [
                {"kind": "attn_q", "positions": [-1]},
                {"kind": "attn_k", "name": "keys"},
                {"kind": "sae_latent", "sae": "res0", "latents": [0, 3], "keep_top": 4, "keep_top_per": "selection"},
                {"kind": "sae_error", "sae": "res0", "positions": "all"},
            ],
            "method": {"name": "atp_star", "granularity": "sublayer"},
            "max_memory": "1.5GiB",
        },
        {
            "model": {"source": "gpt2", "backend": "huggingface", "options": {"attn_implementation": "eager"}},
            "prompts": copy.deepcopy(PAIRS),
            "nodes": [{"kind": "attn_v", "heads": [0, 1]}, {"kind": "attn_head", "name": "h", "layers": "each"}],
            "method": {"name": "subsampling", "samples": 16, "p": 0.25, "seed": 3, "sets_per_pass": 4},
            "max_memory": 4096,
            "batch_size": 2,
        },
        {
            "model": {"source": "in_memory", "backend": "transformer_lens", "options": {"model_class": "bridge"}},
            "prompts": copy.deepcopy(PAIRS[:1]),
            "metric": {"name": "cross_entropy"},
            "nodes": [{"kind": "resid", "positions": "each"}],
            "method": {"name": "hierarchical", "budget": 8, "branching": 2},
            "max_memory": "500 MB",
        },
        {
            "model": {"source": "in_memory"},
            "prompts": copy.deepcopy(PAIRS),
            "nodes": [{"kind": "mlp_neuron"}],
            "method": {"name": "blocks", "block_size": 4, "sets_per_pass": 2},
        },
    ]


# ----------------------------------------------------------------------------------------- plan mutations
def _nested(depth: int, leaf: Any = 1) -> Any:
    """``[[[...leaf...]]]`` ``depth`` deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _cyclic() -> dict[str, Any]:
    loop: dict[str, Any] = {"kind": "resid"}
    loop["self"] = loop
    return loop


def weird_value(rng: random.Random) -> Any:
    """A value from the corners of the JSON (and Python) value space."""
    makers: list[Callable[[], Any]] = [
        lambda: 0, lambda: -1, lambda: -(2**31), lambda: 2**63, lambda: 2**64, lambda: HUGE_INT, lambda: -HUGE_INT,
        lambda: 10**5000, lambda: "", lambda: HUGE_STR, lambda: "\ud800", lambda: "a\udcffb", lambda: "nul\x00here",
        lambda: None, lambda: True, lambda: False, lambda: 1.5, lambda: -0.0, lambda: math.nan, lambda: math.inf,
        lambda: -math.inf, lambda: 1e308, lambda: [], lambda: {}, lambda: [None], lambda: [HUGE_INT], lambda: ["\ud800"],
        lambda: {"kind": "resid"}, lambda: {"\ud800": 1}, lambda: {HUGE_STR: 1}, lambda: {1: 2},
        lambda: _nested(rng.choice([5, 99, 101, 3000])), lambda: _cyclic(), lambda: (1, 2), lambda: {1, 2},
        lambda: b"bytes", lambda: object(), lambda: "each", lambda: "all", lambda: "8GiB", lambda: "1e400GB",
        lambda: "9" * 400 + "GiB", lambda: "meta", lambda: "cuda:-1", lambda: "nope", lambda: rng.randint(-10, 10),
        lambda: [rng.randint(-3, 70) for _ in range(rng.randint(0, 4))], lambda: "x" * rng.randint(1, 30),
    ]
    return rng.choice(makers)()


def swap_type(value: Any, rng: random.Random) -> Any:
    """The same content in another JSON type (int <-> str <-> list <-> dict <-> None <-> bool <-> float)."""
    truth = bool(value) if not isinstance(value, float) else True
    options: list[Any] = [_text(value)[:1000], [value], {"value": value}, None, truth]
    if isinstance(value, bool):
        options.append(int(value))
    elif isinstance(value, int):
        options += [float(value) if abs(value) < 2**1000 else math.inf, -value, value * 10**30]
    elif isinstance(value, str):
        options += [len(value), value.encode("utf-8", "surrogatepass")[:20].decode("latin-1")]
    elif isinstance(value, list):
        options += [value[0] if value else 0, tuple(value), {str(i): v for i, v in enumerate(value)}]
    elif isinstance(value, dict):
        options += [list(value), list(value.values())]
    options += [math.nan, math.inf]
    return rng.choice(options)


def _text(value: Any) -> str:
    """``str(value)``, or the type name where that fails (integers over Python's digit limit)."""
    try:
        return str(value)
    except ValueError:
        return type(value).__name__


def _slots(data: Any, depth: int = 0) -> list[tuple[Any, Any]]:
    """Every ``(container, key)`` of ``data``'s dicts and lists (bounded, so mutated cycles and nests are fine)."""
    out: list[tuple[Any, Any]] = []
    if depth > 6:
        return out
    if isinstance(data, dict):
        for key in list(data):
            out.append((data, key))
            out += _slots(data[key], depth + 1)
    elif isinstance(data, list):
        for i in range(len(data)):
            out.append((data, i))
            out += _slots(data[i], depth + 1)
    return out


KINDS = ["attn_head", "attn_q", "attn_k", "attn_v", "mlp_neuron", "resid", "sae_latent", "sae_error", "nope", "ATTN_HEAD", ""]
METHODS = ["atp", "atp_qkfix", "atp_graddrop", "atp_star", "activation_patching", "subsampling", "blocks", "hierarchical",
           "nope"]
BACKENDS = ["transformer_lens", "huggingface", "nope", ""]


FIELD_VALUES: dict[str, list[Any]] = {
    "max_memory": [HUGE_INT, -HUGE_INT, 10**5000, "9" * 400 + "GiB", "9" * 5000, "1e400GB", True, False, 0, -5, "0.5",
                   2**63, 2**63 + 1, "8 EiB", "  8GiB ", "1.5GB", "0.0000001KiB", "inf", "nan", math.nan, 1.0, 1e30, [],
                   "8\ud800GiB"],
    "device": ["meta", "meta:0", "cuda:-1", "", "CPU", " cpu", "cuda:0", "cuda", "mps", "xpu:3", HUGE_STR, "\ud800", None, 0,
               "cuda:" + "9" * 30],
    "output": ["", "\x00", "a\x00b.safetensors", "\ud800.safetensors", HUGE_STR, " ", "o.safetensors", None, 0, [], "o.bin"],
}
"""Values aimed at the fields with their own checks (model.device, max_memory, output)."""


def field_mutation(plan: dict[str, Any], rng: random.Random) -> str:
    """Set ``max_memory``, ``model.device`` or ``output`` to a value from ``FIELD_VALUES``."""
    field = rng.choice(sorted(FIELD_VALUES))
    value = rng.choice(FIELD_VALUES[field])
    if field == "device":
        if not isinstance(plan.get("model"), dict):
            plan["model"] = {"source": "in_memory"}
        plan["model"]["device"] = value
    else:
        plan[field] = value
    return f"{field} = {_text(value)[:40]!r}"


def mutate(plan: dict[str, Any], rng: random.Random) -> str:
    """Apply one random mutation to ``plan`` in place; returns what it did."""
    slots = _slots(plan)
    container, key = rng.choice(slots) if slots else (plan, "model")
    op = rng.choice(["drop", "unknown", "weird", "weird", "swap", "swap", "dup", "empty", "kind", "method",
                     "backend", "nest", "negative", "dup_name", "weird_key", "top", "field", "field"])
    if op == "field":
        return field_mutation(plan, rng)
    if op == "top":
        container, key = plan, rng.choice(["model", "prompts", "nodes", "method", "metric", "saes", "max_memory",
                                           "output", "batch_size", "schema", "prepend_bos"])
        plan[key] = weird_value(rng)
        return f"top {key} = weird"
    if op == "drop" and isinstance(container, dict):
        del container[key]
        return f"drop {key!r}"[:80]
    if op == "unknown" and isinstance(container, dict):
        container[rng.choice(["bogus", "Kind", "nodes_per_pass", "x" * 500, "\ud800"])] = weird_value(rng)
        return "unknown key"
    if op == "dup" and isinstance(container, list):
        container.append(copy.deepcopy(container[key]))
        return "duplicate list item"
    if op == "empty":
        plan[rng.choice(["nodes", "prompts", "saes"])] = []
        return "empty list"
    nodes = [n for n in plan.get("nodes") or [] if isinstance(n, dict)] if isinstance(plan.get("nodes"), list) else []
    if op == "kind" and nodes:
        rng.choice(nodes)["kind"] = rng.choice(KINDS + [weird_value(rng)])
        return "node kind"
    if op == "method" and isinstance(plan.get("method"), dict):
        plan["method"]["name"] = rng.choice(METHODS + [weird_value(rng)])
        return "method name"
    if op == "backend" and isinstance(plan.get("model"), dict):
        plan["model"]["backend"] = rng.choice(BACKENDS + [weird_value(rng)])
        return "backend"
    if op == "nest":
        leaf = container[key] if not isinstance(container[key], (dict, list)) else 0
        container[key] = _nested(rng.choice([2, 50, 150, 2000]), leaf)
        return "nest"
    if op == "negative" and isinstance(container[key], int) and not isinstance(container[key], bool):
        container[key] = -abs(container[key]) - rng.choice([0, 1, HUGE_INT])
        return "negative"
    if op == "negative" and isinstance(container[key], float):
        container[key] = -abs(container[key])
        return "negative"
    if op == "dup_name" and len(nodes) > 1:
        for node in nodes:
            node["name"] = "same"
        return "duplicate node names"
    if op == "weird_key" and isinstance(container, dict):
        container[rng.choice(["\udcff", HUGE_STR, "", " ", 1, None, True, 1.5, (1, 2), HUGE_INT])] = container.pop(key)
        return "weird key"
    if op == "swap":
        container[key] = swap_type(container[key], rng)
        return "swap type"
    container[key] = weird_value(rng)
    return "weird value"


def mutated_plans(n: int, seed: int = SEED) -> list[tuple[str, Any]]:
    """``n`` plans, each a base plan with 1-3 mutations (a few unmutated, a few not dicts at all)."""
    rng = random.Random(seed)
    bases = base_plans()
    out: list[tuple[str, Any]] = [("base", b) for b in copy.deepcopy(bases)]
    while len(out) < n:
        if rng.random() < 0.01:
            out.append(("not a dict", weird_value(rng)))
            continue
        plan = copy.deepcopy(rng.choice(bases))
        done = [mutate(plan, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        out.append(("; ".join(done), plan))
    return out


# ----------------------------------------------------------------------------------------- checking outcomes
def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """``("ok", "")``, ``("PlanError", message)`` or ``(raw exception type, message)``."""
    try:
        plan = call()
    except PlanError as err:
        return "PlanError", str(err)
    except Exception as err:  # noqa: BLE001 - what the fuzzer hunts
        return type(err).__name__, _safe_str(err)
    try:  # what result files store, and every string as UTF-8 (safetensors metadata and tensor names)
        json.dumps(json.loads(plan.to_json()), ensure_ascii=False).encode("utf-8")
    except Exception as err:  # noqa: BLE001
        return f"accepted, then {type(err).__name__} in to_json", _safe_str(err)
    return "ok", ""


def _safe_str(err: BaseException) -> str:
    try:
        return str(err)[:300]
    except Exception:  # noqa: BLE001
        return f"<{type(err).__name__}>"


def problems(results: list[tuple[str, str, str]]) -> list[str]:
    """The fuzz failures: raw exceptions, and PlanError messages over ``MAX_MESSAGE`` characters."""
    bad = []
    for what, kind, message in results:
        if kind not in ("ok", "PlanError"):
            bad.append(f"{kind}: {message[:200]!r} <- {what}")
        elif len(message) > MAX_MESSAGE:
            bad.append(f"PlanError of {len(message)} characters <- {what}")
    return bad


def summary(results: list[tuple[str, str, str]]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in Counter(kind for _, kind, _ in results).most_common())


def fuzz_parse_plan(n: int = N_PLANS) -> list[tuple[str, str, str]]:
    """``(mutations, outcome kind, message)`` for ``n`` mutated plans through ``parse_plan``."""
    return [(what, *outcome(partial(af.parse_plan, plan))) for what, plan in mutated_plans(n)]


def test_parse_plan_fuzz_raises_only_short_plan_errors():
    results = fuzz_parse_plan()
    assert len(results) >= 1000
    kinds = Counter(kind for _, kind, _ in results)
    assert kinds["ok"] >= 5 and kinds["PlanError"] >= 500, summary(results)  # the fuzzer reaches both outcomes
    bad = problems(results)
    assert not bad, f"{len(bad)} of {len(results)} plans ({summary(results)}):\n" + "\n".join(bad[:40])


# ----------------------------------------------------------------------------------------- plan files
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80\x80"]


def _replace_number(text: bytes, rng: random.Random, new: bytes) -> bytes:
    """``text`` with one JSON number (after a colon) replaced by ``new``."""
    spots = [m.span(1) for m in re.finditer(rb": (-?[0-9]+)(?=[,}\s\]])", text)]
    if not spots:
        return text[:-1] + b', "batch_size": ' + new + b"}"
    start, end = rng.choice(spots)
    return text[:start] + new + text[end:]


def file_mutation(text: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One byte-level mutation of a plan file: ``(category, bytes)``; categories with an expected message
    are listed in ``FILE_EXPECTATIONS``."""
    op = rng.choice(["flip", "flip", "truncate", "utf8", "surrogate", "dup_top", "dup_nested", "nest", "nest_value",
                     "long_int", "constant", "bom", "odd", "utf16"])
    if op == "flip":
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return op, bytes(data)
    if op == "truncate":
        return op, text[: rng.randrange(len(text))]
    if op == "utf8":
        at = rng.randrange(len(text))
        return op, text[:at] + rng.choice(BAD_UTF8) + text[at:]
    if op == "surrogate":
        return op, text.replace(b'"kind": "', rb'"kind": "\udc80', 1).replace(b'"source": "', rb'"source": "x\ud800', 1)
    if op == "dup_top":
        return op, b'{"model": {"source": "in_memory"}, ' + text.lstrip()[1:]
    if op == "dup_nested":
        return op, re.sub(rb'\{\s*"kind": ', b'{"kind": "resid", "kind": ', text, count=1)
    if op == "nest":
        depth = rng.choice([101, 500, 5000, 100_000])
        return op, b'{"model": ' + b"[" * depth + b"]" * depth + b"}"
    if op == "nest_value":
        depth = rng.choice([102, 2000, 100_000])
        return "nest", _replace_number(text, rng, b"[" * depth + b"1" + b"]" * depth)
    if op == "long_int":
        return op, _replace_number(text, rng, rng.choice([b"1" * 5000, b"-" + b"9" * 400, b"9" * 41, b"9" * 20]))
    if op == "constant":
        return op, _replace_number(text, rng, rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1.5", b"-0"]))
    if op == "bom":
        return op, b"\xef\xbb\xbf" + text
    if op == "utf16":
        return op, text.decode("utf-8").encode(rng.choice(["utf-16", "utf-32"]))
    return op, rng.choice([b"", b" \n", b"null", b"[]", b"\x00" * 8, b"{", b'{"a": 1}', b'"plan"', b"1" * 5000])


FILE_EXPECTATIONS = {
    "utf8": "not UTF-8 text (byte 0x",
    "utf16": "not UTF-8 text",
    "surrogate": "lone surrogate",
    "dup_top": "model: this key is given more than once",
    "dup_nested": "nodes[0].kind: this key is given more than once",
    "nest": "nested",
}
"""Mutation category -> a fragment every PlanError of that category must contain."""


def mutated_files(n: int, seed: int = SEED) -> list[tuple[str, bytes]]:
    """``n`` plan files: the base plans (compact and indented), then byte-level mutations of them and
    JSON dumps of mutated plan dicts."""
    rng = random.Random(seed + 1)
    texts = [json.dumps(p, indent=indent).encode("utf-8") for p in base_plans() for indent in (None, 2)]
    out: list[tuple[str, bytes]] = [("base", t) for t in texts]
    dicts = iter(mutated_plans(n, seed + 2))
    while len(out) < n:
        if rng.random() < 0.25:
            what, plan = next(dicts)
            try:
                out.append((f"dict: {what}", json.dumps(plan, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")))
            except (TypeError, ValueError, RecursionError):  # not JSON: sets, objects, cycles, huge ints
                pass
            continue
        out.append(file_mutation(rng.choice(texts), rng))
    return out


def fuzz_load_plan(folder: Path, n: int = N_FILES) -> list[tuple[str, str, str]]:
    """``(category, outcome kind, message)`` for ``n`` mutated plan files through ``load_plan``."""
    results = []
    for i, (what, data) in enumerate(mutated_files(n)):
        path = folder / f"plan{i}.json"
        path.write_bytes(data)
        kind, message = outcome(partial(af.load_plan, path))
        expected = FILE_EXPECTATIONS.get(what)
        if expected and (kind != "PlanError" or expected not in message):
            kind = f"expected a PlanError containing {expected!r}, got {kind}"
        results.append((what, kind, message))
    return results


def test_load_plan_fuzz_raises_only_short_plan_errors(tmp_path):
    results = fuzz_load_plan(tmp_path)
    assert len(results) >= 200
    kinds = Counter(kind for _, kind, _ in results)
    assert kinds["ok"] >= 10 and kinds["PlanError"] >= 150, summary(results)
    bad = problems(results)
    assert not bad, f"{len(bad)} of {len(results)} files ({summary(results)}):\n" + "\n".join(bad[:40])


# ----------------------------------------------------------------------------------------- the CLI
MODEL = "@MODEL@"
"""Stands for the tiny GPT-2 directory in CLI plans (made by the driver subprocess)."""


def cli_base() -> dict[str, Any]:
    """A valid plan for the tiny Hugging Face GPT-2 (2 layers, 4 heads, vocabulary 61, no tokenizer)."""
    return {
        "model": {"source": MODEL, "backend": "huggingface"},
        "prompts": copy.deepcopy(PAIRS),
        "nodes": [{"kind": "attn_head"}, {"kind": "mlp_neuron", "positions": [-1]}, {"kind": "resid", "layers": [0, 2]}],
        "method": {"name": "atp"},
    }


def _with(**changes: Any) -> dict[str, Any]:
    plan = cli_base()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = plan
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return plan


OK, BAD, RUNTIME = {0}, {2}, {1, 2}
"""Expected exit codes: a valid plan, a bad plan, a plan this machine cannot run (a clean error either way)."""


def cli_cases() -> list[tuple[str, Any, set[int]]]:
    """``(name, plan dict or file bytes, allowed exit codes)``: hand-picked cases, then seeded mutations."""
    cases: list[tuple[str, Any, set[int]]] = [
        ("valid", cli_base(), OK),
        ("valid_atp_star_qk",
         _with(nodes=[{"kind": "attn_q"}, {"kind": "attn_k", "positions": "all"}], method={"name": "atp_star"}), OK),
        ("valid_patching", _with(method={"name": "activation_patching", "nodes_per_pass": 2}), OK),
        ("valid_max_memory", _with(max_memory="64MiB"), OK),
        ("valid_output_float64", _with(output="out.safetensors", model__dtype="float64"), OK),
        ("valid_subsampling", _with(method={"name": "subsampling", "samples": 8, "p": 0.5}), OK),
        ("valid_bom", b"\xef\xbb\xbf" + json.dumps(cli_base()).encode(), OK),
        ("valid_long_name", _with(nodes=[{"kind": "resid", "name": "n" * 5000}]), OK),
        ("layer_out_of_range", _with(nodes=[{"kind": "attn_head", "layers": [5]}]), BAD),
        ("token_out_of_vocab", _with(prompts__0__clean=[1, 2, 3, 4, 5, 61]), BAD),
        ("token_negative", _with(prompts__0__noise=[1, 2, 3, 4, 5, -1]), BAD),
        ("unequal_lengths", _with(prompts__1__noise=[7, 8]), BAD),
        ("text_without_tokenizer", _with(prompts=[{"clean": "a b", "noise": "a c", "answer": 1, "wrong_answer": 2}]), BAD),
        ("prompt_too_long", _with(prompts=[{"clean": [1] * 40, "noise": [2] * 40, "answer": 1, "wrong_answer": 2}]), BAD),
        ("empty_prompt", _with(prompts=[{"clean": [], "noise": [], "answer": 1, "wrong_answer": 2}]), BAD),
        ("positions_out_of_range", _with(nodes=[{"kind": "resid", "positions": [9]}]), BAD),
        ("duplicate_heads", _with(nodes=[{"kind": "attn_head", "heads": [1, 1]}]), BAD),
        ("metric_position", _with(metric={"name": "logit_diff", "position": 6}), BAD),
        ("answer_missing", _with(prompts=[{"clean": [1, 2], "noise": [1, 3]}]), BAD),
        ("answer_out_of_vocab", _with(prompts__0__answer=10**6), BAD),
        ("unknown_kind", _with(nodes=[{"kind": "nope"}]), BAD),
        ("unhashable_kind", _with(nodes=[{"kind": ["attn_head"]}]), BAD),
        ("unknown_backend", _with(model={"source": MODEL, "backend": "nope"}), BAD),
        ("backend_not_a_string", _with(model={"source": MODEL, "backend": {"x": 1}}), BAD),
        ("unknown_method", _with(method={"name": "nope"}), BAD),
        ("device_meta", _with(model={"source": MODEL, "backend": "huggingface", "device": "meta"}), BAD),
        ("device_unknown", _with(model={"source": MODEL, "backend": "huggingface", "device": "gpu"}), BAD),
        ("max_memory_huge_int", _with(max_memory=HUGE_INT), BAD),
        ("max_memory_400_digits", _with(max_memory="9" * 400 + "GiB"), BAD),
        ("max_memory_true", _with(max_memory=True), BAD),
        ("max_memory_too_small", _with(max_memory=1000), BAD),
        ("output_empty", _with(output=""), BAD),
        ("output_nul", _with(output="a\x00.safetensors"), BAD),
        ("surrogate_name", _with(nodes=[{"kind": "resid", "name": "\ud800"}]), BAD),
        ("sae_unknown", _with(nodes=[{"kind": "sae_latent", "sae": "s"}]), BAD),
        ("dup_key_file", b'{"method": {"name": "atp"}, ' + json.dumps(cli_base()).encode()[1:], BAD),
        ("non_utf8_file", json.dumps(cli_base()).encode().replace(b'"atp"', b'"atp\xff"'), BAD),
        ("deep_file", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", BAD),
        ("huge_int_file", json.dumps(cli_base()).encode().replace(b"[0, 2]", b"[0, " + b"2" * 5000 + b"]"), BAD),
        ("truncated_file", json.dumps(cli_base()).encode()[:50], BAD),
        ("empty_file", b"", BAD),
        ("device_cuda_99", _with(model={"source": MODEL, "backend": "huggingface", "device": "cuda:99"}), RUNTIME),
        ("source_missing", _with(model={"source": "/nonexistent/model", "backend": "huggingface"}), RUNTIME),
        ("sae_path_missing",
         _with(saes=[{"name": "s", "path": "/nonexistent/sae"}], nodes=[{"kind": "sae_latent", "sae": "s"}]), RUNTIME),
        ("sae_release_offline", _with(saes=[{"name": "s", "release": "nope-release", "sae_id": "x"}],
                                      nodes=[{"kind": "sae_error", "sae": "s"}]), RUNTIME),
        ("valid_cpu_index", _with(model={"source": MODEL, "backend": "huggingface", "device": "cpu:0"}), OK),
        ("valid_max_memory_max", _with(max_memory=2**63 - 1), OK),
        ("valid_huge_counts",
         _with(method={"name": "subsampling", "samples": 2**62, "sets_per_pass": 2**62}, batch_size=2**62), OK),
        ("valid_hierarchical_huge_budget", _with(method={"name": "hierarchical", "budget": 2**62}), OK),
        ("output_outside", _with(output="/nonexistent/folder/out.safetensors"), {0, 2}),  # output-path policy: the CLI's
        ("custom_metric_without_callable", _with(metric={"name": "custom"}), {0, 2}),  # only a run passes the callable
        ("text_answer_without_tokenizer", _with(prompts__0__answer=" Mary"), BAD),
        ("each_positions_unequal_lengths",
         _with(prompts__1={"clean": [7, 8, 2], "noise": [7, 8, 3], "answer": 1, "wrong_answer": 2}), BAD),
        ("max_memory_patching_too_small", _with(max_memory="1KiB", method={"name": "activation_patching"}), BAD),
        ("unknown_backend_option", _with(model={"source": MODEL, "backend": "huggingface", "options": {"bogus": 1}}), BAD),
        ("unhashable_backend_option",
         _with(model={"source": MODEL, "backend": "huggingface", "options": {"attn_implementation": ["x"]}}), BAD),
        ("source_empty", _with(model={"source": "", "backend": "huggingface"}), RUNTIME),
        ("source_is_a_file", _with(model={"source": "/etc/hostname", "backend": "huggingface"}), RUNTIME),
        ("device_mps", _with(model={"source": MODEL, "backend": "huggingface", "device": "mps"}), RUNTIME),
    ]
    rng = random.Random(SEED + 3)
    while len(cases) < 100:
        plan = cli_base()
        what = "; ".join(mutate(plan, rng) for _ in range(rng.choice([1, 2])))
        try:
            json.dumps(plan)
        except (TypeError, ValueError, RecursionError):
            continue
        cases.append((f"random{len(cases)}: {what}", plan, {0, 1, 2}))
    return cases


CLI_CASES = cli_cases()
KNOWN_OUTSIDE: dict[str, str] = {}
"""Cases whose raw exception comes from outside the plan loader (engine, backends): reported, not fixed here;
each is marked xfail by name. (``device_cuda_99`` was one, ``AssertionError: Torch not compiled with CUDA enabled``,
until ``api.load_backend`` checked that the device exists.)"""

RAW = re.compile(
    r"error: [A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b: "
    r"|error: unexpected failure \(|rerun with --debug for the traceback"
)
"""What the CLI prints for an exception nobody turned into an atpframework error (``error: TypeName: ...``,
or ``error: unexpected failure (...); rerun with --debug ...``)."""

DRIVER = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from atpframework.cli import main
    results = {}
    for name, path in json.load(open(sys.argv[1])):
        r = CliRunner().invoke(main, [path, "--dry-run"])
        escaped = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)[:500]
        stdout = r.stdout[:1000] + r.stdout[-1000:]
        results[name] = {"code": r.exit_code, "stdout": stdout, "stderr": r.stderr[-6000:], "escaped": escaped}
    json.dump(results, open(sys.argv[2], "w"))
    """
)
"""Runs each case's ``atpf PLAN --dry-run`` in one process (the model libraries load once)."""

REAL_RUNS = {"python -m atpframework: valid": "valid", "python -m atpframework: max_memory_huge_int": "max_memory_huge_int",
             "python -m atpframework: dup_key_file": "dup_key_file"}
"""Cases also run as real ``python -m atpframework`` processes."""


def _write_case(folder: Path, index: int, content: Any, model: Path) -> Path:
    path = folder / f"case{index}.json"
    data = content if isinstance(content, bytes) else json.dumps(content).encode("utf-8", "surrogatepass")
    path.write_bytes(data.replace(MODEL.encode(), json.dumps(str(model))[1:-1].encode()))
    return path


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path) -> dict[str, dict[str, Any]]:
    """Every CLI case through the driver subprocess, and the ``REAL_RUNS``, all four processes side by side."""
    folder = tmp_path_factory.mktemp("cli_fuzz")
    paths = {name: str(_write_case(folder, i, content, hf_dir)) for i, (name, content, _) in enumerate(CLI_CASES)}
    (folder / "cases.json").write_text(json.dumps(list(paths.items())))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    commands = {"driver": [sys.executable, "-c", DRIVER, str(folder / "cases.json"), str(folder / "out.json")]}
    commands.update({name: [sys.executable, "-m", "atpframework", paths[case], "--dry-run"] for name, case in REAL_RUNS.items()})
    runs = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for name, command in commands.items()}
    results: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        results[name] = {"code": run.returncode, "stdout": stdout[:1000] + stdout[-1000:], "stderr": stderr[-6000:],
                         "escaped": None}
    driver = results.pop("driver")
    assert driver["code"] == 0, driver["stderr"]
    results.update(json.loads((folder / "out.json").read_text()))
    return results


def _error_paragraph(stderr: str) -> str:
    """The CLI's message: from the line starting ``error: `` to the end (library warnings may come first)."""
    at = stderr.find("error: ") if stderr.startswith("error: ") else stderr.find("\nerror: ") + 1
    return stderr[at:] if at >= 0 and "error: " in stderr else ""


def _expected(case: str) -> set[int]:
    return next(allowed for name, _, allowed in CLI_CASES if name == case)


@pytest.mark.parametrize(
    "name, allowed",
    [pytest.param(name, allowed, id=name.split(":")[0], marks=[pytest.mark.xfail(reason=KNOWN_OUTSIDE[name], strict=False)]
                  if name in KNOWN_OUTSIDE else []) for name, _, allowed in CLI_CASES]
    + [pytest.param(name, _expected(case), id=name) for name, case in REAL_RUNS.items()],
)
def test_cli_dry_run_fuzz(cli_results: dict[str, dict[str, Any]], name: str, allowed: set[int]):
    result = cli_results[name]
    code, stdout, stderr = result["code"], result["stdout"], result["stderr"]
    assert result["escaped"] is None, f"an exception escaped the CLI: {result['escaped']}"
    assert "Traceback" not in stdout + stderr, stderr
    message = _error_paragraph(stderr)
    assert not RAW.search(message), f"raw exception (exit {code}): {message[:1000]}"
    assert code in allowed, (code, stdout[:500], stderr[-1500:])
    if code == 0:
        assert "passes per batch" in stdout and not message, stderr[-1500:]
    else:
        assert message.startswith("error: ") and "\n\n" not in message.strip(), stderr[-1500:]
        assert len(message) < MAX_MESSAGE, message[:500]


if __name__ == "__main__":
    import tempfile

    print("parse_plan:", summary(fuzz_parse_plan()))
    with tempfile.TemporaryDirectory() as scratch:
        print("load_plan:", summary(fuzz_load_plan(Path(scratch))))
