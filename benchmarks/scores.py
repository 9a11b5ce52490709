"""The numbers a restructuring must keep: every method's scores on fixed models and prompts.

    python benchmarks/scores.py --out before.safetensors                 # snapshot (about 2 min on 2 cores)
    python benchmarks/scores.py --out after.safetensors --compare before.safetensors

Runs every method on every node kind (heads, queries, keys, values, MLP neurons, residual positions)
on two TransformerLens models with random weights (``tiny``: GPT-2 style; ``rotary``: parallel
attention and MLP with rotary embeddings) and on the bundled SmolLM2-135M with the Hugging Face
backend (IOI prompts, final position), plus SAE latents on the tiny model. Scores, clean and noise
metrics are stored under ``model/method/selection``. ``--compare`` prints, per key, the largest
difference to an earlier snapshot relative to that key's largest |score|, and exits 1 if any key
is missing or differs beyond float32 rounding (``--rtol``, default 1e-5).
"""

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import atpframework as af

METHODS = [
    {"name": "atp"},
    {"name": "atp_qkfix"},
    {"name": "atp_graddrop"},
    {"name": "atp_graddrop", "granularity": "sublayer"},
    {"name": "atp_star"},
    {"name": "activation_patching"},
    {"name": "subsampling", "samples": 32},
    {"name": "blocks", "block_size": 4},
    {"name": "hierarchical", "budget": 16},
]
NODES_ALL = [
    {"kind": "attn_head", "name": "heads"},
    {"kind": "attn_q", "name": "queries"},
    {"kind": "attn_k", "name": "keys"},
    {"kind": "attn_v", "name": "values"},
    {"kind": "mlp_neuron", "name": "neurons"},
    {"kind": "resid", "name": "resid"},
]
NODES_FINAL = [dict(n, positions=[-1]) for n in NODES_ALL[:1] + NODES_ALL[4:5]] + [
    {"kind": "attn_q", "name": "queries", "positions": [-1]},
    {"kind": "attn_k", "name": "keys", "positions": [2, 5]},
    {"kind": "attn_v", "name": "values", "positions": [2, 5]},
    {"kind": "resid", "name": "resid"},
]
IOI = [
    ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("When Tom and James went to the park, James gave a ball to", "When Tom and James went to the park, Tom gave a ball to", " Tom", " James"),
]
SHAPES = {
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, act_fn="gelu"),
    "rotary": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, act_fn="gelu",
                   positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True),
}


def tiny_model(shape: str) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(**SHAPES[shape], n_ctx=32, normalization_type="LN", seed=0, device="cpu")
        return HookedTransformer(cfg).eval()


def token_pairs(seed: int = 0, n: int = 3, seq: int = 6, vocab: int = 61) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clean = torch.randint(1, vocab, (seq,), generator=gen)
        noise = clean.clone()
        noise[[2, 4]] = torch.randint(1, vocab, (2,), generator=gen)
        answer, wrong = torch.randint(vocab, (2,), generator=gen).tolist()
        pairs.append({"clean": clean.tolist(), "noise": noise.tolist(), "answer": answer, "wrong_answer": wrong})
    return pairs


def tiny_sae(d_in: int, d_sae: int) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return sae.eval()


def method_key(method: dict[str, Any]) -> str:
    return "_".join(str(v) for v in method.values())


def record(out: dict[str, torch.Tensor], prefix: str, result: Any) -> None:
    out[f"{prefix}/metric_clean"] = result.metric_clean.float()
    out[f"{prefix}/metric_noise"] = result.metric_noise.float()
    for name in result.nodes:
        out[f"{prefix}/{name}"] = result[name].per_pair.to_dense().float().contiguous()


def snapshot(models: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shape in [m for m in models if m in SHAPES]:
        model = tiny_model(shape)
        for method in METHODS:
            plan = {"model": {"source": "in_memory"}, "prompts": token_pairs(), "nodes": NODES_ALL, "method": method, "batch_size": 2}
            record(out, f"{shape}/{method_key(method)}", af.run(plan, model=model))
            print(f"{shape} {method_key(method)}", file=sys.stderr)
    if "tiny" in models:
        model = tiny_model("tiny")
        sae_nodes = [{"kind": "sae_latent", "name": "latents", "sae": "res1"}, {"kind": "sae_error", "name": "error", "sae": "res1"}]
        for method in (METHODS[0], METHODS[4], METHODS[5]):
            plan = {"model": {"source": "in_memory"}, "prompts": token_pairs(), "nodes": sae_nodes, "method": method,
                    "saes": [{"name": "res1", "site": "resid", "site_layer": 1}]}
            record(out, f"tiny_sae/{method_key(method)}", af.run(plan, model=model, saes={"res1": tiny_sae(32, 48)}))
    if "smollm2" in models:
        prompts = [{"clean": c, "noise": n, "answer": a, "wrong_answer": w} for c, n, a, w in IOI]
        source = {"source": "bundled:smollm2-135m-instruct", "backend": "huggingface"}
        backend = af.load_backend(af.as_plan({"model": source, "prompts": prompts, "nodes": [{"kind": "resid"}], "method": {"name": "atp"}}))
        for method in METHODS[:5]:
            plan = {"model": source, "prompts": prompts, "nodes": NODES_FINAL, "method": method}
            record(out, f"smollm2/{method_key(method)}", af.run(plan, backend=backend))
            print(f"smollm2 {method_key(method)}", file=sys.stderr)
    return out


def compare(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], rtol: float) -> bool:
    ok = True
    for key in sorted(set(old) | set(new)):
        if key not in new or key not in old:
            print(f"{key:60s} only in {'the old' if key in old else 'the new'} snapshot")
            ok = False
            continue
        a, b = new[key], old[key]
        if a.shape != b.shape:
            print(f"{key:60s} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            ok = False
            continue
        both_nan = a.isnan() & b.isnan()
        diff = float(torch.where(both_nan, 0.0, (a - b).abs()).nan_to_num(float("inf")).max()) if a.numel() else 0.0
        scale = float(b.nan_to_num(0.0).abs().max()) if b.numel() else 0.0
        rel = diff / scale if scale > 0 else diff
        verdict = "ok" if rel <= rtol else "DIFFERS"
        ok &= rel <= rtol
        print(f"{key:60s} max |diff| {diff:.3g}  relative {rel:.3g}  {verdict}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--models", default="tiny,rotary,smollm2")
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scores = snapshot(args.models.split(","))
    save_file(scores, str(args.out))
    print(f"wrote {len(scores)} tensors to {args.out}", file=sys.stderr)
    if args.compare is not None:
        same = compare(scores, load_file(str(args.compare)), args.rtol)
        print("every score agrees to float32 rounding" if same else "SCORES DIFFER")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
