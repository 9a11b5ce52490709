"""Loading result files safely: malformed or hostile files raise ``SchemaError`` (never another exception,
never a huge allocation), ``atpf show`` exits 0 or 2 on them, and NaN scores rank last. ``top_k`` follows
its documented order on dense and sparse selections alike, and ranks a sparse selection within its stored
entries (memory bounded by the file, not by the dense shape its labels describe).

The fuzz test writes a seeded set of mutated files (metadata, tensors and raw bytes) and runs every one
through ``load_result`` (then ``top_k`` and ``aggregate``) and through the real ``atpf show``.
"""

import contextlib
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import atpframework as af
from atpframework import SchemaError
from atpframework.io.results import AttributionResult, NodeScores, VerifiedNodes

GIB = 1 << 30
N_FUZZ = 150
"""How many mutated files the fuzz test writes."""


# ----------------------------------------------------------------------------------------- a valid file
def _valid_result() -> AttributionResult:
    """A small result with a dense, a sparse and an ``"all"``-axis selection, extras and verified nodes."""
    gen = torch.Generator().manual_seed(0)
    heads = torch.randn(2, 2, 3, 4, generator=gen)
    coords = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 2, 0, 2], [3, 5, 7, 1]])
    latents = torch.sparse_coo_tensor(coords, torch.tensor([0.5, -1.0, 2.0, 0.25]), (2, 1, 3, 8), check_invariants=True).coalesce()
    resid = torch.randn(2, 2, 1, generator=gen)
    nodes = {
        "heads": NodeScores("heads", "attn_head", ("pair", "layer", "pos", "head"),
                            {"layer": [0, 1], "pos": [0, 1, -1], "head": [0, 1, 2, 3]}, heads),
        "latents": NodeScores("latents", "sae_latent", ("pair", "layer", "pos", "latent"),
                              {"layer": [5], "pos": [0, 1, 2], "latent": list(range(8))}, latents),
        "resid": NodeScores("resid", "resid", ("pair", "layer", "pos"), {"layer": [0, 2], "pos": "all"}, resid),
    }
    return AttributionResult(
        nodes=nodes,
        metric_clean=torch.tensor([1.0, 2.0]),
        metric_noise=torch.tensor([0.5, -0.5]),
        clean_tokens=[[1, 2, 3], [4, 5]],
        noise_tokens=[[1, 9, 3], [4, 6]],
        plan_json=json.dumps({"method": {"name": "atp"}}),
        method="atp",
        metric="logit_diff",
        model={"n_layers": 2},
        versions={"torch": torch.__version__},
        created="2026-01-01T00:00:00Z",
        extras={"heads.stderr": heads.abs() / 10},
        verified={"heads": VerifiedNodes(torch.tensor([0, 5, 23]), torch.tensor([0, 1, 2]), torch.randn(2, 3, generator=gen))},
        verification={"verified": 3},
    )


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    return _valid_result().save(tmp_path_factory.mktemp("valid") / "valid.safetensors")


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def _edit_nodes(meta: dict[str, str], change) -> None:
    """Apply ``change`` to the parsed ``atpf.nodes`` and store it back."""
    nodes = json.loads(meta["atpf.nodes"])
    change(nodes)
    meta["atpf.nodes"] = json.dumps(nodes)


def _deep(depth: int = 100_000) -> str:
    """JSON nested too deeply for ``json.loads`` (it raises RecursionError)."""
    return "[" * depth + "]" * depth


