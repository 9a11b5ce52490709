"""Edges against references built from TransformerLens alone.

The references switch on TransformerLens's own per-head inputs (``use_split_qkv_input``), per-head
results (``use_attn_result``) and MLP inputs (``use_hook_mlp_in``) and never touch the engine: exact
edge patching is one forward per edge with the reader's input shifted by the writer's noise - clean
output; EAP is that shift dotted with the gradient at the reader's input; each GradDrop term detaches
one block's writes (``hook_attn_out``/``hook_mlp_out``) and takes its own backward pass.
"""

import random

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

import atpframework as af
from atpframework.model.edges import writer_count, writer_labels

PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]
EDGE_KINDS = ["edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits"]
ARCHS = {**ARCHITECTURES, "parallel_rotary": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=8)}


def _info(model):
    from atpframework.backends.transformer_lens import TransformerLensBackend

    return TransformerLensBackend.from_model(model).info


def _kinds(model) -> list[str]:
    return [k for k in EDGE_KINDS if not (k == "edge_mlp" and model.cfg.attn_only)]


class _Flags:
    """TransformerLens's edge hook points switched on for the duration of a ``with``."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        cfg = self.model.cfg
        self.saved = (cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
        cfg.use_attn_result, cfg.use_split_qkv_input = True, True
        cfg.use_hook_mlp_in = not cfg.attn_only

    def __exit__(self, *exc):
        cfg = self.model.cfg
        cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_hook_mlp_in = self.saved


def _reader_hook(model, kind: str, layer: int) -> str:
    if kind == "edge_logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    return f"blocks.{layer}." + {"edge_q": "hook_q_input", "edge_k": "hook_k_input", "edge_v": "hook_v_input", "edge_mlp": "hook_mlp_in"}[kind]


def _reader_layers(model, kind: str) -> list[int]:
    return [model.cfg.n_layers] if kind == "edge_logits" else list(range(model.cfg.n_layers))


def _writers(model, cache) -> torch.Tensor:
    """``pos writer d_model`` of one prompt, in the edge model's writer order, from a TransformerLens cache."""
    parts = [cache["blocks.0.hook_resid_pre"][0][:, None]]
    for layer in range(model.cfg.n_layers):
        parts.append(cache[f"blocks.{layer}.attn.hook_result"][0])
        if not model.cfg.attn_only:
            parts.append(cache[f"blocks.{layer}.hook_mlp_out"][0][:, None])
    return torch.cat(parts, dim=1)


def _upstream(model, kind: str, layer: int) -> int:
    """Writers upstream of a reader, counted by hand from the block structure."""
    h, per_block = model.cfg.n_heads, model.cfg.n_heads + (not model.cfg.attn_only)
    if kind == "edge_logits":
        return 1 + model.cfg.n_layers * per_block
    if kind == "edge_mlp" and not model.cfg.parallel_attn_mlp:
        return 1 + layer * per_block + h
    return 1 + layer * per_block


def _metric(logits, pair):
    return logits[:, -1, pair["answer"]] - logits[:, -1, pair["wrong_answer"]]


def _deltas(model, pair):
    with _Flags(model), torch.no_grad():
        _, noise_cache = model.run_with_cache(torch.tensor([pair["noise"]]))
        _, clean_cache = model.run_with_cache(torch.tensor([pair["clean"]]))
    return _writers(model, noise_cache) - _writers(model, clean_cache)


def reference_first_order(model, pair, graddrop: bool = False) -> dict[str, torch.Tensor]:
    """EAP (or GradDrop's sum of per-term magnitudes / (T - 1)) per edge kind: ``layer pos [head] writer``."""
    delta = _deltas(model, pair)
    clean = torch.tensor([pair["clean"]])
    n = model.cfg.n_layers
    terms = [[]]
    if graddrop:
        terms = [[f"blocks.{l}.hook_attn_out"] + ([] if model.cfg.attn_only else [f"blocks.{l}.hook_mlp_out"]) for l in range(n)]
    per_term = {k: [] for k in _kinds(model)}
    for detached in terms:
        captured = {}

        def keep(x, hook):
            captured[hook.name] = x
            return x

        names = sorted({_reader_hook(model, k, l) for k in _kinds(model) for l in _reader_layers(model, k)})
        with _Flags(model):
            logits = model.run_with_hooks(clean, fwd_hooks=[(w, lambda x, hook: x.detach()) for w in detached] + [(m, keep) for m in names])
        grads = dict(zip(names, torch.autograd.grad(_metric(logits, pair).sum(), [captured[m] for m in names], allow_unused=True)))
        for kind in _kinds(model):
            rows = []
            for layer in _reader_layers(model, kind):
                name = _reader_hook(model, kind, layer)
                g = grads[name] if grads[name] is not None else torch.zeros_like(captured[name])
                up = _upstream(model, kind, layer)
                full = torch.zeros(*g.shape[1:-1], writer_count(_info(model)))
                if g.dim() == 4:
                    full[..., :up] = torch.einsum("pwd,phd->phw", delta[:, :up], g[0].detach())
                else:
                    full[..., :up] = torch.einsum("pwd,pd->pw", delta[:, :up], g[0].detach())
                rows.append(full)
            per_term[kind].append(torch.stack(rows))
    out = {}
    for kind, terms_ in per_term.items():
        stacked = torch.stack(terms_)
        out[kind] = stacked.abs().sum(0) / (len(terms) - 1) if graddrop else stacked[0]
    return out


