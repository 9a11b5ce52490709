"""Train a small sparse autoencoder (SAE) on SmolLM2-135M-Instruct residual-stream activations.

Builds an offline corpus (templated IOI-style sentences with many names, places and objects, plus short
continuations sampled from the model itself), collects activations at ``blocks.{layer}.hook_resid_pre``
(every position except the first, whose norm is ~100x larger and which the SAE therefore reconstructs
badly), trains a ReLU SAE with an L1 penalty weighted by decoder row norms, and saves it as a sae_lens
directory (``cfg.json`` + ``sae_weights.safetensors``, loadable with ``sae_lens.SAE.load_from_disk``) that
reads raw activations and records its hook, model and ``prepend_bos=False`` in its metadata.

Run from the repository root (about 2.5-3 minutes on 2 CPU cores; no network needed; the first load of
the bundled model adds ~40 s to dequantize it into the cache):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_sae.py

The default output ``results/saes/smollm2-res12`` is the SAE used by ``examples/ioi_smollm2_sae.json``.
"""

import argparse
import itertools
import random
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

import atpframework as af

MODEL_NAME = "smollm2-135m-instruct"
NAMES = ("Mary John Tom James Anna Sarah David Emma Michael Lisa Paul Kate Mark Laura Peter Alice Daniel Rachel "
         "George Sophie Robert Emily Chris Hannah Steven Julia Kevin Grace Brian Olivia Jack Lucy Frank Helen").split()
PLACES = ("store park office school beach library hospital station restaurant market garden museum cinema "
          "bakery farm church airport kitchen gym zoo").split()
OBJECTS = ("drink ball letter book gift key phone cake ring bag flower ticket pen hat apple coin map cup "
           "toy note").split()
IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {b} gave a {obj} to {a}",
    "When {a} and {b} went to the {place}, {b} gave a {obj} to",
    "After {a} and {b} arrived at the {place}, {b} handed the {obj} to {a}.",
    "Then, {a} and {b} had a long day at the {place}. {b} gave the {obj} to",
    "While {a} and {b} were working at the {place}, {b} passed a {obj} to {a}.",
    "{a} and {b} met at the {place}. Later, {b} sent a {obj} to",
    "Yesterday {a} and {b} visited the {place}, and {b} bought a {obj} for {a}.",
    "Friends {a} and {b} found a {obj} at the {place}. {b} decided to give it to",
)
OTHER_TEMPLATES = (
    "{a} went to the {place} to buy a {obj}.", "The {obj} was left at the {place} by {a}.",
    "{a} asked {b} where the {place} was.", "Every morning, {a} walks to the {place} with a {obj}.",
    "{a} told {b} that the {obj} was broken.", "Is the {place} open today? {a} wants to get a {obj}.",
    "{a} is taller than {b}, but {b} is faster.", "At the {place}, {a} lost a {obj} and {b} found it.",
)
SEED_PROMPTS = (
    "Once upon a time, a little fox", "The capital of France is", "def add(a, b):",
    "My favourite recipe for a quick dinner is", "The weather today is", "In 1492, Columbus",
    "Photosynthesis is the process by which", "Here are three tips for better sleep:",
    "The cat sat on the mat and", "Dear John, thank you for", "The stock market fell today because",
    "To solve the equation 2x + 3 = 7,", "The history of the Roman Empire", "She opened the door and saw",
    "Water boils at", "The best way to learn a new language is", "import numpy as np\n",
    "The robot looked at the sky and", "Breaking news: scientists have discovered", "My name is Anna and I",
)


def load_backend() -> Any:
    """The bundled SmolLM2 model behind atpframework's TransformerLens backend."""
    plan = af.as_plan({"model": {"source": f"bundled:{MODEL_NAME}"}, "prompts": [{"clean": "a", "noise": "b"}],
                       "nodes": [{"kind": "resid"}], "method": {"name": "atp"}})
    return af.load_backend(plan)


def templated_corpus(n_sentences: int, rng: random.Random) -> list[str]:
    """IOI-style and other simple sentences with random names, places and objects."""
    templates = IOI_TEMPLATES + OTHER_TEMPLATES
    texts = []
    for _ in range(n_sentences):
        a, b = rng.sample(NAMES, 2)
        texts.append(rng.choice(templates).format(a=a, b=b, place=rng.choice(PLACES), obj=rng.choice(OBJECTS)))
    return texts


@torch.no_grad()
def generated_corpus(backend: Any, samples_per_prompt: int, new_tokens: int) -> list[str]:
    """Short sampled continuations of the seed prompts, generated as one left-padded batch."""
    prompts = [p for p in SEED_PROMPTS for _ in range(samples_per_prompt)]
    outputs = backend.model.generate(prompts, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                                     prepend_bos=False, use_past_kv_cache=True, verbose=False, return_type="str")
    return [text.split("<|im_end|>")[0] for text in outputs]


