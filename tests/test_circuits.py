"""Circuits of edge results (``atpframework.analysis.circuits``): the full circuit gives 1 and the empty one 0 on every
tiny architecture, circuit faithfulness equals a hand-written TransformerLens forward, a planted path is recovered,
greedy circuits keep exactly the edges on embeddings -> logits paths, and ``atpf circuit`` writes its files and
refuses bad input with exit code 2."""

import csv
import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.analysis.circuits import (
    CircuitEvaluator,
    ResultEdges,
    circuit_faithfulness,
    circuit_graph,
    curve_areas,
    extract_circuit,
)
from atpframework.cli import main

KINDS = ("edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits")


def edge_plan(model, positions="each", method="atp", **extra):
    kinds = [k for k in KINDS if k != "edge_mlp" or not model.cfg.attn_only]
    return make_plan([{"kind": k, "positions": positions} for k in kinds], method=method, **extra)


def edge_result(model, positions="each"):
    return af.run(edge_plan(model, positions), model=model, progress=False)


# --------------------------------------------------------------------------------- an independent reference
def writer_hooks(cfg):
    """Per writer index: (hook name, head or None), in the edge model's writer order."""
    out = [("blocks.0.hook_resid_pre", None)]
    for layer in range(cfg.n_layers):
        out += [(f"blocks.{layer}.attn.hook_result", h) for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            out.append((f"blocks.{layer}.hook_mlp_out", None))
    return out


def kept_edges(result, nodes):
    """The result's nodes (all selections per position) as (reader kind, model layer, position, head, writer) tuples."""
    kinds = {"edge_q": "q", "edge_k": "k", "edge_v": "v", "edge_mlp": "mlp", "edge_logits": "logits"}
    out = set()
    for node in nodes:
        name, coords = result.numbering.locate(int(node))
        ns = result[name]
        labels = [ns.index[d][c] for d, c in zip(ns.dims[1:], coords)]
        if len(labels) == 3:  # no head axis
            labels.insert(2, 0)
        out.add((kinds[ns.kind], *labels))
    return out


def brute_force_metric(model, result, nodes, prompts, unscored_kept=False):
    """logit difference per pair of a circuit forward written from scratch: every reader's input is rebuilt as the
    sum over its upstream writers of (kept edge: the writer's value in this forward; else: its noise-run value)
    plus the attention output biases below it. ``unscored_kept``: edges the result does not score count as kept."""
    cfg = model.cfg
    kept = kept_edges(result, nodes)
    scored = kept_edges(result, range(result.numbering.n_nodes))
    hooks = writer_hooks(cfg)
    per_block = cfg.n_heads + (not cfg.attn_only)
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    clean = torch.tensor([p["clean"] for p in prompts])
    noise = torch.tensor([p["noise"] for p in prompts])
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    if not cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(noise)
        noise_w = [cache[name] if head is None else cache[name][:, :, head] for name, head in hooks]
        current: dict[str, torch.Tensor] = {}

        def store(act, hook):
            current[hook.name] = act.detach().clone()

        def value(w):
            name, head = hooks[w]
            return current[name] if head is None else current[name][:, :, head]

        def bias(n_attn):
            return sum((model.blocks[i].attn.b_O for i in range(n_attn)), torch.zeros(cfg.d_model))

        def rebuild(kind, layer, upstream, n_attn):
            def hook(act, hook):
                out = torch.zeros_like(act)
                heads = act.shape[2] if act.dim() == 4 else 1
                for pos in range(act.shape[1]):
                    for h in range(heads):
                        total = bias(n_attn).clone().expand(act.shape[0], -1).clone()
                        for w in range(upstream):
                            edge = (kind, layer, pos, h, w)
                            keep = edge in kept or (unscored_kept and edge not in scored)
                            total += value(w)[:, pos] if keep else noise_w[w][:, pos]
                        if act.dim() == 4:
                            out[:, pos, h] = total
                        else:
                            out[:, pos] = total
                return out
            return hook

        fwd = [(name, store) for name in {n for n, _ in hooks}]
        for layer in range(cfg.n_layers):
            up = 1 + layer * per_block
            for kind in ("q", "k", "v"):
                fwd.append((f"blocks.{layer}.hook_{kind}_input", rebuild(kind, layer, up, layer)))
            if not cfg.attn_only:
                fwd.append((f"blocks.{layer}.hook_mlp_in", rebuild("mlp", layer, up + cfg.n_heads, layer + 1)))
        total = 1 + cfg.n_layers * per_block
        fwd.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", rebuild("logits", cfg.n_layers, total, cfg.n_layers)))
        with torch.no_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=fwd)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(False)
    assert group >= 1
    answer = torch.tensor([p["answer"] for p in prompts])
    wrong = torch.tensor([p["wrong_answer"] for p in prompts])
    last = logits[:, -1]
    return (last[torch.arange(len(prompts)), answer] - last[torch.arange(len(prompts)), wrong]).double()