def exact_edge_effect(model, pair, kind: str, layer: int, pos: int, head: int | None, writer: int) -> float:
    """metric(clean, reader input + writer's noise - clean output) - metric(clean), one forward."""
    delta = _deltas(model, pair)
    clean = torch.tensor([pair["clean"]])
    name = _reader_hook(model, kind, layer)

    def shift(x, hook):
        x = x.clone()
        if head is None:
            x[0, pos] += delta[pos, writer]
        else:
            x[0, pos, head] += delta[pos, writer]
        return x

    with _Flags(model), torch.no_grad():
        base = _metric(model(clean), pair)
        patched = _metric(model.run_with_hooks(clean, fwd_hooks=[(name, shift)]), pair)
    return float(patched - base)


def _assert_close(ours, ref, what, rtol=1e-5):
    scale = ref.abs().max().item()
    assert scale > 1e-3, f"{what}: reference is ~0, the comparison would prove nothing"
    err = (ours - ref).abs().max().item()
    assert err <= rtol * max(1.0, scale), f"{what}: max abs diff {err:.3g} (reference scale {scale:.3g})"


def _edge_plan(model, method, **extra):
    return make_plan([{"kind": k} for k in _kinds(model)], method, prompts=PROMPTS, **extra)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["atp", "atp_graddrop"])
def test_edge_first_order_equals_brute_force(arch, method):
    model = tiny_model(**ARCHS[arch])
    result = af.run(_edge_plan(model, method), model=model, progress=False)
    for p, pair in enumerate(PROMPTS):
        ref = reference_first_order(model, pair, graddrop=method == "atp_graddrop")
        for kind in _kinds(model):
            _assert_close(result[kind].per_pair[p], ref[kind], f"{arch} {method} {kind} pair {p}")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exact_edge_patching_equals_one_forward_per_edge(arch):
    """A random sample of edges (every kind, upstream or not) against one hand-patched forward each."""
    model = tiny_model(**ARCHS[arch])
    positions = [2, 5]  # two positions keep the exact run short; 7 edges per pass exercises the row blocks
    nodes = [{"kind": k, "positions": positions} for k in _kinds(model)]
    result = af.run(make_plan(nodes, {"name": "activation_patching", "nodes_per_pass": 7}, prompts=PROMPTS), model=model, progress=False)
    rng = random.Random(0)
    checked = 0
    for kind in _kinds(model):
        scores = result[kind].per_pair  # pair layer pos [head] writer
        for _ in range(6):
            index = tuple(rng.randrange(s) for s in scores.shape[1:])
            layer_entry, pos, writer = index[0], positions[index[1]], index[-1]
            head = index[2] if len(index) == 4 else None
            layer = _reader_layers(model, kind)[layer_entry]
            pair = rng.randrange(len(PROMPTS))
            if writer >= _upstream(model, kind, layer):
                assert scores[(pair, *index)].item() == 0.0, f"{kind} {index}: a writer downstream of the reader has an effect"
                continue
            ref = exact_edge_effect(model, PROMPTS[pair], kind, layer, pos, head, writer)
            assert abs(scores[(pair, *index)].item() - ref) <= 1e-5 * max(1.0, abs(ref)), f"{arch} {kind} {index}"
            checked += 1
    assert checked >= 10