@contextlib.contextmanager
def _address_space_cap(extra: int):
    """Cap this process's address space at its current size plus ``extra`` bytes, so that a loader which
    tries a huge allocation fails (counted as a failure) instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + extra if hard == resource.RLIM_INFINITY else min(vm_size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_valid_file_loads_and_round_trips(valid_file):
    result, loaded = _valid_result(), af.load_result(valid_file)
    for name, ns in result.nodes.items():
        assert torch.equal(loaded[name].per_pair.to_dense(), ns.per_pair.to_dense()), name
        assert loaded[name].index == ns.index and loaded[name].dims == ns.dims
    assert loaded.clean_tokens == result.clean_tokens and loaded.noise_tokens == result.noise_tokens
    assert torch.equal(loaded.verified["heads"].effects, result.verified["heads"].effects)
    assert torch.equal(loaded.extras["heads.stderr"], result.extras["heads.stderr"])
    assert loaded.verification == {"verified": 3}
    assert len(loaded.top_k(5)) == 5


# ----------------------------------------------------------------------------------------- regressions
def _bomb(path: Path, shape: list[int]) -> Path:
    """A ~1 KB file whose sparse selection (``pair layer latent``, labelled 2 x 8, two stored entries) claims
    the dense ``shape``; its coordinates are in bounds of the claim."""
    latents = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1], [3, 5]]), torch.tensor([1.0, -2.0]), (2, 2, 8),
                                      check_invariants=True).coalesce()
    result = AttributionResult(
        nodes={"latents": NodeScores("latents", "sae_latent", ("pair", "layer", "latent"),
                                     {"layer": [0, 1], "latent": list(range(8))}, latents)},
        metric_clean=torch.zeros(2), metric_noise=torch.ones(2), clean_tokens=[[1], [1]], noise_tokens=[[2], [2]],
        plan_json="{}", method="atp", metric="logit_diff", model={},
    )
    meta, tensors = _read(result.save(path))
    _edit_nodes(meta, lambda n: n["latents"].update(shape=shape))
    return _write(path, meta, tensors)


def test_sparse_shape_memory_bomb_is_refused_without_allocating(tmp_path):
    """A 1 KB file whose sparse ``shape`` claims 2 x 100000 x 100000 (labels: 2 x 8) used to load, and
    ``aggregate`` (so ``top_k``, so ``atpf show``) densified it: 40 GB. The shape must match the labels."""
    bomb = _bomb(tmp_path / "bomb.safetensors", [2, 100_000, 100_000])
    assert bomb.stat().st_size < 5_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(SchemaError, match=r"bomb\.safetensors: atpf\.nodes\.latents\.shape: \[2, 100000, 100000\], expected \[2, 2, 8\]"):
        af.load_result(bomb)
    assert time.perf_counter() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB: no big allocation


def test_labels_describing_too_many_nodes_are_refused(valid_file, tmp_path):
    """Shape and labels agree, but describe more than ``MAX_NODES`` nodes per pair: refused before any tensor."""
    from atpframework.io.results import MAX_NODES

    meta, tensors = _read(valid_file)
    big = {"layer": list(range(2048)), "pos": list(range(2048)), "latent": list(range(1024))}
    _edit_nodes(meta, lambda n: n["latents"].update(index=big, shape=[2, 2048, 2048, 1024]))
    path = _write(tmp_path / "big.safetensors", meta, tensors)
    with pytest.raises(SchemaError, match=rf"atpf\.nodes\.latents\.index: describes 4294967296 nodes per pair .* at most {MAX_NODES}"):
        af.load_result(path)


@pytest.mark.parametrize("also_index", [False, True], ids=["dims_only", "dims_and_index"])
def test_wrong_length_dims_is_refused(valid_file, tmp_path, also_index):
    """``dims`` one axis short used to load (exit 0) with the last axis silently unlabelled."""
    meta, tensors = _read(valid_file)

    def drop_head(nodes):
        nodes["heads"]["dims"] = ["pair", "layer", "pos"]
        if also_index:
            del nodes["heads"]["index"]["head"]

    _edit_nodes(meta, drop_head)
    path = _write(tmp_path / "dims.safetensors", meta, tensors)
    with pytest.raises(SchemaError, match=r"atpf\.nodes\.heads\.dims") as err:
        af.load_result(path).top_k(5)
    assert str(path) in str(err.value)


def test_negative_token_length_is_refused(valid_file, tmp_path):
    """A negative ``tokens.length`` used to load, silently cutting tokens off the end (``row[:-1]``)."""
    meta, tensors = _read(valid_file)
    tensors["tokens.length"] = torch.tensor([3, -1])
    path = _write(tmp_path / "length.safetensors", meta, tensors)
    with pytest.raises(SchemaError, match=r"tokens\.length: \[3, -1\]: each must be from 0 to 3"):
        af.load_result(path)


def _drop_meta(key):
    return lambda meta, tensors: meta.pop(key)


def _set_meta(key, text):
    return lambda meta, tensors: meta.update({key: text})


def _drop_tensor(key):
    return lambda meta, tensors: tensors.pop(key)


def _short_head_labels(meta, tensors):
    _edit_nodes(meta, lambda n: n["heads"]["index"].update(head=[0, 1]))


RAW_ERRORS = {
    # old exception type -> (mutation, field the SchemaError must name)
    "KeyError_metadata": (_drop_meta("atpf.nodes"), r"atpf\.nodes: missing from the metadata"),
    "KeyError_tensor": (_drop_tensor("tokens.length"), r"tokens\.length: tensor missing"),
    "JSONDecodeError": (_set_meta("atpf.nodes", "{not json"), r"atpf\.nodes: not valid JSON"),
    "TypeError": (_set_meta("atpf.nodes", '{"heads": 5}'), r"atpf\.nodes\.heads: expected a JSON object, got int"),
    "AttributeError": (_set_meta("atpf.nodes", "[]"), r"atpf\.nodes: expected a JSON object, got list"),
    "IndexError": (_short_head_labels, r"scores\.heads: shape \[2, 2, 3, 4\], expected \[2, 2, 3, 2\] .*atpf\.nodes\.heads\.index"),
    "RecursionError": (_set_meta("atpf.model", _deep()), r"atpf\.model: not valid JSON \(RecursionError"),
    "ValueError_huge_int": (_set_meta("atpf.versions", "9" * 5000), r"atpf\.versions: not valid JSON"),
}


@pytest.mark.parametrize("raw", list(RAW_ERRORS))
def test_broken_metadata_raises_schema_error_naming_the_field(valid_file, tmp_path, raw):
    """Each of these used to escape as the named builtin exception (IndexError: from ``top_k`` on the
    loaded result); now loading refuses the file, naming it and the field, in a short message."""
    mutate, field = RAW_ERRORS[raw]
    meta, tensors = _read(valid_file)
    mutate(meta, tensors)
    path = _write(tmp_path / f"{raw}.safetensors", meta, tensors)
    with pytest.raises(SchemaError, match=field) as err:
        af.load_result(path).top_k(50)
    assert str(err.value).startswith(f"{path}: ")
    assert len(str(err.value)) < 600


def test_nan_scores_rank_last(tmp_path):
    """NaN used to rank first (argsort of |NaN| descending); now every number ranks before it."""
    nan = math.nan
    per_pair = torch.tensor([[[1.0, nan, -3.0, 0.5]], [[1.0, 2.0, -3.0, 0.5]]])  # pair layer head
    other = torch.tensor([[[nan, -2.0]], [[nan, -2.0]]])
    result = AttributionResult(
        nodes={
            "a": NodeScores("a", "attn_head", ("pair", "layer", "head"), {"layer": [0], "head": [0, 1, 2, 3]}, per_pair),
            "b": NodeScores("b", "attn_head", ("pair", "layer", "head"), {"layer": [1], "head": [0, 1]}, other),
        },
        metric_clean=torch.zeros(2), metric_noise=torch.ones(2), clean_tokens=[[1], [1]], noise_tokens=[[2], [2]],
        plan_json="{}", method="atp", metric="logit_diff", model={},
    )
    loaded = af.load_result(result.save(tmp_path / "nan.safetensors"))
    # mean |score| over the two pairs: a = [1, nan, 3, 0.5], b = [nan, 2]
    expected = [("a", 2, 3.0), ("b", 1, 2.0), ("a", 0, 1.0), ("a", 3, 0.5)]
    for res in (result, loaded):
        top = res.top_k(6)
        assert [(r.name, r.coords["head"], r.score) for r in top[:4]] == expected
        assert {(r.name, r.coords["head"]) for r in top[4:]} == {("a", 1), ("b", 0)}
        assert all(math.isnan(r.score) for r in top[4:])
        assert [(r.name, r.coords["head"]) for r in res.top_k(2)] == [("a", 2), ("b", 1)]
        assert [(r.name, r.coords["head"]) for r in res.top_k(1, names=["b"])] == [("b", 1)]


# ----------------------------------------------------------------------------------------- ranking
STEPS = [0.0, 0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0]
"""Per-pair values of the random results: few and dyadic, so scores tie, signed means cancel to 0, and every
sum over pairs is exact whichever way it is computed."""


def _random_selection(rng: random.Random, name: str, n_pairs: int, sparse: bool) -> NodeScores:
    """A dense or sparse selection of 1 to 3 axes after ``pair``, values from ``STEPS``, maybe a NaN or inf."""
    sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
    dims = ("pair", "layer", "pos", "head")[: 1 + len(sizes)]
    index = {d: "all" if n == 1 and rng.random() < 0.3 else sorted(rng.sample(range(-3, 40), n))
             for d, n in zip(dims[1:], sizes)}
    shape = (n_pairs, *sizes)
    total = math.prod(shape)
    stored = rng.sample(range(total), rng.randint(0, total // 2 + 1)) if sparse else list(range(total))
    values = [rng.choice(STEPS) for _ in stored]
    for special in (math.nan, math.inf):
        if values and rng.random() < (0.5 if special != math.inf else 0.15):
            values[rng.randrange(len(values))] = special
    if not sparse:
        return NodeScores(name, "attn_head", dims, index, torch.tensor(values).reshape(shape))
    coords = torch.stack(torch.unravel_index(torch.tensor(stored, dtype=torch.int64), shape)).reshape(len(shape), -1)
    per_pair = torch.sparse_coo_tensor(coords, torch.tensor(values, dtype=torch.float32), shape, check_invariants=True).coalesce()
    return NodeScores(name, "sae_latent", dims, index, per_pair)


def _random_result(seed: int) -> AttributionResult:
    """1 to 4 pairs, 1 to 3 selections, each dense or sparse at random."""
    rng = random.Random(seed)
    n_pairs = rng.randint(1, 4)
    nodes = {f"s{j}": _random_selection(rng, f"s{j}", n_pairs, sparse=rng.random() < 0.6) for j in range(rng.randint(1, 3))}
    return AttributionResult(nodes=nodes, metric_clean=torch.zeros(n_pairs), metric_noise=torch.ones(n_pairs),
                             clean_tokens=[[1]] * n_pairs, noise_tokens=[[2]] * n_pairs, plan_json="{}", method="atp",
                             metric="logit_diff", model={})


def _number(x: float) -> float | str:
    return "nan" if math.isnan(x) else x


def _row(r) -> tuple:
    """A ``TopNode`` as a comparable tuple (NaN compares equal to NaN)."""
    return r.name, r.kind, tuple(r.coords.items()), _number(r.score), _number(r.signed_mean)


def _reference_top_k(result: AttributionResult, k: int, how: str, names: list[str] | None = None) -> list[tuple]:
    """``top_k`` by its documented order, from each selection's dense per-pair tensor: every node's mean over
    pairs, sorted by (NaN last, |score| descending, selection order, flat index)."""
    rows = []
    for place, name in enumerate(names or list(result.nodes)):
        ns = result[name]
        dense = ns.per_pair.to_dense()
        score = (dense.abs() if how == "mean_abs" else dense).mean(0)
        signed = dense.mean(0).flatten().tolist()
        for i, s in enumerate(score.flatten().tolist()):
            coords, rest = [], i
            for size in reversed(score.shape):
                coords.insert(0, rest % size)
                rest //= size
            labels = tuple((d, "all" if ns.index[d] == "all" else ns.index[d][c]) for d, c in zip(ns.dims[1:], coords))
            key = (math.isnan(s), 0.0 if math.isnan(s) else -abs(s), place, i)
            rows.append((key, (name, ns.kind, labels, _number(s), _number(signed[i]))))
    rows.sort(key=lambda r: r[0])
    return [row for _, row in rows[:k]]


def test_top_k_follows_the_documented_order_on_random_dense_and_sparse_results(tmp_path):
    """Seeded random results (dense and sparse selections, ties, zeros, stored zeros, NaN, inf): ``top_k``
    equals the reference for every k, aggregate and choice of selections; the sparse ranking equals the
    dense one of the same scores, and a saved file ranks the same."""
    seen = {"sparse": 0, "nan": 0, "tie": 0, "zero": 0}
    for seed in range(40):
        result = _random_result(seed)
        dense = AttributionResult(**{**vars(result), "nodes": {
            n: NodeScores(ns.name, ns.kind, ns.dims, ns.index, ns.per_pair.to_dense()) for n, ns in result.nodes.items()}})
        total = sum(math.prod(ns.per_pair.shape[1:]) for ns in result.nodes.values())
        names = list(result.nodes)[::-1][: max(1, len(result.nodes) - 1)]
        for how in ("mean_abs", "mean"):
            for k in sorted({0, 1, 2, 5, total // 2, total, total + 3}):
                for chosen in (None, names):
                    expected = _reference_top_k(result, k, how, chosen)
                    assert [_row(r) for r in result.top_k(k, how, chosen)] == expected, (seed, how, k, chosen)
                    assert [_row(r) for r in dense.top_k(k, how, chosen)] == expected, (seed, how, k, chosen)
            scores = [row[3] for row in _reference_top_k(result, total, how)]
            seen["nan"] += "nan" in scores
            seen["zero"] += 0.0 in scores
            seen["tie"] += len({abs(s) for s in scores if s != "nan"}) < sum(s != "nan" for s in scores)
        seen["sparse"] += any(ns.per_pair.is_sparse for ns in result.nodes.values())
        if seed % 10 == 0:
            loaded = af.load_result(result.save(tmp_path / f"r{seed}.safetensors"))
            assert [_row(r) for r in loaded.top_k(total)] == _reference_top_k(result, total, "mean_abs")
    print(f"random results: {seen}")
    assert min(seen.values()) >= 10, seen  # the cases the rule is about do occur
    with pytest.raises(ValueError, match="k must be >= 0"):
        result.top_k(-1)


HUGE_LABELS = {"layer": list(range(2048)), "pos": list(range(1024)), "latent": list(range(1024))}
"""Honest labels of 2**31 nodes per pair (``MAX_NODES``, the most a file may describe) in 4096 label ints."""


def _huge_sparse_result() -> AttributionResult:
    """A sparse ``pair layer pos latent`` selection labelled ``HUGE_LABELS`` with six stored entries (one a
    stored 0, one in the very last node); its dense form would be 2 x 2**31 floats (16 GiB)."""
    coords = torch.tensor([[0, 1, 0, 1, 1, 0], [2047, 2047, 0, 5, 0, 3], [1023, 1023, 0, 7, 0, 0], [1023, 1023, 1, 9, 0, 2]])
    values = torch.tensor([3.0, 1.0, -1.5, 2.5, 0.0, -0.5])
    latents = torch.sparse_coo_tensor(coords, values, (2, 2048, 1024, 1024), check_invariants=True).coalesce()
    return AttributionResult(
        nodes={"latents": NodeScores("latents", "sae_latent", ("pair", "layer", "pos", "latent"), HUGE_LABELS, latents)},
        metric_clean=torch.zeros(2), metric_noise=torch.ones(2), clean_tokens=[[1], [1]], noise_tokens=[[2], [2]],
        plan_json="{}", method="atp", metric="logit_diff", model={},
    )


HUGE_TOP = ["latents L2047 P1023 latent1023", "latents L5 P7 latent9", "latents L0 P0 latent1", "latents L3 P0 latent2",
            "latents L0 P0 latent0", "latents L0 P0 latent2", "latents L0 P0 latent3", "latents L0 P0 latent4"]
"""``_huge_sparse_result``'s top 8 by mean |effect|: the four stored nonzero nodes (2.0, 1.25, 0.75, 0.25),
then zero-score nodes by flat index: the stored 0 at flat 0, then unstored ones, skipping the stored flat 1."""


MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[3:], timeout=float(sys.argv[2]))
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""
"""Runs a command as its own child and writes that child's peak RSS (KiB). A child forked straight from
pytest would report pytest's own RSS as its peak (Linux carries the resident size across fork and exec
into ``ru_maxrss``); this small interpreter starts it from ~10 MiB instead."""


def _run_capped(cmd: list[str], tmp_path: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd`` with its address space capped at 2 GiB: the finished process and its own peak RSS (KiB)."""
    rss = tmp_path / "maxrss.txt"
    done = subprocess.run([sys.executable, "-c", MEASURE, str(rss), str(timeout), *cmd], capture_output=True, text=True,
                          timeout=timeout + 30,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * GIB, resource.RLIM_INFINITY)))
    return done, int(rss.read_text())