# --------------------------------------------------------------------------------- full, empty, brute force
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_full_circuit_gives_one_and_the_empty_circuit_zero(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    for positions in ("each", "all"):
        result = edge_result(model, positions)
        evaluator = CircuitEvaluator(result, model=model)
        n = evaluator.edges.n_nodes
        keep = torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        values = evaluator.metrics(keep)
        gap = (evaluator.metric_clean - evaluator.metric_noise).abs().min()
        assert gap > 1e-2, "the prompt pairs must differ in metric for the check to mean anything"
        torch.testing.assert_close(values[0], evaluator.metric_clean, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[1], evaluator.metric_noise, atol=1e-5, rtol=0)
        faithfulness, per_pair = evaluator.faithfulness(keep)
        assert abs(float(faithfulness[0]) - 1) < 1e-5 and abs(float(faithfulness[1])) < 1e-5, (arch, positions, faithfulness)
        assert (per_pair[0] - 1).abs().max() < 1e-4 and per_pair[1].abs().max() < 1e-4
        # the stored metrics are the ones measured here (the same model)
        torch.testing.assert_close(evaluator.metric_clean.float(), result.metric_clean, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated", "attn_only_nonorm"])
def test_circuit_metrics_equal_a_hand_written_forward(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    result = edge_result(model, "each")
    evaluator = CircuitEvaluator(result, model=model, circuits_per_pass=2)
    edges = evaluator.edges
    rng = random.Random(0)
    every = edges.ranking.tolist()
    circuits = [
        torch.tensor(sorted(rng.sample(every, len(every) // 3))),
        torch.tensor(sorted(rng.sample(every, 2 * len(every) // 3))),
        extract_circuit(result, 25).nodes,
    ]
    values = evaluator.metrics(evaluator.keep(circuits))
    prompts = make_plan([])["prompts"]
    spread = []
    for circuit, got in zip(circuits, values):
        expected = brute_force_metric(model, result, circuit.tolist(), prompts)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        spread.append(expected)
    assert (spread[0] - spread[1]).abs().max() > 1e-3, "the circuits must differ in metric for the check to mean anything"


@pytest.mark.parametrize("unscored", ["noise", "clean"])
def test_edges_the_result_does_not_score_carry_noise_or_stay_clean(unscored):
    model = tiny_model()
    plan = make_plan([{"kind": "edge_v", "positions": "each"}, {"kind": "edge_mlp", "positions": "each", "layers": [1]}])
    result = af.run(plan, model=model, progress=False)
    evaluator = CircuitEvaluator(result, model=model, unscored=unscored)
    n = evaluator.edges.n_nodes
    circuits = [torch.arange(n), torch.zeros(0, dtype=torch.long), extract_circuit(result, 30).nodes]
    values = evaluator.metrics(evaluator.keep(circuits))
    for circuit, got in zip(circuits, values):
        expected = brute_force_metric(model, result, circuit.tolist(), plan["prompts"], unscored_kept=unscored == "clean")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if unscored == "clean":
        torch.testing.assert_close(values[0], evaluator.metric_clean, atol=1e-5, rtol=0)
    else:
        assert (values[0] - evaluator.metric_clean).abs().max() > 1e-3, "the unscored edges carry noise"


def test_pairs_of_different_lengths_run_in_their_batches_and_prune_on_summed_positions():
    model = tiny_model()
    prompts = [{"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
               {"clean": [7, 8, 2, 4, 5], "noise": [7, 12, 2, 4, 5], "answer": 6, "wrong_answer": 2}]
    plan = make_plan([{"kind": k, "positions": "all"} for k in KINDS], prompts=prompts)
    result = af.run(plan, model=model, progress=False)
    evaluator = CircuitEvaluator(result, model=model)
    assert len(evaluator.batches) == 2 and evaluator.edges.prune_positions == 1
    n = evaluator.edges.n_nodes
    faithfulness, per_pair = evaluator.faithfulness(torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]))
    assert (per_pair[0] - 1).abs().max() < 1e-4 and per_pair[1].abs().max() < 1e-4
    tuples = {g: next(iter(kept_edges(result, [g]))) for g in range(n)}
    for size in (4, 12):
        greedy = extract_circuit(result, size, greedy=True).nodes.tolist()
        summed = [(kind, layer, 0, head, w) for kind, layer, _, head, w in (tuples[g] for g in greedy)]
        assert len(on_path_edges(model.cfg, summed)) == len(greedy) >= size


def test_the_areas_integrate_from_the_empty_circuit_to_the_full_one():
    areas = curve_areas([1, 10], torch.tensor([0.0, 0.5]), 100, empty=0.0, full=1.0)
    # log axis: x = 0, 0.5, 1 for sizes 1, 10, 100
    assert areas["cpr_log"] == pytest.approx(0.5) and areas["cmd_log"] == pytest.approx(0.5)
    # fraction axis: (0, 0) empty, (0.01, 0), (0.1, 0.5), (1, 1)
    cpr = 0.09 * 0.25 + 0.9 * 0.75
    assert areas["cpr_fraction"] == pytest.approx(cpr) and areas["cmd_fraction"] == pytest.approx(1 - cpr)
    # a curve whose first circuit is large starts from the empty circuit at size 1
    late = curve_areas([10], torch.tensor([0.5]), 100, empty=0.0, full=1.0)
    assert late["cpr_log"] == pytest.approx(0.5)
    assert curve_areas([1, 10], torch.tensor([1.0, 1.0]), 100, empty=0.0, full=1.0)["cmd_log"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------- a planted path
def planted_model():
    """Two attention-only layers, two heads each, uniform attention (W_Q = W_K = 0). The answer path: the token
    at position 0 (dims 0-3) -> L0H0 (writes dims 8-11) -> L1H0 (reads 8-11, writes 12-15) -> the unembedding
    (reads 12-15 only). The other path L0H1 (dims 16-19) -> L1H1 (dims 20-23) carries the same token where
    the unembedding never reads."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=24, n_heads=2, d_head=4, d_vocab=8, n_ctx=8, attn_only=True,
                                  d_mlp=None, normalization_type=None, act_fn="relu", seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, :8] = torch.eye(8)
        eye4 = torch.eye(4)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_V[0, 0:4] = eye4
        a0.W_O[0, :, 8:12] = eye4
        a0.W_V[1, 0:4] = eye4
        a0.W_O[1, :, 16:20] = eye4
        a1.W_V[0, 8:12] = eye4
        a1.W_O[0, :, 12:16] = eye4
        a1.W_V[1, 16:20] = eye4
        a1.W_O[1, :, 20:24] = eye4
        model.unembed.W_U[12:16, 0:4] = eye4
    return model.eval()


def test_a_planted_path_is_recovered_and_carries_the_whole_effect():
    model = planted_model()
    prompts = [{"clean": [1, 5, 6], "noise": [2, 5, 6], "answer": 1, "wrong_answer": 2},
               {"clean": [3, 4, 7], "noise": [0, 4, 7], "answer": 3, "wrong_answer": 0}]
    plan = make_plan([{"kind": k, "positions": "all"} for k in ("edge_q", "edge_k", "edge_v", "edge_logits")], prompts=prompts)
    result = af.run(plan, model=model, progress=False)
    assert (result.metric_clean > 0.5).all() and (result.metric_noise < -0.5).all()

    def edge(kind, *coords):
        """The global index of the node at ``coords`` (``layer pos [head] writer``) of selection ``kind``."""
        flat = 0
        for c, size in zip(coords, result[kind].per_pair.shape[1:]):
            flat = flat * size + c
        return result.numbering.offsets[list(result.nodes).index(kind)] + flat

    # writers: 0 embed, 1 L0H0, 2 L0H1, 3 L1H0, 4 L1H1
    carrying = {edge("edge_v", 0, 0, 0, 0), edge("edge_v", 1, 0, 0, 1), edge("edge_logits", 0, 0, 3)}
    other = {edge("edge_v", 0, 0, 1, 0), edge("edge_v", 1, 0, 1, 2), edge("edge_logits", 0, 0, 4)}
    top = extract_circuit(result, 3)
    assert set(top.nodes.tolist()) == carrying
    assert set(extract_circuit(result, 3, greedy=True).nodes.tolist()) == carrying
    evaluator = CircuitEvaluator(result, model=model)
    faithfulness, _ = evaluator.faithfulness(evaluator.keep([torch.tensor(sorted(carrying)), torch.tensor(sorted(other))]))
    assert abs(float(faithfulness[0]) - 1) < 1e-4, faithfulness
    assert abs(float(faithfulness[1])) < 1e-4, faithfulness
    curve = circuit_faithfulness(result, [1, 2, 3], model=model, progress=False)
    assert float(curve.faithfulness[-1]) == pytest.approx(1, abs=1e-4)
    assert float(curve.faithfulness[0]) == pytest.approx(0, abs=1e-4)  # one edge of the path alone carries nothing
    graph = circuit_graph(result, top.nodes)
    assert {(e["source"], e["target"], e["reader"]) for e in graph["edges"]} == {
        ("embed", "L0H0", "v"), ("L0H0", "L1H0", "v"), ("L1H0", "logits", "logits")}


# --------------------------------------------------------------------------------- greedy pruning
def on_path_edges(cfg, edges):
    """Which of ``edges`` (reader kind, layer, pos, head, writer) lie on an embeddings -> logits path, by search over
    (component, position): a writer at p feeds its reader at p; a query or MLP input at t feeds its output at t,
    a key/value input at s the outputs at t >= s of every head of its group."""
    per_block = cfg.n_heads + (not cfg.attn_only)
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    seq = 1 + max(e[2] for e in edges)

    def targets(kind, layer, pos, head):
        if kind == "logits":
            return [("logits", pos)]
        if kind == "mlp":
            return [(1 + layer * per_block + cfg.n_heads, pos)]
        base = 1 + layer * per_block
        if kind == "q":
            return [(base + head, pos)]
        return [(base + h, t) for h in range(head * group, (head + 1) * group) for t in range(pos, seq)]

    arcs = [((w, p), t, e) for e in edges for (kind, layer, p, head, w) in [e] for t in targets(kind, layer, p, head)]
    reached = {(0, p) for p in range(seq)}
    changed = True
    while changed:
        changed = False
        for source, target, _ in arcs:
            if source in reached and target not in reached:
                reached.add(target)
                changed = True
    live = {("logits", p) for p in range(seq)}
    changed = True
    while changed:
        changed = False
        for source, target, _ in arcs:
            if target in live and source not in live:
                live.add(source)
                changed = True
    return {e for source, target, e in arcs if source in reached and target in live}


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated"])
def test_greedy_circuits_keep_exactly_the_edges_on_paths(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    result = edge_result(model, "each")
    edges = ResultEdges(result)
    # the test's own ranking: existing edges by |mean score|, stable
    nodes = list(range(result.numbering.n_nodes))
    tuples = {n: next(iter(kept_edges(result, [n]))) for n in nodes}
    per_block = model.cfg.n_heads + (not model.cfg.attn_only)

    def upstream(kind, layer):
        if kind == "logits":
            return 1 + model.cfg.n_layers * per_block
        return 1 + layer * per_block + (model.cfg.n_heads if kind == "mlp" else 0)

    scores = torch.cat([ns.per_pair.mean(0).abs().flatten() for ns in result.nodes.values()])
    existing = [n for n in nodes if tuples[n][4] < upstream(tuples[n][0], tuples[n][1])]
    ranking = sorted(existing, key=lambda n: -float(scores[n]))
    assert ranking == edges.ranking.tolist()
    dropped = 0
    for n in (3, 10, 40):
        greedy = extract_circuit(result, n, greedy=True).nodes.tolist()
        assert len(greedy) >= n
        k = 1 + max(ranking.index(g) for g in greedy)
        prefix = ranking[:k]
        kept = on_path_edges(model.cfg, [tuples[g] for g in prefix])
        assert {tuples[g] for g in greedy} == kept, "greedy keeps exactly the prefix's edges on paths"
        assert len(on_path_edges(model.cfg, [tuples[g] for g in ranking[: k - 1]])) < n, "the prefix is the shortest"
        dropped += k - len(greedy)
    assert dropped > 0, "some dangling edge must have been pruned for the test to mean anything"


# --------------------------------------------------------------------------------- the command line
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_atpf_circuit_writes_the_curves_and_the_graph(tmp_path, hf_dir):
    plan = make_plan([{"kind": k, "positions": "all"} for k in KINDS])
    plan["model"]["source"] = str(hf_dir)
    af.run(plan, progress=False).save(tmp_path / "edges.safetensors")
    graddrop = dict(plan, method={"name": "atp_graddrop"})
    af.run(graddrop, progress=False).save(tmp_path / "graddrop.safetensors")
    out = tmp_path / "out"
    done = invoke("circuit", tmp_path / "edges.safetensors", tmp_path / "graddrop.safetensors", "--sizes", "1,4,2000",
                  "--graph-size", "6", "--out", out, "-q")
    assert done.exit_code == 0, (done.output, done.stderr)
    names = {"circuit.csv", "circuit.json", "faithfulness.png", "circuit_graph.json", "circuit.dot"}
    assert names <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "circuit.csv").open()))
    assert {r["method"] for r in rows} == {"atp", "atp_graddrop"} and len(rows) == 8
    full = [r for r in rows if r["requested"] == r["size"] and float(r["fraction"]) == 1]
    assert len(full) == 2 and all(abs(float(r["faithfulness"]) - 1) < 1e-4 for r in full)
    document = json.loads((out / "circuit.json").read_text())
    assert [c["method"] for c in document["curves"]] == ["atp", "atp_graddrop"]
    for curve in document["curves"]:
        assert abs(curve["full"] - 1) < 1e-4 and abs(curve["empty"]) < 1e-4
        assert set(curve["areas"]) == {"cpr_log", "cmd_log", "cpr_fraction", "cmd_fraction"}
    graph = json.loads((out / "circuit_graph.json").read_text())
    assert graph["size"] == 6 and graph["method"] == "atp" and graph["edges"]
    ids = {n["id"] for n in graph["nodes"]}
    dot = (out / "circuit.dot").read_text()
    assert dot.startswith("digraph")
    for e in graph["edges"]:
        assert e["source"] in ids and e["target"] in ids and e["reader"] in {"q", "k", "v", "mlp", "logits"}
        assert f'"{e["source"]}" -> "{e["target"]}"' in dot
    assert (out / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"
    assert "CPR" in done.output and "atp_graddrop" in done.output


def assert_usage_error(done, *fragments):
    assert done.exit_code == 2, (done.exit_code, done.output, done.stderr)
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.output


def test_atpf_circuit_refuses_bad_input_naming_the_option(tmp_path):
    model = tiny_model()
    nodes = af.run(make_plan([{"kind": "attn_head"}]), model=model, progress=False)
    nodes.save(tmp_path / "nodes.safetensors")
    edges = edge_result(model, "all")
    edges.save(tmp_path / "edges.safetensors")
    out = tmp_path / "out"
    assert_usage_error(invoke("circuit", tmp_path / "nodes.safetensors", "--out", out), "RESULT", "not edges", "attn_head")
    assert_usage_error(invoke("circuit", tmp_path / "edges.safetensors", "--sizes", "0,3", "--out", out), "--sizes")
    assert_usage_error(invoke("circuit", tmp_path / "edges.safetensors", "--sizes", "two", "--out", out), "--sizes")
    assert_usage_error(invoke("circuit", tmp_path / "edges.safetensors", "--out", out), "--model", "in_memory")
    assert not out.exists()


def test_atpf_compare_measures_faithfulness_on_edge_plans(tmp_path, hf_dir):
    """``compare --faithfulness``: each method's top-n circuits and the ground truth's, by exact patching; the
    numbers are those of ``circuit_faithfulness`` on the stored results; node plans and bad sizes are refused."""
    plan = make_plan([{"kind": k, "positions": "all"} for k in KINDS])
    plan["model"]["source"] = str(hf_dir)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "out"
    done = invoke("compare", plan_path, "--methods", "atp,atp_ig", "--faithfulness", "1,3,10", "--out", out, "-q")
    assert done.exit_code == 0, (done.output, done.stderr)
    document = json.loads((out / "compare.json").read_text())
    curves = {c["method"]: c for c in document["faithfulness"]}
    assert list(curves) == ["activation_patching", "atp", "atp_ig"]
    stored = af.load_result(out / "atp.safetensors")
    direct = af.circuit_faithfulness(stored, [1, 3, 10], progress=False)
    assert [p["faithfulness"] for p in curves["atp"]["points"]] == pytest.approx([float(f) for f in direct.faithfulness], abs=1e-6)
    assert (out / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"
    assert "| atp_ig |" in (out / "compare.md").read_text() and "CPR (log)" in done.output
    assert_usage_error(invoke("compare", plan_path, "--methods", "atp", "--faithfulness", "0,2", "--out", out), "--faithfulness")
    assert_usage_error(invoke("compare", plan_path, "--methods", "atp", "--greedy", "--out", out), "--greedy")
    heads = dict(plan, nodes=[{"kind": "attn_head"}])
    (tmp_path / "heads.json").write_text(json.dumps(heads))
    assert_usage_error(invoke("compare", tmp_path / "heads.json", "--methods", "atp", "--faithfulness", "2", "--out", tmp_path / "o2", "-q"),
                       "faithfulness", "edges")


def test_an_evaluator_serves_the_results_of_other_methods_with_their_own_rankings():
    model = tiny_model()
    plan = make_plan([{"kind": k, "positions": "all"} for k in KINDS])
    atp = af.run(plan, model=model, progress=False)
    star = af.run(dict(plan, method={"name": "atp_star"}), model=model, progress=False)
    evaluator = CircuitEvaluator(atp, model=model)
    shared = af.circuit_faithfulness(star, [1, 2, 4], evaluator=evaluator, progress=False)
    own = af.circuit_faithfulness(star, [1, 2, 4], model=model, progress=False)
    assert [c.tolist() for c in shared.circuits] == [c.tolist() for c in own.circuits]
    torch.testing.assert_close(shared.faithfulness, own.faithfulness)
    assert [c.tolist() for c in shared.circuits] != [c.tolist() for c in af.circuit_faithfulness(atp, [1, 2, 4], evaluator=evaluator, progress=False).circuits]
    other = af.run(dict(plan, nodes=[{"kind": k, "positions": "each"} for k in KINDS]), model=model, progress=False)
    with pytest.raises(af.PlanError, match="evaluator"):
        af.circuit_faithfulness(other, [1], evaluator=evaluator, progress=False)