def test_edge_atp_equals_exact_where_everything_after_the_reader_is_linear():
    """One attention-only layer without normalization: the logit difference is linear in each value input and
    in the final residual stream, so EAP is exact for edges into values and into the logits."""
    model = tiny_model(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None)
    nodes = [{"kind": "edge_v"}, {"kind": "edge_logits"}]
    atp = af.run(make_plan(nodes, "atp", prompts=PROMPTS), model=model, progress=False)
    exact = af.run(make_plan(nodes, "activation_patching", prompts=PROMPTS), model=model, progress=False)
    for kind in ("edge_v", "edge_logits"):
        _assert_close(atp[kind].per_pair, exact[kind].per_pair, kind)
    # and it is not exact for queries (the softmax), so the comparison above can fail
    q_nodes = [{"kind": "edge_q"}]
    atp_q = af.run(make_plan(q_nodes, "atp", prompts=PROMPTS), model=model, progress=False)["edge_q"].per_pair
    exact_q = af.run(make_plan(q_nodes, "activation_patching", prompts=PROMPTS), model=model, progress=False)["edge_q"].per_pair
    assert (atp_q - exact_q).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_incoming_edges_sum_to_the_reader_input_estimate(arch):
    """Per reader, the EAP scores of its incoming edges sum to (input(noise) - input(clean)) . dMetric/d input:
    the reader's input is the sum of its upstream writers plus constants."""
    model = tiny_model(**ARCHS[arch])
    result = af.run(_edge_plan(model, "atp"), model=model, progress=False)
    clean = torch.tensor([PROMPTS[0]["clean"]])
    with _Flags(model), torch.no_grad():
        _, noise_cache = model.run_with_cache(torch.tensor([PROMPTS[0]["noise"]]))
    for kind in _kinds(model):
        for entry, layer in enumerate(_reader_layers(model, kind)):
            name = _reader_hook(model, kind, layer)
            captured = {}

            def keep(x, hook):
                captured["x"] = x
                return x

            with _Flags(model):
                logits = model.run_with_hooks(clean, fwd_hooks=[(name, keep)])
            (grad,) = torch.autograd.grad(_metric(logits, PROMPTS[0]).sum(), [captured["x"]])
            node = ((noise_cache[name] - captured["x"].detach()) * grad).sum(-1)[0]  # pos [head]
            edges_sum = result[kind].per_pair[0, entry].sum(-1)
            _assert_close(edges_sum, node, f"{arch} {kind} layer {layer}", rtol=1e-4)


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated", "parallel_rotary"])
def test_edges_across_a_residual_boundary_sum_to_the_resid_node(arch):
    """The cut identity: the residual stream at boundary l is the sum of the writers below it and flows into
    every reader at or above l, so the EAP scores of the edges crossing the cut sum to the ``resid`` node's AtP."""
    model = tiny_model(**ARCHS[arch])
    n = model.cfg.n_layers
    nodes = [{"kind": k} for k in _kinds(model)] + [{"kind": "resid"}]
    result = af.run(make_plan(nodes, "atp", prompts=PROMPTS), model=model, progress=False)
    for boundary in range(n + 1):
        below = _upstream(model, "edge_q", boundary) if boundary < n else _upstream(model, "edge_logits", n)
        crossing = torch.zeros(len(PROMPTS), len(PROMPTS[0]["clean"]))
        for kind in _kinds(model):
            for entry, layer in enumerate(_reader_layers(model, kind)):
                if layer >= boundary:
                    scores = result[kind].per_pair[:, entry, ..., :below]  # pair pos [head] writer
                    crossing += scores.reshape(*scores.shape[:2], -1).sum(-1)
        _assert_close(crossing, result["resid"].per_pair[:, boundary], f"{arch} boundary {boundary}", rtol=1e-4)


def test_edge_selections_by_layer_head_writer_and_position():
    model = tiny_model()
    info = _info(model)
    plan = make_plan(
        [{"kind": "edge_q", "layers": [1], "heads": [2], "writers": [0, 3], "positions": [-1]},
         {"kind": "edge_mlp", "positions": "all", "name": "mlp_summed"}],
        "activation_patching", prompts=PROMPTS,
    )
    result = af.run(plan, model=model, progress=False)
    assert tuple(result["edge_q"].per_pair.shape) == (2, 1, 1, 1, 2)
    assert tuple(result["mlp_summed"].per_pair.shape) == (2, 2, 1, writer_count(info))
    ref = exact_edge_effect(model, PROMPTS[1], "edge_q", 1, 5, 2, 3)
    assert abs(result["edge_q"].per_pair[1, 0, 0, 0, 1].item() - ref) < 1e-5
    # summed over positions: the edge patched at every position at once, by hand
    delta = _deltas(model, PROMPTS[0])

    def shift(x, hook):
        return x + delta[None, :, 2]  # writer 2 (L0H1) into the MLP of block 1, every position

    with _Flags(model), torch.no_grad():
        clean = torch.tensor([PROMPTS[0]["clean"]])
        ref_all = _metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_mlp_in", shift)]), PROMPTS[0]) - _metric(model(clean), PROMPTS[0])
    assert abs(result["mlp_summed"].per_pair[0, 1, 0, 2].item() - ref_all.item()) < 1e-5
    assert writer_labels(info)[:7] == ["embed", "L0H0", "L0H1", "L0H2", "L0H3", "L0 MLP", "L1H0"]