def test_atpf_show_ranks_a_huge_sparse_selection_within_its_stored_entries(tmp_path):
    """A 20 KB file whose labels honestly describe 2**31 nodes per pair loads, and ``top_k`` used to densify
    it (``aggregate``: 8 GiB per call, so ``atpf show`` died under a 2 GiB cap). Now ``top_k`` and ``atpf show``
    rank the six stored entries and enumerate zero-score nodes, in bounded memory."""
    path = _huge_sparse_result().save(tmp_path / "huge.safetensors")
    assert path.stat().st_size < 30_000
    done, maxrss_kib = _run_capped([sys.executable, "-m", "atpframework", "show", str(path)], tmp_path)
    print(f"atpf show on 2**31 labelled nodes: exit {done.returncode}, peak RSS {maxrss_kib / 1024:.0f} MiB")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split()[1:5] for line in done.stdout.splitlines()[3:]]
    assert len(rows) == 20
    assert [" ".join(r) for r in rows[:8]] == HUGE_TOP
    assert maxrss_kib < 700 * 1024  # ~250 MiB, torch included

    result = af.load_result(path)  # the same in-process, under a 1 GiB cap
    with _address_space_cap(GIB):
        top = result.top_k(8)
        signed = result.top_k(3, how="mean")
    assert [r.label() for r in top] == HUGE_TOP
    assert [r.score for r in top] == [2.0, 1.25, 0.75, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert [r.signed_mean for r in top[:4]] == [2.0, 1.25, -0.75, -0.25]
    assert [(r.label(), r.score) for r in signed] == [(HUGE_TOP[0], 2.0), (HUGE_TOP[1], 1.25), (HUGE_TOP[2], -0.75)]


# ----------------------------------------------------------------------------------------- fuzzing
JUNK = [None, True, 0, -1, 1.5, 10**30, -(10**18), "x", "all", "", [], {}, [1, "a"], [[1]], {"a": 1}, [-1, -2], "DEEP"]
"""Values put where metadata fields belong; "DEEP" becomes JSON nested too deeply to parse."""
HUGE_SHAPES = [[1, 10**6, 10**6], [2, 10**6, 10**6, 10**6], [2, 1, 3, 10**9], [2, 1, 3, 2**62], [2, 1, 3, -8], [2, 1, 3], [], [2.0, 1, 3, 8],
               [2, 1, 3, 10**8], [2, 1, 20_000, 20_000]]
"""Claimed sparse shapes; the last two densify to 1.2 and 1.6 GB, which the old loader allocated."""
DTYPES = [torch.int32, torch.int64, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.float32]


def _junk(rng: random.Random):
    return rng.choice(JUNK)


def _dump_nodes(meta: dict[str, str], nodes) -> None:
    meta["atpf.nodes"] = json.dumps(nodes).replace('"DEEP"', _deep(5_000))


def _m_drop_meta(rng, meta, tensors):
    meta.pop(rng.choice(sorted(meta)))


def _m_junk_meta(rng, meta, tensors):
    text = rng.choice(["", "null", "5", "-3", "[]", "{}", '"x"', "{not json", "1e999", "NaN", "9" * 5000, _deep(), '{"a": ' * 3000])
    meta[rng.choice(sorted(meta))] = text


def _m_node_field(rng, meta, tensors):
    nodes = json.loads(meta["atpf.nodes"])
    sel = nodes[rng.choice(sorted(nodes))]
    field = rng.choice(["kind", "dims", "index", "layout", "shape"])
    if rng.random() < 0.3:
        sel.pop(field, None)
    else:
        sel[field] = _junk(rng)
    _dump_nodes(meta, nodes)


def _m_labels(rng, meta, tensors):
    nodes = json.loads(meta["atpf.nodes"])
    sel = nodes[rng.choice(sorted(nodes))]
    dim = rng.choice(sorted(sel["index"]))
    labels = sel["index"][dim]
    sel["index"][dim] = rng.choice([
        "all", [0], list(range(5)), [], [10**30] * (1 if labels == "all" else len(labels)),
        labels[:-1] if isinstance(labels, list) else [0, 1], _junk(rng),
    ])
    if rng.random() < 0.3:
        sel["index"][rng.choice(["extra", "pair", "layer"])] = [0]
    _dump_nodes(meta, nodes)


def _m_dims(rng, meta, tensors):
    nodes = json.loads(meta["atpf.nodes"])
    sel = nodes[rng.choice(sorted(nodes))]
    dims = sel["dims"]
    sel["dims"] = rng.choice([dims[:-1], dims + ["extra"], dims[::-1], dims[:1], [dims[0]] + dims, ["pair", "layer"] + ["x"] * 40, dims[1:]])
    _dump_nodes(meta, nodes)


def _m_sparse_shape(rng, meta, tensors):
    nodes = json.loads(meta["atpf.nodes"])
    nodes["latents"]["shape"] = rng.choice(HUGE_SHAPES)
    if rng.random() < 0.3:  # a dense selection claiming to be sparse
        nodes[rng.choice(["heads", "resid"])].update(layout="sparse_coo", shape=rng.choice(HUGE_SHAPES))
    _dump_nodes(meta, nodes)


def _m_nodes_top(rng, meta, tensors):
    nodes = json.loads(meta["atpf.nodes"])
    meta["atpf.nodes"] = rng.choice([
        "[]", "5", '"heads"', '{"heads": 5}', '{"heads": []}', "{}", '{"nope": ' + json.dumps(nodes["heads"]) + "}",
        json.dumps({"renamed": nodes["latents"]}), json.dumps({**nodes, "heads": {**nodes["heads"], "layout": "sparse_coo"}}),
        json.dumps({**nodes, "resid": {**nodes["resid"], "layout": "dense", "dims": ["pair", "layer", "pos", "pos"]}}),
    ])


def _m_drop_tensor(rng, meta, tensors):
    tensors.pop(rng.choice(sorted(tensors)))


def _m_dtype(rng, meta, tensors):
    key = rng.choice(sorted(tensors))
    tensors[key] = tensors[key].to(rng.choice(DTYPES))


def _m_shape(rng, meta, tensors):
    key = rng.choice(sorted(tensors))
    value = tensors[key]
    options = [value.flatten(), value.unsqueeze(0), value[:1], value[:0], value.reshape(-1)[:1].reshape(()),
               torch.cat([value, value]), value.t() if value.ndim == 2 else value.unsqueeze(-1)]
    tensors[key] = rng.choice(options)


def _m_values(rng, meta, tensors):
    choice = rng.randrange(7)
    if choice == 0:
        tensors["tokens.length"] = torch.tensor([rng.choice([-5, 4, 10**12]), 2])
    elif choice == 1:
        tensors["verified.heads.index"] = torch.tensor([0, rng.choice([24, 10**9, -1]), 3])
    elif choice == 2:
        indices = tensors["scores.latents.indices"].clone()
        indices[rng.randrange(4), rng.randrange(indices.shape[1])] = rng.choice([-1, 3, 8, 10**12])
        tensors["scores.latents.indices"] = indices
    elif choice == 3:
        key = rng.choice(["scores.heads", "scores.latents.values", "metric.clean", "scores.resid"])
        tensors[key] = torch.full_like(tensors[key], rng.choice([math.nan, math.inf, -math.inf]))
    elif choice == 4:
        tensors["verified.ghost.index"] = torch.tensor([0])
    elif choice == 5:
        tensors["extras.heads.stderr"] = tensors["extras.heads.stderr"][:1]
    else:
        tensors[rng.choice(["unknown", "scores.unknown", "verified.heads.other"])] = torch.zeros(3)


def _m_huge_labels(rng, meta, tensors):
    """Honest labels of 2**31 latents per pair, the stored coordinates still in bounds: loads, ranks in small memory."""
    nodes = json.loads(meta["atpf.nodes"])
    nodes["latents"].update(index=HUGE_LABELS, shape=[2, 2048, 1024, 1024])
    _dump_nodes(meta, nodes)


def _m_verified(rng, meta, tensors):
    key = rng.choice(["verified.heads.index", "verified.heads.rank", "verified.heads.effects"])
    tensors[key] = rng.choice([tensors[key][..., :2], tensors[key].float(), torch.zeros(0, dtype=torch.int64)])


TENSOR_MUTATIONS = [_m_drop_meta, _m_junk_meta, _m_node_field, _m_labels, _m_dims, _m_sparse_shape, _m_nodes_top,
                    _m_drop_tensor, _m_dtype, _m_shape, _m_values, _m_verified, _m_huge_labels]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    header = int.from_bytes(data[:8], "little")
    choice = rng.randrange(5)
    if choice == 0:  # truncated
        return data[: rng.randrange(len(data))]
    if choice == 1:  # a few bytes of the JSON header changed
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(8, 8 + header)] = rng.randrange(256)
        return bytes(out)
    if choice == 2:  # a header length that lies
        return rng.choice([2**63, header + 1, header - 1, 0]).to_bytes(8, "little") + data[8:]
    if choice == 3:  # tensor data changed (lengths, labels and offsets intact)
        out = bytearray(data)
        for _ in range(32):
            out[rng.randrange(8 + header, len(out))] = rng.randrange(256)
        return bytes(out)
    return bytes(rng.randrange(256) for _ in range(rng.choice([0, 7, 64, 4096])))


