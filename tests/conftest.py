"""Shared fixtures: tiny seeded random TransformerLens models built offline, and plan helpers."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
D_VOCAB = 61


def tiny_config(**overrides):
    """A HookedTransformerConfig of a tiny model; overrides pick the architecture variant."""
    from transformer_lens import HookedTransformerConfig

    base = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=D_VOCAB, n_ctx=32,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    base.update(overrides)
    return HookedTransformerConfig(**base)


def tiny_model(**overrides):
    """A tiny random ``HookedTransformer`` in eval mode, float32 on CPU; weights scaled up so effects are not tiny."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(tiny_config(**overrides))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


ARCHITECTURES = {
    "ln_gelu_learned": dict(),
    "attn_only_nonorm": dict(attn_only=True, d_mlp=None, normalization_type=None),
    "rms_rotary_gqa_gated": dict(
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
        gated_mlp=True, act_fn="silu", final_rms=True,
    ),
    "ln_rotary": dict(positional_embedding_type="rotary", rotary_dim=8),
}
"""Tiny-model variants covering: with/without MLP, LayerNorm/RMSNorm/none, learned/rotary positions, GQA."""


def make_plan(nodes, method="atp", prompts=None, metric="logit_diff", **extra):
    """A plan dict for an in-memory model with two token-id prompt pairs of length 6."""
    plan = {
        "model": {"source": "in_memory"},
        "prompts": prompts
        or [
            {"clean": [1, 2, 3, 4, 5, 6], "noise": [1, 9, 3, 4, 11, 6], "answer": 3, "wrong_answer": 4},
            {"clean": [7, 8, 2, 4, 5, 1], "noise": [7, 8, 12, 4, 5, 13], "answer": 6, "wrong_answer": 2},
        ],
        "metric": {"name": metric},
        "nodes": nodes,
        "method": {"name": method} if isinstance(method, str) else method,
    }
    plan.update(extra)
    return plan


def save_tiny_gpt2(path):
    """A tiny random GPT-2 saved as a Hugging Face directory (weights and config, no tokenizer).

    Saved by transformers 5, whose config.json lacks ``n_ctx``: the backend must cope (TransformerLens reads it).
    """
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 Hugging Face directory shared by a test module."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch_model(request):
    return request.param, tiny_model(**ARCHITECTURES[request.param])