def reference_qk_fix(model, pair, graddrop: bool, entries) -> list[float]:
    """QK fix for edges into queries and keys by real forwards, at ``entries`` ``(kind, layer, pos, head, writer)``
    (``pos`` None: keys shifted at every position at once): the pattern ``A'`` with the reader's input shifted by
    the writer's delta, dotted with ``dMetric/dA`` at the clean run (per GradDrop term: that write detached)."""
    delta = _deltas(model, pair)
    clean = torch.tensor([pair["clean"]])
    n = model.cfg.n_layers
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(n)]
    with _Flags(model), torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    terms = [[]]
    if graddrop:
        terms = [[f"blocks.{l}.hook_attn_out"] + ([] if model.cfg.attn_only else [f"blocks.{l}.hook_mlp_out"]) for l in range(n)]
    grads = []
    for detached in terms:
        captured = {}

        def keep(x, hook):
            captured[hook.name] = x
            return x

        with _Flags(model):
            logits = model.run_with_hooks(clean, fwd_hooks=[(w, lambda x, hook: x.detach()) for w in detached] + [(p, keep) for p in patterns])
        gs = torch.autograd.grad(_metric(logits, pair).sum(), [captured[p] for p in patterns], allow_unused=True)
        grads.append([torch.zeros_like(captured[p]) if g is None else g for p, g in zip(patterns, gs)])
    out = []
    for kind, layer, pos, head, writer in entries:
        def shift(x, hook, head=head, pos=pos, writer=writer):
            x = x.clone()
            if pos is None:
                x[0, :, head] += delta[:, writer]
            else:
                x[0, pos, head] += delta[pos, writer]
            return x

        seen = {}
        with _Flags(model), torch.no_grad():
            model.run_with_hooks(clean, fwd_hooks=[(_reader_hook(model, kind, layer), shift), (patterns[layer], lambda x, hook: seen.setdefault("a", x))])
        per_term = [((seen["a"] - clean_cache[patterns[layer]]) * g[layer]).sum().item() for g in grads]
        out.append(sum(abs(e) for e in per_term) / (len(terms) - 1) if graddrop else per_term[0])
    return out


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "rms_rotary_gqa_gated", "parallel_rotary"])
@pytest.mark.parametrize("method", ["atp_qkfix", "atp_star"])
def test_edge_qk_fix_equals_brute_force(arch, method):
    """A random sample of edges into queries and keys (one position, and every position at once)."""
    model = tiny_model(**ARCHS[arch])
    nodes = [{"kind": "edge_q"}, {"kind": "edge_k"}, {"kind": "edge_k", "name": "keys_joint", "positions": "all"}]
    result = af.run(make_plan(nodes, method, prompts=PROMPTS), model=model, progress=False)
    rng = random.Random(1)
    samples = []  # (selection, index into per_pair[0], reference entry)
    for name, kind in (("edge_q", "edge_q"), ("edge_k", "edge_k"), ("keys_joint", "edge_k")):
        shape = result[name].per_pair.shape[1:]  # layer pos head writer
        for _ in range(8):
            layer, pos, head = rng.randrange(shape[0]), rng.randrange(shape[1]), rng.randrange(shape[2])
            writer = rng.randrange(_upstream(model, kind, layer))
            samples.append((name, (layer, pos, head, writer), (kind, layer, None if name == "keys_joint" else pos, head, writer)))
    ref = torch.tensor(reference_qk_fix(model, PROMPTS[0], method == "atp_star", [s[2] for s in samples]))
    ours = torch.tensor([result[name].per_pair[(0, *index)].item() for name, index, _ in samples])
    _assert_close(ours, ref, f"{arch} {method}")
    if method == "atp_qkfix":  # the fix changes the estimate: AtP differs from it
        atp = af.run(make_plan(nodes, "atp", prompts=PROMPTS), model=model, progress=False)
        assert (atp["edge_q"].per_pair - result["edge_q"].per_pair).abs().max() > 1e-3