def _fuzz_files(valid: Path, out: Path, n: int = N_FUZZ, seed: int = 20240611) -> list[Path]:
    """``n`` mutated copies of ``valid``: one or two tensor/metadata mutations each, or mangled bytes."""
    rng = random.Random(seed)
    meta0, tensors0 = _read(valid)
    data0 = valid.read_bytes()
    files = []
    for i in range(n):
        path = out / f"fuzz{i:03d}.safetensors"
        if i % 6 == 5:
            path.write_bytes(_mutate_bytes(rng, data0))
        else:
            meta, tensors = dict(meta0), dict(tensors0)
            first = TENSOR_MUTATIONS[(i - i // 6) % len(TENSOR_MUTATIONS)]  # each in turn over the non-byte files
            for mutation in [first] + rng.sample(TENSOR_MUTATIONS, rng.choice([0, 0, 1])):
                with contextlib.suppress(KeyError, IndexError, ValueError, TypeError, AttributeError):
                    mutation(rng, meta, tensors)  # skipped where an earlier mutation removed what it edits
            _write(path, meta, tensors)
        files.append(path)
    return files


def _exercise(path: Path) -> str:
    """Load ``path`` and use it as ``atpf show`` does; "loaded", "refused", or the escaping exception."""
    try:
        result = af.load_result(path)
    except SchemaError:
        return "refused"
    except Exception as err:  # noqa: BLE001 - what the test counts
        return f"load: {type(err).__name__}: {str(err)[:200]}"
    try:
        for how in ("mean_abs", "mean"):
            result.top_k(5, how=how)
            for ns in result.nodes.values():
                if math.prod(ns.per_pair.shape[1:]) <= 2**24:  # aggregate is dense by design (2**31 nodes: 8 GiB)
                    ns.aggregate(how)
    except Exception as err:  # noqa: BLE001
        return f"use: {type(err).__name__}: {str(err)[:200]}"
    return "loaded"


DRIVER = """
import contextlib, io, json, sys, traceback
from atpframework.cli import main

for path in json.loads(open(sys.argv[1]).read()):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["show", path], standalone_mode=False)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = "raised"
            traceback.print_exc()
    print(json.dumps({"path": path, "code": code, "stderr": err.getvalue()[-2000:]}))
with open("/proc/self/status") as f:  # VmHWM, not ru_maxrss: that counts pytest's own RSS, inherited at fork
    print(json.dumps({"maxrss_kib": next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))}))
"""


def _cap_child_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 * GIB, resource.RLIM_INFINITY))