@torch.no_grad()
def collect_activations(backend: Any, texts: list[str], hook_name: str, layer: int,
                        batch_size: int = 64, max_len: int = 48) -> torch.Tensor:
    """(n, d_model) activations at ``hook_name``, every position but the first.

    Vectors with norm above 5x the median (~0.3%, attention-sink positions) are dropped: they would dominate the loss."""
    token_lists = sorted((backend.tokenize(t, prepend_bos=False)[:max_len] for t in texts), key=len)
    token_lists = [ids for ids in token_lists if len(ids) > 1]
    chunks = []
    for start in range(0, len(token_lists), batch_size):
        batch = token_lists[start:start + batch_size]
        width = max(map(len, batch))
        tokens = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in batch])  # right padding: causal
        _, cache = backend.model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=layer + 1)
        acts = cache[hook_name]
        chunks.extend(acts[i, 1:len(ids)] for i, ids in enumerate(batch))
    acts = torch.cat(chunks).float()
    norms = acts.norm(dim=1)
    return acts[norms <= 5 * norms.median()]


def build_sae(d_in: int, d_sae: int, hook_name: str, data_mean: torch.Tensor, seed: int) -> StandardSAE:
    """A StandardSAE with random decoder rows of norm 0.1, encoder tied to the decoder, b_dec at the data mean."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook_name, model_name=MODEL_NAME, prepend_bos=False)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                            normalize_activations="none", reshape_activations="none", metadata=metadata)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        directions = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(0.1 * directions / directions.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(data_mean)
    return sae


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor) -> dict[str, float]:
    """MSE per vector, fraction of variance explained, mean L0 and the fraction of latents never active."""
    latents = sae.encode(x)
    recon = sae.decode(latents)
    mse = (recon - x).pow(2).sum(-1).mean()
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    return {"mse": mse.item(), "fve": 1 - (mse / variance).item(), "l0": (latents > 0).float().sum(-1).mean().item(),
            "dead": (latents.amax(0) <= 0).float().mean().item()}


def train(sae: StandardSAE, x: torch.Tensor, steps: int, batch_size: int, lr: float, l1_coefficient: float,
          log_every: int) -> None:
    """Adam on MSE + l1 * sum_i f_i * ||W_dec_i||, L1 warm-up over 10% of steps, linear LR decay over the last 20%."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    order = itertools.chain.from_iterable(torch.randperm(len(x)).split(batch_size) for _ in itertools.count())
    start = time.time()
    for step, index in zip(range(1, steps + 1), order):
        batch = x[index]
        latents = sae.encode(batch)
        mse = (sae.decode(latents) - batch).pow(2).sum(-1).mean()
        sparsity = (latents * sae.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + l1_coefficient * min(1.0, step / (0.1 * steps)) * sparsity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        optimizer.step()
        if step % log_every == 0 or step == steps:
            variance = (batch - batch.mean(0)).pow(2).sum(-1).mean()
            l0 = (latents > 0).float().sum(-1).mean()
            print(f"step {step:5d}  mse {mse.item():8.3f}  fve {1 - (mse / variance).item():.3f}  "
                  f"l0 {l0.item():6.1f}  ({time.time() - start:.0f}s)", flush=True)


@torch.no_grad()
def fold_input_scale(sae: StandardSAE, scale: float) -> None:
    """Make an SAE trained on ``x * scale`` act on raw ``x`` (same latents, reconstruction divided by scale)."""
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=12, help="residual stream before this block (hook_resid_pre)")
    parser.add_argument("--d-sae", type=int, default=2048, help="number of SAE latents")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=1024, help="activation vectors per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--l1", type=float, default=0.3, help="L1 coefficient (inputs are scaled to norm sqrt(d))")
    parser.add_argument("--sentences", type=int, default=1800, help="templated sentences in the corpus")
    parser.add_argument("--out", type=Path, default=None, help="default results/saes/smollm2-res{layer}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(f"results/saes/smollm2-res{args.layer}")
    hook_name = f"blocks.{args.layer}.hook_resid_pre"
    torch.manual_seed(args.seed)
    start = time.time()

    backend = load_backend()
    print(f"model loaded ({time.time() - start:.0f}s)", flush=True)
    texts = templated_corpus(args.sentences, random.Random(args.seed)) + generated_corpus(backend, 2, 24)
    print(f"corpus: {len(texts)} texts ({time.time() - start:.0f}s)", flush=True)
    acts = collect_activations(backend, texts, hook_name, args.layer)
    acts = acts[torch.randperm(len(acts))]
    n_held_out = min(2048, len(acts) // 10)
    held_out, acts = acts[:n_held_out], acts[n_held_out:]
    print(f"{len(acts)} training + {len(held_out)} held-out activation vectors at {hook_name} "
          f"({time.time() - start:.0f}s)", flush=True)

    scale = acts.shape[1] ** 0.5 / acts.norm(dim=1).mean().item()
    sae = build_sae(acts.shape[1], args.d_sae, hook_name, acts.mean(0) * scale, args.seed)
    train(sae, acts * scale, args.steps, args.batch_size, args.lr, args.l1, log_every=max(1, args.steps // 10))
    fold_input_scale(sae, scale)

    sae.save_model(out)
    reloaded = SAE.load_from_disk(out)
    with torch.no_grad():
        gap = (reloaded(held_out) - sae(held_out)).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"the SAE reloaded from {out} differs from the trained one by up to {gap}")
    final = evaluate(reloaded, held_out)
    print(f"final (reloaded SAE, held-out vectors): fve {final['fve']:.3f}  l0 {final['l0']:.1f}  "
          f"dead latents {final['dead']:.1%}  max |reload diff| {gap:.1e}")
    print(f"saved SAE to {out} ({time.time() - start:.0f}s total)")


if __name__ == "__main__":
    main()
