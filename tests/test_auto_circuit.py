"""Edge scores against the auto-circuit library (``pip install auto-circuit``, 1.0.1), when it is importable.

auto-circuit's factorized graph of a TransformerLens model (``patchable_model(model, factorized=True,
separate_qkv=True)``) has the same nodes as our edge model:

* sources, in ``src_idx`` order: ``Resid Start`` (``blocks.0.hook_resid_pre``, the embeddings), then per
  block its heads (``attn.hook_result``) and its MLP (``hook_mlp_out``): exactly our writer order;
* destinations: per head its ``hook_q_input``/``hook_k_input``/``hook_v_input``, per block its
  ``hook_mlp_in``, and ``Resid End`` (``blocks.{n-1}.hook_resid_post``): our ``edge_q``/``edge_k``/``edge_v``/
  ``edge_mlp``/``edge_logits`` readers. A destination's incoming sources are a prefix of the source order
  (``patch_idx = src_idx``), so its score tensor, ``[seq] [head] src``, is our ``pos [head] writer`` cut
  to the writers upstream of the reader.

With ``seq_len=None`` an edge is patched at every position at once (our ``positions: all``); with
``seq_len=L`` each position is its own edge (our ``positions: each``).

Patching an edge adds ``mask * (patch_src_out - current_src_out)`` to the destination's input. With the
clean input and the corrupt run's source outputs, a mask of 1 on one edge is our noising edge patch, so
the single-edge effects (``patch_mode(model, corrupt_src_outs, edges=[edge])``, which is what
``run_circuits(..., EDGE_PATCH, reverse_clean_corrupt=True)`` and ACDC run) are ours exactly.
``mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff", mask_val=0.0)`` is the
gradient of the *loss* ``-mean(logit[answer] - logit[wrong])`` at mask 0, ie ``-EAP`` in our sign, averaged
over the batch (one prompt pair per batch here, so per pair). ``edge_attribution_patching_prune_scores``
(their slow reference EAP, position-summed graphs only) has the same sign.

Compatibility with TransformerLens 3: auto-circuit imports ``HookedTransformerKeyValueCache`` (from
``transformer_lens`` and ``transformer_lens.past_key_value_caching``), renamed
``TransformerLensKeyValueCache`` in TransformerLens 3; it is used only in type hints and an unused KV-cache
option, so the alias is installed below when missing. It needs ``use_attn_result``,
``use_split_qkv_input`` and ``use_hook_mlp_in``; it does not support grouped-query attention (it makes
``n_heads`` key/value destinations).
"""

import importlib.util
import sys
import types

import pytest
import torch
from conftest import ARCHITECTURES, make_plan, tiny_model

if importlib.util.find_spec("auto_circuit") is None:
    pytest.skip("auto-circuit is not installed", allow_module_level=True)


def _alias_kv_cache():
    """auto-circuit 1.0.1 imports TransformerLens 1/2's KV cache class name; TransformerLens 3 renamed it."""
    import transformer_lens

    if hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        return
    from transformer_lens import TransformerLensKeyValueCache

    transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    if "transformer_lens.past_key_value_caching" not in sys.modules:
        module = types.ModuleType("transformer_lens.past_key_value_caching")
        module.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        sys.modules["transformer_lens.past_key_value_caching"] = module


_alias_kv_cache()

from auto_circuit.data import PromptDataLoader, PromptDataset
from auto_circuit.prune import run_circuits
from auto_circuit.prune_algos.edge_attribution_patching import (
    edge_attribution_patching_prune_scores,
)
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
from auto_circuit.types import PatchType
from auto_circuit.utils.ablation_activations import src_ablations
from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
from auto_circuit.utils.tensor_ops import batch_answer_diffs

import atpframework as af