def _show_all(paths: list[Path], tmp_path: Path) -> tuple[list[dict], int]:
    """``atpf show`` on every path in one capped subprocess: per-file exit code and stderr, and peak RSS (KiB)."""
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(driver), str(listing)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_cap_child_memory)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[:-1], lines[-1]["maxrss_kib"]


def test_fuzzed_result_files_load_or_raise_schema_error(valid_file, tmp_path):
    """Every mutated file either loads (and ranks and aggregates) or raises SchemaError, in Python and in
    ``atpf show`` (exit 0 or 2, no traceback, bounded memory)."""
    files = _fuzz_files(valid_file, tmp_path)
    assert len(files) >= 50
    with _address_space_cap(2 * GIB):
        outcomes = {path.name: _exercise(path) for path in files}
    raw = {name: what for name, what in outcomes.items() if what not in ("loaded", "refused")}
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("loaded", "refused")}
    print(f"fuzz: {len(files)} files, {counts}, {len(raw)} raw exceptions")
    assert not raw, f"{len(raw)} of {len(files)} files escaped as other exceptions:\n" + "\n".join(f"{k}: {v}" for k, v in raw.items())
    assert counts["refused"] >= len(files) // 2 and counts["loaded"] >= 3  # the mutations do bite, and some are harmless

    shown, maxrss_kib = _show_all([valid_file] + files, tmp_path)
    assert len(shown) == len(files) + 1
    assert shown[0]["code"] == 0, shown[0]
    bad = [s for s in shown if s["code"] not in (0, 2) or "Traceback" in s["stderr"]]
    assert not bad, "atpf show failed on:\n" + "\n".join(f"{s['path']}: exit {s['code']}: {s['stderr'][-300:]}" for s in bad)
    for s in shown[1:]:  # the CLI and the Python API agree
        assert s["code"] == (0 if outcomes[Path(s["path"]).name] == "loaded" else 2), s
    print(f"atpf show: exit codes {sorted({s['code'] for s in shown})}, peak RSS {maxrss_kib / 1024:.0f} MiB")
    assert maxrss_kib < GIB / 1024  # ~280 MiB here, torch included; the old loader peaked at 1.4 GiB (capped)