def test_edge_qk_fix_is_exact_on_one_attention_layer():
    """One attention-only layer without normalization: after the pattern, everything is linear, so the QK fix
    on edges into queries and keys equals exact edge patching."""
    model = tiny_model(n_layers=1, attn_only=True, d_mlp=None, normalization_type=None)
    nodes = [{"kind": "edge_q"}, {"kind": "edge_k"}, {"kind": "edge_k", "name": "keys_joint", "positions": "all"}]
    fixed = af.run(make_plan(nodes, "atp_qkfix", prompts=PROMPTS), model=model, progress=False)
    exact = af.run(make_plan(nodes, "activation_patching", prompts=PROMPTS), model=model, progress=False)
    for name in ("edge_q", "edge_k", "keys_joint"):
        _assert_close(fixed[name].per_pair, exact[name].per_pair, name)


def test_keep_top_stores_the_largest_edges_and_the_dry_run_counts_real_edges():
    model = tiny_model()
    dense = af.run(make_plan([{"kind": "edge_q"}], "atp", prompts=PROMPTS), model=model, progress=False)
    sparse = af.run(make_plan([{"kind": "edge_q", "keep_top": 5}], "atp", prompts=PROMPTS), model=model, progress=False)
    for p in range(len(PROMPTS)):
        values = dense["edge_q"].per_pair[p].flatten()
        top = values.abs().topk(5).indices
        kept = sparse["edge_q"].per_pair[p].to_dense().flatten()
        assert set(kept.nonzero().flatten().tolist()) == set(top.tolist())
        torch.testing.assert_close(kept[top], values[top])
    text = af.compile(make_plan(af.edge_selections(), "atp_star", prompts=PROMPTS), model=model).explain()
    # 2 layers x 4 heads: q/k/v readers of block 0 see 1 writer, of block 1 see 6; MLPs 5 and 10; logits 11
    assert "edge_q (edge_q on site attn_q_input): 88 nodes, 28 of them real edges" in text
    assert "edge_mlp (edge_mlp on site mlp_input): 22 nodes, 15 of them real edges" in text
    assert "edge_logits (edge_logits on site resid): 11 nodes, 11 of them real edges" in text
    assert "edge_scores" in text


@pytest.mark.parametrize("method", [{"name": "atp_ig", "steps": 2}, {"name": "atp_star"}])
def test_edge_plans_run_from_the_command_line_on_both_backends(tmp_path, hf_dir, method):
    """``atpf PLAN.json`` on a Hugging Face directory with the huggingface backend, against ``af.run`` with the
    transformer_lens backend on the same weights; ``--dry-run`` names the edge passes."""
    import json

    from click.testing import CliRunner

    from atpframework.cli import main

    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    with torch.no_grad():  # weights scaled up so that effects are not tiny
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    model.save_pretrained(tmp_path / "model")
    hf_dir = tmp_path / "model"
    plan = make_plan(af.edge_selections(positions="each"), method, prompts=PROMPTS)
    plan["model"] = {"source": str(hf_dir), "backend": "huggingface"}
    plan["output"] = str(tmp_path / "edges.safetensors")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    dry = CliRunner().invoke(main, [str(tmp_path / "plan.json"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "real edges" in dry.output and "edge_scores" in dry.output
    done = CliRunner().invoke(main, [str(tmp_path / "plan.json"), "-q"])
    assert done.exit_code == 0, (done.output, done.stderr)
    hf = af.load_result(tmp_path / "edges.safetensors")
    tl = af.run(dict(plan, model={"source": str(hf_dir), "backend": "transformer_lens"}, output=None), progress=False)
    for kind in ("edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits"):
        _assert_close(hf[kind].per_pair, tl[kind].per_pair, f"{method['name']} {kind}", rtol=1e-4)


@pytest.mark.parametrize("method", ["atp", "atp_star"])
def test_position_chunks_give_the_unchunked_edge_scores(method):
    from test_chunking import _assert_same, _budget_for, _pairs

    model = tiny_model(**ARCHITECTURES["rms_rotary_gqa_gated"])
    nodes = [{"kind": "edge_q"}, {"kind": "edge_k"}, {"kind": "edge_v", "positions": [1, -1]}, {"kind": "edge_mlp"}, {"kind": "edge_logits"}]
    plan = make_plan(nodes, method, prompts=_pairs(2), batch_size=1)
    unchunked = af.run(plan, model=model, progress=False)
    chunked_plan = {**plan, "max_memory": _budget_for(plan, model, 1, 3)}
    compiled = af.compile(chunked_plan, model=model)
    assert compiled.chunking.positions_per_chunk == 3 and "position chunks" in compiled.explain()
    _assert_same(af.run(chunked_plan, model=model, progress=False), unchunked, ["edge_q", "edge_k", "edge_v", "edge_mlp", "edge_logits"], tol=1e-5)
