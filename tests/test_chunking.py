"""``max_memory``: runs split into fewer pairs per pass and into position chunks give the unchunked
scores, the chunking follows the budget, and budgets that cannot be met are refused clearly."""

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.engine.runner import compile_plan
from atpframework.methods.base import get_method
from atpframework.plans.chunking import node_positions, parse_bytes, position_chunks

SEQ = 10
NODES = [
    {"kind": "attn_head"},
    {"kind": "attn_head", "name": "heads_summed", "positions": "all"},
    {"kind": "attn_q"},
    {"kind": "attn_q", "name": "queries_summed", "positions": "all", "heads": [0, 2]},
    {"kind": "attn_k"},
    {"kind": "attn_k", "name": "keys_joint", "positions": "all"},
    {"kind": "attn_v", "positions": [1, 4, -1]},
    {"kind": "mlp_neuron", "neurons": [0, 5, 7, 40]},
    {"kind": "resid"},
    {"kind": "resid", "name": "resid_last", "layers": [2], "positions": [-1]},
]


def _pairs(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        clean = torch.randint(1, 60, (SEQ,), generator=gen)
        noise = clean.clone()
        noise[torch.tensor([2, 5, 7])] = torch.randint(1, 60, (3,), generator=gen)
        out.append({"clean": clean.tolist(), "noise": noise.tolist(), "answer": 3, "wrong_answer": 4})
    return out


def _budget_for(plan: dict, model, pairs: int, positions: int) -> int:
    """The budget at which the engine's own estimate admits exactly ``pairs`` pairs and ``positions`` positions."""
    backend = af.load_backend(af.as_plan(plan), model=model)
    compiled = compile_plan(af.as_plan(plan), backend)
    return get_method(plan["method"]["name"]).working_memory(compiled, pairs, SEQ, positions)


def _assert_same(chunked, unchunked, names, tol=1e-5):
    for name in names:
        a, b = chunked[name].per_pair, unchunked[name].per_pair
        scale = b.abs().max().item()
        assert scale > 1e-3, name
        # float32 rounding differs between pass shapes (pairs per pass), not more
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated"])
@pytest.mark.parametrize("method", ["atp", "atp_qkfix", "atp_graddrop", "atp_star"])
def test_position_chunks_give_the_unchunked_scores(arch, method):
    model = tiny_model(n_layers=2 if arch == "ln_gelu_learned" else 3, **ARCHITECTURES[arch])
    nodes = NODES if arch == "ln_gelu_learned" else [n for n in NODES if n.get("name") != "resid_last"]
    plan = make_plan(nodes, method={"name": method}, prompts=_pairs(5), batch_size=1)  # pass shapes as chunked
    unchunked = af.run(plan, model=model)
    budget = _budget_for(plan, model, 1, 3)
    chunked_plan = {**plan, "max_memory": budget}
    compiled = af.compile(chunked_plan, model=model)
    assert (compiled.chunking.pairs_per_pass, compiled.chunking.positions_per_chunk) == (1, 3)
    assert len(compiled.batches) == 5 and "x 4 position chunks" in compiled.explain()  # 10 positions in chunks of 3
    chunked = af.run(chunked_plan, model=model)
    _assert_same(chunked, unchunked, [n.get("name", n["kind"]) for n in nodes], tol=1e-6)
    torch.testing.assert_close(chunked.metric_clean, unchunked.metric_clean, rtol=0, atol=0)


def test_fewer_pairs_per_pass_give_the_same_scores_for_every_method():
    model = tiny_model()
    nodes = [{"kind": "attn_head"}, {"kind": "mlp_neuron", "neurons": [1, 2]}]
    for method in ("atp_star", "activation_patching"):
        plan = make_plan(nodes, method={"name": method}, prompts=_pairs(7, seed=1), batch_size=7)
        budget = _budget_for(plan, model, 3, SEQ)
        compiled = af.compile({**plan, "max_memory": budget}, model=model)
        assert compiled.chunking.pairs_per_pass == 3 and compiled.chunking.positions_per_chunk is None, method
        assert [len(b.pair_indices) for b in compiled.batches] == [3, 3, 1]
        _assert_same(af.run({**plan, "max_memory": budget}, model=model), af.run(plan, model=model), ["attn_head", "mlp_neuron"])


def test_chunks_for_sae_latents_and_errors():
    from test_sae import make_sae, sae_plan

    model = tiny_model()
    sae = make_sae("standard")
    nodes = [{"kind": "sae_latent", "sae": "s"}, {"kind": "sae_error", "sae": "s"}, {"kind": "attn_k"}]
    plan = sae_plan(nodes, method="atp_star", prompts=_pairs(2))
    unchunked = af.run(plan, model=model, saes={"s": sae})
    compiled = af.compile(plan, model=model, saes={"s": sae})
    chunked_plan = {**plan, "max_memory": get_method("atp_star").working_memory(compiled, 1, SEQ, 4)}
    assert af.compile(chunked_plan, model=model, saes={"s": sae}).chunking.positions_per_chunk == 4
    _assert_same(af.run(chunked_plan, model=model, saes={"s": sae}), unchunked, ["sae_latent", "sae_error", "attn_k"])


def test_chunks_on_the_hugging_face_backend(tmp_path):
    from test_attention import _save_tiny_llama

    source = str(_save_tiny_llama(tmp_path / "llama"))
    plan = make_plan(
        [{"kind": "attn_q"}, {"kind": "attn_k"}, {"kind": "mlp_neuron", "neurons": [3, 9]}],
        method={"name": "atp_star"}, prompts=_pairs(2), model={"source": source, "backend": "huggingface"}, batch_size=1,
    )
    unchunked = af.run(plan)
    backend = af.load_backend(af.as_plan(plan))
    budget = get_method("atp_star").working_memory(compile_plan(af.as_plan(plan), backend), 1, SEQ, 2)
    assert af.compile({**plan, "max_memory": budget}).chunking.positions_per_chunk == 2
    _assert_same(af.run({**plan, "max_memory": budget}), unchunked, ["attn_q", "attn_k", "mlp_neuron"])


def test_the_chunking_follows_the_budget():
    model = tiny_model()
    plan = make_plan([{"kind": "attn_q"}, {"kind": "mlp_neuron"}], method={"name": "atp_star"}, prompts=_pairs(6), batch_size=6)
    seen = []
    for pairs, positions in [(6, SEQ), (2, SEQ), (1, SEQ), (1, 5), (1, 1)]:
        budget = _budget_for(plan, model, pairs, positions)
        chunking = af.compile({**plan, "max_memory": budget}, model=model).chunking
        assert chunking.estimate <= budget
        seen.append((chunking.pairs_per_pass, chunking.positions_per_chunk or SEQ))
        assert seen[-1] == (pairs, positions)
    # the estimate grows with both
    estimate = lambda p, c: _budget_for(plan, model, p, c)  # noqa: E731
    assert estimate(1, 1) < estimate(1, 5) < estimate(1, SEQ) < estimate(2, SEQ)
    assert "max_memory" in af.compile({**plan, "max_memory": "1GiB"}, model=model).explain()


def test_budgets_that_cannot_be_met_and_bad_sizes_are_refused():
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head"}], method={"name": "atp"})
    with pytest.raises(af.PlanError, match=r"max_memory: .* below this plan's estimated minimum .* one node position per chunk"):
        af.compile({**plan, "max_memory": 1000}, model=model)
    exact = make_plan([{"kind": "attn_head"}], method={"name": "activation_patching"})
    with pytest.raises(af.PlanError, match=r"max_memory: .*method activation_patching does not split positions"):
        af.compile({**exact, "max_memory": "1KB"}, model=model)
    for bad, why in [("lots", "not a size"), ("0", "must be positive"), ("3 parsecs", "not a size"), (-5, "must be positive")]:
        with pytest.raises(af.PlanError, match=rf"max_memory: .*{why}"):
            af.as_plan({**plan, "max_memory": bad})


def test_sizes_and_chunks():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(4096) == 4096
    assert parse_bytes("500mb") == 500_000_000 and parse_bytes("12") == 12
    assert position_chunks(None, 6, 2) == [None]
    assert position_chunks(list(range(6)), 6, None) == [None]
    chunks = position_chunks([0, 2, 3, 5, 7], 8, 2)
    assert [c.tolist() for c in chunks] == [[0, 2], [3, 5], [7]]
    assert [c.tolist() for c in position_chunks([5], 8, None)] == [[5]]  # caches only what the nodes read
    backend = af.load_backend(af.as_plan(make_plan(NODES)), model=tiny_model())
    bound = compile_plan(af.as_plan(make_plan([{"kind": "attn_v", "positions": [1, -1]}, {"kind": "resid", "positions": [3]}])), backend).bound
    assert node_positions(bound) == [1, 3, 5]


@pytest.mark.parametrize("method", ["atp", "atp_star"])
def test_each_step_of_a_chunked_plan_costs_its_chunks_times_the_unchunked_step(method):
    """Dry-run accounting: chunking repeats every pass once per chunk (the restarted GradDrop backwards
    included), so each step's count and cost scale by the number of chunks."""
    model = tiny_model()
    plan = make_plan([{"kind": "attn_q"}, {"kind": "mlp_neuron"}], method={"name": method}, prompts=_pairs(1), batch_size=1)
    whole = af.compile(plan, model=model)
    chunked = af.compile({**plan, "max_memory": _budget_for(plan, model, 1, 2)}, model=model)
    chunks = chunked.method.chunk_count(chunked)
    assert chunks > 1
    assert [s.name for s in chunked.steps] == [s.name for s in whole.steps]
    for step, one in zip(chunked.steps, whole.steps):
        assert step.count == chunks * one.count, step.name
        assert step.cost == pytest.approx(chunks * one.cost), step.name
    assert chunked.method.cost(chunked) == pytest.approx(chunks * whole.method.cost(whole))