PROMPTS = [
    {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
    {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
]
SEQ_LEN = 6
ARCHS = {
    **{k: v for k, v in ARCHITECTURES.items() if "n_key_value_heads" not in v},  # no GQA in auto-circuit
    "rms_rotary_gated": {
        "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_dim": 8, "gated_mlp": True, "act_fn": "silu", "final_rms": True,
    },
    "parallel_rotary": {"parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 8},
}
ATOL = 1e-5
"""Tolerance, float32, times max(1, largest |score|): observed max abs diff <= 1.2e-6 for EAP (scores up to ~14)
and exactly 0 for the single-edge patches (the one-hot mask adds the same noise - clean difference)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """auto-circuit runs one small forward per edge: a single thread is many times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kinds(model):
    return ["edge_q", "edge_k", "edge_v"] + ([] if model.cfg.attn_only else ["edge_mlp"]) + ["edge_logits"]


def _ours(arch, method, positions):
    model = tiny_model(**ARCHS[arch])
    nodes = [{"kind": k, "positions": positions} for k in _kinds(model)]
    return af.run(make_plan(nodes, method, prompts=PROMPTS), model=model, progress=False)


def _theirs(arch, seq_len):
    """auto-circuit's patchable model of the same tiny model (``patchable_model`` wraps it in place)."""
    model = tiny_model(**ARCHS[arch])
    model.cfg.use_attn_result, model.cfg.use_split_qkv_input = True, True
    model.cfg.use_hook_mlp_in = not model.cfg.attn_only
    for p in model.parameters():
        p.requires_grad_(False)
    return patchable_model(model, factorized=True, slice_output="last_seq", seq_len=seq_len, separate_qkv=True, device=torch.device("cpu"))


def _loader(pair):
    """One prompt pair per batch: auto-circuit's scores are batch means."""
    dataset = PromptDataset(
        torch.tensor([pair["clean"]]), torch.tensor([pair["noise"]]),
        [torch.tensor([pair["answer"]])], [torch.tensor([pair["wrong_answer"]])],
    )
    return PromptDataLoader(dataset, seq_len=SEQ_LEN, diverge_idx=0, batch_size=1, shuffle=False)


def _our_slot(model, module_name):
    """auto-circuit destination module -> (our node kind, layer entry)."""
    parts = module_name.split(".")
    layer, hook = int(parts[1]), parts[-1]
    if hook == "hook_resid_post":
        assert layer == model.cfg.n_layers - 1
        return "edge_logits", 0
    return {"hook_q_input": "edge_q", "hook_k_input": "edge_k", "hook_v_input": "edge_v", "hook_mlp_in": "edge_mlp"}[hook], layer


def _as_ours(pm, ours, pair_index, theirs_by_dest, seq_len):
    """For each destination: (our scores cut to its upstream writers, theirs), our scores ``[seq] [head] src``."""
    out = {}
    for name, theirs in theirs_by_dest.items():
        kind, entry = _our_slot(pm, name)
        full = ours[kind].per_pair[pair_index, entry]  # pos [head] writer
        n_src = theirs.shape[-1]
        assert not full[..., n_src:].any(), f"{name}: a writer downstream of the reader has a score"
        mine = full[..., :n_src]
        if seq_len is None:
            mine = mine[0]  # positions: all has one position entry
        out[name] = (mine, theirs)
    return out


def _compare(pairs, what, scale_floor=1e-2):
    err = max((a - b).abs().max().item() for a, b in pairs.values())
    scale = max(b.abs().max().item() for _, b in pairs.values())
    assert scale > scale_floor, f"{what}: scores are ~0, the comparison would prove nothing"
    assert err <= ATOL * max(1.0, scale), f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"
    return err


@pytest.mark.parametrize("seq_len", [None, SEQ_LEN], ids=["positions_summed", "per_position"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_eap_equals_auto_circuit_mask_gradient(arch, seq_len):
    ours = _ours(arch, "atp", "all" if seq_len is None else "each")
    for p, pair in enumerate(PROMPTS):
        pm = _theirs(arch, seq_len)
        scores = mask_gradient_prune_scores(
            pm, _loader(pair), None, grad_function="logit", answer_function="avg_diff", mask_val=0.0, integrated_grad_samples=None,
        )
        # auto-circuit differentiates the loss -logit_diff: its scores are our EAP negated
        _compare(_as_ours(pm, ours, p, {k: -v for k, v in scores.items()}, seq_len), f"{arch} seq_len={seq_len} pair {p}")


@pytest.mark.parametrize("arch", ["ln_gelu_learned", "attn_only_nonorm"])
def test_eap_equals_auto_circuit_edge_attribution_patching(arch):
    """Their slow reference EAP (caches and backward hooks, position-summed graph only)."""
    ours = _ours(arch, "atp", "all")
    for p, pair in enumerate(PROMPTS):
        pm = _theirs(arch, None)
        scores = edge_attribution_patching_prune_scores(pm, _loader(pair), None)
        _compare(_as_ours(pm, ours, p, {k: -v for k, v in scores.items()}, None), f"{arch} pair {p}")


def _loader_all():
    """Both prompt pairs in one batch (for the single-edge effects, read per prompt)."""
    dataset = PromptDataset(
        torch.tensor([p["clean"] for p in PROMPTS]), torch.tensor([p["noise"] for p in PROMPTS]),
        [torch.tensor([p["answer"]]) for p in PROMPTS], [torch.tensor([p["wrong_answer"]]) for p in PROMPTS],
    )
    return PromptDataLoader(dataset, seq_len=SEQ_LEN, diverge_idx=0, batch_size=len(PROMPTS), shuffle=False)


def _exact_scores(pm):
    """Every edge's single-edge patch effect per prompt pair with auto-circuit's patching: the clean input with one
    edge's source given its corrupt output; the change in the logit difference at the last position."""
    batch = next(iter(_loader_all()))
    patch_outs = src_ablations(pm, batch.corrupt)
    scores = [pm.new_prune_scores() for _ in PROMPTS]
    with torch.inference_mode():
        base = batch_answer_diffs(pm(batch.clean)[pm.out_slice], batch)
        set_all_masks(pm, 0.0)
        with patch_mode(pm, patch_outs):
            # what ``patch_mode(pm, patch_outs, edges=[edge])`` does, without its scan over every edge per call
            for edge in pm.edges:
                edge.patch_mask(pm).data[edge.patch_idx] = 1.0
                effect = batch_answer_diffs(pm(batch.clean)[pm.out_slice], batch) - base
                edge.patch_mask(pm).data[edge.patch_idx] = 0.0
                for p, e in enumerate(effect.tolist()):
                    scores[p][edge.dest.module_name][edge.patch_idx] = e
    return scores


@pytest.mark.parametrize("seq_len", [None, SEQ_LEN], ids=["positions_summed", "per_position"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exact_edge_patching_equals_auto_circuit(arch, seq_len):
    """Every edge of the graph (per position: the 660 edges of a 2-layer model at 6 positions)."""
    ours = _ours(arch, {"name": "activation_patching", "nodes_per_pass": 256}, "all" if seq_len is None else "each")
    pm = _theirs(arch, seq_len)
    for p, theirs in enumerate(_exact_scores(pm)):
        _compare(_as_ours(pm, ours, p, theirs, seq_len), f"{arch} seq_len={seq_len} pair {p}")


def test_exact_edge_patching_equals_auto_circuit_run_circuits():
    """Every 9th edge through auto-circuit's circuit runner: a one-hot prune score and one edge kept patches exactly
    that edge of the clean run with the corrupt source outputs (``EDGE_PATCH`` with ``reverse_clean_corrupt``)."""
    arch = "ln_gelu_learned"
    ours = _ours(arch, {"name": "activation_patching", "nodes_per_pass": 256}, "all")
    pair = PROMPTS[1]
    pm = _theirs(arch, None)
    loader = _loader(pair)
    batch = next(iter(loader))
    with torch.inference_mode():
        base = batch_answer_diffs(pm(batch.clean)[pm.out_slice], batch).item()
    edges = sorted(pm.edges, key=lambda e: (e.dest.module_name, e.patch_idx))[::9]
    assert len(edges) >= 10
    for edge in edges:
        one_hot = pm.new_prune_scores()
        one_hot[edge.dest.module_name][edge.patch_idx] = 1.0
        out = run_circuits(pm, loader, [1], one_hot, patch_type=PatchType.EDGE_PATCH, reverse_clean_corrupt=True)
        effect = batch_answer_diffs(out[1][batch.key], batch).item() - base
        kind, entry = _our_slot(pm, edge.dest.module_name)
        mine = ours[kind].per_pair[(1, entry, 0, *edge.patch_idx)].item()
        assert abs(mine - effect) <= ATOL * max(1.0, abs(effect)), f"{edge}: ours {mine:.6g} auto-circuit {effect:.6g}"