def test_atpf_show_subprocess_on_valid_bomb_and_broken_files(valid_file, tmp_path):
    """The real command line, three times: a valid file (exit 0), the sparse-shape bomb and deep JSON (exit 2)."""
    bomb = _bomb(tmp_path / "bomb.safetensors", [2, 100_000, 100_000])
    meta, tensors = _read(valid_file)
    deep = _write(tmp_path / "deep.safetensors", {**meta, "atpf.nodes": _deep()}, tensors)
    for path, code, says in [(valid_file, 0, "heads"), (bomb, 2, "atpf.nodes.latents.shape"), (deep, 2, "atpf.nodes: not valid JSON")]:
        done = subprocess.run([sys.executable, "-m", "atpframework", "show", str(path)], capture_output=True, text=True,
                              timeout=60, preexec_fn=_cap_child_memory)
        assert done.returncode == code, (path, done.stderr)
        assert says in (done.stdout if code == 0 else done.stderr)
        assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------- token strings
def test_token_strings_round_trip_label_positions_and_old_files_still_load(valid_file, tmp_path):
    """Schema 4 stores every prompt token decoded; labels and the dataframe name the token at a node's
    position; a schema-3 file (no strings) loads as before and ``with_token_strings`` adds them."""
    vocab = {1: "When", 2: " Mary", 3: " to", 4: "Ä", 5: "\n", 6: " John", 9: " Bob"}
    result = _valid_result().with_token_strings(lambda ids: [vocab[i] for i in ids])
    path = result.save(tmp_path / "strings.safetensors")
    loaded = af.load_result(path)
    assert loaded.clean_strings == [["When", " Mary", " to"], ["Ä", "\n"]]
    assert loaded.noise_strings == [["When", " Bob", " to"], ["Ä", " John"]]
    # pos 1 holds " Mary" in pair 0 and "\n" in pair 1; pos -1 is absolute 2 and 1: the plan's label stays
    assert loaded.position_text(1) == ('" Mary"/"\\n"', "1")
    assert loaded.position_text(-1) == ('" to"/"\\n"', "-1")
    assert loaded.position_text("all") == ("", "all")
    heads = loaded["heads"].aggregate().flatten()
    top = loaded.top_k(1, names=["heads"])[0]
    pos = top.coords["pos"]
    assert top.label() == f'heads L{top.coords["layer"]} H{top.coords["head"]} @ {loaded.position_text(pos)[0]} (pos {pos})'
    assert top.score == pytest.approx(float(heads.max()))
    df = loaded.to_dataframe()
    rows = df[df.name == "heads"]
    assert list(rows.token) == [loaded.position_text(p)[0] for p in rows.pos]
    assert set(df[df.name == "resid"].token) == {""}  # merged positions name no token

    # the same file as schema 3 wrote it: no token strings, labels with P<pos>
    meta, tensors = _read(path)
    del meta["atpf.token_strings"]
    meta["atpf.schema_version"] = "3"
    old = af.load_result(_write(tmp_path / "v3.safetensors", meta, tensors))
    assert old.clean_strings == [] and "token" not in old.to_dataframe().columns
    assert old.top_k(1, names=["heads"])[0].label() == f'heads L{top.coords["layer"]} P{pos} H{top.coords["head"]}'
    assert old.with_token_strings(lambda ids: [vocab[i] for i in ids]).clean_strings == loaded.clean_strings
    with pytest.raises(ValueError, match="decode returned 1 strings for the 3 tokens of clean prompt 0"):
        old.with_token_strings(lambda ids: ["x"])

    # strings that do not match the stored tokens name the field
    meta, tensors = _read(path)
    meta["atpf.token_strings"] = json.dumps({"clean": [["When"], ["Ä", "\n"]], "noise": loaded.noise_strings})
    with pytest.raises(SchemaError, match=r"atpf\.token_strings\.clean: expected one list of strings per pair"):
        af.load_result(_write(tmp_path / "bad.safetensors", meta, tensors))
